//! OCI error codes, the one table that pairs each with its HTTP status, and the JSON body.
//!
//! Every error berth answers goes through [`Error`]; its [`ErrorCode`] alone decides the
//! status, so the code and the status can never disagree.
//!
//! The body is written here rather than with `oci-spec`'s `ErrorResponse`: its error code
//! enum holds the distribution spec's codes only, and berth also answers `RANGE_INVALID`,
//! `UNAVAILABLE` and `UNKNOWN` (as distribution does). A test reads every body berth can
//! write with `oci-spec`, so the spec's codes are spelt as the spec spells them.

use std::fmt;
use std::time::Duration;

use http::StatusCode;

/// The error codes berth answers with (distribution-spec codes plus `UNAVAILABLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The blob is not in the repository, here or upstream.
    BlobUnknown,
    /// The manifest is not in the repository, here or upstream.
    ManifestUnknown,
    /// The repository, or the upstream host a request names, is not known.
    NameUnknown,
    /// The repository name breaks the grammar.
    NameInvalid,
    /// A manifest reference that is neither a valid tag nor a valid digest. It names
    /// nothing that can exist, so the answer is "not found", as registries give it, not
    /// a bad request.
    ReferenceInvalid,
    /// A digest breaks the grammar.
    DigestInvalid,
    /// The requested `Range` cannot be satisfied.
    RangeInvalid,
    /// Push, delete and anything else a read-only mirror does not do.
    Unsupported,
    /// Credentials are needed (or were wrong): from a pull client, or for the admin API.
    Unauthorized,
    /// The upstream refused berth's credentials for this repository, or this client may
    /// not pull it.
    Denied,
    /// The upstream's quota (or berth's own budget for it) is spent.
    TooManyRequests,
    /// The upstream could not be reached and nothing is stored.
    Unavailable,
    /// The upstream sent bytes that do not match their digest.
    UpstreamDigestMismatch,
    /// The upstream sent a manifest berth will not store (too large, malformed).
    UpstreamManifestInvalid,
    /// The upstream answered in a way berth cannot use.
    UpstreamInvalid,
    /// A fault inside berth (local I/O, index).
    Internal,
}

impl ErrorCode {
    /// The table: OCI code string and HTTP status, one row per code.
    pub fn describe(self) -> (&'static str, StatusCode) {
        use ErrorCode::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            ReferenceInvalid => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            DigestInvalid => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            RangeInvalid => ("RANGE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
            Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            Unauthorized => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Denied => ("DENIED", StatusCode::FORBIDDEN),
            TooManyRequests => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            Unavailable => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            UpstreamDigestMismatch => ("DIGEST_INVALID", StatusCode::BAD_GATEWAY),
            UpstreamManifestInvalid => ("MANIFEST_INVALID", StatusCode::BAD_GATEWAY),
            UpstreamInvalid => ("UNKNOWN", StatusCode::BAD_GATEWAY),
            Internal => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    pub fn status(self) -> StatusCode {
        self.describe().1
    }
}

/// An error as the client will see it.
#[derive(Clone, Debug)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    /// Sent as `Retry-After` (429 and 503).
    pub retry_after: Option<Duration>,
    /// Sent as `WWW-Authenticate` (401): how to authenticate to berth.
    pub challenge: Option<String>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            retry_after: None,
            challenge: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// A 401 that tells the client how to authenticate (`Basic realm="berth"`).
    pub fn challenge(mut self, challenge: impl Into<String>) -> Self {
        self.challenge = Some(challenge.into());
        self
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The distribution-spec error body: `{"errors":[{"code","message","detail"}]}`.
    pub fn to_json(&self) -> String {
        let (code, _) = self.code.describe();
        serde_json::json!({
            "errors": [{ "code": code, "message": self.message, "detail": null }]
        })
        .to_string()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.describe().0, self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every body with a distribution-spec code reads as the spec's `ErrorResponse`; the
    /// others are berth's (and distribution's) extensions, named here.
    #[test]
    fn bodies_read_as_the_spec_says() {
        use ErrorCode::*;
        let all = [
            BlobUnknown,
            ManifestUnknown,
            NameUnknown,
            NameInvalid,
            ReferenceInvalid,
            DigestInvalid,
            RangeInvalid,
            Unsupported,
            Unauthorized,
            Denied,
            TooManyRequests,
            Unavailable,
            UpstreamDigestMismatch,
            UpstreamManifestInvalid,
            UpstreamInvalid,
            Internal,
        ];
        for code in all {
            let body = Error::new(code, "why").to_json();
            let spec = serde_json::from_str::<oci_spec::distribution::ErrorResponse>(&body);
            let extension = matches!(
                code.describe().0,
                "RANGE_INVALID" | "UNAVAILABLE" | "UNKNOWN"
            );
            assert_eq!(spec.is_ok(), !extension, "{code:?}: {body}");
            if let Ok(r) = spec {
                let spelt = serde_json::to_value(r.detail()[0].code()).unwrap();
                assert_eq!(spelt, code.describe().0);
            }
        }
    }

    #[test]
    fn json_shape() {
        let e = Error::new(
            ErrorCode::NameUnknown,
            "upstream \"evil.example\" is not configured",
        );
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
    }
}
