//! Where an upstream may send berth: the policy for redirects (CDNs) and token realms.
//!
//! An upstream, or a CDN in front of it, is only semi-trusted: a `307 Location:
//! http://169.254.169.254/...` or a realm on `127.0.0.1:5001` would make berth fetch from
//! inside the cluster and hand the answer to a client. So a hop that leaves the upstream's
//! own origin (scheme, host and port as configured) may go only to public addresses;
//! private ranges are allowed when the upstream itself is on one (an on-prem registry
//! redirecting to its own object store) or when listed in `redirect_allow`; loopback,
//! link-local, unspecified and this machine's own addresses only by that list; berth's own
//! listeners never.
//!
//! The check applies to the addresses actually connected to: a literal IP is checked by
//! the redirect policy, a name by the resolver the upstream's HTTP client uses, so a name
//! that resolves to 127.0.0.1 is loopback. This module owns the decision and its
//! bookkeeping (a metric, one log line per refused target); the client maps a refusal to
//! its error.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::config::ConfigError;
use crate::metrics::UpstreamLabels;
use crate::net::{canonical, Cidr};

/// Refused hops, by upstream.
#[derive(Clone, Default)]
pub struct EgressMetrics {
    refused: Family<UpstreamLabels, Counter>,
}

impl EgressMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = EgressMetrics::default();
        registry.register(
            "upstream_refused_redirects",
            "Redirects and token realms berth refused to follow (internal or unlisted targets), by upstream",
            m.refused.clone(),
        );
        m
    }
}

/// Why a hop was not followed; carried through reqwest's error chain to the client.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The refused target as `host[:port]` (never a path or query: those may hold tokens).
    pub target: String,
    pub reason: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused to follow to {} ({})", self.target, self.reason)
    }
}

impl std::error::Error for Refused {}

/// One `redirect_allow` entry.
#[derive(Debug, Clone, PartialEq)]
enum Allow {
    Net(Cidr),
    Host(String),
}

impl Allow {
    fn parse(s: &str) -> Result<Allow, String> {
        let s = s.trim();
        if s.contains('/') || s.parse::<IpAddr>().is_ok() {
            return Cidr::parse(s).map(Allow::Net);
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            return Err(format!(
                "{s:?} is neither a CIDR, an address nor a host name"
            ));
        }
        Ok(Allow::Host(s.to_ascii_lowercase()))
    }

    fn covers_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Allow::Net(net) if net.contains(ip))
    }
}

/// The class of an address, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Public,
    Private,
    /// Loopback, link-local, unspecified, multicast, broadcast: never a CDN.
    Internal(&'static str),
}

fn classify(ip: IpAddr) -> Class {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let [a, b, ..] = ip.octets();
    // Cloud metadata services that sit inside otherwise private or shared ranges.
    if ip == Ipv4Addr::new(100, 100, 100, 200) {
        return Class::Internal("a cloud metadata address");
    }
    if ip.is_loopback() {
        Class::Internal("loopback")
    } else if ip.is_link_local() {
        Class::Internal("link-local")
    } else if ip.is_unspecified() || a == 0 {
        Class::Internal("unspecified")
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        Class::Internal("not unicast")
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        // RFC 1918 and the shared address space (carrier-grade NAT, some pod networks).
        Class::Private
    } else {
        Class::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    let seg = ip.segments();
    let first = seg[0];
    let [.., a, b, c, d] = ip.octets();
    let embedded = Ipv4Addr::new(a, b, c, d);
    // Forms that carry an IPv4 address and reach it: judged by that address.
    // NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and the deprecated IPv4-compatible ::a.b.c.d.
    let nat64 = seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || seg[..2] == [0x64, 0xff9b];
    let compatible = seg[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified();
    if nat64 || compatible {
        return classify_v4(embedded);
    }
    if first == 0x2002 {
        // 6to4: the next 32 bits are the IPv4 address.
        return classify_v4(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        ));
    }
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Class::Internal("a cloud metadata address");
    }
    if ip.is_loopback() {
        Class::Internal("loopback")
    } else if ip.is_unspecified() {
        Class::Internal("unspecified")
    } else if first & 0xffc0 == 0xfe80 {
        Class::Internal("link-local")
    } else if ip.is_multicast() {
        Class::Internal("not unicast")
    } else if first & 0xfe00 == 0xfc00 {
        // Unique local addresses, IPv6's private ranges.
        Class::Private
    } else {
        Class::Public
    }
}

