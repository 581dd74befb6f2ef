//! `Config::parse`: TOML text into a validated `Config` (`src/config.rs`). Text only: the
//! files a configuration names are read later, by `build`, never here.
//!
//! Input: the TOML document.
//! Invariants: an accepted configuration passes validation again, and holds what
//! validation promises to the rest of berth (upstreams, unique hosts, a default that is
//! one of them, usable quotas); a refused one says which document it came from.

#![no_main]

use std::collections::HashSet;

use berth::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, "fuzz.toml") {
        Ok(config) => config,
        Err(e) => {
            assert!(e.0.starts_with("fuzz.toml: "), "{e}");
            return;
        }
    };
    assert_eq!(config.validate(), Ok(()));
    assert!(config.server.max_connections > 0);
    assert!(config.storage.max_size.as_u64() > 0);
    assert!(!config.upstreams.is_empty());
    let mut hosts = HashSet::new();
    for u in &config.upstreams {
        for name in std::iter::once(&u.host).chain(&u.aliases) {
            assert!(!name.is_empty());
            assert!(hosts.insert(name.to_ascii_lowercase()), "{name} twice");
        }
        assert!(!u.tag_ttl.is_zero());
        if let Some(q) = &u.quota {
            assert!(q.requests > 0 && !q.per.is_zero());
            assert!((0.0..1.0).contains(&q.reserve), "reserve {}", q.reserve);
        }
    }
    assert!(hosts.contains(&config.routing.default_upstream.to_ascii_lowercase()));
});
