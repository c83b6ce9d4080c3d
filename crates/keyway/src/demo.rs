//! `keyway demo`: embedded demo backends on loopback, so keyway can be tried with no farm.
//!
//! For every backend address in the demo config, a small HTTP server answers with a JSON
//! document naming the cluster and backend that served it (plus the forwarded headers
//! keyway added), which makes balancing, stickiness and fallback visible with `curl`.
//! Backends of clusters that a `[[tcp_listener]]` uses instead greet with their name
//! and echo what they receive, like a vault answering on its port (try them with `nc`).
//! The dashboard's "break something" control stops and starts them (`POST
//! /demo/backends/CLUSTER/BACKEND/stop|start`, served only by `keyway demo`), so a
//! newcomer can watch a promotion, the fencing and a failback.
//! Demo backends are for trying keyway only; nothing in the proxy depends on them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use keyway_proxy::body::{self, Body};
use keyway_proxy::load::Loaded;

/// The demo backends of a running demo, each of which the dashboard's "break something"
/// control can stop (its port closes and its open connections are cut, as when a server
/// dies) and start again on the same address.
pub struct DemoBackends {
    backends: Vec<DemoBackend>,
}

struct DemoBackend {
    cluster: String,
    id: String,
    address: SocketAddr,
    tcp: bool,
    /// The accept loop while the backend runs; aborting it drops its listener and the
    /// connections it serves.
    running: Mutex<Option<JoinHandle<()>>>,
}

/// Why a demo control call did nothing, as the admin API answers it.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlError {
    /// No demo backend by that cluster and id.
    Unknown,
    /// Its address could not be bound again.
    Bind(String),
}

/// Starts one demo backend per backend address of a loaded config.
pub async fn start_backends(loaded: &Loaded) -> std::io::Result<Arc<DemoBackends>> {
    let config = &loaded.config;
    let tcp: Vec<&str> = config
        .tcp_listeners
        .iter()
        .flat_map(|l| {
            l.cluster
                .iter()
                .map(String::as_str)
                .chain(l.sni.iter().map(|r| r.cluster.as_str()))
        })
        .collect();
    let mut backends = Vec::new();
    for (c, parts) in config.clusters.iter().zip(&loaded.plane.clusters) {
        for (b, &address) in c.backends.iter().zip(&parts.addresses) {
            let d = DemoBackend {
                cluster: c.name.clone(),
                id: b.id.clone(),
                address,
                tcp: tcp.contains(&c.name.as_str()),
                running: Mutex::new(None),
            };
            d.start().await?;
            backends.push(d);
        }
    }
    Ok(Arc::new(DemoBackends { backends }))
}

impl DemoBackends {
    /// Every demo backend: cluster, id, address.
    pub fn list(&self) -> Vec<(String, String, SocketAddr)> {
        self.backends
            .iter()
            .map(|b| (b.cluster.clone(), b.id.clone(), b.address))
            .collect()
    }

    /// Stops a demo backend: its port refuses connections and the open ones are cut.
    /// Stopping a stopped backend does nothing.
    pub fn stop(&self, cluster: &str, id: &str) -> Result<(), ControlError> {
        let b = self.find(cluster, id)?;
        if let Some(task) = b.running.lock().ok().and_then(|mut r| r.take()) {
            task.abort();
        }
        Ok(())
    }

    /// Starts a stopped demo backend again on its address. Starting a running backend
    /// does nothing.
    pub async fn start(&self, cluster: &str, id: &str) -> Result<(), ControlError> {
        let b = self.find(cluster, id)?;
        b.start()
            .await
            .map_err(|e| ControlError::Bind(e.to_string()))
    }

    /// `/status`'s `demo`: every demo backend and whether it runs.
    pub fn status_json(&self) -> serde_json::Value {
        self.backends
            .iter()
            .map(|b| {
                serde_json::json!({
                    "cluster": b.cluster,
                    "backend": b.id,
                    "address": b.address.to_string(),
                    "running": b.running.lock().is_ok_and(|r| r.as_ref().is_some_and(|t| !t.is_finished())),
                })
            })
            .collect()
    }

    fn find(&self, cluster: &str, id: &str) -> Result<&DemoBackend, ControlError> {
        self.backends
            .iter()
            .find(|b| b.cluster == cluster && b.id == id)
            .ok_or(ControlError::Unknown)
    }
}

impl DemoBackend {
    async fn start(&self) -> std::io::Result<()> {
        if self
            .running
            .lock()
            .is_ok_and(|r| r.as_ref().is_some_and(|t| !t.is_finished()))
        {
            return Ok(());
        }
        let address = self.address;
        let sock = TcpListener::bind(address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("demo backend {} on {address}: {e}", self.id),
            )
        })?;
        let (cluster, id) = (self.cluster.clone(), self.id.clone());
        let task = if self.tcp {
            tokio::spawn(greet_and_echo(sock, id))
        } else {
            tokio::spawn(serve(sock, cluster, id))
        };
        if let Ok(mut r) = self.running.lock() {
            if let Some(old) = r.replace(task) {
                old.abort();
            }
        }
        Ok(())
    }
}

async fn serve(sock: TcpListener, cluster: String, id: String) {
    // Connections live in the accept loop's set, so stopping the loop cuts them.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = sock.accept().await else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let (cluster, id) = (cluster.clone(), id.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let r = answer(&cluster, &id, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A TCP demo backend: greets with its name, then echoes (one 4 KiB buffer).
async fn greet_and_echo(sock: TcpListener, id: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = JoinSet::new();
    loop {
        let Ok((mut stream, _)) = sock.accept().await else {
            continue;
        };
        while conns.try_join_next().is_some() {}
        let greeting = format!("{id} ready: type a line, it comes back\n");
        conns.spawn(async move {
            if stream.write_all(greeting.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn answer(cluster: &str, id: &str, req: &Request<Incoming>) -> Response<Body> {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let doc = serde_json::json!({
        "cluster": cluster,
        "backend": id,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "x-forwarded-for": h("x-forwarded-for"),
        "x-forwarded-proto": h("x-forwarded-proto"),
        "x-forwarded-host": h("x-forwarded-host"),
        "via": h("via"),
    });
    let mut r = Response::new(body::full(format!("{doc:#}\n")));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-demo-backend", v);
    }
    r
}
