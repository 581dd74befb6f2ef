//! The content-addressed store: blob and manifest files by digest under
//! `<root>/blobs/<algorithm>/<aa>/<hex>`, temp files in `<root>/tmp/`, and the redb index
//! in `<root>/index.redb`.
//!
//! The store knows nothing of HTTP or upstreams' protocols. It guarantees one thing above
//! all: a file under a digest's path holds exactly the bytes that hash to that digest.
//! Bytes are written to a temp file while being hashed, verified, fsynced, then renamed
//! into place; a temp file that is not committed is removed when dropped.

mod documents;
mod evict;
pub mod index;
mod memo;
mod metrics;
pub mod shared;
mod temp;
mod writer;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

pub use documents::Document;
pub use evict::{Evicted, Limits, VerifyReport};
pub use index::Index;
use index::OpenError;
pub use index::TagRecord;
pub use metrics::StoreMetrics;
pub use temp::TempFile;
pub use writer::{BlobWriter, CommitError, Reserver, VerifiedBlob};

use crate::clock::now_secs;
use crate::oci::Digest;

/// A stored manifest: the upstream's exact bytes and media type.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub bytes: Bytes,
    pub media_type: String,
}

/// An open stored blob.
#[derive(Debug, Clone)]
pub struct BlobFile {
    pub file: Arc<File>,
    pub size: u64,
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    index: Index,
    /// What hits need, in memory (filled from `index`, dropped before removals).
    memo: memo::Memo,
    /// Held for the life of the store: one berth per store root.
    _lock: File,
    limits: Limits,
    /// Bytes and blobs in the store, kept in step with the index (no scans per scrape).
    used: AtomicU64,
    count: AtomicU64,
    touches: evict::Touches,
    /// Set by a write that hit a full disk; cleared when eviction has run.
    disk_full: std::sync::atomic::AtomicBool,
}

/// Runs blocking store work (file syscalls, redb commits) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("store task failed: {e}")))?
}

impl Store {
    /// Opens (or creates) the store at `root` and runs start-up recovery: leftover temp
    /// files are removed and the index is reconciled with the files on disk.
    /// Opens a store without a size cap (tools, tests).
    pub fn open(root: &Path) -> io::Result<Store> {
        Self::open_with(root, Limits::NONE)
    }

