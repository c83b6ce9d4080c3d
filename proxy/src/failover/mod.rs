//! Promotion, fencing and failback for `primary-replica` clusters, and where those
//! decisions are kept.
//!
//! A cluster's **topology** is its current primary, the backends fenced off after a
//! demotion, and an **epoch** that grows with every decision. The request path sees it
//! through the cluster's health view (`HealthView::primary`, `BackendView::fenced`), so
//! one atomic load gives a request both health and topology.
//!
//! Rules (DESIGN.md §2, invariants):
//! - A decision is made durable *before* it takes effect: written atomically to the
//!   state file (single instance) or committed to etcd by a compare-and-swap on the
//!   revision this instance last saw (several instances). An instance that cannot make a
//!   decision durable does not act on it.
//! - Only a decider promotes automatically: a single instance always is; with etcd,
//!   only the holder of the leader lease, and its transaction also checks that it still
//!   holds it. When etcd is unreachable nobody promotes; every instance keeps the last
//!   primary it knew.
//! - A demoted primary is fenced: no traffic, whatever its health, until an explicit
//!   failback or promotion names it.
//! - Every change of primary takes two epochs: first one with no primary (the drain
//!   epoch), then, once every instance has acknowledged it, the new primary. An
//!   acknowledgement says that the instance applied the drain epoch to its serving
//!   runtime and that every write it routed under an older epoch has ended (its
//!   [`WriteGate`] fenced). With etcd, an instance that cannot acknowledge (cut off)
//!   is waited for until its registration's lease expires in etcd, and by then its
//!   own [`Permit`] has run out, so it routes no writes either. So no two backends
//!   ever take writes routed by keyway at the same time (invariant 3).
//! - With etcd, an instance routes writes only while it holds its permit: a lease
//!   renewal etcd answered, younger than the lease by its own clock (`permit.rs`),
//!   or the failsafe (every listed peer reachable, all cut off from etcd, all agreeing
//!   on every primary).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::config::{
    ClusterConfig, Config, EtcdConfig, HookConfig, PromotionPolicyKind, Role, StateConfig, Strategy,
};
use crate::etcd;
use crate::forward::Runtime;
use crate::health::{Health, HealthView};
use crate::permit::{self, Grant, Permit, WriteGate};
use crate::plugin::{OnError, PromotionCandidate, PromotionDecision};

mod backup;
mod control;
mod coordinate;
mod hooks;
pub mod load;
mod policy;
mod store;
mod topology;

use hooks::*;
use policy::*;
use store::*;

pub use policy::{native_least_lag, native_priority};
pub use store::{Access, EtcdStore, FileStore, Store};
pub use topology::{parse_state, StateDoc, Topology};

/// The header a failsafe query names its asker in.
pub const FAILSAFE_FROM: &str = "keyway-failsafe-from";

/// Decisions kept per cluster for `/status`.
const HISTORY: usize = 64;

/// How often a controller looks at its cluster.
const TICK: Duration = Duration::from_millis(100);

// === the failover manager ===

/// Per-cluster state kept across reloads.
struct Cell {
    known: Known,
    /// The topology the configuration starts with (epoch 0).
    configured: Topology,
    /// Started without reaching etcd: the primary is unknown until etcd answers.
    unconfirmed: bool,
    /// The last decisions this instance saw, oldest first (for `/status`).
    history: std::collections::VecDeque<Topology>,
    /// Serializes decisions about this cluster (controller, admin calls).
    lock: Arc<tokio::sync::Mutex<()>>,
    promotion_needed: bool,
    /// This cluster's writes in flight, across reloads.
    gate: Arc<WriteGate>,
    /// The newest epoch applied whose older writes have all ended.
    acked: u64,
    /// The newest epoch applied, which the acknowledgement task works towards.
    ack_target: u64,
    /// An acknowledgement task runs for this cluster.
    ack_running: bool,
}

/// Promotion, fencing and failback for every `primary-replica` cluster of one instance.
pub struct Failover {
    store: Store,
    cells: Mutex<HashMap<String, Cell>>,
    controllers: Mutex<HashSet<String>>,
    /// The server's live runtime, set once by [`Failover::start`].
    runtime: std::sync::OnceLock<Arc<ArcSwap<Runtime>>>,
    /// Whether this instance may route writes.
    permit: Arc<Permit>,
    /// Held while a topology is applied to the live runtime or a runtime is swapped in,
    /// so a reload never serves a topology older than one already acknowledged.
    applying: Mutex<()>,
    /// An acknowledgement changed: the registration in etcd is rewritten.
    acks_changed: tokio::sync::Notify,
    /// This instance vouched for a peer's failsafe permit until then: it neither
    /// acknowledges a drain nor commits a promotion before.
    vouched_until: Mutex<Option<Instant>>,
    /// Per cluster: the promotion plugin and hook TLS loaded with the running config.
    parts: Mutex<HashMap<String, load::PromotionParts>>,
}

