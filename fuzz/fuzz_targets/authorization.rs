//! `Authorization` parsing (`src/access/identity.rs`): what a pull client sends berth to
//! say who it is.
//!
//! Input: the header value, any bytes.
//! Invariants: no panic; a Basic user never holds a `:` (the first one ends it), and
//! writing a parsed Basic or Bearer back in canonical form reads back the same.

#![no_main]

use berth::access::{parse_authorization, Sent};
use libfuzzer_sys::fuzz_target;

/// Standard base64, with padding (what clients send).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(sent) = parse_authorization(data) else {
        return;
    };
    let printed = match &sent {
        Sent::Nothing => format!("Basic {}", base64(b":")),
        Sent::Bearer(token) => {
            assert!(!token.is_empty() && token.trim() == token);
            format!("Bearer {token}")
        }
        Sent::Basic { user, password } => {
            assert!(!user.contains(':'));
            assert!(!user.is_empty() || !password.is_empty());
            format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
        }
    };
    assert_eq!(
        parse_authorization(printed.as_bytes()).as_ref(),
        Some(&sent),
        "{printed:?} does not read back"
    );
});
