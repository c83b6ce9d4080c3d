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

/// The header a failsafe query names its asker in.
pub const FAILSAFE_FROM: &str = "keyway-failsafe-from";

/// Decisions kept per cluster for `/status`.
const HISTORY: usize = 64;

/// How often a controller looks at its cluster.
const TICK: Duration = Duration::from_millis(100);

// === the topology ===

/// One cluster's decisions, as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Grows with every decision; 0 means "as configured, nothing decided yet".
    pub epoch: u64,
    /// The backend id that takes writes; `None` while a switchover drains.
    pub primary: Option<String>,
    /// Demoted primaries: no traffic until a failback or promotion names them.
    #[serde(default)]
    pub fenced: Vec<String>,
    /// Why this epoch began.
    #[serde(default)]
    pub reason: String,
    /// When (Unix milliseconds).
    #[serde(default)]
    pub unix_ms: u64,
    /// The instance that made the decision (with etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl Topology {
    /// The topology a config starts with.
    fn initial(cfg: &ClusterConfig) -> Self {
        Self {
            epoch: 0,
            primary: home(cfg).map(|i| cfg.backends[i].id.clone()),
            fenced: Vec::new(),
            reason: "as configured".into(),
            unix_ms: 0,
            by: None,
        }
    }

    /// Checks that every backend it names exists in `cfg`.
    pub fn validate(&self, cfg: &ClusterConfig) -> Result<(), String> {
        let known = |id: &str| cfg.backends.iter().any(|b| b.id == id);
        if cfg.strategy != Strategy::PrimaryReplica {
            return Err(format!(
                "cluster `{}` is not primary-replica, so it has no primary to record",
                cfg.name
            ));
        }
        if let Some(p) = &self.primary {
            if !known(p) {
                return Err(format!(
                    "cluster `{}`: the recorded primary `{p}` is not a backend in the configuration",
                    cfg.name
                ));
            }
        }
        if let Some(f) = self.fenced.iter().find(|f| !known(f)) {
            return Err(format!(
                "cluster `{}`: the fenced backend `{f}` is not a backend in the configuration",
                cfg.name
            ));
        }
        Ok(())
    }

    fn next(&self, primary: Option<String>, fenced: Vec<String>, reason: String) -> Self {
        Self {
            epoch: self.epoch + 1,
            primary,
            fenced,
            reason,
            unix_ms: crate::unix_ms(SystemTime::now()),
            by: None,
        }
    }
}

/// The whole state: every cluster's topology. This is the state file's format and what
/// `keyway state export` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDoc {
    /// Format version (1).
    pub version: u32,
    /// By cluster name.
    pub clusters: BTreeMap<String, Topology>,
}

// === stores ===

/// A topology and the store's token for it (its revision), used to compare-and-swap.
#[derive(Clone, Debug)]
struct Known {
    topology: Topology,
    revision: i64,
}

enum Commit {
    Done(i64),
    /// Someone else decided first: the store's current value.
    Lost(Option<Known>),
}

/// The state file of a single instance.
pub struct FileStore {
    path: PathBuf,
    doc: Mutex<StateDoc>,
    /// The lock beside the state file, held while this process may write it
    /// (`Access::Owner` until [`FileStore::release`]).
    lock: Mutex<Option<std::fs::File>>,
}

/// How a process uses the decisions it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// keyway serving traffic, or `state import`: may write. A state file is locked
    /// (`FILE.lock`) for as long as the store lives, so that two processes never
    /// overwrite each other's decisions.
    Owner,
    /// `state export`: reads only, alongside a running keyway.
    Reader,
}

