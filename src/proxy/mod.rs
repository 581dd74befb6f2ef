//! The pull-through policy: the only place that decides, for each request, between a hit,
//! a revalidation, a fill, a stale answer or a refusal.
//!
//! `proxy` owns the single-flight maps (blob fills by digest, manifest and list fetches by
//! key) and calls the store and the upstreams through their narrow interfaces. It answers
//! with typed results; `server` turns them into HTTP.

mod blobs;
mod body;
mod fill;
mod flight;
mod flying;
mod freshness;
mod listings;
mod manifests;
mod negative;
mod origin;
mod revalidate;
mod snapshot;
mod tiers;
mod warm;

use std::sync::Arc;

use bytes::Bytes;

pub use blobs::BlobAnswer;
pub use body::{BlobBody, BlobSource, Piece, MAX_FILE_PIECE};
pub use fill::FillMetrics;
pub use listings::{Listing, ListingAnswer};
pub use manifests::{tag_key_prefix, ManifestAnswer};
pub use snapshot::{FleetStatus, ProxySnapshot, Readiness, SharedStatus, StoreStatus};
pub use warm::WarmReport;

use crate::clock::Clock;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::store::shared::Shared;
use crate::store::Store;
use crate::upstream::Upstream;

pub struct Proxy {
    store: Store,
    /// When tag records and kept lists were validated, and whether they still are.
    clock: Clock,
    /// The object store a fleet shares, behind the local store.
    shared: Option<Arc<Shared>>,
    /// The other replicas, and who owns which key.
    fleet: Option<Arc<Fleet>>,
    metrics: Arc<Metrics>,
    fills: fill::Fills,
    /// Manifest fetches by key, each with the client that paid for it.
    manifest_flights: flight::Flights<String, (Result<ManifestAnswer, oci::Error>, Option<String>)>,
    /// Tags upstreams said they do not have, for their `negative_ttl`.
    negative: Arc<negative::NegativeCache>,
    /// Tags-list and referrers fetches by key (`listings.rs`).
    listing_flights: flight::Flights<String, Result<ListingAnswer, oci::Error>>,
    /// Places for upstream fetches of tags lists and referrers: beyond them, the kept
    /// answer (stale) or 503.
    passthroughs: Arc<tokio::sync::Semaphore>,
}

/// Default caps, as in the configuration's defaults.
const DEFAULT_PASSTHROUGHS: usize = 32;

/// Who is asking, as far as policy cares.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// Who pays for counted requests, when per-client budgets are on.
    pub client: Option<String>,
    /// Forwarded by another replica of the fleet: answer here, never forward again.
    pub forwarded: bool,
}

