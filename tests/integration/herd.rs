//! Issue 3: one upstream fetch per miss, streamed to every waiting client.

use std::time::Duration;

use crate::common::*;
use crate::support::front::Faults;
use crate::support::{http, wait_until};

/// GETs `url` and returns the body's digest, or the error that aborted it.
async fn fetch_digest(url: String) -> Result<String, String> {
    let resp = http().get(&url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    hash_body(resp).await
}

async fn fetch_many(url: &str, n: usize) -> Vec<Result<String, String>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(fetch_digest(url.to_owned())))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

fn stored(w: &World, digest: &str) -> bool {
    is_stored(w.berth.data_dir(), digest)
}

/// Test 1: 100 concurrent clients, one cold 64 MiB blob, one upstream GET.
#[tokio::test(flavor = "multi_thread")]
async fn hundred_clients_one_upstream_get() {
    let w = World::start("10m").await;
    let img = w.push_image("library/big", "v1", &[64 * MIB], 70).await;
    let (layer, size) = img.layers[0].clone();
    // A CDN-like 64 MiB/s per connection: the fill takes about a second, so every
    // client arrives while it runs and must follow it.
    w.front.set_faults(Faults {
        throttle: Some(64 * MIB as u64),
        ..Faults::default()
    });
    let url = format!("{}/v2/library/big/blobs/{layer}", w.berth.url());
    let results = fetch_many(&url, 100).await;
    for r in &results {
        assert_eq!(r.as_deref(), Ok(layer.as_str()));
    }
    assert_eq!(
        w.front.count("GET", &layer),
        1,
        "{:?}",
        w.front.content_requests()
    );
    assert_eq!(w.front.bytes("GET", &layer), size);
    let miss = w
        .berth
        .metric("berth_requests_total{kind=\"blob\",outcome=\"miss\"}")
        .await;
    let coalesced = w
        .berth
        .metric("berth_requests_total{kind=\"blob\",outcome=\"coalesced\"}")
        .await;
    assert_eq!(miss, 1.0);
    assert!(
        coalesced >= 90.0,
        "only {coalesced} clients followed the fill"
    );
    assert!(wait_stored(w.berth.data_dir(), &layer).await);
    assert_store_consistent(w.berth.data_dir()).await;
}

/// Test 2: 50 containerd-style resolves (HEAD tag, then GET by digest): one manifest GET.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_resolves_one_manifest_get() {
    let w = World::start("10m").await;
    let img = w.push_image("library/app", "v1", &[KIB], 71).await;
    w.front.set_faults(Faults {
        throttle: Some(64 * KIB as u64),
        ..Faults::default()
    });
    let base = w.berth.url();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move {
                let head = get(
                    &format!("{base}/v2/library/app/manifests/v1?ns=docker.io"),
                    true,
                )
                .await;
                assert_eq!(head.status(), 200);
                let digest = header(&head, "docker-content-digest");
                let m = get(
                    &format!("{base}/v2/library/app/manifests/{digest}?ns=docker.io"),
                    false,
                )
                .await;
                assert_eq!(m.status(), 200);
                (digest, m.bytes().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (digest, body) = t.await.unwrap();
        assert_eq!(digest, img.manifest_digest);
        assert_eq!(body.as_ref(), img.manifest.as_slice());
    }
    assert_eq!(
        w.front.count("GET", "/manifests/"),
        1,
        "{:?}",
        w.front.content_requests()
    );
    assert_eq!(w.front.count("HEAD", "/manifests/"), 0);
}

