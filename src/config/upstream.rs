//! `[[upstreams]]`: one registry berth may fetch from, its credentials (its own, and
//! `[[upstreams.credentials]]` per repository pattern), quota and timeouts.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// How clients name this upstream (`?ns=`, first path segment).
    pub host: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Where berth fetches from: `https://...`, or `http://...` for on-prem and tests.
    pub url: String,
    #[serde(default = "default_tag_ttl", with = "duration")]
    pub tag_ttl: Duration,
    /// How long the upstream's "no such tag" (404) is remembered; zero turns it off.
    #[serde(default = "default_negative_ttl", with = "duration")]
    pub negative_ttl: Duration,
    #[serde(default)]
    pub quota: Option<QuotaConfig>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of an environment variable holding the password or token.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A `.dockerconfigjson` file (Kubernetes pull secret format).
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for this upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(default = "default_response_timeout", with = "duration")]
    pub response_timeout: Duration,
    /// A blob fill that receives no byte for this long is abandoned.
    #[serde(default = "default_stall_timeout", with = "duration")]
    pub stall_timeout: Duration,
    /// No blob fill runs longer than this.
    #[serde(default = "default_fill_deadline", with = "duration")]
    pub fill_deadline: Duration,
    /// The whole of a body berth buffers (manifest, token, tags list, referrers) must
    /// arrive within this time: one byte a minute would otherwise hold a coalesced fetch
    /// and every client waiting on it.
    #[serde(default = "default_body_timeout", with = "duration")]
    pub body_timeout: Duration,
    /// Where else redirects and token realms may lead besides the upstream's own origin
    /// and public addresses: CIDRs (`10.0.0.0/8`) or host names (`minio.internal`).
    #[serde(default)]
    pub redirect_allow: Vec<String>,
    /// Credentials for some repositories of this upstream (`[[upstreams.credentials]]`):
    /// the most specific matching pattern wins; the rest use the upstream's own
    /// credentials above (or none).
    #[serde(default)]
    pub credentials: Vec<CredentialConfig>,
}

/// Credentials for the repositories matching `repositories` (patterns below the
/// upstream: `myorg/*`, `myorg/**`), with their own quota bucket (Docker Hub counts per
/// account).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub repositories: Vec<String>,
    /// How metrics, logs and the status page name this credential (never the username);
    /// the first pattern when unset.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// This account's quota; by default the upstream's `quota` (a bucket of its own), or
    /// Docker Hub's 200 manifest GETs per 6 h for an account.
    #[serde(default)]
    pub quota: Option<QuotaConfig>,
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub requests: u32,
    #[serde(with = "duration")]
    pub per: Duration,
    /// Below this fraction of the bucket, tokens are kept for images berth has never
    /// seen; moved tags of cached images are served stale.
    #[serde(default = "default_reserve")]
    pub reserve: f64,
    /// Which requests spend a token; Docker Hub's rule (manifest GETs) by default.
    #[serde(default)]
    pub counts: Option<Vec<CountedRequest>>,
}

fn default_reserve() -> f64 {
    0.2
}

/// The kinds of upstream request a quota can count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CountedRequest {
    ManifestGet,
    ManifestHead,
    BlobGet,
    BlobHead,
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_fill_deadline() -> Duration {
    Duration::from_secs(3600)
}

