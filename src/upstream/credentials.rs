//! Upstream credentials from configuration: a username with a password file or an
//! environment variable, or a `.dockerconfigjson` file (a Kubernetes pull secret).
//!
//! Secrets are read once at start-up and never printed: `Debug` redacts them.

use std::fmt;
use std::path::Path;

use base64::Engine as _;

use crate::config::{ConfigError, UpstreamConfig};

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    /// Loads what `config` names; `None` means anonymous.
    pub fn load(config: &UpstreamConfig) -> Result<Option<Credentials>, ConfigError> {
        let at = format!("upstreams ({})", config.host);
        if let Some(path) = &config.docker_config {
            return from_docker_config(path, config)
                .map_err(|e| ConfigError(format!("{at}.docker_config: {e}")));
        }
        let Some(username) = config.username.clone() else {
            return Ok(None);
        };
        let password = if let Some(path) = &config.password_file {
            std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError(format!(
                        "{at}.password_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned()
        } else if let Some(var) = &config.password_env {
            std::env::var(var).map_err(|_| {
                ConfigError(format!(
                    "{at}.password_env: environment variable {var} is not set"
                ))
            })?
        } else {
            return Err(ConfigError(format!(
                "{at}: username needs password_file or password_env"
            )));
        };
        Ok(Some(Credentials { username, password }))
    }
}

/// Finds the entry for this upstream in a docker config: by configured host, alias or
/// URL host; Docker Hub's historical key `https://index.docker.io/v1/` matches docker.io.
fn from_docker_config(path: &Path, config: &UpstreamConfig) -> Result<Option<Credentials>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: std::collections::HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: File = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a docker config: {e}", path.display()))?;
    // The URL's host, and host:port when it has an explicit port (on-prem registries).
    let url_host = reqwest::Url::parse(&config.url)
        .ok()
        .and_then(|u| {
            let host = u.host_str()?.to_owned();
            Some(match u.port() {
                Some(p) => vec![format!("{host}:{p}"), host],
                None => vec![host],
            })
        })
        .unwrap_or_default();
    let mut wanted: Vec<String> = std::iter::once(config.host.clone())
        .chain(config.aliases.iter().cloned())
        .chain(url_host)
        .collect();
    if wanted.iter().any(|h| h.ends_with("docker.io")) {
        wanted.push("index.docker.io".into());
    }
    for (key, entry) in &file.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        if !wanted.iter().any(|w| w.eq_ignore_ascii_case(host)) {
            continue;
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        if let Some(auth) = &entry.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
            let raw =
                String::from_utf8(raw).map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("auths.{key:?}.auth is not user:password"))?;
            return Ok(Some(Credentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }));
        }
    }
    Err(format!(
        "{} has no entry for {} (looked for {})",
        path.display(),
        config.host,
        wanted.join(", ")
    ))
}
