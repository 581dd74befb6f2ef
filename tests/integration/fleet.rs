//! Issue 10: a fleet of replicas on one Garage bucket, every miss fetched once.

use std::time::Duration;

use crate::common::*;
use crate::support::berth::UpstreamSpec;
use crate::support::fleet::Fleet;
use crate::support::front::{Faults, Front};
use crate::support::garage::Garage;
use crate::support::image::{build_image, push, BuiltImage, ImageSpec, Platform, LAYOUT_REF};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::{http, wait_until};

const PREFIX: &str = "fleet/";

/// The real registry behind the counting front, Garage, and three replicas.
struct FleetWorld {
    registry: Registry,
    front: Front,
    garage: Garage,
    fleet: Fleet,
    dir: tempfile::TempDir,
}

impl FleetWorld {
    async fn start(shared_extra: &str, upstream_extra: &str) -> FleetWorld {
        Self::start_with(shared_extra, upstream_extra, "").await
    }

    /// With extra top-level TOML for every replica (e.g. `[client_budgets]`).
    async fn start_with(shared_extra: &str, upstream_extra: &str, top: &str) -> FleetWorld {
        let registry = Registry::start(RegistryOptions::default()).await;
        let front = Front::start(&registry.url()).await;
        let garage = Garage::start().await;
        let shared = format!("{}{shared_extra}\n", garage.shared_toml(PREFIX));
        let upstream = UpstreamSpec::docker_hub(&front.url()).extra(upstream_extra);
        let fleet = Fleet::start(3, &upstream, &shared, top).await;
        FleetWorld {
            registry,
            front,
            garage,
            fleet,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn url(&self, i: usize) -> String {
        self.fleet.replicas[i].url()
    }

    async fn push_image(&self, repo: &str, tag: &str, layers: &[usize], seed: u64) -> BuiltImage {
        push_single(&self.registry, self.dir.path(), repo, tag, layers, seed).await
    }

    /// Waits (bounded) until the bucket holds every one of `digests`.
    async fn wait_in_bucket(&self, digests: &[String]) {
        if in_bucket_soon(&self.garage, digests).await {
            return;
        }
        let logs: Vec<String> = self
            .fleet
            .replicas
            .iter()
            .map(|r| {
                r.log()
                    .lines()
                    .filter(|l| l.contains("shared"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        panic!("the bucket never held all of {digests:?}; replicas said:\n{logs:#?}");
    }

    async fn in_bucket(&self, digest: &str) -> bool {
        self.garage
            .object_keys(&format!("{PREFIX}blobs/"))
            .await
            .iter()
            .any(|k| k.ends_with(&digest[7..]))
    }
}

/// Whether the bucket holds every one of `digests` within 30 s.
async fn in_bucket_soon(garage: &Garage, digests: &[String]) -> bool {
    wait_until(Duration::from_secs(30), || async {
        let keys = garage.object_keys(&format!("{PREFIX}blobs/")).await;
        digests
            .iter()
            .all(|d| keys.iter().any(|k| k.ends_with(&d[7..])))
    })
    .await
}

/// A containerd-style pull: HEAD the tag, GET the manifest by digest, GET config and
/// layers, each body hashed. Returns the manifest digest, or what went wrong.
async fn pull(base: &str, repo: &str, tag: &str) -> Result<String, String> {
    let url = |rest: &str| format!("{base}/v2/{repo}/{rest}?ns=docker.io");
    let client = http();
    let head = client
        .head(url(&format!("manifests/{tag}")))
        .header("accept", ACCEPT_ALL)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if head.status() != 200 {
        return Err(format!("HEAD {tag}: {}", head.status()));
    }
    let digest = header(&head, "docker-content-digest");
    let m = client
        .get(url(&format!("manifests/{digest}")))
        .header("accept", ACCEPT_ALL)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if m.status() != 200 {
        return Err(format!("GET manifest: {}", m.status()));
    }
    let v: serde_json::Value = m.json().await.map_err(|e| e.to_string())?;
    let blobs: Vec<String> = v["config"]["digest"]
        .as_str()
        .into_iter()
        .chain(
            v["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["digest"].as_str()),
        )
        .map(str::to_owned)
        .collect();
    for b in blobs {
        let got = fetch_digest(&client, &url(&format!("blobs/{b}"))).await?;
        if got != b {
            return Err(format!("blob {b} hashed to {got}"));
        }
    }
    Ok(digest)
}

async fn fetch_digest(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    hash_body(resp).await
}

fn blob_digests(img: &BuiltImage) -> Vec<String> {
    img.layers
        .iter()
        .map(|(d, _)| d.clone())
        .chain(std::iter::once(img.config_digest.clone()))
        .collect()
}

/// Test 1: what replica A fetched, B and C serve with no upstream request at all, fresh
/// tags included: the bytes and the tag record come from the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_through_one_replica_serves_the_others() {
    let w = FleetWorld::start("", "").await;
    // 20 MiB goes up in parts (multipart), the rest in one PUT each.
    let img = w
        .push_image("library/app", "v1", &[20 * MIB, 300 * KIB], 11)
        .await;
    let digest = pull(&w.url(0), "library/app", "v1")
        .await
        .expect("pull via A");
    assert_eq!(digest, img.manifest_digest);
    w.wait_in_bucket(&blob_digests(&img)).await;
    assert_eq!(
        w.front.count("GET", "/manifests/"),
        1,
        "{:?}",
        w.front.seen()
    );
    w.front.clear();
    for i in [1, 2] {
        let d = pull(&w.url(i), "library/app", "v1")
            .await
            .unwrap_or_else(|e| panic!("pull via replica {i}: {e}"));
        assert_eq!(d, img.manifest_digest);
    }
    assert!(
        w.front.content_requests().is_empty(),
        "B and C asked the upstream: {:?}",
        w.front.content_requests()
    );
    // Each of B and C holds on its own disk what it fetched as an owner during A's pull;
    // every other blob it read from the bucket (not from a peer, not from upstream).
    for i in [1, 2] {
        let not_owned = blob_digests(&img)
            .iter()
            .filter(|d| w.fleet.owner_of(d) != i)
            .count();
        let from_bucket = w.fleet.replicas[i]
            .metric("berth_shared_requests_total{op=\"get\",result=\"ok\"}")
            .await;
        assert!(
            from_bucket >= not_owned as f64,
            "replica {i} read {from_bucket} objects from the bucket, expected {not_owned} blobs"
        );
    }
    // No multipart upload is left open once the fills are in.
    assert!(w.garage.multipart_uploads().await.is_empty());
    // The fleet's and the bucket's metrics lint clean.
    for r in &w.fleet.replicas {
        let path = w.dir.path().join("metrics.txt");
        std::fs::write(&path, r.metrics().await).expect("metrics file");
        let mut cmd = std::process::Command::new(crate::support::require_tool("bash"));
        cmd.arg("-c").arg(format!(
            "{} check metrics < {}",
            crate::support::require_tool("promtool").display(),
            path.display()
        ));
        let out = crate::support::run_with_timeout_async(cmd, Duration::from_secs(30)).await;
        assert!(
            out.status.success() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
            "promtool: {}{}",
            out.stdout,
            out.stderr
        );
    }
    // An outside client cannot pass for a replica.
    let forged = http()
        .get(format!(
            "{}/v2/library/app/manifests/v1?ns=docker.io",
            w.url(0)
        ))
        .header(
            "x-berth-fleet",
            format!("v1 {} {}", now_unix(), "ab".repeat(32)),
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(forged.status(), 401);
    assert_eq!(
        w.fleet.replicas[0]
            .metric("berth_fleet_refused_total")
            .await,
        1.0
    );
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Test 2: 90 concurrent cold pulls spread over three replicas: one upstream GET per
/// blob, one manifest GET, every body right.
#[tokio::test(flavor = "multi_thread")]
async fn ninety_pulls_over_three_replicas_fetch_once() {
    let w = FleetWorld::start("", "").await;
    let img = w
        .push_image("library/herd", "v1", &[32 * MIB, MIB], 12)
        .await;
    // 32 MiB/s per connection: the big layer takes a second, so the herd meets the fill.
    w.front.set_faults(Faults {
        throttle: Some(32 * MIB as u64),
        ..Faults::default()
    });
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let base = w.url(i % 3);
            tokio::spawn(async move { pull(&base, "library/herd", "v1").await })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.expect("client").as_deref(),
            Ok(img.manifest_digest.as_str())
        );
    }
    for d in blob_digests(&img) {
        assert_eq!(
            w.front.count("GET", &d),
            1,
            "blob {d}: {:?}",
            w.front.content_requests()
        );
    }
    assert_eq!(
        w.front.count("GET", "/manifests/"),
        1,
        "{:?}",
        w.front.content_requests()
    );
    let forwarded = w.fleet.metric_sum("berth_fleet_received_total").await;
    assert!(forwarded >= 2.0, "replicas asked owners {forwarded} times");
    // The herd reads tag records from the bucket per flight, not per client (90 pulls
    // used to cost 90 reads of the record).
    let mut gets = 0.0;
    for result in ["ok", "missing"] {
        gets += w
            .fleet
            .metric_sum(&format!(
                "berth_shared_requests_total{{op=\"get\",result=\"{result}\"}}"
            ))
            .await;
    }
    assert!(gets <= 6.0, "90 pulls read the bucket {gets} times");
    // Every owner answered: none was taken for dead while it filled.
    for kind in ["blob", "manifest"] {
        let down = w
            .fleet
            .metric_sum(&format!(
                "berth_fleet_forwarded_total{{kind=\"{kind}\",result=\"down\"}}"
            ))
            .await;
        assert_eq!(down, 0.0, "{kind} owners marked down");
    }
}

/// Test 3: the owner is killed mid-fill: the other replicas' clients see aborted streams
/// (never a short body that looks whole), nothing lands in the bucket under the digest,
/// the retry succeeds, and `berth gc` leaves no multipart upload behind.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_owner_mid_fill_aborts_then_the_retry_succeeds() {
    let mut w = FleetWorld::start("", "").await;
    let img = w.push_image("library/big", "v1", &[128 * MIB], 13).await;
    let (layer, _) = img.layers[0].clone();
    let owner = w.fleet.owner_of(&layer);
    let askers: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    // 16 MiB/s: eight seconds of fill, plenty of time to kill the owner in the middle.
    w.front.set_faults(Faults {
        throttle: Some(16 * MIB as u64),
        ..Faults::default()
    });
    // The clients' repository must know the blob: fetch the manifest first.
    for &i in &askers {
        let m = get(
            &format!("{}/v2/library/big/manifests/v1?ns=docker.io", w.url(i)),
            false,
        )
        .await;
        assert_eq!(m.status(), 200);
    }
    let tasks: Vec<_> = askers
        .iter()
        .flat_map(|&i| std::iter::repeat_n(i, 5))
        .map(|i| {
            let url = format!("{}/v2/library/big/blobs/{layer}?ns=docker.io", w.url(i));
            tokio::spawn(async move { fetch_digest(&http(), &url).await })
        })
        .collect();
    let moved = wait_until(Duration::from_secs(12), || async {
        w.front.bytes("GET", &layer) > 32 * MIB as u64
    })
    .await;
    assert!(moved, "the owner's fill never got going");
    w.fleet.replicas[owner].kill();
    for t in tasks {
        let r = t.await.expect("client");
        assert!(
            r.as_ref().is_err_and(|e| e.starts_with("aborted")),
            "a client of a dead owner got {r:?}"
        );
    }
    assert!(
        !w.in_bucket(&layer).await,
        "an object appeared under the digest before any replica verified it"
    );
    w.front.set_faults(Faults::default());
    let retried = fetch_digest(
        &http(),
        &format!(
            "{}/v2/library/big/blobs/{layer}?ns=docker.io",
            w.url(askers[0])
        ),
    )
    .await;
    assert_eq!(retried.as_deref(), Ok(layer.as_str()));
    w.wait_in_bucket(std::slice::from_ref(&layer)).await;
    // An upload whose replica died (left here by hand, as a kill mid-upload would) is
    // aborted by `berth gc`.
    let dead = format!("{PREFIX}blobs/sha256/{}", "0".repeat(64));
    let id = w.garage.start_multipart(&dead).await;
    let marker = serde_json::json!({"key": dead, "id": id, "started": 0, "replica": "gone"});
    w.garage
        .put_object(
            &format!("{PREFIX}uploads/test.json"),
            marker.to_string().as_bytes(),
        )
        .await;
    assert!(!w.garage.multipart_uploads().await.is_empty());
    let out = crate::support::run_with_timeout_async(
        {
            let mut c = std::process::Command::new(crate::support::berth::binary());
            c.args([
                "gc",
                "--shared-only",
                "--uploads-older-than",
                "0s",
                "--config",
            ])
            .arg(&w.fleet.replicas[owner].config_path);
            c
        },
        Duration::from_secs(60),
    )
    .await
    .expect_success("berth gc");
    assert!(
        out.stdout.contains("aborted 1 incomplete"),
        "{}",
        out.stdout
    );
    assert!(
        w.garage.multipart_uploads().await.is_empty(),
        "{:?}",
        w.garage.multipart_uploads().await
    );
    w.fleet.replicas[owner].start_again().await;
    let again = pull(&w.url(owner), "library/big", "v1").await;
    assert_eq!(again.as_deref(), Ok(img.manifest_digest.as_str()));
}

/// Test 4: a rolling restart (SIGTERM, start again: A, then B, then C) while containerd
/// pulls cached images in a loop, through a hosts.toml listing the three replicas: no
/// failed pull, no upstream blob GET.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_fails_no_pull() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let mut w = FleetWorld::start("", "").await;
    let images = vec![
        (
            "docker.io/library/roll-a:v1",
            w.push_image("library/roll-a", "v1", &[3 * MIB, 200 * KIB], 21)
                .await,
        ),
        (
            "docker.io/library/roll-b:v1",
            w.push_image("library/roll-b", "v1", &[2 * MIB], 22).await,
        ),
    ];
    let ctrd = Arc::new(crate::support::containerd::Containerd::start().await);
    let mirrors: Vec<String> = (0..3).map(|i| w.url(i)).collect();
    let hosts = ctrd.write_hosts_many("docker.io", &mirrors);
    // A pull, then the image and its content removed, so the next pull fetches it all.
    let cycle = {
        let (ctrd, hosts) = (ctrd.clone(), hosts.clone());
        move |name: &'static str, img: BuiltImage| {
            let (ctrd, hosts) = (ctrd.clone(), hosts.clone());
            async move {
                let out = ctrd.pull(&hosts, name).await;
                if !out.status.success() {
                    return Err(format!("{name}: {}{}", out.stdout, out.stderr));
                }
                let _ = ctrd.ctr(&["images", "rm", name]).await;
                let mut digests = blob_digests(&img);
                digests.push(img.manifest_digest.clone());
                let mut args = vec!["content", "rm"];
                args.extend(digests.iter().map(String::as_str));
                let _ = ctrd.ctr(&args).await;
                Ok(())
            }
        }
    };
    for (name, img) in &images {
        cycle(name, img.clone()).await.expect("warm pull");
    }
    let all: Vec<String> = images.iter().flat_map(|(_, i)| blob_digests(i)).collect();
    w.wait_in_bucket(&all).await;
    w.front.clear();

    let done = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicUsize::new(0));
    let puller = tokio::spawn({
        let (done, cycles, images) = (done.clone(), cycles.clone(), images.clone());
        async move {
            let mut failures = Vec::new();
            // Bounded: the restarts end well before 200 cycles.
            for _ in 0..200 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                for (name, img) in &images {
                    if let Err(e) = cycle(name, img.clone()).await {
                        failures.push(e);
                    }
                }
                cycles.fetch_add(1, Ordering::SeqCst);
            }
            failures
        }
    });
    // Each replica is restarted while pulls run: at least one whole cycle with it down,
    // and one after it is back.
    let wait_cycle = |cycles: Arc<AtomicUsize>| async move {
        let start = cycles.load(Ordering::SeqCst);
        let moved = wait_until(Duration::from_secs(120), || async {
            cycles.load(Ordering::SeqCst) > start
        })
        .await;
        assert!(moved, "the pull loop made no progress");
    };
    for i in 0..3 {
        let r = &mut w.fleet.replicas[i];
        tokio::task::block_in_place(|| r.stop());
        wait_cycle(cycles.clone()).await;
        w.fleet.replicas[i].start_again().await;
        wait_cycle(cycles.clone()).await;
    }
    done.store(true, Ordering::SeqCst);
    let failures = puller.await.expect("pull loop");
    assert!(failures.is_empty(), "failed pulls: {failures:#?}");
    assert!(cycles.load(Ordering::SeqCst) >= 6);
    let blob_gets: Vec<_> = w
        .front
        .content_requests()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains("/blobs/"))
        .collect();
    assert!(blob_gets.is_empty(), "upstream blob GETs: {blob_gets:?}");
}

