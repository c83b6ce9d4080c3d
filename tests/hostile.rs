//! Hostile clients speaking raw bytes: the front door answers, and the recording backend
//! receives exactly the requests keyway answered, in their normal form.
//!
//! Every probe goes over a raw TCP socket (no client library tidies the bytes), and every
//! test checks both sides: what the client was answered and what reached a backend. The
//! farm is a `primary-replica` PAM360-style cluster (case-sensitive) and an IIS-style
//! PVWA cluster (case-insensitive), each with a primary and a replica, so a request that
//! slips past classification shows up at a replica.

use std::time::Duration;

use keyway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Farm {
    pam_primary: TestBackend,
    pam_replica: TestBackend,
    pvwa_primary: TestBackend,
    pvwa_replica: TestBackend,
    proxy: Proxy,
}

impl Farm {
    async fn start(listener_extra: &str) -> Farm {
        let pam_primary = TestBackend::start("pam-primary").await;
        let pam_replica = TestBackend::start("pam-replica").await;
        let pvwa_primary = TestBackend::start("pvwa-primary").await;
        let pvwa_replica = TestBackend::start("pvwa-replica").await;
        let cfg = format!(
            r#"
[[listener]]
listen = "127.0.0.1:0"
{listener_extra}
[[route]]
host = "pam.test"
cluster = "pam"
[[route]]
host = "pvwa.test"
path = "/PasswordVault"
cluster = "pvwa"

[cluster.pam]
strategy = "primary-replica"
write_routes = ["GET /api/Admin/**"]
retries = 0
backends = [
  {{ id = "p", address = "{}", role = "primary" }},
  {{ id = "r", address = "{}", role = "replica" }},
]

[cluster.pvwa]
strategy = "primary-replica"
paths = "case-insensitive"
write_routes = ["GET /PasswordVault/api/Admin/**"]
retries = 0
backends = [
  {{ id = "p", address = "{}", role = "primary" }},
  {{ id = "r", address = "{}", role = "replica" }},
]
"#,
            pam_primary.addr, pam_replica.addr, pvwa_primary.addr, pvwa_replica.addr
        );
        let proxy = Proxy::start(&cfg).await;
        Farm {
            pam_primary,
            pam_replica,
            pvwa_primary,
            pvwa_replica,
            proxy,
        }
    }

    /// Requests the backends parsed, all four together.
    fn forwarded(&self) -> usize {
        self.pam_primary.hits()
            + self.pam_replica.hits()
            + self.pvwa_primary.hits()
            + self.pvwa_replica.hits()
    }

    /// Sends raw bytes on a fresh connection, reads until keyway closes it (every probe
    /// ends with `Connection: close` or is refused) and returns each response's status.
    async fn raw(&self, bytes: &[u8]) -> Vec<u16> {
        let mut s = tokio::net::TcpStream::connect(self.proxy.addr)
            .await
            .expect("connect");
        s.write_all(bytes).await.expect("write");
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "keyway did not close the connection");
        statuses(&buf)
    }
}

/// The status of every response in a byte stream, framed by `Content-Length` (keyway
/// answers these probes with sized bodies).
fn statuses(mut buf: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let Some(status) = head
            .strip_prefix("http/1.1 ")
            .and_then(|r| r.get(..3)?.parse().ok())
        else {
            break;
        };
        out.push(status);
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        buf = buf.get(end + 4 + len..).unwrap_or(&[]);
    }
    out
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn a_repeated_or_missing_host_is_refused() {
    let f = Farm::start("").await;
    for probe in [
        "GET / HTTP/1.1\r\nHost: pam.test\r\nHost: pvwa.test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: pam.test\r\nhost: pam.test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: pam.test, pvwa.test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@pam.test\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: pam.test:99999\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
    ] {
        assert_eq!(f.raw(probe.as_bytes()).await, [400], "{probe:?}");
    }
    assert_eq!(f.forwarded(), 0, "nothing reached a backend");
}

