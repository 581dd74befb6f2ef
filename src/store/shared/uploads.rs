//! Writing blobs to the shared tier: one PUT for a small blob, a multipart upload for a
//! big one (visible under its key only once complete, aborted on any failure), with a
//! marker object per upload so that `berth gc` can abort what a dead replica left.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::{Result, Shared, Unavailable, PART_SIZE};
use crate::oci::Digest;

/// One multipart upload in progress, as its marker records it.
#[derive(Debug, Serialize, Deserialize)]
struct UploadMarker {
    key: String,
    id: String,
    /// Unix seconds.
    started: u64,
    replica: String,
}

impl Shared {
    /// Uploads a verified blob from a local file, unless the tier already holds it. Small
    /// blobs go in one PUT; big ones in parts, visible only once complete, and aborted on
    /// any failure.
    pub async fn put_blob(&self, d: &Digest, file: Arc<File>, size: u64) -> Result<()> {
        if self.has_blob(d).await? {
            return Ok(());
        }
        let path = self.blob_path(d);
        if size <= PART_SIZE {
            let bytes = read_at(file, 0, size)
                .await
                .map_err(|e| self.failed("put", e))?;
            // Up to 16 MiB: the time a slow link needs, not the metadata deadline.
            self.op_within(
                "put",
                self.timeout * 12,
                self.objects.put(&path, PutPayload::from(bytes)),
            )
            .await?;
        } else {
            self.put_parts(&path, file, size).await?;
        }
        self.metrics.uploaded.inc();
        self.remember(d);
        Ok(())
    }

    async fn put_parts(&self, path: &Path, file: Arc<File>, size: u64) -> Result<()> {
        let Some(id) = self
            .op("create_multipart", self.parts.create_multipart(path))
            .await?
        else {
            return Err(Unavailable("the store refused a multipart upload".into()));
        };
        let marker = UploadMarker {
            key: path.to_string(),
            id: id.clone(),
            started: crate::clock::now_secs(),
            replica: self.replica.clone(),
        };
        let marker_path = self.path(["uploads", &marker_name(&marker)]);
        let marked = serde_json::to_vec(&marker).unwrap_or_default();
        let result = async {
            self.op(
                "put",
                self.objects
                    .put(&marker_path, PutPayload::from(Bytes::from(marked))),
            )
            .await?;
            let mut done = Vec::new();
            let mut at = 0;
            while at < size {
                let n = PART_SIZE.min(size - at);
                let bytes = read_at(file.clone(), at, n)
                    .await
                    .map_err(|e| self.failed("put_part", e))?;
                // A part is big: give it the time a slow link needs, not the metadata deadline.
                let part = tokio::time::timeout(
                    self.timeout * 12,
                    self.parts
                        .put_part(path, &id, done.len(), PutPayload::from(bytes)),
                )
                .await
                .map_err(|_| self.failed("put_part", "timed out".into()))?
                .map_err(|e| self.failed("put_part", e.to_string()))?;
                done.push(part);
                at += n;
            }
            self.op(
                "complete_multipart",
                self.parts.complete_multipart(path, &id, done),
            )
            .await?;
            Ok::<_, Unavailable>(())
        }
        .await;
        // Clean-up goes out even while the tier is skipped after the failure that brought
        // us here; the marker stays (for `berth gc`) unless the abort went through.
        let clean = match &result {
            Ok(()) => true,
            Err(_) => matches!(
                tokio::time::timeout(self.timeout, self.parts.abort_multipart(path, &id)).await,
                Ok(Ok(()))
            ),
        };
        if clean {
            let _ = tokio::time::timeout(self.timeout, self.objects.delete(&marker_path)).await;
        }
        result
    }

    /// Aborts multipart uploads whose markers are older than `older_than` (their replica
    /// died mid-upload), and removes the markers. Returns how many were aborted.
    pub async fn abort_stale_uploads(&self, older_than: Duration) -> Result<usize> {
        let base = self.path(["uploads"]);
        let markers: Vec<_> = self.objects.list(Some(&base)).collect().await;
        let now = crate::clock::now_secs();
        let mut aborted = 0;
        for meta in markers {
            let meta = meta.map_err(|e| self.failed("list", e.to_string()))?;
            let Some(got) = self.op("get", self.objects.get(&meta.location)).await? else {
                continue;
            };
            let Some(bytes) = self.op("get", got.bytes()).await? else {
                continue;
            };
            let Ok(marker) = serde_json::from_slice::<UploadMarker>(&bytes) else {
                self.op("delete", self.objects.delete(&meta.location))
                    .await?;
                continue;
            };
            if now.saturating_sub(marker.started) < older_than.as_secs() {
                continue;
            }
            // The marker holds the key as the store spells it (already encoded).
            let Ok(key) = Path::parse(&marker.key) else {
                continue;
            };
            // An upload the store already forgot is as good as aborted.
            let _ = self
                .op(
                    "abort_multipart",
                    self.parts.abort_multipart(&key, &marker.id),
                )
                .await;
            self.op("delete", self.objects.delete(&meta.location))
                .await?;
            aborted += 1;
        }
        Ok(aborted)
    }
}

fn marker_name(m: &UploadMarker) -> String {
    let mut h = crate::oci::Hasher::new(crate::oci::Algorithm::Sha256);
    h.update(m.key.as_bytes());
    h.update(m.id.as_bytes());
    format!("{}.json", &h.finish().hex()[..32])
}

/// Reads `len` bytes at `at` on the blocking pool.
async fn read_at(file: Arc<File>, at: u64, len: u64) -> std::result::Result<Bytes, String> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("reading the local copy: {e}"))
}
