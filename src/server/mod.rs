//! Inbound HTTP: the listeners (HTTP/1.1 and HTTP/2, optional TLS), connection timeouts,
//! graceful shutdown, and routing to the pull API or the admin endpoints.
//!
//! This module turns bytes into requests and answers into bytes; it decides no policy.

mod admin;
mod api;
#[cfg(test)]
mod api_tests;
mod gate;
mod idle;
pub(crate) mod range;
mod response;
mod splice;
mod stack;
pub mod status;

pub use stack::ServerMetrics;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access::cert::ClientCert;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::upstream::Upstreams;

pub use response::Body;

/// Everything a request handler needs.
pub struct App {
    pub proxy: Proxy,
    /// Who clients are and what each may pull (`[auth]`, `[[access]]`).
    pub access: Arc<crate::access::Access>,
    pub upstreams: Upstreams,
    pub metrics: Arc<Metrics>,
    pub server_metrics: ServerMetrics,
    pub started: std::time::Instant,
    pub history: status::History,
    /// The bearer token `POST`/`DELETE /admin/*` require; without one they are refused.
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
    /// Connections one client address may hold at once (`None`: no cap of its own).
    pub max_connections_per_client: Option<usize>,
}

/// Which handler a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Api,
    Admin,
}

/// An accepted connection before HTTP: plain (able to splice) or to be TLS.
enum Accepted {
    Plain(splice::SpliceIo),
    Tls(tokio::net::TcpStream, tokio_rustls::TlsAcceptor),
}

/// The HTTP/1 and HTTP/2 settings every connection gets, limits set explicitly.
fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A request head over 64 KiB is not a registry client's.
        .max_buf_size(64 * 1024)
        // Body buffers are queued, never copied: spliced placeholders must reach the
        // socket as they are (see splice).
        .writev(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Pings find dead peers; they do not keep idle ones open (see `idle`).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256));
    builder
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
    let gate = gate::Gate::new(&limits, app.server_metrics.clone(), role);
    let builder = http_builder(&limits);
    let deadlines = idle::Deadlines {
        head: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
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
        let Some(pass) = gate.admit(peer.ip()) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(idle::Activity::default());
        // Plain TCP sends stored blobs with sendfile (HTTP/1.x requests only; see splice).
        let (accepted, splicer) = match &tls {
            None => {
                let (io, splicer) = splice::SpliceIo::new(stream);
                (Accepted::Plain(io), Some(splicer))
            }
            Some(acceptor) => (Accepted::Tls(stream, acceptor.clone()), None),
        };
        // The principal of the client's certificate, known once the TLS handshake is done.
        let client_cert = Arc::new(std::sync::OnceLock::<Option<ClientCert>>::new());
        let handler = Handler {
            app: app.clone(),
            role,
            peer,
            activity: activity.clone(),
            splicer,
            client_cert: client_cert.clone(),
        };
        let svc = TowerToHyperService::new(stack::layered(handler, app.server_metrics.clone()));
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let conn = Connection {
                peer,
                deadlines,
                activity,
                client_cert,
            };
            conn.serve(accepted, svc, builder, watcher).await;
            drop(pass);
        });
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

/// What a spawned connection needs besides its socket and service.
struct Connection {
    peer: SocketAddr,
    deadlines: idle::Deadlines,
    activity: Arc<idle::Activity>,
    client_cert: Arc<std::sync::OnceLock<Option<ClientCert>>>,
}

impl Connection {
    /// Serves one accepted connection (its TLS handshake first) until it ends or the
    /// graceful shutdown is over.
    async fn serve(
        self,
        accepted: Accepted,
        svc: TowerToHyperService<stack::Layered<Handler>>,
        builder: auto::Builder<TokioExecutor>,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let Connection {
            peer,
            deadlines,
            activity,
            client_cert,
        } = self;
        let result = match accepted {
            Accepted::Plain(io) => {
                let io = idle::Guarded::new(io, deadlines, activity);
                let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                watcher.watch(conn).await
            }
            Accepted::Tls(stream, acceptor) => {
                // The handshake is under the head deadline of `stream` too.
                let stream = idle::Guarded::new(stream, deadlines, activity);
                let tls = match acceptor.accept(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let _ = client_cert.set(client_certificate(&tls, peer));
                let conn = builder
                    .serve_connection(TokioIo::new(tls), svc)
                    .into_owned();
                watcher.watch(conn).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// The principal a TLS client's verified certificate names, if any.
fn client_certificate<IO>(
    tls: &tokio_rustls::server::TlsStream<IO>,
    peer: SocketAddr,
) -> Option<ClientCert> {
    let chain = tls.get_ref().1.peer_certificates()?;
    let principal = chain.first().and_then(crate::access::cert::principal);
    if principal.is_none() {
        tracing::info!(%peer, "client certificate without a usable common name: not a principal");
    }
    principal.map(ClientCert)
}

/// One connection's handler: marks the connection busy while a request runs, hands the
/// request what the connection knows (sendfile, the client certificate), and calls the
/// pull API or the admin API.
#[derive(Clone)]
struct Handler {
    app: Arc<App>,
    role: Role,
    peer: SocketAddr,
    activity: Arc<idle::Activity>,
    /// Plain TCP: stored blobs go out with sendfile (HTTP/1.x requests only).
    splicer: Option<splice::Splicer>,
    client_cert: Arc<std::sync::OnceLock<Option<ClientCert>>>,
}

type HandlerFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<idle::Tracked<response::Body>>, Infallible>,
            > + Send,
    >,
>;

impl tower::Service<http::Request<hyper::body::Incoming>> for Handler {
    type Response = http::Response<idle::Tracked<response::Body>>;
    type Error = Infallible;
    type Future = HandlerFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<hyper::body::Incoming>) -> HandlerFuture {
        let guard = self.activity.begin();
        if let Some(splicer) = &self.splicer {
            if req.version() <= http::Version::HTTP_11 {
                req.extensions_mut().insert(splicer.clone());
            }
        }
        if let Some(Some(cert)) = self.client_cert.get() {
            req.extensions_mut().insert(cert.clone());
        }
        let (app, role, peer) = (self.app.clone(), self.role, self.peer);
        // Boxed: the handler's future is large, and every layer of the stack and hyper
        // would otherwise move it by value (a memcpy per poll site).
        Box::pin(async move {
            let resp = match role {
                Role::Api => api::handle(app, req, peer).await,
                Role::Admin => admin::handle(app, req).await,
            };
            Ok(resp.map(|body| idle::Tracked::new(body, guard)))
        })
    }
}

/// Loads a TLS acceptor (HTTP/2 and HTTP/1.1 by ALPN) from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    // rustls-pki-types' PEM reader (rustls-pemfile is archived).
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert {}: no certificate found",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(crate::access::cert::verifier(ca)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server TLS: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
