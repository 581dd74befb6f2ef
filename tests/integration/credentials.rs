//! Issue 13: per-repository upstream credentials, each with its own tokens and quota.
//!
//! The real registry checks tokens from the test token issuer, where `orgbot` may pull
//! only `myorg/*`, `otherbot` only `other/*` and anyone `public/*`; the Docker Hub
//! emulator in front of it counts manifest GETs per account (the token's `sub`, or the
//! client's address when anonymous) and answers with that account's rate-limit headers.
//! berth has one upstream with two `[[upstreams.credentials]]` blocks (a password file
//! and a docker config); skopeo pulls one image per repository through it.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Front;
use crate::support::hub::HubRules;
use crate::support::image::{build_image, push, BuiltImage, ImageSpec, Platform, LAYOUT_REF};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::token::{TokenIssuer, TokenPolicy, TokenRequest};
use crate::support::JsonAnswer as _;
use crate::support::{require_tool, run_with_timeout_async};

const ORG_PASSWORD: &str = "orgbot-Passw0rd-17";
const OTHER_PASSWORD: &str = "otherbot-Passw0rd-23";
const PUSH_PASSWORD: &str = "pusher-Passw0rd-5";
const LIMIT: u32 = 100;
const HOUR: Duration = Duration::from_secs(3600);

/// The repositories pulled: two with orgbot, one with otherbot, one anonymously.
const PULLS: [&str; 4] = ["myorg/app", "myorg/tool", "other/team/app", "public/app"];

/// The berth-side name of each account's bucket.
const MYORG: &str = "{upstream=\"docker.io\",credential=\"myorg\"}";
const OTHER: &str = "{upstream=\"docker.io\",credential=\"other/**\"}";
const DEFAULT: &str = "{upstream=\"docker.io\"}";

