//! The two bodies of an exchange: the request body uploaded ([`Upload`]: as declared by
//! its Content-Length, or chunked) and the response body decoded ([`RespBody`]) as the
//! client side reads it. The upload goes on while the response streams, if the backend
//! answered before it had the whole request; such a connection is never reused.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::head::{self, Framing, Head, ReqFraming};
use super::{Conn, SendError, Stream, MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS};
use crate::body::{Body, BoxError};

// === upload ===

/// A request body on its way to the backend.
pub(super) struct Upload {
    body: Body,
    /// Bytes still to come for a Content-Length body; `None` when chunked.
    remaining: Option<u64>,
    /// Encoded bytes not yet written.
    out: VecDeque<Bytes>,
    /// The last frame was seen and its terminator queued.
    ended: bool,
    done: bool,
}

impl Upload {
    pub(super) fn new(body: Body, framing: ReqFraming) -> Self {
        Self {
            body,
            remaining: match framing {
                ReqFraming::Length(n) => Some(n),
                _ => None,
            },
            out: VecDeque::new(),
            ended: false,
            done: false,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        self.done
    }

    /// Moves the body on: writes what is queued, then takes the next frame. Ready(Ok)
    /// once all of it was written and flushed.
    pub(super) fn poll(
        &mut self,
        io: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), SendError>> {
        let broken = |e: io::Error| SendError::Backend(format!("writing the request body: {e}"));
        loop {
            while !self.out.is_empty() {
                let mut slices = [io::IoSlice::new(&[]); 4];
                let n = self.out.len().min(slices.len());
                for (s, b) in slices.iter_mut().zip(self.out.iter()) {
                    *s = io::IoSlice::new(b);
                }
                let wrote = match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(broken(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(w)) => w,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(broken(e))),
                    Poll::Pending => return Poll::Pending,
                };
                let mut left = wrote;
                while left > 0 {
                    let Some(front) = self.out.front_mut() else {
                        break;
                    };
                    let take = left.min(front.len());
                    front.advance(take);
                    left -= take;
                    if front.is_empty() {
                        self.out.pop_front();
                    }
                }
            }
            if self.ended {
                return match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.done = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(broken(e))),
                    Poll::Pending => Poll::Pending,
                };
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    // Nothing more for now: push out what TLS may still hold.
                    if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
                        return Poll::Ready(Err(broken(e)));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(frame) => {
                    if let Err(e) = self.take(frame) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }

    /// Waits for the body's first frame (`None`: the body ended at once) and hands it
    /// out, writing nothing: a body broken from its first bytes (a bad chunk size, more or
    /// fewer bytes than its Content-Length) fails here, before the backend has seen
    /// anything of the request. The frame goes back with [`Self::queue_first`] once the
    /// head is written, or [`Self::into_body`] if it could not be.
    pub(super) fn poll_first(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Frame<Bytes>>, SendError>> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(SendError::Body(e))),
                Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.is_empty()) => {}
                Poll::Ready(Some(Ok(f))) => {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    if self.remaining.is_some_and(|left| n > left) {
                        return Poll::Ready(Err(SendError::Body(
                            "the request body is longer than its Content-Length".into(),
                        )));
                    }
                    return Poll::Ready(Ok(Some(f)));
                }
                Poll::Ready(None) => {
                    if self.remaining.is_some_and(|left| left > 0) {
                        return Poll::Ready(Err(SendError::Body(
                            "the request body ended before its Content-Length".into(),
                        )));
                    }
                    return Poll::Ready(Ok(None));
                }
            }
        }
    }

    /// Queues what [`Self::poll_first`] returned, after the head.
    pub(super) fn queue_first(&mut self, first: Option<Frame<Bytes>>) -> Result<(), SendError> {
        self.take(first.map(Ok))
    }

    /// The body as the client sent it, with what [`Self::poll_first`] returned (if it
    /// was called and returned) put back in front: for a request sent again because its
    /// head could not be written. Only before [`Self::poll`].
    pub(super) fn into_body(self, first: Option<Option<Frame<Bytes>>>) -> Body {
        match first {
            None => self.body,
            Some(Some(first)) => http_body_util::BodyExt::boxed(Prepend {
                first: Some(first),
                rest: self.body,
            }),
            Some(None) => crate::body::empty(),
        }
    }

    /// Queues one frame of the body (`None`: its end), encoded for the wire.
    fn take(&mut self, frame: Option<Result<Frame<Bytes>, BoxError>>) -> Result<(), SendError> {
        match frame {
            Some(Err(e)) => return Err(SendError::Body(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => match &mut self.remaining {
                    Some(left) => {
                        let n = data.len() as u64;
                        if n > *left {
                            return Err(SendError::Body(
                                "the request body is longer than its Content-Length".into(),
                            ));
                        }
                        *left -= n;
                        self.out.push_back(data);
                    }
                    None => {
                        self.out
                            .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                        self.out.push_back(data);
                        self.out.push_back(Bytes::from_static(b"\r\n"));
                    }
                },
                Err(frame) => {
                    if let (Ok(trailers), None) = (frame.into_trailers(), self.remaining) {
                        self.out.push_back(encode_trailers(&trailers));
                        self.ended = true;
                    }
                }
            },
            None => {
                match self.remaining {
                    Some(0) => {}
                    Some(_) => {
                        return Err(SendError::Body(
                            "the request body ended before its Content-Length".into(),
                        ))
                    }
                    None => self.out.push_back(Bytes::from_static(b"0\r\n\r\n")),
                }
                self.ended = true;
            }
        }
        Ok(())
    }
}