impl FileStore {
    /// Opens the state file. Missing: empty state. Unreadable or corrupt: an error that
    /// stops start-up (a silent reset could resurrect a fenced primary). An `Owner`
    /// takes the file's lock first, or fails saying who holds it.
    pub fn open(path: &Path, access: Access) -> Result<Self, String> {
        let lock = match access {
            Access::Owner => Some(lock_state(path)?),
            Access::Reader => None,
        };
        let doc = match std::fs::read(path) {
            Ok(bytes) => parse_state(&bytes).map_err(|e| {
                format!(
                    "the state file {} is corrupt ({e}). keyway will not start without its promotion decisions: restore it with `keyway state import BACKUP`, or move it away to start from the configured primaries (this forgets every promotion and fence)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateDoc {
                version: 1,
                clusters: BTreeMap::new(),
            },
            Err(e) => {
                return Err(format!(
                    "cannot read the state file {}: {e}. Fix its permissions or set [state] file to a readable path",
                    path.display()
                ))
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            doc: Mutex::new(doc),
            lock: Mutex::new(lock),
        })
    }

    /// Gives the lock up (at shutdown): from now on this store refuses to write, and
    /// another process (or a restarted server) may own the file.
    pub fn release(&self) {
        if let Ok(mut l) = self.lock.lock() {
            l.take();
        }
    }

    #[cfg(test)]
    fn get(&self, cluster: &str) -> Option<Topology> {
        self.doc.lock().ok()?.clusters.get(cluster).cloned()
    }

    /// Writes `next` for `cluster` if its epoch is still `expected`.
    fn commit(&self, cluster: &str, expected: u64, next: &Topology) -> Result<Commit, String> {
        let mut doc = self
            .doc
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        let current = doc.clusters.get(cluster).map_or(0, |t| t.epoch);
        if current != expected {
            return Ok(Commit::Lost(doc.clusters.get(cluster).map(|t| Known {
                topology: t.clone(),
                revision: t.epoch as i64,
            })));
        }
        self.check_owner()?;
        let mut updated = doc.clone();
        updated.clusters.insert(cluster.to_string(), next.clone());
        write_atomically(&self.path, &updated)?;
        *doc = updated;
        Ok(Commit::Done(next.epoch as i64))
    }

    /// Only the holder of the lock writes: a reader never took it, and an owner gave it
    /// up at shutdown.
    fn check_owner(&self) -> Result<(), String> {
        if self.lock.lock().is_ok_and(|l| l.is_some()) {
            Ok(())
        } else {
            Err("this keyway does not hold the state file's lock (it is shutting down, or opened the file to read only)".into())
        }
    }

    /// Every cluster's topology, with its epoch as the compare-and-swap token.
    fn stored(&self) -> HashMap<String, (Topology, i64)> {
        self.doc()
            .clusters
            .into_iter()
            .map(|(k, t)| {
                let rev = t.epoch as i64;
                (k, (t, rev))
            })
            .collect()
    }

    /// The whole document.
    pub fn doc(&self) -> StateDoc {
        self.doc.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Replaces the whole document (import).
    pub fn replace(&self, doc: StateDoc) -> Result<(), String> {
        self.check_owner()?;
        write_atomically(&self.path, &doc)?;
        if let Ok(mut d) = self.doc.lock() {
            *d = doc;
        }
        Ok(())
    }
}

/// Parses a state document, checking its version.
pub fn parse_state(bytes: &[u8]) -> Result<StateDoc, String> {
    let doc: StateDoc = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if doc.version != 1 {
        return Err(format!(
            "format version {} is not one this keyway reads (1)",
            doc.version
        ));
    }
    Ok(doc)
}

/// Takes `STATE.lock`, the lock of the state file (beside it: the state file itself is
/// replaced on every write, so it cannot carry the lock).
fn lock_state(path: &Path) -> Result<std::fs::File, String> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            format!(
                "cannot create {}: {e}. Create its folder, or set [state] file to a writable path",
                lock_path.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another keyway process is using the state file {} (it holds {}). Each instance needs its own [state] file (instances that share decisions use [coordination]); to restore a backup, stop keyway first: a running instance would not see the import and would overwrite it",
            path.display(),
            lock_path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!(
            "cannot lock {}: {e}. Put the state file on a local file system",
            lock_path.display()
        )),
    }
}

/// Temp file in the same directory, fsync, rename over, fsync the directory: after a
/// crash the file holds either the old or the new state, never a mix.
fn write_atomically(path: &Path, doc: &StateDoc) -> Result<(), String> {
    use std::io::Write;
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "cannot {what} the state file {}: {e}; the decision was not made",
            path.display()
        )
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map_or("keyway-state".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let text = serde_json::to_vec_pretty(doc).map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| fail("create a temporary file for", e))?;
    f.write_all(&text)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| fail("write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| fail("replace", e))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// etcd: shared by several instances.
pub struct EtcdStore {
    client: etcd::Client,
    cfg: EtcdConfig,
    status: Mutex<EtcdStatus>,
}

#[derive(Default)]
struct EtcdStatus {
    connected: bool,
    last_error: Option<String>,
    /// The lease this instance registers and campaigns with.
    lease: Option<i64>,
    leader: Option<String>,
    /// This instance's key is in etcd under its lease.
    registered: bool,
    /// The instances registered at the last read (names), this one included.
    instances: Vec<String>,
    /// The store revision the watch has seen up to (events and progress).
    watch_revision: i64,
    /// The failsafe holds this instance's permit now (etcd unreachable for all).
    failsafe: Option<String>,
    /// The acknowledgements last written to the registration.
    published: BTreeMap<String, u64>,
}

/// What an instance keeps under its lease at `PREFIX/instances/NAME`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Registration {
    instance: String,
    /// Per cluster, the epoch this instance applied and drained the older writes of.
    #[serde(default)]
    acks: BTreeMap<String, u64>,
}

impl EtcdStore {
    fn key(&self, cluster: &str) -> String {
        format!("{}/clusters/{cluster}/topology", self.cfg.prefix)
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.cfg.prefix)
    }

    fn instances_prefix(&self) -> String {
        format!("{}/instances/", self.cfg.prefix)
    }

    fn instance_key(&self) -> String {
        format!("{}{}", self.instances_prefix(), self.cfg.instance)
    }

    fn note<T>(&self, r: &Result<T, String>) {
        if let Ok(mut s) = self.status.lock() {
            match r {
                Ok(_) => {
                    if !s.connected {
                        tracing::info!("etcd reachable");
                    }
                    s.connected = true;
                }
                Err(e) => {
                    if s.connected {
                        tracing::warn!(error = %e, "etcd unreachable: keeping the last known primaries; no promotions until it is back");
                    }
                    s.connected = false;
                    s.last_error = Some(e.clone());
                }
            }
        }
        metrics::gauge!("keyway_coordination_connected").set(if r.is_ok() { 1.0 } else { 0.0 });
    }

    /// Whether this instance holds the leader key (its permit is checked apart).
    fn is_leader(&self) -> bool {
        self.status.lock().is_ok_and(|s| {
            s.connected && s.registered && s.leader.as_deref() == Some(self.cfg.instance.as_str())
        })
    }
}

