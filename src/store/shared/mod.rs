//! The shared tier: an object store (S3, GCS, Azure Blob, through the `object_store`
//! crate) that every replica of a fleet reads and writes, behind each replica's local
//! disk.
//!
//! Layout under the configured prefix:
//! - `blobs/<algorithm>/<hex>`: blobs and manifests by digest, written only after their
//!   bytes were verified (a manifest carries its media type as the object's content type);
//! - `tags/<upstream>/<repository>:<tag>#<accept set>` (the tag key's `/` as path
//!   separators; the store encodes `#`): a [`TagRecord`] as JSON;
//! - `links/<upstream>/<repository>/<algorithm>/<hex>`: empty objects saying the
//!   repository is known to hold the digest (what lets a replica serve another's fill);
//! - `uploads/<id>.json`: a marker per multipart upload in progress, removed when it
//!   completes or aborts; `berth gc` aborts the uploads of markers left by a dead replica.
//!
//! A big blob is uploaded in parts and becomes visible under its key only when the upload
//! completes, so no reader ever sees half an object. The store being slow or down is never
//! a failed pull: every operation has a deadline, a failure is logged once and counted,
//! and the tier is skipped for a few seconds (callers fall back to their local disk or to
//! fetching through).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::multipart::MultipartStore;
use object_store::path::{Path, PathPart};
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutOptions, PutPayload, RetryConfig,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{StoredManifest, TagRecord};

mod clients;
mod uploads;

use crate::config::SharedConfig;
use crate::oci::media::MAX_MANIFEST_BYTES;
use crate::oci::Digest;
use clients::clients;

/// Blobs up to this size go up in one PUT; bigger ones in parts of this size.
const PART_SIZE: u64 = 16 * 1024 * 1024;
/// After a failure the tier is skipped this long before it is tried again.
const BACKOFF: Duration = Duration::from_secs(5);
/// Digests known to be in the store (no HEAD per hit in redirect mode); bounded, and
/// forgotten after `KNOWN_FOR` so that an object an expiry rule removed is noticed.
const KNOWN_MAX: usize = 100_000;
const KNOWN_FOR: Duration = Duration::from_secs(60);

/// The tier could not answer (unreachable, slow, refused): the caller falls back.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shared store unavailable: {}", self.0)
    }
}

type Result<T> = std::result::Result<T, Unavailable>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    result: &'static str,
}

/// The shared tier's metrics, registered by the tier itself.
#[derive(Clone, Default)]
pub struct SharedMetrics {
    requests: Family<OpLabels, Counter>,
    available: Gauge,
    uploaded: Counter,
}

impl SharedMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = SharedMetrics::default();
        registry.register(
            "shared_requests",
            "Requests to the shared object store by operation and result (ok, missing, error)",
            m.requests.clone(),
        );
        registry.register(
            "shared_available",
            "1 while the shared object store answers, 0 while it is skipped after a failure",
            m.available.clone(),
        );
        registry.register(
            "shared_uploaded_blobs",
            "Blobs and manifests this replica wrote to the shared object store",
            m.uploaded.clone(),
        );
        m
    }
}

pub struct Shared {
    objects: Arc<dyn ObjectStore>,
    parts: Arc<dyn MultipartStore>,
    signer: Arc<dyn Signer>,
    prefix: Vec<String>,
    timeout: Duration,
    redirect: Option<Duration>,
    replica: String,
    health: Health,
    known: Mutex<HashMap<Digest, Instant>>,
    metrics: SharedMetrics,
    description: String,
}

#[derive(Default)]
struct Health {
    skip_until: Mutex<Option<Instant>>,
    /// Set while the tier is failing: the failure is logged once, the recovery once.
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    /// Builds the client from the configuration; `replica` names this process in upload
    /// markers. Contacts nothing: a store that is down at start is a degraded tier, not a
    /// failed start.
    pub fn new(
        config: &SharedConfig,
        replica: &str,
        metrics: SharedMetrics,
    ) -> std::result::Result<Shared, String> {
        let options = ClientOptions::new()
            .with_connect_timeout(config.timeout)
            // Bodies of big blobs stream for minutes; the stall is bounded by the reader.
            .with_timeout(Duration::from_secs(3600))
            .with_allow_http(
                config
                    .endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: config.timeout,
            ..RetryConfig::default()
        };
        let (objects, parts, signer) = clients(config, options, retry)?;
        metrics.available.set(1);
        Ok(Shared {
            objects,
            parts,
            signer,
            prefix: config
                .prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            timeout: config.timeout,
            redirect: config.redirect.then_some(config.redirect_ttl),
            replica: replica.to_owned(),
            health: Health::default(),
            known: Mutex::new(HashMap::new()),
            metrics,
            description: format!(
                "{:?} bucket {} prefix {:?}",
                config.kind, config.bucket, config.prefix
            )
            .to_lowercase(),
        })
    }