/// Test 5: the bucket goes away: what a replica has on local disk still pulls, what it
/// has not streams through from upstream, `/readyz` stays 200 and says why; once the
/// bucket is back, the next fill lands in it.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bucket_degrades_but_does_not_stop_pulls() {
    let mut w = FleetWorld::start("", "").await;
    let cached = w.push_image("library/cached", "v1", &[2 * MIB], 14).await;
    let fresh = w.push_image("library/fresh", "v1", &[2 * MIB], 15).await;
    let later = w.push_image("library/later", "v1", &[2 * MIB], 16).await;
    // Every replica pulls it, so each holds it on local disk.
    for i in 0..3 {
        pull(&w.url(i), "library/cached", "v1").await.expect("warm");
    }
    w.wait_in_bucket(&blob_digests(&cached)).await;
    w.garage.stop();
    for i in 0..3 {
        let d = pull(&w.url(i), "library/cached", "v1").await;
        assert_eq!(
            d.as_deref(),
            Ok(cached.manifest_digest.as_str()),
            "replica {i}"
        );
    }
    let d = pull(&w.url(0), "library/fresh", "v1").await;
    assert_eq!(d.as_deref(), Ok(fresh.manifest_digest.as_str()));
    let ready = http()
        .get(format!("{}/readyz", w.fleet.replicas[0].admin_url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let text = ready.text().await.unwrap_or_default();
    assert!(
        text.contains("degraded") && text.contains("shared store is unavailable"),
        "{text}"
    );
    assert_eq!(
        w.fleet.replicas[0].metric("berth_shared_available").await,
        0.0
    );
    // The operator's view says so too, and names the fleet.
    let out = crate::support::run_with_timeout_async(
        {
            let mut c = std::process::Command::new(crate::support::berth::binary());
            c.args(["status", "--admin", &w.fleet.replicas[0].admin_url()]);
            c
        },
        Duration::from_secs(30),
    )
    .await
    .expect_success("berth status");
    assert!(
        out.stdout.contains("shared") && out.stdout.contains("UNAVAILABLE"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("of 3 replicas"), "{}", out.stdout);
    w.garage.start_again().await;
    // Ready again once the store answers (bounded; each replica retries the tier a few
    // seconds after a failure, and `/readyz` probes it).
    for r in &w.fleet.replicas {
        let back = wait_until(Duration::from_secs(20), || async {
            let t = http()
                .get(format!("{}/readyz", r.admin_url()))
                .send()
                .await
                .expect("readyz")
                .text()
                .await
                .unwrap_or_default();
            t == "ready\n"
        })
        .await;
        assert!(back, "a replica never saw the bucket come back");
    }
    pull(&w.url(0), "library/later", "v1").await.expect("after");
    w.wait_in_bucket(&blob_digests(&later)).await;
}

/// Test 6: redirect mode. A blob the bucket holds is a 307 to a presigned Garage URL,
/// which skopeo follows; a repository without a link to the blob gets no redirect.
#[tokio::test(flavor = "multi_thread")]
async fn redirect_mode_sends_clients_to_the_bucket() {
    let w = FleetWorld::start("redirect = true\n", "").await;
    let img = w.push_image("library/redir", "v1", &[3 * MIB], 17).await;
    pull(&w.url(0), "library/redir", "v1")
        .await
        .expect("first pull");
    w.wait_in_bucket(&blob_digests(&img)).await;
    let (layer, _) = img.layers[0].clone();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client");
    let resp = no_follow
        .get(format!(
            "{}/v2/library/redir/blobs/{layer}?ns=docker.io",
            w.url(1)
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 307);
    let location = header(&resp, "location");
    assert!(
        location.starts_with(&w.garage.endpoint) && location.contains("X-Amz-Signature"),
        "{location}"
    );
    // The presigned URL serves the blob itself.
    let got = fetch_digest(&http(), &location).await;
    assert_eq!(got.as_deref(), Ok(layer.as_str()));
    // Another repository, which does not hold the blob upstream: no redirect, no bytes.
    let other = no_follow
        .get(format!(
            "{}/v2/library/other/blobs/{layer}?ns=docker.io",
            w.url(1)
        ))
        .send()
        .await
        .expect("GET");
    assert_eq!(other.status(), 404);
    assert!(other.headers().get("location").is_none());
    // skopeo follows the redirect (and checks every digest).
    let dest = w.dir.path().join("skopeo-out");
    let out = crate::support::run_with_timeout_async(
        {
            let mut c = std::process::Command::new(crate::support::require_tool("skopeo"));
            c.args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/library/redir:v1", w.fleet.replicas[2].host()),
                &format!("dir:{}", dest.display()),
            ]);
            c
        },
        Duration::from_secs(120),
    )
    .await
    .expect_success("skopeo copy through a redirect");
    let _ = out;
    assert!(dest.join(&layer[7..]).exists());
    let redirected = w.fleet.replicas[2]
        .log()
        .lines()
        .filter(|l| l.contains("\"status\":307"))
        .count();
    assert!(redirected >= 2, "skopeo got {redirected} redirects");
    // containerd follows it too (and verifies every digest).
    let ctrd = crate::support::containerd::Containerd::start().await;
    let hosts = ctrd.write_hosts("docker.io", &w.url(0));
    let out = ctrd.pull(&hosts, "docker.io/library/redir:v1").await;
    assert!(
        out.status.success(),
        "ctr pull through a redirect: {}{}",
        out.stdout,
        out.stderr
    );
    let redirected = w.fleet.replicas[0]
        .log()
        .lines()
        .filter(|l| l.contains("\"status\":307"))
        .count();
    assert!(redirected >= 2, "containerd got {redirected} redirects");
}

/// Test 7: with a cap below the upstream's limit, the fleet as a whole never makes the
/// emulator answer 429: each replica spends its part of the cap.
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_stays_under_the_upstream_limit() {
    let w = FleetWorld::start(
        "",
        "quota = { requests = 6, per = \"1h\", reserve = 0.0 }\n",
    )
    .await;
    let hub = w.front.enable_hub(crate::support::hub::HubRules::new(
        8,
        Duration::from_secs(3600),
    ));
    for n in 0..12 {
        w.push_image(&format!("library/q{n}"), "v1", &[64 * KIB], 100 + n)
            .await;
    }
    let mut ok = 0;
    for n in 0..12 {
        for i in 0..3 {
            if pull(&w.url(i), &format!("library/q{n}"), "v1")
                .await
                .is_ok()
            {
                ok += 1;
            }
        }
    }
    assert_eq!(hub.refused(), 0, "the upstream said 429");
    assert!(
        hub.counted() <= 6,
        "the fleet spent {} counted GETs",
        hub.counted()
    );
    assert!(ok >= 3, "only {ok} pulls succeeded");
}

/// A replica without a local tier (`storage.local = false`) keeps no blob on its disk:
/// a miss is filled, verified and uploaded, and every later read (ranges included) streams
/// straight from the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_without_local_disk_serves_from_the_bucket() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    let garage = Garage::start().await;
    let berth = crate::support::berth::Berth::start_opts(
        &[UpstreamSpec::docker_hub(&front.url())],
        &crate::support::berth::Extra {
            top: garage.shared_toml(PREFIX),
            storage: "local = false".into(),
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let built = build_image(
        dir.path(),
        &ImageSpec {
            layer_sizes: vec![20 * MIB, 100 * KIB],
            seed: 31,
        },
        Platform::LINUX_AMD64,
    );
    push(
        &built.layout,
        LAYOUT_REF,
        &format!("{}/library/nolocal:v1", registry.host()),
        None,
    )
    .await;
    let base = berth.url();
    assert_eq!(
        pull(&base, "library/nolocal", "v1").await.as_deref(),
        Ok(built.manifest_digest.as_str())
    );
    // Clients have every byte once it is verified; the upload follows (bounded wait).
    let digests = blob_digests(&built);
    let uploaded = in_bucket_soon(&garage, &digests).await;
    assert!(uploaded, "the blobs never reached the bucket");
    for d in &digests {
        assert!(!is_stored(berth.data_dir(), d), "{d} kept on local disk");
    }
    front.clear();
    assert_eq!(
        pull(&base, "library/nolocal", "v1").await.as_deref(),
        Ok(built.manifest_digest.as_str())
    );
    assert!(
        front.content_requests().is_empty(),
        "{:?}",
        front.content_requests()
    );
    let (layer, size) = built.layers[0].clone();
    let part = http()
        .get(format!(
            "{base}/v2/library/nolocal/blobs/{layer}?ns=docker.io"
        ))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .expect("range GET");
    assert_eq!(part.status(), 206);
    assert_eq!(
        header(&part, "content-range"),
        format!("bytes 1000-1999/{size}")
    );
    let body = part.bytes().await.expect("body");
    assert_eq!(&body[..], &built.read_blob(&layer)[1000..2000]);
    let from_bucket = berth
        .metric("berth_shared_requests_total{op=\"get\",result=\"ok\"}")
        .await;
    assert!(from_bucket >= 3.0, "{from_bucket} reads from the bucket");
    // A corrupt object is not served as the blob: the transfer aborts and the object
    // goes, so the next request fetches the blob again.
    let (small, _) = built.layers[1].clone();
    let key = format!("{PREFIX}blobs/sha256/{}", &small[7..]);
    garage.put_object(&key, b"not the layer at all").await;
    let got = fetch_digest(
        &http(),
        &format!("{base}/v2/library/nolocal/blobs/{small}?ns=docker.io"),
    )
    .await;
    assert!(got.is_err(), "a corrupt object was served: {got:?}");
    assert!(
        garage.get_object(&key).await.is_none(),
        "the corrupt object stayed"
    );
    let again = fetch_digest(
        &http(),
        &format!("{base}/v2/library/nolocal/blobs/{small}?ns=docker.io"),
    )
    .await;
    assert_eq!(again.as_deref(), Ok(small.as_str()));
}

/// `peers_dns`: the replicas are what a name resolves to, looked up before berth serves,
/// and the upstream's quota is split across them. `localhost` resolves to 127.0.0.1; this
/// replica advertises 127.0.0.2, so the fleet it sees has two members.
#[tokio::test(flavor = "multi_thread")]
async fn peers_dns_makes_the_fleet_and_splits_the_quota() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a-fleet-secret-for-tests-0123456789").expect("secret");
    let berth = crate::support::berth::Berth::start_opts(
        &[UpstreamSpec::docker_hub(&registry.url())
            .extra("quota = { requests = 10, per = \"1h\" }")],
        &crate::support::berth::Extra {
            top: format!(
                "[fleet]\nadvertise = \"http://127.0.0.2:{port}\"\n\
                 peers_dns = \"localhost:{port}\"\nsecret_file = \"{}\"\n",
                secret.display()
            ),
            listen: Some(format!("127.0.0.1:{port}").parse().expect("addr")),
            ..Default::default()
        },
    )
    .await;
    let status: serde_json::Value = http()
        .get(format!("{}/admin/status", berth.admin_url()))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    let peers: Vec<&str> = status["fleet"]["peers"]
        .as_array()
        .expect("fleet peers")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(
        peers.contains(&format!("http://127.0.0.1:{port}").as_str()),
        "{peers:?}"
    );
    assert!(
        peers.contains(&format!("http://127.0.0.2:{port}").as_str()),
        "{peers:?}"
    );
    let n = peers.len() as f64;
    assert_eq!(berth.metric("berth_fleet_peers").await, n);
    // Each replica's share of the 10-request cap.
    assert_eq!(
        berth
            .metric("berth_quota_capacity{upstream=\"docker.io\"}")
            .await,
        (10.0 / n).floor()
    );
}

/// A forwarded request names the client it is made for, under the signature: the owner
/// charges that client's budget, not the asking replica's nor nobody's.
#[tokio::test(flavor = "multi_thread")]
async fn the_owner_charges_the_client_a_replica_forwards_for() {
    let w = FleetWorld::start_with(
        "",
        "",
        "[client_budgets]\nkey = \"header:x-team\"\nrequests = 1\nper = \"1h\"\n",
    )
    .await;
    // Two tags with the same owner, asked for through the other replicas.
    let key = |n: usize| format!("docker.io/library/bud{n}:v1#");
    let first = 0;
    let owner = w.fleet.owner_of(&key(first));
    let second = (1..64)
        .find(|n| w.fleet.owner_of(&key(*n)) == owner)
        .expect("a second tag with the same owner");
    for n in [first, second] {
        w.push_image(
            &format!("library/bud{n}"),
            "v1",
            &[64 * KIB],
            200 + n as u64,
        )
        .await;
    }
    let askers: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let get_tag = |replica: usize, n: usize, team: &'static str| {
        let url = format!(
            "{}/v2/library/bud{n}/manifests/v1?ns=docker.io",
            w.url(replica)
        );
        async move {
            http()
                .get(url)
                .header("accept", ACCEPT_ALL)
                .header("x-team", team)
                .send()
                .await
                .expect("GET")
        }
    };
    assert_eq!(get_tag(askers[0], first, "ci").await.status(), 200);
    // The same client through another replica: its one request is spent at the owner.
    let refused = get_tag(askers[1], second, "ci").await;
    let (status, code, _) = error_code(refused).await;
    assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS"));
    // Another client is not held to it.
    assert_eq!(get_tag(askers[1], second, "other").await.status(), 200);
    assert_eq!(
        w.fleet.replicas[owner]
            .metric("berth_quota_refusals_total{upstream=\"docker.io\",reason=\"client\"}")
            .await,
        1.0
    );
}

