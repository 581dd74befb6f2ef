//! Who a client is: an htpasswd user (HTTP Basic, bcrypt), a bearer token from a file in
//! `tokens_dir`, or nobody (`anonymous`).
//!
//! Both sources are read at start (a problem is a start-up error) and again every
//! `reload_interval` (a problem then keeps the last good set and is logged). A bcrypt
//! check costs milliseconds of CPU, and clients send their password with every request,
//! so a verified password is remembered (as its SHA-256, for as long as the user's
//! htpasswd entry is unchanged); a wrong one is checked again each time, at most two at
//! once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, ANONYMOUS};

/// What the sources say, as read at one moment.
#[derive(Default, PartialEq, Eq)]
pub(super) struct Sources {
    /// htpasswd user → bcrypt hash.
    users: HashMap<String, String>,
    /// SHA-256 of a token → its principal.
    tokens: HashMap<[u8; 32], Arc<str>>,
}

impl Sources {
    pub(super) fn read(config: &AuthConfig) -> Result<Sources, String> {
        let mut sources = Sources::default();
        if let Some(path) = &config.htpasswd {
            sources.users = read_htpasswd(path)?;
        }
        if let Some(dir) = &config.tokens_dir {
            sources.tokens = read_tokens(dir)?;
        }
        Ok(sources)
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{} htpasswd users, {} tokens",
            self.users.len(),
            self.tokens.len()
        )
    }
}

/// Why credentials were not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// A user and password that do not match (`user` when htpasswd knows the name).
    Password { user: Option<String> },
    /// A bearer token no file holds.
    Token,
    /// An `Authorization` header berth cannot read.
    Malformed,
    /// Too many passwords are waiting for a bcrypt check: not checked (a flood of wrong
    /// passwords must not hold every login).
    Busy,
}

/// Passwords that may wait for a bcrypt check at once; more are answered 503.
const MAX_WAITING_CHECKS: usize = 32;

/// The authenticated principal, or why not; `Ok(None)`: no credentials were sent.
pub type Verdict = Result<Option<Arc<str>>, Rejected>;

pub(super) struct Identities {
    current: RwLock<Arc<Sources>>,
    /// user → (the hash it was verified against, SHA-256 of the password).
    verified: Mutex<HashMap<String, (String, [u8; 32])>>,
    /// bcrypt checks running at once; more wait, up to [`MAX_WAITING_CHECKS`].
    checks: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
    config: AuthConfig,
}

impl Identities {
    pub(super) fn new(config: AuthConfig) -> Result<Identities, String> {
        let sources = Sources::read(&config)?;
        Ok(Identities {
            current: RwLock::new(Arc::new(sources)),
            verified: Mutex::new(HashMap::new()),
            checks: tokio::sync::Semaphore::new(2),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            config,
        })
    }

    pub(super) fn summary(&self) -> String {
        self.sources().describe()
    }

    pub(super) fn config(&self) -> &AuthConfig {
        &self.config
    }

    fn sources(&self) -> Arc<Sources> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the sources again; `Ok(Some(summary))` when they changed.
    pub(super) fn reload(&self) -> Result<Option<String>, String> {
        let fresh = Sources::read(&self.config)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if **current == fresh {
            return Ok(None);
        }
        let summary = fresh.describe();
        *current = Arc::new(fresh);
        Ok(Some(summary))
    }

    /// Reads an `Authorization` header value.
    pub(super) async fn verify(&self, authorization: Option<&[u8]>) -> Verdict {
        let Some(value) = authorization else {
            return Ok(None);
        };
        match parse_authorization(value).ok_or(Rejected::Malformed)? {
            Sent::Nothing => Ok(None),
            Sent::Bearer(token) => {
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                self.sources()
                    .tokens
                    .get(&digest)
                    .cloned()
                    .map(Some)
                    .ok_or(Rejected::Token)
            }
            Sent::Basic { user, password } => self.password(&user, &password).await.map(Some),
        }
    }