/// Whether `ip` is one of this machine's addresses: binding to it succeeds only then.
/// (A pod's own IP reaches berth's listeners as well as 127.0.0.1 does.)
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The policy of one upstream.
pub struct Egress {
    upstream: String,
    /// The upstream's own origin: hops there are followed as configured.
    origin: url::Origin,
    /// The upstream's host name (lowercase), resolved without filtering.
    own_host: String,
    allow: Vec<Allow>,
    /// berth's own listeners: never a target, whatever the allowlist says.
    listeners: Vec<SocketAddr>,
    /// Whether the upstream itself is on a private (or loopback) address.
    upstream_private: AtomicBool,
    /// Targets already logged (bounded: a hostile upstream chooses them).
    logged: Mutex<HashSet<String>>,
    metrics: EgressMetrics,
}

const MAX_LOGGED_TARGETS: usize = 1024;

impl Egress {
    pub fn new(
        upstream: &str,
        base: &Url,
        allow: &[String],
        listeners: Vec<SocketAddr>,
        metrics: EgressMetrics,
    ) -> Result<Arc<Egress>, ConfigError> {
        let allow = allow
            .iter()
            .map(|s| Allow::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError(format!("upstreams ({upstream}).redirect_allow: {e}")))?;
        let own_host = base.host_str().unwrap_or_default().to_ascii_lowercase();
        let upstream_private = match base.host() {
            Some(url::Host::Ipv4(ip)) => classify(IpAddr::V4(ip)) != Class::Public,
            Some(url::Host::Ipv6(ip)) => classify(IpAddr::V6(ip)) != Class::Public,
            _ => own_host == "localhost",
        };
        Ok(Arc::new(Egress {
            upstream: upstream.to_owned(),
            origin: base.origin(),
            own_host,
            allow,
            listeners,
            upstream_private: AtomicBool::new(upstream_private),
            logged: Mutex::new(HashSet::new()),
            metrics,
        }))
    }

    fn allowed_host(&self, host: &str) -> bool {
        self.allow
            .iter()
            .any(|a| matches!(a, Allow::Host(h) if h.eq_ignore_ascii_case(host)))
    }

    fn is_listener(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        self.listeners.iter().any(|l| {
            l.port() == port
                && (canonical(l.ip()) == ip
                    || (l.ip().is_unspecified()
                        && (classify(ip) == Class::Internal("loopback") || is_local(ip))))
        })
    }

