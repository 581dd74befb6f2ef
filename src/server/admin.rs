//! The admin listener: `/metrics`, `/healthz`, `/readyz`. Never on the pull port.

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};

use super::response::{self, Body};
use super::App;

pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => metrics(&app, &req),
        "/healthz" => response::status(StatusCode::OK, "ok\n", "text/plain"),
        "/readyz" => match app.proxy.store().probe_writable().await {
            Ok(()) => response::status(StatusCode::OK, "ready\n", "text/plain"),
            Err(e) => {
                tracing::warn!(error = %e, "not ready: the store cannot be written");
                response::status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the store cannot be written\n",
                    "text/plain",
                )
            }
        },
        _ => response::status(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
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
