//! What keyway forwards: headers (hop-by-hop removed, X-Forwarded-*, Via), streaming
//! bodies, size limits, HTTP/2 on both sides, WebSocket, routing and 404.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use keyway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn simple(backend: &TestBackend, listener_extra: &str, backend_extra: &str) -> String {
    format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
{listener_extra}
[[route]]
host = "pvwa.corp.test"
cluster = "pvwa"
[cluster.pvwa]
backends = [{{ id = "a", address = "{}" {backend_extra} }}]
"#,
        backend.addr
    )
}

#[tokio::test]
async fn forwarded_headers_and_hop_by_hop() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, "", "")).await;
    let mut req = request("GET", "pvwa.corp.test", "/PasswordVault/?q=1", "");
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "10.9.9.9".parse().unwrap());
    h.insert("connection", "keep-alive, x-private".parse().unwrap());
    h.insert("x-private", "drop me".parse().unwrap());
    h.insert("proxy-authorization", "Basic eA==".parse().unwrap());
    h.insert("x-app", "kept".parse().unwrap());
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200);
    let seen = &a.seen()[0];
    assert_eq!(seen.path, "/PasswordVault/?q=1");
    // The client is no trusted proxy: its X-Forwarded-For is replaced, not appended to.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "pvwa.corp.test");
    assert_eq!(seen.headers["host"], "pvwa.corp.test");
    assert_eq!(seen.headers["via"], "1.1 keyway");
    assert_eq!(seen.headers["x-app"], "kept");
    for gone in ["x-private", "proxy-authorization"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} must not be forwarded"
        );
    }
    assert!(
        !seen.headers.contains_key("connection"),
        "the client's Connection must not be forwarded: {:?}",
        seen.headers
    );
    // Response side: the backend's `Connection: keep-alive, x-hop` and the `X-Hop` it
    // names are not passed on; Via is added.
    assert_eq!(r.headers["via"], "1.1 keyway");
    assert_eq!(r.headers["x-backend"], "a");
    for gone in ["connection", "x-hop"] {
        assert!(
            !r.headers.contains_key(gone),
            "the backend's {gone} must not be forwarded: {:?}",
            r.headers
        );
    }
}

#[tokio::test]
async fn a_trusted_proxy_s_forwarded_for_is_appended_to() {
    let a = TestBackend::start("a").await;
    let extra = "trusted_proxies = [\"127.0.0.0/8\"]\nforwarded = true";
    let proxy = Proxy::start(&simple(&a, extra, "")).await;
    let mut req = request("GET", "pvwa.corp.test", "/", "");
    let h = req.headers_mut();
    h.insert("x-forwarded-for", "10.9.9.9".parse().unwrap());
    h.insert("x-forwarded-proto", "https".parse().unwrap());
    h.insert("forwarded", "for=10.9.9.9;proto=https".parse().unwrap());
    assert_eq!(send(proxy.addr, req).await.status, 200);
    let seen = &a.seen()[0];
    assert_eq!(seen.headers["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(
        seen.headers["forwarded"],
        "for=10.9.9.9;proto=https, for=127.0.0.1;proto=http;host=\"pvwa.corp.test\""
    );
}

#[tokio::test]
async fn unknown_host_is_404_with_problem_body() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, "", "")).await;
    let r = get(proxy.addr, "other.corp.test", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.body.contains("other.corp.test"), "{}", r.body);
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn path_prefix_routes_to_its_cluster() {
    let web = TestBackend::start("web").await;
    let api = TestBackend::start("api").await;
    let cfg = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
host = "*.corp.test"
cluster = "web"
[[route]]
host = "*.corp.test"
path = "/PasswordVault/api"
cluster = "api"
[cluster.web]
backends = [{{ id = "w", address = "{}" }}]
[cluster.api]
backends = [{{ id = "a", address = "{}" }}]
"#,
        web.addr, api.addr
    );
    let proxy = Proxy::start(&cfg).await;
    assert_eq!(
        get(proxy.addr, "pvwa.corp.test", "/PasswordVault/api/Accounts")
            .await
            .backend(),
        "api"
    );
    assert_eq!(
        get(proxy.addr, "pvwa.corp.test", "/PasswordVault/v10/")
            .await
            .backend(),
        "web"
    );
    assert_eq!(get(proxy.addr, "corp.test", "/").await.status, 404);
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    // The request body is sent in chunks with pauses; the backend's answer (its byte
    // count) proves every chunk passed; a 1 MiB response streams back intact.
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, "", "")).await;
    let chunks = futures_util::stream::iter(0..8).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![
            b'a' + i as u8;
            64 * 1024
        ])))
    });
    let resp = send_streaming(proxy.addr, "PUT", "pvwa.corp.test", "/upload", chunks).await;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["body_len"], 8 * 64 * 1024);
    assert_eq!(
        a.seen()[0]
            .headers
            .get("transfer-encoding")
            .map(String::as_str),
        Some("chunked")
    );
}

