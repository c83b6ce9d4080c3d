//! Test harness for keyway's integration tests: real servers on ephemeral loopback
//! ports, a proxy started from a config string, and clients for HTTP/1.1, HTTP/2 and
//! TLS. Readiness is by construction (sockets are bound before anything connects), so
//! tests need no sleeps to wait for start-up.
//!
//! ```ignore
//! let a = TestBackend::start("a").await;
//! let proxy = Proxy::start(&format!(r#"... address = "{}" ..."#, a.addr)).await;
//! let r = get(proxy.addr, "pvwa.corp.test", "/").await;
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

pub use keyway;
pub use keyway_proxy;

mod browser;
pub use browser::{chromium_binaries, ChromeDriver, ChromiumBinaries};

/// How a test backend behaves right now. Tests change it while traffic flows.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Answer 200 with a JSON description of the request.
    Normal,
    /// Wait this long before sending response headers.
    Delay(Duration),
    /// Read the request, never answer (connection stays open).
    Hang,
    /// Answer with this status.
    Status(u16),
}

/// One request as a backend saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// HTTP version, e.g. "HTTP/1.1".
    pub version: String,
    /// Headers (lower-case names; repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// Body length in bytes.
    pub body_len: usize,
    /// When the request's head arrived.
    pub at: Instant,
    /// The same moment in Unix milliseconds (the clock keyway stamps decisions with).
    pub at_unix_ms: u64,
}

impl Seen {
    /// The `keyway-epoch` header as received (several values joined with ", "), if any.
    pub fn epoch_header(&self) -> Option<&str> {
        self.headers.get("keyway-epoch").map(String::as_str)
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// [`TestBackend::set_lag`]: a health answer that reports no lag.
pub const NO_LAG: u64 = u64::MAX;

struct BackendState {
    name: String,
    health_status: std::sync::atomic::AtomicU16,
    lag_ms: std::sync::atomic::AtomicU64,
    health_checks: AtomicUsize,
    hook_status: std::sync::atomic::AtomicU16,
    hook_delay: Mutex<Duration>,
    hooks: Mutex<Vec<String>>,
    mode: Mutex<Mode>,
    seen: Mutex<Vec<Seen>>,
    heads: AtomicUsize,
    connections: AtomicUsize,
    tls_handshake_delay: Mutex<Duration>,
    /// The running server's stop signal; replaced on restart, shared by every handle.
    stop: Mutex<Arc<tokio::sync::watch::Sender<bool>>>,
}

/// A real HTTP server on a loopback port. `GET /health` answers with the status set by
/// [`TestBackend::set_health`] and reports [`TestBackend::set_lag`] in
/// `X-Replication-Lag-Ms` and as JSON `{"lag_ms": N}`; health checks are not recorded
/// as requests.
#[derive(Clone)]
pub struct TestBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Options for [`TestBackend::start_with`].
#[derive(Default)]
pub struct BackendOptions {
    /// Serve TLS with this certificate (ALPN h2 + http/1.1).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Delay before the TLS handshake starts (simulates a slow or distant server).
    pub tls_handshake_delay: Duration,
}

impl TestBackend {
    /// A plain HTTP backend (HTTP/1.1 and HTTP/2 prior knowledge) named `name`.
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, BackendOptions::default()).await
    }

