//! Issue 5: what operators see. Metrics that count exactly, promtool-clean; readiness that
//! follows the store and not the upstream; one JSON log line per request; the admin API
//! (warm, status, tag delete) and the CLI that talks to it.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::support::berth::binary;
use crate::support::{http, require_tool, run_with_timeout_async};

/// Test 1: after k warm blob GETs, m misses and one stale answer, the counters say k, m
/// and 1 exactly, and `promtool check metrics` is clean.
#[tokio::test(flavor = "multi_thread")]
async fn counters_are_exact_and_promtool_clean() {
    let mut w = World::start("1s").await;
    let img = w
        .push_image("library/app", "v1", &[64 * KIB, 32 * KIB, 16 * KIB], 160)
        .await;
    let base = w.berth.url();
    assert_eq!(
        get(&format!("{base}/v2/library/app/manifests/v1"), false)
            .await
            .status(),
        200
    );
    let (m, k) = (img.layers.len(), 7);
    for (d, _) in &img.layers {
        get(&format!("{base}/v2/library/app/blobs/{d}"), false)
            .await
            .bytes()
            .await
            .unwrap();
    }
    // Every fill has landed before the hits (a hit needs the file in place).
    for (d, _) in &img.layers {
        assert!(wait_stored(w.berth.data_dir(), d).await);
    }
    for i in 0..k {
        let (d, _) = &img.layers[i % m];
        get(&format!("{base}/v2/library/app/blobs/{d}"), false)
            .await
            .bytes()
            .await
            .unwrap();
    }
    w.registry.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&format!("{base}/v2/library/app/manifests/v1"), false).await;
    assert!(r.headers().contains_key("warning"));

    let metric = |s: &'static str| {
        let b = &w.berth;
        async move { b.metric(s).await }
    };
    assert_eq!(
        metric("berth_requests_total{kind=\"blob\",outcome=\"hit\"}").await,
        k as f64
    );
    assert_eq!(
        metric("berth_requests_total{kind=\"blob\",outcome=\"miss\"}").await,
        m as f64
    );
    assert_eq!(
        metric("berth_requests_total{kind=\"manifest\",outcome=\"stale\"}").await,
        1.0
    );
    assert_eq!(
        metric("berth_requests_total{kind=\"manifest\",outcome=\"miss\"}").await,
        1.0
    );
    let layer_bytes: u64 = img.layers.iter().map(|(_, s)| s).sum();
    assert_eq!(
        metric("berth_upstream_fetched_bytes_total{upstream=\"docker.io\"}").await,
        layer_bytes as f64
    );
    assert_eq!(
        metric("berth_store_blobs").await,
        (m + 1) as f64,
        "layers + manifest"
    );

    // promtool lints the classic format; OpenMetrics is served when asked for.
    let text = w.berth.metrics().await;
    let path = w.dir.path().join("metrics.txt");
    std::fs::write(&path, &text).unwrap();
    let mut cmd = Command::new(require_tool("bash"));
    cmd.arg("-c").arg(format!(
        "{} check metrics < {}",
        require_tool("promtool").display(),
        path.display()
    ));
    let out = run_with_timeout_async(cmd, Duration::from_secs(30)).await;
    assert!(
        out.status.success() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "promtool: {}{}",
        out.stdout,
        out.stderr
    );
    let om = http()
        .get(format!("{}/metrics", w.berth.admin_url()))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(header(&om, "content-type").starts_with("application/openmetrics-text"));
    assert!(om.text().await.unwrap().ends_with("# EOF\n"));

    // One JSON log line per request, with the fields operators filter on.
    let log = w.berth.log();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["outcome"] == "stale")
        .expect("a log line for the stale answer");
    for field in [
        "upstream",
        "repository",
        "reference",
        "status",
        "bytes",
        "duration_ms",
    ] {
        assert!(!line[field].is_null(), "log line lacks {field}: {line}");
    }
    assert_eq!(line["repository"], "library/app");
}