#[tokio::test]
async fn an_absolute_target_s_authority_is_the_one_routed_and_forwarded() {
    let f = Farm::start("").await;
    let probe =
        "GET http://pam.test/api/x?y=1 HTTP/1.1\r\nHost: pvwa.test\r\nConnection: close\r\n\r\n";
    assert_eq!(f.raw(probe.as_bytes()).await, [200]);
    assert_eq!(f.pvwa_primary.hits() + f.pvwa_replica.hits(), 0);
    let seen = f.pam_replica.seen();
    assert_eq!(seen.len(), 1, "a GET is a read: the replica serves it");
    assert_eq!(
        seen[0].headers["host"], "pam.test",
        "one Host: the target's"
    );
    assert_eq!(
        seen[0].path, "/api/x?y=1",
        "origin form reaches the backend"
    );
    assert_eq!(seen[0].headers["x-forwarded-host"], "pam.test");
    // Not http(s): refused.
    let probe = "GET ftp://pam.test/x HTTP/1.1\r\nHost: pam.test\r\nConnection: close\r\n\r\n";
    assert_eq!(f.raw(probe.as_bytes()).await, [400]);
    assert_eq!(f.forwarded(), 1);
}

#[tokio::test]
async fn connect_and_trace_are_never_forwarded() {
    let f = Farm::start("").await;
    let connect =
        "CONNECT pam.test:443 HTTP/1.1\r\nHost: pam.test:443\r\nConnection: close\r\n\r\n";
    assert_eq!(f.raw(connect.as_bytes()).await, [405]);
    let trace = "TRACE / HTTP/1.1\r\nHost: pam.test\r\nConnection: close\r\n\r\n";
    assert_eq!(f.raw(trace.as_bytes()).await, [405]);
    assert_eq!(f.forwarded(), 0);

    // A listener that allows TRACE forwards it (a write by method: the primary).
    let f = Farm::start("allow_trace = true").await;
    assert_eq!(f.raw(trace.as_bytes()).await, [200]);
    assert_eq!(f.pam_primary.hits(), 1);
    assert_eq!(f.raw(connect.as_bytes()).await, [405], "CONNECT never");
}

#[tokio::test]
async fn h2c_and_unknown_upgrades_are_served_as_plain_http() {
    let f = Farm::start("").await;
    for upgrade in ["h2c", "foo/1", "h2c, tls/1.3"] {
        let probe = format!(
            "GET /api/Admin/x HTTP/1.1\r\nHost: pam.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        // A plain answer: no 101, no tunnel.
        assert_eq!(f.raw(probe.as_bytes()).await, [200], "{upgrade}");
        assert_eq!(f.raw(&get("pam.test", "/after")).await, [200]);
    }
    let writes = f.pam_primary.seen();
    assert_eq!(
        writes.len(),
        3,
        "the write route went to the primary each time"
    );
    for s in &writes {
        for gone in ["upgrade", "http2-settings", "connection"] {
            assert!(!s.headers.contains_key(gone), "{gone} forwarded: {s:?}");
        }
    }
    assert_eq!(f.pam_replica.hits(), 3, "the plain GETs after each");
}

#[tokio::test]
async fn encoded_paths_cannot_turn_a_write_into_a_read() {
    let f = Farm::start("").await;
    // Each is `GET /api/Admin/users` to a backend that decodes and resolves the path.
    for path in [
        "/api/Admin/users",
        "/api/./Admin/users",
        "/api//Admin/users",
        "/api/x/../Admin/users",
        "/api/%41dmin/users",
        "/api/Adm%69n/users",
        "/%61pi/Admin/./users",
        "/api/Admin;jsessionid=1/users",
        "/api/Admin/x/%2e%2e/users",
    ] {
        assert_eq!(f.raw(&get("pam.test", path)).await, [200], "{path}");
    }
    assert_eq!(f.pam_replica.hits(), 0, "a write reached the replica");
    let seen: Vec<String> = f.pam_primary.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen.len(), 9);
    for (path, expect) in seen.iter().zip([
        "/api/Admin/users",
        "/api/Admin/users",
        "/api/Admin/users",
        "/api/Admin/users",
        "/api/Admin/users",
        "/api/Admin/users",
        "/api/Admin/users",
        "/api/Admin;jsessionid=1/users",
        "/api/Admin/users",
    ]) {
        assert_eq!(path, expect, "the backend receives the normal form");
    }
}

