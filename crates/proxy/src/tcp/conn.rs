//! One client connection on a TCP listener: routing by SNI or the listener, establishing
//! a backend, then the bounded copy both ways with half-close and the idle timeout,
//! and its access line. Never buffers more than `MAX_PENDING` before a backend is up.

use super::*;

// === one connection ===

pub(super) struct Conn {
    pub(super) handle: Arc<TcpListenerHandle>,
    pub(super) state: Arc<ListenerState>,
    pub(super) runtime: Arc<Runtime>,
    pub(super) label: String,
    pub(super) _guard: DrainGuard,
}

/// Why a connection ended (the access log's `close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Close {
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
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) struct ConnLog {
    pub(super) client: SocketAddr,
    pub(super) cluster: Option<Arc<Cluster>>,
    pub(super) backend: Option<usize>,
    pub(super) up: u64,
    pub(super) down: u64,
    pub(super) close: Close,
    pub(super) error: Option<String>,
}

impl ConnLog {
    pub(super) fn fail(&mut self, close: Close, error: impl Into<String>) {
        self.close = close;
        self.error = Some(error.into());
    }
}

impl Conn {
    pub(super) async fn serve(self, mut stream: TcpStream, peer: SocketAddr) {
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
    pub(super) async fn route(&self, stream: &mut TcpStream, peer: SocketAddr, log: &mut ConnLog) {
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
pub(super) async fn carry<IO>(
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
    // Affinity clients are remembered (a drain keeps them), at the start and the end.
    let affinity = cluster.cfg.tcp.affinity == crate::config::Affinity::ClientIp;
    if affinity {
        backend.holders.note(client_ip);
    }
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
    if affinity {
        backend.holders.note(client_ip);
    }
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

pub(super) enum Side {
    Client(String),
    Backend(String),
    Idle,
}

impl Side {
    pub(super) fn client(e: io::Error) -> Side {
        Side::Client(e.to_string())
    }
    pub(super) fn backend(e: io::Error) -> Side {
        Side::Backend(e.to_string())
    }
}

/// The byte counters of one connection, flushed as deltas.
pub(super) struct BytesMetrics {
    pub(super) up: metrics::Counter,
    pub(super) down: metrics::Counter,
    pub(super) flushed: (u64, u64),
}

impl BytesMetrics {
    pub(super) fn flush(&mut self, meter: &Meter, early_up: u64, early_down: u64) {
        let up = early_up + meter.up.load(Ordering::Relaxed);
        let down = early_down + meter.down.load(Ordering::Relaxed);
        self.up.increment(up - self.flushed.0);
        self.down.increment(down - self.flushed.1);
        self.flushed = (up, down);
    }
}
