//! A fill's task: queues for a place, streams the blob from its origin into a temp file
//! while hashing it, verifies it and stores it, publishing each step to its clients.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore};

use super::disk::{hash_all, DiskSide, PassThrough, Sinks};
use super::{Fill, Progress, Status, Tails};
use crate::metrics::{Metrics, UpstreamLabels};
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::proxy::origin::{Answered, OpenError, Opened, Origin, Request, Via};
use crate::store::shared::Shared;
use crate::store::{CommitError, Store, VerifiedBlob};
use crate::upstream::{self, Upstream};

/// How many times a cut upstream stream is resumed with a `Range` request.
const MAX_RESUMES: u32 = 3;

pub(super) struct FillTask {
    pub(super) store: Store,
    pub(super) upstream: Arc<Upstream>,
    pub(super) repository: Repository,
    pub(super) digest: Digest,
    pub(super) tx: Arc<watch::Sender<Progress>>,
    pub(super) tails: Arc<Mutex<Tails>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) origin: Origin,
    pub(super) shared: Option<Arc<Shared>>,
    pub(super) keep_local: bool,
    /// Which source answered (named in errors; only upstream bytes are written through to
    /// the shared tier, the others are there already or will be by their owner).
    pub(super) answered: Mutex<Option<Answered>>,
}

/// Takes a fill out of the map (and the in-flight gauge) when dropped: at the end of the
/// fill, or if its task panics, so the digest is never left to a dead fill.
pub(super) struct InFlight {
    map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
    digest: Digest,
    metrics: Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.fills.in_flight.dec();
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
    }
}

impl FillTask {
    pub(super) async fn run(
        self,
        map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
        places: Arc<Semaphore>,
    ) {
        // Clients of a queued fill wait for its first byte like any other; a queued fill
        // counts in `fills_queued`, not yet in `fills_in_flight`. (The semaphore is never
        // closed; were it, the fill would run without a place rather than hang.)
        self.metrics.fills.queued.inc();
        let _place = places.acquire_owned().await.ok();
        self.metrics.fills.queued.dec();
        self.metrics.fills.in_flight.inc();
        let in_flight = InFlight {
            map,
            digest: self.digest.clone(),
            metrics: self.metrics.clone(),
        };
        let deadline = self.upstream.fill_deadline;
        let result = match tokio::time::timeout(deadline, self.fill()).await {
            Ok(r) => r,
            Err(_) => Err(oci::Error::new(
                ErrorCode::Unavailable,
                format!(
                    "fetching {} from upstream {} took longer than {}",
                    self.digest,
                    self.upstream.host(),
                    humantime::format_duration(deadline)
                ),
            )),
        };
        // Leave the map before publishing the end: a request arriving after this finds
        // the stored blob (or starts a new fill after a failure).
        drop(in_flight);
        match result {
            Ok(()) => {
                self.tx.send_modify(|p| p.status = Status::Done);
            }
            Err(e) => {
                tracing::warn!(upstream = self.upstream.host(), repository = %self.repository,
                    digest = %self.digest, error = %e.message, "blob fill failed; nothing stored");
                self.metrics
                    .fills
                    .failures
                    .get_or_create(&UpstreamLabels {
                        upstream: self.upstream.host().to_owned(),
                    })
                    .inc();
                self.tx.send_modify(|p| p.status = Status::Failed(e));
            }
        }
    }

    fn internal(&self, what: &str, e: impl std::fmt::Display) -> oci::Error {
        oci::Error::new(ErrorCode::Internal, format!("store: {what}: {e}"))
    }

    /// Receives, verifies and stores the blob; clients see each step in the progress.
    async fn fill(&self) -> Result<(), oci::Error> {
        let (verified, passing, received) = self.receive().await?;
        if let Some(pass) = passing {
            // Verified: release the held last chunk, then let the channels close. The
            // length is published first, so a follower whose channel closed early (it
            // was dropped as too slow) can tell an end from a cut.
            self.metrics.fills.store_full.inc();
            let pass = pass.release_last().await;
            self.tx.send_modify(|p| {
                p.total = Some(received);
                p.status = Status::Verified;
            });
            // Only now do the channels close: a follower seeing the end sees it verified.
            drop(pass);
            return Ok(());
        }
        // Clients get their last byte now; durability is berth's business, not theirs.
        self.tx.send_modify(|p| p.status = Status::Verified);
        self.commit(verified).await
    }

