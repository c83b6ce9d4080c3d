//! Transactions with read-back: a compare-and-swap that was sent but not answered is
//! never re-sent blindly to another endpoint; the key is read back first (holding our
//! value: it committed; unchanged: the next endpoint is tried; anything else: another
//! writer won). This module owns [`Swap`] and the read-back loop the lease calls share;
//! it must never send a transaction twice without that read-back.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{int, kvs, Client, Kv};

/// The outcome of a compare-and-swap.
#[derive(Debug)]
pub enum Swap {
    /// Written; the new revision.
    Done(i64),
    /// A compare failed; the key as it is now (`None`: absent).
    Lost(Option<Kv>),
}

/// What became of a transaction.
pub(super) enum TxnOutcome {
    /// etcd answered (the transaction's own response).
    Answered(Value),
    /// Unanswered, but reading back found our value: it committed.
    Committed(Kv),
    /// Unanswered, and the key changed to something else: another writer won.
    Superseded(Option<Kv>),
}

impl Client {
    /// A transaction: sent to one endpoint after another, but never again after an
    /// attempt that may have reached etcd, unless `unchanged` (reading the key back)
    /// says it did not commit.
    pub(super) async fn txn(
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
}
