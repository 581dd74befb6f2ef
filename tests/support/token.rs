//! A token issuer that the real `docker-registry` trusts: the Bearer half of the auth flow.
//!
//! This module owns a signing key and a self-signed certificate (made by the `openssl` CLI
//! in a tempdir; the registry's `rootcertbundle` is that certificate), a small hyper server
//! answering `GET /token?service=..&scope=..` like Docker Hub's auth service, and the record
//! of every request it answered, so tests can prove that a client caches its tokens (and
//! which account asked for which scope).
//! Tokens are RS256 JWTs whose header carries the certificate in `x5c`; they are signed by
//! `openssl dgst`, because speed does not matter here and no JWT crate is allowed.
//! It also holds the client half that tests use by hand: parsing a challenge, fetching one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

/// The `service` the registry names in its challenge and expects as the token's `aud`.
pub const SERVICE: &str = "berth-test-registry";
/// The `iss` of every token, matched by the registry's `auth.token.issuer`.
pub const ISSUER: &str = "berth-test-token-issuer";

/// Who gets which access.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// Anyone may pull repositories whose name starts with one of these (e.g. `"public/"`).
    pub anonymous_pull_prefixes: Vec<String>,
    /// `(name, password)`: each user gets every action asked for, on every repository,
    /// unless `user_pull_prefixes` limits it.
    pub users: Vec<(String, String)>,
    /// `(name, prefixes)`: this user may only pull, and only repositories whose name
    /// starts with one of the prefixes (e.g. `"myorg/"`).
    pub user_pull_prefixes: Vec<(String, Vec<String>)>,
    /// The tokens' lifetime, reported as `expires_in` and signed as `exp`.
    pub expires_in: Duration,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            anonymous_pull_prefixes: Vec::new(),
            users: Vec::new(),
            user_pull_prefixes: Vec::new(),
            expires_in: Duration::from_secs(300),
        }
    }
}

impl TokenPolicy {
    pub fn anonymous_pull(mut self, prefix: &str) -> Self {
        self.anonymous_pull_prefixes.push(prefix.to_owned());
        self
    }

    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.to_owned(), password.to_owned()));
        self
    }

    /// A user who may only pull repositories starting with one of `prefixes` (a robot
    /// account of one organisation).
    pub fn user_pulling(mut self, name: &str, password: &str, prefixes: &[&str]) -> Self {
        self.users.push((name.to_owned(), password.to_owned()));
        self.user_pull_prefixes.push((
            name.to_owned(),
            prefixes.iter().map(|p| (*p).to_owned()).collect(),
        ));
        self
    }

    /// What `user` may do on repository `name`: `None` for everything.
    fn limits_of(&self, user: &str) -> Option<&[String]> {
        self.user_pull_prefixes
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, p)| p.as_slice())
    }

    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.expires_in = lifetime;
        self
    }
}

/// One request the issuer received, answered or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic-auth user name, if any (recorded even when the password was wrong).
    pub user: Option<String>,
    pub service: Option<String>,
    /// Every `scope` parameter, in order, e.g. `repository:library/alpine:pull`.
    pub scopes: Vec<String>,
}

/// A running token issuer; the server task is aborted on drop.
pub struct TokenIssuer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
    /// Key and certificate; kept as long as the issuer lives.
    dir: TempDir,
}

struct State {
    policy: TokenPolicy,
    key_path: PathBuf,
    /// The certificate as base64 DER, the form `x5c` wants.
    cert_der_b64: String,
    requests: Mutex<Vec<TokenRequest>>,
    next_jti: AtomicU64,
}

impl TokenIssuer {
    /// Makes a key and certificate, then serves `/token` on a fresh 127.0.0.1 port.
    pub async fn start(policy: TokenPolicy) -> TokenIssuer {
        let dir = tempfile::Builder::new()
            .prefix("berth-token-")
            .tempdir()
            .expect("token tempdir");
        let (key_path, cert_path) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let mut openssl = Command::new(super::require_tool("openssl"));
        openssl
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
            ])
            .args(["-subj", "/CN=berth-test-token-issuer", "-keyout"])
            .arg(&key_path)
            .arg("-out")
            .arg(&cert_path);
        super::run_with_timeout_async(openssl, Duration::from_secs(60))
            .await
            .expect_success("openssl req -x509");
        let pem = std::fs::read_to_string(&cert_path).expect("read cert.pem");
        let state = Arc::new(State {
            policy,
            key_path,
            cert_der_b64: pem_body(&pem),
            requests: Mutex::new(Vec::new()),
            next_jti: AtomicU64::new(1),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token issuer");
        let addr = listener.local_addr().expect("token issuer addr");
        let task = tokio::spawn(serve(listener, state.clone()));
        TokenIssuer {
            addr,
            state,
            task,
            dir,
        }
    }

    /// The URL to put in the registry's `realm`: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PEM certificate that signs the tokens: the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn service(&self) -> &'static str {
        SERVICE
    }

    pub fn issuer(&self) -> &'static str {
        ISSUER
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().expect("requests lock").len()
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Reply, std::convert::Infallible> {
    if req.method() != hyper::Method::GET || req.uri().path() != "/token" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            json!({"details": "not found"}),
        ));
    }
    let url = reqwest::Url::parse(&format!("http://issuer{}", req.uri())).expect("request URI");
    let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let param = |key: &'static str| {
        params
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let basic = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_basic);
    let request = TokenRequest {
        user: basic.as_ref().map(|(user, _)| user.clone()),
        service: param("service").next(),
        scopes: param("scope").collect(),
    };
    state
        .requests
        .lock()
        .expect("requests lock")
        .push(request.clone());

    let policy = &state.policy;
    let authenticated = match &basic {
        None => None,
        Some(pair) if policy.users.contains(pair) => Some(pair.0.as_str()),
        Some(_) => {
            let body = json!({"details": "incorrect username or password"});
            return Ok(reply(StatusCode::UNAUTHORIZED, body));
        }
    };
    let access: Vec<Value> = request
        .scopes
        .iter()
        .filter_map(|scope| grant(policy, authenticated, scope))
        .collect();
    let token = state.sign(&request, access).await;
    let issued_at = rfc3339(SystemTime::now());
    let body = json!({
        "token": token,
        "access_token": token,
        "expires_in": policy.expires_in.as_secs(),
        "issued_at": issued_at,
    });
    Ok(reply(StatusCode::OK, body))
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