/// Where decisions live.
pub enum Store {
    /// One instance.
    File(Arc<FileStore>),
    /// Several instances.
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// Opens the store a config names. A corrupt state file is an error; an unreachable
    /// etcd is not (the instance starts with the configured primaries, never promotes
    /// until etcd answers, and adopts etcd's decisions as soon as it does).
    pub fn open(cfg: &StateConfig, access: Access) -> Result<Self, String> {
        Ok(match cfg {
            StateConfig::File(path) => Store::File(Arc::new(FileStore::open(path, access)?)),
            StateConfig::Etcd(e) => Store::Etcd(Box::new(EtcdStore {
                client: etcd::Client::new(
                    e.endpoints.clone(),
                    e.tls.as_ref().map(|t| t.client.clone()),
                    e.timeout,
                ),
                cfg: e.clone(),
                status: Mutex::new(EtcdStatus::default()),
            })),
        })
    }

    /// Reads every cluster's stored topology.
    pub async fn load_all(&self) -> Result<HashMap<String, (Topology, i64)>, String> {
        match self {
            Store::File(f) => Ok(f.stored()),
            Store::Etcd(e) => {
                let prefix = format!("{}/clusters/", e.cfg.prefix);
                let r = e.client.get_prefix(&prefix).await;
                e.note(&r);
                let (kvs, _) = r?;
                let mut out = HashMap::new();
                for kv in kvs {
                    let Some(name) = kv
                        .key
                        .strip_prefix(&prefix)
                        .and_then(|k| k.strip_suffix("/topology"))
                    else {
                        continue;
                    };
                    match serde_json::from_slice::<Topology>(&kv.value) {
                        Ok(t) => {
                            out.insert(name.to_string(), (t, kv.mod_revision));
                        }
                        Err(err) => {
                            tracing::error!(key = %kv.key, error = %err, "unreadable topology in etcd; ignoring it")
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    async fn commit(
        &self,
        cluster: &str,
        seen: &Known,
        next: &Topology,
        as_leader: bool,
    ) -> Result<Commit, String> {
        match self {
            Store::File(f) => {
                let (f, cluster, expected, next) = (
                    f.clone(),
                    cluster.to_string(),
                    seen.topology.epoch,
                    next.clone(),
                );
                // Small, but it fsyncs: off the async workers.
                tokio::task::spawn_blocking(move || f.commit(&cluster, expected, &next))
                    .await
                    .map_err(|e| format!("state write task failed: {e}"))?
            }
            Store::Etcd(e) => {
                let value = serde_json::to_vec(next).map_err(|e| e.to_string())?;
                let leader_key = e.leader_key();
                let guard = as_leader.then_some((leader_key.as_str(), e.cfg.instance.as_str()));
                let r = e
                    .client
                    .swap(&e.key(cluster), seen.revision, &value, guard)
                    .await;
                e.note(&r);
                Ok(match r? {
                    etcd::Swap::Done(rev) => Commit::Done(rev),
                    etcd::Swap::Lost(kv) => Commit::Lost(kv.and_then(|kv| {
                        serde_json::from_slice::<Topology>(&kv.value)
                            .ok()
                            .map(|t| Known {
                                topology: t,
                                revision: kv.mod_revision,
                            })
                    })),
                })
            }
        }
    }

    /// Whether this instance may promote on its own now (its permit is checked apart).
    fn may_decide(&self) -> bool {
        match self {
            Store::File(_) => true,
            Store::Etcd(e) => e.is_leader(),
        }
    }

    fn is_etcd(&self) -> bool {
        matches!(self, Store::Etcd(_))
    }

    fn status_json(&self) -> serde_json::Value {
        match self {
            Store::File(f) => serde_json::json!({
                "kind": "file",
                "file": f.path.display().to_string(),
                "decides": true,
            }),
            Store::Etcd(e) => {
                let decides = e.is_leader();
                let s = e.status.lock();
                let s = s.as_deref();
                serde_json::json!({
                    "kind": "etcd",
                    "endpoints": e.cfg.endpoints.iter().map(|a| a.url()).collect::<Vec<_>>(),
                    "prefix": e.cfg.prefix,
                    "instance": e.cfg.instance,
                    "connected": s.is_ok_and(|s| s.connected),
                    "leader": s.ok().and_then(|s| s.leader.clone()),
                    "decides": decides,
                    "last_error": s.ok().and_then(|s| s.last_error.clone()),
                    "lease": s.ok().and_then(|s| s.lease),
                    "registered": s.is_ok_and(|s| s.registered),
                    "instances": s.map(|s| s.instances.clone()).unwrap_or_default(),
                    "watch_current_revision": s.map_or(0, |s| s.watch_revision),
                    "failsafe": s.ok().and_then(|s| s.failsafe.clone()),
                    "failsafe_peers": e.cfg.failsafe_peers,
                })
            }
        }
    }
}

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

    /// Opens the store and loads every cluster's topology, checked against `config`.
    pub async fn open(config: &Config, access: Access) -> Result<Arc<Self>, String> {
        started();
        let store = Store::open(&config.state, access)?;
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

    // --- the controller ---

    async fn control(self: Arc<Self>, name: String, mut shutdown: watch::Receiver<bool>) {
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
                let (c, view, t, failed) = (
                    c.clone(),
                    view.clone(),
                    known.topology.clone(),
                    hook_failed.clone(),
                );
                tokio::task::spawn_blocking(move || choose(&c, &view, &t, &failed))
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

    async fn maybe_fail_back(
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
    async fn decide(
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
            if let Err(e) = call_hook(hook, "on_promote", c, p, next.epoch).await {
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
                tokio::spawn(async move {
                    let _ = call_hook(&hook, "on_repoint", &c, i, epoch).await;
                });
            }
        }
        Ok(committed)
    }

    /// How long a change of primary waits for every instance to acknowledge its drain
    /// epoch: the cluster's `drain`, and with etcd the lease of an instance that cannot
    /// answer (it must expire) plus two etcd round trips.
    fn drain_wait(&self, c: &Cluster) -> Duration {
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
    async fn change_primary(
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
    async fn await_acks(&self, cluster: &str, epoch: u64, deadline: Instant) -> Result<(), String> {
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

    // --- etcd: election and watch ---

    /// With etcd: keeps this instance's lease, its registration (with its
    /// acknowledgements) and its write permit; campaigns for the leader key; re-reads
    /// every decision on each renewal; falls back to the failsafe when etcd is gone.
    async fn coordinate(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Store::Etcd(e) = &self.store else { return };
        let ttl = e.cfg.lease_ttl.as_secs().max(1);
        let period = Duration::from_millis((ttl * 1000 / 3).max(300));
        let mut lease: Option<i64> = None;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.acks_changed.notified() => {
                    if let Some(id) = lease {
                        if self.registered() {
                            let r = self.write_registration(e, id).await;
                            e.note(&r);
                        }
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    // No new writes; the registration goes only once the writes in
                    // flight have ended (or one lease has passed), so a promotion that
                    // stops waiting for this instance finds none of its writes left.
                    self.permit.revoke();
                    let gates: Vec<Arc<WriteGate>> = self
                        .cells
                        .lock()
                        .map(|c| c.values().map(|c| c.gate.clone()).collect())
                        .unwrap_or_default();
                    let deadline = Instant::now() + e.cfg.lease_ttl;
                    for gate in gates {
                        gate.fence(deadline).await;
                    }
                    if let Some(id) = lease {
                        let _ = e.client.revoke(id).await;
                    }
                    return;
                }
            }
            next = Instant::now() + period;
            let sent = Instant::now();
            match self.renew(e, &mut lease, ttl, sent).await {
                Ok(granted) => {
                    self.permit
                        .extend(sent + permit::valid_for(granted), Grant::Etcd);
                    if let Ok(mut s) = e.status.lock() {
                        if s.failsafe.take().is_some() {
                            tracing::info!("etcd reachable again: the failsafe ends");
                        }
                    }
                }
                Err(err) => {
                    e.note::<()>(&Err(err));
                    if let Ok(mut s) = e.status.lock() {
                        // Leadership is only as good as a lease we can refresh.
                        s.leader = None;
                    }
                    metrics::gauge!("keyway_coordination_leader").set(0.0);
                    if !e.cfg.failsafe_peers.is_empty() {
                        let asked = Instant::now();
                        match self.failsafe(e).await {
                            Ok(()) => {
                                self.permit.extend(
                                    asked + permit::valid_for(e.cfg.lease_ttl),
                                    Grant::Failsafe,
                                );
                                if let Ok(mut s) = e.status.lock() {
                                    if s.failsafe.replace("active".into()).is_none() {
                                        tracing::warn!("etcd unreachable for every instance; the failsafe keeps the last primaries (all peers reached and agree)");
                                    }
                                }
                            }
                            Err(why) => {
                                if let Ok(mut s) = e.status.lock() {
                                    if s.failsafe.as_deref() != Some(why.as_str()) {
                                        tracing::warn!(reason = %why, "failsafe refused: writes stop when the permit runs out");
                                    }
                                    s.failsafe = Some(why);
                                }
                            }
                        }
                    }
                }
            }
            metrics::gauge!("keyway_write_permit").set(if self.permit.holds() { 1.0 } else { 0.0 });
        }
    }

    fn registered(&self) -> bool {
        match &self.store {
            Store::Etcd(e) => e.status.lock().is_ok_and(|s| s.registered),
            Store::File(_) => true,
        }
    }

    fn set_registered(&self, e: &EtcdStore, registered: bool) {
        if let Ok(mut s) = e.status.lock() {
            if s.registered && !registered {
                tracing::warn!(instance = %e.cfg.instance, "this instance's registration in etcd is gone: writes stop until it is restored");
            }
            s.registered = registered;
        }
        if !registered {
            self.permit.revoke();
        }
    }

    /// The acknowledgements to publish: this instance's own, except while it vouched
    /// for a peer's failsafe, when the ones published before stand (that peer may still
    /// write to the old primary on the strength of it).
    fn publishable_acks(&self, e: &EtcdStore) -> BTreeMap<String, u64> {
        let vouched = self
            .vouched_until
            .lock()
            .ok()
            .and_then(|v| *v)
            .is_some_and(|until| Instant::now() < until);
        let published = e
            .status
            .lock()
            .map(|s| s.published.clone())
            .unwrap_or_default();
        if vouched {
            published
        } else {
            self.acks()
        }
    }

    fn registration(&self, acks: &BTreeMap<String, u64>, e: &EtcdStore) -> Vec<u8> {
        serde_json::to_vec(&Registration {
            instance: e.cfg.instance.clone(),
            acks: acks.clone(),
        })
        .unwrap_or_default()
    }

    /// Rewrites this instance's registration under `lease` when its acknowledgements
    /// changed.
    async fn write_registration(&self, e: &EtcdStore, lease: i64) -> Result<(), String> {
        let acks = self.publishable_acks(e);
        if e.status.lock().is_ok_and(|s| s.published == acks) {
            return Ok(());
        }
        if e.client
            .put_under(&e.instance_key(), &self.registration(&acks, e), lease)
            .await?
        {
            if let Ok(mut s) = e.status.lock() {
                s.published = acks;
            }
            Ok(())
        } else {
            self.set_registered(e, false);
            Err("this instance's registration disappeared from etcd".into())
        }
    }

    /// One renewal: the lease, the registration, every decision, the election.
    /// Returns the TTL etcd granted (the permit is counted from before the call).
    async fn renew(
        self: &Arc<Self>,
        e: &EtcdStore,
        lease: &mut Option<i64>,
        ttl: u64,
        sent: Instant,
    ) -> Result<Duration, String> {
        let (id, granted) = match *lease {
            Some(id) => match e.client.keep_alive(id).await? {
                0 => {
                    // Expired in etcd: the registration went with it. Start over; until
                    // registered and caught up again, no writes.
                    tracing::warn!(instance = %e.cfg.instance, "this instance's etcd lease expired; registering again");
                    self.set_registered(e, false);
                    *lease = None;
                    let (id, g) = e.client.grant(ttl).await?;
                    *lease = Some(id);
                    (id, g)
                }
                left => {
                    // Registered and renewed: the permit holds from the renewal alone
                    // (a promotion waits for this instance's acknowledgement while its
                    // key exists), so slow calls after it do not eat into it.
                    if self.registered() {
                        self.permit.extend(
                            sent + permit::valid_for(Duration::from_secs(left)),
                            Grant::Etcd,
                        );
                    }
                    (id, left)
                }
            },
            None => {
                self.set_registered(e, false);
                let (id, g) = e.client.grant(ttl).await?;
                *lease = Some(id);
                (id, g)
            }
        };
        if let Ok(mut s) = e.status.lock() {
            s.lease = Some(id);
        }
        // Registered before the decisions are read: a promotion that lists instances
        // after this point waits for this one's acknowledgement.
        if self.registered() {
            self.write_registration(e, id).await?;
        }
        if !self.registered() {
            let acks = self.publishable_acks(e);
            match e
                .client
                .claim(&e.instance_key(), &self.registration(&acks, e), id)
                .await?
            {
                etcd::Claim::Ours => {
                    tracing::info!(instance = %e.cfg.instance, lease = id, "registered in etcd");
                    if let Ok(mut s) = e.status.lock() {
                        s.published = acks;
                    }
                }
                etcd::Claim::Taken { lease: other } => {
                    return Err(format!(
                        "the instance name `{}` is registered by another process (lease {other}): give every keyway its own [coordination] instance name. If this is a restart, the old registration expires within lease_ttl",
                        e.cfg.instance
                    ));
                }
            }
        }
        // Every decision, and who is registered, as of now.
        let (kvs, _) = e.client.get_prefix(&format!("{}/", e.cfg.prefix)).await?;
        let clusters = format!("{}/clusters/", e.cfg.prefix);
        let mut instances = Vec::new();
        let mut listed = HashSet::new();
        let mut ours = false;
        for kv in kvs {
            if let Some(name) = kv.key.strip_prefix(&e.instances_prefix()) {
                ours |= name == e.cfg.instance && kv.lease == id;
                instances.push(name.to_string());
            } else if kv.key.starts_with(&clusters) {
                if let Some(n) = kv
                    .key
                    .strip_prefix(&clusters)
                    .and_then(|k| k.strip_suffix("/topology"))
                {
                    listed.insert(n.to_string());
                }
                self.on_etcd_put(&clusters, kv);
            }
        }
        if !ours {
            self.set_registered(e, false);
            return Err("this instance's registration is not in etcd after claiming it".into());
        }
        self.confirm_undecided(&listed);
        let holder = e
            .client
            .campaign(&e.leader_key(), &e.cfg.instance, id)
            .await?;
        if let Ok(mut s) = e.status.lock() {
            s.registered = true;
            s.instances = instances;
            let was = s.leader.as_deref() == Some(e.cfg.instance.as_str());
            let now = holder == e.cfg.instance;
            if was != now {
                tracing::info!(instance = %e.cfg.instance, leader = %holder, "promotion leader changed");
            }
            s.leader = Some(holder);
            metrics::gauge!("keyway_coordination_leader").set(if now { 1.0 } else { 0.0 });
        }
        e.note::<()>(&Ok(()));
        Ok(Duration::from_secs(granted))
    }

    /// Clusters that started unconfirmed and that etcd has no decision for: the
    /// configured primary stands.
    fn confirm_undecided(self: &Arc<Self>, listed: &HashSet<String>) {
        let pending: Vec<(String, Topology)> = self
            .cells
            .lock()
            .map(|cells| {
                cells
                    .iter()
                    .filter(|(n, c)| c.unconfirmed && !listed.contains(*n))
                    .map(|(n, c)| (n.clone(), c.configured.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (name, t) in pending {
            self.adopt(
                &name,
                Known {
                    topology: t,
                    revision: 0,
                },
            );
        }
    }

    // --- the failsafe ---

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
    fn primaries(&self) -> BTreeMap<String, (u64, Option<String>)> {
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
    async fn failsafe(&self, e: &EtcdStore) -> Result<(), String> {
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

    /// Follows every decision in etcd as it is made: a full read, then a watch from the
    /// next revision (no change is missed between the two). A watch that ends, fails or
    /// goes silent (`etcd::WATCH_SILENCE`) is re-established the same way; each lease
    /// renewal also re-reads everything, so a lost watch delays but never hides a
    /// decision.
    async fn watch_etcd(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Store::Etcd(e) = &self.store else { return };
        let prefix = format!("{}/clusters/", e.cfg.prefix);
        loop {
            let from = match e.client.get_prefix(&prefix).await {
                Ok((kvs, rev)) => {
                    e.note::<()>(&Ok(()));
                    let listed: HashSet<String> = kvs
                        .iter()
                        .filter_map(|kv| {
                            kv.key
                                .strip_prefix(&prefix)
                                .and_then(|k| k.strip_suffix("/topology"))
                                .map(String::from)
                        })
                        .collect();
                    for kv in kvs {
                        self.on_etcd_put(&prefix, kv);
                    }
                    self.confirm_undecided(&listed);
                    Some(rev + 1)
                }
                Err(err) => {
                    e.note::<()>(&Err(err));
                    None
                }
            };
            if let Some(from) = from {
                let this = self.clone();
                let prefix2 = prefix.clone();
                let watch = e.client.watch(&prefix, from, move |ev| match ev {
                    etcd::WatchEvent::Put(kv) => this.on_etcd_put(&prefix2, kv),
                    etcd::WatchEvent::Progress(rev) => {
                        if let Store::Etcd(e) = &this.store {
                            if let Ok(mut s) = e.status.lock() {
                                s.watch_revision = s.watch_revision.max(rev);
                            }
                        }
                    }
                    etcd::WatchEvent::Delete(_) => {}
                });
                tokio::select! {
                    r = watch => {
                        if let Err(err) = r {
                            // A quiet etcd that sends no progress notifications ends its
                            // watches every WATCH_SILENCE: routine, so not logged loudly.
                            tracing::debug!(error = %err, "etcd watch ended; re-reading");
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn on_etcd_put(self: &Arc<Self>, prefix: &str, kv: etcd::Kv) {
        let Some(name) = kv
            .key
            .strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("/topology"))
        else {
            return;
        };
        match serde_json::from_slice::<Topology>(&kv.value) {
            Ok(t) => {
                self.adopt(
                    name,
                    Known {
                        topology: t,
                        revision: kv.mod_revision,
                    },
                );
            }
            Err(err) => {
                tracing::error!(key = %kv.key, error = %err, "unreadable topology in etcd; ignoring it")
            }
        }
    }

    // --- export / import ---

    /// Every stored decision.
    pub async fn export(&self) -> Result<StateDoc, String> {
        let all = self.store.load_all().await?;
        Ok(StateDoc {
            version: 1,
            clusters: all.into_iter().map(|(k, (t, _))| (k, t)).collect(),
        })
    }

    /// Restores decisions, validated against `config`. An imported epoch never moves a
    /// cluster backwards: it becomes at least the stored epoch + 1.
    pub async fn import(&self, config: &Config, doc: StateDoc) -> Result<Vec<String>, String> {
        for (name, t) in &doc.clusters {
            let c = config
                .clusters
                .iter()
                .find(|c| c.name == *name)
                .ok_or_else(|| {
                    format!(
                        "the backup names cluster `{name}`, which the configuration does not have"
                    )
                })?;
            t.validate(c)?;
        }
        let current = self.store.load_all().await?;
        let mut report = Vec::new();
        let mut merged: BTreeMap<String, (Topology, i64)> = BTreeMap::new();
        for (name, mut t) in doc.clusters {
            let (cur_epoch, rev) = current.get(&name).map_or((0, 0), |(t, r)| (t.epoch, *r));
            if t.epoch <= cur_epoch {
                report.push(format!(
                    "{name}: epoch {} raised to {} (epochs only grow)",
                    t.epoch,
                    cur_epoch + 1
                ));
                t.epoch = cur_epoch + 1;
            }
            t.reason = format!("imported: {}", t.reason);
            t.unix_ms = crate::unix_ms(SystemTime::now());
            report.push(format!(
                "{name}: epoch {}, primary {}, fenced {:?}",
                t.epoch,
                t.primary.as_deref().unwrap_or("(none)"),
                t.fenced
            ));
            merged.insert(name, (t, rev));
        }
        match &self.store {
            Store::File(f) => {
                let mut d = f.doc();
                d.version = 1;
                for (name, (t, _)) in merged {
                    d.clusters.insert(name, t);
                }
                f.replace(d)?;
            }
            Store::Etcd(e) => {
                for (name, (t, rev)) in merged {
                    let value = serde_json::to_vec(&t).map_err(|e| e.to_string())?;
                    match e.client.swap(&e.key(&name), rev, &value, None).await? {
                        etcd::Swap::Done(_) => {}
                        etcd::Swap::Lost(_) => {
                            return Err(format!(
                                "{name}: changed in etcd during the import; run it again"
                            ))
                        }
                    }
                }
            }
        }
        Ok(report)
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

/// Asks the promotion policy for a candidate: healthy (degraded only when no candidate
/// is healthy), not fenced, not the primary, not one whose promote hook just failed.
fn choose(
    c: &Cluster,
    view: &HealthView,
    t: &Topology,
    hook_failed: &HashMap<String, Instant>,
) -> Option<usize> {
    let candidates: Vec<PromotionCandidate> = c
        .backends
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            Some(&b.cfg.id) != t.primary.as_ref()
                && !t.fenced.contains(&b.cfg.id)
                && !hook_failed.contains_key(&b.cfg.id)
                && view.backends.get(*i).is_some()
        })
        .map(|(i, b)| PromotionCandidate {
            id: b.cfg.id.clone(),
            priority: b.cfg.priority,
            location: b.cfg.location.clone(),
            weight: b.cfg.weight,
            healthy: view.backends[i].health == Health::Healthy,
            degraded: view.backends[i].health == Health::Degraded,
            lag_ms: view.backends[i].lag_ms,
            last_ok_ms: last_ok_ms(c, i),
        })
        .collect();
    let policy = c.cfg.promotion.as_ref()?;
    let decision = match &policy.policy {
        PromotionPolicyKind::Priority { prefer_location } => {
            native_priority(&candidates, prefer_location.as_deref())
        }
        PromotionPolicyKind::LeastLag { max_lag_ms } => native_least_lag(&candidates, *max_lag_ms),
        PromotionPolicyKind::Plugin { plugin, on_error } => {
            // The primary as the policy should see it: named, with its (bad) health.
            let primary = t.primary.as_ref().and_then(|id| index(c, id)).map(|i| {
                let b = &c.backends[i].cfg;
                PromotionCandidate {
                    id: b.id.clone(),
                    priority: b.priority,
                    location: b.location.clone(),
                    weight: b.weight,
                    healthy: view.backends[i].health == Health::Healthy,
                    degraded: view.backends[i].health == Health::Degraded,
                    lag_ms: view.backends[i].lag_ms,
                    last_ok_ms: last_ok_ms(c, i),
                }
            });
            match plugin.decide(
                primary.as_ref(),
                &candidates,
                crate::unix_ms(SystemTime::now()),
            ) {
                Ok(d) => d,
                Err(e) => match on_error {
                    OnError::FailClosed => {
                        tracing::warn!(cluster = %c.cfg.name, error = %e, "promotion plugin failed; no promotion (on_error = fail-closed)");
                        PromotionDecision::None
                    }
                    _ => native_priority(&candidates, None),
                },
            }
        }
    };
    match decision {
        PromotionDecision::Promote(id) => {
            let chosen = candidates.iter().find(|c| c.id == id)?;
            if !chosen.healthy && !chosen.degraded {
                tracing::warn!(cluster = %c.cfg.name, backend = %id, "the promotion policy chose an unhealthy backend; refused");
                return None;
            }
            if !chosen.healthy && candidates.iter().any(|c| c.healthy) {
                tracing::warn!(cluster = %c.cfg.name, backend = %id, "the promotion policy chose a degraded backend while a candidate is healthy; refused");
                return None;
            }
            index(c, &id)
        }
        PromotionDecision::Keep | PromotionDecision::None => None,
    }
}

/// When backend `i` last passed a check, in Unix milliseconds by that check's wall clock
/// (0: never), as the WIT's `candidate.last-ok-ms` says: the clock of `now-ms` and of the
/// probes' `at-ms`, unchanged by reloads.
fn last_ok_ms(c: &Cluster, i: usize) -> u64 {
    c.health.last_ok_unix_ms(i)
}

/// The instant keyway started (first use).
fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Native `priority-promotion`: the first healthy candidate by priority (config order
/// breaks ties), those at `prefer` first; a degraded one only when none is healthy.
pub fn native_priority(cands: &[PromotionCandidate], prefer: Option<&str>) -> PromotionDecision {
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy || c.degraded)
        .min_by_key(|(i, c)| {
            (
                !c.healthy,
                prefer.is_some_and(|p| c.location != p),
                c.priority,
                *i,
            )
        })
        .map_or(PromotionDecision::None, |(_, c)| {
            PromotionDecision::Promote(c.id.clone())
        })
}

/// Native `least-lag-promotion`: the healthy candidate with the least reported lag
/// (none reported: last; then priority), never one beyond `max_lag_ms`; a degraded one
/// only when none is healthy.
pub fn native_least_lag(
    cands: &[PromotionCandidate],
    max_lag_ms: Option<u64>,
) -> PromotionDecision {
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy || c.degraded)
        .filter(|(_, c)| max_lag_ms.is_none_or(|m| c.lag_ms.is_some_and(|l| l <= m)))
        .min_by_key(|(i, c)| {
            (
                !c.healthy,
                c.lag_ms.is_none(),
                c.lag_ms.unwrap_or(u64::MAX),
                c.priority,
                *i,
            )
        })
        .map_or(PromotionDecision::None, |(_, c)| {
            PromotionDecision::Promote(c.id.clone())
        })
}

// === hooks ===

/// Calls a hook on backend `i`: POST with a JSON body saying what changed. 2xx is
/// success. Logged and counted either way.
async fn call_hook(
    hook: &HookConfig,
    which: &'static str,
    c: &Cluster,
    i: usize,
    epoch: u64,
) -> Result<(), String> {
    let b = &c.backends[i].cfg;
    let url = hook
        .url
        .replace("{address}", &b.address.to_string())
        .replace("{id}", &b.id)
        .replace("{cluster}", &c.cfg.name)
        .replace("{epoch}", &epoch.to_string());
    let body = serde_json::json!({
        "cluster": c.cfg.name,
        "epoch": epoch,
        "event": which,
        "backend": b.id,
        "address": b.address.to_string(),
    });
    let started = Instant::now();
    let result = tokio::time::timeout(hook.timeout, post_json(&url, hook, &body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", hook.timeout)));
    let took = started.elapsed();
    let labels = [
        ("cluster", c.cfg.name.clone()),
        ("hook", which.to_string()),
        (
            "result",
            if result.is_ok() { "ok" } else { "error" }.to_string(),
        ),
    ];
    metrics::counter!("keyway_hook_calls_total", &labels).increment(1);
    metrics::histogram!("keyway_hook_duration_seconds", &labels[..2]).record(took.as_secs_f64());
    match &result {
        Ok(()) => {
            tracing::info!(cluster = %c.cfg.name, hook = which, backend = %b.id, %url, epoch, took_ms = took.as_millis() as u64, "hook succeeded")
        }
        Err(e) => {
            tracing::warn!(cluster = %c.cfg.name, hook = which, backend = %b.id, %url, epoch, took_ms = took.as_millis() as u64, error = %e, "hook failed")
        }
    }
    result
}

/// GETs a small JSON document from a failsafe peer's admin listener (`http://`).
async fn get_json(
    peer: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    use http_body_util::BodyExt;
    let authority = peer
        .strip_prefix("http://")
        .unwrap_or(peer)
        .trim_end_matches('/');
    let host = crate::oneshot::host_of(authority);
    let port: u16 = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| format!("no port in {peer}"))?;
    let target = crate::oneshot::Target {
        connect: (host, port),
        authority,
        tls: None,
    };
    let resp = crate::oneshot::get(target, path, headers).await?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    // An answer is a few hundred bytes; a peer that sends more is refused, not buffered.
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

async fn post_json(url: &str, hook: &HookConfig, body: &serde_json::Value) -> Result<(), String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("no host in {url}"))?
        .clone();
    let tls = uri.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = crate::oneshot::host_of(authority.as_str());
    let target = crate::oneshot::Target {
        connect: (host, port),
        authority: authority.as_str(),
        tls: if tls { hook.tls.as_ref() } else { None },
    };
    if tls && target.tls.is_none() {
        return Err("https hook without TLS settings".into());
    }
    let resp = crate::oneshot::post_json(
        target,
        uri.path_and_query().map_or("/", |p| p.as_str()),
        body.to_string(),
    )
    .await?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(
        id: &str,
        priority: u32,
        loc: &str,
        healthy: bool,
        lag: Option<u64>,
    ) -> PromotionCandidate {
        PromotionCandidate {
            id: id.into(),
            priority,
            location: loc.into(),
            weight: 1,
            healthy,
            degraded: false,
            lag_ms: lag,
            last_ok_ms: 0,
        }
    }

    #[test]
    fn native_policies_choose_as_documented() {
        let c = [
            cand("a", 2, "west", true, Some(5)),
            cand("b", 1, "east", false, Some(0)),
            cand("c", 1, "west", true, None),
            cand("d", 3, "east", true, Some(50)),
        ];
        let p = |id: &str| PromotionDecision::Promote(id.into());
        assert_eq!(native_priority(&c, None), p("c"));
        assert_eq!(native_priority(&c, Some("east")), p("d"));
        assert_eq!(native_least_lag(&c, None), p("a"));
        assert_eq!(native_least_lag(&c, Some(1)), PromotionDecision::None);
        assert_eq!(native_priority(&c[1..2], None), PromotionDecision::None);
    }

    #[test]
    fn the_state_file_is_replaced_atomically_and_a_corrupt_one_refused() {
        let dir = std::env::temp_dir().join(format!("keyway-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.json");
        let _ = std::fs::remove_file(&path);
        let f = FileStore::open(&path, Access::Owner).unwrap();
        let t = Topology {
            epoch: 1,
            primary: Some("b".into()),
            fenced: vec!["a".into()],
            reason: "test".into(),
            unix_ms: 1,
            by: None,
        };
        assert!(matches!(f.commit("c", 0, &t).unwrap(), Commit::Done(1)));
        // A stale writer loses.
        assert!(matches!(
            f.commit("c", 0, &t).unwrap(),
            Commit::Lost(Some(_))
        ));
        // A second owner is refused while the first lives; a reader is not.
        let err = FileStore::open(&path, Access::Owner).err().unwrap();
        assert!(err.contains("another keyway process"), "{err}");
        let again = FileStore::open(&path, Access::Reader).unwrap();
        assert_eq!(again.get("c"), Some(t));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        drop(f);
        drop(FileStore::open(&path, Access::Owner).expect("the lock goes with its owner"));
        std::fs::write(&path, b"{ not json").unwrap();
        let err = FileStore::open(&path, Access::Reader).err().unwrap();
        assert!(
            err.contains("corrupt") && err.contains("keyway state import"),
            "{err}"
        );
        std::fs::write(&path, br#"{"version": 9, "clusters": {}}"#).unwrap();
        assert!(FileStore::open(&path, Access::Reader).is_err());
    }
}
