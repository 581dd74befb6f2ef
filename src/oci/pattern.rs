//! Repository patterns, as `[[access]]` rules and `[[upstreams.credentials]]` write them:
//! `docker.io/library/*`, `ghcr.io/myorg/**`, `myorg/team-*`.
//!
//! A pattern is matched segment by segment (`/` separates them):
//! - `**` as a whole segment matches one or more segments;
//! - `*` inside a segment matches any run of characters except `/` (`*` alone: exactly
//!   one segment; `team-*`: `team-a`, `team-b`);
//! - anything else matches itself, case-sensitively (repository names are lowercase).

use std::cmp::Ordering;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: one or more whole segments.
    Any,
    /// A segment, with `*` standing for any characters.
    Glob(String),
    /// A segment without `*`: itself.
    Literal(String),
}

/// How specific a pattern is; more specific sorts greater. Literal segments count first
/// (`myorg/app` over `myorg/*`), then segments that are not `**` (`myorg/*` over
/// `myorg/**`), then literal characters (`myorg/team-*` over `myorg/*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    literal_segments: usize,
    bounded_segments: usize,
    literal_chars: usize,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("an empty repository pattern matches nothing".into());
        }
        if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
            return Err(format!("{s:?} has an empty segment"));
        }
        let mut segments = Vec::new();
        for (i, seg) in s.split('/').enumerate() {
            // Repository names are lower case; a host (an access rule's first segment)
            // is compared without case.
            if i > 0 && seg.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "{s:?}: repository names are lower case, so {seg:?} would never match"
                ));
            }
            if seg == "**" {
                segments.push(Segment::Any);
                continue;
            }
            if seg.contains("**") {
                return Err(format!("{s:?}: `**` must be a whole segment"));
            }
            let ok = seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:*".contains(&b));
            if !ok {
                return Err(format!(
                    "{s:?}: segment {seg:?} may hold letters, digits, '.', '_', '-', ':' and '*'"
                ));
            }
            segments.push(if seg.contains('*') {
                Segment::Glob(seg.to_owned())
            } else {
                Segment::Literal(seg.to_owned())
            });
        }
        Ok(Pattern {
            text: s.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first segment when it is literal (an access rule's upstream host).
    pub fn first_literal(&self) -> Option<&str> {
        match self.segments.first() {
            Some(Segment::Literal(g)) => Some(g),
            _ => None,
        }
    }

    /// The same pattern with its first segment replaced (an alias by its host).
    pub fn with_first(&self, first: &str) -> Result<Pattern, String> {
        let rest = self.text.split_once('/').map_or("", |(_, r)| r);
        if rest.is_empty() {
            Pattern::parse(first)
        } else {
            Pattern::parse(&format!("{first}/{rest}"))
        }
    }

    /// Whether `name` (segments separated by `/`) matches.
    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('/').collect();
        self.matches_segments(&parts)
    }

    /// [`Self::matches`] for a name already split at `/` (split once, match many).
    pub fn matches_segments(&self, parts: &[&str]) -> bool {
        match_from(&self.segments, parts)
    }

    pub fn specificity(&self) -> Specificity {
        let mut s = Specificity {
            literal_segments: 0,
            bounded_segments: 0,
            literal_chars: 0,
        };
        for seg in &self.segments {
            match seg {
                Segment::Any => {}
                Segment::Glob(g) => {
                    s.bounded_segments += 1;
                    s.literal_chars += g.bytes().filter(|b| *b != b'*').count();
                }
                Segment::Literal(l) => {
                    s.bounded_segments += 1;
                    s.literal_segments += 1;
                    s.literal_chars += l.len();
                }
            }
        }
        s
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The most specific of `patterns` that matches `name`, by index; the first written wins
/// a tie.
pub fn most_specific<'a>(
    patterns: impl IntoIterator<Item = &'a Pattern>,
    name: &str,
) -> Option<usize> {
    let mut best: Option<(usize, Specificity)> = None;
    for (i, p) in patterns.into_iter().enumerate() {
        if !p.matches(name) {
            continue;
        }
        let s = p.specificity();
        let better = match &best {
            None => true,
            Some((_, b)) => s.cmp(b) == Ordering::Greater,
        };
        if better {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

fn match_from(pattern: &[Segment], parts: &[&str]) -> bool {
    match pattern.split_first() {
        None => parts.is_empty(),
        Some((Segment::Any, rest)) => {
            // One or more segments, then the rest of the pattern.
            (1..=parts.len()).any(|n| match_from(rest, &parts[n..]))
        }
        Some((Segment::Glob(g), rest)) => match parts.split_first() {
            Some((first, tail)) => glob(g.as_bytes(), first.as_bytes()) && match_from(rest, tail),
            None => false,
        },
        Some((Segment::Literal(l), rest)) => match parts.split_first() {
            Some((first, tail)) => l == first && match_from(rest, tail),
            None => false,
        },
    }
}

/// `*` matches any run of bytes (within one segment).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|n| glob(rest, &text[n..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn star_is_one_segment_and_double_star_any_depth() {
        let one = p("docker.io/library/*");
        assert!(one.matches("docker.io/library/nginx"));
        assert!(!one.matches("docker.io/library/nginx/extra"));
        assert!(!one.matches("docker.io/library"));
        assert!(!one.matches("docker.io/teamb/app"));
        let deep = p("ghcr.io/myorg/**");
        assert!(deep.matches("ghcr.io/myorg/app"));
        assert!(deep.matches("ghcr.io/myorg/team/app/sub"));
        assert!(!deep.matches("ghcr.io/myorg"));
        assert!(!deep.matches("ghcr.io/other/app"));
        let middle = p("quay.io/**/tools");
        assert!(middle.matches("quay.io/a/b/tools"));
        assert!(!middle.matches("quay.io/tools"));
        let part = p("myorg/team-*");
        assert!(part.matches("myorg/team-a") && part.matches("myorg/team-"));
        assert!(!part.matches("myorg/teamb"));
        assert!(p("**").matches("anything/at/all"));
        assert!(p("docker.io/library/nginx").matches("docker.io/library/nginx"));
        assert!(!p("docker.io/library/nginx").matches("docker.io/library/nginx2"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "", "/a", "a/", "a//b", "a/***", "a/b**", "a/B c", "a/$", "a/Upper",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_most_specific_match_wins_whatever_the_order() {
        let all = [
            p("**"),
            p("myorg/**"),
            p("myorg/*"),
            p("myorg/team-*"),
            p("myorg/app"),
        ];
        let name_of = |name: &str, order: &[usize]| {
            let ps: Vec<&Pattern> = order.iter().map(|i| &all[*i]).collect();
            most_specific(ps.iter().copied(), name).map(|i| ps[i].as_str().to_owned())
        };
        for order in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 4, 0, 3, 1]] {
            assert_eq!(name_of("myorg/app", &order).as_deref(), Some("myorg/app"));
            assert_eq!(
                name_of("myorg/team-x", &order).as_deref(),
                Some("myorg/team-*")
            );
            assert_eq!(name_of("myorg/other", &order).as_deref(), Some("myorg/*"));
            assert_eq!(name_of("myorg/a/b", &order).as_deref(), Some("myorg/**"));
            assert_eq!(name_of("library/nginx", &order).as_deref(), Some("**"));
        }
        assert_eq!(most_specific([&p("a/*")], "b/c"), None);
        // A tie: the first written.
        assert_eq!(most_specific([&p("a/*"), &p("*/b")], "a/b"), Some(0));
    }

    #[test]
    fn the_first_segment_can_be_replaced() {
        let q = p("index.docker.io/library/*")
            .with_first("docker.io")
            .unwrap();
        assert_eq!(q.as_str(), "docker.io/library/*");
        assert_eq!(q.first_literal(), Some("docker.io"));
        assert_eq!(p("*/x").first_literal(), None);
    }
}