    /// A backend with options (TLS, slow handshakes).
    pub async fn start_with(name: &str, opts: BackendOptions) -> Self {
        let sock = listen_on_free_port().await;
        let state = Arc::new(BackendState {
            name: name.to_string(),
            health_status: std::sync::atomic::AtomicU16::new(200),
            lag_ms: std::sync::atomic::AtomicU64::new(0),
            health_checks: AtomicUsize::new(0),
            hook_status: std::sync::atomic::AtomicU16::new(200),
            hook_delay: Mutex::new(Duration::ZERO),
            hooks: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::Normal),
            seen: Mutex::new(Vec::new()),
            heads: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            tls_handshake_delay: Mutex::new(opts.tls_handshake_delay),
            stop: Mutex::new(Arc::new(tokio::sync::watch::channel(false).0)),
        });
        Self::serve(sock, state, opts.tls)
    }

    /// A TLS backend serving `leaf`, whose handshakes start only after `delay` (a slow
    /// or distant server).
    pub async fn start_tls(name: &str, leaf: &Leaf, delay: Duration) -> Self {
        Self::start_with(
            name,
            BackendOptions {
                tls: Some(leaf.server_config.clone()),
                tls_handshake_delay: delay,
            },
        )
        .await
    }

    /// Listens again on the same port after [`TestBackend::stop`], keeping its state.
    pub async fn restart(&self) -> Self {
        let sock = TcpListener::bind(self.addr).await.expect("rebind backend");
        Self::serve(sock, self.state.clone(), self.tls.clone())
    }

    fn serve(
        sock: TcpListener,
        state: Arc<BackendState>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let addr = sock.local_addr().expect("addr");
        let stop = Arc::new(tokio::sync::watch::channel(false).0);
        *state.stop.lock().unwrap() = stop.clone();
        let acceptor = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let (st, stp) = (state.clone(), stop.subscribe());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = sock.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stopped(stp.clone()) => return,
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let acceptor = acceptor.clone();
                let stp = stp.clone();
                tokio::spawn(async move {
                    let serve = async {
                        match acceptor {
                            None => serve_conn(TokioIo::new(stream), st).await,
                            Some(a) => {
                                let delay = *st.tls_handshake_delay.lock().unwrap();
                                tokio::time::sleep(delay).await;
                                if let Ok(tls) = a.accept(stream).await {
                                    serve_conn(TokioIo::new(tls), st).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped(stp) => {}
                    }
                });
            }
        });
        Self { addr, state, tls }
    }

    /// Status `GET /health` answers with from now on.
    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }

    /// Replication lag `GET /health` reports from now on ([`NO_LAG`]: none at all).
    pub fn set_lag(&self, ms: u64) {
        self.state.lag_ms.store(ms, Ordering::SeqCst);
    }

    /// Status `POST /admin/*` (promotion hooks) answers with from now on.
    pub fn set_hook_status(&self, status: u16) {
        self.state.hook_status.store(status, Ordering::SeqCst);
    }

    /// How long `POST /admin/*` waits before answering, from now on (a hook call is
    /// recorded in [`TestBackend::hooks`] when it arrives, before the wait).
    pub fn set_hook_delay(&self, delay: Duration) {
        *self.state.hook_delay.lock().unwrap() = delay;
    }

    /// Paths of the `/admin/*` hook calls received, in order.
    pub fn hooks(&self) -> Vec<String> {
        self.state.hooks.lock().unwrap().clone()
    }

    /// The `keyway-epoch` of every write (non-GET/HEAD request) seen, in order.
    pub fn write_epochs(&self) -> Vec<u64> {
        self.seen()
            .iter()
            .filter(|s| s.method != "GET" && s.method != "HEAD")
            .map(|s| {
                s.headers
                    .get("keyway-epoch")
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }

    /// Health checks received.
    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// The name it reports in its answers.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Changes how the backend answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Number of requests seen.
    pub fn hits(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// Request heads received (health checks and hooks aside), including requests whose
    /// body then failed, which [`TestBackend::seen`] leaves out.
    pub fn heads(&self) -> usize {
        self.state.heads.load(Ordering::SeqCst)
    }

    /// Number of TCP connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Stops listening and closes every open connection (the port then refuses).
    pub fn stop(&self) {
        self.state.stop.lock().unwrap().send_replace(true);
    }
}

/// Resolves once `stop` has been set (at once if it already is).
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn serve_conn<IO>(io: TokioIo<IO>, st: Arc<BackendState>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(answer(st, req).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, svc)
        .await;
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: u16, s: String) -> Response<TestBody> {
    let mut r = Response::new(Full::new(Bytes::from(s)).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r
}

async fn answer(st: Arc<BackendState>, mut req: Request<Incoming>) -> Response<TestBody> {
    // WebSocket: echo every message back, prefixed with the backend's name.
    if req.headers().contains_key("sec-websocket-key") {
        let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
        let on_upgrade = hyper::upgrade::on(&mut req);
        let name = st.name.clone();
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_text() {
                        let reply = format!("{name}:{}", msg.to_text().unwrap_or(""));
                        if tx.send(reply.into()).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r.headers_mut()
            .insert("sec-websocket-accept", accept.parse().unwrap());
        return r;
    }

    if req.uri().path().starts_with("/admin/") {
        st.hooks.lock().unwrap().push(req.uri().path().to_string());
        let delay = *st.hook_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        return text(st.hook_status.load(Ordering::SeqCst), String::new());
    }

    if req.uri().path() == "/health" {
        st.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = st.health_status.load(Ordering::SeqCst);
        let lag = st.lag_ms.load(Ordering::SeqCst);
        if lag == NO_LAG {
            return text(status, "{}".into());
        }
        let mut r = text(status, format!("{{\"lag_ms\": {lag}}}"));
        r.headers_mut()
            .insert("x-replication-lag-ms", lag.to_string().parse().unwrap());
        return r;
    }

    st.heads.fetch_add(1, Ordering::SeqCst);
    let mut headers = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = v.to_str().unwrap_or("").to_string();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|e: &mut String| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let (at, at_unix_ms) = (Instant::now(), unix_ms_now());
    // `x-test-delay-ms: N`: this one request is answered N ms late (a slow write).
    let delay = req
        .headers()
        .get("x-test-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => return text(400, "bad body".into()),
    };
    let seen = Seen {
        method,
        path,
        version,
        headers,
        body_len,
        at,
        at_unix_ms,
    };
    st.seen.lock().unwrap().push(seen.clone());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mode = st.mode.lock().unwrap().clone();
    match mode {
        Mode::Normal => {}
        Mode::Delay(d) => tokio::time::sleep(d).await,
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Status(s) => return text(s, format!("{} says {s}", st.name)),
    }
    let doc = serde_json::json!({
        "backend": st.name,
        "method": seen.method,
        "path": seen.path,
        "version": seen.version,
        "headers": seen.headers,
        "body_len": seen.body_len,
    });
    let mut r = text(200, doc.to_string());
    r.headers_mut()
        .insert("x-backend", st.name.parse().unwrap());
    // Hop-by-hop headers a proxy must not pass on: `Connection` and the header it names.
    r.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    r.headers_mut().insert("x-hop", "secret".parse().unwrap());
    r
}

/// An address on which nothing listens (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    free_port()
}

/// A TCP server that accepts connections, reads the request, and closes the connection
/// without answering: the backend failure where the request did reach the backend.
pub struct DroppingBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl DroppingBackend {
    /// Starts it.
    pub async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let sock = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = sock.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = sock.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut got = Vec::new();
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(4).any(|w| w == b"\r\n\r\n") {
                            r.fetch_add(1, Ordering::SeqCst);
                            return; // drop the socket: no response
                        }
                    }
                });
            }
        });
        Self { addr, requests }
    }

    /// Requests whose head was fully received.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

