//! Issue 5: what operators see. Metrics that count exactly, promtool-clean; readiness that
//! follows the store and not the upstream; one JSON log line per request; the admin API
//! (warm, status, tag delete) and the CLI that talks to it.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::support::berth::binary;
use crate::support::JsonAnswer as _;
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
    // The 1 s TTL runs out: the first answer after it (berth asked, the upstream is down)
    // is the stale one. Answers before it are fresh (manifest hits, not counted below).
    let manifest = format!("{base}/v2/library/app/manifests/v1");
    let answers = until_upstream_asked(&w.front, "HEAD", "/library/app/manifests/v1", || async {
        get(&manifest, false)
            .await
            .headers()
            .contains_key("warning")
    })
    .await;
    assert_eq!(
        answers.iter().filter(|&&warned| warned).count(),
        1,
        "{answers:?}"
    );
    assert!(
        answers.last().unwrap(),
        "the answer after the TTL carries a Warning"
    );

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
    let r: serde_json::Value = w
        .berth
        .admin_request(reqwest::Method::POST, "/admin/warm")
        .json(&serde_json::json!({ "images": ["docker.io/library/multi:v1", "ghcr.io/nope/x:1"] }))
        .json_answer()
        .await;
    let results = r["results"].as_array().unwrap();
    assert_eq!(results[0]["ok"], true, "{r}");
    assert_eq!(results[0]["digest"], idx.index_digest.as_str());
    assert_eq!(results[0]["platforms"], 2);
    assert_eq!(
        results[1]["ok"], false,
        "an unconfigured host is reported, not fetched"
    );

    // The CLI warms the other image, with the token from its file.
    let token_file = w.berth.admin_token_file.clone().expect("an admin token");
    let mut cmd = Command::new(binary());
    cmd.args(["warm", "--admin", &admin, "--token-file"])
        .arg(&token_file)
        .arg("library/single:v1");
    let out = run_with_timeout_async(cmd, Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&single.manifest_digest),
        "{}",
        out.stdout
    );

    w.registry.stop();
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
    // The tag, past its 1 s TTL with the upstream down: every answer a 200, the first
    // after the TTL stale (asked for until the upstream was asked).
    let tag = format!("{base}/v2/library/single/manifests/v1");
    let answers = until_upstream_asked(&w.front, "HEAD", "/library/single/manifests/v1", || {
        let tag = tag.clone();
        async move {
            let r = get(&tag, false).await;
            (r.status(), r.headers().contains_key("warning"))
        }
    })
    .await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert!(
        answers.last().unwrap().1,
        "stale after the TTL: {answers:?}"
    );

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
    let del = w
        .berth
        .admin_request(
            reqwest::Method::DELETE,
            "/admin/tags/docker.io/library/single:v1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let r = get(&format!("{base}/v2/library/single/manifests/v1"), false).await;
    assert_eq!(r.status(), 503);
    let again = w
        .berth
        .admin_request(
            reqwest::Method::DELETE,
            "/admin/tags/docker.io/library/single:v1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
}

/// The admin API: without `server.admin_token_file` every mutation is refused (403, and
/// nothing is fetched); with one, a missing or wrong token gets 401 and the right one
/// works, from the API and from `berth warm --token-file`. Probes, metrics and status reads
/// stay open either way.
#[tokio::test(flavor = "multi_thread")]
async fn admin_mutations_need_a_configured_token() {
    let w = World::start("10m").await;
    let img = w.push_image("library/warmme", "v1", &[KIB], 180).await;
    let body = serde_json::json!({ "images": ["docker.io/library/warmme:v1"] });
    let open_reads = |berth: &crate::support::berth::Berth| {
        let admin = berth.admin_url();
        async move {
            for path in ["/metrics", "/readyz", "/healthz", "/admin/status", "/"] {
                let r = http().get(format!("{admin}{path}")).send().await.unwrap();
                assert_eq!(r.status(), 200, "GET {path} without a token");
            }
        }
    };

    // No token configured: refused, with a message that says what to set.
    let closed = crate::support::berth::Berth::start_opts(
        &[crate::support::berth::UpstreamSpec::docker_hub(
            &w.front.url(),
        )],
        &crate::support::berth::Extra {
            no_admin_token: true,
            ..Default::default()
        },
    )
    .await;
    let admin = closed.admin_url();
    w.front.clear();
    for token in [None, Some("anything")] {
        let mut req = http().post(format!("{admin}/admin/warm")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403);
        let text = r.text().await.unwrap();
        assert!(text.contains("server.admin_token_file"), "{text}");
    }
    let del = http()
        .delete(format!("{admin}/admin/tags/docker.io/library/warmme:v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 403);
    assert_eq!(w.front.seen().len(), 0, "a refused warm fetched something");
    assert!(!is_stored(closed.data_dir(), &img.manifest_digest));
    assert_eq!(closed.metric("berth_store_blobs").await, 0.0);
    open_reads(&closed).await;
    assert!(
        closed.log().contains("are refused"),
        "the start-up line says mutations are off:\n{}",
        closed.log()
    );
    // The CLI reports the refusal and fails.
    let mut cmd = Command::new(binary());
    cmd.args(["warm", "--admin", &admin, "library/warmme:v1"]);
    let out = run_with_timeout_async(cmd, Duration::from_secs(60)).await;
    assert!(!out.status.success());
    assert!(out.stderr.contains("403"), "{}", out.stderr);

    // A token configured (the harness's default): missing or wrong is 401, right is 200.
    let berth = &w.berth;
    let token = berth
        .admin_token
        .clone()
        .expect("the harness configures a token");
    let admin = berth.admin_url();
    let warm = |token: Option<String>| {
        let mut req = http().post(format!("{admin}/admin/warm")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let r = warm(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer");
    assert_eq!(warm(Some("wrong".into())).await.unwrap().status(), 401);
    // A prefix of the token is as wrong as any other.
    assert_eq!(
        warm(Some(token[..token.len() - 1].to_owned()))
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(!is_stored(berth.data_dir(), &img.manifest_digest));
    let r = warm(Some(token.clone())).await.unwrap();
    assert_eq!(r.status(), 200);
    let r: serde_json::Value = r.json().await.unwrap();
    assert_eq!(r["results"][0]["ok"], true, "{r}");
    assert!(wait_stored(berth.data_dir(), &img.layers[0].0).await);
    open_reads(berth).await;
    assert!(
        !berth.log().contains(&token),
        "the admin token reached the log"
    );
}
