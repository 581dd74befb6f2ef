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
use crate::access::Principal;
use crate::metrics::{Kind, Outcome};
use crate::metrics::{Source, SourceLabels};
use crate::oci::{self, AcceptSet, Endpoint, ErrorCode, Route};
use crate::proxy::{
    BlobAnswer, BlobBody, BlobSource, Caller, Listing, ListingAnswer, ManifestAnswer,
};
use crate::upstream::Resolved;

/// What the log line and the metrics say about a request.
struct Summary {
    principal: Principal,
    /// Refused by authentication or an access rule.
    refused: bool,
    /// Forwarded by another replica of the fleet.
    forwarded: bool,
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
        principal: Principal::Anonymous,
        refused: false,
        forwarded: false,
        kind: Kind::Other,
        outcome: Outcome::Rejected,
        upstream: String::new(),
        repository: String::new(),
        reference: String::new(),
    };
    let mut resp = match serve(&app, &req, peer, &mut summary).await {
        Ok(resp) => resp,
        Err(e) => {
            // An access refusal is DENIED like an upstream's refusal of berth's
            // credentials, but it is the client's, not a failure.
            if !summary.refused {
                summary.outcome = outcome_of_error(&e);
            }
            response::error(&e, head)
        }
    };
    resp.headers_mut()
        .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    let elapsed = started.elapsed();
    app.metrics
        .observe_request(summary.kind, summary.outcome, elapsed);
    // A forwarded request was counted by the replica that took it from its client.
    if !summary.forwarded {
        app.access
            .count(&summary.principal, summary.outcome, summary.refused);
    }
    let bytes = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    tracing::info!(
        method = %req.method(),
        ns = req.uri().query().and_then(ns_param).unwrap_or_default(),
        principal = summary.principal.name(),
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
    (summary.kind, summary.reference) = describe(&route.endpoint);
    let caller = caller(app, req, peer)?;
    summary.forwarded = caller.forwarded;
    // A replica forwarding a miss checked its client already; its signature says so.
    if !caller.forwarded {
        identify(app, req, summary).await?;
    }
    if route.endpoint == Endpoint::Base {
        if !caller.forwarded {
            app.access.base(&summary.principal, req.headers())?;
        }
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
    let target = app.upstreams.resolve(route.ns.as_deref(), route.name)?;
    let (up, repo) = (&target.upstream, &target.repo);
    summary.upstream = up.host().to_owned();
    summary.repository = repo.to_string();
    if !caller.forwarded {
        summary.refused = true;
        app.access
            .authorize(&summary.principal, peer.ip(), up.host(), repo.as_str())?;
        summary.refused = false;
    }
    let ns = route.ns.clone();
    let mut resp = answer(app, req, route, &target, &caller, summary).await?;
    if let Some(ns) = &ns {
        if let Ok(v) = HeaderValue::from_str(ns) {
            resp.headers_mut().insert("oci-namespace", v);
        }
    }
    Ok(resp)
}

/// What the log line names: the kind of request, and its reference or digest.
fn describe(endpoint: &Endpoint) -> (Kind, String) {
    match endpoint {
        Endpoint::Base => (Kind::Base, String::new()),
        Endpoint::Manifest(r) => (Kind::Manifest, r.to_string()),
        Endpoint::Blob(d) => (Kind::Blob, d.to_string()),
        Endpoint::TagsList { .. } => (Kind::Tags, String::new()),
        Endpoint::Referrers { digest, .. } => (Kind::Referrers, digest.to_string()),
    }
}

/// Who the client is ([`crate::access`]); a refusal is marked as the client's.
async fn identify<B>(app: &App, req: &Request<B>, summary: &mut Summary) -> Result<(), oci::Error> {
    summary.refused = true;
    let cert = req.extensions().get::<crate::access::cert::ClientCert>();
    summary.principal = app.access.identify(req.headers(), cert).await?;
    summary.refused = false;
    Ok(())
}

/// Asks the proxy for what the route names in `target` and writes its answer.
async fn answer<B>(
    app: &Arc<App>,
    req: &Request<B>,
    route: Route<'_>,
    target: &Resolved,
    caller: &Caller,
    summary: &mut Summary,
) -> Result<Response<Body>, oci::Error> {
    let (up, repo, prefix) = (&target.upstream, &target.repo, target.prefix.as_deref());
    let head = route.head;
    Ok(match route.endpoint {
        // Answered by `serve`, before an upstream is resolved.
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
                .manifest(up, repo, &reference, accept, caller)
                .await?;
            summary.outcome = answer.outcome;
            manifest_response(answer, head)
        }
        Endpoint::Blob(digest) => {
            let answer = app.proxy.blob(up, repo, &digest, head, caller).await?;
            summary.outcome = answer.outcome;
            blob_response(
                app,
                answer,
                &digest,
                req.headers(),
                head,
                req.extensions().get::<Splicer>(),
            )?
        }
        Endpoint::TagsList { n, last } => {
            let listing = Listing::Tags { n, last };
            let answer = Box::pin(app.proxy.listing(up, repo, listing)).await?;
            summary.outcome = answer.outcome;
            listing_response(answer, head, prefix)
        }
        Endpoint::Referrers {
            digest,
            artifact_type,
        } => {
            let listing = Listing::Referrers {
                digest,
                artifact_type,
            };
            let answer = Box::pin(app.proxy.listing(up, repo, listing)).await?;
            summary.outcome = answer.outcome;
            listing_response(answer, head, prefix)
        }
    })
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
    if let Some(w) = &answer.warning {
        warning(h, w);
    }
    resp
}

