//! `[auth]` and `[[access]]`: who the pull API's clients are, and what each may pull.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{default_true, duration, Config};
use crate::net::Cidr;
use crate::oci::Pattern;

/// The principal of a client that sent no credentials.
pub const ANONYMOUS: &str = "anonymous";

/// Client authentication on the pull API. Without this block every client is
/// `anonymous`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file of bcrypt entries (`htpasswd -B`): `user:$2y$...`, one per line.
    #[serde(default)]
    pub htpasswd: Option<PathBuf>,
    /// A directory with one file per principal: the file's name is the principal, its
    /// content (surrounding whitespace ignored) the bearer token.
    #[serde(default)]
    pub tokens_dir: Option<PathBuf>,
    /// May clients without credentials pull (as `anonymous`, subject to `[[access]]`)?
    #[serde(default = "default_true")]
    pub anonymous: bool,
    /// How often `htpasswd` and `tokens_dir` are read again: a token file removed stops
    /// working within this time.
    #[serde(default = "default_reload_interval", with = "duration")]
    pub reload_interval: Duration,
    /// The realm of the `WWW-Authenticate: Basic` challenge.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// With TLS: CA certificates (PEM) that sign client certificates. A client presenting
    /// one is the principal named by its subject's common name; clients without one
    /// may still use a password or token.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_realm() -> String {
    "berth".into()
}

/// One rule: the principals (and client networks) it is for, and the repositories they
/// may pull (`docker.io/library/*`, `ghcr.io/myorg/**`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Principal names; `"anonymous"` names clients without credentials, `"*"` any
    /// principal. Empty: any principal (then `networks` must narrow the rule).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Client addresses (CIDRs) the rule is for; empty: any address.
    #[serde(default)]
    pub networks: Vec<String>,
    /// `<upstream host>/<repository pattern>`.
    pub repositories: Vec<String>,
}

/// Checks `[auth]` and `[[access]]`: patterns parse, name configured upstreams, and a
/// rule is for someone.
pub(super) fn validate(config: &Config) -> Result<(), String> {
    if let Some(auth) = &config.auth {
        if auth.reload_interval.is_zero() {
            return Err("auth.reload_interval must be greater than zero".into());
        }
        if auth.client_ca.is_some() && config.server.tls_cert.is_none() {
            return Err("auth.client_ca needs TLS (server.tls_cert and server.tls_key)".into());
        }
        if auth.realm.is_empty() || auth.realm.contains(['"', '\\']) || !auth.realm.is_ascii() {
            return Err("auth.realm must be non-empty ASCII without quotes or backslashes".into());
        }
    }
    let hosts: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| std::iter::once(&u.host).chain(&u.aliases))
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for (i, rule) in config.access.iter().enumerate() {
        let at = format!("access[{i}]");
        if rule.principals.is_empty() && rule.networks.is_empty() {
            return Err(format!(
                "{at}: name the principals (\"anonymous\", \"*\", ...) or networks it is for"
            ));
        }
        if rule.repositories.is_empty() {
            return Err(format!(
                "{at}.repositories: a rule allows at least one pattern"
            ));
        }
        for p in &rule.principals {
            if p.is_empty() || p.chars().any(|c| c.is_control() || c == '/') {
                return Err(format!("{at}.principals: {p:?} is not a principal name"));
            }
        }
        for n in &rule.networks {
            Cidr::parse(n).map_err(|e| format!("{at}.networks: {e}"))?;
        }
        for r in &rule.repositories {
            let pattern = Pattern::parse(r).map_err(|e| format!("{at}.repositories: {e}"))?;
            match pattern.first_literal() {
                Some(host) if hosts.contains(&host.to_ascii_lowercase()) => {}
                _ => {
                    return Err(format!(
                        "{at}.repositories: {r:?} must start with a configured upstream host \
                         (docker.io/library/*)"
                    ))
                }
            }
        }
    }
    Ok(())
}
