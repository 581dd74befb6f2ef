//! berth's metrics registry, created once and passed in. Each part registers its own
//! metrics where they are produced (`register(&mut Registry)`): the quota's buckets
//! (`quota::QuotaMetrics`), blob fills (`proxy::FillMetrics`), the store
//! (`store::StoreMetrics`), connections (`server::ServerMetrics`), redirects
//! (`upstream::egress`), the fleet, the shared tier and access refusals. What is left here
//! is what a request is: kinds, outcomes, bytes served and fetched, upstream requests.
//!
//! prometheus-client encodes OpenMetrics; [`Metrics::encode`] also renders the classic
//! 0.0.4 text format for scrapers that do not ask for OpenMetrics (and for `promtool
//! check metrics`, which lints that format).

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// What a request asked for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Kind {
    Base,
    Manifest,
    Blob,
    Tags,
    Referrers,
    Other,
}

/// How berth answered it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the store without asking upstream.
    Hit,
    /// Fetched from upstream (this request started the fetch).
    Miss,
    /// A stale tag confirmed (or moved) by upstream.
    Revalidated,
    /// Served from the store because upstream could not be asked or failed.
    Stale,
    /// Joined a fetch another request had started.
    Coalesced,
    /// Refused: bad input, unknown host, unsupported method.
    Rejected,
    /// Failed: upstream error with nothing stored, or an internal fault.
    Error,
    /// Passed through to upstream without caching (tags list, referrers).
    Passthrough,
}

/// Label values are lower-case words, as Prometheus convention has them.
macro_rules! label_values {
    ($ty:ty { $($variant:ident => $s:literal),* $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $s),* }
            }
        }
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_values!(Kind { Base => "base", Manifest => "manifest", Blob => "blob", Tags => "tags", Referrers => "referrers", Other => "other" });
label_values!(Outcome { Hit => "hit", Miss => "miss", Revalidated => "revalidated", Stale => "stale", Coalesced => "coalesced", Rejected => "rejected", Error => "error", Passthrough => "passthrough" });
label_values!(Source { Cache => "cache", Upstream => "upstream" });

/// Why a counted upstream request was not made.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The upstream's bucket is empty.
    Empty,
    /// Only the reserve is left, and it is kept for images berth has never seen.
    Reserve,
    /// The upstream said 429 and its Retry-After has not passed.
    Cooldown,
    /// The client's own budget is spent.
    Client,
}

label_values!(QuotaRefusal { Empty => "empty", Reserve => "reserve", Cooldown => "cooldown", Client => "client" });

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: Kind,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamRequestLabels {
    pub upstream: String,
    pub method: String,
    pub kind: Kind,
    /// HTTP status, or "error" when no response arrived.
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub served_bytes: Family<SourceLabels, Counter>,
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    pub upstream_requests: Family<UpstreamRequestLabels, Counter>,
    pub quota_stale: Family<UpstreamLabels, Counter>,
    pub negative_cache_hits: Family<UpstreamLabels, Counter>,
    /// The quota's buckets (registered by `quota`).
    pub quota: crate::quota::QuotaMetrics,
    /// Blob fills (registered by `proxy`).
    pub fills: crate::proxy::FillMetrics,
    /// The local store (registered by `store`).
    pub store: crate::store::StoreMetrics,
}

impl Metrics {
    /// The registry, for the parts that register their own metrics (the shared tier, the
    /// fleet) before the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
}

/// Manifest and blob requests by outcome, and bytes, since start: what the status page
/// reads (see [`Metrics::counts`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub hit: u64,
    pub revalidated: u64,
    pub stale: u64,
    pub miss: u64,
    pub coalesced: u64,
    pub error: u64,
    pub served_from_cache: u64,
    pub served_from_fills: u64,
    pub fetched_upstream: u64,
}

