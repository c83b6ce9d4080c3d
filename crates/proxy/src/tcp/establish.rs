//! Choosing and establishing a backend for a TCP connection: the order (priority,
//! balancer, client-IP affinity), the staggered race, the PROXY header and the protocol
//! check; the client's early bytes reach the winner exactly once.

use super::*;

// === choosing and establishing a backend ===

/// The backends to try for a client, most preferred first: usable ones only, and
/// drained ones only for a client that holds a session there (client-IP affinity).
pub(super) fn order(cluster: &Cluster, client: IpAddr) -> Vec<usize> {
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
            cluster.shuffle_within_priority(&mut o);
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
    if view.any_drained() {
        // A drained backend keeps only the clients its affinity sent it lately (they
        // have a session there), and only until the drain's deadline.
        let affinity = cluster.cfg.tcp.affinity == Affinity::ClientIp;
        order.retain(|&i| {
            !view.drained(i) || (affinity && view.pin_holds(i) && backends[i].holders.holds(client))
        });
    }
    // Degraded backends are standbys: after every healthy one (stable, so each group
    // keeps the order above).
    order.sort_by_key(|&i| view.standby(i));
    order
}

/// Why no backend was established.
pub(super) enum Failed {
    /// Reading the client failed.
    Client(String),
    /// Every backend in the order failed, was full, or timed out.
    Backends(String),
}

/// A backend that passed the protocol check.
pub(super) struct Established {
    pub(super) stream: TcpStream,
    pub(super) inflight: InFlight,
    /// Client bytes the winner already received.
    pub(super) sent: usize,
    /// Client bytes kept but not yet sent to the winner.
    pub(super) rest: Bytes,
    /// Bytes the winner sent during the check, owed to the client.
    pub(super) first: Vec<u8>,
    /// The client ended its side before the winner was up.
    pub(super) client_eof: bool,
    /// The winner's write side is already shut (after the client's end).
    pub(super) shut: bool,
}

/// The client's bytes so far, and whether it has ended its side.
pub(super) type Kept = (Bytes, bool);

/// One attempt's success.
pub(super) struct Won {
    pub(super) stream: TcpStream,
    pub(super) sent: usize,
    pub(super) first: Vec<u8>,
    pub(super) shut: bool,
}

/// Why one attempt failed. `client_bytes`: the attempt had passed client bytes on, so
/// the failure may be the client's doing (bytes that make a backend close or wait for
/// more) and counts against nobody.
pub(super) enum AttemptError {
    Connect(String),
    ProtocolTimeout { detail: String, client_bytes: bool },
    Check { detail: String, client_bytes: bool },
}

pub(super) type Attempt =
    Pin<Box<dyn std::future::Future<Output = (usize, Slot, Result<Won, AttemptError>)> + Send>>;

/// Races backends in `order`; see the module documentation.
pub(super) async fn establish<IO>(
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

pub(super) fn proxy_header(send: SendProxy, header: &Header) -> Vec<u8> {
    match send {
        SendProxy::Off => Vec::new(),
        SendProxy::V1 => proxy_protocol::encode_v1(header),
        SendProxy::V2 => proxy_protocol::encode_v2(header),
    }
}

/// Connects to one backend, sends its PROXY header and the client's bytes as they
/// come, and waits for the protocol check.
pub(super) async fn attempt(
    backend: Arc<Backend>,
    header: Vec<u8>,
    mut kept: watch::Receiver<Kept>,
    check: ProtocolCheck,
    connect_timeout: Duration,
    protocol_timeout: Duration,
) -> Result<Won, AttemptError> {
    let id = &backend.cfg.id;
    let addr = backend.address;
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
