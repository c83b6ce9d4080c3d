//! TCP listeners with real loopback servers: ordered fallback past refused, black-holed
//! and silent backends (the client's bytes arrive exactly once), client-IP affinity,
//! half-close, a 100 MB transfer each way, the PROXY header a backend receives, SNI
//! passthrough, TLS termination, reload with open connections, idle timeout,
//! max_connections, an HTTP health check on another port, and config errors.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyway_proxy::proxy_protocol::{self, Accept, Header};
use keyway_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

// === test backends ===

/// How a test backend behaves on each connection.
#[derive(Clone)]
enum Behaviour {
    /// Sends `hello from NAME\n`, then echoes what it receives.
    Greet(String),
    /// Like `Greet`, but only after a delay.
    GreetLate(String, Duration),
    /// Reads and records, never writes (the wrong service on the port).
    Silent,
    /// Reads the client's bytes to their end, then answers with their count and closes.
    CountThenAnswer,
    /// Sends `bye\n` and shuts its sending side at once, then keeps reading.
    HalfCloseFirst,
    /// Reads a PROXY v2 header, then greets with what it said and echoes.
    ProxyV2,
    /// Sends `size` bytes while it reads everything, then reports the count read.
    Bulk(u64),
    /// TLS with this server config, then sends NAME and echoes.
    Tls(String, Arc<rustls::ServerConfig>),
}

/// A test backend: what each connection received, in arrival order.
struct Server {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    accept: JoinHandle<()>,
    behaviour: Behaviour,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Self {
        Self::start_on(free_port(), behaviour).await
    }

    async fn start_on(addr: SocketAddr, behaviour: Behaviour) -> Self {
        let sock = TcpListener::bind(addr).await.expect("bind test backend");
        let addr = sock.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (rec, b) = (received.clone(), behaviour.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = sock.accept().await else {
                    continue;
                };
                let slot = {
                    let mut r = rec.lock().unwrap();
                    r.push(Vec::new());
                    r.len() - 1
                };
                tokio::spawn(serve(s, b.clone(), rec.clone(), slot));
            }
        });
        Server {
            addr,
            received,
            accept,
            behaviour,
        }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Stops listening: new connections are refused.
    fn stop(&self) {
        self.accept.abort();
    }

    /// Listens again on the same address.
    async fn restart(&self) -> Server {
        // The aborted accept task drops its socket once it is polled again.
        for _ in 0..50 {
            if TcpListener::bind(self.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Server::start_on(self.addr, self.behaviour.clone()).await
    }
}

async fn serve(mut s: TcpStream, b: Behaviour, rec: Arc<Mutex<Vec<Vec<u8>>>>, slot: usize) {
    let record = |bytes: &[u8]| rec.lock().unwrap()[slot].extend_from_slice(bytes);
    let mut buf = vec![0u8; 64 * 1024];
    match b {
        Behaviour::Greet(name) => {
            let _ = s.write_all(format!("hello from {name}\n").as_bytes()).await;
            echo(&mut s, &mut buf, record).await;
        }
        Behaviour::GreetLate(name, delay) => {
            tokio::time::sleep(delay).await;
            let _ = s.write_all(format!("hello from {name}\n").as_bytes()).await;
            echo(&mut s, &mut buf, record).await;
        }
        Behaviour::Silent => {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                record(&buf[..n]);
            }
        }
        Behaviour::CountThenAnswer => {
            let mut total = 0;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                record(&buf[..n]);
                total += n;
            }
            let _ = s.write_all(format!("got {total} bytes\n").as_bytes()).await;
        }
        Behaviour::HalfCloseFirst => {
            let _ = s.write_all(b"bye\n").await;
            let _ = s.shutdown().await;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                record(&buf[..n]);
            }
        }
        Behaviour::ProxyV2 => {
            let h = proxy_protocol::read_header(&mut s, Accept::V2, Duration::from_secs(5)).await;
            let _ = s.write_all(format!("{h:?}\n").as_bytes()).await;
            echo(&mut s, &mut buf, record).await;
        }
        Behaviour::Bulk(size) => {
            let _ = s.write_all(b"ready\n").await;
            let (mut r, mut w) = s.split();
            let send = async {
                let chunk = vec![7u8; 64 * 1024];
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    w.write_all(&chunk[..n]).await?;
                    left -= n as u64;
                }
                w.shutdown().await
            };
            let count = async {
                let mut total = 0u64;
                loop {
                    let n = r.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<u64, std::io::Error>(total);
                    }
                    total += n as u64;
                }
            };
            if let (Ok(()), Ok(total)) = tokio::join!(send, count) {
                record(total.to_string().as_bytes());
            }
        }
        Behaviour::Tls(name, cfg) => {
            let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await else {
                return;
            };
            let _ = tls.write_all(format!("{name}\n").as_bytes()).await;
            echo(&mut tls, &mut buf, record).await;
        }
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    record: impl Fn(&[u8]),
) {
    while let Ok(n) = s.read(buf).await {
        if n == 0 {
            break;
        }
        record(&buf[..n]);
        if s.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// An address whose connects neither succeed nor fail: a listener whose accept queue
/// is full, so the kernel drops further SYNs.
async fn black_hole() -> (SocketAddr, Vec<TcpStream>, TcpListener) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    let mut held = Vec::new();
    while held.len() < 16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    (addr, held, l)
}

// === clients ===

/// Connects to `addr` from the loopback address `from` (127.0.0.x).
async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    sock.connect(addr).await.expect("connect to keyway")
}

