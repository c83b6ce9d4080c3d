//! Listeners behind an L4 balancer: a PROXY protocol v1 or v2 header names the client,
//! and keyway forwards that address in X-Forwarded-For; a connection without a valid
//! header is closed before anything reaches a backend.

use std::net::SocketAddr;
use std::time::Duration;

use keyway_proxy::proxy_protocol::{encode_v1, encode_v2, Header};
use keyway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(mode: &str) -> (TestBackend, Proxy) {
    let backend = TestBackend::start("a").await;
    let listener = format!("proxy_protocol = \"{mode}\"\nheader_read_timeout = \"2s\"");
    let proxy = Proxy::start(&one_backend(&listener, backend.addr)).await;
    (backend, proxy)
}

/// Sends `header` then one HTTP/1.1 request on the same connection; returns what came
/// back (empty when keyway closed the connection).
async fn raw(addr: SocketAddr, header: &[u8], path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: pvwa.corp.test\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    // keyway may close before reading everything; that is an answer too.
    let _ = s.write_all(&bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("keyway neither answered nor closed within 5 s");
    String::from_utf8_lossy(&out).into_owned()
}

fn forwarded_for(backend: &TestBackend, path: &str) -> String {
    let seen = backend.seen();
    let s = seen
        .iter()
        .find(|s| s.path == path)
        .unwrap_or_else(|| panic!("{path} did not reach the backend"));
    s.headers["x-forwarded-for"].clone()
}

#[tokio::test]
async fn v1_and_v2_headers_name_the_client() {
    let (backend, proxy) = start("v1-or-v2").await;
    let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 443\r\n";
    assert!(raw(proxy.addr, v1, "/v1").await.starts_with("HTTP/1.1 200"));
    assert_eq!(forwarded_for(&backend, "/v1"), "192.0.2.7");

    let v2 = encode_v2(&Header::Proxy {
        source: "[2001:db8::42]:40000".parse().unwrap(),
        destination: "[2001:db8::1]:443".parse().unwrap(),
    });
    assert!(raw(proxy.addr, &v2, "/v2")
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(forwarded_for(&backend, "/v2"), "2001:db8::42");

    // LOCAL (the balancer's health check) keeps the socket's address.
    let local = encode_v2(&Header::Local);
    assert!(raw(proxy.addr, &local, "/local")
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(forwarded_for(&backend, "/local"), "127.0.0.1");
}

#[tokio::test]
async fn a_missing_or_garbage_header_closes_the_connection() {
    let (backend, proxy) = start("v1-or-v2").await;
    for garbage in [
        &b""[..],
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n",
        b"PROXY TCP4 999.0.2.7 10.0.0.1 1 2\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x22\x11\x00\x0c",
        b"\x16\x03\x01\x02\x00",
    ] {
        let got = raw(proxy.addr, garbage, "/garbage").await;
        assert_eq!(got, "", "answered after {garbage:?}");
    }
    assert_eq!(
        backend.hits(),
        0,
        "a request without a valid header got through"
    );
    // A header keyway accepts, but of a version the listener does not take.
    let (backend, proxy) = start("v2").await;
    let v1 = encode_v1(&Header::Proxy {
        source: "192.0.2.7:1".parse().unwrap(),
        destination: "10.0.0.1:2".parse().unwrap(),
    });
    assert_eq!(raw(proxy.addr, &v1, "/v1").await, "");
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn a_client_that_sends_no_header_is_closed_after_header_read_timeout() {
    let (backend, proxy) = start("v1").await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"PROXY TCP4 192.0.2.7").await.expect("write");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("not closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn off_by_default_so_a_header_is_just_a_bad_request() {
    let backend = TestBackend::start("a").await;
    let proxy = Proxy::start(&one_cluster(
        "pvwa",
        &format!(
            "backends = [{{ id = \"a\", address = \"{}\" }}]",
            backend.addr
        ),
    ))
    .await;
    let got = raw(proxy.addr, b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r\n", "/x").await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(backend.hits(), 0);
}
