//! berth: a pull-through caching proxy for OCI container registries.
//!
//! The request path is `server` → `proxy` → `store` / `upstream`, with `oci` as the shared
//! vocabulary. This file only wires the parts together.

#![forbid(unsafe_code)]

pub mod access;
pub mod cli;
pub mod clock;
pub mod config;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod oci;
pub mod proxy;
pub mod quota;
pub mod server;
pub mod store;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use config::Config;
use metrics::Metrics;
use proxy::Proxy;
use server::{App, Limits, Role};
use store::Store;
use upstream::Upstreams;

/// Installs the process-wide TLS crypto provider (aws-lc-rs). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Builds the parts from a configuration: what `serve` runs and `check-config` checks.
pub fn build(config: &Config) -> Result<App, String> {
    install_crypto_provider();
    let mut metrics = Metrics::new();
    let fleet = match &config.fleet {
        Some(f) => Some(Arc::new(fleet::Fleet::new(
            f,
            fleet::FleetMetrics::register(metrics.registry_mut()),
        )?)),
        None => None,
    };
    let shared = match &config.storage.shared {
        Some(s) => {
            let replica = fleet
                .as_ref()
                .map_or_else(|| "berth".to_owned(), |f| f.me().to_owned());
            Some(Arc::new(store::shared::Shared::new(
                s,
                &replica,
                store::shared::SharedMetrics::register(metrics.registry_mut()),
            )?))
        }
        None => None,
    };
    let egress = upstream::egress::EgressMetrics::register(metrics.registry_mut());
    let server_metrics = server::ServerMetrics::register(metrics.registry_mut());
    let access = Arc::new(access::Access::from_config(config, metrics.registry_mut())?);
    metrics.registry_mut().register(
        "log_lines_dropped",
        "Log lines dropped because the log writer fell behind (stderr not read)",
        logging::dropped_lines(),
    );
    let metrics = Arc::new(metrics);
    metrics
        .store
        .max_bytes
        .set(config.storage.max_size.as_u64() as i64);
    let upstreams =
        Upstreams::from_config(config, metrics.clone(), egress).map_err(|e| e.to_string())?;
    if let Some(f) = &fleet {
        upstreams.share_quota(f.size());
    }
    let store = open_store(config)?;
    let admin_token = admin_token(config)?;
    Ok(App {
        proxy: Proxy::new(store, metrics.clone(), shared, fleet, config.storage.local).with_limits(
            config.server.max_concurrent_fills,
            config.server.max_concurrent_passthroughs,
        ),
        upstreams,
        access,
        metrics,
        server_metrics,
        started: std::time::Instant::now(),
        history: server::status::History::default(),
        admin_token,
        warm_platforms: config
            .warm
            .as_ref()
            .map(|w| w.platforms.clone())
            .unwrap_or_default(),
    })
}

/// The admin token from `server.admin_token_file`, if configured.
fn admin_token(config: &Config) -> Result<Option<String>, String> {
    let Some(path) = &config.server.admin_token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("server.admin_token_file {}: {e}", path.display()))?
        .trim()
        .to_owned();
    // An empty file would leave the admin API shut with a message saying to set the very
    // key that is set: say what is wrong instead.
    if token.is_empty() {
        return Err(format!(
            "server.admin_token_file {}: the file is empty",
            path.display()
        ));
    }
    Ok(Some(token))
}

/// The TLS acceptor, when `server.tls_cert` is set: reads the certificate, its key and
/// `auth.client_ca`.
fn tls(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) else {
        return Ok(None);
    };
    install_crypto_provider();
    let client_ca = config.auth.as_ref().and_then(|a| a.client_ca.as_deref());
    server::tls_acceptor(cert, key, client_ca).map(Some)
}

