//! Connections to backends: connect (TCP, TLS with the backend's `BackendTls`, ALPN),
//! take a sender from the backend's pool (`backend::pool` keeps them), the staggered
//! race of `ordered` clusters, and one health probe ([`probe`]). It never keeps idle
//! connections itself and never decides which backend a request should use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::backend::{Backend, Sender, Slot};
use crate::config::UpstreamProtocol;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::h1;

/// What a connection will be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Ordinary requests: pooled, HTTP/1.1 or HTTP/2.
    Request,
    /// A dedicated HTTP/1.1 connection, never pooled: Upgrade (WebSocket) requests and
    /// health probes.
    Upgrade,
}

// === connect ===

/// A connection from the pool (checked for an EOF or stray bytes), or a new one.
pub async fn checkout(
    backend: &Arc<Backend>,
    purpose: Purpose,
    connect_timeout: Duration,
) -> Result<Sender, ProxyError> {
    if purpose == Purpose::Request {
        if let Some(sender) = backend.pool.take() {
            return Ok(sender);
        }
    }
    connect_within(backend, purpose, connect_timeout).await
}

/// A new connection within `connect_timeout`; a failure is recorded on the backend.
async fn connect_within(
    backend: &Arc<Backend>,
    purpose: Purpose,
    connect_timeout: Duration,
) -> Result<Sender, ProxyError> {
    // Boxed: a TCP + TLS + HTTP handshake is a large state machine, and inline it would
    // make every request's future that large (hyper moves the future per request),
    // while new connections are the rare case once the pool is warm.
    match tokio::time::timeout(connect_timeout, Box::pin(connect(backend, purpose))).await {
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
                    backend.cfg.id, backend.address, connect_timeout
                ),
            );
            backend.record_connect_error(&e.detail);
            Err(e)
        }
    }
}

/// A new HTTP/1.1 connection to `backend` for keyway's own client, never from the pool:
/// the second try of a request whose pooled connection was found closed.
pub async fn connect_h1(
    backend: &Arc<Backend>,
    connect_timeout: Duration,
) -> Result<Box<h1::Conn>, ProxyError> {
    match connect_within(backend, Purpose::Request, connect_timeout).await? {
        Sender::H1(conn) => Ok(conn),
        _ => Err(connect_error(
            backend,
            "connect",
            "the backend negotiated HTTP/2 where HTTP/1.1 was expected",
        )),
    }
}

/// One of `backend`'s slots (waiting up to `queue_timeout` in its bounded queue when
/// all are taken), then a connection. The slot comes first, so a backend at its
/// `max_connections` is never opened another connection.
pub async fn checkout_with_slot(
    backend: &Arc<Backend>,
    purpose: Purpose,
    connect_timeout: Duration,
    queue_timeout: Duration,
) -> Result<(Sender, Slot), ProxyError> {
    let slot = match backend.try_slot() {
        Some(s) => s,
        // Boxed: waiting is the rare path, and inline it would grow every request's future.
        None => Box::pin(backend.queue_for_slot(queue_timeout)).await?,
    };
    let sender = checkout(backend, purpose, connect_timeout).await?;
    Ok((sender, slot))
}

fn connect_error(backend: &Backend, what: &str, e: impl std::fmt::Display) -> ProxyError {
    ProxyError::new(
        ErrorKind::ConnectFailed,
        Side::Upstream,
        true,
        format!(
            "backend `{}` ({}): {what}: {e}",
            backend.cfg.id, backend.address
        ),
    )
}

async fn connect(backend: &Arc<Backend>, purpose: Purpose) -> Result<Sender, ProxyError> {
    connect_at(backend, backend.address, purpose).await
}

/// [`connect`] to `addr` instead of the backend's own address (a health port).
async fn connect_at(
    backend: &Arc<Backend>,
    addr: std::net::SocketAddr,
    purpose: Purpose,
) -> Result<Sender, ProxyError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| connect_error(backend, "connect", e))?;
    let _ = tcp.set_nodelay(true);
    match &backend.tls {
        None => {
            let h2 = purpose == Purpose::Request && backend.cfg.protocol == UpstreamProtocol::Http2;
            if !h2 && purpose == Purpose::Request {
                return Ok(Sender::H1(h1::Conn::new(h1::Stream::Plain(tcp))));
            }
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
            if !h2 && purpose == Purpose::Request {
                let stream = h1::Stream::Tls(Box::new(stream));
                return Ok(Sender::H1(h1::Conn::new(stream)));
            }
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
        Ok(Sender::Upgrade(sender))
    }
}

