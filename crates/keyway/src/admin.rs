//! The admin listener: the dashboard (`/`, `dashboard`), `/metrics` (Prometheus text),
//! `/status` (JSON), `/healthz`, and the calls that change things (`POST /reload`,
//! promote, failback, drain, undrain, and in `keyway demo` only the demo backends' stop
//! and start), which need `Authorization: Bearer TOKEN` when `[admin] token_file` is set.
//!
//! The views are read-only. It shares nothing mutable with the request path
//! beyond reading the runtime snapshot and counters, and it must stay answerable while
//! the proxy is overloaded, so every handler is cheap and allocation is bounded by the
//! number of backends.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use keyway_proxy::body::{self, Body};
use keyway_proxy::forward::Runtime;
use keyway_proxy::telemetry;

pub use crate::admin_drain::OPERATOR_HEADER;
use crate::demo::{ControlError as DemoError, DemoBackends};

/// Serves the admin API until shutdown.
pub async fn serve(
    sock: TcpListener,
    runtime: Arc<ArcSwap<Runtime>>,
    reloader: Arc<keyway_proxy::server::Reloader>,
    demo: Option<Arc<DemoBackends>>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(a) = sock.local_addr() {
        tracing::info!(listen = %a, "admin listening");
        if !a.ip().is_loopback() && reloader.admin_token().is_none() {
            tracing::warn!(listen = %a, "the admin listener is not on loopback and has no token_file: whoever reaches it can reload the config and promote backends. Set [admin] token_file");
        }
    }
    loop {
        let (stream, peer) = tokio::select! {
            r = sock.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let runtime = runtime.clone();
        let reloader = reloader.clone();
        let demo = demo.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let rt = runtime.load_full();
                let reloader = reloader.clone();
                let demo = demo.clone();
                async move {
                    if req.method() == Method::POST {
                        if let Some(denied) = authorize(&reloader, &req) {
                            return Ok::<_, Infallible>(denied);
                        }
                    }
                    // `/plugins/reload` is the same operation: plugins are part of the config, and
                    // reloading them goes through the same build-validate-swap.
                    if req.method() == Method::POST
                        && matches!(req.uri().path(), "/reload" | "/plugins/reload")
                    {
                        // Building a runtime reads files and parses certificates: off the
                        // async workers.
                        let result = tokio::task::spawn_blocking(move || reloader.reload())
                            .await
                            .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
                        return Ok::<_, Infallible>(match result {
                            Ok(summary) => reply(
                                StatusCode::OK,
                                "text/plain",
                                format!("reloaded: {summary}\n"),
                            ),
                            Err(e) => reply(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "text/plain",
                                format!("reload refused, the running configuration stays:\n{e}\n"),
                            ),
                        });
                    }
                    if req.method() == Method::POST {
                        if let Some(resp) = topology_call(&reloader, req.uri().path()).await {
                            return Ok(resp);
                        }
                        if let Some(resp) = crate::admin_drain::call(&reloader, &req, peer).await {
                            return Ok(resp);
                        }
                        if let Some(resp) = demo_call(demo.as_deref(), req.uri().path()).await {
                            return Ok(resp);
                        }
                    }
                    if matches!(*req.method(), Method::GET | Method::HEAD) {
                        if let Some(page) = crate::dashboard::asset(req.uri().path()) {
                            return Ok(page);
                        }
                    }
                    if req.method() == Method::GET && req.uri().path() == "/state" {
                        return Ok(match reloader.failover().export().await {
                            Ok(doc) => reply(
                                StatusCode::OK,
                                "application/json",
                                serde_json::to_string_pretty(&doc).unwrap_or_default(),
                            ),
                            Err(e) => reply(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                format!("the stored decisions could not be read: {e}\n"),
                            ),
                        });
                    }
                    Ok::<_, Infallible>(route(&rt, &reloader, demo.as_deref(), req))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `None` when `req` may change things: no token is configured, or it carries the
/// token. Otherwise the 401 to send.
fn authorize(
    reloader: &keyway_proxy::server::Reloader,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    let token = reloader.admin_token()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
        return None;
    }
    tracing::warn!(path = %req.uri().path(), "admin call refused: missing or wrong bearer token");
    metrics::counter!("keyway_admin_denied_total").increment(1);
    let mut r = reply(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        "this call needs `Authorization: Bearer TOKEN`, TOKEN being the content of [admin] token_file\n".into(),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"keyway-admin\""),
    );
    Some(r)
}

/// Compares without stopping at the first difference, so the time taken does not say
/// how much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /clusters/NAME/failback` and `POST /clusters/NAME/promote/BACKEND`.
async fn topology_call(
    reloader: &keyway_proxy::server::Reloader,
    path: &str,
) -> Option<Response<Body>> {
    let rest = path.strip_prefix("/clusters/")?;
    let (cluster, action) = rest.split_once('/')?;
    let failover = reloader.failover();
    let result = match action.split_once('/') {
        None if action == "failback" => failover.fail_back(cluster).await,
        Some(("promote", backend)) if !backend.is_empty() && !backend.contains('/') => {
            failover
                .switchover(
                    cluster,
                    backend,
                    &format!("manual promotion of {backend}"),
                    "manual",
                )
                .await
        }
        _ => return None,
    };
    Some(decided(result))
}

/// The answer to a decision call: the decision as JSON, or why it was refused with the
/// status the coordinator chose.
pub(crate) fn decided<T: serde::Serialize>(
    result: Result<T, keyway_proxy::failover::Refused>,
) -> Response<Body> {
    match result {
        Ok(t) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&t).unwrap_or_default(),
        ),
        Err(e) => reply(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::CONFLICT),
            "text/plain",
            format!("{}\n", e.message),
        ),
    }
}

