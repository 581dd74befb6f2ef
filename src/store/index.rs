//! The metadata index (redb): blob sizes and access times, manifest media types, tag
//! records and repository links. Every write is one ACID transaction.
//!
//! For blobs the file is the truth: the index only says how big a blob is and when it was
//! last used. Tags and links exist only here.

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::oci::Digest;

/// digest → (size, last access as unix seconds)
const BLOBS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("blobs");
/// digest → media type, for blobs that are manifests
const MANIFESTS: TableDefinition<&str, &str> = TableDefinition::new("manifests");
/// tag key → JSON [`TagRecord`]
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
/// "upstream\0repository\0digest" → ()
const LINKS: TableDefinition<&str, ()> = TableDefinition::new("links");
/// digest → unix seconds when pinned (warm list): never evicted.
const PINS: TableDefinition<&str, u64> = TableDefinition::new("pins");

/// A blob to record: its size, its media type if it is a manifest, and the
/// (upstream, repository) it was fetched for.
pub struct NewBlob<'a> {
    pub digest: &'a Digest,
    pub size: u64,
    pub media_type: Option<&'a str>,
    pub link: Option<(&'a str, &'a str)>,
}

/// What berth knows of a tag: which manifest it pointed at, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    /// Unix seconds of the last GET that fetched it.
    pub fetched_at: u64,
    /// Unix seconds of the last time upstream confirmed it (GET or HEAD); `validated_ms`,
    /// when present, says it to the millisecond.
    pub validated_at: u64,
    /// The same moment in unix milliseconds, which the tag's TTL is measured against.
    /// Records written before berth kept it, and by older replicas of a fleet (which
    /// ignore it and read `validated_at`), have none: `validated_at` counts then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validated_ms: Option<u64>,
}

impl TagRecord {
    /// A record of `digest` fetched (and so validated) at `now_ms`.
    pub fn fetched(digest: Digest, media_type: &str, now_ms: u64) -> TagRecord {
        TagRecord {
            digest,
            media_type: media_type.to_owned(),
            fetched_at: now_ms / 1000,
            validated_at: now_ms / 1000,
            validated_ms: Some(now_ms),
        }
    }

    /// When the upstream last confirmed it, in unix milliseconds.
    pub fn validated_millis(&self) -> u64 {
        self.validated_ms
            .unwrap_or(self.validated_at.saturating_mul(1000))
    }

    /// The record, confirmed by the upstream at `now_ms`.
    pub fn validated(self, now_ms: u64) -> TagRecord {
        TagRecord {
            validated_at: now_ms / 1000,
            validated_ms: Some(now_ms),
            ..self
        }
    }

    /// The record with no time later than `now_ms` (another replica's clock may run
    /// ahead: its records must not stay fresh for longer).
    pub fn not_after(self, now_ms: u64) -> TagRecord {
        let now = now_ms / 1000;
        TagRecord {
            fetched_at: self.fetched_at.min(now),
            validated_at: self.validated_at.min(now),
            validated_ms: Some(self.validated_millis().min(now_ms)),
            ..self
        }
    }
}

use crate::clock::now_secs;

/// An index error: storage failures of redb, reported as I/O errors to callers.
pub type Result<T> = std::result::Result<T, std::io::Error>;

pub(super) fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(format!("index: {e}"))
}

pub struct Index {
    db: Database,
}

fn link_key(upstream: &str, repository: &str, digest: &Digest) -> String {
    format!("{upstream}\0{repository}\0{digest}")
}

/// Why the index could not be opened. Only `Corrupted` justifies rebuilding it.
#[derive(Debug)]
pub enum OpenError {
    Corrupted(String),
    Other(std::io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Corrupted(m) => write!(f, "index corrupted: {m}"),
            OpenError::Other(e) => e.fmt(f),
        }
    }
}

