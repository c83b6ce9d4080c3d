//! `keyway demo`: embedded demo backends on loopback, so keyway can be tried with no farm.
//!
//! For every backend address in the demo config, a small HTTP server answers with a JSON
//! document naming the cluster and backend that served it (plus the forwarded headers
//! keyway added), which makes balancing, stickiness and fallback visible with `curl`.
//! Backends of clusters that a `[[tcp_listener]]` uses instead greet with their name
//! and echo what they receive, like a vault answering on its port (try them with `nc`).
//! Demo backends are for trying keyway only; nothing in the proxy depends on them.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use keyway_proxy::body::{self, Body};
use keyway_proxy::load::Loaded;

/// Starts one demo backend per backend address of a loaded config. Returns the
/// addresses bound.
pub async fn start_backends(loaded: &Loaded) -> std::io::Result<Vec<(String, String, SocketAddr)>> {
    let config = &loaded.config;
    let mut started = Vec::new();
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
    for (c, parts) in config.clusters.iter().zip(&loaded.plane.clusters) {
        for (b, &address) in c.backends.iter().zip(&parts.addresses) {
            let sock = TcpListener::bind(address).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("demo backend {} on {address}: {e}", b.id))
            })?;
            let (cluster, id) = (c.name.clone(), b.id.clone());
            started.push((cluster.clone(), id.clone(), address));
            if tcp.contains(&c.name.as_str()) {
                tokio::spawn(greet_and_echo(sock, id));
            } else {
                tokio::spawn(serve(sock, cluster, id));
            }
        }
    }
    Ok(started)
}

async fn serve(sock: TcpListener, cluster: String, id: String) {
    loop {
        let Ok((stream, _)) = sock.accept().await else {
            continue;
        };
        let (cluster, id) = (cluster.clone(), id.clone());
        tokio::spawn(async move {
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
    loop {
        let Ok((mut stream, _)) = sock.accept().await else {
            continue;
        };
        let greeting = format!("{id} ready: type a line, it comes back\n");
        tokio::spawn(async move {
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
