//! Issue 13: who may pull what. Client authentication (htpasswd, token files) with real
//! clients (skopeo, containerd), `[[access]]` rules, and private content kept private in
//! the cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::support::auth::tokens_dir;
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::containerd::Containerd;
use crate::support::front::Front;
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::JsonAnswer as _;
use crate::support::{http, require_tool, run_with_timeout_async, wait_until, CommandOutput};

/// An htpasswd file of bcrypt entries at `htpasswd -B`'s own cost.
fn htpasswd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    crate::support::auth::htpasswd_file(dir, users, 5)
}

/// How a client authenticates to berth.
#[derive(Clone, Copy)]
enum Creds<'a> {
    None,
    /// A user and password (or a token principal's name and its token).
    Basic(&'a str, &'a str),
    /// `Authorization: Bearer`, as containerd's hosts.toml header sends it.
    Token(&'a str),
}

/// `skopeo copy` of `image` (path-prefix form) from berth into an OCI layout.
async fn skopeo(berth: &Berth, image: &str, creds: Creds<'_>, dest: &Path) -> CommandOutput {
    let mut cmd = Command::new(require_tool("skopeo"));
    cmd.args([
        "copy",
        "--insecure-policy",
        "--src-tls-verify=false",
        "--retry-times=0",
        "--preserve-digests",
    ]);
    match creds {
        Creds::None => {
            cmd.arg("--src-no-creds");
        }
        Creds::Basic(u, p) => {
            cmd.arg(format!("--src-creds={u}:{p}"));
        }
        // skopeo sends a registry token only to a Bearer challenge; berth's is Basic.
        Creds::Token(_) => panic!("skopeo logs in to berth with Basic credentials"),
    }
    cmd.arg(format!("docker://{}/{image}", berth.host()))
        .arg(format!("oci:{}:out", dest.display()));
    run_with_timeout_async(cmd, Duration::from_secs(120)).await
}

