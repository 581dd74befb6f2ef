//! Blob bodies: a byte range of a stored file, or of a file a fill is still writing.
//!
//! A small task per response hands the range to the response through a one-slot channel,
//! as [`Piece`]s: bytes it read with positional reads, or — where the connection can send
//! a file's pages itself (`sendfile` on plain HTTP/1.x) — the file range, unread. It
//! moves on only once the slot is free, so a slow client holds at most two pieces: one
//! queued, one being written. An error ends the body with an error, which makes the
//! server abort the connection: a client never mistakes a failed transfer for a complete
//! one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::mpsc;

use futures_util::StreamExt;

use super::fill::{Follower, Progress, Status, FOLLOWER_PATIENCE};
use crate::metrics::{Metrics, Source, SourceLabels};
use crate::oci::Digest;
use crate::store::shared::Shared;

/// Read size for stored blobs where sendfile cannot be used (TLS, HTTP/2, no local
/// tier): large, so the blocking-pool hop is paid once per 512 KiB; a slow client holds
/// at most two.
const STORED_CHUNK: u64 = 512 * 1024;
/// Read size for fills: a herd of followers must stay small (200 clients, < 100 MiB).
const FILL_CHUNK: u64 = 128 * 1024;
/// The largest file range one [`Piece::File`] stands for.
pub const MAX_FILE_PIECE: usize = 4 << 20;

/// The next part of a blob body.
pub enum Piece {
    Bytes(Bytes),
    /// `len` bytes of `file` from `offset`, already on disk (the page cache): for a
    /// connection that sends them itself.
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
}

/// Where a blob body's bytes come from.
pub enum BlobSource {
    Stored(Arc<File>),
    Filling(Follower),
    /// Straight from the shared tier (a replica without a local tier).
    Shared(Arc<Shared>, Digest),
}

pub struct BlobBody {
    rx: mpsc::Receiver<io::Result<Piece>>,
    len: Option<u64>,
}

impl BlobBody {
    /// Streams bytes `start..end` of the source (`end = None`: until a fill of unknown
    /// size is done). With `file_pieces`, file ranges come as [`Piece::File`] (the
    /// caller sends them); otherwise every piece is bytes.
    pub fn new(
        source: BlobSource,
        start: u64,
        end: Option<u64>,
        metrics: Arc<Metrics>,
        file_pieces: bool,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1);
        match source {
            BlobSource::Shared(shared, digest) => {
                tokio::spawn(pump_shared(shared, digest, start, end, tx, metrics));
            }
            source => {
                tokio::spawn(pump(source, start, end, tx, metrics, file_pieces));
            }
        }
        BlobBody {
            rx,
            len: end.map(|e| e - start),
        }
    }

    /// The next piece; `None` at the end of the body.
    pub fn poll_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Piece>>> {
        self.rx.poll_recv(cx)
    }

    /// The body's length, when known.
    pub fn content_length(&self) -> Option<u64> {
        self.len
    }
}

/// How far clients may read a fill: everything written, except that the last byte of a
/// known-size blob waits for the digest to be verified.
fn readable(p: &Progress) -> u64 {
    match (&p.status, p.total) {
        (s, _) if s.complete() => p.written,
        (_, Some(total)) => p.written.min(total.saturating_sub(1)),
        (_, None) => p.written,
    }
}

async fn pump(
    mut source: BlobSource,
    start: u64,
    end: Option<u64>,
    tx: mpsc::Sender<io::Result<Piece>>,
    metrics: Arc<Metrics>,
    file_pieces: bool,
) {
    let label = SourceLabels {
        source: match source {
            BlobSource::Stored(_) | BlobSource::Shared(..) => Source::Cache,
            BlobSource::Filling(_) => Source::Upstream,
        },
    };
    let served = metrics.served_bytes.get_or_create(&label).clone();
    let from_fill = matches!(source, BlobSource::Filling(_));
    let chunk_size = match (file_pieces, from_fill) {
        (true, _) => MAX_FILE_PIECE as u64,
        (false, true) => FILL_CHUNK,
        (false, false) => STORED_CHUNK,
    };
    let mut pos = start;
    loop {
        if end.is_some_and(|e| pos >= e) {
            if let BlobSource::Filling(f) = &mut source {
                settle(f, &tx).await;
            }
            return;
        }
        // Wait for the client to take the previous chunk before reading the next.
        let Ok(slot) = tx.reserve().await else {
            return; // the client went away
        };
        let (slot, file, avail) = match &mut source {
            BlobSource::Stored(f) => (slot, f.clone(), end.unwrap_or(pos)),
            // Served by `pump_shared`.
            BlobSource::Shared(..) => {
                return fail(slot, "internal: a shared-tier source in the file pump")
            }
            BlobSource::Filling(f) => match fill_window(f, &mut pos, end, slot, &served).await {
                Window::Read(slot, file, avail) => (slot, file, avail),
                Window::Again => continue,
                Window::Stop => return,
            },
        };
        if avail <= pos {
            return;
        }
        let n = (avail - pos).min(chunk_size) as usize;
        let piece = if file_pieces {
            Piece::File {
                file,
                offset: pos,
                len: n,
            }
        } else {
            match read_chunk(file, n, pos, from_fill).await {
                Ok(b) => Piece::Bytes(b),
                Err(e) => return fail(slot, &format!("reading the blob: {e}")),
            }
        };
        served.inc_by(n as u64);
        pos += n as u64;
        slot.send(Ok(piece));
    }
}

