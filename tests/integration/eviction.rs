//! Issue 6, test 1: the store stays under `storage.max_size` by evicting the least
//! recently used blobs; evicted blobs are simply fetched again.

use std::time::Duration;

use crate::common::*;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Front;
use crate::support::image::sha256_digest;
use crate::support::registry::{Registry, RegistryOptions};

#[tokio::test(flavor = "multi_thread")]
async fn the_least_recently_used_goes_first_and_the_cap_holds() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    let berth = Berth::start_with_storage(&[UpstreamSpec::docker_hub(&front.url())], "48MiB").await;
    let dir = tempfile::tempdir().unwrap();
    let w = World {
        registry,
        front,
        berth,
        dir,
    };
    let mut images = Vec::new();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        images.push(
            w.push_image(
                &format!("library/{name}"),
                "v1",
                &[20 * MIB],
                200 + i as u64,
            )
            .await,
        );
    }
    let layer = |i: usize| images[i].layers[0].0.clone();
    let base = w.berth.url();
    let pull = |i: usize| {
        let url = format!(
            "{base}/v2/library/{}/blobs/{}",
            ["a", "b", "c", "d"][i],
            layer(i)
        );
        async move {
            let r = get(&url, false).await;
            assert_eq!(r.status(), 200);
            sha256_digest(&r.bytes().await.unwrap())
        }
    };
    let cap = 48.0 * MIB as f64;
    let settle = || async {
        // The evictor looks every 2 s; access times have one-second resolution.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let used = w.berth.metric("berth_store_bytes").await;
        assert!(used <= cap, "store at {used} bytes, cap {cap}");
    };
    assert_eq!(pull(0).await, layer(0));
    settle().await;
    assert_eq!(pull(1).await, layer(1));
    settle().await;
    assert_eq!(pull(0).await, layer(0)); // a is used again: b is now the oldest
    settle().await;
    assert_eq!(pull(2).await, layer(2)); // 60 MiB > 95% of 48: evict down to 85%
    settle().await;
    let data = w.berth.data_dir();
    assert!(!is_stored(data, &layer(1)), "b was least recently used");
    assert!(is_stored(data, &layer(0)) && is_stored(data, &layer(2)));
    assert_eq!(pull(3).await, layer(3));
    settle().await;
    assert!(!is_stored(data, &layer(0)), "then a");
    assert!(is_stored(data, &layer(2)) && is_stored(data, &layer(3)));
    assert!(w.berth.metric("berth_store_evictions_total").await >= 2.0);

    // Every image still pulls: evicted blobs are fetched again.
    for i in 0..4 {
        assert_eq!(pull(i).await, layer(i));
    }
    assert_eq!(w.front.count("GET", &layer(1)), 2);
    settle().await;
    assert_store_consistent(data).await;
}