// === staggered connect ===

type Attempt = Pin<Box<dyn Future<Output = (usize, Result<(Sender, Slot), ProxyError>)> + Send>>;

/// Races connections to `order` (indices into `backends`, most preferred first), with
/// BeyondTrust `masterdelay` semantics: start the first; each time `stagger` passes
/// without a winner, add the next while earlier ones keep trying; a failure adds the
/// next at once. The first connection up wins; the others are dropped. Each attempt
/// first takes a slot of its backend, so a backend at its `max_connections` waits in
/// its queue while the next one joins the race. Returns the winner's index, its
/// connection and slot, and the failures seen before it won.
pub async fn staggered_connect(
    backends: &[Arc<Backend>],
    order: &[usize],
    stagger: Duration,
    connect_timeout: Duration,
    queue_timeout: Duration,
    purpose: Purpose,
) -> Result<(usize, Sender, Slot, Vec<ProxyError>), Vec<ProxyError>> {
    let mut failures = Vec::new();
    let mut pending: FuturesUnordered<Attempt> = FuturesUnordered::new();
    let mut next = 0;
    let start = |i: usize| -> Attempt {
        let b = backends[i].clone();
        Box::pin(async move {
            let got = checkout_with_slot(&b, purpose, connect_timeout, queue_timeout).await;
            (i, got)
        })
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
                Ok((sender, slot)) => return Ok((i, sender, slot, failures)),
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

// === health probes ===

/// Largest health-response body read (to find a JSON lag field).
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Runs one active check against `backend`, bounded by the check's timeout.
pub async fn probe(
    backend: &Arc<Backend>,
    cfg: &crate::config::HealthConfig,
) -> crate::health::Probe {
    use crate::config::CheckKind;
    let started = Instant::now();
    // `health.port`: the same host, another port (a status page beside the service).
    let addr = cfg.port.map_or(backend.address, |p| {
        std::net::SocketAddr::new(backend.address.ip(), p)
    });
    let result = tokio::time::timeout(cfg.timeout, async {
        match &cfg.kind {
            CheckKind::Tcp => TcpStream::connect(addr)
                .await
                .map(|_| (None, None))
                .map_err(|e| format!("connect {addr}: {e}")),
            CheckKind::Http { path, expect } => {
                http_probe(backend, addr, path, *expect, cfg.lag.as_ref()).await
            }
        }
    })
    .await;
    let (ok, status, lag_ms, error) = match result {
        Ok(Ok((status, lag))) => (true, status, lag, None),
        Ok(Err(e)) => (false, None, None, Some(e)),
        Err(_) => (
            false,
            None,
            None,
            Some(format!("no answer within {:?}", cfg.timeout)),
        ),
    };
    // A failed HTTP probe still reports the status it got.
    let (status, error) = match (&error, status) {
        (Some(e), None) => (
            e.strip_prefix("status ").and_then(|s| s.parse().ok()),
            Some(e.clone()),
        ),
        _ => (status, error),
    };
    crate::health::Probe {
        at: Instant::now(),
        at_wall: std::time::SystemTime::now(),
        ok,
        status,
        latency: started.elapsed(),
        error,
        lag_ms,
    }
}

async fn http_probe(
    backend: &Arc<Backend>,
    addr: std::net::SocketAddr,
    path: &str,
    expect: u16,
    lag: Option<&crate::config::LagSource>,
) -> Result<(Option<u16>, Option<u64>), String> {
    use http_body_util::BodyExt;
    let sender = connect_at(backend, addr, Purpose::Upgrade)
        .await
        .map_err(|e| e.detail)?;
    let Sender::Upgrade(mut sender) = sender else {
        return Err("probe connection is not HTTP/1.1".into());
    };
    let host = if backend.tls.is_some() {
        backend.cfg.sni.clone()
    } else {
        addr.to_string()
    };
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "keyway-health")
        .header(http::header::CONNECTION, "close")
        .body(crate::body::empty())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    if status != expect {
        return Err(format!("status {status}"));
    }
    let lag_ms = match lag {
        None => None,
        Some(crate::config::LagSource::Header(name)) => resp
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| v as u64),
        Some(crate::config::LagSource::JsonField(field)) => {
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY);
            let body = limited
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get(field).and_then(serde_json::Value::as_f64))
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(|v| v as u64)
        }
    };
    Ok((Some(status), lag_ms))
}
