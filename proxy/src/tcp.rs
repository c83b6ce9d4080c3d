//! TCP listeners (`[[tcp_listener]]`): the vault port, an RDP farm, BeyondTrust policy
//! and log servers. Bytes pass unparsed in both directions to a backend of a cluster.
//!
//! One connection's life: the listener's PROXY header (when it sits behind an L4
//! balancer); the route (SNI passthrough reads the ClientHello without terminating
//! TLS, `tls` terminates with the listener's certificates, else the listener's
//! `cluster`); [`establish`], which races backends in the cluster's order (`ordered`:
//! by priority, the next one *added* after `connect_stagger` and at once after a
//! failure; `balanced`: the balancer's pick first; `affinity = "client-ip"`: the
//! client's rendezvous order) and counts a backend as established only once it passes
//! the cluster's `protocol_check` within `protocol_timeout`; then a copy both ways
//! with one fixed buffer per direction, half-close passed on, closed after
//! `idle_timeout` without a byte moving either way.
//!
//! The client's bytes that arrive before a backend is established are kept (at most
//! [`MAX_PENDING`]; past that the client is not read) and passed to every attempt, and
//! the winner receives each of them exactly once: what an attempt already wrote is its
//! offset into the kept bytes, and the rest follows after it wins. An abandoned
//! backend may have seen the first bytes; it never sees later ones.
//!
//! This module owns TCP listener sockets and their connections. It never parses the
//! bytes it carries, and it decides nothing about backend health beyond reporting
//! connect failures and protocol timeouts to passive ejection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::cluster::{Backend, Cluster, InFlight, Slot};
use crate::config::{
    Affinity, Balance, HostPattern, ProtocolCheck, SendProxy, Strategy, TcpListenerConfig,
};
use crate::forward::Runtime;
use crate::proxy_protocol::{self, Header};
use crate::server::{ConnLimit, DrainGuard};

/// Client bytes kept while no backend is established yet. Past it, keyway stops reading
/// the client until one is (the client's own flow control then holds it).
pub const MAX_PENDING: usize = 64 * 1024;
/// The copy buffer of each direction: memory per established connection is fixed.
pub const BUFFER: usize = 16 * 1024;
/// How often an established connection's idle clock and byte metrics are looked at, at
/// most (a quarter of its idle timeout when that is shorter).
const TICK: Duration = Duration::from_secs(5);

// === listeners ===

/// A bound TCP listener and what a reload may change on it.
pub struct TcpListenerHandle {
    addr: SocketAddr,
    state: ArcSwap<ListenerState>,
    limit: Arc<ConnLimit>,
    open: AtomicU64,
}

