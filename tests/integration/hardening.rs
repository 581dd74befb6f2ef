//! Hostile upstreams and clients (issue 11): redirects to internal addresses, silent and
//! trickling sockets, idle HTTP/2 connections, slow bodies, floods of cold requests.

use std::time::Duration;

use crate::common::{World, KIB};
use crate::support::berth::{Berth, UpstreamSpec};
use crate::support::front::Faults;
use crate::support::http;

/// The OCI error code and message of a failed answer.
async fn oci_error(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    (status, body)
}

/// Redirects: to another loopback port (refused), to a name that resolves to loopback
/// (refused), to the upstream's own origin (followed), to an allowlisted address
/// (followed), and to berth's own admin port (refused even when allowlisted).
#[tokio::test]
async fn redirects_go_only_where_the_policy_allows() {
    let w = World::start("10m").await;
    let img = w.push_image("library/redir", "v1", &[64 * KIB], 71).await;
    let (layer, _) = img.layers[0].clone();
    let registry = w.registry.url();
    let registry_port = w.registry.addr().port();
    let blob = |berth: &Berth| format!("{}/v2/library/redir/blobs/{layer}", berth.url());
    let client = http();

    // A CDN on another loopback port: loopback is internal, so refused, with a 502 that
    // names the upstream and the target; the refusal is counted.
    w.front.set_faults(Faults {
        redirect: Some(("/blobs/".into(), format!("{registry}{{path}}"))),
        ..Faults::default()
    });
    let (status, body) = oci_error(client.get(blob(&w.berth)).send().await.unwrap()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("docker.io"), "{body}");
    assert!(
        body.contains(&format!("127.0.0.1:{registry_port}")),
        "{body}"
    );
    assert!(body.contains("loopback"), "{body}");
    let refused = "berth_upstream_refused_redirects_total{upstream=\"docker.io\"}";
    assert!(w.berth.metric(refused).await >= 1.0);

    // A name is judged by what it resolves to: localhost is loopback.
    w.front.set_faults(Faults {
        redirect: Some((
            "/blobs/".into(),
            format!("http://localhost:{registry_port}{{path}}"),
        )),
        ..Faults::default()
    });
    let (status, body) = oci_error(client.get(blob(&w.berth)).send().await.unwrap()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("localhost"), "{body}");

    // The upstream's own origin is followed.
    w.front.set_faults(Faults {
        redirect: Some(("/blobs/".into(), format!("{}/cdn{{path}}", w.front.url()))),
        ..Faults::default()
    });
    let resp = client.get(blob(&w.berth)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.as_ref(), img.read_blob(&layer).as_slice());
    assert!(w.front.count("GET", "/cdn/v2/library/redir/blobs/") >= 1);

    // An allowlisted target is followed; berth's own admin port never is.
    let listed = Berth::start(&[
        UpstreamSpec::docker_hub(&w.front.url()).extra("redirect_allow = [\"127.0.0.1\"]")
    ])
    .await;
    w.front.set_faults(Faults {
        redirect: Some(("/blobs/".into(), format!("{registry}{{path}}"))),
        ..Faults::default()
    });
    let resp = client.get(blob(&listed)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), img.read_blob(&layer));
    w.front.set_faults(Faults {
        redirect: Some((
            "/manifests/".into(),
            format!("{}/metrics", listed.admin_url()),
        )),
        ..Faults::default()
    });
    let manifest = format!("{}/v2/library/redir/manifests/v1", listed.url());
    let (status, body) = oci_error(client.get(&manifest).send().await.unwrap()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("berth's own listeners"), "{body}");
    assert!(!body.contains("berth_"), "metrics text leaked: {body}");
    assert!(listed.metric(refused).await >= 1.0);
}