/// Test 2: /readyz follows the store (unready while it cannot be written), not the
/// upstream (ready while it is down).
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_store_not_the_upstream() {
    let mut w = World::start("10m").await;
    let readyz = format!("{}/readyz", w.berth.admin_url());
    assert_eq!(get(&readyz, false).await.status(), 200);
    w.registry.stop();
    assert_eq!(
        get(&readyz, false).await.status(),
        200,
        "upstream down is not unready"
    );

    // A read-only bind mount over the store's temp directory: writes fail (even as root).
    let tmp = w.berth.data_dir().join("tmp");
    let t = tmp.display().to_string();
    let mount = |args: &[&str]| {
        let status = Command::new(require_tool("mount"))
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?}");
    };
    mount(&["--bind", &t, &t]);
    mount(&["-o", "remount,ro,bind", &t]);
    let unready = get(&readyz, false).await.status();
    let _ = Command::new(require_tool("umount")).arg(&t).status();
    assert_eq!(unready, 503);
    assert_eq!(get(&readyz, false).await.status(), 200);
}

/// Test 4: warm a multi-platform image through the admin API (and the CLI), stop the
/// upstream, and every platform still pulls. Also `berth status` and tag deletion.
#[tokio::test(flavor = "multi_thread")]
async fn warm_then_pull_every_platform_offline() {
    let mut w = World::start("1s").await;
    let idx = w.push_index("library/multi", "v1", 170).await;
    let single = w.push_image("library/single", "v1", &[KIB], 171).await;
    let admin = w.berth.admin_url();
    let r: serde_json::Value = http()
        .post(format!("{admin}/admin/warm"))
        .json(&serde_json::json!({ "images": ["docker.io/library/multi:v1", "ghcr.io/nope/x:1"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results[0]["ok"], true, "{r}");
    assert_eq!(results[0]["digest"], idx.index_digest.as_str());
    assert_eq!(results[0]["platforms"], 2);
    assert_eq!(
        results[1]["ok"], false,
        "an unconfigured host is reported, not fetched"
    );

    // The CLI warms the other image.
    let mut cmd = Command::new(binary());
    cmd.args(["warm", "--admin", &admin, "library/single:v1"]);
    let out = run_with_timeout_async(cmd, Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&single.manifest_digest),
        "{}",
        out.stdout
    );

    w.registry.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let base = w.berth.url();
    for m in &idx.manifests {
        let r = get(
            &format!("{base}/v2/library/multi/manifests/{}", m.manifest_digest),
            false,
        )
        .await;
        assert_eq!(r.status(), 200, "{}", m.manifest_digest);
        for d in std::iter::once(&m.config_digest).chain(m.layers.iter().map(|(d, _)| d)) {
            let r = get(&format!("{base}/v2/library/multi/blobs/{d}"), false).await;
            assert_eq!(r.status(), 200);
            assert_eq!(
                crate::support::image::sha256_digest(&r.bytes().await.unwrap()),
                *d
            );
        }
    }
    let r = get(&format!("{base}/v2/library/single/manifests/v1"), false).await;
    assert_eq!(r.status(), 200);

    // berth status: the table names the upstream and shows its quota.
    let mut cmd = Command::new(binary());
    cmd.args(["status", "--admin", &admin]);
    let out = run_with_timeout_async(cmd, Duration::from_secs(30)).await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("docker.io") && out.stdout.contains("/100"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("hit ratio"), "{}", out.stdout);

    // Forgetting a tag: the next pull must ask upstream (down, nothing stored: 503).
    let del = http()
        .delete(format!("{admin}/admin/tags/docker.io/library/single:v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let r = get(&format!("{base}/v2/library/single/manifests/v1"), false).await;
    assert_eq!(r.status(), 503);
    let again = http()
        .delete(format!("{admin}/admin/tags/docker.io/library/single:v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
}

/// The admin token: POST/DELETE need it when configured; reads stay open.
#[tokio::test(flavor = "multi_thread")]
async fn admin_writes_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-admin\n").unwrap();
    let registry = crate::support::registry::Registry::start(Default::default()).await;
    let berth = crate::support::berth::Berth::start_with_server(
        &[crate::support::berth::UpstreamSpec::docker_hub(
            &registry.url(),
        )],
        &format!("admin_token_file = \"{}\"", token_file.display()),
    )
    .await;
    let admin = berth.admin_url();
    let warm = |token: Option<&'static str>| {
        let mut req = http()
            .post(format!("{admin}/admin/warm"))
            .json(&serde_json::json!({ "images": [] }));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    assert_eq!(warm(None).await.unwrap().status(), 401);
    assert_eq!(warm(Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(warm(Some("s3cret-admin")).await.unwrap().status(), 200);
    assert_eq!(
        get(&format!("{admin}/admin/status"), false).await.status(),
        200
    );
    assert!(!berth.log().contains("s3cret-admin"));
}