/// A TCP listener's settings, read once per accepted connection.
struct ListenerState {
    cfg: TcpListenerConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl ListenerState {
    fn new(cfg: &TcpListenerConfig) -> Self {
        let tls = crate::tls::server_config(&cfg.tls).map(|c| {
            // Whatever the farm speaks, it is not HTTP/2 by ALPN: offer no protocol.
            let mut c = (*c).clone();
            c.alpn_protocols.clear();
            tokio_rustls::TlsAcceptor::from(Arc::new(c))
        });
        Self {
            cfg: cfg.clone(),
            tls,
        }
    }
}

impl TcpListenerHandle {
    /// Binds `cfg.listen`.
    pub(crate) async fn bind(cfg: &TcpListenerConfig) -> io::Result<(TcpListener, Arc<Self>)> {
        let sock = TcpListener::bind(cfg.listen).await?;
        let addr = sock.local_addr().unwrap_or(cfg.listen);
        let handle = Arc::new(Self {
            addr,
            state: ArcSwap::from_pointee(ListenerState::new(cfg)),
            limit: Arc::new(ConnLimit::new(cfg.max_connections)),
            open: AtomicU64::new(0),
        });
        Ok((sock, handle))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes a reloaded listener's settings: new connections follow them, open ones
    /// keep theirs.
    pub(crate) fn reload(&self, cfg: &TcpListenerConfig) {
        self.state.store(Arc::new(ListenerState::new(cfg)));
        self.limit.resize(cfg.max_connections);
    }

    /// The `/status` entry of this listener.
    pub fn status_json(&self) -> serde_json::Value {
        let state = self.state.load();
        let c = &state.cfg;
        let sni: Vec<_> = c
            .sni
            .iter()
            .map(|r| {
                serde_json::json!({
                    "hosts": r.hosts.iter().map(pattern_text).collect::<Vec<_>>(),
                    "cluster": r.cluster,
                })
            })
            .collect();
        serde_json::json!({
            "listen": self.addr.to_string(),
            "cluster": c.cluster,
            "sni": sni,
            "tls": !c.tls.is_empty(),
            "proxy_protocol": match c.proxy_protocol {
                proxy_protocol::Accept::Off => "off",
                proxy_protocol::Accept::V1 => "v1",
                proxy_protocol::Accept::V2 => "v2",
                proxy_protocol::Accept::V1OrV2 => "v1-or-v2",
            },
            "idle_timeout_ms": c.idle_timeout.as_millis() as u64,
            "max_connections": c.max_connections,
            "open": self.open.load(Ordering::Relaxed),
        })
    }
}

fn pattern_text(p: &HostPattern) -> String {
    match p {
        HostPattern::Any => "*".into(),
        HostPattern::Exact(h) => h.clone(),
        HostPattern::Suffix(s) => format!("*{s}"),
    }
}

fn pattern_matches(p: &HostPattern, name: Option<&str>) -> bool {
    match (p, name) {
        (HostPattern::Any, _) => true,
        (HostPattern::Exact(h), Some(n)) => h.eq_ignore_ascii_case(n),
        (HostPattern::Suffix(s), Some(n)) => {
            n.len() > s.len()
                && n.as_bytes()[n.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
        }
        _ => false,
    }
}

/// Accepts connections until shutdown. Like HTTP listeners, a slot under
/// `max_connections` is taken before `accept`, so excess connections wait in the
/// kernel's backlog.
pub(crate) async fn accept_loop(
    sock: TcpListener,
    handle: Arc<TcpListenerHandle>,
    runtime: Arc<ArcSwap<Runtime>>,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    let label = handle.addr.to_string();
    let accepted = metrics::counter!("keyway_tcp_accepted_total", "listener" => label.clone());
    loop {
        let slot = match handle.limit.free.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics::counter!("keyway_listener_limit_reached_total", "listener" => label.clone())
                    .increment(1);
                tokio::select! {
                    s = handle.limit.free.clone().acquire_owned() => match s {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = shutdown.changed() => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            r = sock.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        accepted.increment(1);
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            handle: handle.clone(),
            state: handle.state.load_full(),
            runtime: runtime.load_full(),
            label: label.clone(),
            _guard: DrainGuard::new(drain.clone(), Some(slot)),
        };
        tokio::spawn(conn.serve(stream, peer));
    }
    tracing::info!(listen = %label, "stopped accepting TCP connections");
}

// === one connection ===

struct Conn {
    handle: Arc<TcpListenerHandle>,
    state: Arc<ListenerState>,
    runtime: Arc<Runtime>,
    label: String,
    _guard: DrainGuard,
}

/// Why a connection ended (the access log's `close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// Both sides finished.
    Done,
    /// No byte moved for `idle_timeout`.
    IdleTimeout,
    /// The client's side failed.
    ClientError,
    /// The backend's side failed once established.
    BackendError,
    /// No backend could be established.
    NoBackend,
    /// Refused before routing: bad PROXY header, ClientHello or TLS handshake, or no
    /// route for the name.
    Refused,
}

impl Close {
    fn as_str(self) -> &'static str {
        match self {
            Close::Done => "done",
            Close::IdleTimeout => "idle-timeout",
            Close::ClientError => "client-error",
            Close::BackendError => "backend-error",
            Close::NoBackend => "no-backend",
            Close::Refused => "refused",
        }
    }
}

/// What the access line says about a connection.
struct ConnLog {
    client: SocketAddr,
    cluster: Option<Arc<Cluster>>,
    backend: Option<usize>,
    up: u64,
    down: u64,
    close: Close,
    error: Option<String>,
}

impl ConnLog {
    fn fail(&mut self, close: Close, error: impl Into<String>) {
        self.close = close;
        self.error = Some(error.into());
    }
}

impl Conn {
    async fn serve(self, mut stream: TcpStream, peer: SocketAddr) {
        let started = Instant::now();
        self.handle.open.fetch_add(1, Ordering::Relaxed);
        let mut log = ConnLog {
            client: peer,
            cluster: None,
            backend: None,
            up: 0,
            down: 0,
            close: Close::Done,
            error: None,
        };
        self.route(&mut stream, peer, &mut log).await;
        self.handle.open.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!("keyway_tcp_closed_total", "listener" => self.label.clone(), "reason" => log.close.as_str())
            .increment(1);
        if self.runtime.access_log {
            let cluster = log.cluster.as_ref();
            tracing::info!(
                target: "keyway::access",
                kind = "tcp",
                listener = %self.label,
                client = %log.client,
                cluster = cluster.map(|c| c.cfg.name.as_str()).unwrap_or(""),
                backend = cluster
                    .zip(log.backend)
                    .map(|(c, b)| c.backends[b].cfg.id.as_str())
                    .unwrap_or(""),
                up = log.up,
                down = log.down,
                close = log.close.as_str(),
                error = log.error.as_deref().unwrap_or(""),
                ms = started.elapsed().as_secs_f64() * 1000.0,
            );
        }
    }

