//! Untrusted text in berth's own words: client or upstream input quoted in a message, cut
//! to a length, and numbers as HTTP grammars write them.

use std::fmt;

/// `s` quoted (Rust debug escapes) for an error message or a log line, cut to `max`
/// characters with an ellipsis: whoever sent it cannot make berth's answer (or log) long.
/// (`format!("{s:.80?}")` does not cut: precision is ignored by `str`'s `Debug`.)
pub struct Quoted<'a>(pub &'a str, pub usize);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Quoted(s, max) = *self;
        match s.char_indices().nth(max) {
            Some((cut, _)) => write!(f, "{:?}…", &s[..cut]),
            None => write!(f, "{s:?}"),
        }
    }
}

/// `1*DIGIT`: a decimal number with no sign, space or other character, as RFC 9110
/// writes lengths, byte positions and `Retry-After` (`str::parse` also takes a leading
/// `+`). `None` for anything else, and for a number too big for `u64`.
pub fn digits(s: &str) -> Option<u64> {
    saturating_digits(s).filter(|_| s.parse::<u64>().is_ok())
}

/// Like [`digits`], but a number too big for `u64` is `u64::MAX`: for a caller to whom
/// "huge" means "as much as allowed" (a byte position, a delay that is capped anyway).
pub fn saturating_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_is_cut_at_a_character() {
        assert_eq!(Quoted("abc", 5).to_string(), "\"abc\"");
        assert_eq!(Quoted("abcdef", 3).to_string(), "\"abc\"…");
        assert_eq!(Quoted("ééééé", 2).to_string(), "\"éé\"…");
        assert_eq!(Quoted("a\nb", 10).to_string(), "\"a\\nb\"");
        let long = "x".repeat(10_000);
        assert!(Quoted(&long, 80).to_string().len() < 90);
    }

    #[test]
    fn digits_are_digits_only() {
        assert_eq!(digits("0"), Some(0));
        assert_eq!(digits("120"), Some(120));
        assert_eq!(digits("99999999999999999999999"), None);
        assert_eq!(saturating_digits("99999999999999999999999"), Some(u64::MAX));
        assert_eq!(saturating_digits("+5"), None);
        for bad in ["", "+5", "-5", " 5", "5 ", "0x10", "1e3", "٣"] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
    }
}
