//! The store's metrics, registered here: its size and blobs (set when scraped), its cap,
//! and what eviction removed.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Default)]
pub struct StoreMetrics {
    pub bytes: Gauge,
    pub blobs: Gauge,
    pub max_bytes: Gauge,
    pub evictions: Counter,
}

impl StoreMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let bytes = Gauge::default();
        registry.register_with_unit(
            "store",
            "Bytes of blobs and manifests in the store",
            Unit::Bytes,
            bytes.clone(),
        );
        let blobs = Gauge::default();
        registry.register(
            "store_blobs",
            "Blobs and manifests in the store",
            blobs.clone(),
        );
        let max_bytes = Gauge::default();
        registry.register_with_unit(
            "store_max",
            "The configured store size cap",
            Unit::Bytes,
            max_bytes.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "store_evictions",
            "Blobs evicted from the store to keep it under its size",
            evictions.clone(),
        );
        StoreMetrics {
            bytes,
            blobs,
            max_bytes,
            evictions,
        }
    }
}