/// Test 3: the client that started the fill leaves after 1 MiB; the fill goes on.
#[tokio::test(flavor = "multi_thread")]
async fn fill_outlives_the_client_that_started_it() {
    let w = World::start("10m").await;
    let img = w
        .push_image("library/big", "v1", &[24 * MIB, 8 * MIB], 72)
        .await;
    w.front.set_faults(Faults {
        throttle: Some(16 * MIB as u64),
        ..Faults::default()
    });
    for (i, (layer, _)) in img.layers.iter().enumerate() {
        let url = format!("{}/v2/library/big/blobs/{layer}", w.berth.url());
        let mut first = http().get(&url).send().await.unwrap();
        let mut got = 0;
        while got < MIB {
            got += first.chunk().await.unwrap().unwrap().len();
        }
        // Others join (for the second layer: nobody does), then the first client leaves.
        let others: Vec<_> = if i == 0 {
            (0..5)
                .map(|_| tokio::spawn(fetch_digest(url.clone())))
                .collect()
        } else {
            Vec::new()
        };
        // Every other client has joined the fill (answered as coalesced) before the
        // first leaves.
        let joined = wait_until(Duration::from_secs(10), || async {
            w.berth
                .metric("berth_requests_total{kind=\"blob\",outcome=\"coalesced\"}")
                .await
                >= others.len() as f64
        })
        .await;
        assert!(joined, "the other clients never joined the fill");
        drop(first);
        for o in others {
            assert_eq!(o.await.unwrap().as_deref(), Ok(layer.as_str()));
        }
        // The blob lands in the store whether or not anyone is still reading.
        assert!(
            wait_stored(w.berth.data_dir(), layer).await,
            "layer {i} was not stored after its client left"
        );
        assert_eq!(w.front.count("GET", layer), 1);
    }
    assert_store_consistent(w.berth.data_dir()).await;
}

/// Test 4: a cut upstream transfer is resumed with Range; when it cannot be, every client
/// is aborted and nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn cut_transfers_resume_or_abort_cleanly() {
    let w = World::start("10m").await;
    let img = w
        .push_image("library/big", "v1", &[16 * MIB, 12 * MIB], 73)
        .await;
    let (a, a_size) = img.layers[0].clone();
    let (b, b_size) = img.layers[1].clone();

    w.front.set_faults(Faults {
        cut: Some((a.clone(), a_size / 2, 1)),
        throttle: Some(32 * MIB as u64),
        ..Faults::default()
    });
    let results = fetch_many(&format!("{}/v2/library/big/blobs/{a}", w.berth.url()), 10).await;
    for r in &results {
        assert_eq!(r.as_deref(), Ok(a.as_str()));
    }
    let gets: Vec<_> = w
        .front
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains(&a))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    // Resumed from the byte berth had (what was in flight when the cut came is lost).
    let from: u64 = gets[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or_else(|| panic!("resume without a range: {gets:?}"));
    assert!(from > 0 && from <= a_size / 2, "resumed from {from}");
    assert!(wait_stored(w.berth.data_dir(), &a).await);

    // The upstream cannot resume (ignores Range): every client aborts, nothing stored.
    w.front.set_faults(Faults {
        cut: Some((b.clone(), b_size / 2, 1)),
        ignore_range: true,
        throttle: Some(32 * MIB as u64),
        ..Faults::default()
    });
    let url = format!("{}/v2/library/big/blobs/{b}", w.berth.url());
    let results = fetch_many(&url, 10).await;
    for r in &results {
        assert!(r.as_ref().is_err_and(|e| e.starts_with("aborted")), "{r:?}");
    }
    assert!(!stored(&w, &b));
    assert_store_consistent(w.berth.data_dir()).await;
    w.front.set_faults(Faults::default());
    assert_eq!(fetch_digest(url).await.as_deref(), Ok(b.as_str()));
    assert!(wait_stored(w.berth.data_dir(), &b).await);
}

