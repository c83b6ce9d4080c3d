//! Starts the data plane from a loaded config: opens the coordinator, builds the runtime
//! snapshot (`build_runtime`), binds HTTP and TCP listeners, spawns the probers, and
//! drains on shutdown. `conn` serves one client connection (TLS, PROXY header,
//! HTTP/1.1 or HTTP/2, timeouts), `reload` reloads, `plane` is the coordinator's view.
//!
//! Everything the request path reads is published through one `ArcSwap<Runtime>`, so a
//! later reload builds a new runtime and swaps it in without touching live connections.
//! It never starts the admin API or the watcher (the `keyway` crate does) and makes no
//! routing decision.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::cluster::Cluster;
use crate::config::{Config, ListenerConfig};
use crate::failover::Failover;
use crate::forward::{self, ConnInfo, Runtime};
use crate::load::{Loaded, Plane};
use crate::router::Router;
use crate::workers::{Serving, Workers};
use crate::{http_conn, proxy_protocol, telemetry, tls};

mod conn;
mod plane;
mod reload;

pub(crate) use crate::limits::ConnLimit;
pub use crate::limits::DrainGuard;
use conn::*;
pub use plane::LivePlane;
pub use reload::Reloader;

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

/// Builds the request path's snapshot from a config and the parts loaded from it.
pub fn build_runtime(
    config: &Config,
    plane: &Plane,
    failover: &Failover,
) -> Result<Runtime, String> {
    telemetry::metrics_handle();
    let secret: &[u8] = match &config.proxy.secret {
        Some(s) => s,
        None => process_secret(),
    };
    let clusters: Vec<Arc<Cluster>> = config
        .clusters
        .iter()
        .zip(&plane.clusters)
        .map(|(c, parts)| {
            let mut cluster = Cluster::new(c.clone(), parts.clone(), secret)?;
            if let Some(gate) = failover.gate(&c.name) {
                cluster.gate = gate;
            }
            Ok::<_, String>(Arc::new(cluster))
        })
        .collect::<Result<_, _>>()?;
    let router = Router::new(&config.routes, |name| {
        let i = clusters.iter().position(|c| c.cfg.name == name)?;
        Some((i, clusters[i].cfg.paths))
    });
    let runtime = Runtime {
        router,
        clusters,
        access_log: config.proxy.access_log,
        permit: failover.permit().clone(),
    };
    // The stored topologies, before any cluster serves a request.
    failover.apply(&runtime);
    Ok(runtime)
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

// === Proxy ===

/// The running data plane: listeners, runtime snapshot, reloads and drain. The admin API
/// and the plugin watcher are started next to it by the `keyway` crate's `instance::Server`.
pub struct Proxy {
    listen_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    runtime: Arc<ArcSwap<Runtime>>,
    reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    drain_tx: Option<mpsc::Sender<()>>,
    drain_rx: mpsc::Receiver<()>,
    drain_timeout: Duration,
    /// The worker threads: they stop when the proxy is dropped.
    workers: Arc<Workers>,
}

impl Proxy {
    /// Binds every listener of a loaded config (see `crate::load`), then starts serving.
    pub async fn start(loaded: Loaded) -> Result<Proxy, StartError> {
        let (config, plane) = (&loaded.config, &loaded.plane);
        let failover = Failover::open(config, &loaded.coordination, crate::failover::Access::Owner)
            .await
            .map_err(StartError::State)?;
        // Workers first: the backends' pools, built with the runtime, keep a slot per
        // worker.
        let workers = Workers::start(
            config
                .proxy
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        )
        .map_err(|e| StartError::Build(format!("cannot start the worker threads: {e}")))?;
        let runtime = Arc::new(ArcSwap::from_pointee(
            build_runtime(config, plane, &failover).map_err(StartError::Build)?,
        ));
        let (shutdown, _) = watch::channel(false);
        let (drain_tx, drain_rx) = mpsc::channel(1);

        let mut listen_addrs = Vec::new();
        let mut bound = Vec::new();
        for (l, at) in config.listeners.iter().zip(&plane.listeners) {
            let sock = TcpListener::bind(at.addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: at.addr,
                    source,
                })?;
            listen_addrs.push(sock.local_addr().unwrap_or(at.addr));
            bound.push((sock, l.clone()));
        }
        let mut tcp_bound = Vec::new();
        for (l, at) in config.tcp_listeners.iter().zip(&plane.tcp_listeners) {
            let bound = crate::tcp::TcpListenerHandle::bind(l, at)
                .await
                .map_err(|source| StartError::Bind {
                    addr: at.addr,
                    source,
                })?;
            tcp_bound.push(bound);
        }
        for c in &runtime.load().clusters {
            crate::probers::spawn_probers(c, shutdown.subscribe());
        }
        failover.start(Arc::new(LivePlane(runtime.clone())), shutdown.subscribe());
        let listener_states: Vec<Arc<ArcSwap<ListenerState>>> = config
            .listeners
            .iter()
            .zip(&plane.listeners)
            .map(|(l, at)| Arc::new(ArcSwap::from_pointee(ListenerState::new(l, at))))
            .collect();
        let conn_limits: Vec<Arc<ConnLimit>> = config
            .listeners
            .iter()
            .map(|l| Arc::new(ConnLimit::new(l.max_connections)))
            .collect();
        // Both outcomes exist from the start at 0, so an alert on
        // `increase(keyway_config_reloads_total{result="error"}[..])` sees the first failure
        // (Prometheus reads a series that appears already at 1 as no increase).
        for outcome in ["ok", "error"] {
            metrics::counter!("keyway_config_reloads_total", "result" => outcome).absolute(0);
        }
        let reloader = Arc::new(Reloader {
            runtime: runtime.clone(),
            listeners: listener_states.clone(),
            conn_limits: conn_limits.clone(),
            tcp: tcp_bound.iter().map(|(_, h)| h.clone()).collect(),
            current: std::sync::Mutex::new(loaded.clone()),
            source: std::sync::Mutex::new(None),
            shutdown: shutdown.subscribe(),
            last: std::sync::Mutex::new(None),
            failover: failover.clone(),
        });
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
                Serving {
                    workers: workers.clone(),
                    drain: drain_tx.clone(),
                },
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
                Serving {
                    workers: workers.clone(),
                    drain: drain_tx.clone(),
                },
            ));
        }
        Ok(Proxy {
            tcp_addrs,
            listen_addrs,
            runtime,
            reloader,
            shutdown,
            drain_tx: Some(drain_tx),
            drain_rx,
            drain_timeout: config.proxy.drain_timeout,
            workers,
        })
    }

    /// Bound addresses of the listeners, in config order (ports resolved when `:0`).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Open downstream connections on each worker, in worker order (worker 0 is the
    /// runtime the proxy started on).
    pub fn worker_connections(&self) -> Vec<usize> {
        self.workers.open()
    }

    /// Bound addresses of the TCP listeners, in config order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Remembers the file this server's config came from, so reloads re-read it.
    pub fn set_config_source(&self, path: std::path::PathBuf) {
        if let Ok(mut s) = self.reloader.source.lock() {
            *s = Some(path);
        }
    }

    /// The published runtime cell, for the admin API's read-only views.
    pub fn runtime_cell(&self) -> Arc<ArcSwap<Runtime>> {
        self.runtime.clone()
    }

    /// A receiver that turns `true` when shutdown starts.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
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