/// What `berth check-config` checks beyond the file itself: every file the configuration
/// names is read (upstream credentials and CAs, the admin token, TLS certificate and key,
/// htpasswd, tokens, client CA) and the upstream clients and access rules are built. The
/// store is not opened (a running berth holds its lock).
pub fn check(config: &Config) -> Result<(), String> {
    install_crypto_provider();
    let mut metrics = Metrics::new();
    access::Access::from_config(config, metrics.registry_mut())?;
    Upstreams::from_config(config, Arc::new(metrics), Default::default())
        .map_err(|e| e.to_string())?;
    admin_token(config)?;
    tls(config)?;
    Ok(())
}

/// Opens the configured store (taking its lock) with its size limits.
pub fn open_store(config: &Config) -> Result<Store, String> {
    let limits = store::Limits {
        max_bytes: config.storage.max_size.as_u64(),
        min_free: config.storage.min_free.map(|m| m.as_u64()),
    };
    Store::open_with(&config.storage.root, limits)
        .map_err(|e| format!("storage.root {}: {e}", config.storage.root.display()))
}

/// Writes `{"listen": "<addr>", "admin": "<addr>"}` to `path`, whole or not at all.
fn report_ports(
    path: &std::path::Path,
    api: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> std::io::Result<()> {
    let json = serde_json::json!({ "listen": api.to_string(), "admin": admin.to_string() });
    let aside = path.with_extension("partial");
    std::fs::write(&aside, format!("{json}\n"))?;
    std::fs::rename(&aside, path)
}

/// Runs berth until SIGTERM or SIGINT, then drains in-flight requests.
pub async fn serve(config: Config) -> Result<(), String> {
    serve_reporting(config, None).await
}

/// [`serve`], writing the addresses berth bound (a port 0 in the configuration becomes
/// the port the kernel chose) to `ports_file` as JSON, `{"listen": .., "admin": ..}`,
/// once both are bound (a connection made from then on waits in the backlog until berth
/// serves). The file appears whole (written aside, then renamed).
pub async fn serve_reporting(
    mut config: Config,
    ports_file: Option<&std::path::Path>,
) -> Result<(), String> {
    let tls = tls(&config)?;
    // Bound first: the parts are built knowing berth's own addresses (a redirect must
    // never lead to them), which with port 0 only binding tells.
    let (api, admin) = bind_listeners(&mut config).await?;
    let (api_addr, admin_addr) = (config.server.listen, config.server.admin_listen);
    let app = Arc::new(build(&config)?);
    if let Some(fleet) = app.proxy.fleet() {
        fleet.resolve_now().await;
        app.upstreams.share_quota(fleet.size());
    }
    if let Some(path) = ports_file {
        report_ports(path, api_addr, admin_addr)
            .map_err(|e| format!("--ports-file {}: {e}", path.display()))?;
    }
    tracing::info!(
        listen = %api_addr,
        admin = %admin_addr,
        store = %config.storage.root.display(),
        upstreams = app.upstreams.all().len(),
        tls = tls.is_some(),
        version = env!("CARGO_PKG_VERSION"),
        "berth is serving"
    );
    if app.admin_token.is_none() {
        tracing::info!(admin = %admin_addr,
            "no server.admin_token_file: POST/DELETE /admin/* (warm, tag deletion) are refused; \
             /metrics, /healthz, /readyz and the status reads stay open");
    }
    start_background(&app, &config);
    let limits = Limits {
        header_read_timeout: config.server.header_read_timeout,
        idle_timeout: config.server.idle_timeout,
        shutdown_grace: config.server.shutdown_grace,
        max_connections: config.server.max_connections,
        max_connections_per_client: config.server.max_connections_per_client,
    };
    serve_until_signal(api, admin, app, tls, limits).await;
    Ok(())
}

/// Binds the pull and admin listeners, and writes the bound addresses back into the
/// configuration (a port 0 becomes the port the kernel chose).
async fn bind_listeners(config: &mut Config) -> Result<(TcpListener, TcpListener), String> {
    let api = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("server.listen {}: {e}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|e| format!("server.admin_listen {}: {e}", config.server.admin_listen))?;
    let bound = |l: &TcpListener, configured| l.local_addr().unwrap_or(configured);
    config.server.listen = bound(&api, config.server.listen);
    config.server.admin_listen = bound(&admin, config.server.admin_listen);
    Ok((api, admin))
}

/// The background work of a serving berth: status history, access reloads, fleet
/// membership, eviction and access times, and the warm list.
fn start_background(app: &Arc<App>, config: &Config) {
    tokio::spawn(sample_history(app.clone()));
    tracing::info!(access = %app.access.describe(), "who may pull what");
    access::Access::keep_reloading(&app.access);
    if let Some(fleet) = app.proxy.fleet() {
        tracing::info!(me = fleet.me(), peers = ?fleet.peers(), "fleet member");
        tokio::spawn(keep_fleet(app.clone(), fleet.clone()));
    }
    if let Some(shared) = app.proxy.shared() {
        tracing::info!(store = shared.describe(), "shared tier");
    }
    tokio::spawn(keep_within_limits(app.clone()));
    if let Some(warm) = config.warm.clone() {
        tokio::spawn(keep_warm(app.clone(), warm));
    }
}

/// Serves both listeners until SIGTERM or SIGINT, then lets in-flight requests finish
/// (within the shutdown grace).
async fn serve_until_signal(
    api: TcpListener,
    admin: TcpListener,
    app: Arc<App>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let api_task = tokio::spawn(server::serve(
        api,
        Role::Api,
        app.clone(),
        tls,
        limits.clone(),
        stop_rx.clone(),
    ));
    let admin_task = tokio::spawn(server::serve(
        admin,
        Role::Admin,
        app,
        None,
        limits,
        stop_rx,
    ));
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; in-flight requests may finish");
    let _ = stop_tx.send(true);
    for task in [api_task, admin_task] {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "listener failed"),
            Err(e) => tracing::error!(error = %e, "listener task failed"),
        }
    }
    tracing::info!("stopped");
}