#[tokio::test]
async fn request_body_limit_answers_413() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, "max_request_body_bytes = 1000", "")).await;
    // Declared length over the limit: refused before anything reaches the backend.
    let r = send(
        proxy.addr,
        request("POST", "pvwa.corp.test", "/", &"x".repeat(2000)),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(a.hits(), 0);
    // Under the limit: passes.
    let r = send(
        proxy.addr,
        request("POST", "pvwa.corp.test", "/", &"x".repeat(900)),
    )
    .await;
    assert_eq!(r.status, 200);

    // Chunked (no length) over the limit: cut off mid-stream, answered 413.
    let chunks = futures_util::stream::iter(0..4)
        .map(|_| Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![b'z'; 600]))));
    let resp = send_streaming(proxy.addr, "POST", "pvwa.corp.test", "/", chunks).await;
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, "max_request_header_bytes = 8192", "")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let big = "y".repeat(20_000);
    let head = format!("GET / HTTP/1.1\r\nhost: pvwa.corp.test\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(head.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "got: {text:.80}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn garbage_on_the_wire_gets_400_and_no_crash() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, r#"header_read_timeout = "500ms""#, "")).await;
    // Malformed heads get one 400 and a close; incomplete ones are closed, unanswered,
    // by header_read_timeout (docs/security.md).
    let junk: [(&[u8], Option<&str>); 5] = [
        (b"\x16\x03\x01\x00\xff garbage\r\n\r\n", Some("400")),
        (b"GET / HTTP/9.9\r\n\r\n", Some("400")),
        (b"GET /\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n", Some("400")),
        (b"\r\n\r\n\r\n", None),         // a valid prefix
        (b"GET / HTTP/1.1\r\nho", None), // a slow-loris head
    ];
    for (j, answer) in junk {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let _ = s.write_all(j).await;
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "keyway must close the connection for {j:?}");
        let text = String::from_utf8_lossy(&buf);
        match answer {
            Some(status) => {
                assert!(
                    text.starts_with(&format!("HTTP/1.1 {status} ")),
                    "{j:?} got {text:.60}"
                );
                assert_eq!(
                    text.matches("HTTP/1.1 ").count(),
                    1,
                    "{j:?}: one answer, then the close: {text}"
                );
            }
            None => assert!(buf.is_empty(), "{j:?} got {text:.60}"),
        }
    }
    // Still serving.
    assert_eq!(get(proxy.addr, "pvwa.corp.test", "/").await.status, 200);
}

