//! The pull API's edges: ranges, HEADs, pass-throughs, HTTP/2, timeouts, graceful
//! shutdown, and the CLI's config check.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::support::berth::binary;
use crate::support::image::sha256_digest;
use crate::support::JsonAnswer as _;
use crate::support::{http, run_with_timeout_async, wait_until};

async fn get_range(url: &str, range: &str) -> reqwest::Response {
    http()
        .get(url)
        .header("range", range)
        .send()
        .await
        .expect("GET with Range")
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_heads_and_passthroughs() {
    let w = World::start("10m").await;
    let img = w
        .push_image("library/app", "v1", &[3 * MIB, 100 * KIB], 60)
        .await;
    for tag in ["v2", "v3", "v4"] {
        w.push_image("library/app", tag, &[KIB], 60).await;
    }
    let (big, big_size) = img.layers[0].clone();
    let bytes = img.read_blob(&big);
    let url = format!("{}/v2/library/app/blobs/{big}", w.berth.url());

    // HEAD on a miss asks upstream with a HEAD and starts no fill.
    let r = get(&url, true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), big_size.to_string());
    assert_eq!(header(&r, "docker-content-digest"), big);
    assert_eq!(w.front.count("GET", &big), 0);

    // A range on a miss starts the fill and gets exactly its bytes.
    let r = get_range(&url, "bytes=1000-1999").await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range"),
        format!("bytes 1000-1999/{big_size}")
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[1000..2000]);

    // Hits: full, range, suffix, open-ended, unsatisfiable.
    let r = get(&url, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag"), format!("\"{big}\""));
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), big);
    let n = big_size as usize;
    for (range, from, to) in [
        ("bytes=0-0", 0, 1),
        ("bytes=-100", n - 100, n),
        (&format!("bytes={}-", n - 10) as &str, n - 10, n),
        ("bytes=5-99999999999", 5, n),
    ] {
        let r = get_range(&url, range).await;
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            format!("bytes {from}-{}/{n}", to - 1),
            "{range}"
        );
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            &bytes[from..to],
            "{range}"
        );
    }
    let r = get_range(&url, &format!("bytes={n}-")).await;
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "content-range"), format!("bytes */{n}"));
    assert_eq!(w.front.count("GET", &big), 1, "one fill served all of that");

    // tags/list: n and last reach upstream, and its answer comes back verbatim
    // (distribution 2.8 itself ignores n; newer registries paginate with a Link header).
    for query in ["n=2", "n=5&last=v2"] {
        let via_berth = http()
            .get(format!(
                "{}/v2/library/app/tags/list?{query}",
                w.berth.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(via_berth.status(), 200);
        assert!(header(&via_berth, "content-type").starts_with("application/json"));
        let direct = http()
            .get(format!(
                "{}/v2/library/app/tags/list?{query}",
                w.registry.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(
            via_berth.bytes().await.unwrap(),
            direct.bytes().await.unwrap()
        );
        assert_eq!(
            w.front.count("GET", &format!("/tags/list?{query}")),
            1,
            "{query}"
        );
    }
    let v: serde_json::Value = http()
        .get(format!("{}/v2/app/tags/list", w.berth.url()))
        .json_answer()
        .await;
    assert_eq!(v["name"], "library/app");
    let mut tags: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
    tags.sort();
    assert_eq!(tags, ["v1", "v2", "v3", "v4"]);

    // Referrers go to upstream (distribution 2.8 has no referrers API: its 404 comes back).
    let r = http()
        .get(format!(
            "{}/v2/library/app/referrers/{}",
            w.berth.url(),
            img.manifest_digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(w.front.count("GET", "/referrers/"), 1);

    // HTTP/2 (prior knowledge, as h2c) serves the same bytes.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/v2/library/app/manifests/v1", w.berth.url()))
        .header("accept", ACCEPT_ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap().as_ref(), img.manifest.as_slice());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_inflight_responses_finish_and_slow_headers_time_out() {
    let mut w = World::start("10m").await;
    let img = w.push_image("library/app", "v1", &[24 * MIB], 61).await;
    let (layer, _) = img.layers[0].clone();
    let url = format!("{}/v2/library/app/blobs/{layer}", w.berth.url());
    get(&url, false).await.bytes().await.unwrap(); // now stored

    // A client that sends half a request line is cut off after header_read_timeout (2s).
    let mut slow = tokio::net::TcpStream::connect(w.berth.addr).await.unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "slow headers were not timed out");
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // A slow reader is mid-download when SIGTERM arrives: its response completes.
    let mut resp = http().get(&url).send().await.unwrap();
    let mut got = resp.chunk().await.unwrap().unwrap().to_vec();
    let pid = w.berth.pid().unwrap();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // New connections are refused while the old one drains: once berth has taken the
    // signal (it closes its listener), which this waits for instead of a guessed 300 ms.
    let addr = w.berth.addr;
    let closed = wait_until(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(closed, "berth still accepts connections 10 s after SIGTERM");
    assert!(tokio::net::TcpStream::connect(w.berth.addr).await.is_err());
    while let Some(c) = resp.chunk().await.expect("in-flight body completes") {
        got.extend_from_slice(&c);
    }
    assert_eq!(sha256_digest(&got), layer);
    w.berth.stop();
    assert!(w.berth.log().contains("shutting down"));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let run = |text: &str, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("check-config").arg(&path);
        run_with_timeout_async(cmd, Duration::from_secs(20))
    };
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/berth.toml")).unwrap();
    let out = run(&good, "good.toml").await;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("ok"), "{}", out.stdout);
    for (text, key) in [
        (
            good.replace("tag_ttl = \"10m\"", "tag_ttl = \"soon\""),
            "tag_ttl",
        ),
        (
            good.replace("max_size = \"20GiB\"", "max_size = \"lots\""),
            "max_size",
        ),
        (
            good.replace("[routing]", "[routing]\nfallback = 1"),
            "fallback",
        ),
        (
            good.replace(
                "default_upstream = \"docker.io\"",
                "default_upstream = \"nope.io\"",
            ),
            "routing.default_upstream",
        ),
        (
            good.replace(
                "# username = \"me\"\n# password_file",
                "username = \"me\"\npassword_file",
            ),
            "password_file",
        ),
    ] {
        let out = run(&text, "bad.toml").await;
        assert!(!out.status.success(), "accepted a config with bad {key}");
        assert!(out.stderr.contains(key), "{key}: {}", out.stderr);
    }
    let mut cmd = Command::new(binary());
    cmd.arg("version");
    let out = run_with_timeout_async(cmd, Duration::from_secs(10)).await;
    assert!(out.stdout.starts_with("berth "), "{}", out.stdout);
}

/// The idle timeout: a keep-alive connection on which nothing moves is closed.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed() {
    let registry = crate::support::registry::Registry::start(Default::default()).await;
    let berth = crate::support::berth::Berth::start_with_server(
        &[crate::support::berth::UpstreamSpec::docker_hub(
            &registry.url(),
        )],
        "idle_timeout = \"1s\"",
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(berth.addr).await.unwrap();
    conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Keep-alive: the connection stays open for a next request, until it idles out.
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection was not closed"
    );
    let idle = started.elapsed();
    // Before the harness's 2 s header-read timeout could have closed it instead.
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_millis(1800),
        "closed after {idle:?}, not at the 1 s idle timeout"
    );
}

/// berth serves its pull API over TLS with the configured PEM files, HTTP/1.1 and HTTP/2
/// by ALPN; a key file without a key stops it at start-up with the key's name.
#[tokio::test]
async fn tls_serves_both_protocols_from_the_configured_pem_files() {
    use crate::support::berth::{Berth, Extra, UpstreamSpec};
    let cert = crate::support::bench::SelfSigned::new();
    let extra = Extra {
        server: cert.server_lines(),
        ..Extra::default()
    };
    // /v2/ never asks the upstream.
    let berth = Berth::start_opts(&[UpstreamSpec::docker_hub("http://127.0.0.1:9")], &extra).await;
    let url = format!("https://127.0.0.1:{}/v2/", berth.addr.port());
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let mut curl = Command::new(crate::support::require_tool("curl"));
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            flag,
        ])
        .args(cert.curl_args())
        .arg(&url);
        let out = run_with_timeout_async(curl, Duration::from_secs(20)).await;
        assert_eq!(
            out.stdout.trim(),
            format!("200 {version}"),
            "{flag}: {out:?}"
        );
    }

    // The certificate file where the key should be: refused, naming the key.
    let config = std::fs::read_to_string(&berth.config_path)
        .unwrap()
        .replace(
            &format!("tls_key = \"{}\"", cert.key.display()),
            &format!("tls_key = \"{}\"", cert.cert.display()),
        );
    drop(berth); // its port and store are the bad config's too
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), config).unwrap();
    let mut serve = Command::new(binary());
    serve.args(["serve", "--config"]).arg(bad.path());
    let out = run_with_timeout_async(serve, Duration::from_secs(20)).await;
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("server.tls_key"), "{}", out.stderr);
}

