//! Connection limits and passive ejection: clients cannot knock a backend out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use keyway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything that should happen at once.
const SOON: Duration = Duration::from_secs(10);

// === a backend that counts what it sees and answers when told ===

struct Counts {
    /// Requests whose head arrived.
    started: AtomicUsize,
    /// Requests whose body failed (the proxy gave up on the upload).
    body_failed: AtomicUsize,
    /// Requests being handled now, and the most ever at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// While set, each request waits for a `release` before answering.
    hold: AtomicBool,
    release: tokio::sync::Semaphore,
}

/// An HTTP backend that records concurrency from its own side and can hold answers
/// until the test releases them, so "slow" is a decision of the test, not a sleep.
#[derive(Clone)]
struct GateBackend {
    addr: SocketAddr,
    counts: Arc<Counts>,
}

impl GateBackend {
    async fn start(name: &'static str) -> Self {
        let sock = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = sock.local_addr().expect("addr");
        let counts = Arc::new(Counts {
            started: AtomicUsize::new(0),
            body_failed: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
            release: tokio::sync::Semaphore::new(0),
        });
        let c = counts.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = sock.accept().await {
                let c = c.clone();
                let svc = service_fn(move |req| {
                    let c = c.clone();
                    async move { Ok::<_, Infallible>(gate_answer(name, c, req).await) }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Self { addr, counts }
    }

    fn started(&self) -> usize {
        self.counts.started.load(Ordering::SeqCst)
    }
    fn body_failed(&self) -> usize {
        self.counts.body_failed.load(Ordering::SeqCst)
    }
    fn in_flight(&self) -> usize {
        self.counts.in_flight.load(Ordering::SeqCst)
    }
    fn max_in_flight(&self) -> usize {
        self.counts.max_in_flight.load(Ordering::SeqCst)
    }
    fn hold(&self) {
        self.counts.hold.store(true, Ordering::SeqCst);
    }
    /// Lets `n` held requests answer.
    fn release(&self, n: usize) {
        self.counts.release.add_permits(n);
    }
}

struct Leaving<'a>(&'a Counts);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type GateBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn gate_answer(
    name: &'static str,
    c: Arc<Counts>,
    req: Request<Incoming>,
) -> Response<GateBody> {
    if req.uri().path() == "/stream" {
        // One chunk, then a body that never ends: the client decides when it is over.
        let chunk = futures_util::stream::once(async {
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"first")))
        });
        let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(
            chunk,
            futures_util::stream::pending(),
        ));
        return Response::new(body.boxed());
    }
    c.started.fetch_add(1, Ordering::SeqCst);
    let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    c.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _leaving = Leaving(&c);
    if req.into_body().collect().await.is_err() {
        c.body_failed.fetch_add(1, Ordering::SeqCst);
    }
    if c.hold.load(Ordering::SeqCst) {
        if let Ok(p) = c.release.acquire().await {
            p.forget();
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(name)).boxed());
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    r
}

async fn metrics(p: &Proxy) -> String {
    admin_get(p.admin.unwrap(), "/metrics").await
}

fn ejections(m: &str, cluster: &str, backend: &str) -> f64 {
    metric(
        m,
        &format!("keyway_backend_ejections_total{{cluster=\"{cluster}\",backend=\"{backend}\"}}"),
    )
}

// === passive ejection counts only the backend's failures ===

/// Sends a request head announcing a large body, part of the body, waits until a
/// backend has the request (the proxy is streaming the upload to it), then vanishes.
async fn aborted_upload(proxy: SocketAddr, backends: &[&GateBackend]) {
    let before: usize = backends.iter().map(|b| b.started()).sum();
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'x'; 1000]).await.unwrap();
    eventually(SOON, "the upload reaches a backend", || async {
        backends.iter().map(|b| b.started()).sum::<usize>() > before
    })
    .await;
    drop(s);
}

