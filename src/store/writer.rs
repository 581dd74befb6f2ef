//! The write path of a blob: bytes to a temp file while hashed ([`BlobWriter`]), checked
//! against their digest ([`VerifiedBlob`]), then fsynced, renamed into place and indexed
//! in one step (`persist`, `persist_linked`).

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{blocking, index, Store, TempFile};
use crate::oci::{Digest, Hasher};

/// What went wrong committing a blob.
#[derive(Debug)]
pub enum CommitError {
    /// The bytes hash to `actual`, not to the digest they were fetched for.
    Mismatch {
        actual: Digest,
    },
    Io(io::Error),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Mismatch { actual } => write!(f, "content hashes to {actual}"),
            CommitError::Io(e) => write!(f, "store: {e}"),
        }
    }
}

/// A blob being written: bytes go to a temp file and through the hasher; nothing is
/// visible under the digest until it is verified and persisted.
pub struct BlobWriter {
    digest: Digest,
    temp: TempFile,
    file: Arc<File>,
    /// `None` once [`BlobWriter::take_hasher`] moved hashing elsewhere.
    hasher: Option<Hasher>,
    written: u64,
}

impl BlobWriter {
    pub(super) fn new(digest: &Digest, temp: TempFile, file: File) -> BlobWriter {
        BlobWriter {
            digest: digest.clone(),
            temp,
            file: Arc::new(file),
            hasher: Some(digest.hasher()),
            written: 0,
        }
    }

    /// A second handle on the temp file for readers (positional reads only).
    pub fn reader(&self) -> io::Result<Arc<File>> {
        Ok(Arc::new(File::open(self.temp.path())?))
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// A handle that reserves disk space for the blob once its size is known.
    pub fn reserver(&self) -> Reserver {
        Reserver(self.file.clone())
    }

    /// Takes the hasher out, for a caller that hashes the same bytes on another thread
    /// (a fill overlaps hashing with writing); verify with [`Self::verify_hashed`] then.
    pub fn take_hasher(&mut self) -> Option<Hasher> {
        self.hasher.take()
    }

    /// Appends and hashes `chunk` (unless the hasher was taken). Blocking: call it from a blocking thread. When this
    /// returns, the bytes are visible to readers of the temp file.
    pub fn write_blocking(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.try_write_blocking(chunk).map_err(|(_, e)| e)
    }

    /// Like [`Self::write_blocking`], but on failure says how many bytes of `chunk`
    /// reached the file (and were hashed), so a fill can pass the rest through.
    pub fn try_write_blocking(&mut self, chunk: &[u8]) -> Result<(), (usize, io::Error)> {
        let mut done = 0;
        let failure = loop {
            if done == chunk.len() {
                break None;
            }
            match (&*self.file).write(&chunk[done..]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        if let Some(h) = self.hasher.as_mut() {
            h.update(&chunk[..done]);
        }
        self.written += done as u64;
        match failure {
            None => Ok(()),
            Some(e) => Err((done, e)),
        }
    }

    /// Checks the bytes against the digest. Cheap: they were hashed as they came.
    pub fn verify(mut self) -> Result<VerifiedBlob, CommitError> {
        let Some(hasher) = self.hasher.take() else {
            return Err(CommitError::Io(io::Error::other(
                "the blob was hashed elsewhere: verify it with verify_hashed",
            )));
        };
        self.verify_hashed(hasher.finish())
    }

    /// Checks `actual`, the digest of every byte of the blob as hashed by the caller
    /// (after [`Self::take_hasher`]), against the digest the blob was begun for.
    pub fn verify_hashed(self, actual: Digest) -> Result<VerifiedBlob, CommitError> {
        if actual != self.digest {
            return Err(CommitError::Mismatch { actual });
        }
        Ok(VerifiedBlob {
            digest: self.digest,
            temp: self.temp,
            file: self.file,
            size: self.written,
        })
    }
}

/// Reserves a temp file's blocks ahead of its writes.
pub struct Reserver(Arc<File>);

impl Reserver {
    /// Allocates `len` bytes of blocks without changing the file's size (readers still
    /// see only what was written): the filesystem maps the blob in a few extents at once
    /// instead of block by block as writes arrive (on ext4, 7% of a fill's CPU), and a
    /// full disk can show up now. Best effort: a filesystem without `fallocate` is fine.
    /// Blocking (metadata only, but it may touch the disk).
    pub fn reserve(&self, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(&*self.0, FallocateFlags::KEEP_SIZE, 0, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A blob whose bytes match its digest, not yet in place.
pub struct VerifiedBlob {
    digest: Digest,
    temp: TempFile,
    file: Arc<File>,
    size: u64,
}

impl VerifiedBlob {
    /// A read handle on the verified bytes (for an upload that keeps no local copy; the
    /// temp file goes when this value is dropped).
    pub fn file(&self) -> (Arc<File>, u64) {
        (self.file.clone(), self.size)
    }

    /// fsyncs, renames into place and records the blob in the index. `media_type` marks
    /// the blob as a manifest.
    pub async fn persist(self, store: &Store, media_type: Option<&str>) -> io::Result<()> {
        self.persist_linked(store, media_type, None).await
    }

    /// Like [`Self::persist`], recording in the same transaction that `(upstream,
    /// repository)` holds the blob.
    pub async fn persist_linked(
        self,
        store: &Store,
        media_type: Option<&str>,
        link: Option<(String, String)>,
    ) -> io::Result<()> {
        let dest = store.blob_path(&self.digest);
        let s = store.clone();
        let mt = media_type.map(str::to_owned);
        let size = self.size;
        // A blob already in place (stored again by a racing fill) is not counted twice.
        let replaced = dest.exists();
        blocking(move || {
            self.file.sync_all()?;
            self.temp.persist(&dest)?;
            s.inner.index.insert_blobs(&[index::NewBlob {
                digest: &self.digest,
                size: self.size,
                media_type: mt.as_deref(),
                link: link.as_ref().map(|(u, r)| (u.as_str(), r.as_str())),
            }])
        })
        .await?;
        if !replaced {
            store.inner.used.fetch_add(size, Ordering::Relaxed);
            store.inner.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
