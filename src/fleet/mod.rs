//! The fleet: the replicas of one berth that share an object store, and who among them
//! fetches what.
//!
//! Every blob digest and tag has one owner among the live replicas, chosen by rendezvous
//! hashing (the replica whose hash of `(replica, key)` is highest), so that all replicas
//! agree without talking and only the keys of a replica that comes or goes move. A replica
//! that misses asks the owner over the ordinary OCI API, with a signed header that marks
//! the request as forwarded: the owner never forwards it again, and no outside client can
//! forge it. A peer that does not answer within `peer_timeout` is skipped for a while and
//! the next replica in rendezvous order is asked instead; when every other replica is
//! down, this one fetches by itself. A cache needs no consensus: at worst two replicas
//! fetch the same thing once each, and every answer is verified against its digest.
//!
//! This module owns the membership and the signing; `proxy` decides when to ask a peer.

pub mod client;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest as _, Sha256};

use crate::config::FleetConfig;

/// The header that marks (and authenticates) a request forwarded by a replica.
pub const FORWARDED: &str = "x-berth-fleet";
/// The client a forwarded request is made for (per-client budgets), covered by the signature.
pub const CLIENT: &str = "x-berth-client";
/// How far apart two replicas' clocks may be for a signature to count.
const MAX_SKEW_SECS: u64 = 120;
/// How long a peer that failed to answer is skipped.
const DOWN_FOR: Duration = Duration::from_secs(10);
/// How long an owner that accepted a request may take to send its response headers: it
/// may be fetching from its upstream first (a token round trip, a slow registry), which
/// is not a sign of a dead peer. It also bounds each read of a response body.
const RESPONSE_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForwardLabels {
    kind: &'static str,
    result: &'static str,
}

/// The fleet's metrics, registered by the fleet itself.
#[derive(Clone, Default)]
pub struct FleetMetrics {
    peers: Gauge,
    peers_down: Gauge,
    forwarded: Family<ForwardLabels, Counter>,
    received: Counter,
    refused: Counter,
}

impl FleetMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = FleetMetrics::default();
        registry.register(
            "fleet_peers",
            "Replicas in the fleet (this one included)",
            m.peers.clone(),
        );
        registry.register(
            "fleet_peers_down",
            "Replicas currently skipped because they did not answer",
            m.peers_down.clone(),
        );
        registry.register(
            "fleet_forwarded",
            "Misses this replica asked their owner for, by kind and result (ok, error, down)",
            m.forwarded.clone(),
        );
        registry.register(
            "fleet_received",
            "Forwarded requests this replica answered as owner",
            m.received.clone(),
        );
        registry.register(
            "fleet_refused",
            "Requests carrying a fleet header whose signature did not verify",
            m.refused.clone(),
        );
        m
    }
}

/// A replica in rendezvous order for some key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// This replica: fetch it yourself.
    Me,
    /// Another replica, by base URL.
    Peer(String),
}

/// Who sent a request, as far as the fleet is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// The client the asking replica serves (for budgets), when it said.
    pub client: Option<String>,
}

/// Why a fleet header was refused.
#[derive(Debug)]
pub struct BadSignature(pub &'static str);

pub struct Fleet {
    me: String,
    peers: RwLock<Vec<String>>,
    down: Mutex<HashMap<String, Instant>>,
    secret: Vec<u8>,
    dns: Option<String>,
    resolve_interval: Duration,
    http: reqwest::Client,
    metrics: FleetMetrics,
    unlisted_warned: std::sync::atomic::AtomicBool,
}

/// `http://10.0.0.7:5000/` and `http://10.0.0.7:5000` are one replica.
fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_ascii_lowercase()
}