#[tokio::test]
async fn case_insensitive_backends_match_without_case() {
    let f = Farm::start("").await;
    for path in [
        "/PasswordVault/api/Admin/x",
        "/passwordvault/API/admin/x",
        "/PASSWORDVAULT/api/%61dmin/x",
    ] {
        assert_eq!(f.raw(&get("pvwa.test", path)).await, [200], "{path}");
    }
    assert_eq!(
        f.pvwa_replica.hits(),
        0,
        "IIS serves these as the write route"
    );
    assert_eq!(f.pvwa_primary.hits(), 3);
    // The PAM360-style cluster is case-sensitive: another case is another resource.
    assert_eq!(f.raw(&get("pam.test", "/api/admin/x")).await, [200]);
    assert_eq!(f.pam_replica.hits(), 1);
}

#[tokio::test]
async fn dangerous_paths_are_refused() {
    let f = Farm::start("").await;
    for path in [
        "/api%2fAdmin/users",
        "/api/Admin%2Fusers",
        "/api%5cAdmin",
        "/api\\Admin",
        "/api/%00",
        "/api/%0d%0aX-Injected:%201",
        "/api/x/..;/Admin/users",
        "/api/%2e%2e;/Admin",
        "/api/%zz",
        "/api/%u0041dmin",
    ] {
        let got = f.raw(&get("pam.test", path)).await;
        // hyper refuses some bytes itself (400 before keyway sees the request).
        assert_eq!(got, [400], "{path}");
    }
    assert_eq!(f.forwarded(), 0);

    // A listener that allows encoded slashes forwards them, still encoded.
    let f = Farm::start("allow_encoded_slashes = true").await;
    assert_eq!(f.raw(&get("pam.test", "/api/a%2fb")).await, [200]);
    assert_eq!(f.pam_replica.seen()[0].path, "/api/a%2Fb");
    assert_eq!(f.raw(&get("pam.test", "/api%5cb")).await, [400], "not \\");
}

#[tokio::test]
async fn smuggling_probes_reach_no_backend() {
    let f = Farm::start("").await;
    let probes: [&[u8]; 6] = [
        // CL + TE
        b"POST /api/x HTTP/1.1\r\nHost: pam.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: pam.test\r\n\r\n",
        // obfuscated TE
        b"POST /api/x HTTP/1.1\r\nHost: pam.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: pam.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        // conflicting CL
        b"POST /api/x HTTP/1.1\r\nHost: pam.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        // obs-fold
        b"GET /api/x HTTP/1.1\r\nHost: pam.test\r\nX-A: a\r\n b\r\n\r\n",
        // chunk-size overflow
        b"POST /api/x HTTP/1.1\r\nHost: pam.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
    ];
    // CL + TE: hyper lets Transfer-Encoding win, drops Content-Length and closes the
    // connection after answering (RFC 9112 §6.1), so the smuggled request is never read
    // and the backend receives one unambiguous, chunked-framed request.
    let (cl_te, rest) = probes.split_first().unwrap();
    assert_eq!(f.raw(cl_te).await, [200]);
    let seen = f.pam_primary.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].path.as_str(), seen[0].body_len), ("/api/x", 0));
    assert!(!seen[0].headers.contains_key("content-length"), "{seen:?}");
    // The others are 400 (docs/security.md, "Framing"): exactly one answer, then the
    // connection is closed, so nothing after the bad head is read as a request.
    for p in rest {
        let got = f.raw(p).await;
        assert_eq!(got, [400], "{:?}", String::from_utf8_lossy(p));
    }
    assert_eq!(f.forwarded(), 1);
    assert_eq!(
        f.pam_primary.heads() + f.pam_replica.heads(),
        1,
        "not even the head of a refused probe reached a backend"
    );
    let reached: Vec<String> = [&f.pam_primary, &f.pam_replica]
        .iter()
        .flat_map(|b| b.seen())
        .map(|s| s.path)
        .collect();
    assert!(
        !reached.iter().any(|p| p.contains("smuggled")),
        "{reached:?}"
    );
}

