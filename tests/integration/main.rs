//! berth's integration tests: one binary, every module against real peers (DESIGN.md §5).
//!
//! Run with `cargo test --test integration`; a missing peer fails the test with a hint to
//! run `scripts/install-test-peers.sh`.

#[path = "../support/mod.rs"]
mod support;

mod api;
mod auth;
mod bad_input;
mod common;
mod credentials;
mod eviction;
mod fleet;
mod hardening;
mod harness_smoke;
mod herd;
mod negative;
mod ops;
mod pull;
mod quota;
mod ship;
mod signatures;
mod status_page;
mod storage;
mod tenancy;