/// Checks every `[[upstreams]]` block; returns every host and alias, lower-cased.
pub(super) fn validate(upstreams: &[UpstreamConfig]) -> Result<HashSet<String>, String> {
    let mut names = HashSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let at = format!("upstreams[{i}] ({})", u.host);
        for name in std::iter::once(&u.host).chain(&u.aliases) {
            if !valid_host(name) {
                return Err(format!(
                    "{at}: {name:?} is not a host name (letters, digits, '.', '-', optional :port)"
                ));
            }
            if !names.insert(name.to_ascii_lowercase()) {
                return Err(format!("{at}: host or alias {name:?} is configured twice"));
            }
        }
        let parsed = reqwest::Url::parse(&u.url)
            .map_err(|e| format!("{at}.url: {:?} is not a URL: {e}", u.url))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!(
                "{at}.url: {:?} must be an http:// or https:// URL",
                u.url
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(format!(
                "{at}.url: put credentials in username/password_file or docker_config, not the URL"
            ));
        }
        if u.tag_ttl.is_zero() {
            return Err(format!("{at}.tag_ttl must be greater than zero"));
        }
        if let Some(q) = &u.quota {
            validate_quota(&at, q)?;
        }
        let secrets = [
            u.password_file.is_some(),
            u.password_env.is_some(),
            u.docker_config.is_some(),
        ];
        if secrets.iter().filter(|s| **s).count() > 1 {
            return Err(format!(
                "{at}: set only one of password_file, password_env, docker_config"
            ));
        }
        if (u.password_file.is_some() || u.password_env.is_some()) && u.username.is_none() {
            return Err(format!("{at}: password_file/password_env need username"));
        }
        if u.username.is_some() && u.password_file.is_none() && u.password_env.is_none() {
            return Err(format!(
                "{at}: username needs password_file or password_env"
            ));
        }
        validate_credentials(&at, u)?;
    }
    Ok(names)
}

fn validate_quota(at: &str, q: &QuotaConfig) -> Result<(), String> {
    if q.requests == 0 || q.per.is_zero() {
        return Err(format!(
            "{at}.quota: requests and per must be greater than zero"
        ));
    }
    if !(0.0..1.0).contains(&q.reserve) {
        return Err(format!("{at}.quota.reserve must be at least 0 and below 1"));
    }
    Ok(())
}

/// `[[upstreams.credentials]]` of the upstream at `at`: patterns relative to it, one
/// secret each, a name of its own.
fn validate_credentials(at: &str, u: &UpstreamConfig) -> Result<(), String> {
    let mut names = HashSet::new();
    for (i, c) in u.credentials.iter().enumerate() {
        let at = format!("{at}.credentials[{i}]");
        if c.repositories.is_empty() {
            return Err(format!(
                "{at}.repositories: at least one pattern is needed (\"myorg/*\")"
            ));
        }
        for p in &c.repositories {
            let pattern =
                crate::oci::Pattern::parse(p).map_err(|e| format!("{at}.repositories: {e}"))?;
            let names_upstream = pattern.first_literal().is_some_and(|first| {
                std::iter::once(&u.host)
                    .chain(&u.aliases)
                    .any(|h| h.eq_ignore_ascii_case(first))
            });
            if names_upstream {
                return Err(format!(
                    "{at}.repositories: {p:?} names the upstream; patterns are relative to it \
                     (\"myorg/*\", not \"{}/myorg/*\")",
                    u.host
                ));
            }
        }
        let with_password = c.password_file.is_some() || c.password_env.is_some();
        let secrets = [
            c.password_file.is_some(),
            c.password_env.is_some(),
            c.docker_config.is_some(),
        ];
        match secrets.iter().filter(|s| **s).count() {
            0 => {
                return Err(format!(
                    "{at}: set username with password_file or password_env, or docker_config"
                ))
            }
            1 => {}
            _ => {
                return Err(format!(
                    "{at}: set only one of password_file, password_env, docker_config"
                ))
            }
        }
        if with_password && c.username.is_none() {
            return Err(format!("{at}: password_file/password_env need username"));
        }
        if c.username.is_some() && !with_password {
            return Err(format!(
                "{at}: username needs password_file or password_env"
            ));
        }
        let name = c.name.as_deref().unwrap_or(&c.repositories[0]);
        if name.trim().is_empty() {
            return Err(format!("{at}.name must not be empty"));
        }
        // "default" is how the upstream's own account is named (logs, `credential_name`).
        if name == "default" {
            return Err(format!(
                "{at}.name: \"default\" names the upstream's own credentials; choose another"
            ));
        }
        if !names.insert(name) {
            return Err(format!(
                "{at}.name: {name:?} names another credential of this upstream (a credential \
                 without a name is named by its first pattern)"
            ));
        }
        if let Some(q) = &c.quota {
            validate_quota(&at, q)?;
        }
    }
    Ok(())
}

