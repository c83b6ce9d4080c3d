//! keyway's own HTTP/1.1 client for pooled requests to backends, driven in the request's
//! own task: the request head is written straight into one reused buffer, the response
//! head parsed with `httparse`, and the body decoded (Content-Length, chunked with
//! trailers, close-delimited) as the client side reads it. There is no connection task,
//! channel or waker hop per request, which is what hyper's client costs.
//!
//! What it must never do: reuse a connection whose last exchange did not end cleanly
//! (a body not read to its end, an upload cut short, `Connection: close`, a
//! close-delimited body, stray bytes, EOF); accept an ambiguous response framing
//! (conflicting Content-Length, an invalid chunk); grow a buffer without bound (a head
//! over [`MAX_HEAD`], a chunk line over [`MAX_CHUNK_LINE`]). Upgrades (WebSocket) and
//! health probes keep hyper's client; HTTP/2 to backends too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use http::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::body::{Body, BoxError};

mod body;
mod head;
pub mod serve;
#[cfg(test)]
mod tests;

pub use body::RespBody;
use body::Upload;
use head::{Framing, ReqFraming};

/// Largest response head (status line and headers) read from a backend.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head or a trailer block.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) in a chunked response body.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Reads start at this size and double, up to [`MAX_READ`], while they fill up.
/// How long a request's first body bytes are awaited before its head goes out anyway
/// (see [`send`]). Bytes already received arrive within microseconds; a client that
/// holds its body until the backend answers waits this long once.
const FIRST_BYTES_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// The byte stream under a connection: plain TCP or TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the rustls state is large and rare next to plain TCP).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An HTTP/1.1 connection to a backend, idle between exchanges. Its buffers are kept
/// and reused, so a warm connection allocates nothing for a request head.
pub struct Conn {
    io: Stream,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The request head being written.
    wbuf: Vec<u8>,
    /// Where the response head's fields sit (scratch space for the parser).
    spans: Vec<[usize; 4]>,
    /// How much the next read reserves (adapts between [`MIN_READ`] and [`MAX_READ`]).
    next_read: usize,
    /// It carried an exchange before (it came from the pool).
    reused: bool,
    /// The protocol-timeout timer, kept from one exchange to the next: lent to each
    /// exchange (see [`Conn::take_timer`]), so a warm connection registers no timer
    /// per request. While the connection idles, the timer may still hold the waker of
    /// the task that used it last, until it fires (at most protocol_timeout later) or
    /// the next exchange polls it: a pooled connection is bounded, and so is this.
    timer: Option<Timer>,
}

/// A timer an exchange borrows from its connection.
pub type Timer = Pin<Box<tokio::time::Sleep>>;

impl Conn {
    /// A fresh connection over `io`. Boxed: a connection moves between the pool, the
    /// exchange and the response body on every request, and a pointer moves for free
    /// where its buffers and socket (about 150 bytes) would be copied each time.
    pub fn new(io: Stream) -> Box<Self> {
        Box::new(Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            spans: Vec::new(),
            next_read: MIN_READ,
            reused: false,
            timer: None,
        })
    }

    /// The timer an exchange on this connection waits with (`None` until one was kept).
    pub fn take_timer(&mut self) -> Option<Timer> {
        self.timer.take()
    }

    /// Keeps `timer` for the next exchange.
    pub fn keep_timer(&mut self, timer: Timer) {
        self.timer = Some(timer);
    }

    /// Marks the connection as one that carried an exchange before (see
    /// [`SendError::Stale`]).
    pub fn set_reused(&mut self) {
        self.reused = true;
    }

    /// Whether an idle connection can take another request: the backend has not closed
    /// it, sent stray bytes or broken it since the last exchange. Never waits: it looks
    /// at what the socket has already reported.
    pub fn still_idle(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        // Pending: nothing to read, the connection is as we left it. Anything else (EOF,
        // bytes nobody asked for, an error) makes it unusable.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// Gives back what a large exchange grew (reads of up to [`MAX_READ`], a long request
    /// head) before the connection idles in the pool: up to `max_idle` pooled
    /// connections must not each pin a quarter of a MiB.
    pub(crate) fn release_buffers(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * MIN_READ {
            self.rbuf = BytesMut::new();
        }
        self.next_read = MIN_READ;
        if self.wbuf.capacity() > 2 * MIN_READ {
            self.wbuf = Vec::new();
        }
    }

    /// Reads more bytes into `rbuf`. `Ok(0)` is EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ / 2 {
            self.rbuf.reserve(self.next_read);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        if n >= room && self.next_read < MAX_READ {
            self.next_read *= 2;
        } else if n < room / 4 && self.next_read > MIN_READ {
            self.next_read /= 2;
        }
        Poll::Ready(Ok(n))
    }
}

