//! Revalidating a tag the policy found stale or unknown (`freshness` decides each step;
//! this does the I/O it asks for): a HEAD when something is stored, a GET only when the
//! tag moved or was never seen, the stored copy with a `Warning` when the upstream fails.

use super::flying::Parts;
use super::freshness::{self, AfterHead, Before, HeadSaid};
use super::manifests::{find_tag, FetchError, ManifestAnswer};
use super::{internal, manifest_links};
use crate::metrics::Outcome;
use crate::oci::{self, AcceptSet, Digest, Reference, Repository, Tag};
use crate::quota::Purpose;
use crate::store::{StoredManifest, TagRecord};
use crate::upstream::{self, Upstream};

impl Parts {
    /// A tag that is stale or unknown: revalidate with HEAD when something is stored,
    /// GET when the tag moved or was never seen, stale copy when upstream fails. What to
    /// do at each step is decided in `freshness`; this does the I/O it asks for.
    pub(super) async fn refresh_tag(
        &self,
        up: &Upstream,
        repo: &Repository,
        tag: &Tag,
        accept: AcceptSet,
        key: String,
    ) -> Result<ManifestAnswer, oci::Error> {
        let record = find_tag(&self.store, up, repo, tag, accept).await?;
        let stored = match &record {
            Some(r) => self
                .store
                .manifest(&r.digest)
                .await
                .map_err(|e| internal("reading a stored manifest", e))?
                .map(|m| (r.clone(), m)),
            None => None,
        };
        let validated = stored.as_ref().map(|(r, _)| r.validated_millis());
        // Another request may have refreshed the tag while this one queued.
        match (
            freshness::before_asking(validated, self.clock.now_millis(), up.tag_ttl),
            stored,
        ) {
            (Before::Fresh, Some((record, manifest))) => Ok(ManifestAnswer::stored(
                record.digest,
                manifest,
                Outcome::Hit,
            )),
            (Before::Revalidate, Some(held)) => {
                self.revalidate(up, repo, tag, accept, key, held).await
            }
            _ => self
                .fetch_tag(up, repo, tag, accept, key, Purpose::New)
                .await
                .map_err(|e| e.into_oci(up)),
        }
    }

    /// A stale tag berth holds (its record and manifest): a HEAD (free), and what
    /// `freshness::after_head` says.
    async fn revalidate(
        &self,
        up: &Upstream,
        repo: &Repository,
        tag: &Tag,
        accept: AcceptSet,
        key: String,
        (record, manifest): (TagRecord, StoredManifest),
    ) -> Result<ManifestAnswer, oci::Error> {
        let reference = Reference::Tag(tag.clone());
        let head = up.head_manifest(repo, &reference, accept).await;
        // Moved: a manifest berth already holds (and the client accepts) costs nothing.
        let mut moved_to = None;
        let said = match &head {
            Ok(Some(h)) if h.digest.as_ref() == Some(&record.digest) => HeadSaid::Same,
            Ok(Some(h)) => match &h.digest {
                Some(new) => {
                    moved_to = self
                        .store
                        .manifest(new)
                        .await
                        .map_err(|e| internal("reading a stored manifest", e))?
                        .filter(|m| accept.accepts(&m.media_type))
                        .map(|m| (new.clone(), m));
                    HeadSaid::Moved {
                        held: moved_to.is_some(),
                    }
                }
                None => HeadSaid::NoDigest,
            },
            Ok(None) => HeadSaid::Gone,
            Err(e) => HeadSaid::Failed {
                stale_ok: e.allows_stale(),
            },
        };
        match (freshness::after_head(said), head, moved_to) {
            (AfterHead::Revalidated, _, _) => {
                let refreshed = record.clone().validated(self.clock.now_millis());
                self.put_tag(key, refreshed).await?;
                Ok(ManifestAnswer::stored(
                    record.digest,
                    manifest,
                    Outcome::Revalidated,
                ))
            }
            (AfterHead::Adopt, _, Some((new, m))) => self.adopt(up, repo, key, new, m).await,
            (AfterHead::Unknown, _, _) => Err(self.unknown_tag(up, repo, tag, &key)),
            (AfterHead::Stale, Err(e), _) => Ok(self.stale(up, record, manifest, &e)),
            (AfterHead::Refuse, Err(e), _) => Err(e.to_oci(up.host())),
            // The tag moved: fetching it refreshes an image berth already holds.
            _ => match self
                .fetch_tag(up, repo, tag, accept, key, Purpose::Refresh)
                .await
            {
                Ok(mut a) => {
                    a.outcome = Outcome::Revalidated;
                    Ok(a)
                }
                Err(FetchError::Upstream(e))
                    if freshness::after_failed_refetch(e.allows_stale()) == AfterHead::Stale =>
                {
                    Ok(self.stale(up, record, manifest, &e))
                }
                Err(e) => Err(e.into_oci(up)),
            },
        }
    }

    /// Points the tag at `new`, a manifest berth already holds, as the upstream's HEAD
    /// said it moved there.
    async fn adopt(
        &self,
        up: &Upstream,
        repo: &Repository,
        key: String,
        new: Digest,
        m: StoredManifest,
    ) -> Result<ManifestAnswer, oci::Error> {
        let record = TagRecord::fetched(new.clone(), &m.media_type, self.clock.now_millis());
        self.put_tag(key, record).await?;
        let links = manifest_links(&m.bytes, &new);
        self.store
            .link(up.host(), repo.as_str(), links)
            .await
            .map_err(|e| internal("writing the index", e))?;
        Ok(ManifestAnswer::stored(new, m, Outcome::Revalidated))
    }

    fn stale(
        &self,
        up: &Upstream,
        record: TagRecord,
        m: StoredManifest,
        e: &upstream::Error,
    ) -> ManifestAnswer {
        super::count_quota_stale(&self.metrics, up.host(), e);
        stale(up, record, m, e, self.clock.now_millis())
    }
}

fn stale(
    up: &Upstream,
    record: TagRecord,
    m: StoredManifest,
    e: &upstream::Error,
    now_ms: u64,
) -> ManifestAnswer {
    let age = now_ms.saturating_sub(record.validated_millis()) / 1000;
    tracing::warn!(upstream = up.host(), error = %e, "serving a stale tag");
    ManifestAnswer {
        digest: record.digest,
        media_type: m.media_type,
        bytes: m.bytes,
        outcome: Outcome::Stale,
        warning: Some(format!(
            "upstream {} could not revalidate this tag ({e}); serving the copy last validated {age}s ago",
            up.host()
        )),
    }
}
