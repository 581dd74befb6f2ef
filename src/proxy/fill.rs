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

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::{Metrics, UpstreamLabels};
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::store::{CommitError, Store};
use crate::upstream::{self, Upstream};

/// How many times a cut upstream stream is resumed with a `Range` request.
const MAX_RESUMES: u32 = 3;

/// Where a fill is.
#[derive(Clone, Debug)]
pub enum Status {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving.
    Streaming,
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
}

pub struct Fill {
    /// The repository the fill was started for (cross-repository checks).
    pub repository: Repository,
    progress: watch::Receiver<Progress>,
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
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
#[derive(Default)]
pub struct Fills {
    map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
}

impl Fills {
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
        });
        let fill = Arc::new(Fill {
            repository: repository.clone(),
            progress: rx,
        });
        map.insert(digest.clone(), fill.clone());
        let task = FillTask {
            store: store.clone(),
            upstream: upstream.clone(),
            repository: repository.clone(),
            digest: digest.clone(),
            tx,
            metrics: metrics.clone(),
        };
        let map_handle = self.map.clone();
        tokio::spawn(task.run(map_handle));
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
    tx: watch::Sender<Progress>,
    metrics: Arc<Metrics>,
}

impl FillTask {
    async fn run(self, map: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>) {
        self.metrics.fills_in_flight.inc();
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
        self.metrics.fills_in_flight.dec();
        // Leave the map before publishing the end: a request arriving after this finds
        // the stored blob (or starts a new fill after a failure).
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
        match result {
            Ok(()) => {
                self.tx.send_modify(|p| p.status = Status::Done);
                if let Err(e) = self
                    .store
                    .link(
                        self.upstream.host(),
                        self.repository.as_str(),
                        vec![self.digest.clone()],
                    )
                    .await
                {
                    tracing::warn!(error = %e, "could not record the blob's repository link");
                }
            }
            Err(e) => {
                tracing::warn!(upstream = self.upstream.host(), repository = %self.repository,
                    digest = %self.digest, error = %e.message, "blob fill failed; nothing stored");
                self.metrics
                    .fill_failures
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
        let up = &self.upstream;
        let mut writer = self
            .store
            .begin_blob(&self.digest)
            .await
            .map_err(|e| self.internal("creating a temp file", e))?;
        let reader = writer
            .reader()
            .map_err(|e| self.internal("opening the temp file", e))?;
        let mut resumes = 0;
        let mut total: Option<u64> = None;
        'attempt: loop {
            let offset = writer.written();
            let mut resp = match up.get_blob(&self.repository, &self.digest, offset).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(oci::Error::new(
                        ErrorCode::BlobUnknown,
                        format!(
                            "blob {} is not in {} on upstream {}",
                            self.digest,
                            self.repository,
                            up.host()
                        ),
                    ))
                }
                Err(e) if offset > 0 && resumes < MAX_RESUMES && resumable(&e) => {
                    resumes += 1;
                    tracing::info!(digest = %self.digest, offset, error = %e, "resume failed; retrying");
                    continue 'attempt;
                }
                Err(e) => return Err(e.to_oci(up.host())),
            };
            if total.is_none() {
                total = resp.total;
                self.tx.send_modify(|p| {
                    p.status = Status::Streaming;
                    p.total = total;
                    p.reader = Some(reader.clone());
                });
            }
            loop {
                let next = tokio::time::timeout(up.stall_timeout, resp.chunk()).await;
                let cut = match next {
                    Ok(Ok(Some(chunk))) => {
                        let n = chunk.len() as u64;
                        if total.is_some_and(|t| writer.written() + n > t) {
                            return Err(oci::Error::new(
                                ErrorCode::UpstreamInvalid,
                                format!("upstream {} sent more bytes than it announced", up.host()),
                            ));
                        }
                        up.count_fetched(n);
                        writer
                            .write(chunk)
                            .await
                            .map_err(|e| self.internal("writing", e))?;
                        let written = writer.written();
                        self.tx.send_modify(|p| p.written = written);
                        continue;
                    }
                    Ok(Ok(None)) => {
                        if total.is_none_or(|t| writer.written() == t) {
                            break 'attempt;
                        }
                        "the body ended early".to_owned()
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!(
                        "no byte for {}",
                        humantime::format_duration(up.stall_timeout)
                    ),
                };
                if resumes >= MAX_RESUMES || writer.written() == 0 && resumes > 0 {
                    return Err(oci::Error::new(
                        ErrorCode::Unavailable,
                        format!(
                            "upstream {} cut the transfer of {} at byte {}: {cut}",
                            up.host(),
                            self.digest,
                            writer.written()
                        ),
                    ));
                }
                resumes += 1;
                tracing::info!(digest = %self.digest, at = writer.written(), cause = %cut,
                    "upstream transfer cut; resuming with a range request");
                continue 'attempt;
            }
        }
        match writer.commit(&self.store, None).await {
            Ok(()) => Ok(()),
            Err(CommitError::Mismatch { actual }) => Err(oci::Error::new(
                ErrorCode::UpstreamDigestMismatch,
                format!(
                    "upstream {} sent bytes for {} that hash to {actual}; nothing stored",
                    up.host(),
                    self.digest
                ),
            )),
            Err(CommitError::Io(e)) => Err(self.internal("committing", e)),
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
