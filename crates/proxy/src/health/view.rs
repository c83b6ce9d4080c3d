//! The view the request path reads: one cluster's health, topology and drains, published
//! as a whole so a request never sees health from one moment and topology from another;
//! and a backend's health as `/status` shows it.

use super::*;

// === the published view ===

/// What the request path knows about one backend.
#[derive(Clone, Debug)]
pub struct BackendView {
    /// Health by active checks (always `Healthy` without them).
    pub health: Health,
    /// Passively ejected until then.
    pub ejected_until: Option<Instant>,
    /// Last reported replication lag.
    pub lag_ms: Option<u64>,
    /// The backend's role now (promotions change it).
    pub role: Role,
    /// A demoted primary: no traffic until an explicit failback or promotion.
    pub fenced: bool,
    /// Drained by the operator (no new sessions): `Some(deadline)`, the deadline in
    /// Unix milliseconds after which pinned sessions move too.
    pub drain: Option<Option<u64>>,
}

/// One cluster's health, as published.
#[derive(Clone, Debug)]
pub struct HealthView {
    /// Per backend, in config order.
    pub backends: Vec<BackendView>,
    /// The backend that takes writes (`primary-replica`), if any: none while a
    /// switchover drains or after a promotion found no candidate.
    pub primary: Option<usize>,
    /// The topology epoch this view belongs to (0 for clusters without one).
    pub epoch: u64,
    /// `epoch` formatted once as the `keyway-epoch` header value, so forwarding a
    /// write does not format (and allocate) it again.
    pub epoch_header: http::HeaderValue,
    /// Whether an expired ejection ends by itself (no active checks) or needs a probe.
    pub(super) ejection_needs_probe: bool,
    pub(super) any_ejected: bool,
    pub(super) any_drained: bool,
}

impl HealthView {
    /// Whether backend `i` may receive traffic now. `now` is needed only when
    /// [`Self::any_ejected`]; without it an ejected backend counts as still ejected.
    pub fn usable(&self, i: usize, now: Option<Instant>) -> bool {
        let Some(b) = self.backends.get(i) else {
            return false;
        };
        if !matches!(b.health, Health::Healthy | Health::Degraded) || b.fenced {
            return false;
        }
        match (b.ejected_until, now) {
            (None, _) => true,
            (Some(_), _) if self.ejection_needs_probe => false,
            (Some(until), Some(now)) => now >= until,
            (Some(_), None) => false,
        }
    }

    /// Whether backend `i` is drained: it takes no new sessions.
    pub fn drained(&self, i: usize) -> bool {
        self.any_drained && self.backends.get(i).is_some_and(|b| b.drain.is_some())
    }

    /// Whether a session pinned to backend `i` (sticky cookie, client-IP affinity)
    /// stays on it: it is not drained, or its drain's deadline has not passed.
    pub fn pin_holds(&self, i: usize) -> bool {
        if !self.any_drained {
            return true;
        }
        match self.backends.get(i).and_then(|b| b.drain) {
            Some(Some(deadline)) => crate::unix_ms(std::time::SystemTime::now()) < deadline,
            _ => true,
        }
    }

    /// Whether any backend is drained.
    pub fn any_drained(&self) -> bool {
        self.any_drained
    }

    /// Whether backend `i` is degraded: a standby, to be given a request only when no
    /// healthy backend is eligible for it.
    pub fn standby(&self, i: usize) -> bool {
        self.backends
            .get(i)
            .is_some_and(|b| b.health == Health::Degraded)
    }

    /// Whether backend `i` has a state from a probe or from trust (not `Unknown`).
    pub fn checked(&self, i: usize) -> bool {
        self.backends
            .get(i)
            .is_some_and(|b| b.health != Health::Unknown)
    }

    /// Whether any backend is ejected (the request path then reads the clock).
    pub fn any_ejected(&self) -> bool {
        self.any_ejected
    }
}

impl super::ClusterHealth {
    /// `/status` details for backend `i`.
    pub fn status_json(&self, i: usize) -> serde_json::Value {
        let Ok(records) = self.records.lock() else {
            return serde_json::Value::Null;
        };
        let Some(r) = records.get(i) else {
            return serde_json::Value::Null;
        };
        let now = Instant::now();
        let ms = crate::unix_ms;
        let checks: Vec<_> = r
            .history
            .iter()
            .rev()
            .take(5)
            .map(|p| {
                serde_json::json!({
                    "at_unix_ms": ms(p.at_wall),
                    "ok": p.ok,
                    "status": p.status,
                    "latency_us": p.latency.as_micros() as u64,
                    "error": p.error,
                    "lag_ms": p.lag_ms,
                })
            })
            .collect();
        serde_json::json!({
            "health": r.health.as_str(),
            "reason": r.reason,
            "reason_at_unix_ms": ms(r.reason_at),
            "verdict": r.verdict.as_ref().map(|(h, why, at)| serde_json::json!({
                "health": h.as_str(),
                "reason": why,
                "at_unix_ms": ms(*at),
            })),
            "since_unix_ms": ms(r.since),
            "ejected_for_ms": r.ejected_until.map(|u| u.saturating_duration_since(now).as_millis() as u64),
            "ejections": r.ejections,
            "panic": r.kept_in_panic,
            "fenced": r.fenced,
            "lag_ms": r.lag_ms,
            "last_checks": checks,
        })
    }
}
