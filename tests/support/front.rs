//! A pass-through in front of the real registry that records every request it forwards and
//! can inject what no real registry does on demand: a transfer cut halfway, corrupted
//! bytes, a registry that ignores `Range`, an oversized manifest.
//!
//! Tests point berth at the front and count upstream requests from its log; everything
//! that is not a fault is the real registry's answer, byte for byte. One addition is not
//! a fault: the OCI referrers API, which distribution 2.8 lacks, answered on demand from
//! the real registry's content (see [`Front::emulate_referrers`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::hub::{Hub, HubRules, Verdict};

/// One forwarded request as the front saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub status: u16,
    pub range: Option<String>,
    /// Body bytes forwarded so far.
    pub sent: Arc<AtomicU64>,
}

/// Faults to inject. Paths are matched with `contains`.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Cut blob bodies whose path contains `.0` after `.1` bytes, the next `.2` times.
    pub cut: Option<(String, u64, u32)>,
    /// At the `cut` point, go quiet (keep the connection open, send nothing for up to a
    /// minute) instead of breaking the connection: a stalled upstream.
    pub stall: bool,
    /// Flip one byte in the middle of bodies whose path contains this.
    pub corrupt: Option<String>,
    /// Drop the `Range` header (a registry that cannot resume).
    pub ignore_range: bool,
    /// Answer GETs of paths containing `.0` with `.1` bytes of JSON padding, status 200.
    pub oversized: Option<(String, usize)>,
    /// Limit each response body to this many bytes per second (a CDN's per-connection rate).
    pub throttle: Option<u64>,
    /// Answer GETs of paths containing `.0` with `307 Location: .1`, where `{path}` in `.1`
    /// stands for the request's path and query (a CDN, or a hostile upstream). Paths under
    /// `/cdn/` are never redirected: the front serves them by dropping that prefix, so
    /// `{front}/cdn{path}` is a redirect to the upstream's own origin.
    pub redirect: Option<(String, String)>,
    /// Send bodies of GETs whose path contains `.0` one byte per `.1` (a slow-loris upstream).
    pub trickle: Option<(String, Duration)>,
}

pub struct Front {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Mutex<Faults>>,
    hub: Arc<Mutex<Option<Arc<Hub>>>>,
    referrers: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// Starts a front forwarding to `upstream` (e.g. `http://127.0.0.1:5000`).
    pub async fn start(upstream: &str) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let addr = listener.local_addr().expect("front addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let hub = Arc::new(Mutex::new(None));
        let referrers = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: super::http(),
            seen: seen.clone(),
            faults: faults.clone(),
            hub: hub.clone(),
            referrers: referrers.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.forward(req, peer.ip()).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Front {
            addr,
            seen,
            faults,
            hub,
            referrers,
            task,
        }
    }

    /// Answers `GET /v2/<name>/referrers/<alg>:<hex>[?artifactType=]` as a registry with
    /// the referrers API would. distribution 2.8 has none, and no real peer here does, so
    /// the front builds the answer from what clients push to such registries instead (the
    /// distribution-spec 1.1 "referrers tag schema"): an index tagged `<alg>-<hex>` in the
    /// repository, listing each referrer's descriptor with its `artifactType`. No such tag
    /// is an empty list; the registry down is a 502, as for everything else.
    pub fn emulate_referrers(&self) {
        self.referrers.store(true, Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// Requests with this method whose path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.path.contains(part))
            .count()
    }

    /// Every request to a manifest or blob (auth and `/v2/` probes left out).
    pub fn content_requests(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.contains("/manifests/") || s.path.contains("/blobs/"))
            .cloned()
            .collect()
    }

    /// Body bytes forwarded for requests with this method whose path contains `part`.
    pub fn bytes(&self, method: &str, part: &str) -> u64 {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.path.contains(part))
            .map(|s| s.sent.load(Ordering::Relaxed))
            .sum()
    }

    /// Turns on Docker Hub's rate limiting (and, with `rules.auth`, its token flow).
    pub fn enable_hub(&self, rules: HubRules) -> Arc<Hub> {
        let hub = Arc::new(Hub::new(rules, &self.url()));
        *self.hub.lock().unwrap() = Some(hub.clone());
        hub
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }
}

