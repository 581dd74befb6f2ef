//! Configuration: the types (serde), the embedded default, validation and overrides.
//!
//! Unknown keys are errors, so a typo is reported with its key path and line instead of
//! being silently ignored. Validation names the key and the problem.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};

mod access;
mod upstream;

pub use access::{AccessRule, AuthConfig, ANONYMOUS};
pub use upstream::{CountedRequest, CredentialConfig, QuotaConfig, UpstreamConfig};

/// `config/berth.toml`, compiled in: what `berth serve` runs on without `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/berth.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Per-client budgets of counted upstream requests; off when absent.
    #[serde(default)]
    pub client_budgets: Option<ClientBudgetConfig>,
    /// Images fetched at start, kept fresh and pinned against eviction.
    #[serde(default)]
    pub warm: Option<WarmConfig>,
    /// Several replicas that fetch each miss once between them; off when absent.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
    /// Who clients of the pull API are (htpasswd, token files, client certificates);
    /// absent: every client is `anonymous`, as before.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Which principals (and client networks) may pull which repositories; none: every
    /// principal may pull everything.
    #[serde(default)]
    pub access: Vec<AccessRule>,
}

/// The replicas of one fleet: who they are, and the secret their requests carry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// How the other replicas reach this one (`http://<pod IP>:5000`). The environment
    /// variable `BERTH_FLEET_ADVERTISE` overrides it (the chart sets it from the pod IP).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Every replica's address, this one's included.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Or a DNS name (a headless Service) and port whose records are the replicas,
    /// re-resolved every `resolve_interval`.
    #[serde(default)]
    pub peers_dns: Option<String>,
    #[serde(default = "default_resolve_interval", with = "duration")]
    pub resolve_interval: Duration,
    /// A file holding the secret every replica shares; requests between replicas are
    /// signed with it.
    pub secret_file: PathBuf,
    /// A peer that does not answer (headers) within this time is skipped for a while.
    #[serde(default = "default_peer_timeout", with = "duration")]
    pub peer_timeout: Duration,
}

fn default_resolve_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_peer_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Which object store holds the shared tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedKind {
    S3,
    Gcs,
    Azure,
}

/// The shared tier: an object store every replica reads and writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    pub kind: SharedKind,
    /// The bucket (S3, GCS) or container (Azure).
    pub bucket: String,
    /// A key prefix for everything berth writes (`cache/`).
    #[serde(default)]
    pub prefix: String,
    /// An S3-compatible endpoint (MinIO, Garage, Ceph); the cloud's own when unset.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style S3 URLs (`endpoint/bucket/key`), as most S3-compatible stores need.
    #[serde(default)]
    pub path_style: bool,
    /// Answer blob hits with a 307 to a short-lived presigned URL of the object.
    #[serde(default)]
    pub redirect: bool,
    /// How long a presigned URL is valid.
    #[serde(default = "default_redirect_ttl", with = "duration")]
    pub redirect_ttl: Duration,
    /// S3: files holding the access key id and secret; the standard AWS environment and
    /// the platform's default chain (IRSA, instance metadata) when unset.
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// GCS: a service account JSON key; `GOOGLE_APPLICATION_CREDENTIALS` or the
    /// platform's default when unset.
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    /// Azure: the storage account, and a file holding its access key (else the
    /// `AZURE_STORAGE_*` environment).
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub access_key_file: Option<PathBuf>,
    /// Metadata operations (HEAD, small GET/PUT) that take longer fail, and the tier is
    /// skipped for a while: a slow store must not slow every pull.
    #[serde(default = "default_shared_timeout", with = "duration")]
    pub timeout: Duration,
}

fn default_redirect_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_shared_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// Image references: `docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:...`,
    /// or a short Docker Hub name (`alpine:3.20`).
    #[serde(default)]
    pub images: Vec<String>,
    /// How often the list is refreshed (tags revalidated, new digests fetched).
    #[serde(default = "default_warm_interval", with = "duration")]
    pub interval: Duration,
    /// `os/arch[/variant]` to fetch from multi-platform images; empty means all.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Also fetch and pin each image's signatures and attestations (cosign's
    /// `sha256-<digest>.sig` / `.att` tags) and its OCI referrers.
    #[serde(default)]
    pub signatures: bool,
}

