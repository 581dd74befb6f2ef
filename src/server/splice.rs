//! Zero-copy stored blobs over plain HTTP/1.1: the file's pages go from the page cache to
//! the socket with `sendfile(2)`, never through user space.
//!
//! hyper decides everything that is sent (status, headers, lengths, keep-alive) and only
//! sees bytes, so the body of a spliced response is made of *placeholders*: slices of
//! [`PLACEHOLDER`], a static region hyper passes through untouched (with vectored writes,
//! hyper queues body buffers as they are and never copies them). Each placeholder frame
//! has a [`Job`] in the connection's queue saying which file range it stands for. The
//! connection's socket, [`SpliceIo`], recognises a placeholder by its address, and sends
//! the job's file range in its place. Anything else is written as it is.
//!
//! The pairing is checked on every write: a placeholder without its job, or with a
//! different length or position, fails the connection rather than send a wrong byte
//! (the client sees an aborted transfer, never a complete-looking wrong one).
//! Used only where `server` installs it: plain TCP, HTTP/1.x. TLS and HTTP/2 responses
//! keep the buffered path.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The largest placeholder frame: one `sendfile` job (a blob body's largest file piece).
/// Never read or written by anyone; it lives in `.bss`, so it costs no memory.
const PLACEHOLDER_LEN: usize = crate::proxy::MAX_FILE_PIECE;
/// Each job's frame starts at its own offset (a rolling count below this), so a frame
/// can only be taken for the job it was made with: a left-over job of the same length
/// would otherwise pass the check.
const TAGS: usize = 4096;
static PLACEHOLDER: [u8; PLACEHOLDER_LEN + TAGS] = [0; PLACEHOLDER_LEN + TAGS];

/// Where `s` starts inside [`PLACEHOLDER`], if it is a slice of it.
fn placeholder_offset(s: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let at = s.as_ptr() as usize;
    (!s.is_empty() && at >= base && at < base + PLACEHOLDER.len()).then(|| at - base)
}

/// One placeholder frame's file range.
struct Job {
    file: Arc<File>,
    offset: u64,
    len: usize,
    sent: usize,
    /// Where this job's frame starts in [`PLACEHOLDER`].
    tag: usize,
}

/// The jobs of one connection, in the order hyper will write their placeholders, and
/// the count that tags them.
#[derive(Default)]
pub struct Jobs(Mutex<(VecDeque<Job>, usize)>);

impl Jobs {
    /// Queues a job and gives the frame that stands for it.
    fn push(&self, file: Arc<File>, offset: u64, len: usize) -> Bytes {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let tag = q.1 % TAGS;
        q.1 = q.1.wrapping_add(1);
        q.0.push_back(Job {
            file,
            offset,
            len,
            sent: 0,
            tag,
        });
        Bytes::from_static(&PLACEHOLDER[tag..tag + len])
    }

    fn pop(&self) -> Option<Job> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .pop_front()
    }
}

/// What a request on a splicing connection carries (in its extensions) so its handler can
/// answer a stored blob with a [`SplicedBody`].
#[derive(Clone)]
pub struct Splicer(pub(super) Arc<Jobs>);

impl Splicer {
    /// The placeholder frame for `len` bytes of `file` from `offset` (at most
    /// [`PLACEHOLDER_LEN`]; a longer range is cut, and hyper then fails the response as
    /// shorter than announced rather than send it as complete).
    pub fn frame(&self, file: Arc<File>, offset: u64, len: usize) -> Bytes {
        self.0.push(file, offset, len.min(PLACEHOLDER_LEN))
    }
}

/// A stored file's byte range as placeholder frames.
pub struct SplicedBody {
    jobs: Arc<Jobs>,
    file: Arc<File>,
    pos: u64,
    end: u64,
    served: Counter,
}

impl SplicedBody {
    pub fn new(splicer: &Splicer, file: Arc<File>, start: u64, end: u64, served: Counter) -> Self {
        SplicedBody {
            jobs: splicer.0.clone(),
            file,
            pos: start,
            end,
            served,
        }
    }
}

impl hyper::body::Body for SplicedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let len = (this.end - this.pos).min(PLACEHOLDER_LEN as u64) as usize;
        let frame = this.jobs.push(this.file.clone(), this.pos, len);
        this.pos += len as u64;
        this.served.inc_by(len as u64);
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}

/// A plain TCP connection that sends placeholders' file ranges with `sendfile`.
pub struct SpliceIo {
    tcp: TcpStream,
    jobs: Arc<Jobs>,
    current: Option<Job>,
}

impl SpliceIo {
    pub fn new(tcp: TcpStream) -> (Self, Splicer) {
        let jobs = Arc::new(Jobs::default());
        (
            SpliceIo {
                tcp,
                jobs: jobs.clone(),
                current: None,
            },
            Splicer(jobs),
        )
    }

    fn mismatch(what: &str) -> io::Error {
        io::Error::other(format!("splice: {what}; closing the connection"))
    }

    /// Sends (part of) the placeholder `slice` stands for.
    fn poll_splice(&mut self, cx: &mut Context<'_>, slice: &[u8]) -> Poll<io::Result<usize>> {
        let at = placeholder_offset(slice).unwrap_or_default();
        let job = match &mut self.current {
            Some(job) => job,
            None => self.current.insert(
                self.jobs
                    .pop()
                    .ok_or_else(|| Self::mismatch("a placeholder without a job"))?,
            ),
        };
        if at != job.tag + job.sent || slice.len() != job.len - job.sent {
            return Poll::Ready(Err(Self::mismatch(
                "a placeholder out of step with its job",
            )));
        }
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let (file, mut offset, left) = (
                job.file.clone(),
                job.offset + job.sent as u64,
                job.len - job.sent,
            );
            match self.tcp.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.tcp, &*file, Some(&mut offset), left)
                    .map_err(io::Error::from)
            }) {
                Ok(0) => return Poll::Ready(Err(Self::mismatch("the file ended early"))),
                Ok(n) => {
                    job.sent += n;
                    if job.sent == job.len {
                        self.current = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SpliceIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpliceIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if placeholder_offset(buf).is_some() {
            return this.poll_splice(cx, buf);
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match bufs.iter().position(|b| placeholder_offset(b).is_some()) {
            // A placeholder first: send its file range (one job per call).
            Some(0) => this.poll_splice(cx, &bufs[0]),
            // Plain bytes (headers, chunk framing) before it: write those first.
            Some(n) => Pin::new(&mut this.tcp).poll_write_vectored(cx, &bufs[..n]),
            None => Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper queues body buffers without copying them only for vectored writers.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_known_by_address_only() {
        assert_eq!(placeholder_offset(&PLACEHOLDER[..10]), Some(0));
        assert_eq!(placeholder_offset(&PLACEHOLDER[7..10]), Some(7));
        // The same bytes elsewhere are not a placeholder.
        let zeros = vec![0u8; 10];
        assert_eq!(placeholder_offset(&zeros), None);
        assert_eq!(placeholder_offset(&[]), None);
    }
}
