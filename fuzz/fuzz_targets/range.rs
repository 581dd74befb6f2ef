//! `Range` evaluation for blob GETs (`src/server/range.rs`).
//!
//! Input: `<blob size>\n<Range header>` (no newline: no header; a size that is not a
//! number is taken from the input's length).
//! Invariants: a partial answer lies within the blob; 416 only for a range that starts at
//! or past the end (or a zero suffix); and for a well-formed single range, exactly the
//! RFC 9110 answer.

#![no_main]

use berth::fuzzing::range::{evaluate, RangeAnswer};
use libfuzzer_sys::fuzz_target;

/// RFC 9110 §14.1.2 for a header that is exactly `bytes=<first>-[<last>]` or
/// `bytes=-<suffix>` with plain decimal numbers that fit a u64; `None` for anything else.
fn expected(header: &str, size: u64) -> Option<RangeAnswer> {
    let spec = header.strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let number = |s: &str| {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    if first.is_empty() {
        let n = number(last)?;
        return Some(if n == 0 || size == 0 {
            RangeAnswer::Unsatisfiable
        } else {
            RangeAnswer::Partial {
                start: size.saturating_sub(n),
                end: size - 1,
            }
        });
    }
    let start = number(first)?;
    let end = if last.is_empty() {
        None
    } else {
        Some(number(last)?)
    };
    Some(match end {
        // An invalid range-spec: the header is ignored.
        Some(end) if end < start => RangeAnswer::Full,
        _ if start >= size => RangeAnswer::Unsatisfiable,
        end => RangeAnswer::Partial {
            start,
            end: end.unwrap_or(u64::MAX).min(size - 1),
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (size, header) = match text.split_once('\n') {
        Some((size, header)) => (size, Some(header)),
        None => (text, None),
    };
    let size = size.parse::<u64>().unwrap_or(data.len() as u64);

    let answer = evaluate(header, size);
    match answer {
        RangeAnswer::Full => {}
        RangeAnswer::Partial { start, end } => {
            assert!(
                start <= end && end < size,
                "{answer:?} for a {size}-byte blob"
            );
        }
        RangeAnswer::Unsatisfiable => {
            assert!(header.is_some_and(|h| h.contains("bytes=")));
        }
    }
    if header.is_none() {
        assert_eq!(answer, RangeAnswer::Full);
    }
    if let Some(want) = header.and_then(|h| expected(h, size)) {
        assert_eq!(answer, want, "{header:?} on a {size}-byte blob");
    }
});
