//! Manifest policy. By digest: immutable, fetched once and never again. By tag: fresh
//! within the upstream's `tag_ttl`; stale tags are revalidated with a HEAD (free on Docker
//! Hub) and only a moved tag costs a GET. When upstream cannot answer, the stored copy is
//! served with a `Warning`. Concurrent fetches or revalidations of one key coalesce.

use std::sync::Arc;

use bytes::Bytes;

use super::flying::Parts;
use super::freshness::{self, Before};
use super::negative::NegativeCache;
use super::tiers::{adopt_shared_tag, write_through};
use super::{internal, manifest_links, Caller, Proxy};
use crate::metrics::{Metrics, Outcome, UpstreamLabels};
use crate::oci::{self, AcceptSet, Digest, ErrorCode, Reference, Repository, Tag};
use crate::quota::{Payer, Purpose};
use crate::store::{CommitError, StoredManifest, TagRecord};
use crate::upstream::{self, ManifestResponse, Upstream};

/// A manifest to send: the upstream's exact bytes and media type.
#[derive(Clone, Debug)]
pub struct ManifestAnswer {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub outcome: Outcome,
    /// Set on stale answers: why upstream was not (or could not be) asked.
    pub warning: Option<String>,
}

impl ManifestAnswer {
    pub(super) fn stored(digest: Digest, m: StoredManifest, outcome: Outcome) -> Self {
        ManifestAnswer {
            digest,
            media_type: m.media_type,
            bytes: m.bytes,
            outcome,
            warning: None,
        }
    }
}

fn tag_key(up: &Upstream, repo: &Repository, tag: &Tag, accept: AcceptSet) -> String {
    format!("{}{}", tag_key_prefix(up, repo, tag), accept.key())
}

/// The index key of a tag, without its accept set: every variant starts with it.
pub fn tag_key_prefix(up: &Upstream, repo: &Repository, tag: &Tag) -> String {
    format!("{}/{repo}:{tag}#", up.host())
}

/// What berth holds for a tag, for a client with this accept set: the record made for
/// the same set, or else the freshest variant fetched for a broader set (by another
/// client, or the warm list) whose media type this client accepts. A variant fetched for
/// a narrower set is never reused: the upstream may have answered it with one platform's
/// manifest where this client would get the index.
pub(super) async fn find_tag(
    store: &crate::store::Store,
    up: &Upstream,
    repo: &Repository,
    tag: &Tag,
    accept: AcceptSet,
) -> Result<Option<TagRecord>, oci::Error> {
    let read = |e: std::io::Error| internal("reading the index", e);
    if let Some(r) = store
        .tag(&tag_key(up, repo, tag, accept))
        .await
        .map_err(read)?
    {
        return Ok(Some(r));
    }
    Ok(store
        .tags_with_prefix(&tag_key_prefix(up, repo, tag))
        .await
        .map_err(read)?
        .into_iter()
        .filter(|(key, r)| {
            let fetched_for = key
                .rsplit_once('#')
                .and_then(|(_, k)| k.parse::<u8>().ok())
                .and_then(AcceptSet::from_key);
            fetched_for.is_some_and(|set| set.contains(accept)) && accept.accepts(&r.media_type)
        })
        .map(|(_, r)| r)
        .max_by_key(|r| r.validated_millis()))
}

/// The stored answer for a tag validated within its TTL, if there is one.
async fn fresh_tag(
    store: &crate::store::Store,
    up: &Upstream,
    repo: &Repository,
    tag: &Tag,
    accept: AcceptSet,
    now_ms: u64,
) -> Result<Option<ManifestAnswer>, oci::Error> {
    let Some(r) = find_tag(store, up, repo, tag, accept).await? else {
        return Ok(None);
    };
    if freshness::before_asking(Some(r.validated_millis()), now_ms, up.tag_ttl) != Before::Fresh {
        return Ok(None);
    }
    Ok(store
        .manifest(&r.digest)
        .await
        .map_err(|e| internal("reading a stored manifest", e))?
        .map(|m| ManifestAnswer::stored(r.digest, m, Outcome::Hit)))
}

/// The answer for a tag the upstream said it does not have, while berth remembers that
/// (the upstream's `negative_ttl`): no upstream request, and counted. Checked after the
/// stored copy, as an upstream 404 already outranks a stale one (see `refresh_tag`).
fn remembered_unknown(
    negative: &NegativeCache,
    metrics: &Metrics,
    up: &Upstream,
    repo: &Repository,
    tag: &Tag,
    key: &str,
) -> Option<oci::Error> {
    let remembered = negative.lookup(key)?;
    metrics
        .negative_cache_hits
        .get_or_create(&UpstreamLabels {
            upstream: up.host().to_owned(),
        })
        .inc();
    Some(oci::Error::new(
        ErrorCode::ManifestUnknown,
        format!(
            "manifest {tag} is not in {repo} on upstream {} (it said so {}s ago; berth asks \
             again in {}s, see negative_ttl)",
            up.host(),
            remembered.age.as_secs(),
            remembered.left.as_secs().max(1)
        ),
    ))
}