/// A bucket that stops answering (the process frozen, its sockets open) is bounded by
/// `storage.shared.timeout`: pulls go on from local disk and through, and `/readyz` says
/// why, without waiting on the frozen store.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_bucket_is_bounded_by_its_timeout() {
    let w = FleetWorld::start("timeout = \"1s\"\n", "").await;
    let cached = w.push_image("library/frozen-a", "v1", &[MIB], 41).await;
    let fresh = w.push_image("library/frozen-b", "v1", &[MIB], 42).await;
    for i in 0..3 {
        pull(&w.url(i), "library/frozen-a", "v1")
            .await
            .expect("warm");
    }
    w.wait_in_bucket(&blob_digests(&cached)).await;
    let pid = w.garage.pid().expect("garage runs").to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
    };
    assert!(signal("-STOP").success());
    let started = std::time::Instant::now();
    let a = pull(&w.url(0), "library/frozen-a", "v1").await;
    let b = pull(&w.url(0), "library/frozen-b", "v1").await;
    let took = started.elapsed();
    let ready = http()
        .get(format!("{}/readyz", w.fleet.replicas[0].admin_url()))
        .send()
        .await
        .expect("readyz");
    let ready_status = ready.status();
    let ready_text = ready.text().await.unwrap_or_default();
    assert!(signal("-CONT").success());
    assert_eq!(a.as_deref(), Ok(cached.manifest_digest.as_str()));
    assert_eq!(b.as_deref(), Ok(fresh.manifest_digest.as_str()));
    // A handful of 1 s deadlines at most, then the bucket is skipped: far from the
    // minutes an unbounded wait would take.
    assert!(took < Duration::from_secs(30), "two pulls took {took:?}");
    assert_eq!(ready_status, 200);
    assert!(ready_text.contains("degraded"), "{ready_text}");
}

