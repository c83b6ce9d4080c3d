//! Assembles a running keyway from a [`Config`]: binds listeners, builds the runtime
//! snapshot, serves client connections (plain or TLS, HTTP/1.1 and HTTP/2), enforces
//! header-read and idle timeouts, caps open connections per listener, and drains on
//! shutdown.
//!
//! Everything the request path reads is published through one `ArcSwap<Runtime>`, so a
//! later reload builds a new runtime and swaps it in without touching live connections.
//! This module owns sockets and tasks; it makes no routing decision itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::cluster::Cluster;
use crate::config::{Config, ListenerConfig};
use crate::failover::Failover;
use crate::forward::{self, ConnInfo, Runtime};
use crate::router::Router;
use crate::{admin, http_conn, proxy_protocol, telemetry, tls};

/// Why keyway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using it?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Runtime state could not be built from the config.
    #[error("{0}")]
    Build(String),
    /// The stored promotion decisions could not be read.
    #[error("{0}")]
    State(String),
}

/// Builds the request path's snapshot from a config.
pub fn build_runtime(config: &Config, failover: &Failover) -> Result<Runtime, String> {
    telemetry::metrics_handle();
    let secret: &[u8] = match &config.proxy.secret {
        Some(s) => s,
        None => process_secret(),
    };
    let clusters: Vec<Arc<Cluster>> = config
        .clusters
        .iter()
        .map(|c| {
            let mut cluster = Cluster::new(c.clone(), secret)?;
            if let Some(gate) = failover.gate(&c.name) {
                cluster.gate = gate;
            }
            // The stored topology, before the cluster serves a request.
            failover.apply_to(&cluster);
            Ok::<_, String>(Arc::new(cluster))
        })
        .collect::<Result<_, _>>()?;
    let router = Router::new(&config.routes, |name| {
        let i = clusters.iter().position(|c| c.cfg.name == name)?;
        Some((i, clusters[i].cfg.paths))
    });
    Ok(Runtime {
        router,
        clusters,
        access_log: config.proxy.access_log,
        permit: failover.permit().clone(),
    })
}

/// A random key for this process, used when the config names no `secret_file`.
fn process_secret() -> &'static [u8] {
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        let mut key = [0u8; 32];
        // The OS generator failing leaves a weaker but still unpredictable-per-start key.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).is_err() {
            for b in &mut key {
                *b = fastrand::u8(..);
            }
        }
        key
    })
}

// === reload ===

/// Applies a new config to a running server: build, validate, swap. A config that fails
/// any step leaves the running one untouched and reports every error.
pub struct Reloader {
    runtime: Arc<ArcSwap<Runtime>>,
    listeners: Vec<Arc<ArcSwap<ListenerState>>>,
    conn_limits: Vec<Arc<ConnLimit>>,
    tcp: Vec<Arc<crate::tcp::TcpListenerHandle>>,
    current: std::sync::Mutex<Config>,
    source: std::sync::Mutex<Option<std::path::PathBuf>>,
    shutdown: watch::Receiver<bool>,
    last: std::sync::Mutex<Option<serde_json::Value>>,
    failover: Arc<Failover>,
}

impl Reloader {
    /// Promotion, fencing and failback (shared with the admin API).
    pub fn failover(&self) -> &Arc<Failover> {
        &self.failover
    }

    /// The admin token of the running config (a reload may rotate it).
    pub fn admin_token(&self) -> Option<Arc<str>> {
        self.current
            .lock()
            .ok()
            .and_then(|c| c.admin.as_ref().and_then(|a| a.token.clone()))
    }

    /// The TCP listeners for `/status`.
    pub fn tcp_status_json(&self) -> serde_json::Value {
        self.tcp.iter().map(|t| t.status_json()).collect()
    }