    /// A Basic login: an htpasswd user and password, or a token principal's name and
    /// its token (so clients that only log in with a user and password, as `docker
    /// login` and skopeo do, can use a token too).
    async fn password(&self, user: &str, password: &str) -> Result<Arc<str>, Rejected> {
        let sources = self.sources();
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        if let Some(principal) = sources.tokens.get(&digest) {
            if &**principal == user {
                return Ok(principal.clone());
            }
        }
        let known =
            sources.users.contains_key(user) || sources.tokens.values().any(|p| &**p == user);
        let Some(hash) = sources.users.get(user) else {
            return Err(Rejected::Password {
                user: known.then(|| user.to_owned()),
            });
        };
        let wrong = || Rejected::Password {
            user: Some(user.to_owned()),
        };
        // The password's SHA-256, already made for the token lookup above, is what the
        // cache of verified bcrypt logins compares.
        let given = digest;
        {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((h, d)) = verified.get(user) {
                if h == hash && bool::from(d.ct_eq(&given)) {
                    return Ok(Arc::from(user));
                }
            }
        }
        let ok = {
            use std::sync::atomic::Ordering;
            if self.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING_CHECKS {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                return Err(Rejected::Busy);
            }
            let turn = self.checks.acquire().await;
            let (hash, password) = (hash.clone(), password.to_owned());
            let ok = match turn {
                Ok(_turn) => tokio::task::spawn_blocking(move || {
                    bcrypt::verify(password, &hash).unwrap_or(false)
                })
                .await
                .unwrap_or(false),
                Err(_) => false,
            };
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            ok
        };
        if !ok {
            return Err(wrong());
        }
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_owned(), (hash.clone(), given));
        Ok(Arc::from(user))
    }
}

/// What an `Authorization` header carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Basic with an empty user and password: containers/image (skopeo, podman, CRI-O)
    /// answers a Basic challenge so when it has no credentials.
    Nothing,
    Bearer(String),
    Basic {
        user: String,
        password: String,
    },
}