    /// Streams the blob into a temp file while hashing it, and checks the digest: the
    /// verified file, the pass-through if the disk filled up, and the bytes received.
    async fn receive(&self) -> Result<(VerifiedBlob, Option<PassThrough>, u64), oci::Error> {
        let mut writer = self
            .store
            .begin_blob(&self.digest)
            .await
            .map_err(|e| self.internal("creating a temp file", e))?;
        let reader = writer
            .reader()
            .map_err(|e| self.internal("opening the temp file", e))?;
        // Hashing and writing overlap, each on its own blocking thread: the network side
        // hands every chunk to both (a refcount, not a copy), and the bounded channels
        // keep memory per fill to a few chunks whichever is slower.
        let hasher = writer
            .take_hasher()
            .ok_or_else(|| self.internal("hashing", "the writer has no hasher"))?;
        let (to_hash, hash_in) = mpsc::channel::<Bytes>(16);
        let hashing = tokio::task::spawn_blocking(move || hash_all(hasher, hash_in));
        let reserver = writer.reserver();
        let (to_disk, disk_in) = mpsc::channel::<Bytes>(16);
        let disk = DiskSide {
            progress: self.tx.clone(),
            tails: self.tails.clone(),
            store: self.store.clone(),
        };
        let disk = tokio::task::spawn_blocking(move || disk.write_all(writer, disk_in));
        let sinks = Sinks {
            to_hash,
            to_disk,
            reserver: Some(reserver),
        };
        let streamed = self.stream(sinks, reader).await;
        let (writer, passing) = match disk.await {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => return Err(self.internal("writing", e)),
            Err(e) => return Err(self.internal("writer thread", e)),
        };
        let actual = hashing
            .await
            .map_err(|e| self.internal("hasher thread", e))?;
        let received = streamed?;
        match writer.verify_hashed(actual) {
            Ok(v) => Ok((v, passing, received)),
            Err(CommitError::Mismatch { actual }) => {
                if let (Some(Answered::Shared), Some(shared)) = (self.answered(), &self.shared) {
                    shared.forget_blob(&self.digest).await;
                }
                Err(oci::Error::new(
                    ErrorCode::UpstreamDigestMismatch,
                    format!(
                        "{} sent bytes for {} that hash to {actual}; nothing stored",
                        self.source_name(),
                        self.digest
                    ),
                ))
            }
            Err(CommitError::Io(e)) => Err(self.internal("verifying", e)),
        }
    }

    /// Stores a verified blob with its repository link: on local disk (and written
    /// through to the shared tier), or, with no local tier, in the shared tier only.
    async fn commit(&self, verified: VerifiedBlob) -> Result<(), oci::Error> {
        let link = (
            self.upstream.host().to_owned(),
            self.repository.as_str().to_owned(),
        );
        match &self.shared {
            Some(shared) if !self.keep_local => {
                // No local tier: the bucket is the store. Clients have every byte already
                // and the fill stays joinable (its temp file readable) until the upload
                // ends; a failed upload costs a log line, never the clients' transfers.
                // Bytes from a peer or the bucket are its owner's to upload, or there.
                if self.answered() == Some(Answered::Upstream) {
                    let (file, size) = verified.file();
                    let up = crate::proxy::tiers::upload_blob(
                        shared,
                        &self.digest,
                        file,
                        size,
                        &link.0,
                        &link.1,
                    );
                    if let Err(e) = up.await {
                        tracing::warn!(digest = %self.digest, error = %e, "blob not written to the shared store");
                    }
                }
                drop(verified);
                self.store
                    .link(&link.0, &link.1, vec![self.digest.clone()])
                    .await
                    .map_err(|e| self.internal("writing the index", e))?;
            }
            _ => {
                verified
                    .persist_linked(&self.store, None, Some(link))
                    .await
                    .map_err(|e| self.internal("committing", e))?;
                self.write_through().await;
            }
        }
        Ok(())
    }