/// `POST /demo/backends/CLUSTER/BACKEND/stop|start`, answered only by `keyway demo`
/// (elsewhere the path is unknown: `None`, so a 404).
async fn demo_call(demo: Option<&DemoBackends>, path: &str) -> Option<Response<Body>> {
    let demo = demo?;
    let rest = path.strip_prefix("/demo/backends/")?;
    let (cluster, rest) = rest.split_once('/')?;
    let (backend, action) = rest.split_once('/')?;
    let result = match action {
        "stop" => demo.stop(cluster, backend),
        "start" => demo.start(cluster, backend).await,
        _ => return None,
    };
    Some(match result {
        Ok(()) => reply(
            StatusCode::OK,
            "text/plain",
            format!("demo backend {cluster}/{backend}: {action} done\n"),
        ),
        Err(DemoError::Unknown) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no demo backend `{backend}` in cluster `{cluster}`\n"),
        ),
        Err(DemoError::Bind(e)) => reply(StatusCode::CONFLICT, "text/plain", format!("{e}\n")),
    })
}

fn route(
    rt: &Runtime,
    reloader: &keyway_proxy::server::Reloader,
    demo: Option<&DemoBackends>,
    req: Request<Incoming>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            telemetry::render(),
        ),
        (&Method::GET, "/status") => reply(
            StatusCode::OK,
            "application/json",
            {
                let mut s = status_json(rt, reloader.failover());
                s["last_reload"] = reloader.last_json();
                s["coordination"] = reloader.failover().status_json();
                s["tcp_listeners"] = reloader.tcp_status_json();
                s["demo"] = demo.map_or(serde_json::Value::Null, DemoBackends::status_json);
                s.to_string()
            },
        ),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        // Asked by peers whose etcd is gone (`[coordination] failsafe`): no token, it
        // reveals what /status shows.
        (&Method::GET, "/coordination/failsafe") => reply(
            StatusCode::OK,
            "application/json",
            reloader
                .failover()
                .failsafe_answer(
                    req.headers()
                        .get(keyway_proxy::failover::FAILSAFE_FROM)
                        .and_then(|v| v.to_str().ok()),
                )
                .to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try GET / (the dashboard), /metrics, /status, /state, /healthz, POST /reload, POST /clusters/NAME/promote/BACKEND, POST /clusters/NAME/failback or POST /clusters/NAME/backends/BACKEND/drain|undrain\n".into(),
        ),
    }
}

