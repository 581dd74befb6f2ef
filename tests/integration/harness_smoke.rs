//! Proves the harness itself: images built here reach the real registry byte for byte,
//! the registry restarts and proxies, the token issuer's JWTs are accepted by it, and
//! Garage stores, lists and keeps objects across a restart.

use std::time::Duration;

use crate::support::garage::Garage;
use crate::support::image::{
    self, build_image, build_index, ImageSpec, Platform, INDEX_MEDIA_TYPE, LAYOUT_REF,
    MANIFEST_MEDIA_TYPE,
};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::token::{
    fetch_token, parse_bearer_challenge, TokenIssuer, TokenPolicy, TokenRequest, SERVICE,
};
use crate::support::{http, require_tool, run_with_timeout_async};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn accept_all() -> String {
    format!("{MANIFEST_MEDIA_TYPE}, {INDEX_MEDIA_TYPE}")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("ASCII header")
        .to_owned()
}

/// GETs a manifest anonymously and returns `(Docker-Content-Digest, Content-Type, body)`.
async fn get_manifest(registry: &str, repo: &str, reference: &str) -> (String, String, Vec<u8>) {
    let response = http()
        .get(format!("{registry}/v2/{repo}/manifests/{reference}"))
        .header("Accept", accept_all())
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(response.status(), 200, "GET {repo}:{reference}");
    let digest = header(&response, "docker-content-digest");
    let content_type = header(&response, "content-type");
    let body = response.bytes().await.expect("manifest body").to_vec();
    (digest, content_type, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn built_layers_are_valid_tar_archives() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec {
        layer_sizes: vec![1000, 0, 512],
        seed: 7,
    };
    let built = build_image(dir.path(), &spec, Platform::LINUX_AMD64);
    for (n, (digest, size)) in built.layers.iter().enumerate() {
        let bytes = built.read_blob(digest);
        assert_eq!(bytes.len() as u64, *size);
        assert_eq!(&image::sha256_digest(&bytes), digest);
        let mut tar = std::process::Command::new(require_tool("tar"));
        tar.arg("-tvf").arg(built.blob_path(digest));
        let listing = run_with_timeout_async(tar, Duration::from_secs(30))
            .await
            .expect_success("tar -tvf");
        let want_size = spec.layer_sizes[n].to_string();
        assert!(listing.stderr.is_empty(), "tar warned: {}", listing.stderr);
        assert!(
            listing.stdout.contains(&format!("layer{n}/\n")),
            "{listing:?}"
        );
        assert!(
            listing.stdout.contains(&format!(" {want_size} ")),
            "{listing:?}"
        );
        assert!(listing.stdout.contains(&format!("layer{n}/data.bin")));
    }
    // Same spec, same bytes; another seed, other layers.
    let again = build_image(&dir.path().join("again"), &spec, Platform::LINUX_AMD64);
    assert_eq!(again.manifest_digest, built.manifest_digest);
    let other = ImageSpec { seed: 8, ..spec };
    let other = build_image(&dir.path().join("other"), &other, Platform::LINUX_AMD64);
    assert_ne!(other.layers[0], built.layers[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn single_image_is_pushed_verbatim() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec {
        layer_sizes: vec![MIB, 2 * MIB, 512 * KIB],
        seed: 1,
    };
    let built = build_image(dir.path(), &spec, Platform::LINUX_AMD64);
    let dest = format!("{}/smoke/single:v1", registry.host());
    image::push(&built.layout, LAYOUT_REF, &dest, None).await;

    let (digest, content_type, body) = get_manifest(&registry.url(), "smoke/single", "v1").await;
    assert_eq!(digest, built.manifest_digest);
    assert_eq!(content_type, MANIFEST_MEDIA_TYPE);
    assert_eq!(body, built.manifest);

    // Layers stay uncompressed: same digests, same bytes.
    for (digest, size) in &built.layers {
        let url = format!("{}/v2/smoke/single/blobs/{digest}", registry.url());
        let bytes = http().get(url).send().await.unwrap().bytes().await.unwrap();
        assert_eq!(bytes.len() as u64, *size);
        assert_eq!(&image::sha256_digest(&bytes), digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_arch_index_is_pushed_verbatim() {
    let registry = Registry::start(RegistryOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let built = build_index(
        dir.path(),
        &[
            (
                Platform::LINUX_AMD64,
                ImageSpec {
                    layer_sizes: vec![256 * KIB, 128 * KIB],
                    seed: 10,
                },
            ),
            (
                Platform::LINUX_ARM64,
                ImageSpec {
                    layer_sizes: vec![300 * KIB],
                    seed: 20,
                },
            ),
        ],
    );
    let dest = format!("{}/smoke/multi:v1", registry.host());
    image::push(&built.layout, LAYOUT_REF, &dest, None).await;

    let (digest, content_type, body) = get_manifest(&registry.url(), "smoke/multi", "v1").await;
    assert_eq!(digest, built.index_digest);
    assert_eq!(content_type, INDEX_MEDIA_TYPE);
    assert_eq!(body, built.index);
    for manifest in &built.manifests {
        let (digest, _, body) =
            get_manifest(&registry.url(), "smoke/multi", &manifest.manifest_digest).await;
        assert_eq!(digest, manifest.manifest_digest);
        assert_eq!(body, manifest.manifest);
    }
    assert_ne!(built.manifests[0].layers, built.manifests[1].layers);
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_restarts_with_its_content_and_proxies() {
    let mut upstream = Registry::start(RegistryOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec {
        layer_sizes: vec![64 * KIB],
        seed: 3,
    };
    let built = build_image(dir.path(), &spec, Platform::LINUX_AMD64);
    let dest = format!("{}/smoke/restart:v1", upstream.host());
    image::push(&built.layout, LAYOUT_REF, &dest, None).await;

    let url = upstream.url();
    upstream.restart().await;
    assert_eq!(upstream.url(), url);
    let (digest, _, _) = get_manifest(&upstream.url(), "smoke/restart", "v1").await;
    assert_eq!(digest, built.manifest_digest);

    let proxy = Registry::start(RegistryOptions::default().with_proxy(&upstream.url(), None)).await;
    let (digest, _, _) = get_manifest(&proxy.url(), "smoke/restart", "v1").await;
    assert_eq!(digest, built.manifest_digest);

    upstream.stop();
    upstream.stop(); // idempotent
    let gone = http().get(format!("{url}/v2/")).send().await;
    assert!(gone.is_err(), "registry still answers after stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_accepts_the_issuers_tokens() {
    let issuer = TokenIssuer::start(
        TokenPolicy::default()
            .anonymous_pull("public/")
            .user("alice", "wonderland"),
    )
    .await;
    let registry = Registry::start(RegistryOptions::default().with_token_auth(&issuer)).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec {
        layer_sizes: vec![32 * KIB],
        seed: 4,
    };
    let built = build_image(dir.path(), &spec, Platform::LINUX_AMD64);
    let alice = Some(("alice", "wonderland"));
    for repo in ["public/x", "private/y"] {
        let dest = format!("{}/{repo}:v1", registry.host());
        image::push(&built.layout, LAYOUT_REF, &dest, alice).await;
    }
    let before = issuer.request_count();
    assert!(before > 0, "skopeo pushed without asking for a token");

    let client = http();
    let get = |repo: &str, token: Option<&str>| {
        let mut request = client
            .get(format!("{}/v2/{repo}/manifests/v1", registry.url()))
            .header("Accept", accept_all());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    // Anonymous pull of a public repository: challenge → token → manifest.
    let challenged = get("public/x", None).await.unwrap();
    assert_eq!(challenged.status(), 401);
    let challenge = parse_bearer_challenge(&header(&challenged, "www-authenticate")).unwrap();
    assert_eq!(challenge.realm, issuer.realm());
    assert_eq!(challenge.service.as_deref(), Some(SERVICE));
    assert_eq!(challenge.scope.as_deref(), Some("repository:public/x:pull"));
    let token = fetch_token(&client, &challenge, None).await.unwrap();
    let response = get("public/x", Some(&token)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "docker-content-digest"),
        built.manifest_digest
    );

    // A private repository: the anonymous token is refused, a wrong password gets no
    // token at all, the user's token works.
    let challenged = get("private/y", None).await.unwrap();
    let challenge = parse_bearer_challenge(&header(&challenged, "www-authenticate")).unwrap();
    let anonymous = fetch_token(&client, &challenge, None).await.unwrap();
    assert_eq!(
        get("private/y", Some(&anonymous)).await.unwrap().status(),
        401
    );
    let refused = fetch_token(&client, &challenge, Some(("alice", "nope"))).await;
    assert_eq!(refused, Err(reqwest::StatusCode::UNAUTHORIZED));
    let token = fetch_token(&client, &challenge, alice).await.unwrap();
    assert_eq!(get("private/y", Some(&token)).await.unwrap().status(), 200);

    // Every token request was recorded, with who asked and for what.
    let requests = issuer.requests();
    assert_eq!(requests.len(), before + 4);
    assert_eq!(
        requests[before..],
        [
            TokenRequest {
                user: None,
                service: Some(SERVICE.to_owned()),
                scopes: vec!["repository:public/x:pull".to_owned()],
            },
            TokenRequest {
                user: None,
                service: Some(SERVICE.to_owned()),
                scopes: vec!["repository:private/y:pull".to_owned()],
            },
            TokenRequest {
                user: Some("alice".to_owned()),
                service: Some(SERVICE.to_owned()),
                scopes: vec!["repository:private/y:pull".to_owned()],
            },
            TokenRequest {
                user: Some("alice".to_owned()),
                service: Some(SERVICE.to_owned()),
                scopes: vec!["repository:private/y:pull".to_owned()],
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_proxies_a_token_upstream_with_credentials() {
    let issuer = TokenIssuer::start(TokenPolicy::default().user("alice", "wonderland")).await;
    let upstream = Registry::start(RegistryOptions::default().with_token_auth(&issuer)).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec {
        layer_sizes: vec![16 * KIB],
        seed: 5,
    };
    let built = build_image(dir.path(), &spec, Platform::LINUX_AMD64);
    let alice = Some(("alice", "wonderland"));
    let dest = format!("{}/private/z:v1", upstream.host());
    image::push(&built.layout, LAYOUT_REF, &dest, alice).await;

    let options = RegistryOptions::default().with_proxy(&upstream.url(), alice);
    let proxy = Registry::start(options).await;
    let (digest, _, _) = get_manifest(&proxy.url(), "private/z", "v1").await;
    assert_eq!(digest, built.manifest_digest);
    let (layer, size) = &built.layers[0];
    let url = format!("{}/v2/private/z/blobs/{layer}", proxy.url());
    let bytes = http().get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, *size);
    assert!(
        issuer.requests().iter().any(
            |r| r.user.as_deref() == Some("alice") && r.scopes == ["repository:private/z:pull"]
        ),
        "the proxy never logged in: {:?}",
        issuer.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garage_starts_and_stores_objects() {
    let mut garage = Garage::start().await;
    let blob: Vec<u8> = (0..256 * KIB).map(|i| (i % 251) as u8).collect();
    let key = "cache/blobs/sha256/ab/abcdef";
    // A space and a plus prove the SigV4 path encoding matches Garage's.
    let odd = "cache/odd name+plus";
    garage.put_object(key, &blob).await;
    garage.put_object(odd, b"odd").await;
    garage.put_object("elsewhere/x", b"x").await;

    assert_eq!(garage.object_keys("cache/").await, [key, odd]);
    assert_eq!(garage.get_object(key).await.as_deref(), Some(&blob[..]));
    assert_eq!(garage.get_object(odd).await.as_deref(), Some(&b"odd"[..]));
    assert_eq!(garage.get_object("cache/missing").await, None);

    let upload_id = garage.start_multipart("cache/uploads/abandoned").await;
    assert!(!upload_id.is_empty());
    assert_eq!(
        garage.multipart_uploads().await,
        ["cache/uploads/abandoned"]
    );
    // An unfinished upload is not an object.
    assert_eq!(
        garage.object_keys("cache/uploads/").await,
        Vec::<String>::new()
    );

    // The config block berth is given parses, and its credential files hold the key.
    let shared: toml::Value = toml::from_str(&garage.shared_toml("cache/")).unwrap();
    let shared = &shared["storage"]["shared"];
    assert_eq!(shared["kind"].as_str(), Some("s3"));
    assert_eq!(shared["bucket"].as_str(), Some(garage.bucket.as_str()));
    assert_eq!(shared["prefix"].as_str(), Some("cache/"));
    assert_eq!(shared["endpoint"].as_str(), Some(garage.endpoint.as_str()));
    assert_eq!(shared["region"].as_str(), Some("garage"));
    assert_eq!(shared["path_style"].as_bool(), Some(true));
    let read = |field: &str| std::fs::read_to_string(shared[field].as_str().unwrap()).unwrap();
    assert_eq!(read("access_key_id_file"), garage.access_key_id);
    assert_eq!(read("secret_access_key_file"), garage.secret_access_key);

    garage.stop();
    assert!(garage.pid().is_none());
    let refused = http()
        .get(format!("{}/", garage.endpoint))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "garage still answers after stop");

    garage.start_again().await;
    assert_eq!(garage.get_object(key).await.as_deref(), Some(&blob[..]));
    assert_eq!(garage.object_keys("cache/").await, [key, odd]);
    assert_eq!(
        garage.multipart_uploads().await,
        ["cache/uploads/abandoned"]
    );
}
