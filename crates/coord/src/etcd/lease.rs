//! Leases and what is registered under them: granting, keeping alive and revoking a
//! lease, campaigning for the election key, and claiming an instance's key. A key is
//! only ever written under the lease it belongs to; a key held under another lease is
//! reported ([`Claim::Taken`]), never overwritten.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;

use super::txn::TxnOutcome;
use super::{int, kvs, Client, Kv};

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
}
