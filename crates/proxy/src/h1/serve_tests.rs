//! keyway's own HTTP/1.1 server side over an in-memory socket: what it serves, how it
//! frames answers, and what it hands to hyper untouched.

use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::body;
use crate::h1::behind_ready_tasks;

const SETTINGS: Settings = Settings {
    max_head: 8192,
    header_read_timeout: Duration::from_secs(5),
};

type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Answers with the request's method and path, with a Content-Length.
fn echo(req: Request<NoBody>) -> Answer {
    let text = format!("{} {}", req.method(), req.uri());
    Box::pin(async move { Response::new(body::full(text)) })
}

/// Runs `serve` on one end of a pipe after `input` was written to the other; returns
/// everything the client received (until the server's side closed) and how serving
/// ended.
async fn run<H>(input: &[u8], handler: H, settings: Settings) -> (String, Ended<DuplexStream>)
where
    H: FnMut(Request<NoBody>) -> Answer,
{
    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(input).await.unwrap();
    let closing = Arc::new(AtomicBool::new(false));
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        serve(server, BytesMut::new(), handler, settings, closing),
    )
    .await
    .expect("serving ends (closed or handed to hyper) once the input is used up");
    let mut got = Vec::new();
    if let Ended::Closed = ended {
        client.read_to_end(&mut got).await.unwrap();
    }
    (String::from_utf8_lossy(&got).into_owned(), ended)
}

fn handed(ended: Ended<DuplexStream>) -> Bytes {
    match ended {
        Ended::HandOff(_, bytes) => bytes,
        Ended::Closed => panic!("expected a hand-off to hyper"),
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_until_close() {
    let (got, ended) = run(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n",
        echo,
        SETTINGS,
    )
    .await;
    assert!(matches!(ended, Ended::Closed));
    let answers: Vec<&str> = got.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{got}");
    assert!(answers[0].starts_with("200 OK\r\ncontent-length: 6\r\ndate: "));
    assert!(answers[0].ends_with("\r\n\r\nGET /a"), "{}", answers[0]);
    // HEAD: the length of the GET answer, no body.
    assert!(
        answers[1].contains("content-length: 7\r\n"),
        "{}",
        answers[1]
    );
    assert!(answers[1].ends_with("\r\n\r\n"), "{}", answers[1]);
    assert!(
        answers[2].contains("connection: close\r\n"),
        "{}",
        answers[2]
    );
    assert!(answers[2].ends_with("GET /c"));
}

#[tokio::test]
async fn requests_it_does_not_serve_go_to_hyper_with_every_byte() {
    let unserved: [&[u8]; 9] = [
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"PUT /p HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
        b"GET /p HTTP/1.0\r\nHost: x\r\n\r\n",
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for input in unserved {
        // Served first, then the one for hyper, then more behind it.
        let mut all = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        all.extend_from_slice(input);
        all.extend_from_slice(b"GET /after HTTP/1.1\r\n\r\n");
        let (_, ended) = run(&all, echo, SETTINGS).await;
        let rest = handed(ended);
        let mut want = input.to_vec();
        want.extend_from_slice(b"GET /after HTTP/1.1\r\n\r\n");
        assert_eq!(rest, want, "{}", String::from_utf8_lossy(input));
    }
}

#[tokio::test]
async fn a_head_past_the_limit_goes_to_hyper() {
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.resize(9000, b'a');
    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(&big).await.unwrap();
    let closing = Arc::new(AtomicBool::new(false));
    let ended = serve(server, BytesMut::new(), echo, SETTINGS, closing).await;
    let rest = handed(ended);
    assert_eq!(rest.len(), SETTINGS.max_head, "never reads past the limit");
    assert_eq!(&rest[..], &big[..SETTINGS.max_head]);
}

#[tokio::test]
async fn a_streamed_body_is_chunked_with_only_the_announced_trailers() {
    let stream = |req: Request<NoBody>| -> Answer {
        let head = req.method() == Method::HEAD;
        Box::pin(async move {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-sum", HeaderValue::from_static("9"));
            trailers.insert("x-secret", HeaderValue::from_static("no"));
            trailers.insert("set-cookie", HeaderValue::from_static("session=stolen"));
            let frames = vec![
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"hello "))),
                Ok(http_body::Frame::data(Bytes::from(vec![b'w'; 5000]))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                header::TRAILER,
                HeaderValue::from_static("x-sum, set-cookie"),
            );
            if head {
                *resp.status_mut() = StatusCode::NO_CONTENT;
            }
            resp
        })
    };
    let (got, ended) = run(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        stream,
        SETTINGS,
    )
    .await;
    assert!(matches!(ended, Ended::Closed));
    let (first, second) = got.split_at(got.find("HTTP/1.1 204").expect("second answer"));
    assert!(first.contains("transfer-encoding: chunked\r\n"), "{first}");
    let body = &first[first.find("\r\n\r\n").unwrap() + 4..];
    let want = format!(
        "6\r\nhello \r\n1388\r\n{}\r\n0\r\nx-sum: 9\r\n\r\n",
        "w".repeat(5000)
    );
    assert_eq!(body, want);
    // 204: no body, no framing header, no trailer announcement.
    assert!(!second.contains("transfer-encoding"), "{second}");
    assert!(!second.contains("content-length"), "{second}");
    assert!(!second.contains("trailer"), "{second}");
    assert!(second.ends_with("\r\n\r\n"), "{second}");
}

type BoxError = crate::body::BoxError;

#[tokio::test]
async fn a_body_shorter_than_its_length_closes_the_connection() {
    let short = |_req: Request<NoBody>| -> Answer {
        Box::pin(async move {
            let frames = vec![Ok::<_, BoxError>(http_body::Frame::data(
                Bytes::from_static(b"abc"),
            ))];
            let mut resp =
                Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
            resp
        })
    };
    // The second request is never answered: the first one's framing broke.
    let (got, ended) = run(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
        short,
        SETTINGS,
    )
    .await;
    assert!(matches!(ended, Ended::Closed));
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
    assert!(got.contains("content-length: 10\r\n"));
    assert!(got.ends_with("\r\n\r\nabc"), "{got}");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request() {
    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let seen = dropped.clone();
    let forever = move |_req: Request<NoBody>| -> Answer {
        let guard = Dropped(seen.clone());
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            unreachable!()
        })
    };
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let closing = Arc::new(AtomicBool::new(false));
    let serving = tokio::spawn(serve(server, BytesMut::new(), forever, SETTINGS, closing));
    drop(client);
    let ended = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serving ends when the client leaves")
        .unwrap();
    assert!(matches!(ended, Ended::Closed));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the request was cancelled"
    );
}

