//! Issue 6, tests 2–4: the store survives `kill -9` at any moment and the loss of its index.
//!
//! berth is killed with SIGKILL (no chance to clean up), restarted on the same store, and
//! judged from outside: what is left under `<data>/tmp`, what `berth verify` says, whether
//! every stored file still hashes to its name (checked here too, independently of the
//! tool), and what clients and the upstream see afterwards.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::berth::{binary, Berth};
use crate::support::front::Faults;
use crate::support::{http, run_with_timeout_async, wait_until};

/// SIGKILL, as an OOM killer or a node losing power would: no handler runs.
fn kill_9(berth: &Berth) {
    let pid = berth.pid().expect("berth is running").to_string();
    let status = Command::new("kill")
        .args(["-9", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -9 {pid}: {status}");
}

/// GETs `url` and returns the body's digest; on a non-200 answer, the status and body;
/// on a transfer that breaks, why.
async fn fetch_digest(url: String) -> Result<String, String> {
    let resp = http().get(&url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    hash_body(resp).await
}

/// Names of the files in `<data>/tmp` (none when the directory is missing).
fn temp_files(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("tmp"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Issue 6, test 2: a slow fill of a 128 MiB blob, `kill -9` halfway, restart on the same
/// store: no temp file remains, the blob pulls whole, the blob stored before is still
/// served without asking upstream again.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_fill_then_restart() {
    let mut w = World::start("10m").await;
    let img = w
        .push_image("library/big", "v1", &[128 * MIB, 256 * KIB], 80)
        .await;
    let (big, big_size) = img.layers[0].clone();
    let (small, _) = img.layers[1].clone();
    let data = w.berth.data_dir().to_owned();
    let base = w.berth.url();
    let big_url = format!("{base}/v2/library/big/blobs/{big}");
    let small_url = format!("{base}/v2/library/big/blobs/{small}");

    assert_eq!(
        fetch_digest(small_url.clone()).await.as_deref(),
        Ok(small.as_str())
    );
    assert!(wait_stored(&data, &small).await, "small layer not stored");
    // The repository link is committed just after the client's last byte, in the index
    // transaction that records the blob; the blob count berth reports follows it.
    let indexed = wait_until(Duration::from_secs(10), || async {
        w.berth.metric("berth_store_blobs").await >= 1.0
    })
    .await;
    assert!(
        indexed,
        "the small layer was never indexed; log:\n{}",
        w.berth.log()
    );

    // 32 MiB/s per connection: the 128 MiB fill takes about 4 s.
    w.front.set_faults(Faults {
        throttle: Some(32 * MIB as u64),
        ..Faults::default()
    });
    let mut resp = http().get(&big_url).send().await.expect("GET big layer");
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0u64;
    while got < big_size / 2 {
        assert!(
            Instant::now() < deadline,
            "only {got} bytes after 30 s; berth log:\n{}",
            w.berth.log()
        );
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("the big layer stalled")
            .expect("the big layer broke before berth was killed")
            .expect("the big layer ended before half of it arrived");
        got += chunk.len() as u64;
    }
    // The fill is under way: its bytes are in a temp file, not under the digest.
    assert!(
        !temp_files(&data).is_empty(),
        "no temp file while the fill runs"
    );
    assert!(!is_stored(&data, &big));

    kill_9(&w.berth);
    // The client must see a broken transfer, never a short body that ends cleanly.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => got += c.len() as u64,
                Ok(None) => return Ok(got),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("the client hung after berth was killed");
    assert!(
        end.is_err(),
        "the big layer ended cleanly after {got} of {big_size} bytes"
    );
    assert_blobs_hash_to_names(&data, "after kill -9");

    w.berth.restart().await;
    let left = temp_files(&data);
    assert!(left.is_empty(), "temp files after restart: {left:?}");
    assert!(
        w.berth
            .log()
            .contains("removed temp files left by an earlier run"),
        "berth did not say it removed the temp file; log:\n{}",
        w.berth.log()
    );

    w.front.set_faults(Faults::default());
    let small_gets = w.front.count("GET", &small);
    assert_eq!(fetch_digest(big_url).await.as_deref(), Ok(big.as_str()));
    assert_eq!(fetch_digest(small_url).await.as_deref(), Ok(small.as_str()));
    // The small layer (and its repository link) survived the kill: no upstream request.
    assert_eq!(w.front.count("GET", &small), small_gets);
    assert_eq!(
        w.front.count("HEAD", &small),
        0,
        "{:?}",
        w.front.content_requests()
    );
    // The killed fill left nothing to resume from: one new GET of the whole blob.
    assert_eq!(
        w.front.count("GET", &big),
        2,
        "{:?}",
        w.front.content_requests()
    );
    assert!(wait_stored(&data, &big).await, "big layer not stored");
    assert_store_consistent(&data).await;
}

/// Issue 6, test 3: `kill -9` during 20 concurrent fills and tag writes, 10 times; after
/// each kill `berth verify` finds nothing wrong, and neither does this test.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_concurrent_fills_ten_times() {
    // A 1 s tag TTL: later rounds revalidate tags, so kills also land on tag writes.
    let mut w = World::start("1s").await;
    let mut images = Vec::new();
    for i in 0..4u64 {
        images.push(
            w.push_image(
                &format!("library/crash{i}"),
                "v1",
                &[MIB, 2 * MIB, 3 * MIB, 4 * MIB, 1536 * KIB],
                90 + i,
            )
            .await,
        );
    }
    // 8 MiB/s per connection: a 1 MiB fill takes 125 ms, a 4 MiB one 500 ms, so kills
    // between 20 and 300 ms land before, during and after fills.
    w.front.set_faults(Faults {
        throttle: Some(8 * MIB as u64),
        ..Faults::default()
    });
    let data = w.berth.data_dir().to_owned();
    let started = Instant::now();
    // (temp files at the kill, blobs stored after it), per round.
    let mut rounds = Vec::new();
    for round in 0..10u64 {
        let base = w.berth.url();
        let mut clients = Vec::new();
        for (i, img) in images.iter().enumerate() {
            for (digest, _) in &img.layers {
                let url = format!("{base}/v2/library/crash{i}/blobs/{digest}");
                let want = digest.clone();
                clients.push(tokio::spawn(async move { (want, fetch_digest(url).await) }));
            }
            let url = format!("{base}/v2/library/crash{i}/manifests/v1");
            let want = img.manifest_digest.clone();
            clients.push(tokio::spawn(async move {
                let resp = http()
                    .get(&url)
                    .header("accept", ACCEPT_ALL)
                    .send()
                    .await
                    .map_err(|e| e.to_string());
                let body = match resp {
                    Ok(r) if r.status() == 200 => r.bytes().await.map_err(|e| e.to_string()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e),
                };
                (want, body.map(|b| crate::support::image::sha256_digest(&b)))
            }));
        }
        // Not a wait for anything: where this round's kill lands (see above).
        tokio::time::sleep(Duration::from_millis(20 + round * 31)).await;
        kill_9(&w.berth);
        let cut = temp_files(&data).len();
        for client in clients {
            let (want, got) = tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a client hung after the kill"))
                .expect("client task");
            // Cut short is fine; a complete answer with the wrong bytes is not.
            if let Ok(got) = got {
                assert_eq!(got, want, "round {round}: wrong bytes served");
            }
        }
        // Reaps the killed process; berth.lock is free once it is gone.
        w.berth.stop();
        let stored = assert_blobs_hash_to_names(&data, &format!("round {round}, after kill -9"));
        rounds.push((cut, stored));
        let mut verify = Command::new(binary());
        verify
            .arg("verify")
            .arg("--config")
            .arg(&w.berth.config_path);
        let out = run_with_timeout_async(verify, Duration::from_secs(60)).await;
        assert!(
            out.status.success(),
            "round {round}: berth verify failed ({}):\n{}\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        w.berth.restart().await;
        assert_store_consistent(&data).await;
    }
    eprintln!("(temp files at the kill, blobs stored) per round: {rounds:?}");
    // The kills must have landed on fills in progress, and some fills must have finished
    // between kills: otherwise this test killed an idle or a hopelessly early berth.
    assert!(
        rounds.iter().filter(|(cut, _)| *cut > 0).count() >= 5,
        "few kills landed mid-fill: {rounds:?}"
    );
    assert!(
        rounds.last().is_some_and(|(_, stored)| *stored > 0),
        "no fill ever completed: {rounds:?}"
    );
    // After all that, every blob and manifest still pulls whole.
    w.front.set_faults(Faults::default());
    let base = w.berth.url();
    for (i, img) in images.iter().enumerate() {
        let blobs = img
            .layers
            .iter()
            .map(|(d, _)| d)
            .chain([&img.config_digest]);
        for digest in blobs {
            let url = format!("{base}/v2/library/crash{i}/blobs/{digest}");
            assert_eq!(fetch_digest(url).await.as_deref(), Ok(digest.as_str()));
        }
        let m = get(&format!("{base}/v2/library/crash{i}/manifests/v1"), false).await;
        assert_eq!(m.status(), 200);
        assert_eq!(header(&m, "docker-content-digest"), img.manifest_digest);
    }
    assert_store_consistent(&data).await;
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "ten rounds took {:?}",
        started.elapsed()
    );
}

/// Issue 6, test 4: `index.redb` deleted while berth is stopped. berth rebuilds it from the
/// blob files and serves everything stored without fetching it again: the repository
/// links went with the index, so each is confirmed once with a (free) upstream HEAD, after
/// which the content is served with the upstream down too. Tags lived only in the index:
/// with the upstream down a tag pull answers a clear 503.
#[tokio::test(flavor = "multi_thread")]
async fn index_deleted_while_stopped_is_rebuilt() {
    let mut w = World::start("10m").await;
    let img = w
        .push_image("library/app", "v1", &[MIB, 300 * KIB], 100)
        .await;
    let data = w.berth.data_dir().to_owned();
    let base = w.berth.url();
    let m = get(&format!("{base}/v2/library/app/manifests/v1"), false).await;
    assert_eq!(m.status(), 200);
    assert_eq!(header(&m, "docker-content-digest"), img.manifest_digest);
    let media_type = header(&m, "content-type");
    let blobs: Vec<String> = img
        .layers
        .iter()
        .map(|(d, _)| d.clone())
        .chain([img.config_digest.clone()])
        .collect();
    for digest in &blobs {
        let url = format!("{base}/v2/library/app/blobs/{digest}");
        assert_eq!(fetch_digest(url).await.as_deref(), Ok(digest.as_str()));
        assert!(wait_stored(&data, digest).await, "{digest} not stored");
    }
    assert!(is_stored(&data, &img.manifest_digest));

    w.berth.stop();
    std::fs::remove_file(data.join("index.redb")).expect("remove index.redb");
    w.berth.restart().await;
    let log = w.berth.log();
    assert!(
        log.contains("the index is missing") && log.contains("adopted"),
        "berth did not say it rebuilt its index; log:\n{log}"
    );
    // Everything is served, confirmed with HEADs, fetched never.
    w.front.clear();
    for digest in &blobs {
        let url = format!("{base}/v2/library/app/blobs/{digest}");
        assert_eq!(fetch_digest(url).await.as_deref(), Ok(digest.as_str()));
    }
    let m = get(
        &format!("{base}/v2/library/app/manifests/{}", img.manifest_digest),
        false,
    )
    .await;
    assert_eq!(m.status(), 200);
    assert_eq!(
        w.front.count("GET", "/blobs/"),
        0,
        "{:?}",
        w.front.content_requests()
    );
    assert_eq!(w.front.count("GET", "/manifests/"), 0);
    assert_eq!(w.front.count("HEAD", "/blobs/"), blobs.len());
    w.registry.stop();

    for digest in &blobs {
        let url = format!("{base}/v2/library/app/blobs/{digest}");
        assert_eq!(
            fetch_digest(url).await.as_deref(),
            Ok(digest.as_str()),
            "blob {digest} by digest after the index rebuild, upstream down; berth log tail:\n{}",
            tail(&w.berth.log())
        );
    }
    let by_digest = get(
        &format!("{base}/v2/library/app/manifests/{}", img.manifest_digest),
        false,
    )
    .await;
    let status = by_digest.status();
    let content_type = header(&by_digest, "content-type");
    let body = by_digest.bytes().await.unwrap_or_default();
    assert_eq!(
        status,
        200,
        "manifest by digest after the index rebuild, upstream down: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(body.as_ref(), img.manifest.as_slice());
    assert_eq!(content_type, media_type, "media type lost in the rebuild");

    // The tag is gone with the index and the upstream cannot say: a clear OCI error.
    let tag = get(&format!("{base}/v2/library/app/manifests/v1"), false).await;
    let (status, code, message) = error_code(tag).await;
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "{message}");
    assert_store_consistent(&data).await;
}

/// The last lines of a log, for assertion messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
