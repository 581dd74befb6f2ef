//! Pulls through berth with real clients, and what berth asks upstream for them.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::support::containerd::Containerd;
use crate::support::image::sha256_digest;
use crate::support::{require_tool, run_with_timeout_async};

/// Issue 2, test 1: containerd pulls (and unpacks) through a hosts.toml mirror.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_hosts_toml_mirror() {
    let w = World::start("10m").await;
    let img = w
        .push_image("library/app", "v1", &[MIB, 512 * KIB, 64 * KIB], 1)
        .await;
    let ctrd = Containerd::start().await;
    // The hosts.toml files a node would get: written by `berth containerd-config`.
    let hosts = ctrd.hosts_dir();
    let mut cmd = std::process::Command::new(crate::support::berth::binary());
    cmd.args(["containerd-config", "--endpoint", &w.berth.url(), "--out"])
        .arg(&hosts)
        .arg("--config")
        .arg(&w.berth.config_path)
        .args(["--upstreams", "docker.io"]);
    let out = run_with_timeout_async(cmd, Duration::from_secs(20)).await;
    assert!(out.status.success(), "containerd-config: {}", out.stderr);
    let written = std::fs::read_to_string(hosts.join("docker.io/hosts.toml")).unwrap();
    assert!(
        written.contains(&format!("[host.\"{}\"]", w.berth.url())),
        "{written}"
    );
    assert!(written.contains("dial_timeout"), "{written}");
    let out = ctrd.pull(&hosts, "docker.io/library/app:v1").await;
    assert!(
        out.status.success(),
        "ctr pull failed:\n{}\n{}\nberth log:\n{}",
        out.stdout,
        out.stderr,
        w.berth.log()
    );
    let list = ctrd
        .ctr(&["images", "ls"])
        .await
        .expect_success("ctr images ls");
    assert!(
        list.stdout.contains(&img.manifest_digest),
        "{}",
        list.stdout
    );
    // containerd named the upstream with ?ns=, and berth saw it.
    assert!(
        w.berth.log().contains("\"ns\":\"docker.io\""),
        "berth log:\n{}",
        w.berth.log()
    );
    // berth served the layers and the config, not the fallback `server`.
    let misses = w
        .berth
        .metric("berth_requests_total{kind=\"blob\",outcome=\"miss\"}")
        .await;
    assert_eq!(misses, (img.layers.len() + 1) as f64);
    // Every layer went upstream exactly once.
    for (digest, _) in &img.layers {
        assert_eq!(
            w.front.count("GET", digest),
            1,
            "{digest}: {:?}",
            w.front.content_requests()
        );
    }
    // A second pull (fresh content store) is served from berth's store.
    let before = w.front.content_requests().len();
    ctrd.ctr(&["images", "rm", "docker.io/library/app:v1"])
        .await
        .expect_success("rm");
    ctrd.ctr(&["content", "prune", "references"]).await;
    let out = ctrd.pull(&hosts, "docker.io/library/app:v1").await;
    assert!(out.status.success(), "second pull: {}", out.stderr);
    assert_eq!(
        w.front.content_requests().len(),
        before,
        "{:?}",
        w.front.content_requests()
    );
}

/// Issue 2, test 2: skopeo through the path-prefix form, single and multi-arch.
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_through_path_prefix() {
    let w = World::start("10m").await;
    let img = w
        .push_image("library/single", "v1", &[256 * KIB, 128 * KIB], 2)
        .await;
    let idx = w.push_index("library/multi", "v1", 3).await;
    for (src, all, want) in [
        (
            "docker.io/library/single:v1",
            false,
            img.manifest_digest.clone(),
        ),
        ("docker.io/library/multi:v1", true, idx.index_digest.clone()),
        // Docker Hub short names get library/.
        ("docker.io/single:v1", false, img.manifest_digest.clone()),
    ] {
        let dest = w.dir.path().join(format!(
            "out-{}",
            crate::support::image::sha256_hex(src.as_bytes())
        ));
        let mut cmd = Command::new(require_tool("skopeo"));
        // --preserve-digests: skopeo would otherwise re-compress the uncompressed layers.
        cmd.args([
            "copy",
            "--insecure-policy",
            "--src-tls-verify=false",
            "--src-no-creds",
        ])
        .args(["--retry-times=0", "--preserve-digests"]);
        if all {
            cmd.arg("--all");
        }
        cmd.arg(format!("docker://{}/{src}", w.berth.host()))
            .arg(format!("oci:{}:out", dest.display()));
        let out = run_with_timeout_async(cmd, Duration::from_secs(120)).await;
        assert!(
            out.status.success(),
            "skopeo {src}: {}\nberth log:\n{}",
            out.stderr,
            w.berth.log()
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["manifests"][0]["digest"].as_str().unwrap(),
            want,
            "{src}"
        );
    }
    // Both platforms' layers came through berth once each.
    for m in &idx.manifests {
        for (digest, _) in &m.layers {
            assert_eq!(w.front.count("GET", digest), 1, "{digest}");
        }
    }
    assert_store_consistent(w.berth.data_dir()).await;
}

