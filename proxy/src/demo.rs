//! `keyway demo`: embedded demo backends on loopback, so keyway can be tried with no farm.
//!
//! For every backend address in the demo config, a small HTTP server answers with a JSON
//! document naming the cluster and backend that served it (plus the forwarded headers
//! keyway added), which makes balancing, stickiness and fallback visible with `curl`.
//! Demo backends are for trying keyway only; nothing in the proxy depends on them.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::config::Config;

/// Starts one demo backend per backend address in `config`. Returns the addresses bound.
pub async fn start_backends(config: &Config) -> std::io::Result<Vec<(String, String, SocketAddr)>> {
    let mut started = Vec::new();
    for c in &config.clusters {
        for b in &c.backends {
            let sock = TcpListener::bind(b.address).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("demo backend {} on {}: {e}", b.id, b.address),
                )
            })?;
            let (cluster, id) = (c.name.clone(), b.id.clone());
            started.push((cluster.clone(), id.clone(), b.address));
            tokio::spawn(serve(sock, cluster, id));
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