/// Reads until `needle` has been seen; returns everything read.
async fn read_until<S: AsyncRead + Unpin>(s: &mut S, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = s.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {needle:?}; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no {needle:?} within 10 s; got {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// One line, read a byte at a time so nothing after it is consumed; `None` when the
/// connection ends or fails first.
async fn try_line<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut byte).await {
                Ok(1) if byte[0] == b'\n' => return true,
                Ok(1) => line.push(byte[0]),
                _ => return false,
            }
        }
    })
    .await;
    matches!(read, Ok(true)).then(|| String::from_utf8_lossy(&line).into_owned())
}

/// The greeting's backend name.
async fn greeted_by<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let line = try_line(s).await.expect("a greeting line");
    line.strip_prefix("hello from ")
        .unwrap_or_else(|| panic!("not a greeting: {line:?}"))
        .to_string()
}

/// Who greets a new connection to `addr`, if anyone does.
async fn greeting(addr: SocketAddr) -> Option<String> {
    let mut c = TcpStream::connect(addr).await.ok()?;
    try_line(&mut c)
        .await
        .and_then(|l| l.strip_prefix("hello from ").map(String::from))
}

fn tcp_config(listener: &str, clusters: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\n{listener}\n{clusters}\n"
    )
}

async fn metrics_page(proxy: &Proxy) -> String {
    admin_get(proxy.admin.expect("admin"), "/metrics").await
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// === ordered fallback ===

#[tokio::test]
async fn ordered_fallback_passes_a_refused_and_a_silent_backend_and_delivers_bytes_once() {
    let refused = refused_addr().await;
    let silent = Server::start(Behaviour::Silent).await;
    let vault = Server::start(Behaviour::Greet("vault-c".into())).await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"vault\"",
        &format!(
            "[cluster.vault]\nstrategy = \"ordered\"\nconnect_stagger = \"10s\"\nprotocol_timeout = \"400ms\"\nbackends = [\n  {{ id = \"vault-a\", address = \"{refused}\", priority = 0 }},\n  {{ id = \"vault-b\", address = \"{}\", priority = 1 }},\n  {{ id = \"vault-c\", address = \"{}\", priority = 2 }},\n]\n",
            silent.addr, vault.addr
        ),
    ))
    .await;
    let started = Instant::now();
    let mut c = TcpStream::connect(proxy.server().tcp_addrs()[0])
        .await
        .unwrap();
    // Bytes before any backend is up, spread over the silent backend's attempt...
    c.write_all(b"one,").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.write_all(b"two,").await.unwrap();
    assert_eq!(greeted_by(&mut c).await, "vault-c");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(380) && waited < Duration::from_secs(3),
        "the silent backend is abandoned at protocol_timeout: {waited:?}"
    );
    // ...and after.
    c.write_all(b"three").await.unwrap();
    read_until(&mut c, "one,two,three").await;
    assert_eq!(
        vault.received(),
        vec![b"one,two,three".to_vec()],
        "each byte exactly once"
    );
    let seen_by_silent = silent.received().concat();
    assert!(
        b"one,two,".starts_with(&seen_by_silent),
        "the abandoned backend saw only early bytes: {:?}",
        String::from_utf8_lossy(&seen_by_silent)
    );
    let page = metrics_page(&proxy).await;
    assert_eq!(
        sample(
            &page,
            "keyway_tcp_protocol_timeouts_total",
            &["cluster=\"vault\"", "backend=\"vault-b\""]
        ),
        1.0
    );
    assert!(
        sample(
            &page,
            "keyway_upstream_connect_errors_total",
            &["cluster=\"vault\"", "backend=\"vault-a\""]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &page,
            "keyway_tcp_connections_open",
            &["cluster=\"vault\"", "backend=\"vault-c\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn only_a_silence_the_client_cannot_have_caused_ejects_a_backend() {
    let silent = Server::start(Behaviour::Silent).await;
    let vault = Server::start(Behaviour::Greet("vault-b".into())).await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"quiet\"",
        &format!(
            "[cluster.quiet]\nstrategy = \"ordered\"\nprotocol_timeout = \"200ms\"\noutlier = {{ consecutive_failures = 2, base_ejection = \"1h\" }}\nbackends = [\n  {{ id = \"vault-a\", address = \"{}\", priority = 0 }},\n  {{ id = \"vault-b\", address = \"{}\", priority = 1 }},\n]\n",
            silent.addr, vault.addr
        ),
    ))
    .await;
    let (addr, admin) = (proxy.server().tcp_addrs()[0], proxy.admin.unwrap());
    let ejected = || async move {
        !backend_status(admin, "quiet", "vault-a").await["health"]["ejected_for_ms"].is_null()
    };
    // A client whose bytes the backend may be waiting on: its silence is nobody's fault.
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"partial request").await.unwrap();
        assert_eq!(greeted_by(&mut c).await, "vault-b");
    }
    assert!(
        !ejected().await,
        "a client's bytes cannot get vault-a ejected: {}",
        backend_status(admin, "quiet", "vault-a").await
    );
    assert_eq!(
        backend_status(admin, "quiet", "vault-a").await["connect_errors"],
        0
    );
    // Silence before any client byte is the backend's own: two in a row eject it.
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(greeted_by(&mut c).await, "vault-b");
    }
    assert!(ejected().await, "vault-a ejected after two silent attempts");
    let started = Instant::now();
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(greeted_by(&mut c).await, "vault-b");
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "the ejected backend is skipped"
    );
}

