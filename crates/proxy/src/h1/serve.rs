//! keyway's own HTTP/1.1 server side for the common request: HTTP/1.1, no body, no
//! upgrade. The head is parsed with `httparse` straight from the connection's buffer,
//! the handler runs in the connection's own task, and the response head and body are
//! written from one reused buffer (the head and a first small body frame in one write).
//!
//! Everything else is handed over, with every byte read so far, to hyper's server for
//! the rest of the connection, which answers it exactly as before: a request with a
//! body (Content-Length, Transfer-Encoding), `Expect`, an upgrade or CONNECT, HTTP/1.0,
//! a head that httparse or the `http` crate refuses (hyper answers 400), more than
//! [`MAX_HEADERS`] fields or a head that outgrows the listener's
//! `max_request_header_bytes` (hyper answers 431).
//!
//! What it must never do: answer a head it could read two ways (anything that is not
//! plainly bodiless goes to hyper); write a body beyond the length its head declared
//! (a body that runs short or long closes the connection); read from the client
//! without bound (at most `max_request_header_bytes` are buffered); keep a connection
//! open after `Connection: close`, a close-delimited body or a graceful shutdown.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as HttpBody;
use http_body_util::Empty;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::body::Body;

/// The request body of a request served here: there is none.
pub type NoBody = Empty<Bytes>;

// Most header fields in a request head served here: the client side's limit, and
// hyper's too.
use super::{behind_other_requests, MAX_HEADERS};
/// Longest request target served here; hyper answers a longer one with 414.
const MAX_URI_LEN: usize = 65534;
/// The read buffer starts at this size and grows, up to the head limit, for a large head.
pub(crate) const INITIAL_BUF: usize = 8 * 1024;
/// Buffered response bytes are written once they reach this much.
const FLUSH_AT: usize = 16 * 1024;
/// Body frames up to this size are copied into the write buffer; larger ones are
/// written from where they are.
const COPY_UP_TO: usize = 4 * 1024;

/// The listener's limits that apply here.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Largest request head (the read buffer never grows past it).
    pub max_head: usize,
    /// How long a started head may take to arrive in full.
    pub header_read_timeout: Duration,
}

/// How serving ended.
pub enum Ended<I> {
    /// The connection is done (closed by either side, or by a graceful shutdown).
    Closed,
    /// A request this side does not serve: the socket and every byte read from it, for
    /// hyper's server.
    HandOff(I, Bytes),
}

