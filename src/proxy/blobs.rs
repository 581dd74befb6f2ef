//! Blob policy: a stored blob is a hit (once the repository is known to hold it); a miss
//! joins or starts the one fill for its digest.

use std::sync::Arc;

use super::body::BlobSource;
use super::fill::Joined;
use super::{internal, Proxy};
use crate::metrics::Outcome;
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::upstream::Upstream;

/// What the server needs to answer a blob request.
pub struct BlobAnswer {
    /// The blob's size, when known (a fill whose upstream sent no length does not know).
    pub size: Option<u64>,
    /// Where the bytes come from; `None` for a HEAD answered from upstream metadata.
    pub source: Option<BlobSource>,
    pub outcome: Outcome,
}

impl Proxy {
    pub async fn blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, oci::Error> {
        if let Some(answer) = self.stored_blob(up, repo, digest).await? {
            return Ok(answer);
        }
        if head {
            if let Some(fill) = self.fills.in_progress(digest) {
                if &fill.repository != repo {
                    self.authorize_blob(up, repo, digest).await?;
                }
                if let Some(total) = fill.started().await?.total {
                    return Ok(BlobAnswer {
                        size: Some(total),
                        source: None,
                        outcome: Outcome::Coalesced,
                    });
                }
            }
            // A HEAD does not start a fill: HEADs are free upstream and often only probe.
            return match up.head_blob(repo, digest).await {
                Ok(Some(size)) => Ok(BlobAnswer {
                    size: Some(size),
                    source: None,
                    outcome: Outcome::Miss,
                }),
                Ok(None) => Err(blob_unknown(up, repo, digest)),
                Err(e) => Err(e.to_oci(up.host())),
            };
        }
        let (fill, outcome) =
            match self
                .fills
                .join_or_start(&self.store, up, repo, digest, &self.metrics)
            {
                Joined::Stored => {
                    // Finished between our look and the join: it is a hit after all.
                    return match self.stored_blob(up, repo, digest).await? {
                        Some(a) => Ok(a),
                        None => Err(internal("blob vanished after its fill", digest)),
                    };
                }
                Joined::Started(f) => (f, Outcome::Miss),
                Joined::Following(f) => {
                    // Joined a fill started for another repository: this one must hold
                    // the blob too (checked after joining, so nothing slips in between).
                    if &f.repository != repo {
                        self.authorize_blob(up, repo, digest).await?;
                    }
                    (f, Outcome::Coalesced)
                }
            };
        // Follow before waiting for the start: a follower registered now gets every byte
        // even if the disk fills up and the fill has to pass them through.
        let follower = fill.follow().ok_or_else(|| {
            oci::Error::new(
                ErrorCode::Unavailable,
                format!("berth's store is full and {digest} is being passed through to other clients; retry shortly"),
            )
            .retry_after(std::time::Duration::from_secs(5))
        })?;
        let progress = fill.started().await?;
        Ok(BlobAnswer {
            size: progress.total,
            source: Some(BlobSource::Filling(follower)),
            outcome,
        })
    }

    async fn stored_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<BlobAnswer>, oci::Error> {
        let Some(blob) = self
            .store
            .open_blob(digest)
            .await
            .map_err(|e| internal("opening a stored blob", e))?
        else {
            return Ok(None);
        };
        self.authorize_blob(up, repo, digest).await?;
        Ok(Some(BlobAnswer {
            size: Some(blob.size),
            source: Some(BlobSource::Stored(blob.file)),
            outcome: Outcome::Hit,
        }))
    }

    /// A stored blob is served for a repository only if that repository is known to hold
    /// it, or the upstream confirms it does: knowing a digest must not be enough to read a
    /// private repository's layers through berth's credentials.
    async fn authorize_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(), oci::Error> {
        self.authorize(up, repo, digest, up.head_blob(repo, digest), || {
            blob_unknown(up, repo, digest)
        })
        .await
    }
}

pub(super) fn blob_unknown(up: &Upstream, repo: &Repository, digest: &Digest) -> oci::Error {
    oci::Error::new(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is not in {repo} on upstream {}", up.host()),
    )
}