/// A metric family, registered under `name` (with `unit`, if any) and returned.
pub fn family<L, M>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<L, M>
where
    Family<L, M>: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Clone
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let family = Family::<L, M>::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
        None => registry.register(name, help, family.clone()),
    }
    family
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0, 120.0,
    ]
    .into_iter()
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Pull API requests by kind and outcome",
            requests.clone(),
        );
        let request_duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register_with_unit(
            "request_duration",
            "Time to answer a pull API request, until the response headers (blobs) or the whole body (manifests)",
            Unit::Seconds,
            request_duration.clone(),
        );
        let served_bytes = Family::<SourceLabels, Counter>::default();
        registry.register_with_unit(
            "served",
            "Body bytes sent to clients, by where they came from (cache: the store; upstream: a fill in progress)",
            Unit::Bytes,
            served_bytes.clone(),
        );
        let upstream_bytes = Family::<UpstreamLabels, Counter>::default();
        registry.register_with_unit(
            "upstream_fetched",
            "Body bytes received from upstreams",
            Unit::Bytes,
            upstream_bytes.clone(),
        );
        let upstream_requests = Family::<UpstreamRequestLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests sent to upstreams by upstream, method, kind and status",
            upstream_requests.clone(),
        );
        let quota_stale = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "quota_stale_answers",
            "Cached manifests served stale because the quota (or an upstream 429) stopped a refresh",
            quota_stale.clone(),
        );
        let negative_cache_hits = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "negative_cache_hits",
            "Manifest requests for a tag answered 404 from memory: the upstream said it has no such tag less than negative_ttl ago",
            negative_cache_hits.clone(),
        );
        let fills = crate::proxy::FillMetrics::register(&mut registry);
        let quota = crate::quota::QuotaMetrics::register(&mut registry);
        let store = crate::store::StoreMetrics::register(&mut registry);
        Metrics {
            registry,
            requests,
            request_duration,
            served_bytes,
            upstream_bytes,
            upstream_requests,
            quota_stale,
            negative_cache_hits,
            quota,
            fills,
            store,
        }
    }

    /// The request and byte counters so far, for the status page; bytes fetched summed
    /// over `upstreams`.
    pub fn counts<'a>(&self, upstreams: impl IntoIterator<Item = &'a str>) -> Counts {
        let lookups = |outcome| -> u64 {
            [Kind::Manifest, Kind::Blob]
                .into_iter()
                .map(|kind| {
                    self.requests
                        .get_or_create(&RequestLabels { kind, outcome })
                        .get()
                })
                .sum()
        };
        let served = |source| {
            self.served_bytes
                .get_or_create(&SourceLabels { source })
                .get()
        };
        Counts {
            hit: lookups(Outcome::Hit),
            revalidated: lookups(Outcome::Revalidated),
            stale: lookups(Outcome::Stale),
            miss: lookups(Outcome::Miss),
            coalesced: lookups(Outcome::Coalesced),
            error: lookups(Outcome::Error),
            served_from_cache: served(Source::Cache),
            served_from_fills: served(Source::Upstream),
            fetched_upstream: upstreams
                .into_iter()
                .map(|upstream| {
                    self.upstream_bytes
                        .get_or_create(&UpstreamLabels {
                            upstream: upstream.to_owned(),
                        })
                        .get()
                })
                .sum(),
        }
    }

    pub fn observe_request(&self, kind: Kind, outcome: Outcome, elapsed: Duration) {
        let labels = RequestLabels { kind, outcome };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn upstream_request(&self, upstream: &str, method: &str, kind: Kind, status: Option<u16>) {
        self.upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                upstream: upstream.to_owned(),
                method: method.to_owned(),
                kind,
                status: status.map_or_else(|| "error".to_owned(), |s| s.to_string()),
            })
            .inc();
    }

    /// OpenMetrics text (what Prometheus asks for).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic text format 0.0.4: counters carry `_total` in HELP/TYPE, no UNIT, no EOF.
    pub fn encode_classic(&self) -> String {
        openmetrics_to_classic(&self.encode_openmetrics())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Rewrites OpenMetrics text into the classic Prometheus text format.
fn openmetrics_to_classic(om: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, "counter")) = rest.split_once(' ') {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        if let Some((prefix, rest)) = meta {
            if let Some((name, tail)) = rest.split_once(' ') {
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_with_total() {
        let m = Metrics::new();
        m.observe_request(Kind::Blob, Outcome::Hit, Duration::from_millis(1));
        let classic = m.encode_classic();
        assert!(
            classic.contains("# TYPE berth_requests_total counter"),
            "{classic}"
        );
        assert!(
            classic.contains("berth_requests_total{kind=\"blob\",outcome=\"hit\"} 1"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"));
        assert!(m.encode_openmetrics().ends_with("# EOF\n"));
    }
}