fn default_warm_interval() -> Duration {
    Duration::from_secs(1800)
}

/// One bucket per client (address or header value), spent when that client's request
/// makes berth send a counted request upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientBudgetConfig {
    /// `"address"` (the client's IP) or `"header:<name>"` (e.g. `"header:x-berth-client"`).
    #[serde(default = "default_budget_key")]
    pub key: String,
    pub requests: u32,
    #[serde(with = "duration")]
    pub per: Duration,
}

fn default_budget_key() -> String {
    "address".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default = "default_header_read_timeout", with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection on which nothing moves for this long is closed.
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    #[serde(default = "default_shutdown_grace", with = "duration")]
    pub shutdown_grace: Duration,
    /// Connections beyond this many (per listener) are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A file holding the bearer token that `POST`/`DELETE /admin/*` require.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Connections one client address may hold at once, per listener (unset: only
    /// `max_connections` applies; behind a NAT or node proxy many clients share one).
    #[serde(default)]
    pub max_connections_per_client: Option<usize>,
    /// Blob fills running at once; more wait their turn (each fill holds a blocking
    /// thread and a temp file).
    #[serde(default = "default_max_concurrent_fills")]
    pub max_concurrent_fills: usize,
    /// Uncached upstream relays (tags lists, referrers) running at once; more are
    /// answered 503 with `Retry-After`.
    #[serde(default = "default_max_concurrent_passthroughs")]
    pub max_concurrent_passthroughs: usize,
}

fn default_max_concurrent_fills() -> usize {
    64
}

fn default_max_concurrent_passthroughs() -> usize {
    32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub root: PathBuf,
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    #[serde(default)]
    pub min_free: Option<ByteSize>,
    /// The object store every replica shares; the local store is a cache in front of it.
    #[serde(default)]
    pub shared: Option<SharedConfig>,
    /// Keep blobs on local disk (the cache tier). With `false` and a shared tier, blobs
    /// are served straight from the object store; `root` then holds only the index,
    /// manifests and fills in progress.
    #[serde(default = "default_true")]
    pub local: bool,
}

pub(crate) fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    #[serde(default = "default_upstream")]
    pub default_upstream: String,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            default_upstream: default_upstream(),
        }
    }
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_size() -> ByteSize {
    ByteSize::gib(20)
}
fn default_upstream() -> String {
    "docker.io".into()
}

pub(crate) mod duration {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write it like \"30s\", \"10m\" or \"6h\""
            ))
        })
    }
}