/// Reads an `Authorization` value (`Basic <base64 user:password>`, `Bearer <token>`,
/// schemes in any case); `None` when it is neither.
pub fn parse_authorization(value: &[u8]) -> Option<Sent> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| Sent::Bearer(rest.to_owned()));
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, password) = raw.split_once(':')?;
    if user.is_empty() && password.is_empty() {
        return Some(Sent::Nothing);
    }
    Some(Sent::Basic {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// A name a principal may have: printable, no `/` (it is a file name), not `anonymous`.
pub(super) fn valid_principal(name: &str) -> bool {
    !name.is_empty()
        && name != ANONYMOUS
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| !c.is_control() && c != '/' && c != ':')
}

/// `user:hash` lines; blank lines and `#` comments skipped. Only bcrypt hashes are
/// accepted (as CNCF distribution does): an entry in another scheme is skipped and
/// logged, naming its line.
fn read_htpasswd(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("auth.htpasswd: cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!(
                "auth.htpasswd {} line {}: not user:hash",
                path.display(),
                n + 1
            ));
        };
        if !["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
            tracing::warn!(file = %path.display(), line = n + 1,
                "htpasswd entry skipped: not a bcrypt hash (write it with htpasswd -B)");
            continue;
        }
        if !valid_principal(user) {
            tracing::warn!(file = %path.display(), line = n + 1,
                "htpasswd entry skipped: the user name is not a usable principal");
            continue;
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// One file per principal. Hidden entries (a Kubernetes secret volume's `..data`) are
/// skipped; symlinks are followed. Two principals with the same token are both dropped.
fn read_tokens(dir: &Path) -> Result<HashMap<[u8; 32], Arc<str>>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("auth.tokens_dir: cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("auth.tokens_dir {}: {e}", dir.display()))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        files.push((name, path));
    }
    files.sort();
    let mut tokens: HashMap<[u8; 32], Arc<str>> = HashMap::new();
    let mut clashes = Vec::new();
    for (name, path) in files {
        if !valid_principal(&name) {
            tracing::warn!(file = %path.display(), "token file skipped: its name is not a usable principal");
            continue;
        }
        let token = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().to_owned(),
            // Removed between the listing and the read: gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(format!(
                    "auth.tokens_dir: cannot read {}: {e}",
                    path.display()
                ))
            }
        };
        if token.is_empty() || token.contains(char::is_whitespace) {
            tracing::warn!(file = %path.display(), "token file skipped: empty, or holds whitespace inside");
            continue;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(other) = tokens.insert(digest, Arc::from(name.as_str())) {
            clashes.push((digest, other, name));
        }
    }
    for (digest, first, second) in clashes {
        tokens.remove(&digest);
        tracing::warn!(principals = %format!("{first}, {second}"),
            "two token files hold the same token; neither is accepted");
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> AuthConfig {
        toml::from_str(&format!(
            "htpasswd = {:?}\ntokens_dir = {:?}\n",
            dir.join("htpasswd").display().to_string(),
            dir.join("tokens").display().to_string()
        ))
        .unwrap()
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
        .into_bytes()
    }

    fn setup() -> (tempfile::TempDir, Identities) {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("# team accounts\nalice:{hash}\nbob:$apr1$xyz$notbcrypt\n\n"),
        )
        .unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        std::fs::write(tokens.join("team-a"), "token-a\n").unwrap();
        std::fs::write(tokens.join("team-b"), "token-b").unwrap();
        std::fs::write(tokens.join(".hidden"), "token-h").unwrap();
        std::fs::write(tokens.join("anonymous"), "token-anon").unwrap();
        let ids = Identities::new(config(dir.path())).unwrap();
        (dir, ids)
    }

    #[tokio::test]
    async fn passwords_tokens_and_nothing() {
        let (_dir, ids) = setup();
        assert_eq!(ids.verify(None).await, Ok(None));
        assert_eq!(ids.verify(Some(&basic("", ""))).await, Ok(None));
        let alice = ids.verify(Some(&basic("alice", "s3cret"))).await;
        assert_eq!(alice.unwrap().as_deref(), Some("alice"));
        // Verified once: the second time comes from memory, the same answer.
        let again = ids.verify(Some(&basic("alice", "s3cret"))).await;
        assert_eq!(again.unwrap().as_deref(), Some("alice"));
        assert_eq!(
            ids.verify(Some(&basic("alice", "wrong"))).await,
            Err(Rejected::Password {
                user: Some("alice".into())
            })
        );
        // Not bcrypt: skipped, as if absent.
        assert_eq!(
            ids.verify(Some(&basic("bob", "x"))).await,
            Err(Rejected::Password { user: None })
        );
        let a = ids.verify(Some(b"Bearer token-a")).await;
        assert_eq!(a.unwrap().as_deref(), Some("team-a"));
        // A token is also the password of its principal's Basic login, and only its.
        let a = ids.verify(Some(&basic("team-a", "token-a"))).await;
        assert_eq!(a.unwrap().as_deref(), Some("team-a"));
        assert_eq!(
            ids.verify(Some(&basic("team-b", "token-a"))).await,
            Err(Rejected::Password {
                user: Some("team-b".into())
            })
        );
        assert_eq!(
            ids.verify(Some(b"bearer   token-b "))
                .await
                .unwrap()
                .as_deref(),
            Some("team-b")
        );
        for hidden in ["token-h", "token-anon", "token"] {
            let v = ids
                .verify(Some(format!("Bearer {hidden}").as_bytes()))
                .await;
            assert_eq!(v, Err(Rejected::Token), "{hidden}");
        }
        for bad in [
            &b"Basic !!!"[..],
            b"Digest x",
            b"Basic",
            b"\xff\xfe",
            &basic("nocolon", "")[..6],
        ] {
            assert!(ids.verify(Some(bad)).await.is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_reload_sees_removed_tokens_and_changed_passwords() {
        let (dir, ids) = setup();
        assert_eq!(ids.reload(), Ok(None), "nothing changed");
        std::fs::remove_file(dir.path().join("tokens/team-a")).unwrap();
        let hash = bcrypt::hash("n3w", 4).unwrap();
        std::fs::write(dir.path().join("htpasswd"), format!("alice:{hash}\n")).unwrap();
        assert!(ids.reload().unwrap().is_some());
        assert_eq!(
            ids.verify(Some(b"Bearer token-a")).await,
            Err(Rejected::Token)
        );
        assert!(ids.verify(Some(&basic("alice", "s3cret"))).await.is_err());
        assert!(ids.verify(Some(&basic("alice", "n3w"))).await.is_ok());
        // A source that cannot be read keeps the last good set.
        std::fs::remove_file(dir.path().join("htpasswd")).unwrap();
        assert!(ids.reload().is_err());
        assert!(ids.verify(Some(&basic("alice", "n3w"))).await.is_ok());
    }

    #[tokio::test]
    async fn a_flood_of_password_checks_is_turned_away_not_queued() {
        let (_dir, ids) = setup();
        ids.waiting
            .store(MAX_WAITING_CHECKS, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            ids.verify(Some(&basic("alice", "wrong"))).await,
            Err(Rejected::Busy)
        );
        // Tokens are never waited for.
        assert!(ids.verify(Some(b"Bearer token-a")).await.is_ok());
        ids.waiting.store(0, std::sync::atomic::Ordering::Relaxed);
        assert!(ids.verify(Some(&basic("alice", "s3cret"))).await.is_ok());
        assert_eq!(ids.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn the_same_token_in_two_files_is_refused_for_both() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "same").unwrap();
        std::fs::write(dir.path().join("y"), "same").unwrap();
        std::fs::write(dir.path().join("z"), "other").unwrap();
        let tokens = read_tokens(dir.path()).unwrap();
        assert_eq!(tokens.len(), 1);
    }
}
