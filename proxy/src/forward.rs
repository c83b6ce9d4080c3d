//! The request path: route a client request to a cluster, pick a backend, send the
//! request over a pooled connection, retry where that is safe, and stream the response
//! back. WebSocket upgrades become a byte tunnel.
//!
//! Retry rules (the only place they live):
//! - a connection that was never established may be retried on another backend,
//!   whatever the method (nothing reached the backend);
//! - a request hyper hands back unsent (the pooled connection closed under it) is
//!   retried likewise;
//! - a GET/HEAD/OPTIONS without a body that fails before response headers is retried
//!   once on another backend;
//! - anything else is never sent twice. All retries are bounded by the cluster's
//!   `retries` and its retry budget.
//!
//! Every failure becomes a [`ProxyError`] and is answered by `ProxyError::into_response`.
//! Nothing here may panic on client or backend input.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::body::{self, Body, BodyWatch, BoxError, Limited};
use crate::classify::Kind;
use crate::cluster::{Backend, Cluster, InFlight, Slot};
use crate::config::{Balance, FrontDoorConfig, Limits, ReadsOnPrimary, Role, Strategy};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::frontdoor;
use crate::headers;
use crate::health::{BodyFacts, Ending, Fault, HealthView};
use crate::permit::{Permit, WriteTicket};
use crate::router::Router;
use crate::upstream::{self, Purpose, Sender};

/// What the request path reads for every request: routes and clusters. Published as one
/// snapshot (`ArcSwap`) so a reload swaps it whole.
pub struct Runtime {
    /// Route table.
    pub router: Router,
    /// Clusters, indexed by the router.
    pub clusters: Vec<Arc<Cluster>>,
    /// Emit one access-log line per request.
    pub access_log: bool,
    /// Whether this instance may route writes now (shared across reloads).
    pub permit: Arc<Permit>,
}

impl Runtime {
    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.cfg.name == name)
    }
}

/// Facts about the client connection a request arrived on.
#[derive(Clone)]
pub struct ConnInfo {
    /// Client address.
    pub client: SocketAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// The listener's limits.
    pub limits: Arc<Limits>,
    /// The listener's front-door settings.
    pub door: Arc<FrontDoorConfig>,
    /// Keeps shutdown waiting while a WebSocket tunnel from this connection is open.
    pub drain: crate::server::DrainGuard,
}

/// Handles one client request. Never fails: errors become HTTP answers.
pub async fn handle(rt: Arc<Runtime>, info: ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    // Only what the access log needs is copied, and only when it is on: the method
    // here, the path in `proxy` (as sent, then as admitted).
    let logged = rt.access_log.then(|| req.method().clone());
    let mut log = AccessLog {
        path: rt.access_log.then(|| req.uri().path().to_owned()),
        ..AccessLog::default()
    };
    let resp = match proxy(&rt, &info, req, &mut log).await {
        Ok(r) => r,
        Err((e, cluster)) => {
            tracing::debug!(error = %e, "request failed");
            log.error = Some(e.reason());
            e.into_response(cluster.as_deref())
        }
    };
    if let Some(method) = logged {
        let path = log.path.as_deref().unwrap_or("");
        let cluster = log.cluster.map(|c| &rt.clusters[c]);
        tracing::info!(
            target: "keyway::access",
            client = %info.client,
            method = %method,
            host = log.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
            path = %path,
            status = resp.status().as_u16(),
            cluster = cluster.map(|c| c.cfg.name.as_str()).unwrap_or(""),
            backend = cluster
                .zip(log.backend)
                .map(|(c, b)| c.backends[b].cfg.id.as_str())
                .unwrap_or(""),
            attempts = log.attempts,
            error = log.error.unwrap_or(""),
            ms = started.elapsed().as_secs_f64() * 1000.0,
        );
    }
    resp
}

/// What the access log records about a request: indices and cheap clones, no strings.
#[derive(Default)]
struct AccessLog {
    host: Option<HeaderValue>,
    /// The path as sent, replaced by its normal form once the front door admitted it.
    path: Option<String>,
    cluster: Option<usize>,
    backend: Option<usize>,
    attempts: u32,
    error: Option<&'static str>,
}

type Failure = (ProxyError, Option<String>);

