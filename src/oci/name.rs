//! Repository names, tags and references, parsed against the distribution-spec grammar.
//!
//! `Repository` and `Tag` have private fields and one constructor each, so anything of
//! these types is known to be safe to place in an upstream URL or an index key.

use std::fmt;

use super::digest::{Digest, InvalidDigest};

/// The longest repository name the distribution spec allows.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name: `component(/component)*`, each component
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, at most 255 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

/// A tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

/// Why a string is not a valid name, tag or reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidName {
    Repository(String),
    Tag(String),
    Digest(InvalidDigest),
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidName::Repository(m) | InvalidName::Tag(m) => f.write_str(m),
            InvalidName::Digest(d) => d.fmt(f),
        }
    }
}

impl std::error::Error for InvalidName {}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// One path component: alnum runs joined by a single `.`, a single `_`, `__`, or any run of `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let mut i = 0;
    let mut need_alnum = true;
    while i < b.len() {
        if is_alnum(b[i]) {
            need_alnum = false;
            i += 1;
            continue;
        }
        if need_alnum {
            return false;
        }
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > start);
        need_alnum = true;
    }
    !need_alnum
}

impl Repository {
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        if s.is_empty() {
            return Err(InvalidName::Repository("repository name is empty".into()));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(InvalidName::Repository(format!(
                "repository name is {} characters long; the limit is {MAX_NAME_LEN}",
                s.len()
            )));
        }
        if let Some(bad) = s.split('/').find(|c| !valid_component(c)) {
            return Err(InvalidName::Repository(format!(
                "repository name {s:?} is invalid: component {bad:?} must be lower-case \
                 letters and digits, separated by '.', '_', '__' or '-'"
            )));
        }
        Ok(Repository(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker Hub keeps official images under `library/`: `alpine` → `library/alpine`.
    /// Refused when the prefix takes the name past the length limit (found by fuzzing:
    /// a single name of 248 to 255 bytes).
    pub fn with_library_prefix(self) -> Result<Self, InvalidName> {
        if self.0.contains('/') {
            Ok(self)
        } else {
            Repository::parse(&format!("library/{}", self.0))
        }
    }
}

impl Tag {
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(InvalidName::Tag(format!(
                "tag {} is invalid: it must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}",
                super::Quoted(s, 140)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Reference {
    /// A reference is a digest when it contains `:` (tags cannot), otherwise a tag.
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        if s.contains(':') {
            Digest::parse(s)
                .map(Reference::Digest)
                .map_err(InvalidName::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

/// An image reference as people write it: `[host/]name[:tag|@digest]`, e.g.
/// `docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:...`, `alpine` (tag `latest`).
/// The name part is left for the routing table, which knows which hosts are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub reference: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, InvalidName> {
        let s = s.trim();
        let (name, reference) = match s.split_once('@') {
            Some((name, digest)) => (
                name,
                Reference::Digest(Digest::parse(digest).map_err(InvalidName::Digest)?),
            ),
            None => {
                // A ':' after the last '/' starts a tag; one before it is a host's port.
                let last_slash = s.rfind('/').map_or(0, |i| i + 1);
                match s[last_slash..].rfind(':') {
                    Some(i) => (
                        &s[..last_slash + i],
                        Reference::Tag(Tag::parse(&s[last_slash + i + 1..])?),
                    ),
                    None => (s, Reference::Tag(Tag::parse("latest")?)),
                }
            }
        };
        if name.is_empty() {
            return Err(InvalidName::Repository(
                "image reference has no name".into(),
            ));
        }
        Ok(ImageRef {
            name: name.to_owned(),
            reference,
        })
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Repository({})", self.0)
    }
}
impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/my_app",
            "x__y",
            "a.b",
            "a---b",
            "0",
        ] {
            assert!(Repository::parse(ok).is_ok(), "{ok} rejected");
        }
    }

    #[test]
    fn invalid_names() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "Alpine",
            "..",
            "a/../b",
            "a//b",
            "/a",
            "a/",
            "a___b",
            "-a",
            "a-",
            "a..b",
            "a b",
            "a%2fb",
            long.as_str(),
        ] {
            assert!(Repository::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tags_and_references() {
        assert!(Tag::parse("v1.2.3-rc_1").is_ok());
        assert!(Tag::parse("_x").is_ok());
        assert!(Tag::parse(".x").is_err());
        assert!(Tag::parse(&"a".repeat(129)).is_err());
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse("sha256:bad"),
            Err(InvalidName::Digest(_))
        ));
    }

    #[test]
    fn image_references() {
        let r = ImageRef::parse("docker.io/library/nginx:1.27").unwrap();
        assert_eq!(r.name, "docker.io/library/nginx");
        assert_eq!(r.reference.to_string(), "1.27");
        let r = ImageRef::parse("localhost:5000/app").unwrap();
        assert_eq!(
            (r.name.as_str(), r.reference.to_string().as_str()),
            ("localhost:5000/app", "latest")
        );
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r = ImageRef::parse(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert_eq!(r.reference, Reference::Digest(Digest::parse(d).unwrap()));
        assert!(ImageRef::parse("app:bad tag").is_err());
        assert!(ImageRef::parse(":x").is_err());
    }

    #[test]
    fn library_prefix_only_for_single_names() {
        let r = Repository::parse("alpine")
            .unwrap()
            .with_library_prefix()
            .unwrap();
        assert_eq!(r.as_str(), "library/alpine");
        let r = Repository::parse("org/app")
            .unwrap()
            .with_library_prefix()
            .unwrap();
        assert_eq!(r.as_str(), "org/app");
    }

    /// Found by fuzzing (fuzz/seeds/name/long-single-name): `library/` took a single name
    /// of 248 to 255 bytes past the 255-byte limit.
    #[test]
    fn the_library_prefix_never_makes_a_name_too_long() {
        let long = "a".repeat(250);
        let r = Repository::parse(&long).unwrap();
        assert!(r.with_library_prefix().is_err());
        let fits = "a".repeat(247);
        let r = Repository::parse(&fits)
            .unwrap()
            .with_library_prefix()
            .unwrap();
        assert_eq!(r.as_str().len(), 255);
    }
}
