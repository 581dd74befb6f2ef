//! The upstream's pull quota, spent like money: a token bucket per upstream account (the
//! upstream's own credentials or anonymous access, and each `[[upstreams.credentials]]`
//! entry: Docker Hub counts per account), sized from configuration and corrected by the
//! `ratelimit-limit` / `ratelimit-remaining` headers whenever the upstream sends them.
//!
//! Only counted requests take a token (on Docker Hub: manifest GETs). A 429 empties the
//! bucket until `Retry-After` (or the time one token takes to refill). Below the reserve,
//! tokens are kept for images berth has never seen: refreshing a moved tag of an image it
//! already holds is refused, and the proxy serves that image stale instead.
//!
//! This module decides whether a request may go; `proxy` decides what to do when not.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;

use super::report::{self, BucketId};
use crate::config::{CountedRequest, QuotaConfig};
use crate::metrics::{Metrics, QuotaRefusal};

/// Why a counted request is wanted: the reserve is kept for `New`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Something berth does not have (a new image, an unknown tag or digest).
    New,
    /// A newer version of something berth has (a moved tag).
    Refresh,
}

/// A refusal, with what the client should be told.
#[derive(Clone, Debug)]
pub struct Denied {
    pub reason: QuotaRefusal,
    /// Tokens left (whole).
    pub remaining: u64,
    /// When the next token (or the end of an upstream cooldown) is due.
    pub retry_after: Duration,
}

/// The bucket's size and refill window.
#[derive(Clone, Copy, Debug)]
struct Size {
    capacity: f64,
    per: Duration,
}

/// The bucket as the status page shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuotaSnapshot {
    /// Tokens left; `None` when unlimited.
    pub tokens: Option<u64>,
    pub capacity: Option<u64>,
    /// `ratelimit-limit` / `ratelimit-remaining` as last seen, if ever.
    pub header_limit: Option<u64>,
    pub header_remaining: Option<u64>,
    pub cooldown_seconds: u64,
    pub refill_seconds: u64,
}

struct State {
    header_limit: Option<u64>,
    header_remaining: Option<u64>,
    /// The configured bucket: the operator's cap, which headers may lower but not raise.
    cap: Option<Size>,
    /// The bucket in force: the cap, or what the upstream's headers say.
    size: Option<Size>,
    /// The configured cap before a fleet split it.
    configured: Option<Size>,
    /// The window the upstream's `ratelimit-limit` named, if it did.
    header_per: Option<Duration>,
    /// This replica's part of the upstream's quota (1 alone; 1/n in a fleet of n).
    share: f64,
    tokens: f64,
    refilled: Instant,
    /// After a 429: no counted request until then.
    cooldown_until: Option<Instant>,
}

pub struct Quota {
    /// Whose bucket: names its metrics and log lines.
    id: BucketId,
    counted: Vec<CountedRequest>,
    /// Fraction of the capacity kept for `Purpose::New`.
    reserve: f64,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

/// What an empty estimate of the upstream's window falls back to.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);

impl Quota {
    /// The bucket of an upstream's own account. `config: None` is unlimited until the
    /// upstream's headers say otherwise.
    pub fn new(
        upstream: &str,
        config: Option<QuotaConfig>,
        default_counted: Vec<CountedRequest>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let id = BucketId {
            upstream: upstream.to_owned(),
            credential: None,
        };
        Self::for_account(id, config, default_counted, metrics)
    }

    /// The bucket of any account: the upstream's own (`credential: None`) or one of its
    /// `[[upstreams.credentials]]`.
    pub fn for_account(
        id: BucketId,
        config: Option<QuotaConfig>,
        default_counted: Vec<CountedRequest>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let size = config.as_ref().map(|q| Size {
            capacity: f64::from(q.requests),
            per: q.per,
        });
        let q = Quota {
            id,
            counted: config
                .as_ref()
                .and_then(|q| q.counts.clone())
                .unwrap_or(default_counted),
            reserve: config.as_ref().map_or(0.2, |q| q.reserve),
            state: Mutex::new(State {
                tokens: size.map_or(0.0, |s| s.capacity),
                cap: size,
                size,
                configured: size,
                header_per: None,
                share: 1.0,
                header_limit: None,
                header_remaining: None,
                refilled: Instant::now(),
                cooldown_until: None,
            }),
            metrics,
        };
        q.publish();
        q
    }