/// 60 silent and 20 trickling sockets against `max_connections = 50`: berth closes them at
/// `header_read_timeout` (2 s in the harness), counted from accept, and a real client is
/// served within 3 s.
#[tokio::test]
async fn silent_and_trickling_sockets_do_not_take_the_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start_with("10m", "", "").await;
    let berth = Berth::start_with_server(
        &[UpstreamSpec::docker_hub(&w.front.url())],
        "max_connections = 50\n",
    )
    .await;
    let addr = berth.host();
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..60 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut tricklers = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tricklers.push(tokio::spawn(async move {
            // One byte every 300 ms: a complete head would take 12 s.
            for b in b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n" {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                // The next byte in 300 ms, unless berth closes the socket first (the
                // event the test is about).
                let mut buf = [0u8; 1];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await
                {
                    return;
                }
            }
        }));
    }
    // A real client, as kubelet's pulls do, retries a refused connection.
    let url = format!("{}/v2/", berth.url());
    let served = crate::support::wait_until(Duration::from_secs(5), || {
        let url = url.clone();
        async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap();
            matches!(client.get(&url).send().await, Ok(r) if r.status() == 200)
        }
    })
    .await
    .then(|| started.elapsed());
    let served = served.expect("a real client was never served");
    assert!(served < Duration::from_secs(3), "served after {served:?}");
    // Every silent socket is closed by berth (EOF or reset), none held to idle_timeout.
    for (i, s) in silent.iter_mut().enumerate() {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "silent socket {i} still open after {:?}: {read:?}",
            started.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(6));
    for t in tricklers {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("a trickling socket was not closed")
            .unwrap();
    }
    assert!(
        berth
            .metric("berth_connections_refused_total{reason=\"max_connections\"}")
            .await
            >= 1.0
    );
}

/// An HTTP/2 (h2c) connection with nothing in flight closes at `idle_timeout`, although
/// the client pings it every 300 ms (pings used to reset the idle timer forever).
#[tokio::test]
async fn an_idle_h2_connection_closes_at_idle_timeout() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let w = World::start_with("10m", "", "").await;
    let berth = Berth::start_with_server(
        &[UpstreamSpec::docker_hub(&w.front.url())],
        "idle_timeout = \"2s\"\n",
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(berth.host()).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(tcp))
        .await
        .expect("h2c handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("{}/v2/", berth.url()))
        .body(Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("h2c request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    resp.into_body().collect().await.unwrap();
    let idle_from = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let idle = idle_from.elapsed();
    assert!(
        closed.is_ok(),
        "the idle h2 connection was still open after 10 s"
    );
    assert!(
        idle >= Duration::from_millis(1800) && idle < Duration::from_secs(5),
        "closed after {idle:?}, idle_timeout is 2 s"
    );
}

/// A manifest body sent one byte every 200 ms never stalls, but `body_timeout` bounds it:
/// the one coalesced fetch gives up at its deadline and every waiting client gets the
/// error, quickly, instead of hanging with it.
#[tokio::test]
async fn a_slow_loris_manifest_body_fails_every_follower_at_the_deadline() {
    let w = World::start_with("10m", "body_timeout = \"2s\"", "").await;
    w.push_image("library/loris", "v1", &[4 * KIB], 72).await;
    w.front.set_faults(Faults {
        trickle: Some(("/manifests/".into(), Duration::from_millis(200))),
        ..Faults::default()
    });
    let url = format!("{}/v2/library/loris/manifests/v1", w.berth.url());
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = http()
                    .get(&url)
                    .header("accept", crate::common::ACCEPT_ALL)
                    .send()
                    .await
                    .unwrap();
                oci_error(resp).await
            })
        })
        .collect();
    for c in clients {
        let (status, body) = tokio::time::timeout(Duration::from_secs(15), c)
            .await
            .expect("a client hung on the slow body")
            .unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("body_timeout"), "{body}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "took {took:?} with body_timeout 2s"
    );
    assert_eq!(
        w.front.count("GET", "/manifests/v1"),
        1,
        "{:?}",
        w.front.seen()
    );
}