/// Tenancy in a fleet: the replica a client reaches checks its credentials and the rules;
/// a miss it forwards to the key's owner is signed, and the owner serves it without the
/// client's credentials (which never leave the first replica) and without counting it
/// again. A request straight to the owner is checked there as anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_checks_clients_where_they_arrive_and_forwards_signed() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = crate::support::auth::tokens_dir(dir.path(), &[("team-a", "tok-a")]);
    let w = FleetWorld::start_with(
        "",
        "",
        &format!(
            "[auth]\ntokens_dir = \"{}\"\nanonymous = false\n\
             [[access]]\nprincipals = [\"team-a\"]\nrepositories = [\"docker.io/library/*\"]\n",
            tokens.display()
        ),
    )
    .await;
    let img = w
        .push_image("library/tenant", "v1", &[128 * KIB], 300)
        .await;
    let owner = w.fleet.owner_of("docker.io/library/tenant:v1#");
    let asker = (owner + 1) % 3;
    let get = |replica: usize, path: String, token: Option<&'static str>| {
        let url = format!("{}/v2/{path}?ns=docker.io", w.url(replica));
        async move {
            let req = http().get(url).header("accept", ACCEPT_ALL);
            let req = match token {
                Some(t) => req.bearer_auth(t),
                None => req,
            };
            req.send().await.expect("GET")
        }
    };
    let r = get(asker, "library/tenant/manifests/v1".into(), Some("tok-a")).await;
    assert_eq!(r.status(), 200, "{}", w.fleet.replicas[owner].log());
    for (digest, _) in &img.layers {
        let r = get(
            asker,
            format!("library/tenant/blobs/{digest}"),
            Some("tok-a"),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    // The owner served the forwarded tag without counting anyone for it...
    let owner_metrics = w.fleet.replicas[owner].metrics().await;
    let served: f64 = owner_metrics
        .lines()
        .filter(|l| l.starts_with("berth_requests_total{kind=\"manifest\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        served >= 1.0,
        "the tag was not forwarded to its owner: {owner_metrics}"
    );
    assert!(
        !owner_metrics.contains("berth_principal_requests_total{principal=\"anonymous\""),
        "{owner_metrics}"
    );
    assert!(
        !owner_metrics.contains("berth_access_refusals_total{"),
        "the owner refused a forwarded request: {owner_metrics}"
    );
    // ... and still checks its own clients.
    let r = get(owner, "library/tenant/manifests/v1".into(), None).await;
    assert_eq!(r.status(), 401);
    let r = get(asker, "other/thing/manifests/v1".into(), Some("tok-a")).await;
    assert_eq!(r.status(), 403);
}