impl Proxy {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
        fleet: Option<Arc<Fleet>>,
        local_blobs: bool,
    ) -> Self {
        // Without a shared tier, local disk is the only store whatever the setting.
        let local_blobs = local_blobs || shared.is_none();
        Proxy {
            store,
            clock: Clock::system(),
            fills: fill::Fills::new(shared.clone(), local_blobs),
            shared,
            fleet,
            metrics,
            manifest_flights: flight::Flights::default(),
            negative: Arc::new(negative::NegativeCache::new(negative::CAPACITY)),
            listing_flights: flight::Flights::default(),
            passthroughs: Arc::new(tokio::sync::Semaphore::new(DEFAULT_PASSTHROUGHS)),
        }
    }

    /// Caps concurrent blob fills (more wait their turn) and tags-list and referrers
    /// fetches (more get the kept answer, or 503): `server.max_concurrent_fills`,
    /// `max_concurrent_passthroughs`.
    pub fn with_limits(mut self, fills: usize, passthroughs: usize) -> Self {
        self.fills.limit(fills, self.metrics.clone());
        self.passthroughs = Arc::new(tokio::sync::Semaphore::new(passthroughs));
        self
    }

    /// Runs the proxy on `clock` (a test's manual clock, moved past a TTL).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// Forgets every tag record whose key starts with `prefix`, here and in the shared
    /// tier (other replicas keep their local copy until its TTL runs out), and any "no
    /// such tag" remembered for it here: a tag just pushed is seen on the next pull.
    pub async fn forget_tags(&self, prefix: String) -> std::io::Result<usize> {
        let unknown = self.negative.forget_prefix(&prefix);
        let shared = match &self.shared {
            Some(s) => s.remove_tags(&prefix).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "tag records not removed from the shared store");
                0
            }),
            None => 0,
        };
        let local = self.store.remove_tags(prefix).await?;
        Ok(local.max(shared) + unknown)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl Proxy {
    /// Serves a stored object for a repository only if the index links the repository to
    /// it, or `confirm` (an upstream HEAD in that repository) finds it; then links it.
    async fn authorize<T, F>(
        &self,
        up: &Upstream,
        repo: &Repository,
        digest: &Digest,
        confirm: impl FnOnce() -> F,
        unknown: impl FnOnce() -> oci::Error,
    ) -> Result<(), oci::Error>
    where
        F: std::future::Future<Output = Result<Option<T>, crate::upstream::Error>>,
    {
        let linked = self
            .store
            .is_linked(up.host(), repo.as_str(), digest)
            .await
            .map_err(|e| internal("reading the index", e))?;
        if linked {
            return Ok(());
        }
        // Boxed: a hit (linked) does not carry the upstream request's state.
        Box::pin(self.confirm_link(up, repo, digest, confirm(), unknown)).await
    }

    /// [`Self::authorize`] for a digest not linked here: another replica's link, or the
    /// upstream's answer to `confirm`.
    async fn confirm_link<T>(
        &self,
        up: &Upstream,
        repo: &Repository,
        digest: &Digest,
        confirm: impl std::future::Future<Output = Result<Option<T>, crate::upstream::Error>>,
        unknown: impl FnOnce() -> oci::Error,
    ) -> Result<(), oci::Error> {
        // Another replica may have seen the repository hold it.
        if let Some(shared) = &self.shared {
            if let Ok(true) = shared.is_linked(up.host(), repo.as_str(), digest).await {
                return self
                    .store
                    .link(up.host(), repo.as_str(), vec![digest.clone()])
                    .await
                    .map_err(|e| internal("writing the index", e));
            }
        }
        match confirm.await {
            Ok(Some(_)) => {
                if let Some(shared) = &self.shared {
                    let _ = shared
                        .link(up.host(), repo.as_str(), std::slice::from_ref(digest))
                        .await;
                }
                self.store
                    .link(up.host(), repo.as_str(), vec![digest.clone()])
                    .await
                    .map_err(|e| internal("writing the index", e))
            }
            Ok(None) => Err(unknown()),
            Err(e) => Err(e.to_oci(up.host())),
        }
    }
}

/// Counts a stale answer the quota caused (berth's bucket, or the upstream's 429), for
/// `berth_quota_stale_answers_total`; other failures a stale copy covers are not counted.
fn count_quota_stale(metrics: &Metrics, upstream: &str, e: &crate::upstream::Error) {
    if matches!(
        e,
        crate::upstream::Error::Quota(_) | crate::upstream::Error::TooManyRequests { .. }
    ) {
        metrics
            .quota_stale
            .get_or_create(&crate::metrics::UpstreamLabels {
                upstream: upstream.to_owned(),
            })
            .inc();
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> oci::Error {
    tracing::error!(error = %e, "{what}");
    oci::Error::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// What a manifest links a repository to: itself and everything it refers to (config,
/// layers, child manifests). A manifest berth cannot read links nothing but itself.
fn manifest_links(bytes: &Bytes, digest: &Digest) -> Vec<Digest> {
    let mut links: Vec<Digest> = oci::manifest::Manifest::parse(bytes)
        .map(|m| m.references().cloned().collect())
        .unwrap_or_default();
    links.push(digest.clone());
    links
}
