//! The stored form of decisions: a cluster's topology (epoch, primary, fenced), the
//! operator's drains, and the state document that holds every cluster's, as the state
//! file and `keyway state` use it. It never stores or applies a decision.

use super::*;

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
    pub(super) fn initial(cfg: &ClusterConfig) -> Self {
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

    pub(super) fn next(
        &self,
        primary: Option<String>,
        fenced: Vec<String>,
        reason: String,
    ) -> Self {
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

// === drains ===

/// An operator's drain of one backend (maintenance mode): no new sessions; sessions
/// pinned to it (sticky cookie, client-IP affinity) keep going until the deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Who asked: the admin caller's identity as the admin API knows it.
    pub by: String,
    /// When (Unix milliseconds).
    pub unix_ms: u64,
    /// After this (Unix milliseconds), pinned sessions are moved too; `None`: they
    /// keep the backend until they end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<u64>,
    /// The instance that took the call (with etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl Drain {
    /// Whether pinned sessions are released (the deadline passed) at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.deadline_unix_ms.is_some_and(|d| now_ms >= d)
    }
}

/// One cluster's drains, by backend id.
pub type Drains = BTreeMap<String, Drain>;

/// The whole state: every cluster's topology and the drains. This is the state file's
/// format and what `keyway state export` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDoc {
    /// Format version (1).
    pub version: u32,
    /// By cluster name.
    pub clusters: BTreeMap<String, Topology>,
    /// Drained backends, by cluster name (any strategy). Absent in files written before
    /// drains existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drains: BTreeMap<String, Drains>,
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
