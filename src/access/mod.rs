//! Who asks, and may they: client authentication on the pull API (`[auth]`: htpasswd,
//! token files) and the `[[access]]` rules (principals and client networks → repository
//! patterns).
//!
//! Without `[auth]` every client is `anonymous`; without `[[access]]` every principal may
//! pull everything (berth's behaviour before tenancy). A refusal names the repository,
//! never the rule: 401 with a `Basic` challenge when credentials would help (none sent,
//! or wrong), 403 `DENIED` when the principal is known and not allowed.

pub mod cert;
mod identity;
mod rules;

pub use identity::{parse_authorization, Sent};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};

use http::{header, HeaderMap};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::config::{Config, ANONYMOUS};
use crate::metrics::Outcome;
use crate::oci::{self, ErrorCode};
use identity::{Identities, Rejected};

/// Who a request is from, as rules and metrics name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// No credentials sent (or no `[auth]` configured).
    Anonymous,
    /// An htpasswd user or a token file's name.
    Named(Arc<str>),
}

impl Principal {
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => ANONYMOUS,
            Principal::Named(n) => n,
        }
    }
}

/// Why a request was refused, as the metric's `reason` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    CredentialsMissing,
    CredentialsInvalid,
    NotAllowed,
    /// Too many passwords waiting for a check.
    Busy,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::CredentialsMissing => "credentials_missing",
            Reason::CredentialsInvalid => "credentials_invalid",
            Reason::NotAllowed => "not_allowed",
            Reason::Busy => "busy",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrincipalLabels {
    principal: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    principal: String,
    reason: &'static str,
}

/// Requests by principal and outcome, refusals by principal and reason. Principals are
/// configured names (a wrong password for an unknown user counts under `""`), so the
/// label sets stay bounded.
#[derive(Clone, Default)]
struct AccessMetrics {
    requests: Family<PrincipalLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
}

impl AccessMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = AccessMetrics::default();
        registry.register(
            "principal_requests",
            "Pull API requests by principal (configured names, or anonymous) and outcome",
            m.requests.clone(),
        );
        registry.register(
            "access_refusals",
            "Pull API requests refused by authentication or [[access]] rules, by principal \
             and reason (credentials_missing, credentials_invalid, not_allowed)",
            m.refusals.clone(),
        );
        m
    }
}

pub struct Access {
    identities: Option<Identities>,
    rules: Vec<rules::Rule>,
    /// `Basic realm="..."`, when clients can authenticate.
    challenge: Option<String>,
    metrics: AccessMetrics,
    /// Per principal, for the status page (only with `[auth]`: without it everyone is
    /// `anonymous`, and the request totals say it all).
    tallies: Option<std::sync::Mutex<BTreeMap<String, Tally>>>,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    requests: u64,
    refused: u64,
    last_seen: u64,
}

/// What the status page shows of a principal since start.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PrincipalStatus {
    /// `""`: credentials that named no principal (an unknown user, a token nobody holds).
    pub principal: String,
    /// Answered requests, refusals included.
    pub requests: u64,
    pub refused: u64,
    /// Unix seconds of the last request.
    pub last_seen: u64,
}

impl Access {
    /// Reads `[auth]` (its files too: an unreadable one is a start-up error) and
    /// `[[access]]` (aliases in patterns become their upstream's host).
    pub fn from_config(config: &Config, registry: &mut Registry) -> Result<Access, String> {
        let identities = config.auth.clone().map(Identities::new).transpose()?;
        let challenge = identities
            .as_ref()
            .map(|i| format!("Basic realm=\"{}\"", i.config().realm));
        let rules = rules::parse(config)?;
        Ok(Access {
            tallies: identities.as_ref().map(|_| Default::default()),
            identities,
            rules,
            challenge,
            metrics: AccessMetrics::register(registry),
        })
    }

    /// One line for the start-up log: how clients are told apart, and how many rules.
    pub fn describe(&self) -> String {
        let who = match &self.identities {
            None => "no [auth]: every client is anonymous".to_owned(),
            Some(i) => format!(
                "{}; anonymous clients {}; client certificates {}",
                i.summary(),
                if i.config().anonymous {
                    "allowed"
                } else {
                    "refused"
                },
                if i.config().client_ca.is_some() {
                    "verified"
                } else {
                    "not asked for"
                },
            ),
        };
        match self.rules.len() {
            0 => format!("{who}; no [[access]] rules: every principal may pull everything"),
            n => format!("{who}; {n} [[access]] rules"),
        }
    }