    /// Whose bucket this is.
    pub fn id(&self) -> &BucketId {
        &self.id
    }

    /// Whether a request of this method to this kind of endpoint spends quota.
    pub fn counts(&self, request: CountedRequest) -> bool {
        self.counted.contains(&request)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a token for a counted request, or says why not and until when.
    pub fn acquire(&self, purpose: Purpose) -> Result<(), Denied> {
        let now = Instant::now();
        let result = {
            let mut s = self.lock();
            refill(&mut s, now);
            if let Some(until) = s.cooldown_until.filter(|u| *u > now) {
                Err(Denied {
                    reason: QuotaRefusal::Cooldown,
                    remaining: 0,
                    retry_after: until - now,
                })
            } else if let Some(size) = s.size {
                // A refresh must leave the reserve untouched after it spends its token.
                let floor = match purpose {
                    Purpose::New => 1.0,
                    Purpose::Refresh => size.capacity * self.reserve + 1.0,
                };
                if s.tokens >= floor {
                    s.tokens -= 1.0;
                    Ok(())
                } else {
                    let per_token = size.per.as_secs_f64() / size.capacity;
                    let wait = (floor - s.tokens).max(0.0) * per_token;
                    Err(Denied {
                        reason: if purpose == Purpose::Refresh && s.tokens >= 1.0 {
                            QuotaRefusal::Reserve
                        } else {
                            QuotaRefusal::Empty
                        },
                        remaining: s.tokens.floor() as u64,
                        retry_after: secs(wait),
                    })
                }
            } else {
                Ok(())
            }
        };
        if let Err(d) = &result {
            report::refused(&self.metrics, &self.id, d.reason);
        }
        self.publish();
        result
    }

    /// Counts a counted request that reached the upstream.
    pub fn spent(&self) {
        report::counted(&self.metrics, &self.id);
    }

    /// Gives back a token for a counted request that never reached the upstream.
    pub fn refund(&self) {
        let mut s = self.lock();
        if let Some(size) = s.size {
            s.tokens = (s.tokens + 1.0).min(size.capacity);
        }
        drop(s);
        self.publish();
    }

    /// Learns from `ratelimit-limit: 100;w=21600` and `ratelimit-remaining: 76;w=21600`.
    /// Without a configured quota the upstream's count is the truth; with one, the
    /// configuration is a cap that the headers can lower but not raise.
    pub fn observe(&self, headers: &HeaderMap) {
        let limit = parse_ratelimit(headers, "ratelimit-limit");
        let remaining = parse_ratelimit(headers, "ratelimit-remaining");
        if limit.is_none() && remaining.is_none() {
            return;
        }
        {
            let mut s = self.lock();
            refill(&mut s, Instant::now());
            if let Some((limit, window)) = limit {
                s.header_limit = Some(limit);
                s.header_per = window.or(s.header_per);
                resize(&mut s);
            }
            if let Some((remaining, _)) = remaining {
                s.header_remaining = Some(remaining);
                // The upstream counts for the whole fleet (one account or address).
                let mine = remaining as f64 * s.share;
                s.tokens = match s.cap {
                    Some(_) => s.tokens.min(mine),
                    None => mine,
                };
                if let Some(size) = s.size {
                    s.tokens = s.tokens.min(size.capacity);
                }
            }
        }
        report::ratelimit(
            &self.metrics,
            &self.id,
            limit.map(|(l, _)| l),
            remaining.map(|(r, _)| r),
        );
        self.publish();
    }

    /// A fleet of `replicas` shares one upstream quota: each spends at most its part of
    /// the configured cap, and of what the upstream's headers say remains. Counted
    /// requests are made only by the owner of each key, and keys are spread evenly by
    /// rendezvous hashing, so equal parts match how the fleet spends.
    pub fn share(&self, replicas: usize) {
        {
            let mut s = self.lock();
            refill(&mut s, Instant::now());
            s.share = 1.0 / replicas.max(1) as f64;
            resize(&mut s);
        }
        self.publish();
    }

    /// The upstream said 429: no counted request until `retry_after` (or until one token
    /// would have refilled). Logged once per cooldown, not per request.
    pub fn too_many_requests(&self, retry_after: Option<Duration>) -> Duration {
        let now = Instant::now();
        let wait = {
            let mut s = self.lock();
            let wait = retry_after.unwrap_or_else(|| {
                s.size
                    .map_or(DEFAULT_COOLDOWN, |z| secs(z.per.as_secs_f64() / z.capacity))
            });
            let was_cooling = s.cooldown_until.is_some_and(|u| u > now);
            s.tokens = 0.0;
            s.refilled = now;
            s.cooldown_until = Some(now.checked_add(wait).unwrap_or(now));
            if !was_cooling {
                tracing::warn!(upstream = %self.id.upstream,
                    credential = self.id.credential.as_deref().unwrap_or("default"),
                    retry_after_s = wait.as_secs(),
                    "upstream answered 429: no counted requests until the cooldown ends; serving cached copies");
            }
            wait
        };
        self.publish();
        wait
    }

    /// Updates the quota gauges (also called at scrape time, so refills show).
    pub fn publish(&self) {
        let snap = self.snapshot();
        report::gauges(
            &self.metrics,
            &self.id,
            snap.tokens.zip(snap.capacity),
            snap.refill_seconds,
        );
    }

    /// The bucket now, for the status page and `berth status`.
    pub fn snapshot(&self) -> QuotaSnapshot {
        let now = Instant::now();
        let mut s = self.lock();
        refill(&mut s, now);
        let cooldown = s.cooldown_until.filter(|u| *u > now).map(|u| u - now);
        let refill_seconds = match (cooldown, s.size) {
            (Some(c), _) => c.as_secs_f64(),
            (None, Some(size)) if s.tokens < size.capacity => {
                (1.0 - s.tokens.fract()) * size.per.as_secs_f64() / size.capacity
            }
            _ => 0.0,
        };
        QuotaSnapshot {
            tokens: s.size.map(|_| s.tokens.floor() as u64),
            capacity: s.size.map(|z| z.capacity as u64),
            header_limit: s.header_limit,
            header_remaining: s.header_remaining,
            cooldown_seconds: cooldown.map_or(0, |c| c.as_secs().max(1)),
            refill_seconds: refill_seconds.ceil() as u64,
        }
    }
}

/// Seconds as a Duration, at least one, never panicking on odd floats.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.ceil().max(1.0)).unwrap_or(Duration::from_secs(24 * 3600))
}

/// Derives the bucket in force from what it depends on: the configured cap and the
/// upstream's limit (from its headers), each cut to this replica's share of the fleet;
/// the smaller wins. The one place `cap` and `size` are computed.
fn resize(s: &mut State) {
    s.cap = s.configured.map(|c| Size {
        capacity: (c.capacity * s.share).max(1.0),
        per: c.per,
    });
    let upstream = s.header_limit.map(|limit| Size {
        capacity: (limit.max(1) as f64 * s.share).max(1.0),
        per: s
            .header_per
            .or(s.cap.map(|c| c.per))
            .unwrap_or(Duration::from_secs(6 * 3600)),
    });
    s.size = match (s.cap, upstream) {
        (Some(cap), Some(up)) if cap.capacity <= up.capacity => Some(cap),
        (_, Some(up)) => Some(up),
        (cap, None) => cap,
    };
    if let Some(size) = s.size {
        s.tokens = s.tokens.min(size.capacity);
    }
}

/// Continuous refill: `capacity` tokens per window, never above capacity. When an
/// upstream cooldown has just ended, one token is there to probe with: the upstream said
/// when to come back, and its answer's headers will set the bucket right.
fn refill(s: &mut State, now: Instant) {
    if let Some(until) = s.cooldown_until.filter(|u| *u <= now) {
        // Nothing accrues during a cooldown: one probe token, refilling from its end.
        s.cooldown_until = None;
        s.tokens = 1.0;
        s.refilled = until;
    } else if s.cooldown_until.is_some() {
        s.refilled = now;
        return;
    }
    if let Some(size) = s.size {
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * size.capacity / size.per.as_secs_f64()).min(size.capacity);
    }
    s.refilled = now;
}

