//! What can go wrong talking to an upstream, and the one conversion to a client answer.

use std::fmt;
use std::time::Duration;

use crate::metrics::QuotaRefusal;
use crate::oci::{self, ErrorCode};
use crate::quota::Denied;

#[derive(Debug, Clone)]
pub enum Error {
    /// No connection (refused, DNS, TLS).
    Connect(String),
    /// No answer (or no next byte) within the configured time.
    Timeout(&'static str),
    /// The upstream refused berth's credentials (or anonymous access).
    Unauthorized(String),
    /// The upstream said 429.
    TooManyRequests { retry_after: Option<Duration> },
    /// berth's own bucket (or the upstream's cooldown) refused a counted request.
    Quota(Denied),
    /// Any other unexpected status.
    Status { status: u16 },
    /// A manifest over the size limit.
    TooLarge(String),
    /// A response berth cannot use: bad digest header, cut short, malformed.
    Protocol(String),
    /// A redirect or token realm led where the egress policy forbids.
    Refused(super::egress::Refused),
}

impl Error {
    /// Whether the request may have reached the upstream (and been counted there). Only a
    /// failed connection certainly did not; a timeout waiting for headers may have.
    pub fn reached_upstream(&self) -> bool {
        !matches!(
            self,
            Error::Connect(_) | Error::Timeout("connecting") | Error::Quota(_)
        )
    }

    /// Whether serving a stored copy instead is the right answer. Auth failures are not:
    /// the client must learn that berth's credentials are wrong.
    pub fn allows_stale(&self) -> bool {
        !matches!(self, Error::Unauthorized(_))
    }

    /// The answer a client gets when nothing stored can stand in.
    pub fn to_oci(&self, upstream: &str) -> oci::Error {
        match self {
            Error::Connect(cause) => oci::Error::new(
                ErrorCode::Unavailable,
                format!("upstream {upstream} is unreachable and nothing is cached: {cause}"),
            ),
            Error::Timeout(what) => oci::Error::new(
                ErrorCode::Unavailable,
                format!("upstream {upstream} timed out ({what}) and nothing is cached"),
            ),
            Error::Unauthorized(msg) => oci::Error::new(
                ErrorCode::Denied,
                format!("upstream {upstream} refused berth's credentials: {msg}"),
            ),
            Error::TooManyRequests { retry_after } => {
                let after = retry_after.unwrap_or(Duration::from_secs(60));
                oci::Error::new(
                    ErrorCode::TooManyRequests,
                    format!(
                        "upstream {upstream} answered 429 (pull rate limit) and nothing is cached; \
                         retry in {}s",
                        after.as_secs()
                    ),
                )
                .retry_after(after)
            }
            Error::Quota(d) => {
                let why = match d.reason {
                    QuotaRefusal::Empty | QuotaRefusal::Reserve => format!(
                        "berth's pull quota for upstream {upstream} is spent ({} requests left)",
                        d.remaining
                    ),
                    QuotaRefusal::Cooldown => {
                        format!("upstream {upstream} is rate limiting berth (it answered 429)")
                    }
                    QuotaRefusal::Client => format!(
                        "this client's budget of counted requests to upstream {upstream} is spent"
                    ),
                };
                oci::Error::new(
                    ErrorCode::TooManyRequests,
                    format!(
                        "{why} and this image is not cached; the next request can go in {}s",
                        d.retry_after.as_secs().max(1)
                    ),
                )
                .retry_after(d.retry_after)
            }
            Error::Status { status } if *status >= 500 => oci::Error::new(
                ErrorCode::Unavailable,
                format!("upstream {upstream} answered {status} and nothing is cached"),
            ),
            Error::Status { status } => oci::Error::new(
                ErrorCode::UpstreamInvalid,
                format!("upstream {upstream} answered {status} unexpectedly"),
            ),
            Error::TooLarge(msg) => oci::Error::new(
                ErrorCode::UpstreamManifestInvalid,
                format!("upstream {upstream}: {msg}"),
            ),
            Error::Protocol(msg) => oci::Error::new(
                ErrorCode::UpstreamInvalid,
                format!("upstream {upstream}: {msg}"),
            ),
            Error::Refused(r) => oci::Error::new(
                ErrorCode::UpstreamInvalid,
                format!(
                    "upstream {upstream} sent berth to {}, which is {}; berth follows \
                     redirects and token realms only to the upstream's origin, public \
                     addresses and upstreams.redirect_allow",
                    r.target, r.reason
                ),
            ),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(c) => write!(f, "unreachable: {c}"),
            Error::Timeout(w) => write!(f, "timed out ({w})"),
            Error::Unauthorized(m) => write!(f, "unauthorized: {m}"),
            Error::TooManyRequests { retry_after } => {
                write!(f, "429 too many requests (retry after {retry_after:?})")
            }
            Error::Quota(d) => write!(
                f,
                "quota: {} ({} left, next in {}s)",
                d.reason.as_str(),
                d.remaining,
                d.retry_after.as_secs()
            ),
            Error::Status { status } => write!(f, "status {status}"),
            Error::TooLarge(m) | Error::Protocol(m) => f.write_str(m),
            Error::Refused(r) => r.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

/// A failed request as an [`Error`]: a refused hop, or whatever `other` makes of it.
pub fn from_reqwest(e: &reqwest::Error, other: impl FnOnce(String) -> Error) -> Error {
    match super::egress::refusal_in(e) {
        Some(r) => Error::Refused(r),
        None => other(describe(e)),
    }
}

/// Describes a reqwest error without its URL (which may carry a token endpoint's query).
pub fn describe(e: &reqwest::Error) -> String {
    // reqwest's Display includes the URL; print the kind and the causes instead.
    let mut msg = if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_body() || e.is_decode() {
        "response body error".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
