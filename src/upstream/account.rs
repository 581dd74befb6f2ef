//! The accounts of one upstream, and sending a request with one of them.
//!
//! An upstream has a default account (its top-level credentials, or anonymous access) and
//! one account per `[[upstreams.credentials]]` entry, chosen by repository pattern: the
//! most specific match wins, no match means the default. Each account owns everything
//! that belongs to whoever the upstream thinks is asking: its credentials, its Bearer
//! tokens (a token fetched for one account is never sent for another), whether the
//! upstream asked it for Basic auth, and its quota bucket (Docker Hub counts per account,
//! and its rate-limit headers describe the account that asked).
//!
//! This module sends one request with one account's auth (retrying once after a 401
//! challenge) and fetches tokens; `client.rs` builds the requests and charges the quota.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap};
use reqwest::{Method, Response, StatusCode, Url};

use super::auth::{parse_challenge, Challenge, TokenCache, TokenResponse};
use super::credentials::{denied_message, Credentials, SecretSource};
use super::egress::Egress;
use super::error::{from_reqwest, Error};
use super::wire::{read_limited, retry_after};
use crate::config::{ConfigError, CountedRequest, QuotaConfig, UpstreamConfig};
use crate::metrics::{Kind, Metrics};
use crate::oci::pattern::most_specific;
use crate::oci::{Pattern, Repository};
use crate::quota::{BucketId, Quota};

/// What every account of an upstream sends with: its HTTP client, where it is, and the
/// limits every request keeps.
pub(super) struct Link {
    pub host: String,
    pub base: Url,
    pub http: reqwest::Client,
    pub egress: Arc<Egress>,
    pub response_timeout: Duration,
    pub stall_timeout: Duration,
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// Who the upstream thinks is asking.
pub(super) struct Account {
    /// `None` for the upstream's own account; else the entry's `name` (or first pattern).
    name: Option<String>,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// The upstream asked this account for Basic auth: send it up front from now on.
    basic: AtomicBool,
    quota: Quota,
}

/// The accounts of one upstream and the patterns that choose them.
pub(super) struct Accounts {
    default: Account,
    named: Vec<Account>,
    /// Every pattern, with the index in `named` of the account it belongs to, in the order
    /// written (a tie between equally specific patterns goes to the first).
    patterns: Vec<(Pattern, usize)>,
}

/// Docker Hub counts manifest GETs: 100 per 6 h anonymously, 200 with an account.
fn docker_hub_quota(authenticated: bool) -> QuotaConfig {
    QuotaConfig {
        requests: if authenticated { 200 } else { 100 },
        per: Duration::from_secs(6 * 3600),
        reserve: 0.2,
        counts: None,
    }
}

impl Accounts {
    /// Loads every account's secret and sizes its bucket. Patterns were checked by
    /// `Config::validate`; one that does not parse here is still an error, not skipped.
    pub fn new(
        config: &UpstreamConfig,
        docker_hub: bool,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let at = format!("upstreams ({})", config.host);
        let credentials = Credentials::load(SecretSource::of_upstream(config), config, &at)?;
        let quota_config = config
            .quota
            .clone()
            .or_else(|| docker_hub.then(|| docker_hub_quota(credentials.is_some())));
        let default = Account::new(
            BucketId {
                upstream: config.host.clone(),
                credential: None,
            },
            credentials,
            quota_config,
            metrics,
        );
        let mut named = Vec::new();
        let mut patterns = Vec::new();
        for (i, c) in config.credentials.iter().enumerate() {
            let at = format!("{at}.credentials[{i}]");
            for p in &c.repositories {
                let pattern = Pattern::parse(p)
                    .map_err(|e| ConfigError(format!("{at}.repositories: {e}")))?;
                patterns.push((pattern, named.len()));
            }
            let name = credential_name(c)
                .ok_or_else(|| ConfigError(format!("{at}.repositories: none given")))?;
            let credentials = Credentials::load(SecretSource::of_credential(c), config, &at)?;
            // Each account is its own bucket: the upstream's `quota` sizes it, not shares it.
            let quota_config = c
                .quota
                .clone()
                .or_else(|| config.quota.clone())
                .or_else(|| docker_hub.then(|| docker_hub_quota(credentials.is_some())));
            let id = BucketId {
                upstream: config.host.clone(),
                credential: Some(name.to_owned()),
            };
            named.push(Account::new(id, credentials, quota_config, metrics));
        }
        Ok(Accounts {
            default,
            named,
            patterns,
        })
    }

