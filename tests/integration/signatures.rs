//! Issue 13: what admission controllers check before a pod may start (cosign signatures,
//! OCI referrers, tags lists) is answered while the upstream is down, as cached images
//! are; and a warm with signatures pins them.
//!
//! The upstream is the real registry (distribution 2.8), the artifacts are pushed with
//! skopeo, and skopeo reads tags and signatures back through berth. distribution 2.8 has
//! no referrers API: the front answers it from the registry's content (see
//! `Front::emulate_referrers`), which is the only thing here no real peer does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Front;
use crate::support::image::{
    push, sha256_digest, BuiltImage, CONFIG_MEDIA_TYPE, INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::{http, require_tool, run_with_timeout_async, wait_until};

const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const SBOM: &str = "application/spdx+json";
const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// A second name for the same registry, with a long `tag_ttl`: what it answers from its
/// store it answers without asking.
const LONG: &str = "long.registry.test";

/// An OCI layout written here: artifacts the image helpers do not build (a cosign
/// signature, referrers, the referrers-tag index), each named for `image::push`.
struct Layout {
    dir: PathBuf,
    refs: Vec<Value>,
}

/// A manifest written to a layout: its bytes, digest and size.
#[derive(Clone, Debug)]
struct Written {
    bytes: Vec<u8>,
    digest: String,
    size: u64,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_owned(),
            refs: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> Written {
        let digest = sha256_digest(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
        Written {
            bytes: bytes.to_vec(),
            digest,
            size: bytes.len() as u64,
        }
    }

    /// Writes a manifest and names it `name` in the layout's index.
    fn manifest(&mut self, name: &str, media_type: &str, value: &Value) -> Written {
        let m = self.blob(&serde_json::to_vec(value).unwrap());
        self.refs.push(json!({
            "mediaType": media_type,
            "digest": m.digest,
            "size": m.size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
        let index = json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
        m
    }
}

fn descriptor(media_type: &str, w: &Written) -> Value {
    json!({"mediaType": media_type, "digest": w.digest, "size": w.size})
}

/// What the test pushed next to the image.
struct Attached {
    sig_tag: String,
    signature: Written,
    /// The signature's layer: the simple-signing payload.
    payload: Written,
    sbom: Written,
    bundle: Written,
    /// The referrers' layers.
    contents: Vec<String>,
}

/// Pushes, next to `image` in `repo`: a cosign signature under `sha256-<hex>.sig`, two
/// referrers (an SBOM and a sigstore bundle, each with `subject` = the image), and the
/// referrers-tag index listing them, as cosign and oras push them to registries without
/// the referrers API.
async fn push_attached(
    registry: &Registry,
    dir: &Path,
    repo: &str,
    image: &BuiltImage,
) -> Attached {
    let mut layout = Layout::new(&dir.join("attached"));
    let payload = layout.blob(
        json!({
            "critical": {
                "identity": {"docker-reference": format!("docker.io/{repo}")},
                "image": {"docker-manifest-digest": image.manifest_digest},
                "type": "cosign container image signature",
            },
            "optional": null,
        })
        .to_string()
        .as_bytes(),
    );
    let config = layout.blob(
        json!({"architecture": "", "os": "", "config": {},
               "rootfs": {"type": "layers", "diff_ids": [payload.digest]}})
        .to_string()
        .as_bytes(),
    );
    let mut layer = descriptor(SIMPLESIGNING, &payload);
    layer["annotations"] = json!({"dev.cosignproject.cosign/signature": "MEUCIQberthtest"});
    let signature = layout.manifest(
        "sig",
        MANIFEST_MEDIA_TYPE,
        &json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(CONFIG_MEDIA_TYPE, &config),
            "layers": [layer],
        }),
    );
    let empty = layout.blob(b"{}");
    let subject = json!({
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": image.manifest_digest,
        "size": image.manifest_size,
    });
    let mut contents = Vec::new();
    let mut referrer = |name: &str, artifact_type: &str, content: &str| {
        let content = layout.blob(content.as_bytes());
        contents.push(content.digest.clone());
        layout.manifest(
            name,
            MANIFEST_MEDIA_TYPE,
            &json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "artifactType": artifact_type,
                "config": descriptor(EMPTY_MEDIA_TYPE, &empty),
                "layers": [descriptor(artifact_type, &content)],
                "subject": subject,
            }),
        )
    };
    let sbom = referrer(
        "sbom",
        SBOM,
        r#"{"spdxVersion":"SPDX-2.3","name":"signed"}"#,
    );
    let bundle = referrer("bundle", BUNDLE, r#"{"mediaType":"bundle","seed":1}"#);
    let listed = |t: &str, w: &Written| {
        let mut d = descriptor(MANIFEST_MEDIA_TYPE, w);
        d["artifactType"] = json!(t);
        d
    };
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [listed(SBOM, &sbom), listed(BUNDLE, &bundle)],
    });
    let hex = &image.manifest_digest[7..];
    let sig_tag = format!("sha256-{hex}.sig");
    let host = registry.host();
    for (name, tag) in [
        ("sig", sig_tag.as_str()),
        ("sbom", "sbom-referrer"),
        ("bundle", "bundle-referrer"),
    ] {
        push(&layout.dir, name, &format!("{host}/{repo}:{tag}"), None).await;
    }
    // The index by a plain PUT, as oras does: skopeo 1.9 re-serializes an index it copies
    // with `--all` and drops the descriptors' `artifactType`, which `--preserve-digests`
    // then refuses.
    let put = http()
        .put(format!(
            "{}/v2/{repo}/manifests/sha256-{hex}",
            registry.url()
        ))
        .header("content-type", INDEX_MEDIA_TYPE)
        .body(index.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.status(),
        201,
        "{}",
        put.text().await.unwrap_or_default()
    );
    Attached {
        sig_tag,
        signature,
        payload,
        sbom,
        bundle,
        contents,
    }
}

