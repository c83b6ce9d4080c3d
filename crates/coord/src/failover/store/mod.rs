//! Where decisions are kept: the state file of a single instance (locked, replaced
//! atomically) and etcd for several (compare-and-swap, registrations under a lease).
//! A store never applies a decision; it only makes one durable.

use super::*;

mod etcd_store;
mod state_file;

pub use etcd_store::EtcdStore;
pub(crate) use etcd_store::{EtcdStatus, Registration};
pub use state_file::{Access, FileStore};

// === stores ===

/// A topology and the store's token for it (its revision), used to compare-and-swap.
#[derive(Clone, Debug)]
pub(crate) struct Known {
    pub(crate) topology: Topology,
    pub(crate) revision: i64,
}

/// The outcome of writing a cluster's drains.
pub(crate) enum DrainCommit {
    Done(i64),
    /// Another instance changed them first: the store's drains and revision.
    Lost((Drains, i64)),
}

/// A cluster's drains as etcd holds them; an unreadable value is logged and skipped.
pub(crate) fn parse_drains(kv: &etcd::Kv) -> Option<Drains> {
    serde_json::from_slice::<Drains>(&kv.value)
        .map_err(|err| tracing::error!(key = %kv.key, error = %err, "unreadable drains in etcd; ignoring them"))
        .ok()
}

pub(crate) enum Commit {
    Done(i64),
    /// Someone else decided first: the store's current value.
    Lost(Option<Known>),
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

    /// Reads every cluster's drains, with the store's token for each (etcd: the key's
    /// revision; the state file: 0, its writes are serialized by the manager).
    pub async fn load_drains(&self) -> Result<HashMap<String, (Drains, i64)>, String> {
        match self {
            Store::File(f) => Ok(f
                .doc()
                .drains
                .into_iter()
                .map(|(k, d)| (k, (d, 0)))
                .collect()),
            Store::Etcd(e) => {
                let prefix = format!("{}/clusters/", e.cfg.prefix);
                let r = e.client.get_prefix(&prefix).await;
                e.note(&r);
                let (kvs, _) = r?;
                Ok(kvs
                    .into_iter()
                    .filter_map(|kv| {
                        let name = kv.key.strip_prefix(&prefix)?.strip_suffix("/drains")?;
                        let d = parse_drains(&kv)?;
                        Some((name.to_string(), (d, kv.mod_revision)))
                    })
                    .collect())
            }
        }
    }

    /// Writes `cluster`'s drains if the store still holds what `revision` names (etcd);
    /// the state file is written at once, atomically.
    pub(super) async fn commit_drains(
        &self,
        cluster: &str,
        revision: i64,
        drains: &Drains,
    ) -> Result<DrainCommit, String> {
        match self {
            Store::File(f) => {
                let (f, cluster, drains) = (f.clone(), cluster.to_string(), drains.clone());
                tokio::task::spawn_blocking(move || f.commit_drains(&cluster, &drains))
                    .await
                    .map_err(|e| format!("state write task failed: {e}"))??;
                Ok(DrainCommit::Done(0))
            }
            Store::Etcd(e) => {
                let value = serde_json::to_vec(drains).map_err(|e| e.to_string())?;
                let r = e
                    .client
                    .swap(&e.drains_key(cluster), revision, &value, None)
                    .await;
                e.note(&r);
                Ok(match r? {
                    etcd::Swap::Done(rev) => DrainCommit::Done(rev),
                    etcd::Swap::Lost(kv) => DrainCommit::Lost(kv.map_or_else(
                        || (Drains::new(), 0),
                        |kv| (parse_drains(&kv).unwrap_or_default(), kv.mod_revision),
                    )),
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