/// A configuration problem, naming the key.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses and validates a TOML document; `origin` names it in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        config
            .validate()
            .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        Ok(config)
    }

    pub fn embedded() -> Self {
        // The embedded file is checked by a unit test; failing here is a build defect.
        Config::parse(EMBEDDED_DEFAULT, "embedded config/berth.toml")
            .expect("the embedded default configuration is valid")
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err("server.tls_cert and server.tls_key must be set together".into());
        }
        if let Some(w) = &self.warm {
            if w.interval.is_zero() {
                return Err("warm.interval must be greater than zero".into());
            }
            for p in &w.platforms {
                let parts = p.split('/').count();
                if !(2..=3).contains(&parts) || p.split('/').any(str::is_empty) {
                    return Err(format!("warm.platforms: {p:?} is not os/arch[/variant]"));
                }
            }
        }
        if self.server.max_connections_per_client == Some(0) {
            return Err("server.max_connections_per_client must be greater than zero".into());
        }
        if self.server.max_concurrent_fills == 0 || self.server.max_concurrent_passthroughs == 0 {
            return Err(
                "server.max_concurrent_fills and max_concurrent_passthroughs must be greater \
                 than zero"
                    .into(),
            );
        }
        if self.server.max_connections == 0 {
            return Err("server.max_connections must be greater than zero".into());
        }
        if self.storage.max_size.as_u64() == 0 {
            return Err("storage.max_size must be greater than zero".into());
        }
        if self.upstreams.is_empty() {
            return Err("upstreams: at least one [[upstreams]] block is needed".into());
        }
        let names = upstream::validate(&self.upstreams)?;
        if let Some(b) = &self.client_budgets {
            if b.requests == 0 || b.per.is_zero() {
                return Err("client_budgets: requests and per must be greater than zero".into());
            }
            let header_ok = b.key.strip_prefix("header:").is_some_and(|h| {
                !h.is_empty() && http::HeaderName::from_bytes(h.as_bytes()).is_ok()
            });
            // A credential must never become a client's name (kept in memory, sent to
            // fleet peers): with [auth], clients are told apart by their principal anyway.
            if b.key.eq_ignore_ascii_case("header:authorization") {
                return Err(
                    "client_budgets.key: the Authorization header holds credentials; use \"address\" or another header"
                        .into(),
                );
            }
            if b.key != "address" && !header_ok {
                return Err(format!(
                    "client_budgets.key: {:?} must be \"address\" or \"header:<name>\"",
                    b.key
                ));
            }
        }
        if let Some(shared) = &self.storage.shared {
            validate_shared(shared)?;
        }
        if !self.storage.local && self.storage.shared.is_none() {
            return Err("storage.local = false needs a [storage.shared] object store".into());
        }
        if let Some(fleet) = &self.fleet {
            validate_fleet(fleet)?;
        }
        access::validate(self)?;
        if !names.contains(&self.routing.default_upstream.to_ascii_lowercase()) {
            return Err(format!(
                "routing.default_upstream: {:?} is not the host or alias of any [[upstreams]]",
                self.routing.default_upstream
            ));
        }
        Ok(())
    }
}

fn validate_shared(s: &SharedConfig) -> Result<(), String> {
    if s.bucket.is_empty() {
        return Err("storage.shared.bucket must be set".into());
    }
    if let Some(e) = &s.endpoint {
        let url = reqwest::Url::parse(e)
            .map_err(|err| format!("storage.shared.endpoint: {e:?} is not a URL: {err}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "storage.shared.endpoint: {e:?} must be http:// or https://"
            ));
        }
    }
    if s.access_key_id_file.is_some() != s.secret_access_key_file.is_some() {
        return Err(
            "storage.shared: access_key_id_file and secret_access_key_file go together".into(),
        );
    }
    let s3_only = s.access_key_id_file.is_some() || s.path_style;
    if s3_only && s.kind != SharedKind::S3 {
        return Err(
            "storage.shared: access_key_id_file and path_style are for kind = \"s3\"".into(),
        );
    }
    if s.kind == SharedKind::Azure && s.account.is_none() && s.access_key_file.is_some() {
        return Err("storage.shared: access_key_file needs account".into());
    }
    if s.prefix.starts_with('/') || s.prefix.contains("//") {
        return Err(format!(
            "storage.shared.prefix: {:?} must not start with '/' or hold an empty segment",
            s.prefix
        ));
    }
    if s.timeout.is_zero() || s.redirect_ttl.is_zero() {
        return Err("storage.shared: timeout and redirect_ttl must be greater than zero".into());
    }
    Ok(())
}

