//! Small documents relayed from upstreams and kept for their outages: tags lists and
//! referrers lists. Unlike manifests they have no digest; they are kept by the key the
//! proxy gives them (upstream, repository, the request's query) in two redb tables of
//! the index: the documents themselves, and their sizes and ages.
//!
//! Bounded: the documents together stay under [`MAX_BYTES`] (keys counted) and
//! [`MAX_COUNT`]. A write past either removes the documents written longest ago (a
//! document in use is rewritten at each revalidation, so this is least recently used at
//! `tag_ttl` granularity; writes are numbered, so the order is exact), never a pinned one (the warm list's referrers) and never the
//! one just written. Totals and an index by age are kept with the documents, so a write
//! costs O(log n) and each removal as much, whatever the number of documents.

use std::io;

use bytes::Bytes;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{blocking, index, Store};

/// key → 4-byte big-endian length of the JSON [`Meta`], the meta, then the body.
const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");
/// key → (bytes it takes, keys included; write sequence number; pinned)
const DOCUMENT_SIZES: TableDefinition<&str, (u64, u64, bool)> =
    TableDefinition::new("document_sizes");
/// (write sequence number, key) of every unpinned document: the order of removal.
const DOCUMENT_AGES: TableDefinition<(u64, &str), ()> = TableDefinition::new("document_ages");
/// `TOTALS` → (bytes, count) of all documents, pinned ones included, and the next write
/// sequence number.
const DOCUMENT_TOTALS: TableDefinition<&str, (u64, u64, u64)> =
    TableDefinition::new("document_totals");
const TOTALS: &str = "all";

/// The most bytes all documents may take in the index.
pub const MAX_BYTES: u64 = 64 << 20;
/// The most documents kept.
pub const MAX_COUNT: u64 = 50_000;
/// A key longer than this is not kept (the answer is relayed only): a client chooses
/// part of it (`last`, `artifactType`).
pub const MAX_KEY_BYTES: usize = 1024;

/// A kept answer of an upstream: its status, the headers berth relays, its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub status: u16,
    /// (name, value) of the relayed headers (`Content-Type`, `Link`, `OCI-Filters-Applied`).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Unix milliseconds of the last time the upstream sent it (or confirmed it).
    pub validated_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    status: u16,
    headers: Vec<(String, String)>,
    /// Unix seconds; documents kept before berth wrote `validated_ms` have only this.
    validated_at: u64,
    #[serde(default)]
    validated_ms: Option<u64>,
}

pub(super) fn create_tables(txn: &WriteTransaction) -> io::Result<()> {
    txn.open_table(DOCUMENTS).map_err(index::io)?;
    let sizes = txn.open_table(DOCUMENT_SIZES).map_err(index::io)?;
    let mut ages = txn.open_table(DOCUMENT_AGES).map_err(index::io)?;
    let mut totals = txn.open_table(DOCUMENT_TOTALS).map_err(index::io)?;
    // Totals and ages missing (an index written before they existed): count once.
    if totals.get(TOTALS).map_err(index::io)?.is_none() {
        let (mut bytes, mut count, mut next) = (0, 0, 0);
        for entry in sizes.iter().map_err(index::io)? {
            let (k, v) = entry.map_err(index::io)?;
            let (size, seq, pinned) = v.value();
            bytes += size;
            count += 1;
            next = next.max(seq + 1);
            if !pinned {
                ages.insert((seq, k.value()), ()).map_err(index::io)?;
            }
        }
        totals
            .insert(TOTALS, (bytes, count, next))
            .map_err(index::io)?;
    }
    Ok(())
}

/// What a document under `key` takes: its bytes, and its key in three tables.
fn footprint(key: &str, value: &[u8]) -> u64 {
    (value.len() + 3 * key.len()) as u64
}

fn encode(doc: &Document) -> io::Result<Vec<u8>> {
    let meta = serde_json::to_vec(&Meta {
        status: doc.status,
        headers: doc.headers.clone(),
        validated_at: doc.validated_ms / 1000,
        validated_ms: Some(doc.validated_ms),
    })
    .map_err(index::io)?;
    let len = u32::try_from(meta.len()).map_err(index::io)?;
    let mut out = Vec::with_capacity(4 + meta.len() + doc.body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&doc.body);
    Ok(out)
}

/// `None` for bytes that do not decode: the document is then fetched again and replaced.
fn decode(bytes: &[u8]) -> Option<Document> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let meta: Meta = serde_json::from_slice(bytes.get(4..4usize.checked_add(len)?)?).ok()?;
    Some(Document {
        status: meta.status,
        headers: meta.headers,
        body: Bytes::copy_from_slice(&bytes[4 + len..]),
        validated_ms: meta
            .validated_ms
            .unwrap_or(meta.validated_at.saturating_mul(1000)),
    })
}

impl index::Index {
    pub fn document(&self, key: &str) -> io::Result<Option<Document>> {
        let txn = self.db().begin_read().map_err(index::io)?;
        let t = txn.open_table(DOCUMENTS).map_err(index::io)?;
        Ok(t.get(key)
            .map_err(index::io)?
            .and_then(|v| decode(v.value())))
    }

