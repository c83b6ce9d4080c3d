//! The etcd store's side of an instance: its keys (decisions, leader, registrations),
//! what it last heard from etcd (`EtcdStatus`) and whether it leads. It never applies a
//! decision and never extends the write permit (`coordinate` does, on a renewal etcd
//! answered).

use super::*;

/// etcd: shared by several instances.
pub struct EtcdStore {
    pub(crate) client: etcd::Client,
    pub(crate) cfg: EtcdConfig,
    pub(crate) status: Mutex<EtcdStatus>,
}

#[derive(Default)]
pub(crate) struct EtcdStatus {
    pub(crate) connected: bool,
    pub(crate) last_error: Option<String>,
    /// The lease this instance registers and campaigns with.
    pub(crate) lease: Option<i64>,
    pub(crate) leader: Option<String>,
    /// This instance's key is in etcd under its lease.
    pub(crate) registered: bool,
    /// The instances registered at the last read (names), this one included.
    pub(crate) instances: Vec<String>,
    /// The store revision of that read: a decision committed after it may come from an
    /// instance the list does not show yet.
    pub(crate) instances_revision: i64,
    /// The store revision the watch has seen up to (events and progress).
    pub(crate) watch_revision: i64,
    /// The failsafe holds this instance's permit now (etcd unreachable for all).
    pub(crate) failsafe: Option<String>,
    /// The acknowledgements last written to the registration.
    pub(crate) published: BTreeMap<String, u64>,
}

/// What an instance keeps under its lease at `PREFIX/instances/NAME`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub(crate) instance: String,
    /// Per cluster, the epoch this instance applied and drained the older writes of.
    #[serde(default)]
    pub(crate) acks: BTreeMap<String, u64>,
}

impl EtcdStore {
    pub(crate) fn key(&self, cluster: &str) -> String {
        format!("{}/clusters/{cluster}/topology", self.cfg.prefix)
    }

    pub(crate) fn drains_key(&self, cluster: &str) -> String {
        format!("{}/clusters/{cluster}/drains", self.cfg.prefix)
    }

    pub(crate) fn leader_key(&self) -> String {
        format!("{}/leader", self.cfg.prefix)
    }

    pub(crate) fn instances_prefix(&self) -> String {
        format!("{}/instances/", self.cfg.prefix)
    }

    pub(crate) fn instance_key(&self) -> String {
        format!("{}{}", self.instances_prefix(), self.cfg.instance)
    }

    pub(crate) fn note<T>(&self, r: &Result<T, String>) {
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
    pub(crate) fn is_leader(&self) -> bool {
        self.status.lock().is_ok_and(|s| {
            s.connected && s.registered && s.leader.as_deref() == Some(self.cfg.instance.as_str())
        })
    }
}