/// A GET with optional credentials; containerd's Accept header.
async fn get_as(url: &str, creds: Creds<'_>) -> reqwest::Response {
    let req = http().get(url).header("accept", ACCEPT_ALL);
    let req = match creds {
        Creds::None => req,
        Creds::Basic(u, p) => req.basic_auth(u, Some(p)),
        Creds::Token(t) => req.bearer_auth(t),
    };
    req.timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

struct Upstream {
    registry: Registry,
    front: Front,
    dir: tempfile::TempDir,
}

async fn upstream() -> Upstream {
    let registry = Registry::start(RegistryOptions::default()).await;
    let front = Front::start(&registry.url()).await;
    Upstream {
        registry,
        front,
        dir: tempfile::tempdir().unwrap(),
    }
}

/// Test 1: htpasswd users pull with `skopeo --creds` and `ctr --user`; a wrong password
/// and a client without credentials (anonymous not allowed) get 401 with a challenge.
#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_users_pull_with_skopeo_and_ctr_and_others_are_challenged() {
    let up = upstream().await;
    let img = push_single(
        &up.registry,
        up.dir.path(),
        "library/app",
        "v1",
        &[200 * KIB, 64 * KIB],
        1301,
    )
    .await;
    let file = htpasswd(up.dir.path(), &[("alice", "s3cret-A"), ("bob", "s3cret-B")]);
    let berth = Berth::start_with(
        &[UpstreamSpec::docker_hub(&up.front.url())],
        &format!(
            "[auth]\nhtpasswd = \"{}\"\nanonymous = false\nrealm = \"berth-test\"\n",
            file.display()
        ),
    )
    .await;
    let base = berth.url();

    // No credentials: 401, the OCI code, and a Basic challenge (what `docker login`,
    // skopeo and containerd look for). The API base asks the same.
    for path in ["/v2/", "/v2/library/app/manifests/v1"] {
        let r = get_as(&format!("{base}{path}"), Creds::None).await;
        assert_eq!(
            header(&r, "www-authenticate"),
            "Basic realm=\"berth-test\"",
            "{path}"
        );
        let (status, code, _) = error_code(r).await;
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"), "{path}");
    }
    // A wrong password, an unknown user, a token nobody holds: 401 with the challenge.
    for creds in [
        Creds::Basic("alice", "wrong"),
        Creds::Basic("mallory", "s3cret-A"),
        Creds::Token("made-up"),
    ] {
        let r = get_as(&format!("{base}/v2/library/app/manifests/v1"), creds).await;
        assert!(header(&r, "www-authenticate").starts_with("Basic "));
        let (status, code, _) = error_code(r).await;
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    }
    // The API base with good credentials: 200, as `docker login` checks them.
    let r = get_as(&format!("{base}/v2/"), Creds::Basic("alice", "s3cret-A")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.front.content_requests().len(),
        0,
        "refused requests reached the upstream: {:?}",
        up.front.content_requests()
    );

    // skopeo with --src-creds.
    let dest = up.dir.path().join("skopeo-alice");
    let out = skopeo(
        &berth,
        "library/app:v1",
        Creds::Basic("alice", "s3cret-A"),
        &dest,
    )
    .await;
    assert!(
        out.status.success(),
        "skopeo --creds: {}\nberth log:\n{}",
        out.stderr,
        berth.log()
    );
    // skopeo without credentials is refused.
    let out = skopeo(
        &berth,
        "library/app:v1",
        Creds::None,
        &up.dir.path().join("x"),
    )
    .await;
    assert!(!out.status.success(), "an anonymous skopeo pulled");
    // Refused by berth, not failed for another reason.
    assert!(
        out.stderr.to_lowercase().contains("unauthorized"),
        "{}",
        out.stderr
    );

    // ctr --user, through a hosts.toml mirror as on a node.
    let ctrd = Containerd::start().await;
    let hosts = ctrd.write_hosts("docker.io", &base);
    let hosts_s = hosts.display().to_string();
    let out = ctrd
        .ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_s,
            "--user",
            "bob:s3cret-B",
            "docker.io/library/app:v1",
        ])
        .await;
    assert!(
        out.status.success(),
        "ctr --user: {}\n{}\nberth log:\n{}",
        out.stdout,
        out.stderr,
        berth.log()
    );
    let list = ctrd.ctr(&["images", "ls"]).await.expect_success("ls");
    assert!(
        list.stdout.contains(&img.manifest_digest),
        "{}",
        list.stdout
    );

    // Each layer went upstream once: bob's pull came from what alice's filled.
    for (digest, _) in &img.layers {
        assert_eq!(up.front.count("GET", digest), 1, "{digest}");
    }
    // Metrics and the log name the principals; refusals are counted by reason.
    let m = berth.metrics().await;
    for principal in ["alice", "bob"] {
        let pulled: f64 = m
            .lines()
            .filter(|l| {
                l.starts_with("berth_principal_requests_total{")
                    && l.contains(&format!("principal=\"{principal}\""))
                    && !l.contains("outcome=\"rejected\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(pulled >= 3.0, "{principal}: {pulled}\n{m}");
    }
    assert!(
        m.contains(
            "berth_access_refusals_total{principal=\"alice\",reason=\"credentials_invalid\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "berth_access_refusals_total{principal=\"anonymous\",reason=\"credentials_missing\"}"
        ),
        "{m}"
    );
    // An unknown user's name is client-chosen: never a label value.
    assert!(!m.contains("mallory"), "{m}");
    let log = berth.log();
    assert!(log.contains("\"principal\":\"bob\""), "{log}");
    // The status page lists the principals.
    let status: serde_json::Value = berth
        .admin_request(reqwest::Method::GET, "/admin/status")
        .json_answer()
        .await;
    let principals = status["principals"].as_array().expect("principals");
    let of = |name: &str| principals.iter().find(|p| p["principal"] == name).cloned();
    let alice = of("alice").expect("alice on the status page");
    assert!(
        alice["requests"].as_u64() >= Some(3) && alice["refused"] == 1,
        "{alice}"
    );
    assert!(
        of("bob").is_some() && of("mallory").is_none(),
        "{principals:?}"
    );
}

/// Test 2: a bearer token in containerd's hosts.toml `header` pulls; the token's file
/// removed while berth runs stops working within the reload interval.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_in_hosts_toml_pulls_until_its_file_is_removed() {
    let up = upstream().await;
    let img = push_single(
        &up.registry,
        up.dir.path(),
        "library/tok",
        "v1",
        &[128 * KIB],
        1302,
    )
    .await;
    let dir = tokens_dir(
        up.dir.path(),
        &[("ci", "tok-ci-0123456789"), ("ops", "tok-ops-987")],
    );
    let berth = Berth::start_with(
        &[UpstreamSpec::docker_hub(&up.front.url())],
        &format!(
            "[auth]\ntokens_dir = \"{}\"\nanonymous = false\nreload_interval = \"1s\"\n",
            dir.display()
        ),
    )
    .await;
    let base = berth.url();
    let ctrd = Containerd::start().await;
    // The hosts.toml a node would get, with the header table containerd sends with every
    // request to berth: written by `berth containerd-config --token-file`.
    let hosts = ctrd.hosts_dir();
    let mut cmd = std::process::Command::new(crate::support::berth::binary());
    cmd.args(["containerd-config", "--endpoint", &base, "--out"])
        .arg(&hosts)
        .arg("--config")
        .arg(&berth.config_path)
        .args(["--upstreams", "docker.io", "--token-file"])
        .arg(dir.join("ci"));
    let out = crate::support::run_with_timeout_async(cmd, Duration::from_secs(20)).await;
    assert!(out.status.success(), "containerd-config: {}", out.stderr);
    let file = hosts.join("docker.io/hosts.toml");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o600,
        "a hosts.toml holding a token is the owner's only"
    );
    // Its fallback `server` is the registry itself, which containerd would try after
    // berth's 401: this node cannot reach it (a dead port), so every pull goes by berth.
    let upstream = up.front.url();
    let text = std::fs::read_to_string(&file).unwrap();
    let dead = format!("http://127.0.0.1:{}", crate::support::free_port());
    let rewritten = text.replace(
        &format!("server = \"{upstream}\""),
        &format!("server = \"{dead}\""),
    );
    assert_ne!(rewritten, text, "no server = {upstream:?} in {text}");
    std::fs::write(&file, rewritten).unwrap();
    let out = ctrd.pull(&hosts, "docker.io/library/tok:v1").await;
    assert!(
        out.status.success(),
        "ctr with a hosts.toml header: {}\n{}\nberth log:\n{}",
        out.stdout,
        out.stderr,
        berth.log()
    );
    assert!(berth.log().contains("\"principal\":\"ci\""));

    let manifest = format!("{base}/v2/library/tok/manifests/v1");
    assert_eq!(
        get_as(&manifest, Creds::Token("tok-ci-0123456789"))
            .await
            .status(),
        200
    );
    std::fs::remove_file(dir.join("ci")).unwrap();
    let removed = std::time::Instant::now();
    let refused = wait_until(Duration::from_secs(10), || async {
        get_as(&manifest, Creds::Token("tok-ci-0123456789"))
            .await
            .status()
            == 401
    })
    .await;
    assert!(refused, "the removed token still works after 10 s");
    // Within the reload interval (1 s), with room for a loaded machine.
    assert!(
        removed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        removed.elapsed()
    );
    assert!(berth.log().contains("credentials reloaded"));
    // The other token still works; containerd with the removed one is refused.
    assert_eq!(
        get_as(&manifest, Creds::Token("tok-ops-987"))
            .await
            .status(),
        200
    );
    ctrd.ctr(&["images", "rm", "docker.io/library/tok:v1"])
        .await;
    ctrd.ctr(&["content", "prune", "references"]).await;
    let out = ctrd.pull(&hosts, "docker.io/library/tok:v1").await;
    assert!(!out.status.success(), "ctr pulled with a removed token");
    assert!(
        out.stderr.to_lowercase().contains("unauthorized"),
        "{}",
        out.stderr
    );
    let _ = img;
}

/// Test 3: team-a may pull docker.io/teama/* and not docker.io/teamb/* (403, also for a
/// blob by digest), even though both are in the cache because team-b pulled them.
#[tokio::test(flavor = "multi_thread")]
async fn rules_allow_one_team_its_repositories_and_refuse_the_other_from_the_cache() {
    let up = upstream().await;
    let a = push_single(
        &up.registry,
        up.dir.path(),
        "teama/app",
        "v1",
        &[100 * KIB],
        1303,
    )
    .await;
    let b = push_single(
        &up.registry,
        up.dir.path(),
        "teamb/app",
        "v1",
        &[90 * KIB],
        1304,
    )
    .await;
    let dir = tokens_dir(up.dir.path(), &[("team-a", "tok-a"), ("team-b", "tok-b")]);
    let berth = Berth::start_with(
        &[UpstreamSpec::docker_hub(&up.front.url())],
        &format!(
            "[auth]\ntokens_dir = \"{}\"\n\n\
             [[access]]\nprincipals = [\"team-a\"]\nrepositories = [\"docker.io/teama/*\", \"docker.io/library/*\"]\n\n\
             [[access]]\nprincipals = [\"team-b\"]\nrepositories = [\"docker.io/teama/*\", \"docker.io/teamb/*\"]\n",
            dir.display()
        ),
    )
    .await;
    // team-b pulls both into the cache.
    for image in ["teama/app:v1", "teamb/app:v1"] {
        let dest = up
            .dir
            .path()
            .join(format!("b-{}", image.replace([':', '/'], "-")));
        skopeo(&berth, image, Creds::Basic("team-b", "tok-b"), &dest)
            .await
            .expect_success(image);
    }
    let upstream_before = up.front.content_requests().len();
    // team-a: its own repository from the cache...
    let dest = up.dir.path().join("a-teama");
    skopeo(
        &berth,
        "teama/app:v1",
        Creds::Basic("team-a", "tok-a"),
        &dest,
    )
    .await
    .expect_success("team-a pulls teama/app");
    assert_eq!(
        up.front.content_requests().len(),
        upstream_before,
        "team-a's pull was not served from the cache: {:?}",
        up.front.content_requests()
    );
    // ... and not team-b's, though it is stored: 403 DENIED naming the repository.
    let out = skopeo(
        &berth,
        "teamb/app:v1",
        Creds::Basic("team-a", "tok-a"),
        &up.dir.path().join("a-b"),
    )
    .await;
    assert!(!out.status.success(), "team-a pulled teamb/app");
    assert!(
        out.stderr.to_lowercase().contains("denied"),
        "{}",
        out.stderr
    );
    let base = berth.url();
    for url in [
        format!("{base}/v2/teamb/app/manifests/v1"),
        format!("{base}/v2/teamb/app/manifests/{}", b.manifest_digest),
        format!("{base}/v2/teamb/app/blobs/{}", b.layers[0].0),
        format!("{base}/v2/teamb/app/tags/list"),
    ] {
        let (status, code, message) = error_code(get_as(&url, Creds::Token("tok-a")).await).await;
        assert_eq!((status, code.as_str()), (403, "DENIED"), "{url}");
        assert!(message.contains("docker.io/teamb/app"), "{message}");
        assert!(!message.contains("access"), "the rule leaks: {message}");
    }
    // Without credentials: challenged (anonymous may pull nothing here).
    let r = get_as(&format!("{base}/v2/teama/app/manifests/v1"), Creds::None).await;
    assert_eq!(r.status(), 401);
    assert!(header(&r, "www-authenticate").starts_with("Basic "));
    assert_eq!(up.front.content_requests().len(), upstream_before);
    let refused = berth
        .metric("berth_access_refusals_total{principal=\"team-a\",reason=\"not_allowed\"}")
        .await;
    assert!(refused >= 4.0, "{refused}");
    let log = berth.log();
    assert!(
        log.lines().any(|l| l.contains("\"principal\":\"team-a\"")
            && l.contains("\"status\":403")
            && l.contains("teamb/app")),
        "{log}"
    );
    let _ = a;
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new(require_tool("openssl"));
    cmd.current_dir(dir).args(args);
    crate::support::run_with_timeout(cmd, Duration::from_secs(60)).expect_success("openssl");
}

/// A CA (`<name>-ca.pem`) and a client certificate it signed for `cn`, in `dir/<name>/`
/// as skopeo's `--src-cert-dir` wants it (`client.cert`, `client.key`).
fn client_cert(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let certs = dir.join(name);
    std::fs::create_dir_all(&certs).unwrap();
    let ca = dir.join(format!("{name}-ca.pem"));
    let ca_key = dir.join(format!("{name}-ca.key"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_s, ca_key_s) = (ca.display().to_string(), ca_key.display().to_string());
    let mut req = vec!["req", "-x509"];
    req.extend(ec);
    req.extend(["-days", "2", "-subj", "/CN=berth test client CA"]);
    req.extend(["-keyout", &ca_key_s, "-out", &ca_s]);
    openssl(dir, &req);
    let (key, csr, cert) = (
        certs.join("client.key"),
        dir.join(format!("{name}.csr")),
        certs.join("client.cert"),
    );
    let (key_s, csr_s, cert_s) = (
        key.display().to_string(),
        csr.display().to_string(),
        cert.display().to_string(),
    );
    let subj = format!("/CN={cn}");
    let mut req = vec!["req", "-new"];
    req.extend(ec);
    req.extend(["-subj", &subj, "-keyout", &key_s, "-out", &csr_s]);
    openssl(dir, &req);
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "extendedKeyUsage = clientAuth\n").unwrap();
    let ext_s = ext.display().to_string();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr_s,
            "-CA",
            &ca_s,
            "-CAkey",
            &ca_key_s,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_s,
            "-out",
            &cert_s,
        ],
    );
    (ca, certs)
}

