//! Where decisions are kept: the state file of a single instance (locked, replaced
//! atomically) and etcd for several (compare-and-swap, registrations under a lease).
//! A store never applies a decision; it only makes one durable.

use super::*;

// === stores ===

/// A topology and the store's token for it (its revision), used to compare-and-swap.
#[derive(Clone, Debug)]
pub(super) struct Known {
    pub(super) topology: Topology,
    pub(super) revision: i64,
}

pub(super) enum Commit {
    Done(i64),
    /// Someone else decided first: the store's current value.
    Lost(Option<Known>),
}

/// The state file of a single instance.
pub struct FileStore {
    pub(super) path: PathBuf,
    pub(super) doc: Mutex<StateDoc>,
    /// The lock beside the state file, held while this process may write it
    /// (`Access::Owner` until [`FileStore::release`]).
    pub(super) lock: Mutex<Option<std::fs::File>>,
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
    pub(super) fn get(&self, cluster: &str) -> Option<Topology> {
        self.doc.lock().ok()?.clusters.get(cluster).cloned()
    }

    /// Writes `next` for `cluster` if its epoch is still `expected`.
    pub(super) fn commit(
        &self,
        cluster: &str,
        expected: u64,
        next: &Topology,
    ) -> Result<Commit, String> {
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
    pub(super) fn check_owner(&self) -> Result<(), String> {
        if self.lock.lock().is_ok_and(|l| l.is_some()) {
            Ok(())
        } else {
            Err("this keyway does not hold the state file's lock (it is shutting down, or opened the file to read only)".into())
        }
    }

    /// Every cluster's topology, with its epoch as the compare-and-swap token.
    pub(super) fn stored(&self) -> HashMap<String, (Topology, i64)> {
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

/// Takes `STATE.lock`, the lock of the state file (beside it: the state file itself is
/// replaced on every write, so it cannot carry the lock).
pub(super) fn lock_state(path: &Path) -> Result<std::fs::File, String> {
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
pub(super) fn write_atomically(path: &Path, doc: &StateDoc) -> Result<(), String> {
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
    pub(super) client: etcd::Client,
    pub(super) cfg: EtcdConfig,
    pub(super) status: Mutex<EtcdStatus>,
}

#[derive(Default)]
pub(super) struct EtcdStatus {
    pub(super) connected: bool,
    pub(super) last_error: Option<String>,
    /// The lease this instance registers and campaigns with.
    pub(super) lease: Option<i64>,
    pub(super) leader: Option<String>,
    /// This instance's key is in etcd under its lease.
    pub(super) registered: bool,
    /// The instances registered at the last read (names), this one included.
    pub(super) instances: Vec<String>,
    /// The store revision of that read: a decision committed after it may come from an
    /// instance the list does not show yet.
    pub(super) instances_revision: i64,
    /// The store revision the watch has seen up to (events and progress).
    pub(super) watch_revision: i64,
    /// The failsafe holds this instance's permit now (etcd unreachable for all).
    pub(super) failsafe: Option<String>,
    /// The acknowledgements last written to the registration.
    pub(super) published: BTreeMap<String, u64>,
}

/// What an instance keeps under its lease at `PREFIX/instances/NAME`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Registration {
    pub(super) instance: String,
    /// Per cluster, the epoch this instance applied and drained the older writes of.
    #[serde(default)]
    pub(super) acks: BTreeMap<String, u64>,
}

impl EtcdStore {
    pub(super) fn key(&self, cluster: &str) -> String {
        format!("{}/clusters/{cluster}/topology", self.cfg.prefix)
    }

    pub(super) fn leader_key(&self) -> String {
        format!("{}/leader", self.cfg.prefix)
    }

    pub(super) fn instances_prefix(&self) -> String {
        format!("{}/instances/", self.cfg.prefix)
    }

    pub(super) fn instance_key(&self) -> String {
        format!("{}{}", self.instances_prefix(), self.cfg.instance)
    }

    pub(super) fn note<T>(&self, r: &Result<T, String>) {
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
    pub(super) fn is_leader(&self) -> bool {
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
    /// `etcd` is what the loader made of `[coordination]` (`super::load`).
    pub fn open(
        cfg: &StateConfig,
        etcd: Option<&super::load::EtcdParts>,
        access: Access,
    ) -> Result<Self, String> {
        Ok(match cfg {
            StateConfig::File(path) => Store::File(Arc::new(FileStore::open(path, access)?)),
            StateConfig::Etcd(e) => Store::Etcd(Box::new(EtcdStore {
                client: etcd::Client::new(
                    etcd.map(|p| p.endpoints.clone()).unwrap_or_default(),
                    etcd.and_then(|p| p.tls.clone()),
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

    pub(super) async fn commit(
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
    pub(super) fn may_decide(&self) -> bool {
        match self {
            Store::File(_) => true,
            Store::Etcd(e) => e.is_leader(),
        }
    }

    pub(super) fn is_etcd(&self) -> bool {
        matches!(self, Store::Etcd(_))
    }

    pub(super) fn status_json(&self) -> serde_json::Value {
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

#[cfg(test)]
mod tests {
    use super::*;

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