/// Lets the tasks the runtime already has ready run before this one goes on: awaited
/// before a request head is written to its backend ([`send`]) and before an answer is
/// written to the client ([`serve::serve`]), so that the receives of one runtime turn
/// come before its sends, and the sends come together.
///
/// When the peer is a process on this host (loopback, a sidecar), a send runs the
/// receiver's side of TCP inside the sender's system call, and if the receiver sleeps in
/// `epoll_wait` the sender also wakes it (on a VM, an interrupt to another core is a VM
/// exit: several microseconds of the sender's time per wakeup). A task that receives and
/// sends in one poll spreads its sends between the other tasks' receives, and the peer
/// (a backend that answers in a few microseconds) falls asleep between them; sends that
/// come together find it awake. `bench/kernel-split.sh` counts it: 0.22 to 0.92 wakeups
/// per request with neither pause, 0.16 to 0.19 with the answers' alone, 0.11 to 0.16
/// with both (HAProxy, whose event loop receives for every ready connection before it
/// sends: 0.06 to 0.10).
///
/// Only worth it when other requests are on the thread, so the request path waits with
/// [`behind_other_requests`]: a lone request has nothing to wait behind, and the wait
/// costs one more poll of its future (about 1,000 instructions).
///
/// The task wakes itself and returns `Pending` once; tokio queues a task that woke
/// itself behind the ready ones, with no trip through the poller (unlike
/// `tokio::task::yield_now`, which waits for the next poll of the I/O driver).
pub(crate) fn behind_ready_tasks() -> BehindReadyTasks {
    BehindReadyTasks { yielded: false }
}

/// [`behind_ready_tasks`] when other requests are on the thread
/// ([`crate::workers::others_handling`]; `own`: whether the caller's request still
/// counts itself), and ready at once otherwise.
pub(crate) fn behind_other_requests(own: bool) -> BehindReadyTasks {
    let mut wait = behind_ready_tasks();
    // Counted as done already: there is nothing on the thread to wait behind.
    wait.yielded = !crate::workers::others_handling(own);
    wait
}

/// See [`behind_ready_tasks`].
pub(crate) struct BehindReadyTasks {
    yielded: bool,
}

impl Future for BehindReadyTasks {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Why an exchange failed before a response head.
#[derive(Debug)]
pub enum SendError {
    /// Not a byte of the request was written: it comes back whole, for another
    /// connection.
    Unsent(Box<Request<Body>>, io::Error),
    /// The client's request body failed while it was uploaded (aborted, malformed, too
    /// large, cut off by keyway). Not the backend's doing.
    Body(BoxError),
    /// The backend broke the exchange: a reset, EOF, or a malformed response head.
    Backend(String),
    /// A pooled connection was closed by the backend before a byte of the answer to a
    /// bodiless GET, HEAD or OPTIONS came back: the keep-alive race (the backend's idle
    /// timeout ran out as the request went out). The request comes back for one more try
    /// on a fresh connection, as nginx does for cached connections.
    Stale(Box<Request<Body>>),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Unsent(_, e) => write!(f, "connection closed before the request: {e}"),
            SendError::Body(e) => write!(f, "the request body failed: {e}"),
            SendError::Backend(e) => f.write_str(e),
            SendError::Stale(_) => {
                f.write_str("the backend closed a pooled connection as the request went out")
            }
        }
    }
}

