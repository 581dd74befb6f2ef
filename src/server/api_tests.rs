//! The pull API in process: requests go straight into `api::handle` (no socket on berth's
//! side), against a small upstream on a real socket that counts what it is asked, and a
//! manual clock that the tests move past `tag_ttl` instead of sleeping through it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest as _, Sha256};

use super::{api, App};
use crate::clock::Clock;
use crate::config::Config;

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// What the upstream was asked, and whether it answers.
#[derive(Default)]
struct Upstream {
    gets: AtomicUsize,
    heads: AtomicUsize,
    down: AtomicBool,
}

/// An upstream with one image, `library/app:v1`, on 127.0.0.1 port 0.
async fn upstream() -> (SocketAddr, Arc<Upstream>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Upstream::default());
    let seen = state.clone();
    let digest = format!("sha256:{:x}", Sha256::digest(MANIFEST.as_bytes()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, digest) = (seen.clone(), digest.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (seen, digest) = (seen.clone(), digest.clone());
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        if seen.down.load(Ordering::SeqCst) {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            return Ok::<_, Infallible>(resp);
                        }
                        if req.uri().path() != "/v2/library/app/manifests/v1" {
                            *resp.status_mut() = StatusCode::NOT_FOUND;
                            return Ok(resp);
                        }
                        if req.method() == http::Method::HEAD {
                            seen.heads.fetch_add(1, Ordering::SeqCst);
                        } else {
                            seen.gets.fetch_add(1, Ordering::SeqCst);
                            *resp.body_mut() = Full::new(Bytes::from_static(MANIFEST.as_bytes()));
                        }
                        let h = resp.headers_mut();
                        h.insert("content-type", MEDIA_TYPE.parse().unwrap());
                        h.insert("docker-content-digest", digest.parse().unwrap());
                        h.insert("content-length", MANIFEST.len().into());
                        Ok(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

/// berth on `upstream` as docker.io, its store in `dir`, on a manual clock; `top` adds
/// configuration (`[auth]`, `[[access]]`).
fn berth(dir: &std::path::Path, upstream: SocketAddr, top: &str, clock: &Clock) -> Arc<App> {
    berth_with_ttl(dir, upstream, top, clock, "10m")
}

fn berth_with_ttl(
    dir: &std::path::Path,
    upstream: SocketAddr,
    top: &str,
    clock: &Clock,
    tag_ttl: &str,
) -> Arc<App> {
    let config = Config::parse(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [storage]\nroot = \"{}\"\n\
             [[upstreams]]\nhost = \"docker.io\"\nurl = \"http://{upstream}\"\ntag_ttl = \"{tag_ttl}\"\n{top}",
            dir.display()
        ),
        "test",
    )
    .unwrap();
    let mut app = crate::build(&config).unwrap();
    app.proxy.set_clock(clock.clone());
    Arc::new(app)
}

/// One request through the handler: status, headers, body.
async fn get(app: &Arc<App>, path: &str, auth: Option<&str>) -> Response<Bytes> {
    let mut req = Request::get(path).header("accept", MEDIA_TYPE);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let req = req.body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let resp = api::handle(app.clone(), req, peer).await;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, bytes)
}

/// A tag is free within `tag_ttl`, costs one HEAD after it (the clock moved, not slept
/// through), and is served stale with a Warning when the upstream cannot answer.
#[tokio::test]
async fn a_tag_is_revalidated_once_the_clock_passes_its_ttl() {
    let (addr, up) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_000_000);
    let app = berth(dir.path(), addr, "", &clock);
    let path = "/v2/library/app/manifests/v1?ns=docker.io";

    let r = get(&app, path, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.body().as_ref(), MANIFEST.as_bytes());
    assert_eq!(up.gets.load(Ordering::SeqCst), 1);

    // Within the TTL: from memory, nothing asked.
    clock.advance(599);
    assert_eq!(get(&app, path, None).await.status(), StatusCode::OK);
    assert_eq!(
        (
            up.gets.load(Ordering::SeqCst),
            up.heads.load(Ordering::SeqCst)
        ),
        (1, 0)
    );

    // Past it: one HEAD, no GET (the digest did not move), then fresh again.
    clock.advance(2);
    assert_eq!(get(&app, path, None).await.status(), StatusCode::OK);
    assert_eq!(get(&app, path, None).await.status(), StatusCode::OK);
    assert_eq!(
        (
            up.gets.load(Ordering::SeqCst),
            up.heads.load(Ordering::SeqCst)
        ),
        (1, 1)
    );

    // Past it again, with the upstream failing: the stored copy, with a Warning.
    up.down.store(true, Ordering::SeqCst);
    clock.advance(601);
    let r = get(&app, path, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let warning = r.headers().get("warning").expect("a Warning header");
    assert!(
        warning.to_str().unwrap().starts_with("299 - \"berth:"),
        "{warning:?}"
    );
    assert_eq!(r.body().as_ref(), MANIFEST.as_bytes());
}

/// A TTL under a few seconds is measured in milliseconds: 1.5 s means 1.5 s, not "the
/// next whole second or two".
#[tokio::test]
async fn a_short_ttl_runs_out_to_the_millisecond() {
    let (addr, up) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(1_000_000);
    clock.advance_millis(700); // not on a whole second
    let app = berth_with_ttl(dir.path(), addr, "", &clock, "1500ms");
    let path = "/v2/library/app/manifests/v1?ns=docker.io";
    assert_eq!(get(&app, path, None).await.status(), StatusCode::OK);
    let asked = || {
        (
            up.gets.load(Ordering::SeqCst),
            up.heads.load(Ordering::SeqCst),
        )
    };
    assert_eq!(asked(), (1, 0));
    clock.advance_millis(1_499);
    assert_eq!(get(&app, path, None).await.status(), StatusCode::OK);
    assert_eq!(asked(), (1, 0), "fresh 1.499 s after the fill");
    clock.advance_millis(1);
    assert_eq!(get(&app, path, None).await.status(), StatusCode::OK);
    assert_eq!(asked(), (1, 1), "revalidated 1.5 s after the fill");
}

/// Authentication and rules in process: the API base challenges, a token pulls what its
/// rule allows and is refused the rest, and neither refusal reaches the upstream.
#[tokio::test]
async fn rules_are_checked_before_the_upstream_is_asked() {
    let (addr, up) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(tokens.join("team-a"), "tok-a").unwrap();
    let top = format!(
        "[auth]\ntokens_dir = \"{}\"\n[[access]]\nprincipals = [\"team-a\"]\nrepositories = [\"docker.io/library/*\"]\n",
        tokens.display()
    );
    let store = dir.path().join("store");
    let app = berth(&store, addr, &top, &Clock::manual(1));
    let r = get(&app, "/v2/", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"berth\"");
    let ok = get(&app, "/v2/library/app/manifests/v1", Some("Bearer tok-a")).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let denied = get(&app, "/v2/teamb/app/manifests/v1", Some("Bearer tok-a")).await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let body = String::from_utf8_lossy(denied.body());
    assert!(
        body.contains("DENIED") && body.contains("docker.io/teamb/app"),
        "{body}"
    );
    let anonymous = get(&app, "/v2/teamb/app/manifests/v1", None).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        (
            up.gets.load(Ordering::SeqCst),
            up.heads.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
}