/// 200 cold requests for 40 blobs with `max_concurrent_fills = 8`: never more than 8
/// fills run, the rest queue (and their clients wait), every client gets whole bytes, and
/// a stored blob is served in milliseconds all the while.
#[tokio::test]
async fn fills_beyond_the_cap_queue_and_hits_stay_fast() {
    let w = World::start("10m").await;
    let layers = vec![128 * KIB; 41];
    let img = w.push_image("library/many", "v1", &layers, 73).await;
    let berth = Berth::start_with_server(
        &[UpstreamSpec::docker_hub(&w.front.url())],
        "max_concurrent_fills = 8\n",
    )
    .await;
    let blob_url = |d: &str| format!("{}/v2/library/many/blobs/{d}", berth.url());
    // One blob stored before the storm: the hit.
    let (hit, _) = img.layers[40].clone();
    let warm = http().get(blob_url(&hit)).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    warm.bytes().await.unwrap();
    // Each fill takes about half a second: the storm lasts a few seconds.
    w.front.set_faults(Faults {
        throttle: Some(256 * 1024),
        ..Faults::default()
    });
    let storm: Vec<_> = (0..200)
        .map(|i| {
            let (digest, _) = img.layers[i % 40].clone();
            let url = blob_url(&digest);
            let want = img.read_blob(&digest);
            tokio::spawn(async move {
                let resp = http().get(&url).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                assert_eq!(resp.bytes().await.unwrap(), want);
            })
        })
        .collect();
    let mut peak_running = 0.0f64;
    let mut peak_queued = 0.0f64;
    let mut slowest_hit = Duration::ZERO;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !storm.iter().all(|t| t.is_finished()) && std::time::Instant::now() < deadline {
        peak_running = peak_running.max(berth.metric("berth_fills_in_flight").await);
        peak_queued = peak_queued.max(berth.metric("berth_fills_queued").await);
        let asked = std::time::Instant::now();
        let resp = http().get(blob_url(&hit)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        // Each round's three requests pace the sampling: no sleep needed.
        slowest_hit = slowest_hit.max(asked.elapsed());
    }
    for t in storm {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a queued client never got its blob")
            .unwrap();
    }
    eprintln!(
        "peak fills running {peak_running}, queued {peak_queued}, slowest hit {slowest_hit:?}"
    );
    assert!(peak_running <= 8.0, "{peak_running} fills ran at once");
    assert!(
        peak_queued >= 1.0,
        "nothing ever queued: the cap was not exercised"
    );
    assert!(
        slowest_hit < Duration::from_millis(250),
        "a hit took {slowest_hit:?}"
    );
    // Each blob was fetched once, however many clients asked.
    assert_eq!(w.front.count("GET", "/blobs/"), 41);
}

/// Uncached relays have their own cap: with `max_concurrent_passthroughs = 1` and one tags
/// list trickling in, a second is refused at once with 503 and `Retry-After`, while
/// manifests and blobs are served as usual.
#[tokio::test]
async fn passthroughs_beyond_their_cap_are_refused_not_queued() {
    let w = World::start_with("10m", "body_timeout = \"3s\"", "").await;
    let img = w.push_image("library/relay", "v1", &[4 * KIB], 74).await;
    let berth = Berth::start_with_server(
        &[UpstreamSpec::docker_hub(&w.front.url()).extra("body_timeout = \"3s\"")],
        "max_concurrent_passthroughs = 1\n",
    )
    .await;
    w.front.set_faults(Faults {
        trickle: Some(("/tags/list".into(), Duration::from_millis(100))),
        ..Faults::default()
    });
    let tags = format!("{}/v2/library/relay/tags/list", berth.url());
    let first = tokio::spawn({
        let tags = tags.clone();
        async move { http().get(&tags).send().await.unwrap().status().as_u16() }
    });
    let front = &w.front;
    assert!(
        crate::support::wait_until(Duration::from_secs(10), || async {
            front.count("GET", "/tags/list") >= 1
        })
        .await,
        "the first relay never reached upstream"
    );
    // Another list (the same one would join the first's fetch, which is not a relay).
    let second = http().get(format!("{tags}?n=1")).send().await.unwrap();
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "1");
    let (_, body) = oci_error(second).await;
    assert!(body.contains("max_concurrent_passthroughs"), "{body}");
    // Pulls do not share that cap.
    let manifest = http()
        .get(format!("{}/v2/library/relay/manifests/v1", berth.url()))
        .header("accept", crate::common::ACCEPT_ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    let (layer, _) = &img.layers[0];
    let blob = http()
        .get(format!("{}/v2/library/relay/blobs/{layer}", berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 200);
    // Only one relay went upstream; it ends (whole, or at body_timeout) by itself.
    assert_eq!(w.front.count("GET", "/tags/list"), 1);
    let status = tokio::time::timeout(Duration::from_secs(15), first)
        .await
        .expect("the first relay never ended")
        .unwrap();
    assert!(status == 200 || status == 503, "{status}");
}
