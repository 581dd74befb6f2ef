//! The admin listener: `/` (the status page), `/metrics`, `/healthz`, `/readyz`,
//! `GET /admin/status`, `POST /admin/warm`, `DELETE /admin/tags/<image>`. Never on the
//! pull port. Reads are open (probes, Prometheus, the status page). Anything else under
//! `/admin/` changes state and needs the bearer token of `server.admin_token_file`; with no
//! token configured it is refused (403), never open: the admin port is often reachable from
//! the whole cluster network, whose clients are untrusted.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::response::{self, Body};
use super::{status, App};
use crate::oci::{ImageRef, Reference};
use crate::proxy::Readiness;

const STATUS_PAGE: &str = include_str!("status.html");
/// The largest `POST /admin/warm` body accepted.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    // Every mutation, known endpoint or not, passes the token check first: an
    // unauthenticated caller learns nothing about which ones exist.
    let mutation = !matches!(*req.method(), Method::GET | Method::HEAD);
    if mutation && path.starts_with("/admin/") {
        if let Err(refusal) = check_token(app.admin_token.as_deref(), req.headers()) {
            return refusal.response();
        }
    }
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => {
            let mut resp = Response::new(Body::bytes(Bytes::from_static(STATUS_PAGE.as_bytes())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        (Method::GET, "/metrics") => metrics(&app, &req),
        (Method::GET, "/healthz") => response::status(StatusCode::OK, "ok\n", "text/plain"),
        (Method::GET, "/readyz") => readyz(&app).await,
        (Method::GET, "/admin/status") => json(StatusCode::OK, &status::status(&app)),
        (Method::POST, "/admin/warm") => warm(&app, req).await,
        (Method::DELETE, p) if p.starts_with("/admin/tags/") => {
            delete_tag(&app, &p["/admin/tags/".len()..]).await
        }
        _ => response::status(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}

/// 200 when ready (degraded: the shared tier is unavailable, the replica serves its
/// local disk and fetches through), 503 when the store cannot be written.
async fn readyz(app: &App) -> Response<Body> {
    match app.proxy.readiness().await {
        Readiness::Ready => response::status(StatusCode::OK, "ready\n", "text/plain"),
        Readiness::Degraded(trouble) => {
            let text = format!(
                "ready (degraded): the shared store is unavailable ({trouble}); \
                 serving from local disk and fetching through\n"
            );
            let mut resp = Response::new(Body::bytes(text.into_bytes()));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        Readiness::NotReady(e) => {
            tracing::warn!(error = %e, "not ready: the store cannot be written");
            response::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the store cannot be written\n",
                "text/plain",
            )
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Body::bytes(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn admin_error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// Why a mutation of the admin API was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `server.admin_token_file` is not set: mutations are off.
    NoTokenConfigured,
    /// A token is configured and the request did not carry it.
    BadToken,
}

impl Refusal {
    fn response(self) -> Response<Body> {
        match self {
            Refusal::NoTokenConfigured => admin_error(
                StatusCode::FORBIDDEN,
                "admin API mutations are disabled: set server.admin_token_file on the berth \
                 server, then send the token as Authorization: Bearer <token> \
                 (berth warm --token-file FILE)",
            ),
            Refusal::BadToken => {
                let mut resp = admin_error(StatusCode::UNAUTHORIZED, "admin token required");
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                resp
            }
        }
    }
}

/// Checks `Authorization: Bearer <token>` against the configured token. Both sides are
/// hashed first, so the constant-time comparison runs over equal lengths and reveals
/// neither the token's bytes nor its length.
fn check_token(expected: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(expected) = expected else {
        return Err(Refusal::NoTokenConfigured);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    let same: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into();
    if same && !given.is_empty() {
        Ok(())
    } else {
        Err(Refusal::BadToken)
    }
}

#[derive(serde::Deserialize)]
struct WarmRequest {
    images: Vec<String>,
    /// Also each image's signatures, attestations, SBOMs and referrers.
    #[serde(default)]
    signatures: bool,
}

async fn warm(app: &App, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    let request: WarmRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return admin_error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "expected {{\"images\": [\"docker.io/library/nginx:1.27\", ...], \
                     \"signatures\": false}}: {e}"
                ),
            )
        }
    };
    let results = app
        .proxy
        .warm_images(
            &app.upstreams,
            &request.images,
            &app.warm_platforms,
            request.signatures,
        )
        .await;
    json(StatusCode::OK, &serde_json::json!({ "results": results }))
}

/// Forgets a cached tag (every accept variant), so the next pull asks upstream.
async fn delete_tag(app: &App, image: &str) -> Response<Body> {
    let parsed = match ImageRef::parse(image) {
        Ok(r) => r,
        Err(e) => return admin_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let Reference::Tag(tag) = &parsed.reference else {
        return admin_error(StatusCode::BAD_REQUEST, "name a tag, not a digest");
    };
    let (up, repo) = match app
        .upstreams
        .resolve(None, &parsed.name)
        .map(|r| (r.upstream, r.repo))
    {
        Ok(r) => r,
        Err(e) => return admin_error(e.status(), &e.message),
    };
    let prefix = crate::proxy::tag_key_prefix(&up, &repo, tag);
    match app.proxy.forget_tags(prefix).await {
        Ok(0) => admin_error(StatusCode::NOT_FOUND, &format!("{image} is not cached")),
        Ok(n) => json(StatusCode::OK, &serde_json::json!({ "removed": n })),
        Err(e) => admin_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("index: {e}")),
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), classic text otherwise.
fn metrics<B>(app: &App, req: &Request<B>) -> Response<Body> {
    for up in app.upstreams.all() {
        for (_, quota) in up.quotas() {
            quota.publish();
        }
    }
    app.proxy.publish_gauges();
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (text, content_type) = if openmetrics {
        (
            app.metrics.encode_openmetrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            app.metrics.encode_classic(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut resp = Response::new(Body::bytes(text));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn mutations_are_refused_without_a_configured_token() {
        assert_eq!(
            check_token(None, &HeaderMap::new()),
            Err(Refusal::NoTokenConfigured)
        );
        // Whatever the client sends: there is nothing to match it against.
        assert_eq!(
            check_token(None, &bearer("Bearer anything")),
            Err(Refusal::NoTokenConfigured)
        );
        assert_eq!(
            Refusal::NoTokenConfigured.response().status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn the_configured_token_is_required() {
        let t = Some("s3cret-admin");
        assert_eq!(check_token(t, &HeaderMap::new()), Err(Refusal::BadToken));
        assert_eq!(
            check_token(t, &bearer("Bearer wrong")),
            Err(Refusal::BadToken)
        );
        assert_eq!(
            check_token(t, &bearer("Bearer s3cret")),
            Err(Refusal::BadToken)
        );
        assert_eq!(
            check_token(t, &bearer("Bearer s3cret-admin-and-more")),
            Err(Refusal::BadToken)
        );
        assert_eq!(
            check_token(t, &bearer("Basic s3cret-admin")),
            Err(Refusal::BadToken)
        );
        assert_eq!(
            check_token(t, &bearer("s3cret-admin")),
            Err(Refusal::BadToken)
        );
        assert_eq!(check_token(t, &bearer("Bearer s3cret-admin")), Ok(()));
        // The scheme is case-insensitive (RFC 9110 §11.1).
        assert_eq!(check_token(t, &bearer("bearer s3cret-admin")), Ok(()));
        let resp = Refusal::BadToken.response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[test]
    fn an_empty_bearer_never_matches() {
        assert_eq!(
            check_token(Some(""), &bearer("Bearer ")),
            Err(Refusal::BadToken)
        );
    }
}
