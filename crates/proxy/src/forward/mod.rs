//! The request path: route a client request to a cluster, pick a backend, send the
//! request over a pooled connection, retry where that is safe, and stream the response
//! back. WebSocket upgrades become a byte tunnel.
//!
//! Retry rules (written down only here; `retry::Retry` enforces them):
//! - a connection that was never established may be retried on another backend,
//!   whatever the method (nothing reached the backend);
//! - a request of which not a byte was written (the pooled connection closed under it)
//!   is retried likewise;
//! - a bodiless GET/HEAD/OPTIONS whose pooled connection the backend closed before a
//!   byte of the answer (the keep-alive race) is sent once more on a new connection to
//!   the same backend (`exchange::send_own`), counted neither as a retry nor against the
//!   backend;
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
use hyper_util::rt::TokioIo;

use crate::backend::Sender;
use crate::body::{self, Body, BodyWatch, BoxError, Limited};
use crate::classify::Kind;
use crate::cluster::{Backend, Cluster, InFlight, Slot};
use crate::config::{Balance, FrontDoorConfig, Limits, ReadsOnPrimary, Role, Strategy};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::frontdoor;
use crate::h1;
use crate::headers;
use crate::health::{BodyFacts, Ending, Fault, HealthView};
use crate::permit::{Permit, WriteTicket};
use crate::router::Router;
use crate::upstream::{self, Purpose};

mod access;
mod eligible;
mod exchange;
mod pick;
mod respond;
mod retry;

use access::AccessLog;
use eligible::*;
use exchange::*;
use pick::*;
use respond::*;
use retry::{Next, Retry};

pub use eligible::EPOCH_HEADER;

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
    pub drain: crate::limits::DrainGuard,
}

/// Handles one client request, with hyper's request body or none (keyway's own
/// HTTP/1.1 side serves only bodiless requests). Never fails: errors become HTTP answers.
// Deliberately not an `async fn` (the note inside says why).
#[allow(clippy::manual_async_fn)]
pub fn handle<B>(
    rt: Arc<Runtime>,
    info: Arc<ConnInfo>,
    req: Request<B>,
) -> impl Future<Output = Response<Body>>
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    // An `async` block using the arguments where they are: an `async fn` moves them
    // into locals and keeps both copies in every request's future (see `h1::send`).
    async move {
        // Only what the access log needs is copied (and the clock read), and only when it
        // is on: the method and start here, the path in `proxy` (as sent, then as admitted).
        let logged = rt
            .access_log
            .then(|| (req.method().clone(), Instant::now()));
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
        if let Some((method, started)) = logged {
            log.emit(&rt, &info, &method, resp.status(), started);
        }
        resp
    }
}

type Failure = (ProxyError, Option<String>);