    /// The outcome of the last reload (for `/status`), `null` before the first.
    pub fn last_json(&self) -> serde_json::Value {
        self.last
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Re-reads the config file the server was started from and applies it.
    pub fn reload(&self) -> Result<String, String> {
        let path = self
            .source
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| {
                "this keyway was not started from a config file; nothing to reload".to_string()
            })?;
        let result = Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| self.apply(c));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        if let Ok(mut last) = self.last.lock() {
            let unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            *last = Some(serde_json::json!({
                "unix_time": unix,
                "result": outcome,
                "detail": match &result { Ok(s) => s, Err(e) => e },
            }));
        }
        metrics::counter!("keyway_config_reloads_total", "result" => outcome).increment(1);
        match &result {
            Ok(summary) => {
                tracing::info!(file = %path.display(), %summary, "configuration reloaded")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "configuration reload refused; the running configuration stays")
            }
        }
        result
    }

    /// The plugin files the running configuration loaded.
    pub fn plugin_files(&self) -> Vec<std::path::PathBuf> {
        let Ok(current) = self.current.lock() else {
            return Vec::new();
        };
        let mut files: Vec<std::path::PathBuf> = current
            .clusters
            .iter()
            .flat_map(|c| c.plugins().into_iter().map(|(_, m)| m.path.clone()))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// Applies an already validated config.
    pub fn apply(&self, next: Config) -> Result<String, String> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| "reload state poisoned".to_string())?;
        let old_listen: Vec<SocketAddr> = current.listeners.iter().map(|l| l.listen).collect();
        let new_listen: Vec<SocketAddr> = next.listeners.iter().map(|l| l.listen).collect();
        if old_listen != new_listen {
            return Err(format!(
                "listener addresses changed ({old_listen:?} -> {new_listen:?}); restart keyway to apply them. Nothing was changed"
            ));
        }
        let tcp_listen = |c: &Config| c.tcp_listeners.iter().map(|l| l.listen).collect::<Vec<_>>();
        if tcp_listen(&current) != tcp_listen(&next) {
            return Err(format!(
                "tcp_listener addresses changed ({:?} -> {:?}); restart keyway to apply them. Nothing was changed",
                tcp_listen(&current),
                tcp_listen(&next)
            ));
        }
        let admin = |c: &Config| c.admin.as_ref().map(|a| a.listen);
        if admin(&current) != admin(&next) {
            return Err(
                "the [admin] address changed; restart keyway to apply it. Nothing was changed"
                    .into(),
            );
        }
        self.failover.prepare(&next)?;
        let runtime = build_runtime(&next, &self.failover)?;
        let old = self.runtime.load_full();
        for cluster in &runtime.clusters {
            let Some(prev) = old.cluster(&cluster.cfg.name) else {
                continue;
            };
            let pairs: Vec<(usize, usize)> = cluster
                .backends
                .iter()
                .enumerate()
                .filter_map(|(n, b)| {
                    prev.backends
                        .iter()
                        .position(|p| p.cfg.id == b.cfg.id && p.cfg.address == b.cfg.address)
                        .map(|o| (n, o))
                })
                .collect();
            cluster.health.inherit(&prev.health, &pairs);
        }
        let summary = format!(
            "{} route(s), {} cluster(s), {} backend(s)",
            next.routes.len(),
            runtime.clusters.len(),
            runtime
                .clusters
                .iter()
                .map(|c| c.backends.len())
                .sum::<usize>()
        );
        let runtime = Arc::new(runtime);
        for c in &runtime.clusters {
            crate::health::spawn_probers(c, self.shutdown.clone());
        }
        self.failover
            .swap_in(&self.runtime, runtime.clone(), &self.shutdown);
        for (state, cfg) in self.listeners.iter().zip(&next.listeners) {
            state.store(Arc::new(ListenerState::new(cfg)));
        }
        for (limit, cfg) in self.conn_limits.iter().zip(&next.listeners) {
            limit.resize(cfg.max_connections);
        }
        for (handle, cfg) in self.tcp.iter().zip(&next.tcp_listeners) {
            handle.reload(cfg);
        }
        *current = next;
        Ok(summary)
    }
}

// === drain ===