/// Plugins a cluster uses: name, file, hash, load time, calls and errors.
fn plugins_json(
    c: &keyway_proxy::cluster::Cluster,
    failover: &keyway_proxy::failover::Failover,
) -> serde_json::Value {
    let promotion = failover.promotion_plugin(&c.cfg.name);
    let mut plugins = Vec::new();
    if let Some(p) = &c.plugins.classifier {
        plugins.push(("classifier", &p.meta));
    }
    if let Some(p) = &c.plugins.health {
        plugins.push(("health", &p.meta));
    }
    if let Some(p) = &promotion {
        plugins.push(("promotion", &p.meta));
    }
    plugins
        .into_iter()
        .map(|(kind, meta)| {
            let mut v = meta.status_json();
            v["kind"] = kind.into();
            v
        })
        .collect()
}

pub(crate) fn reply(status: StatusCode, ctype: &'static str, text: String) -> Response<Body> {
    let mut r = Response::new(body::full(text));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The `/status` document: every cluster with its backends and their counters.
pub fn status_json(rt: &Runtime, failover: &keyway_proxy::failover::Failover) -> serde_json::Value {
    let clusters: Vec<_> = rt
        .clusters
        .iter()
        .map(|c| {
            let view = c.health.view_full();
            let drains = failover.drains(&c.cfg.name);
            let backends: Vec<_> = c
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let last_error = b.last_error().map(|(at, msg)| {
                        serde_json::json!({
                            "at_unix_ms": keyway_proxy::unix_ms(at),
                            "message": msg,
                        })
                    });
                    serde_json::json!({
                        "id": b.cfg.id,
                        "address": b.address.to_string(),
                        "weight": b.cfg.weight,
                        "priority": b.cfg.priority,
                        "tls": b.cfg.tls,
                        "in_flight": b.in_flight(),
                        "max_connections": b.cfg.max_connections,
                        "queued": b.queued(),
                        "max_queue": b.cfg.max_queue,
                        "queue_rejected": b.queue_rejected(),
                        "requests": b.requests(),
                        "connect_errors": b.connect_errors(),
                        "responses_5xx": b.responses_5xx(),
                        "pool_idle": b.pool.has_idle(),
                        "last_error": last_error,
                        "role": match (c.cfg.strategy, view.backends.get(i).map(|v| (v.role, v.fenced))) {
                            (keyway_proxy::config::Strategy::PrimaryReplica, Some((_, true))) => Some("fenced"),
                            (keyway_proxy::config::Strategy::PrimaryReplica, Some((keyway_proxy::config::Role::Primary, _))) => Some("primary"),
                            (keyway_proxy::config::Strategy::PrimaryReplica, _) => Some("replica"),
                            _ => None,
                        },
                        "health": c.health.status_json(i),
                        "drain": crate::admin_drain::backend_json(drains.get(&b.cfg.id), b),
                    })
                })
                .collect();
            serde_json::json!({
                "name": c.cfg.name,
                "strategy": c.cfg.strategy.as_str(),
                "balance": c.cfg.balance.as_str(),
                "in_flight": c.backends.iter().map(|b| u64::from(b.in_flight())).sum::<u64>(),
                "primary": view.primary.map(|p| c.backends[p].cfg.id.clone()),
                "epoch": view.epoch,
                "plugins": plugins_json(c, failover),
                "active_checks": c.health.active().is_some(),
                "drained": drains.keys().filter(|id| c.backends.iter().any(|b| &b.cfg.id == *id)).collect::<Vec<_>>(),
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({ "clusters": clusters })
}