/// A fill's body ends only once its digest is verified: an empty (or fully sent) range
/// must not look complete while the blob may yet fail. Waits for the fill's end, and
/// ends the body with its error if it failed.
async fn settle(f: &mut Follower, tx: &mpsc::Sender<io::Result<Piece>>) {
    // This client needs nothing more from a pass-through: do not hold it up.
    f.tail.close();
    let end_state = f
        .progress
        .wait_for(|p| p.status.complete() || matches!(p.status, Status::Failed(_)))
        .await
        .map(|p| p.status.clone());
    if let Ok(Status::Failed(e)) = end_state {
        if let Ok(slot) = tx.reserve().await {
            fail(slot, &e.message);
        }
    }
}

/// What a fill lets a client read next, from `pos`.
enum Window<'a> {
    /// The file the fill writes, readable up to the given offset; the slot to send in.
    Read(mpsc::Permit<'a, io::Result<Piece>>, Arc<File>, u64),
    /// Bytes were passed through (or skipped): look again.
    Again,
    /// The body has ended, cleanly or with an error already sent.
    Stop,
}

/// Waits (up to [`FOLLOWER_PATIENCE`]) until the fill has bytes past `pos`, has ended,
/// or passes bytes through its channel (the disk is full), and says which.
async fn fill_window<'a>(
    f: &mut Follower,
    pos: &mut u64,
    end: Option<u64>,
    slot: mpsc::Permit<'a, io::Result<Piece>>,
    served: &prometheus_client::metrics::counter::Counter,
) -> Window<'a> {
    let at = *pos;
    let waited = tokio::time::timeout(
        FOLLOWER_PATIENCE,
        f.progress.wait_for(|p| {
            readable(p) > at
                || p.status.complete()
                || matches!(p.status, Status::Failed(_))
                || p.passed_from.is_some_and(|from| at >= from)
        }),
    )
    .await;
    // Clone out of the watch guard before any await.
    let waited = waited.map(|r| r.map(|p| p.clone()));
    let stop = |slot, why: &str| {
        fail(slot, why);
        Window::Stop
    };
    let p = match waited {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return stop(slot, "the blob fill ended unexpectedly"),
        Err(_) => return stop(slot, "the blob fill stalled"),
    };
    if let Status::Failed(e) = &p.status {
        return stop(slot, &e.message);
    }
    if p.passed_from.is_some_and(|from| at >= from) {
        // The disk is full: the rest comes through this client's channel.
        return match pass_through(f, pos, end, slot, served).await {
            Flow::Continue => Window::Again,
            Flow::Stop => Window::Stop,
        };
    }
    let avail = readable(&p);
    if p.status.complete() && at >= avail {
        // A fill of unknown size is complete, or the range ends past it.
        if end.is_some_and(|e| at < e) {
            return stop(slot, "the blob is shorter than announced");
        }
        return Window::Stop;
    }
    let Some(reader) = p.reader.clone() else {
        return stop(slot, "the blob fill has no data");
    };
    Window::Read(slot, reader, end.map_or(avail, |e| avail.min(e)))
}

/// Reads `n` bytes of `file` at `at`: inline where the pages are surely cached, on the
/// blocking pool where the read may wait for the disk.
async fn read_chunk(file: Arc<File>, n: usize, at: u64, from_fill: bool) -> io::Result<Bytes> {
    let read = move |file: Arc<File>| {
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
    };
    if from_fill {
        // A fill's bytes were written moments ago and sit in the page cache: reading
        // them inline costs a memcpy, where a blocking-pool hop per read would cost a
        // thread per follower in a herd.
        read(file)
    } else if let Some(chunk) = read_cached(&file, n, at) {
        // A stored blob whose pages are cached (most hits): no thread hop either.
        Ok(chunk)
    } else {
        tokio::task::spawn_blocking(move || read(file))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }
}

/// `n` bytes of `file` at `at`, if the page cache holds them all: a read that would wait
/// for the disk is refused by the kernel (`RWF_NOWAIT`), and the caller reads on the
/// blocking pool instead. `None` also for a short read or an old kernel.
fn read_cached(file: &File, n: usize, at: u64) -> Option<Bytes> {
    use rustix::io::{preadv2, ReadWriteFlags};
    let mut buf = vec![0u8; n];
    let got = preadv2(
        file,
        &mut [io::IoSliceMut::new(&mut buf)],
        at,
        ReadWriteFlags::NOWAIT,
    )
    .ok()?;
    (got == n).then(|| Bytes::from(buf))
}

