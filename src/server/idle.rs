//! Connection deadlines, enforced on the socket itself so no protocol stage escapes them:
//!
//! - **Head**: from accept until the first request's head is parsed, `header_read_timeout`.
//!   This covers the TLS handshake and hyper's HTTP/1-or-2 sniffing, which run before
//!   hyper's own header timer starts: a silent or trickling client is closed on time.
//! - **Idle**: a connection with no request in flight for `idle_timeout` is closed. Idle is
//!   counted in requests, not bytes, so HTTP/2 keep-alive pings (which answer whether a
//!   peer is alive) do not keep an unused connection open.
//! - **Stuck writes**: with a request in flight, a response that cannot be written for
//!   `idle_timeout` (a peer that stopped reading) closes the connection. Waiting for an
//!   upstream is not the client's fault and is bounded elsewhere.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the requests on one connection tell its socket: whether the first head has been
/// parsed, how many requests are in flight, and since when none has been.
#[derive(Default)]
pub struct Activity {
    served: AtomicBool,
    active: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    /// The last sign of life of a request in flight: its start, or a poll of its body.
    /// An HTTP/2 client that never opens its flow-control window leaves bodies unpolled.
    progress: Mutex<Option<Instant>>,
    /// The connection's task, woken when the last request ends so the idle timer starts.
    waker: AtomicWaker,
}

impl Activity {
    /// A request head was parsed: the head deadline is met, a request is in flight.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.served.store(true, Ordering::Release);
        self.progressed();
        self.active.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    fn progressed(&self) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}

/// Held by a request until its response body is finished or dropped.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // Stored before the count drops: a check that sees no request in flight must see
        // this request's end, not an older idle time.
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake();
        }
    }
}

/// A response body that holds its request's place in [`Activity`] until it is finished
/// or dropped.
pub struct Tracked<B> {
    inner: B,
    guard: RequestGuard,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        Tracked { inner, guard }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        this.guard.0.progressed();
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone, Copy)]
pub struct Deadlines {
    pub head: Duration,
    pub idle: Duration,
}

pub struct Guarded<T> {
    inner: T,
    deadlines: Deadlines,
    activity: Arc<Activity>,
    accepted: Instant,
    write_blocked_since: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, deadlines: Deadlines, activity: Arc<Activity>) -> Self {
        let accepted = Instant::now();
        Guarded {
            inner,
            deadlines,
            activity,
            accepted,
            write_blocked_since: None,
            sleep: Box::pin(tokio::time::sleep_until(accepted + deadlines.head)),
        }
    }

    /// The moment this connection must close if nothing changes, and why.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let a = &self.activity;
        if !a.served.load(Ordering::Acquire) {
            return Some((
                self.accepted + self.deadlines.head,
                "no request head in time",
            ));
        }
        let blocked = self
            .write_blocked_since
            .map(|t| (t + self.deadlines.idle, "peer stopped reading"));
        if a.active.load(Ordering::Acquire) > 0 {
            // Waiting on an upstream is bounded elsewhere; a body nobody polls is not.
            let progress = a
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(self.accepted);
            let stuck = (progress + self.deadlines.idle, "no progress on a request");
            return Some(blocked.map_or(stuck, |b| b.max(stuck)));
        }
        let since = a
            .idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(self.accepted);
        let idle = (since + self.deadlines.idle, "connection idle");
        // The last response may still be leaving: a slow reader is not idle.
        Some(blocked.map_or(idle, |b| b.max(idle)))
    }

    /// Called when the socket has nothing to offer: fails once the deadline has passed,
    /// otherwise arms the timer (and the activity waker) to be polled again.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.activity.waker.register(cx.waker());
        let Some((at, why)) = self.deadline() else {
            return Poll::Pending;
        };
        if Instant::now() >= at {
            return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        if self.sleep.deadline() != at {
            self.sleep.as_mut().reset(at);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, why)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.check(cx).map(Err),
            ready => ready,
        }
    }
}

impl<T: AsyncWrite + Unpin> Guarded<T> {
    fn wrote<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => {
                self.write_blocked_since.get_or_insert_with(Instant::now);
                self.check(cx).map(Err)
            }
            ready => {
                self.write_blocked_since = None;
                ready
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.wrote(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DEADLINES: Deadlines = Deadlines {
        head: Duration::from_secs(2),
        idle: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_at_the_head_deadline() {
        let (client, server) = tokio::io::duplex(64);
        let mut conn = Guarded::new(server, DEADLINES, Arc::new(Activity::default()));
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), DEADLINES.head);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn trickled_bytes_do_not_extend_the_head_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = Guarded::new(server, DEADLINES, Arc::new(Activity::default()));
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                if client.write_all(b"G").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let mut buf = [0u8; 8];
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), DEADLINES.head);
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_body_is_never_polled_closes_at_idle_timeout() {
        // An HTTP/2 client that keeps its window shut: the body is never polled, nothing
        // is written, and pings alone must not keep the connection.
        let (_client, server) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut conn = Guarded::new(server, DEADLINES, activity.clone());
        let _guard = activity.begin();
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), DEADLINES.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request_whatever_bytes_move() {
        let (mut client, server) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut conn = Guarded::new(server, DEADLINES, activity.clone());
        let guard = activity.begin();
        // A request in flight that started within idle_timeout: not idle.
        let mut buf = [0u8; 8];
        let waited = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        assert!(waited.is_err(), "closed while a request was in flight");
        let ended = Instant::now();
        drop(guard);
        // Pings and their acks move bytes; the connection still closes on time.
        let pinger = tokio::spawn(async move {
            for _ in 0..100 {
                if client.write_all(b"p").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let err = loop {
            if let Err(e) = conn.read(&mut buf).await {
                break e;
            }
        };
        pinger.abort();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let idle = ended.elapsed();
        assert!(
            idle >= DEADLINES.idle && idle <= DEADLINES.idle + Duration::from_secs(2),
            "{idle:?}"
        );
    }
}