/// Serves requests on `io` until the connection ends or a request needs hyper. `buf`
/// holds the bytes already read. `closing` asks for a graceful end: an idle connection
/// ends at once, a request in flight is answered with `Connection: close`.
pub async fn serve<I, H, F>(
    mut io: I,
    mut buf: BytesMut,
    mut handler: H,
    settings: Settings,
    closing: Arc<AtomicBool>,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<NoBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    let mut out: Vec<u8> = Vec::new();
    let mut spans: Vec<[usize; 4]> = Vec::new();
    let mut cached: Option<HeaderMap> = None;
    // header_read_timeout runs from the moment a head is awaited (as hyper's does), so
    // an idle keep-alive connection closes after it too. One timer serves the whole
    // connection: it is re-armed only when it fires before the current deadline, so a
    // request costs one clock reading, not a timer registration.
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut first = true;
    loop {
        // A graceful shutdown between two requests ends the connection, even with a
        // pipelined request buffered (hyper does the same).
        if !first && closing.load(Ordering::Relaxed) {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
        first = false;
        // 1. A whole head.
        let deadline = tokio::time::Instant::now() + settings.header_read_timeout;
        // Where the search for the end of the head resumes: each byte is scanned once
        // however the head is split into reads (a head dribbled a byte at a time must
        // not be parsed again from its start on every byte).
        let mut scanned = 0;
        let (req, keep_alive) = loop {
            if head_may_be_complete(&buf, &mut scanned) {
                match parse(&mut buf, &mut spans, &mut cached) {
                    Parsed::Ready(req, keep_alive) => break (req, keep_alive),
                    Parsed::HandOff => return hand_off(io, &mut buf),
                    Parsed::Partial => {}
                }
            }
            if buf.len() >= settings.max_head {
                return hand_off(io, &mut buf);
            }
            let read = poll_fn(|cx| {
                if closing.load(Ordering::Relaxed) {
                    return Poll::Ready(Err(()));
                }
                let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                while t.as_mut().poll(cx).is_ready() {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::debug!("no complete request head within header_read_timeout");
                        return Poll::Ready(Err(()));
                    }
                    // Armed for an earlier request's deadline: move it and poll again
                    // so the new deadline is registered.
                    t.as_mut().reset(deadline);
                }
                poll_fill(&mut io, &mut buf, cx, settings.max_head).map_err(|_| ())
            })
            .await;
            match read {
                Ok(n) if n > 0 => {}
                Ok(_) => return Ended::Closed,
                // An error, the head timer or a graceful shutdown.
                Err(()) => {
                    let _ = io.shutdown().await;
                    return Ended::Closed;
                }
            }
        };
        let head_only = req.method() == Method::HEAD;

        // 2. The answer, while watching for the client going away (hyper's default:
        // a client that closes mid-request cancels it).
        let mut answer = std::pin::pin!(handler(req));
        let resp = poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if poll_gone(&mut io, &mut buf, cx, settings.max_head).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(mut resp) = resp else {
            tracing::debug!("client closed its connection before the answer");
            return Ended::Closed;
        };

        // 3. The response.
        let last = !keep_alive || closing.load(Ordering::Relaxed);
        out.clear();
        let (framing, last, trailers) = encode_head(&mut out, &mut resp, head_only, last);
        let mut headers = std::mem::take(resp.headers_mut());
        headers.clear();
        cached = Some(headers);
        // Written once the other ready connections have read theirs (see
        // `behind_ready_tasks`). The request's own count ended with its answer's head.
        behind_other_requests(false).await;
        let sent = match framing {
            Framing::Length(0) => write_all(&mut io, &mut out).await.is_ok(),
            framing => {
                let mut body = resp.into_body();
                write_body(
                    &mut io, &mut buf, &mut out, &mut body, framing, &trailers, settings,
                )
                .await
                .is_ok()
            }
        };
        // Flushed after every answer: a TLS stream may hold written bytes until then.
        let reusable = sent && io.flush().await.is_ok();
        if !reusable || last {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
        // What a large head or answer grew is not kept by an idle connection.
        if out.capacity() > INITIAL_BUF {
            out = Vec::new();
        }
        if spans.capacity() > 32 {
            spans = Vec::new();
        }
        if buf.is_empty() && buf.capacity() > INITIAL_BUF {
            buf = BytesMut::new();
        }
    }
}

/// Hands the connection to hyper with the bytes read so far, copied out of the read
/// buffer so hyper's connection does not keep the buffer's allocation.
fn hand_off<I>(io: I, buf: &mut BytesMut) -> Ended<I> {
    Ended::HandOff(io, Bytes::copy_from_slice(buf))
}

/// Whether the end of a head (an empty line) may be in `buf`: only bytes not scanned
/// before are searched (with three bytes of overlap for a `\r\n\r\n` split by a read).
fn head_may_be_complete(buf: &[u8], scanned: &mut usize) -> bool {
    if buf.is_empty() {
        return false;
    }
    let from = scanned.saturating_sub(3);
    *scanned = buf.len();
    // Each line end, found with memchr: `\n\n` or `\n\r\n` is an empty line.
    let rest = &buf[from..];
    memchr::memchr_iter(b'\n', rest).any(|at| match rest.get(at + 1) {
        Some(b'\n') => true,
        Some(b'\r') => rest.get(at + 2) == Some(&b'\n'),
        _ => false,
    })
}

// === reading ===

/// Reads what the socket holds into `buf`, never past `max` bytes in all.
fn poll_fill<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    max: usize,
) -> Poll<io::Result<usize>> {
    let room = max.saturating_sub(buf.len());
    if room == 0 {
        return Poll::Ready(Err(io::Error::other("request head too large")));
    }
    if buf.capacity() == buf.len() {
        buf.reserve(INITIAL_BUF.min(room));
    }
    let mut limited = bytes::BufMut::limit(&mut *buf, room);
    tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut limited)
}

/// Ready when the client has closed its side (or the socket failed). Once bytes of a
/// next (pipelined) request are buffered it stops reading, as hyper does, so a client
/// that pipelines and then half-closes still gets every answer.
fn poll_gone<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    max: usize,
) -> Poll<()> {
    while buf.is_empty() && buf.len() < max {
        match ready!(poll_fill(io, buf, cx, max)) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(_) => {}
        }
    }
    Poll::Pending
}

// Returned once per request and taken apart at once; boxing would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Ready(Request<NoBody>, bool),
    Partial,
    HandOff,
}