    fn answered(&self) -> Option<Answered> {
        self.answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn source_name(&self) -> String {
        match self.answered() {
            Some(Answered::Peer(p)) => format!("berth replica {p}"),
            Some(Answered::Shared) => "the shared store".to_owned(),
            _ => format!("upstream {}", self.upstream.host()),
        }
    }

    /// A blob fetched from the upstream goes to the shared tier too (with its repository
    /// link), so that no other replica fetches it again. The others are there already,
    /// or will be, by their owner.
    async fn write_through(&self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        if self.answered() != Some(Answered::Upstream) {
            return;
        }
        crate::proxy::tiers::write_through_blob(
            shared,
            &self.store,
            &self.digest,
            self.upstream.host(),
            &self.repository,
        )
        .await;
    }

    /// Receives the blob from its origin into `sinks`, resuming a cut transfer with a
    /// `Range` request a bounded number of times.
    async fn stream(&self, mut sinks: Sinks, reader: Arc<File>) -> Result<u64, oci::Error> {
        let up = &self.upstream;
        let mut received = 0u64;
        let mut resumes = 0;
        let mut total: Option<u64> = None;
        loop {
            let request = Request {
                up,
                repo: &self.repository,
                digest: &self.digest,
                from: received,
            };
            let mut resp = match self.origin.open(&request).await {
                Ok(r) => r,
                Err(OpenError::Unknown) => {
                    return Err(crate::proxy::blobs::blob_unknown(
                        up,
                        &self.repository,
                        &self.digest,
                    ))
                }
                Err(OpenError::Upstream(e))
                    if received > 0 && resumes < MAX_RESUMES && resumable(&e) =>
                {
                    resumes += 1;
                    tracing::info!(digest = %self.digest, received, error = %e, "resume failed; retrying");
                    continue;
                }
                Err(OpenError::Upstream(e)) => return Err(e.to_oci(up.host())),
                Err(OpenError::Oci(e)) => return Err(e),
            };
            let from_peer = matches!(resp.answered, Answered::Peer(_));
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(resp.answered.clone());
            if total.is_none() {
                total = resp.total;
                self.streaming(total, &mut sinks, &reader);
            }
            let cut = match self
                .copy_body(&mut resp, total, &mut received, &sinks)
                .await?
            {
                Copied::Whole => return Ok(received),
                Copied::Cut(cut) => cut,
            };
            // A replica that cut its stream has likely died: its askers' clients see the
            // abort and retry, and the retry finds the next owner.
            if resumes >= MAX_RESUMES || received == 0 || from_peer {
                if from_peer {
                    if let Via::Fleet { fleet, .. } = &self.origin.via {
                        fleet.forward_failed("blob");
                    }
                }
                return Err(oci::Error::new(
                    ErrorCode::Unavailable,
                    format!(
                        "{} cut the transfer of {} at byte {received}: {cut}",
                        self.source_name(),
                        self.digest,
                    ),
                ));
            }
            resumes += 1;
            tracing::info!(digest = %self.digest, at = received, cause = %cut,
                "upstream transfer cut; resuming with a range request");
        }
    }

    /// The first answer's headers are in: reserve the blob's space (when its size is
    /// known) and let clients read the temp file.
    fn streaming(&self, total: Option<u64>, sinks: &mut Sinks, reader: &Arc<File>) {
        if let (Some(t), Some(r)) = (total, sinks.reserver.take()) {
            // Not waited for: the writes queue behind it on the inode anyway.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = r.reserve(t) {
                    tracing::debug!(error = %e, "could not reserve the blob's space");
                }
            });
        }
        self.tx.send_modify(|p| {
            p.status = Status::Streaming;
            p.total = total;
            p.reader = Some(reader.clone());
        });
    }

    /// Copies one answer's body into the sinks until it ends, or is cut (an error, a
    /// short body, or no byte for the stall timeout). More bytes than announced fail.
    async fn copy_body(
        &self,
        resp: &mut Opened,
        total: Option<u64>,
        received: &mut u64,
        sinks: &Sinks,
    ) -> Result<Copied, oci::Error> {
        let up = &self.upstream;
        let from_upstream = resp.answered == Answered::Upstream;
        loop {
            match tokio::time::timeout(up.stall_timeout, resp.body.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    let n = chunk.len() as u64;
                    if total.is_some_and(|t| *received + n > t) {
                        return Err(oci::Error::new(
                            ErrorCode::UpstreamInvalid,
                            format!("{} sent more bytes than it announced", self.source_name()),
                        ));
                    }
                    if from_upstream {
                        up.count_fetched(n);
                    }
                    *received += n;
                    if !sinks.send(chunk).await {
                        // The writer stopped: its error is reported by the caller.
                        return Ok(Copied::Whole);
                    }
                }
                Ok(Ok(None)) if total.is_none_or(|t| *received == t) => return Ok(Copied::Whole),
                Ok(Ok(None)) => return Ok(Copied::Cut("the body ended early".to_owned())),
                Ok(Err(e)) => return Ok(Copied::Cut(e)),
                Err(_) => {
                    return Ok(Copied::Cut(format!(
                        "no byte for {}",
                        humantime::format_duration(up.stall_timeout)
                    )))
                }
            }
        }
    }
}

/// How one answer's body ended.
enum Copied {
    /// Every byte came (or the writer stopped, which the caller reports).
    Whole,
    /// Cut, and why.
    Cut(String),
}

fn resumable(e: &upstream::Error) -> bool {
    matches!(
        e,
        upstream::Error::Connect(_) | upstream::Error::Timeout(_) | upstream::Error::Status { .. }
    )
}
