//! Issue 11: the negative cache. A tag the upstream says it does not have (404) is
//! remembered for the upstream's `negative_ttl`, answered from memory meanwhile, and asked
//! again after it; a refusal (401/403) is never remembered as "no such tag".

use std::time::Duration;

use crate::common::*;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Front;
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::token::{TokenIssuer, TokenPolicy};
use crate::support::wait_until;

/// The sum of every `berth_upstream_requests_total` sample for `upstream` and `kind`
/// (whatever the method and status).
async fn upstream_requests(berth: &Berth, upstream: &str, kind: &str) -> f64 {
    let labels = [
        format!("upstream=\"{upstream}\""),
        format!("kind=\"{kind}\""),
    ];
    berth
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("berth_upstream_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want.as_str())))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

async fn negative_hits(berth: &Berth, upstream: &str) -> f64 {
    berth
        .metric(&format!(
            "berth_negative_cache_hits_total{{upstream=\"{upstream}\"}}"
        ))
        .await
}

/// A typo asked 100 times (a herd, then one by one, GET and HEAD) costs one upstream
/// request; an upstream with a short `negative_ttl` sees a push after it, while one with
/// a long TTL still answers from memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_typo_tag_costs_one_upstream_request_and_a_push_is_seen_after_the_ttl() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    // Two names for the same registry, one remembering for 10 minutes, one for 1 s.
    let berth = Berth::start(&[
        UpstreamSpec::docker_hub(&front.url()).extra("negative_ttl = \"10m\""),
        UpstreamSpec::named("short.registry.test", &front.url()).extra("negative_ttl = \"1s\""),
    ])
    .await;
    push_single(&registry, dir.path(), "library/app", "v1", &[64 * KIB], 70).await;
    let base = berth.url();

    // 50 nodes at once: one flight, one upstream request.
    let typo = format!("{base}/v2/library/app/manifests/v1-typo?ns=docker.io");
    let herd: Vec<_> = (0..50)
        .map(|_| {
            let url = typo.clone();
            tokio::spawn(async move { error_code(get(&url, false).await).await })
        })
        .collect();
    for answer in herd {
        let (status, code, _) = answer.await.unwrap();
        assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    }
    assert_eq!(
        front.count("GET", "/manifests/v1-typo"),
        1,
        "{:?}",
        front.seen()
    );
    // Then 50 more, one by one, GET and HEAD: answered from memory, counted.
    let hits_before = negative_hits(&berth, "docker.io").await;
    for i in 0..50 {
        let head = i % 2 == 1;
        let resp = get(&typo, head).await;
        assert_eq!(resp.status(), 404);
        if head {
            assert!(resp.bytes().await.unwrap().is_empty());
        } else {
            let (_, code, message) = error_code(resp).await;
            assert_eq!(code, "MANIFEST_UNKNOWN");
            assert!(message.contains("negative_ttl"), "{message}");
        }
    }
    let manifest_requests = front
        .seen()
        .iter()
        .filter(|s| s.path.contains("/manifests/v1-typo"))
        .count();
    assert_eq!(manifest_requests, 1, "{:?}", front.seen());
    assert_eq!(negative_hits(&berth, "docker.io").await - hits_before, 50.0);

    // A repository the upstream does not have (NAME_UNKNOWN) is remembered the same way.
    let nowhere = format!("{base}/v2/library/nowhere/manifests/v1?ns=docker.io");
    for _ in 0..3 {
        assert_eq!(get(&nowhere, false).await.status(), 404);
    }
    assert_eq!(front.count("GET", "/library/nowhere/manifests/"), 1);

    // A tag asked before it exists, through both names.
    let later = |ns: &str| format!("{base}/v2/library/app/manifests/v2?ns={ns}");
    for ns in ["docker.io", "short.registry.test"] {
        assert_eq!(get(&later(ns), false).await.status(), 404, "{ns}");
    }
    let img = push_single(&registry, dir.path(), "library/app", "v2", &[64 * KIB], 71).await;
    // The short TTL runs out and the next request finds the tag.
    let seen = wait_until(Duration::from_secs(20), || {
        let url = later("short.registry.test");
        async move { get(&url, false).await.status() == 200 }
    })
    .await;
    assert!(
        seen,
        "the pushed tag was never served; log:\n{}",
        berth.log()
    );
    let resp = get(&later("short.registry.test"), false).await;
    assert_eq!(header(&resp, "docker-content-digest"), img.manifest_digest);
    // The long TTL still answers from memory, without asking.
    let asked = front.count("GET", "/library/app/manifests/v2");
    assert_eq!(get(&later("docker.io"), false).await.status(), 404);
    assert_eq!(front.count("GET", "/library/app/manifests/v2"), asked);
    // Until an operator forgets the tag: then the push is seen at once.
    let del = berth
        .admin_request(
            reqwest::Method::DELETE,
            "/admin/tags/docker.io/library/app:v2",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let resp = get(&later("docker.io"), false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest"), img.manifest_digest);
}

/// An upstream that refuses berth (401, as Docker Hub answers for a private or missing
/// repository) is asked again every time: a refusal is not "no such tag".
#[tokio::test(flavor = "multi_thread")]
async fn an_unauthorized_answer_is_never_remembered() {
    let issuer = TokenIssuer::start(TokenPolicy::default().anonymous_pull("public/")).await;
    let registry = Registry::start(RegistryOptions::default().with_token_auth(&issuer)).await;
    // The token issuer listens on another loopback port: listed, or berth will not
    // follow its realm.
    let berth = Berth::start(&[UpstreamSpec::named("anon.registry.test", &registry.url())
        .extra("redirect_allow = [\"127.0.0.1\"]")
        .extra("negative_ttl = \"10m\"")])
    .await;
    let url = format!(
        "{}/v2/private/app/manifests/v1?ns=anon.registry.test",
        berth.url()
    );
    let mut asked = Vec::new();
    for _ in 0..2 {
        let (status, code, _) = error_code(get(&url, false).await).await;
        assert_eq!((status, code.as_str()), (403, "DENIED"));
        asked.push(upstream_requests(&berth, "anon.registry.test", "manifest").await);
    }
    assert!(asked[0] >= 1.0, "{asked:?}");
    assert!(
        asked[1] > asked[0],
        "the second request was answered without asking: {asked:?}"
    );
    assert_eq!(negative_hits(&berth, "anon.registry.test").await, 0.0);
    // The same upstream's 404 for a repository it lets berth read is remembered.
    let public = format!(
        "{}/v2/public/app/manifests/v1?ns=anon.registry.test",
        berth.url()
    );
    for _ in 0..3 {
        assert_eq!(get(&public, false).await.status(), 404);
    }
    assert_eq!(negative_hits(&berth, "anon.registry.test").await, 2.0);
}
