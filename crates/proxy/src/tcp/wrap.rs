//! I/O wrappers: byte metering for the idle timeout and metrics, and replaying bytes
//! already read from a stream. It never buffers beyond what was already read.

use super::*;

// === I/O wrappers ===

/// Bytes moved through the backend side of a connection, both ways.
#[derive(Default)]
pub(super) struct Meter {
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
    pub(super) backend_failed: AtomicBool,
}

impl Meter {
    pub(super) fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// The backend stream, counting what it reads (down) and writes (up), and noting
/// whether an error came from it.
pub(super) struct Metered {
    pub(super) inner: TcpStream,
    pub(super) meter: Arc<Meter>,
}

impl Metered {
    pub(super) fn note<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &r {
            self.meter.backend_failed.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.meter.down.fetch_add(n as u64, Ordering::Relaxed);
        self.note(r)
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.meter.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        self.note(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }
}

/// A stream whose first bytes were already read (a ClientHello): they are read again
/// first, then the stream.
pub(super) struct Rewind<'a> {
    pub(super) prefix: Vec<u8>,
    pub(super) at: usize,
    pub(super) inner: &'a mut TcpStream,
}

impl AsyncRead for Rewind<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
