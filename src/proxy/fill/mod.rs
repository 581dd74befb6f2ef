//! Blob fills: one per digest, streaming from upstream into a temp file while hashing.
//!
//! Every client of a fill — the one that started it included — reads the temp file as it
//! grows, through a shared read-only handle with positional reads, so a byte reaches all
//! clients as soon as it is on disk and memory does not grow with the number of clients.
//! The last byte is held back until the digest is verified: a failed fill aborts every
//! client's stream rather than ending it, so no client ever sees a complete-looking body
//! with the wrong bytes.
//!
//! The fill runs in its own task and outlives the clients; it ends on success, on digest
//! mismatch, on a stall, on its deadline, or after a bounded number of resumes.

mod disk;
mod metrics;

pub use metrics::FillMetrics;

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use super::origin::{Answered, OpenError, Origin, Request, Via};
use crate::metrics::{Metrics, UpstreamLabels};
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::store::shared::Shared;
use crate::store::{CommitError, Store};
use crate::upstream::{self, Upstream};
use disk::{hash_all, DiskSide, Sinks};

/// How many times a cut upstream stream is resumed with a `Range` request.
const MAX_RESUMES: u32 = 3;

/// Where a fill is.
#[derive(Clone, Debug)]
pub enum Status {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving (to the file, or past it once `Progress::passed_from` is set).
    Streaming,
    /// Every byte arrived and matches the digest; being made durable.
    Verified,
    /// Verified and stored.
    Done,
    /// Abandoned; nothing stored.
    Failed(oci::Error),
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub status: Status,
    /// Bytes on disk in the temp file, readable by clients.
    pub written: u64,
    /// The blob's size, once the upstream has said it.
    pub total: Option<u64>,
    /// The read-only handle clients read from (set once streaming starts).
    pub reader: Option<Arc<File>>,
    /// Where the disk filled up: bytes from here on come through followers' channels.
    /// Kept after the fill ends, so followers still reading know where to look.
    pub passed_from: Option<u64>,
}

pub struct Fill {
    /// The upstream and repository the fill was started for: a client of any other
    /// (the same path on another upstream included) must be authorised before it follows.
    pub upstream: String,
    pub repository: Repository,
    /// The fill asks another replica: a forwarded request must not wait on it (two
    /// replicas that disagree on the owner would wait on each other).
    pub via_peers: bool,
    progress: watch::Receiver<Progress>,
    tails: Arc<Mutex<Tails>>,
}

/// The channels a fill passes bytes through if the disk fills up. Every follower has one
/// from the start (an empty channel costs nothing), so none misses a byte at the switch.
struct Tails {
    /// False once the fill passes through: a client arriving later cannot catch up.
    open: bool,
    senders: Vec<mpsc::Sender<(u64, Bytes)>>,
}

/// A follower that takes no byte of a pass-through for this long is dropped.
const SLOW_FOLLOWER: Duration = Duration::from_secs(30);

/// How many chunks a follower's pass-through channel holds: the fill waits for the
/// slowest follower beyond that (backpressure, not unbounded memory).
const TAIL_CHUNKS: usize = 16;

/// A client's view of a fill: its progress, and its pass-through channel.
pub struct Follower {
    pub progress: watch::Receiver<Progress>,
    pub tail: mpsc::Receiver<(u64, Bytes)>,
}

impl Status {
    /// All bytes are in and verified: clients may read to the end.
    pub fn complete(&self) -> bool {
        matches!(self, Status::Verified | Status::Done)
    }
}