/// Serves `input` and leaves the connection open: header_read_timeout must close it, no
/// sooner than the timeout. What the client got back.
async fn closed_by_the_header_timeout(input: &[u8], timeout: Duration, why: &str) -> String {
    let settings = Settings {
        header_read_timeout: timeout,
        ..SETTINGS
    };
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client.write_all(input).await.unwrap();
    let closing = Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        serve(server, BytesMut::new(), echo, settings, closing),
    )
    .await
    .expect(why);
    assert!(matches!(ended, Ended::Closed));
    assert!(started.elapsed() >= timeout);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_head_that_never_completes_is_closed_unanswered() {
    let got = closed_by_the_header_timeout(
        b"GET / HTTP/1.1\r\nHo",
        Duration::from_millis(200),
        "header_read_timeout ends a head that never completes",
    )
    .await;
    assert!(got.is_empty(), "no answer to an incomplete head");
}

#[tokio::test]
async fn a_graceful_shutdown_answers_the_request_in_flight_with_close() {
    let closing = Arc::new(AtomicBool::new(false));
    let flag = closing.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut rx = Some(rx);
    let slow = move |req: Request<NoBody>| -> Answer {
        let rx = rx.take();
        Box::pin(async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            echo(req).await
        })
    };
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let serving = tokio::spawn(serve(server, BytesMut::new(), slow, SETTINGS, closing));
    tokio::task::yield_now().await;
    flag.store(true, Ordering::SeqCst);
    tx.send(()).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("connection: close\r\n"), "{got}");
    assert!(got.ends_with("GET /a"), "{got}");
    assert!(matches!(serving.await.unwrap(), Ended::Closed));
}

#[tokio::test]
async fn an_idle_connection_ends_at_once_on_a_graceful_shutdown() {
    let (_client, server) = tokio::io::duplex(1 << 16);
    let closing = Arc::new(AtomicBool::new(true));
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        serve(server, BytesMut::new(), echo, SETTINGS, closing),
    )
    .await
    .expect("an idle connection ends without waiting for a request");
    assert!(matches!(ended, Ended::Closed));
}

#[test]
fn content_length_values_are_digits_only() {
    assert_eq!(parse_length(b"0"), Some(0));
    assert_eq!(parse_length(b"1234"), Some(1234));
    for bad in [
        &b""[..],
        b"+1",
        b"-1",
        b"1,1",
        b" 1",
        b"99999999999999999999",
    ] {
        assert_eq!(parse_length(bad), None, "{bad:?}");
    }
    let mut out = Vec::new();
    put_hex(&mut out, 0);
    put_hex(&mut out, 5000);
    assert_eq!(out, b"01388");
}