    /// Opens (or creates) the store at `root` with size `limits`, and runs start-up
    /// recovery: leftover temp files are removed and the index is reconciled with the
    /// files on disk.
    pub fn open_with(root: &Path, limits: Limits) -> io::Result<Store> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(&tmp)?;
        // Before anything is cleaned up: another berth on this root owns its temp files
        // and its index.
        let lock = File::create(root.join("berth.lock"))?;
        if let Err(e) = lock.try_lock() {
            return Err(io::Error::other(format!(
                "{} is in use by another berth process ({e}); one store root per process",
                root.display()
            )));
        }
        let mut removed = 0;
        for entry in std::fs::read_dir(&tmp)? {
            let path = entry?.path();
            if std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed temp files left by an earlier run");
        }
        let index_path = root.join("index.redb");
        if !index_path.exists() && root.join("blobs").read_dir()?.next().is_some() {
            tracing::warn!(
                "the index is missing: rebuilding it from the blob files (tags and repository \
                 links are lost; tags are fetched again, links confirmed with upstream HEADs)"
            );
        }
        let index = match Index::open(&index_path) {
            Ok(index) => index,
            Err(OpenError::Corrupted(m)) => {
                let aside = root.join(format!("index.redb.broken-{}", now_secs()));
                tracing::error!(error = %m, aside = %aside.display(),
                    "index corrupted; moving it aside and rebuilding from the blob files");
                std::fs::rename(&index_path, &aside)?;
                Index::open(&index_path).map_err(|e| io::Error::other(e.to_string()))?
            }
            // Locked, unreadable, needs an upgrade: never a reason to throw it away.
            Err(OpenError::Other(e)) => return Err(e),
        };
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                tmp,
                index,
                memo: memo::Memo::default(),
                _lock: lock,
                limits,
                used: AtomicU64::new(0),
                count: AtomicU64::new(0),
                touches: evict::Touches::default(),
                disk_full: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        store.reconcile()?;
        let (count, used) = store.inner.index.totals()?;
        store.inner.used.store(used, Ordering::Relaxed);
        store.inner.count.store(count, Ordering::Relaxed);
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.inner
            .root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Makes the index agree with the files: entries without a file are dropped, files
    /// without an entry are adopted (the file is the truth for a blob).
    fn reconcile(&self) -> io::Result<()> {
        let index = &self.inner.index;
        let mut dropped = 0;
        for key in index.blob_keys()? {
            let exists = Digest::parse(&key)
                .map(|d| self.blob_path(&d).is_file())
                .unwrap_or(false);
            if !exists {
                index.remove_blob(&key)?;
                dropped += 1;
            }
        }
        // Files without an entry are adopted in batches: one durable transaction per
        // 10,000 files, not per file (a rebuild of 100k blobs would take 15 s otherwise).
        let mut adopted = 0;
        let mut batch: Vec<(Digest, u64, Option<String>)> = Vec::new();
        let flush = |batch: &mut Vec<(Digest, u64, Option<String>)>| -> io::Result<()> {
            let new: Vec<_> = batch
                .iter()
                .map(|(digest, size, mt)| index::NewBlob {
                    digest,
                    size: *size,
                    media_type: mt.as_deref(),
                    link: None,
                })
                .collect();
            index.insert_blobs(&new)?;
            batch.clear();
            Ok(())
        };
        self.for_each_blob_file(|name, path| {
            let Ok(digest) = Digest::parse(name) else {
                tracing::warn!(path = %path.display(), "ignoring a file that is not named by a digest");
                return Ok(());
            };
            if index.has_blob(name)? {
                return Ok(());
            }
            let size = path.metadata()?.len();
            batch.push((digest, size, sniff_manifest_media_type(path, size)));
            adopted += 1;
            if batch.len() >= 10_000 {
                flush(&mut batch)?;
            }
            Ok(())
        })?;
        flush(&mut batch)?;
        if dropped + adopted > 0 {
            tracing::info!(dropped, adopted, "index reconciled with the blob files");
        }
        Ok(())
    }

    /// Calls `f(name, path)` for every file in the blob tree, `name` being what the file
    /// claims to be (`sha256:<hex>`, unchecked).
    fn for_each_blob_file(
        &self,
        mut f: impl FnMut(&str, &Path) -> io::Result<()>,
    ) -> io::Result<()> {
        for algo in std::fs::read_dir(self.inner.root.join("blobs"))? {
            let algo = algo?;
            for prefix in std::fs::read_dir(algo.path())? {
                for file in std::fs::read_dir(prefix?.path())? {
                    let file = file?;
                    let name = format!(
                        "{}:{}",
                        algo.file_name().to_string_lossy(),
                        file.file_name().to_string_lossy()
                    );
                    f(&name, &file.path())?;
                }
            }
        }
        Ok(())
    }