#[tokio::test]
async fn the_stagger_adds_the_next_backend_while_a_black_hole_is_pending() {
    let (hole, _held, _l) = black_hole().await;
    let log = Server::start(Behaviour::GreetLate(
        "log-b".into(),
        Duration::from_millis(50),
    ))
    .await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"logs\"",
        &format!(
            "[cluster.logs]\nstrategy = \"ordered\"\nconnect_stagger = \"200ms\"\nprotocol_timeout = \"5s\"\nconnect_timeout = \"5s\"\nbackends = [\n  {{ id = \"log-a\", address = \"{hole}\", priority = 0 }},\n  {{ id = \"log-b\", address = \"{}\", priority = 1 }},\n]\n",
            log.addr
        ),
    ))
    .await;
    let started = Instant::now();
    let mut c = TcpStream::connect(proxy.server().tcp_addrs()[0])
        .await
        .unwrap();
    c.write_all(b"early").await.unwrap();
    assert_eq!(greeted_by(&mut c).await, "log-b");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "log-b joined after the stagger, not after the connect timeout: {waited:?}"
    );
    c.write_all(b"-late").await.unwrap();
    read_until(&mut c, "early-late").await;
    assert_eq!(log.received(), vec![b"early-late".to_vec()]);
    let page = metrics_page(&proxy).await;
    assert_eq!(
        sample(
            &page,
            "keyway_tcp_stagger_handoffs_total",
            &["cluster=\"logs\""]
        ),
        1.0
    );
    // Bytes moved while log-b was being established count too.
    drop(c);
    eventually(
        Duration::from_secs(5),
        "the up bytes are counted",
        || async {
            let page = metrics_page(&proxy).await;
            sample(
                &page,
                "keyway_tcp_bytes_total",
                &["cluster=\"logs\"", "direction=\"up\""],
            ) == 10.0
        },
    )
    .await;
}

// === affinity ===

