//! Inbound HTTP: the listeners (HTTP/1.1 and HTTP/2, optional TLS), connection timeouts,
//! graceful shutdown, and routing to the pull API or the admin endpoints.
//!
//! This module turns bytes into requests and answers into bytes; it decides no policy.

mod admin;
mod api;
mod idle;
mod range;
mod response;
pub mod status;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::upstream::Upstreams;

pub use response::Body;

/// Everything a request handler needs.
pub struct App {
    pub proxy: Proxy,
    pub upstreams: Upstreams,
    pub metrics: Arc<Metrics>,
    pub started: std::time::Instant,
    pub history: status::History,
    /// The bearer token `POST`/`DELETE /admin/*` require, when configured.
    pub admin_token: Option<String>,
    /// Platforms the warm list and `POST /admin/warm` fetch (empty: all).
    pub warm_platforms: Vec<String>,
}

/// Connection-level settings.
#[derive(Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
}

/// Which handler a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Api,
    Admin,
}

/// Serves one listener until `shutdown` fires, then lets in-flight requests finish for
/// up to the grace period.
pub async fn serve(
    listener: TcpListener,
    role: Role,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(256);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached; refusing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = service_fn(move |req| {
            let app = app.clone();
            async move {
                Ok::<_, Infallible>(match role {
                    Role::Api => api::handle(app, req, peer).await,
                    Role::Admin => admin::handle(app, req).await,
                })
            }
        });
        let stream = idle::Idle::new(stream, limits.idle_timeout);
        let builder = builder.clone();
        match &tls {
            None => {
                let conn = builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned();
                spawn_conn(graceful.watch(conn), permit, peer);
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let timeout = limits.header_read_timeout;
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder
                        .serve_connection(TokioIo::new(tls), svc)
                        .into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(role = ?role, "shutdown grace period over; closing remaining connections");
    }
    Ok(())
}

fn spawn_conn<F, E>(conn: F, permit: tokio::sync::OwnedSemaphorePermit, peer: SocketAddr)
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        drop(permit);
    });
}

/// Loads a TLS acceptor (HTTP/2 and HTTP/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(
        std::fs::File::open(cert)
            .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut io::BufReader::new(
        std::fs::File::open(key).map_err(|e| format!("server.tls_key {}: {e}", key.display()))?,
    ))
    .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?
    .ok_or_else(|| format!("server.tls_key {}: no private key found", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server TLS: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