impl Fill {
    /// Whether the fill was started for this upstream's repository.
    pub fn is_for(&self, upstream: &str, repository: &Repository) -> bool {
        self.upstream == upstream && &self.repository == repository
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Follows the fill; `None` when it already passes bytes through (disk full), which a
    /// client that was not there from the switch cannot follow.
    pub fn follow(&self) -> Option<Follower> {
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        if !tails.open {
            return None;
        }
        let (tx, rx) = mpsc::channel(TAIL_CHUNKS);
        tails.senders.push(tx);
        Some(Follower {
            progress: self.progress.clone(),
            tail: rx,
        })
    }

    /// Waits until the fill streams (or has finished), or returns why it never will.
    pub async fn started(&self) -> Result<Progress, oci::Error> {
        let mut rx = self.subscribe();
        let p = rx
            .wait_for(|p| !matches!(p.status, Status::Connecting))
            .await
            .map_err(|_| lost())?
            .clone();
        match &p.status {
            Status::Failed(e) if p.written == 0 => Err(e.clone()),
            _ => Ok(p),
        }
    }
}

fn lost() -> oci::Error {
    oci::Error::new(ErrorCode::Internal, "the blob fill ended unexpectedly")
}

/// The fills in progress, by digest. Belongs to the proxy.
pub struct Fills {
    map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
    /// Where fills from the upstream are written through, in a fleet.
    shared: Option<Arc<Shared>>,
    /// Whether verified blobs stay on local disk (false: only in the shared tier).
    keep_local: bool,
    /// Places for fills running at once; a fill past the cap waits (as `Connecting`) for
    /// one before it asks anyone for bytes.
    places: Arc<Semaphore>,
}

/// `server.max_concurrent_fills` by default.
const DEFAULT_FILLS: usize = 64;

impl Fills {
    /// Whether blobs are kept on local disk (the cache tier) or only in `shared`.
    pub fn keep_local(&self) -> bool {
        self.keep_local
    }

    pub fn new(shared: Option<Arc<Shared>>, keep_local: bool) -> Self {
        Fills {
            map: Arc::default(),
            shared,
            keep_local,
            places: Arc::new(Semaphore::new(DEFAULT_FILLS)),
        }
    }

    /// Sets the number of fills that run at once.
    pub fn limit(&mut self, fills: usize, metrics: Arc<Metrics>) {
        metrics.fills.max.set(fills as i64);
        self.places = Arc::new(Semaphore::new(fills));
    }