/// skopeo copies `repo:v1` through berth's path-prefix form into an OCI layout; returns
/// the digest it wrote.
async fn skopeo_pull(berth: &Berth, out: &std::path::Path, repo: &str) -> String {
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.args([
        "copy",
        "--insecure-policy",
        "--src-tls-verify=false",
        "--src-no-creds",
        "--retry-times=0",
        "--preserve-digests",
    ])
    .arg(format!("docker://{}/docker.io/{repo}:v1", berth.host()))
    .arg(format!("oci:{}:out", out.display()));
    let result = run_with_timeout_async(cmd, Duration::from_secs(120)).await;
    assert!(
        result.status.success(),
        "skopeo {repo}: {}\nberth log:\n{}",
        result.stderr,
        berth.log()
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The repositories named in the `repository:<name>:pull` scopes of `requests`.
fn repositories(requests: &[&TokenRequest]) -> BTreeSet<String> {
    requests
        .iter()
        .flat_map(|r| &r.scopes)
        .map(|s| {
            s.strip_prefix("repository:")
                .and_then(|s| s.strip_suffix(":pull"))
                .unwrap_or_else(|| panic!("berth asked for scope {s:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_repository_pulls_with_its_own_account_tokens_and_quota() {
    let issuer = TokenIssuer::start(
        TokenPolicy::default()
            .anonymous_pull("public/")
            .user_pulling("orgbot", ORG_PASSWORD, &["myorg/"])
            .user_pulling("otherbot", OTHER_PASSWORD, &["other/"])
            .user("pusher", PUSH_PASSWORD),
    )
    .await;
    let registry = Registry::start(RegistryOptions::default().with_token_auth(&issuer)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut images: Vec<BuiltImage> = Vec::new();
    for (i, repo) in PULLS.iter().enumerate() {
        let spec = ImageSpec {
            layer_sizes: vec![64 * KIB, 32 * KIB],
            seed: 1300 + i as u64,
        };
        let img = build_image(
            &dir.path().join(format!("img-{i}")),
            &spec,
            Platform::LINUX_AMD64,
        );
        let dest = format!("{}/{repo}:v1", registry.host());
        push(
            &img.layout,
            LAYOUT_REF,
            &dest,
            Some(("pusher", PUSH_PASSWORD)),
        )
        .await;
        images.push(img);
    }
    let front = Front::start(&registry.url()).await;
    let hub = front.enable_hub(HubRules::with_registry_tokens(LIMIT, HOUR));

    // Secrets: a password file for orgbot, a pull secret for otherbot.
    let org_password = dir.path().join("orgbot-password");
    std::fs::write(&org_password, format!("{ORG_PASSWORD}\n")).unwrap();
    let other_auth = base64_encode(&format!("otherbot:{OTHER_PASSWORD}"));
    let other_config = dir.path().join("other.dockerconfigjson");
    std::fs::write(
        &other_config,
        format!("{{\"auths\":{{\"https://index.docker.io/v1/\":{{\"auth\":\"{other_auth}\"}}}}}}"),
    )
    .unwrap();
    let upstream = UpstreamSpec::docker_hub(&front.url())
        // The token issuer is another loopback port: a realm berth follows only when allowed.
        .extra("redirect_allow = [\"127.0.0.1\"]")
        .extra(&format!(
            "[[upstreams.credentials]]\nrepositories = [\"myorg/*\"]\nname = \"myorg\"\n\
             username = \"orgbot\"\npassword_file = \"{}\"\n\
             [[upstreams.credentials]]\nrepositories = [\"other/**\"]\ndocker_config = \"{}\"",
            org_password.display(),
            other_config.display()
        ));
    let berth = Berth::start(&[upstream]).await;
    let pushed = issuer.request_count();

    for (i, repo) in PULLS.iter().enumerate() {
        let out = dir.path().join(format!("out-{i}"));
        let digest = skopeo_pull(&berth, &out, repo).await;
        assert_eq!(digest, images[i].manifest_digest, "{repo}");
    }

    // The token issuer: each account asked only for its own repositories' scopes, and
    // public/app was asked for without credentials.
    let requests = issuer.requests().split_off(pushed);
    for (account, want) in [
        (Some("orgbot"), ["myorg/app", "myorg/tool"].as_slice()),
        (Some("otherbot"), ["other/team/app"].as_slice()),
        (None, ["public/app"].as_slice()),
    ] {
        let asked: Vec<&TokenRequest> = requests
            .iter()
            .filter(|r| r.user.as_deref() == account)
            .collect();
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(repositories(&asked), want, "{account:?}: {requests:?}");
    }
    assert!(
        requests
            .iter()
            .all(|r| matches!(r.user.as_deref(), None | Some("orgbot" | "otherbot"))),
        "{requests:?}"
    );
    eprintln!(
        "token requests by account: orgbot {}, otherbot {}, anonymous {}",
        requests
            .iter()
            .filter(|r| r.user.as_deref() == Some("orgbot"))
            .count(),
        requests
            .iter()
            .filter(|r| r.user.as_deref() == Some("otherbot"))
            .count(),
        requests.iter().filter(|r| r.user.is_none()).count(),
    );

    // The emulator: each account's manifest GETs were counted on that account, the
    // anonymous one on berth's address.
    let manifests = |repos: &[&str]| -> Vec<String> {
        repos
            .iter()
            .map(|r| format!("/v2/{r}/manifests/v1"))
            .collect()
    };
    assert_eq!(
        hub.counted_for("orgbot"),
        manifests(&["myorg/app", "myorg/tool"])
    );
    assert_eq!(hub.counted_for("otherbot"), manifests(&["other/team/app"]));
    assert_eq!(hub.counted_for("127.0.0.1"), manifests(&["public/app"]));
    assert_eq!(
        hub.identities(),
        vec!["127.0.0.1", "orgbot", "otherbot"],
        "{:?}",
        front.content_requests()
    );
    eprintln!(
        "upstream manifest GETs counted: orgbot {}, otherbot {}, anonymous {}; \
         blob GETs: {}",
        hub.counted_for("orgbot").len(),
        hub.counted_for("otherbot").len(),
        hub.counted_for("127.0.0.1").len(),
        front.count("GET", "/blobs/"),
    );

    // berth: each bucket was charged for its own GETs and learned its own account's
    // headers; the upstream's own (anonymous) account keeps the usual series.
    let metric = |name: &str, labels: &str| {
        let berth = &berth;
        let sample = format!("{name}{labels}");
        async move { berth.metric(&sample).await }
    };
    for (labels, counted, identity) in [(MYORG, 2.0, "orgbot"), (OTHER, 1.0, "otherbot")] {
        assert_eq!(
            metric("berth_credential_quota_counted_requests_total", labels).await,
            counted,
            "{labels}\n{}",
            berth.metrics().await
        );
        assert_eq!(
            metric("berth_credential_upstream_ratelimit_remaining", labels).await,
            f64::from(hub.remaining(identity)),
            "{labels}"
        );
        assert_eq!(
            metric("berth_credential_quota_capacity", labels).await,
            f64::from(LIMIT),
            "{labels}: the bucket learned the limit from its account's headers"
        );
    }
    assert_eq!(
        metric("berth_quota_counted_requests_total", DEFAULT).await,
        1.0
    );
    assert_eq!(
        metric("berth_upstream_ratelimit_remaining", DEFAULT).await,
        f64::from(hub.remaining("127.0.0.1"))
    );
    assert_eq!(hub.remaining("orgbot"), LIMIT - 2);

    // The status JSON shows the credential buckets by name.
    let status: serde_json::Value = crate::support::http()
        .get(format!("{}/admin/status", berth.admin_url()))
        .json_answer()
        .await;
    let creds = &status["upstreams"][0]["credentials"];
    assert_eq!(creds[0]["name"], "myorg", "{status}");
    assert_eq!(creds[0]["quota"]["header_remaining"], LIMIT - 2, "{status}");
    assert_eq!(creds[1]["name"], "other/**", "{status}");
    assert_eq!(creds[1]["quota"]["header_remaining"], LIMIT - 1, "{status}");

    // Neither the usernames nor the secrets show anywhere berth writes.
    let metrics = berth.metrics().await;
    let log = berth.log();
    for (what, text) in [
        ("log", &log),
        ("metrics", &metrics),
        ("status", &status.to_string()),
    ] {
        for secret in [
            ORG_PASSWORD,
            OTHER_PASSWORD,
            &other_auth,
            "orgbot",
            "otherbot",
            "eyJ",
        ] {
            assert!(!text.contains(secret), "{secret:?} in berth's {what}");
        }
    }
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