struct State {
    upstream: String,
    client: reqwest::Client,
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Mutex<Faults>>,
    hub: Arc<Mutex<Option<Arc<Hub>>>>,
    referrers: Arc<AtomicBool>,
}

const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

impl State {
    /// See [`Front::emulate_referrers`]; `None` when `path` is not a referrers request.
    async fn referrers(&self, path: &str) -> Option<(u16, Response<ChannelBody>)> {
        let url = reqwest::Url::parse(&format!("http://front{path}")).ok()?;
        let (name, digest) = url
            .path()
            .strip_prefix("/v2/")?
            .rsplit_once("/referrers/")?;
        let (algorithm, hex) = digest.split_once(':')?;
        let wanted = url
            .query_pairs()
            .find(|(k, _)| k == "artifactType")
            .map(|(_, v)| v.into_owned());
        let tag = format!("{}/v2/{name}/manifests/{algorithm}-{hex}", self.upstream);
        let answer = self
            .client
            .get(tag)
            .header("accept", INDEX_MEDIA_TYPE)
            .send()
            .await;
        let listed: Vec<serde_json::Value> = match answer {
            Ok(r) if r.status() == 404 => Vec::new(),
            Ok(r) if r.status().is_success() => {
                let index: serde_json::Value = r.json().await.unwrap_or_default();
                index["manifests"].as_array().cloned().unwrap_or_default()
            }
            Ok(r) => return Some(empty(r.status().as_u16())),
            Err(_) => return Some(empty(502)),
        };
        let manifests: Vec<serde_json::Value> = listed
            .into_iter()
            .filter(|m| wanted.as_ref().is_none_or(|t| m["artifactType"] == **t))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": manifests,
        }))
        .expect("referrers JSON");
        let mut resp = Response::builder()
            .header("content-type", INDEX_MEDIA_TYPE)
            .header("content-length", body.len());
        if wanted.is_some() {
            resp = resp.header("oci-filters-applied", "artifactType");
        }
        Some((
            200,
            resp.body(ChannelBody::full(Bytes::from(body))).unwrap(),
        ))
    }

    async fn forward(&self, req: Request<Incoming>, peer: IpAddr) -> Response<ChannelBody> {
        let faults = self.faults.lock().unwrap().clone();
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let range = req
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let sent_counter = Arc::new(AtomicU64::new(0));
        let record = |status: u16| {
            self.seen.lock().unwrap().push(Seen {
                method: method.to_string(),
                path: path.clone(),
                status,
                range: range.clone(),
                sent: sent_counter.clone(),
            });
        };
        if self.referrers.load(Ordering::Relaxed) && method == hyper::Method::GET {
            if let Some((status, resp)) = self.referrers(&path).await {
                record(status);
                return resp;
            }
        }
        let hub = self.hub.lock().unwrap().clone();
        let mut identity = None;
        if let Some(hub) = &hub {
            match hub.judge(&method, &path, req.headers(), peer) {
                Verdict::Answer(resp) => {
                    record(resp.status().as_u16());
                    return resp;
                }
                Verdict::Forward { identity: id } => identity = Some(id),
            }
        }
        if let Some((part, size)) = &faults.oversized {
            if method == hyper::Method::GET && path.contains(part.as_str()) {
                record(200);
                let mut body = b"{\"schemaVersion\":2,\"pad\":\"".to_vec();
                body.resize(*size, b'x');
                body.extend_from_slice(b"\"}");
                return Response::builder()
                    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                    .header("content-length", body.len())
                    .body(ChannelBody::full(Bytes::from(body)))
                    .unwrap();
            }
        }
        if let Some((part, location)) = &faults.redirect {
            if method == hyper::Method::GET
                && path.contains(part.as_str())
                && !path.starts_with("/cdn/")
            {
                record(307);
                return Response::builder()
                    .status(307)
                    .header("location", location.replace("{path}", &path))
                    .body(ChannelBody::full(Bytes::new()))
                    .unwrap();
            }
        }
        let upstream_path = path.strip_prefix("/cdn").unwrap_or(&path);
        let mut out = self.client.request(
            method.clone(),
            format!("{}{}", self.upstream, upstream_path),
        );
        for (name, value) in req.headers() {
            // The emulator's own tokens stop here; the registry's go on (`registry_tokens`).
            let hub_auth =
                name == "authorization" && hub.as_ref().is_some_and(|h| !h.passes_auth_on());
            if name == "host" || hub_auth || (faults.ignore_range && name == "range") {
                continue;
            }
            out = out.header(name, value);
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let resp = match out.body(body).send().await {
            Ok(r) => r,
            Err(_) => {
                record(502);
                return Response::builder()
                    .status(502)
                    .body(ChannelBody::full(Bytes::new()))
                    .unwrap();
            }
        };
        let status = resp.status();
        record(status.as_u16());
        let mut builder = Response::builder().status(status);
        for (name, value) in resp.headers() {
            builder = builder.header(name, value);
        }
        if let (Some(hub), Some(id), Some(h)) = (&hub, &identity, builder.headers_mut()) {
            hub.decorate(&path, id, h);
        }
        let mut cut_at = None;
        if let Some((part, at, times)) = &faults.cut {
            if *times > 0 && path.contains(part.as_str()) && method == hyper::Method::GET {
                cut_at = Some(*at);
                let mut f = self.faults.lock().unwrap();
                if let Some(c) = f.cut.as_mut() {
                    c.2 -= 1;
                }
            }
        }
        let corrupt = faults
            .corrupt
            .as_ref()
            .is_some_and(|p| path.contains(p.as_str()) && method == hyper::Method::GET);
        let half = resp.content_length().map(|n| n / 2);
        let (tx, rx) = mpsc::channel(4);
        let throttle = faults.throttle;
        let stall = faults.stall;
        let trickle = faults
            .trickle
            .as_ref()
            .filter(|(p, _)| path.contains(p.as_str()) && method == hyper::Method::GET)
            .map(|(_, every)| *every);
        tokio::spawn(async move {
            let mut resp = resp;
            let mut sent = 0u64;
            let started = Instant::now();
            loop {
                let chunk = match resp.chunk().await {
                    Ok(Some(c)) => c,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                };
                let mut chunk = chunk.to_vec();
                if let Some(at) = cut_at {
                    if sent + chunk.len() as u64 >= at {
                        chunk.truncate((at - sent) as usize);
                        let _ = tx.send(Ok(Bytes::from(chunk))).await;
                        if stall {
                            // Silent until the client gives up (bounded: a minute).
                            let _ =
                                tokio::time::timeout(Duration::from_secs(60), tx.closed()).await;
                            return;
                        }
                        let _ = tx
                            .send(Err(std::io::Error::other("cut by the test harness")))
                            .await;
                        return;
                    }
                }
                if corrupt {
                    if let Some(h) = half {
                        if h >= sent && h < sent + chunk.len() as u64 {
                            chunk[(h - sent) as usize] ^= 0xff;
                        }
                    }
                }
                if let Some(every) = trickle {
                    // Bounded: the receiver going away ends it.
                    for byte in chunk {
                        sent += 1;
                        sent_counter.fetch_add(1, Ordering::Relaxed);
                        if tx.send(Ok(Bytes::from(vec![byte]))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(every).await;
                    }
                    continue;
                }
                sent += chunk.len() as u64;
                sent_counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                    return;
                }
                if let Some(rate) = throttle {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        builder
            .body(ChannelBody {
                rx: Some(rx),
                full: None,
            })
            .unwrap()
    }
}

fn empty(status: u16) -> (u16, Response<ChannelBody>) {
    let resp = Response::builder()
        .status(status)
        .body(ChannelBody::full(Bytes::new()))
        .unwrap();
    (status, resp)
}

/// A response body fed by a task; an error aborts the connection mid-body.
pub struct ChannelBody {
    rx: Option<mpsc::Receiver<std::io::Result<Bytes>>>,
    full: Option<Bytes>,
}

impl ChannelBody {
    pub fn full(b: Bytes) -> Self {
        ChannelBody {
            rx: None,
            full: Some(b),
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(b) = self.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