#[tokio::test]
async fn h2_downstream_and_h2_upstream() {
    let a = TestBackend::start("a").await;
    // Downstream h2 (prior knowledge) to an HTTP/1.1 backend.
    let proxy = Proxy::start(&simple(&a, "", "")).await;
    let r = h2_get(proxy.addr, "pvwa.corp.test", "/h2").await;
    assert_eq!(r.status, 200);
    let seen = &a.seen()[0];
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(seen.headers["host"], "pvwa.corp.test");
    assert_eq!(seen.headers["via"], "2 keyway");

    // Upstream h2c when the backend is configured for HTTP/2.
    let b = TestBackend::start("b").await;
    let proxy = Proxy::start(&simple(&b, "", r#", protocol = "http2""#)).await;
    for _ in 0..3 {
        let r = get(proxy.addr, "pvwa.corp.test", "/up").await;
        assert_eq!(r.status, 200);
    }
    let seen = b.seen();
    assert!(seen.iter().all(|s| s.version == "HTTP/2.0"), "{seen:?}");
    assert_eq!(
        b.connections(),
        1,
        "one multiplexed h2 connection is reused"
    );
}

/// Each worker keeps its own idle connections (a connection belongs to the poller of
/// the worker that made it): sequential requests reuse one per worker at most.
#[tokio::test]
async fn upstream_connections_are_pooled() {
    for workers in [1, 2] {
        let a = TestBackend::start("a").await;
        let cfg = format!("[proxy]\nworkers = {workers}\n{}", simple(&a, "", ""));
        let proxy = Proxy::start(&cfg).await;
        for _ in 0..20 {
            assert_eq!(get(proxy.addr, "pvwa.corp.test", "/").await.status, 200);
        }
        assert!(
            (1..=workers).contains(&a.connections()),
            "{workers} workers: sequential requests reuse a keep-alive connection per worker, not {}",
            a.connections()
        );
    }
}

#[tokio::test]
async fn websocket_passes_through() {
    let a = TestBackend::start("psm-1").await;
    let proxy = Proxy::start(&simple(&a, "", "")).await;
    let (mut ws, resp) = tokio_tungstenite::client_async(
        "ws://pvwa.corp.test/gateway",
        tokio::net::TcpStream::connect(proxy.addr).await.unwrap(),
    )
    .await
    .expect("websocket handshake through keyway");
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        ws.send(format!("frame {i}").into()).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.to_text().unwrap(), format!("psm-1:frame {i}"));
    }
    ws.close(None).await.unwrap();
}

/// A listener in front of one backend at `addr`, for any host and path.
fn one_backend(addr: std::net::SocketAddr) -> String {
    format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\ncluster = \"c\"\n[cluster.c]\nbackends = [{{ id = \"a\", address = \"{addr}\" }}]\n"
    )
}

/// A raw HTTP/1.1 backend that answers one request per connection with `answer`. Then
/// it closes the connection at once, or (`wait`) when the next request arrives,
/// unanswered. Returns its address and the number of connections it accepted.
async fn one_answer_per_connection(
    answer: &'static [u8],
    wait: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let mut heads = 0;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    if !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    got.clear();
                    heads += 1;
                    if heads > 1 {
                        return;
                    }
                    let _ = s.write_all(answer).await;
                    if !wait {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A backend that says keep-alive and then closes every connection right after its
/// answer (as one whose keep-alive timeout ran out would): a pooled connection it
/// closed is noticed when it is checked out, so no client request fails on it. The
/// requests are POSTs, which are never sent twice: each must find a live connection.
#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_not_used() {
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok";
    // Closed at once: the answer and the FIN leave together.
    let (addr, accepted) = one_answer_per_connection(answer, false).await;
    let proxy = Proxy::start(&one_backend(addr)).await;
    for i in 0..30 {
        let r = send(proxy.addr, request("POST", "h", "/", "")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 30);
}

/// The keep-alive race: a backend whose idle timeout runs out just as a pooled
/// connection carries the next request closes it unanswered. A bodiless GET is then
/// sent once more on a fresh connection to the same backend (nginx's rule for cached
/// connections), so the client sees no 502 even with a single backend.
#[tokio::test]
async fn a_get_caught_by_the_keep_alive_race_is_sent_again_on_a_new_connection() {
    // The connection stays open after the answer and is closed, unanswered, when the
    // second request arrives.
    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (addr, accepted) = one_answer_per_connection(answer, true).await;
    let proxy = Proxy::start(&one_backend(addr)).await;
    for i in 0..10 {
        let r = get(proxy.addr, "h", "/").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    // Every request after the first found its pooled connection closed and opened one.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
    // A POST caught the same way is never sent twice: it gets the 502, and no new
    // connection was opened for it.
    let r = send(proxy.addr, request("POST", "h", "/", "x")).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
}

/// One GET on a kept-alive raw connection: its status, the response read whole.
async fn get_on(s: &mut tokio::net::TcpStream) -> u16 {
    s.write_all(b"GET / HTTP/1.1\r\nHost: pvwa.corp.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a content-length");
    while got.len() < head_end + length {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed in the body");
        got.extend_from_slice(&buf[..n]);
    }
    head[9..12].parse().unwrap()
}

/// `workers = 3`: keep-alive connections are spread evenly over the workers, each
/// keeps being served by its worker, and closed connections leave no count behind.
#[tokio::test]
async fn connections_are_spread_over_the_workers_and_served_there() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&format!("[proxy]\nworkers = 3\n{}", simple(&a, "", ""))).await;
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(get_on(&mut s).await, 200);
        conns.push(s);
    }
    assert_eq!(proxy.server().worker_connections(), vec![2, 2, 2]);
    for _ in 0..3 {
        for s in &mut conns {
            assert_eq!(get_on(s).await, 200);
        }
    }
    // At most one upstream connection per worker: each pools its own.
    assert!(
        a.connections() <= 3,
        "{} upstream connections",
        a.connections()
    );
    drop(conns);
    eventually(
        Duration::from_secs(10),
        "closed connections leave their workers",
        || async { proxy.server().worker_connections() == vec![0, 0, 0] },
    )
    .await;
}

