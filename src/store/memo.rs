//! What a cache hit needs, kept in memory: manifests by digest, tag records by key and
//! repository links. A hit then touches neither redb nor the disk nor the blocking pool
//! (each hop there costs more than the rest of the request).
//!
//! The index stays the truth: entries are filled from it on a miss and updated by the
//! writes that go through [`super::Store`]; anything removed from the index is dropped
//! here first. Every map is bounded; a full map drops arbitrary entries (they are read
//! back from the index on the next miss).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;

use super::{StoredManifest, TagRecord};
use crate::oci::Digest;

/// Manifests kept in memory, in bytes (manifests are small; an index of a busy cluster
/// is a few thousand of them).
const MANIFEST_BYTES: usize = 64 << 20;
/// Tag records and links kept in memory.
const ENTRIES: usize = 200_000;

#[derive(Default)]
pub struct Memo {
    manifests: Mutex<Sized<Digest, StoredManifest>>,
    tags: Mutex<Sized<String, TagRecord>>,
    /// Bumped by every tag write and removal: a record read from the index before one
    /// of those is not put in memory after it.
    tag_generation: std::sync::atomic::AtomicU64,
    links: Mutex<HashSet<(String, String, Digest)>>,
}

/// A map with a budget: each entry costs its `cost`.
struct Sized<K, V> {
    map: HashMap<K, (V, usize)>,
    used: usize,
}

impl<K, V> Default for Sized<K, V> {
    fn default() -> Self {
        Sized {
            map: HashMap::new(),
            used: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Sized<K, V> {
    fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).map(|(v, _)| v.clone())
    }

    fn put(&mut self, k: K, v: V, cost: usize, budget: usize) {
        if cost > budget {
            return;
        }
        self.remove(&k);
        while self.used + cost > budget {
            let Some(victim) = self.map.keys().next().cloned() else {
                break;
            };
            self.remove(&victim);
        }
        self.used += cost;
        self.map.insert(k, (v, cost));
    }

    fn remove(&mut self, k: &K) {
        if let Some((_, cost)) = self.map.remove(k) {
            self.used -= cost;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Memo {
    pub fn manifest(&self, digest: &Digest) -> Option<StoredManifest> {
        lock(&self.manifests).get(digest)
    }

    pub fn put_manifest(&self, digest: &Digest, m: &StoredManifest) {
        let cost = m.bytes.len() + m.media_type.len() + 64;
        lock(&self.manifests).put(digest.clone(), m.clone(), cost, MANIFEST_BYTES);
    }

    /// A blob or manifest left the store.
    pub fn forget_object(&self, digest: &Digest) {
        lock(&self.manifests).remove(digest);
    }

    pub fn tag(&self, key: &str) -> Option<TagRecord> {
        lock(&self.tags).get(&key.to_owned())
    }

    /// Take before reading a record from the index; pass to [`Memo::fill_tag`].
    pub fn tag_generation(&self) -> u64 {
        self.tag_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps a record read from the index, unless a write or removal came since `seen`.
    pub fn fill_tag(&self, key: &str, record: &TagRecord, seen: u64) {
        let mut tags = lock(&self.tags);
        if self.tag_generation() == seen {
            tags.put(key.to_owned(), record.clone(), 1, ENTRIES);
        }
    }

    /// A record just written to the index (call after the write).
    pub fn put_tag(&self, key: &str, record: &TagRecord) {
        let mut tags = lock(&self.tags);
        self.tag_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tags.put(key.to_owned(), record.clone(), 1, ENTRIES);
    }

    pub fn forget_tags(&self, prefix: &str) {
        let mut tags = lock(&self.tags);
        self.tag_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tags.map.retain(|k, _| !k.starts_with(prefix));
        tags.used = tags.map.len();
    }

    pub fn is_linked(&self, upstream: &str, repository: &str, digest: &Digest) -> bool {
        lock(&self.links).contains(&(upstream.to_owned(), repository.to_owned(), digest.clone()))
    }

    pub fn linked(&self, upstream: &str, repository: &str, digests: &[Digest]) {
        let mut links = lock(&self.links);
        if links.len() + digests.len() > ENTRIES {
            links.clear();
        }
        for d in digests {
            links.insert((upstream.to_owned(), repository.to_owned(), d.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> TagRecord {
        TagRecord {
            digest: Digest::sha256_of(&n.to_le_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            fetched_at: n,
            validated_at: n,
            validated_ms: None,
        }
    }

    #[test]
    fn a_record_read_before_a_write_or_removal_is_not_kept_after_it() {
        let memo = Memo::default();
        // A read of the old record races a write of the new one.
        let seen = memo.tag_generation();
        memo.put_tag("k", &record(2));
        memo.fill_tag("k", &record(1), seen);
        assert_eq!(memo.tag("k"), Some(record(2)));
        // A read races a removal (an admin tag delete).
        let seen = memo.tag_generation();
        memo.forget_tags("k");
        memo.fill_tag("k", &record(2), seen);
        assert_eq!(memo.tag("k"), None);
        // Undisturbed, a read is kept.
        let seen = memo.tag_generation();
        memo.fill_tag("k", &record(3), seen);
        assert_eq!(memo.tag("k"), Some(record(3)));
    }

    #[test]
    fn a_full_map_makes_room_and_keeps_its_budget() {
        let mut m = Sized::default();
        for i in 0..100u32 {
            m.put(i, i, 10, 250);
            assert!(m.used <= 250);
        }
        assert_eq!(m.map.len(), 25);
        assert_eq!(m.get(&99), Some(99));
        m.put(1000, 0, 300, 250);
        assert_eq!(
            m.get(&1000),
            None,
            "an entry over the whole budget is not kept"
        );
    }
}
