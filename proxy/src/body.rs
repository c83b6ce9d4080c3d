//! Body types that flow through keyway, and the wrappers that enforce limits on them.
//!
//! Bodies are streamed frame by frame in both directions; nothing here buffers a whole
//! body. [`Limited`] counts request bytes and fails the stream once the listener's
//! limit is crossed, flagging it so the request path can answer 413.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

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

pin_project_lite::pin_project! {
    /// A request body that fails once more than `remaining` bytes have passed.
    pub struct Limited<B> {
        #[pin]
        inner: B,
        remaining: u64,
        tripped: Arc<AtomicBool>,
    }
}

impl<B> Limited<B> {
    /// Wraps `inner`; `tripped` is set when the limit is crossed.
    pub fn new(inner: B, limit: u64, tripped: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            remaining: limit,
            tripped,
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
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > *this.remaining {
                        this.tripped.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                    *this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
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
        let flag = Arc::new(AtomicBool::new(false));
        let b = Limited::new(
            Full::new(Bytes::from_static(b"0123456789")),
            5,
            flag.clone(),
        );
        assert!(b.collect().await.is_err());
        assert!(flag.load(Ordering::Relaxed));

        let flag = Arc::new(AtomicBool::new(false));
        let b = Limited::new(Full::new(Bytes::from_static(b"01234")), 5, flag.clone());
        assert_eq!(b.collect().await.unwrap().to_bytes().len(), 5);
        assert!(!flag.load(Ordering::Relaxed));
    }
}