/// Three greeting PSM servers behind a TCP listener with client-IP affinity.
async fn psm_farm() -> (Vec<Server>, Proxy) {
    let psm: Vec<Server> = futures_util::future::join_all(
        ["psm-1", "psm-2", "psm-3"].map(|n| Server::start(Behaviour::Greet(n.into()))),
    )
    .await;
    let backends: Vec<String> = psm
        .iter()
        .enumerate()
        .map(|(i, s)| format!("{{ id = \"psm-{}\", address = \"{}\" }}", i + 1, s.addr))
        .collect();
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"psm\"",
        &format!(
            "[cluster.psm]\nbalance = \"least-connections\"\naffinity = \"client-ip\"\nbackends = [{}]\n",
            backends.join(", ")
        ),
    ))
    .await;
    (psm, proxy)
}

#[tokio::test]
async fn client_ip_affinity_is_stable_spreads_and_re_pins_on_a_dead_server() {
    let (psm, proxy) = psm_farm().await;
    let addr = proxy.server().tcp_addrs()[0];
    let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
    let home_of = |n: u8| async move {
        let mut c = connect_from(ip(n), addr).await;
        greeted_by(&mut c).await
    };
    let home = home_of(1).await;
    for _ in 0..100 {
        assert_eq!(home_of(1).await, home, "one client, one server");
    }
    let mut homes = std::collections::BTreeMap::new();
    for n in 2..=40 {
        homes.insert(n, home_of(n).await);
    }
    let distinct: std::collections::BTreeSet<_> = homes.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "39 clients spread over the farm: {homes:?}"
    );

    // Its server dies: the client moves at once; nobody else moves.
    let dead = psm
        .iter()
        .position(|s| matches!(&s.behaviour, Behaviour::Greet(n) if *n == home))
        .unwrap();
    psm[dead].stop();
    let moved = home_of(1).await;
    assert_ne!(moved, home);
    for (&n, h) in homes.iter().filter(|(_, h)| **h != home).take(5) {
        assert_eq!(&home_of(n).await, h, "client 127.0.0.{n} kept its server");
    }
    // It returns: so does the client.
    let _back = psm[dead].restart().await;
    assert_eq!(home_of(1).await, home);
}

#[tokio::test]
async fn a_drained_server_keeps_its_affinity_clients_and_takes_no_new_ones() {
    let (_psm, proxy) = psm_farm().await;
    let (addr, admin) = (proxy.server().tcp_addrs()[0], proxy.admin.unwrap());
    let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
    let mut open = connect_from(ip(1), addr).await;
    let home = greeted_by(&mut open).await;
    // A client that never connected and whose first choice is the same server.
    let farm = [("psm-1", 1), ("psm-2", 1), ("psm-3", 1)];
    let newcomer = (2..=250u8)
        .find(|&n| farm[keyway_proxy::affinity::rank(ip(n), farm)[0]].0 == home)
        .expect("a client that prefers the same server");

    let r = send(
        admin,
        request(
            "POST",
            "admin",
            &format!("/clusters/psm/backends/{home}/drain"),
            "",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut c = connect_from(ip(newcomer), addr).await;
    assert_ne!(
        greeted_by(&mut c).await,
        home,
        "a new client went to the drained server"
    );
    let mut again = connect_from(ip(1), addr).await;
    assert_eq!(
        greeted_by(&mut again).await,
        home,
        "the client with a session there moved"
    );
    // The open connection still carries bytes.
    open.write_all(b"still here\n").await.unwrap();
    read_until(&mut open, "still here").await;
    let d = backend_status(admin, "psm", &home).await["drain"].clone();
    assert_eq!(d["holding_clients"], 1, "{d}");
    assert_eq!(d["in_flight"], 2, "{d}");
}

// === half-close and volume ===

#[tokio::test]
async fn half_close_passes_both_ways() {
    let counter = Server::start(Behaviour::CountThenAnswer).await;
    let closer = Server::start(Behaviour::HalfCloseFirst).await;
    let proxy = Proxy::start(&format!(
        "[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"count\"\n[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"close\"\n[cluster.count]\nprotocol_check = \"none\"\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n[cluster.close]\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n",
        counter.addr, closer.addr
    ))
    .await;
    let addrs = proxy.server().tcp_addrs().to_vec();

    // The client ends its side; the backend still answers on the other.
    let mut c = TcpStream::connect(addrs[0]).await.unwrap();
    c.write_all(b"twelve bytes").await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    assert_eq!(answer, "got 12 bytes\n");

    // The backend ends its side first; the client still sends.
    let mut c = TcpStream::connect(addrs[1]).await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut got))
        .await
        .expect("end of stream in time")
        .unwrap();
    assert_eq!(got, "bye\n");
    c.write_all(b"still here").await.unwrap();
    c.shutdown().await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the backend got the client's bytes",
        || async { closer.received().concat() == b"still here" },
    )
    .await;
}

