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
mod task;

pub use metrics::FillMetrics;

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use super::origin::{Origin, Via};
use crate::metrics::Metrics;
use crate::oci::{self, Digest, ErrorCode, Repository};
use crate::store::shared::Shared;
use crate::store::Store;
use crate::upstream::Upstream;
use task::FillTask;

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

/// How long a client waits for new bytes before giving up on a fill that stalls
/// (the fill itself gives up after its stall timeout; this is a backstop).
pub const FOLLOWER_PATIENCE: Duration = Duration::from_secs(300);
