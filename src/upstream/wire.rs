//! Reading upstream responses: the headers berth relies on (digests, ranges,
//! `Retry-After`), and small bodies read whole under a size limit and a stall timeout.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use reqwest::Response;

use super::error::{describe, Error};
use crate::oci::Digest;

/// The longest `Retry-After` berth believes: a day (Docker Hub's window is 6 hours).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

pub fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
        .filter(|s| !s.is_empty())
}

pub fn header_digest(headers: &HeaderMap) -> Result<Option<Digest>, Error> {
    match headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        None => Ok(None),
        Some(s) => Digest::parse(s.trim())
            .map(Some)
            .map_err(|e| Error::Protocol(format!("Docker-Content-Digest: {e}"))),
    }
}

pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    // An upstream's numbers are bounded before they reach time arithmetic.
    // `1*DIGIT`; one too big for u64 is as good as the cap, not ignored.
    if let Some(secs) = crate::oci::saturating_digits(v) {
        return Some(Duration::from_secs(secs.min(MAX_RETRY_AFTER.as_secs())));
    }
    let when = humantime::parse_rfc3339_weak(v)
        .ok()
        .or_else(|| httpdate(v))?;
    when.duration_since(std::time::SystemTime::now())
        .ok()
        .map(|d| d.min(MAX_RETRY_AFTER))
}

/// HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`, and the obsolete forms RFC 9110 asks
/// recipients to accept).
fn httpdate(v: &str) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(v).ok()
}

/// `bytes <start>-<end>/<total|*>` → (start, total).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Reads a whole (small) body, refusing more than `limit` bytes, stalls of `stall`, and
/// bodies that take longer than `whole` in all (one byte a minute never stalls).
pub async fn read_limited(
    resp: Response,
    limit: usize,
    stall: Duration,
    whole: Duration,
) -> Result<Bytes, Error> {
    tokio::time::timeout(whole, read_all(resp, limit, stall))
        .await
        .map_err(|_| Error::Timeout("the response body took longer than body_timeout"))?
}

async fn read_all(mut resp: Response, limit: usize, stall: Duration) -> Result<Bytes, Error> {
    let mut buf = BytesMut::new();
    loop {
        let chunk = tokio::time::timeout(stall, resp.chunk())
            .await
            .map_err(|_| Error::Timeout("reading the response body"))?
            .map_err(|e| Error::Protocol(format!("response body cut short: {}", describe(&e))))?;
        let Some(chunk) = chunk else { break };
        if buf.len() + chunk.len() > limit {
            return Err(Error::TooLarge(format!(
                "response body is over the {limit}-byte limit"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_retry_after() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, http::HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        // A number too big for u64 is as good as the cap; a signed one is no number.
        h.insert(
            header::RETRY_AFTER,
            http::HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(header::RETRY_AFTER, http::HeaderValue::from_static("+5"));
        assert_eq!(retry_after(&h), None);
        assert!(httpdate("Sun, 06 Nov 1994 08:49:37 GMT").is_some());
        // The obsolete forms RFC 9110 asks recipients to accept.
        assert!(httpdate("Sunday, 06-Nov-94 08:49:37 GMT").is_some());
        assert!(httpdate("Sun Nov  6 08:49:37 1994").is_some());
    }
}
