//! The negative cache: tags an upstream said it does not have, remembered for that
//! upstream's `negative_ttl`, so that a typo in a Deployment, retried by the kubelet of
//! every node, costs one upstream request per TTL instead of one per retry.
//!
//! Only an upstream 404 for a tag is remembered (the manifest policy decides that; this
//! map only keeps time). A 401/403, a 429, a timeout or a 5xx says nothing about whether
//! the tag exists and is never remembered; digests are not either.
//!
//! Keys are the tag's index key: upstream host, repository, tag and the client's Accept
//! set. The Accept set belongs in it because a registry answers 404 `MANIFEST_UNKNOWN` to a
//! client whose Accept excludes the tag's media type (distribution: "OCI index found, but
//! accept header does not support OCI indexes"), which says nothing to a client that
//! accepts it. Clients choose the names, so the map is bounded: at capacity, expired
//! entries go first, then the one closest to expiring.
//!
//! Time is tokio's clock, so tests pause and advance it instead of sleeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most this many remembered tags (a few MiB at most, keys being bounded by the
/// name grammar).
pub(super) const CAPACITY: usize = 10_000;

pub(super) struct NegativeCache {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    said_at: Instant,
    until: Instant,
}

/// A "no such tag" still remembered: how long ago upstream said it, and how long until
/// berth asks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Remembered {
    pub age: Duration,
    pub left: Duration,
}

impl NegativeCache {
    pub fn new(capacity: usize) -> Self {
        NegativeCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic elsewhere while holding the lock leaves the map consistent (every
        // change is one insert or remove): keep using it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that upstream has no such tag, for `ttl` from now (zero: not at all).
    pub fn remember(&self, key: &str, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        // A TTL beyond the clock's range (a typo in the config) remembers nothing rather
        // than panicking.
        let Some(until) = now.checked_add(ttl) else {
            return;
        };
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(key) {
            // Scans only when full, and every insert follows an upstream round trip, so a
            // flood of made-up names is paced by the upstream, not by this loop.
            map.retain(|_, e| e.until > now);
            if map.len() >= self.capacity {
                let soonest = map
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            key.to_owned(),
            Entry {
                said_at: now,
                until,
            },
        );
    }

    /// Whether upstream's "no such tag" for `key` is still remembered.
    pub fn lookup(&self, key: &str) -> Option<Remembered> {
        let now = Instant::now();
        let mut map = self.lock();
        let entry = *map.get(key)?;
        if entry.until <= now {
            map.remove(key);
            return None;
        }
        Some(Remembered {
            age: now.saturating_duration_since(entry.said_at),
            left: entry.until.saturating_duration_since(now),
        })
    }

    /// Forgets `key` (the tag was just seen upstream).
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Forgets every key starting with `prefix` (every Accept variant of a tag); returns
    /// how many were still remembered.
    pub fn forget_prefix(&self, prefix: &str) -> usize {
        let now = Instant::now();
        let mut live = 0;
        self.lock().retain(|k, e| {
            let hit = k.starts_with(prefix);
            if hit && e.until > now {
                live += 1;
            }
            !hit
        });
        live
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_tag_is_remembered_for_its_ttl_and_no_longer() {
        let c = NegativeCache::new(CAPACITY);
        c.remember("docker.io/library/alpine:typo#3", 30 * S);
        tokio::time::advance(10 * S).await;
        assert_eq!(
            c.lookup("docker.io/library/alpine:typo#3"),
            Some(Remembered {
                age: 10 * S,
                left: 20 * S
            })
        );
        // Another Accept set, another repository, another upstream: not the same answer.
        assert_eq!(c.lookup("docker.io/library/alpine:typo#1"), None);
        assert_eq!(c.lookup("docker.io/library/alpinx:typo#3"), None);
        assert_eq!(c.lookup("ghcr.io/library/alpine:typo#3"), None);
        tokio::time::advance(20 * S).await;
        assert_eq!(c.lookup("docker.io/library/alpine:typo#3"), None);
        // An expired entry is dropped when seen.
        assert_eq!(c.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_remembers_nothing() {
        let c = NegativeCache::new(CAPACITY);
        c.remember("k", Duration::ZERO);
        assert_eq!(c.lookup("k"), None);
        assert_eq!(c.len(), 0);
        // Nor does one the clock cannot reach (instead of panicking).
        c.remember("k", Duration::MAX);
        assert_eq!(c.lookup("k"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn remembering_again_restarts_the_ttl() {
        let c = NegativeCache::new(CAPACITY);
        c.remember("k", 30 * S);
        tokio::time::advance(25 * S).await;
        c.remember("k", 30 * S);
        tokio::time::advance(25 * S).await;
        assert_eq!(c.lookup("k").map(|r| r.left), Some(5 * S));
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_is_bounded_evicting_expired_then_soonest_to_expire() {
        let c = NegativeCache::new(3);
        c.remember("short", S);
        c.remember("long-a", 60 * S);
        c.remember("long-b", 90 * S);
        tokio::time::advance(2 * S).await;
        // Full: the expired entry makes room.
        c.remember("long-c", 120 * S);
        assert_eq!(c.len(), 3);
        assert!(c.lookup("long-a").is_some());
        // Full, nothing expired: the entry closest to expiring goes.
        c.remember("long-d", 120 * S);
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup("long-a"), None);
        for k in ["long-b", "long-c", "long-d"] {
            assert!(c.lookup(k).is_some(), "{k}");
        }
        // Refreshing a key already held evicts nothing.
        c.remember("long-b", 120 * S);
        assert_eq!(c.len(), 3);
        // Many made-up names never grow it past its capacity.
        for i in 0..100 {
            c.remember(&format!("typo-{i}"), 30 * S);
        }
        assert_eq!(c.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_by_key_and_by_prefix() {
        let c = NegativeCache::new(CAPACITY);
        c.remember("docker.io/library/app:v2#1", 30 * S);
        c.remember("docker.io/library/app:v2#3", 30 * S);
        c.remember("docker.io/library/app:v20#3", 30 * S);
        c.forget("docker.io/library/app:v2#1");
        assert_eq!(c.lookup("docker.io/library/app:v2#1"), None);
        // A prefix ends with '#': v2's variants, not v20's.
        assert_eq!(c.forget_prefix("docker.io/library/app:v2#"), 1);
        assert_eq!(c.lookup("docker.io/library/app:v2#3"), None);
        assert!(c.lookup("docker.io/library/app:v20#3").is_some());
    }
}