/// `Expect: 100-continue`: the client holds its body until it hears `100 Continue`, and
/// keyway waits for a body's first bytes before it sends the head upstream, so keyway
/// must answer the 100 itself: the upload then goes through whole.
#[tokio::test]
async fn a_client_waiting_for_100_continue_gets_it_and_its_body_arrives() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&simple(&a, "", "")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: pvwa.corp.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s, "no 100 Continue: the client would wait for ever").await;
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    s.write_all(b"hello").await.unwrap();
    let head = read_head(&mut s, "no answer").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = a.seen();
    assert_eq!((seen[0].path.as_str(), seen[0].body_len), ("/upload", 5));
}

/// Full duplex: a client that sends a chunked POST's head and waits for the backend's
/// answer before sending its body (a backend that refuses on the head alone, a streaming
/// client) still gets that answer: keyway waits only briefly for the first body bytes
/// before the head goes upstream.
#[tokio::test]
async fn a_backend_answering_a_head_alone_reaches_a_client_holding_its_body() {
    let answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let (addr, _) = one_answer_per_connection(answer, false).await;
    let proxy = Proxy::start(&one_backend(addr)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /stream HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s, "no answer while the body is held").await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
}

/// Reads one response head, byte by byte (nothing after it is consumed), within 10 s;
/// `what` names the failure.
async fn read_head(s: &mut tokio::net::TcpStream, what: &str) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !got.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = s.read(&mut byte).await.unwrap();
            assert!(
                n > 0,
                "{what}: closed after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.push(byte[0]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 10 s"));
    String::from_utf8_lossy(&got).into_owned()
}

/// The protocol timeout of a request sent over a pooled connection (the first attempt,
/// its connection taken without waiting) still runs its full length from sending.
/// One worker: idle connections are kept per worker.
#[tokio::test]
async fn a_pooled_connection_that_never_answers_is_bounded_by_protocol_timeout() {
    let a = TestBackend::start("a").await;
    let config = format!(
        r#"
[proxy]
workers = 1
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "pvwa"
[cluster.pvwa]
protocol_timeout = "300ms"
backends = [{{ id = "a", address = "{}" }}]
"#,
        a.addr
    );
    let proxy = Proxy::start(&config).await;
    let r = get(proxy.addr, "pvwa.corp.test", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(a.connections(), 1);
    a.set_mode(Mode::Hang);
    let t = std::time::Instant::now();
    let r = send(
        proxy.addr,
        request("POST", "pvwa.corp.test", "/x", "payload"),
    )
    .await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        a.connections(),
        1,
        "the POST went over the pooled connection"
    );
}
