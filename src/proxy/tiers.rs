//! Manifests across the tiers of a fleet: what another replica stored in the shared tier
//! is taken from there (tag records included, so a tag validated by any replica is fresh
//! for all), what this replica fetched is written there, and a miss goes to the key's
//! owner, which alone spends the upstream's quota on it.

use super::manifests::ManifestAnswer;
use super::{internal, manifest_links, Proxy};
use crate::fleet::client::{self, Answer};
use crate::fleet::Fleet;
use crate::metrics::Outcome;
use crate::oci::{self, AcceptSet, Digest, ErrorCode, Reference, Repository};
use crate::store::shared::Shared;
use crate::store::{Store, StoredManifest, TagRecord};
use crate::upstream::Upstream;

impl Proxy {
    /// A manifest by digest from the shared tier, copied to the local store.
    pub(super) async fn shared_manifest(
        &self,
        up: &std::sync::Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, oci::Error> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let Ok(Some(m)) = shared.manifest(digest).await else {
            return Ok(None);
        };
        self.authorize_manifest(up, repo, digest).await?;
        keep_local(&self.store, up, repo, digest, &m).await?;
        Ok(Some(m))
    }
}

/// A tag record another replica wrote that is newer than this replica's: copied to the
/// local index (with its manifest), so the usual freshness rule applies to it. Runs in
/// the tag's flight, so a herd costs one read of the bucket, not one per client.
pub(super) async fn adopt_shared_tag(
    shared: &Shared,
    store: &Store,
    up: &Upstream,
    repo: &Repository,
    key: &str,
    local: Option<&TagRecord>,
    now_ms: u64,
) -> Result<(), oci::Error> {
    let Ok(Some(record)) = shared.tag(key).await else {
        return Ok(());
    };
    // A replica whose clock runs ahead must not make its records fresh for longer.
    let record = record.not_after(now_ms);
    if local.is_some_and(|l| l.validated_millis() >= record.validated_millis()) {
        return Ok(());
    }
    let have = store
        .manifest(&record.digest)
        .await
        .map_err(|e| internal("reading a stored manifest", e))?
        .is_some();
    if !have {
        let Ok(Some(m)) = shared.manifest(&record.digest).await else {
            return Ok(());
        };
        keep_local(store, up, repo, &record.digest, &m).await?;
    }
    store
        .put_tag(key.to_owned(), record)
        .await
        .map_err(|e| internal("writing the index", e))
}

/// Stores a verified manifest locally and links what it refers to.
async fn keep_local(
    store: &Store,
    up: &Upstream,
    repo: &Repository,
    digest: &Digest,
    m: &StoredManifest,
) -> Result<(), oci::Error> {
    store
        .put_manifest(digest, &m.media_type, m.bytes.clone())
        .await
        .map_err(|e| internal("storing a manifest", e))?;
    let links = manifest_links(&m.bytes, digest);
    store
        .link(up.host(), repo.as_str(), links)
        .await
        .map_err(|e| internal("writing the index", e))
}

/// Writes a fetched manifest, its links and (for a tag) its record to the shared tier.
/// A store that is down costs a log line, not the pull.
pub(super) async fn write_through(
    shared: &Shared,
    up: &Upstream,
    repo: &Repository,
    digest: &Digest,
    m: &StoredManifest,
    tag: Option<(&str, &TagRecord)>,
) {
    let links = manifest_links(&m.bytes, digest);
    let result = async {
        shared
            .put_manifest(digest, &m.media_type, m.bytes.clone())
            .await?;
        shared.link(up.host(), repo.as_str(), &links).await?;
        if let Some((key, record)) = tag {
            shared.put_tag(key, record).await?;
        }
        Ok::<_, crate::store::shared::Unavailable>(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%digest, error = %e, "manifest not written to the shared store");
    }
}

/// A manifest request to forward to its owner.
pub(super) struct Ask<'a> {
    pub up: &'a Upstream,
    pub repo: &'a Repository,
    pub reference: &'a Reference,
    pub accept: AcceptSet,
    /// Who pays, when per-client budgets are on.
    pub client: Option<&'a str>,
}

/// Asks a peer (the key's owner) for a manifest, and keeps what it sends. `None` when
/// the peer did not answer: the caller tries the next owner.
pub(super) async fn ask_owner(
    fleet: &Fleet,
    peer: &str,
    store: &Store,
    ask: &Ask<'_>,
) -> Option<Result<ManifestAnswer, oci::Error>> {
    let to = client::Ask {
        upstream: ask.up.host(),
        repo: ask.repo,
        client: ask.client,
    };
    let m = match fleet.manifest(peer, &to, ask.reference, ask.accept).await {
        Answer::Down => return None,
        Answer::Unknown => {
            return Some(Err(oci::Error::new(
                ErrorCode::ManifestUnknown,
                format!(
                    "manifest {} is not in {} on upstream {}",
                    ask.reference,
                    ask.repo,
                    ask.up.host()
                ),
            )))
        }
        Answer::Failed(e) => return Some(Err(e)),
        Answer::Got(m) => m,
    };
    let stored = StoredManifest {
        bytes: m.bytes.clone(),
        media_type: m.media_type.clone(),
    };
    if let Err(e) = keep_local(store, ask.up, ask.repo, &m.digest, &stored).await {
        return Some(Err(e));
    }
    Some(Ok(ManifestAnswer {
        digest: m.digest,
        media_type: m.media_type,
        bytes: m.bytes,
        outcome: if m.warning.is_some() {
            Outcome::Stale
        } else {
            Outcome::Miss
        },
        warning: m.warning,
    }))
}

/// Uploads to the shared tier in flight at once, per process.
static UPLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// How many times (5 s apart) a blob is offered to a shared store that is down.
const WRITE_THROUGH_ATTEMPTS: u32 = 24;

/// Uploads a blob just stored locally (and its repository link) to the shared tier, in
/// the background: off the clients' path, who have every byte already. Through a short
/// outage the upload waits for the store; after a long one the blob stays local only
/// (another replica's miss then fetches it again).
pub(super) async fn write_through_blob(
    shared: std::sync::Arc<Shared>,
    store: &Store,
    digest: &Digest,
    upstream: &str,
    repo: &Repository,
) {
    let Ok(Some(blob)) = store.open_blob(digest).await else {
        return;
    };
    let (digest, up, repo) = (digest.clone(), upstream.to_owned(), repo.to_string());
    tokio::spawn(async move {
        for attempt in 1..=WRITE_THROUGH_ATTEMPTS {
            let last = attempt == WRITE_THROUGH_ATTEMPTS;
            match upload_blob(&shared, &digest, blob.file.clone(), blob.size, &up, &repo).await {
                Ok(()) => return,
                Err(e) if last => {
                    tracing::warn!(%digest, error = %e, "blob not written to the shared store")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(5)).await,
            }
        }
    });
}

/// Uploads a verified blob and its repository link, once; a few at a time per process:
/// a herd of distinct layers must not hold hundreds of MiB of parts in memory at once.
pub(super) async fn upload_blob(
    shared: &Shared,
    digest: &Digest,
    file: std::sync::Arc<std::fs::File>,
    size: u64,
    upstream: &str,
    repo: &str,
) -> Result<(), crate::store::shared::Unavailable> {
    let Ok(_permit) = UPLOADS.acquire().await else {
        return Ok(());
    };
    shared.put_blob(digest, file, size).await?;
    shared
        .link(upstream, repo, std::slice::from_ref(digest))
        .await
}