/// Evicts in the background when the store passes its high watermark (checked every
/// 2 s, a load of one atomic), and writes batched access times every 30 s.
async fn keep_within_limits(app: Arc<App>) {
    let store = app.proxy.store().clone();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(15) {
            if let Err(e) = store.flush_touches().await {
                tracing::warn!(error = %e, "could not record access times");
            }
        }
        if store.over_limits() {
            match store.evict(None).await {
                Ok(done) => {
                    app.metrics.store.evictions.inc_by(done.blobs);
                }
                Err(e) => tracing::error!(error = %e, "eviction failed"),
            }
        }
    }
}

/// Follows the fleet's membership (DNS) and splits each upstream's quota cap across it.
async fn keep_fleet(app: Arc<App>, fleet: Arc<fleet::Fleet>) {
    let Some(every) = fleet.resolve_interval() else {
        return; // a static list never changes
    };
    let mut size = fleet.size();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        fleet.resolve_now().await;
        if fleet.size() != size {
            size = fleet.size();
            app.upstreams.share_quota(size);
        }
    }
}

/// One status-page sample a minute (the first at start).
async fn sample_history(app: Arc<App>) {
    let mut tick = tokio::time::interval(server::status::SAMPLE_EVERY);
    loop {
        tick.tick().await;
        app.history.record(&app);
    }
}

/// Warms the configured images at start, then every `interval`.
async fn keep_warm(app: Arc<App>, warm: config::WarmConfig) {
    let mut tick = tokio::time::interval(warm.interval);
    loop {
        tick.tick().await;
        for report in app
            .proxy
            .warm_images(
                &app.upstreams,
                &warm.images,
                &app.warm_platforms,
                warm.signatures,
            )
            .await
        {
            if report.ok {
                tracing::info!(image = %report.image, digest = report.digest.as_deref().unwrap_or(""),
                    platforms = report.platforms, blobs = report.blobs, "warm");
            } else {
                tracing::warn!(image = %report.image, error = report.error.as_deref().unwrap_or(""),
                    "warm failed");
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers berth can only be killed; keep serving.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