/// Held by every client connection and the tunnels upgraded from it: shutdown waits
/// until all are dropped, and the connection's slot under its listener's
/// `max_connections` is free again only when the last of them goes.
#[derive(Clone)]
pub struct DrainGuard(#[allow(dead_code)] Arc<(mpsc::Sender<()>, Option<OwnedSemaphorePermit>)>);

impl DrainGuard {
    /// A guard for one client connection, holding its listener slot if it has one.
    pub(crate) fn new(drain: mpsc::Sender<()>, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self(Arc::new((drain, slot)))
    }
}

// === connection limits ===

/// A listener's cap on open client connections: a permit is taken *before* `accept`,
/// so connections past the cap wait in the kernel's backlog instead of being accepted
/// and dropped. A reload resizes it in place; open connections keep their permits.
pub(crate) struct ConnLimit {
    pub(crate) free: Arc<Semaphore>,
    size: std::sync::Mutex<u32>,
}

impl ConnLimit {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            free: Arc::new(Semaphore::new(size as usize)),
            size: std::sync::Mutex::new(size),
        }
    }

    pub(crate) fn resize(&self, next: u32) {
        let Ok(mut size) = self.size.lock() else {
            return;
        };
        let old = std::mem::replace(&mut *size, next);
        if next > old {
            self.free.add_permits((next - old) as usize);
        } else if next < old {
            let surplus = (old - next) as usize;
            let gone = self.free.forget_permits(surplus);
            if gone < surplus {
                // The rest are held by open connections: retire them as those close.
                // The semaphore is fair, so no new connection is admitted before.
                let free = self.free.clone();
                let rest = u32::try_from(surplus - gone).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = free.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
    }
}

// === Server ===

/// A running keyway instance.
pub struct Server {
    listen_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    runtime: Arc<ArcSwap<Runtime>>,
    reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    drain_tx: Option<mpsc::Sender<()>>,
    drain_rx: mpsc::Receiver<()>,
    drain_timeout: Duration,
    plugin_watcher: std::sync::Mutex<Option<crate::watch::PluginWatcher>>,
}

/// How long plugin files must be quiet after a change before keyway reloads.
const PLUGIN_WATCH_DEBOUNCE: Duration = Duration::from_millis(300);

impl Server {
    /// Binds every listener and the admin server, then starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let failover = Failover::open(&config, crate::failover::Access::Owner)
            .await
            .map_err(StartError::State)?;
        let runtime = Arc::new(ArcSwap::from_pointee(
            build_runtime(&config, &failover).map_err(StartError::Build)?,
        ));
        let (shutdown, _) = watch::channel(false);
        let (drain_tx, drain_rx) = mpsc::channel(1);

        let mut listen_addrs = Vec::new();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let sock = TcpListener::bind(l.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: l.listen,
                    source,
                })?;
            listen_addrs.push(sock.local_addr().unwrap_or(l.listen));
            bound.push((sock, l.clone()));
        }
        let mut tcp_bound = Vec::new();
        for l in &config.tcp_listeners {
            let bound = crate::tcp::TcpListenerHandle::bind(l)
                .await
                .map_err(|source| StartError::Bind {
                    addr: l.listen,
                    source,
                })?;
            tcp_bound.push(bound);
        }
        for c in &runtime.load().clusters {
            crate::health::spawn_probers(c, shutdown.subscribe());
        }
        failover.start(runtime.clone(), shutdown.subscribe());
        let listener_states: Vec<Arc<ArcSwap<ListenerState>>> = config
            .listeners
            .iter()
            .map(|l| Arc::new(ArcSwap::from_pointee(ListenerState::new(l))))
            .collect();
        let conn_limits: Vec<Arc<ConnLimit>> = config
            .listeners
            .iter()
            .map(|l| Arc::new(ConnLimit::new(l.max_connections)))
            .collect();
        let reloader = Arc::new(Reloader {
            runtime: runtime.clone(),
            listeners: listener_states.clone(),
            conn_limits: conn_limits.clone(),
            tcp: tcp_bound.iter().map(|(_, h)| h.clone()).collect(),
            current: std::sync::Mutex::new(config.clone()),
            source: std::sync::Mutex::new(None),
            shutdown: shutdown.subscribe(),
            last: std::sync::Mutex::new(None),
            failover: failover.clone(),
        });
        let admin_addr = match &config.admin {
            Some(a) => {
                let sock =
                    TcpListener::bind(a.listen)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: a.listen,
                            source,
                        })?;
                let addr = sock.local_addr().unwrap_or(a.listen);
                tokio::spawn(admin::serve(
                    sock,
                    runtime.clone(),
                    reloader.clone(),
                    shutdown.subscribe(),
                ));
                Some(addr)
            }
            None => None,
        };
        for ((((sock, cfg), addr), state), limit) in bound
            .into_iter()
            .zip(&listen_addrs)
            .zip(listener_states)
            .zip(conn_limits)
        {
            tracing::info!(listen = %addr, tls = !cfg.tls.is_empty(), "listening");
            tokio::spawn(accept_loop(
                sock,
                addr.to_string(),
                state,
                limit,
                runtime.clone(),
                shutdown.subscribe(),
                drain_tx.clone(),
            ));
        }
        let tcp_addrs = tcp_bound.iter().map(|(_, h)| h.addr()).collect();
        for (sock, handle) in tcp_bound {
            tracing::info!(listen = %handle.addr(), "listening (TCP)");
            tokio::spawn(crate::tcp::accept_loop(
                sock,
                handle,
                runtime.clone(),
                shutdown.subscribe(),
                drain_tx.clone(),
            ));
        }
        Ok(Server {
            tcp_addrs,
            plugin_watcher: std::sync::Mutex::new(None),
            listen_addrs,
            admin_addr,
            runtime,
            reloader,
            shutdown,
            drain_tx: Some(drain_tx),
            drain_rx,
            drain_timeout: config.proxy.drain_timeout,
        })
    }

    /// Bound addresses of the listeners, in config order (ports resolved when `:0`).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Bound addresses of the TCP listeners, in config order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Bound address of the admin server, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Remembers the file this server's config came from, so reloads re-read it.
    /// Also starts the plugin-file watcher, unless `[proxy] watch_plugins = false`.
    pub fn set_config_source(&self, path: std::path::PathBuf) {
        if let Ok(mut s) = self.reloader.source.lock() {
            *s = Some(path);
        }
        let watch = self
            .reloader
            .current
            .lock()
            .is_ok_and(|c| c.proxy.watch_plugins);
        if watch {
            match crate::watch::watch_plugins(self.reloader.clone(), PLUGIN_WATCH_DEBOUNCE) {
                Ok(w) => {
                    if let Ok(mut slot) = self.plugin_watcher.lock() {
                        *slot = Some(w);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "plugin files are not watched; reload with SIGHUP or POST /plugins/reload")
                }
            }
        }
    }

    /// Re-reads the config file and applies it (see [`Reloader::reload`]).
    pub fn reload(&self) -> Result<String, String> {
        self.reloader.reload()
    }

    /// The reloader, for callers that outlive a borrow of the server (signal handlers).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// The live runtime snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Stops accepting, lets in-flight requests finish for up to the drain timeout, then
    /// returns. Returns `true` if everything drained in time.
    pub async fn shutdown(mut self) -> bool {
        let _ = self.shutdown.send(true);
        self.drain_tx.take();
        let drained = tokio::time::timeout(self.drain_timeout, self.drain_rx.recv())
            .await
            .is_ok();
        self.reloader.failover().release();
        if drained {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout reached; closing remaining connections");
        }
        drained
    }
}