/// A body with a frame already taken from it put back in front.
struct Prepend {
    first: Option<Frame<Bytes>>,
    rest: Body,
}

impl HttpBody for Prepend {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.first.take() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// The last chunk with trailer fields.
fn encode_trailers(trailers: &HeaderMap) -> Bytes {
    let mut out = b"0\r\n".to_vec();
    for (name, value) in trailers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

// === response body ===

/// Where the response body's decoding stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decode {
    Length(u64),
    /// Chunked: before a chunk-size line.
    ChunkSize,
    /// Chunked: inside a chunk, this many bytes left.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: after the last chunk, the trailer section.
    Trailers,
    Close,
    Done,
}

/// A backend's response body, read from the connection as it is polled. Owns the
/// connection; [`RespBody::take_reusable`] gives it back when the exchange ended cleanly.
pub struct RespBody {
    pub(super) conn: Option<Box<Conn>>,
    state: Decode,
    upload: Option<Upload>,
    reusable: bool,
}

/// Builds the response for `head`, its body reading from `conn`.
pub(super) fn response(
    conn: Box<Conn>,
    mut head: Head,
    framing: Framing,
    upload: Option<Upload>,
    upload_clean: bool,
) -> Response<RespBody> {
    let reusable = upload_clean && head::reusable(&head, framing);
    if framing == Framing::Chunked || framing == Framing::Close {
        // Chunked wins over a Content-Length beside it; passing both on would let the
        // next hop read the body differently from us.
        head.headers.remove(header::CONTENT_LENGTH);
    }
    let state = match framing {
        Framing::Empty | Framing::Length(0) => Decode::Done,
        Framing::Length(n) => Decode::Length(n),
        Framing::Chunked => Decode::ChunkSize,
        Framing::Close => Decode::Close,
    };
    let body = RespBody {
        conn: Some(conn),
        state,
        upload: upload.filter(|u| !u.is_done()),
        reusable,
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    resp
}

impl RespBody {
    /// Hands the exchange's timer back to the connection, for its next exchange.
    pub fn keep_timer(&mut self, timer: super::Timer) {
        if let Some(conn) = self.conn.as_mut() {
            conn.keep_timer(timer);
        }
    }

    /// The connection, if the exchange ended cleanly and it may carry another request
    /// (it is taken either way: the body reads nothing more).
    pub fn take_reusable(&mut self) -> Option<Box<Conn>> {
        let clean = self.state == Decode::Done && self.reusable && self.upload.is_none();
        let mut conn = self.conn.take()?;
        conn.release_buffers();
        clean.then_some(conn)
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.state = Decode::Done;
        self.reusable = false;
        Poll::Ready(Some(Err(why.into())))
    }

    /// Decodes what `rbuf` holds: a frame, the end, or `None` to read more.
    fn decode(&mut self) -> Result<Option<Option<Frame<Bytes>>>, String> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Some(None));
        };
        let buf = &mut conn.rbuf;
        loop {
            match self.state {
                Decode::Done => return Ok(Some(None)),
                Decode::Length(left) | Decode::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = match self.state {
                        Decode::Length(_) if left == 0 => Decode::Done,
                        Decode::Length(_) => Decode::Length(left),
                        _ if left == 0 => Decode::ChunkEnd,
                        _ => Decode::ChunkData(left),
                    };
                    return Ok(Some(Some(Frame::data(data))));
                }
                Decode::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let data = buf.split().freeze();
                    return Ok(Some(Some(Frame::data(data))));
                }
                Decode::ChunkSize => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE, "chunk-size line")? else {
                        return Ok(None);
                    };
                    let size = chunk_size(&line)?;
                    self.state = if size == 0 {
                        Decode::Trailers
                    } else {
                        Decode::ChunkData(size)
                    };
                }
                Decode::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("backend sent a chunk longer than its size".into());
                    }
                    buf.advance(2);
                    self.state = Decode::ChunkSize;
                }
                Decode::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = Decode::Done;
                        return Ok(Some(None));
                    }
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        if buf.len() > MAX_HEAD {
                            return Err(format!(
                                "backend's trailer section is larger than {MAX_HEAD} bytes"
                            ));
                        }
                        return Ok(None);
                    };
                    let block = buf.split_to(end + 4).freeze();
                    self.state = Decode::Done;
                    return Ok(Some(Some(Frame::trailers(parse_trailers(&block)?))));
                }
            }
        }
    }
}