/// Why an admin request could not switch the primary.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status for the admin API.
    pub status: u16,
    /// What happened and what to do.
    pub message: String,
}

fn refused(status: u16, message: impl Into<String>) -> Refused {
    Refused {
        status,
        message: message.into(),
    }
}

impl Failover {
    /// At shutdown: a state file's lock is given up (decisions are durable already);
    /// no decision is written after this.
    pub fn release(&self) {
        if let Store::File(f) = &self.store {
            f.release();
        }
    }

    /// Opens the store and loads every cluster's topology, checked against `config`;
    /// `parts` were loaded from it (`load`).
    pub async fn open(
        config: &Config,
        parts: &load::Coordination,
        access: Access,
    ) -> Result<Arc<Self>, String> {
        started();
        let store = Store::open(&config.state, parts.etcd.as_ref(), access)?;
        let (stored, unconfirmed) = match store.load_all().await {
            Ok(s) => (s, false),
            Err(e) if store.is_etcd() => {
                tracing::warn!(error = %e, "etcd unreachable at start: writes are refused until etcd says who the primary is (another instance may have promoted); reads are served");
                (HashMap::new(), true)
            }
            Err(e) => return Err(e),
        };
        let permit = Arc::new(if store.is_etcd() {
            Permit::coordinated()
        } else {
            Permit::always()
        });
        let me = Arc::new(Self {
            store,
            cells: Mutex::new(HashMap::new()),
            controllers: Mutex::new(HashSet::new()),
            runtime: std::sync::OnceLock::new(),
            permit,
            applying: Mutex::new(()),
            acks_changed: tokio::sync::Notify::new(),
            vouched_until: Mutex::new(None),
            parts: Mutex::new(parts.clusters.clone()),
        });
        me.adopt_config(config, &stored, false)?;
        if unconfirmed {
            if let Ok(mut cells) = me.cells.lock() {
                for cell in cells.values_mut() {
                    cell.unconfirmed = true;
                    cell.known.topology.primary = None;
                    cell.known.topology.reason =
                        "etcd unreachable at start: primary unknown, writes refused".into();
                }
            }
        }
        Ok(me)
    }

    /// Makes sure every primary-replica cluster of `config` has a topology and that the
    /// stored ones name only backends the config has. Nothing changes on error.
    pub fn check_config(&self, config: &Config) -> Result<(), String> {
        let cells = self.cells.lock().map_err(|_| "failover lock poisoned")?;
        for c in config
            .clusters
            .iter()
            .filter(|c| c.strategy == Strategy::PrimaryReplica)
        {
            if let Some(cell) = cells.get(&c.name) {
                cell.known.topology.validate(c).map_err(|e| {
                    format!("{e}; keep that backend in the configuration, or promote another one first (POST /clusters/{}/promote/ID)", c.name)
                })?;
            }
        }
        Ok(())
    }

    /// Creates the cells of clusters not seen before: with their stored topology, or
    /// the configured one, or (`unconfirmed`: with etcd, after start) no primary until
    /// etcd is read.
    fn adopt_config(
        &self,
        config: &Config,
        stored: &HashMap<String, (Topology, i64)>,
        unconfirmed: bool,
    ) -> Result<(), String> {
        let mut cells = self.cells.lock().map_err(|_| "failover lock poisoned")?;
        for c in config
            .clusters
            .iter()
            .filter(|c| c.strategy == Strategy::PrimaryReplica)
        {
            if cells.contains_key(&c.name) {
                continue;
            }
            let known = match stored.get(&c.name) {
                Some((t, rev)) => {
                    t.validate(c).map_err(|e| {
                        format!("{e}. The stored decisions do not match the configuration: restore the backend, or fix the state with `keyway state import`")
                    })?;
                    Known {
                        topology: t.clone(),
                        revision: *rev,
                    }
                }
                None if unconfirmed => Known {
                    topology: Topology {
                        primary: None,
                        reason: "added by a reload: primary unknown until etcd is read".into(),
                        ..Topology::initial(c)
                    },
                    revision: 0,
                },
                None => Known {
                    topology: Topology::initial(c),
                    revision: 0,
                },
            };
            let gate = Arc::new(WriteGate::default());
            gate.applied(known.topology.epoch);
            cells.insert(
                c.name.clone(),
                Cell {
                    configured: Topology::initial(c),
                    unconfirmed: unconfirmed && !stored.contains_key(&c.name),
                    known,
                    history: std::collections::VecDeque::new(),
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    promotion_needed: false,
                    gate,
                    acked: 0,
                    ack_target: 0,
                    ack_running: false,
                },
            );
        }
        Ok(())
    }