/// What a reload may change on a running listener: certificates and limits. Read once
/// per accepted connection; connections keep the settings they started with.
struct ListenerState {
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Arc<crate::config::Limits>,
    door: Arc<crate::config::FrontDoorConfig>,
    builder: Arc<http_conn::Builder>,
    proxy_protocol: proxy_protocol::Accept,
}

impl ListenerState {
    fn new(cfg: &ListenerConfig) -> Self {
        Self {
            tls: tls::server_config(&cfg.tls).map(tokio_rustls::TlsAcceptor::from),
            limits: Arc::new(cfg.limits.clone()),
            door: Arc::new(cfg.door.clone()),
            builder: Arc::new(http_builder(cfg)),
            proxy_protocol: cfg.proxy_protocol,
        }
    }
}

/// hyper's settings for one listener. Every HTTP/2 limit is set here explicitly (the
/// values and what h2 does beyond them are in `docs/http2-limits.md`), so a dependency
/// upgrade that moves a default cannot loosen what keyway promises.
fn http_builder(cfg: &ListenerConfig) -> http_conn::Builder {
    use crate::config::{
        H2_KEEP_ALIVE_INTERVAL, H2_KEEP_ALIVE_TIMEOUT, H2_MAX_CONCURRENT_STREAMS,
        H2_MAX_FRAME_SIZE, H2_MAX_LOCAL_ERROR_RESET_STREAMS, H2_MAX_PENDING_ACCEPT_RESET_STREAMS,
        H2_MAX_SEND_BUF_SIZE,
    };
    let mut builder = http_conn::Builder::new();
    builder
        .http1
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.limits.header_read_timeout)
        .max_buf_size(cfg.limits.max_request_header_bytes);
    builder
        .http2
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(cfg.limits.max_request_header_bytes).unwrap_or(u32::MAX),
        )
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_frame_size(H2_MAX_FRAME_SIZE)
        .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