impl Fleet {
    pub fn new(config: &FleetConfig, metrics: FleetMetrics) -> Result<Fleet, String> {
        let secret = std::fs::read(&config.secret_file)
            .map_err(|e| format!("fleet.secret_file {}: {e}", config.secret_file.display()))?;
        let secret: Vec<u8> = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
        if secret.len() < 16 {
            return Err(format!(
                "fleet.secret_file {}: the secret must be at least 16 characters",
                config.secret_file.display()
            ));
        }
        let me = std::env::var("BERTH_FLEET_ADVERTISE")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| config.advertise.clone())
            .ok_or(
                "fleet.advertise (or BERTH_FLEET_ADVERTISE) must say how peers reach this replica",
            )?;
        reqwest::Url::parse(&me).map_err(|e| format!("fleet.advertise {me:?}: {e}"))?;
        let me = normalize(&me);
        let mut peers: Vec<String> = config.peers.iter().map(|p| normalize(p)).collect();
        if !config.peers.is_empty() && !peers.contains(&me) {
            // Spelt differently, this replica would count twice and could forward to
            // itself.
            return Err(format!(
                "fleet.peers must list this replica's advertised address {me:?} exactly"
            ));
        }
        if peers.is_empty() {
            peers.push(me.clone());
        }
        peers.sort();
        peers.dedup();
        let http = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION"), " (fleet)"))
            .connect_timeout(config.peer_timeout)
            .read_timeout(RESPONSE_WAIT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("fleet: cannot build the HTTP client: {e}"))?;
        metrics.peers.set(peers.len() as i64);
        Ok(Fleet {
            me,
            peers: RwLock::new(peers),
            down: Mutex::new(HashMap::new()),
            secret,
            dns: config.peers_dns.clone(),
            resolve_interval: config.resolve_interval,
            http,
            metrics,
            unlisted_warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// How many replicas the fleet has now (this one included).
    pub fn size(&self) -> usize {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn peers(&self) -> Vec<String> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The replicas in rendezvous order for `key`, skipping those marked down.
    pub fn owners(&self, key: &str) -> Vec<Owner> {
        let peers = self.peers();
        let now = Instant::now();
        let down = {
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            down.retain(|_, until| *until > now);
            self.metrics.peers_down.set(down.len() as i64);
            down.keys().cloned().collect::<Vec<_>>()
        };
        let mut ranked: Vec<(u64, &String)> = peers
            .iter()
            .filter(|p| **p == self.me || !down.contains(p))
            .map(|p| (score(p, key), p))
            .collect();
        ranked.sort_by(|a, b| b.cmp(a));
        ranked
            .into_iter()
            .map(|(_, p)| {
                if *p == self.me {
                    Owner::Me
                } else {
                    Owner::Peer(p.clone())
                }
            })
            .collect()
    }

    /// A peer failed to answer: skip it for a while.
    pub fn mark_down(&self, peer: &str, why: &str) {
        let (first, count) = {
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            let first = down
                .insert(peer.to_owned(), Instant::now() + DOWN_FOR)
                .is_none();
            (first, down.len())
        };
        self.metrics.peers_down.set(count as i64);
        if first {
            tracing::warn!(
                peer,
                error = why,
                "fleet peer did not answer; skipping it for {}s",
                DOWN_FOR.as_secs()
            );
        }
    }

    /// The MAC covers the time, the replica the request is for (a captured request
    /// cannot be replayed at another), the method, path and query, and the client.
    fn mac(&self, ts: u64, to: &str, method: &str, target: &str, client: &str) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(format!("{ts}\n{to}\n{method}\n{target}\n{client}").as_bytes());
        mac
    }

    /// The headers that mark a request to replica `to` for `target` (path and query) as
    /// forwarded.
    pub fn sign(&self, to: &str, method: &str, target: &str, client: Option<&str>) -> HeaderMap {
        let ts = crate::clock::now_secs();
        let tag = self
            .mac(ts, &normalize(to), method, target, client.unwrap_or(""))
            .finalize();
        let hex: String = tag
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("v1 {ts} {hex}")) {
            h.insert(FORWARDED, v);
        }
        if let Some(v) = client.and_then(|c| HeaderValue::from_str(c).ok()) {
            h.insert(CLIENT, v);
        }
        h
    }

    /// Checks a request's fleet header: `Ok(None)` when there is none, `Ok(Some(..))`
    /// when it verifies, an error when it is forged, stale or malformed.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        method: &str,
        target: &str,
    ) -> Result<Option<Forwarded>, BadSignature> {
        let Some(value) = headers.get(FORWARDED) else {
            return Ok(None);
        };
        let result = self.check(value, headers, method, target);
        match &result {
            Ok(_) => self.metrics.received.inc(),
            Err(_) => self.metrics.refused.inc(),
        };
        result.map(Some)
    }

