//! The real `berth` binary under test: a generated config, a store in a temp dir, stopped
//! by PID (SIGTERM, then SIGKILL) when dropped.
//!
//! Ports: berth is configured with `127.0.0.1:0` for both listeners and started with
//! `--ports-file`; the harness reads the ports the kernel gave from that file (no race for
//! free ports). The config is then rewritten with those ports, and every later start passes
//! them as `--listen`/`--admin-listen` too, so a test's URLs stay valid across restarts.
//! Only a pull API address given up front (`Extra::listen`: a fleet's replicas must know
//! each other's) is configured as is.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One `[[upstreams]]` block.
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    pub host: String,
    pub url: String,
    pub tag_ttl: String,
    /// `stall_timeout` for blob fills.
    pub stall_timeout: String,
    /// Extra TOML lines for the block (credentials, timeouts).
    pub extra: String,
}

impl UpstreamSpec {
    /// docker.io (with Docker Hub's aliases) pointing at `url`.
    pub fn docker_hub(url: &str) -> Self {
        UpstreamSpec {
            host: "docker.io".into(),
            url: url.into(),
            tag_ttl: "10m".into(),
            stall_timeout: "10s".into(),
            extra: "aliases = [\"registry-1.docker.io\", \"index.docker.io\"]\n".into(),
        }
    }

    pub fn named(host: &str, url: &str) -> Self {
        UpstreamSpec {
            host: host.into(),
            url: url.into(),
            tag_ttl: "10m".into(),
            stall_timeout: "10s".into(),
            extra: String::new(),
        }
    }

    pub fn stall_timeout(mut self, t: &str) -> Self {
        self.stall_timeout = t.into();
        self
    }

    pub fn ttl(mut self, ttl: &str) -> Self {
        self.tag_ttl = ttl.into();
        self
    }

    pub fn extra(mut self, lines: &str) -> Self {
        self.extra.push_str(lines);
        self.extra.push('\n');
        self
    }
}

/// Extra configuration for a berth under test.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Top-level TOML (tables such as `[client_budgets]`).
    pub top: String,
    /// Lines in `[server]`.
    pub server: String,
    /// `storage.max_size` (10GiB when unset).
    pub max_size: Option<String>,
    /// `storage.root` (a temp dir when unset), e.g. on a small tmpfs.
    pub data_dir: Option<PathBuf>,
    /// Lines in `[storage]` (e.g. `local = false`).
    pub storage: String,
    /// The pull API's address (port 0, the kernel's choice, when unset): a fleet's replicas
    /// must know each other's before they start.
    pub listen: Option<SocketAddr>,
    /// Start without `server.admin_token_file` (admin mutations are then refused). By
    /// default every berth under test has a token: see `Berth::admin_token`.
    pub no_admin_token: bool,
}

