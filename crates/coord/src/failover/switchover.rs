//! Every change of primary: a decision committed (hooks, durable write, apply), the two
//! epochs of a switchover with the wait for every instance's acknowledgement, and the
//! admin calls (`switchover`, `fail_back`). Never names a new primary before the drain
//! epoch is acknowledged by every instance (or their registrations expired).

use super::*;

impl Failover {
    /// Commits a new topology: the promote hook first (when it names a new primary),
    /// then the durable write, then the local apply, then the repoint hooks.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn decide(
        self: &Arc<Self>,
        c: &Arc<ClusterConfig>,
        seen: &Known,
        primary: Option<usize>,
        fenced: Vec<String>,
        reason: String,
        kind: &'static str,
        as_leader: bool,
    ) -> Result<Known, Refused> {
        let name = c.name.as_str();
        let primary_id = primary.map(|p| c.backends[p].id.clone());
        let mut next = seen.topology.next(primary_id.clone(), fenced, reason);
        if let Store::Etcd(e) = &self.store {
            next.by = Some(e.cfg.instance.clone());
        }
        let promotion = c.promotion.as_ref();
        if let (Some(p), Some(hook)) = (primary, promotion.and_then(|p| p.on_promote.as_ref())) {
            let tls = self.hook_tls(name);
            if let Err(e) = call_hook(
                hook,
                tls.as_ref(),
                "on_promote",
                c,
                p,
                self.address_of(c, p),
                next.epoch,
            )
            .await
            {
                if promotion.is_some_and(|p| p.require_hook_ok) {
                    return Err(refused(
                        502,
                        format!("the on_promote hook of {} failed ({e}); writes stay off it (require_hook_ok = true)", c.backends[p].id),
                    ));
                }
                tracing::warn!(cluster = name, error = %e, "on_promote hook failed; promoting anyway (require_hook_ok = false)");
            }
        }
        let committed = match self.store.commit(name, seen, &next, as_leader).await {
            Ok(Commit::Done(revision)) => {
                let known = Known {
                    topology: next.clone(),
                    revision,
                };
                self.record(name, known.clone());
                if primary.is_some() {
                    metrics::counter!("keyway_promotions_total", "cluster" => name.to_string(), "kind" => kind).increment(1);
                }
                known
            }
            Ok(Commit::Lost(current)) => {
                if let Some(cur) = current {
                    self.record(name, cur);
                }
                return Err(refused(
                    409,
                    "another decision was made first (the epoch moved); nothing changed",
                ));
            }
            Err(e) => {
                return Err(refused(
                    503,
                    format!("the decision could not be made durable ({e}); nothing changed"),
                ))
            }
        };
        if let (Some(p), Some(hook)) = (primary, promotion.and_then(|p| p.on_repoint.as_ref())) {
            for (i, b) in c.backends.iter().enumerate() {
                if i == p || next.fenced.contains(&b.id) {
                    continue;
                }
                let (hook, c, epoch) = (hook.clone(), c.clone(), next.epoch);
                let (tls, address) = (self.hook_tls(name), self.address_of(&c, i));
                tokio::spawn(async move {
                    let _ =
                        call_hook(&hook, tls.as_ref(), "on_repoint", &c, i, address, epoch).await;
                });
            }
        }
        Ok(committed)
    }

    /// How long a change of primary waits for every instance to acknowledge its drain
    /// epoch: the cluster's `drain`, and with etcd the lease of an instance that cannot
    /// answer (it must expire) plus two etcd round trips.
    pub(super) fn drain_wait(&self, c: &ClusterConfig) -> Duration {
        let drain = c
            .promotion
            .as_ref()
            .map_or(keyway_config::DEFAULT_SWITCHOVER_DRAIN, |p| p.drain);
        match &self.store {
            Store::File(_) => drain,
            Store::Etcd(e) => drain + e.cfg.lease_ttl + e.cfg.timeout * 2,
        }
    }

    /// Changes the primary in two epochs: `drain` (no primary, `drain_fenced` fenced)
    /// unless the cluster already has no primary, then, once every instance has
    /// acknowledged that epoch, `target` with `fenced`. Not acknowledged in time: the
    /// drain epoch stays (writes refused) and the error says who did not answer.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn change_primary(
        self: &Arc<Self>,
        c: &Arc<ClusterConfig>,
        seen: &Known,
        target: usize,
        drain_fenced: Vec<String>,
        fenced: Vec<String>,
        reason: String,
        kind: &'static str,
        as_leader: bool,
    ) -> Result<Known, Refused> {
        let name = c.name.as_str();
        let mut known = seen.clone();
        if let Some(old) = known.topology.primary.clone() {
            known = self
                .decide(
                    c,
                    &known,
                    None,
                    drain_fenced,
                    format!("{reason}: draining writes from {old}"),
                    kind,
                    as_leader,
                )
                .await?;
        }
        let epoch = known.topology.epoch;
        let deadline = Instant::now() + self.drain_wait(c);
        if let Err(who) = self.await_acks(name, epoch, deadline).await {
            return Err(refused(
                503,
                format!("epoch {epoch} (no primary) was not acknowledged in time ({who}); no new primary, writes stay refused"),
            ));
        }
        // Nothing else may have been decided meanwhile.
        let known = self
            .known(name)
            .filter(|k| k.topology.epoch == epoch)
            .ok_or_else(|| {
                refused(
                    409,
                    "another decision was made while the drain epoch was acknowledged; check /status",
                )
            })?;
        self.decide(c, &known, Some(target), fenced, reason, kind, as_leader)
            .await
    }

    /// Waits until every instance has acknowledged `epoch` of `cluster` (with etcd: every
    /// registered instance, or its registration expired; alone: this instance's own
    /// writes). `Err` names who had not by `deadline`.
    pub(super) async fn await_acks(
        &self,
        cluster: &str,
        epoch: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut pause = Duration::from_millis(5);
        // Registrations seen during this wait, and when each one went missing. A key
        // that expired means its instance stopped writing; one deleted by hand (or a
        // lease revoked) does not, so a registration that vanishes mid-wait is waited
        // for one more lease.
        let mut seen: HashMap<String, i64> = HashMap::new();
        let mut vanished: HashMap<String, Instant> = HashMap::new();
        loop {
            let pending: Vec<String> = match &self.store {
                Store::File(_) => {
                    let acked = self.acks().get(cluster).copied().unwrap_or(0);
                    if acked >= epoch {
                        vec![]
                    } else {
                        vec![format!(
                            "this instance's {} write(s) in flight",
                            self.gate(cluster).map_or(0, |g| g.in_flight())
                        )]
                    }
                }
                Store::Etcd(e) => {
                    let mut pending = Vec::new();
                    if self
                        .vouched_until
                        .lock()
                        .ok()
                        .and_then(|v| *v)
                        .is_some_and(|until| Instant::now() < until)
                    {
                        pending.push(
                            "a peer may still write under a failsafe this instance vouched for"
                                .to_string(),
                        );
                    }
                    match e.client.get_prefix(&e.instances_prefix()).await {
                        Ok((kvs, _)) => {
                            let mut now_seen = HashMap::new();
                            for kv in kvs {
                                let name = kv
                                    .key
                                    .strip_prefix(&e.instances_prefix())
                                    .unwrap_or(&kv.key)
                                    .to_string();
                                let reg: Registration =
                                    serde_json::from_slice(&kv.value).unwrap_or_default();
                                if reg.acks.get(cluster).copied().unwrap_or(0) < epoch {
                                    pending.push(format!("instance `{name}`"));
                                }
                                now_seen.insert(name, kv.lease);
                            }
                            for (name, lease) in &seen {
                                if now_seen.get(name) != Some(lease) {
                                    let since =
                                        *vanished.entry(name.clone()).or_insert_with(Instant::now);
                                    if since.elapsed() < e.cfg.lease_ttl {
                                        pending.push(format!("instance `{name}` (its registration vanished; one lease in case it still writes)"));
                                    }
                                }
                            }
                            for (name, lease) in now_seen {
                                seen.entry(name).or_insert(lease);
                            }
                        }
                        Err(err) => pending.push(format!("etcd: {err}")),
                    }
                    pending
                }
            };
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("waiting for {}", pending.join(", ")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// A planned switchover to `target` (manual promotion or failback): an epoch
    /// without a primary until every instance has acknowledged that its writes to the
    /// old one ended, then the new primary in the next epoch. The old primary becomes a
    /// replica (not fenced). If the drain is not acknowledged in time or the new
    /// primary's hook refuses, the old primary returns.
    pub async fn switchover(
        self: &Arc<Self>,
        cluster: &str,
        target: &str,
        reason: &str,
        kind: &'static str,
    ) -> Result<Topology, Refused> {
        let view = self.split_cluster(cluster)?;
        let c = &view.cfg;
        let t = index(c, target).ok_or_else(|| {
            refused(
                404,
                format!("cluster `{cluster}` has no backend `{target}`"),
            )
        })?;
        if !self.permit.holds() {
            return Err(refused(
                503,
                "this instance does not hold its write lease (etcd unreachable); nothing changed",
            ));
        }
        let lock = self
            .lock_of(cluster)
            .ok_or_else(|| refused(404, format!("no topology for `{cluster}`")))?;
        let _guard = tokio::time::timeout(Duration::from_secs(30), lock.lock())
            .await
            .map_err(|_| refused(409, "another switchover of this cluster is still running"))?;
        let known = self
            .known(cluster)
            .ok_or_else(|| refused(404, format!("no topology for `{cluster}`")))?;
        if known.topology.primary.as_deref() == Some(target) {
            return Err(refused(
                409,
                format!(
                    "`{target}` is already the primary of `{cluster}` (epoch {})",
                    known.topology.epoch
                ),
            ));
        }
        if view.checked && view.backends[t].health != BackendHealth::Healthy {
            return Err(refused(
                409,
                format!(
                    "`{target}` is not healthy ({}); wait until its checks pass",
                    view.backends[t].health.as_str()
                ),
            ));
        }
        if self.is_drained(cluster, target) {
            return Err(refused(
                409,
                format!("`{target}` is drained (maintenance) and is not promoted: undrain it first (POST /clusters/{cluster}/backends/{target}/undrain)"),
            ));
        }
        let mut fenced = known.topology.fenced.clone();
        fenced.retain(|f| f != target);
        let old = known.topology.primary.clone();
        let result = self
            .change_primary(
                c,
                &known,
                t,
                known.topology.fenced.clone(),
                fenced,
                reason.to_string(),
                kind,
                false,
            )
            .await;
        match result {
            Ok(k) => Ok(k.topology),
            Err(e) if e.status == 502 || e.status == 503 => {
                // The old primary (alive: this is a planned switchover) takes writes again.
                if let (Some(old), Some(now)) = (&old, self.known(cluster)) {
                    if now.topology.primary.is_none() && now.topology.epoch > known.topology.epoch {
                        let back = index(c, old);
                        let _ = self
                            .decide(
                                c,
                                &now,
                                back,
                                now.topology.fenced.clone(),
                                format!(
                                    "switchover to {target} not made ({}); {old} stays primary",
                                    e.message
                                ),
                                kind,
                                false,
                            )
                            .await;
                    }
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Fails back to the configured primary.
    pub async fn fail_back(self: &Arc<Self>, cluster: &str) -> Result<Topology, Refused> {
        let c = self.split_cluster(cluster)?.cfg;
        let home = home(&c)
            .map(|i| c.backends[i].id.clone())
            .ok_or_else(|| refused(409, "the configuration names no primary"))?;
        self.switchover(cluster, &home, &format!("failback to {home}"), "failback")
            .await
    }
}