/// `Basic base64(user:password)` → `(user, password)`.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The access entry granted to `user` (`None`: anonymous) for one `type:name:actions`
/// scope, or `None` for nothing.
fn grant(policy: &TokenPolicy, user: Option<&str>, scope: &str) -> Option<Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let pull_under = |prefixes: &[String], action: &str| {
        kind == "repository"
            && action == "pull"
            && prefixes
                .iter()
                .any(|prefix| name.starts_with(prefix.as_str()))
    };
    let granted: Vec<&str> = actions
        .split(',')
        .filter(|action| match user {
            Some(user) => policy
                .limits_of(user)
                .is_none_or(|prefixes| pull_under(prefixes, action)),
            None => pull_under(&policy.anonymous_pull_prefixes, action),
        })
        .collect();
    if granted.is_empty() {
        return None;
    }
    Some(json!({"type": kind, "name": name, "actions": granted}))
}

impl State {
    async fn sign(&self, request: &TokenRequest, access: Vec<Value>) -> String {
        let now = unix_seconds(SystemTime::now());
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]});
        let claims = json!({
            "iss": ISSUER,
            "sub": request.user.clone().unwrap_or_default(),
            "aud": request.service.clone().unwrap_or_else(|| SERVICE.to_owned()),
            "exp": now + self.policy.expires_in.as_secs(),
            // A little slack so a registry whose clock reads a second behind still agrees.
            "nbf": now - 5,
            "iat": now,
            "jti": format!("berth-{}", self.next_jti.fetch_add(1, Ordering::Relaxed)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key_path = self.key_path.clone();
        let input = signing_input.clone();
        let signature = tokio::task::spawn_blocking(move || rs256_sign(&key_path, &input))
            .await
            .expect("signing task");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// PKCS#1 v1.5 SHA-256 signature of `input`, made by `openssl dgst`.
fn rs256_sign(key_path: &Path, input: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(super::require_tool("openssl"))
        .args(["dgst", "-sha256", "-sign"])
        .arg(key_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl dgst");
    // The input is a few KiB at most: it fits the pipe, so writing cannot block on openssl.
    let mut stdin = child.stdin.take().expect("openssl stdin");
    stdin.write_all(input.as_bytes()).expect("write to openssl");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for openssl dgst");
    assert!(
        output.status.success(),
        "openssl dgst -sign failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The base64 body of a single-certificate PEM file: exactly base64 of its DER.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .skip_while(|line| !line.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END"))
        .map(str::trim)
        .collect()
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

/// `YYYY-MM-DDTHH:MM:SSZ`, as Docker Hub's `issued_at` (Hinnant's civil-from-days).
fn rfc3339(time: SystemTime) -> String {
    let secs = unix_seconds(time);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// A `WWW-Authenticate: Bearer realm=..,service=..,scope=..` challenge, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parses a Bearer challenge; `None` for any other scheme or without a realm.
pub fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let (scheme, params) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut pairs = Vec::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"')?,
            None => after.split_once(',').unwrap_or((after, "")),
        };
        pairs.push((key, value.to_owned()));
        rest = tail;
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    Some(BearerChallenge {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// Does by hand what a registry client does on a 401: asks the realm for a token.
///
/// Returns the token, or the issuer's status when it refused.
pub async fn fetch_token(
    client: &reqwest::Client,
    challenge: &BearerChallenge,
    credentials: Option<(&str, &str)>,
) -> Result<String, reqwest::StatusCode> {
    let mut query = Vec::new();
    if let Some(service) = &challenge.service {
        query.push(("service", service.as_str()));
    }
    if let Some(scope) = &challenge.scope {
        query.push(("scope", scope.as_str()));
    }
    let mut request = client.get(&challenge.realm).query(&query);
    if let Some((user, password)) = credentials {
        request = request.basic_auth(user, Some(password));
    }
    let response = request.send().await.expect("token request");
    if !response.status().is_success() {
        return Err(response.status());
    }
    let body: Value = response.json().await.expect("token JSON");
    Ok(body["token"].as_str().expect("token field").to_owned())
}