/// The digests listed in a referrers answer.
fn listed(body: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(body).unwrap();
    let mut digests: Vec<String> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_owned())
        .collect();
    digests.sort();
    digests
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// GETs `url` until the answer carries berth's `Warning` (the kept copy went stale and
/// the upstream could not be asked); every answer on the way must be a 200. Returns the
/// stale answer's headers and body.
async fn until_stale(berth: &Berth, url: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let last = std::cell::RefCell::new(None);
    let last = &last;
    let stale = wait_until(Duration::from_secs(20), move || async move {
        let r = get(url, false).await;
        assert_eq!(r.status(), 200, "{url} during the outage: {}", berth.log());
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        let warned = headers.contains_key("warning");
        *last.borrow_mut() = Some((headers, body));
        warned
    })
    .await;
    assert!(
        stale,
        "{url} never answered with a Warning; log:\n{}",
        berth.log()
    );
    let (headers, body) = last.borrow_mut().take().unwrap();
    let warning = headers["warning"].to_str().unwrap();
    assert!(
        warning.starts_with("299 - \"berth:") && warning.contains("docker.io"),
        "{url}: {warning}"
    );
    (headers, body)
}

async fn skopeo(args: &[&str]) -> String {
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.args(args)
        .args(["--tls-verify=false", "--no-creds", "--retry-times=0"]);
    let out = run_with_timeout_async(cmd, Duration::from_secs(60)).await;
    out.expect_success(&format!("skopeo {args:?}")).stdout
}

async fn requests(berth: &Berth, kind: &str, outcome: &str) -> f64 {
    berth
        .metric(&format!(
            "berth_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"
        ))
        .await
}

