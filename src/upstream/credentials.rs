//! Upstream credentials from configuration: a username with a password file or an
//! environment variable, or a `.dockerconfigjson` file (a Kubernetes pull secret).
//!
//! Secrets are read once at start-up and never printed: `Debug` redacts them.

use std::fmt;
use std::path::Path;

use base64::Engine as _;

use crate::config::{ConfigError, CredentialConfig, UpstreamConfig};

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Neither half is printed: a username is half of what an attacker needs, and says whose
/// account (and quota) berth spends.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// What a pull client (and the open status page) is told when the upstream refuses a
/// request: whether credentials are configured (and which entry, by its name), never
/// whose they are.
pub(super) fn denied_message(credentials: Option<&Credentials>, name: Option<&str>) -> String {
    match (credentials, name) {
        (Some(_), Some(name)) => format!(
            "the upstream refused the configured credentials {} (or the repository does not \
             exist, or they do not grant access to it)",
            crate::oci::Quoted(name, 100)
        ),
        (Some(_), None) => "the upstream refused the configured credentials (or the repository \
                            does not exist, or they do not grant access to it)"
            .into(),
        (None, _) => "the repository does not exist or needs credentials; configure them for \
                      this upstream if it is private"
            .into(),
    }
}

/// Where one account's secret comes from: the upstream's own keys or those of one
/// `[[upstreams.credentials]]` entry (the same four keys, the same rules).
#[derive(Clone, Copy, Debug)]
pub struct SecretSource<'a> {
    pub username: Option<&'a str>,
    pub password_file: Option<&'a Path>,
    pub password_env: Option<&'a str>,
    pub docker_config: Option<&'a Path>,
}

impl<'a> SecretSource<'a> {
    pub fn of_upstream(config: &'a UpstreamConfig) -> Self {
        SecretSource {
            username: config.username.as_deref(),
            password_file: config.password_file.as_deref(),
            password_env: config.password_env.as_deref(),
            docker_config: config.docker_config.as_deref(),
        }
    }

    pub fn of_credential(config: &'a CredentialConfig) -> Self {
        SecretSource {
            username: config.username.as_deref(),
            password_file: config.password_file.as_deref(),
            password_env: config.password_env.as_deref(),
            docker_config: config.docker_config.as_deref(),
        }
    }
}