/// Issue 2, test 3: digests never refetched; tags free within TTL; one HEAD after it;
/// a moved tag serves the new digest.
#[tokio::test(flavor = "multi_thread")]
async fn tags_revalidate_with_head_and_digests_never_refetch() {
    let w = World::start("2s").await;
    let v1 = w.push_image("library/app", "latest", &[64 * KIB], 10).await;
    let tag_url = format!(
        "{}/v2/library/app/manifests/latest?ns=docker.io",
        w.berth.url()
    );
    let r = get(&tag_url, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), v1.manifest_digest);
    assert_eq!(header(&r, "oci-namespace"), "docker.io");
    assert_eq!(r.bytes().await.unwrap().as_ref(), v1.manifest.as_slice());
    assert_eq!(w.front.count("GET", "/manifests/latest"), 1);

    w.front.clear();
    let by_digest = format!(
        "{}/v2/library/app/manifests/{}",
        w.berth.url(),
        v1.manifest_digest
    );
    for _ in 0..3 {
        assert_eq!(get(&by_digest, false).await.status(), 200);
        assert_eq!(get(&by_digest, true).await.status(), 200);
        assert_eq!(get(&tag_url, false).await.status(), 200);
    }
    assert!(
        w.front.content_requests().is_empty(),
        "{:?}",
        w.front.content_requests()
    );

    // Once the TTL has run out, a HEAD of the tag revalidates it with one upstream HEAD
    // (repeated until it does: every HEAD before that is answered from the store).
    let answers = until_upstream_asked(&w.front, "HEAD", "/manifests/latest", || async {
        let r = get(&tag_url, true).await;
        (
            r.status(),
            header(&r, "docker-content-digest"),
            header(&r, "content-length"),
        )
    })
    .await;
    for (status, digest, length) in answers {
        assert_eq!(status, 200);
        assert_eq!(digest, v1.manifest_digest);
        assert_eq!(length, v1.manifest.len().to_string());
    }
    assert_eq!(w.front.count("HEAD", "/manifests/latest"), 1);
    assert_eq!(
        w.front.count("GET", "/manifests/"),
        0,
        "{:?}",
        w.front.content_requests()
    );

    // The tag moves upstream.
    let v2 = w.push_image("library/app", "latest", &[80 * KIB], 11).await;
    w.front.clear();
    // Within the TTL the old digest is still served; the first GET after it sees the move.
    let mut answers = until_upstream_asked(&w.front, "HEAD", "/manifests/latest", || async {
        let r = get(&tag_url, false).await;
        let digest = header(&r, "docker-content-digest");
        (digest, r.bytes().await.unwrap())
    })
    .await;
    let (digest, body) = answers.pop().unwrap();
    for (held, _) in answers {
        assert_eq!(held, v1.manifest_digest, "served within the TTL");
    }
    assert_eq!(digest, v2.manifest_digest);
    assert_eq!(body.as_ref(), v2.manifest.as_slice());
    assert_eq!(w.front.count("HEAD", "/manifests/latest"), 1);
    assert_eq!(w.front.count("GET", "/manifests/latest"), 1);
    // The old digest is still served, from the store.
    assert_eq!(get(&by_digest, false).await.status(), 200);
    assert_eq!(w.front.content_requests().len(), 2);
}

/// Issue 2, tests 4 and 7: upstream down → cached images still pull (stale tags carry a
/// Warning), uncached ones get 503 JSON naming the upstream; the same after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_serves_cache_and_survives_restart() {
    let mut w = World::start("1s").await;
    let img = w
        .push_image("library/app", "v1", &[128 * KIB, 32 * KIB], 20)
        .await;
    w.push_image("library/other", "v1", &[16 * KIB], 21).await;
    let base = w.berth.url();
    let pull_all = |img: &crate::support::image::BuiltImage| {
        let mut urls = vec![format!("{base}/v2/library/app/manifests/v1")];
        urls.push(format!("{base}/v2/library/app/blobs/{}", img.config_digest));
        for (d, _) in &img.layers {
            urls.push(format!("{base}/v2/library/app/blobs/{d}"));
        }
        urls
    };
    for url in pull_all(&img) {
        let r = get(&url, false).await;
        assert_eq!(r.status(), 200, "{url}");
        r.bytes().await.unwrap();
    }
    w.registry.stop();
    // Until the 1 s TTL runs out the tag is fresh; the first answer after it, stale.
    let manifest = format!("{base}/v2/library/app/manifests/v1");
    let answers = until_upstream_asked(&w.front, "HEAD", "/library/app/manifests/v1", || async {
        let r = get(&manifest, false).await;
        (r.status(), header(&r, "warning"))
    })
    .await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    let (_, warning) = answers.last().unwrap();
    assert!(
        warning.starts_with("299 - \"berth:"),
        "warning: {warning:?}"
    );
    for round in 0..2 {
        for url in pull_all(&img) {
            let r = get(&url, false).await;
            assert_eq!(
                r.status(),
                200,
                "round {round} {url}: {}",
                r.text().await.unwrap_or_default()
            );
            if url.contains("/manifests/v1") {
                let warning = header(&r, "warning");
                assert!(
                    warning.starts_with("299 - \"berth:"),
                    "warning: {warning:?}"
                );
                assert!(warning.contains("docker.io"), "{warning}");
            }
            let body = r.bytes().await.unwrap();
            if let Some(d) = url.rsplit('/').next().filter(|d| d.starts_with("sha256:")) {
                assert_eq!(sha256_digest(&body), d);
            }
        }
        let r = get(&format!("{base}/v2/library/other/manifests/v1"), false).await;
        let (status, code, message) = error_code(r).await;
        assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"));
        assert!(message.contains("docker.io"), "{message}");
        if round == 0 {
            w.berth.restart().await;
        }
    }
    assert!(
        w.berth
            .metric("berth_requests_total{kind=\"manifest\",outcome=\"stale\"}")
            .await
            >= 1.0
    );
}