/// Signature tags, referrers (filtered or not) and tags lists, pulled through berth, are
/// still answered with the upstream down (stale, with a `Warning`), and after a restart;
/// concurrent requests for one list make one upstream request.
#[tokio::test(flavor = "multi_thread")]
async fn signatures_referrers_and_tags_lists_survive_an_upstream_outage() {
    let mut registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    front.emulate_referrers();
    let mut berth = Berth::start(&[
        UpstreamSpec::docker_hub(&front.url()).ttl("1s"),
        UpstreamSpec::named(LONG, &front.url()).ttl("10m"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let repo = "library/signed";
    let image = push_single(&registry, dir.path(), repo, "v1", &[32 * KIB], 300).await;
    for tag in ["v2", "v3"] {
        push_single(&registry, dir.path(), repo, tag, &[KIB], 301).await;
    }
    let a = push_attached(&registry, dir.path(), repo, &image).await;
    let base = berth.url();
    let url = |path: &str, ns: &str| {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{base}/v2/{repo}/{path}{sep}ns={ns}")
    };
    let sig_url = url(&format!("manifests/{}", a.sig_tag), "docker.io");
    let payload_url = url(&format!("blobs/{}", a.payload.digest), "docker.io");
    let referrers_url = url(&format!("referrers/{}", image.manifest_digest), "docker.io");
    let sbom_only_url = url(
        // Encoded as clients do (a bare `+` in a query is a space).
        &format!(
            "referrers/{}?artifactType={}",
            image.manifest_digest,
            SBOM.replace('/', "%2F").replace('+', "%2B")
        ),
        "docker.io",
    );
    let tags_url = url("tags/list", "docker.io");
    let all_tags = sorted(vec![
        "v1".into(),
        "v2".into(),
        "v3".into(),
        a.sig_tag.clone(),
        "sbom-referrer".into(),
        "bundle-referrer".into(),
        format!("sha256-{}", &image.manifest_digest[7..]),
    ]);

    // The signature is an ordinary tag: skopeo reads it through berth (path-prefix form).
    let prefixed = format!("docker://{}/docker.io/{repo}", berth.host());
    let raw = skopeo(&["inspect", "--raw", &format!("{prefixed}:{}", a.sig_tag)]).await;
    assert_eq!(raw.as_bytes(), a.signature.bytes.as_slice());
    let r = get(&payload_url, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        a.payload.bytes.as_slice()
    );
    // The referrers, all and filtered.
    let r = get(&referrers_url, false).await;
    assert_eq!(r.status(), 200, "{}", berth.log());
    assert_eq!(header(&r, "content-type"), INDEX_MEDIA_TYPE);
    let all_referrers = sorted(vec![a.sbom.digest.clone(), a.bundle.digest.clone()]);
    assert_eq!(listed(&r.bytes().await.unwrap()), all_referrers);
    let r = get(&sbom_only_url, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    assert_eq!(
        listed(&r.bytes().await.unwrap()),
        vec![a.sbom.digest.clone()]
    );
    // The tags list, by skopeo (which follows pages) and by hand.
    let tags: Value = serde_json::from_str(&skopeo(&["list-tags", &prefixed]).await).unwrap();
    let tags: Vec<String> = serde_json::from_value(tags["Tags"].clone()).unwrap();
    assert_eq!(sorted(tags), all_tags);
    let r = get(&tags_url, false).await;
    assert_eq!(r.status(), 200);
    let tags_body = r.bytes().await.unwrap();

    // 20 clients ask for a list berth does not hold, at once: one upstream request.
    let herd_url = url("tags/list?n=50", LONG);
    let before = front.count("GET", "/tags/list?n=50");
    let outcomes = ["miss", "coalesced", "hit"];
    let mut counted = Vec::new();
    for o in outcomes {
        counted.push(requests(&berth, "tags", o).await);
    }
    let herd: Vec<_> = (0..20)
        .map(|_| {
            let u = herd_url.clone();
            tokio::spawn(async move {
                let r = get(&u, false).await;
                (r.status().as_u16(), r.bytes().await.unwrap())
            })
        })
        .collect();
    for h in herd {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, tags_body, "the same list, whatever the n");
    }
    assert_eq!(front.count("GET", "/tags/list?n=50") - before, 1);
    // One fetched it; the others joined its fetch or found its answer kept.
    let mut delta = Vec::new();
    for (o, was) in outcomes.iter().zip(&counted) {
        delta.push(requests(&berth, "tags", o).await - was);
    }
    assert_eq!(delta[0], 1.0, "miss, coalesced, hit: {delta:?}");
    assert_eq!(delta[1] + delta[2], 19.0, "miss, coalesced, hit: {delta:?}");
    // Within its tag_ttl a list is answered from the store, to a path-prefix client too
    // (distribution 2.8 sends no `Link` to rewrite; the unit test of `listing_response`
    // covers that for kept answers).
    let prefixed_url = format!("{base}/v2/{LONG}/{repo}/tags/list?n=2");
    for round in 0..2 {
        let r = get(&prefixed_url, false).await;
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(r.bytes().await.unwrap(), tags_body, "round {round}");
    }
    assert_eq!(front.count("GET", "/tags/list?n=2"), 1);
    // The signature by tag, as a plain client asks for it (another accept set than
    // skopeo's).
    let r = get(&sig_url, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        a.signature.bytes.as_slice()
    );

    // The upstream goes down.
    let referrers_before = front.count("GET", "/referrers/");
    registry.stop();
    for round in 0..2 {
        let (h, body) = until_stale(&berth, &tags_url).await;
        assert_eq!(body, tags_body, "round {round}");
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{h:?}"
        );
        let (h, body) = until_stale(&berth, &referrers_url).await;
        assert_eq!(listed(&body), all_referrers);
        assert_eq!(h["content-type"], INDEX_MEDIA_TYPE);
        let (h, body) = until_stale(&berth, &sbom_only_url).await;
        assert_eq!(listed(&body), vec![a.sbom.digest.clone()], "still filtered");
        assert_eq!(h["oci-filters-applied"], "artifactType");
        let (h, body) = until_stale(&berth, &sig_url).await;
        assert_eq!(body, a.signature.bytes);
        assert_eq!(h["docker-content-digest"], a.signature.digest.as_str());
        let r = get(&payload_url, false).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            a.payload.bytes.as_slice()
        );
        // skopeo too, through berth's prefix form.
        let raw = skopeo(&["inspect", "--raw", &format!("{prefixed}:{}", a.sig_tag)]).await;
        assert_eq!(raw.as_bytes(), a.signature.bytes.as_slice());
        let tags: Value = serde_json::from_str(&skopeo(&["list-tags", &prefixed]).await).unwrap();
        let tags: Vec<String> = serde_json::from_value(tags["Tags"].clone()).unwrap();
        assert_eq!(sorted(tags), all_tags);
        // A list berth never held: the upstream's failure, as before.
        let (status, code, message) =
            error_code(get(&url("tags/list?n=7", "docker.io"), false).await).await;
        assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "{message}");
        if round == 0 {
            // Kept across a restart (still without an upstream).
            berth.restart().await;
        }
    }
    // berth did ask (and the front answered 502 for the registry).
    assert!(front.count("GET", "/referrers/") > referrers_before);
    assert!(requests(&berth, "tags", "stale").await >= 1.0);
    assert!(requests(&berth, "referrers", "stale").await >= 1.0);
    assert!(requests(&berth, "manifest", "stale").await >= 1.0);
}

