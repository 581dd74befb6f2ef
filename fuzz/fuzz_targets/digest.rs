//! `Digest::parse`: what may become a file name in the store and a path in an upstream URL.
//!
//! Input: the string to parse.
//! Invariants: only the canonical form parses (it prints back to the input exactly); the
//! hex part is safe as a file name; serde goes through the same parser and agrees with it.

#![no_main]

use berth::oci::{Algorithm, Digest, Hasher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Digest::parse(s);
    // serde must agree with the parser on every input, valid or not.
    let json = serde_json::to_string(s).expect("a str serialises");
    let via_serde = serde_json::from_str::<Digest>(&json);
    assert_eq!(via_serde.as_ref().ok(), parsed.as_ref().ok());
    assert_eq!(s.parse::<Digest>(), parsed);

    let Ok(d) = parsed else {
        return;
    };
    assert_eq!(
        d.to_string(),
        s,
        "a digest that does not print as it was written"
    );
    assert_eq!(Digest::parse(&d.to_string()).as_ref(), Ok(&d));
    let hex_len = match d.algorithm() {
        Algorithm::Sha256 => 64,
        Algorithm::Sha512 => 128,
    };
    assert_eq!(d.hex().len(), hex_len);
    assert!(d
        .hex()
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(serde_json::to_string(&d).expect("serialises"), json);

    // What the hasher of the same algorithm prints is a digest too.
    let mut h: Hasher = d.hasher();
    h.update(data);
    let made = h.finish();
    assert_eq!(made.algorithm(), d.algorithm());
    assert_eq!(Digest::parse(&made.to_string()).as_ref(), Ok(&made));
});