/// Streams bytes `start..end` of a blob from the shared tier. The object store checked
/// nothing: a body that ends short, stalls for 30 s, or fails is an aborted transfer.
async fn pump_shared(
    shared: Arc<Shared>,
    digest: Digest,
    start: u64,
    end: Option<u64>,
    tx: mpsc::Sender<io::Result<Piece>>,
    metrics: Arc<Metrics>,
) {
    let served = metrics
        .served_bytes
        .get_or_create(&SourceLabels {
            source: Source::Cache,
        })
        .clone();
    let (size, mut stream) = match shared.blob_stream(&digest, start).await {
        Ok(Some(found)) => found,
        Ok(None) | Err(_) => {
            if let Ok(slot) = tx.reserve().await {
                fail(slot, "the shared store no longer answers for this blob");
            }
            return;
        }
    };
    // A whole blob is checked against its digest as it goes, and its last chunk held
    // until it matches: the bucket is trusted no more than an upstream. (A range cannot
    // be checked; it is served as the bucket has it.)
    let mut hasher = (start == 0 && end == Some(size)).then(|| digest.hasher());
    let mut pos = start;
    while end.is_none_or(|e| pos < e) {
        let Ok(slot) = tx.reserve().await else {
            return; // the client went away
        };
        let mut chunk = match tokio::time::timeout(SHARED_STALL, stream.next()).await {
            Ok(Some(Ok(c))) => c,
            Ok(Some(Err(e))) => return fail(slot, &format!("the shared store: {e}")),
            Ok(None) if end.is_none() => return,
            Ok(None) => return fail(slot, "the shared store's body ended early"),
            Err(_) => return fail(slot, "the shared store stalled"),
        };
        if let Some(e) = end {
            chunk.truncate((e - pos).min(chunk.len() as u64) as usize);
        }
        pos += chunk.len() as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        if end == Some(pos) {
            if let Some(h) = hasher.take() {
                if h.finish() != digest {
                    shared.forget_blob(&digest).await;
                    return fail(slot, "the shared store's object does not match its digest");
                }
            }
        }
        served.inc_by(chunk.len() as u64);
        slot.send(Ok(Piece::Bytes(chunk)));
    }
}

/// A shared-tier body that sends nothing for this long is given up on.
const SHARED_STALL: std::time::Duration = std::time::Duration::from_secs(30);

enum Flow {
    Continue,
    Stop,
}

/// Sends the next bytes a fill passes through (disk full), from the follower's channel.
async fn pass_through(
    f: &mut Follower,
    pos: &mut u64,
    end: Option<u64>,
    slot: mpsc::Permit<'_, io::Result<Piece>>,
    served: &prometheus_client::metrics::counter::Counter,
) -> Flow {
    match f.tail.recv().await {
        Some((off, bytes)) => {
            let len = bytes.len() as u64;
            if off + len <= *pos {
                return Flow::Continue; // already sent from the file
            }
            if off > *pos {
                fail(slot, "the pass-through lost bytes");
                return Flow::Stop;
            }
            let mut data = bytes.slice((*pos - off) as usize..);
            if let Some(e) = end {
                data.truncate((e - *pos) as usize);
            }
            *pos += data.len() as u64;
            served.inc_by(data.len() as u64);
            slot.send(Ok(Piece::Bytes(data)));
            Flow::Continue
        }
        None => {
            // The channel closes once the fill is verified, or when it failed.
            let status = f.progress.borrow().status.clone();
            match status {
                // A clean end only if every byte came: a channel closed early (this client
                // was dropped as too slow) must abort, not end a chunked body short.
                s if s.complete()
                    && f.progress
                        .borrow()
                        .total
                        .is_some_and(|t| *pos >= end.unwrap_or(t).min(t)) =>
                {
                    Flow::Stop
                }
                Status::Failed(e) => {
                    fail(slot, &e.message);
                    Flow::Stop
                }
                _ => {
                    fail(slot, "the blob fill ended unexpectedly");
                    Flow::Stop
                }
            }
        }
    }
}

/// Ends the body with an error, which aborts the client's transfer.
fn fail(slot: mpsc::Permit<'_, io::Result<Piece>>, why: &str) {
    tracing::debug!(cause = why, "aborting a blob response");
    slot.send(Err(io::Error::other(why.to_owned())));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cached_reads_give_the_file_bytes_or_nothing() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        // Just written: in the page cache.
        let got = read_cached(&f, 1000, 5000).expect("cached bytes");
        assert_eq!(&got[..], &data[5000..6000]);
        // Past the end: a short read is not a chunk.
        assert!(read_cached(&f, 1000, 199_500).is_none());
        // Evicted from the cache (where the filesystem can): refused, never wrong bytes.
        f.sync_all().unwrap();
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        if let Some(got) = read_cached(&f, 100_000, 0) {
            assert_eq!(&got[..], &data[..100_000]);
        }
    }
}