#[tokio::test]
async fn a_hundred_megabytes_each_way() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let bulk = Server::start(Behaviour::Bulk(SIZE)).await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"bulk\"",
        &format!(
            "[cluster.bulk]\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n",
            bulk.addr
        ),
    ))
    .await;
    let started = Instant::now();
    let down = transfer(proxy.server().tcp_addrs()[0], SIZE).await;
    let took = started.elapsed();
    assert_eq!(down, SIZE + b"ready\n".len() as u64);
    eventually(
        Duration::from_secs(5),
        "the backend counted every byte",
        || async {
            bulk.received()
                .first()
                .is_some_and(|r| r == SIZE.to_string().as_bytes())
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the byte metrics are flushed",
        || async {
            let page = metrics_page(&proxy).await;
            sample(
                &page,
                "keyway_tcp_bytes_total",
                &["cluster=\"bulk\"", "direction=\"up\""],
            ) == SIZE as f64
                && sample(
                    &page,
                    "keyway_tcp_bytes_total",
                    &["cluster=\"bulk\"", "direction=\"down\""],
                ) == (SIZE + 6) as f64
        },
    )
    .await;
    eprintln!("100 MB each way through keyway in {took:?}");
}

/// Sends `size` bytes to `addr` while reading what comes back until the end; returns
/// the count read.
async fn transfer(addr: SocketAddr, size: u64) -> u64 {
    let c = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let send = async {
        let chunk = vec![9u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).await.unwrap();
            left -= n as u64;
        }
        w.shutdown().await.unwrap();
    };
    let receive = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n as u64;
        }
    };
    let ((), down) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send, receive)
    })
    .await
    .expect("the transfer within 60 s");
    down
}