/// Asked for port 0, berth binds what the kernel gives and says which: in the file named
/// by `--ports-file` (JSON, written whole) and in its "berth is serving" log line. The
/// harness can then start berth without racing for free ports.
#[tokio::test(flavor = "multi_thread")]
async fn port_zero_is_reported_in_the_ports_file_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [storage]\nroot = \"{}\"\n[routing]\ndefault_upstream = \"docker.io\"\n\
             [[upstreams]]\nhost = \"docker.io\"\nurl = \"http://127.0.0.1:9\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let ports = dir.path().join("ports.json");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let child = Command::new(binary())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .arg("--ports-file")
        .arg(&ports)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn berth");
    // Killed by PID when the test ends, however it ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    assert!(
        crate::support::wait_until(Duration::from_secs(20), || async { ports.exists() }).await,
        "no ports file"
    );
    let bound: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
    let (listen, admin) = (
        bound["listen"].as_str().unwrap().to_owned(),
        bound["admin"].as_str().unwrap().to_owned(),
    );
    assert!(!listen.ends_with(":0") && !admin.ends_with(":0"), "{bound}");
    let health = http()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let base = http()
        .get(format!("http://{listen}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(base.status(), 200);
    let logged = crate::support::wait_until(Duration::from_secs(5), || async {
        std::fs::read_to_string(dir.path().join("log"))
            .unwrap_or_default()
            .contains(&format!("\"listen\":\"{listen}\""))
    })
    .await;
    assert!(logged, "the log names the bound address");
}
