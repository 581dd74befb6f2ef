//! `WWW-Authenticate` parsing (`src/upstream/auth.rs`): what an upstream says about where
//! to fetch a token.
//!
//! Input: the header value.
//! Invariants: a Bearer challenge has a realm; printing a parsed challenge back in the
//! canonical form and parsing it again gives the same challenge.

#![no_main]

use berth::fuzzing::auth::{parse_challenge, Challenge};
use libfuzzer_sys::fuzz_target;

fn print(c: &Challenge) -> String {
    match c {
        Challenge::Basic => "Basic realm=\"berth\"".to_owned(),
        Challenge::Bearer {
            realm,
            service,
            scope,
        } => {
            let mut s = format!("Bearer realm=\"{realm}\"");
            if let Some(service) = service {
                s.push_str(&format!(",service=\"{service}\""));
            }
            if let Some(scope) = scope {
                s.push_str(&format!(", scope=\"{scope}\""));
            }
            s
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let Some(challenge) = parse_challenge(header) else {
        return;
    };
    let scheme = header.trim().split(' ').next().unwrap_or("");
    match &challenge {
        Challenge::Basic => assert!(scheme.eq_ignore_ascii_case("basic")),
        Challenge::Bearer {
            realm,
            service,
            scope,
        } => {
            assert!(scheme.eq_ignore_ascii_case("bearer"));
            // A quoted value ends at the first quote, so only an unquoted one can hold a
            // quote; those cannot be printed back quoted.
            let values = std::iter::once(realm).chain(service).chain(scope);
            if values.into_iter().any(|v| v.contains('"')) {
                return;
            }
        }
    }
    let printed = print(&challenge);
    assert_eq!(
        parse_challenge(&printed).as_ref(),
        Some(&challenge),
        "{printed:?} does not read back"
    );
});
