//! Keeping the store within its size: last-access times batched from hits, and LRU
//! eviction between a high and a low watermark. Manifests (tiny, and all a cached tag
//! needs) and pinned blobs (the warm list) are never evicted; a blob being filled is not
//! in the index until it is complete, so it cannot be either. An evicted blob is simply
//! fetched again when asked for.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use super::{blocking, Store};
use crate::oci::Digest;

/// Eviction starts above this share of `max_size`...
const HIGH_WATERMARK: f64 = 0.95;
/// ...and stops below this one, so it runs in batches rather than per fill.
const LOW_WATERMARK: f64 = 0.85;

/// The size rules for a store.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    /// Free space to keep on the store's filesystem.
    pub min_free: Option<u64>,
}

impl Limits {
    pub const NONE: Limits = Limits {
        max_bytes: u64::MAX,
        min_free: None,
    };
}

/// Hits, recorded in memory and written to the index in one transaction now and then.
#[derive(Default)]
pub struct Touches {
    pending: Mutex<HashMap<Digest, u64>>,
}

impl Touches {
    pub fn record(&self, digest: &Digest, at: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.insert(digest.clone(), at);
    }

    fn take(&self) -> Vec<(Digest, u64)> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.drain().collect()
    }
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
}

/// Free bytes on the filesystem holding `path`.
fn free_space(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

impl Store {
    /// Writes batched access times to the index.
    pub async fn flush_touches(&self) -> io::Result<()> {
        let touches = self.inner.touches.take();
        if touches.is_empty() {
            return Ok(());
        }
        let s = self.clone();
        blocking(move || s.inner.index.touch_many(&touches)).await
    }

    /// Whether the store is over its high watermark or short of free space.
    pub fn over_limits(&self) -> bool {
        if self.inner.disk_full.load(Ordering::Relaxed) {
            return true;
        }
        let limits = self.inner.limits;
        let high = (limits.max_bytes as f64 * HIGH_WATERMARK) as u64;
        self.used_bytes() > high
            || limits
                .min_free
                .is_some_and(|min| free_space(&self.inner.root).is_ok_and(|f| f < min))
    }

    /// Evicts least recently used blobs until the store is under its low watermark and
    /// has `min_free` space (when it was over its limits), or down to `target` bytes.
    pub async fn evict(&self, target: Option<u64>) -> io::Result<Evicted> {
        // Access times sharpen the order; failing to write them (a full disk) must not
        // stop the eviction that would make room.
        if let Err(e) = self.flush_touches().await {
            tracing::warn!(error = %e, "could not record access times before evicting");
        }
        let s = self.clone();
        blocking(move || s.evict_blocking(target)).await
    }

    fn evict_blocking(&self, target: Option<u64>) -> io::Result<Evicted> {
        let limits = self.inner.limits;
        let mut goal = target.unwrap_or((limits.max_bytes as f64 * LOW_WATERMARK) as u64);
        // A full disk (smaller than max_size, or shared): free a tenth of what is stored.
        if self.inner.disk_full.swap(false, Ordering::Relaxed) {
            goal = goal.min((self.used_bytes() as f64 * 0.9) as u64);
        }
        let short_of_space = || {
            limits
                .min_free
                .is_some_and(|min| free_space(&self.inner.root).is_ok_and(|f| f < min))
        };
        let mut done = Evicted::default();
        if self.used_bytes() <= goal && !short_of_space() {
            return Ok(done);
        }
        for (key, size, _) in self.inner.index.eviction_candidates()? {
            if self.used_bytes() <= goal && !short_of_space() {
                break;
            }
            let Ok(digest) = Digest::parse(&key) else {
                continue;
            };
            match std::fs::remove_file(self.blob_path(&digest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.inner.memo.forget_object(&digest);
            self.inner.index.remove_blob(&key)?;
            self.account_removed(size);
            done.blobs += 1;
            done.bytes += size;
        }
        if done.blobs > 0 {
            tracing::info!(
                blobs = done.blobs,
                bytes = done.bytes,
                used = self.used_bytes(),
                "evicted least recently used blobs"
            );
        }
        Ok(done)
    }

    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    pub(super) fn account_removed(&self, size: u64) {
        let _ = self
            .inner
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(size))
            });
        let _ = self
            .inner
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(1))
            });
    }
}

