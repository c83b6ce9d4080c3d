//! The per-cluster controller: every tick it reads the cluster's view from the data
//! plane, reports a promotion as needed, promotes after `hold` (automatic failover,
//! through `switchover.rs`) and fails back once the configured primary is stable. Never
//! promotes unless this instance is the decider and holds its permit; never reads or
//! changes the data plane except through [`DataPlane`].

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
            let Some(plane) = self.live() else {
                continue;
            };
            let Some(view) = plane
                .view(&name)
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
            let c = &view.cfg;
            let primary = known.topology.primary.as_ref().and_then(|id| index(c, id));
            let down = primary.is_none_or(|p| view.backends[p].health == BackendHealth::Unhealthy);
            if !down {
                down_since = None;
                said_no_candidate = false;
                if self.set_needed(&name, false) {
                    tracing::info!(cluster = %name, "the primary is healthy again; no promotion needed");
                }
                self.maybe_fail_back(&view, &known, &mut next_failback)
                    .await;
                continue;
            }
            if primary.is_none() && known.topology.epoch > 0 && self.decider_alive(&known) {
                // Another instance's change of primary may be draining: give it time to
                // name the new primary before taking over.
                let grace = self.drain_wait(c)
                    + c.promotion
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
            let hold = c.promotion.as_ref().map_or(Duration::ZERO, |p| p.hold);
            if primary.is_some() && since.elapsed() < hold {
                continue;
            }
            if self.set_needed(&name, true) {
                tracing::warn!(
                    cluster = %name,
                    primary = known.topology.primary.as_deref().unwrap_or("(none)"),
                    auto = c.promotion.as_ref().is_some_and(|p| p.auto),
                    "promotion needed: the cluster has no healthy primary, writes are refused"
                );
            }
            let Some(p) = c.promotion.as_ref().filter(|p| p.auto) else {
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
                // Drained backends are in maintenance: never promoted (Patroni's
                // `nofailover`), so they join the excluded ones.
                let mut failed = hook_failed.clone();
                for id in self.drains(&name).into_keys() {
                    failed.entry(id).or_insert_with(Instant::now);
                }
                let (view, t, failed, plugin) = (
                    view.clone(),
                    known.topology.clone(),
                    failed,
                    self.promotion_plugin(&name),
                );
                tokio::task::spawn_blocking(move || choose(&view, &t, &failed, plugin.as_deref()))
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
            let target_id = c.backends[target].id.clone();
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
        view: &ClusterView,
        known: &Known,
        next_try: &mut Instant,
    ) {
        let c = &view.cfg;
        let Some(after) = c.failback_after else {
            return;
        };
        if Instant::now() < *next_try {
            return;
        }
        let Some(home) = home(c) else {
            return;
        };
        if view.primary == Some(home)
            || view.backends[home].health != BackendHealth::Healthy
            || self.is_drained(&c.name, &c.backends[home].id)
            || !(self.store.may_decide() && self.permit.holds())
        {
            return;
        }
        let stable = view.backends[home]
            .since
            .and_then(|s| s.elapsed().ok())
            .is_some_and(|d| d >= after);
        if !stable || known.topology.primary.is_none() {
            return;
        }
        let id = c.backends[home].id.clone();
        match self
            .switchover(
                &c.name,
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
                tracing::warn!(cluster = %c.name, error = %e.message, retry_in = ?wait, "automatic failback not made");
            }
        }
    }
}
