//! Blob policy: a stored blob is a hit (once the repository is known to hold it); a miss
//! joins or starts the one fill for its digest.

use std::sync::Arc;

use super::body::BlobSource;
use super::fill::Joined;
use super::origin::{Origin, Via};
use super::{internal, Caller, Proxy};
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
    /// Redirect mode: where the client gets the bytes instead (a presigned URL).
    pub redirect: Option<reqwest::Url>,
}

impl Proxy {
    pub async fn blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
        head: bool,
        caller: &Caller,
    ) -> Result<BlobAnswer, oci::Error> {
        if !head && !caller.forwarded && self.shared.is_some() {
            if let Some(answer) = Box::pin(self.redirect(up, repo, digest)).await? {
                return Ok(answer);
            }
        }
        if let Some(answer) = self.stored_blob(up, repo, digest).await? {
            return Ok(answer);
        }
        // Boxed: the miss path's future is large, and a hit should not carry (and move)
        // its state.
        Box::pin(self.blob_not_stored(up, repo, digest, head, caller)).await
    }

    /// [`Self::blob`] for a blob not in the local store: the bucket, a fill in progress,
    /// or a new one.
    async fn blob_not_stored(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
        head: bool,
        caller: &Caller,
    ) -> Result<BlobAnswer, oci::Error> {
        if !self.fills.keep_local() && !head {
            // No local tier: a blob the bucket holds streams straight from it.
            if let (Some(size), Some(shared)) =
                (self.shared_blob(up, repo, digest).await?, &self.shared)
            {
                return Ok(BlobAnswer {
                    size: Some(size),
                    source: Some(BlobSource::Shared(shared.clone(), digest.clone())),
                    outcome: Outcome::Hit,
                    redirect: None,
                });
            }
        }
        if head {
            return self.head_not_stored(up, repo, digest).await;
        }
        self.join_fill(up, repo, digest, caller).await
    }

    /// A HEAD of a blob not in the local store: answered from a fill in progress, the
    /// bucket, or an upstream HEAD. A HEAD does not start a fill: HEADs are free upstream
    /// and often only probe.
    async fn head_not_stored(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<BlobAnswer, oci::Error> {
        if let Some(fill) = self.fills.in_progress(digest) {
            if !fill.is_for(up.host(), repo) {
                self.authorize_blob(up, repo, digest).await?;
            }
            if let Some(total) = fill.started().await?.total {
                return Ok(BlobAnswer {
                    size: Some(total),
                    source: None,
                    outcome: Outcome::Coalesced,
                    redirect: None,
                });
            }
        }
        if let Some(size) = self.shared_blob(up, repo, digest).await? {
            return Ok(BlobAnswer {
                size: Some(size),
                source: None,
                outcome: Outcome::Hit,
                redirect: None,
            });
        }
        match up.head_blob(repo, digest).await {
            Ok(Some(size)) => Ok(BlobAnswer {
                size: Some(size),
                source: None,
                outcome: Outcome::Miss,
                redirect: None,
            }),
            Ok(None) => Err(blob_unknown(up, repo, digest)),
            Err(e) => Err(e.to_oci(up.host())),
        }
    }

    /// Joins the fill for the blob in progress, or starts one, and follows it.
    async fn join_fill(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
        caller: &Caller,
    ) -> Result<BlobAnswer, oci::Error> {
        // A herd joins the fill in progress without a look at the bucket each.
        let joined = match self.fills.in_progress(digest) {
            Some(f) => Joined::Following(f),
            None => {
                let origin = self.origin(up, repo, digest, caller).await?;
                self.fills
                    .join_or_start(&self.store, up, repo, digest, &self.metrics, origin)
            }
        };
        let (fill, outcome) = match joined {
            Joined::Stored => {
                // Finished between our look and the join: it is a hit after all.
                return match self.stored_blob(up, repo, digest).await? {
                    Some(a) => Ok(a),
                    None => Err(internal("blob vanished after its fill", digest)),
                };
            }
            Joined::Started(f) => (f, Outcome::Miss),
            Joined::Following(f) if caller.forwarded && f.via_peers => {
                return Err(oci::Error::new(
                        ErrorCode::Internal,
                        format!("this replica is itself asking another replica for {digest}; ask the next owner"),
                    ));
            }
            Joined::Following(f) => {
                // Joined a fill started for another repository: this one must hold
                // the blob too (checked after joining, so nothing slips in between).
                if !f.is_for(up.host(), repo) {
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
            redirect: None,
        })
    }

    /// Where a fill for this request would look: the shared tier when it holds the blob
    /// (once the repository is authorised), else the digest's owner in the fleet, else
    /// the upstream. A forwarded request is never forwarded again.
    async fn origin(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
        caller: &Caller,
    ) -> Result<Origin, oci::Error> {
        let client = caller.client.clone();
        if let Some(shared) = &self.shared {
            if shared.has_blob(digest).await.unwrap_or(false) {
                self.authorize_blob(up, repo, digest).await?;
                return Ok(Origin {
                    via: Via::Shared(shared.clone()),
                    client,
                });
            }
        }
        let via = match &self.fleet {
            Some(fleet) if !caller.forwarded => Via::Fleet {
                fleet: fleet.clone(),
                owners: fleet.owners(&digest.to_string()),
            },
            _ => Via::Upstream,
        };
        Ok(Origin { via, client })
    }

    /// The size of a blob the shared tier holds, once the repository is authorised.
    async fn shared_blob(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<u64>, oci::Error> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let Ok(Some(size)) = shared.blob_size(digest).await else {
            return Ok(None);
        };
        self.authorize_blob(up, repo, digest).await?;
        Ok(Some(size))
    }

    /// Redirect mode: a blob the shared tier holds is answered with a presigned URL,
    /// after the same repository check as any hit.
    async fn redirect(
        &self,
        up: &Arc<Upstream>,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Option<BlobAnswer>, oci::Error> {
        let Some(shared) = self.shared.as_ref().filter(|s| s.redirects()) else {
            return Ok(None);
        };
        if !shared.has_blob(digest).await.unwrap_or(false) {
            return Ok(None);
        }
        self.authorize_blob(up, repo, digest).await?;
        let Ok(Some(url)) = shared.presigned(digest).await else {
            return Ok(None);
        };
        Ok(Some(BlobAnswer {
            size: None,
            source: None,
            outcome: Outcome::Hit,
            redirect: Some(url),
        }))
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
            redirect: None,
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
        self.authorize(
            up,
            repo,
            digest,
            || up.head_blob(repo, digest),
            || blob_unknown(up, repo, digest),
        )
        .await
    }
}

pub(super) fn blob_unknown(up: &Upstream, repo: &Repository, digest: &Digest) -> oci::Error {
    oci::Error::new(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is not in {repo} on upstream {}", up.host()),
    )
}