    /// Writes `doc` under `key` (still pinned if it was: `pin_document` pins), then
    /// removes the oldest unpinned documents while over the bounds; returns how many it
    /// removed.
    pub fn put_document(&self, key: &str, doc: &Document) -> io::Result<usize> {
        self.put_document_bounded(key, doc, MAX_BYTES, MAX_COUNT)
    }

    fn put_document_bounded(
        &self,
        key: &str,
        doc: &Document,
        max_bytes: u64,
        max_count: u64,
    ) -> io::Result<usize> {
        let value = encode(doc)?;
        let txn = self.db().begin_write().map_err(index::io)?;
        let mut removed = 0;
        {
            let mut docs = txn.open_table(DOCUMENTS).map_err(index::io)?;
            let mut sizes = txn.open_table(DOCUMENT_SIZES).map_err(index::io)?;
            let mut ages = txn.open_table(DOCUMENT_AGES).map_err(index::io)?;
            let mut totals = txn.open_table(DOCUMENT_TOTALS).map_err(index::io)?;
            let (mut bytes, mut count, seq) = totals
                .get(TOTALS)
                .map_err(index::io)?
                .map_or((0, 0, 0), |v| v.value());
            let old = sizes.get(key).map_err(index::io)?.map(|v| v.value());
            let mut pinned = false;
            if let Some((size, written, was_pinned)) = old {
                bytes = bytes.saturating_sub(size);
                count = count.saturating_sub(1);
                ages.remove((written, key)).map_err(index::io)?;
                pinned |= was_pinned;
            }
            let size = footprint(key, &value);
            docs.insert(key, value.as_slice()).map_err(index::io)?;
            sizes.insert(key, (size, seq, pinned)).map_err(index::io)?;
            if !pinned {
                ages.insert((seq, key), ()).map_err(index::io)?;
            }
            bytes += size;
            count += 1;
            // The oldest unpinned documents go first; the one just written is the newest,
            // so reaching it means nothing else can go.
            while bytes > max_bytes || count > max_count {
                let Some(oldest) = ages.first().map_err(index::io)? else {
                    break;
                };
                let (written, k) = oldest.0.value();
                if k == key {
                    break;
                }
                let k = k.to_owned();
                drop(oldest);
                ages.remove((written, k.as_str())).map_err(index::io)?;
                docs.remove(k.as_str()).map_err(index::io)?;
                if let Some(v) = sizes.remove(k.as_str()).map_err(index::io)? {
                    bytes = bytes.saturating_sub(v.value().0);
                }
                count = count.saturating_sub(1);
                removed += 1;
            }
            totals
                .insert(TOTALS, (bytes, count, seq + 1))
                .map_err(index::io)?;
        }
        txn.commit().map_err(index::io)?;
        Ok(removed)
    }

    /// Forgets a document (the upstream said it has no such thing any more).
    pub fn remove_document(&self, key: &str) -> io::Result<()> {
        let txn = self.db().begin_write().map_err(index::io)?;
        {
            let mut docs = txn.open_table(DOCUMENTS).map_err(index::io)?;
            docs.remove(key).map_err(index::io)?;
            let mut sizes = txn.open_table(DOCUMENT_SIZES).map_err(index::io)?;
            let old = sizes.remove(key).map_err(index::io)?.map(|v| v.value());
            if let Some((size, written, _)) = old {
                let mut ages = txn.open_table(DOCUMENT_AGES).map_err(index::io)?;
                ages.remove((written, key)).map_err(index::io)?;
                let mut totals = txn.open_table(DOCUMENT_TOTALS).map_err(index::io)?;
                let (bytes, count, seq) = totals
                    .get(TOTALS)
                    .map_err(index::io)?
                    .map_or((0, 0, 0), |v| v.value());
                let left = (bytes.saturating_sub(size), count.saturating_sub(1), seq);
                totals.insert(TOTALS, left).map_err(index::io)?;
            }
        }
        txn.commit().map_err(index::io)
    }

    /// Pins a stored document against removal by the bounds; false when none is stored.
    pub fn pin_document(&self, key: &str) -> io::Result<bool> {
        let txn = self.db().begin_write().map_err(index::io)?;
        let found;
        {
            let mut sizes = txn.open_table(DOCUMENT_SIZES).map_err(index::io)?;
            let entry = sizes.get(key).map_err(index::io)?.map(|v| v.value());
            found = entry.is_some();
            if let Some((size, written, _)) = entry {
                sizes
                    .insert(key, (size, written, true))
                    .map_err(index::io)?;
                let mut ages = txn.open_table(DOCUMENT_AGES).map_err(index::io)?;
                ages.remove((written, key)).map_err(index::io)?;
            }
        }
        txn.commit().map_err(index::io)?;
        Ok(found)
    }
}

impl Store {
    /// A kept document; `None` when none is kept under `key`.
    pub async fn document(&self, key: &str) -> io::Result<Option<Document>> {
        let (s, key) = (self.clone(), key.to_owned());
        blocking(move || s.inner.index.document(&key)).await
    }

