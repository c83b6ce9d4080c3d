//! The per-cluster controller and every change of primary: automatic failover after
//! `hold`, switchovers and failbacks, each in two epochs acknowledged by every instance
//! before the new primary is committed. Never names a primary before the drain epoch
//! is acknowledged.

use super::*;

impl Failover {
    // --- the controller ---

    pub(super) async fn control(
        self: Arc<Self>,
        name: String,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut down_since: Option<Instant> = None;
        let mut hook_failed: HashMap<String, Instant> = HashMap::new();
        let mut said_no_candidate = false;
        let mut next_failback = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
            let Some(rt) = self.live() else {
                continue;
            };
            let Some(c) = rt
                .cluster(&name)
                .filter(|c| c.cfg.strategy == Strategy::PrimaryReplica)
            else {
                if let Ok(mut r) = self.controllers.lock() {
                    r.remove(&name);
                }
                return;
            };
            let Some(known) = self.known(&name) else {
                continue;
            };
            if self.unconfirmed(&name) {
                continue; // nothing is known until etcd answers
            }
            if self.lock_of(&name).is_some_and(|l| l.try_lock().is_err()) {
                continue; // a switchover is running here; it ends with a primary
            }
            let view = c.health.view_full();
            let primary = known.topology.primary.as_ref().and_then(|id| index(c, id));
            let down = primary.is_none_or(|p| view.backends[p].health == Health::Unhealthy);
            if !down {
                down_since = None;
                said_no_candidate = false;
                if self.set_needed(&name, false) {
                    tracing::info!(cluster = %name, "the primary is healthy again; no promotion needed");
                }
                self.maybe_fail_back(c, &view, &known, &mut next_failback)
                    .await;
                continue;
            }
            if primary.is_none() && known.topology.epoch > 0 && self.decider_alive(&known.topology)
            {
                // Another instance's change of primary may be draining: give it time to
                // name the new primary before taking over.
                let grace = self.drain_wait(c)
                    + c.cfg
                        .promotion
                        .as_ref()
                        .and_then(|p| p.on_promote.as_ref())
                        .map_or(Duration::ZERO, |h| h.timeout)
                    + Duration::from_secs(2);
                if crate::unix_ms(SystemTime::now()).saturating_sub(known.topology.unix_ms)
                    < grace.as_millis() as u64
                {
                    continue;
                }
            }
            let since = *down_since.get_or_insert_with(Instant::now);
            let hold = c.cfg.promotion.as_ref().map_or(Duration::ZERO, |p| p.hold);
            if primary.is_some() && since.elapsed() < hold {
                continue;
            }
            if self.set_needed(&name, true) {
                tracing::warn!(
                    cluster = %name,
                    primary = known.topology.primary.as_deref().unwrap_or("(none)"),
                    auto = c.cfg.promotion.as_ref().is_some_and(|p| p.auto),
                    "promotion needed: the cluster has no healthy primary, writes are refused"
                );
            }
            let Some(p) = c.cfg.promotion.as_ref().filter(|p| p.auto) else {
                continue;
            };
            if !(self.store.may_decide() && self.permit.holds()) {
                continue;
            }
            let Some(lock) = self.lock_of(&name) else {
                continue;
            };
            let Ok(_guard) = lock.try_lock() else {
                continue; // an admin switchover is running
            };
            // Re-read under the lock: a decision may just have landed.
            let Some(known) = self.known(&name) else {
                continue;
            };
            hook_failed.retain(|_, at| at.elapsed() < p.hold.max(Duration::from_secs(5)));
            // A plugin policy runs to its deadline: off the async workers.
            let chosen = {
                let (c, view, t, failed, plugin) = (
                    c.clone(),
                    view.clone(),
                    known.topology.clone(),
                    hook_failed.clone(),
                    self.promotion_plugin(&name),
                );
                tokio::task::spawn_blocking(move || choose(&c, &view, &t, &failed, plugin.as_deref()))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(cluster = %name, error = %e, "the promotion policy task failed; no promotion");
                        None
                    })
            };
            let Some(target) = chosen else {
                if !said_no_candidate {
                    said_no_candidate = true;
                    tracing::warn!(cluster = %name, "promotion needed but the policy found no candidate; writes stay refused");
                }
                continue;
            };
            said_no_candidate = false;
            let target_id = c.backends[target].cfg.id.clone();
            let mut fenced = known.topology.fenced.clone();
            if let Some(old) = &known.topology.primary {
                if !fenced.contains(old) {
                    fenced.push(old.clone());
                }
            }
            fenced.retain(|f| *f != target_id);
            let reason = format!(
                "{} unhealthy for {:?}; promoted {target_id}",
                known.topology.primary.as_deref().unwrap_or("no primary"),
                since.elapsed().min(Duration::from_secs(86_400))
            );
            // The drain epoch already fences the old primary: it is dead, and it must not
            // take writes from anyone once it comes back.
            let drain_fenced = fenced.clone();
            match self
                .change_primary(
                    c,
                    &known,
                    target,
                    drain_fenced,
                    fenced,
                    reason,
                    "failover",
                    true,
                )
                .await
            {
                Ok(_) => {
                    down_since = None;
                }
                Err(e) => {
                    if e.status == 502 {
                        hook_failed.insert(target_id, Instant::now());
                    }
                    tracing::warn!(cluster = %name, error = %e.message, "promotion not made");
                }
            }
        }
    }

    pub(super) async fn maybe_fail_back(
        self: &Arc<Self>,
        c: &Arc<Cluster>,
        view: &HealthView,
        known: &Known,
        next_try: &mut Instant,
    ) {
        let Some(after) = c.cfg.failback_after else {
            return;
        };
        if Instant::now() < *next_try {
            return;
        }
        let Some(home) = home(&c.cfg) else {
            return;
        };
        if view.primary == Some(home)
            || view.backends[home].health != Health::Healthy
            || !(self.store.may_decide() && self.permit.holds())
        {
            return;
        }
        let stable = c
            .health
            .since(home)
            .and_then(|s| s.elapsed().ok())
            .is_some_and(|d| d >= after);
        if !stable || known.topology.primary.is_none() {
            return;
        }
        let id = c.backends[home].cfg.id.clone();
        match self
            .switchover(
                &c.cfg.name,
                &id,
                &format!("failback: {id} healthy for {after:?}"),
                "failback",
            )
            .await
        {
            Ok(_) => {}
            Err(e) => {
                // Each attempt costs a write pause: do not retry at once.
                let wait = after.max(Duration::from_secs(30));
                *next_try = Instant::now() + wait;
                tracing::warn!(cluster = %c.cfg.name, error = %e.message, retry_in = ?wait, "automatic failback not made");
            }
        }
    }

    /// Commits a new topology: the promote hook first (when it names a new primary),
    /// then the durable write, then the local apply, then the repoint hooks.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn decide(
        self: &Arc<Self>,
        c: &Arc<Cluster>,
        seen: &Known,
        primary: Option<usize>,
        fenced: Vec<String>,
        reason: String,
        kind: &'static str,
        as_leader: bool,
    ) -> Result<Known, Refused> {
        let name = c.cfg.name.as_str();
        let primary_id = primary.map(|p| c.backends[p].cfg.id.clone());
        let mut next = seen.topology.next(primary_id.clone(), fenced, reason);
        if let Store::Etcd(e) = &self.store {
            next.by = Some(e.cfg.instance.clone());
        }
        let promotion = c.cfg.promotion.as_ref();
        if let (Some(p), Some(hook)) = (primary, promotion.and_then(|p| p.on_promote.as_ref())) {
            let tls = self.hook_tls(name);
            if let Err(e) = call_hook(hook, tls.as_ref(), "on_promote", c, p, next.epoch).await {
                if promotion.is_some_and(|p| p.require_hook_ok) {
                    return Err(refused(
                        502,
                        format!("the on_promote hook of {} failed ({e}); writes stay off it (require_hook_ok = true)", c.backends[p].cfg.id),
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
                self.adopt(name, known.clone());
                if primary.is_some() {
                    metrics::counter!("keyway_promotions_total", "cluster" => name.to_string(), "kind" => kind).increment(1);
                }
                known
            }
            Ok(Commit::Lost(current)) => {
                if let Some(cur) = current {
                    self.adopt(name, cur);
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
                if i == p || next.fenced.contains(&b.cfg.id) {
                    continue;
                }
                let (hook, c, epoch) = (hook.clone(), c.clone(), next.epoch);
                let tls = self.hook_tls(name);
                tokio::spawn(async move {
                    let _ = call_hook(&hook, tls.as_ref(), "on_repoint", &c, i, epoch).await;
                });
            }
        }
        Ok(committed)
    }

    /// How long a change of primary waits for every instance to acknowledge its drain
    /// epoch: the cluster's `drain`, and with etcd the lease of an instance that cannot
    /// answer (it must expire) plus two etcd round trips.
    pub(super) fn drain_wait(&self, c: &Cluster) -> Duration {
        let drain = c
            .cfg
            .promotion
            .as_ref()
            .map_or(crate::config::DEFAULT_SWITCHOVER_DRAIN, |p| p.drain);
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
        c: &Arc<Cluster>,
        seen: &Known,
        target: usize,
        drain_fenced: Vec<String>,
        fenced: Vec<String>,
        reason: String,
        kind: &'static str,
        as_leader: bool,
    ) -> Result<Known, Refused> {
        let name = c.cfg.name.as_str();
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
        let c = self.split_cluster(cluster)?;
        let t = index(&c, target).ok_or_else(|| {
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
        let view = c.health.view_full();
        if c.health.active().is_some() && view.backends[t].health != Health::Healthy {
            return Err(refused(
                409,
                format!(
                    "`{target}` is not healthy ({}); wait until its checks pass",
                    view.backends[t].health.as_str()
                ),
            ));
        }
        let mut fenced = known.topology.fenced.clone();
        fenced.retain(|f| f != target);
        let old = known.topology.primary.clone();
        let result = self
            .change_primary(
                &c,
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
                        let back = index(&c, old);
                        let _ = self
                            .decide(
                                &c,
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
        let c = self.split_cluster(cluster)?;
        let home = home(&c.cfg)
            .map(|i| c.backends[i].cfg.id.clone())
            .ok_or_else(|| refused(409, "the configuration names no primary"))?;
        self.switchover(cluster, &home, &format!("failback to {home}"), "failback")
            .await
    }
}