async fn accept_loop(
    sock: TcpListener,
    label: String,
    state: Arc<ArcSwap<ListenerState>>,
    limit: Arc<ConnLimit>,
    runtime: Arc<ArcSwap<Runtime>>,
    mut shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    let open = metrics::gauge!("keyway_downstream_connections", "listener" => label.clone());
    let reached =
        metrics::counter!("keyway_listener_limit_reached_total", "listener" => label.clone());
    loop {
        // A slot first: at max_connections, stop accepting until a connection closes.
        let slot = match limit.free.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                reached.increment(1);
                tracing::debug!(listen = %label, "max_connections reached; new connections wait in the backlog");
                tokio::select! {
                    s = limit.free.clone().acquire_owned() => match s {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = shutdown.changed() => break,
                }
            }
        };
        let (stream, client) = tokio::select! {
            r = sock.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let current = state.load();
        let conn = Connection {
            builder: current.builder.clone(),
            tls: current.tls.clone(),
            proxy_protocol: current.proxy_protocol,
            runtime: runtime.clone(),
            info: ConnInfo {
                client,
                tls: current.tls.is_some(),
                limits: current.limits.clone(),
                door: current.door.clone(),
                drain: DrainGuard::new(drain.clone(), Some(slot)),
            },
            shutdown: shutdown.clone(),
            open: open.clone(),
        };
        tokio::spawn(conn.serve(stream));
    }
    tracing::info!(listen = %label, "stopped accepting");
}

struct Connection {
    builder: Arc<http_conn::Builder>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy_protocol: proxy_protocol::Accept,
    runtime: Arc<ArcSwap<Runtime>>,
    info: ConnInfo,
    shutdown: watch::Receiver<bool>,
    open: metrics::Gauge,
}