// === the proxy under test ===

/// The first HTTP listener's address, or the first TCP listener's when it has none.
fn first_listener(server: &keyway::Server) -> SocketAddr {
    let first = server.listen_addrs().first();
    *first.or(server.tcp_addrs().first()).expect("a listener")
}

/// A keyway instance started from a config string.
pub struct Proxy {
    /// First listener's address.
    pub addr: SocketAddr,
    /// Every listener's address.
    pub addrs: Vec<SocketAddr>,
    /// Admin address, if configured.
    pub admin: Option<SocketAddr>,
    server: Option<keyway::Server>,
}

impl Proxy {
    /// Parses, validates and starts `config` (relative paths resolve against the test's
    /// temp dir). Panics with the config errors if it is invalid.
    pub async fn start(config: &str) -> Self {
        // A directory of its own: the default state file lives beside the config.
        let cfg = keyway::Config::from_str_with_base(config, "test.toml", &unique_dir("proxy"))
            .unwrap_or_else(|e| panic!("{e}"));
        let server = keyway::Server::start(cfg).await.expect("start keyway");
        Self {
            addr: first_listener(&server),
            addrs: server.listen_addrs().to_vec(),
            admin: server.admin_addr(),
            server: Some(server),
        }
    }

    /// Writes `config` to `file`, starts keyway from it and remembers the file, so
    /// `POST /reload` (or [`keyway::Server::reload`]) re-reads it.
    pub async fn start_file(file: &Path, config: &str) -> Self {
        std::fs::write(file, config).expect("write config");
        let cfg = keyway::Config::load(file).unwrap_or_else(|e| panic!("{e}"));
        let server = keyway::Server::start(cfg).await.expect("start keyway");
        server.set_config_source(file.to_path_buf());
        Self {
            addr: first_listener(&server),
            addrs: server.listen_addrs().to_vec(),
            admin: server.admin_addr(),
            server: Some(server),
        }
    }

    /// The running server.
    pub fn server(&self) -> &keyway::Server {
        self.server.as_ref().expect("running")
    }

    /// Graceful shutdown; `true` when everything drained in time.
    pub async fn shutdown(mut self) -> bool {
        match self.server.take() {
            Some(s) => s.shutdown().await,
            None => true,
        }
    }
}

// === clients ===

/// A response with its body read.
#[derive(Debug)]
pub struct Got {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body text.
    pub body: String,
}

