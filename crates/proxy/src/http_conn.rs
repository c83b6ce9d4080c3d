//! Serves one client connection: HTTP/2 (hyper) when the client opens with the HTTP/2
//! preface (prior knowledge, or after ALPN `h2`); otherwise keyway's own HTTP/1.1 server
//! side (`h1::serve`) for plain bodiless requests, which hands the connection, with
//! every byte it read, to hyper's HTTP/1.1 server (with upgrades) at the first request
//! it does not serve.
//!
//! This replaces hyper-util's `auto::Builder` for one reason: memory per idle connection.
//! `auto` reads the first bytes (up to the 24 of the preface) and hands them back to
//! hyper as a separate first read, so hyper's HTTP/1 read buffer never holds a whole
//! request head after its first read; the second read then finds less than 8 KiB free
//! and the buffer doubles to 16 KiB, kept for the life of the connection. Here the
//! bytes read to detect the version are handed back *together with* whatever has
//! already arrived behind them, so a head that came in one segment is parsed from one
//! read and the buffer stays at hyper's 8 KiB.
//!
//! It owns no policy: limits and timers are set on the builders by `server`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};

use hyper::body::{Body, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::h1::serve::{self, Ended, NoBody};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's HTTP/1 and HTTP/2 settings for one listener.
pub(crate) struct Builder {
    /// HTTP/1.1 settings.
    pub(crate) http1: http1::Builder,
    /// HTTP/2 settings.
    pub(crate) http2: http2::Builder<TokioExecutor>,
    /// keyway's own HTTP/1.1 side; `None` leaves all of HTTP/1.1 to hyper.
    pub(crate) own: Option<serve::Settings>,
}

impl Builder {
    /// hyper's defaults for both protocols.
    pub(crate) fn new() -> Self {
        Self {
            http1: http1::Builder::new(),
            http2: http2::Builder::new(TokioExecutor::new()),
            own: None,
        }
    }

    /// Serves `io` once the protocol is known: with `own` (keyway's HTTP/1.1 side)
    /// while it can, with `service` (hyper) otherwise.
    pub(crate) fn serve<I, S, H>(self: &Arc<Self>, io: I, service: S, own: H) -> Connection<I, S>
    where
        S: HttpService<Incoming>,
        H: FnMut(Request<NoBody>) -> OwnAnswer + Send + 'static,
    {
        Connection {
            state: State::Detect {
                builder: self.clone(),
                io: Some(io),
                service: Some(service),
                own: Some(Box::new(own)),
                pre: [0; 24],
                filled: 0,
                cancelled: false,
            },
        }
    }
}

/// A boxed answer to a request served by keyway's own HTTP/1.1 side.
pub(crate) type OwnAnswer = Pin<Box<dyn Future<Output = Response<crate::body::Body>> + Send>>;

/// What keyway's own HTTP/1.1 side calls for each request it serves.
type OwnHandler = Box<dyn FnMut(Request<NoBody>) -> OwnAnswer + Send>;

type OwnFuture<I> = Pin<Box<dyn Future<Output = Ended<I>> + Send>>;

pin_project_lite::pin_project! {
    /// One client connection, first detecting the protocol, then served by hyper.
    pub(crate) struct Connection<I, S>
    where
        S: HttpService<Incoming>,
    {
        #[pin]
        state: State<I, S>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<I, S>
    where
        S: HttpService<Incoming>,
    {
        Detect {
            builder: Arc<Builder>,
            io: Option<I>,
            service: Option<S>,
            own: Option<OwnHandler>,
            pre: [u8; 24],
            filled: usize,
            cancelled: bool,
        },
        Own {
            serving: OwnFuture<I>,
            builder: Arc<Builder>,
            service: Option<S>,
            closing: Arc<AtomicBool>,
        },
        H1 {
            #[pin]
            conn: http1::UpgradeableConnection<TokioIo<Prefixed<I>>, S>,
        },
        H2 {
            #[pin]
            conn: http2::Connection<TokioIo<Prefixed<I>>, S, TokioExecutor>,
        },
    }
}

impl<I, S, B> Connection<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: Http2ServerConnExec<S::Future, B>,
{
    /// Starts a graceful shutdown: hyper finishes what is in flight and closes. A
    /// connection still detecting its protocol (nothing served yet) just ends.
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.project().state.project() {
            StateProj::Detect { cancelled, .. } => *cancelled = true,
            StateProj::Own { closing, .. } => closing.store(true, Ordering::Relaxed),
            StateProj::H1 { conn } => conn.graceful_shutdown(),
            StateProj::H2 { conn } => conn.graceful_shutdown(),
        }
    }
}

impl<I, S, B> Future for Connection<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    TokioExecutor: Http2ServerConnExec<S::Future, B>,
{
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::H1 { conn } => return conn.poll(cx),
                StateProj::H2 { conn } => return conn.poll(cx),
                StateProj::Own {
                    serving,
                    builder,
                    service,
                    closing,
                } => {
                    let (io, pre) = match std::task::ready!(serving.as_mut().poll(cx)) {
                        Ended::Closed => return Poll::Ready(Ok(())),
                        Ended::HandOff(io, pre) => (io, pre),
                    };
                    let Some(service) = service.take() else {
                        return Poll::Ready(Ok(()));
                    };
                    let io = TokioIo::new(Prefixed::new(pre, io));
                    let mut conn = builder.http1.serve_connection(io, service).with_upgrades();
                    if closing.load(Ordering::Relaxed) {
                        Pin::new(&mut conn).graceful_shutdown();
                    }
                    State::H1 { conn }
                }
                StateProj::Detect {
                    builder,
                    io,
                    service,
                    own,
                    pre,
                    filled,
                    cancelled,
                } => {
                    if *cancelled {
                        return Poll::Ready(Ok(()));
                    }
                    let Some(stream) = io.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    // Start as HTTP/2; HTTP/1 as soon as a byte differs from the preface
                    // or the client stops sending.
                    let mut h2 = true;
                    while *filled < pre.len() {
                        let mut buf = ReadBuf::new(&mut pre[*filled..]);
                        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                            Poll::Pending => return Poll::Pending,
                            // hyper meets the same error (or EOF) on its first read.
                            Poll::Ready(Err(_)) => {
                                h2 = false;
                                break;
                            }
                            Poll::Ready(Ok(())) => {}
                        }
                        let n = buf.filled().len();
                        let was = *filled;
                        *filled += n;
                        if n == 0 || pre[was..*filled] != H2_PREFACE[was..*filled] {
                            h2 = false;
                            break;
                        }
                    }
                    let (Some(stream), Some(service)) = (io.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    let own = own.take();
                    if let (false, true, Some(settings), Some(own)) =
                        (h2, *filled > 0, builder.own, own)
                    {
                        // keyway's own side, starting from the bytes read so far.
                        let mut buf = BytesMut::with_capacity(serve::INITIAL_BUF);
                        buf.extend_from_slice(&pre[..*filled]);
                        let closing = Arc::new(AtomicBool::new(false));
                        let serving =
                            Box::pin(serve::serve(stream, buf, own, settings, closing.clone()));
                        State::Own {
                            serving,
                            builder: builder.clone(),
                            service: Some(service),
                            closing,
                        }
                    } else {
                        let io = TokioIo::new(Prefixed::new(
                            Bytes::copy_from_slice(&pre[..*filled]),
                            stream,
                        ));
                        if h2 {
                            State::H2 {
                                conn: builder.http2.serve_connection(io, service),
                            }
                        } else {
                            State::H1 {
                                conn: builder.http1.serve_connection(io, service).with_upgrades(),
                            }
                        }
                    }
                }
            };
            state.set(next);
        }
    }
}