/// Client certificates (TLS): a certificate the configured CA signed makes its common
/// name the principal (skopeo `--src-cert-dir`); one from another CA fails the
/// handshake; no certificate at all falls back to the other ways (here: refused).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_names_the_principal() {
    use crate::support::berth::Extra;
    let up = upstream().await;
    push_single(
        &up.registry,
        up.dir.path(),
        "library/cert",
        "v1",
        &[64 * KIB],
        1306,
    )
    .await;
    let (ca, team_a) = client_cert(up.dir.path(), "good", "team-a");
    let (_, rogue) = client_cert(up.dir.path(), "rogue", "team-a");
    let server = crate::support::bench::SelfSigned::new();
    let extra = Extra {
        server: server.server_lines(),
        top: format!(
            "[auth]\nclient_ca = \"{}\"\nanonymous = false\n\n\
             [[access]]\nprincipals = [\"team-a\"]\nrepositories = [\"docker.io/library/*\"]\n",
            ca.display()
        ),
        ..Extra::default()
    };
    let berth = Berth::start_opts(&[UpstreamSpec::docker_hub(&up.front.url())], &extra).await;
    let copy = |cert_dir: Option<PathBuf>, out: &str| {
        let dest = up.dir.path().join(out);
        let mut cmd = Command::new(require_tool("skopeo"));
        cmd.args([
            "copy",
            "--insecure-policy",
            "--src-tls-verify=false",
            "--retry-times=0",
        ]);
        if let Some(d) = cert_dir {
            cmd.arg("--src-cert-dir").arg(d);
        }
        cmd.arg(format!(
            "docker://127.0.0.1:{}/library/cert:v1",
            berth.addr.port()
        ))
        .arg(format!("oci:{}:out", dest.display()));
        run_with_timeout_async(cmd, Duration::from_secs(120))
    };
    let out = copy(Some(team_a), "with-cert").await;
    assert!(
        out.status.success(),
        "skopeo with a client certificate: {}\nberth log:\n{}",
        out.stderr,
        berth.log()
    );
    assert!(berth.log().contains("\"principal\":\"team-a\""));
    let out = copy(Some(rogue), "rogue").await;
    assert!(
        !out.status.success(),
        "a certificate of another CA was accepted"
    );
    // Refused in the handshake: a certificate error, or (when skopeo retries the ping
    // over plain HTTP) berth's TLS alert record (content type 21, `\x15\x03\x03`) as the
    // answer it quotes (escaped once or twice).
    assert!(
        out.stderr.to_lowercase().contains("certificate")
            || out.stderr.replace('\\', "").contains("x15x03x03"),
        "{}",
        out.stderr
    );
    let out = copy(None, "none").await;
    assert!(
        !out.status.success(),
        "no certificate, no credentials, and yet pulled"
    );
    assert!(out.stderr.contains("unauthorized"), "{}", out.stderr);
}