impl Got {
    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `backend` field of a test backend's answer.
    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap_or("").to_string()
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and reads the whole response.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    try_send(addr, req).await.expect("request failed")
}

/// Like [`send`] but returns transport errors.
pub async fn try_send(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Got> {
    let stream = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await?;
    read(resp).await
}

/// Reads a response fully.
pub async fn read(resp: Response<Incoming>) -> anyhow::Result<Got> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Sends a request whose body is `chunks`, streamed as they come, on a fresh HTTP/1.1
/// connection; returns the response with its body unread.
pub async fn send_streaming<S>(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    chunks: S,
) -> Response<Incoming>
where
    S: futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::io::Error>>
        + Send
        + Sync
        + 'static,
{
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(http_body_util::StreamBody::new(chunks))
        .expect("valid request");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    tx.send_request(req).await.expect("send")
}

/// Builds a request for `host` and `path`.
pub fn request(method: &str, host: &str, path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request")
}

/// GET over HTTP/1.1.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    send(addr, request("GET", host, path, "")).await
}

/// Sends requests over one HTTP/2 (prior knowledge) connection.
pub async fn h2_get(addr: SocketAddr, host: &str, path: &str) -> Got {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("http://{host}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    read(tx.send_request(req).await.expect("h2 request"))
        .await
        .expect("read")
}

// === TLS ===

/// A private CA and certificates it issued, written to PEM files.
pub struct TestPki {
    /// CA certificate (PEM path), for `upstream_ca` and clients.
    pub ca_pem: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    dir: PathBuf,
}

/// A leaf certificate.
pub struct Leaf {
    /// Certificate PEM path.
    pub cert_pem: PathBuf,
    /// Key PEM path.
    pub key_pem: PathBuf,
    /// DER of the certificate, to compare with what a server presented.
    pub der: CertificateDer<'static>,
    /// rustls server config serving this certificate (for test backends).
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TestPki {
    /// A new CA in a fresh temp dir.
    pub fn new() -> Self {
        let dir = unique_dir("pki");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyway test CA");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca_cert = params.self_signed(&ca_key).expect("ca");
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).expect("write ca");
        Self {
            ca_pem,
            ca_cert,
            ca_key,
            dir,
        }
    }

    /// Issues a certificate for `names` and writes it next to the CA.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign");
        let cert_pem = self.dir.join(format!("{file}.pem"));
        let key_pem = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_pem, cert.pem()).expect("write");
        std::fs::write(&key_pem, key.serialize_pem()).expect("write");
        let der = cert.der().clone();
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key_der)
        .expect("server config");
        sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Leaf {
            cert_pem,
            key_pem,
            der,
            server_config: Arc::new(sc),
        }
    }

    /// A client config trusting this CA and presenting `identity` (issued by
    /// [`TestPki::leaf`]), offering http/1.1.
    pub fn client_config_as(&self, identity: &Leaf) -> Arc<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).expect("root");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&identity.key_pem).expect("key");
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![identity.der.clone()], key)
        .expect("client identity");
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }

    /// A client config trusting this CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).expect("root");
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS connection to keyway, with what the handshake negotiated.
pub struct TlsConn {
    /// The TLS stream.
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The certificate the server presented (leaf).
    pub peer_cert: Option<CertificateDer<'static>>,
}

/// Connects with TLS to `addr`, sending SNI `sni`.
pub async fn tls_connect(addr: SocketAddr, sni: &str, cfg: Arc<rustls::ClientConfig>) -> TlsConn {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("sni");
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let peer_cert = session
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    TlsConn {
        stream,
        alpn,
        peer_cert,
    }
}