/// The peak resident memory of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn memory_stays_bounded_while_a_hundred_megabytes_pass_each_way() {
    // keyway in its own process, so its memory is its own.
    const SIZE: u64 = 100 * 1024 * 1024;
    let bulk = Server::start(Behaviour::Bulk(SIZE)).await;
    let port = free_port().port();
    let file = unique_dir("tcp-memory").join("keyway.toml");
    std::fs::write(
        &file,
        format!(
            "[proxy]\naccess_log = true\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[tcp_listener]]\nlisten = \"127.0.0.1:{port}\"\ncluster = \"bulk\"\n[cluster.bulk]\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n",
            bulk.addr
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyway-instance"))
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(file.with_extension("log")).unwrap())
        .env("RUST_LOG", "info")
        .spawn()
        .expect("start keyway-instance");
    instance_ready_line(&mut child, &file.with_extension("log"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // A first transfer warms up the runtime, the allocator and the metric handles.
    transfer(addr, SIZE / 10).await;
    let before = peak_rss_kib(child.id());
    let down = transfer(addr, SIZE).await;
    let after = peak_rss_kib(child.id());
    let log_file = file.with_extension("log");
    let access_lines = || {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("keyway::access") && l.contains("kind=\"tcp\""))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    // The line is written once both sides are done, just after the client saw the end.
    eventually(Duration::from_secs(5), "two access lines", || async {
        access_lines().len() == 2
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(down, SIZE + 6);
    eprintln!("keyway's peak RSS: {before} KiB, then {after} KiB after 100 MB each way");
    let grew = after.saturating_sub(before);
    assert!(
        grew < 16 * 1024,
        "peak RSS grew by {grew} KiB while 200 MB passed"
    );
    // One access line per connection, with the bytes each way and why it closed.
    let lines = access_lines();
    let big = &lines[1];
    for want in [
        "cluster=\"bulk\"",
        "backend=\"a\"",
        &format!("up={SIZE} "),
        &format!("down={} ", SIZE + 6),
        "close=\"done\"",
        "client=127.0.0.1:",
        &format!("listener=127.0.0.1:{port}"),
    ] {
        assert!(big.contains(want), "{want} missing in {big}");
    }
}

// === PROXY protocol, SNI, TLS ===

#[tokio::test]
async fn a_backend_receives_the_real_client_in_a_proxy_v2_header() {
    let psm = Server::start(Behaviour::ProxyV2).await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"psm\"\nproxy_protocol = \"v1\"",
        &format!(
            "[cluster.psm]\nbackends = [{{ id = \"a\", address = \"{}\", proxy_protocol = \"v2\" }}]\n",
            psm.addr
        ),
    ))
    .await;
    let mut c = TcpStream::connect(proxy.server().tcp_addrs()[0])
        .await
        .unwrap();
    // keyway sits behind an L4 balancer that names the client in a v1 header.
    c.write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 3389\r\n")
        .await
        .unwrap();
    let line = try_line(&mut c).await.expect("the backend's line");
    let want = Header::Proxy {
        source: "192.0.2.7:51234".parse().unwrap(),
        destination: "10.0.0.1:3389".parse().unwrap(),
    };
    assert_eq!(line, format!("{:?}", Ok::<_, ()>(want)));
    c.write_all(b"payload").await.unwrap();
    read_until(&mut c, "payload").await;
    assert_eq!(
        psm.received(),
        vec![b"payload".to_vec()],
        "the header is not payload"
    );
}

#[tokio::test]
async fn sni_passthrough_chooses_the_farm_by_name_without_terminating() {
    let pki = TestPki::new();
    let logs_leaf = pki.leaf("logs", &["logs.corp.test"]);
    let policy_leaf = pki.leaf("policy", &["policy.corp.test"]);
    let logs = Server::start(Behaviour::Tls(
        "logs".into(),
        logs_leaf.server_config.clone(),
    ))
    .await;
    let policy = Server::start(Behaviour::Tls(
        "policy".into(),
        policy_leaf.server_config.clone(),
    ))
    .await;
    let proxy = Proxy::start(&tcp_config(
        "sni = [\n  { hosts = [\"logs.corp.test\"], cluster = \"logs\" },\n  { hosts = [\"*.corp.test\"], cluster = \"policy\" },\n]",
        &format!(
            "[cluster.logs]\nprotocol_check = \"tls\"\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n[cluster.policy]\nprotocol_check = \"tls\"\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n",
            logs.addr, policy.addr
        ),
    ))
    .await;
    let addr = proxy.server().tcp_addrs()[0];
    for (name, want, leaf) in [
        ("logs.corp.test", "logs", &logs_leaf),
        ("policy.corp.test", "policy", &policy_leaf),
    ] {
        let mut conn = tls_connect(addr, name, pki.client_config(&[])).await;
        assert_eq!(
            conn.peer_cert.as_ref(),
            Some(&leaf.der),
            "the backend's own certificate: keyway did not terminate"
        );
        assert_eq!(try_line(&mut conn.stream).await.as_deref(), Some(want));
    }
    // A name no route takes, on a listener with no default cluster: refused.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let cfg = pki.client_config(&[]);
    let name = rustls_pki_types::ServerName::try_from("other.test").unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg).connect(name, &mut raw),
    )
    .await
    .expect("refused in time");
    assert!(r.is_err(), "no route for other.test");
}

#[tokio::test]
async fn tls_termination_gives_the_backend_plain_bytes() {
    let pki = TestPki::new();
    let leaf = pki.leaf("vault-front", &["vault.corp.test"]);
    let vault = Server::start(Behaviour::Greet("vault-a".into())).await;
    let proxy = Proxy::start(&tcp_config(
        &format!(
            "cluster = \"vault\"\ntls = [{{ hosts = [\"vault.corp.test\"], cert = \"{}\", key = \"{}\" }}]",
            leaf.cert_pem.display(),
            leaf.key_pem.display()
        ),
        &format!("[cluster.vault]\nbackends = [{{ id = \"a\", address = \"{}\" }}]\n", vault.addr),
    ))
    .await;
    let mut conn = tls_connect(
        proxy.server().tcp_addrs()[0],
        "vault.corp.test",
        pki.client_config(&[]),
    )
    .await;
    assert_eq!(conn.peer_cert.as_ref(), Some(&leaf.der));
    assert_eq!(greeted_by(&mut conn.stream).await, "vault-a");
    conn.stream.write_all(b"in the clear").await.unwrap();
    read_until(&mut conn.stream, "in the clear").await;
    assert_eq!(vault.received(), vec![b"in the clear".to_vec()]);
}

// === operations ===

