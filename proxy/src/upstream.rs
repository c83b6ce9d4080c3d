//! Connections to backends: connect (TCP, TLS with the operator's CA, ALPN), the
//! keep-alive pool, and the staggered race used by `ordered` clusters.
//!
//! A connection is a hyper client `SendRequest` whose connection task runs on its own.
//! HTTP/1.1 senders are pooled per backend (LIFO, so warm connections are reused and
//! cold ones age out); an HTTP/2 sender is shared by all requests to that backend. The
//! pool is our own rather than hyper-util's because an `ordered` cluster races
//! connections to *different* backends and keeps the winner, which a pool keyed by
//! URI cannot express. This module never decides which backend a request should use.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::body::Body;
use crate::cluster::Backend;
use crate::config::{BackendConfig, PoolConfig, UpstreamProtocol};
use crate::error::{ErrorKind, ProxyError, Side};

/// A ready-to-use connection to a backend.
pub enum Sender {
    /// An HTTP/1.1 connection: one request at a time.
    H1(http1::SendRequest<Body>),
    /// An HTTP/2 connection: shared, multiplexed.
    H2(http2::SendRequest<Body>),
}

/// What a connection will be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Ordinary requests: pooled, HTTP/1.1 or HTTP/2.
    Request,
    /// An HTTP/1.1 Upgrade (WebSocket): a fresh HTTP/1.1 connection, never pooled.
    Upgrade,
}

// === impl BackendTls ===

/// TLS client settings for one backend.
pub struct BackendTls {
    /// ALPN per the backend's `protocol`.
    normal: Arc<rustls::ClientConfig>,
    /// ALPN `http/1.1` only, for Upgrade requests.
    h1_only: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl BackendTls {
    /// Builds TLS settings that verify the backend against `ca` (or the system store).
    pub fn new(
        ca: Option<&[rustls::pki_types::CertificateDer<'static>]>,
        cfg: &BackendConfig,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(certs) => {
                for c in certs {
                    roots
                        .add(c.clone())
                        .map_err(|e| format!("upstream_ca: cannot use certificate: {e}"))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for c in native.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(format!(
                        "backend `{}` uses tls but no upstream_ca is set and the system has no CA store; set upstream_ca",
                        cfg.id
                    ));
                }
            }
        }
        let base = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let with_alpn = |alpn: &[&[u8]]| {
            let mut c = base.clone();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(c)
        };
        let normal = match cfg.protocol {
            UpstreamProtocol::Http1 => with_alpn(&[b"http/1.1"]),
            UpstreamProtocol::Http2 => with_alpn(&[b"h2"]),
            UpstreamProtocol::Auto => with_alpn(&[b"h2", b"http/1.1"]),
        };
        let server_name = ServerName::try_from(cfg.sni.clone())
            .map_err(|e| format!("backend `{}`: bad sni `{}`: {e}", cfg.id, cfg.sni))?;
        Ok(Self {
            normal,
            h1_only: with_alpn(&[b"http/1.1"]),
            server_name,
        })
    }
}

// === impl Pool ===

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Idle connections of one backend.
pub struct Pool {
    cfg: PoolConfig,
    h1: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            cfg,
            h1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// A live idle connection, if there is one.
    fn take(&self) -> Option<Sender> {
        if let Ok(h2) = self.h2.lock() {
            if let Some(s) = h2.as_ref().filter(|s| !s.is_closed()) {
                return Some(Sender::H2(s.clone()));
            }
        }
        let mut idle = self.h1.lock().ok()?;
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.cfg.idle_timeout {
                return Some(Sender::H1(conn.sender));
            }
        }
        None
    }

    /// Whether an idle connection is available right now.
    pub fn has_idle(&self) -> bool {
        let h2 = self
            .h2
            .lock()
            .map(|g| g.as_ref().is_some_and(|s| !s.is_closed()))
            .unwrap_or(false);
        h2 || self
            .h1
            .lock()
            .map(|g| g.iter().any(|c| !c.sender.is_closed()))
            .unwrap_or(false)
    }

