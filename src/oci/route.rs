//! The one parser of inbound paths: `/v2/...` and its query into a [`Route`].
//!
//! The repository part stays a `&str` here because which part of it names an upstream
//! host (`/v2/ghcr.io/org/app/...`) depends on the configured upstreams; the routing table
//! in `upstream` finishes the job and parses the rest into a [`super::Repository`].

use http::Method;

use super::digest::Digest;
use super::error::{Error, ErrorCode};
use super::name::Reference;

/// What a request asks for, once its path has been parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v2/`: the API version check.
    Base,
    Manifest(Reference),
    Blob(Digest),
    /// `GET /v2/<name>/tags/list?n=&last=`
    TagsList {
        n: Option<u32>,
        last: Option<String>,
    },
    /// `GET /v2/<name>/referrers/<digest>?artifactType=`
    Referrers {
        digest: Digest,
        artifact_type: Option<String>,
    },
}

/// A parsed request: what it asks for, under which (not yet resolved) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub endpoint: Endpoint,
    /// The name part of the path, possibly starting with an upstream host.
    pub name: &'a str,
    /// The `ns` query parameter containerd sends for mirrors.
    pub ns: Option<String>,
    /// HEAD rather than GET.
    pub head: bool,
}

fn unsupported(what: &str) -> Error {
    Error::new(
        ErrorCode::Unsupported,
        format!("berth is a read-only mirror: {what} is not supported"),
    )
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    // application/x-www-form-urlencoded, as clients send queries (`%XX`, `+` for space).
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

impl<'a> Route<'a> {
    /// Parses a request line. Anything berth does not serve is an OCI error.
    pub fn parse(method: &Method, path: &'a str, query: Option<&str>) -> Result<Self, Error> {
        let head = match *method {
            Method::GET => false,
            Method::HEAD => true,
            Method::PUT | Method::POST | Method::PATCH => return Err(unsupported("pushing")),
            Method::DELETE => return Err(unsupported("deleting")),
            _ => return Err(unsupported(&format!("the {method} method"))),
        };
        let ns = query_param(query, "ns").filter(|s| !s.is_empty());
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => {
                return Ok(Route {
                    endpoint: Endpoint::Base,
                    name: "",
                    ns,
                    head,
                })
            }
            Some(r) if r.starts_with('/') => &r[1..],
            _ => {
                return Err(Error::new(
                    ErrorCode::NameUnknown,
                    "only the OCI distribution API under /v2/ is served here",
                ))
            }
        };
        if rest == "_catalog" {
            return Err(unsupported("listing the catalog"));
        }
        let (name, endpoint) = endpoint(path, rest, query)?;
        Ok(Route {
            endpoint,
            name,
            ns,
            head,
        })
    }
}

/// The endpoint under `/v2/` that `rest` names, with the repository name before it.
fn endpoint<'a>(
    path: &str,
    rest: &'a str,
    query: Option<&str>,
) -> Result<(&'a str, Endpoint), Error> {
    Ok(if let Some(name) = rest.strip_suffix("/tags/list") {
        let n = page_size(query)?;
        (
            name,
            Endpoint::TagsList {
                n,
                last: query_param(query, "last"),
            },
        )
    } else if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        // Neither a tag nor a digest: it names nothing that can exist, and "not
        // found" is how registries answer that (404 MANIFEST_UNKNOWN, not 400).
        let reference = Reference::parse(reference).map_err(|e| {
            Error::new(
                ErrorCode::ReferenceInvalid,
                format!("no manifest can have this reference: {e}"),
            )
        })?;
        (name, Endpoint::Manifest(reference))
    } else if rest.contains("/blobs/uploads") {
        return Err(unsupported("pushing"));
    } else if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        let digest =
            Digest::parse(digest).map_err(|e| Error::new(ErrorCode::DigestInvalid, e.0))?;
        (name, Endpoint::Blob(digest))
    } else if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
        let digest =
            Digest::parse(digest).map_err(|e| Error::new(ErrorCode::DigestInvalid, e.0))?;
        (
            name,
            Endpoint::Referrers {
                digest,
                artifact_type: query_param(query, "artifactType"),
            },
        )
    } else {
        return Err(Error::new(
            ErrorCode::NameUnknown,
            format!("no OCI endpoint at {}", super::Quoted(path, 200)),
        ));
    })
}

