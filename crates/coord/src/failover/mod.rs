//! Promotion, fencing and failback for `primary-replica` clusters, and where those
//! decisions are kept: the coordinator. The manager ([`Failover`], this file) owns every
//! cluster's topology, write gate and acknowledgements across reloads and applies
//! decisions to the data plane.
//!
//! A cluster's **topology** is its current primary, the backends fenced off after a
//! demotion, and an **epoch** that grows with every decision. The coordinator reaches
//! the data plane only through the [`DataPlane`] trait (`plane.rs`): it reads a
//! [`ClusterView`] and applies a topology with [`DataPlane::apply`]; it must never name a
//! data-plane type (cluster, runtime, health records, listeners), so it depends on the
//! configuration, the plugins and its own stores only. How the data plane publishes a
//! topology to requests (next to health, in one atomic load) is the data plane's affair.
//!
//! Applying, in one verb: [`Failover::apply`] gives a runtime that does not serve yet
//! every topology held; [`Failover::swap_in`] does the same for a reloaded runtime and
//! publishes it (the closure the data plane hands over) under the lock that applies
//! decisions, so a reload never serves a topology older than one acknowledged and no
//! decision lands on the old runtime alone; a decision is applied to the serving data
//! plane under that lock before it counts as applied for its acknowledgement.
//!
//! Rules (the invariants in `docs/architecture.md`):
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

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::etcd;
use crate::permit::{self, Grant, Permit, WriteGate};
use keyway_config::OnError;
use keyway_config::{
    BackendConfig, ClusterConfig, Config, EtcdConfig, HookConfig, PromotionPolicyKind, Role,
    StateConfig, Strategy,
};
use keyway_plugin_host::{PromotionCandidate, PromotionDecision};

mod admit;
mod apply;
mod backup;
mod control;
mod coordinate;
mod drain;
mod failsafe;
mod hooks;
pub mod load;
mod plane;
mod policy;
mod store;
mod switchover;
mod topology;

use hooks::*;
use plane::index;
use policy::*;
use store::*;

pub use drain::DrainChange;
pub use plane::{BackendHealth, BackendState, ClusterView, DataPlane};
pub use policy::{native_least_lag, native_priority};
pub use store::{Access, EtcdStore, FileStore, Store};
pub use topology::{parse_state, Drain, Drains, StateDoc, Topology};

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
    /// The serving data plane, set once by [`Failover::start`].
    plane: std::sync::OnceLock<Arc<dyn DataPlane>>,
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
    /// Per cluster (any strategy): the drains in force and the store's token for them.
    drains: Mutex<HashMap<String, (Drains, i64)>>,
    /// Serializes drain calls (`drain.rs`).
    drain_lock: tokio::sync::Mutex<()>,
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
            plane: std::sync::OnceLock::new(),
            permit,
            applying: Mutex::new(()),
            acks_changed: tokio::sync::Notify::new(),
            vouched_until: Mutex::new(None),
            parts: Mutex::new(parts.clusters.clone()),
            drains: Mutex::new(HashMap::new()),
            drain_lock: tokio::sync::Mutex::new(()),
        });
        me.adopt_config(config, &stored, false)?;
        if !unconfirmed {
            // etcd answered a moment ago; if it fails now, the watch brings the drains.
            match me.store.load_drains().await {
                Ok(d) => me.adopt_drains(config, d),
                Err(e) => {
                    tracing::warn!(error = %e, "drains not read at start; they apply once etcd answers")
                }
            }
        }
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

    /// The serving data plane, once started.
    fn live(&self) -> Option<&Arc<dyn DataPlane>> {
        self.plane.get()
    }

    /// A serving primary-replica cluster, for the admin calls.
    fn split_cluster(&self, name: &str) -> Result<ClusterView, Refused> {
        self.live()
            .ok_or_else(|| refused(503, "keyway is starting"))?
            .view(name)
            .filter(|c| c.cfg.strategy == Strategy::PrimaryReplica)
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

    /// Starts the per-cluster controllers and, with etcd, the election and the watch.
    /// `plane` is the serving data plane (every topology already applied to it, see
    /// [`Failover::apply`]); decisions are applied to it from now on.
    pub fn start(self: &Arc<Self>, plane: Arc<dyn DataPlane>, shutdown: watch::Receiver<bool>) {
        let _ = self.plane.set(plane.clone());
        for c in plane.clusters() {
            metrics::gauge!("keyway_topology_epoch", "cluster" => c.name.clone())
                .set(self.topology(&c.name).map_or(0.0, |t| t.epoch as f64));
        }
        self.ensure_controllers(&shutdown);
        if let Store::Etcd(_) = &self.store {
            tokio::spawn(self.clone().coordinate(shutdown.clone()));
            tokio::spawn(self.clone().watch_etcd(shutdown));
        }
    }

    fn ensure_controllers(self: &Arc<Self>, shutdown: &watch::Receiver<bool>) {
        let Some(rt) = self.live() else {
            return;
        };
        let names: Vec<String> = rt
            .clusters()
            .into_iter()
            .filter(|c| c.strategy == Strategy::PrimaryReplica)
            .map(|c| c.name.clone())
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

    /// Whether another instance committed `known` and may still be finishing that change
    /// of primary: it is registered, or it committed after this instance last read who is registered (a
    /// list that old cannot show it, e.g. an instance that just started).
    fn decider_alive(&self, known: &Known) -> bool {
        match (&self.store, &known.topology.by) {
            (Store::Etcd(e), Some(by)) if *by != e.cfg.instance => e
                .status
                .lock()
                .is_ok_and(|s| s.instances.contains(by) || known.revision > s.instances_revision),
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

/// The backend the configuration names primary: where the cluster starts and where a
/// failback returns.
fn home(cfg: &ClusterConfig) -> Option<usize> {
    cfg.backends.iter().position(|b| b.role == Role::Primary)
}