impl Index {
    pub fn open(path: &Path) -> std::result::Result<Index, OpenError> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(m))) => {
                return Err(OpenError::Corrupted(m))
            }
            // What redb says of a file that is not a redb database at all.
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::InvalidData =>
            {
                return Err(OpenError::Corrupted(e.to_string()))
            }
            Err(e) => return Err(OpenError::Other(io(e))),
        };
        Self::init(db).map_err(OpenError::Other)
    }

    fn init(db: Database) -> Result<Index> {
        let txn = db.begin_write().map_err(io)?;
        {
            txn.open_table(BLOBS).map_err(io)?;
            txn.open_table(MANIFESTS).map_err(io)?;
            txn.open_table(TAGS).map_err(io)?;
            txn.open_table(LINKS).map_err(io)?;
            txn.open_table(PINS).map_err(io)?;
            super::documents::create_tables(&txn)?;
        }
        txn.commit().map_err(io)?;
        Ok(Index { db })
    }

    /// For the tables kept in other files of the store (`documents.rs`).
    pub(super) fn db(&self) -> &Database {
        &self.db
    }

    pub fn insert_blob(&self, digest: &Digest, size: u64, media_type: Option<&str>) -> Result<()> {
        self.insert_blobs(&[NewBlob {
            digest,
            size,
            media_type,
            link: None,
        }])
    }

    /// Records blobs (and, for each, the repository it was fetched for) in one
    /// transaction: a stored blob and its link land together or not at all.
    pub fn insert_blobs(&self, new: &[NewBlob<'_>]) -> Result<()> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut blobs = txn.open_table(BLOBS).map_err(io)?;
            let mut manifests = txn.open_table(MANIFESTS).map_err(io)?;
            let mut links = txn.open_table(LINKS).map_err(io)?;
            let now = now_secs();
            for b in new {
                let key = b.digest.to_string();
                blobs.insert(key.as_str(), (b.size, now)).map_err(io)?;
                if let Some(mt) = b.media_type {
                    manifests.insert(key.as_str(), mt).map_err(io)?;
                }
                if let Some((upstream, repository)) = b.link {
                    links
                        .insert(link_key(upstream, repository, b.digest).as_str(), ())
                        .map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)
    }

    /// Records last-access times in one transaction (hits are batched, not written each).
    pub fn touch_many(&self, touches: &[(Digest, u64)]) -> Result<()> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut blobs = txn.open_table(BLOBS).map_err(io)?;
            for (d, at) in touches {
                let key = d.to_string();
                let size = blobs.get(key.as_str()).map_err(io)?.map(|v| v.value().0);
                if let Some(size) = size {
                    blobs.insert(key.as_str(), (size, *at)).map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)
    }

    /// (digest, size, last access) of every blob that may be evicted: not a manifest,
    /// not pinned. Oldest access first.
    pub fn eviction_candidates(&self) -> Result<Vec<(String, u64, u64)>> {
        let txn = self.db.begin_read().map_err(io)?;
        let blobs = txn.open_table(BLOBS).map_err(io)?;
        let manifests = txn.open_table(MANIFESTS).map_err(io)?;
        let pins = txn.open_table(PINS).map_err(io)?;
        let mut out = Vec::new();
        for entry in blobs.iter().map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            let key = k.value();
            if manifests.get(key).map_err(io)?.is_some() || pins.get(key).map_err(io)?.is_some() {
                continue;
            }
            let (size, at) = v.value();
            out.push((key.to_owned(), size, at));
        }
        out.sort_by_key(|(_, _, at)| *at);
        Ok(out)
    }

    pub fn manifest_media_type(&self, digest: &Digest) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(MANIFESTS).map_err(io)?;
        let key = digest.to_string();
        Ok(t.get(key.as_str())
            .map_err(io)?
            .map(|v| v.value().to_owned()))
    }

    /// Forgets a blob whose file has gone (and its manifest media type).
    pub fn remove_blob(&self, digest: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            txn.open_table(BLOBS)
                .map_err(io)?
                .remove(digest)
                .map_err(io)?;
            txn.open_table(MANIFESTS)
                .map_err(io)?
                .remove(digest)
                .map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    pub fn tag(&self, key: &str) -> Result<Option<TagRecord>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(TAGS).map_err(io)?;
        match t.get(key).map_err(io)? {
            // A record that does not parse is treated as absent: it is refetched and replaced.
            Some(v) => Ok(serde_json::from_slice(v.value()).ok()),
            None => Ok(None),
        }
    }

    pub fn put_tag(&self, key: &str, record: &TagRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record).map_err(io)?;
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(TAGS).map_err(io)?;
            t.insert(key, bytes.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    /// Records that `repository` on `upstream` is known to contain `digests`.
    pub fn link(&self, upstream: &str, repository: &str, digests: &[Digest]) -> Result<()> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(LINKS).map_err(io)?;
            for d in digests {
                t.insert(link_key(upstream, repository, d).as_str(), ())
                    .map_err(io)?;
            }
        }
        txn.commit().map_err(io)
    }

    pub fn is_linked(&self, upstream: &str, repository: &str, digest: &Digest) -> Result<bool> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(LINKS).map_err(io)?;
        Ok(t.get(link_key(upstream, repository, digest).as_str())
            .map_err(io)?
            .is_some())
    }

    /// Every tag record whose key starts with `prefix` (a tag's accept-set variants).
    pub fn tags_with_prefix(&self, prefix: &str) -> Result<Vec<(String, TagRecord)>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(TAGS).map_err(io)?;
        let mut out = Vec::new();
        for entry in t.range(prefix..).map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            if let Ok(record) = serde_json::from_slice(v.value()) {
                out.push((k.value().to_owned(), record));
            }
        }
        Ok(out)
    }

    /// Removes every tag record whose key starts with `prefix`; returns how many.
    pub fn remove_tags(&self, prefix: &str) -> Result<usize> {
        let txn = self.db.begin_write().map_err(io)?;
        let removed;
        {
            let mut t = txn.open_table(TAGS).map_err(io)?;
            let keys: Vec<String> = t
                .range(prefix..)
                .map_err(io)?
                .map_while(|e| e.ok())
                .map(|(k, _)| k.value().to_owned())
                .take_while(|k| k.starts_with(prefix))
                .collect();
            for k in &keys {
                t.remove(k.as_str()).map_err(io)?;
            }
            removed = keys.len();
        }
        txn.commit().map_err(io)?;
        Ok(removed)
    }

    /// Pins blobs (the warm list's) against eviction.
    pub fn pin(&self, digests: &[Digest]) -> Result<()> {
        let now = now_secs();
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut t = txn.open_table(PINS).map_err(io)?;
            for d in digests {
                t.insert(d.to_string().as_str(), now).map_err(io)?;
            }
        }
        txn.commit().map_err(io)
    }

    pub fn is_pinned(&self, digest: &Digest) -> Result<bool> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(PINS).map_err(io)?;
        Ok(t.get(digest.to_string().as_str()).map_err(io)?.is_some())
    }

    /// Every blob digest the index knows, for start-up reconciliation.
    pub fn blob_keys(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(BLOBS).map_err(io)?;
        let mut out = Vec::with_capacity(t.len().map_err(io)? as usize);
        for entry in t.iter().map_err(io)? {
            let (k, _) = entry.map_err(io)?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    pub fn has_blob(&self, digest: &str) -> Result<bool> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(BLOBS).map_err(io)?;
        Ok(t.get(digest).map_err(io)?.is_some())
    }

    /// (blob count, total bytes).
    pub fn totals(&self) -> Result<(u64, u64)> {
        let txn = self.db.begin_read().map_err(io)?;
        let t = txn.open_table(BLOBS).map_err(io)?;
        let mut bytes = 0;
        for entry in t.iter().map_err(io)? {
            let (_, v) = entry.map_err(io)?;
            bytes += v.value().0;
        }
        Ok((t.len().map_err(io)?, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// Tag records cross versions in a fleet's bucket and in an upgraded store: a record
    /// without `validated_ms` counts to the second, and a reader that does not know the
    /// field (an older replica) still reads the seconds.
    #[test]
    fn tag_records_read_across_versions() {
        let old =
            format!(r#"{{"digest":"{D}","media_type":"m","fetched_at":1700,"validated_at":1750}}"#);
        let r: TagRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(r.validated_millis(), 1_750_000);

        let new = TagRecord::fetched(Digest::parse(D).unwrap(), "m", 1_800_250);
        assert_eq!((new.fetched_at, new.validated_at), (1_800, 1_800));
        assert_eq!(new.validated_millis(), 1_800_250);
        let json = serde_json::to_string(&new).unwrap();
        #[derive(Deserialize)]
        struct Older {
            validated_at: u64,
        }
        assert_eq!(
            serde_json::from_str::<Older>(&json).unwrap().validated_at,
            1_800
        );
        assert_eq!(serde_json::from_str::<TagRecord>(&json).unwrap(), new);

        let again = new.clone().validated(1_900_999);
        assert_eq!(
            (again.validated_at, again.validated_millis()),
            (1_900, 1_900_999)
        );
        // A record from a clock that runs ahead is brought back to now.
        let ahead = again.not_after(1_850_500);
        assert_eq!(
            (ahead.validated_at, ahead.validated_millis()),
            (1_850, 1_850_500)
        );
        assert_eq!(ahead.fetched_at, 1_800);
    }
}
