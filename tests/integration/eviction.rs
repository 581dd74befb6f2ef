//! Issue 6, test 1: the store stays under `storage.max_size` by evicting the least
//! recently used blobs; evicted blobs are simply fetched again.

use std::time::Duration;

use crate::common::*;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Front;
use crate::support::image::sha256_digest;
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::wait_until;

/// Unix seconds now: the clock (and resolution) berth stamps access times with.
fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

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
    let data = w.berth.data_dir();
    let size = |i: usize| images[i].layers[0].1 as f64;
    let metric = |name: &'static str| w.berth.metric(name);
    // Access times have one-second resolution: after a pull has been stamped (a fill once
    // the index counts its bytes, a hit when it is served), wait for the clock's next
    // second, so that the next pull is stamped later and the LRU order is the pulls' order.
    let next_second = |stored: f64| async move {
        let indexed = wait_until(Duration::from_secs(10), || async {
            metric("berth_store_bytes").await == stored
        })
        .await;
        assert!(indexed, "the store never held {stored} bytes");
        let stamped = unix_secs();
        assert!(wait_until(Duration::from_secs(3), || async { unix_secs() > stamped }).await);
        let used = metric("berth_store_bytes").await;
        assert!(used <= cap, "store at {used} bytes, cap {cap}");
    };
    // The evictor looks every 2 s: wait for its pass to have removed `evictions` blobs in
    // all (and every fill to have landed), then the cap holds.
    let evicted = |evictions: f64| async move {
        let done = wait_until(Duration::from_secs(20), || async {
            temp_count(data) == 0
                && metric("berth_store_evictions_total").await >= evictions
                && metric("berth_store_bytes").await <= cap
        })
        .await;
        let used = metric("berth_store_bytes").await;
        assert!(done, "store at {used} bytes, cap {cap}, after 20 s");
    };
    assert_eq!(pull(0).await, layer(0));
    next_second(size(0)).await;
    assert_eq!(pull(1).await, layer(1));
    next_second(size(0) + size(1)).await;
    assert_eq!(pull(0).await, layer(0)); // a is used again: b is now the oldest
    next_second(size(0) + size(1)).await;
    assert_eq!(pull(2).await, layer(2)); // 60 MiB > 95% of 48: evict down to 85%
    evicted(1.0).await;
    assert!(!is_stored(data, &layer(1)), "b was least recently used");
    assert!(is_stored(data, &layer(0)) && is_stored(data, &layer(2)));
    assert_eq!(pull(3).await, layer(3));
    evicted(2.0).await;
    assert!(!is_stored(data, &layer(0)), "then a");
    assert!(is_stored(data, &layer(2)) && is_stored(data, &layer(3)));
    assert!(w.berth.metric("berth_store_evictions_total").await >= 2.0);

    // Every image still pulls: evicted blobs are fetched again.
    for i in 0..4 {
        assert_eq!(pull(i).await, layer(i));
    }
    assert_eq!(w.front.count("GET", &layer(1)), 2);
    // Four blobs stored six times, two left under the cap: four evicted, at least.
    evicted(4.0).await;
    assert_store_consistent(data).await;
}

/// Issue 6, test 5: a store on a 64 MiB tmpfs; a 100 MiB blob is still delivered whole
/// (passed through once the disk is full), nothing partial is left, and it is said once.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_passes_the_blob_through() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = std::process::Command::new(crate::support::require_tool("mount"))
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs (the tests run as root)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let extra = crate::support::berth::Extra {
        data_dir: Some(mnt.join("data")),
        ..Default::default()
    };
    let berth = Berth::start_opts(&[UpstreamSpec::docker_hub(&front.url())], &extra).await;
    let w = World {
        registry,
        front,
        berth,
        dir,
    };
    let img = w.push_image("library/huge", "v1", &[100 * MIB], 300).await;
    let (layer, size) = img.layers[0].clone();
    // Two clients at once: both get every byte.
    let url = format!("{}/v2/library/huge/blobs/{layer}", w.berth.url());
    let fetch = || async {
        let r = get(&url, false).await;
        assert_eq!(r.status(), 200);
        r.bytes()
            .await
            .unwrap_or_else(|e| panic!("the whole body: {e}\nberth log:\n{}", w.berth.log()))
    };
    let (a, b) = tokio::join!(fetch(), fetch());
    for body in [a, b] {
        assert_eq!(body.len() as u64, size);
        assert_eq!(sha256_digest(&body), layer);
    }
    let data = w.berth.data_dir();
    assert!(!is_stored(data, &layer), "nothing that large fits");
    assert_store_consistent(data).await;
    assert_eq!(w.berth.metric("berth_store_full_fills_total").await, 1.0);
    assert_eq!(
        w.berth.log().matches("disk is full").count(),
        1,
        "said once"
    );
    // berth is still healthy and serves smaller things.
    let small = w.push_image("library/small", "v1", &[MIB], 301).await;
    let r = get(
        &format!(
            "{}/v2/library/small/blobs/{}",
            w.berth.url(),
            small.layers[0].0
        ),
        false,
    )
    .await;
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), small.layers[0].0);
}
