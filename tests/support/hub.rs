//! Docker Hub's pull-rate limiting, emulated in front of the real registry (which has
//! none): manifest GETs are counted per credential in a window, every manifest response
//! (GET and HEAD) carries `ratelimit-limit: N;w=S` and `ratelimit-remaining: R;w=S`, and
//! past the limit GETs get Docker Hub's 429 body (with `Retry-After` when asked). With
//! `auth`, requests need a Bearer token from the emulator's own token endpoint, reached
//! through Docker Hub's challenge shape. With `registry_tokens`, the real registry behind
//! the front checks the tokens of the test token issuer instead, and the emulator only
//! counts: per account named in the token, or per client address for anonymous pulls.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hyper::{HeaderMap, Method, Response};

use super::front::ChannelBody;

pub const SERVICE: &str = "registry.docker.io";

#[derive(Debug, Clone)]
pub struct HubRules {
    /// Manifest GETs allowed per window and credential.
    pub limit: u32,
    pub window: Duration,
    /// Send `Retry-After` (seconds until the window resets) with 429s.
    pub retry_after: bool,
    /// Require Bearer tokens from `/token` (Docker Hub's challenge flow).
    pub auth: bool,
    /// Accepted `(user, password)` pairs; anyone else is anonymous.
    pub users: Vec<(String, String)>,
    /// The registry behind the front does the auth (`auth: token`, the test token
    /// issuer): `Authorization` is passed on, and a manifest GET counts against the
    /// account its JWT names (`sub`), or the client's address when the token is
    /// anonymous, as Docker Hub counts. A GET without a token is not counted (the registry
    /// answers it 401). `auth` is ignored.
    pub registry_tokens: bool,
}

impl HubRules {
    pub fn new(limit: u32, window: Duration) -> Self {
        HubRules {
            limit,
            window,
            retry_after: true,
            auth: true,
            users: Vec::new(),
            registry_tokens: false,
        }
    }

    /// Counting only, in front of a registry that checks the token issuer's tokens.
    pub fn with_registry_tokens(limit: u32, window: Duration) -> Self {
        HubRules {
            auth: false,
            registry_tokens: true,
            ..HubRules::new(limit, window)
        }
    }
}

#[derive(Default)]
struct Counts {
    /// identity → (window start, manifest GETs counted in it)
    windows: HashMap<String, (Instant, u32)>,
    counted: u32,
    /// (identity, path) of every manifest GET counted, in order.
    counted_log: Vec<(String, String)>,
    refused: u32,
    tokens_issued: u32,
}

pub struct Hub {
    rules: HubRules,
    realm: String,
    counts: Mutex<Counts>,
}

/// What the front should do with a request.
pub enum Verdict {
    Answer(Response<ChannelBody>),
    /// Forward it; decorate manifest responses with the headers for `identity` (none when
    /// it is empty: a request without a token, with `registry_tokens`).
    Forward {
        identity: String,
    },
}