    /// The account requests for `repo` (as resolved: Docker Hub's `library/` included) go
    /// out with.
    pub fn for_repo(&self, repo: &Repository) -> &Account {
        most_specific(self.patterns.iter().map(|(p, _)| p), repo.as_str())
            .and_then(|i| self.named.get(self.patterns[i].1))
            .unwrap_or(&self.default)
    }

    /// The upstream's own account.
    pub fn default_account(&self) -> &Account {
        &self.default
    }

    /// Every account, the default first.
    pub fn all(&self) -> impl Iterator<Item = &Account> {
        std::iter::once(&self.default).chain(&self.named)
    }
}

/// How an entry is named: its `name`, or its first pattern.
pub(crate) fn credential_name(c: &crate::config::CredentialConfig) -> Option<&str> {
    c.name
        .as_deref()
        .or(c.repositories.first().map(String::as_str))
}

impl Account {
    fn new(
        id: BucketId,
        credentials: Option<Credentials>,
        quota: Option<QuotaConfig>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Account {
            name: id.credential.clone(),
            credentials,
            tokens: TokenCache::default(),
            basic: AtomicBool::new(false),
            quota: Quota::for_account(
                id,
                quota,
                vec![CountedRequest::ManifestGet],
                metrics.clone(),
            ),
        }
    }

    /// The entry's name; `None` for the upstream's own account.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether requests go with credentials (else anonymously).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// How log lines name the account: never the username.
    pub fn label(&self) -> &str {
        match (&self.name, &self.credentials) {
            (Some(name), _) => name,
            (None, Some(_)) => "default",
            (None, None) => "anonymous",
        }
    }

    /// Registries (Docker Hub among them) answer 401 both for a repository that needs
    /// credentials and for one that does not exist; the message says so.
    fn unauthorized(&self) -> Error {
        Error::Unauthorized(denied_message(
            self.credentials.as_ref(),
            self.name.as_deref(),
        ))
    }