impl Connection {
    async fn serve(mut self, mut stream: TcpStream) {
        self.open.increment(1.0);
        // Behind an L4 balancer: the PROXY header, read exactly (nothing of the client's
        // own bytes), says who the client is. Without a valid one the connection closes.
        let timeout = self.info.limits.header_read_timeout;
        match proxy_protocol::read_header(&mut stream, self.proxy_protocol, timeout).await {
            Ok(header) => self.info.client = header.client(self.info.client),
            Err(e) => {
                tracing::debug!(peer = %self.info.client, error = %e, "connection closed: no valid PROXY header");
                metrics::counter!("keyway_proxy_protocol_rejected_total").increment(1);
                self.open.decrement(1.0);
                return;
            }
        }
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: stream,
            activity: activity.clone(),
        };
        match self.tls.clone() {
            None => self.serve_io(io, activity).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.info.limits.header_read_timeout, acceptor.accept(io))
                        .await;
                match handshake {
                    Ok(Ok(tls)) => self.serve_io(tls, activity).await,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %self.info.client, error = %e, "TLS handshake failed");
                        self.open.decrement(1.0);
                    }
                    Err(_) => {
                        tracing::debug!(client = %self.info.client, "TLS handshake timed out");
                        self.open.decrement(1.0);
                    }
                }
            }
        }
    }

    async fn serve_io<IO>(self, io: IO, activity: Arc<Activity>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            builder,
            runtime,
            info,
            mut shutdown,
            open,
            ..
        } = self;
        let idle_timeout = info.limits.idle_timeout;
        let info_client = info.client;
        let svc_activity = activity.clone();
        let service = service_fn(move |req| {
            let rt = runtime.load_full();
            let info = info.clone();
            let guard = RequestGuard::new(svc_activity.clone());
            // Boxed: hyper keeps a slot for the request future in every connection,
            // idle ones included, so an inline future would cost its full size (a few
            // KiB) per idle connection; boxed, it costs a pointer until a request comes.
            Box::pin(async move {
                let resp = forward::handle(rt, info, req).await;
                drop(guard);
                Ok::<_, std::convert::Infallible>(resp)
            })
        });
        let conn = builder.serve(io, service);
        tokio::pin!(conn);
        let mut draining = false;
        // Idle check: every quarter of the timeout, see whether any byte moved or any
        // request is in flight; a connection with neither for the whole timeout closes.
        let tick = (idle_timeout / 4).max(Duration::from_millis(10));
        let mut last_io = activity.io();
        let mut quiet = Duration::ZERO;
        let mut next_check = tokio::time::Instant::now() + tick;
        // An idle connection gets one more tick to say goodbye (GOAWAY, a finished
        // response); one that still has not ended (its peer stopped reading, so nothing
        // can be written) is dropped then, instead of being held for ever.
        let mut idle_close_by: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    break;
                }
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = tokio::time::sleep_until(next_check), if !draining => {
                    next_check += tick;
                    let io = activity.io();
                    if io != last_io || activity.in_flight() > 0 {
                        last_io = io;
                        quiet = Duration::ZERO;
                    } else {
                        quiet += tick;
                        if quiet >= idle_timeout {
                            draining = true;
                            idle_close_by = Some(tokio::time::Instant::now() + tick);
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
                _ = tokio::time::sleep_until(idle_close_by.unwrap_or(next_check)), if idle_close_by.is_some() => {
                    tracing::debug!(client = %info_client, "idle client connection did not close gracefully; dropped");
                    break;
                }
            }
        }
        open.decrement(1.0);
    }
}

// === activity tracking for idle timeouts ===

/// I/O progress and requests in flight on one client connection. Counting I/O calls
/// instead of reading the clock keeps the per-read cost to one relaxed increment.
struct Activity {
    io: AtomicU64,
    in_flight: AtomicU32,
}

impl Activity {
    fn new() -> Self {
        Self {
            io: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
        }
    }

    fn touch(&self) {
        self.io.fetch_add(1, Ordering::Relaxed);
    }

    fn io(&self) -> u64 {
        self.io.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(a)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pin_project_lite::pin_project! {
    /// A socket that records when bytes last moved.
    struct Tracked<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_cap_resizes_without_cutting_connections() {
        let limit = ConnLimit::new(3);
        let mut open: Vec<_> = (0..3)
            .map(|_| {
                limit
                    .free
                    .clone()
                    .try_acquire_owned()
                    .expect("below the cap")
            })
            .collect();
        // Shrink below what is open: nothing is cut, the surplus retires as they close.
        limit.resize(1);
        assert_eq!(limit.free.available_permits(), 0);
        open.truncate(1);
        tokio::task::yield_now().await;
        assert!(
            limit.free.clone().try_acquire_owned().is_err(),
            "one connection is open and the cap is 1"
        );
        open.clear();
        let one = limit
            .free
            .clone()
            .try_acquire_owned()
            .expect("a free place");
        assert!(limit.free.clone().try_acquire_owned().is_err());
        // Grow: the new places are there at once.
        limit.resize(4);
        assert_eq!(limit.free.available_permits(), 3);
        drop(one);
        assert_eq!(limit.free.available_permits(), 4);
    }
}
