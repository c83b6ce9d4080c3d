//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
//! `/v3/watch`), which every etcd server since 3.4 serves on its client port (3.3 served
//! only `/v3beta/`).
//!
//! Three rules keep it safe on a bad network:
//! - A transaction that was sent but not answered is never re-sent blindly to another
//!   endpoint: the key is read back first. Holding our value: it committed. Unchanged:
//!   the next endpoint is tried. Anything else: someone else won.
//! - Unary calls reuse one idle connection per endpoint (lease keep-alives run every
//!   few hundred milliseconds); a connection found closed is replaced before anything
//!   is sent on it.
//! - Watches ask for progress notifications, and a watch that hears nothing (no event,
//!   no progress) for [`WATCH_SILENCE`] is given up, so the caller re-reads and watches
//!   again instead of trusting a dead connection.
//!
//! Why not the gRPC `etcd-client` crate: it generates its bindings with `protoc` at build
//! time, and the README's promise is that `cargo test` works on a fresh machine with
//! nothing else installed. The gateway is the same API (the same transactions with
//! compares, leases and watches, translated one to one), so keyway keeps the semantics
//! and loses nothing it uses: a few hundred bytes of JSON per call on a path that runs
//! only on topology changes, lease keep-alives and watch events.
//!
//! Int64 fields travel as JSON strings and bytes as base64, as the gateway's protobuf
//! JSON mapping says; fields equal to their default are omitted (an absent `succeeded`
//! means false, absent `kvs` means none).
//!
//! This module owns the client itself: its endpoints and the preferred one, the pooled
//! unary connections, streaming connections for watches, and reading the gateway's JSON.
//! The calls live by concern in `txn` (transactions with read-back), `lease` (leases
//! and what is registered under them) and `watch` (watches with progress). Nothing
//! here decides what a key means: the coordinator (`failover`) does.

mod lease;
mod txn;
mod watch;

pub use lease::Claim;
pub use txn::Swap;
pub use watch::{WatchEvent, WATCH_SILENCE};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::oneshot;

/// One etcd client endpoint: as configured, and the address its name resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: std::net::SocketAddr,
    /// As configured: `host:port` (the Host header, and its host the TLS server name)
    /// and whether it is `https://`.
    pub at: keyway_config::EtcdEndpoint,
}

/// One key as etcd returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of its last change (its compare-and-swap token).
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A client for a list of endpoints: each call tries them in order.
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<Endpoint>,
    /// For `https://` endpoints.
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    /// One idle connection per endpoint, for unary calls.
    idle: Arc<Mutex<Vec<Option<oneshot::Conn>>>>,
    /// The endpoint that answered last: tried first, so one dead endpoint costs one
    /// timeout, not one per call.
    preferred: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Client {
    /// A client; nothing is contacted until the first call. `tls` is used for the
    /// endpoints that say `https://`.
    pub fn new(
        endpoints: Vec<Endpoint>,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Self {
        let idle = Arc::new(Mutex::new(endpoints.iter().map(|_| None).collect()));
        Self {
            endpoints,
            tls,
            timeout,
            idle,
            preferred: Arc::default(),
        }
    }

    /// Endpoint indices, the one that answered last first.
    fn order(&self) -> impl Iterator<Item = usize> {
        let n = self.endpoints.len();
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed) % n.max(1);
        (first..n).chain(0..first)
    }

    fn answered(&self, i: usize) {
        self.preferred
            .store(i, std::sync::atomic::Ordering::Relaxed);
    }

    /// POSTs `body` to `path` on the first endpoint that answers. Only for calls that
    /// may safely be sent twice (reads, keep-alives, grants: a stray lease expires by
    /// itself); transactions go through [`Client::txn`] and a read-back.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, String> {
        let mut last = String::from("no etcd endpoint configured");
        for i in self.order() {
            match self.post_within(i, path, body).await {
                Ok(v) => {
                    self.answered(i);
                    return Ok(v);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// One POST to endpoint `i`, bounded by the client's timeout.
    async fn post_within(&self, i: usize, path: &str, body: &Value) -> Result<Value, String> {
        let ep = &self.endpoints[i];
        match tokio::time::timeout(self.timeout, self.post(i, path, body)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("etcd {}{path}: {e}", ep.at.url())),
            Err(_) => Err(format!(
                "etcd {}{path}: no answer within {:?}",
                ep.at.url(),
                self.timeout
            )),
        }
    }
    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, String> {
        let v = self
            .call("/v3/kv/range", &json!({ "key": B64.encode(key) }))
            .await?;
        Ok(kvs(&v).into_iter().next())
    }

    /// Reads every key under `prefix`, and the store revision of the read.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), String> {
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": B64.encode(prefix), "range_end": B64.encode(range_end(prefix)) }),
            )
            .await?;
        Ok((kvs(&v), int(&v["header"]["revision"])))
    }
}

