//! Issue 4: the upstream's pull quota, against an emulation of Docker Hub's rate limiting
//! in front of the real registry.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::support::hub::{Hub, HubRules};
use crate::support::wait_until;
use crate::support::JsonAnswer as _;

const HOUR: Duration = Duration::from_secs(3600);

async fn hub_world(
    rules: HubRules,
    ttl: &str,
    upstream_extra: &str,
    top: &str,
) -> (World, Arc<Hub>) {
    let w = World::start_with(ttl, upstream_extra, top).await;
    let hub = w.front.enable_hub(rules);
    (w, hub)
}

/// A containerd-style pull over HTTP: resolve the tag with HEAD, GET the manifest by
/// digest, follow an index to every platform, then GET configs and layers.
async fn pull(base: &str, repo: &str, tag: &str) -> Result<String, (u16, String)> {
    let head = get(
        &format!("{base}/v2/{repo}/manifests/{tag}?ns=docker.io"),
        true,
    )
    .await;
    if head.status() != 200 {
        let status = head.status().as_u16();
        let resp = get(
            &format!("{base}/v2/{repo}/manifests/{tag}?ns=docker.io"),
            false,
        )
        .await;
        return Err((status, error_code(resp).await.1));
    }
    let digest = header(&head, "docker-content-digest");
    let mut manifests = vec![digest.clone()];
    while let Some(d) = manifests.pop() {
        let m = get(
            &format!("{base}/v2/{repo}/manifests/{d}?ns=docker.io"),
            false,
        )
        .await;
        assert_eq!(m.status(), 200, "{repo}@{d}");
        let v: serde_json::Value = m.json().await.unwrap();
        for child in v["manifests"].as_array().into_iter().flatten() {
            manifests.push(child["digest"].as_str().unwrap().to_owned());
        }
        let blobs = v["config"]["digest"].as_str().into_iter().chain(
            v["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["digest"].as_str()),
        );
        for b in blobs {
            let r = get(&format!("{base}/v2/{repo}/blobs/{b}?ns=docker.io"), false).await;
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    }
    Ok(digest)
}

/// The quota metrics berth exports equal what the emulator's headers said last.
async fn assert_metrics_match(w: &World, hub: &Hub, limit: u32, tokens_too: bool) {
    let remaining = hub.remaining("anonymous") as f64;
    let l = "{upstream=\"docker.io\"}";
    assert_eq!(
        w.berth
            .metric(&format!("berth_upstream_ratelimit_limit{l}"))
            .await,
        f64::from(limit)
    );
    assert_eq!(
        w.berth
            .metric(&format!("berth_upstream_ratelimit_remaining{l}"))
            .await,
        remaining
    );
    if tokens_too {
        assert_eq!(
            w.berth.metric(&format!("berth_quota_tokens{l}")).await,
            remaining
        );
    }
}

/// Tests 1 and 5: a rollout of 60 pulls costs one counted GET for a single-arch image and
/// three for a two-platform index; the metrics follow the emulator's headers.
#[tokio::test(flavor = "multi_thread")]
async fn rollout_costs_one_counted_get_per_manifest() {
    let (w, hub) = hub_world(HubRules::new(100, HOUR), "10m", "", "").await;
    w.push_image("library/app", "v1", &[200 * KIB, 100 * KIB], 80)
        .await;
    w.push_index("library/multi", "v1", 81).await;
    for (repo, expected) in [("library/app", 1), ("library/multi", 1 + 3)] {
        let base = w.berth.url();
        let tasks: Vec<_> = (0..60)
            .map(|_| {
                let base = base.clone();
                tokio::spawn(async move { pull(&base, repo, "v1").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().expect("pull");
        }
        assert_eq!(
            hub.counted(),
            expected,
            "{repo}: {:?}",
            w.front.content_requests()
        );
        assert_metrics_match(&w, &hub, 100, true).await;
    }
    assert_eq!(
        w.berth
            .metric("berth_quota_counted_requests_total{upstream=\"docker.io\"}")
            .await,
        4.0
    );
    assert_eq!(hub.refused(), 0);
}

/// Test 2: 500 pulls over 5 tags with a short TTL while two tags move: counted GETs equal
/// the distinct digests fetched, not the pulls.
#[tokio::test(flavor = "multi_thread")]
async fn a_day_in_the_life_counts_digests_not_pulls() {
    let (w, hub) = hub_world(HubRules::new(100, HOUR), "1s", "", "").await;
    for i in 0..5u64 {
        w.push_image("library/day", &format!("t{i}"), &[KIB], 90 + i)
            .await;
    }
    let seen = std::cell::RefCell::new(HashSet::new());
    let rounds = std::cell::Cell::new(0u32);
    let base = w.berth.url();
    // One round: the 5 tags pulled at once.
    let round = || {
        let seen = &seen;
        let rounds = &rounds;
        let base = base.clone();
        async move {
            let tasks: Vec<_> = (0..5)
                .map(|i| {
                    let url = format!("{base}/v2/library/day/manifests/t{i}?ns=docker.io");
                    tokio::spawn(async move {
                        let r = get(&url, false).await;
                        assert_eq!(r.status(), 200);
                        header(&r, "docker-content-digest")
                    })
                })
                .collect();
            for t in tasks {
                let digest = t.await.unwrap();
                seen.borrow_mut().insert(digest);
            }
            rounds.set(rounds.get() + 1);
        }
    };
    // Rounds (every 20 ms, wait_until's poll) until the 1 s TTL has run out once (each
    // tag revalidated with a HEAD), and at least 40; then two tags move, and the rounds go
    // on until both moves are seen, 100 at least: 500 pulls or more, over several TTLs.
    let revalidated = wait_until(Duration::from_secs(20), || async {
        round().await;
        rounds.get() >= 40 && w.front.count("HEAD", "/library/day/manifests/") >= 5
    })
    .await;
    assert!(revalidated, "the tags were never revalidated");
    w.push_image("library/day", "t1", &[KIB], 191).await;
    w.push_image("library/day", "t2", &[KIB], 192).await;
    let moves_seen = wait_until(Duration::from_secs(20), || async {
        round().await;
        rounds.get() >= 100 && seen.borrow().len() >= 7
    })
    .await;
    let seen = seen.into_inner();
    assert!(moves_seen, "after {} rounds: {seen:?}", rounds.get());
    assert_eq!(seen.len(), 7, "5 tags + 2 moves");
    assert_eq!(
        hub.counted() as usize,
        seen.len(),
        "{:?}",
        w.front.content_requests().len()
    );
    assert!(
        w.front.count("HEAD", "/manifests/") > 5,
        "stale tags were revalidated with HEAD"
    );
    assert_metrics_match(&w, &hub, 100, true).await;
}

/// Test 3: the emulator's limit is reached. Cached images still pull with containerd; an
/// uncached one gets 429 with Retry-After (and berth stops asking); after the window it
/// pulls.
#[tokio::test(flavor = "multi_thread")]
async fn limit_reached_cached_images_still_pull() {
    let window = Duration::from_secs(8);
    let (w, hub) = hub_world(HubRules::new(3, window), "1s", "", "").await;
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        w.push_image(
            &format!("library/{name}"),
            "v1",
            &[64 * KIB],
            100 + i as u64,
        )
        .await;
    }
    let ctrd = crate::support::containerd::Containerd::start().await;
    let hosts = ctrd.write_hosts("docker.io", &w.berth.url());
    for name in ["a", "b", "c"] {
        let out = ctrd
            .pull(&hosts, &format!("docker.io/library/{name}:v1"))
            .await;
        assert!(out.status.success(), "{name}: {}", out.stderr);
    }
    assert_eq!((hub.counted(), hub.remaining("anonymous")), (3, 0));
    assert_metrics_match(&w, &hub, 3, true).await;

    // Uncached: 429 with Retry-After, naming the upstream. The headers already told berth
    // that nothing is left, so it does not even ask (the emulator refuses nothing).
    for _ in 0..3 {
        let r = get(
            &format!("{}/v2/library/d/manifests/v1", w.berth.url()),
            false,
        )
        .await;
        let retry_after: u64 = header(&r, "retry-after").parse().expect("Retry-After");
        assert!(
            retry_after >= 1 && retry_after <= window.as_secs(),
            "{retry_after}"
        );
        let (status, code, message) = error_code(r).await;
        assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS"));
        assert!(message.contains("docker.io"), "{message}");
    }
    assert_eq!(hub.refused(), 0);

    // Cached images still pull, their tags stale (revalidated with free HEADs): each is
    // pulled again until its 1 s TTL has run out and berth sent that HEAD.
    for name in ["a", "b", "c"] {
        let image = format!("docker.io/library/{name}:v1");
        let part = format!("/library/{name}/manifests/v1");
        let pulls = until_upstream_asked(&w.front, "HEAD", &part, || async {
            ctrd.ctr(&["images", "rm", &image]).await;
            ctrd.pull(&hosts, &image).await
        })
        .await;
        for out in pulls {
            assert!(
                out.status.success(),
                "{name} during the limit: {}",
                out.stderr
            );
        }
    }
    assert_eq!(hub.counted(), 3);

    // After the window, the uncached image pulls: once the emulator's window has reset
    // and berth's bucket (refilling 3 per 8 s since the last headers said 0) has a token.
    let tokens = "berth_quota_tokens{upstream=\"docker.io\"}";
    let reset = wait_until(Duration::from_secs(30), || async {
        hub.remaining("anonymous") > 0 && w.berth.metric(tokens).await >= 1.0
    })
    .await;
    assert!(
        reset,
        "no token after the window: emulator {}, berth {}",
        hub.remaining("anonymous"),
        w.berth.metric(tokens).await
    );
    let out = ctrd.pull(&hosts, "docker.io/library/d:v1").await;
    assert!(
        out.status.success(),
        "d after the window: {}\n{}",
        out.stderr,
        w.berth.log()
    );
    assert_eq!(hub.counted(), 4);
}

/// Test 4: with berth's bucket below the emulator's limit, the emulator never says 429;
/// berth refuses the excess itself and says why.
#[tokio::test(flavor = "multi_thread")]
async fn berths_bucket_keeps_the_upstream_from_saying_429() {
    let (w, hub) = hub_world(
        HubRules::new(10, HOUR),
        "10m",
        "quota = { requests = 5, per = \"1h\", reserve = 0.0 }",
        "",
    )
    .await;
    for i in 0..8u64 {
        w.push_image(&format!("library/img{i}"), "v1", &[KIB], 110 + i)
            .await;
    }
    let mut ok = 0;
    for i in 0..8 {
        match pull(&w.berth.url(), &format!("library/img{i}"), "v1").await {
            Ok(_) => ok += 1,
            Err((status, code)) => assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS")),
        }
        // The cap (5) is below the emulator's limit: tokens follow berth's count.
        assert_metrics_match(&w, &hub, 10, false).await;
    }
    assert_eq!(ok, 5);
    assert_eq!((hub.counted(), hub.refused()), (5, 0));
    assert_eq!(
        w.berth
            .metric("berth_quota_tokens{upstream=\"docker.io\"}")
            .await,
        0.0
    );
    // Each refused pull asked twice: the HEAD that resolves, the GET that reads the error.
    assert_eq!(
        w.berth
            .metric("berth_quota_refusals_total{upstream=\"docker.io\",reason=\"empty\"}")
            .await,
        6.0
    );
    let r = get(
        &format!("{}/v2/library/img7/manifests/v1", w.berth.url()),
        false,
    )
    .await;
    assert!(header(&r, "retry-after").parse::<u64>().is_ok());
    let (_, _, message) = error_code(r).await;
    assert!(
        message.contains("quota") && message.contains("docker.io"),
        "{message}"
    );
}

/// The reserve: near the bottom of the bucket, a moved tag of a cached image is served
/// stale and the last tokens go to an image berth has never seen.
#[tokio::test(flavor = "multi_thread")]
async fn the_reserve_is_kept_for_new_images() {
    let (w, hub) = hub_world(
        HubRules::new(100, HOUR),
        "1s",
        "quota = { requests = 5, per = \"1h\", reserve = 0.4 }",
        "",
    )
    .await;
    let old = w.push_image("library/app", "v1", &[KIB], 120).await;
    for i in 0..3u64 {
        w.push_image(&format!("library/new{i}"), "v1", &[KIB], 121 + i)
            .await;
    }
    let base = w.berth.url();
    pull(&base, "library/app", "v1").await.unwrap();
    pull(&base, "library/new0", "v1").await.unwrap();
    pull(&base, "library/new1", "v1").await.unwrap(); // 2 tokens left: the reserve
    w.push_image("library/app", "v1", &[KIB], 130).await; // the tag moves
                                                          // Asked for until the 1 s TTL has run out and berth saw the move (a free HEAD); within
                                                          // the TTL, the old digest is served fresh.
    let tag = format!("{base}/v2/library/app/manifests/v1");
    let answers = until_upstream_asked(&w.front, "HEAD", "/library/app/manifests/v1", || async {
        let r = get(&tag, false).await;
        assert_eq!(r.status(), 200);
        (header(&r, "docker-content-digest"), r.headers().clone())
    })
    .await;
    for (digest, _) in &answers {
        assert_eq!(*digest, old.manifest_digest, "served stale");
    }
    let (_, headers) = answers.last().unwrap();
    let warning = headers
        .get("warning")
        .map(|v| v.to_str().unwrap_or(""))
        .unwrap_or_default();
    assert!(warning.contains("quota"), "{headers:?}");
    assert_eq!(
        w.berth
            .metric("berth_quota_stale_answers_total{upstream=\"docker.io\"}")
            .await,
        1.0
    );
    pull(&base, "library/new2", "v1")
        .await
        .expect("a new image still gets a token");
    assert_eq!(hub.counted(), 4);
}

/// Per-client budgets: one client's budget does not stop another.
#[tokio::test(flavor = "multi_thread")]
async fn client_budgets_stop_one_noisy_client() {
    let (w, hub) = hub_world(
        HubRules::new(100, HOUR),
        "10m",
        "",
        "[client_budgets]\nkey = \"header:x-team\"\nrequests = 2\nper = \"1h\"\n",
    )
    .await;
    for i in 0..4u64 {
        w.push_image(&format!("library/ci{i}"), "v1", &[KIB], 140 + i)
            .await;
    }
    let as_team = |team: &'static str, i: u64| {
        let url = format!("{}/v2/library/ci{i}/manifests/v1", w.berth.url());
        async move {
            crate::support::http()
                .get(url)
                .header("x-team", team)
                .header("accept", ACCEPT_ALL)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(as_team("ci", 0).await.status(), 200);
    assert_eq!(as_team("ci", 1).await.status(), 200);
    let r = as_team("ci", 2).await;
    let (status, _, message) = error_code(r).await;
    assert_eq!(status, 429);
    assert!(message.contains("client"), "{message}");
    // A cached image costs nothing and is still served to the spent client.
    assert_eq!(as_team("ci", 0).await.status(), 200);
    // Another team still pulls new images.
    assert_eq!(as_team("web", 3).await.status(), 200);
    assert_eq!(hub.counted(), 3);
}

/// An upstream 429 berth did not see coming (another client spent the quota): berth
/// answers 429 with Retry-After, stops sending counted requests until it passes, logs it
/// once, and keeps serving what it has.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_429_starts_a_cooldown() {
    let (w, hub) = hub_world(HubRules::new(2, Duration::from_secs(30)), "1s", "", "").await;
    w.push_image("library/a", "v1", &[KIB], 150).await;
    w.push_image("library/b", "v1", &[KIB], 151).await;
    let base = w.berth.url();
    pull(&base, "library/a", "v1").await.unwrap();
    // Someone else spends the last pull straight at the upstream.
    let client = crate::support::http();
    let token: serde_json::Value = client
        .get(format!(
            "{}/token?service=registry.docker.io",
            w.front.url()
        ))
        .json_answer()
        .await;
    let direct = client
        .get(format!("{}/v2/library/a/manifests/v1", w.front.url()))
        .bearer_auth(token["token"].as_str().unwrap())
        .header("accept", ACCEPT_ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    assert_eq!(hub.remaining("anonymous"), 0);

    for _ in 0..3 {
        let r = get(&format!("{base}/v2/library/b/manifests/v1"), false).await;
        let after: u64 = header(&r, "retry-after").parse().expect("Retry-After");
        assert!((1..=30).contains(&after), "{after}");
        assert_eq!(error_code(r).await.1, "TOOMANYREQUESTS");
    }
    assert_eq!(hub.refused(), 1, "berth asked once, then held back");
    assert_eq!(
        w.berth.log().matches("upstream answered 429").count(),
        1,
        "logged once"
    );
    // The cached image is still served (its stale tag revalidated with a free HEAD):
    // pulled until its 1 s TTL has run out and berth sent that HEAD.
    let pulls = until_upstream_asked(&w.front, "HEAD", "/library/a/manifests/v1", || {
        pull(&base, "library/a", "v1")
    })
    .await;
    for p in pulls {
        p.expect("cached image during the cooldown");
    }
    assert_eq!(
        w.berth
            .metric("berth_quota_refusals_total{upstream=\"docker.io\",reason=\"cooldown\"}")
            .await,
        2.0
    );
}