    fn check(
        &self,
        value: &HeaderValue,
        headers: &HeaderMap,
        method: &str,
        target: &str,
    ) -> Result<Forwarded, BadSignature> {
        let text = value.to_str().map_err(|_| BadSignature("not text"))?;
        let mut parts = text.split(' ');
        let (Some("v1"), Some(ts), Some(hex), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadSignature("malformed"));
        };
        let ts: u64 = ts.parse().map_err(|_| BadSignature("malformed time"))?;
        if crate::clock::now_secs().abs_diff(ts) > MAX_SKEW_SECS {
            return Err(BadSignature("expired"));
        }
        let tag = decode_hex(hex).ok_or(BadSignature("malformed signature"))?;
        let client = headers.get(CLIENT).and_then(|v| v.to_str().ok());
        // verify_slice compares in constant time.
        self.mac(ts, &self.me, method, target, client.unwrap_or(""))
            .verify_slice(&tag)
            .map_err(|_| BadSignature("wrong signature"))?;
        Ok(Forwarded {
            client: client.map(str::to_owned),
        })
    }

    /// Sends a forwarded GET or HEAD to `peer`. A peer that cannot be connected to within
    /// `peer_timeout`, sends no response headers within 30 s, or answers that it cannot
    /// serve (401: another fleet secret; 5xx: broken) is marked down: `Err`, and the
    /// caller asks the next replica. Any other answer is the owner's to give.
    pub async fn ask(
        &self,
        peer: &str,
        kind: &'static str,
        method: reqwest::Method,
        target: &str,
        extra: HeaderMap,
        client: Option<&str>,
    ) -> Result<reqwest::Response, String> {
        let mut headers = self.sign(peer, method.as_str(), target, client);
        headers.extend(extra);
        let send = self
            .http
            .request(method, format!("{peer}{target}"))
            .headers(headers)
            .send();
        let result = match tokio::time::timeout(RESPONSE_WAIT, send).await {
            Ok(Ok(resp)) if resp.status() == reqwest::StatusCode::UNAUTHORIZED => {
                Err("refused this replica's signature (is the fleet secret the same?)".to_owned())
            }
            Ok(Ok(resp))
                if resp.status().is_server_error()
                    && resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE =>
            {
                Err(format!("answered {}", resp.status()))
            }
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(RESPONSE_WAIT)
            )),
        };
        let label = ForwardLabels {
            kind,
            result: if result.is_ok() { "ok" } else { "down" },
        };
        self.metrics.forwarded.get_or_create(&label).inc();
        if let Err(e) = &result {
            self.mark_down(peer, e);
        }
        result
    }

    /// Counts a forwarded request that reached the peer but failed later (cut stream,
    /// an error the peer reported).
    pub fn forward_failed(&self, kind: &'static str) {
        self.metrics
            .forwarded
            .get_or_create(&ForwardLabels {
                kind,
                result: "error",
            })
            .inc();
    }

    /// How often `peers_dns` is resolved again; `None` with a static list.
    pub fn resolve_interval(&self) -> Option<Duration> {
        self.dns.as_ref().map(|_| self.resolve_interval)
    }

    /// Resolves `peers_dns` once (bounded), so that a replica starts with the fleet it
    /// joins rather than believing it owns every key and the whole quota.
    pub async fn resolve_now(&self) {
        let Some(name) = self.dns.as_deref() else {
            return;
        };
        let scheme = if self.me.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let port = name.rsplit_once(':').map_or("5000", |(_, p)| p);
        let lookup = tokio::time::timeout(RESPONSE_WAIT, tokio::net::lookup_host(name)).await;
        let addrs = match lookup {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                tracing::warn!(name, error = %e, "cannot resolve fleet.peers_dns; keeping the last list");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    name,
                    "fleet.peers_dns did not resolve in time; keeping the last list"
                );
                return;
            }
        };
        let mut peers: Vec<String> = addrs
            .map(|a| match a.ip() {
                IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
                IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
            })
            .collect();
        if !peers.contains(&self.me) {
            // Not ready yet (a headless Service lists ready pods only), or `advertise`
            // is spelt otherwise than the records: count this replica once all the same.
            // Requests to it are signed for the address the others resolve; if that is
            // not `advertise`, they are refused: say so, once.
            if !self
                .unlisted_warned
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(me = %self.me, name,
                    "this replica's advertised address is not among fleet.peers_dns's records \
                     (normal until it is ready); if it stays so, set advertise to http://<pod IP>:<port>");
            }
            peers.push(self.me.clone());
        }
        peers.sort();
        peers.dedup();
        let mut current = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if *current != peers {
            tracing::info!(peers = ?peers, "fleet membership changed");
            self.metrics.peers.set(peers.len() as i64);
            *current = peers;
        }
    }
}

