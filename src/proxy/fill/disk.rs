//! The disk side of a fill: the chunks the network side receives go to a hashing thread
//! and a writing thread; the writer publishes how far clients may read the temp file,
//! and when the disk fills up, passes the rest through the followers' channels.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{Progress, Tails, SLOW_FOLLOWER};
use crate::oci::Digest;
use crate::store::{BlobWriter, Reserver, Store};

/// Where the network side of a fill hands each chunk: the hasher and the writer.
pub(super) struct Sinks {
    pub(super) to_hash: mpsc::Sender<Bytes>,
    pub(super) to_disk: mpsc::Sender<Bytes>,
    /// Taken when the size is first known.
    pub(super) reserver: Option<Reserver>,
}

impl Sinks {
    /// False once either side has stopped (its error is the caller's to report).
    pub(super) async fn send(&self, chunk: Bytes) -> bool {
        self.to_hash.send(chunk.clone()).await.is_ok() && self.to_disk.send(chunk).await.is_ok()
    }
}

/// Hashes every chunk until the network side is done; blocking.
pub(super) fn hash_all(
    mut hasher: crate::oci::Hasher,
    mut chunks: mpsc::Receiver<Bytes>,
) -> Digest {
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
    }
    hasher.finish()
}

/// The writing side of a fill, on its blocking thread: appends chunks to the temp file,
/// publishes how far clients may read, and switches to passing bytes through followers'
/// channels when the disk fills up.
pub(super) struct DiskSide {
    pub(super) progress: Arc<watch::Sender<Progress>>,
    pub(super) tails: Arc<Mutex<Tails>>,
    pub(super) store: Store,
}

impl DiskSide {
    pub(super) fn write_all(
        self,
        mut writer: BlobWriter,
        mut incoming: mpsc::Receiver<Bytes>,
    ) -> std::io::Result<(BlobWriter, Option<PassThrough>)> {
        let mut passing: Option<PassThrough> = None;
        let mut offset = 0u64;
        // Chunks already waiting are written before progress is published: one wake-up
        // of the followers per batch, not per network read.
        let mut unpublished = false;
        let mut published_at = 0u64;
        loop {
            // A disk slower than the network never empties the channel: publish at least
            // every 4 MiB too.
            if unpublished && writer.written() >= published_at + (4 << 20) {
                published_at = self.publish(&writer);
                unpublished = false;
            }
            let chunk = match incoming.try_recv() {
                Ok(chunk) => chunk,
                Err(_) => {
                    if unpublished {
                        published_at = self.publish(&writer);
                        unpublished = false;
                    }
                    match incoming.blocking_recv() {
                        Some(chunk) => chunk,
                        None => break,
                    }
                }
            };
            let at = offset;
            offset += chunk.len() as u64;
            if let Some(pass) = passing.as_mut() {
                pass.forward(at, chunk);
                continue;
            }
            match writer.try_write_blocking(&chunk) {
                Ok(()) => unpublished = true,
                Err((done, e)) if is_disk_full(&e) => {
                    passing = Some(self.pass_through_from(
                        &writer,
                        at + done as u64,
                        chunk.slice(done..),
                    ));
                }
                Err((_, e)) => return Err(e),
            }
        }
        Ok((writer, passing))
    }

    fn publish(&self, writer: &BlobWriter) -> u64 {
        let written = writer.written();
        self.progress.send_modify(|p| p.written = written);
        written
    }

    /// The disk is full at byte `from`: every follower registered so far gets every
    /// byte from here on through its channel (the switch is made under the tails lock);
    /// later clients are turned away.
    fn pass_through_from(&self, writer: &BlobWriter, from: u64, rest: Bytes) -> PassThrough {
        let senders = {
            let mut t = self.tails.lock().unwrap_or_else(|p| p.into_inner());
            t.open = false;
            std::mem::take(&mut t.senders)
        };
        let written = writer.written();
        self.progress.send_modify(|p| {
            p.written = written;
            p.passed_from = Some(from);
        });
        self.store.note_disk_full();
        PassThrough {
            senders,
            held: Some((from, rest)),
        }
    }
}

/// ENOSPC or EDQUOT: the disk (or the quota on it) is full.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122)) || e.kind() == std::io::ErrorKind::StorageFull
}

/// A fill passing its bytes through: the followers' channels, and the last chunk, held
/// until the digest is verified.
pub(super) struct PassThrough {
    senders: Vec<mpsc::Sender<(u64, Bytes)>>,
    held: Option<(u64, Bytes)>,
}

impl PassThrough {
    /// Sends the held chunk to every follower and holds `chunk` instead. The slowest
    /// follower paces the fill; one that takes nothing for [`SLOW_FOLLOWER`] is dropped
    /// (its transfer aborts) so it cannot stall the others. Followers that left are dropped.
    fn forward(&mut self, at: u64, chunk: Bytes) {
        if let Some((off, bytes)) = self.held.replace((at, chunk)) {
            // One clock for the whole round: several stuck followers cost 30 s, not 30 s each.
            let started = std::time::Instant::now();
            self.senders.retain(|s| {
                let mut item = (off, bytes.clone());
                loop {
                    match s.try_send(item) {
                        Ok(()) => return true,
                        Err(mpsc::error::TrySendError::Closed(_)) => return false,
                        Err(mpsc::error::TrySendError::Full(back)) => {
                            if started.elapsed() > SLOW_FOLLOWER {
                                return false;
                            }
                            item = back;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            });
        }
    }

    /// After verification: the last chunk goes out. Dropping what this returns ends the
    /// followers' channels.
    pub(super) async fn release_last(mut self) -> Self {
        if let Some((off, bytes)) = self.held.take() {
            for s in &self.senders {
                // The same patience as for every other chunk.
                let _ = tokio::time::timeout(SLOW_FOLLOWER, s.send((off, bytes.clone()))).await;
            }
        }
        self
    }
}