// Deliberately not an `async fn` (the note inside says why).
#[allow(clippy::manual_async_fn)]
fn proxy<'a, B>(
    rt: &'a Runtime,
    info: &'a ConnInfo,
    mut req: Request<B>,
    log: &'a mut AccessLog,
) -> impl Future<Output = Result<Response<Body>, Failure>> + 'a
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    async move {
        // The front door first: what it admits is what is routed, classified and forwarded.
        let door =
            frontdoor::admit(&mut req, &info.door, info.client.ip()).map_err(|e| (e, None))?;
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
            && headers::cookie(req.headers(), cluster.ryw_cookie_name()).is_some_and(|t| {
                cluster.ryw_valid(t, crate::unix_ms(std::time::SystemTime::now()))
            });
        let mut eligible = Eligible::new(cluster, kind, ryw_fresh, &rt.permit).map_err(fail)?;

        // A sticky cookie is a preference among eligible backends; a write never follows it.
        // It keeps a drained backend until the drain's deadline (no one is logged out).
        let pinned = cluster
            .cfg
            .sticky
            .as_ref()
            .and_then(|s| {
                headers::cookie(req.headers(), &s.cookie).and_then(|t| cluster.backend_by_token(t))
            })
            .filter(|&p| eligible.pin_holds(p));
        if let Some(p) = pinned.filter(|&p| eligible.view.drained(p)) {
            cluster.backends[p].holders.note(info.client.ip());
        }

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
        let added = headers::forwarded(&mut parts.headers, who, &host, via);
        // keyway's HTTP/1.1 client writes the added fields straight into the request head.
        // Where a connection may be hyper's (an upgrade; a backend that speaks or may
        // negotiate HTTP/2) they go into the map now, so a request handed back unsent and
        // sent again never carries them twice.
        let extra = if upgrade || !cluster.plain_http1() {
            added.apply(&mut parts.headers);
            None
        } else {
            Some(added)
        };
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
        let mut retry = Retry::new(
            Request::from_parts(parts, body),
            cluster.cfg.retries,
            empty_body,
        );
        let purpose = if upgrade {
            Purpose::Upgrade
        } else {
            Purpose::Request
        };

        loop {
            // 1. A slot and a connection: the pinned backend first, then the cluster's strategy.
            let (idx, mut sender, slot) =
                match pick_and_connect(cluster, pinned, &mut retry.tried, purpose, &eligible).await
                {
                    Ok(x) => x,
                    Err(e) => {
                        let remaining = eligible.remaining(cluster, &retry.tried);
                        match retry
                            .after_connect_failure(e.retryable, remaining, || cluster.try_retry())
                        {
                            Next::Again => continue,
                            Next::NoneLeft => return Err(fail(no_backend_left(cluster, e))),
                            Next::GiveUp => return Err(fail(e)),
                        }
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
            retry.tried.push(idx);
            log.attempts += 1;
            log.backend = Some(idx);

            // 2. Send, bounded by protocol_timeout for the response head.
            let Some(mut req) = retry.take(|tried| eligible.remaining(cluster, tried)) else {
                return Err(fail(ProxyError::new(
                    ErrorKind::UpstreamProtocol,
                    Side::Internal,
                    false,
                    "request was consumed by an earlier attempt",
                )));
            };
            let inflight = backend.start_request(slot);
            prepare_upstream(&mut req, &sender, &host, backend.tls.is_some());
            if let (Some(a), false) = (&extra, matches!(sender, Sender::H1(_))) {
                // Not expected (`plain_http1` said every connection is keyway's own), but
                // the fields must reach the backend whichever client carries them.
                a.apply(req.headers_mut());
            }
            let pt = cluster.cfg.protocol_timeout;
            // The connection's timer, if it kept one: lent to this exchange, and given
            // back with the answer.
            let mut timer = match &mut sender {
                Sender::H1(conn) => conn.take_timer(),
                _ => None,
            };
            // Pinned here, not inside the helper: moving it in would store it twice in this
            // future, which hyper moves on every request.
            let sending = std::pin::pin!(send(
                sender,
                req,
                extra.as_ref(),
                &backend,
                cluster.cfg.connect_timeout
            ));
            let exchange = within_protocol_timeout(sending, pt, watch.as_deref(), &mut timer);
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
            let (failure, unsent, ending) = match result {
                Some(Ok(mut resp)) => {
                    if let (Some(t), UpBody::Own(b)) = (timer.take(), resp.body_mut()) {
                        b.keep_timer(t);
                    }
                    let mut inflight = inflight;
                    inflight.carry(eligible.ticket.take());
                    let answer = Answer {
                        pinned,
                        idx,
                        kind,
                        inflight,
                        on_client_upgrade,
                        watch: watch.clone(),
                    };
                    return Ok(respond(cluster, &backend, info, resp, answer, &rt.permit));
                }
                Some(Err((e, unsent, ending))) => (e, unsent, ending),
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
                    let e =
                        ProxyError::new(ErrorKind::ProtocolTimeout, Side::Upstream, false, detail);
                    (e, None, Ending::TimedOut)
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
            // 3. Retry where the rules allow it (`retry.rs`).
            let next = retry.after_exchange_failure(
                unsent,
                |tried| eligible.remaining(cluster, tried),
                || cluster.try_retry(),
            );
            if next != Next::Again {
                return Err(fail(failure));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper moves each request's future into place (`recv_msg`), so its size is paid
    /// in copying on every request. A TCP + TLS handshake inline made it 10 KiB;
    /// rarely taken large branches are boxed. This keeps it that way. It is about
    /// 5.3 KiB since the HTTP/1.1 exchange runs in the request's own future (`h1::send`,
    /// about 900 bytes, state that used to live in hyper's connection task); the bound,
    /// 6 KiB, leaves room for that and still catches an unboxed handshake.
    #[tokio::test]
    async fn the_per_request_future_stays_small() {
        let dir = std::env::temp_dir().join(format!("keyway-future-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let loaded = crate::load::from_str_with_base(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\ncluster = \"c\"\n[cluster.c]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
            "t.toml",
            &dir,
        )
        .unwrap();
        let config = loaded.config.clone();
        let failover = crate::failover::Failover::open(
            &config,
            &loaded.coordination,
            crate::failover::Access::Reader,
        )
        .await
        .unwrap();
        let rt = Arc::new(crate::server::build_runtime(&config, &loaded.plane, &failover).unwrap());
        let (drain, _rx) = tokio::sync::mpsc::channel(1);
        let info = Arc::new(ConnInfo {
            client: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            limits: Arc::new(config.listeners[0].limits.clone()),
            door: Arc::new(config.listeners[0].door.clone()),
            drain: crate::limits::DrainGuard::new(drain, None),
        });
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
            size > 0 && size <= 6144,
            "the request future is {size} bytes"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
