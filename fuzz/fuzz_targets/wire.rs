//! Upstream response headers berth relies on (`src/upstream/wire.rs`): `Retry-After`,
//! `Content-Range`, `Docker-Content-Digest`.
//!
//! Input: a header value, given to each reader.
//! Invariants: a `Retry-After` is never believed beyond a day, and delay-seconds are read
//! exactly; a well-formed `Content-Range` is read exactly; the digest header agrees with
//! `Digest::parse`.

#![no_main]

use std::time::Duration;

use berth::fuzzing::wire::{header_digest, parse_content_range, retry_after};
use berth::oci::Digest;
use http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use libfuzzer_sys::fuzz_target;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// `bytes <first>-<last>/<total|*>` with plain decimal numbers, per RFC 9110 §14.4.
fn expected_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    if !(digits(first) && digits(last) && (digits(total) || total == "*")) {
        return None;
    }
    Some((first.parse().ok()?, total.parse().ok()))
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = std::str::from_utf8(data) else {
        return;
    };

    let range = parse_content_range(v);
    if let Some(want) = expected_content_range(v) {
        assert_eq!(range, Some(want), "{v:?}");
    }
    if let Some((start, total)) = range {
        assert!(v.starts_with("bytes "));
        let printed = match total {
            Some(t) => format!("bytes {start}-{start}/{t}"),
            None => format!("bytes {start}-{start}/*"),
        };
        assert_eq!(parse_content_range(&printed), Some((start, total)));
    }

    let Ok(value) = HeaderValue::from_str(v) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(RETRY_AFTER, value.clone());
    headers.insert("docker-content-digest", value);

    if let Some(after) = retry_after(&headers) {
        assert!(after <= DAY, "Retry-After {v:?} believed as {after:?}");
    }
    let trimmed = v.trim();
    // (A value that is not visible ASCII is not read at all: `to_str` refuses it.)
    if v.is_ascii() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(secs) = trimmed.parse::<u64>() {
            let want = Duration::from_secs(secs).min(DAY);
            assert_eq!(retry_after(&headers), Some(want), "Retry-After {v:?}");
        }
    }

    match header_digest(&headers) {
        Ok(Some(d)) => assert_eq!(Digest::parse(trimmed).as_ref(), Ok(&d)),
        Ok(None) => assert!(!v.is_ascii(), "{v:?} read as no header"),
        Err(_) => assert!(v.is_ascii() && Digest::parse(trimmed).is_err()),
    }
});
