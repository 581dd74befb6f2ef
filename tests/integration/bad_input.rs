//! Issue 2, test 6: bad input gets a clear OCI error and changes nothing.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::support::front::Faults;

/// Sends a raw request line (paths reqwest would normalise) and returns (status, body).
async fn raw(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect berth");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: berth\r\nAccept: {ACCEPT_ALL}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("berth answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn code_of(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not OCI JSON ({e}): {body:?}"));
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_oci_errors_and_stores_nothing() {
    let w = World::start("10m").await;
    let img = w.push_image("library/app", "v1", &[200 * KIB], 50).await;
    let addr = w.berth.host();
    let long = "a".repeat(300);
    let d = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "GET",
            "/v2/Library/App/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/../etc/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library//app/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            format!("/v2/{long}/manifests/v1"),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/app%2f..%2fx/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        // Issue 11: a reference that is neither a tag nor a digest names nothing that
        // can exist: not found, as registries answer it, not a bad request.
        (
            "GET",
            "/v2/library/app/manifests/bad$tag".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            "/v2/library/app/manifests/.INVALID_NAME".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            "/v2/library/app/manifests/sha256:../../../etc/passwd".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        // An invalid repository name stays a bad request.
        (
            "GET",
            "/v2/Library/App/manifests/v1.0".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/blobs/sha256:xyz".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/manifests/v1?ns=evil.example.com".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            "/v2/evil.example.com/app/manifests/v1".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            "/v2/127.0.0.1:1/app/manifests/v1".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "PUT",
            "/v2/library/app/manifests/v1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "POST",
            "/v2/library/app/blobs/uploads/".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            format!("/v2/library/app/manifests/{d}"),
            405,
            "UNSUPPORTED",
        ),
        (
            "GET",
            format!("/v2/library/app/blobs/{d}"),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            "GET",
            "/v2/library/app/manifests/nope".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (method, path, status, code) in &cases {
        let (got, body) = raw(&addr, method, path).await;
        assert_eq!(
            (got, code_of(&body).as_str()),
            (*status, *code),
            "{method} {path}: {body}"
        );
    }
    let (_, body) = raw(
        &addr,
        "GET",
        "/v2/library/app/manifests/v1?ns=evil.example.com",
    )
    .await;
    assert!(body.contains("evil.example.com"), "{body}");
    let (_, body) = raw(&addr, "PUT", "/v2/library/app/manifests/v1").await;
    assert!(body.contains("read-only mirror"), "{body}");
    // HEAD of a reference that names nothing: the same 404, without a body.
    let (status, body) = raw(&addr, "HEAD", "/v2/library/app/manifests/.INVALID_NAME").await;
    assert_eq!((status, body.as_str()), (404, ""));
    // None of that reached upstream.
    assert!(w
        .front
        .content_requests()
        .iter()
        .all(|s| !s.path.contains("evil")
            && !s.path.contains("INVALID_NAME")
            && !s.path.contains("etc/passwd")));

    // A manifest over 4 MiB from upstream.
    w.front.set_faults(Faults {
        oversized: Some(("/manifests/huge".into(), 5 * MIB)),
        ..Faults::default()
    });
    let (status, body) = raw(&addr, "GET", "/v2/library/app/manifests/huge").await;
    assert_eq!(
        (status, code_of(&body).as_str()),
        (502, "MANIFEST_INVALID"),
        "{body}"
    );

    // Upstream bytes that do not match their digest: a manifest by digest, then a blob.
    w.front.set_faults(Faults {
        corrupt: Some(img.manifest_digest.clone()),
        ..Faults::default()
    });
    let (status, body) = raw(
        &addr,
        "GET",
        &format!("/v2/library/app/manifests/{}", img.manifest_digest),
    )
    .await;
    assert_eq!(
        (status, code_of(&body).as_str()),
        (502, "DIGEST_INVALID"),
        "{body}"
    );
    let layer = &img.layers[0].0;
    w.front.set_faults(Faults {
        corrupt: Some(layer.clone()),
        ..Faults::default()
    });
    let resp = get(
        &format!("{}/v2/library/app/blobs/{layer}", w.berth.url()),
        false,
    )
    .await;
    assert!(
        resp.bytes().await.is_err(),
        "a corrupted blob must abort the transfer"
    );
    assert!(!w
        .berth
        .data_dir()
        .join(format!("blobs/sha256/{}/{}", &layer[7..9], &layer[7..]))
        .exists());
    assert_store_consistent(w.berth.data_dir()).await;

    // Faults gone: the next requests refetch and succeed.
    w.front.set_faults(Faults::default());
    let r = get(
        &format!(
            "{}/v2/library/app/manifests/{}",
            w.berth.url(),
            img.manifest_digest
        ),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = get(
        &format!("{}/v2/library/app/blobs/{layer}", w.berth.url()),
        false,
    )
    .await;
    assert_eq!(
        crate::support::image::sha256_digest(&r.bytes().await.unwrap()),
        *layer
    );
    assert_eq!(w.front.count("GET", layer), 2);
    assert_store_consistent(w.berth.data_dir()).await;

    // Still healthy, never panicked.
    assert_eq!(
        get(&format!("{}/healthz", w.berth.admin_url()), false)
            .await
            .status(),
        200
    );
    assert!(!w.berth.log().contains("panicked"));
}
