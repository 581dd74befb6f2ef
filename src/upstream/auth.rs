//! Registry authentication: parse `WWW-Authenticate` challenges, fetch Bearer tokens from
//! the realm the upstream names, and cache them per scope until shortly before expiry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses `Bearer realm="...",service="...",scope="..."` (quoted values may hold commas)
/// or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key, value.to_owned());
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// The token endpoint's answer (Docker Hub sends both `token` and `access_token`).
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

/// A bearer token is a credential: `Debug` says only whether one is there.
impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("TokenResponse")
            .field("token", &redacted(&self.token))
            .field("access_token", &redacted(&self.access_token))
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Tokens by scope. A token is dropped a little before it expires so a request never
/// leaves with one that dies in flight.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

/// The spec's default when the token endpoint does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Scopes kept at most (one per repository pulled within a token's lifetime).
const MAX_TOKENS: usize = 10_000;

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(scope)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t.clone())
    }

    pub fn put(&self, scope: &str, token: String, expires_in: Option<u64>) {
        // Bounded: the number comes from the upstream, and a day is plenty.
        let lifetime = expires_in
            .map(|s| Duration::from_secs(s.min(24 * 3600)))
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .max(DEFAULT_TOKEN_LIFETIME);
        let until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the cache: scopes are per repository, and tokens are cheap to refetch.
        if tokens.len() >= MAX_TOKENS {
            let now = Instant::now();
            tokens.retain(|_, (_, until)| *until > now);
            if tokens.len() >= MAX_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert(scope.to_owned(), (token, until));
    }

    /// Forgets the token for `scope` if it is still `stale` (not one refreshed since).
    pub fn forget_if(&self, scope: &str, stale: &str) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.get(scope).is_some_and(|(t, _)| t == stale) {
            tokens.remove(scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            }
        );
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn token_cache_expires() {
        let c = TokenCache::default();
        c.put("s", "t".into(), Some(300));
        assert_eq!(c.get("s").as_deref(), Some("t"));
        c.forget_if("s", "older");
        assert_eq!(c.get("s").as_deref(), Some("t"), "a newer token is kept");
        c.forget_if("s", "t");
        assert_eq!(c.get("s"), None);
    }

    #[test]
    fn token_response_debug_hides_the_token() {
        let r: TokenResponse = serde_json::from_str(
            r#"{"token":"eyJsecret","access_token":"eyJsecret","expires_in":300}"#,
        )
        .unwrap();
        let debug = format!("{r:?}");
        assert!(!debug.contains("eyJsecret"), "{debug}");
        assert!(debug.contains("300"), "{debug}");
    }
}