    /// PROXY header, then the route: SNI passthrough, TLS termination or the listener's
    /// cluster.
    async fn route(&self, stream: &mut TcpStream, peer: SocketAddr, log: &mut ConnLog) {
        let cfg = &self.state.cfg;
        let limit = cfg.handshake_timeout;
        let header = match proxy_protocol::read_header(stream, cfg.proxy_protocol, limit).await {
            Ok(h) => h,
            Err(e) => {
                metrics::counter!("keyway_proxy_protocol_rejected_total").increment(1);
                return log.fail(Close::Refused, e.to_string());
            }
        };
        log.client = header.client(peer);
        let destination = match header {
            Header::Proxy { destination, .. } => destination,
            _ => stream.local_addr().unwrap_or(self.handle.addr),
        };
        let to_backend = Header::Proxy {
            source: log.client,
            destination,
        };
        let mut hello = Vec::new();
        let mut cluster = cfg.cluster.as_deref();
        let mut terminate = self.state.tls.clone();
        if !cfg.sni.is_empty() {
            let read = tokio::time::timeout(limit, crate::sni::read_hello(stream)).await;
            let name = match read {
                Ok(Ok((name, bytes))) => {
                    hello = bytes;
                    name
                }
                Ok(Err(e)) => return log.fail(Close::Refused, e.to_string()),
                Err(_) => {
                    return log.fail(
                        Close::Refused,
                        format!("no complete ClientHello within {limit:?}"),
                    )
                }
            };
            if let Some(r) = cfg
                .sni
                .iter()
                .find(|r| r.hosts.iter().any(|h| pattern_matches(h, name.as_deref())))
            {
                cluster = Some(&r.cluster);
                terminate = None;
            } else if cluster.is_none() {
                return log.fail(
                    Close::Refused,
                    format!(
                        "no SNI route takes server name {:?} and the listener names no cluster",
                        name.as_deref().unwrap_or("(none)")
                    ),
                );
            }
        }
        let Some(cluster) = cluster.and_then(|c| self.runtime.cluster(c)).cloned() else {
            return log.fail(Close::NoBackend, "the listener's cluster is not configured");
        };
        log.cluster = Some(cluster.clone());
        let client_ip = log.client.ip();
        match terminate {
            None => carry(&cluster, stream, hello, client_ip, to_backend, cfg, log).await,
            Some(acceptor) => {
                let io = Rewind {
                    prefix: hello,
                    at: 0,
                    inner: stream,
                };
                match tokio::time::timeout(limit, acceptor.accept(io)).await {
                    Ok(Ok(mut tls)) => {
                        carry(
                            &cluster,
                            &mut tls,
                            Vec::new(),
                            client_ip,
                            to_backend,
                            cfg,
                            log,
                        )
                        .await
                    }
                    Ok(Err(e)) => log.fail(Close::Refused, format!("TLS handshake: {e}")),
                    Err(_) => {
                        log.fail(Close::Refused, format!("no TLS handshake within {limit:?}"))
                    }
                }
            }
        }
    }
}

/// Establishes a backend for the client and copies bytes both ways until both sides
/// are done, the idle timeout passes, or a side fails.
async fn carry<IO>(
    cluster: &Arc<Cluster>,
    client: &mut IO,
    initial: Vec<u8>,
    client_ip: IpAddr,
    header: Header,
    cfg: &TcpListenerConfig,
    log: &mut ConnLog,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let order = order(cluster, client_ip);
    if order.is_empty() {
        return log.fail(
            Close::NoBackend,
            format!("cluster `{}` has no healthy backend", cluster.cfg.name),
        );
    }
    let est = match establish(cluster, &order, client, initial, header).await {
        Ok(est) => est,
        Err(Failed::Client(e)) => return log.fail(Close::ClientError, e),
        Err(Failed::Backends(e)) => return log.fail(Close::NoBackend, e),
    };
    let backend = est.inflight.backend().clone();
    log.backend = Some(backend.index);
    let labels = [
        ("cluster", cluster.cfg.name.clone()),
        ("backend", backend.cfg.id.clone()),
    ];
    metrics::counter!("keyway_tcp_connections_total", &labels).increment(1);
    let open = metrics::gauge!("keyway_tcp_connections_open", &labels);
    open.increment(1.0);
    let meter = Arc::new(Meter::default());
    let mut bytes = BytesMetrics {
        up: metrics::counter!("keyway_tcp_bytes_total", "cluster" => labels[0].1.clone(), "backend" => labels[1].1.clone(), "direction" => "up"),
        down: metrics::counter!("keyway_tcp_bytes_total", "cluster" => labels[0].1.clone(), "backend" => labels[1].1.clone(), "direction" => "down"),
        flushed: (0, 0),
    };
    // What moved while the backend was being established.
    let (early_up, early_down) = (est.sent as u64, est.first.len() as u64);
    let mut server = Metered {
        inner: est.stream,
        meter: meter.clone(),
    };
    let outcome = async {
        server.write_all(&est.rest).await.map_err(Side::backend)?;
        client.write_all(&est.first).await.map_err(Side::client)?;
        if est.client_eof {
            // The client finished before the backend was up: only the answer is left.
            if !est.shut {
                server.shutdown().await.map_err(Side::backend)?;
            }
            let mut buf = vec![0u8; BUFFER];
            loop {
                let n = server.read(&mut buf).await.map_err(Side::backend)?;
                if n == 0 {
                    break;
                }
                client.write_all(&buf[..n]).await.map_err(Side::client)?;
            }
            client.shutdown().await.map_err(Side::client)?;
            Ok(())
        } else {
            tokio::io::copy_bidirectional_with_sizes(client, &mut server, BUFFER, BUFFER)
                .await
                .map(|_| ())
                .map_err(|e| {
                    if meter.backend_failed.load(Ordering::Relaxed) {
                        Side::Backend(e.to_string())
                    } else {
                        Side::Client(e.to_string())
                    }
                })
        }
    };
    tokio::pin!(outcome);
    let idle = cfg.idle_timeout;
    let tick = (idle / 4).clamp(Duration::from_millis(10), TICK);
    let mut last = meter.total();
    let mut quiet = Duration::ZERO;
    let result = loop {
        tokio::select! {
            r = &mut outcome => break r,
            _ = tokio::time::sleep(tick) => {
                bytes.flush(&meter, early_up, early_down);
                let now = meter.total();
                if now != last {
                    last = now;
                    quiet = Duration::ZERO;
                } else {
                    quiet += tick;
                    if quiet >= idle {
                        break Err(Side::Idle);
                    }
                }
            }
        }
    };
    match result {
        Ok(()) => {}
        Err(Side::Idle) => log.fail(
            Close::IdleTimeout,
            format!("no byte moved for {}", humantime::format_duration(idle)),
        ),
        Err(Side::Client(e)) => log.fail(Close::ClientError, e),
        Err(Side::Backend(e)) => {
            backend.record_error(&format!("TCP connection broke: {e}"));
            log.fail(Close::BackendError, e)
        }
    }
    bytes.flush(&meter, early_up, early_down);
    log.up = early_up + meter.up.load(Ordering::Relaxed);
    log.down = early_down + meter.down.load(Ordering::Relaxed);
    open.decrement(1.0);
    drop(est.inflight);
}

enum Side {
    Client(String),
    Backend(String),
    Idle,
}

impl Side {
    fn client(e: io::Error) -> Side {
        Side::Client(e.to_string())
    }
    fn backend(e: io::Error) -> Side {
        Side::Backend(e.to_string())
    }
}

/// The byte counters of one connection, flushed as deltas.
struct BytesMetrics {
    up: metrics::Counter,
    down: metrics::Counter,
    flushed: (u64, u64),
}

impl BytesMetrics {
    fn flush(&mut self, meter: &Meter, early_up: u64, early_down: u64) {
        let up = early_up + meter.up.load(Ordering::Relaxed);
        let down = early_down + meter.down.load(Ordering::Relaxed);
        self.up.increment(up - self.flushed.0);
        self.down.increment(down - self.flushed.1);
        self.flushed = (up, down);
    }
}

// === choosing and establishing a backend ===

/// The backends to try for a client, most preferred first: usable ones only.
fn order(cluster: &Cluster, client: IpAddr) -> Vec<usize> {
    let view = cluster.health.view_full();
    let now = view.any_ejected().then(Instant::now);
    let usable = |i: usize| view.usable(i, now);
    let backends = &cluster.backends;
    let n = backends.len();
    let mut order: Vec<usize> = if cluster.cfg.tcp.affinity == Affinity::ClientIp {
        crate::affinity::rank(
            client,
            backends.iter().map(|b| (b.cfg.id.as_str(), b.cfg.weight)),
        )
    } else if cluster.cfg.strategy == Strategy::Ordered {
        let mut o = cluster.by_priority.clone();
        if cluster.cfg.balance == Balance::Random {
            shuffle_within_priority(cluster, &mut o);
        }
        o
    } else {
        // The balancer's pick (a backend with a free slot first), then the rest in turn.
        let free = |i: usize| usable(i) && backends[i].has_free_slot();
        let first = cluster
            .balancer
            .pick(backends, free)
            .or_else(|| cluster.balancer.pick(backends, usable))
            .unwrap_or(0);
        (0..n).map(|k| (first + k) % n.max(1)).collect()
    };
    order.retain(|&i| usable(i));
    // Degraded backends are standbys: after every healthy one (stable, so each group
    // keeps the order above).
    order.sort_by_key(|&i| view.standby(i));
    order
}

/// `randomizelogservers`: shuffle backends of equal priority, keep tiers in order.
fn shuffle_within_priority(cluster: &Cluster, order: &mut [usize]) {
    let mut start = 0;
    while start < order.len() {
        let p = cluster.backends[order[start]].cfg.priority;
        let end = order[start..]
            .iter()
            .position(|&i| cluster.backends[i].cfg.priority != p)
            .map_or(order.len(), |n| start + n);
        fastrand::shuffle(&mut order[start..end]);
        start = end;
    }
}

/// Why no backend was established.
enum Failed {
    /// Reading the client failed.
    Client(String),
    /// Every backend in the order failed, was full, or timed out.
    Backends(String),
}

/// A backend that passed the protocol check.
struct Established {
    stream: TcpStream,
    inflight: InFlight,
    /// Client bytes the winner already received.
    sent: usize,
    /// Client bytes kept but not yet sent to the winner.
    rest: Bytes,
    /// Bytes the winner sent during the check, owed to the client.
    first: Vec<u8>,
    /// The client ended its side before the winner was up.
    client_eof: bool,
    /// The winner's write side is already shut (after the client's end).
    shut: bool,
}

/// The client's bytes so far, and whether it has ended its side.
type Kept = (Bytes, bool);

/// One attempt's success.
struct Won {
    stream: TcpStream,
    sent: usize,
    first: Vec<u8>,
    shut: bool,
}

/// Why one attempt failed. `client_bytes`: the attempt had passed client bytes on, so
/// the failure may be the client's doing (bytes that make a backend close or wait for
/// more) and counts against nobody.
enum AttemptError {
    Connect(String),
    ProtocolTimeout { detail: String, client_bytes: bool },
    Check { detail: String, client_bytes: bool },
}

type Attempt =
    Pin<Box<dyn std::future::Future<Output = (usize, Slot, Result<Won, AttemptError>)> + Send>>;

/// Races backends in `order`; see the module documentation.
async fn establish<IO>(
    cluster: &Arc<Cluster>,
    order: &[usize],
    client: &mut IO,
    initial: Vec<u8>,
    header: Header,
) -> Result<Established, Failed>
where
    IO: AsyncRead + Unpin,
{
    let cfg = &cluster.cfg;
    let staggered = cfg.strategy == Strategy::Ordered;
    let mut kept = initial;
    let (tx, rx) = watch::channel::<Kept>((Bytes::from(kept.clone()), false));
    let mut eof = false;
    let mut pending: FuturesUnordered<Attempt> = FuturesUnordered::new();
    let mut next = 0;
    let mut deadline = tokio::time::Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    let handoffs =
        metrics::counter!("keyway_tcp_stagger_handoffs_total", "cluster" => cfg.name.clone());
    loop {
        let now = tokio::time::Instant::now();
        while next < order.len() && (pending.is_empty() || (staggered && now >= deadline)) {
            let i = order[next];
            next += 1;
            let backend = &cluster.backends[i];
            let Some(slot) = backend.try_slot() else {
                failures.push(format!(
                    "backend `{}` carries its max_connections ({})",
                    backend.cfg.id, backend.cfg.max_connections
                ));
                continue;
            };
            if !pending.is_empty() {
                // The stagger passed with the earlier ones still pending: add this one.
                handoffs.increment(1);
                tracing::debug!(cluster = %cfg.name, backend = %backend.cfg.id, "stagger: next backend added");
            }
            let send = cfg.tcp.send_proxy.get(i).copied().unwrap_or(SendProxy::Off);
            let attempt = attempt(
                backend.clone(),
                proxy_header(send, &header),
                rx.clone(),
                cfg.tcp.protocol_check,
                cfg.connect_timeout,
                cfg.protocol_timeout,
            );
            pending.push(Box::pin(async move { (i, slot, attempt.await) }));
            deadline = now + cfg.connect_stagger;
        }
        if pending.is_empty() {
            return Err(Failed::Backends(format!(
                "no backend of cluster `{}` was established: {}",
                cfg.name,
                failures.join("; ")
            )));
        }
        let read_more = !eof && kept.len() < MAX_PENDING;
        let room = MAX_PENDING.saturating_sub(kept.len()).min(chunk.len());
        tokio::select! {
            biased;
            Some((i, slot, result)) = pending.next() => {
                let backend = &cluster.backends[i];
                match result {
                    Ok(won) => {
                        backend.report_answer(crate::health::Fault::None);
                        let inflight = backend.start_request(slot);
                        let all = tx.borrow().0.clone();
                        return Ok(Established {
                            stream: won.stream,
                            inflight,
                            sent: won.sent,
                            rest: all.slice(won.sent..),
                            first: won.first,
                            client_eof: eof,
                            shut: won.shut,
                        });
                    }
                    Err(e) => {
                        let (detail, client_bytes) = match e {
                            AttemptError::Connect(d) => (d, false),
                            AttemptError::Check { detail, client_bytes } => (detail, client_bytes),
                            AttemptError::ProtocolTimeout { detail, client_bytes } => {
                                metrics::counter!("keyway_tcp_protocol_timeouts_total", "cluster" => cfg.name.clone(), "backend" => backend.cfg.id.clone()).increment(1);
                                (detail, client_bytes)
                            }
                        };
                        tracing::debug!(cluster = %cfg.name, backend = %backend.cfg.id, error = %detail, client_bytes, "TCP backend attempt failed");
                        // Only a failure the client cannot have caused counts against
                        // the backend (passive ejection, last_error).
                        if !client_bytes {
                            backend.record_connect_error(&detail);
                        }
                        failures.push(detail);
                        // A failure hands over to the next backend at once.
                        deadline = tokio::time::Instant::now();
                    }
                }
            }
            r = client.read(&mut chunk[..room]), if read_more => match r {
                Ok(0) => {
                    eof = true;
                    tx.send_modify(|k| k.1 = true);
                }
                Ok(n) => {
                    kept.extend_from_slice(&chunk[..n]);
                    let bytes = Bytes::from(kept.clone());
                    tx.send_modify(|k| k.0 = bytes);
                }
                Err(e) => return Err(Failed::Client(e.to_string())),
            },
            _ = tokio::time::sleep_until(deadline), if staggered && next < order.len() => {}
        }
    }
}

fn proxy_header(send: SendProxy, header: &Header) -> Vec<u8> {
    match send {
        SendProxy::Off => Vec::new(),
        SendProxy::V1 => proxy_protocol::encode_v1(header),
        SendProxy::V2 => proxy_protocol::encode_v2(header),
    }
}

/// Connects to one backend, sends its PROXY header and the client's bytes as they
/// come, and waits for the protocol check.
async fn attempt(
    backend: Arc<Backend>,
    header: Vec<u8>,
    mut kept: watch::Receiver<Kept>,
    check: ProtocolCheck,
    connect_timeout: Duration,
    protocol_timeout: Duration,
) -> Result<Won, AttemptError> {
    let id = &backend.cfg.id;
    let addr = backend.cfg.address;
    let mut stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(AttemptError::Connect(format!(
                "backend `{id}` ({addr}): connect: {e}"
            )))
        }
        Err(_) => {
            return Err(AttemptError::Connect(format!(
                "backend `{id}` ({addr}) did not accept a connection within {connect_timeout:?}"
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let mut sent = 0;
    let mut shut = false;
    let mut first = Vec::with_capacity(4096);
    let checked = async {
        stream.write_all(&header).await?;
        loop {
            let (bytes, eof) = kept.borrow_and_update().clone();
            if bytes.len() > sent {
                stream.write_all(&bytes[sent..]).await?;
                sent = bytes.len();
            }
            if eof && !shut {
                stream.shutdown().await?;
                shut = true;
            }
            if check == ProtocolCheck::None {
                return Ok(());
            }
            tokio::select! {
                r = stream.read_buf(&mut first) => {
                    let n = r?;
                    if n == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed the connection before sending a byte"));
                    }
                    return Ok(());
                }
                changed = kept.changed() => {
                    if changed.is_err() {
                        // The race is over; this attempt is about to be dropped.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    };
    let result = tokio::time::timeout(protocol_timeout, checked).await;
    let client_bytes = sent > 0 || shut;
    match result {
        Err(_) => Err(AttemptError::ProtocolTimeout {
            detail: format!(
                "backend `{id}` ({addr}) accepted but sent nothing within protocol_timeout ({protocol_timeout:?})"
            ),
            client_bytes,
        }),
        Ok(Err(e)) => Err(AttemptError::Check {
            detail: format!("backend `{id}` ({addr}): {e}"),
            client_bytes,
        }),
        Ok(Ok(())) => {
            if check == ProtocolCheck::Tls && first.first() != Some(&22) {
                return Err(AttemptError::Check {
                    detail: format!(
                        "backend `{id}` ({addr}) answered, but not with a TLS handshake (protocol_check = \"tls\")"
                    ),
                    client_bytes,
                });
            }
            Ok(Won {
                stream,
                sent,
                first,
                shut,
            })
        }
    }
}

// === I/O wrappers ===

/// Bytes moved through the backend side of a connection, both ways.
#[derive(Default)]
struct Meter {
    up: AtomicU64,
    down: AtomicU64,
    backend_failed: AtomicBool,
}

impl Meter {
    fn total(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

/// The backend stream, counting what it reads (down) and writes (up), and noting
/// whether an error came from it.
struct Metered {
    inner: TcpStream,
    meter: Arc<Meter>,
}

impl Metered {
    fn note<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(_)) = &r {
            self.meter.backend_failed.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.meter.down.fetch_add(n as u64, Ordering::Relaxed);
        self.note(r)
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.meter.up.fetch_add(*n as u64, Ordering::Relaxed);
        }
        self.note(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }
}

/// A stream whose first bytes were already read (a ClientHello): they are read again
/// first, then the stream.
struct Rewind<'a> {
    prefix: Vec<u8>,
    at: usize,
    inner: &'a mut TcpStream,
}

impl AsyncRead for Rewind<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns_match_names() {
        let exact = HostPattern::Exact("logs.corp.test".into());
        let suffix = HostPattern::Suffix(".corp.test".into());
        assert!(pattern_matches(&exact, Some("LOGS.corp.test")));
        assert!(!pattern_matches(&exact, None));
        assert!(pattern_matches(&suffix, Some("a.corp.test")));
        assert!(!pattern_matches(&suffix, Some("corp.test")));
        assert!(!pattern_matches(&suffix, Some("xcorp.test")));
        assert!(pattern_matches(&HostPattern::Any, None));
    }

    #[tokio::test]
    async fn rewind_replays_the_hello_then_reads_the_socket() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"world").await.unwrap();
        });
        let (mut s, _) = l.accept().await.unwrap();
        let mut r = Rewind {
            prefix: b"hello ".to_vec(),
            at: 0,
            inner: &mut s,
        };
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
        client.await.unwrap();
    }
}