/// The end of the key range that holds exactly the keys starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv(v: &Value) -> Option<Kv> {
    let key = B64.decode(v["key"].as_str()?).ok()?;
    let value = match v["value"].as_str() {
        Some(s) => B64.decode(s).ok()?,
        None => Vec::new(),
    };
    Some(Kv {
        key: String::from_utf8(key).ok()?,
        value,
        mod_revision: int(&v["mod_revision"]),
        lease: int(&v["lease"]),
    })
}

fn kvs(v: &Value) -> Vec<Kv> {
    v["kvs"]
        .as_array()
        .map(|a| a.iter().filter_map(kv).collect())
        .unwrap_or_default()
}

impl Client {
    fn target<'a>(&'a self, ep: &'a Endpoint) -> oneshot::Target<'a, std::net::SocketAddr> {
        oneshot::Target {
            connect: ep.addr,
            authority: &ep.at.authority,
            tls: if ep.at.tls { self.tls.as_ref() } else { None },
        }
    }

    /// A streaming call (watch) on a connection of its own.
    async fn open(
        &self,
        ep: &Endpoint,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let resp = oneshot::post_json(self.target(ep), path, body.to_string()).await?;
        check_status(resp).await
    }

    /// A unary call on endpoint `i`'s idle connection (or a new one), which goes back
    /// to idle once its answer is read.
    async fn post(&self, i: usize, path: &str, body: &Value) -> Result<Value, String> {
        let ep = &self.endpoints[i];
        let reused = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.get_mut(i).and_then(Option::take))
            .filter(oneshot::Conn::is_open);
        let mut conn = match reused {
            Some(c) => c,
            None => oneshot::connect(&self.target(ep)).await?,
        };
        let resp = oneshot::post_on(&mut conn, &ep.at.authority, path, body.to_string()).await?;
        let resp = check_status(resp).await?;
        let bytes = read_limited(resp.into_body(), MAX_ANSWER).await?;
        if conn.is_open() {
            if let Ok(mut idle) = self.idle.lock() {
                if let Some(slot) = idle.get_mut(i) {
                    *slot = Some(conn);
                }
            }
        }
        // Streaming endpoints (keepalive) answer with one message per line.
        let first = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let v: Value =
            serde_json::from_slice(first).map_err(|e| format!("bad JSON from etcd: {e}"))?;
        if let Some(err) = v.get("error") {
            return Err(format!("etcd refused: {err}"));
        }
        Ok(v)
    }
}

/// The largest unary answer read (keyway's keys are small; a larger answer is an error,
/// not an allocation).
const MAX_ANSWER: usize = 16 << 20;

async fn check_status(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let text = read_limited(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Err(format!("HTTP {status}: {}", text.trim()))
}

/// Reads a body, refusing one larger than `limit`.
async fn read_limited(mut body: hyper::body::Incoming, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > limit {
                return Err(format!("etcd answer larger than {limit} bytes"));
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_covers_exactly_the_prefix() {
        assert_eq!(range_end("/keyway/"), b"/keyway0".to_vec());
        assert_eq!(range_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(range_end(""), vec![0]);
    }

    #[test]
    fn gateway_json_is_read_with_its_defaults() {
        let v: Value = serde_json::from_str(
            r#"{"header":{"revision":"7"},"kvs":[{"key":"L2svYQ==","mod_revision":"5","value":"aGk="}]}"#,
        )
        .unwrap();
        assert_eq!(
            kvs(&v),
            vec![Kv {
                key: "/k/a".into(),
                value: b"hi".to_vec(),
                mod_revision: 5,
                lease: 0,
            }]
        );
        assert_eq!(int(&v["header"]["revision"]), 7);
        assert!(kvs(&serde_json::json!({"header": {}})).is_empty());
        assert_eq!(int(&Value::Null), 0);
    }
}