/// `76;w=21600` → (76, Some(21600 s)).
fn parse_ratelimit(headers: &HeaderMap, name: &str) -> Option<(u64, Option<Duration>)> {
    let v = headers.get(name)?.to_str().ok()?;
    let mut parts = v.split(';');
    let n = crate::oci::digits(parts.next()?.trim())?;
    // The window is bounded (30 days) before it reaches time arithmetic.
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| crate::oci::digits(w.trim()))
        .map(|w| Duration::from_secs(w.clamp(1, 30 * 24 * 3600)));
    Some((n, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(requests: u32, per_secs: u64) -> Quota {
        Quota::new(
            "docker.io",
            Some(QuotaConfig {
                requests,
                per: Duration::from_secs(per_secs),
                reserve: 0.2,
                counts: None,
            }),
            vec![CountedRequest::ManifestGet],
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn spends_and_keeps_the_reserve_for_new_images() {
        let q = quota(10, 3600);
        for _ in 0..8 {
            q.acquire(Purpose::Refresh).unwrap();
        }
        // 2 left = the 20% reserve: refreshes stop, new images still go.
        let d = q.acquire(Purpose::Refresh).unwrap_err();
        assert_eq!(d.reason, QuotaRefusal::Reserve);
        q.acquire(Purpose::New).unwrap();
        q.acquire(Purpose::New).unwrap();
        let d = q.acquire(Purpose::New).unwrap_err();
        assert_eq!(d.reason, QuotaRefusal::Empty);
        assert_eq!(d.remaining, 0);
        assert!(
            d.retry_after >= Duration::from_secs(300),
            "{:?}",
            d.retry_after
        );
    }

    #[test]
    fn headers_lower_a_configured_cap_but_never_raise_it() {
        let q = quota(100, 21600);
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "200;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "3;w=21600".parse().unwrap());
        q.observe(&h);
        assert_eq!(q.snapshot().tokens, Some(3));
        assert_eq!(q.snapshot().capacity, Some(100));
        h.insert("ratelimit-limit", "50;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "40;w=21600".parse().unwrap());
        q.observe(&h);
        assert_eq!(q.snapshot().capacity, Some(50));
        assert_eq!(
            q.snapshot().tokens,
            Some(3),
            "a higher remaining does not raise berth's count"
        );
    }

    #[test]
    fn without_a_cap_the_headers_are_the_truth() {
        let q = Quota::new(
            "docker.io",
            None,
            vec![CountedRequest::ManifestGet],
            Arc::new(Metrics::new()),
        );
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "200;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "150;w=21600".parse().unwrap());
        q.observe(&h);
        let s = q.snapshot();
        assert_eq!(
            (s.tokens, s.capacity, s.header_remaining),
            (Some(150), Some(200), Some(150))
        );
    }

    #[test]
    fn too_many_requests_cools_down_then_probes() {
        let q = quota(100, 21600);
        q.too_many_requests(Some(Duration::from_secs(30)));
        let d = q.acquire(Purpose::New).unwrap_err();
        assert_eq!(d.reason, QuotaRefusal::Cooldown);
        assert!(d.retry_after <= Duration::from_secs(30));
        // A cooldown that has already ended (no sleeping through a real one).
        q.too_many_requests(Some(Duration::ZERO));
        q.acquire(Purpose::New)
            .expect("one probe after the cooldown");
        assert!(q.acquire(Purpose::New).is_err());
    }

    #[test]
    fn unlimited_without_config_until_headers_arrive() {
        let q = Quota::new("ghcr.io", None, vec![], Arc::new(Metrics::new()));
        for _ in 0..1000 {
            q.acquire(Purpose::New).unwrap();
        }
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", "10;w=60".parse().unwrap());
        h.insert("ratelimit-remaining", "0;w=60".parse().unwrap());
        q.observe(&h);
        assert!(q.acquire(Purpose::New).is_err());
    }
}