    /// Whether clients authenticate at all (`[auth]` is configured).
    pub fn authenticates(&self) -> bool {
        self.identities.is_some()
    }

    /// Re-reads the htpasswd file and the tokens every `reload_interval`, for as long as
    /// `access` lives.
    pub fn keep_reloading(access: &Arc<Access>) {
        let Some(interval) = access
            .identities
            .as_ref()
            .map(|i| i.config().reload_interval)
        else {
            return;
        };
        let weak: Weak<Access> = Arc::downgrade(access);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(access) = weak.upgrade() else { return };
                let reloaded = tokio::task::spawn_blocking(move || {
                    access.identities.as_ref().map(|i| i.reload())
                })
                .await;
                match reloaded {
                    Ok(Some(Ok(Some(summary)))) => {
                        tracing::info!(principals = %summary, "auth: credentials reloaded")
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "auth: reload failed; the last credentials read stay in force")
                    }
                    _ => {}
                }
            }
        });
    }

    /// Who sent `headers`: a 401 with a challenge for credentials that do not verify,
    /// or for none when anonymous clients are not allowed.
    /// A verified client certificate names the principal before any header does.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        cert: Option<&cert::ClientCert>,
    ) -> Result<Principal, oci::Error> {
        let Some(identities) = &self.identities else {
            return Ok(Principal::Anonymous);
        };
        if let Some(cert) = cert {
            return Ok(Principal::Named(cert.0.clone()));
        }
        let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        match identities.verify(authorization).await {
            Ok(Some(name)) => Ok(Principal::Named(name)),
            Ok(None) if identities.config().anonymous => Ok(Principal::Anonymous),
            Ok(None) => {
                self.refused(ANONYMOUS, Reason::CredentialsMissing);
                Err(self.unauthorized("authentication required".into()))
            }
            Err(Rejected::Busy) => {
                self.refused("", Reason::Busy);
                Err(oci::Error::new(
                    ErrorCode::Unavailable,
                    "too many logins waiting for a password check; retry shortly",
                )
                .retry_after(std::time::Duration::from_secs(1)))
            }
            Err(rejected) => {
                let (who, message) = match rejected {
                    Rejected::Password { user } => {
                        (user.unwrap_or_default(), "invalid username or password")
                    }
                    Rejected::Token => (String::new(), "invalid bearer token"),
                    Rejected::Malformed | Rejected::Busy => (
                        String::new(),
                        "unreadable Authorization header (Basic or Bearer expected)",
                    ),
                };
                self.refused(&who, Reason::CredentialsInvalid);
                Err(self.unauthorized(message.into()))
            }
        }
    }

    /// The API base (`GET /v2/`), which clients ask first to learn how to
    /// authenticate: a client that sent no credentials is challenged whenever berth
    /// takes them, even if anonymous pulls are allowed. skopeo, podman and Docker send
    /// credentials only to a registry that challenged this request; containerd does not
    /// ask it, and pulls anonymously until a pull itself is challenged.
    pub fn base(&self, principal: &Principal, headers: &HeaderMap) -> Result<(), oci::Error> {
        let sent = headers.contains_key(header::AUTHORIZATION);
        match principal {
            Principal::Anonymous if self.challenge.is_some() && !sent => {
                Err(self.unauthorized("send credentials, or pull without them".into()))
            }
            _ => Ok(()),
        }
    }

    /// May `principal`, from `peer`, pull `repository` of the upstream `host`?
    pub fn authorize(
        &self,
        principal: &Principal,
        peer: IpAddr,
        host: &str,
        repository: &str,
    ) -> Result<(), oci::Error> {
        if self.rules.is_empty() {
            return Ok(());
        }
        if rules::allow(&self.rules, principal, peer, host, repository) {
            return Ok(());
        }
        let name = format!("{host}/{repository}");
        // Never the rule: a client learns only that this repository is not for it.
        match principal {
            Principal::Anonymous if self.challenge.is_some() => {
                self.refused(ANONYMOUS, Reason::CredentialsMissing);
                Err(self.unauthorized(format!(
                    "authentication required to pull {}",
                    oci::Quoted(&name, 300)
                )))
            }
            _ => {
                self.refused(principal.name(), Reason::NotAllowed);
                Err(oci::Error::new(
                    ErrorCode::Denied,
                    format!(
                        "{} may not pull {}",
                        oci::Quoted(principal.name(), 128),
                        oci::Quoted(&name, 300)
                    ),
                ))
            }
        }
    }

    /// Counts an answered request under its principal. A refusal was counted already, by
    /// `refused`, under the principal its credentials named.
    pub fn count(&self, principal: &Principal, outcome: Outcome, refused: bool) {
        if refused {
            return;
        }
        self.tally(principal.name(), |t| t.requests += 1);
        self.metrics
            .requests
            .get_or_create(&PrincipalLabels {
                principal: principal.name().to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Principals seen since start, by name.
    pub fn principals(&self) -> Vec<PrincipalStatus> {
        let Some(tallies) = &self.tallies else {
            return Vec::new();
        };
        let tallies = tallies.lock().unwrap_or_else(|p| p.into_inner());
        tallies
            .iter()
            .map(|(name, t)| PrincipalStatus {
                principal: name.clone(),
                requests: t.requests,
                refused: t.refused,
                last_seen: t.last_seen,
            })
            .collect()
    }

    fn tally(&self, principal: &str, f: impl FnOnce(&mut Tally)) {
        let Some(tallies) = &self.tallies else { return };
        let mut tallies = tallies.lock().unwrap_or_else(|p| p.into_inner());
        let t = match tallies.get_mut(principal) {
            Some(t) => t,
            None => tallies.entry(principal.to_owned()).or_default(),
        };
        f(t);
        t.last_seen = crate::clock::now_secs();
    }

    fn refused(&self, principal: &str, reason: Reason) {
        tracing::info!(principal, reason = reason.as_str(), "access refused");
        self.tally(principal, |t| {
            t.requests += 1;
            t.refused += 1;
        });
        self.metrics
            .refusals
            .get_or_create(&RefusalLabels {
                principal: principal.to_owned(),
                reason: reason.as_str(),
            })
            .inc();
    }

    fn unauthorized(&self, message: String) -> oci::Error {
        let e = oci::Error::new(ErrorCode::Unauthorized, message);
        match &self.challenge {
            Some(c) => e.challenge(c.clone()),
            None => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(extra: &str) -> Access {
        let text = format!(
            "[server]\nlisten=\"127.0.0.1:1\"\nadmin_listen=\"127.0.0.1:2\"\n[storage]\nroot=\"/tmp/x\"\n\
             [[upstreams]]\nhost=\"docker.io\"\naliases=[\"index.docker.io\"]\nurl=\"http://127.0.0.1:3\"\n\
             [[upstreams]]\nhost=\"ghcr.io\"\nurl=\"http://127.0.0.1:4\"\n{extra}"
        );
        let config = Config::parse(&text, "t").unwrap();
        Access::from_config(&config, &mut Registry::default()).unwrap()
    }

    fn named(n: &str) -> Principal {
        Principal::Named(Arc::from(n))
    }

    const HOME: &str = "10.1.2.3";
    const AWAY: &str = "192.168.0.9";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_rules_everyone_pulls_everything() {
        let a = access("");
        assert!(a
            .authorize(&Principal::Anonymous, ip(AWAY), "ghcr.io", "x/y")
            .is_ok());
    }

    #[test]
    fn rules_by_principal_network_and_pattern() {
        let a = access(
            "[[access]]\nprincipals=[\"team-a\"]\nrepositories=[\"docker.io/teama/*\", \"index.docker.io/library/*\"]\n\
             [[access]]\nprincipals=[\"anonymous\"]\nrepositories=[\"docker.io/library/*\"]\n\
             [[access]]\nnetworks=[\"10.0.0.0/8\"]\nrepositories=[\"ghcr.io/myorg/**\"]\n\
             [[access]]\nprincipals=[\"*\"]\nnetworks=[\"10.1.0.0/16\"]\nrepositories=[\"ghcr.io/public/*\"]\n",
        );
        let table: &[(Principal, &str, &str, &str, Option<u16>)] = &[
            (named("team-a"), HOME, "docker.io", "teama/app", None),
            (named("team-a"), HOME, "docker.io", "library/nginx", None),
            (named("team-a"), HOME, "docker.io", "teamb/app", Some(403)),
            (named("team-b"), HOME, "docker.io", "teama/app", Some(403)),
            (
                Principal::Anonymous,
                AWAY,
                "docker.io",
                "library/nginx",
                None,
            ),
            (
                Principal::Anonymous,
                AWAY,
                "docker.io",
                "teama/app",
                Some(403),
            ),
            (named("team-b"), HOME, "ghcr.io", "myorg/a/b", None),
            (named("team-b"), AWAY, "ghcr.io", "myorg/a/b", Some(403)),
            (Principal::Anonymous, HOME, "ghcr.io", "public/x", None),
            (named("team-a"), AWAY, "ghcr.io", "public/x", Some(403)),
        ];
        for (who, from, host, repo, refused) in table {
            let got = a
                .authorize(who, ip(from), host, repo)
                .err()
                .map(|e| e.status().as_u16());
            assert_eq!(got, *refused, "{who:?} from {from} pulling {host}/{repo}");
        }
        // Docker Hub's one-segment names are official images, in rules too.
        let hub = access(
            "[[access]]\nprincipals=[\"*\"]\nrepositories=[\"docker.io/alpine\", \"docker.io/team-*\"]\n",
        );
        let who = Principal::Anonymous;
        assert!(hub
            .authorize(&who, ip(AWAY), "docker.io", "library/alpine")
            .is_ok());
        assert!(hub
            .authorize(&who, ip(AWAY), "docker.io", "library/team-x")
            .is_ok());
        assert!(hub
            .authorize(&who, ip(AWAY), "docker.io", "team-x/app")
            .is_err());
        // No [auth]: an anonymous refusal is a 403 (there is nothing to log in with).
        let e = a
            .authorize(&Principal::Anonymous, ip(AWAY), "docker.io", "teama/app")
            .unwrap_err();
        assert!(e.challenge.is_none());
        assert!(e.message.contains("docker.io/teama/app"), "{}", e.message);
        assert!(
            !e.message.contains("team-a") && !e.message.contains("access["),
            "{}",
            e.message
        );
    }

    #[test]
    fn anonymous_is_challenged_when_clients_can_log_in() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        std::fs::write(tokens.join("team-a"), "tok").unwrap();
        let a = access(&format!(
            "[auth]\ntokens_dir = {:?}\n[[access]]\nprincipals=[\"team-a\"]\nrepositories=[\"docker.io/teama/*\"]\n",
            tokens.display().to_string()
        ));
        let e = a
            .authorize(&Principal::Anonymous, ip(HOME), "docker.io", "teama/app")
            .unwrap_err();
        assert_eq!(e.status().as_u16(), 401);
        assert_eq!(e.challenge.as_deref(), Some("Basic realm=\"berth\""));
        let e = a
            .authorize(&named("team-a"), ip(HOME), "docker.io", "teamb/app")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Denied);
    }

    #[test]
    fn rules_that_name_nothing_configured_are_refused_at_start() {
        let base = "[server]\nlisten=\"127.0.0.1:1\"\nadmin_listen=\"127.0.0.1:2\"\n[storage]\nroot=\"/tmp/x\"\n\
             [[upstreams]]\nhost=\"docker.io\"\nurl=\"http://127.0.0.1:3\"\n";
        for (rule, key) in [
            ("repositories=[\"docker.io/x/*\"]", "name the principals"),
            (
                "principals=[\"a\"]\nrepositories=[\"quay.io/x/*\"]",
                "configured upstream",
            ),
            (
                "principals=[\"a\"]\nrepositories=[\"*/x\"]",
                "configured upstream",
            ),
            (
                "principals=[\"a\"]\nrepositories=[\"docker.io/x//y\"]",
                "empty segment",
            ),
            (
                "principals=[\"a\"]\nnetworks=[\"10.0.0.0/40\"]\nrepositories=[\"docker.io/x\"]",
                "networks",
            ),
            ("principals=[\"a\"]\nrepositories=[]", "at least one"),
        ] {
            let e = Config::parse(&format!("{base}[[access]]\n{rule}\n"), "t").unwrap_err();
            assert!(e.0.contains(key), "{rule}: {e}");
        }
    }
}
