//! The HTTP/1.1 client codec proven against hyper's client (the same response bytes fed
//! to both must give the same status, headers, body, trailers, or an error to both), and
//! property tests for chunked framing in both directions.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::body::{self, Body};

/// What a client side saw of a response.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Vec<(String, Vec<u8>)>,
}

fn fields(map: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// A backend that answers one connection with `answer`, then closes it. It reads the
/// request head first (and whatever body follows it in the same reads).
async fn backend(answer: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(&answer).await;
        let _ = s.shutdown().await;
    });
    addr
}

fn request(method: &Method) -> Request<Body> {
    Request::builder()
        .method(method.clone())
        .uri("/r")
        .header("host", "b")
        .body(body::empty())
        .unwrap()
}

/// What a client side saw: the head, then the whole body and its trailers.
async fn seen<B>(resp: http::Response<B>) -> Result<Seen, String>
where
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    let status = resp.status().as_u16();
    let headers = fields(resp.headers());
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().map(fields).unwrap_or_default();
    Ok(Seen {
        status,
        headers,
        body: collected.to_bytes().to_vec(),
        trailers,
    })
}

async fn ours(answer: &[u8], method: &Method) -> Result<Seen, String> {
    let addr = backend(answer.to_vec()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let resp = send(Conn::new(Stream::Plain(tcp)), request(method), None)
        .await
        .map_err(|e| e.to_string())?;
    seen(resp).await
}

async fn hypers(answer: &[u8], method: &Method) -> Result<Seen, String> {
    let addr = backend(answer.to_vec()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(request(method))
        .await
        .map_err(|e| e.to_string())?;
    seen(resp).await
}

/// Responses both clients must read alike, as recorded from servers and written to hit
/// every framing rule.
fn agreed() -> Vec<(&'static str, Method, Vec<u8>)> {
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut big_answer =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
    big_answer.extend_from_slice(&big);
    vec![
        ("length", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello".to_vec()),
        ("IIS-like", Method::GET, b"HTTP/1.1 302 Found\r\nCache-Control: private\r\nContent-Type: text/html; charset=utf-8\r\nLocation: /PasswordVault/v10/logon\r\nServer: Microsoft-IIS/10.0\r\nSet-Cookie: a=1; path=/\r\nSet-Cookie: b=2; path=/; HttpOnly\r\nX-Powered-By: ASP.NET\r\nDate: Mon, 07 Dec 2026 05:00:00 GMT\r\nContent-Length: 9\r\n\r\nredirect.".to_vec()),
        ("chunked", Method::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\n".to_vec()),
        ("chunked with trailers", Method::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 42\r\nx-more: a b\r\n\r\n".to_vec()),
        ("close-delimited", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the connection closes".to_vec()),
        ("HTTP/1.0", Method::GET, b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nten bytes!".to_vec()),
        ("204", Method::GET, b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec()),
        ("304 with a length", Method::GET, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n".to_vec()),
        ("HEAD", Method::HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec()),
        ("100 continue", Method::GET, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
        ("103 early hints", Method::GET, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("empty length", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()),
        ("obs-text value", Method::GET, b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nContent-Length: 1\r\n\r\nx".to_vec()),
        ("big body", Method::GET, big_answer),
        ("truncated length", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf".to_vec()),
        ("truncated chunked", Method::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec()),
        ("bad chunk size", Method::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk longer than its size", Method::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk without its CRLF", Method::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n".to_vec()),
        ("conflicting lengths", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec()),
        ("a list of one length", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        ("a list of two lengths", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5,6\r\n\r\nhello!".to_vec()),
        ("an empty list element", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\nhello".to_vec()),
        ("a signed length", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello".to_vec()),
        ("invalid length", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello".to_vec()),
        ("garbage status line", Method::GET, b"HTP/1.1 200 OK\r\n\r\n".to_vec()),
        ("no answer", Method::GET, Vec::new()),
        ("half a head", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Le".to_vec()),
        ("space before colon", Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello".to_vec()),
    ]
}

#[tokio::test]
async fn reads_every_response_as_hypers_client_does() {
    for (name, method, answer) in agreed() {
        let a = ours(&answer, &method).await;
        let b = hypers(&answer, &method).await;
        match (&a, &b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}: the clients saw different responses"),
            (Err(_), Err(_)) => {}
            _ => panic!("{name}: keyway saw {a:?}, hyper saw {b:?}"),
        }
    }
}

/// A generated response: status, extra fields, framing (0: Content-Length, 1: chunked in
/// the given sizes, 2: until close), body, and the request method.
fn generated(
    status: u16,
    fields: &[(String, String)],
    framing: u8,
    sizes: &[usize],
    body: &[u8],
    head: bool,
) -> Vec<u8> {
    let bodiless = head || status == 204 || status == 304;
    let mut out = format!("HTTP/1.1 {status} X\r\n").into_bytes();
    for (n, v) in fields {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    match (framing, bodiless) {
        (_, true) if status == 204 => {}
        (0, _) | (_, true) => {
            out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes())
        }
        (1, _) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        _ => out.extend_from_slice(b"Connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless {
        if framing == 1 {
            out.extend_from_slice(&chunked(body, sizes));
        } else {
            out.extend_from_slice(body);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Generated responses (any status, fields, framing and body) read the same through
    /// keyway's client and hyper's.
    #[test]
    fn generated_responses_read_as_hypers_client_does(
        status in proptest::sample::select(vec![200u16, 201, 204, 206, 301, 302, 304, 400, 404, 500, 503]),
        fields in proptest::collection::vec(("x-[a-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..8),
        framing in 0u8..3,
        sizes in proptest::collection::vec(1usize..600, 1..6),
        body in proptest::collection::vec(any::<u8>(), 0..2000),
        head in any::<bool>(),
    ) {
        let answer = generated(status, &fields, framing, &sizes, &body, head);
        let method = if head { Method::HEAD } else { Method::GET };
        let rt = runtime();
        let (a, b) = rt.block_on(async { (ours(&answer, &method).await, hypers(&answer, &method).await) });
        match (&a, &b) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "keyway saw {:?}, hyper saw {:?}", a, b),
        }
    }
}

/// Where keyway is deliberately stricter than hyper's client, or tidier.
#[tokio::test]
async fn refuses_what_could_be_read_two_ways() {
    // Chunked and a Content-Length: the length is dropped, so the next hop cannot read
    // the body differently, and the connection is not reused.
    let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let seen = ours(answer, &Method::GET).await.unwrap();
    assert_eq!(seen.body, b"hello");
    assert!(seen.headers.iter().all(|(n, _)| n != "content-length"));
    // A switch of protocols on a request that asked for none (hyper's client would hand
    // the connection over): nothing passes but a plain HTTP response.
    let e = ours(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        &Method::GET,
    )
    .await
    .unwrap_err();
    assert!(e.contains("switched protocols"), "{e}");
    // More than 100 header fields.
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    let e = ours(&many, &Method::GET).await.unwrap_err();
    assert!(e.contains("more than 100 header fields"), "{e}");
    // A head that never ends is cut at MAX_HEAD.
    let mut endless = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
    endless.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10_000));
    let e = ours(&endless, &Method::GET).await.unwrap_err();
    assert!(e.contains("larger than"), "{e}");
    // A chunk-size line that never ends.
    let mut long = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;".to_vec();
    long.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE + 100));
    let e = ours(&long, &Method::GET).await.unwrap_err();
    assert!(e.contains("chunk-size line longer"), "{e}");
}

/// A connection goes back to the pool only after a clean, complete, keep-alive exchange.
#[tokio::test]
async fn only_clean_exchanges_leave_a_reusable_connection() {
    let cases: [(&[u8], bool); 6] = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            false,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nok", false),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
            true,
        ),
    ];
    for (answer, reusable) in cases {
        let addr = backend(answer.to_vec()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let resp = send(Conn::new(Stream::Plain(tcp)), request(&Method::GET), None)
            .await
            .unwrap();
        let mut body = resp.into_body();
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
        let conn = body.take_reusable();
        assert_eq!(
            conn.is_some(),
            reusable,
            "{}",
            String::from_utf8_lossy(answer)
        );
        // The test backend closes after answering: a pooled connection notices.
        if let Some(mut conn) = conn {
            let mut noticed = false;
            for _ in 0..500 {
                if !conn.still_idle() {
                    noticed = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(noticed, "a closed pooled connection looked idle");
        }
    }
}

/// A body dropped before its end (the client went away) never returns its connection.
#[tokio::test]
async fn an_unfinished_body_keeps_its_connection_out_of_the_pool() {
    let addr = backend(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf".to_vec()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let resp = send(Conn::new(Stream::Plain(tcp)), request(&Method::GET), None)
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "half");
    assert!(body.take_reusable().is_none());
}

/// A backend that reads the request with hyper's server and answers with what it got:
/// method, path, body and trailers.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let te = req.headers().get("transfer-encoding").cloned();
                        let cl = req.headers().get("content-length").cloned();
                        let head = format!("{} {} te={te:?} cl={cl:?}\n", req.method(), req.uri());
                        let got = req.into_body().collect().await;
                        let text = match got {
                            Ok(c) => {
                                let trailers = c.trailers().map(fields).unwrap_or_default();
                                let body = c.to_bytes();
                                format!(
                                    "{head}{} bytes, trailers {trailers:?}, sum {}",
                                    body.len(),
                                    checksum(&body)
                                )
                            }
                            Err(e) => format!("{head}body error {e}"),
                        };
                        Ok::<_, Infallible>(http::Response::new(body::full(text)))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().enumerate().fold(0u64, |acc, (i, &x)| {
        acc.wrapping_mul(31).wrapping_add(x as u64 ^ i as u64)
    })
}

fn streamed(pieces: Vec<Vec<u8>>, trailers: Option<http::HeaderMap>) -> Body {
    let mut frames: Vec<Result<http_body::Frame<Bytes>, crate::body::BoxError>> = pieces
        .into_iter()
        .map(|p| Ok(http_body::Frame::data(Bytes::from(p))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(http_body::Frame::trailers(t)));
    }
    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn upload(conn: Box<Conn>, req: Request<Body>) -> (String, Option<Box<Conn>>) {
    let resp = send(conn, req, None).await.unwrap();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            text.extend_from_slice(&d);
        }
    }
    (String::from_utf8(text).unwrap(), body.take_reusable())
}

/// Request bodies go out chunked (with trailers) or by their Content-Length, and the
/// same connection carries the next request.
#[tokio::test]
async fn uploads_are_framed_for_hypers_server() {
    let addr = echo_backend().await;
    let conn = Conn::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-sum", "7".parse().unwrap());
    let req = Request::post("/chunked")
        .header("host", "b")
        .body(streamed(
            vec![b"abc".to_vec(), Vec::new(), b"defg".to_vec()],
            Some(trailers),
        ))
        .unwrap();
    let (text, conn) = upload(conn, req).await;
    assert!(
        text.starts_with(
            "POST /chunked te=Some(\"chunked\") cl=None\n7 bytes, trailers [(\"x-sum\", [55])]"
        ),
        "{text}"
    );
    let req = Request::put("/length")
        .header("host", "b")
        .header("content-length", "7")
        .body(streamed(vec![b"abc".to_vec(), b"defg".to_vec()], None))
        .unwrap();
    let (text, conn) = upload(conn.expect("kept alive"), req).await;
    assert!(
        text.starts_with("PUT /length te=None cl=Some(\"7\")\n7 bytes"),
        "{text}"
    );
    // A POST without a body says so with a zero length.
    let req = Request::post("/empty")
        .header("host", "b")
        .body(body::empty())
        .unwrap();
    let (text, conn) = upload(conn.expect("kept alive"), req).await;
    assert!(
        text.starts_with("POST /empty te=None cl=Some(\"0\")\n0 bytes"),
        "{text}"
    );
    assert!(conn.is_some());
}

/// A body longer or shorter than its Content-Length is the client's failure, never sent
/// as if it were whole.
#[tokio::test]
async fn a_body_that_breaks_its_length_fails_as_the_clients() {
    for pieces in [vec![b"abcdefgh".to_vec()], vec![b"abc".to_vec()]] {
        let addr = echo_backend().await;
        let conn = Conn::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
        let req = Request::post("/")
            .header("host", "b")
            .header("content-length", "5")
            .body(streamed(pieces, None))
            .unwrap();
        match send(conn, req, None).await {
            Err(SendError::Body(_)) => {}
            Err(e) => panic!("expected the body's failure, got {e}"),
            Ok(resp) => panic!("sent a broken body, got {}", resp.status()),
        }
    }
}

/// A body broken from its first bytes (here: an error, a body longer than its length,
/// a body that ends short) fails before anything is written: the backend sees no byte
/// of the request, not even its head.
#[tokio::test]
async fn a_body_broken_from_its_first_bytes_sends_nothing() {
    let failing = || -> Body {
        let frames: Vec<Result<http_body::Frame<Bytes>, crate::body::BoxError>> =
            vec![Err("invalid chunk size line".into())];
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    };
    let cases: Vec<(Option<&str>, Body)> = vec![
        (None, failing()),
        (Some("5"), streamed(vec![b"abcdefgh".to_vec()], None)),
        (Some("5"), streamed(vec![], None)),
    ];
    for (length, body) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut backend, _) = b.unwrap();
        let conn = Conn::new(Stream::Plain(a.unwrap()));
        let mut req = Request::post("/").header("host", "b");
        if let Some(n) = length {
            req = req.header("content-length", n);
        }
        match send(conn, req.body(body).unwrap(), None).await {
            Err(SendError::Body(_)) => {}
            Err(e) => panic!("{length:?}: expected the body's failure, got {e}"),
            Ok(resp) => panic!("{length:?}: sent a broken body, got {}", resp.status()),
        }
        // The connection is gone (dropped with the failed exchange): EOF, no byte.
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut backend, &mut got)
            .await
            .unwrap();
        assert!(got.is_empty(), "{length:?}: the backend got {got:?}");
    }
}

/// A request whose head could not be written goes elsewhere whole: the first frame,
/// taken before the head, is put back in front of the rest of the body.
#[tokio::test]
async fn an_upload_gives_back_its_whole_body() {
    for framing in [ReqFraming::Chunked, ReqFraming::Length(7)] {
        let mut upload = Upload::new(
            streamed(vec![Vec::new(), b"abc".to_vec(), b"defg".to_vec()], None),
            framing,
        );
        let first = std::future::poll_fn(|cx| upload.poll_first(cx))
            .await
            .unwrap();
        let body = upload.into_body(Some(first));
        assert_eq!(http_body::Body::size_hint(&body).lower(), 3);
        let back = body.collect().await.unwrap().to_bytes();
        assert_eq!(&back[..], b"abcdefg", "{framing:?}");
    }
}

fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        out.extend_from_slice(format!("{n:X}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn idle_conn() -> Box<Conn> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    // The other end stays open (and silent) while the decoder is fed by hand.
    std::mem::forget(b.unwrap());
    Conn::new(Stream::Plain(a.unwrap()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any body, in any chunk sizes, arriving split at any points, decodes to itself and
    /// leaves the next response's bytes untouched.
    #[test]
    fn chunked_bodies_decode_whatever_the_splits(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        sizes in proptest::collection::vec(1usize..700, 1..8),
        cuts in proptest::collection::vec(1usize..200, 1..30),
    ) {
        let rt = runtime();
        let conn = rt.block_on(idle_conn());
        let mut wire = chunked(&data, &sizes);
        let after = b"HTTP/1.1 200 OK\r\n".to_vec();
        wire.extend_from_slice(&after);
        let mut body = RespBody::chunked_for_test(conn);
        let mut got = Vec::new();
        let mut fed = 0;
        let mut cut = cuts.iter().cycle();
        let mut ended = false;
        while !ended {
            match body.decode_for_test() {
                Ok(Some(Some(frame))) => got.extend_from_slice(&frame.into_data().unwrap()),
                Ok(Some(None)) => ended = true,
                Ok(None) => {
                    prop_assert!(fed < wire.len(), "the decoder wanted more than the whole body");
                    let n = (*cut.next().unwrap()).min(wire.len() - fed);
                    body.feed_for_test(&wire[fed..fed + n]);
                    fed += n;
                }
                Err(e) => prop_assert!(false, "decode failed: {e}"),
            }
        }
        prop_assert_eq!(&got, &data);
        let mut rest = body.unread_for_test();
        rest.extend_from_slice(&wire[fed..]);
        prop_assert_eq!(rest, after);
    }

    /// Any body, in any frames, uploads chunked and arrives whole at hyper's server.
    #[test]
    fn chunked_uploads_arrive_whole(
        pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..12),
    ) {
        let rt = runtime();
        let all: Vec<u8> = pieces.concat();
        let text = rt.block_on(async move {
            let addr = echo_backend().await;
            let conn = Conn::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
            let req = Request::post("/p").header("host", "b").body(streamed(pieces, None)).unwrap();
            upload(conn, req).await.0
        });
        let want = format!("{} bytes, trailers [], sum {}", all.len(), checksum(&all));
        prop_assert!(text.ends_with(&want), "{} / {}", text, want);
    }
}

/// A backend that refuses an upload early (a 413 as soon as it has the head) and closes:
/// its answer reaches the client, not a 502 about the body it stopped reading.
#[tokio::test]
async fn an_early_answer_to_an_upload_is_passed_on() {
    let answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large".to_vec();
    let addr = backend(answer).await;
    let conn = Conn::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
    let size = 8 * 1024 * 1024;
    let pieces: Vec<Vec<u8>> = (0..size / 65536).map(|_| vec![b'x'; 65536]).collect();
    let req = Request::post("/import")
        .header("host", "b")
        .header("content-length", size.to_string())
        .body(streamed(pieces, None))
        .unwrap();
    let resp = send(conn, req, None).await.expect("the backend's answer");
    assert_eq!(resp.status(), 413);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.expect("the answer's body").into_data() {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got, b"too large");
    assert!(body.take_reusable().is_none());
}

/// A connection that carried a large response goes back to the pool without the read
/// buffer it grew for it.
#[tokio::test]
async fn a_pooled_connection_does_not_keep_a_large_read_buffer() {
    let big = vec![b'z'; 2_000_000];
    let mut answer =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", big.len()).into_bytes();
    answer.extend_from_slice(&big);
    let addr = backend(answer).await;
    let conn = Conn::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
    let resp = send(conn, request(&Method::GET), None).await.unwrap();
    let mut body = resp.into_body();
    let mut grew = 0;
    let mut n = 0;
    while let Some(f) = body.frame().await {
        n += f.unwrap().into_data().unwrap().len();
        grew = grew.max(body.conn.as_ref().map_or(0, |c| c.rbuf.capacity()));
    }
    assert_eq!(n, big.len());
    assert!(grew > 2 * MIN_READ, "reads grew to {grew} bytes");
    let conn = body.take_reusable().expect("a clean exchange");
    assert!(
        conn.rbuf.capacity() <= 2 * MIN_READ,
        "kept {}",
        conn.rbuf.capacity()
    );
}

/// Starts `n` exchanges in one runtime turn, each counting itself as handled on the
/// thread (as the server's per-request guard does), with one more request in flight
/// (waiting for its backend) or not; returns, per exchange, whether its request had
/// reached the backend when a task queued behind them all ran. Then answers them.
fn arrived_within_the_turn(n: usize, another_in_flight: bool) -> Vec<bool> {
    runtime().block_on(async {
        let other = another_in_flight.then(crate::workers::Handling::enter);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Vec::new();
        let mut backends = Vec::new();
        for _ in 0..n {
            let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
            conns.push(Conn::new(Stream::Plain(ours.unwrap())));
            backends.push(theirs.unwrap().0.into_std().unwrap());
        }
        // Queued in one go, with no await between: they start in the same turn.
        let exchanges: Vec<_> = conns
            .into_iter()
            .map(|conn| {
                tokio::spawn(async move {
                    let _handling = crate::workers::Handling::enter();
                    let resp = send(conn, request(&Method::GET), None).await;
                    resp.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
                })
            })
            .collect();
        // Loopback delivers a sent segment before `send` returns, so a head written
        // during the exchanges' first polls is readable here.
        let early = tokio::spawn(async move {
            let arrived: Vec<bool> = backends
                .iter()
                .map(|b| match b.peek(&mut [0u8; 1]) {
                    Ok(n) => n > 0,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(e) => panic!("peeking at the backend's socket: {e}"),
                })
                .collect();
            (arrived, backends)
        });
        let (arrived, backends) = early.await.unwrap();
        for b in backends {
            let mut b = TcpStream::from_std(b).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = b.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request never arrived");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got.starts_with(b"GET /r HTTP/1.1\r\n"), "{got:?}");
            b.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            std::mem::forget(b);
        }
        for exchange in exchanges {
            let status = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
                .await
                .expect("the exchange ends once answered")
                .unwrap();
            assert_eq!(status, Ok(204));
        }
        drop(other);
        arrived
    })
}

/// With other requests on the thread, exchanges that start in the same turn write
/// nothing until the turn's ready tasks ran (see `behind_ready_tasks`): their requests
/// reach the backend together. Without the pause each would write in its first poll.
#[test]
fn requests_go_out_after_the_turns_ready_tasks_ran() {
    assert_eq!(arrived_within_the_turn(2, true), [false, false]);
}

/// A request alone on its thread goes out in its exchange's first poll: there is
/// nothing to wait behind.
#[test]
fn a_lone_request_goes_out_at_once() {
    assert_eq!(arrived_within_the_turn(1, false), [true]);
}