// === Prefixed ===

/// The client's socket with the bytes already read from it (to detect the protocol,
/// or by keyway's own HTTP/1.1 side) put back in front. The read that returns the last
/// of them also takes whatever the socket already holds behind them, so hyper sees a
/// head that arrived in one segment in one read.
pub(crate) struct Prefixed<I> {
    pre: Bytes,
    /// An error met while topping up the read that returned the prefix, for the next.
    error: Option<io::Error>,
    inner: I,
}

impl<I> Prefixed<I> {
    fn new(pre: Bytes, inner: I) -> Self {
        Self {
            pre,
            error: None,
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            if this.pre.is_empty() {
                // Release the prefix's allocation; the connection may live for hours.
                this.pre = Bytes::new();
            }
            if this.pre.is_empty() && buf.remaining() > 0 {
                // Pending leaves the waker registered, which is harmless: the prefix is
                // returned now either way.
                if let Poll::Ready(Err(e)) = Pin::new(&mut this.inner).poll_read(cx, buf) {
                    this.error = Some(e);
                }
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The prefix and what already arrived behind it come back in one read.
    #[tokio::test]
    async fn the_prefix_comes_back_with_what_follows_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        // "GET" was consumed by the detection; the rest waits in the socket.
        client
            .write_all(b" / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut io = Prefixed::new(Bytes::from_static(b"GET"), server);
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }
}
