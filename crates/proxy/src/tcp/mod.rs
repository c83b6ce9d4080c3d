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
use tokio::sync::watch;

use crate::cluster::{Backend, Cluster, InFlight, Slot};
use crate::config::{
    Affinity, Balance, HostPattern, ProtocolCheck, SendProxy, Strategy, TcpListenerConfig,
};
use crate::forward::Runtime;
use crate::limits::{ConnLimit, DrainGuard};
use crate::proxy_protocol::{self, Header};

mod conn;
mod establish;
mod wrap;

use conn::*;
use establish::*;
use wrap::*;

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
    fn new(cfg: &TcpListenerConfig, loaded: &crate::load::Listener) -> Self {
        let tls = crate::tls::server_config(&loaded.certs).map(|c| {
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
    /// Binds the listener's address (`loaded`: what the loader made of `cfg`).
    pub(crate) async fn bind(
        cfg: &TcpListenerConfig,
        loaded: &crate::load::Listener,
    ) -> io::Result<(TcpListener, Arc<Self>)> {
        let sock = TcpListener::bind(loaded.addr).await?;
        let addr = sock.local_addr().unwrap_or(loaded.addr);
        let handle = Arc::new(Self {
            addr,
            state: ArcSwap::from_pointee(ListenerState::new(cfg, loaded)),
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
    pub(crate) fn reload(&self, cfg: &TcpListenerConfig, loaded: &crate::load::Listener) {
        self.state.store(Arc::new(ListenerState::new(cfg, loaded)));
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
    serving: crate::workers::Serving,
) {
    let label = handle.addr.to_string();
    let accepted = metrics::counter!("keyway_tcp_accepted_total", "listener" => label.clone());
    let reached =
        metrics::counter!("keyway_listener_limit_reached_total", "listener" => label.clone());
    while let Some((stream, peer, slot)) =
        crate::limits::accept_under(&sock, &handle.limit, &reached, &mut shutdown).await
    {
        accepted.increment(1);
        let conn = Conn {
            handle: handle.clone(),
            state: handle.state.load_full(),
            runtime: runtime.load_full(),
            label: label.clone(),
            _guard: DrainGuard::new(serving.drain.clone(), Some(slot)),
        };
        serving
            .workers
            .place(stream, move |stream| conn.serve(stream, peer));
    }
    tracing::info!(listen = %label, "stopped accepting TCP connections");
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
