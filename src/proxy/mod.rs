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

fn internal(what: &str, e: impl std::fmt::Display) -> oci::Error {
    tracing::error!(error = %e, "{what}");
    oci::Error::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// The digests a manifest refers to (config, layers, child manifests), for repository
/// links. Lenient: a manifest berth cannot read links nothing but itself.
fn referenced_digests(bytes: &Bytes) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: Digest,
    }
    #[derive(serde::Deserialize)]
    struct Refs {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    match serde_json::from_slice::<Refs>(bytes) {
        Ok(r) => r
            .config
            .into_iter()
            .chain(r.layers)
            .chain(r.manifests)
            .map(|d| d.digest)
            .collect(),
        Err(_) => Vec::new(),
    }
}
