//! One upstream with several accounts, against a small registry on a real socket: which
//! credentials and which tokens each repository's requests carry, and whose bucket pays.
//!
//! The registry issues tokens at its own `/token` (Basic auth names the account) and
//! remembers which account each token was issued to; its manifests answer with Docker
//! Hub's rate-limit headers, counted per account; `limited/*` answers 429.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{Outbound, Upstream};
use crate::config::UpstreamConfig;
use crate::metrics::{Metrics, UpstreamLabels};
use crate::oci::{AcceptSet, Reference, Repository};
use crate::quota::CredentialLabels;
use crate::quota::{Ledger, Payer, Purpose};

const LIMIT: u32 = 100;
const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

#[derive(Default)]
struct Seen {
    /// (account from Basic auth or "anonymous", scope) per token request.
    token_requests: Vec<(String, String)>,
    /// token → (account, scope) it was issued for.
    issued: HashMap<String, (String, String)>,
    /// (repository, account whose token it carried) per manifest answered.
    manifests: Vec<(String, String)>,
    /// Manifest GETs counted per account.
    counted: HashMap<String, u32>,
}

async fn registry() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(addr, &state, req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn answer(addr: SocketAddr, seen: &Mutex<Seen>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut seen = seen.lock().unwrap();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let path = req.uri().path();
    if path == "/token" {
        let account = auth
            .strip_prefix("Basic ")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|pair| pair.split_once(':').map(|(u, _)| u.to_owned()))
            .unwrap_or_else(|| "anonymous".into());
        let query = req.uri().query().unwrap_or("");
        let scope = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let token = format!("token-{}", seen.issued.len());
        seen.token_requests.push((account.clone(), scope.clone()));
        seen.issued.insert(token.clone(), (account, scope));
        let body = format!(r#"{{"token":"{token}","expires_in":300}}"#);
        return Response::new(Full::new(Bytes::from(body)));
    }
    let repo = path
        .strip_prefix("/v2/")
        .and_then(|p| p.split_once("/manifests/"))
        .map(|(repo, _)| repo.to_owned())
        .unwrap_or_default();
    let scope = format!("repository:{repo}:pull");
    let holder = auth
        .strip_prefix("Bearer ")
        .and_then(|t| seen.issued.get(t))
        .filter(|(_, s)| *s == scope)
        .map(|(account, _)| account.clone());
    let Some(account) = holder else {
        let challenge =
            format!("Bearer realm=\"http://{addr}/token\",service=\"test\",scope=\"{scope}\"");
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("www-authenticate", challenge)
            .body(Full::new(Bytes::new()))
            .unwrap();
    };
    if repo.starts_with("limited/") {
        return Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "120")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    seen.manifests.push((repo, account.clone()));
    let counted = seen.counted.entry(account).or_default();
    *counted += 1;
    Response::builder()
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .header("ratelimit-limit", format!("{LIMIT};w=21600"))
        .header(
            "ratelimit-remaining",
            format!("{};w=21600", LIMIT - *counted),
        )
        .body(Full::new(Bytes::from(MANIFEST)))
        .unwrap()
}

#[tokio::test]
async fn each_repository_goes_with_its_own_account_and_tokens() {
    crate::install_crypto_provider();
    let (addr, seen) = registry().await;
    let dir = tempfile::tempdir().unwrap();
    for (user, password) in [("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")] {
        std::fs::write(dir.path().join(user), format!("{password}\n")).unwrap();
    }
    let toml = format!(
        "host = \"registry.test\"\nurl = \"http://{addr}\"\n\
         [[credentials]]\nrepositories = [\"a/*\"]\nusername = \"alice\"\npassword_file = \"{0}/alice\"\n\
         [[credentials]]\nrepositories = [\"b/**\"]\nname = \"bee\"\nusername = \"bob\"\npassword_file = \"{0}/bob\"\n\
         [[credentials]]\nrepositories = [\"limited/*\"]\nusername = \"carol\"\npassword_file = \"{0}/carol\"\n",
        dir.path().display()
    );
    let config: UpstreamConfig = toml::from_str(&toml).unwrap();
    let metrics = Arc::new(Metrics::new());
    let ledger = Arc::new(Ledger::new(None, metrics.clone()));
    let up = Upstream::new(&config, metrics.clone(), ledger, &Outbound::default()).unwrap();
    let payer = Payer::berth(Purpose::New);
    let reference = Reference::parse("v1").unwrap();
    let pulls = ["a/app", "b/x/y", "c/app", "a/app", "b/x/y", "a/tool"];
    for repo in pulls {
        let repo = Repository::parse(repo).unwrap();
        let m = up
            .get_manifest(&repo, &reference, AcceptSet::ALL, &payer)
            .await
            .unwrap_or_else(|e| panic!("{repo}: {e}"));
        assert!(m.is_some(), "{repo}");
    }

    // A 429 answered to one account cools only that account's bucket.
    let limited = Repository::parse("limited/app").unwrap();
    let e = up
        .get_manifest(&limited, &reference, AcceptSet::ALL, &payer)
        .await
        .unwrap_err();
    assert!(matches!(e, super::Error::TooManyRequests { .. }), "{e:?}");
    let cooling: Vec<(Option<&str>, bool)> = up
        .quotas()
        .map(|(n, q)| (n, q.snapshot().cooldown_seconds > 0))
        .collect();
    assert_eq!(
        cooling,
        vec![
            (None, false),
            (Some("a/*"), false),
            (Some("bee"), false),
            (Some("limited/*"), true)
        ]
    );
    let seen = seen.lock().unwrap();
    // Every manifest was fetched with a token of the account its repository uses.
    let want: Vec<(String, String)> = [
        ("a/app", "alice"),
        ("b/x/y", "bob"),
        ("c/app", "anonymous"),
        ("a/app", "alice"),
        ("b/x/y", "bob"),
        ("a/tool", "alice"),
    ]
    .iter()
    .map(|(r, a)| (r.to_string(), a.to_string()))
    .collect();
    assert_eq!(seen.manifests, want);
    // One token per account and scope, asked for with that account only: the second pull
    // of a repository reused its account's token.
    let mut asked = seen.token_requests.clone();
    asked.sort();
    let scope = |r: &str| format!("repository:{r}:pull");
    assert_eq!(
        asked,
        vec![
            ("alice".into(), scope("a/app")),
            ("alice".into(), scope("a/tool")),
            ("anonymous".into(), scope("c/app")),
            ("bob".into(), scope("b/x/y")),
            ("carol".into(), scope("limited/app")),
        ]
    );

    // Names: the entry's name, its first pattern, or none for anonymous.
    let name = |r: &str| up.credential_name(&Repository::parse(r).unwrap());
    assert_eq!(name("a/app"), Some("a/*"));
    assert_eq!(name("b/x/y"), Some("bee"));
    assert_eq!(name("c/app"), None);

    // Each bucket learned from its own account's headers and was charged for its own GETs.
    let remaining: HashMap<Option<&str>, Option<u64>> = up
        .quotas()
        .map(|(n, q)| (n, q.snapshot().header_remaining))
        .collect();
    assert_eq!(remaining[&None], Some(99));
    assert_eq!(remaining[&Some("a/*")], Some(97));
    assert_eq!(remaining[&Some("bee")], Some(98));
    let counted = |credential: &str| {
        metrics
            .quota
            .credential_counted
            .get_or_create(&CredentialLabels {
                upstream: "registry.test".into(),
                credential: credential.into(),
            })
            .get()
    };
    assert_eq!((counted("a/*"), counted("bee")), (3, 2));
    let default_counted = metrics
        .quota
        .counted
        .get_or_create(&UpstreamLabels {
            upstream: "registry.test".into(),
        })
        .get();
    assert_eq!(
        default_counted, 1,
        "only the anonymous GET on the default series"
    );
}