/// GET over an established TLS connection, using HTTP/2 if ALPN chose it.
pub async fn tls_get(conn: TlsConn, host: &str, path: &str) -> Got {
    let io = TokioIo::new(conn.stream);
    if conn.alpn.as_deref() == Some(b"h2") {
        let (mut tx, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2");
        tokio::spawn(c);
        let req = Request::builder()
            .uri(format!("https://{host}{path}"))
            .body(Full::new(Bytes::new()))
            .expect("req");
        read(tx.send_request(req).await.expect("send"))
            .await
            .expect("read")
    } else {
        let (mut tx, c) = hyper::client::conn::http1::handshake(io).await.expect("h1");
        tokio::spawn(c);
        read(
            tx.send_request(request("GET", host, path, ""))
                .await
                .expect("send"),
        )
        .await
        .expect("read")
    }
}

/// One HTTP/1.1 request over a new TLS connection to `addr` (server name `sni`).
pub async fn try_send_tls(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<Got> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(c);
    read(tx.send_request(req).await?).await
}

// === admin ===

/// Polls `cond` every 20 ms until it holds, failing after `within`. For waiting on
/// asynchronous state (health transitions) that has no event to await.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `/status` document's entry for one backend.
pub async fn backend_status(admin: SocketAddr, cluster: &str, backend: &str) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).expect("status JSON");
    status["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == cluster))
        .and_then(|c| c["backends"].as_array())
        .and_then(|bs| bs.iter().find(|b| b["id"] == backend))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// One topology decision of a `primary-replica` cluster, as `/status` lists it under
/// `coordination.clusters.NAME` (the current one) and its `history`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The epoch it began.
    pub epoch: u64,
    /// The backend that takes writes in it; `None` (a drain epoch) takes none.
    pub primary: Option<String>,
    /// Backends that take nothing in it.
    pub fenced: Vec<String>,
    /// When it was decided (Unix milliseconds; 0 for the configured epoch 0).
    pub unix_ms: u64,
}

impl Decision {
    fn from_json(v: &serde_json::Value) -> Option<Self> {
        Some(Self {
            epoch: v["epoch"].as_u64()?,
            primary: v["primary"].as_str().map(String::from),
            fenced: v["fenced"]
                .as_array()?
                .iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect(),
            unix_ms: v["unix_ms"].as_u64().unwrap_or(0),
        })
    }
}

/// The current decision of cluster `cluster` (from `/status`).
pub async fn decision(admin: SocketAddr, cluster: &str) -> Decision {
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).expect("status JSON");
    let c = &status["coordination"]["clusters"][cluster];
    Decision::from_json(c).unwrap_or_else(|| panic!("no topology for `{cluster}` in {c}"))
}

/// Every decision `/status` keeps for `cluster`, by epoch, with `epoch0` (the
/// configured topology, never listed) first. Panics when an epoch is missing: the
/// history must be complete for [`split_violations`] to judge every request.
pub async fn decision_history(admin: SocketAddr, cluster: &str, epoch0: Decision) -> Vec<Decision> {
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).expect("status JSON");
    let mut all = vec![epoch0];
    for h in status["coordination"]["clusters"][cluster]["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let d = Decision::from_json(&h).unwrap_or_else(|| panic!("bad history entry {h}"));
        if d.epoch > 0 {
            all.push(d);
        }
    }
    all.sort_by_key(|d| d.epoch);
    for (i, d) in all.iter().enumerate() {
        assert_eq!(
            d.epoch, i as u64,
            "the decision history of `{cluster}` has a gap or a repeated epoch: {all:?}"
        );
    }
    all
}

/// Checks what one backend of a `primary-replica` cluster received against the cluster's
/// decisions (from [`decision_history`]) and returns every violation, described:
/// - a write (as `is_write` classifies it) carries exactly one `keyway-epoch`, that
///   epoch names this backend as primary, and does not fence it;
/// - no write of epoch N arrives more than `margin_ms` after a later epoch made another
///   backend primary (a stale write, e.g. from a queue, reaching the old primary);
/// - a read carries no `keyway-epoch` (a client's own is removed);
/// - nothing arrives while the backend is fenced, unless it was unfenced at some moment
///   of the `margin_ms` before (a request routed just before the fence).
///
/// Arrival times and decision times come from the same clock (this process's
/// `SystemTime`), so the margin only absorbs routing and loopback delays.
pub fn split_violations(
    decisions: &[Decision],
    backend: &str,
    seen: &[Seen],
    is_write: impl Fn(&Seen) -> bool,
    margin_ms: u64,
) -> Vec<String> {
    let in_effect_at = |t: u64| -> &Decision {
        decisions
            .iter()
            .rev()
            .find(|d| d.unix_ms <= t)
            .unwrap_or(&decisions[0])
    };
    let fenced = |d: &Decision| d.fenced.iter().any(|f| f == backend);
    let mut out = Vec::new();
    for s in seen {
        let t = s.at_unix_ms;
        let what = format!("{} {} at {t}", s.method, s.path);
        // Fenced for the whole margin before it arrived: the epoch in effect at t - margin
        // and every epoch decided since.
        let from = t.saturating_sub(margin_ms);
        let window_fenced = fenced(in_effect_at(from))
            && decisions
                .iter()
                .filter(|d| d.unix_ms > from && d.unix_ms <= t)
                .all(fenced);
        if window_fenced {
            out.push(format!(
                "{backend} received {what} while fenced (epoch {} in effect)",
                in_effect_at(t).epoch
            ));
        }
        if !is_write(s) {
            if let Some(e) = s.epoch_header() {
                out.push(format!(
                    "{backend} received the read {what} with keyway-epoch {e:?}"
                ));
            }
            continue;
        }
        let Some(epoch) = s.epoch_header().and_then(|e| e.trim().parse::<u64>().ok()) else {
            out.push(format!(
                "{backend} received the write {what} without exactly one keyway-epoch: {:?}",
                s.epoch_header()
            ));
            continue;
        };
        let Some(d) = decisions.iter().find(|d| d.epoch == epoch) else {
            out.push(format!(
                "{backend} received the write {what} in epoch {epoch}, which was never decided"
            ));
            continue;
        };
        if d.primary.as_deref() != Some(backend) {
            out.push(format!(
                "{backend} received the write {what} in epoch {epoch}, whose primary is {:?}",
                d.primary
            ));
        }
        if fenced(d) {
            out.push(format!(
                "{backend} received the write {what} in epoch {epoch}, which fences it"
            ));
        }
        if let Some(later) = decisions.iter().find(|l| {
            l.epoch > epoch
                && l.primary.as_deref().is_some_and(|p| p != backend)
                && t > l.unix_ms + margin_ms
        }) {
            out.push(format!(
                "{backend} received the write {what} of epoch {epoch} {} ms after epoch {} made {:?} primary",
                t - later.unix_ms,
                later.epoch,
                later.primary
            ));
        }
    }
    out
}