async fn proxy(
    rt: &Runtime,
    info: &ConnInfo,
    mut req: Request<Incoming>,
    log: &mut AccessLog,
) -> Result<Response<Body>, Failure> {
    // The front door first: what it admits is what is routed, classified and forwarded.
    let door = frontdoor::admit(&mut req, &info.door, info.client.ip()).map_err(|e| (e, None))?;
    log.host = Some(door.host.clone());
    // The access log records the path routed; it is copied again only if the front
    // door changed it.
    if log.path.as_deref().is_some_and(|p| p != req.uri().path()) {
        log.path = Some(req.uri().path().to_owned());
    }
    let host_str = door.host.to_str().unwrap_or("");
    // Servlet containers cut `;parameters` from segments before they route, so routes
    // match on that view; a request is a read only if both views say so.
    let path = req.uri().path();
    let bare = frontdoor::without_parameters(path);
    let Some(ci) = rt.router.route(door.host_name(), &bare) else {
        return Err((
            ProxyError::new(
                ErrorKind::NoRoute,
                Side::Downstream,
                false,
                format!("no route for host `{host_str}` and path `{path}`"),
            ),
            None,
        ));
    };
    let kind = (rt.clusters[ci].cfg.strategy == Strategy::PrimaryReplica).then(|| {
        let cluster = &rt.clusters[ci];
        match cluster.classify(req.method(), path, host_str) {
            Kind::Read if bare != path => cluster.classify(req.method(), &bare, host_str),
            k => k,
        }
    });
    drop(bare);
    let cluster = &rt.clusters[ci];
    log.cluster = Some(ci);
    let fail = |e: ProxyError| (e, Some(cluster.cfg.name.clone()));
    let _request = cluster.start_request();

    // Body limit: refuse early on a declared length, count bytes on a streamed one.
    let limit = info.limits.max_request_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(fail(too_large(limit)));
    }

    // Only the cluster's upgrade protocols pass (WebSocket by default); any other is
    // dropped and the request served as plain HTTP, so no tunnel bypasses the split.
    let upgrade = req.version() == Version::HTTP_11
        && headers::allow_upgrade(req.headers_mut(), &cluster.cfg.upgrades);
    let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    // Which backends may take this request: health, then (primary-replica) role and lag.
    let ryw_fresh = kind == Some(Kind::Read)
        && cluster.cfg.split.read_your_writes.is_some()
        && headers::cookie(req.headers(), cluster.ryw_cookie_name())
            .is_some_and(|t| cluster.ryw_valid(t, crate::unix_ms(std::time::SystemTime::now())));
    let mut eligible = Eligible::new(cluster, kind, ryw_fresh, &rt.permit).map_err(fail)?;

    // A sticky cookie is a preference among eligible backends; a write never follows it.
    let pinned = cluster
        .cfg
        .sticky
        .as_ref()
        .and_then(|s| {
            headers::cookie(req.headers(), &s.cookie).and_then(|t| cluster.backend_by_token(t))
        })
        .filter(|&p| eligible.allows(p));

    let via = if req.version() == Version::HTTP_2 {
        "2 keyway"
    } else {
        "1.1 keyway"
    };
    let (mut parts, incoming) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let who = headers::Identity {
        client: info.client.ip(),
        tls: info.tls,
        trusted: door.trusted_peer,
        rfc7239: info.door.forwarded,
    };
    let host = door.host;
    headers::add_forwarded(&mut parts.headers, who, &host, via);
    // A write carries the topology epoch that routed it: a fencing token the backend (or
    // its audit trail) can check. Clients cannot supply their own.
    parts.headers.remove(EPOCH_HEADER);
    if kind == Some(Kind::Write) {
        parts
            .headers
            .insert(EPOCH_HEADER, eligible.view.epoch_header.clone());
    }

    // The body watch (size limit, how the body ended) is only needed (and allocated)
    // when there is a body.
    let empty_body = incoming.is_end_stream();
    let watch = (!empty_body).then(|| Arc::new(BodyWatch::new()));
    let body = match &watch {
        None => body::empty(),
        Some(w) => Limited::new(incoming, limit, w.clone()).boxed(),
    };
    // Only bodiless safe requests can be rebuilt for a retry after they were sent.
    let replayable = empty_body
        && matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
        && cluster.cfg.retries > 0;
    let template = replayable.then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });

    let mut pending = Some(Request::from_parts(parts, body));
    let mut tried: Vec<usize> = Vec::new();
    let mut retries_left = cluster.cfg.retries;
    let mut safe_retry_used = false;
    let purpose = if upgrade {
        Purpose::Upgrade
    } else {
        Purpose::Request
    };

    loop {
        // 1. A slot and a connection: the pinned backend first, then the cluster's strategy.
        let (idx, sender, slot) =
            match pick_and_connect(cluster, pinned, &mut tried, purpose, &eligible).await {
                Ok(x) => x,
                Err(e) => {
                    if e.retryable && !eligible.remaining(cluster, &tried) {
                        return Err(fail(no_backend_left(cluster, e)));
                    }
                    if e.retryable && retries_left > 0 && cluster.try_retry() {
                        retries_left -= 1;
                        continue;
                    }
                    return Err(fail(e));
                }
            };
        if !eligible.still_valid(cluster, &rt.permit) {
            // The write waited (for a slot or a connection) while the topology moved
            // on or the permit ran out: its decision is stale, so it is not sent.
            cluster.count_write_refused();
            let (kind, why) = if rt.permit.holds() {
                (
                    ErrorKind::NoBackendAvailable,
                    "the primary changed while this write waited for a connection; it was not sent, send it again",
                )
            } else {
                (
                    ErrorKind::CoordinationLost,
                    "this instance lost its write lease while the write waited for a connection; it was not sent",
                )
            };
            return Err(fail(ProxyError::new(
                kind,
                Side::Internal,
                false,
                format!("cluster `{}`: {why}", cluster.cfg.name),
            )));
        }
        let backend = cluster.backends[idx].clone();
        tried.push(idx);
        log.attempts += 1;
        log.backend = Some(idx);

        // 2. Send, bounded by protocol_timeout for the response head.
        let Some(mut req) = pending.take() else {
            return Err(fail(ProxyError::new(
                ErrorKind::UpstreamProtocol,
                Side::Internal,
                false,
                "request was consumed by an earlier attempt",
            )));
        };
        let inflight = backend.start_request(slot);
        prepare_upstream(&mut req, &sender, &host, backend.tls.is_some());
        let pt = cluster.cfg.protocol_timeout;
        // Pinned here, not inside the helper: moving it in would store it twice in this
        // future, which hyper moves on every request.
        let sending = std::pin::pin!(send(sender, req));
        let exchange = within_protocol_timeout(sending, pt, watch.as_deref());
        // A write whose body is still arriving when this instance's write lease runs
        // out is cut off: the old primary never gets (or acts on) the whole request,
        // so it cannot commit it after another backend became primary.
        let result = match (&eligible.ticket, &watch) {
            (Some(_), Some(w)) if rt.permit.is_coordinated() => tokio::select! {
                r = exchange => r,
                () = lease_lapses_mid_body(&rt.permit, w) => {
                    w.cut();
                    cluster.count_write_refused();
                    return Err(fail(ProxyError::new(
                        ErrorKind::CoordinationLost,
                        Side::Internal,
                        false,
                        format!(
                            "this instance lost its write lease while the write's body was still arriving; the body was cut off before backend `{}` had all of it",
                            backend.cfg.id
                        ),
                    )));
                }
            },
            _ => exchange.await,
        };
        let count_5xx = cluster.cfg.outlier.count_5xx;
        let (failure, ending) = match result {
            Some(Ok((resp, h1))) => {
                let mut inflight = inflight;
                inflight.carry(eligible.ticket.take());
                let answer = Answer {
                    pinned,
                    idx,
                    kind,
                    h1,
                    inflight,
                    on_client_upgrade,
                    watch: watch.clone(),
                };
                return Ok(respond(cluster, &backend, info, resp, answer, &rt.permit));
            }
            Some(Err((e, unsent, ending))) => {
                if let Some(r) = unsent {
                    // hyper never wrote it: safe to send elsewhere, whatever the method.
                    pending = Some(r);
                }
                (e, ending)
            }
            None => {
                let id = &backend.cfg.id;
                let detail = match watch.as_deref().map(BodyWatch::sent_at) {
                    Some(None) => format!(
                        "the request body was still streaming to backend `{id}` {pt:?} after sending began"
                    ),
                    _ => format!(
                        "backend `{id}` sent no response headers within {pt:?} of the whole request"
                    ),
                };
                let e = ProxyError::new(ErrorKind::ProtocolTimeout, Side::Upstream, false, detail);
                (e, Ending::TimedOut)
            }
        };
        // Passive ejection counts only what the backend did, never the client's abort.
        let fault = Fault::of(ending, body_facts(watch.as_deref()), count_5xx);
        backend.report_failure(fault, &failure.detail);
        drop(inflight);
        if watch.as_ref().is_some_and(|w| w.too_large()) {
            return Err(fail(too_large(limit)));
        }
        if fault == Fault::Client {
            return Err(fail(ProxyError::new(
                ErrorKind::BadRequest,
                Side::Downstream,
                false,
                "the client's request body ended early or was malformed",
            )));
        }
        // 3. Retry where the rules allow it.
        if pending.is_none() {
            match (&template, safe_retry_used) {
                (Some((m, u, h)), false) => {
                    safe_retry_used = true;
                    let mut r = Request::new(body::empty());
                    *r.method_mut() = m.clone();
                    *r.uri_mut() = u.clone();
                    *r.headers_mut() = h.clone();
                    pending = Some(r);
                }
                _ => return Err(fail(failure)),
            }
        }
        if retries_left == 0 || !eligible.remaining(cluster, &tried) || !cluster.try_retry() {
            return Err(fail(failure));
        }
        retries_left -= 1;
    }
}

