//! The `berth` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use berth::config::Config;

/// mimalloc: per-thread free lists and no trimming back to the kernel on every free. With
/// glibc's allocator a cached manifest GET cost 16% more instructions (callgrind) and 40%
/// more CPU time. Built without transparent huge pages (`no_thp`): with them, a cold
/// 100 MiB fill peaked at 59 MiB RSS; without, 38 MiB (glibc: 29 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A pull-through caching proxy for OCI registries"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default configuration unless --config is given).
    Serve {
        /// A configuration file; replaces the embedded default as a whole.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override server.listen (the pull API address).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override server.admin_listen (metrics, health).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Override storage.root (where blobs and the index live).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write the addresses bound (port 0 becomes the kernel's choice) to this file as
        /// JSON, {"listen": .., "admin": ..}, once both listeners accept.
        #[arg(long)]
        ports_file: Option<PathBuf>,
    },
    /// Check a configuration file (and the credentials it names) and exit.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Show a running berth's status: hit ratio, store, quota per upstream.
    Status {
        /// The admin address, e.g. http://berth.berth.svc:5001
        #[arg(long, default_value = "http://127.0.0.1:5001")]
        admin: String,
    },
    /// Ask a running berth to fetch and pin images (every platform, or its warm.platforms).
    Warm {
        /// The admin address, e.g. http://berth.berth.svc:5001
        #[arg(long, default_value = "http://127.0.0.1:5001")]
        admin: String,
        /// A file with the admin token (server.admin_token_file on the server).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Also fetch and pin each image's signatures, attestations and SBOMs (cosign's
        /// sha256-<hex>.sig/.att/.sbom tags) and its OCI referrers.
        #[arg(long)]
        signatures: bool,
        /// Image references: docker.io/library/nginx:1.27, ghcr.io/org/app@sha256:...
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Offline: evict least recently used blobs until the store is under a size
    /// (berth must be stopped; it holds the store's lock).
    Gc {
        #[arg(long, short)]
        config: PathBuf,
        /// Target size, e.g. 10GiB (default: the low watermark of storage.max_size).
        #[arg(long)]
        to: Option<bytesize::ByteSize>,
        /// With a shared tier: abort multipart uploads started longer ago than this (their
        /// replica died mid-upload).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        uploads_older_than: std::time::Duration,
        /// Clean the shared tier only (the local store may be in use by a running berth).
        #[arg(long)]
        shared_only: bool,
    },
    /// Offline: re-hash every stored blob; report and remove any that fail.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write containerd `hosts.toml` files (one directory per upstream) that pull through
    /// berth, e.g. into /etc/containerd/certs.d.
    ContainerdConfig {
        /// berth's pull address as nodes reach it, e.g. http://10.96.0.50:5000
        #[arg(long)]
        endpoint: String,
        /// The directory to write `<host>/hosts.toml` into.
        #[arg(long)]
        out: PathBuf,
        /// The configuration whose upstreams to write (default: the embedded one).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only these upstream hosts (comma-separated).
        #[arg(long, value_delimiter = ',')]
        upstreams: Vec<String>,
        /// A bearer token (a file of berth's `[auth] tokens_dir`) that containerd sends
        /// with every request to berth; the files are then written mode 0600.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Print the version.
    Version,
}

/// Runs `f` on a Tokio runtime: multi-threaded for the server, one thread for the
/// commands that only talk to an admin API or a bucket.
fn block_on<T>(
    multi_thread: bool,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(f)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logs = berth::logging::init(match cli.log_format {
        LogFormat::Text => berth::logging::Format::Text,
        LogFormat::Json => berth::logging::Format::Json,
    });
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            admin_listen,
            data_dir,
            ports_file,
        } => serve(config, listen, admin_listen, data_dir, ports_file),
        Command::CheckConfig { file } => check_config(&file),
        Command::Status { admin } => block_on(false, async move {
            print!("{}", berth::cli::status(&admin).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Warm {
            admin,
            token_file,
            signatures,
            images,
        } => warm(&admin, token_file, &images, signatures),
        Command::Gc {
            config,
            to,
            uploads_older_than,
            shared_only,
        } => block_on(false, gc(config, to, uploads_older_than, shared_only)),
        Command::Verify { config } => verify(&config),
        Command::ContainerdConfig {
            endpoint,
            out,
            config,
            upstreams,
            token_file,
        } => containerd_config(config, &endpoint, &out, &upstreams, token_file.as_deref()),
        Command::Version => {
            println!("berth {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    ports_file: Option<PathBuf>,
) -> Result<ExitCode, String> {
    let mut config = match config {
        Some(path) => Config::load(&path).map_err(|e| e.to_string())?,
        None => Config::embedded(),
    };
    if let Some(l) = listen {
        config.server.listen = l;
    }
    if let Some(a) = admin_listen {
        config.server.admin_listen = a;
    }
    if let Some(d) = data_dir {
        config.storage.root = d;
    }
    block_on(true, berth::serve_reporting(config, ports_file.as_deref())).map_err(|e| {
        // In the log as well as on stderr: log collectors see why berth stopped.
        tracing::error!("{e}");
        e
    })?;
    Ok(ExitCode::SUCCESS)
}

fn check_config(file: &std::path::Path) -> Result<ExitCode, String> {
    let c = Config::load(file).map_err(|e| e.to_string())?;
    berth::check(&c)?;
    println!(
        "{}: ok ({} upstreams, default {}, store {})",
        file.display(),
        c.upstreams.len(),
        c.routing.default_upstream,
        c.storage.root.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn warm(
    admin: &str,
    token_file: Option<PathBuf>,
    images: &[String],
    signatures: bool,
) -> Result<ExitCode, String> {
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .map_err(|e| format!("--token-file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let (report, ok) = block_on(
        false,
        berth::cli::warm(admin, token.as_deref(), images, signatures),
    )?;
    print!("{report}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn gc(
    config: PathBuf,
    to: Option<bytesize::ByteSize>,
    uploads_older_than: std::time::Duration,
    shared_only: bool,
) -> Result<ExitCode, String> {
    let config = Config::load(&config).map_err(|e| e.to_string())?;
    if let Some(shared) = &config.storage.shared {
        berth::install_crypto_provider();
        let metrics = berth::store::shared::SharedMetrics::default();
        let tier = berth::store::shared::Shared::new(shared, "berth gc", metrics)?;
        match tier.abort_stale_uploads(uploads_older_than).await {
            Ok(aborted) => println!(
                "shared store {}: aborted {aborted} incomplete uploads",
                tier.describe()
            ),
            // The local store can still be cleaned.
            Err(e) if !shared_only => eprintln!("warning: {e}"),
            Err(e) => return Err(e.to_string()),
        }
    }
    if shared_only {
        return Ok(ExitCode::SUCCESS);
    }
    let store = berth::open_store(&config)?;
    let before = store.used_bytes();
    let done = store
        // Without --to, the store's own low watermark (store/evict.rs), as in serve.
        .evict(to.map(|t| t.as_u64()))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "evicted {} blobs ({}); store {} -> {}",
        done.blobs,
        bytesize::ByteSize(done.bytes),
        bytesize::ByteSize(before),
        bytesize::ByteSize(store.used_bytes())
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(config: &std::path::Path) -> Result<ExitCode, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let store = berth::open_store(&config)?;
    let report = store.verify().map_err(|e| e.to_string())?;
    println!(
        "checked {} blobs ({}); {} failed and were removed",
        report.checked,
        bytesize::ByteSize(report.bytes),
        report.removed.len()
    );
    for bad in &report.removed {
        println!("removed {bad}");
    }
    Ok(if report.removed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn containerd_config(
    config: Option<PathBuf>,
    endpoint: &str,
    out: &std::path::Path,
    upstreams: &[String],
    token_file: Option<&std::path::Path>,
) -> Result<ExitCode, String> {
    let config = match config {
        Some(path) => Config::load(&path).map_err(|e| e.to_string())?,
        None => Config::embedded(),
    };
    for p in berth::cli::containerd_config(&config, endpoint, out, upstreams, token_file)? {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