#[tokio::test]
async fn a_reload_sends_new_connections_to_the_new_backend_and_keeps_open_ones() {
    let old = Server::start(Behaviour::Greet("old".into())).await;
    let new = Server::start(Behaviour::Greet("new".into())).await;
    let file = unique_dir("tcp-reload").join("keyway.toml");
    let config = |b: SocketAddr| {
        tcp_config(
            "cluster = \"vault\"",
            &format!("[cluster.vault]\nbackends = [{{ id = \"v\", address = \"{b}\" }}]\n"),
        )
    };
    let proxy = Proxy::start_file(&file, &config(old.addr)).await;
    let addr = proxy.server().tcp_addrs()[0];
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(greeted_by(&mut open).await, "old");

    std::fs::write(&file, config(new.addr)).unwrap();
    proxy.server().reload().expect("reload");
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    assert_eq!(greeted_by(&mut fresh).await, "new");
    open.write_all(b"still open").await.unwrap();
    read_until(&mut open, "still open").await;

    let status: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin.unwrap(), "/status").await).unwrap();
    let l = &status["tcp_listeners"][0];
    assert_eq!(l["listen"], addr.to_string());
    assert_eq!(l["cluster"], "vault");
    assert_eq!(l["open"], 2, "{l}");
}

#[tokio::test]
async fn idle_connections_close_and_max_connections_holds_the_next_in_the_backlog() {
    let vault = Server::start(Behaviour::Greet("v".into())).await;
    let proxy = Proxy::start(&format!(
        "[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"idle\"\nidle_timeout = \"300ms\"\n[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"idle\"\nmax_connections = 1\n[cluster.idle]\nbackends = [{{ id = \"v\", address = \"{}\" }}]\n",
        vault.addr
    ))
    .await;
    let addrs = proxy.server().tcp_addrs().to_vec();

    let mut c = TcpStream::connect(addrs[0]).await.unwrap();
    greeted_by(&mut c).await;
    // Bytes moving keep it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.write_all(b"x").await.unwrap();
        read_until(&mut c, "x").await;
    }
    // ...silence closes it.
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("closed for idleness")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    let mut first = TcpStream::connect(addrs[1]).await.unwrap();
    greeted_by(&mut first).await;
    let mut second = TcpStream::connect(addrs[1]).await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(400), second.read(&mut byte))
            .await
            .is_err(),
        "the second connection waits while the first is open"
    );
    drop(first);
    greeted_by(&mut second).await;
}

/// An HTTP status server on `ip:port` answering `status`.
async fn status_page(addr: SocketAddr, status: Arc<AtomicU16>) -> SocketAddr {
    let sock = TcpListener::bind(addr).await.expect("bind status page");
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sock.accept().await {
            let code = status.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http_check_on_another_port_decides_a_tcp_backend() {
    let a_ip = IpAddr::from([127, 0, 0, 2]);
    let b_ip = IpAddr::from([127, 0, 0, 3]);
    let a = Server::start_on(SocketAddr::new(a_ip, 0), Behaviour::Greet("a".into())).await;
    let b = Server::start_on(SocketAddr::new(b_ip, 0), Behaviour::Greet("b".into())).await;
    let a_status = Arc::new(AtomicU16::new(200));
    let page = status_page(SocketAddr::new(a_ip, 0), a_status.clone()).await;
    status_page(
        SocketAddr::new(b_ip, page.port()),
        Arc::new(AtomicU16::new(200)),
    )
    .await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"vault\"",
        &format!(
            "[cluster.vault]\nstrategy = \"ordered\"\nhealth = {{ path = \"/status\", port = {}, interval = \"50ms\", rise = 1, fall = 1 }}\nbackends = [\n  {{ id = \"a\", address = \"{}\", priority = 0 }},\n  {{ id = \"b\", address = \"{}\", priority = 1 }},\n]\n",
            page.port(),
            a.addr,
            b.addr
        ),
    ))
    .await;
    let addr = proxy.server().tcp_addrs()[0];
    let is = |want: &'static str| async move { greeting(addr).await.as_deref() == Some(want) };
    eventually(
        Duration::from_secs(5),
        "a is checked healthy and first",
        || is("a"),
    )
    .await;
    a_status.store(503, Ordering::Relaxed);
    eventually(
        Duration::from_secs(5),
        "a's status page takes it out",
        || is("b"),
    )
    .await;
    let before = a.connections();
    for _ in 0..5 {
        assert_eq!(greeting(addr).await.as_deref(), Some("b"));
    }
    assert_eq!(
        a.connections(),
        before,
        "an unhealthy backend takes no new connection"
    );
    a_status.store(200, Ordering::Relaxed);
    eventually(Duration::from_secs(5), "a is back", || is("a")).await;
}

