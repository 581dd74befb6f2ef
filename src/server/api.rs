//! The OCI pull API: parse the request once, resolve its upstream, ask the proxy, and
//! write the answer (headers, ranges, errors). One log line per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};

use super::range::{self, RangeAnswer};
use super::response::{self, Body, API_VERSION};
use super::splice::{SplicedBody, Splicer};
use super::App;
use crate::metrics::{Kind, Outcome};
use crate::metrics::{Source, SourceLabels};
use crate::oci::{self, AcceptSet, Endpoint, ErrorCode, Route};
use crate::proxy::{BlobAnswer, BlobBody, BlobSource, Caller, ManifestAnswer};

/// What the log line and the metrics say about a request.
struct Summary {
    kind: Kind,
    outcome: Outcome,
    upstream: String,
    repository: String,
    reference: String,
}

pub async fn handle<B>(app: Arc<App>, req: Request<B>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let head = req.method() == http::Method::HEAD;
    let mut summary = Summary {
        kind: Kind::Other,
        outcome: Outcome::Rejected,
        upstream: String::new(),
        repository: String::new(),
        reference: String::new(),
    };
    let mut resp = match serve(&app, &req, peer, &mut summary).await {
        Ok(resp) => resp,
        Err(e) => {
            summary.outcome = outcome_of_error(&e);
            response::error(&e, head)
        }
    };
    resp.headers_mut()
        .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    let elapsed = started.elapsed();
    app.metrics
        .observe_request(summary.kind, summary.outcome, elapsed);
    let bytes = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    tracing::info!(
        method = %req.method(),
        ns = req.uri().query().and_then(ns_param).unwrap_or_default(),
        upstream = %summary.upstream,
        repository = %summary.repository,
        reference = %summary.reference,
        kind = summary.kind.as_str(),
        outcome = summary.outcome.as_str(),
        status = resp.status().as_u16(),
        bytes,
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        "request"
    );
    resp
}

/// The `ns` a client sent (decoded), for the log line.
fn ns_param(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

/// Client faults are rejections; everything else that fails is an error.
fn outcome_of_error(e: &oci::Error) -> Outcome {
    use ErrorCode::*;
    match e.code {
        NameInvalid | ReferenceInvalid | DigestInvalid | RangeInvalid | Unsupported
        | Unauthorized | NameUnknown => Outcome::Rejected,
        BlobUnknown | ManifestUnknown => Outcome::Miss,
        _ => Outcome::Error,
    }
}

async fn serve<B>(
    app: &Arc<App>,
    req: &Request<B>,
    peer: SocketAddr,
    summary: &mut Summary,
) -> Result<Response<Body>, oci::Error> {
    let uri = req.uri();
    let route = Route::parse(req.method(), uri.path(), uri.query())?;
    summary.kind = match &route.endpoint {
        Endpoint::Base => Kind::Base,
        Endpoint::Manifest(r) => {
            summary.reference = r.to_string();
            Kind::Manifest
        }
        Endpoint::Blob(d) => {
            summary.reference = d.to_string();
            Kind::Blob
        }
        Endpoint::TagsList { .. } => Kind::Tags,
        Endpoint::Referrers { digest, .. } => {
            summary.reference = digest.to_string();
            Kind::Referrers
        }
    };
    if route.endpoint == Endpoint::Base {
        summary.outcome = Outcome::Hit;
        let mut resp = Response::new(if route.head {
            Body::empty()
        } else {
            Body::bytes(Bytes::from_static(b"{}"))
        });
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(resp);
    }
    let (up, repo) = app.upstreams.resolve(route.ns.as_deref(), route.name)?;
    let caller = caller(app, req, peer)?;
    // The host a path-prefix client named (`/v2/ghcr.io/org/app/...`), if any.
    let prefix = route
        .ns
        .is_none()
        .then(|| route.name.split_once('/').map(|(first, _)| first))
        .flatten()
        .filter(|first| app.upstreams.get(first).is_some());
    summary.upstream = up.host().to_owned();
    summary.repository = repo.to_string();
    let mut resp = match route.endpoint {
        // Answered above, before an upstream is resolved.
        Endpoint::Base => Response::new(Body::empty()),
        Endpoint::Manifest(reference) => {
            let accept = AcceptSet::from_headers(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let answer = app
                .proxy
                .manifest(&up, &repo, &reference, accept, &caller)
                .await?;
            summary.outcome = answer.outcome;
            manifest_response(answer, route.head)
        }
        Endpoint::Blob(digest) => {
            let answer = app
                .proxy
                .blob(&up, &repo, &digest, route.head, &caller)
                .await?;
            summary.outcome = answer.outcome;
            blob_response(
                app,
                answer,
                &digest,
                req.headers(),
                route.head,
                req.extensions().get::<Splicer>(),
            )?
        }
        Endpoint::TagsList { n, last } => {
            // (A block: the serializer is not Send, and must not live across an await.)
            let query = {
                let mut q = form_urlencoded::Serializer::new(String::new());
                if let Some(n) = n {
                    q.append_pair("n", &n.to_string());
                }
                if let Some(last) = last {
                    q.append_pair("last", &last);
                }
                Some(q.finish()).filter(|q| !q.is_empty())
            };
            let path = format!("{repo}/tags/list");
            let p =
                Box::pin(
                    app.proxy
                        .passthrough(&up, &repo, &path, query.as_deref(), Kind::Tags),
                )
                .await?;
            summary.outcome = Outcome::Passthrough;
            passthrough_response(p, route.head, prefix)
        }
        Endpoint::Referrers {
            digest,
            artifact_type,
        } => {
            let query = artifact_type.map(|t| {
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("artifactType", &t)
                    .finish()
            });
            let path = format!("{repo}/referrers/{digest}");
            let p = Box::pin(app.proxy.passthrough(
                &up,
                &repo,
                &path,
                query.as_deref(),
                Kind::Referrers,
            ))
            .await?;
            summary.outcome = Outcome::Passthrough;
            passthrough_response(p, route.head, prefix)
        }
    };
    if let Some(ns) = &route.ns {
        if let Ok(v) = HeaderValue::from_str(ns) {
            resp.headers_mut().insert("oci-namespace", v);
        }
    }
    Ok(resp)
}

/// Who asks: a replica of the fleet (its signed header verified; it names the client it
/// serves) or a client, named for per-client budgets.
fn caller<B>(app: &App, req: &Request<B>, peer: SocketAddr) -> Result<Caller, oci::Error> {
    let own_client = || app.upstreams.ledger().client_of(req.headers(), peer.ip());
    let Some(fleet) = app.proxy.fleet() else {
        return Ok(Caller {
            client: own_client(),
            forwarded: false,
        });
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match fleet.verify(req.headers(), req.method().as_str(), target) {
        Ok(Some(forwarded)) => Ok(Caller {
            client: forwarded.client,
            forwarded: true,
        }),
        Ok(None) => Ok(Caller {
            client: own_client(),
            forwarded: false,
        }),
        Err(bad) => {
            tracing::warn!(%peer, reason = bad.0, "refused a request with a bad fleet signature");
            Err(oci::Error::new(
                ErrorCode::Unauthorized,
                "the request carries a berth fleet header that does not verify",
            ))
        }
    }
}

fn digest_headers(h: &mut HeaderMap, digest: &oci::Digest) {
    let d = digest.to_string();
    if let Ok(v) = HeaderValue::from_str(&d) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{d}\"")) {
        h.insert(header::ETAG, v);
    }
}

fn manifest_response(answer: ManifestAnswer, head: bool) -> Response<Body> {
    let len = answer.bytes.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::bytes(answer.bytes)
    });
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&answer.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    digest_headers(h, &answer.digest);
    if let Some(w) = answer.warning {
        let text: String = w
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .filter(|c| *c != '"' && *c != '\\')
            .collect();
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"berth: {text}\"")) {
            h.insert(header::WARNING, v);
        }
    }
    resp
}