impl HttpBody for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            // An upload still going (the backend answered early) moves on as well.
            if let (Some(u), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
                match u.poll(&mut conn.io, cx) {
                    Poll::Ready(Ok(())) => this.upload = None,
                    // The client's body failed mid-way: the answer to a request the
                    // backend never got whole is not passed on as if it were.
                    Poll::Ready(Err(e @ SendError::Body(_))) => return this.fail(e.to_string()),
                    // The backend stopped taking the body: its answer is still read
                    // to the end; the connection is not reused.
                    Poll::Ready(Err(_)) => {
                        this.upload = None;
                        this.reusable = false;
                    }
                    Poll::Pending => {}
                }
            }
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(frame.map(Ok)),
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    return this.fail(format!("reading the response body: {e}"));
                }
                Poll::Ready(Ok(0)) if this.state == Decode::Close => {
                    this.state = Decode::Done;
                    this.reusable = false;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail(
                        "backend closed the connection before the end of the response body".into(),
                    );
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == Decode::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            Decode::Done => SizeHint::with_exact(0),
            Decode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// Takes one CRLF-terminated line (without the CRLF) off `buf`; `None` if it is not all
/// there yet. A line longer than `max` is an error.
fn take_line(buf: &mut BytesMut, max: usize, what: &str) -> Result<Option<BytesMut>, String> {
    match find(&buf[..buf.len().min(max + 2)], b"\r\n") {
        Some(i) => {
            let line = buf.split_to(i);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > max => Err(format!("backend sent a {what} longer than {max} bytes")),
        None => Ok(None),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The size of a chunk from its line: hex digits, then optional whitespace and
/// `;extensions`. Anything else, or a size past `u64`, is an error.
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err("backend sent an invalid chunk size".into());
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|b| *b == b'\r' || *b == b'\n') {
        return Err("backend sent an invalid chunk size".into());
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| "invalid chunk size".to_string())?;
    u64::from_str_radix(hex, 16).map_err(|_| "backend sent an invalid chunk size".into())
}

fn parse_trailers(block: &Bytes) -> Result<HeaderMap, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(block, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| "backend sent an invalid trailer name".to_string())?;
                let value = HeaderValue::from_bytes(f.value)
                    .map_err(|_| format!("backend sent an invalid value for trailer `{name}`"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        Ok(httparse::Status::Partial) => Err("backend sent an incomplete trailer section".into()),
        Err(e) => Err(format!("backend sent a malformed trailer section: {e}")),
    }
}

#[cfg(test)]
impl RespBody {
    /// A chunked body reading from `conn`, fed by hand.
    pub(super) fn chunked_for_test(conn: Box<Conn>) -> Self {
        Self {
            conn: Some(conn),
            state: Decode::ChunkSize,
            upload: None,
            reusable: true,
        }
    }

    pub(super) fn feed_for_test(&mut self, bytes: &[u8]) {
        if let Some(c) = self.conn.as_mut() {
            c.rbuf.extend_from_slice(bytes);
        }
    }

    pub(super) fn decode_for_test(&mut self) -> Result<Option<Option<Frame<Bytes>>>, String> {
        self.decode()
    }

    pub(super) fn unread_for_test(&self) -> Vec<u8> {
        self.conn
            .as_ref()
            .map(|c| c.rbuf.to_vec())
            .unwrap_or_default()
    }
}
