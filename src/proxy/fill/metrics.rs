//! The metrics of blob fills, registered here where they are produced: how many run and
//! wait, the cap, and the fills that failed or passed through a full disk.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::UpstreamLabels;

#[derive(Clone, Default)]
pub struct FillMetrics {
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub max: Gauge,
    pub failures: Family<UpstreamLabels, Counter>,
    pub store_full: Counter,
}

impl FillMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let in_flight = Gauge::default();
        registry.register(
            "fills_in_flight",
            "Blob fills currently streaming from upstream",
            in_flight.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "fills_queued",
            "Blob fills waiting for a place (server.max_concurrent_fills); their clients wait too",
            queued.clone(),
        );
        let max = Gauge::default();
        registry.register(
            "fills_max",
            "Blob fills allowed to run at once (server.max_concurrent_fills)",
            max.clone(),
        );
        let failures = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "fill_failures",
            "Blob fills abandoned (upstream cut, stall, digest mismatch, local I/O)",
            failures.clone(),
        );
        let store_full = Counter::default();
        registry.register(
            "store_full_fills",
            "Blob fills that found the store's disk full and passed their bytes through unstored",
            store_full.clone(),
        );
        FillMetrics {
            in_flight,
            queued,
            max,
            failures,
            store_full,
        }
    }
}