/// GETs an admin path and returns the body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    get(admin, "admin", path).await.body
}

/// Value of a Prometheus sample (`name{labels}`) in a `/metrics` page; 0 when absent.
pub fn metric(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

// === files ===

/// This process's temp dir for configs and certificates.
pub fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("keyway-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A fresh, unique directory under [`temp_dir`].
pub fn unique_dir(prefix: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = temp_dir().join(format!("{prefix}-{}", N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// The path of a plugin built from `plugins/` (e.g. `"pam-classifier"`), building all
/// plugins for wasm32-wasip2 once per test process (installing the target if needed).
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dist = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new("bash")
            .arg(root.join("plugins/build.sh"))
            .output()
            .map_err(|e| format!("cannot run plugins/build.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "plugins/build.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(root.join("plugins/dist"))
    });
    match dist {
        Ok(d) => d.join(format!("{name}.wasm")),
        Err(e) => panic!("{e}"),
    }
}

/// The repository's `config/` folder.
pub fn repo_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("config")
}

// === etcd ===

/// A real etcd server on loopback ports with a temporary data directory, stopped (and
/// its data removed) when dropped.
pub struct Etcd {
    /// Client address (`http://` + this).
    pub addr: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
    child: Option<std::process::Child>,
    tls: Option<EtcdTls>,
}

/// What a TLS etcd serves and demands.
struct EtcdTls {
    server: Leaf,
    ca_pem: PathBuf,
    /// A client identity etcd accepts, for the readiness check.
    client: Arc<rustls::ClientConfig>,
}

/// The `etcd` binary: on PATH, or installed from Debian's `etcd-server` when running as
/// root on a machine that has apt (what `.ci/run` does, too).
fn etcd_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let found = BIN.get_or_init(|| {
        let which = || {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join("etcd"))
                    .find(|p| p.is_file())
            })
        };
        if let Some(p) = which() {
            return Ok(p);
        }
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        if root {
            let _ = std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "etcd-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            if let Some(p) = which() {
                return Ok(p);
            }
            let _ = std::process::Command::new("apt-get").args(["update", "-qq"]).status();
            let _ = std::process::Command::new("apt-get")
                .args(["install", "-y", "-qq", "etcd-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
        which().ok_or_else(|| {
            "these tests need etcd: install it (Debian: apt-get install etcd-server) or put `etcd` on PATH".to_string()
        })
    });
    found.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// A loopback address with a port free right now, for a server that must name its port
/// before it starts (etcd, a keyway instance's admin listener) or listen on it again
/// after a stop.
///
/// The port comes from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so no outgoing connection and no `bind(0)` can take
/// it between this call and the server's own bind (with `bind(0)` ports, that race made
/// an etcd or an instance fail to start on a busy machine); ports are handed out once
/// per test process, starting at an offset taken from the process id.
pub fn free_port() -> SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    const LOWEST: usize = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST);
    if span < 1_000 {
        // No room below the ephemeral range: the kernel's choice is all there is.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        return l.local_addr().expect("addr");
    }
    let _ = NEXT.compare_exchange(
        usize::MAX,
        std::process::id() as usize * 7_919 % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = LOWEST + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port between {LOWEST} and {ephemeral}");
}

/// The `listening …` line a `keyway-instance` child prints once it serves; when the
/// child exits before printing it, panics with what the child wrote to `log`.
pub fn instance_ready_line(child: &mut std::process::Child, log: &Path) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("the instance's stdout is piped");
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if !line.starts_with("listening ") {
        // A child that closed its stdout has exited or is about to (a zombie ignores
        // the kill); one that printed something else is stopped.
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        panic!(
            "keyway-instance did not start ({status}); stdout {line:?}; {}:\n{text}",
            log.display()
        );
    }
    line
}