/// A stream that holds written bytes until flushed (as TLS does): every answer must be
/// flushed, or a keep-alive client waits for it for ever.
#[tokio::test]
async fn every_answer_is_flushed() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let server = tokio::io::BufWriter::new(server);
    client
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let closing = Arc::new(AtomicBool::new(false));
    // Long enough that only a flush, not the close after it, can deliver the answer.
    let settings = Settings {
        header_read_timeout: Duration::from_secs(600),
        ..SETTINGS
    };
    let _serving = tokio::spawn(serve(server, BytesMut::new(), echo, settings, closing));
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"GET /a") {
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
            .await
            .expect("the answer arrives while the connection stays open")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_closes_after_header_read_timeout() {
    let got = closed_by_the_header_timeout(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(300),
        "an idle keep-alive connection is closed",
    )
    .await;
    assert!(got.ends_with("GET /a"), "{got}");
}

/// A client that pipelines and then half-closes: a request whose successor is already
/// buffered is answered (nothing more is read while it is served, as in hyper); the
/// last one meets the client's EOF, which hyper's default (no half-close) and nginx
/// both take as the client going away.
#[tokio::test]
async fn a_half_close_does_not_cancel_a_request_with_a_pipelined_successor() {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    // Not ready at once, so the client's side is watched while it works.
    let later = |req: Request<NoBody>| -> Answer {
        Box::pin(async move {
            tokio::task::yield_now().await;
            echo(req).await
        })
    };
    let closing = Arc::new(AtomicBool::new(false));
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        serve(server, BytesMut::new(), later, SETTINGS, closing),
    )
    .await
    .unwrap();
    assert!(matches!(ended, Ended::Closed));
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.ends_with("GET /a"), "{got}");
}

#[test]
fn the_end_of_a_head_is_found_across_reads_scanning_each_byte_once() {
    let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut scanned = 0;
    let mut found_at = None;
    for end in 1..=head.len() {
        if head_may_be_complete(&head[..end], &mut scanned) {
            found_at.get_or_insert(end);
        }
        assert_eq!(scanned, end, "the next search starts behind what was read");
    }
    assert_eq!(
        found_at,
        Some(head.len()),
        "found only once the empty line is whole"
    );
    let mut scanned = 0;
    assert!(head_may_be_complete(
        b"GET / HTTP/1.1\nHost: x\n\n",
        &mut scanned
    ));
    let mut scanned = 0;
    assert!(!head_may_be_complete(
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        &mut scanned
    ));
}

/// A pipe end that notes its first write in a shared log.
struct Noted {
    io: DuplexStream,
    name: &'static str,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    wrote: bool,
}

impl AsyncRead for Noted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Noted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.wrote {
            self.wrote = true;
            let line = format!("{} written", self.name);
            self.log.lock().unwrap().push(line);
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves two connections whose requests are ready in the same runtime turn, with
/// another request in flight on the thread (one waiting for its backend) or none;
/// returns the order in which requests were answered and answers written.
async fn two_in_one_turn(another_in_flight: bool) -> Vec<String> {
    let other = another_in_flight.then(crate::workers::Handling::enter);
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for name in ["a", "b"] {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(
                format!("GET /{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        clients.push(client);
        let io = Noted {
            io: server,
            name,
            log: log.clone(),
            wrote: false,
        };
        let seen = log.clone();
        let handler = move |req: Request<NoBody>| -> Answer {
            seen.lock().unwrap().push(format!("{} answered", req.uri()));
            Box::pin(async { Response::new(body::full("ok")) })
        };
        let closing = Arc::new(AtomicBool::new(false));
        servers.push(tokio::spawn(serve(
            io,
            BytesMut::new(),
            handler,
            SETTINGS,
            closing,
        )));
    }
    for server in servers {
        let ended = tokio::time::timeout(Duration::from_secs(10), server).await;
        assert!(matches!(ended, Ok(Ok(Ended::Closed))));
    }
    drop(other);
    for mut client in clients {
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\nok"),
            "{got}"
        );
    }
    let order = log.lock().unwrap().clone();
    order
}

/// With other requests on the thread, both connections are read and answered before
/// either answer is written (see `behind_ready_tasks`), so the answers go out together.
#[tokio::test]
async fn answers_are_written_after_the_turns_other_requests_are_read() {
    assert_eq!(
        two_in_one_turn(true).await,
        ["/a answered", "/b answered", "a written", "b written"]
    );
}

/// With no other request on the thread when an answer is ready, it is written at once:
/// there is nothing in flight to wait for.
#[tokio::test]
async fn a_lone_answer_is_written_at_once() {
    assert_eq!(
        two_in_one_turn(false).await,
        ["/a answered", "a written", "/b answered", "b written"]
    );
}

/// Two tasks that each "receive" and then "send" behind the ready tasks: both receives
/// come before either send, in the order the tasks were queued. Without the pause (or
/// with one that completes at once) each task would send right after its receive.
#[tokio::test]
async fn sends_wait_behind_the_ready_tasks() {
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = |name: &'static str| {
        let order = order.clone();
        tokio::spawn(async move {
            order.lock().unwrap().push(format!("{name} receives"));
            behind_ready_tasks().await;
            order.lock().unwrap().push(format!("{name} sends"));
        })
    };
    let (a, b) = (task("a"), task("b"));
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        ["a receives", "b receives", "a sends", "b sends"]
    );
}
