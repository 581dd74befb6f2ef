//! What the proxy tells the admin side about itself: a snapshot of its state for the
//! status page and `berth status`, and whether it is ready to serve. The admin side asks
//! here instead of reaching into the store, the fleet or the shared tier.

use serde::{Deserialize, Serialize};

use super::Proxy;

/// The proxy's state at one moment.
pub struct ProxySnapshot {
    pub store: StoreStatus,
    pub fills_in_flight: i64,
    pub fleet: Option<FleetStatus>,
    pub shared: Option<SharedStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStatus {
    pub root: String,
    pub bytes: u64,
    pub blobs: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetStatus {
    /// How peers reach this replica.
    pub me: String,
    /// Every replica, this one included.
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedStatus {
    pub store: String,
    pub available: bool,
    /// The last failure while unavailable.
    pub error: Option<String>,
}

/// Whether the proxy can serve, for `/readyz`.
pub enum Readiness {
    Ready,
    /// The shared tier is in trouble (why): the replica still serves its local disk and
    /// fetches through. A degraded replica stays in the Service.
    Degraded(String),
    /// The local store cannot be written.
    NotReady(std::io::Error),
}

/// A shared-tier probe is bounded well below its own timeout: a slow store must not make
/// every replica unready at once (the Service would have no endpoint left).
const SHARED_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

impl Proxy {
    pub fn snapshot(&self) -> ProxySnapshot {
        let (blobs, bytes) = self.store.totals().unwrap_or((0, 0));
        ProxySnapshot {
            store: StoreStatus {
                root: self.store.root().display().to_string(),
                bytes,
                blobs,
                max_bytes: self.metrics.store.max_bytes.get().max(0) as u64,
            },
            fills_in_flight: self.metrics.fills.in_flight.get(),
            fleet: self.fleet.as_ref().map(|f| FleetStatus {
                me: f.me().to_owned(),
                peers: f.peers(),
            }),
            shared: self.shared.as_ref().map(|s| {
                let error = s.trouble();
                SharedStatus {
                    store: s.describe().to_owned(),
                    available: error.is_none(),
                    error,
                }
            }),
        }
    }

    /// Probes the local store (a write) and the shared tier (a listing, unless it is
    /// already being skipped after a failure).
    pub async fn readiness(&self) -> Readiness {
        if let Err(e) = self.store.probe_writable().await {
            return Readiness::NotReady(e);
        }
        let Some(shared) = &self.shared else {
            return Readiness::Ready;
        };
        if !shared.skipped() {
            let _ = tokio::time::timeout(SHARED_PROBE, shared.probe()).await;
        }
        match shared.trouble() {
            Some(trouble) => Readiness::Degraded(trouble),
            None => Readiness::Ready,
        }
    }

    /// Sets the store's gauges from its totals (before a scrape).
    pub fn publish_gauges(&self) {
        if let Ok((blobs, bytes)) = self.store.totals() {
            self.metrics.store.blobs.set(blobs as i64);
            self.metrics.store.bytes.set(bytes as i64);
        }
    }
}