/// A listener on a [`free_port`], for servers a test stops and starts again on the same
/// address.
pub async fn listen_on_free_port() -> TcpListener {
    let mut last = None;
    // Only another process can have taken the port since `free_port` saw it free; an
    // error that persists (no file descriptors left) is reported as itself.
    for _ in 0..10 {
        let addr = free_port();
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    panic!(
        "cannot listen on a free loopback port: {}",
        last.unwrap_or_default()
    );
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts etcd serving TLS on its client port with a certificate from `pki` for
    /// 127.0.0.1, and demanding a client certificate issued by `pki`
    /// (`--client-cert-auth`), as production etcd clusters run.
    pub async fn start_tls(pki: &TestPki) -> Self {
        let server = pki.leaf("etcd-server", &["127.0.0.1", "localhost"]);
        let client = pki.client_config_as(&pki.leaf("etcd-ready-check", &["ready-check"]));
        Self::start_with(Some(EtcdTls {
            server,
            ca_pem: pki.ca_pem.clone(),
            client,
        }))
        .await
    }

    async fn start_with(tls: Option<EtcdTls>) -> Self {
        let dir = unique_dir("etcd");
        let (addr, peer) = (free_port(), free_port());
        let mut me = Self {
            addr,
            peer,
            dir,
            child: None,
            tls,
        };
        me.spawn().await;
        me
    }

    async fn spawn(&mut self) {
        // Appended to, so a restart keeps what the previous run wrote.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log");
        let mut cmd = std::process::Command::new(etcd_binary());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server.cert_pem)
                .arg("--key-file")
                .arg(&t.server.key_pem)
                .arg("--trusted-ca-file")
                .arg(&t.ca_pem)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args([
                // Watches hear progress every second, as keyway's watch asks for it.
                "--experimental-watch-progress-notify-interval",
                "1s",
                "--name",
                "test",
                "--data-dir",
                &self.dir.join("data").display().to_string(),
                "--listen-client-urls",
                &self.url(),
                "--advertise-client-urls",
                &self.url(),
                "--listen-peer-urls",
                &format!("http://{}", self.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", self.peer),
                "--initial-cluster",
                &format!("test=http://{}", self.peer),
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let req = request("POST", "etcd", "/v3/kv/range", r#"{"key":"AA=="}"#);
            let probe = async {
                match &self.tls {
                    None => try_send(self.addr, req).await,
                    Some(t) => try_send_tls(self.addr, "127.0.0.1", t.client.clone(), req).await,
                }
            };
            // Bounded: whatever else might hold the port need not answer.
            let got = tokio::time::timeout(Duration::from_secs(1), probe).await;
            if got.is_ok_and(|r| r.is_ok_and(|r| r.status == 200)) {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                let what = match exited {
                    Some(status) => format!("etcd exited ({status})"),
                    None => "etcd did not answer within 30 s".to_string(),
                };
                panic!(
                    "{what}; the end of {}:\n{}",
                    self.log().display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The last lines etcd wrote, for a failure message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops etcd (kill), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// `http://ADDR` (`https://` when started with TLS), for `[coordination] etcd`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === load ===

/// `clients` tasks sending `GET path` with Host `host` back to back until stopped; any
/// answer but 200 (or no answer) counts as a failure. For "0 failed requests while the
/// configuration changes" tests.
pub struct GetLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    fails: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GetLoop {
    /// Starts the clients.
    pub fn start(addr: SocketAddr, clients: usize, host: &str, path: &str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (fails, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, fails, done) = (stop.clone(), fails.clone(), done.clone());
                let (host, path) = (host.to_string(), path.to_string());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match try_send(addr, request("GET", &host, &path, "")).await {
                            Ok(r) if r.status == 200 => {}
                            _ => {
                                fails.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self {
            stop,
            fails,
            done,
            tasks,
        }
    }

    /// Stops the clients and returns (requests sent, requests failed).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        (
            self.done.load(Ordering::Relaxed),
            self.fails.load(Ordering::Relaxed),
        )
    }
}

/// A config with one listener (its extra keys `listener_extra`) routing everything to
/// one cluster `pvwa` with one backend `a`: for tests of what a listener does.
pub fn one_backend(listener_extra: &str, backend: SocketAddr) -> String {
    format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n{listener_extra}\n[[route]]\ncluster = \"pvwa\"\n[cluster.pvwa]\nbackends = [{{ id = \"a\", address = \"{backend}\" }}]\n"
    )
}

/// A config with an admin listener, one listener, and one route to one cluster `name`
/// whose keys are `body` (everything under `[cluster.NAME]`). The common shape of the
/// suites' configs; append more tables after it when a test needs them.
pub fn one_cluster(name: &str, body: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\ncluster = \"{name}\"\n[cluster.{name}]\n{body}\n"
    )
}

// === a TCP forwarder that can cut a path ===

/// How a [`Forwarder`] treats traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes pass both ways.
    Open,
    /// Nothing listens: connections are refused, open ones reset.
    Refused,
    /// Connections are accepted and held, but no byte passes either way (a partition
    /// that drops packets: the peer only notices through its own timeouts).
    BlackHoled,
    /// New connections carry the client's bytes to the server, but no answer comes back
    /// (a request that arrives and commits while its response is lost).
    OneWay,
}

/// A TCP forwarder in front of one address (e.g. one instance's way to etcd), whose
/// path can be cut and healed.
pub struct Forwarder {
    /// Where it listens.
    pub addr: SocketAddr,
    path: tokio::sync::watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
    accepted: Arc<AtomicUsize>,
}

impl Forwarder {
    /// Forwards `addr` to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = listen_on_free_port().await;
        let addr = listener.local_addr().unwrap();
        let (path, rx) = tokio::sync::watch::channel(Link::Open);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(Self::serve(
            Some(listener),
            addr,
            target,
            rx,
            accepted.clone(),
        ));
        Self {
            addr,
            path,
            task,
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Changes the path: open connections are reset (`Refused`) or frozen (`BlackHoled`).
    pub fn set(&self, path: Link) {
        self.path.send_replace(path);
    }

    async fn serve(
        mut listener: Option<tokio::net::TcpListener>,
        addr: SocketAddr,
        target: SocketAddr,
        mut rx: tokio::sync::watch::Receiver<Link>,
        accepted: Arc<AtomicUsize>,
    ) {
        loop {
            let path = *rx.borrow_and_update();
            match (path, &listener) {
                (Link::Refused, Some(_)) => listener = None,
                (Link::Refused, None) => {}
                (_, None) => {
                    // Listen again on the same port.
                    let mut tries = 0;
                    listener = loop {
                        match tokio::net::TcpListener::bind(addr).await {
                            Ok(l) => break Some(l),
                            Err(_) if tries < 100 => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("rebind {addr}: {e}"),
                        }
                    };
                }
                _ => {}
            }
            let Some(l) = &listener else {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            };
            tokio::select! {
                r = l.accept() => {
                    let Ok((client, _)) = r else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(Self::pipe(client, target, rx.clone()));
                }
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    async fn pipe(
        client: tokio::net::TcpStream,
        target: SocketAddr,
        mut rx: tokio::sync::watch::Receiver<Link>,
    ) {
        let first = *rx.borrow_and_update();
        if first == Link::BlackHoled {
            // Accepted, never answered: held until the path changes.
            let _ = rx.changed().await;
            return;
        }
        let Ok(server) = tokio::net::TcpStream::connect(target).await else {
            return;
        };
        if first == Link::OneWay {
            let (mut cr, _cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let drain = async {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut sr, &mut sink).await;
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = tokio::io::copy(&mut cr, &mut sw) => {}
                _ = drain => {}
                _ = rx.changed() => {}
            }
            return;
        }
        let (mut c, mut s) = (client, server);
        let cut = tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut c, &mut s) => None,
            p = async {
                loop {
                    if rx.changed().await.is_err() {
                        return Link::Refused;
                    }
                    let p = *rx.borrow_and_update();
                    if p != Link::Open {
                        return p;
                    }
                }
            } => Some(p),
        };
        if cut == Some(Link::BlackHoled) {
            // Freeze: keep both sockets, pass nothing, until healed.
            let _ = rx.wait_for(|p| *p == Link::Open).await;
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
