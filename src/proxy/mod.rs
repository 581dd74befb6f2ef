//! The pull-through policy: the only place that decides, for each request, between a hit,
//! a revalidation, a fill, a stale answer or a refusal.
//!
//! `proxy` owns the single-flight maps (blob fills by digest, manifest fetches by key) and
//! calls the store and the upstreams through their narrow interfaces. It answers with
//! typed results; `server` turns them into HTTP.

mod blobs;
mod body;
mod budgets;
mod fill;
mod flight;
mod manifests;
mod warm;

use std::sync::Arc;

use bytes::Bytes;

pub use blobs::BlobAnswer;
pub use body::{BlobBody, BlobSource};
pub use budgets::Budgets;
pub use manifests::{tag_key_prefix, ManifestAnswer};
pub use warm::WarmReport;

use crate::metrics::{Kind, Metrics};
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::store::Store;
use crate::upstream::{Passthrough, Upstream};

pub struct Proxy {
    store: Store,
    metrics: Arc<Metrics>,
    budgets: Option<Arc<Budgets>>,
    fills: fill::Fills,
    manifest_flights: flight::Flights<String, Result<ManifestAnswer, oci::Error>>,
}

impl Proxy {
    pub fn new(store: Store, metrics: Arc<Metrics>, budgets: Option<Budgets>) -> Self {
        Proxy {
            store,
            metrics,
            budgets: budgets.map(Arc::new),
            fills: fill::Fills::default(),
            manifest_flights: flight::Flights::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The per-client budgets, when configured (the server names the client).
    pub fn budgets(&self) -> Option<&Budgets> {
        self.budgets.as_deref()
    }

    /// Relays a tags list or referrers request; these change too often to cache usefully
    /// and cost nothing on Docker Hub.
    pub async fn passthrough(
        &self,
        upstream: &Upstream,
        repo: &Repository,
        path: &str,
        query: Option<&str>,
        kind: Kind,
    ) -> Result<Passthrough, oci::Error> {
        upstream
            .passthrough(repo, path, query, kind)
            .await
            .map_err(|e| e.to_oci(upstream.host()))
    }
}

impl Proxy {
    /// Serves a stored object for a repository only if the index links the repository to
    /// it, or `confirm` (an upstream HEAD in that repository) finds it; then links it.
    async fn authorize<T>(
        &self,
        up: &Upstream,
        repo: &Repository,
        digest: &Digest,
        confirm: impl std::future::Future<Output = Result<Option<T>, crate::upstream::Error>>,
        unknown: impl FnOnce() -> oci::Error,
    ) -> Result<(), oci::Error> {
        let linked = self
            .store
            .is_linked(up.host(), repo.as_str(), digest)
            .map_err(|e| internal("reading the index", e))?;
        if linked {
            return Ok(());
        }
        match confirm.await {
            Ok(Some(_)) => self
                .store
                .link(up.host(), repo.as_str(), vec![digest.clone()])
                .await
                .map_err(|e| internal("writing the index", e)),
            Ok(None) => Err(unknown()),
            Err(e) => Err(e.to_oci(up.host())),
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> oci::Error {
    tracing::error!(error = %e, "{what}");
    oci::Error::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// The digests a manifest refers to (config, layers, child manifests), for repository
/// links. A manifest berth cannot read links nothing but itself.
fn referenced_digests(bytes: &Bytes) -> Vec<Digest> {
    oci::manifest::Manifest::parse(bytes)
        .map(|m| m.references().cloned().collect())
        .unwrap_or_default()
}
