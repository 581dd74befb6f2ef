//! The admin listener: `/` (the status page), `/metrics`, `/healthz`, `/readyz`,
//! `GET /admin/status`, `POST /admin/warm`, `DELETE /admin/tags/<image>`. Never on the
//! pull port. Reads are open; `POST` and `DELETE` need the admin token when one is
//! configured.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::response::{self, Body};
use super::{status, App};
use crate::oci::{ImageRef, Reference};

const STATUS_PAGE: &str = include_str!("status.html");
/// The largest `POST /admin/warm` body accepted.
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
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
        (Method::GET, "/readyz") => match app.proxy.store().probe_writable().await {
            // A shared tier in trouble degrades the replica, it does not take it out:
            // it still serves its local disk and fetches through.
            Ok(()) => match shared_trouble(&app).await {
                Some(trouble) => {
                    let text = format!(
                        "ready (degraded): the shared store is unavailable ({trouble}); \
                         serving from local disk and fetching through\n"
                    );
                    let mut resp = Response::new(Body::bytes(text.into_bytes()));
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    resp
                }
                None => response::status(StatusCode::OK, "ready\n", "text/plain"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "not ready: the store cannot be written");
                response::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the store cannot be written\n",
                    "text/plain",
                )
            }
        },
        (Method::GET, "/admin/status") => json(StatusCode::OK, &status::status(&app)),
        (Method::POST, "/admin/warm") => {
            if !authorized(&app, &req) {
                return unauthorized();
            }
            warm(&app, req).await
        }
        (Method::DELETE, p) if p.starts_with("/admin/tags/") => {
            if !authorized(&app, &req) {
                return unauthorized();
            }
            delete_tag(&app, &p["/admin/tags/".len()..]).await
        }
        _ => response::status(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}

/// What is wrong with the shared tier, if anything: probed (one listing) unless it is
/// already being skipped after a failure.
async fn shared_trouble(app: &App) -> Option<String> {
    let shared = app.proxy.shared()?;
    if !shared.skipped() {
        // Bounded well below a probe's timeout: a slow store must not make every replica
        // unready at once (the Service would have no endpoint left).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), shared.probe()).await;
    }
    shared.trouble()
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

fn unauthorized() -> Response<Body> {
    let mut resp = admin_error(StatusCode::UNAUTHORIZED, "admin token required");
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Compares the bearer token without an early exit on the first differing byte.
fn authorized<B>(app: &App, req: &Request<B>) -> bool {
    let Some(expected) = &app.admin_token else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[derive(serde::Deserialize)]
struct WarmRequest {
    images: Vec<String>,
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
                &format!("expected {{\"images\": [\"docker.io/library/nginx:1.27\", ...]}}: {e}"),
            )
        }
    };
    let results = app
        .proxy
        .warm_images(&app.upstreams, &request.images, &app.warm_platforms)
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
    let (up, repo) = match app.upstreams.resolve(None, &parsed.name) {
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
        up.quota().publish();
    }
    if let Ok((blobs, bytes)) = app.proxy.store().totals() {
        app.metrics.store_blobs.set(blobs as i64);
        app.metrics.store_bytes.set(bytes as i64);
    }
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