fn unknown(up: &Upstream, repo: &Repository, reference: &Reference) -> oci::Error {
    oci::Error::new(
        ErrorCode::ManifestUnknown,
        format!(
            "manifest {reference} is not in {repo} on upstream {}",
            up.host()
        ),
    )
}

impl Proxy {
    /// A manifest by tag or digest. `client` names who pays, when per-client budgets are
    /// on: the client whose request makes berth spend quota.
    pub async fn manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        reference: &Reference,
        accept: AcceptSet,
        caller: &Caller,
    ) -> Result<ManifestAnswer, oci::Error> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(up, repo, d, caller).await,
            Reference::Tag(t) => self.manifest_by_tag(up, repo, t, accept, caller).await,
        }
    }

    async fn manifest_by_digest(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
        caller: &Caller,
    ) -> Result<ManifestAnswer, oci::Error> {
        if let Some(m) = self.stored_manifest(digest).await? {
            self.authorize_manifest(up, repo, digest).await?;
            return Ok(ManifestAnswer::stored(digest.clone(), m, Outcome::Hit));
        }
        // Boxed from here on (as the tag path's flight): a hit does not carry the miss
        // path's large state.
        if let Some(m) = Box::pin(self.shared_manifest(up, repo, digest)).await? {
            return Ok(ManifestAnswer::stored(digest.clone(), m, Outcome::Hit));
        }
        let key = format!("{}/{repo}@{digest}", up.host());
        let work = |this: Parts| {
            let (up, repo, digest) = (up.clone(), repo.clone(), digest.clone());
            async move {
                let reference = Reference::Digest(digest.clone());
                let owned_key = digest.to_string();
                if let Some(answer) = this
                    .ask_owners(&owned_key, &up, &repo, &reference, AcceptSet::ALL)
                    .await
                {
                    return answer;
                }
                this.fetch_by_digest(&up, &repo, &digest).await
            }
        };
        Box::pin(self.fly(key, caller, work)).await
    }

    async fn manifest_by_tag(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        tag: &Tag,
        accept: AcceptSet,
        caller: &Caller,
    ) -> Result<ManifestAnswer, oci::Error> {
        let key = tag_key(up, repo, tag, accept);
        let flight_key = key.clone();
        let now = self.clock.now_millis();
        if let Some(hit) = fresh_tag(&self.store, up, repo, tag, accept, now).await? {
            return Ok(hit);
        }
        if let Some(e) = remembered_unknown(&self.negative, &self.metrics, up, repo, tag, &key) {
            return Err(e);
        }
        let work = |this: Parts| {
            let (up, repo, tag, key) = (up.clone(), repo.clone(), tag.clone(), key.clone());
            async move {
                // A flight that ended since the check above may have just learnt it.
                if let Some(e) =
                    remembered_unknown(&this.negative, &this.metrics, &up, &repo, &tag, &key)
                {
                    return Err(e);
                }
                if let Some(shared) = &this.shared {
                    // Another replica may have validated it: its record is as good as ours.
                    let local = find_tag(&this.store, &up, &repo, &tag, accept).await?;
                    let now = this.clock.now_millis();
                    adopt_shared_tag(shared, &this.store, &up, &repo, &key, local.as_ref(), now)
                        .await?;
                    if let Some(hit) = fresh_tag(&this.store, &up, &repo, &tag, accept, now).await?
                    {
                        return Ok(hit);
                    }
                }
                let reference = Reference::Tag(tag.clone());
                let owned_key = tag_key_prefix(&up, &repo, &tag);
                // No local tag record from the owner's answer: the owner's record (in the
                // bucket) carries when it was really validated, which a record made here
                // now would not.
                if let Some(answer) = this
                    .ask_owners(&owned_key, &up, &repo, &reference, accept)
                    .await
                {
                    return answer;
                }
                this.refresh_tag(&up, &repo, &tag, accept, key).await
            }
        };
        Box::pin(self.fly(flight_key, caller, work)).await
    }

    async fn stored_manifest(&self, digest: &Digest) -> Result<Option<StoredManifest>, oci::Error> {
        self.store
            .manifest(digest)
            .await
            .map_err(|e| internal("reading a stored manifest", e))
    }

    /// Same rule as for blobs, confirmed with a (free) manifest HEAD.
    pub(super) async fn authorize_manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(), oci::Error> {
        let reference = Reference::Digest(digest.clone());
        self.authorize(
            up,
            repo,
            digest,
            || up.head_manifest(repo, &reference, AcceptSet::ALL),
            || unknown(up, repo, &reference),
        )
        .await
    }
}

impl Parts {
    /// A manifest GET, paid by this flight's client if the upstream counts it.
    async fn counted_get(
        &self,
        up: &Upstream,
        repo: &Repository,
        reference: &Reference,
        accept: AcceptSet,
        purpose: Purpose,
    ) -> Result<Option<ManifestResponse>, upstream::Error> {
        let payer = Payer::new(purpose, self.client.clone());
        up.get_manifest(repo, reference, accept, &payer).await
    }