/// Parses one request head from the front of `buf`. A head served here is taken off
/// `buf`; on a hand-off `buf` still holds every byte. `spans` is scratch space kept by
/// the connection (where each name and value sits), so nothing is zeroed per request.
fn parse(
    buf: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    cached: &mut Option<HeaderMap>,
) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let base = buf.as_ptr() as usize;
    let (len, method, path) = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => {
            // Only HTTP/1.1 is served here; HTTP/1.0's keep-alive rules stay hyper's.
            if req.version != Some(1) {
                return Parsed::HandOff;
            }
            let (Some(m), Some(p)) = (req.method, req.path) else {
                return Parsed::HandOff;
            };
            if p.len() > MAX_URI_LEN {
                return Parsed::HandOff;
            }
            let Ok(method) = Method::from_bytes(m.as_bytes()) else {
                return Parsed::HandOff;
            };
            if method == Method::CONNECT {
                return Parsed::HandOff;
            }
            spans.clear();
            spans.extend(req.headers.iter().map(|h| {
                let n = h.name.as_ptr() as usize - base;
                let v = h.value.as_ptr() as usize - base;
                [n, n + h.name.len(), v, v + h.value.len()]
            }));
            let p0 = p.as_ptr() as usize - base;
            (len, method, (p0, p0 + p.len()))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOff,
    };

    // Anything that is not plainly bodiless, or that asks for more than a request and
    // its answer, is hyper's. Decided before the head is taken off the buffer.
    let mut keep_alive = true;
    for &[n0, n1, v0, v1] in spans.iter() {
        let name = &buf[n0..n1];
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::HandOff;
        }
        if name.eq_ignore_ascii_case(b"connection") && has_token(&buf[v0..v1], b"close") {
            keep_alive = false;
        }
    }
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0..path.1)) else {
        return hand_back(buf, &head);
    };
    let mut headers = cached.take().unwrap_or_default();
    headers.reserve(spans.len());
    for &[n0, n1, v0, v1] in spans.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&head[n0..n1]),
            HeaderValue::from_maybe_shared(head.slice(v0..v1)),
        ) else {
            return hand_back(buf, &head);
        };
        headers.append(name, value);
    }
    let mut req = Request::new(NoBody::new());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Parsed::Ready(req, keep_alive)
}

/// Puts a head already taken off `buf` back in front of it, for hyper.
fn hand_back(buf: &mut BytesMut, head: &Bytes) -> Parsed {
    let mut all = BytesMut::with_capacity(head.len() + buf.len());
    all.extend_from_slice(head);
    all.extend_from_slice(buf);
    *buf = all;
    Parsed::HandOff
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

// === writing ===

/// How the response body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (no body at all with 0).
    Length(u64),
    /// Chunked; trailers are written only for the fields the head's `Trailer` names.
    Chunked,
}