    /// This instance's write permit (shared with every runtime it builds).
    pub fn permit(&self) -> &Arc<Permit> {
        &self.permit
    }

    /// The write gate of a `primary-replica` cluster (shared across reloads).
    pub fn gate(&self, cluster: &str) -> Option<Arc<WriteGate>> {
        self.cells.lock().ok()?.get(cluster).map(|c| c.gate.clone())
    }

    /// The topology a cluster has now.
    pub fn topology(&self, cluster: &str) -> Option<Topology> {
        self.known(cluster).map(|k| k.topology)
    }

    fn known(&self, cluster: &str) -> Option<Known> {
        self.cells
            .lock()
            .ok()?
            .get(cluster)
            .map(|c| c.known.clone())
    }

    /// The running runtime, once started.
    fn live(&self) -> Option<Arc<Runtime>> {
        self.runtime.get().map(|r| r.load_full())
    }

    /// A running primary-replica cluster, for the admin calls.
    fn split_cluster(&self, name: &str) -> Result<Arc<Cluster>, Refused> {
        self.live()
            .ok_or_else(|| refused(503, "keyway is starting"))?
            .cluster(name)
            .filter(|c| c.cfg.strategy == Strategy::PrimaryReplica)
            .cloned()
            .ok_or_else(|| refused(404, format!("no primary-replica cluster `{name}`")))
    }

    fn unconfirmed(&self, cluster: &str) -> bool {
        self.cells
            .lock()
            .ok()
            .and_then(|c| c.get(cluster).map(|c| c.unconfirmed))
            .unwrap_or(false)
    }

    fn lock_of(&self, cluster: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.cells.lock().ok()?.get(cluster).map(|c| c.lock.clone())
    }

    /// Applies the cluster's topology to a freshly built cluster (before it serves).
    pub fn apply_to(&self, cluster: &Cluster) {
        if cluster.cfg.strategy != Strategy::PrimaryReplica {
            return;
        }
        if let Some(t) = self.topology(&cluster.cfg.name) {
            apply(cluster, &t);
        }
    }

