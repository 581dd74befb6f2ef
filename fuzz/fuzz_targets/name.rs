//! The name grammar (`src/oci/name.rs`): repositories, tags, references, image references.
//!
//! Input: the string to parse, given to every parser.
//! Invariants: what parses prints back to its input and parses again to an equal value; a
//! repository is within the spec's grammar and length, also after Docker Hub's `library/`
//! prefix; an image reference printed back parses to the same image reference.

#![no_main]

use berth::oci::{ImageRef, Reference, Repository, Tag};
use libfuzzer_sys::fuzz_target;

/// The distribution spec's limit on a repository name.
const MAX_NAME_LEN: usize = 255;

fn check_repository(r: &Repository) {
    let s = r.as_str();
    assert!(
        !s.is_empty() && s.len() <= MAX_NAME_LEN,
        "{} bytes",
        s.len()
    );
    for c in s.split('/') {
        // Safe in a URL path and an index key: no empty, dot-only or odd component.
        assert!(!c.is_empty() && c != "." && c != "..", "component {c:?}");
        assert!(c
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
        let (first, last) = (c.as_bytes()[0], c.as_bytes()[c.len() - 1]);
        assert!(first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    }
    assert_eq!(Repository::parse(s).as_ref(), Ok(r));
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(r) = Repository::parse(s) {
        assert_eq!(r.as_str(), s);
        assert_eq!(r.to_string(), s);
        check_repository(&r);
        match r.clone().with_library_prefix() {
            Ok(prefixed) => {
                check_repository(&prefixed);
                if s.contains('/') {
                    assert_eq!(prefixed, r);
                } else {
                    assert_eq!(prefixed.as_str(), format!("library/{s}"));
                }
            }
            // Refused only when `library/` would take a single name past the limit.
            Err(_) => assert!(!s.contains('/') && s.len() > MAX_NAME_LEN - "library/".len()),
        }
    }

    if let Ok(t) = Tag::parse(s) {
        assert_eq!(t.as_str(), s);
        assert!(!s.is_empty() && s.len() <= 128);
        assert!(!s.contains(':') && !s.contains('/'));
        assert_eq!(Tag::parse(&t.to_string()).as_ref(), Ok(&t));
    }

    match Reference::parse(s) {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            assert_eq!(Reference::parse(&r.to_string()).as_ref(), Ok(&r));
            match &r {
                Reference::Tag(t) => assert_eq!(Tag::parse(s).as_ref(), Ok(t)),
                Reference::Digest(d) => assert_eq!(d.to_string(), s),
            }
        }
        Err(_) => assert!(Tag::parse(s).is_err()),
    }

    if let Ok(image) = ImageRef::parse(s) {
        assert!(!image.name.is_empty());
        let printed = match &image.reference {
            Reference::Tag(t) => format!("{}:{t}", image.name),
            Reference::Digest(d) => format!("{}@{d}", image.name),
        };
        assert_eq!(
            ImageRef::parse(&printed).as_ref(),
            Ok(&image),
            "{printed:?} does not read back"
        );
    }
});
