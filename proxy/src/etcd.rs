//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
//! `/v3/watch`), which every etcd server since 3.3 serves on its client port.
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

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::config::EtcdEndpoint;
use crate::oneshot;

/// One key as etcd returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of its last change (its compare-and-swap token).
    pub mod_revision: i64,
}

/// The outcome of a compare-and-swap.
#[derive(Debug)]
pub enum Swap {
    /// Written; the new revision.
    Done(i64),
    /// A compare failed; the key as it is now (`None`: absent).
    Lost(Option<Kv>),
}

/// A client for a list of endpoints: each call tries them in order.
#[derive(Clone, Debug)]
pub struct Client {
    endpoints: Vec<EtcdEndpoint>,
    /// For `https://` endpoints.
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
}

/// An event of a watch stream.
pub enum WatchEvent {
    /// A key was written.
    Put(Kv),
    /// A key was deleted.
    Delete(String),
}

impl Client {
    /// A client; nothing is contacted until the first call. `tls` is used for the
    /// endpoints that say `https://`.
    pub fn new(
        endpoints: Vec<EtcdEndpoint>,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Self {
        Self {
            endpoints,
            tls,
            timeout,
        }
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, String> {
        let mut last = String::from("no etcd endpoint configured");
        for ep in &self.endpoints {
            match tokio::time::timeout(self.timeout, self.post(ep, path, body)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = format!("etcd {}{path}: {e}", ep.url()),
                Err(_) => {
                    last = format!(
                        "etcd {}{path}: no answer within {:?}",
                        ep.url(),
                        self.timeout
                    )
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
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({
                    "compare": compare,
                    "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value) } }],
                    "failure": [{ "request_range": { "key": B64.encode(key) } }],
                }),
            )
            .await?;
        if v["succeeded"].as_bool() == Some(true) {
            Ok(Swap::Done(int(&v["header"]["revision"])))
        } else {
            let current = v["responses"][0]["response_range"].clone();
            Ok(Swap::Lost(kvs(&current).into_iter().next()))
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

    /// Grants a lease of `ttl` seconds.
    pub async fn grant(&self, ttl: u64) -> Result<i64, String> {
        let v = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))
            .await?;
        match int(&v["ID"]) {
            0 => Err(format!("etcd granted no lease: {v}")),
            id => Ok(id),
        }
    }

    /// Refreshes a lease; `false` when it has expired.
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, String> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
            .await?;
        Ok(int(&v["result"]["TTL"]) > 0)
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
            while let Some(frame) = resp.frame().await {
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
    })
}

fn kvs(v: &Value) -> Vec<Kv> {
    v["kvs"]
        .as_array()
        .map(|a| a.iter().filter_map(kv).collect())
        .unwrap_or_default()
}

impl Client {
    async fn open(
        &self,
        ep: &EtcdEndpoint,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let target = oneshot::Target {
            connect: ep.addr,
            authority: &ep.authority,
            tls: if ep.tls { self.tls.as_ref() } else { None },
        };
        let resp = oneshot::post_json(target, path, body.to_string()).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(format!("HTTP {status}: {}", text.trim()));
        }
        Ok(resp)
    }

    async fn post(&self, ep: &EtcdEndpoint, path: &str, body: &Value) -> Result<Value, String> {
        let resp = self.open(ep, path, body).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
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
                mod_revision: 5
            }]
        );
        assert_eq!(int(&v["header"]["revision"]), 7);
        assert!(kvs(&serde_json::json!({"header": {}})).is_empty());
        assert_eq!(int(&Value::Null), 0);
    }
}