fn blob_response(
    app: &Arc<App>,
    answer: BlobAnswer,
    digest: &oci::Digest,
    req_headers: &HeaderMap,
    head: bool,
    splicer: Option<&Splicer>,
) -> Result<Response<Body>, oci::Error> {
    if let Some(url) = &answer.redirect {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(url.as_str()) {
            h.insert(header::LOCATION, v);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        digest_headers(h, digest);
        return Ok(resp);
    }
    let range_header = req_headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match answer.size {
        Some(size) => match range::evaluate(range_header, size) {
            RangeAnswer::Full => (StatusCode::OK, 0, Some(size)),
            RangeAnswer::Partial { start, end } => {
                (StatusCode::PARTIAL_CONTENT, start, Some(end + 1))
            }
            RangeAnswer::Unsatisfiable => {
                let mut resp = response::error(
                    &oci::Error::new(
                        ErrorCode::RangeInvalid,
                        format!("range {range_header:?} is outside the blob's {size} bytes"),
                    ),
                    head,
                );
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(resp);
            }
        },
        // Size unknown (a fill whose upstream sent no length): the whole blob, chunked.
        None => (StatusCode::OK, 0, None),
    };
    let body = match (head, answer.source, splicer, end) {
        // A stored file, on a connection that can: sendfile.
        (false, Some(BlobSource::Stored(file)), Some(splicer), Some(end)) => {
            let served = app
                .metrics
                .served_bytes
                .get_or_create(&SourceLabels {
                    source: Source::Cache,
                })
                .clone();
            Body::Spliced(SplicedBody::new(splicer, file, start, end, served))
        }
        // Anything else through the pump: a fill's pieces still go out with sendfile where
        // the connection can, straight from the page cache it was just written to.
        (false, Some(source), splicer, _) => {
            let metrics = app.metrics.clone();
            let body = BlobBody::new(source, start, end, metrics, splicer.is_some());
            Body::Blob(body, splicer.cloned())
        }
        _ => Body::empty(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000, immutable"),
    );
    digest_headers(h, digest);
    if let Some(end) = end {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        if status == StatusCode::PARTIAL_CONTENT {
            let total = answer.size.unwrap_or(end);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1)) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
    }
    Ok(resp)
}

/// `prefix`: the upstream host a path-prefix client put before the name; the upstream's
/// `Link` (next page) is rewritten to carry it, or the next page would go elsewhere.
fn passthrough_response(
    p: crate::upstream::Passthrough,
    head: bool,
    prefix: Option<&str>,
) -> Response<Body> {
    let len = p.body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::bytes(p.body)
    });
    *resp.status_mut() = p.status;
    *resp.headers_mut() = p.headers;
    if let Some(host) = prefix {
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok());
        if let Some(v) = link.map(|l| l.replace("</v2/", &format!("</v2/{host}/"))) {
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
    }
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_keeps_the_path_prefix() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::LINK,
            HeaderValue::from_static("</v2/org/app/tags/list?n=2&last=b>; rel=\"next\""),
        );
        let p = crate::upstream::Passthrough {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{}"),
        };
        let resp = passthrough_response(p.clone(), false, Some("ghcr.io"));
        assert_eq!(
            resp.headers()[header::LINK],
            "</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel=\"next\""
        );
        let resp = passthrough_response(p, false, None);
        assert_eq!(
            resp.headers()[header::LINK],
            "</v2/org/app/tags/list?n=2&last=b>; rel=\"next\""
        );
    }
}
