//! Issue 2, test 5: upstream token auth against the real registry with `auth: token`.

use crate::common::*;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::image::{build_image, push, ImageSpec, Platform, LAYOUT_REF};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::token::{TokenIssuer, TokenPolicy};

const PASSWORD: &str = "s3cret-Passw0rd";

#[tokio::test(flavor = "multi_thread")]
async fn token_auth_anonymous_configured_and_wrong_credentials() {
    let issuer = TokenIssuer::start(
        TokenPolicy::default()
            .anonymous_pull("public/")
            .user("alice", PASSWORD),
    )
    .await;
    let registry = Registry::start(RegistryOptions::default().with_token_auth(&issuer)).await;
    let dir = tempfile::tempdir().unwrap();
    let img = build_image(
        &dir.path().join("img"),
        &ImageSpec {
            layer_sizes: vec![100 * KIB, 50 * KIB],
            seed: 40,
        },
        Platform::LINUX_AMD64,
    );
    for repo in ["public/app", "private/app"] {
        let dest = format!("{}/{repo}:v1", registry.host());
        push(&img.layout, LAYOUT_REF, &dest, Some(("alice", PASSWORD))).await;
    }

    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let wrong_file = dir.path().join("wrong");
    std::fs::write(&wrong_file, "not-the-password\n").unwrap();
    let auth = base64_encode(&format!("alice:{PASSWORD}"));
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
            registry.host()
        ),
    )
    .unwrap();

    let url = registry.url();
    // The token issuer listens on another loopback port: a realm berth follows only
    // because it is listed (loopback is never followed by default).
    let allow = "redirect_allow = [\"127.0.0.1\"]";
    let berth = Berth::start(&[
        UpstreamSpec::named("anon.registry.test", &url).extra(allow),
        UpstreamSpec::named("alice.registry.test", &url)
            .extra(allow)
            .extra(&format!(
                "username = \"alice\"\npassword_file = \"{}\"",
                password_file.display()
            )),
        UpstreamSpec::named("wrong.registry.test", &url)
            .extra(allow)
            .extra(&format!(
                "username = \"alice\"\npassword_file = \"{}\"",
                wrong_file.display()
            )),
        UpstreamSpec::named("dockercfg.registry.test", &url)
            .extra(allow)
            .extra(&format!("docker_config = \"{}\"", docker_config.display())),
    ])
    .await;
    let pull = |ns: &'static str, repo: &'static str| {
        let base = berth.url();
        let img = &img;
        async move {
            let mut statuses = Vec::new();
            let m = get(&format!("{base}/v2/{repo}/manifests/v1?ns={ns}"), false).await;
            statuses.push(m.status().as_u16());
            if m.status() != 200 {
                return (statuses, Some(error_code(m).await));
            }
            for (d, _) in &img.layers {
                let b = get(&format!("{base}/v2/{repo}/blobs/{d}?ns={ns}"), false).await;
                statuses.push(b.status().as_u16());
                let body = b.bytes().await.unwrap();
                assert_eq!(&crate::support::image::sha256_digest(&body), d);
            }
            (statuses, None)
        }
    };

    // Anonymous: public pulls, private is denied with a clear message.
    let (s, err) = pull("anon.registry.test", "public/app").await;
    assert_eq!(s, vec![200, 200, 200], "{err:?}\n{}", berth.log());
    let (s, err) = pull("anon.registry.test", "private/app").await;
    assert_eq!(s, vec![403]);
    let (_, code, message) = err.unwrap();
    assert_eq!(code, "DENIED");
    assert!(
        message.contains("anon.registry.test") && message.contains("credentials"),
        "{message}"
    );

    // Configured credentials (password file, docker config) pull the private repository.
    let before = issuer.request_count();
    let (s, err) = pull("alice.registry.test", "private/app").await;
    assert_eq!(s, vec![200, 200, 200], "{err:?}\n{}", berth.log());
    // One token for the scope, reused for the manifest and both blobs.
    assert_eq!(
        issuer.request_count() - before,
        1,
        "{:?}",
        issuer.requests()
    );
    let (s, err) = pull("dockercfg.registry.test", "private/app").await;
    assert_eq!(s, vec![200, 200, 200], "{err:?}");

    // Wrong credentials: a clear 403, not a hang.
    let started = std::time::Instant::now();
    let (s, err) = pull("wrong.registry.test", "private/app").await;
    assert_eq!(s, vec![403]);
    assert!(started.elapsed().as_secs() < 10);
    let (_, code, message) = err.unwrap();
    assert_eq!(code, "DENIED");
    // The client learns that credentials are configured and were refused, not whose.
    assert!(
        message.contains("configured credentials") && !message.contains("alice"),
        "{message}"
    );

    // Secrets never reach the log.
    let log = berth.log();
    assert!(!log.contains(PASSWORD), "password in the log");
    // (An upstream is named alice.registry.test; the username alone must not appear.)
    let without_host = |text: &str| text.replace("alice.registry.test", "");
    assert!(
        !without_host(&log).contains("alice"),
        "the upstream username in the log"
    );
    assert!(!log.contains(&auth), "docker config auth in the log");
    assert!(!log.contains("eyJ"), "a JWT in the log");
    // Nor the metrics or the status JSON (issue 5).
    let metrics = berth.metrics().await;
    let status = crate::support::http()
        .get(format!("{}/admin/status", berth.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("berth_upstream_requests_total"),
        "metrics were served"
    );
    for (name, text) in [("metrics", &metrics), ("status", &status)] {
        assert!(!text.contains(PASSWORD), "password in the {name}");
        assert!(!text.contains(&auth), "docker config auth in the {name}");
        assert!(!text.contains("eyJ"), "a JWT in the {name}");
        assert!(
            !without_host(text).contains("alice"),
            "the upstream username in the {name}"
        );
    }
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