    async fn fetch_by_digest(
        &self,
        up: &Upstream,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<ManifestAnswer, oci::Error> {
        let reference = Reference::Digest(digest.clone());
        let fetched = match self
            .counted_get(up, repo, &reference, AcceptSet::ALL, Purpose::New)
            .await
        {
            Ok(Some(m)) => m,
            Ok(None) => return Err(unknown(up, repo, &reference)),
            Err(e) => return Err(e.to_oci(up.host())),
        };
        self.keep(up, repo, digest, &fetched).await?;
        Ok(ManifestAnswer {
            digest: digest.clone(),
            media_type: fetched.media_type,
            bytes: fetched.bytes,
            outcome: Outcome::Miss,
            warning: None,
        })
    }

    /// Verifies a fetched manifest against `digest`, stores it and links what it refers to.
    async fn keep(
        &self,
        up: &Upstream,
        repo: &Repository,
        digest: &Digest,
        m: &ManifestResponse,
    ) -> Result<(), oci::Error> {
        if let Some(claimed) = &m.digest {
            if claimed != digest {
                return Err(mismatch(up, digest, claimed));
            }
        }
        match self
            .store
            .put_manifest(digest, &m.media_type, m.bytes.clone())
            .await
        {
            Ok(()) => {}
            Err(CommitError::Mismatch { actual }) => return Err(mismatch(up, digest, &actual)),
            Err(CommitError::Io(e)) => return Err(internal("storing a manifest", e)),
        }
        let links = manifest_links(&m.bytes, digest);
        self.store
            .link(up.host(), repo.as_str(), links)
            .await
            .map_err(|e| internal("writing the index", e))?;
        if let Some(shared) = &self.shared {
            let stored = StoredManifest {
                bytes: m.bytes.clone(),
                media_type: m.media_type.clone(),
            };
            write_through(shared, up, repo, digest, &stored, None).await;
        }
        Ok(())
    }

    pub(super) async fn fetch_tag(
        &self,
        up: &Upstream,
        repo: &Repository,
        tag: &Tag,
        accept: AcceptSet,
        key: String,
        purpose: Purpose,
    ) -> Result<ManifestAnswer, FetchError> {
        let reference = Reference::Tag(tag.clone());
        let fetched = match self
            .counted_get(up, repo, &reference, accept, purpose)
            .await
        {
            Ok(Some(m)) => m,
            Ok(None) => return Err(FetchError::Oci(self.unknown_tag(up, repo, tag, &key))),
            Err(e) => return Err(FetchError::Upstream(e)),
        };
        // The digest of a tag is the hash of the exact bytes, in the algorithm the
        // upstream used if it said one.
        let digest = {
            let mut h = match &fetched.digest {
                Some(d) => d.hasher(),
                None => crate::oci::Hasher::new(crate::oci::Algorithm::Sha256),
            };
            h.update(&fetched.bytes);
            h.finish()
        };
        self.keep(up, repo, &digest, &fetched)
            .await
            .map_err(FetchError::Oci)?;
        let record =
            TagRecord::fetched(digest.clone(), &fetched.media_type, self.clock.now_millis());
        self.put_tag(key, record).await?;
        Ok(ManifestAnswer {
            digest,
            media_type: fetched.media_type,
            bytes: fetched.bytes,
            outcome: Outcome::Miss,
            warning: None,
        })
    }

    /// The upstream answered 404 for this tag: remembered for its `negative_ttl`. Only
    /// a 404 gets here; auth failures, 429s, timeouts and 5xx are `upstream::Error`s,
    /// which say nothing about whether the tag exists.
    pub(super) fn unknown_tag(
        &self,
        up: &Upstream,
        repo: &Repository,
        tag: &Tag,
        key: &str,
    ) -> oci::Error {
        self.negative.remember(key, up.negative_ttl);
        unknown(up, repo, &Reference::Tag(tag.clone()))
    }

    /// Records a tag here and in the shared tier, where every replica sees it.
    pub(super) async fn put_tag(&self, key: String, record: TagRecord) -> Result<(), oci::Error> {
        self.negative.forget(&key);
        if let Some(shared) = &self.shared {
            if let Err(e) = shared.put_tag(&key, &record).await {
                tracing::debug!(key, error = %e, "tag record not written to the shared store");
            }
        }
        self.put_local_tag(key, record).await
    }
}

pub(super) enum FetchError {
    Upstream(upstream::Error),
    Oci(oci::Error),
}

impl From<oci::Error> for FetchError {
    fn from(e: oci::Error) -> Self {
        FetchError::Oci(e)
    }
}

impl FetchError {
    pub(super) fn into_oci(self, up: &Upstream) -> oci::Error {
        match self {
            FetchError::Upstream(e) => e.to_oci(up.host()),
            FetchError::Oci(e) => e,
        }
    }
}

fn mismatch(up: &Upstream, expected: &Digest, actual: &Digest) -> oci::Error {
    oci::Error::new(
        ErrorCode::UpstreamDigestMismatch,
        format!(
            "upstream {} sent a manifest for {expected} that hashes to {actual}; nothing stored",
            up.host()
        ),
    )
}
