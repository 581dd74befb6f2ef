//! The `ratelimit-limit` / `ratelimit-remaining` headers, through `Quota::observe` (the
//! parser in `src/quota/bucket.rs` and the bucket arithmetic it feeds).
//!
//! Input: lines. The first configures the bucket: `<requests> <per seconds> <replicas>`
//! (anything unparsable: no configured quota, one replica). Then pairs of lines, one
//! upstream response each: its `ratelimit-limit`, then its `ratelimit-remaining` (an
//! empty line: header absent). After each response one counted request is tried.
//! Invariants: the headers' numbers are read as the upstream wrote them; tokens never
//! exceed the bucket; the headers may lower a configured cap but never raise it.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use berth::config::{CountedRequest, QuotaConfig};
use berth::metrics::Metrics;
use berth::quota::{Purpose, Quota};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

/// The longest window berth takes from `w=`, and its default.
const MAX_WINDOW: u64 = 30 * 24 * 3600;
const DEFAULT_WINDOW: u64 = 6 * 3600;

/// The number an upstream wrote, as the header grammar has it: `<n>[;w=<secs>]...`.
fn number(v: &str) -> Option<u64> {
    if !v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        return None; // not a visible-ASCII header value: not read at all
    }
    // 1*DIGIT that fits a u64: no sign (`str::parse` would take a `+`).
    let n = v.split(';').next()?.trim();
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Whether `secs` is at most `window`, give or take the rounding of f64 arithmetic (a
/// configured window may be any length, and past 2^53 seconds f64 is not exact).
fn within(secs: u64, window: u64) -> bool {
    secs as f64 <= window as f64 * (1.0 + 1e-9) + 1.0
}

fuzz_target!(|data: &[u8]| {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    let metrics = METRICS.get_or_init(|| Arc::new(Metrics::new())).clone();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let setup: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let field = |i: usize| setup.get(i).and_then(|s| s.parse::<u64>().ok());
    let config = match (field(0), field(1)) {
        // Validation refuses zero requests or a zero window.
        (Some(requests @ 1..=0xffff_ffff), Some(per @ 1..)) => Some(QuotaConfig {
            requests: requests as u32,
            per: Duration::from_secs(per),
            reserve: 0.2,
            counts: None,
        }),
        _ => None,
    };
    let replicas = field(2).map_or(1, |r| r.clamp(1, 1000) as usize);
    let cap = config
        .as_ref()
        .map(|c| f64::from(c.requests) / replicas as f64);
    let longest_window = config
        .as_ref()
        .map_or(0, |c| c.per.as_secs())
        .max(MAX_WINDOW)
        .max(DEFAULT_WINDOW);
    let quota = Quota::new(
        "fuzz.example",
        config,
        vec![CountedRequest::ManifestGet],
        metrics,
    );
    quota.share(replicas);

    let (mut limit_seen, mut remaining_seen) = (None, None);
    while let Some(limit) = lines.next() {
        let remaining = lines.next().unwrap_or("");
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("ratelimit-limit", limit),
            ("ratelimit-remaining", remaining),
        ] {
            if let Ok(v) = HeaderValue::from_str(value) {
                if !value.is_empty() {
                    headers.insert(name, v);
                }
            }
        }
        quota.observe(&headers);
        let read = |name: &str| headers.get(name).and_then(|v| number(v.to_str().ok()?));
        limit_seen = read("ratelimit-limit").or(limit_seen);
        remaining_seen = read("ratelimit-remaining").or(remaining_seen);

        let snap = quota.snapshot();
        assert_eq!(snap.header_limit, limit_seen, "ratelimit-limit {limit:?}");
        assert_eq!(
            snap.header_remaining, remaining_seen,
            "ratelimit-remaining {remaining:?}"
        );
        match (snap.tokens, snap.capacity) {
            (Some(tokens), Some(capacity)) => {
                assert!(capacity >= 1, "an empty bucket can never refill");
                assert!(
                    tokens <= capacity,
                    "{tokens} tokens in a bucket of {capacity}"
                );
                if let Some(cap) = cap {
                    assert!(
                        capacity as f64 <= cap.max(1.0),
                        "headers raised the cap {cap} to {capacity}"
                    );
                }
            }
            (None, None) => assert!(cap.is_none() && limit_seen.is_none()),
            other => panic!("tokens and capacity disagree: {other:?}"),
        }
        assert!(
            within(snap.refill_seconds, longest_window),
            "a token every {} s",
            snap.refill_seconds
        );
        match quota.acquire(Purpose::New) {
            Ok(()) => quota.refund(),
            Err(denied) => {
                let retry = denied.retry_after.as_secs();
                assert!(
                    retry >= 1 && within(retry, longest_window),
                    "retry after {retry} s"
                );
            }
        }
    }
});