    /// Keeps `doc` under `key`, within the bounds (see the module's doc). A key over
    /// [`MAX_KEY_BYTES`] is not kept.
    pub async fn put_document(&self, key: String, doc: Document) -> io::Result<()> {
        if key.len() > MAX_KEY_BYTES {
            tracing::debug!(bytes = key.len(), "list not kept: its key is too long");
            return Ok(());
        }
        let s = self.clone();
        let removed = blocking(move || s.inner.index.put_document(&key, &doc)).await?;
        if removed > 0 {
            tracing::debug!(
                removed,
                "removed the oldest kept tags lists and referrers lists (over the bound)"
            );
        }
        Ok(())
    }

    pub async fn remove_document(&self, key: String) -> io::Result<()> {
        let s = self.clone();
        blocking(move || s.inner.index.remove_document(&key)).await
    }

    /// Pins a kept document (the warm list's referrers) against the bounds.
    pub async fn pin_document(&self, key: String) -> io::Result<bool> {
        let s = self.clone();
        blocking(move || s.inner.index.pin_document(&key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document kept before berth wrote milliseconds reads to the second.
    #[test]
    fn documents_kept_in_seconds_still_read() {
        let meta = br#"{"status":200,"headers":[],"validated_at":1750}"#;
        let mut bytes = (meta.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(meta);
        bytes.extend_from_slice(b"body");
        let d = decode(&bytes).unwrap();
        assert_eq!((d.validated_ms, d.body.as_ref()), (1_750_000, &b"body"[..]));
        let round = decode(&encode(&doc(b"x", 1_750_250)).unwrap()).unwrap();
        assert_eq!(round.validated_ms, 1_750_250);
    }

    fn doc(body: &'static [u8], at: u64) -> Document {
        Document {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(body),
            validated_ms: at,
        }
    }

    #[tokio::test]
    async fn documents_survive_a_restart_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = doc(b"{\"tags\":[\"v1\"]}", 7);
        store.put_document("a".into(), d.clone()).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.document("a").await.unwrap(), Some(d.clone()));
        assert_eq!(store.document("b").await.unwrap(), None);

        // Bounds of two documents: a third removes the oldest unpinned one.
        let index = &store.inner.index;
        assert!(index.pin_document("a").unwrap());
        assert!(!index.pin_document("nothing").unwrap());
        index.put_document_bounded("b", &d, u64::MAX, 2).unwrap();
        assert_eq!(index.put_document_bounded("c", &d, u64::MAX, 2).unwrap(), 1);
        assert!(index.document("a").unwrap().is_some(), "pinned");
        assert!(index.document("b").unwrap().is_none(), "oldest unpinned");
        assert!(index.document("c").unwrap().is_some(), "just written");
        // Rewriting a pinned document keeps it pinned.
        index.put_document_bounded("a", &d, u64::MAX, 2).unwrap();
        index.put_document_bounded("d", &d, u64::MAX, 2).unwrap();
        assert!(index.document("a").unwrap().is_some());
        assert!(index.document("c").unwrap().is_none());
        store.remove_document("a".into()).await.unwrap();
        assert_eq!(store.document("a").await.unwrap(), None);
        // Keys count: a byte bound that fits two documents' bodies but not their keys.
        let long = "k".repeat(300);
        let size = encode(&d).unwrap().len() as u64;
        for i in 0..3 {
            index
                .put_document_bounded(&format!("{long}{i}"), &d, 2 * size + 1000, 100)
                .unwrap();
        }
        let kept = (0..3)
            .filter(|i| index.document(&format!("{long}{i}")).unwrap().is_some())
            .count();
        assert_eq!(kept, 1, "keys were not counted");
    }

    /// Totals stay right through rewrites, pins and removals: many writes under a small
    /// bound keep exactly the bound.
    #[test]
    fn the_bound_holds_through_rewrites_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let index = &store.inner.index;
        let d = doc(b"{}", 1);
        for round in 0..3 {
            for i in 0..20 {
                index
                    .put_document_bounded(&format!("k{}", (i * 7 + round) % 30), &d, u64::MAX, 10)
                    .unwrap();
            }
        }
        index.remove_document("k0").unwrap();
        let kept = (0..30)
            .filter(|i| index.document(&format!("k{i}")).unwrap().is_some())
            .count();
        assert!((9..=10).contains(&kept), "{kept}");
        let txn = index.db().begin_read().unwrap();
        let totals = txn.open_table(DOCUMENT_TOTALS).unwrap();
        let (_, count, _) = totals.get(TOTALS).unwrap().unwrap().value();
        assert_eq!(count as usize, kept);
    }

    #[test]
    fn damaged_bytes_decode_to_nothing() {
        let bytes = encode(&doc(b"body", 1)).unwrap();
        assert_eq!(decode(&bytes).unwrap().body, Bytes::from_static(b"body"));
        assert!(decode(&bytes[..3]).is_none());
        assert!(decode(&[0, 0, 0, 200, b'{']).is_none());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