/// What the client's body had done when an exchange ended.
fn body_facts(watch: Option<&BodyWatch>) -> BodyFacts {
    watch.map_or(BodyFacts::NONE, |w| BodyFacts {
        client_failed: w.client_failed(),
        sent: w.sent_at().is_some(),
    })
}

/// Waits for a backend's response head. `limit` is the backend's time to answer once
/// it has the whole request: a body that finished streaming late extends the wait, so a
/// backend is never timed out (and blamed) for a client's slow upload. The wait still
/// ends `limit` after sending began if the body is then still streaming (`None`, as
/// for any timeout; whose fault that is, `Fault::of` decides).
async fn within_protocol_timeout<F: Future>(
    mut fut: Pin<&mut F>,
    limit: Duration,
    body: Option<&BodyWatch>,
) -> Option<F::Output> {
    let started = tokio::time::Instant::now();
    let mut deadline = started + limit;
    loop {
        if let Ok(out) = tokio::time::timeout_at(deadline, fut.as_mut()).await {
            return Some(out);
        }
        let sent = body.map_or(Some(started.into_std()), BodyWatch::sent_at);
        match sent.map(|at| tokio::time::Instant::from_std(at) + limit) {
            Some(later) if later > deadline => deadline = later,
            _ => return None,
        }
    }
}

