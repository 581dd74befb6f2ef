//! `Route::parse`, the one parser of inbound request paths.
//!
//! Input: a request line, `METHOD /path[?query]` (the method defaults to GET).
//! Invariants: only GET and HEAD are served; every route rebuilds the exact path it was
//! parsed from; the references and digests in it print back to what was parsed.

#![no_main]

use berth::oci::{Endpoint, ErrorCode, Reference, Route};
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let (method, target) = match line.split_once(' ') {
        Some((m, t)) => (m, t),
        None => ("GET", line),
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let route = match Route::parse(&method, path, query) {
        Ok(route) => route,
        Err(e) => {
            if !matches!(method, Method::GET | Method::HEAD) {
                assert_eq!(e.code, ErrorCode::Unsupported, "{method} refused as {e:?}");
            }
            return;
        }
    };
    assert!(
        method == Method::GET || method == Method::HEAD,
        "{method} accepted"
    );
    assert_eq!(route.head, method == Method::HEAD);
    assert_ne!(route.ns.as_deref(), Some(""), "an empty ns is no ns");
    let name = route.name;
    let rebuilt = match &route.endpoint {
        Endpoint::Base => {
            assert_eq!(name, "");
            assert!(matches!(path, "/v2" | "/v2/"), "base at {path:?}");
            path.to_owned()
        }
        Endpoint::Manifest(reference) => {
            let printed = reference.to_string();
            assert_eq!(Reference::parse(&printed).as_ref(), Ok(reference));
            format!("/v2/{name}/manifests/{printed}")
        }
        Endpoint::Blob(digest) => format!("/v2/{name}/blobs/{digest}"),
        Endpoint::Referrers { digest, .. } => format!("/v2/{name}/referrers/{digest}"),
        Endpoint::TagsList { .. } => format!("/v2/{name}/tags/list"),
    };
    assert_eq!(rebuilt, path, "the route does not describe its path");
    // Parsing is a function of the request line alone.
    assert_eq!(Route::parse(&method, path, query).ok(), Some(route));
});
