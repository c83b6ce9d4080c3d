//! Which backends one request may use, decided once from one health snapshot: where
//! invariant 1 lives (a write goes to the primary of the current epoch, only while this
//! instance holds its write permit). Never reads the clock or a lock it need not.

use super::*;

// === eligibility ===

/// Request header naming the topology epoch a write was routed in.
pub const EPOCH_HEADER: header::HeaderName = header::HeaderName::from_static("keyway-epoch");

/// Which backends one request may use, decided once from one health snapshot. This is
/// where invariant 1 lives: a write's only eligible backend is the primary, and only
/// when the snapshot says it is healthy; otherwise the write is refused with 503.
pub(super) struct Eligible {
    pub(super) view: Arc<HealthView>,
    pub(super) now: Option<Instant>,
    pub(super) mode: Mode,
    pub(super) max_lag_ms: Option<u64>,
    /// A write is counted in its cluster's gate from before the snapshot was read until
    /// its exchange ends; taken by the exchange that sends it.
    pub(super) ticket: Option<WriteTicket>,
}

pub(super) enum Mode {
    /// balanced/ordered: healthy, non-ejected backends.
    Healthy,
    /// The primary only.
    Primary(usize),
    /// Healthy replicas within max_lag, and the primary if given.
    Reads { primary: Option<usize> },
}

impl Eligible {
    pub(super) fn new(
        cluster: &Cluster,
        kind: Option<Kind>,
        ryw_fresh: bool,
        permit: &Permit,
    ) -> Result<Self, ProxyError> {
        // Counted before the snapshot is read: a drain that applies a new topology and
        // then fences the gate either sees this write or this write sees that topology.
        let ticket = (kind == Some(Kind::Write)).then(|| cluster.gate.enter());
        let view = cluster.health.view_full();
        let now = view.any_ejected().then(Instant::now);
        let max_lag_ms = cluster.cfg.split.max_lag.map(|d| d.as_millis() as u64);
        let n = cluster.backends.len();
        let usable = |i: usize| view.usable(i, now);
        // Without a fresh permit the primary this instance knows is unconfirmed: another
        // instance may have replaced it. Writes are refused and reads avoid it.
        let confirmed = kind.is_none() || permit.holds();
        // A snapshot older than the epoch the gate knows (from a runtime a reload just
        // retired) does not route writes.
        let current = ticket.is_none() || view.epoch == cluster.gate.epoch();
        let primary = view.primary.filter(|_| confirmed && current);
        let mode = match (kind, primary) {
            (None, _) => {
                if !(0..n).any(usable) {
                    let detail = if (0..n).any(|i| view.checked(i)) {
                        "has no healthy backend"
                    } else {
                        "has no backend that passed a health check yet"
                    };
                    return Err(ProxyError::new(
                        ErrorKind::NoBackendAvailable,
                        Side::Upstream,
                        false,
                        format!("cluster `{}` {detail}", cluster.cfg.name),
                    ));
                }
                Mode::Healthy
            }
            (Some(Kind::Write), _) if !confirmed => {
                cluster.count_write_refused();
                return Err(ProxyError::new(
                    ErrorKind::CoordinationLost,
                    Side::Internal,
                    false,
                    format!(
                        "this keyway instance lost contact with etcd (its write lease ran out), so it cannot know which backend of cluster `{}` is primary; writes are refused until it is back, reads go to replicas",
                        cluster.cfg.name
                    ),
                ));
            }
            (Some(Kind::Write), Some(p)) if usable(p) => Mode::Primary(p),
            (Some(Kind::Write), _) => {
                cluster.count_write_refused();
                return Err(ProxyError::new(
                    ErrorKind::NoBackendAvailable,
                    Side::Upstream,
                    false,
                    format!(
                        "cluster `{}` is read-only right now: its primary is not healthy, so writes are refused; reads keep working",
                        cluster.cfg.name
                    ),
                ));
            }
            (Some(Kind::Read), Some(p)) if ryw_fresh && usable(p) => Mode::Primary(p),
            (Some(Kind::Read), primary) => {
                // With max_lag, a replica whose lag is unknown (its check failed or
                // reported none) is as good as too far behind.
                let lag_ok = |i: usize| {
                    max_lag_ms.is_none_or(|max| view.backends[i].lag_ms.is_some_and(|l| l <= max))
                };
                // A drained replica takes no new read sessions: with only drained
                // replicas left, reads fall back as if there were none.
                let replicas = (0..n).any(|i| {
                    view.backends[i].role == Role::Replica
                        && Some(i) != view.primary
                        && usable(i)
                        && lag_ok(i)
                        && !view.drained(i)
                });
                let primary = primary.filter(|&p| {
                    usable(p)
                        && match cluster.cfg.split.reads_on_primary {
                            ReadsOnPrimary::Always => true,
                            ReadsOnPrimary::Fallback => !replicas,
                            ReadsOnPrimary::Never => false,
                        }
                });
                if !replicas && primary.is_none() {
                    return Err(ProxyError::new(
                        ErrorKind::NoBackendAvailable,
                        Side::Upstream,
                        false,
                        format!(
                            "no backend of cluster `{}` can serve reads: no healthy replica within max_lag{}{}",
                            cluster.cfg.name,
                            lag_detail(cluster, &view, max_lag_ms, usable),
                            if !confirmed {
                                " (this instance lost etcd, so it does not read from the primary it last knew)"
                            } else {
                                match cluster.cfg.split.reads_on_primary {
                                    ReadsOnPrimary::Never => " and reads_on_primary = \"never\"",
                                    _ => " and no healthy primary",
                                }
                            }
                        ),
                    ));
                }
                Mode::Reads { primary }
            }
        };
        Ok(Self {
            view,
            now,
            mode,
            max_lag_ms,
            ticket,
        })
    }

