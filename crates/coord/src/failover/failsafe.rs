//! The failsafe when etcd is gone for every instance: what this instance answers a
//! peer (and the promise that answer makes), and asking every peer in turn. Never
//! grants a permit unless every listed peer answered, all are cut off from etcd and all
//! agree on every primary.

use super::*;

impl Failover {
    /// What this instance tells a peer asking for the failsafe
    /// (`GET /coordination/failsafe`). Answering "cut off too" is a promise: for one
    /// lease this instance neither acknowledges a drain nor commits a promotion, since
    /// the asking peer may keep writing on the strength of it.
    /// Only a configured failsafe instance vouches, and only for an asker that names
    /// itself (`from`, the `keyway-failsafe-from` header) as an instance it saw
    /// registered: a monitor polling this URL changes nothing.
    pub fn failsafe_answer(&self, from: Option<&str>) -> serde_json::Value {
        let Store::Etcd(e) = &self.store else {
            return serde_json::json!({ "error": "this keyway keeps its decisions in a state file; it has no failsafe" });
        };
        let (connected, peer) = e.status.lock().map_or((false, false), |s| {
            (
                s.connected,
                from.is_some_and(|f| f != e.cfg.instance && s.instances.iter().any(|i| i == f)),
            )
        });
        if !connected && peer && !e.cfg.failsafe_peers.is_empty() {
            if let Ok(mut v) = self.vouched_until.lock() {
                *v = Some(Instant::now() + e.cfg.lease_ttl);
            }
        }
        serde_json::json!({
            "instance": e.cfg.instance,
            "etcd_reachable": connected,
            "clusters": self.primaries(),
        })
    }

    /// Every cluster's epoch and primary, as the failsafe compares them.
    pub(super) fn primaries(&self) -> BTreeMap<String, (u64, Option<String>)> {
        self.cells
            .lock()
            .map(|cells| {
                cells
                    .iter()
                    .map(|(n, c)| {
                        (
                            n.clone(),
                            (c.known.topology.epoch, c.known.topology.primary.clone()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asks every failsafe peer at once. `Ok` only when all answered, all lost etcd
    /// too, all know the same epoch and primary of every cluster, and every instance
    /// last seen registered is among them.
    pub(super) async fn failsafe(&self, e: &EtcdStore) -> Result<(), String> {
        let known = e
            .status
            .lock()
            .map(|s| s.instances.clone())
            .unwrap_or_default();
        if known.is_empty() {
            return Err(
                "this instance never saw the registered instances (it started without etcd)".into(),
            );
        }
        let ours = self.primaries();
        let asks = e.cfg.failsafe_peers.iter().map(|peer| async move {
            let from = [(FAILSAFE_FROM, e.cfg.instance.as_str())];
            let answer = tokio::time::timeout(
                e.cfg.timeout,
                get_json(peer, "/coordination/failsafe", &from),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", e.cfg.timeout)));
            (peer, answer)
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut seen = vec![e.cfg.instance.clone()];
        for (peer, answer) in answers {
            let v = answer.map_err(|err| format!("peer {peer}: {err}"))?;
            if v["etcd_reachable"].as_bool() != Some(false) {
                return Err(format!("peer {peer} still reaches etcd (or did not say): this instance alone is cut off"));
            }
            let theirs: BTreeMap<String, (u64, Option<String>)> =
                serde_json::from_value(v["clusters"].clone())
                    .map_err(|err| format!("peer {peer}: unreadable answer ({err})"))?;
            if theirs != ours {
                return Err(format!(
                    "peer {peer} knows other primaries or epochs than this instance"
                ));
            }
            if let Some(name) = v["instance"].as_str() {
                seen.push(name.to_string());
            }
        }
        if let Some(missing) = known.iter().find(|k| !seen.contains(k)) {
            return Err(format!(
                "instance `{missing}` was registered but is not among the failsafe peers"
            ));
        }
        Ok(())
    }
}