/// What `berth verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    /// Files whose bytes do not hash to their name; removed.
    pub removed: Vec<String>,
}

impl Store {
    /// Re-hashes every stored blob; removes (file and index entry) any that fail.
    /// Blocking and slow by nature: for `berth verify`, with berth stopped.
    pub fn verify(&self) -> io::Result<VerifyReport> {
        let mut report = VerifyReport::default();
        self.for_each_blob_file(|name, path| {
            let ok = match Digest::parse(name) {
                Ok(digest) => {
                    let mut hasher = digest.hasher();
                    let mut f = std::fs::File::open(path)?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = std::io::Read::read(&mut f, &mut buf)?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        report.bytes += n as u64;
                    }
                    hasher.finish() == digest
                }
                Err(_) => false,
            };
            report.checked += 1;
            if !ok {
                let size = path.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(path)?;
                if let Ok(digest) = Digest::parse(name) {
                    self.inner.memo.forget_object(&digest);
                }
                if self.inner.index.has_blob(name)? {
                    self.inner.index.remove_blob(name)?;
                    self.account_removed(size);
                }
                report.removed.push(name.to_owned());
            }
            Ok(())
        })?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::now_secs;
    use bytes::Bytes;

    async fn put(store: &Store, bytes: &'static [u8]) -> Digest {
        let d = Digest::sha256_of(bytes);
        let mut w = store.begin_blob(&d).await.unwrap();
        w.write_blocking(bytes).unwrap();
        w.verify().unwrap().persist(store, None).await.unwrap();
        d
    }

    #[tokio::test]
    async fn evicts_least_recently_used_but_never_pins_or_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(
            dir.path(),
            Limits {
                max_bytes: 100,
                min_free: None,
            },
        )
        .unwrap();
        let old = put(&store, &[1u8; 30]).await;
        let pinned = put(&store, &[2u8; 30]).await;
        let recent = put(&store, &[3u8; 30]).await;
        let manifest = Digest::sha256_of(b"{\"schemaVersion\":2}");
        store
            .put_manifest(
                &manifest,
                "application/x",
                Bytes::from_static(b"{\"schemaVersion\":2}"),
            )
            .await
            .unwrap();
        store.pin(vec![pinned.clone()]).await.unwrap();
        assert_eq!(store.used_bytes(), 90 + 19);
        assert!(store.over_limits());
        // Touch order: old was read long ago, recent just now.
        store.inner.touches.record(&old, 1);
        store.inner.touches.record(&recent, now_secs());
        let done = store.evict(None).await.unwrap();
        assert_eq!((done.blobs, done.bytes), (1, 30));
        assert!(store.open_blob(&old).await.unwrap().is_none());
        assert!(store.open_blob(&pinned).await.unwrap().is_some());
        assert!(store.open_blob(&recent).await.unwrap().is_some());
        assert!(store.manifest(&manifest).await.unwrap().is_some());
        assert_eq!(store.totals().unwrap(), (3, 60 + 19));
        // Down to a target: pins and manifests still stay.
        store.evict(Some(0)).await.unwrap();
        assert!(store.open_blob(&pinned).await.unwrap().is_some());
        assert!(store.open_blob(&recent).await.unwrap().is_none());
        // verify: a corrupted file is found and removed.
        let path = store.blob_path(&pinned);
        std::fs::write(&path, b"tampered").unwrap();
        let report = store.verify().unwrap();
        assert_eq!(report.removed, vec![pinned.to_string()]);
        assert!(store.open_blob(&pinned).await.unwrap().is_none());
    }
}