/// Test 5: a private repository fetched (with the org's robot account) for a principal
/// allowed it is refused to another principal, and so is its blob by digest through a
/// public repository that does not hold it; once the upstream confirms, anonymously,
/// that the public repository holds the blob, it is served there from the cache.
#[tokio::test(flavor = "multi_thread")]
async fn private_content_stays_private_in_the_cache() {
    use crate::support::image::{build_image, push, ImageSpec, Platform, LAYOUT_REF};
    use crate::support::token::{TokenIssuer, TokenPolicy};
    const ROBOT: &str = "r0bot-Passw0rd";
    let issuer = TokenIssuer::start(
        TokenPolicy::default()
            .anonymous_pull("public/")
            .user("orgbot", ROBOT),
    )
    .await;
    let registry = Registry::start(RegistryOptions::default().with_token_auth(&issuer)).await;
    let front = Front::start(&registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let private = build_image(
        &dir.path().join("private"),
        &ImageSpec {
            layer_sizes: vec![96 * KIB, 32 * KIB],
            seed: 1305,
        },
        Platform::LINUX_AMD64,
    );
    let public = build_image(
        &dir.path().join("public"),
        &ImageSpec {
            layer_sizes: vec![40 * KIB],
            seed: 1306,
        },
        Platform::LINUX_AMD64,
    );
    let creds = Some(("orgbot", ROBOT));
    let host = registry.host();
    push(
        &private.layout,
        LAYOUT_REF,
        &format!("{host}/private/app:v1"),
        creds,
    )
    .await;
    push(
        &public.layout,
        LAYOUT_REF,
        &format!("{host}/public/web:v1"),
        creds,
    )
    .await;
    let password = dir.path().join("robot-password");
    std::fs::write(&password, format!("{ROBOT}\n")).unwrap();
    let tokens = tokens_dir(dir.path(), &[("ops", "tok-ops"), ("dev", "tok-dev")]);
    let berth = Berth::start_with(
        &[UpstreamSpec::docker_hub(&front.url()).extra(&format!(
            "redirect_allow = [\"127.0.0.1\"]\n\
             [[upstreams.credentials]]\nname = \"robot\"\nrepositories = [\"private/*\"]\n\
             username = \"orgbot\"\npassword_file = \"{}\"\n",
            password.display()
        ))],
        &format!(
            "[auth]\ntokens_dir = \"{}\"\nanonymous = false\n\n\
             [[access]]\nprincipals = [\"ops\"]\nrepositories = [\"docker.io/private/*\", \"docker.io/public/*\"]\n\n\
             [[access]]\nprincipals = [\"dev\"]\nrepositories = [\"docker.io/public/*\"]\n",
            tokens.display()
        ),
    )
    .await;
    // ops pulls the private image: berth fetches it with the robot account.
    let dest = dir.path().join("ops-private");
    let out = skopeo(
        &berth,
        "private/app:v1",
        Creds::Basic("ops", "tok-ops"),
        &dest,
    )
    .await;
    assert!(
        out.status.success(),
        "ops pulls private/app: {}\nberth log:\n{}",
        out.stderr,
        berth.log()
    );
    assert!(
        issuer
            .requests()
            .iter()
            .any(|r| r.user.as_deref() == Some("orgbot")
                && r.scopes.iter().any(|s| s.contains("private/app"))),
        "the robot account was not used: {:?}",
        issuer.requests()
    );
    let (layer, _) = private.layers[0].clone();
    assert!(wait_stored(berth.data_dir(), &layer).await);
    let base = berth.url();
    // dev: not the private repository, cached or not.
    for url in [
        format!("{base}/v2/private/app/manifests/v1"),
        format!("{base}/v2/private/app/blobs/{layer}"),
    ] {
        let (status, code, _) = error_code(get_as(&url, Creds::Token("tok-dev")).await).await;
        assert_eq!((status, code.as_str()), (403, "DENIED"), "{url}");
    }
    // dev asks for the private layer through the public repository: berth asks the
    // upstream whether public/web holds it, anonymously (public/* has no credential),
    // and it does not.
    let tokens_before = issuer.requests().len();
    let through_public = format!("{base}/v2/public/web/blobs/{layer}");
    let (status, code, _) =
        error_code(get_as(&through_public, Creds::Token("tok-dev")).await).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    // (Twice: the registry challenges the first HEAD, berth fetches a token, asks again.)
    assert_eq!(front.count("HEAD", &format!("public/web/blobs/{layer}")), 2);
    let asked: Vec<_> = issuer.requests()[tokens_before..].to_vec();
    // The challenged HEAD made berth ask for a token: an empty list would pass the check
    // below without proving anything.
    assert!(!asked.is_empty(), "berth fetched no token for public/web");
    assert!(
        asked.iter().all(|r| r.user.is_none()),
        "the public repository was asked with credentials: {asked:?}"
    );
    // The public repository gets the layer upstream: now the upstream confirms it there,
    // anonymously, and berth serves it from the cache (one GET of the layer in all).
    push(
        &private.layout,
        LAYOUT_REF,
        &format!("{host}/public/web:v2"),
        creds,
    )
    .await;
    let r = get_as(&through_public, Creds::Token("tok-dev")).await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(crate::support::image::sha256_digest(&body), layer);
    assert_eq!(
        front.count("GET", &layer),
        1,
        "{:?}",
        front.content_requests()
    );
}

/// `berth check-config` reads the files `[auth]` names, as `serve` would: a missing tokens
/// directory or a malformed htpasswd file is reported with its key before a rollout.
#[tokio::test(flavor = "multi_thread")]
async fn check_config_reads_the_auth_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = htpasswd(dir.path(), &[("alice", "pw")]);
    let bad = dir.path().join("bad-htpasswd");
    std::fs::write(&bad, "alice-without-a-hash\n").unwrap();
    let tokens = tokens_dir(dir.path(), &[("ci", "tok")]);
    let check = |auth: String| {
        let config = dir.path().join(format!(
            "berth-{}.toml",
            crate::support::image::sha256_hex(auth.as_bytes())
        ));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [storage]\nroot = \"{}\"\n\
                 [[upstreams]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(crate::support::berth::binary());
        cmd.args(["check-config"]).arg(&config);
        run_with_timeout_async(cmd, Duration::from_secs(20))
    };
    let ok = check(format!(
        "[auth]\nhtpasswd = \"{}\"\ntokens_dir = \"{}\"\n",
        good.display(),
        tokens.display()
    ))
    .await;
    assert!(ok.status.success(), "{ok:?}");
    for (auth, key) in [
        (
            format!(
                "[auth]\ntokens_dir = \"{}\"\n",
                dir.path().join("nope").display()
            ),
            "auth.tokens_dir",
        ),
        (
            format!("[auth]\nhtpasswd = \"{}\"\n", bad.display()),
            "auth.htpasswd",
        ),
        (
            format!("[auth]\nclient_ca = \"{}\"\n", good.display()),
            "auth.client_ca needs TLS",
        ),
    ] {
        let out = check(auth).await;
        assert!(!out.status.success(), "{key}: {out:?}");
        assert!(out.stderr.contains(key), "{key}: {}", out.stderr);
    }
}