pub struct Berth {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The admin token berth was configured with (`server.admin_token_file`), unless it
    /// was started with `Extra::no_admin_token`.
    pub admin_token: Option<String>,
    /// The file holding `admin_token` (for `berth warm --token-file`).
    pub admin_token_file: Option<PathBuf>,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    /// Where berth writes the addresses it bound (`--ports-file`) at every start.
    ports_path: PathBuf,
    /// Whether `addr` and `admin` are the bound ones (after the first start): later starts
    /// ask for them again.
    ports_known: bool,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Berth {
    /// Starts berth with these upstreams; the first is the default upstream.
    pub async fn start(upstreams: &[UpstreamSpec]) -> Berth {
        Self::start_opts(upstreams, &Extra::default()).await
    }

    /// With extra top-level TOML (e.g. a `[client_budgets]` table).
    pub async fn start_with(upstreams: &[UpstreamSpec], top: &str) -> Berth {
        let extra = Extra {
            top: top.into(),
            ..Extra::default()
        };
        Self::start_opts(upstreams, &extra).await
    }

    /// With extra lines in the `[server]` table (e.g. `idle_timeout`).
    pub async fn start_with_server(upstreams: &[UpstreamSpec], server: &str) -> Berth {
        let extra = Extra {
            server: server.into(),
            ..Extra::default()
        };
        Self::start_opts(upstreams, &extra).await
    }

    /// With `storage.max_size` set.
    pub async fn start_with_storage(upstreams: &[UpstreamSpec], max_size: &str) -> Berth {
        let extra = Extra {
            max_size: Some(max_size.into()),
            ..Extra::default()
        };
        Self::start_opts(upstreams, &extra).await
    }

    pub async fn start_opts(upstreams: &[UpstreamSpec], extra: &Extra) -> Berth {
        let dir = tempfile::tempdir().expect("berth tempdir");
        let data_dir = extra
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        // Port 0: the kernel chooses, berth says which in the ports file (see `spawn`).
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let addr: SocketAddr = extra.listen.unwrap_or(any);
        let admin: SocketAddr = any;
        // Admin mutations need a token (berth refuses them without one): every berth under
        // test has its own, unguessable enough that a test can look for it in logs.
        let (admin_token, admin_token_file) = if extra.no_admin_token {
            (None, None)
        } else {
            use std::sync::atomic::{AtomicU32, Ordering};
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let token = format!(
                "test-admin-token-{}-{}-{nanos:09}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let file = dir.path().join("admin-token");
            std::fs::write(&file, format!("{token}\n")).expect("write the admin token");
            (Some(token), Some(file))
        };
        let mut server_extra = extra.server.clone();
        if let Some(file) = &admin_token_file {
            let _ = write!(server_extra, "\nadmin_token_file = \"{}\"", file.display());
        }
        let max_size = extra.max_size.as_deref().unwrap_or("10GiB");
        let mut toml = format!(
            "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\nshutdown_grace = \"5s\"\n\
             header_read_timeout = \"2s\"\n{server_extra}\n\
             [storage]\nroot = \"{}\"\nmax_size = \"{max_size}\"\n{}\n[routing]\ndefault_upstream = \"{}\"\n",
            data_dir.display(),
            extra.storage,
            upstreams[0].host
        );
        toml.push_str(&extra.top);
        toml.push('\n');
        for u in upstreams {
            let _ = write!(
                toml,
                "\n[[upstreams]]\nhost = \"{}\"\nurl = \"{}\"\ntag_ttl = \"{}\"\n\
                 connect_timeout = \"2s\"\nresponse_timeout = \"10s\"\nstall_timeout = \"{}\"\n{}",
                u.host, u.url, u.tag_ttl, u.stall_timeout, u.extra
            );
        }
        let config_path = dir.path().join("berth.toml");
        std::fs::write(&config_path, toml).expect("write berth config");
        let log_path = dir.path().join("berth.log");
        let ports_path = dir.path().join("ports.json");
        let mut berth = Berth {
            addr,
            admin,
            admin_token,
            admin_token_file,
            config_path,
            data_dir,
            log_path,
            ports_path,
            ports_known: false,
            child: None,
            _dir: dir,
        };
        berth.spawn().await;
        // Tools run on this config (`berth gc`, `verify`, `containerd-config`) and a start
        // on it alone see the ports this berth has, not port 0.
        let config = std::fs::read_to_string(&berth.config_path).expect("read berth config");
        let generated = format!("[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n");
        assert!(config.starts_with(&generated), "berth config:\n{config}");
        let bound = format!(
            "[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n",
            berth.addr, berth.admin
        );
        std::fs::write(&berth.config_path, config.replacen(&generated, &bound, 1))
            .expect("rewrite berth config");
        berth
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("berth log");
        // A file left by an earlier start must not pass for this one's.
        match std::fs::remove_file(&self.ports_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", self.ports_path.display()),
        }
        let mut cmd = Command::new(binary());
        cmd.args(["--log-format", "json", "serve", "--config"])
            .arg(&self.config_path)
            .arg("--ports-file")
            .arg(&self.ports_path);
        if self.ports_known {
            // The ports of the first start, whatever the config says by now.
            cmd.arg("--listen")
                .arg(self.addr.to_string())
                .arg("--admin-listen")
                .arg(self.admin.to_string());
        }
        let child = cmd
            // Tests log berth's debug lines; benchmarks set BERTH_TEST_LOG=info.
            .env(
                "RUST_LOG",
                std::env::var("BERTH_TEST_LOG").unwrap_or_else(|_| "info,berth=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn berth");
        self.child = Some(child);
        let (addr, admin) = self.wait_for_ports(Duration::from_secs(30)).await;
        if self.ports_known {
            assert_eq!(
                (addr, admin),
                (self.addr, self.admin),
                "berth restarted on other ports; log:\n{}",
                self.log()
            );
        } else {
            if self.addr.port() != 0 {
                assert_eq!(addr, self.addr, "berth's pull API; log:\n{}", self.log());
            }
            (self.addr, self.admin) = (addr, admin);
            self.ports_known = true;
        }
        let status = super::wait_for_http(
            &format!("{}/healthz", self.admin_url()),
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(status, 200, "berth /healthz; log:\n{}", self.log());
    }

    /// Waits for the ports file of the start under way: the addresses berth bound, once
    /// both listeners accept. Fails fast, with berth's own words, when it exits first.
    async fn wait_for_ports(&mut self, timeout: Duration) -> (SocketAddr, SocketAddr) {
        #[derive(serde::Deserialize)]
        struct Ports {
            listen: SocketAddr,
            admin: SocketAddr,
        }
        // Written aside and renamed: once there, it is whole.
        let read = |path: &Path| match std::fs::read(path) {
            Ok(bytes) => Some(serde_json::from_slice::<Ports>(&bytes).unwrap_or_else(|e| {
                panic!(
                    "berth's ports file {}: {e}: {}",
                    path.display(),
                    String::from_utf8_lossy(&bytes)
                )
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("read {}: {e}", path.display()),
        };
        let (child, path) = (&mut self.child, &self.ports_path);
        let (mut exited, mut ports) = (None, None);
        super::wait_until(timeout, || {
            exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            ports = read(path);
            std::future::ready(exited.is_some() || ports.is_some())
        })
        .await;
        if let Some(status) = exited {
            panic!(
                "berth exited during start-up ({status}); log:\n{}",
                self.log()
            );
        }
        match ports {
            Some(p) => (p.listen, p.admin),
            None => panic!(
                "berth wrote no ports file within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:port`, for image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// A request to the admin API (`path` such as `/admin/warm`) carrying the admin token.
    pub fn admin_request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = super::http().request(method, format!("{}{path}", self.admin_url()));
        match &self.admin_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            super::terminate(child, Duration::from_secs(10));
        }
    }

    /// Stops and starts again on the same config, ports and store.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// SIGKILL: no drain, no clean-up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again (after `kill` or `stop`) on the same config, ports and store.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "berth is still running");
        self.spawn().await;
    }

    pub async fn metrics(&self) -> String {
        super::http()
            .get(format!("{}/metrics", self.admin_url()))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of one sample in the classic text format, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
            .map(|v| v.trim().parse().expect("metric value"))
            .unwrap_or(0.0)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The berth binary cargo built for these tests.
/// The berth binary this build made, or `BERTH_BIN` when set: a benchmark can measure
/// another build (an A/B comparison in the same run conditions).
pub fn binary() -> PathBuf {
    std::env::var_os("BERTH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_berth")))
}