/// A tags list's `n`: a number, if given.
fn page_size(query: Option<&str>) -> Result<Option<u32>, Error> {
    let Some(v) = query_param(query, "n") else {
        return Ok(None);
    };
    super::digits(&v)
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            Error::new(
                ErrorCode::Unsupported,
                format!("n={} is not a number", super::Quoted(&v, 20)),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_endpoints() {
        let r = Route::parse(&Method::GET, "/v2/", None).unwrap();
        assert_eq!(r.endpoint, Endpoint::Base);
        let r = Route::parse(
            &Method::HEAD,
            "/v2/library/alpine/manifests/3.19",
            Some("ns=docker.io"),
        )
        .unwrap();
        assert!(r.head);
        assert_eq!(r.name, "library/alpine");
        assert_eq!(r.ns.as_deref(), Some("docker.io"));
        let p = format!("/v2/ghcr.io/org/app/blobs/{D}");
        let r = Route::parse(&Method::GET, &p, None).unwrap();
        assert_eq!(r.name, "ghcr.io/org/app");
        assert!(matches!(r.endpoint, Endpoint::Blob(_)));
        let r = Route::parse(&Method::GET, "/v2/a/tags/list", Some("n=10&last=v1")).unwrap();
        assert_eq!(
            r.endpoint,
            Endpoint::TagsList {
                n: Some(10),
                last: Some("v1".into())
            }
        );
    }

    #[test]
    fn refuses_writes_and_garbage() {
        let e = Route::parse(&Method::PUT, "/v2/a/manifests/x", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);
        let e = Route::parse(&Method::POST, "/v2/a/blobs/uploads/", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);
        let e = Route::parse(&Method::GET, "/v2/a/blobs/sha256:xyz", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        let e = Route::parse(&Method::GET, "/v2/a/referrers/sha256:xyz", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
        assert!(Route::parse(&Method::GET, "/etc/passwd", None).is_err());
        assert_eq!(query_param(Some("last=a%2Fb"), "last").unwrap(), "a/b");
        assert_eq!(query_param(Some("x=1&last=a%2F"), "last").unwrap(), "a/");
        assert_eq!(query_param(Some("last=%"), "last").unwrap(), "%");
        assert_eq!(query_param(Some("last=%4"), "last").unwrap(), "%4");
        assert_eq!(query_param(Some("last=a+b"), "last").unwrap(), "a b");
        assert_eq!(query_param(Some("n=1"), "last"), None);
        // `ns` is decoded too: a registry on a port, as a client may encode it.
        let r = Route::parse(
            &Method::GET,
            "/v2/a/manifests/v1",
            Some("ns=registry.example%3A5000"),
        )
        .unwrap();
        assert_eq!(r.ns.as_deref(), Some("registry.example:5000"));
    }

    /// Issue 11: a manifest reference that is neither a tag nor a digest names nothing
    /// that can exist: 404 MANIFEST_UNKNOWN as registries answer, not 400, GET and HEAD.
    #[test]
    fn a_reference_that_is_neither_tag_nor_digest_is_not_found() {
        let long = format!("/v2/library/alpine/manifests/{}", "a".repeat(129));
        let refs = [
            "/v2/library/alpine/manifests/.INVALID_NAME",
            "/v2/library/alpine/manifests/-v1",
            "/v2/library/alpine/manifests/bad%tag",
            "/v2/library/alpine/manifests/bad$tag",
            "/v2/library/alpine/manifests/",
            "/v2/library/alpine/manifests/sha256:xyz",
            "/v2/library/alpine/manifests/sha256:../../../etc/passwd",
            "/v2/library/alpine/manifests/md5:d41d8cd98f00b204e9800998ecf8427e",
            long.as_str(),
        ];
        for path in refs {
            for method in [Method::GET, Method::HEAD] {
                let e = Route::parse(&method, path, None).unwrap_err();
                assert_eq!(e.code, ErrorCode::ReferenceInvalid, "{method} {path}");
                assert_eq!(
                    e.code.describe(),
                    ("MANIFEST_UNKNOWN", http::StatusCode::NOT_FOUND)
                );
                assert!(e.message.contains("no manifest"), "{}", e.message);
            }
        }
        // The edges of the grammar still parse: 128 characters, a leading underscore.
        let max = format!("/v2/a/manifests/{}", "a".repeat(128));
        assert!(Route::parse(&Method::GET, &max, None).is_ok());
        assert!(Route::parse(&Method::GET, "/v2/a/manifests/_v1.2-rc", None).is_ok());
        // Blob and referrers digests keep their own answer (DIGEST_INVALID).
        let e = Route::parse(&Method::GET, "/v2/a/blobs/.INVALID_NAME", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::DigestInvalid);
    }
}