/// Sends `req` over `conn` and waits for the response head; the request body streams
/// meanwhile (and on, while the response body is read, if the backend answers early).
/// The returned body owns the connection and hands it back through
/// [`RespBody::take_reusable`] once the exchange ended cleanly.
/// `extra` fields (the forwarded identity) are written after the request's own headers.
// Deliberately not an `async fn` (the note inside says why).
#[allow(clippy::manual_async_fn)]
pub fn send(
    mut conn: Box<Conn>,
    mut req: Request<Body>,
    extra: Option<&crate::headers::Added>,
) -> impl Future<Output = Result<Response<RespBody>, SendError>> + '_ {
    // Not an `async fn`: that moves the arguments into locals and keeps both copies
    // (the request is about 250 bytes) in every request's future.
    async move {
        let framing = ReqFraming::of(&req);
        // A body's first bytes are awaited (for at most FIRST_BYTES_WAIT) before the head
        // goes out: a body broken from the start (a bad chunk size) is refused without the
        // backend seeing the request at all. The wait is short so that a client that sends
        // its body only once the backend answered (full duplex) is not held up, and a pooled
        // connection is checked once more after it.
        let (mut upload, mut first) = match framing {
            ReqFraming::Empty => (None, None),
            framing => {
                let body = std::mem::replace(req.body_mut(), crate::body::empty());
                let mut upload = Upload::new(body, framing);
                let mut wait = std::pin::pin!(tokio::time::sleep(FIRST_BYTES_WAIT));
                let first = std::future::poll_fn(|cx| match upload.poll_first(cx) {
                    Poll::Ready(got) => Poll::Ready(got.map(Some)),
                    Poll::Pending => wait.as_mut().poll(cx).map(|()| Ok(None)),
                })
                .await?;
                if conn.reused && !conn.still_idle() {
                    *req.body_mut() = upload.into_body(first);
                    return Err(SendError::Stale(Box::new(req)));
                }
                (Some(upload), first)
            }
        };
        head::encode_request(&req, extra, framing, &mut conn.wbuf);
        // Written once the other ready tasks have had their turn (see
        // `behind_ready_tasks`): the requests of one turn reach the backend together.
        // The caller's request counts itself as handled until its answer's head.
        behind_other_requests(true).await;
        let mut written = 0;
        while written < conn.wbuf.len() {
            match conn.io.write(&conn.wbuf[written..]).await {
                Ok(0) => {
                    return Err(SendError::Backend(
                        "backend connection closed while the request head was written".into(),
                    ))
                }
                Ok(n) => written += n,
                Err(e) if written == 0 => {
                    if let Some(upload) = upload.take() {
                        *req.body_mut() = upload.into_body(first.take());
                    }
                    return Err(SendError::Unsent(Box::new(req), e));
                }
                Err(e) => return Err(SendError::Backend(format!("writing the request head: {e}"))),
            }
        }
        let head_request = req.method() == Method::HEAD;
        // A bodiless safe request on a pooled connection is kept until an answer starts, to
        // be sent once more if the connection turns out closed (`SendError::Stale`). The
        // request stays where it is (only a body is taken out of it): a second copy would
        // grow every request's future.
        let again = framing == ReqFraming::Empty
            && conn.reused
            && matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if let (Some(upload), Some(first)) = (upload.as_mut(), first.take()) {
            upload.queue_first(first)?;
        }
        if upload.is_none() {
            conn.io
                .flush()
                .await
                .map_err(|e| SendError::Backend(format!("writing the request head: {e}")))?;
        }
        let mut seen = 0usize;
        let mut upload_failed: Option<SendError> = None;
        loop {
            if !conn.rbuf.is_empty() {
                match head::parse_response(&mut conn.rbuf, &mut conn.spans, req.headers_mut()) {
                    // 1xx (100 Continue, 103 Early Hints) precede the response; a 101 is
                    // final, and refused by `Framing::of`.
                    Ok(Some(h))
                        if h.status.is_informational()
                            && h.status != http::StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue
                    }
                    Ok(Some(h)) => {
                        let framing = Framing::of(&h, head_request).map_err(SendError::Backend)?;
                        let clean = upload_failed.is_none();
                        return Ok(body::response(conn, h, framing, upload, clean));
                    }
                    Ok(None) if conn.rbuf.len() > MAX_HEAD => {
                        return Err(SendError::Backend(format!(
                            "backend's response head is larger than {MAX_HEAD} bytes"
                        )))
                    }
                    Ok(None) => {}
                    Err(e) => return Err(SendError::Backend(e)),
                }
            }
            let n = std::future::poll_fn(|cx| {
                if let Some(u) = upload.as_mut() {
                    match u.poll(&mut conn.io, cx) {
                        Poll::Ready(Ok(())) => upload = None,
                        // The client's body failed: the backend must not get a truncated
                        // request that looks whole, so the exchange ends here.
                        Poll::Ready(Err(e @ SendError::Body(_))) => return Poll::Ready(Err(e)),
                        // The backend stopped taking the body (it answered early and
                        // closed, as a 413 does): its answer may already be on its way,
                        // so reading goes on; the connection is not reused.
                        Poll::Ready(Err(e)) => {
                            upload = None;
                            upload_failed = Some(e);
                        }
                        Poll::Pending => {}
                    }
                }
                conn.poll_fill(cx)
                    .map_err(|e| SendError::Backend(format!("reading the response: {e}")))
            })
            .await;
            let n = match (n, upload_failed.take()) {
                (Ok(n), failed) => {
                    upload_failed = failed;
                    n
                }
                (Err(_), Some(failed)) => return Err(failed),
                (Err(e), None) => {
                    return Err(if again && seen == 0 {
                        SendError::Stale(Box::new(req))
                    } else {
                        e
                    });
                }
            };
            if n == 0 {
                if let Some(failed) = upload_failed {
                    return Err(failed);
                }
                if again && seen == 0 {
                    return Err(SendError::Stale(Box::new(req)));
                }
                return Err(SendError::Backend(if seen == 0 && conn.rbuf.is_empty() {
                    "backend closed the connection without answering".into()
                } else {
                    "backend closed the connection in the middle of the response head".into()
                }));
            }
            seen += n;
        }
    }
}