    /// Sends one request with this account's auth: a cached token or Basic credentials up
    /// front; on a 401 challenge, authenticates and retries once. Every answer teaches
    /// this account's bucket; a 429 empties it.
    pub async fn send(
        &self,
        link: &Link,
        method: Method,
        url: Url,
        headers: HeaderMap,
        repo: &Repository,
        kind: Kind,
    ) -> Result<Response, Error> {
        let scope = format!("repository:{repo}:pull");
        let mut retried = false;
        // The token for the retry: the one just fetched, not whatever the shared cache
        // holds by then (a concurrent request may have replaced it).
        let mut fresh: Option<String> = None;
        loop {
            let used = fresh.take().or_else(|| self.tokens.get(&scope));
            let resp = self
                .send_once(link, &method, &url, &headers, kind, used.as_deref())
                .await?;
            match resp.status() {
                // Only the upstream itself may send berth to a token realm: a challenge
                // from a host a redirect led to (a CDN) would get the credentials.
                StatusCode::UNAUTHORIZED
                    if !retried && resp.url().origin() == link.base.origin() =>
                {
                    retried = true;
                    fresh = self.answer_challenge(link, &resp, used, &scope).await?;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(self.unauthorized()),
                StatusCode::TOO_MANY_REQUESTS => {
                    let after = self.quota.too_many_requests(retry_after(resp.headers()));
                    return Err(Error::TooManyRequests {
                        retry_after: Some(after),
                    });
                }
                _ => return Ok(resp),
            }
        }
    }

    /// One request with `token` (or Basic credentials once the upstream asked for them),
    /// counted, its rate-limit headers taught to the bucket.
    async fn send_once(
        &self,
        link: &Link,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        kind: Kind,
        token: Option<&str>,
    ) -> Result<Response, Error> {
        let mut req = link
            .http
            .request(method.clone(), url.clone())
            .headers(headers.clone());
        if let Some(token) = token {
            req = req.bearer_auth(token);
        } else if let (true, Some(c)) = (self.basic.load(Ordering::Relaxed), &self.credentials) {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let sent = tokio::time::timeout(link.response_timeout, req.send()).await;
        let resp = match sent {
            Err(_) => {
                link.metrics
                    .upstream_request(&link.host, method.as_str(), kind, None);
                return Err(Error::Timeout("waiting for response headers"));
            }
            Ok(Err(e)) => {
                link.metrics
                    .upstream_request(&link.host, method.as_str(), kind, None);
                return Err(if e.is_timeout() {
                    Error::Timeout("connecting")
                } else {
                    from_reqwest(&e, Error::Connect)
                });
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        link.metrics
            .upstream_request(&link.host, method.as_str(), kind, Some(status));
        self.quota.observe(resp.headers());
        Ok(resp)
    }

    /// The upstream challenged a request sent with `used` (a token, or none): the token
    /// to retry with (`None`: Basic credentials, now switched on), or why berth cannot.
    async fn answer_challenge(
        &self,
        link: &Link,
        resp: &Response,
        used: Option<String>,
        scope: &str,
    ) -> Result<Option<String>, Error> {
        // Another request may have refreshed the token meanwhile: use theirs.
        let current = self.tokens.get(scope);
        if current.is_some() && current != used {
            return Ok(current);
        }
        // Forget only the token this request found stale, never a newer one.
        if let Some(stale) = &used {
            self.tokens.forget_if(scope, stale);
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        match challenge {
            Some(Challenge::Bearer { realm, service, .. }) => Ok(Some(
                self.fetch_token(link, &realm, service.as_deref(), scope)
                    .await?,
            )),
            Some(Challenge::Basic) if self.credentials.is_some() => {
                self.basic.store(true, Ordering::Relaxed);
                Ok(None)
            }
            _ => Err(self.unauthorized()),
        }
    }

    async fn fetch_token(
        &self,
        link: &Link,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, Error> {
        let mut url = Url::parse(realm).map_err(|_| {
            Error::Protocol(format!(
                "token realm {} is not a URL",
                crate::oci::Quoted(realm, 200)
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Protocol("token realm is not http(s)".into()));
        }
        // A realm is a hop like a redirect: the same policy decides where it may lead.
        link.egress.check_url(&url).map_err(Error::Refused)?;
        // Credentials never go in clear text to a realm of an upstream reached over TLS.
        if self.credentials.is_some() && link.base.scheme() == "https" && url.scheme() != "https" {
            return Err(Error::Protocol(
                "token realm is plain http under an https upstream; refusing to send credentials"
                    .into(),
            ));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = link.http.get(url);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = tokio::time::timeout(link.response_timeout, req.send())
            .await
            .map_err(|_| Error::Timeout("waiting for the token endpoint"))?
            .map_err(|e| from_reqwest(&e, |m| Error::Connect(format!("token endpoint: {m}"))))?;
        link.metrics
            .upstream_request(&link.host, "GET", Kind::Other, Some(resp.status().as_u16()));
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(self.unauthorized()),
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(Error::TooManyRequests {
                    retry_after: retry_after(resp.headers()),
                })
            }
            s => return Err(Error::Status { status: s.as_u16() }),
        }
        let body = read_limited(resp, 64 * 1024, link.stall_timeout, link.body_timeout).await?;
        let token: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("token endpoint answered invalid JSON: {e}")))?;
        let value = token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Protocol("token endpoint answered without a token".into()))?;
        self.tokens.put(scope, value.clone(), token.expires_in);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accounts of an upstream written in TOML, where `PASSWORD_FILE` stands for a
    /// file holding a password.
    fn accounts(upstream_toml: &str) -> Accounts {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "pw\n").unwrap();
        let toml = upstream_toml.replace("PASSWORD_FILE", &file.display().to_string());
        let config: UpstreamConfig = toml::from_str(&toml).unwrap();
        let docker_hub = config.host == "docker.io";
        Accounts::new(&config, docker_hub, &Arc::new(Metrics::new())).unwrap()
    }

    fn chosen<'a>(a: &'a Accounts, repo: &str) -> Option<&'a str> {
        let repo = Repository::parse(repo).unwrap();
        a.for_repo(&repo).name()
    }

    /// A `[[credentials]]` entry (as in the upstream's table) with a password file.
    fn entry(patterns: &str, name: Option<&str>) -> String {
        let name = name.map_or(String::new(), |n| format!("name = \"{n}\"\n"));
        format!(
            "[[credentials]]\nrepositories = {patterns}\n{name}username = \"u\"\n\
             password_file = \"PASSWORD_FILE\"\n"
        )
    }

    #[test]
    fn the_most_specific_pattern_chooses_the_account() {
        let toml = format!(
            "host = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n{}{}{}{}",
            entry("[\"myorg/**\"]", Some("org")),
            entry("[\"myorg/team-*\", \"tools/*\"]", Some("team")),
            entry("[\"myorg/app\"]", None),
            entry("[\"*/shared\"]", Some("shared")),
        );
        let a = accounts(&toml);
        let table = [
            ("myorg/app", Some("myorg/app")),
            ("myorg/team-x", Some("team")),
            ("myorg/other", Some("org")),
            ("myorg/a/b/c", Some("org")),
            ("tools/lint", Some("team")),
            // `*/shared` bounds two segments, `myorg/**` only one.
            ("myorg/shared", Some("shared")),
            ("other/shared", Some("shared")),
            ("other/app", None),
            ("myorg", None),
        ];
        for (repo, want) in table {
            assert_eq!(chosen(&a, repo), want, "{repo}");
        }
    }

    #[test]
    fn docker_hub_names_are_matched_with_library() {
        let toml = format!(
            "host = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n{}{}",
            entry("[\"library/*\"]", Some("official")),
            entry("[\"myorg/*\"]", None),
        );
        let a = accounts(&toml);
        // `nginx` resolves to `library/nginx` before any account is chosen.
        let nginx = Repository::parse("nginx")
            .unwrap()
            .with_library_prefix()
            .unwrap();
        assert_eq!(a.for_repo(&nginx).name(), Some("official"));
        assert_eq!(chosen(&a, "myorg/app"), Some("myorg/*"));
        assert_eq!(chosen(&a, "bitnami/redis"), None);
    }

    #[test]
    fn each_account_has_its_own_bucket_and_tokens() {
        let toml = format!(
            "host = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n{}{}",
            entry("[\"a/*\"]", Some("a")),
            "[[credentials]]\nrepositories = [\"b/*\"]\nquota = { requests = 7, per = \"1h\" }\n\
             username = \"u\"\npassword_file = \"PASSWORD_FILE\"\n",
        );
        let a = accounts(&toml);
        let cap = |acc: &Account| acc.quota().snapshot().capacity;
        // Docker Hub: anonymous 100, an account 200, or its own configured size.
        assert_eq!(cap(a.default_account()), Some(100));
        assert_eq!(cap(&a.named[0]), Some(200));
        assert_eq!(cap(&a.named[1]), Some(7));
        assert_eq!(a.default_account().label(), "anonymous");
        let repo_a = Repository::parse("a/app").unwrap();
        let repo_b = Repository::parse("b/app").unwrap();
        a.for_repo(&repo_a)
            .tokens
            .put("repository:a/app:pull", "token-of-a".into(), Some(300));
        for acc in a.all().filter(|acc| acc.name() != Some("a")) {
            assert_eq!(acc.tokens.get("repository:a/app:pull"), None);
        }
        a.for_repo(&repo_b)
            .quota()
            .acquire(crate::quota::Purpose::New)
            .unwrap();
        assert_eq!(a.named[1].quota().snapshot().tokens, Some(6));
        assert_eq!(a.named[0].quota().snapshot().tokens, Some(200));
    }

    #[test]
    fn an_upstream_quota_sizes_each_account_separately() {
        let toml = format!(
            "host = \"ghcr.io\"\nurl = \"https://ghcr.io\"\nquota = {{ requests = 5, per = \"1h\" }}\n{}",
            entry("[\"a/*\"]", Some("a")),
        );
        let a = accounts(&toml);
        a.default_account()
            .quota()
            .acquire(crate::quota::Purpose::New)
            .unwrap();
        assert_eq!(a.default_account().quota().snapshot().tokens, Some(4));
        assert_eq!(a.named[0].quota().snapshot().tokens, Some(5));
        assert_eq!(a.named[0].quota().snapshot().capacity, Some(5));
    }
}
