//! A plugin's stdout and stderr: captured into one bounded buffer per call (the rest
//! counted, never kept), and the guest's panic message found in it. Writing never
//! waits and never grows past [`OUTPUT_LIMIT`].

use std::sync::{Arc, Mutex};

use wasmtime_wasi::p2::{OutputStream, StreamError};

use crate::{MAX_REASON_BYTES, OUTPUT_LIMIT};

/// A plugin's stdout and stderr (one buffer, in the order written): the first
/// [`OUTPUT_LIMIT`] bytes are kept, the rest only counted.
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<CaptureBuf>>);

#[derive(Default)]
struct CaptureBuf {
    kept: Vec<u8>,
    dropped: usize,
}

impl Capture {
    pub(crate) fn push(&self, bytes: &[u8]) {
        if let Ok(mut b) = self.0.lock() {
            let room = OUTPUT_LIMIT.saturating_sub(b.kept.len());
            let n = room.min(bytes.len());
            b.kept.extend_from_slice(&bytes[..n]);
            b.dropped += bytes.len() - n;
        }
    }

    pub(crate) fn clear(&self) {
        if let Ok(mut b) = self.0.lock() {
            b.kept.clear();
            b.dropped = 0;
        }
    }

    /// The output as text (lossy UTF-8), saying how much was not kept.
    pub(crate) fn text(&self) -> String {
        let Ok(b) = self.0.lock() else {
            return String::new();
        };
        let mut t = String::from_utf8_lossy(&b.kept).into_owned();
        if b.dropped > 0 {
            t.push_str(&format!("… ({} more bytes not kept)", b.dropped));
        }
        t
    }
}

impl wasmtime_wasi::cli::IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: what does not fit is counted, never waited for.
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Capture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The message of a Rust panic in `output` ("panicked at src/lib.rs:9:5: the message"),
/// without the hint lines that follow it.
pub(crate) fn panic_message(output: &str) -> Option<String> {
    let at = output.find("panicked at ")?;
    let rest = &output[at..];
    let mut lines = rest.lines();
    let mut msg = lines.next()?.trim_end().to_string();
    for line in lines {
        if line.starts_with("note: ") || line.starts_with("stack backtrace") {
            break;
        }
        if !msg.ends_with(':') {
            msg.push('\n');
        } else {
            msg.push(' ');
        }
        msg.push_str(line);
    }
    Some(msg.trim_end().chars().take(MAX_REASON_BYTES).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_panic_message_is_found_in_the_output_and_the_buffer_is_bounded() {
        let out = "before\nthread '<unnamed>' (1) panicked at src/lib.rs:9:5:\nno config\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(out).as_deref(),
            Some("panicked at src/lib.rs:9:5: no config")
        );
        assert_eq!(panic_message("just output\n"), None);
        let c = Capture::default();
        c.push(&[b'x'; OUTPUT_LIMIT - 1]);
        c.push(b"yz");
        let t = c.text();
        assert!(t.starts_with(&"x".repeat(OUTPUT_LIMIT - 1)) && t.contains('y'));
        assert!(
            t.ends_with("… (1 more bytes not kept)"),
            "{}",
            &t[OUTPUT_LIMIT - 8..]
        );
        c.clear();
        assert_eq!(c.text(), "");
    }
}