/// Test 5: wrong bytes from upstream abort every client; the next request refetches.
#[tokio::test(flavor = "multi_thread")]
async fn digest_mismatch_aborts_every_client() {
    let w = World::start("10m").await;
    let img = w.push_image("library/big", "v1", &[8 * MIB], 74).await;
    let (layer, _) = img.layers[0].clone();
    w.front.set_faults(Faults {
        corrupt: Some(layer.clone()),
        throttle: Some(16 * MIB as u64),
        ..Faults::default()
    });
    let url = format!("{}/v2/library/big/blobs/{layer}", w.berth.url());
    let results = fetch_many(&url, 20).await;
    for r in &results {
        assert!(r.as_ref().is_err_and(|e| e.starts_with("aborted")), "{r:?}");
    }
    assert_eq!(w.front.count("GET", &layer), 1);
    assert!(!stored(&w, &layer));
    assert_store_consistent(w.berth.data_dir()).await;
    w.front.set_faults(Faults::default());
    assert_eq!(fetch_digest(url).await.as_deref(), Ok(layer.as_str()));
    assert_eq!(w.front.count("GET", &layer), 2);
}

/// Cross-repository safety: a stored blob is served for another repository only when
/// upstream confirms that repository has it.
#[tokio::test(flavor = "multi_thread")]
async fn stored_blobs_do_not_leak_across_repositories() {
    let w = World::start("10m").await;
    let img = w.push_image("team/private", "v1", &[256 * KIB], 75).await;
    // The same image (same blobs) also lives in team/shared; team/other has something else.
    crate::support::image::push(
        &img.layout,
        crate::support::image::LAYOUT_REF,
        &format!("{}/team/shared:v1", w.registry.host()),
        None,
    )
    .await;
    w.push_image("team/other", "v1", &[KIB], 76).await;
    let (layer, _) = img.layers[0].clone();
    let base = w.berth.url();
    assert_eq!(
        fetch_digest(format!("{base}/v2/team/private/blobs/{layer}"))
            .await
            .as_deref(),
        Ok(layer.as_str())
    );
    w.front.clear();

    let r = get(&format!("{base}/v2/team/other/blobs/{layer}"), false).await;
    let (status, code, _) = error_code(r).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    assert_eq!(w.front.count("HEAD", "/team/other/blobs/"), 1);

    assert_eq!(
        fetch_digest(format!("{base}/v2/team/shared/blobs/{layer}"))
            .await
            .as_deref(),
        Ok(layer.as_str())
    );
    assert_eq!(w.front.count("HEAD", "/team/shared/blobs/"), 1);
    assert_eq!(
        w.front.count("GET", &layer),
        0,
        "served from the store after the HEAD"
    );
    // Known now: no second HEAD.
    assert_eq!(
        fetch_digest(format!("{base}/v2/team/shared/blobs/{layer}"))
            .await
            .as_deref(),
        Ok(layer.as_str())
    );
    assert_eq!(w.front.count("HEAD", "/team/shared/blobs/"), 1);
}

/// A fill's stall timeout: an upstream that goes quiet mid-blob (connection open, no
/// bytes) is given up on after `stall_timeout`, and the fill resumes with `Range`.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upstream_is_resumed_after_the_stall_timeout() {
    use crate::support::berth::{Berth, UpstreamSpec};
    use crate::support::front::Front;
    use crate::support::registry::{Registry, RegistryOptions};
    let registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    let berth = Berth::start(&[UpstreamSpec::docker_hub(&front.url()).stall_timeout("1s")]).await;
    let w = World {
        registry,
        front,
        berth,
        dir: tempfile::tempdir().unwrap(),
    };
    let img = w.push_image("library/big", "v1", &[4 * MIB], 77).await;
    let (layer, size) = img.layers[0].clone();
    w.front.set_faults(Faults {
        cut: Some((layer.clone(), size / 2, 1)),
        stall: true,
        ..Faults::default()
    });
    let started = std::time::Instant::now();
    let results = fetch_many(
        &format!("{}/v2/library/big/blobs/{layer}", w.berth.url()),
        3,
    )
    .await;
    for r in &results {
        assert_eq!(r.as_deref(), Ok(layer.as_str()));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(20),
        "the stall was noticed after {waited:?}"
    );
    let gets: Vec<_> = w
        .front
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains(&layer))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[1]
        .range
        .as_deref()
        .is_some_and(|r| r.starts_with("bytes=")));
    assert!(wait_stored(w.berth.data_dir(), &layer).await);
}