    /// Opens a stored blob; `None` when it is not stored. Any other error is an error,
    /// never a miss.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<BlobFile>> {
        let path = self.blob_path(digest);
        let found = blocking(move || match File::open(&path) {
            Ok(file) => {
                let size = file.metadata()?.len();
                Ok(Some(BlobFile {
                    file: Arc::new(file),
                    size,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        if found.is_some() {
            self.inner.touches.record(digest, now_secs());
        }
        Ok(found)
    }

    /// Whether a blob file is in place (a metadata lookup, cheap enough to hold a lock over).
    pub fn contains_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Starts writing a blob expected to hash to `digest`.
    pub async fn begin_blob(&self, digest: &Digest) -> io::Result<BlobWriter> {
        let tmp = self.inner.tmp.clone();
        let hint = digest.hex()[..16].to_owned();
        let (temp, file) = blocking(move || TempFile::create(&tmp, &hint)).await?;
        Ok(BlobWriter::new(digest, temp, file))
    }

    /// A stored manifest by digest; `None` when not stored.
    pub async fn manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        if let Some(m) = self.inner.memo.manifest(digest) {
            return Ok(Some(m));
        }
        let (s, digest) = (self.clone(), digest.clone());
        blocking(move || {
            let Some(media_type) = s.inner.index.manifest_media_type(&digest)? else {
                return Ok(None);
            };
            match std::fs::read(s.blob_path(&digest)) {
                Ok(b) => {
                    let m = StoredManifest {
                        bytes: Bytes::from(b),
                        media_type,
                    };
                    s.inner.memo.put_manifest(&digest, &m);
                    Ok(Some(m))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // The file went (removed by hand): forget it, fetch it again.
                    s.inner.memo.forget_object(&digest);
                    s.inner.index.remove_blob(&digest.to_string())?;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Stores a manifest's exact bytes after checking they hash to `digest`.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), CommitError> {
        let mut w = self.begin_blob(digest).await.map_err(CommitError::Io)?;
        let w = blocking(move || w.write_blocking(&bytes).map(|()| w))
            .await
            .map_err(CommitError::Io)?;
        w.verify()?
            .persist(self, Some(media_type))
            .await
            .map_err(CommitError::Io)
    }

    pub async fn tag(&self, key: &str) -> io::Result<Option<TagRecord>> {
        if let Some(r) = self.inner.memo.tag(key) {
            return Ok(Some(r));
        }
        let (s, key) = (self.clone(), key.to_owned());
        blocking(move || {
            let seen = s.inner.memo.tag_generation();
            let found = s.inner.index.tag(&key)?;
            if let Some(r) = &found {
                s.inner.memo.fill_tag(&key, r, seen);
            }
            Ok(found)
        })
        .await
    }

    /// Every accept-set variant of a tag: `(key, record)` for keys starting with `prefix`.
    pub async fn tags_with_prefix(&self, prefix: &str) -> io::Result<Vec<(String, TagRecord)>> {
        let (s, prefix) = (self.clone(), prefix.to_owned());
        blocking(move || s.inner.index.tags_with_prefix(&prefix)).await
    }

    pub async fn put_tag(&self, key: String, record: TagRecord) -> io::Result<()> {
        let s = self.clone();
        blocking(move || {
            s.inner.index.put_tag(&key, &record)?;
            s.inner.memo.put_tag(&key, &record);
            Ok(())
        })
        .await
    }

    pub async fn link(
        &self,
        upstream: &str,
        repository: &str,
        digests: Vec<Digest>,
    ) -> io::Result<()> {
        let (s, u, r) = (self.clone(), upstream.to_owned(), repository.to_owned());
        blocking(move || {
            s.inner.index.link(&u, &r, &digests)?;
            s.inner.memo.linked(&u, &r, &digests);
            Ok(())
        })
        .await
    }

    pub async fn is_linked(
        &self,
        upstream: &str,
        repository: &str,
        digest: &Digest,
    ) -> io::Result<bool> {
        let (s, u, r, d) = (
            self.clone(),
            upstream.to_owned(),
            repository.to_owned(),
            digest.clone(),
        );
        if self.inner.memo.is_linked(&u, &r, &d) {
            return Ok(true);
        }
        blocking(move || {
            let linked = s.inner.index.is_linked(&u, &r, &d)?;
            if linked {
                s.inner.memo.linked(&u, &r, std::slice::from_ref(&d));
            }
            Ok(linked)
        })
        .await
    }

    /// Forgets every tag record whose key starts with `prefix` (the admin API's delete).
    pub async fn remove_tags(&self, prefix: String) -> io::Result<usize> {
        let s = self.clone();
        // Before and after: a read racing the removal may have put a record back.
        self.inner.memo.forget_tags(&prefix);
        blocking(move || {
            let removed = s.inner.index.remove_tags(&prefix)?;
            s.inner.memo.forget_tags(&prefix);
            Ok(removed)
        })
        .await
    }

    /// Pins blobs against eviction (the warm list).
    pub async fn pin(&self, digests: Vec<Digest>) -> io::Result<()> {
        let s = self.clone();
        blocking(move || s.inner.index.pin(&digests)).await
    }

    pub fn is_pinned(&self, digest: &Digest) -> io::Result<bool> {
        self.inner.index.is_pinned(digest)
    }

    /// (blob count, bytes) in the store.
    pub fn totals(&self) -> io::Result<(u64, u64)> {
        Ok((
            self.inner.count.load(Ordering::Relaxed),
            self.inner.used.load(Ordering::Relaxed),
        ))
    }

    /// A write failed for lack of space: log it (once until a blob is stored again) and
    /// let the evictor make room.
    pub fn note_disk_full(&self) {
        if !self.inner.disk_full.swap(true, Ordering::Relaxed) {
            tracing::error!(root = %self.inner.root.display(),
                "the store's disk is full: fills pass their bytes through without storing them; evicting");
        }
    }

    /// Checks that the store can be written: a temp file is created, synced and removed.
    pub async fn probe_writable(&self) -> io::Result<()> {
        let tmp = self.inner.tmp.clone();
        blocking(move || {
            let (temp, mut file) = TempFile::create(&tmp, "probe")?;
            file.write_all(b"ok")?;
            file.sync_all()?;
            drop(temp);
            Ok(())
        })
        .await
    }
}

/// A manifest adopted from a bare file keeps its media type if its JSON names one.
fn sniff_manifest_media_type(path: &Path, size: u64) -> Option<String> {
    if size > crate::oci::media::MAX_MANIFEST_BYTES as u64 {
        return None;
    }
    crate::oci::manifest::sniff_media_type(&std::fs::read(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_verifies_and_recovery_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Digest::sha256_of(b"hello");
        let mut w = store.begin_blob(&good).await.unwrap();
        w.write_blocking(b"hello").unwrap();
        w.verify().unwrap().persist(&store, None).await.unwrap();
        let b = store.open_blob(&good).await.unwrap().unwrap();
        assert_eq!(b.size, 5);

        // Wrong bytes: nothing stored, no temp file left.
        let mut w = store
            .begin_blob(&Digest::sha256_of(b"other"))
            .await
            .unwrap();
        w.write_blocking(b"evil").unwrap();
        assert!(matches!(w.verify(), Err(CommitError::Mismatch { .. })));
        assert!(store
            .open_blob(&Digest::sha256_of(b"other"))
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        // A leftover temp file goes at start-up; the index survives a deleted file.
        std::fs::write(dir.path().join("tmp/leftover.part"), b"x").unwrap();
        let m = Digest::sha256_of(b"{\"schemaVersion\":2}");
        store
            .put_manifest(
                &m,
                "application/x-test",
                Bytes::from_static(b"{\"schemaVersion\":2}"),
            )
            .await
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(
            store.manifest(&m).await.unwrap().unwrap().media_type,
            "application/x-test"
        );
        assert_eq!(store.totals().unwrap().0, 2);

        // A second store on the same root is refused while the first is open.
        let second = Store::open(dir.path());
        assert!(second.is_err_and(|e| e.to_string().contains("another berth")));

        // Index deleted while stopped: rebuilt from the files.
        drop(store);
        std::fs::remove_file(dir.path().join("index.redb")).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.totals().unwrap(), (2, 5 + 19));

        // A corrupted index is moved aside and rebuilt.
        drop(store);
        std::fs::write(dir.path().join("index.redb"), vec![0x5a; 8192]).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.totals().unwrap(), (2, 5 + 19));
    }
}