impl Credentials {
    /// Loads what `secret` names; `None` means anonymous. A docker config is searched for
    /// `upstream`'s host, aliases and URL host; `at` names the keys in messages
    /// (`upstreams (docker.io).credentials[1]`).
    pub fn load(
        secret: SecretSource<'_>,
        upstream: &UpstreamConfig,
        at: &str,
    ) -> Result<Option<Credentials>, ConfigError> {
        if let Some(path) = secret.docker_config {
            return from_docker_config(path, upstream)
                .map_err(|e| ConfigError(format!("{at}.docker_config: {e}")));
        }
        let Some(username) = secret.username.map(str::to_owned) else {
            return Ok(None);
        };
        let password = if let Some(path) = secret.password_file {
            std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError(format!(
                        "{at}.password_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned()
        } else if let Some(var) = secret.password_env {
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

/// How a docker config key names this upstream. Lower is more specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HostMatch {
    /// The upstream's configured `host`.
    Exact,
    /// One of its `aliases`, its URL's host, or Docker Hub's historical `index.docker.io`.
    Alias,
}

/// Splits a docker config key (`https://index.docker.io/v1/`, `ghcr.io/org`,
/// `registry.corp:5000`) into its host and the number of repository path segments.
/// Docker Hub's `/v1/` (and a bare `/v2/`) name the API version, not a repository path.
fn split_key(key: &str) -> (&str, usize) {
    let rest = ["https://", "http://"]
        .iter()
        .find_map(|scheme| {
            key.get(..scheme.len())
                .filter(|p| p.eq_ignore_ascii_case(scheme))
                .map(|_| &key[scheme.len()..])
        })
        .unwrap_or(key);
    let mut parts = rest.split('/').filter(|s| !s.is_empty());
    let host = parts.next().unwrap_or("");
    let path: Vec<&str> = parts.collect();
    let segments = match path.as_slice() {
        ["v1"] | ["v2"] => 0,
        p => p.len(),
    };
    (host, segments)
}

/// Finds the entry for this upstream in a docker config, by configured host, alias or URL
/// host; Docker Hub's historical key `https://index.docker.io/v1/` matches docker.io.
///
/// When several keys match, the choice does not depend on their order in the file:
/// 1. a key naming the configured `host` beats one naming an alias (or the URL's host);
/// 2. then a key with more repository path segments (`ghcr.io/org/team` over
///    `ghcr.io/org` over `ghcr.io`): the operator wrote the narrower one on purpose;
/// 3. then the key that sorts first (byte order).
///
/// Entries without credentials (no `auth`, no `username`/`password`, e.g. only an
/// `identitytoken`) are skipped; a malformed `auth` on the chosen entry is an error, not a
/// silent fall-back to a less specific one.
fn from_docker_config(path: &Path, config: &UpstreamConfig) -> Result<Option<Credentials>, String> {
    let file = read_docker_config(path)?;
    let wanted = wanted_hosts(config);
    let mut candidates: Vec<(HostMatch, usize, &String, &DockerAuth)> = file
        .auths
        .iter()
        .filter_map(|(key, entry)| {
            let (host, segments) = split_key(key);
            let matched = if host.eq_ignore_ascii_case(&config.host) {
                HostMatch::Exact
            } else if wanted.iter().any(|w| w.eq_ignore_ascii_case(host)) {
                HostMatch::Alias
            } else {
                return None;
            };
            Some((matched, segments, key, entry))
        })
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    for (_, _, key, entry) in candidates {
        if let Some(credentials) = entry.credentials(key)? {
            return Ok(Some(credentials));
        }
    }
    Err(format!(
        "{} has no entry for {} (looked for {})",
        path.display(),
        config.host,
        wanted.join(", ")
    ))
}

/// A docker config file (`~/.docker/config.json`, a `.dockerconfigjson` secret): only
/// its `auths`.
#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl DockerAuth {
    /// The entry's credentials: `username` and `password`, else `auth` (base64 of
    /// `user:password`); `None` for an entry without either. `key` names it in errors.
    fn credentials(&self, key: &str) -> Result<Option<Credentials>, String> {
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        let Some(auth) = self.auth.as_deref().filter(|a| !a.trim().is_empty()) else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
        let raw = String::from_utf8(raw).map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
        let (u, p) = raw
            .split_once(':')
            .ok_or_else(|| format!("auths.{key:?}.auth is not user:password"))?;
        Ok(Some(Credentials {
            username: u.to_owned(),
            password: p.to_owned(),
        }))
    }
}

/// Reads a docker config. serde_json's messages quote the offending value, which may be
/// a secret: an error says only the kind of error and where it is.
fn read_docker_config(path: &Path) -> Result<DockerConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Syntax => "invalid JSON",
            serde_json::error::Category::Eof => "truncated JSON",
            serde_json::error::Category::Data => "a value of the wrong type",
            serde_json::error::Category::Io => "unreadable",
        };
        format!(
            "{} is not a docker config: {kind} at line {} column {}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// The hosts a docker config key may name for this upstream: its host, its aliases, its
/// URL's host (and host:port when the URL has an explicit port: on-prem registries), and
/// Docker Hub's `index.docker.io`.
fn wanted_hosts(config: &UpstreamConfig) -> Vec<String> {
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
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// An upstream as in berth.toml, reading `auths` (a JSON object body) as its docker config.
    fn load(upstream_toml: &str, auths: &str) -> Result<Option<Credentials>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".dockerconfigjson");
        std::fs::write(&path, format!("{{\"auths\":{{{auths}}}}}")).unwrap();
        let config: UpstreamConfig = toml::from_str(&format!(
            "{upstream_toml}\ndocker_config = {:?}\n",
            path.display().to_string()
        ))
        .unwrap();
        Credentials::load(SecretSource::of_upstream(&config), &config, "upstreams")
    }

    fn user(upstream_toml: &str, auths: &str) -> String {
        load(upstream_toml, auths).unwrap().unwrap().username
    }

    const HUB: &str =
        "host = \"docker.io\"\naliases = [\"registry-1.docker.io\", \"index.docker.io\"]\n\
                       url = \"https://registry-1.docker.io\"";
    const GHCR: &str = "host = \"ghcr.io\"\nurl = \"https://ghcr.io\"";

    fn entry(key: &str, name: &str) -> String {
        format!(
            "{key:?}: {{\"auth\": {:?}}}",
            b64(&format!("{name}:pw-{name}"))
        )
    }

    /// Every order of `entries` in the file gives the same user.
    fn same_choice_in_every_order(upstream_toml: &str, entries: &[String]) -> String {
        let mut chosen = std::collections::BTreeSet::new();
        let n = entries.len();
        // Rotations and their reversals: enough orders to catch "the first/last one wins".
        for r in 0..n {
            let mut order: Vec<&String> = entries.iter().cycle().skip(r).take(n).collect();
            for _ in 0..2 {
                let auths = order
                    .iter()
                    .map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                chosen.insert(user(upstream_toml, &auths));
                order.reverse();
            }
        }
        assert_eq!(
            chosen.len(),
            1,
            "the choice depends on the order: {chosen:?}"
        );
        chosen.into_iter().next().unwrap()
    }

    #[test]
    fn the_exact_host_beats_aliases_whatever_the_order() {
        let entries = [
            entry("https://index.docker.io/v1/", "legacy"),
            entry("registry-1.docker.io", "alias"),
            entry("docker.io", "exact"),
            entry("ghcr.io", "other"),
        ];
        assert_eq!(same_choice_in_every_order(HUB, &entries), "exact");
    }

    #[test]
    fn among_aliases_the_key_order_decides() {
        // Both are aliases with no repository path (`/v1/` is Docker Hub's API version):
        // "https://index..." sorts before "registry-1...".
        let entries = [
            entry("registry-1.docker.io", "alias"),
            entry("https://index.docker.io/v1/", "legacy"),
        ];
        assert_eq!(same_choice_in_every_order(HUB, &entries), "legacy");
    }

    #[test]
    fn a_longer_path_beats_a_shorter_one() {
        let entries = [
            entry("ghcr.io", "host"),
            entry("ghcr.io/org", "org"),
            entry("ghcr.io/org/team", "team"),
            entry("https://ghcr.io/other", "other"),
        ];
        assert_eq!(same_choice_in_every_order(GHCR, &entries), "team");
        // Same depth: the key that sorts first.
        let entries = [
            entry("ghcr.io/zeta", "zeta"),
            entry("ghcr.io/alpha", "alpha"),
        ];
        assert_eq!(same_choice_in_every_order(GHCR, &entries), "alpha");
    }

    #[test]
    fn an_exact_host_beats_a_longer_alias_path() {
        let entries = [
            entry("docker.io", "exact"),
            entry("registry-1.docker.io/library/team", "alias-path"),
        ];
        assert_eq!(same_choice_in_every_order(HUB, &entries), "exact");
    }

    #[test]
    fn entries_without_credentials_are_skipped() {
        let auths = format!(
            "\"docker.io\": {{\"identitytoken\": \"x\"}}, {}",
            entry("index.docker.io", "fallback")
        );
        assert_eq!(user(HUB, &auths), "fallback");
    }

    #[test]
    fn a_broken_best_entry_is_an_error_not_a_fallback() {
        let auths = format!(
            "\"docker.io\": {{\"auth\": \"not base64!\"}}, {}",
            entry("index.docker.io", "fallback")
        );
        let e = load(HUB, &auths).unwrap_err().to_string();
        assert!(e.contains("\"docker.io\"") && e.contains("base64"), "{e}");
    }

    #[test]
    fn no_matching_entry_is_an_error() {
        let e = load(GHCR, &entry("quay.io", "q")).unwrap_err().to_string();
        assert!(e.contains("no entry for ghcr.io"), "{e}");
    }

    #[test]
    fn a_malformed_file_does_not_quote_its_content() {
        // A secret where an object belongs: serde_json would quote it in its message.
        let e = load(GHCR, "\"ghcr.io\": \"alice:hunter2\"")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2") && !e.contains("alice"), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn a_credential_entry_loads_like_the_upstream_and_names_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".dockerconfigjson");
        std::fs::write(
            &path,
            format!(
                "{{\"auths\":{{{}}}}}",
                entry("https://index.docker.io/v1/", "orgbot")
            ),
        )
        .unwrap();
        let config: UpstreamConfig = toml::from_str(&format!(
            "{HUB}\n[[credentials]]\nrepositories = [\"myorg/*\"]\ndocker_config = {:?}\n\
             [[credentials]]\nrepositories = [\"other/*\"]\nusername = \"u\"\n\
             password_file = \"/nonexistent/berth-test\"\n",
            path.display().to_string()
        ))
        .unwrap();
        let at = "upstreams (docker.io).credentials[0]";
        let c = Credentials::load(
            SecretSource::of_credential(&config.credentials[0]),
            &config,
            at,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.username, "orgbot");
        let at = "upstreams (docker.io).credentials[1]";
        let e = Credentials::load(
            SecretSource::of_credential(&config.credentials[1]),
            &config,
            at,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("upstreams (docker.io).credentials[1].password_file: cannot read"),
            "{e}"
        );
        // The upstream itself has no credentials of its own.
        let own = Credentials::load(SecretSource::of_upstream(&config), &config, "upstreams");
        assert!(own.unwrap().is_none());
    }

    #[test]
    fn secrets_stay_out_of_debug_and_denial_messages() {
        let c = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        let debug = format!("{c:?} {:?}", Some(&c));
        assert!(
            !debug.contains("alice") && !debug.contains("hunter2"),
            "{debug}"
        );
        for name in [None, Some("myorg")] {
            let message = denied_message(Some(&c), name);
            assert!(!message.contains("alice") && !message.contains("hunter2"));
            assert!(message.contains("configured credentials"), "{message}");
        }
        assert!(denied_message(Some(&c), Some("myorg")).contains("myorg"));
        assert!(denied_message(None, None).contains("needs credentials"));
    }
}