fn valid_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    port_ok
        && !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::super::tests::with_upstream;
    use super::super::{Config, ConfigError};

    /// `[[upstreams.credentials]]` blocks after the docker.io upstream's keys.
    fn with_credentials(blocks: &[&str]) -> Result<Config, ConfigError> {
        let blocks: String = blocks
            .iter()
            .map(|b| format!("[[upstreams.credentials]]\n{b}\n"))
            .collect();
        Config::parse(&with_upstream(&blocks), "t")
    }

    #[test]
    fn upstream_credentials_parse() {
        let c = with_credentials(&[
            "repositories = [\"myorg/*\", \"myorg/**\"]\nname = \"myorg\"\nusername = \"bot\"\n\
             password_file = \"/run/secrets/myorg\"\nquota = { requests = 50, per = \"6h\" }",
            "repositories = [\"other/*\"]\ndocker_config = \"/etc/berth/other.json\"",
        ])
        .unwrap();
        let creds = &c.upstreams[0].credentials;
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[0].name.as_deref(), Some("myorg"));
        assert_eq!(creds[0].quota.as_ref().map(|q| q.requests), Some(50));
        assert!(creds[1].docker_config.is_some() && creds[1].name.is_none());
    }

    #[test]
    fn upstream_credential_errors_name_the_key() {
        let docker_config = "docker_config = \"/x.json\"";
        let cases: &[(&[&str], &str)] = &[
            (
                &["repositories = []\ndocker_config = \"/x.json\""],
                "upstreams[0] (docker.io).credentials[0].repositories: at least one",
            ),
            (
                &[
                    "repositories = [\"a/*\"]\ndocker_config = \"/x.json\"",
                    "repositories = [\"b//c\"]\ndocker_config = \"/x.json\"",
                ],
                "upstreams[0] (docker.io).credentials[1].repositories: \"b//c\" has an empty segment",
            ),
            (
                &["repositories = [\"docker.io/myorg/*\"]\ndocker_config = \"/x.json\""],
                "credentials[0].repositories: \"docker.io/myorg/*\" names the upstream",
            ),
            (
                &["repositories = [\"a/*\"]"],
                "credentials[0]: set username with password_file or password_env, or docker_config",
            ),
            (
                &["repositories = [\"a/*\"]\nusername = \"u\"\npassword_env = \"P\"\n\
                   docker_config = \"/x.json\""],
                "credentials[0]: set only one of",
            ),
            (
                &["repositories = [\"a/*\"]\npassword_file = \"/p\""],
                "credentials[0]: password_file/password_env need username",
            ),
            (
                &["repositories = [\"a/*\"]\nusername = \"u\"\ndocker_config = \"/x.json\""],
                "credentials[0]: username needs password_file or password_env",
            ),
            (
                &[
                    "repositories = [\"a/*\"]\nname = \"team\"\ndocker_config = \"/x.json\"",
                    "repositories = [\"b/*\"]\nname = \"team\"\ndocker_config = \"/y.json\"",
                ],
                "credentials[1].name: \"team\" names another credential",
            ),
            (
                // Unnamed: named by the first pattern, which the first entry took.
                &[
                    "repositories = [\"a/*\"]\ndocker_config = \"/x.json\"",
                    "repositories = [\"a/*\", \"b/*\"]\ndocker_config = \"/y.json\"",
                ],
                "credentials[1].name: \"a/*\" names another credential",
            ),
            (
                &["repositories = [\"a/*\"]\nname = \"default\"\ndocker_config = \"/x.json\""],
                "credentials[0].name: \"default\"",
            ),
            (
                &["repositories = [\"a/*\"]\ndocker_config = \"/x.json\"\n\
                   quota = { requests = 0, per = \"1h\" }"],
                "credentials[0].quota: requests and per must be greater than zero",
            ),
        ];
        for (blocks, want) in cases {
            let e = with_credentials(blocks).unwrap_err().to_string();
            assert!(e.contains(want), "{blocks:?}:\n  got  {e}\n  want {want}");
        }
        // The same entries on their own are fine.
        with_credentials(&[&format!("repositories = [\"a/*\"]\n{docker_config}")]).unwrap();
    }
}