/// `POST /admin/warm` with signatures fetches and pins the signature and the referrers of
/// each warmed manifest: all are then answered with the upstream down, and an eviction
/// down to nothing leaves them in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_with_signatures_pins_them() {
    let mut registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    front.emulate_referrers();
    let mut berth = Berth::start(&[UpstreamSpec::docker_hub(&front.url()).ttl("1s")]).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = "library/warmed";
    let image = push_single(&registry, dir.path(), repo, "v1", &[16 * KIB, KIB], 310).await;
    let a = push_attached(&registry, dir.path(), repo, &image).await;
    // Pulled, not warmed: what eviction takes.
    let loose = push_single(&registry, dir.path(), repo, "loose", &[KIB], 311).await;
    let loose_layer = &loose.layers[0].0;
    let url = format!("{}/v2/{repo}/blobs/{loose_layer}?ns=docker.io", berth.url());
    assert_eq!(
        get(&url, false).await.bytes().await.unwrap().len(),
        loose.layers[0].1 as usize
    );
    assert!(wait_stored(berth.data_dir(), loose_layer).await);

    let report: Value = berth
        .admin_request(reqwest::Method::POST, "/admin/warm")
        .json(&json!({ "images": [format!("docker.io/{repo}:v1")], "signatures": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = &report["results"][0];
    assert_eq!(r["ok"], true, "{report}\n{}", berth.log());
    assert_eq!(r["digest"], image.manifest_digest.as_str());
    assert_eq!(r["signatures"], 1, "one .sig; no .att, no .sbom: {report}");
    assert_eq!(r["referrers"], 2, "{report}");
    // The image's config and 2 layers; the signature's config and payload; each
    // referrer's empty config and content.
    assert_eq!(r["blobs"], 3 + 2 + 2 + 2, "{report}");
    // The missing .att and .sbom were asked with a HEAD (free), never a GET.
    for suffix in ["att", "sbom"] {
        let tag = format!("/manifests/sha256-{}.{suffix}", &image.manifest_digest[7..]);
        assert_eq!(front.count("HEAD", &tag), 1, "{suffix}");
        assert_eq!(front.count("GET", &tag), 0, "{suffix}");
    }
    // `berth warm --signatures` asks the same, and says what it pinned.
    let mut cmd = Command::new(crate::support::berth::binary());
    cmd.args([
        "warm",
        "--signatures",
        "--admin",
        &berth.admin_url(),
        "--token-file",
    ])
    .arg(berth.admin_token_file.as_ref().expect("an admin token"))
    .arg(format!("{repo}:v1"));
    let out = run_with_timeout_async(cmd, Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("1 signature(s)") && out.stdout.contains("2 referrer(s)"),
        "{}",
        out.stdout
    );

    registry.stop();
    let base = berth.url();
    let by_digest = |d: &str| format!("{base}/v2/{repo}/manifests/{d}?ns=docker.io");
    let blob = |d: &str| format!("{base}/v2/{repo}/blobs/{d}?ns=docker.io");
    let content_before = front.content_requests().len();
    for (url, want) in [
        (by_digest(&a.signature.digest), &a.signature.bytes),
        (blob(&a.payload.digest), &a.payload.bytes),
        (by_digest(&a.sbom.digest), &a.sbom.bytes),
        (by_digest(&a.bundle.digest), &a.bundle.bytes),
    ] {
        let r = get(&url, false).await;
        assert_eq!(r.status(), 200, "{url}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), want.as_slice(), "{url}");
    }
    assert_eq!(
        front.content_requests().len(),
        content_before,
        "answered from the store: {:?}",
        front.content_requests()
    );
    // The signature by its tag and the referrers list: kept, stale, with a Warning.
    let (_, body) = until_stale(
        &berth,
        &format!("{base}/v2/{repo}/manifests/{}?ns=docker.io", a.sig_tag),
    )
    .await;
    assert_eq!(body, a.signature.bytes);
    let referrers = format!(
        "{base}/v2/{repo}/referrers/{}?ns=docker.io",
        image.manifest_digest
    );
    let (_, body) = until_stale(&berth, &referrers).await;
    assert_eq!(
        listed(&body),
        sorted(vec![a.sbom.digest.clone(), a.bundle.digest.clone()])
    );

    // Evict everything that may be: the warmed blobs are pinned, the loose one goes.
    berth.stop();
    let mut gc = Command::new(crate::support::berth::binary());
    gc.args(["gc", "--to", "0B", "--config"])
        .arg(&berth.config_path);
    let out = run_with_timeout_async(gc, Duration::from_secs(60)).await;
    let out = out.expect_success("berth gc");
    assert!(!is_stored(berth.data_dir(), loose_layer), "{}", out.stdout);
    let pinned = [&a.payload.digest, &image.config_digest, &image.layers[0].0]
        .into_iter()
        .chain(&a.contents);
    for d in pinned {
        assert!(
            is_stored(berth.data_dir(), d),
            "{d} was evicted: {}",
            out.stdout
        );
    }
}
