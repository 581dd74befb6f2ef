//! A real upstream: Debian's `docker-registry` (CNCF distribution 2.8) as a child process.
//!
//! This module owns the registry's generated YAML config, its storage directory and its
//! process. Storage is the filesystem, in a tempdir that lives as long as the [`Registry`]
//! (so [`Registry::restart`] keeps the content); the process is killed by PID on drop.
//! Options add token auth (trusting [`TokenIssuer`](super::token::TokenIssuer)) or make the
//! registry a pull-through proxy itself, which benchmarks use as the reference to beat.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::token::TokenIssuer;

/// How long a registry gets to answer `/v2/` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How the registry is configured beyond the defaults (open access, plain storage).
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Require Bearer tokens (`auth: token`).
    pub token_auth: Option<TokenAuth>,
    /// Run as a pull-through cache of another registry (`proxy: remoteurl`).
    pub proxy: Option<ProxyRemote>,
}

impl RegistryOptions {
    /// Requires tokens signed by `issuer`, and points clients to its realm.
    pub fn with_token_auth(mut self, issuer: &TokenIssuer) -> Self {
        self.token_auth = Some(TokenAuth::from_issuer(issuer));
        self
    }

    /// Proxies `remote_url`, logging in there with `credentials` when given.
    pub fn with_proxy(mut self, remote_url: &str, credentials: Option<(&str, &str)>) -> Self {
        self.proxy = Some(ProxyRemote {
            remote_url: remote_url.to_owned(),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        });
        self
    }
}

/// The `auth: token` section: who issues tokens and which certificate signs them.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub root_cert_bundle: PathBuf,
}

impl TokenAuth {
    pub fn from_issuer(issuer: &TokenIssuer) -> Self {
        TokenAuth {
            realm: issuer.realm(),
            service: issuer.service().to_owned(),
            issuer: issuer.issuer().to_owned(),
            root_cert_bundle: issuer.cert_path().to_owned(),
        }
    }
}

/// The `proxy` section: the registry this one caches.
#[derive(Clone, Debug)]
pub struct ProxyRemote {
    pub remote_url: String,
    pub credentials: Option<(String, String)>,
}

/// A running `docker-registry serve`, killed on drop.
pub struct Registry {
    port: u16,
    /// Config, storage and log; removed only after `Drop` has killed the process.
    dir: TempDir,
    child: Option<Child>,
}

impl Registry {
    /// Writes the config, spawns the registry and waits until `/v2/` answers (200 or 401).
    pub async fn start(options: RegistryOptions) -> Registry {
        // Looked up first so a missing peer fails before any other work.
        super::require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .expect("registry tempdir");
        let port = super::free_port();
        let config = render_config(dir.path(), port, &options);
        std::fs::write(config_path(dir.path()), config).expect("write registry config");
        std::fs::create_dir_all(dir.path().join("storage")).expect("create storage dir");
        let mut registry = Registry {
            port,
            dir,
            child: None,
        };
        registry.spawn_and_wait().await;
        registry
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:PORT`, the form skopeo and containerd want in image references.
    pub fn host(&self) -> String {
        self.addr().to_string()
    }

    /// The filesystem storage root (`storage.filesystem.rootdirectory`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// What the registry logged so far (stdout and stderr together).
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(self.dir.path())).unwrap_or_default()
    }

    /// The process id while it runs (benchmarks read its peak memory from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process and waits for it; does nothing if it is already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait().await;
    }

    async fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path(self.dir.path()))
            .expect("open registry log");
        let child = Command::new(super::require_tool("docker-registry"))
            .arg("serve")
            .arg(config_path(self.dir.path()))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let url = format!("{}/v2/", self.url());
        let client = super::http();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("registry process");
            if let Some(status) = child.try_wait().expect("try_wait registry") {
                self.child = None;
                panic!("docker-registry exited early ({status}):\n{}", self.log());
            }
            let attempt = client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(response) = attempt {
                let status = response.status().as_u16();
                assert!(
                    status == 200 || status == 401,
                    "docker-registry answered /v2/ with {status}:\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() >= deadline {
                self.stop();
                panic!(
                    "docker-registry did not answer within {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.yml")
}

fn log_path(dir: &Path) -> PathBuf {
    dir.join("registry.log")
}

/// A YAML double-quoted scalar; JSON string syntax is valid YAML.
fn quoted(value: &str) -> String {
    serde_json::to_string(value).expect("string to JSON")
}

fn render_config(dir: &Path, port: u16, options: &RegistryOptions) -> String {
    let storage = dir.join("storage");
    let mut config = format!(
        "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: berth-test-secret
health:
  storagedriver:
    enabled: false
",
        storage = quoted(&storage.to_string_lossy()),
        addr = quoted(&format!("127.0.0.1:{port}")),
    );
    if let Some(auth) = &options.token_auth {
        config.push_str(&format!(
            "auth:
  token:
    realm: {}
    service: {}
    issuer: {}
    rootcertbundle: {}
",
            quoted(&auth.realm),
            quoted(&auth.service),
            quoted(&auth.issuer),
            quoted(&auth.root_cert_bundle.to_string_lossy()),
        ));
    }
    if let Some(proxy) = &options.proxy {
        config.push_str(&format!(
            "proxy:\n  remoteurl: {}\n",
            quoted(&proxy.remote_url)
        ));
        if let Some((username, password)) = &proxy.credentials {
            config.push_str(&format!(
                "  username: {}\n  password: {}\n",
                quoted(username),
                quoted(password)
            ));
        }
    }
    config
}