    fn path<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(|p| PathPart::from(p.clone()))
                .chain(parts.into_iter().map(|p| PathPart::from(p.to_owned()))),
        )
    }

    fn blob_path(&self, d: &Digest) -> Path {
        self.path(["blobs", d.algorithm().as_str(), d.hex()])
    }

    /// `tags/<upstream>/<repository>/<tag>#<accept set>`: browsable by repository.
    fn tag_path(&self, key: &str) -> Path {
        self.path(std::iter::once("tags").chain(key.split('/')))
    }

    fn link_path(&self, upstream: &str, repository: &str, d: &Digest) -> Path {
        self.path(
            ["links", upstream]
                .into_iter()
                .chain(repository.split('/'))
                .chain([d.algorithm().as_str(), d.hex()]),
        )
    }

    /// Whether blob hits should be answered with a presigned URL.
    pub fn redirects(&self) -> bool {
        self.redirect.is_some()
    }

    /// Whether the tier is being skipped after a failure.
    pub fn skipped(&self) -> bool {
        self.health
            .skip_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// What `/readyz` and the status page say of the tier: `None` when healthy.
    pub fn trouble(&self) -> Option<String> {
        if !self.health.failing.load(Ordering::Relaxed) {
            return None;
        }
        self.health
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs one operation with the tier's deadline, recording its health.
    async fn op<T>(
        &self,
        op: &'static str,
        work: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>> {
        self.op_within(op, self.timeout, work).await
    }

    /// Like [`Self::op`] with a deadline of its own (uploads of many bytes).
    async fn op_within<T>(
        &self,
        op: &'static str,
        deadline: Duration,
        work: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>> {
        if self.skipped() {
            return Err(Unavailable(format!(
                "{} (skipped after a failure)",
                self.description
            )));
        }
        let outcome = match tokio::time::timeout(deadline, work).await {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(object_store::Error::NotFound { .. })) => Ok(None),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(deadline)
            )),
        };
        let result = match &outcome {
            Ok(Some(_)) => "ok",
            Ok(None) => "missing",
            Err(_) => "error",
        };
        self.metrics
            .requests
            .get_or_create(&OpLabels { op, result })
            .inc();
        match outcome {
            Ok(v) => {
                self.healthy();
                Ok(v)
            }
            Err(e) => Err(self.failed(op, e)),
        }
    }

    fn healthy(&self) {
        if self.health.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(store = %self.description, "the shared store answers again");
            self.metrics.available.set(1);
        }
    }

    fn failed(&self, op: &str, e: String) -> Unavailable {
        let message = format!("{}: {op}: {e}", self.description);
        *self
            .health
            .skip_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + BACKOFF);
        *self
            .health
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
        if !self.health.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %message,
                "the shared store is unavailable: serving from local disk and fetching misses through without storing them there");
            self.metrics.available.set(0);
        }
        Unavailable(message)
    }

    /// The size of a stored blob; `None` when the tier does not hold it.
    pub async fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        let path = self.blob_path(d);
        let size = self
            .op("head", self.objects.head(&path))
            .await?
            .map(|m| m.size);
        if size.is_some() {
            self.remember(d);
        }
        Ok(size)
    }

    fn remember(&self, d: &Digest) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_MAX {
            known.clear();
        }
        known.insert(d.clone(), Instant::now() + KNOWN_FOR);
    }

    /// Whether the tier is known (or found) to hold a blob.
    pub async fn has_blob(&self, d: &Digest) -> Result<bool> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .is_some_and(|until| Instant::now() < *until);
        if known {
            return Ok(true);
        }
        Ok(self.blob_size(d).await?.is_some())
    }

    /// Removes a blob whose object turned out not to hash to its name (a corrupt store,
    /// or a writer that was not berth): the next miss fetches it again.
    pub async fn forget_blob(&self, d: &Digest) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(d);
        let path = self.blob_path(d);
        tracing::warn!(digest = %d, "the shared store's object for this digest holds other bytes; removing it");
        let _ = tokio::time::timeout(self.timeout, self.objects.delete(&path)).await;
    }

    /// Streams a blob from byte `from`: its full size and the bytes. `None` when not held.
    pub async fn blob_stream(
        &self,
        d: &Digest,
        from: u64,
    ) -> Result<Option<(u64, BoxStream<'static, std::result::Result<Bytes, String>>)>> {
        let options = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let path = self.blob_path(d);
        let Some(got) = self
            .op("get", self.objects.get_opts(&path, options))
            .await?
        else {
            return Ok(None);
        };
        let size = got.meta.size;
        let stream = got
            .into_stream()
            .map(|r| r.map_err(|e| e.to_string()))
            .boxed();
        Ok(Some((size, stream)))
    }

    /// A presigned GET URL for a blob the tier holds (redirect mode).
    pub async fn presigned(&self, d: &Digest) -> Result<Option<reqwest::Url>> {
        let Some(ttl) = self.redirect else {
            return Ok(None);
        };
        let path = self.blob_path(d);
        self.op(
            "presign",
            self.signer.signed_url(reqwest::Method::GET, &path, ttl),
        )
        .await
    }

    /// A manifest by digest. An object over the manifest size limit (a layer asked for
    /// as a manifest), or whose bytes do not hash to its name, is no manifest: `None`,
    /// without reading it whole.
    pub async fn manifest(&self, d: &Digest) -> Result<Option<StoredManifest>> {
        let path = self.blob_path(d);
        let Some(got) = self.op("get", self.objects.get(&path)).await? else {
            return Ok(None);
        };
        if got.meta.size > MAX_MANIFEST_BYTES as u64 {
            return Ok(None);
        }
        let stored_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string())
            .filter(|mt| crate::oci::AcceptSet::ALL.accepts(mt));
        let Some(bytes) = self.op("get", got.bytes()).await? else {
            return Ok(None);
        };
        // Checked like anything fetched: a store that returns other bytes is not trusted.
        let mut h = d.hasher();
        h.update(&bytes);
        if &h.finish() != d {
            tracing::warn!(digest = %d, "the shared store's object for this digest holds other bytes; ignoring it");
            return Ok(None);
        }
        let Some(media_type) =
            stored_type.or_else(|| crate::oci::manifest::sniff_media_type(&bytes))
        else {
            return Ok(None);
        };
        Ok(Some(StoredManifest { bytes, media_type }))
    }

    /// Stores a manifest whose bytes the caller verified against `d`.
    pub async fn put_manifest(&self, d: &Digest, media_type: &str, bytes: Bytes) -> Result<()> {
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, media_type.to_owned().into());
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let path = self.blob_path(d);
        self.op(
            "put",
            self.objects
                .put_opts(&path, PutPayload::from(bytes), options),
        )
        .await?;
        self.metrics.uploaded.inc();
        self.remember(d);
        Ok(())
    }

    pub async fn tag(&self, key: &str) -> Result<Option<TagRecord>> {
        let path = self.tag_path(key);
        let Some(got) = self.op("get", self.objects.get(&path)).await? else {
            return Ok(None);
        };
        let Some(bytes) = self.op("get", got.bytes()).await? else {
            return Ok(None);
        };
        // A record berth cannot read (another version wrote it) is no record.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    pub async fn put_tag(&self, key: &str, record: &TagRecord) -> Result<()> {
        let body = serde_json::to_vec(record).unwrap_or_default();
        let path = self.tag_path(key);
        self.op("put", self.objects.put(&path, PutPayload::from(body)))
            .await
            .map(drop)
    }

    /// Forgets tag records (the admin API's delete), by the same key prefix as the index:
    /// `<upstream>/<repository>/<tag>#`.
    pub async fn remove_tags(&self, prefix: &str) -> Result<usize> {
        match tokio::time::timeout(self.timeout * 6, self.remove_tags_unbounded(prefix)).await {
            Ok(r) => r,
            Err(_) => Err(self.failed("list", "removing tag records took too long".into())),
        }
    }

    async fn remove_tags_unbounded(&self, prefix: &str) -> Result<usize> {
        let (dir, name) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let base = self.path(std::iter::once("tags").chain(dir.split('/')));
        let depth = base.parts().count() + 1;
        let name = PathPart::from(name.to_owned()).as_ref().to_owned();
        let listed: Vec<_> = self.objects.list(Some(&base)).collect().await;
        let mut removed = 0;
        for meta in listed {
            let meta = meta.map_err(|e| self.failed("list", e.to_string()))?;
            let here = meta.location.parts().count() == depth;
            if here
                && meta
                    .location
                    .filename()
                    .is_some_and(|f| f.starts_with(&name))
            {
                self.op("delete", self.objects.delete(&meta.location))
                    .await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub async fn is_linked(&self, upstream: &str, repository: &str, d: &Digest) -> Result<bool> {
        let path = self.link_path(upstream, repository, d);
        Ok(self.op("head", self.objects.head(&path)).await?.is_some())
    }

    pub async fn link(&self, upstream: &str, repository: &str, digests: &[Digest]) -> Result<()> {
        let puts = digests.iter().map(|d| {
            let path = self.link_path(upstream, repository, d);
            async move {
                self.op("put", self.objects.put(&path, PutPayload::default()))
                    .await
            }
        });
        for r in futures_util::future::join_all(puts).await {
            r?;
        }
        Ok(())
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Checks the tier answers: a listing of one key.
    pub async fn probe(&self) -> Result<()> {
        let base = self.path(["uploads"]);
        let listing = self.objects.list_with_delimiter(Some(&base));
        self.op("list", listing).await.map(drop)
    }
}