#[tokio::test]
async fn aborted_uploads_do_not_eject_a_healthy_backend() {
    let a = GateBackend::start("a").await;
    let b = GateBackend::start("b").await;
    let p = Proxy::start(&one_cluster(
        "uploads",
        &format!(
            r#"outlier = {{ consecutive_failures = 3 }}
backends = [{{ id = "a", address = "{}" }}, {{ id = "b", address = "{}" }}]"#,
            a.addr, b.addr
        ),
    ))
    .await;

    // Four times consecutive_failures: every one would count, were it counted.
    for _ in 0..12 {
        aborted_upload(p.addr, &[&a, &b]).await;
    }
    eventually(SOON, "both backends saw every upload fail", || async {
        a.body_failed() + b.body_failed() == 12
    })
    .await;

    let m = metrics(&p).await;
    for id in ["a", "b"] {
        assert_eq!(ejections(&m, "uploads", id), 0.0, "{id} was ejected:\n{m}");
        let s = backend_status(p.admin.unwrap(), "uploads", id).await;
        assert!(s["health"]["ejected_for_ms"].is_null(), "{s}");
        assert!(
            s["last_error"].is_null(),
            "a client's abort is not the backend's error: {s}"
        );
    }
    // And both still take traffic.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = get(p.addr, "h", "/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.headers["x-backend"].to_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "both backends serve: {seen:?}");
}

#[tokio::test]
async fn a_backend_that_drops_requests_is_still_ejected() {
    let good = GateBackend::start("good").await;
    let bad = DroppingBackend::start().await;
    let p = Proxy::start(&one_cluster(
        "dropping",
        &format!(
            r#"retries = 0
outlier = {{ consecutive_failures = 3 }}
backends = [{{ id = "good", address = "{}" }}, {{ id = "bad", address = "{}" }}]"#,
            good.addr, bad.addr
        ),
    ))
    .await;
    for _ in 0..8 {
        let _ = get(p.addr, "h", "/").await;
    }
    let m = metrics(&p).await;
    assert!(ejections(&m, "dropping", "bad") >= 1.0, "{m}");
    assert_eq!(ejections(&m, "dropping", "good"), 0.0, "{m}");
    let s = backend_status(p.admin.unwrap(), "dropping", "bad").await;
    assert!(s["last_error"]["message"].is_string(), "{s}");
}

#[tokio::test]
async fn count_5xx_false_keeps_a_backend_that_answers_500() {
    let good = TestBackend::start("good").await;
    let five = TestBackend::start("five").await;
    five.set_mode(Mode::Status(500));
    let p = Proxy::start(&one_cluster(
        "fivexx",
        &format!(
            r#"retries = 0
outlier = {{ consecutive_failures = 2, count_5xx = false }}
backends = [{{ id = "good", address = "{}" }}, {{ id = "five", address = "{}" }}]"#,
            good.addr, five.addr
        ),
    ))
    .await;
    let mut five_hundreds = 0;
    for _ in 0..8 {
        if get(p.addr, "h", "/").await.status == 500 {
            five_hundreds += 1;
        }
    }
    assert_eq!(five_hundreds, 4, "round-robin keeps sending to `five`");
    let m = metrics(&p).await;
    assert_eq!(ejections(&m, "fivexx", "five"), 0.0, "{m}");
}

// === per-backend max_connections and its queue ===

fn capped(name: &str, b: &GateBackend, limits: &str) -> String {
    one_cluster(
        name,
        &format!(
            r#"{limits}
backends = [{{ id = "slow", address = "{}", max_connections = 2 }}]"#,
            b.addr
        ),
    )
}

fn queued(m: &str, cluster: &str) -> f64 {
    metric(
        m,
        &format!("keyway_upstream_queued{{cluster=\"{cluster}\",backend=\"slow\"}}"),
    )
}

/// Sends two requests and waits until both hold one of the (held) backend's two slots.
async fn fill_both_slots(
    addr: SocketAddr,
    b: &GateBackend,
) -> Vec<tokio::task::JoinHandle<http::StatusCode>> {
    let first = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "h", "/").await.status }))
        .collect();
    eventually(SOON, "two requests reach the backend", || async {
        b.started() == 2
    })
    .await;
    first
}

