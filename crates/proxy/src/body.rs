//! Body types that flow through keyway, and the wrappers that enforce limits on them.
//!
//! Bodies are streamed frame by frame in both directions; nothing here buffers a whole
//! body. [`Limited`] counts request bytes and fails the stream once the listener's
//! limit is crossed; it also records in a [`BodyWatch`] how the client's body ended
//! (sent in full, failed on the client's side, too large), so the request path can
//! answer 413 and tell a client's failure from a backend's.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Boxed error carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type used on both sides of the proxy.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body with all its bytes at hand.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Raised by [`Limited`] when the body grows past its limit.
#[derive(Debug)]
pub struct TooLarge;

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body exceeds the listener's max_request_body_bytes")
    }
}

impl std::error::Error for TooLarge {}

// === impl BodyWatch ===

/// How a client's request body fared on its way to a backend. Shared between the
/// [`Limited`] wrapper (which hyper's client polls) and the request path (which reads it
/// after the exchange); allocated only for requests that have a body.
#[derive(Debug)]
pub struct BodyWatch {
    flags: AtomicU8,
    /// Nanoseconds after `base` at which the last byte was handed to the backend's
    /// connection, plus one; 0 while the body is still streaming.
    sent_ns: AtomicU64,
    base: Instant,
}

const TOO_LARGE: u8 = 1;
const CLIENT_FAILED: u8 = 2;
const CUT: u8 = 4;

impl BodyWatch {
    /// A watch for a body that has not started streaming.
    pub fn new() -> Self {
        Self {
            flags: AtomicU8::new(0),
            sent_ns: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// Whether the body crossed the size limit (answer 413).
    pub fn too_large(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & TOO_LARGE != 0
    }

    /// Whether the body failed on the client's side: it aborted, sent a malformed or
    /// truncated body, or crossed the size limit. Never a backend's fault.
    pub fn client_failed(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & CLIENT_FAILED != 0
    }

    /// When the whole body had been handed to the backend's connection, if it has.
    pub fn sent_at(&self) -> Option<Instant> {
        match self.sent_ns.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    /// Stops the body where it is: its next poll fails, so the backend never receives
    /// the rest (and never acts on an incomplete request). Not the client's fault.
    pub fn cut(&self) {
        self.flags.fetch_or(CUT, Ordering::SeqCst);
    }

    fn is_cut(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & CUT != 0
    }

    fn fail(&self, flags: u8) {
        self.flags
            .fetch_or(flags | CLIENT_FAILED, Ordering::Relaxed);
    }

    pub(crate) fn mark_sent(&self) {
        if self.sent_ns.load(Ordering::Relaxed) == 0 {
            let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            let _ = self
                .sent_ns
                .compare_exchange(0, ns + 1, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

impl Default for BodyWatch {
    fn default() -> Self {
        Self::new()
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails once more than `remaining` bytes have passed, and
    /// reports to its [`BodyWatch`] how it ended.
    pub struct Limited<B> {
        #[pin]
        inner: B,
        remaining: u64,
        watch: Arc<BodyWatch>,
    }
}

impl<B> Limited<B> {
    /// Wraps `inner`; `watch` learns how the body ends.
    pub fn new(inner: B, limit: u64, watch: Arc<BodyWatch>) -> Self {
        Self {
            inner,
            remaining: limit,
            watch,
        }
    }
}

impl<B> HttpBody for Limited<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if this.watch.is_cut() {
            return Poll::Ready(Some(Err("the request body was cut off by keyway".into())));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > *this.remaining {
                        this.watch.fail(TOO_LARGE);
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                    *this.remaining -= n;
                }
                // hyper stops polling a body whose declared length it has written.
                if this.inner.is_end_stream() {
                    this.watch.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.watch.fail(0);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.watch.mark_sent();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.watch.mark_sent();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limited_trips_past_limit() {
        let watch = Arc::new(BodyWatch::new());
        let b = Limited::new(
            Full::new(Bytes::from_static(b"0123456789")),
            5,
            watch.clone(),
        );
        assert!(b.collect().await.is_err());
        assert!(watch.too_large() && watch.client_failed());
        assert!(watch.sent_at().is_none());

        let watch = Arc::new(BodyWatch::new());
        let b = Limited::new(Full::new(Bytes::from_static(b"01234")), 5, watch.clone());
        assert_eq!(b.collect().await.unwrap().to_bytes().len(), 5);
        assert!(!watch.too_large() && !watch.client_failed());
        assert!(watch.sent_at().is_some());
    }

    /// A body whose stream fails (the client aborted mid-upload) is the client's failure.
    #[tokio::test]
    async fn a_failing_stream_is_the_clients_failure() {
        let watch = Arc::new(BodyWatch::new());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err("connection reset by client".into()),
        ];
        let b = Limited::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            1024,
            watch.clone(),
        );
        assert!(b.collect().await.is_err());
        assert!(watch.client_failed() && !watch.too_large());
        assert!(
            watch.sent_at().is_none(),
            "a failed body was never sent in full"
        );
    }
}
