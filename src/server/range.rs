//! `Range: bytes=...` for blob GETs, per RFC 9110 §14: one range is served as 206, a range
//! that starts past the end is 416, anything else (several ranges, bad syntax) is ignored
//! and the whole blob is sent, as the RFC allows.

use crate::oci::saturating_digits as digits;

/// What to send for a blob of `size` bytes given the request's `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    Full,
    /// Bytes `start..=end`.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

pub fn evaluate(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(h) = header else {
        return RangeAnswer::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Some(n) = digits(last) else {
            return RangeAnswer::Full;
        };
        if n == 0 || size == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        return RangeAnswer::Partial {
            start: size.saturating_sub(n),
            end: size - 1,
        };
    }
    // A start too big for u64 saturates: past the end of any blob, so 416.
    let Some(start) = digits(first) else {
        return RangeAnswer::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match digits(last) {
            Some(e) if e >= start => e,
            _ => return RangeAnswer::Full,
        }
    };
    if start >= size {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial {
        start,
        end: end.min(size - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::RangeAnswer::*;
    use super::*;

    #[test]
    fn rfc9110_cases() {
        assert_eq!(evaluate(None, 10), Full);
        assert_eq!(
            evaluate(Some("bytes=0-4"), 10),
            Partial { start: 0, end: 4 }
        );
        assert_eq!(evaluate(Some("bytes=5-"), 10), Partial { start: 5, end: 9 });
        assert_eq!(
            evaluate(Some("bytes=5-100"), 10),
            Partial { start: 5, end: 9 }
        );
        assert_eq!(evaluate(Some("bytes=-3"), 10), Partial { start: 7, end: 9 });
        // Numbers are 1*DIGIT: a sign makes the header invalid (ignored: the whole blob).
        assert_eq!(evaluate(Some("bytes=+5-"), 10), Full);
        assert_eq!(evaluate(Some("bytes=0-+4"), 10), Full);
        assert_eq!(evaluate(Some("bytes=-+3"), 10), Full);
        // Past u64: past the end of any blob.
        assert_eq!(
            evaluate(Some("bytes=99999999999999999999999-"), 10),
            Unsatisfiable
        );
        assert_eq!(
            evaluate(Some("bytes=2-99999999999999999999999"), 10),
            Partial { start: 2, end: 9 }
        );
        assert_eq!(
            evaluate(Some("bytes=-30"), 10),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(evaluate(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(evaluate(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(evaluate(Some("bytes=4-2"), 10), Full);
        assert_eq!(evaluate(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(evaluate(Some("items=0-1"), 10), Full);
        assert_eq!(evaluate(Some("bytes=x-"), 10), Full);
    }
}