    /// Whether the decision still stands after waiting for a connection: a write is
    /// not sent on a snapshot older than the cluster's topology now, nor once this
    /// instance has lost its permit.
    pub(super) fn still_valid(&self, cluster: &Cluster, permit: &Permit) -> bool {
        !matches!(self.mode, Mode::Primary(_))
            || self.ticket.is_none()
            || (permit.holds() && cluster.gate.epoch() == self.view.epoch)
    }

    pub(super) fn allows(&self, i: usize) -> bool {
        match self.mode {
            Mode::Healthy => self.view.usable(i, self.now),
            Mode::Primary(p) => i == p,
            // A drained replica stays allowed here (a pinned session keeps it); fresh
            // picks use `fresh`.
            Mode::Reads { primary } => {
                Some(i) == primary
                    || (Some(i) != primary
                        && self.is_replica(i)
                        && self.view.usable(i, self.now)
                        && self.max_lag_ms.is_none_or(|max| {
                            self.view.backends[i].lag_ms.is_some_and(|l| l <= max)
                        }))
            }
        }
    }

    /// Whether backend `i` may take a new session (a request no affinity pins): allowed
    /// and not drained. A write's primary is never refused for a drain (the primary is
    /// not drained; a race with a drain must not cut writes off).
    pub(super) fn fresh(&self, i: usize) -> bool {
        self.allows(i) && (matches!(self.mode, Mode::Primary(_)) || !self.view.drained(i))
    }

    /// Whether a request pinned to backend `i` by its sticky cookie keeps it: allowed,
    /// and not drained past the drain's deadline.
    pub(super) fn pin_holds(&self, i: usize) -> bool {
        self.allows(i) && self.view.pin_holds(i)
    }

    pub(super) fn is_replica(&self, i: usize) -> bool {
        self.view
            .backends
            .get(i)
            .is_some_and(|b| b.role == Role::Replica)
    }

    /// Whether an eligible backend remains that this request has not tried (a drained
    /// one is not: a retry is a new choice).
    pub(super) fn remaining(&self, cluster: &Cluster, tried: &[usize]) -> bool {
        (0..cluster.backends.len()).any(|i| !tried.contains(&i) && self.fresh(i))
    }
}

/// Whether a healthy (not degraded) backend is `allowed`: then degraded ones, the
/// standbys, get nothing from this request.
pub(super) fn healthy_left(
    cluster: &Cluster,
    view: &HealthView,
    allowed: &dyn Fn(usize) -> bool,
) -> bool {
    (0..cluster.backends.len()).any(|i| allowed(i) && !view.standby(i))
}

/// For the 503 of a read that no replica can serve under `max_lag`: which usable
/// replicas reported no lag or too much.
pub(super) fn lag_detail(
    cluster: &Cluster,
    view: &HealthView,
    max_lag_ms: Option<u64>,
    usable: impl Fn(usize) -> bool,
) -> String {
    let Some(max) = max_lag_ms else {
        return String::new();
    };
    let why: Vec<String> = (0..cluster.backends.len())
        .filter(|&i| view.backends[i].role == Role::Replica && usable(i))
        .filter_map(|i| {
            let id = &cluster.backends[i].cfg.id;
            match view.backends[i].lag_ms {
                None => Some(format!("`{id}` reported no lag")),
                Some(l) if l > max => Some(format!("`{id}` lags {l} ms")),
                Some(_) => None,
            }
        })
        .collect();
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({} ms: {})", max, why.join(", "))
    }
}