/// The rendezvous score of a replica for a key: the first 8 bytes of a SHA-256, so that
/// every replica (whatever its build) ranks the same way.
fn score(peer: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(peer.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(me: &str, peers: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        let config = FleetConfig {
            advertise: Some(me.into()),
            peers: peers.iter().map(|s| s.to_string()).collect(),
            peers_dns: None,
            resolve_interval: Duration::from_secs(10),
            secret_file: secret,
            peer_timeout: Duration::from_secs(1),
        };
        Fleet::new(&config, FleetMetrics::default()).unwrap()
    }

    const PEERS: [&str; 3] = ["http://a:5000", "http://b:5000", "http://c:5000"];

    #[test]
    fn every_replica_agrees_on_the_owner() {
        let fleets: Vec<Fleet> = PEERS.iter().map(|me| fleet(me, &PEERS)).collect();
        let mut owned = HashMap::new();
        for i in 0..300 {
            let key = format!("sha256:{i:064x}");
            let first = |f: &Fleet| match &f.owners(&key)[0] {
                Owner::Me => f.me().to_owned(),
                Owner::Peer(p) => p.clone(),
            };
            let owner = first(&fleets[0]);
            assert!(fleets.iter().all(|f| first(f) == owner), "{key}");
            *owned.entry(owner).or_insert(0) += 1;
        }
        // Rendezvous spreads keys: each of three replicas owns a fair share.
        assert_eq!(owned.len(), 3);
        assert!(owned.values().all(|n| *n > 60), "{owned:?}");
    }

    #[test]
    fn a_down_peer_is_skipped_and_only_its_keys_move() {
        let f = fleet(PEERS[0], &PEERS);
        let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        let before: Vec<_> = keys.iter().map(|k| f.owners(k)).collect();
        f.mark_down(PEERS[1], "test");
        for (k, was) in keys.iter().zip(before) {
            let now = f.owners(k);
            assert_eq!(now.len(), 2);
            let expected: Vec<_> = was
                .into_iter()
                .filter(|o| *o != Owner::Peer(PEERS[1].into()))
                .collect();
            assert_eq!(now, expected, "{k}");
        }
    }

    #[test]
    fn signatures_verify_and_forgeries_do_not() {
        let f = fleet(PEERS[0], &PEERS);
        let h = f.sign(
            PEERS[0],
            "GET",
            "/v2/a/blobs/x?ns=docker.io",
            Some("10.0.0.9"),
        );
        // Meant for another replica: refused here.
        let elsewhere = f.sign(
            PEERS[1],
            "GET",
            "/v2/a/blobs/x?ns=docker.io",
            Some("10.0.0.9"),
        );
        assert!(f
            .verify(&elsewhere, "GET", "/v2/a/blobs/x?ns=docker.io")
            .is_err());
        let ok = f.verify(&h, "GET", "/v2/a/blobs/x?ns=docker.io").unwrap();
        assert_eq!(ok.unwrap().client.as_deref(), Some("10.0.0.9"));
        assert!(f.verify(&h, "GET", "/v2/a/blobs/y?ns=docker.io").is_err());
        assert!(f.verify(&h, "HEAD", "/v2/a/blobs/x?ns=docker.io").is_err());
        let mut other_client = h.clone();
        other_client.insert(CLIENT, HeaderValue::from_static("10.0.0.10"));
        assert!(f
            .verify(&other_client, "GET", "/v2/a/blobs/x?ns=docker.io")
            .is_err());
        let mut forged = HeaderMap::new();
        forged.insert(FORWARDED, HeaderValue::from_static("v1 1 00"));
        assert!(f.verify(&forged, "GET", "/").is_err());
        assert!(f.verify(&HeaderMap::new(), "GET", "/").unwrap().is_none());
    }
}