    /// Returns an HTTP/1.1 connection after its response completed.
    pub fn put_h1(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.h1.lock() {
            if idle.len() < self.cfg.max_idle {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    fn put_h2(&self, sender: http2::SendRequest<Body>) {
        if let Ok(mut h2) = self.h2.lock() {
            *h2 = Some(sender);
        }
    }
}

// === connect ===

/// A connection from the pool, or a new one. HTTP/1.1 senders are made ready first.
pub async fn checkout(
    backend: &Arc<Backend>,
    purpose: Purpose,
    connect_timeout: Duration,
) -> Result<Sender, ProxyError> {
    if purpose == Purpose::Request {
        while let Some(sender) = backend.pool.take() {
            match sender {
                Sender::H2(s) => return Ok(Sender::H2(s)),
                Sender::H1(mut s) => {
                    // A returned connection becomes ready once hyper has finished the
                    // previous exchange; that is immediate unless the peer misbehaves.
                    match tokio::time::timeout(connect_timeout, s.ready()).await {
                        Ok(Ok(())) => return Ok(Sender::H1(s)),
                        _ => continue,
                    }
                }
            }
        }
    }
    match tokio::time::timeout(connect_timeout, connect(backend, purpose)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            backend.record_connect_error(&e.detail);
            Err(e)
        }
        Err(_) => {
            let e = ProxyError::new(
                ErrorKind::ConnectTimeout,
                Side::Upstream,
                true,
                format!(
                    "backend `{}` ({}) did not accept a connection within {:?}",
                    backend.cfg.id, backend.cfg.address, connect_timeout
                ),
            );
            backend.record_connect_error(&e.detail);
            Err(e)
        }
    }
}

fn connect_error(backend: &Backend, what: &str, e: impl std::fmt::Display) -> ProxyError {
    ProxyError::new(
        ErrorKind::ConnectFailed,
        Side::Upstream,
        true,
        format!(
            "backend `{}` ({}): {what}: {e}",
            backend.cfg.id, backend.cfg.address
        ),
    )
}

async fn connect(backend: &Arc<Backend>, purpose: Purpose) -> Result<Sender, ProxyError> {
    let tcp = TcpStream::connect(backend.cfg.address)
        .await
        .map_err(|e| connect_error(backend, "connect", e))?;
    let _ = tcp.set_nodelay(true);
    match &backend.tls {
        None => {
            let h2 = purpose == Purpose::Request && backend.cfg.protocol == UpstreamProtocol::Http2;
            handshake(backend, TokioIo::new(tcp), h2).await
        }
        Some(tls) => {
            let cfg = match purpose {
                Purpose::Request => tls.normal.clone(),
                Purpose::Upgrade => tls.h1_only.clone(),
            };
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(|e| connect_error(backend, "TLS handshake", e))?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            handshake(backend, TokioIo::new(stream), h2).await
        }
    }
}

async fn handshake<IO>(
    backend: &Arc<Backend>,
    io: TokioIo<IO>,
    h2: bool,
) -> Result<Sender, ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let id = backend.cfg.id.clone();
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .handshake(io)
            .await
            .map_err(|e| connect_error(backend, "HTTP/2 handshake", e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %id, error = %e, "upstream h2 connection ended");
            }
        });
        backend.pool.put_h2(sender.clone());
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| connect_error(backend, "HTTP/1.1 handshake", e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %id, error = %e, "upstream connection ended");
            }
        });
        Ok(Sender::H1(sender))
    }
}

// === staggered connect ===

type Attempt = Pin<Box<dyn Future<Output = (usize, Result<Sender, ProxyError>)> + Send>>;

/// Races connections to `order` (indices into `backends`, most preferred first), with
/// BeyondTrust `masterdelay` semantics: start the first; each time `stagger` passes
/// without a winner, add the next while earlier ones keep trying; a failure adds the
/// next at once. The first connection up wins; the others are dropped. Returns the
/// winner's index, its connection, and the failures seen before it won.
pub async fn staggered_connect(
    backends: &[Arc<Backend>],
    order: &[usize],
    stagger: Duration,
    connect_timeout: Duration,
    purpose: Purpose,
) -> Result<(usize, Sender, Vec<ProxyError>), Vec<ProxyError>> {
    let mut failures = Vec::new();
    let mut pending: FuturesUnordered<Attempt> = FuturesUnordered::new();
    let mut next = 0;
    let start = |i: usize| -> Attempt {
        let b = backends[i].clone();
        Box::pin(async move { (i, checkout(&b, purpose, connect_timeout).await) })
    };
    let mut deadline = tokio::time::Instant::now();
    loop {
        if next < order.len() && (pending.is_empty() || tokio::time::Instant::now() >= deadline) {
            pending.push(start(order[next]));
            next += 1;
            deadline = tokio::time::Instant::now() + stagger;
        }
        if pending.is_empty() {
            return Err(failures);
        }
        tokio::select! {
            biased;
            Some((i, res)) = pending.next() => match res {
                Ok(sender) => return Ok((i, sender, failures)),
                Err(e) => {
                    failures.push(e);
                    // A refused or failed backend hands over to the next one at once.
                    deadline = tokio::time::Instant::now();
                }
            },
            _ = tokio::time::sleep_until(deadline), if next < order.len() => {}
        }
    }
}