impl Hub {
    pub fn new(rules: HubRules, front_url: &str) -> Hub {
        Hub {
            rules,
            realm: format!("{front_url}/token"),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Manifest GETs counted so far (all credentials), including refused ones? No: only
    /// those answered with the manifest.
    pub fn counted(&self) -> u32 {
        self.counts.lock().unwrap().counted
    }

    /// The paths of the manifest GETs counted against `identity` (an account's name, or
    /// a client address for anonymous pulls with `registry_tokens`), oldest first.
    pub fn counted_for(&self, identity: &str) -> Vec<String> {
        let c = self.counts.lock().unwrap();
        c.counted_log
            .iter()
            .filter(|(id, _)| id == identity)
            .map(|(_, path)| path.clone())
            .collect()
    }

    /// Every identity that has been counted, sorted.
    pub fn identities(&self) -> Vec<String> {
        let c = self.counts.lock().unwrap();
        let mut ids: Vec<String> = c.counted_log.iter().map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Whether the front passes `Authorization` on to the registry (`registry_tokens`).
    pub fn passes_auth_on(&self) -> bool {
        self.rules.registry_tokens
    }

    /// 429s sent.
    pub fn refused(&self) -> u32 {
        self.counts.lock().unwrap().refused
    }

    pub fn tokens_issued(&self) -> u32 {
        self.counts.lock().unwrap().tokens_issued
    }

    /// What `ratelimit-remaining` says now for `identity` (e.g. "anonymous").
    pub fn remaining(&self, identity: &str) -> u32 {
        let c = self.counts.lock().unwrap();
        let used = c
            .windows
            .get(identity)
            .filter(|(start, _)| start.elapsed() < self.rules.window)
            .map_or(0, |(_, n)| *n);
        self.rules.limit.saturating_sub(used)
    }

    fn json(status: u16, body: String) -> Response<ChannelBody> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(ChannelBody::full(Bytes::from(body)))
            .unwrap()
    }

    fn user_of(&self, headers: &HeaderMap) -> Result<Option<String>, ()> {
        let Some(basic) = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
        else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .map_err(|_| ())?;
        let raw = String::from_utf8(raw).map_err(|_| ())?;
        let (u, p) = raw.split_once(':').ok_or(())?;
        if self.rules.users.iter().any(|(uu, pp)| uu == u && pp == p) {
            Ok(Some(u.to_owned()))
        } else {
            Err(())
        }
    }

    /// Who a request counts against when the registry checks the tokens: the JWT's `sub`,
    /// or `peer` for an anonymous token; `None` without a token (not counted).
    fn registry_identity(headers: &HeaderMap, peer: IpAddr) -> Option<String> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))?;
        let claims = token.split('.').nth(1).and_then(|c| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c.trim_end_matches('='))
                .ok()
        });
        let sub = claims
            .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
            .and_then(|v| v["sub"].as_str().map(str::to_owned))
            .unwrap_or_default();
        Some(if sub.is_empty() {
            peer.to_string()
        } else {
            sub
        })
    }

    /// Decides what the front does with a request from `peer`.
    pub fn judge(&self, method: &Method, path: &str, headers: &HeaderMap, peer: IpAddr) -> Verdict {
        if self.rules.registry_tokens {
            // No token: the registry answers 401, which carries no rate-limit headers.
            let Some(identity) = Self::registry_identity(headers, peer) else {
                return Verdict::Forward {
                    identity: String::new(),
                };
            };
            return self.count(method, path, identity);
        }
        if path.starts_with("/token") {
            let identity = match self.user_of(headers) {
                Ok(Some(u)) => format!("user-{u}"),
                Ok(None) => "anonymous".to_owned(),
                Err(()) => {
                    return Verdict::Answer(Self::json(
                        401,
                        r#"{"details":"incorrect username or password"}"#.into(),
                    ))
                }
            };
            self.counts.lock().unwrap().tokens_issued += 1;
            let token = format!("hub-{identity}");
            return Verdict::Answer(Self::json(
                200,
                format!(
                    r#"{{"token":"{token}","access_token":"{token}","expires_in":300,"issued_at":"2026-01-01T00:00:00Z"}}"#
                ),
            ));
        }
        let identity = if self.rules.auth {
            let token = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .and_then(|t| t.strip_prefix("hub-"));
            match token {
                Some(id) => id.to_owned(),
                None => {
                    let scope = path
                        .strip_prefix("/v2/")
                        .and_then(|p| p.split("/manifests/").next())
                        .and_then(|p| p.split("/blobs/").next())
                        .map(|repo| format!(",scope=\"repository:{repo}:pull\""))
                        .unwrap_or_default();
                    let mut resp = Self::json(
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.into(),
                    );
                    resp.headers_mut().insert(
                        "www-authenticate",
                        format!(
                            "Bearer realm=\"{}\",service=\"{SERVICE}\"{scope}",
                            self.realm
                        )
                        .parse()
                        .unwrap(),
                    );
                    return Verdict::Answer(resp);
                }
            }
        } else {
            "anonymous".to_owned()
        };
        self.count(method, path, identity)
    }

    /// Counts a manifest GET against `identity`, or refuses it past the limit.
    fn count(&self, method: &Method, path: &str, identity: String) -> Verdict {
        if *method == Method::GET && path.contains("/manifests/") {
            let mut c = self.counts.lock().unwrap();
            let now = Instant::now();
            let window = self.rules.window;
            let entry = c.windows.entry(identity.clone()).or_insert((now, 0));
            if now.duration_since(entry.0) >= window {
                *entry = (now, 0);
            }
            if entry.1 >= self.rules.limit {
                let reset = window.saturating_sub(now.duration_since(entry.0));
                c.refused += 1;
                drop(c);
                let mut resp = Self::json(
                    429,
                    r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit. You may increase the limit by authenticating and upgrading: https://www.docker.com/increase-rate-limit"}]}"#.into(),
                );
                let h = resp.headers_mut();
                self.decorate_with(h, 0);
                if self.rules.retry_after {
                    h.insert(
                        "retry-after",
                        reset.as_secs().max(1).to_string().parse().unwrap(),
                    );
                }
                return Verdict::Answer(resp);
            }
            entry.1 += 1;
            c.counted += 1;
            c.counted_log.push((identity.clone(), path.to_owned()));
        }
        Verdict::Forward { identity }
    }

    fn decorate_with(&self, h: &mut HeaderMap, remaining: u32) {
        let w = self.rules.window.as_secs().max(1);
        h.insert(
            "ratelimit-limit",
            format!("{};w={w}", self.rules.limit).parse().unwrap(),
        );
        h.insert(
            "ratelimit-remaining",
            format!("{remaining};w={w}").parse().unwrap(),
        );
    }

    /// Adds the rate-limit headers to a forwarded manifest response (GET and HEAD).
    /// An empty `identity` (a request without a token) gets none.
    pub fn decorate(&self, path: &str, identity: &str, h: &mut HeaderMap) {
        if path.contains("/manifests/") && !identity.is_empty() {
            let remaining = self.remaining(identity);
            self.decorate_with(h, remaining);
        }
    }
}