#[tokio::test]
async fn a_request_past_max_connections_waits_for_a_slot() {
    let b = GateBackend::start("slow").await;
    b.hold();
    let p = Proxy::start(&capped("waits", &b, r#"queue_timeout = "30s""#)).await;
    let addr = p.addr;
    let first = fill_both_slots(addr, &b).await;
    let third = tokio::spawn(async move { get(addr, "h", "/").await.status });
    eventually(SOON, "the third request waits in the queue", || async {
        queued(&metrics(&p).await, "waits") == 1.0
    })
    .await;
    let s = backend_status(p.admin.unwrap(), "waits", "slow").await;
    assert_eq!(s["queued"], 1, "{s}");
    assert_eq!(b.started(), 2, "the backend never sees a third at once");

    b.release(1);
    eventually(SOON, "the third request gets the freed slot", || async {
        b.started() == 3
    })
    .await;
    b.release(2);
    for h in first {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(third.await.unwrap(), 200);
    assert_eq!(b.max_in_flight(), 2);
    assert_eq!(queued(&metrics(&p).await, "waits"), 0.0);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let b = GateBackend::start("slow").await;
    b.hold();
    let p = Proxy::start(&capped("full", &b, "max_queue = 0")).await;
    let addr = p.addr;
    let first = fill_both_slots(addr, &b).await;
    for _ in 0..5 {
        let r = get(p.addr, "h", "/").await;
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
        assert!(r.body.contains("backend-busy"), "{}", r.body);
    }
    assert_eq!(b.started(), 2);
    b.release(2);
    for h in first {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(b.max_in_flight(), 2, "the backend never saw more than 2");
    let m = metrics(&p).await;
    assert_eq!(
        metric(
            &m,
            r#"keyway_upstream_queue_rejected_total{cluster="full",backend="slow",reason="full"}"#
        ),
        5.0,
        "{m}"
    );
    let s = backend_status(p.admin.unwrap(), "full", "slow").await;
    assert_eq!(s["queue_rejected"], 5, "{s}");
    // Busy is not broken: nothing counted against the backend.
    assert!(s["last_error"].is_null(), "{s}");
}

#[tokio::test]
async fn a_wait_past_queue_timeout_answers_503() {
    let b = GateBackend::start("slow").await;
    b.hold();
    let p = Proxy::start(&capped("timeout", &b, r#"queue_timeout = "200ms""#)).await;
    let addr = p.addr;
    let first = fill_both_slots(addr, &b).await;
    let r = get(p.addr, "h", "/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(
        r.json()["type"],
        "urn:keyway:error:backend-busy",
        "{}",
        r.body
    );
    assert_eq!(b.started(), 2);
    b.release(2);
    for h in first {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(b.max_in_flight(), 2);
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_frees_its_place() {
    let b = GateBackend::start("slow").await;
    b.hold();
    let p = Proxy::start(&capped(
        "leaves",
        &b,
        r#"max_queue = 1
queue_timeout = "60s""#,
    ))
    .await;
    let addr = p.addr;
    let first = fill_both_slots(addr, &b).await;
    // A client queues, then goes away.
    let mut gone = TcpStream::connect(p.addr).await.unwrap();
    gone.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    eventually(SOON, "the client waits in the queue", || async {
        queued(&metrics(&p).await, "leaves") == 1.0
    })
    .await;
    drop(gone);
    eventually(SOON, "its place is free again", || async {
        queued(&metrics(&p).await, "leaves") == 0.0
    })
    .await;
    // The one place is there for the next client.
    let next = tokio::spawn(async move { get(addr, "h", "/").await.status });
    eventually(SOON, "the next client queues", || async {
        queued(&metrics(&p).await, "leaves") == 1.0
    })
    .await;
    b.release(3);
    for h in first {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(next.await.unwrap(), 200);
    assert_eq!(b.max_in_flight(), 2);
    assert_eq!(b.in_flight(), 0);
}

// === per-listener max_connections ===

/// Sends one keep-alive GET on `s` and reads until the response's body (the backend's
/// name) arrives.
async fn get_on(s: &mut TcpStream, within: Duration) -> bool {
    if s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"lone") {
                        return true;
                    }
                }
            }
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

#[tokio::test]
async fn a_listener_at_max_connections_accepts_no_more_until_one_closes() {
    let b = GateBackend::start("lone").await;
    let p = Proxy::start(&format!(
        r#"[admin]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
max_connections = 2
[[route]]
cluster = "c"
[cluster.c]
backends = [{{ id = "lone", address = "{}" }}]
"#,
        b.addr
    ))
    .await;
    let mut one = TcpStream::connect(p.addr).await.unwrap();
    let mut two = TcpStream::connect(p.addr).await.unwrap();
    assert!(get_on(&mut one, SOON).await);
    assert!(get_on(&mut two, SOON).await);

    // The third connects (the kernel's backlog takes it) but is not served...
    let mut three = TcpStream::connect(p.addr).await.unwrap();
    three
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let reached = format!(
        "keyway_listener_limit_reached_total{{listener=\"{}\"}}",
        p.addr
    );
    eventually(SOON, "the listener stops accepting at its cap", || async {
        metric(&metrics(&p).await, &reached) >= 1.0
    })
    .await;
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), three.read(&mut buf)).await;
    assert!(early.is_err(), "the third connection was served: {early:?}");
    assert_eq!(b.started(), 2, "only two requests reached the backend");

    // ...until one of the first two closes.
    drop(one);
    let mut got = Vec::new();
    let served = tokio::time::timeout(SOON, async {
        loop {
            match three.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"lone") {
                        return true;
                    }
                }
            }
        }
    })
    .await;
    assert_eq!(served, Ok(true), "{}", String::from_utf8_lossy(&got));
    assert!(
        get_on(&mut two, SOON).await,
        "the open connection still works"
    );
}

#[tokio::test]
async fn oversized_streamed_bodies_do_not_eject() {
    let a = GateBackend::start("a").await;
    let b = GateBackend::start("b").await;
    let p = Proxy::start(&format!(
        r#"[admin]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
max_request_body_bytes = 1000
[[route]]
cluster = "big"
[cluster.big]
outlier = {{ consecutive_failures = 2 }}
backends = [{{ id = "a", address = "{}" }}, {{ id = "b", address = "{}" }}]
"#,
        a.addr, b.addr
    ))
    .await;
    for _ in 0..6 {
        // Chunked, so the size is only known as the bytes stream through.
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let mut req =
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n".to_vec();
        req.extend_from_slice(&[b'x'; 5000]);
        req.extend_from_slice(b"\r\n0\r\n\r\n");
        s.write_all(&req).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(SOON, s.read_exact(&mut head))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 413");
    }
    let m = metrics(&p).await;
    for id in ["a", "b"] {
        assert_eq!(ejections(&m, "big", id), 0.0, "{m}");
        let s = backend_status(p.admin.unwrap(), "big", id).await;
        assert!(s["last_error"].is_null(), "{s}");
    }
}

#[tokio::test]
async fn an_ordered_cluster_moves_past_a_full_backend() {
    let a = GateBackend::start("a").await;
    let b = GateBackend::start("b").await;
    a.hold();
    let p = Proxy::start(&one_cluster(
        "spill",
        &format!(
            r#"strategy = "ordered"
connect_stagger = "10s"
backends = [{{ id = "a", address = "{}", priority = 0, max_connections = 1, max_queue = 0 }},
            {{ id = "b", address = "{}", priority = 1 }}]"#,
            a.addr, b.addr
        ),
    ))
    .await;
    let addr = p.addr;
    let first = tokio::spawn(async move { get(addr, "h", "/").await });
    eventually(SOON, "the first request holds a's only slot", || async {
        a.started() == 1
    })
    .await;
    // a is full and queues nobody: b takes over at once, not after connect_stagger.
    let r = tokio::time::timeout(Duration::from_secs(5), get(p.addr, "h", "/"))
        .await
        .expect("b answers before the stagger");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-backend"], "b");
    a.release(1);
    let r = first.await.unwrap();
    assert_eq!(r.headers["x-backend"], "a");
    assert_eq!(a.max_in_flight(), 1);
}

#[tokio::test]
async fn a_websocket_tunnel_holds_its_backend_and_listener_slots_until_it_closes() {
    use futures_util::{SinkExt, StreamExt};
    let ws_backend = TestBackend::start("psm").await;
    let p = Proxy::start(&format!(
        r#"[admin]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
max_connections = 1
[[route]]
cluster = "tunnel"
[cluster.tunnel]
max_connections = 1
max_queue = 0
backends = [{{ id = "psm", address = "{}" }}]
"#,
        ws_backend.addr
    ))
    .await;
    let capped = p.addrs[1];
    let (mut ws, resp) = tokio_tungstenite::client_async(
        "ws://h/gateway",
        TcpStream::connect(capped).await.unwrap(),
    )
    .await
    .expect("websocket handshake through keyway");
    assert_eq!(resp.status(), 101);
    ws.send("hello".into()).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().to_text().unwrap(),
        "psm:hello"
    );

    // The tunnel holds the backend's only slot...
    let r = get(p.addr, "h", "/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("backend-busy"), "{}", r.body);
    // ...and its listener's only connection.
    let mut second = TcpStream::connect(capped).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(early.is_err(), "served while the tunnel is open: {early:?}");

    ws.close(None).await.unwrap();
    drop(ws);
    let mut head = [0u8; 12];
    tokio::time::timeout(SOON, second.read_exact(&mut head))
        .await
        .expect("served once the tunnel closed")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

#[tokio::test]
async fn clients_leaving_mid_response_do_not_count_and_free_the_slot() {
    let a = GateBackend::start("a").await;
    let b = GateBackend::start("b").await;
    let p = Proxy::start(&one_cluster(
        "leaving",
        &format!(
            r#"outlier = {{ consecutive_failures = 2 }}
backends = [{{ id = "a", address = "{}", max_connections = 1 }}, {{ id = "b", address = "{}", max_connections = 1 }}]"#,
            a.addr, b.addr
        ),
    ))
    .await;
    for _ in 0..6 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"first\r\n") {
            let n = tokio::time::timeout(SOON, s.read(&mut buf))
                .await
                .expect("the first chunk")
                .unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        drop(s);
    }
    for id in ["a", "b"] {
        eventually(SOON, "the streams' slots are free again", || async {
            backend_status(p.admin.unwrap(), "leaving", id).await["in_flight"] == 0
        })
        .await;
        let s = backend_status(p.admin.unwrap(), "leaving", id).await;
        assert!(s["last_error"].is_null(), "{s}");
    }
    let m = metrics(&p).await;
    assert_eq!(ejections(&m, "leaving", "a"), 0.0, "{m}");
    assert_eq!(ejections(&m, "leaving", "b"), 0.0, "{m}");
    // Each backend has its one slot back.
    for _ in 0..2 {
        assert_eq!(get(p.addr, "h", "/").await.status, 200);
    }
}

#[tokio::test]
async fn a_reload_raises_the_listener_cap_without_a_restart() {
    let b = GateBackend::start("lone").await;
    let config = |cap: u32| {
        format!(
            r#"[admin]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
max_connections = {cap}
[[route]]
cluster = "c"
[cluster.c]
backends = [{{ id = "lone", address = "{}" }}]
"#,
            b.addr
        )
    };
    let file = unique_dir("limits-reload").join("keyway.toml");
    let p = Proxy::start_file(&file, &config(1)).await;
    let mut one = TcpStream::connect(p.addr).await.unwrap();
    assert!(get_on(&mut one, SOON).await);
    let reached = format!(
        "keyway_listener_limit_reached_total{{listener=\"{}\"}}",
        p.addr
    );
    eventually(SOON, "the listener is at its cap", || async {
        metric(&metrics(&p).await, &reached) >= 1.0
    })
    .await;

    std::fs::write(&file, config(2)).unwrap();
    p.server().reload().expect("reload");
    // The open connection stays, and a second one is now served beside it.
    let mut two = TcpStream::connect(p.addr).await.unwrap();
    assert!(
        get_on(&mut two, SOON).await,
        "served after the cap was raised"
    );
    assert!(get_on(&mut one, SOON).await);
}

#[tokio::test]
async fn a_balanced_cluster_prefers_a_backend_with_a_free_slot() {
    let a = GateBackend::start("a").await;
    let b = GateBackend::start("b").await;
    a.hold();
    let p = Proxy::start(&one_cluster(
        "prefer",
        &format!(
            r#"queue_timeout = "60s"
backends = [{{ id = "a", address = "{}", max_connections = 1 }}, {{ id = "b", address = "{}" }}]"#,
            a.addr, b.addr
        ),
    ))
    .await;
    let addr = p.addr;
    let mut first = tokio::spawn(async move { get(addr, "h", "/").await });
    eventually(SOON, "the first request reached a backend", || async {
        a.started() + b.started() >= 1
    })
    .await;
    if a.started() == 0 {
        // Round-robin's cursor starts at a random backend: it began at b, so the next
        // request goes to a.
        assert_eq!(first.await.unwrap().headers["x-backend"], "b");
        first = tokio::spawn(async move { get(addr, "h", "/").await });
    }
    eventually(SOON, "a's only slot is taken", || async {
        a.started() == 1
    })
    .await;
    // Round-robin would queue every other request behind a's slot for up to a minute.
    for _ in 0..4 {
        let r = tokio::time::timeout(Duration::from_secs(5), get(p.addr, "h", "/"))
            .await
            .expect("answered without queueing");
        assert_eq!(r.headers["x-backend"], "b");
    }
    a.release(1);
    assert_eq!(first.await.unwrap().headers["x-backend"], "a");
}
