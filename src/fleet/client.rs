//! The asking side of the replica-to-replica protocol: a forwarded OCI request to the
//! owner of a key, and its answer as types. Bytes that come back are checked like any
//! upstream's: a manifest must hash to its digest, a blob is hashed by the fill that
//! reads it.

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, HeaderMap, HeaderValue};

use super::Fleet;
use crate::oci::media::MAX_MANIFEST_BYTES;
use crate::oci::{self, AcceptSet, Digest, ErrorCode, Reference, Repository};

/// What a peer said.
pub enum Answer<T> {
    /// It did not answer (it is marked down): ask the next replica.
    Down,
    /// The repository does not hold it.
    Unknown,
    /// An answer that is an error (the owner's quota, its upstream down, bad bytes).
    Failed(oci::Error),
    Got(T),
}

/// A blob on its way from a peer, from the byte asked for.
pub struct PeerBlob {
    /// The blob's full size, when the peer said it.
    pub total: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, String>>,
}

/// A manifest from a peer, its bytes checked against its digest.
pub struct PeerManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
    /// The owner served a stale copy, and says why.
    pub warning: Option<String>,
}

/// What to ask for: the upstream (as `?ns=`), the repository, and who pays.
pub struct Ask<'a> {
    pub upstream: &'a str,
    pub repo: &'a Repository,
    pub client: Option<&'a str>,
}

impl Fleet {
    /// Sends a forwarded GET for `/v2/<repo>/<resource>`; the answer to give instead when
    /// the peer is down, does not hold it, or answers anything `usable` refuses.
    async fn forward<T>(
        &self,
        peer: &str,
        kind: &'static str,
        resource: &str,
        ask: &Ask<'_>,
        extra: HeaderMap,
        usable: impl Fn(reqwest::StatusCode) -> bool,
    ) -> Result<reqwest::Response, Answer<T>> {
        let target = format!("/v2/{}/{resource}?ns={}", ask.repo, ask.upstream);
        let method = reqwest::Method::GET;
        let Ok(resp) = self
            .ask(peer, kind, method, &target, extra, ask.client)
            .await
        else {
            return Err(Answer::Down);
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(Answer::Unknown);
        }
        if !usable(resp.status()) {
            self.forward_failed(kind);
            return Err(Answer::Failed(peer_error(peer, resp).await));
        }
        Ok(resp)
    }

    /// GETs a blob from byte `from` from `peer`.
    pub async fn blob(
        &self,
        peer: &str,
        ask: &Ask<'_>,
        digest: &Digest,
        from: u64,
    ) -> Answer<PeerBlob> {
        let mut extra = HeaderMap::new();
        if from > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={from}-")) {
                extra.insert(header::RANGE, v);
            }
        }
        let usable = |s: reqwest::StatusCode| {
            s.is_success() && (from == 0 || s == reqwest::StatusCode::PARTIAL_CONTENT)
        };
        let resp = match self
            .forward(peer, "blob", &format!("blobs/{digest}"), ask, extra, usable)
            .await
        {
            Ok(resp) => resp,
            Err(answer) => return answer,
        };
        let total = if from > 0 {
            resp.headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, t)| t.parse().ok())
        } else {
            resp.content_length()
        };
        Answer::Got(PeerBlob {
            total,
            body: resp.bytes_stream().map_err(|e| e.to_string()).boxed(),
        })
    }

    /// GETs a manifest from `peer`, with the client's Accept set.
    pub async fn manifest(
        &self,
        peer: &str,
        ask: &Ask<'_>,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Answer<PeerManifest> {
        let mut extra = HeaderMap::new();
        for mt in accept.media_types() {
            extra.append(header::ACCEPT, HeaderValue::from_static(mt));
        }
        let resource = format!("manifests/{reference}");
        let usable = |s: reqwest::StatusCode| s.is_success();
        let resp = match self
            .forward(peer, "manifest", &resource, ask, extra, usable)
            .await
        {
            Ok(resp) => resp,
            Err(answer) => return answer,
        };
        match receive_manifest(resp, reference).await {
            Ok(m) => Answer::Got(m),
            Err(why) => {
                self.forward_failed("manifest");
                Answer::Failed(oci::Error::new(
                    ErrorCode::UpstreamInvalid,
                    format!("berth replica {peer}: {why}"),
                ))
            }
        }
    }
}

async fn receive_manifest(
    resp: reqwest::Response,
    reference: &Reference,
) -> Result<PeerManifest, String> {
    let text =
        |h: &HeaderMap, name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let media_type = text(resp.headers(), "content-type").unwrap_or_default();
    let claimed =
        text(resp.headers(), "docker-content-digest").and_then(|d| Digest::parse(&d).ok());
    // The owner's warning already names why; keep its text without the wrapper.
    let warning = text(resp.headers(), "warning").map(|w| {
        w.trim_start_matches("299 - \"berth: ")
            .trim_end_matches('"')
            .to_owned()
    });
    let bytes = read_limited(resp).await?;
    let digest = match (reference, &claimed) {
        (Reference::Digest(d), _) => d.clone(),
        (Reference::Tag(_), Some(d)) => d.clone(),
        (Reference::Tag(_), None) => return Err("no Docker-Content-Digest".into()),
    };
    let mut h = digest.hasher();
    h.update(&bytes);
    if h.finish() != digest || claimed.is_some_and(|c| c != digest) {
        return Err(format!("sent a manifest that does not hash to {digest}"));
    }
    Ok(PeerManifest {
        bytes,
        media_type,
        digest,
        warning,
    })
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Bytes, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_MANIFEST_BYTES {
            return Err("sent a manifest over the size limit".into());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// A replica's error answer, in OCI terms: its code and message when it sent the usual
/// JSON, else its status.
async fn peer_error(peer: &str, resp: reqwest::Response) -> oci::Error {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::oci::digits(v.trim()));
    // Error bodies are small: at most 64 KiB are read, for at most 5 s.
    let body = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut resp = resp;
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() > 65536 {
                break;
            }
        }
        body
    })
    .await
    .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("berth replica {peer} answered {status}"));
    let code = match status.as_u16() {
        404 => ErrorCode::ManifestUnknown,
        401 | 403 => ErrorCode::Denied,
        429 => ErrorCode::TooManyRequests,
        503 => ErrorCode::Unavailable,
        _ => ErrorCode::UpstreamInvalid,
    };
    let e = oci::Error::new(code, message);
    match retry_after {
        Some(s) => e.retry_after(std::time::Duration::from_secs(s)),
        None => e,
    }
}