    /// Whether berth may connect to `ip` for a host other than the upstream's own.
    /// `port` is known for literal-IP targets; a name's port is checked by `check_url`.
    fn check_ip(
        &self,
        ip: IpAddr,
        port: Option<u16>,
        named_allow: bool,
    ) -> Result<(), &'static str> {
        if let Some(port) = port {
            if self.is_listener(ip, port) {
                return Err("one of berth's own listeners");
            }
        }
        if named_allow || self.allow.iter().any(|a| a.covers_ip(ip)) {
            return Ok(());
        }
        match classify(ip) {
            Class::Internal(why) => Err(why),
            Class::Private if self.upstream_private.load(Ordering::Relaxed) => Ok(()),
            Class::Private => Err("a private address, not in redirect_allow"),
            Class::Public if is_local(ip) => Err("an address of this machine"),
            Class::Public => Ok(()),
        }
    }

    /// Checks a hop (a redirect's `Location`, a token realm) before berth makes it. Names
    /// other than the upstream's pass here and are checked again when resolved.
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if url.origin() == self.origin {
            return Ok(());
        }
        let target = match (url.host_str(), url.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => "a URL without a host".to_owned(),
        };
        let refuse = |reason| {
            Err(self.refused(Refused {
                target: target.clone(),
                reason,
            }))
        };
        if !matches!(url.scheme(), "http" | "https") {
            return refuse("not http(s)");
        }
        let port = url.port_or_known_default();
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(IpAddr::V4(ip), port, false).or_else(refuse),
            Some(url::Host::Ipv6(ip)) => self.check_ip(IpAddr::V6(ip), port, false).or_else(refuse),
            // Names are checked by what they resolve to, in `Resolver`.
            Some(url::Host::Domain(_)) => Ok(()),
            None => refuse("no host"),
        }
    }

    /// Counts a refusal and logs it once per target.
    fn refused(&self, r: Refused) -> Refused {
        self.metrics
            .refused
            .get_or_create(&UpstreamLabels {
                upstream: self.upstream.clone(),
            })
            .inc();
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            if logged.len() >= MAX_LOGGED_TARGETS {
                logged.clear();
            }
            logged.insert(r.target.clone())
        };
        if first {
            tracing::warn!(upstream = %self.upstream, target = %r.target, reason = r.reason,
                "refused a redirect or token realm (logged once per target)");
        }
        r
    }

    /// Resolves `name` and keeps only the addresses the policy allows (all of them for
    /// the upstream's own host). Runs on the blocking pool: the system resolver blocks.
    fn resolve_blocking(&self, name: &str) -> Result<Vec<SocketAddr>, Refused> {
        let addrs: Vec<SocketAddr> = (name, 0)
            .to_socket_addrs()
            .map_err(|e| Refused {
                target: name.to_owned(),
                reason: if e.kind() == std::io::ErrorKind::NotFound {
                    "name not found"
                } else {
                    "name resolution failed"
                },
            })?
            .collect();
        if name.eq_ignore_ascii_case(&self.own_host) {
            if addrs.iter().any(|a| classify(a.ip()) != Class::Public) {
                self.upstream_private.store(true, Ordering::Relaxed);
            }
            return Ok(addrs);
        }
        let named_allow = self.allowed_host(name);
        let mut reason = "no address";
        // A name's port is not known here, so a name never leads to loopback or to this
        // machine (where berth's own listeners are), allowlisted or not; an address
        // literal in `redirect_allow` is the way to reach those, port checked.
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| {
                let verdict = if classify(a.ip()) == Class::Internal("loopback") {
                    Err("loopback")
                } else if is_local(a.ip()) {
                    Err("an address of this machine")
                } else {
                    self.check_ip(a.ip(), None, named_allow)
                };
                match verdict {
                    Ok(()) => true,
                    Err(why) => {
                        reason = why;
                        false
                    }
                }
            })
            .collect();
        if kept.is_empty() {
            return Err(self.refused(Refused {
                target: name.to_owned(),
                reason,
            }));
        }
        Ok(kept)
    }
}

/// The resolver an upstream's HTTP client uses: the policy applied to every name.
pub struct Resolver(pub Arc<Egress>);

impl Resolve for Resolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs = tokio::task::spawn_blocking(move || egress.resolve_blocking(&host))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The redirect policy of an upstream's HTTP client: at most ten hops, each checked.
pub fn redirect_policy(egress: Arc<Egress>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("too many redirects (more than 10)");
        }
        match egress.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// The refusal somewhere in an error's chain of causes, if that is why it failed.