/// `Warning: 299 - "berth: <text>"` on an answer served stale: what went wrong upstream,
/// as a header value can carry it (printable ASCII, no quotes or backslashes).
fn warning(h: &mut HeaderMap, text: &str) {
    let text: String = text
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

fn blob_response(
    app: &Arc<App>,
    answer: BlobAnswer,
    digest: &oci::Digest,
    req_headers: &HeaderMap,
    head: bool,
    splicer: Option<&Splicer>,
) -> Result<Response<Body>, oci::Error> {
    if let Some(url) = &answer.redirect {
        return Ok(redirect_response(url, digest));
    }
    let range_header = req_headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match answer.size {
        Some(size) => match range::evaluate(range_header, size) {
            RangeAnswer::Full => (StatusCode::OK, 0, Some(size)),
            RangeAnswer::Partial { start, end } => {
                (StatusCode::PARTIAL_CONTENT, start, Some(end + 1))
            }
            RangeAnswer::Unsatisfiable => return Ok(unsatisfiable(range_header, size, head)),
        },
        // Size unknown (a fill whose upstream sent no length): the whole blob, chunked.
        None => (StatusCode::OK, 0, None),
    };
    let body = match answer.source {
        Some(source) if !head => blob_body(app, source, start, end, splicer),
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

/// A redirect to where the client gets the blob's bytes (a presigned URL).
fn redirect_response(url: &reqwest::Url, digest: &oci::Digest) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(url.as_str()) {
        h.insert(header::LOCATION, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    digest_headers(h, digest);
    resp
}

/// 416 for a range outside the blob, with the blob's size in `Content-Range`.
fn unsatisfiable(range_header: Option<&str>, size: u64, head: bool) -> Response<Body> {
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
    resp
}

/// The body for bytes `start..end` of a blob.
fn blob_body(
    app: &Arc<App>,
    source: BlobSource,
    start: u64,
    end: Option<u64>,
    splicer: Option<&Splicer>,
) -> Body {
    match (source, splicer, end) {
        // A stored file, on a connection that can: sendfile.
        (BlobSource::Stored(file), Some(splicer), Some(end)) => {
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
        (source, splicer, _) => {
            let metrics = app.metrics.clone();
            let body = BlobBody::new(source, start, end, metrics, splicer.is_some());
            Body::Blob(body, splicer.cloned())
        }
    }
}

/// A tags list or referrers list, relayed or kept. `prefix`: the upstream host a
/// path-prefix client put before the name; the upstream's `Link` (next page) is rewritten
/// to carry it, or the next page would go elsewhere.
fn listing_response(answer: ListingAnswer, head: bool, prefix: Option<&str>) -> Response<Body> {
    let len = answer.body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::bytes(answer.body)
    });
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = answer.headers;
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
    if let Some(w) = &answer.warning {
        warning(resp.headers_mut(), w);
    }
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_keeps_the_path_prefix_and_a_stale_list_says_so() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::LINK,
            HeaderValue::from_static("</v2/org/app/tags/list?n=2&last=b>; rel=\"next\""),
        );
        let answer = ListingAnswer {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{}"),
            outcome: Outcome::Hit,
            warning: None,
        };
        let resp = listing_response(answer.clone(), false, Some("ghcr.io"));
        assert_eq!(
            resp.headers()[header::LINK],
            "</v2/ghcr.io/org/app/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert!(resp.headers().get(header::WARNING).is_none());
        let stale = ListingAnswer {
            outcome: Outcome::Stale,
            warning: Some("upstream ghcr.io: \"down\"\n".into()),
            ..answer
        };
        let resp = listing_response(stale, true, None);
        assert_eq!(
            resp.headers()[header::LINK],
            "</v2/org/app/tags/list?n=2&last=b>; rel=\"next\""
        );
        assert_eq!(
            resp.headers()[header::WARNING],
            "299 - \"berth: upstream ghcr.io: down?\""
        );
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "2");
    }
}
