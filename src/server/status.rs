//! The numbers operators look at: the JSON of `GET /admin/status` (also read by
//! `berth status` and the status page), and one hour of history, sampled once a minute,
//! for the page's charts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::App;
use crate::clock::now_secs;
use crate::metrics::Counts;
pub use crate::proxy::{FleetStatus, SharedStatus, StoreStatus};
use crate::quota::QuotaSnapshot;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub requests: Requests,
    pub bytes: Bytes,
    pub store: StoreStatus,
    pub fills_in_flight: i64,
    pub upstreams: Vec<UpstreamStatus>,
    pub history: Vec<Sample>,
    /// The fleet this replica belongs to, when there is one.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
    /// The shared tier, when configured.
    #[serde(default)]
    pub shared: Option<SharedStatus>,
    /// Clients by principal since start (only with `[auth]`).
    #[serde(default)]
    pub principals: Vec<crate::access::PrincipalStatus>,
}

/// Manifest and blob requests since start. `hits` are answers that cost no upstream
/// transfer (hit, revalidated, stale); `lookups` adds misses and requests that joined one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Requests {
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub stale: u64,
    pub errors: u64,
    pub hit_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bytes {
    pub served_from_cache: u64,
    pub served_from_fills: u64,
    pub fetched_upstream: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub host: String,
    pub url: String,
    /// The bucket of the upstream's own account (its top-level credentials, or anonymous).
    pub quota: QuotaSnapshot,
    pub last_error: Option<LastError>,
    /// The buckets of its `[[upstreams.credentials]]`, in the order configured.
    #[serde(default)]
    pub credentials: Vec<CredentialStatus>,
}

/// One `[[upstreams.credentials]]` account: its name (never its username) and bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialStatus {
    pub name: String,
    pub quota: QuotaSnapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastError {
    pub message: String,
    pub unix: u64,
}

/// One history point: cumulative counters, so the page can chart per-interval ratios.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub unix: u64,
    pub hits: u64,
    pub lookups: u64,
    pub tokens: BTreeMap<String, u64>,
}

/// The last hour of samples.
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

const HISTORY_LEN: usize = 60;
pub const SAMPLE_EVERY: Duration = Duration::from_secs(60);

impl History {
    pub fn record(&self, app: &App) {
        let requests = requests(counts(app));
        let tokens = app
            .upstreams
            .all()
            .iter()
            .filter_map(|u| {
                u.quota()
                    .snapshot()
                    .tokens
                    .map(|t| (u.host().to_owned(), t))
            })
            .collect();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == HISTORY_LEN {
            samples.pop_front();
        }
        samples.push_back(Sample {
            unix: now_secs(),
            hits: requests.hits,
            lookups: requests.lookups,
            tokens,
        });
    }

    fn all(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

fn counts(app: &App) -> Counts {
    app.metrics
        .counts(app.upstreams.all().iter().map(|u| u.host()))
}

fn requests(c: Counts) -> Requests {
    let hits = c.hit + c.revalidated + c.stale;
    let lookups = hits + c.miss + c.coalesced;
    Requests {
        lookups,
        hits,
        misses: c.miss,
        coalesced: c.coalesced,
        stale: c.stale,
        errors: c.error,
        hit_ratio: (lookups > 0).then(|| hits as f64 / lookups as f64),
    }
}

pub fn status(app: &App) -> Status {
    let counts = counts(app);
    let proxy = app.proxy.snapshot();
    let upstreams = app
        .upstreams
        .all()
        .iter()
        .map(|u| UpstreamStatus {
            host: u.host().to_owned(),
            url: u.url_str().to_owned(),
            quota: u.quota().snapshot(),
            last_error: u
                .last_error()
                .map(|(message, unix)| LastError { message, unix }),
            credentials: u
                .quotas()
                .filter_map(|(name, quota)| {
                    Some(CredentialStatus {
                        name: name?.to_owned(),
                        quota: quota.snapshot(),
                    })
                })
                .collect(),
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: app.started.elapsed().as_secs(),
        requests: requests(counts),
        bytes: Bytes {
            served_from_cache: counts.served_from_cache,
            served_from_fills: counts.served_from_fills,
            fetched_upstream: counts.fetched_upstream,
        },
        store: proxy.store,
        fills_in_flight: proxy.fills_in_flight,
        upstreams,
        history: app.history.all(),
        fleet: proxy.fleet,
        shared: proxy.shared,
        principals: app.access.principals(),
    }
}