pub fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(base: &str, allow: &[&str], listeners: &[&str]) -> Arc<Egress> {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let listeners = listeners.iter().map(|s| s.parse().unwrap()).collect();
        Egress::new(
            "test",
            &Url::parse(base).unwrap(),
            &allow,
            listeners,
            EgressMetrics::default(),
        )
        .unwrap()
    }

    fn check(e: &Egress, url: &str) -> Result<(), &'static str> {
        e.check_url(&Url::parse(url).unwrap()).map_err(|r| r.reason)
    }

    #[test]
    fn the_upstreams_own_origin_is_always_followed() {
        let e = egress("http://127.0.0.1:5000", &[], &[]);
        assert_eq!(check(&e, "http://127.0.0.1:5000/v2/x/blobs/y"), Ok(()));
        assert_eq!(check(&e, "http://127.0.0.1:5001/metrics"), Err("loopback"));
        assert_eq!(check(&e, "https://127.0.0.1:5000/"), Err("loopback"));
    }

    #[test]
    fn internal_addresses_are_refused() {
        let e = egress("https://registry.example", &[], &[]);
        for (url, why) in [
            ("http://169.254.169.254/latest/meta-data/", "link-local"),
            ("http://[fe80::1]/", "link-local"),
            ("http://[::1]:8080/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://0.0.0.0:5001/", "unspecified"),
            ("http://224.0.0.1/", "not unicast"),
            ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),
            ("http://[2002:7f00:1::]/", "loopback"),
            ("http://[::7f00:1]/", "loopback"),
            ("http://[fd00:ec2::254]/", "a cloud metadata address"),
            ("http://100.100.100.200/", "a cloud metadata address"),
            ("file:///etc/passwd", "not http(s)"),
        ] {
            assert_eq!(check(&e, url), Err(why), "{url}");
        }
    }

    #[test]
    fn private_ranges_need_a_private_upstream_or_the_allowlist() {
        let public = egress("https://registry.example", &[], &[]);
        assert!(check(&public, "http://10.1.2.3/").is_err());
        assert!(check(&public, "http://[fd00::1]/").is_err());
        assert!(check(&public, "http://100.64.0.1/").is_err());
        assert_eq!(check(&public, "https://93.184.216.34/blob"), Ok(()));
        let private = egress("http://10.0.0.5:5000", &[], &[]);
        assert_eq!(check(&private, "http://10.9.9.9:9000/bucket"), Ok(()));
        assert!(check(&private, "http://127.0.0.1:9000/").is_err());
        let listed = egress("https://registry.example", &["10.0.0.0/8"], &[]);
        assert_eq!(check(&listed, "http://10.1.2.3/"), Ok(()));
        assert!(check(&listed, "http://192.168.1.1/").is_err());
    }

    #[test]
    fn berths_own_listeners_are_refused_even_when_allowlisted() {
        let e = egress(
            "http://127.0.0.1:5000",
            &["127.0.0.0/8"],
            &["0.0.0.0:5001", "127.0.0.1:5002"],
        );
        assert_eq!(check(&e, "http://127.0.0.2:9000/"), Ok(()));
        assert_eq!(
            check(&e, "http://127.0.0.1:5001/"),
            Err("one of berth's own listeners")
        );
        assert_eq!(
            check(&e, "http://127.0.0.1:5002/"),
            Err("one of berth's own listeners")
        );
    }

    #[test]
    fn names_are_checked_by_what_they_resolve_to() {
        let e = egress("https://registry.example", &[], &[]);
        let refused = e.resolve_blocking("localhost").unwrap_err();
        assert_eq!(refused.reason, "loopback");
        // Not even when listed: a name's port is unknown, berth's listeners are local.
        let listed = egress("https://registry.example", &["localhost"], &[]);
        assert_eq!(
            listed.resolve_blocking("localhost").unwrap_err().reason,
            "loopback"
        );
    }

    #[test]
    fn allowlist_entries_are_parsed_strictly() {
        assert!(Allow::parse("10.0.0.0/8").is_ok());
        assert!(Allow::parse("fd00::/8").is_ok());
        assert!(Allow::parse("minio.internal").is_ok());
        assert!(Allow::parse("10.0.0.0/33").is_err());
        assert!(Allow::parse("http://x").is_err());
        assert!(Allow::parse("").is_err());
        let net = Allow::parse("0.0.0.0/0").unwrap();
        assert!(net.covers_ip("1.2.3.4".parse().unwrap()));
    }
}