    /// Records a newer topology (from a commit or from etcd) and applies it to the
    /// running cluster. Older epochs are ignored.
    fn adopt(self: &Arc<Self>, cluster: &str, known: Known) -> bool {
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
        if let Some(rt) = self.live() {
            if let Some(c) = rt.cluster(cluster) {
                if let Err(e) = known.topology.validate(&c.cfg) {
                    tracing::error!(cluster, error = %e, "a decision names a backend this instance does not have; its configuration differs from the other instances'");
                    return false;
                }
                apply(c, &known.topology);
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

    /// Re-applies every topology to a runtime that was just swapped in (a decision may
    /// have landed while it was being built).
    pub fn reapply(&self, rt: &Runtime) {
        for c in &rt.clusters {
            self.apply_to(c);
        }
    }

    /// Installs a reloaded runtime: under the lock that applies decisions, so the new
    /// runtime starts with every decision made so far and none is applied to the old
    /// one alone. Then starts controllers for new clusters.
    pub fn swap_in(
        self: &Arc<Self>,
        live: &ArcSwap<Runtime>,
        rt: Arc<Runtime>,
        shutdown: &watch::Receiver<bool>,
    ) {
        {
            let _applying = self.applying.lock();
            self.reapply(&rt);
            live.store(rt);
        }
        self.ensure_controllers(shutdown);
    }

    /// Once every write routed under an epoch older than `epoch` has ended, records
    /// `epoch` as acknowledged (and, with etcd, has the registration rewritten).
    ///
    /// One task per cluster at a time: a newer epoch arriving while it waits raises its
    /// target (the same fence covers it), so tasks never pile up; a fence that times out
    /// is tried again, so an epoch is never left unacknowledged for good.
    fn acknowledge_when_drained(self: &Arc<Self>, cluster: &str, epoch: u64, gate: Arc<WriteGate>) {
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
    fn acks(&self) -> BTreeMap<String, u64> {
        self.cells
            .lock()
            .map(|cells| cells.iter().map(|(n, c)| (n.clone(), c.acked)).collect())
            .unwrap_or_default()
    }

    /// Starts the per-cluster controllers and, with etcd, the election and the watch.
    pub fn start(
        self: &Arc<Self>,
        runtime: Arc<ArcSwap<Runtime>>,
        shutdown: watch::Receiver<bool>,
    ) {
        let _ = self.runtime.set(runtime.clone());
        for c in &runtime.load().clusters {
            metrics::gauge!("keyway_topology_epoch", "cluster" => c.cfg.name.clone())
                .set(self.topology(&c.cfg.name).map_or(0.0, |t| t.epoch as f64));
        }
        self.ensure_controllers(&shutdown);
        if let Store::Etcd(_) = &self.store {
            tokio::spawn(self.clone().coordinate(shutdown.clone()));
            tokio::spawn(self.clone().watch_etcd(shutdown));
        }
    }

    /// Before a reload builds its runtime: checks the new config against the stored
    /// decisions and gives new primary-replica clusters a topology.
    pub fn prepare(&self, config: &Config) -> Result<(), String> {
        self.check_config(config)?;
        // A cluster added by a reload may have decisions stored under its name (it was
        // there before): they stand, never the configured primary.
        match &self.store {
            Store::File(f) => self.adopt_config(config, &f.stored(), false),
            Store::Etcd(_) => self.adopt_config(config, &HashMap::new(), true),
        }
    }

    fn ensure_controllers(self: &Arc<Self>, shutdown: &watch::Receiver<bool>) {
        let Some(rt) = self.live() else {
            return;
        };
        let names: Vec<String> = rt
            .clusters
            .iter()
            .filter(|c| c.cfg.strategy == Strategy::PrimaryReplica)
            .map(|c| c.cfg.name.clone())
            .collect();
        let Ok(mut running) = self.controllers.lock() else {
            return;
        };
        for name in names {
            if running.insert(name.clone()) {
                // Nothing is in flight for a cluster not served before: its current
                // epoch is acknowledged at once (a drain may be waiting for it).
                if let (Some(t), Some(gate)) = (self.topology(&name), self.gate(&name)) {
                    self.acknowledge_when_drained(&name, t.epoch, gate);
                }
                tokio::spawn(self.clone().control(name, shutdown.clone()));
            }
        }
    }

    /// `/status`: the store and every cluster's topology.
    pub fn status_json(&self) -> serde_json::Value {
        let mut v = self.store.status_json();
        v["write_permit"] = self.permit.status_json();
        if let Ok(cells) = self.cells.lock() {
            let clusters: serde_json::Map<String, serde_json::Value> = cells
                .iter()
                .map(|(name, c)| {
                    let mut t = serde_json::to_value(&c.known.topology).unwrap_or_default();
                    t["promotion_needed"] = c.promotion_needed.into();
                    t["acknowledged_epoch"] = c.acked.into();
                    t["writes_in_flight"] = c.gate.in_flight().into();
                    t["history"] = serde_json::to_value(&c.history).unwrap_or_default();
                    (name.clone(), t)
                })
                .collect();
            v["clusters"] = clusters.into();
        }
        v
    }

    /// Whether the instance that decided `t` is another one, still registered (and so
    /// perhaps still completing a change of primary).
    fn decider_alive(&self, t: &Topology) -> bool {
        match (&self.store, &t.by) {
            (Store::Etcd(e), Some(by)) if *by != e.cfg.instance => {
                e.status.lock().is_ok_and(|s| s.instances.contains(by))
            }
            _ => false,
        }
    }

    fn set_needed(&self, cluster: &str, needed: bool) -> bool {
        let was = self
            .cells
            .lock()
            .ok()
            .and_then(|mut c| {
                c.get_mut(cluster)
                    .map(|c| std::mem::replace(&mut c.promotion_needed, needed))
            })
            .unwrap_or(false);
        if was != needed {
            metrics::gauge!("keyway_promotion_needed", "cluster" => cluster.to_string())
                .set(if needed { 1.0 } else { 0.0 });
        }
        was != needed
    }
}

/// Applies a topology to one running cluster.
fn apply(c: &Cluster, t: &Topology) {
    let primary = t.primary.as_ref().and_then(|id| index(c, id));
    let fenced: Vec<usize> = t.fenced.iter().filter_map(|id| index(c, id)).collect();
    c.health.set_topology(t.epoch, primary, &fenced);
}

/// The backend the configuration names primary: where the cluster starts and where a
/// failback returns.
fn home(cfg: &ClusterConfig) -> Option<usize> {
    cfg.backends.iter().position(|b| b.role == Role::Primary)
}

fn index(c: &Cluster, id: &str) -> Option<usize> {
    c.backends.iter().position(|b| b.cfg.id == id)
}