fn validate_fleet(f: &FleetConfig) -> Result<(), String> {
    if f.peers.is_empty() == f.peers_dns.is_none() {
        return Err("fleet: set either peers or peers_dns".into());
    }
    for p in f.peers.iter().chain(&f.advertise) {
        let url = reqwest::Url::parse(p).map_err(|e| format!("fleet: {p:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("fleet: {p:?} must be an http:// or https:// URL"));
        }
    }
    if let Some(dns) = &f.peers_dns {
        let port_ok = dns
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("fleet.peers_dns: {dns:?} must be <name>:<port>"));
        }
    }
    if f.peer_timeout.is_zero() || f.resolve_interval.is_zero() {
        return Err("fleet: peer_timeout and resolve_interval must be greater than zero".into());
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert_eq!(c.server.listen.port(), 5000);
        assert_eq!(c.server.admin_listen.port(), 5001);
        assert_eq!(c.storage.max_size, ByteSize::gib(20));
        let hosts: Vec<_> = c.upstreams.iter().map(|u| u.host.as_str()).collect();
        for h in [
            "docker.io",
            "ghcr.io",
            "quay.io",
            "registry.k8s.io",
            "gcr.io",
            "public.ecr.aws",
            "mcr.microsoft.com",
            "nvcr.io",
        ] {
            assert!(hosts.contains(&h), "{h} missing");
        }
    }

    pub(super) fn with_upstream(extra: &str) -> String {
        format!(
            "[server]\nlisten=\"127.0.0.1:1\"\nadmin_listen=\"127.0.0.1:2\"\n[storage]\nroot=\"/tmp/x\"\n\
             [[upstreams]]\nhost=\"docker.io\"\nurl=\"http://127.0.0.1:3\"\n{extra}"
        )
    }

    #[test]
    fn quota_and_budgets() {
        let c = Config::parse(
            &with_upstream(
                "quota = { requests = 10, per = \"1h\", reserve = 0.5, counts = [\"manifest-get\", \"blob-get\"] }\n\
                 [client_budgets]\nkey = \"header:x-team\"\nrequests = 5\nper = \"1h\"",
            ),
            "t",
        )
        .unwrap();
        let q = c.upstreams[0].quota.clone().unwrap();
        assert_eq!(
            q.counts,
            Some(vec![CountedRequest::ManifestGet, CountedRequest::BlobGet])
        );
        assert_eq!(c.client_budgets.unwrap().key, "header:x-team");
        let e = Config::parse(
            &with_upstream("quota = { requests = 10, per = \"1h\", reserve = 2.0 }"),
            "t",
        )
        .unwrap_err();
        assert!(e.0.contains("reserve"), "{e}");
        let e = Config::parse(
            &with_upstream("[client_budgets]\nkey = \"cookie\"\nrequests = 5\nper = \"1h\""),
            "t",
        )
        .unwrap_err();
        assert!(e.0.contains("client_budgets.key"), "{e}");
    }

    #[test]
    fn negative_ttl_defaults_to_30s_and_0s_turns_it_off() {
        let c = Config::parse(&with_upstream(""), "t").unwrap();
        assert_eq!(c.upstreams[0].negative_ttl, Duration::from_secs(30));
        let c = Config::parse(&with_upstream("negative_ttl = \"0s\""), "t").unwrap();
        assert!(c.upstreams[0].negative_ttl.is_zero());
        let e = Config::parse(&with_upstream("negative_ttl = \"soon\""), "t").unwrap_err();
        assert!(e.0.contains("negative_ttl"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse(&with_upstream("tag_ttl = \"ten minutes\""), "t").unwrap_err();
        assert!(e.0.contains("tag_ttl"), "{e}");
        let e = Config::parse(&with_upstream("tagttl = \"1m\""), "t").unwrap_err();
        assert!(e.0.contains("tagttl"), "{e}");
        let e = Config::parse(&with_upstream("url2 = 1"), "t").unwrap_err();
        assert!(e.0.contains("url2"), "{e}");
        let bad_url = with_upstream("").replace("http://127.0.0.1:3", "ftp://x");
        let e = Config::parse(&bad_url, "t").unwrap_err();
        assert!(e.0.contains("url"), "{e}");
        let e = Config::parse(
            &with_upstream("[routing]\ndefault_upstream=\"nope.io\""),
            "t",
        )
        .unwrap_err();
        assert!(e.0.contains("routing.default_upstream"), "{e}");
        let e = Config::parse(&with_upstream("username = \"u\""), "t").unwrap_err();
        assert!(e.0.contains("password_file"), "{e}");
    }
}
