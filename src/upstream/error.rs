//! What can go wrong talking to an upstream, and the one conversion to a client answer.

use std::fmt;
use std::time::Duration;

use crate::oci::{self, ErrorCode};

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
    /// Any other unexpected status.
    Status { status: u16 },
    /// A manifest over the size limit.
    TooLarge(String),
    /// A response berth cannot use: bad digest header, cut short, malformed.
    Protocol(String),
}

impl Error {
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
                let e = oci::Error::new(
                    ErrorCode::TooManyRequests,
                    format!("upstream {upstream} is rate limiting berth and nothing is cached"),
                );
                e.retry_after(retry_after.unwrap_or(Duration::from_secs(60)))
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
            Error::Status { status } => write!(f, "status {status}"),
            Error::TooLarge(m) | Error::Protocol(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

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