/// Resolves when `permit` runs out while the body is still on its way to the backend;
/// never once the whole body was handed over (the backend has the request).
async fn lease_lapses_mid_body(permit: &Permit, body: &BodyWatch) {
    loop {
        if body.sent_at().is_some() {
            return std::future::pending().await;
        }
        if !permit.holds() {
            return;
        }
        // Wake at the deadline itself, and now and then to notice the body ended.
        let wait = permit.remaining().min(Duration::from_millis(200));
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

/// Resolves once `permit` has run out (never for a single instance's permit).
async fn lease_lapses(permit: &Permit) {
    if !permit.is_coordinated() {
        return std::future::pending().await;
    }
    while permit.holds() {
        tokio::time::sleep(permit.remaining().max(Duration::from_millis(1))).await;
    }
}

fn too_large(limit: u64) -> ProxyError {
    ProxyError::new(
        ErrorKind::BodyTooLarge,
        Side::Downstream,
        false,
        format!("request body is larger than {limit} bytes"),
    )
}

fn no_backend_left(cluster: &Cluster, last: ProxyError) -> ProxyError {
    if last.kind == ErrorKind::BackendBusy {
        // Say so: the backends are up, just full.
        return last;
    }
    ProxyError::new(
        ErrorKind::NoBackendAvailable,
        Side::Upstream,
        false,
        format!(
            "no backend of cluster `{}` could be reached (last error: {})",
            cluster.cfg.name, last.detail
        ),
    )
}

// === eligibility ===

/// Request header naming the topology epoch a write was routed in.
pub const EPOCH_HEADER: header::HeaderName = header::HeaderName::from_static("keyway-epoch");

/// Which backends one request may use, decided once from one health snapshot. This is
/// where invariant 1 lives: a write's only eligible backend is the primary, and only
/// when the snapshot says it is healthy; otherwise the write is refused with 503.
struct Eligible {
    view: Arc<HealthView>,
    now: Option<Instant>,
    mode: Mode,
    max_lag_ms: Option<u64>,
    /// A write is counted in its cluster's gate from before the snapshot was read until
    /// its exchange ends; taken by the exchange that sends it.
    ticket: Option<WriteTicket>,
}

enum Mode {
    /// balanced/ordered: healthy, non-ejected backends.
    Healthy,
    /// The primary only.
    Primary(usize),
    /// Healthy replicas within max_lag (if `replicas`), and the primary if given.
    Reads {
        replicas: bool,
        primary: Option<usize>,
    },
}

impl Eligible {
    fn new(
        cluster: &Cluster,
        kind: Option<Kind>,
        ryw_fresh: bool,
        permit: &Permit,
    ) -> Result<Self, ProxyError> {
        // Counted before the snapshot is read: a drain that applies a new topology and
        // then fences the gate either sees this write or this write sees that topology.
        let ticket = (kind == Some(Kind::Write)).then(|| cluster.gate.enter());
        let view = cluster.health.view_full();
        let now = view.any_ejected().then(Instant::now);
        let max_lag_ms = cluster.cfg.split.max_lag.map(|d| d.as_millis() as u64);
        let n = cluster.backends.len();
        let usable = |i: usize| view.usable(i, now);
        // Without a fresh permit the primary this instance knows is unconfirmed: another
        // instance may have replaced it. Writes are refused and reads avoid it.
        let confirmed = kind.is_none() || permit.holds();
        // A snapshot older than the epoch the gate knows (from a runtime a reload just
        // retired) does not route writes.
        let current = ticket.is_none() || view.epoch == cluster.gate.epoch();
        let primary = view.primary.filter(|_| confirmed && current);
        let mode = match (kind, primary) {
            (None, _) => {
                if !(0..n).any(usable) {
                    let detail = if (0..n).any(|i| view.checked(i)) {
                        "has no healthy backend"
                    } else {
                        "has no backend that passed a health check yet"
                    };
                    return Err(ProxyError::new(
                        ErrorKind::NoBackendAvailable,
                        Side::Upstream,
                        false,
                        format!("cluster `{}` {detail}", cluster.cfg.name),
                    ));
                }
                Mode::Healthy
            }
            (Some(Kind::Write), _) if !confirmed => {
                cluster.count_write_refused();
                return Err(ProxyError::new(
                    ErrorKind::CoordinationLost,
                    Side::Internal,
                    false,
                    format!(
                        "this keyway instance lost contact with etcd (its write lease ran out), so it cannot know which backend of cluster `{}` is primary; writes are refused until it is back, reads go to replicas",
                        cluster.cfg.name
                    ),
                ));
            }
            (Some(Kind::Write), Some(p)) if usable(p) => Mode::Primary(p),
            (Some(Kind::Write), _) => {
                cluster.count_write_refused();
                return Err(ProxyError::new(
                    ErrorKind::NoBackendAvailable,
                    Side::Upstream,
                    false,
                    format!(
                        "cluster `{}` is read-only right now: its primary is not healthy, so writes are refused; reads keep working",
                        cluster.cfg.name
                    ),
                ));
            }
            (Some(Kind::Read), Some(p)) if ryw_fresh && usable(p) => Mode::Primary(p),
            (Some(Kind::Read), primary) => {
                // With max_lag, a replica whose lag is unknown (its check failed or
                // reported none) is as good as too far behind.
                let lag_ok = |i: usize| {
                    max_lag_ms.is_none_or(|max| view.backends[i].lag_ms.is_some_and(|l| l <= max))
                };
                let replicas = (0..n).any(|i| {
                    view.backends[i].role == Role::Replica
                        && Some(i) != view.primary
                        && usable(i)
                        && lag_ok(i)
                });
                let primary = primary.filter(|&p| {
                    usable(p)
                        && match cluster.cfg.split.reads_on_primary {
                            ReadsOnPrimary::Always => true,
                            ReadsOnPrimary::Fallback => !replicas,
                            ReadsOnPrimary::Never => false,
                        }
                });
                if !replicas && primary.is_none() {
                    return Err(ProxyError::new(
                        ErrorKind::NoBackendAvailable,
                        Side::Upstream,
                        false,
                        format!(
                            "no backend of cluster `{}` can serve reads: no healthy replica within max_lag{}{}",
                            cluster.cfg.name,
                            lag_detail(cluster, &view, max_lag_ms, usable),
                            if !confirmed {
                                " (this instance lost etcd, so it does not read from the primary it last knew)"
                            } else {
                                match cluster.cfg.split.reads_on_primary {
                                    ReadsOnPrimary::Never => " and reads_on_primary = \"never\"",
                                    _ => " and no healthy primary",
                                }
                            }
                        ),
                    ));
                }
                Mode::Reads { replicas, primary }
            }
        };
        Ok(Self {
            view,
            now,
            mode,
            max_lag_ms,
            ticket,
        })
    }

    /// Whether the decision still stands after waiting for a connection: a write is
    /// not sent on a snapshot older than the cluster's topology now, nor once this
    /// instance has lost its permit.
    fn still_valid(&self, cluster: &Cluster, permit: &Permit) -> bool {
        !matches!(self.mode, Mode::Primary(_))
            || self.ticket.is_none()
            || (permit.holds() && cluster.gate.epoch() == self.view.epoch)
    }

    fn allows(&self, i: usize) -> bool {
        match self.mode {
            Mode::Healthy => self.view.usable(i, self.now),
            Mode::Primary(p) => i == p,
            Mode::Reads { replicas, primary } => {
                Some(i) == primary
                    || (replicas
                        && Some(i) != primary
                        && self.is_replica(i)
                        && self.view.usable(i, self.now)
                        && self.max_lag_ms.is_none_or(|max| {
                            self.view.backends[i].lag_ms.is_some_and(|l| l <= max)
                        }))
            }
        }
    }

    fn is_replica(&self, i: usize) -> bool {
        self.view
            .backends
            .get(i)
            .is_some_and(|b| b.role == Role::Replica)
    }

    /// Whether an eligible backend remains that this request has not tried.
    fn remaining(&self, cluster: &Cluster, tried: &[usize]) -> bool {
        (0..cluster.backends.len()).any(|i| !tried.contains(&i) && self.allows(i))
    }
}

/// Chooses a backend and gets one of its slots and a connection to it. Failed (and
/// full) backends are added to `tried`.
async fn pick_and_connect(
    cluster: &Cluster,
    pinned: Option<usize>,
    tried: &mut Vec<usize>,
    purpose: Purpose,
    eligible: &Eligible,
) -> Result<(usize, Sender, Slot), ProxyError> {
    let cfg = &cluster.cfg;
    let (connect, queue) = (cfg.connect_timeout, cfg.queue_timeout);
    if let Some(p) = pinned.filter(|p| !tried.contains(p)) {
        match upstream::checkout_with_slot(&cluster.backends[p], purpose, connect, queue).await {
            Ok((s, slot)) => return Ok((p, s, slot)),
            // The pinned backend is down or full: fall through to normal selection; the response
            // will re-pin the client. This costs no retry: the pin was a preference.
            Err(_) => tried.push(p),
        }
    }
    match cfg.strategy {
        Strategy::Balanced | Strategy::PrimaryReplica => {
            let eligible_now = |i: usize| !tried.contains(&i) && eligible.allows(i);
            // Degraded backends are standbys: only when no healthy one is allowed.
            let healthy_left = healthy_left(cluster, &eligible.view, &eligible_now);
            let allowed = |i: usize| eligible_now(i) && !(healthy_left && eligible.view.standby(i));
            // A backend with a free slot first: queue only when every candidate is full.
            let free = |i: usize| allowed(i) && cluster.backends[i].has_free_slot();
            let picked = cluster
                .balancer
                .pick(&cluster.backends, free)
                .or_else(|| cluster.balancer.pick(&cluster.backends, allowed));
            let Some(i) = picked else {
                return Err(ProxyError::new(
                    ErrorKind::NoBackendAvailable,
                    Side::Internal,
                    false,
                    format!(
                        "every backend of cluster `{}` failed for this request",
                        cfg.name
                    ),
                ));
            };
            match upstream::checkout_with_slot(&cluster.backends[i], purpose, connect, queue).await
            {
                Ok((s, slot)) => Ok((i, s, slot)),
                Err(e) => {
                    tried.push(i);
                    Err(e)
                }
            }
        }
        Strategy::Ordered => {
            let allowed = |i: usize| !tried.contains(&i) && eligible.allows(i);
            // Degraded backends are standbys: only when no healthy one is allowed.
            let healthy_left = healthy_left(cluster, &eligible.view, &allowed);
            let mut order: Vec<usize> = cluster
                .by_priority
                .iter()
                .copied()
                .filter(|&i| allowed(i) && !(healthy_left && eligible.view.standby(i)))
                .collect();
            if cfg.balance == Balance::Random {
                shuffle_within_priority(cluster, &mut order);
            }
            if order.is_empty() {
                return Err(ProxyError::new(
                    ErrorKind::NoBackendAvailable,
                    Side::Internal,
                    false,
                    format!(
                        "every backend of cluster `{}` failed for this request",
                        cfg.name
                    ),
                ));
            }
            match upstream::staggered_connect(
                &cluster.backends,
                &order,
                cfg.connect_stagger,
                connect,
                queue,
                purpose,
            )
            .await
            {
                Ok((i, sender, slot, _failed)) => Ok((i, sender, slot)),
                Err(mut failures) => {
                    tried.extend(order);
                    if failures.iter().all(|e| e.kind == ErrorKind::BackendBusy) {
                        if let Some(busy) = failures.pop() {
                            return Err(busy);
                        }
                    }
                    let last = failures
                        .into_iter()
                        .last()
                        .map(|e| e.detail)
                        .unwrap_or_default();
                    Err(ProxyError::new(
                        ErrorKind::NoBackendAvailable,
                        Side::Upstream,
                        false,
                        format!(
                            "no backend of cluster `{}` answered (last error: {last})",
                            cfg.name
                        ),
                    ))
                }
            }
        }
    }
}

/// Whether a healthy (not degraded) backend is `allowed`: then degraded ones, the
/// standbys, get nothing from this request.
fn healthy_left(cluster: &Cluster, view: &HealthView, allowed: &dyn Fn(usize) -> bool) -> bool {
    (0..cluster.backends.len()).any(|i| allowed(i) && !view.standby(i))
}

/// For the 503 of a read that no replica can serve under `max_lag`: which usable
/// replicas reported no lag or too much.
fn lag_detail(
    cluster: &Cluster,
    view: &HealthView,
    max_lag_ms: Option<u64>,
    usable: impl Fn(usize) -> bool,
) -> String {
    let Some(max) = max_lag_ms else {
        return String::new();
    };
    let why: Vec<String> = (0..cluster.backends.len())
        .filter(|&i| view.backends[i].role == Role::Replica && usable(i))
        .filter_map(|i| {
            let id = &cluster.backends[i].cfg.id;
            match view.backends[i].lag_ms {
                None => Some(format!("`{id}` reported no lag")),
                Some(l) if l > max => Some(format!("`{id}` lags {l} ms")),
                Some(_) => None,
            }
        })
        .collect();
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({} ms: {})", max, why.join(", "))
    }
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

/// Rewrites URI, version and Host for the connection's HTTP version. An HTTP/1.1
/// request in origin form (the common case) passes untouched.
fn prepare_upstream(req: &mut Request<Body>, sender: &Sender, host: &HeaderValue, tls: bool) {
    match sender {
        Sender::H1(_) => {
            *req.version_mut() = Version::HTTP_11;
            if req.uri().authority().is_some() {
                let pq = req.uri().path_and_query().cloned();
                let mut parts = http::uri::Parts::default();
                parts.path_and_query =
                    Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
                if let Ok(u) = Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut().insert(header::HOST, host.clone());
            }
        }
        Sender::H2(_) => {
            *req.version_mut() = Version::HTTP_2;
            let pq = req.uri().path_and_query().cloned();
            if let Ok(u) = Uri::builder()
                .scheme(if tls { "https" } else { "http" })
                .authority(host.as_bytes())
                .path_and_query(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")))
                .build()
            {
                *req.uri_mut() = u;
            }
            req.headers_mut().remove(header::HOST);
        }
    }
}

type Sent = (Response<Incoming>, Option<http1::SendRequest<Body>>);
type SendFailure = (ProxyError, Option<Request<Body>>, Ending);

async fn send(sender: Sender, req: Request<Body>) -> Result<Sent, SendFailure> {
    let broken = |e: &hyper::Error, unsent: &Option<Request<Body>>| {
        let err = ProxyError::new(
            ErrorKind::UpstreamProtocol,
            Side::Upstream,
            false,
            format!("backend failed before answering: {e}"),
        );
        let ending = Ending::Broken {
            user: e.is_user(),
            unsent: unsent.is_some(),
        };
        (err, ending)
    };
    match sender {
        Sender::H1(mut s) => match s.try_send_request(req).await {
            Ok(resp) => Ok((resp, Some(s))),
            Err(mut e) => {
                let unsent = e.take_message();
                let (err, ending) = broken(e.error(), &unsent);
                Err((err, unsent, ending))
            }
        },
        Sender::H2(mut s) => match s.try_send_request(req).await {
            Ok(resp) => Ok((resp, None)),
            Err(mut e) => {
                let unsent = e.take_message();
                let (err, ending) = broken(e.error(), &unsent);
                Err((err, unsent, ending))
            }
        },
    }
}

/// What `respond` needs besides the response.
struct Answer {
    pinned: Option<usize>,
    idx: usize,
    kind: Option<Kind>,
    h1: Option<http1::SendRequest<Body>>,
    inflight: InFlight,
    on_client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    watch: Option<Arc<BodyWatch>>,
}

fn respond(
    cluster: &Cluster,
    backend: &Arc<Backend>,
    info: &ConnInfo,
    mut resp: Response<Incoming>,
    answer: Answer,
    permit: &Arc<Permit>,
) -> Response<Body> {
    let Answer {
        pinned,
        idx,
        kind,
        h1,
        inflight,
        on_client_upgrade,
        watch,
    } = answer;
    let status = resp.status();
    backend.record_response(status.as_u16());
    backend.report_answer(Fault::of(
        Ending::Answered(status.as_u16()),
        body_facts(watch.as_deref()),
        cluster.cfg.outlier.count_5xx,
    ));
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let on_backend_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, switching);
    headers::append_via(&mut parts.headers, "1.1 keyway");
    // Writes do not re-pin: the client's read session stays on its replica.
    if let Some(s) = cluster
        .cfg
        .sticky
        .as_ref()
        .filter(|_| kind != Some(Kind::Write))
    {
        if pinned != Some(idx) {
            if let Some(v) =
                headers::affinity_cookie(&s.cookie, &backend.sticky_token, s.max_age, info.tls)
            {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
    }

    // Read-your-writes: after a successful write, this client's reads go to the primary.
    if let (Some(Kind::Write), Some(window)) = (kind, cluster.cfg.split.read_your_writes) {
        if status.as_u16() < 400 {
            let token = cluster.ryw_token(
                crate::unix_ms(std::time::SystemTime::now()) + window.as_millis() as u64,
            );
            let cookie = format!(
                "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
                cluster.ryw_cookie_name(),
                window.as_secs().max(1),
                if info.tls { "; Secure" } else { "" }
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
    }

    if let (Some(client), Some(server)) = (on_client_upgrade, on_backend_upgrade) {
        tunnel(
            client,
            server,
            inflight,
            info.drain.clone(),
            backend.cfg.id.clone(),
            (kind == Some(Kind::Write)).then(|| permit.clone()),
        );
        return Response::from_parts(parts, body::empty());
    }

    let body = if incoming.is_end_stream() {
        if let Some(s) = h1 {
            backend.pool.put_h1(s);
        }
        drop(inflight);
        body::empty()
    } else {
        UpstreamBody {
            inner: incoming,
            conn: h1.map(|s| (backend.clone(), s)),
            inflight,
            watch,
        }
        .boxed()
    };
    Response::from_parts(parts, body)
}

/// Joins the client and backend ends of an upgraded connection and copies bytes both ways.
/// A tunnel classified as a write (`write_permit`) is closed when this instance's write
/// lease runs out: it must not outlive the permission to write to that primary.
fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    inflight: InFlight,
    drain: crate::server::DrainGuard,
    backend: String,
    write_permit: Option<Arc<Permit>>,
) {
    tokio::spawn(async move {
        let _inflight = inflight;
        let _drain = drain;
        match tokio::try_join!(client, server) {
            Ok((c, s)) => {
                let mut c = TokioIo::new(c);
                let mut s = TokioIo::new(s);
                let lapse = async {
                    match &write_permit {
                        Some(p) => lease_lapses(p).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut s) => match r {
                        Ok((up, down)) => tracing::debug!(%backend, up, down, "tunnel closed"),
                        Err(e) => tracing::debug!(%backend, error = %e, "tunnel ended"),
                    },
                    () = lapse => tracing::warn!(%backend, "write tunnel closed: this instance lost its write lease"),
                }
            }
            Err(e) => tracing::debug!(%backend, error = %e, "upgrade failed"),
        }
    });
}

pin_project_lite::pin_project! {
    /// A backend's response body on its way to the client. When it ends, the HTTP/1.1
    /// connection returns to the pool; dropping it early (the client went away)
    /// discards the connection and counts against nobody. A body the backend breaks
    /// off counts against the backend.
    struct UpstreamBody {
        #[pin]
        inner: Incoming,
        conn: Option<(Arc<Backend>, http1::SendRequest<Body>)>,
        inflight: InFlight,
        watch: Option<Arc<BodyWatch>>,
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(e))) => {
                this.conn.take();
                let fault = Fault::of(Ending::BodyBroken, body_facts(this.watch.as_deref()), false);
                this.inflight
                    .backend()
                    .report_failure(fault, &format!("response body broke off: {e}"));
                false
            }
            Poll::Pending => false,
        };
        if done {
            if let Some((backend, sender)) = this.conn.take() {
                backend.pool.put_h1(sender);
            }
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend's time to answer starts when it has the whole request.
    #[tokio::test]
    async fn protocol_timeout_runs_from_the_end_of_the_upload() {
        let ms = Duration::from_millis;
        let limit = ms(150);
        let answer = || async move {
            tokio::time::sleep(ms(200)).await;
            7
        };
        // The upload ends at 100 ms; the answer at 200 ms is within 150 ms of it.
        let watch = Arc::new(BodyWatch::new());
        let w = watch.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(100)).await;
            w.mark_sent();
        });
        let a = std::pin::pin!(answer());
        assert_eq!(
            within_protocol_timeout(a, limit, Some(&watch)).await,
            Some(7)
        );
        // Without a body, sending ended at once: the same answer is late.
        let a = std::pin::pin!(answer());
        assert_eq!(within_protocol_timeout(a, limit, None).await, None);
        // A body still streaming when the limit passes is cut.
        let streaming = BodyWatch::new();
        let started = Instant::now();
        let never = std::pin::pin!(std::future::pending::<()>());
        let cut = within_protocol_timeout(never, limit, Some(&streaming)).await;
        assert_eq!(cut, None);
        assert!(started.elapsed() >= limit);
    }

    /// hyper moves each request's future into place (`recv_msg`), so its size is paid
    /// in copying on every request. A TCP + TLS handshake inline made it 10 KiB;
    /// rarely taken large branches are boxed. This keeps it that way.
    #[tokio::test]
    async fn the_per_request_future_stays_small() {
        let dir = std::env::temp_dir().join(format!("keyway-future-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = crate::Config::from_str_with_base(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\ncluster = \"c\"\n[cluster.c]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
            "t.toml",
            &dir,
        )
        .unwrap();
        let failover = crate::failover::Failover::open(&config, crate::failover::Access::Reader)
            .await
            .unwrap();
        let rt = Arc::new(crate::server::build_runtime(&config, &failover).unwrap());
        let (drain, _rx) = tokio::sync::mpsc::channel(1);
        let info = ConnInfo {
            client: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            limits: Arc::new(config.listeners[0].limits.clone()),
            door: Arc::new(config.listeners[0].door.clone()),
            drain: crate::server::DrainGuard::new(drain, None),
        };
        // A real `Request<Incoming>` comes only from a hyper connection.
        let (client, server) = tokio::io::duplex(4096);
        let size = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = size.clone();
        let svc = hyper::service::service_fn(move |req| {
            let fut = handle(rt.clone(), info.clone(), req);
            seen.store(
                std::mem::size_of_val(&fut),
                std::sync::atomic::Ordering::SeqCst,
            );
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc),
        );
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/")
            .header(http::header::HOST, "h")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 503, "the only backend refuses connections");
        let size = size.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            size > 0 && size <= 4096,
            "the request future is {size} bytes"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
