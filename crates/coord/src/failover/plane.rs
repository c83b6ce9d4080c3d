//! The coordinator's whole view of the data plane: the [`DataPlane`] trait and the
//! plain types it reads ([`ClusterView`], [`BackendState`], [`BackendHealth`]).
//!
//! The coordinator reads a cluster's configuration and the health of its backends, and
//! applies a topology with one verb, [`DataPlane::apply`]. It counts writes through the
//! [`WriteGate`] it owns and hands to the data plane, so in-flight writes need nothing
//! here. The data plane implements this trait (for a runtime not yet serving and for
//! the serving one); this module must never name a data-plane type (clusters,
//! runtimes, health records), so the coordinator builds without the data plane.

use super::*;

/// The health of one backend as the coordinator reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendHealth {
    /// Not checked yet: neither a candidate nor a reason to promote.
    Unknown,
    /// Passes its checks.
    Healthy,
    /// A standby: promoted only when no candidate is healthy.
    Degraded,
    /// Fails its checks: a primary in this state is replaced after `hold`.
    Unhealthy,
}

impl BackendHealth {
    /// Lower-case name, as logs, `/status` and refusals spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// One backend of a [`ClusterView`], in configuration order.
#[derive(Clone, Debug)]
pub struct BackendState {
    /// Where the data plane connects to it, resolved when its config was loaded.
    pub address: std::net::SocketAddr,
    /// Health by active checks (always healthy without them).
    pub health: BackendHealth,
    /// Last reported replication lag.
    pub lag_ms: Option<u64>,
    /// When it last passed a check, in Unix milliseconds by that check's wall clock
    /// (0: never): the WIT's `candidate.last-ok-ms`.
    pub last_ok_ms: u64,
    /// Since when its health has been what it is.
    pub since: Option<SystemTime>,
}

/// What the coordinator reads of one serving cluster: a snapshot, never live state.
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// The configuration the cluster serves with.
    pub cfg: Arc<ClusterConfig>,
    /// Per backend, in configuration order.
    pub backends: Vec<BackendState>,
    /// The backend the data plane sends writes to now, if any.
    pub primary: Option<usize>,
    /// Whether the cluster has active health checks.
    pub checked: bool,
}

/// What the coordinator needs from the data plane, and nothing more.
pub trait DataPlane: Send + Sync {
    /// The configuration of every cluster it serves, in order.
    fn clusters(&self) -> Vec<Arc<ClusterConfig>>;

    /// A snapshot of one cluster it serves; `None` when it serves no cluster of that
    /// name.
    fn view(&self, cluster: &str) -> Option<ClusterView>;

    /// Applies `topology` to the cluster named `cluster` (nothing when it serves none):
    /// the primary takes writes, fenced backends take no traffic, and every write
    /// eligible from then on carries the new epoch. Backend ids it does not have are
    /// ignored. Takes effect at once for every request that reads the cluster after.
    fn apply(&self, cluster: &str, topology: &Topology);

    /// Applies a cluster's drains (every drain it has: a backend not named is not
    /// drained): drained backends take no new sessions, pinned ones keep them until
    /// the drain's deadline. Backend ids it does not have are ignored.
    fn apply_drains(&self, cluster: &str, drains: &Drains);
}

/// A backend's index in its cluster's configuration.
pub(super) fn index(cfg: &ClusterConfig, id: &str) -> Option<usize> {
    cfg.backends.iter().position(|b| b.id == id)
}