/// One keep-alive connection carrying good and bad requests: the backends parse exactly
/// the ones keyway answered 200, and the bad ones do not end the connection's service.
#[tokio::test]
async fn the_backends_parse_exactly_the_requests_keyway_answered() {
    let f = Farm::start("").await;
    let stream = concat!(
        "GET /api/one HTTP/1.1\r\nHost: pam.test\r\n\r\n",
        "GET /api/two HTTP/1.1\r\nHost: pam.test\r\nHost: evil.test\r\n\r\n",
        "GET /api/%2e%2e/%2e%2e/three HTTP/1.1\r\nHost: pam.test\r\n\r\n",
        "GET /api/a%2fb HTTP/1.1\r\nHost: pam.test\r\n\r\n",
        "POST /api/Admin/four HTTP/1.1\r\nHost: pam.test\r\nContent-Length: 3\r\n\r\nabc",
        "GET /api/Admin/./five HTTP/1.1\r\nHost: pam.test\r\nConnection: close\r\n\r\n",
    );
    let got = f.raw(stream.as_bytes()).await;
    assert_eq!(got, [200, 400, 200, 400, 200, 200]);
    let ok = got.iter().filter(|&&s| s == 200).count();
    assert_eq!(f.forwarded(), ok);
    let paths = |b: &TestBackend| b.seen().into_iter().map(|s| s.path).collect::<Vec<_>>();
    assert_eq!(paths(&f.pam_replica), ["/api/one", "/three"]);
    assert_eq!(
        paths(&f.pam_primary),
        ["/api/Admin/four", "/api/Admin/five"]
    );
    assert_eq!(f.pam_primary.seen()[0].body_len, 3);
}

/// A client cannot choose the address that lands in the backend's audit trail.
#[tokio::test]
async fn forged_client_identity_is_replaced() {
    let f = Farm::start("forwarded = true").await;
    let probe = concat!(
        "GET /api/x HTTP/1.1\r\nHost: pam.test\r\n",
        "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n",
        "X-Real-IP: 10.0.0.3\r\nForwarded: for=10.0.0.4\r\n",
        "X-Forwarded-Host: admin.test\r\nX-Forwarded-Proto: https\r\n",
        "keyway-epoch: 999\r\nkeyway_epoch: 998\r\n",
        "X_Forwarded_For: 10.0.0.5\r\nX-Real_IP: 10.0.0.6\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(f.raw(probe.as_bytes()).await, [200]);
    let h = &f.pam_replica.seen()[0].headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "pam.test");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"pam.test\"");
    assert!(!h.contains_key("x-real-ip"));
    assert!(
        !h.contains_key("keyway-epoch"),
        "clients cannot supply an epoch"
    );
    for lookalike in ["keyway_epoch", "x_forwarded_for", "x-real_ip"] {
        assert!(
            !h.contains_key(lookalike),
            "{lookalike} reached the backend"
        );
    }
}

/// HTTP/2: `:authority` is the host; a `host` header that disagrees is refused, and the
/// path is normalised as on HTTP/1.1.
#[tokio::test]
async fn http2_authority_and_host_must_agree() {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let f = Farm::start("").await;
    let stream = tokio::net::TcpStream::connect(f.proxy.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut send = |uri: &str, host: Option<&str>| {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        let req = b.body(Full::new(bytes::Bytes::new())).unwrap();
        let fut = tx.send_request(req);
        async move { fut.await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    assert_eq!(
        send("http://pam.test/api/Admin/./x", Some("pvwa.test")).await,
        400
    );
    assert_eq!(
        send("http://pam.test/api//Admin/x", Some("PAM.test")).await,
        200
    );
    assert_eq!(send("http://pam.test/api/%41dmin/y", None).await, 200);
    assert_eq!(f.pam_replica.hits(), 0, "writes stayed on the primary");
    let seen: Vec<String> = f.pam_primary.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, ["/api/Admin/x", "/api/Admin/y"]);
    assert_eq!(f.pam_primary.seen()[0].headers["host"], "pam.test");
}
