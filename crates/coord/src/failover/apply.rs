//! Applying decisions: every topology (and every drain) to a runtime before it serves, a reloaded
//! runtime swapped in under the lock that applies decisions, a new decision recorded and
//! applied to the serving data plane, and the acknowledgement that follows once the
//! cluster's write gate has fenced. Never acknowledges an epoch before it was applied
//! to the serving data plane and every write routed under an older one has ended.

use super::*;

impl Failover {
    /// Applies every topology this instance holds to a data plane that does not serve
    /// yet (a freshly built runtime), so none of its clusters serves a request under
    /// the configured primary when a decision says otherwise.
    pub fn apply(&self, next: &dyn DataPlane) {
        self.apply_drains(next);
        for cfg in next.clusters() {
            if cfg.strategy != Strategy::PrimaryReplica {
                continue;
            }
            if let Some(t) = self.topology(&cfg.name) {
                next.apply(&cfg.name, &t);
            }
        }
    }

    /// Records a newer topology (from a commit or from etcd) and applies it to the
    /// serving cluster. Older epochs are ignored.
    pub(super) fn record(self: &Arc<Self>, cluster: &str, known: Known) -> bool {
        let applying = self.applying.lock();
        let gate = {
            let Ok(mut cells) = self.cells.lock() else {
                return false;
            };
            let Some(cell) = cells.get_mut(cluster) else {
                return false;
            };
            if !cell.unconfirmed
                && (known.topology.epoch < cell.known.topology.epoch
                    || (known.topology == cell.known.topology
                        && known.revision == cell.known.revision))
            {
                return false;
            }
            cell.unconfirmed = false;
            cell.known = known.clone();
            if cell.history.back().map(|t| t.epoch) != Some(known.topology.epoch) {
                if cell.history.len() == HISTORY {
                    cell.history.pop_front();
                }
                cell.history.push_back(known.topology.clone());
            }
            cell.gate.clone()
        };
        if let Some(plane) = self.live() {
            if let Some(cfg) = plane.clusters().into_iter().find(|c| c.name == cluster) {
                if let Err(e) = known.topology.validate(&cfg) {
                    tracing::error!(cluster, error = %e, "a decision names a backend this instance does not have; its configuration differs from the other instances'");
                    return false;
                }
                plane.apply(cluster, &known.topology);
            }
        }
        gate.applied(known.topology.epoch);
        drop(applying);
        self.acknowledge_when_drained(cluster, known.topology.epoch, gate);
        metrics::gauge!("keyway_topology_epoch", "cluster" => cluster.to_string())
            .set(known.topology.epoch as f64);
        tracing::info!(
            cluster,
            epoch = known.topology.epoch,
            primary = known.topology.primary.as_deref().unwrap_or("(none)"),
            fenced = ?known.topology.fenced,
            reason = %known.topology.reason,
            "topology changed"
        );
        true
    }

    /// Puts a reloaded data plane in service: under the lock that applies decisions,
    /// every topology is applied to `next` (a decision may have landed while it was
    /// built), then `install` makes it the serving one. So it starts with every
    /// decision made so far and none is applied to the old one alone. `install` must
    /// only publish `next` (it runs with the lock held). Then starts controllers for
    /// new clusters.
    pub fn swap_in(
        self: &Arc<Self>,
        next: &dyn DataPlane,
        install: impl FnOnce(),
        shutdown: &watch::Receiver<bool>,
    ) {
        {
            let _applying = self.applying.lock();
            self.apply(next);
            install();
        }
        self.ensure_controllers(shutdown);
    }

    /// Once every write routed under an epoch older than `epoch` has ended, records
    /// `epoch` as acknowledged (and, with etcd, has the registration rewritten).
    ///
    /// One task per cluster at a time: a newer epoch arriving while it waits raises its
    /// target (the same fence covers it), so tasks never pile up; a fence that times out
    /// is tried again, so an epoch is never left unacknowledged for good.
    pub(super) fn acknowledge_when_drained(
        self: &Arc<Self>,
        cluster: &str,
        epoch: u64,
        gate: Arc<WriteGate>,
    ) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let start = self.cells.lock().is_ok_and(|mut cells| {
            cells.get_mut(cluster).is_some_and(|c| {
                c.ack_target = c.ack_target.max(epoch);
                !std::mem::replace(&mut c.ack_running, true)
            })
        });
        if !start {
            return;
        }
        let me = self.clone();
        let cluster = cluster.to_string();
        handle.spawn(async move {
            loop {
                let Some(target) = me.cells.lock().ok().and_then(|c| c.get(&cluster).map(|c| c.ack_target)) else {
                    return;
                };
                // Writes are bounded by protocol_timeout, bodies and tunnels by their
                // clients (and by the write lease); keep trying until they end.
                if !gate.fence(Instant::now() + Duration::from_secs(60)).await {
                    tracing::warn!(%cluster, epoch = target, in_flight = gate.in_flight(), "writes of an older epoch still in flight after a minute; the acknowledgement waits");
                    continue;
                }
                let (changed, done) = me.cells.lock().map_or((false, true), |mut cells| {
                    cells.get_mut(&cluster).map_or((false, true), |c| {
                        let newer = target > c.acked;
                        c.acked = c.acked.max(target);
                        let done = c.ack_target == target;
                        if done {
                            c.ack_running = false;
                        }
                        (newer, done)
                    })
                });
                if changed {
                    me.acks_changed.notify_one();
                }
                if done {
                    return;
                }
            }
        });
    }

    /// Per cluster, the epoch this instance acknowledges.
    pub(super) fn acks(&self) -> BTreeMap<String, u64> {
        self.cells
            .lock()
            .map(|cells| cells.iter().map(|(n, c)| (n.clone(), c.acked)).collect())
            .unwrap_or_default()
    }
}
