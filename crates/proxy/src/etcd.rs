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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::oneshot;

/// One etcd client endpoint, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: std::net::SocketAddr,
    /// `host:port` as written: the Host header, and its host the TLS server name.
    pub authority: String,
    /// `https://`.
    pub tls: bool,
}

impl Endpoint {
    /// The endpoint as an URL, for messages.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
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

/// A watch that hears nothing (no event, no progress notification) for this long is
/// given up and re-established after a full read.
pub const WATCH_SILENCE: Duration = Duration::from_secs(30);

/// The outcome of a compare-and-swap.
#[derive(Debug)]
pub enum Swap {
    /// Written; the new revision.
    Done(i64),
    /// A compare failed; the key as it is now (`None`: absent).
    Lost(Option<Kv>),
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

/// An event of a watch stream.
pub enum WatchEvent {
    /// A key was written.
    Put(Kv),
    /// A key was deleted.
    Delete(String),
    /// Nothing changed up to this store revision (a progress notification, or the
    /// header of any message).
    Progress(i64),
}

/// The outcome of registering an instance's key under its lease.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours (created now, or already under our lease).
    Ours,
    /// Another lease holds the key: another process uses this name, or an earlier run of
    /// this one whose lease has not expired yet.
    Taken {
        /// The other holder's lease.
        lease: i64,
    },
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
    /// itself); transactions go through [`Client::txn_once`] and a read-back.
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
            Ok(Err(e)) => Err(format!("etcd {}{path}: {e}", ep.url())),
            Err(_) => Err(format!(
                "etcd {}{path}: no answer within {:?}",
                ep.url(),
                self.timeout
            )),
        }
    }

    /// A transaction: sent to one endpoint after another, but never again after an
    /// attempt that may have reached etcd, unless `unchanged` (reading the key back)
    /// says it did not commit.
    async fn txn(
        &self,
        body: &Value,
        key: &str,
        ours: &[u8],
        unchanged: impl Fn(&Option<Kv>) -> bool,
    ) -> Result<TxnOutcome, String> {
        let mut last = String::from("no etcd endpoint configured");
        for i in self.order() {
            match self.post_within(i, "/v3/kv/txn", body).await {
                Ok(v) => {
                    self.answered(i);
                    return Ok(TxnOutcome::Answered(v));
                }
                Err(e) => last = e,
            }
            // Sent, maybe committed: read back before anything else.
            match self.get(key).await {
                Ok(Some(kv)) if kv.value == ours => {
                    tracing::info!(key, "an unanswered etcd transaction had committed");
                    return Ok(TxnOutcome::Committed(kv));
                }
                Ok(current) if unchanged(&current) => continue,
                Ok(current) => return Ok(TxnOutcome::Superseded(current)),
                Err(e) => {
                    return Err(format!(
                        "{last}; reading the key back failed too ({e}), so whether it committed is unknown"
                    ))
                }
            }
        }
        Err(last)
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

    /// Writes `value` at `key` only if the key's revision is still `mod_revision` (0:
    /// only if absent) and, when `guard` is given, that key holds that value (the
    /// election key naming this instance). The whole check and write is one etcd
    /// transaction.
    pub async fn swap(
        &self,
        key: &str,
        mod_revision: i64,
        value: &[u8],
        guard: Option<(&str, &str)>,
    ) -> Result<Swap, String> {
        let mut compare = vec![if mod_revision == 0 {
            json!({ "key": B64.encode(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0" })
        } else {
            json!({ "key": B64.encode(key), "result": "EQUAL", "target": "MOD", "mod_revision": mod_revision.to_string() })
        }];
        if let Some((gk, gv)) = guard {
            compare.push(json!({ "key": B64.encode(gk), "result": "EQUAL", "target": "VALUE", "value": B64.encode(gv) }));
        }
        let body = json!({
            "compare": compare,
            "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value) } }],
            "failure": [{ "request_range": { "key": B64.encode(key) } }],
        });
        let unchanged =
            |cur: &Option<Kv>| cur.as_ref().map_or(0, |kv| kv.mod_revision) == mod_revision;
        match self.txn(&body, key, value, unchanged).await? {
            TxnOutcome::Committed(kv) => Ok(Swap::Done(kv.mod_revision)),
            TxnOutcome::Superseded(cur) => Ok(Swap::Lost(cur)),
            TxnOutcome::Answered(v) if v["succeeded"].as_bool() == Some(true) => {
                Ok(Swap::Done(int(&v["header"]["revision"])))
            }
            TxnOutcome::Answered(v) => {
                let current = kvs(&v["responses"][0]["response_range"]).into_iter().next();
                // An earlier attempt that went unanswered may have committed after all.
                match current {
                    Some(kv) if kv.value == value => Ok(Swap::Done(kv.mod_revision)),
                    other => Ok(Swap::Lost(other)),
                }
            }
        }
    }

    /// Takes `key` for `value` under `lease` if nobody holds it. Returns the holder.
    pub async fn campaign(&self, key: &str, value: &str, lease: i64) -> Result<String, String> {
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({
                    "compare": [{ "key": B64.encode(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
                    "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() } }],
                    "failure": [{ "request_range": { "key": B64.encode(key) } }],
                }),
            )
            .await?;
        if v["succeeded"].as_bool() == Some(true) {
            return Ok(value.to_string());
        }
        let current = v["responses"][0]["response_range"].clone();
        Ok(kvs(&current)
            .into_iter()
            .next()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default())
    }

    /// Grants a lease of `ttl` seconds. Returns its id and the TTL etcd granted.
    pub async fn grant(&self, ttl: u64) -> Result<(i64, u64), String> {
        let v = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))
            .await?;
        match int(&v["ID"]) {
            0 => Err(format!("etcd granted no lease: {v}")),
            id => Ok((id, int(&v["TTL"]).max(0) as u64)),
        }
    }

    /// Refreshes a lease. Returns the TTL it has again, in seconds (0: it had expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<u64, String> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        Ok(int(&v["result"]["TTL"]).max(0) as u64)
    }

    /// Creates `key` with `value` under `lease`, or rewrites it if it is already under
    /// that lease. A key under another lease is left alone.
    pub async fn claim(&self, key: &str, value: &[u8], lease: i64) -> Result<Claim, String> {
        let put = json!({ "request_put": { "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() } });
        let body = json!({
            "compare": [{ "key": B64.encode(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
            "success": [put],
            "failure": [{ "request_range": { "key": B64.encode(key) } }],
        });
        let absent = |cur: &Option<Kv>| cur.is_none();
        let holder = match self.txn(&body, key, value, absent).await? {
            TxnOutcome::Committed(_) => return Ok(Claim::Ours),
            TxnOutcome::Answered(v) if v["succeeded"].as_bool() == Some(true) => {
                return Ok(Claim::Ours)
            }
            TxnOutcome::Answered(v) => kvs(&v["responses"][0]["response_range"]).into_iter().next(),
            TxnOutcome::Superseded(cur) => cur,
        };
        match holder {
            Some(kv) if kv.lease == lease => {
                if self.put_under(key, value, lease).await? {
                    Ok(Claim::Ours)
                } else {
                    Ok(Claim::Taken { lease: 0 })
                }
            }
            Some(kv) => Ok(Claim::Taken { lease: kv.lease }),
            None => Ok(Claim::Taken { lease: 0 }),
        }
    }

    /// Rewrites `key` only while it is attached to `lease`. `false`: it is not (the
    /// lease expired and the key went with it, or another holder took it).
    pub async fn put_under(&self, key: &str, value: &[u8], lease: i64) -> Result<bool, String> {
        let body = json!({
            "compare": [{ "key": B64.encode(key), "result": "EQUAL", "target": "LEASE", "lease": lease.to_string() }],
            "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() } }],
            "failure": [],
        });
        let not_ours = |cur: &Option<Kv>| cur.as_ref().is_none_or(|kv| kv.lease != lease);
        Ok(match self.txn(&body, key, value, not_ours).await? {
            TxnOutcome::Committed(_) => true,
            TxnOutcome::Answered(v) => v["succeeded"].as_bool() == Some(true),
            TxnOutcome::Superseded(cur) => cur.is_some_and(|kv| kv.lease == lease),
        })
    }

    /// Gives a lease up (its keys go at once).
    pub async fn revoke(&self, lease: i64) -> Result<(), String> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() }))
            .await
            .map(|_| ())
    }

    /// Watches every key under `prefix` from revision `from` and hands each event to
    /// `on_event`. Returns when the stream ends or fails (the caller re-reads and
    /// watches again).
    pub async fn watch(
        &self,
        prefix: &str,
        from: i64,
        mut on_event: impl FnMut(WatchEvent),
    ) -> Result<(), String> {
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(range_end(prefix)),
            "start_revision": from.to_string(),
            "progress_notify": true,
        }});
        let mut last = String::from("no etcd endpoint configured");
        for ep in &self.endpoints {
            let mut resp =
                match tokio::time::timeout(self.timeout, self.open(ep, "/v3/watch", &body)).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        last = format!("etcd {}/v3/watch: {e}", ep.url());
                        continue;
                    }
                    Err(_) => {
                        last = format!(
                            "etcd {}/v3/watch: no answer within {:?}",
                            ep.url(),
                            self.timeout
                        );
                        continue;
                    }
                };
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let frame = match tokio::time::timeout(WATCH_SILENCE, resp.frame()).await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(format!(
                            "etcd watch silent for {WATCH_SILENCE:?} (no event, no progress notification): re-reading"
                        ))
                    }
                };
                let frame = frame.map_err(|e| format!("etcd watch stream: {e}"))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                // Messages are JSON objects, one per line.
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if let Some(err) = msg.get("error") {
                        return Err(format!("etcd watch: {err}"));
                    }
                    let result = &msg["result"];
                    if result["canceled"].as_bool() == Some(true) {
                        return Err(format!(
                            "etcd cancelled the watch: {}",
                            result["cancel_reason"]
                        ));
                    }
                    let revision = int(&result["header"]["revision"]);
                    if revision > 0 {
                        on_event(WatchEvent::Progress(revision));
                    }
                    for ev in result["events"].as_array().into_iter().flatten() {
                        let Some(kv) = kv(&ev["kv"]) else { continue };
                        if ev["type"] == "DELETE" {
                            on_event(WatchEvent::Delete(kv.key));
                        } else {
                            on_event(WatchEvent::Put(kv));
                        }
                    }
                }
                if buf.len() > 16 << 20 {
                    return Err("etcd watch message larger than 16 MiB".into());
                }
            }
            return Ok(());
        }
        Err(last)
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

/// What became of a transaction.
enum TxnOutcome {
    /// etcd answered (the transaction's own response).
    Answered(Value),
    /// Unanswered, but reading back found our value: it committed.
    Committed(Kv),
    /// Unanswered, and the key changed to something else: another writer won.
    Superseded(Option<Kv>),
}

impl Client {
    fn target<'a>(&'a self, ep: &'a Endpoint) -> oneshot::Target<'a, std::net::SocketAddr> {
        oneshot::Target {
            connect: ep.addr,
            authority: &ep.authority,
            tls: if ep.tls { self.tls.as_ref() } else { None },
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
        let resp = oneshot::post_on(&mut conn, &ep.authority, path, body.to_string()).await?;
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
