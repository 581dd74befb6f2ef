//! What the `cargo fuzz` targets in `fuzz/` reach that berth keeps private: the parsers of
//! untrusted input in `server::range` and `upstream::{auth, wire}`. Not API: hidden from
//! the docs, and nothing in berth uses it. The public parsers (`oci::Route`,
//! `oci::Digest`, `Config::parse`, `Quota::observe`, ...) are fuzzed through their own
//! paths.

pub mod auth {
    pub use crate::upstream::auth::{parse_challenge, Challenge};
}

pub mod range {
    pub use crate::server::range::{evaluate, RangeAnswer};
}

pub mod wire {
    pub use crate::upstream::wire::{header_digest, parse_content_range, retry_after};
}
