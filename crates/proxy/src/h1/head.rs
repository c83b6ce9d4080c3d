//! Request heads written, response heads parsed, and how each message's body is framed
//! (RFC 9112 §6). Parsing is strict: what `httparse` refuses, or a framing two readers
//! could disagree on, is an error, never a guess.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};

use super::MAX_HEADERS;
use crate::body::Body;
use crate::headers::Added;

/// How the request body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes (the request's Content-Length).
    Length(u64),
    /// Chunked (a streamed body of unknown length).
    Chunked,
}

impl ReqFraming {
    pub fn of(req: &Request<Body>) -> Self {
        use http_body::Body as _;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match declared {
            Some(0) => ReqFraming::Empty,
            Some(n) => ReqFraming::Length(n),
            None if req.body().is_end_stream() => ReqFraming::Empty,
            None => ReqFraming::Chunked,
        }
    }
}

/// Writes the request line and headers of `req` into `out` (cleared first). The
/// request's own Transfer-Encoding never passes (the framing is ours); a body-carrying
/// method with an empty body says `content-length: 0`, as servers that insist on a
/// length for POST expect.
pub fn encode_request(
    req: &Request<Body>,
    extra: Option<&Added>,
    framing: ReqFraming,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    match req.uri().path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ if req.method() == Method::OPTIONS && req.uri() == "*" => out.push(b'*'),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    for (name, value) in req.headers() {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            if has_length {
                continue;
            }
            has_length = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(added) = extra {
        added.write(out);
    }
    match framing {
        ReqFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ReqFraming::Empty
            if !has_length
                && matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) =>
        {
            out.extend_from_slice(b"content-length: 0\r\n")
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// Whether Transfer-Encoding or Connection is among the headers (most responses
    /// carry neither, and then need no lookup for them).
    pub framing_fields: bool,
    /// The Content-Length, read while the fields were parsed (see [`content_length`]).
    pub length: Result<Option<u64>, String>,
}

/// Parses a response head from the front of `buf` and consumes it. `Ok(None)`: not
/// complete yet. Header values share the head's bytes (no copy per header). `spans` is
/// scratch space kept by the connection: neither it nor the header slots are
/// initialised per response (zeroing 100 slots cost more than the parse).
pub fn parse_response(
    buf: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    recycled: &mut HeaderMap,
) -> Result<Option<Head>, String> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!(
                "backend's response has more than {MAX_HEADERS} header fields"
            ))
        }
        Err(e) => return Err(format!("backend sent a malformed response head: {e}")),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| format!("backend sent an invalid status code {code}"))?;
    let version = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value sits in `buf`, so values can share the frozen head.
    let base = buf.as_ptr() as usize;
    spans.clear();
    spans.extend(res.headers.iter().map(|h| {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        [n, n + h.name.len(), v, v + h.value.len()]
    }));
    let count = spans.len();
    let head: Bytes = buf.split_to(len).freeze();
    // The request's map, emptied, holds the response (its room is kept: no allocation
    // on a warm connection), with room for what the way back adds (Via, cookies).
    let mut headers = std::mem::take(recycled);
    headers.clear();
    headers.reserve(count + 3);
    let mut framing_fields = false;
    let mut length = Ok(None);
    for &[n0, n1, v0, v1] in spans.iter() {
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| "backend sent an invalid header name".to_string())?;
        framing_fields |= name == header::TRANSFER_ENCODING || name == header::CONNECTION;
        if name == header::CONTENT_LENGTH {
            if let Ok(found) = length {
                length = content_length(found, &head[v0..v1]);
            }
        }
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| format!("backend sent an invalid value for header `{name}`"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        framing_fields,
        length,
    }))
}

/// How a response body is delimited, and whether the connection may be reused after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

impl Framing {
    /// The framing of a final response (RFC 9112 §6.3), or why it is ambiguous.
    pub fn of(head: &Head, head_request: bool) -> Result<Framing, String> {
        if head_request
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Empty);
        }
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err("backend switched protocols on a request that did not ask to".into());
        }
        if head.framing_fields && head.headers.contains_key(header::TRANSFER_ENCODING) {
            // The last coding decides: chunked is self-delimiting, anything else runs to
            // the close. A Content-Length beside it is ignored (and the connection not
            // reused: see `reusable`).
            let last = head
                .headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim)
                .unwrap_or("");
            return Ok(if last.eq_ignore_ascii_case("chunked") {
                Framing::Chunked
            } else {
                Framing::Close
            });
        }
        match head.length.clone()? {
            Some(n) => Ok(Framing::Length(n)),
            None => Ok(Framing::Close),
        }
    }
}

/// The Content-Length once `value` (one Content-Length field) is added to `found` (the
/// fields before it): every value, and every element of a list, must be the same number,
/// or the response is refused.
fn content_length(mut found: Option<u64>, value: &[u8]) -> Result<Option<u64>, String> {
    let invalid = || {
        format!(
            "backend sent an invalid Content-Length `{}`",
            String::from_utf8_lossy(value)
        )
    };
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(invalid());
        }
        // At most 19 digits: within u64.
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err("backend sent conflicting Content-Length values".into());
        }
        found = Some(n);
    }
    Ok(found)
}

/// Whether the connection may carry another request once this response's body ended:
/// HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `keep-alive`; never after a
/// close-delimited body or a Transfer-Encoding beside a Content-Length.
pub fn reusable(head: &Head, framing: Framing) -> bool {
    if framing == Framing::Close {
        return false;
    }
    if !head.framing_fields {
        return head.version == Version::HTTP_11;
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING)
        && head.headers.contains_key(header::CONTENT_LENGTH)
    {
        return false;
    }
    let has = |token: &str| {
        head.headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match head.version {
        Version::HTTP_11 => !has("close"),
        _ => has("keep-alive") && !has("close"),
    }
}