// === config ===

#[test]
fn tcp_listener_config_errors_have_lines_and_fixes() {
    let text = r#"[[tcp_listener]]
listen = "127.0.0.1:0"
cluster = "pam360"

[[tcp_listener]]
listen = "127.0.0.1:0"

[[tcp_listener]]
listen = "127.0.0.1:0"
sni = [{ hosts = ["logs.corp.test"], cluster = "nowhere" }]

[cluster.pam360]
strategy = "primary-replica"
backends = [{ id = "p", address = "127.0.0.1:1", role = "primary" }]

[cluster.vault]
protocol_check = "greeting"
affinity = "cookie"
balance = "least-connections"
backends = [{ id = "a", address = "127.0.0.1:1", proxy_protocol = "v3" }]
"#;
    let err = keyway::Config::from_str_with_base(text, "tcp.toml", &temp_dir()).unwrap_err();
    let find = |needle: &str| {
        err.errors
            .iter()
            .find(|e| e.message.contains(needle))
            .unwrap_or_else(|| panic!("no error mentioning {needle:?} in:\n{err}"))
    };
    assert_eq!(find("cannot tell reads from writes").line, Some(3));
    assert_eq!(find("names no cluster and no SNI route").line, Some(5));
    assert_eq!(find("`nowhere`, which is not defined").line, Some(10));
    assert_eq!(find("unknown protocol_check `greeting`").line, Some(17));
    assert!(find("unknown protocol_check").fix.contains("first-byte"));
    assert_eq!(find("unknown affinity `cookie`").line, Some(18));
    assert_eq!(find("unknown proxy_protocol `v3`").line, Some(20));
    assert!(err.errors.iter().all(|e| !e.fix.is_empty()), "{err}");
    assert!(
        !err.to_string().contains("least-connections"),
        "least-connections is known: {err}"
    );

    // Defaults of a valid listener.
    let ok = keyway::Config::from_str_with_base(
        "[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"v\"\n[cluster.v]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
        "ok.toml",
        &temp_dir(),
    )
    .unwrap();
    let l = &ok.tcp_listeners[0];
    assert_eq!(
        l.idle_timeout,
        keyway_proxy::config::DEFAULT_TCP_IDLE_TIMEOUT
    );
    assert_eq!(
        ok.clusters[0].tcp.protocol_check,
        keyway_proxy::config::ProtocolCheck::FirstByte
    );
}

#[tokio::test]
async fn a_degraded_backend_is_tried_after_every_healthy_one() {
    // b has the better priority but its health policy calls it degraded: a standby.
    let a = Server::start(Behaviour::Greet("a".into())).await;
    let b = Server::start(Behaviour::Greet("b".into())).await;
    let proxy = Proxy::start(&tcp_config(
        "cluster = \"vault-deg\"",
        &format!(
            "[cluster.vault-deg]\nstrategy = \"ordered\"\nhealth = {{ kind = \"tcp\", interval = \"50ms\", policy = \"{}\", config = {{ mode = \"ok\", degraded = [\"b\"] }} }}\nbackends = [\n  {{ id = \"a\", address = \"{}\", priority = 1 }},\n  {{ id = \"b\", address = \"{}\", priority = 0 }},\n]\n",
            plugin("misbehave-health").display(),
            a.addr,
            b.addr
        ),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    eventually(Duration::from_secs(10), "a healthy, b degraded", || async {
        backend_status(admin, "vault-deg", "a").await["health"]["health"] == "healthy"
            && backend_status(admin, "vault-deg", "b").await["health"]["health"] == "degraded"
    })
    .await;
    let addr = proxy.server().tcp_addrs()[0];
    for _ in 0..5 {
        assert_eq!(greeting(addr).await.as_deref(), Some("a"));
    }
    // The only one left: the standby serves.
    a.accept.abort();
    eventually(Duration::from_secs(10), "a unhealthy", || async {
        backend_status(admin, "vault-deg", "a").await["health"]["health"] == "unhealthy"
    })
    .await;
    assert_eq!(greeting(addr).await.as_deref(), Some("b"));
}