    pub fn in_progress(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// Joins the fill for `digest`, or starts one, unless the blob is already stored.
    pub fn join_or_start(
        &self,
        store: &Store,
        upstream: &Arc<Upstream>,
        repository: &Repository,
        digest: &Digest,
        metrics: &Arc<Metrics>,
        origin: Origin,
    ) -> Joined {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(digest) {
            return Joined::Following(f.clone());
        }
        // A fill leaves the map only after its file is in place, so under the lock a blob
        // is either filling or stored: no second fill for a blob that just landed.
        if store.contains_blob(digest) {
            return Joined::Stored;
        }
        let (tx, rx) = watch::channel(Progress {
            status: Status::Connecting,
            written: 0,
            total: None,
            reader: None,
            passed_from: None,
        });
        let tails = Arc::new(Mutex::new(Tails {
            open: true,
            senders: Vec::new(),
        }));
        let fill = Arc::new(Fill {
            upstream: upstream.host().to_owned(),
            via_peers: matches!(&origin.via, Via::Fleet { owners, .. }
                if owners.first().is_some_and(|o| *o != crate::fleet::Owner::Me)),
            tails: tails.clone(),
            repository: repository.clone(),
            progress: rx,
        });
        map.insert(digest.clone(), fill.clone());
        let task = FillTask {
            store: store.clone(),
            upstream: upstream.clone(),
            repository: repository.clone(),
            digest: digest.clone(),
            tx: Arc::new(tx),
            tails,
            metrics: metrics.clone(),
            origin,
            shared: self.shared.clone(),
            keep_local: self.keep_local,
            answered: Mutex::new(None),
        };
        let map_handle = self.map.clone();
        // The fill's log lines carry the request that started it (its span's parent).
        let span = tracing::info_span!("fill", %digest);
        tokio::spawn(task.run(map_handle, self.places.clone()).instrument(span));
        Joined::Started(fill)
    }
}

/// The result of [`Fills::join_or_start`].
pub enum Joined {
    Started(Arc<Fill>),
    Following(Arc<Fill>),
    Stored,
}

struct FillTask {
    store: Store,
    upstream: Arc<Upstream>,
    repository: Repository,
    digest: Digest,
    tx: Arc<watch::Sender<Progress>>,
    tails: Arc<Mutex<Tails>>,
    metrics: Arc<Metrics>,
    origin: Origin,
    shared: Option<Arc<Shared>>,
    keep_local: bool,
    /// Which source answered (named in errors; only upstream bytes are written through to
    /// the shared tier, the others are there already or will be by their owner).
    answered: Mutex<Option<Answered>>,
}

/// Takes a fill out of the map (and the in-flight gauge) when dropped: at the end of the
/// fill, or if its task panics, so the digest is never left to a dead fill.
struct InFlight {
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
    async fn run(self, map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>, places: Arc<Semaphore>) {
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

    async fn fill(&self) -> Result<(), oci::Error> {
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
        let verified = match writer.verify_hashed(actual) {
            Ok(v) => v,
            Err(CommitError::Mismatch { actual }) => {
                if let (Some(Answered::Shared), Some(shared)) = (self.answered(), &self.shared) {
                    shared.forget_blob(&self.digest).await;
                }
                return Err(oci::Error::new(
                    ErrorCode::UpstreamDigestMismatch,
                    format!(
                        "{} sent bytes for {} that hash to {actual}; nothing stored",
                        self.source_name(),
                        self.digest
                    ),
                ));
            }
            Err(CommitError::Io(e)) => return Err(self.internal("verifying", e)),
        };
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
                    let up = super::tiers::upload_blob(
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
        super::tiers::write_through_blob(
            shared,
            &self.store,
            &self.digest,
            self.upstream.host(),
            &self.repository,
        )
        .await;
    }

    /// Receives the blob from upstream into `chunks`, resuming a cut transfer with a
    /// `Range` request a bounded number of times.
    async fn stream(&self, mut sinks: Sinks, reader: Arc<File>) -> Result<u64, oci::Error> {
        let up = &self.upstream;
        let mut received = 0u64;
        let mut resumes = 0;
        let mut total: Option<u64> = None;
        'attempt: loop {
            let request = Request {
                up,
                repo: &self.repository,
                digest: &self.digest,
                from: received,
            };
            let mut resp = match self.origin.open(&request).await {
                Ok(r) => r,
                Err(OpenError::Unknown) => {
                    return Err(super::blobs::blob_unknown(
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
                    continue 'attempt;
                }
                Err(OpenError::Upstream(e)) => return Err(e.to_oci(up.host())),
                Err(OpenError::Oci(e)) => return Err(e),
            };
            let from_upstream = resp.answered == Answered::Upstream;
            let from_peer = matches!(resp.answered, Answered::Peer(_));
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(resp.answered.clone());
            if total.is_none() {
                total = resp.total;
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
            let cut = loop {
                match tokio::time::timeout(up.stall_timeout, resp.body.chunk()).await {
                    Ok(Ok(Some(chunk))) => {
                        let n = chunk.len() as u64;
                        if total.is_some_and(|t| received + n > t) {
                            return Err(oci::Error::new(
                                ErrorCode::UpstreamInvalid,
                                format!("{} sent more bytes than it announced", self.source_name()),
                            ));
                        }
                        if from_upstream {
                            up.count_fetched(n);
                        }
                        received += n;
                        if !sinks.send(chunk).await {
                            // The writer stopped: its error is reported by the caller.
                            return Ok(received);
                        }
                    }
                    Ok(Ok(None)) if total.is_none_or(|t| received == t) => return Ok(received),
                    Ok(Ok(None)) => break "the body ended early".to_owned(),
                    Ok(Err(e)) => break e,
                    Err(_) => {
                        break format!(
                            "no byte for {}",
                            humantime::format_duration(up.stall_timeout)
                        )
                    }
                }
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
}

fn resumable(e: &upstream::Error) -> bool {
    matches!(
        e,
        upstream::Error::Connect(_) | upstream::Error::Timeout(_) | upstream::Error::Status { .. }
    )
}

/// How long a client waits for new bytes before giving up on a fill that stalls
/// (the fill itself gives up after its stall timeout; this is a backstop).
pub const FOLLOWER_PATIENCE: Duration = Duration::from_secs(300);