/// Writes the response head into `out` with hyper's framing rules: a `Content-Length`
/// the handler set frames the body; otherwise a body of known size gets one, an empty
/// body `content-length: 0`, and a streamed one chunked encoding. HEAD, 204 and 304
/// answers carry no body. Returns the framing, whether the connection closes after,
/// and the trailer fields the head announced (`Trailer`), the only ones written.
fn encode_head(
    out: &mut Vec<u8>,
    resp: &mut Response<Body>,
    head_only: bool,
    mut last: bool,
) -> (Framing, bool, Vec<HeaderName>) {
    let mut status = resp.status();
    if status.is_informational() {
        // Not a final answer; nothing in the request path produces one.
        tracing::warn!(%status, "1xx response from the request path replaced by 500");
        status = StatusCode::INTERNAL_SERVER_ERROR;
        *resp.body_mut() = crate::body::empty();
        resp.headers_mut().clear();
    }
    let body = resp.body();
    // None: no body at all; Some(None): a streamed body of unknown size.
    let size: Option<Option<u64>> = if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    };
    let can_length = !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_body = can_length && !head_only;

    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut framing = None;
    let mut wrote_date = false;
    let mut said_close = false;
    let mut trailers = Vec::new();
    for (name, value) in resp.headers() {
        match *name {
            header::CONTENT_LENGTH => {
                if framing.is_some() || (size.is_none() && !head_only) || !can_length {
                    continue;
                }
                let Some(declared) = parse_length(value.as_bytes()) else {
                    continue;
                };
                // The body's own exact size wins over a header that disagrees with it.
                let n = match size {
                    Some(Some(exact)) if exact != declared => exact,
                    _ => declared,
                };
                put_length(out, n);
                framing = Some(Framing::Length(n));
                continue;
            }
            // Framing is keyway's to choose on this hop.
            header::TRANSFER_ENCODING => continue,
            header::TRAILER if !can_body => continue,
            header::TRAILER => trailers.extend(
                value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok()),
            ),
            header::CONNECTION => said_close |= has_token(value.as_bytes(), b"close"),
            header::DATE => wrote_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = match framing {
        Some(f) => f,
        None => match size {
            None | Some(Some(0)) => {
                if can_length && !head_only {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(Some(n)) if can_length => {
                put_length(out, n);
                Framing::Length(n)
            }
            Some(Some(_)) => Framing::Length(0),
            Some(None) if can_body => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            Some(None) => Framing::Length(0),
        },
    };
    let framing = if can_body {
        framing
    } else {
        Framing::Length(0)
    };
    last |= said_close;
    if last && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::put(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, last, trailers)
}

fn put_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Fields that must not travel as trailers (hyper's list): framing, routing,
/// authentication and cookies, which some clients would merge into the head.
fn trailer_allowed(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

fn put_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A Content-Length value: digits only, no sign, no list.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Writes the body after the head in `out`. Frames are gathered while the body has
/// them ready and written when it would wait, so a small answer leaves in one write.
/// Err: the body failed or did not match its framing, or the client is gone; the
/// connection must close.
async fn write_body<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    inbuf: &mut BytesMut,
    out: &mut Vec<u8>,
    body: &mut Body,
    framing: Framing,
    allowed: &[HeaderName],
    settings: Settings,
) -> Result<(), ()> {
    let mut left = match framing {
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    loop {
        let next = poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
        let next = match next {
            Poll::Ready(n) => n,
            Poll::Pending => {
                write_all(io, out).await.map_err(|_| ())?;
                io.flush().await.map_err(|_| ())?;
                // Wait for the body, and notice a client that leaves meanwhile.
                let n = poll_fn(|cx| {
                    if let Poll::Ready(n) = Pin::new(&mut *body).poll_frame(cx) {
                        return Poll::Ready(Some(n));
                    }
                    if poll_gone(io, inbuf, cx, settings.max_head).is_ready() {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await;
                n.ok_or(())?
            }
        };
        match next {
            None => {
                match framing {
                    Framing::Length(_) if left != 0 => {
                        tracing::debug!(left, "response body ended before its declared length");
                        let _ = write_all(io, out).await;
                        return Err(());
                    }
                    Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    _ => {}
                }
                return write_all(io, out).await.map_err(|_| ());
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed; closing the client connection");
                let _ = write_all(io, out).await;
                return Err(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    if data.is_empty() {
                        continue;
                    }
                    match framing {
                        Framing::Length(_) => {
                            if data.len() as u64 > left {
                                tracing::debug!("response body longer than its declared length");
                                data.truncate(left as usize);
                                let _ = put_data(io, out, data).await;
                                return Err(());
                            }
                            left -= data.len() as u64;
                        }
                        Framing::Chunked => {
                            put_hex(out, data.len());
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    put_data(io, out, data).await.map_err(|_| ())?;
                    if framing == Framing::Chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    if out.len() >= FLUSH_AT {
                        write_all(io, out).await.map_err(|_| ())?;
                    }
                }
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if framing != Framing::Chunked {
                        continue;
                    }
                    // Trailers end the body: only the fields the head announced.
                    out.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        if allowed.contains(name) && trailer_allowed(name) {
                            out.extend_from_slice(name.as_str().as_bytes());
                            out.extend_from_slice(b": ");
                            out.extend_from_slice(value.as_bytes());
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    out.extend_from_slice(b"\r\n");
                    return write_all(io, out).await.map_err(|_| ());
                }
            },
        }
    }
}

/// Adds a data frame: copied behind what is buffered when small, else written with it.
async fn put_data<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    mut data: Bytes,
) -> io::Result<()> {
    if data.len() <= COPY_UP_TO {
        out.extend_from_slice(&data);
        return Ok(());
    }
    let mut done = 0;
    while done < out.len() || !data.is_empty() {
        let bufs = [io::IoSlice::new(&out[done..]), io::IoSlice::new(&data)];
        let n = poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, &bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_out = n.min(out.len() - done);
        done += from_out;
        bytes::Buf::advance(&mut data, n - from_out);
    }
    out.clear();
    Ok(())
}

async fn write_all<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// The `Date` value, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub(super) fn put(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    c.1.copy_from_slice(text.as_bytes());
                    c.0 = secs;
                } else {
                    out.extend_from_slice(text.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&c.1);
        });
    }
}

#[cfg(test)]
#[path = "serve_tests.rs"]
mod tests;
