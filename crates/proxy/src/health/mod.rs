//! Backend health: judging active probe results, passive outlier ejection, and the
//! snapshot the request path reads. The probe tasks themselves live in `probers`, the
//! probe exchange in `upstream`.
//!
//! A backend's state is one function of its probe history — the [`HealthPolicy`] seam
//! (native `rise-fall` and `failed-checks`, or a WebAssembly plugin, `health::plugin`).
//! Passive signals from live traffic (connect failures, 5xx) eject a backend for a
//! backoff that doubles with each repeat; it returns through an active check (or when the
//! ejection ends, if no active checks run). The last usable backend of a role is never
//! ejected: the cluster is then in *panic mode* for that role — it keeps routing there,
//! logs it and exports `keyway_panic_mode`.
//!
//! A `degraded` backend is a *standby*: it stays usable, but the balancers (and `ordered`
//! clusters) give it a request only when no healthy backend is eligible for that request
//! ([`HealthView::standby`]), and promotion picks it only when no candidate is healthy.
//!
//! Writers (probe tasks, the passive path on a threshold) take a mutex and publish a new
//! [`HealthView`] through `ArcSwap`; the request path only loads the view, lock-free.
//! The health policy (possibly a plugin running to its deadline) is never called with
//! that mutex held: it judges a copy of the history. Nothing here routes requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use metrics::{counter, gauge, Counter, Gauge};

use crate::config::{
    BackendConfig, ClusterConfig, HealthConfig, HealthPolicyKind, OutlierConfig, Role, Strategy,
};

mod fault;
mod outcome;
mod plugin;
mod policy;
mod view;

pub use fault::{BodyFacts, Ending, Fault};
pub use plugin::{HealthPlugin, HealthVerdict};
pub use policy::{policy_for, FailedChecks, HealthPolicy, RiseFall};
pub use view::{BackendView, HealthView};

/// A backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not probed yet (`initial = "unknown"`): receives nothing.
    Unknown,
    /// Receives traffic.
    Healthy,
    /// A standby: receives traffic only when no healthy backend is eligible.
    Degraded,
    /// Receives nothing.
    Unhealthy,
}

impl Health {
    /// Lower-case name for logs, metrics and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// One probe result.
#[derive(Clone, Debug)]
pub struct Probe {
    /// When it finished (monotonic: the native policies' windows).
    pub at: Instant,
    /// When it finished, by the wall clock: `/status` and the plugins' `at-ms` (Unix
    /// milliseconds), which therefore survive reloads unchanged.
    pub at_wall: SystemTime,
    /// Whether it passed.
    pub ok: bool,
    /// HTTP status, for HTTP probes that got one.
    pub status: Option<u16>,
    /// How long it took.
    pub latency: Duration,
    /// Why it failed.
    pub error: Option<String>,
    /// Replication lag the backend reported, in milliseconds.
    pub lag_ms: Option<u64>,
}

/// Now, in Unix milliseconds: the clock of the plugins' `now-ms`, `at-ms` and
/// `last-ok-ms`.
pub fn unix_ms_now() -> u64 {
    crate::unix_ms(SystemTime::now())
}

// === ClusterHealth ===

struct Record {
    health: Health,
    /// The latest non-empty reason (a verdict's, an ejection's...) and when it was given.
    reason: String,
    reason_at: SystemTime,
    /// The latest verdict of the health policy, whatever it said.
    verdict: Option<(Health, String, SystemTime)>,
    since: SystemTime,
    history: VecDeque<Probe>,
    lag_ms: Option<u64>,
    ejections: u32,
    ejected_until: Option<Instant>,
    last_ejection: Option<Instant>,
    kept_in_panic: bool,
    role: Role,
    fenced: bool,
    /// Drained by the operator: `Some(deadline)` (Unix ms, if any).
    drain: Option<Option<u64>>,
}

struct BackendMetrics {
    healthy: Gauge,
    degraded: Gauge,
    to_healthy: Counter,
    to_degraded: Counter,
    to_unhealthy: Counter,
    ejections: Counter,
    /// `keyway_backend_primary` and `keyway_backend_fenced`: `primary-replica` only, so
    /// "no backend is primary" never fires for a cluster that has no primary by design.
    role: Option<(Gauge, Gauge)>,
}

/// Health of one cluster's backends.
pub struct ClusterHealth {
    cluster: String,
    ids: Vec<String>,
    epoch: AtomicU64,
    active: Option<HealthConfig>,
    outlier: OutlierConfig,
    policy: Box<dyn HealthPolicy>,
    backend_cfgs: Vec<BackendConfig>,
    view: ArcSwap<HealthView>,
    records: Mutex<Vec<Record>>,
    consecutive: Vec<AtomicU32>,
    metrics: Vec<BackendMetrics>,
    panic_primary: Gauge,
    panic_replica: Gauge,
}

/// Probe results kept per backend (for policies and `/status`).
const HISTORY: usize = 64;

impl ClusterHealth {
    /// Initial health for a cluster: `Healthy` without active checks, else per `initial`.
    /// `plugin` is the compiled health-policy plugin when the policy names one.
    pub fn new(cfg: &ClusterConfig, plugin: Option<&Arc<HealthPlugin>>) -> Self {
        let initial = match &cfg.health {
            None => Health::Healthy,
            Some(h) if h.initially_healthy => Health::Healthy,
            Some(_) => Health::Unknown,
        };
        let records: Vec<Record> = cfg
            .backends
            .iter()
            .map(|b| Record {
                role: b.role,
                fenced: false,
                drain: None,
                health: initial,
                reason: match initial {
                    Health::Unknown => "waiting for the first probe".into(),
                    _ => "initial state".into(),
                },
                reason_at: SystemTime::now(),
                verdict: None,
                since: SystemTime::now(),
                history: VecDeque::with_capacity(HISTORY),
                lag_ms: None,
                ejections: 0,
                ejected_until: None,
                last_ejection: None,
                kept_in_panic: false,
            })
            .collect();
        let metrics = cfg
            .backends
            .iter()
            .map(|b| {
                let l = [("cluster", cfg.name.clone()), ("backend", b.id.clone())];
                let to = |s: &'static str| {
                    let mut v = l.to_vec();
                    v.push(("to", s.to_string()));
                    counter!("keyway_backend_health_transitions_total", &v)
                };
                BackendMetrics {
                    healthy: gauge!("keyway_backend_healthy", &l),
                    degraded: gauge!("keyway_backend_degraded", &l),
                    to_healthy: to("healthy"),
                    to_degraded: to("degraded"),
                    to_unhealthy: to("unhealthy"),
                    ejections: counter!("keyway_backend_ejections_total", &l),
                    role: (cfg.strategy == Strategy::PrimaryReplica).then(|| {
                        (
                            gauge!("keyway_backend_primary", &l),
                            gauge!("keyway_backend_fenced", &l),
                        )
                    }),
                }
            })
            .collect();
        let panic = |role: &'static str| gauge!("keyway_panic_mode", "cluster" => cfg.name.clone(), "role" => role);
        let h = Self {
            cluster: cfg.name.clone(),
            ids: cfg.backends.iter().map(|b| b.id.clone()).collect(),
            epoch: AtomicU64::new(0),
            active: cfg.health.clone(),
            outlier: cfg.outlier,
            policy: cfg
                .health
                .as_ref()
                .map(|h| policy_for(&h.policy, plugin))
                .unwrap_or_else(|| {
                    policy_for(&HealthPolicyKind::RiseFall { rise: 1, fall: 1 }, None)
                }),
            backend_cfgs: cfg.backends.clone(),
            view: ArcSwap::from_pointee(HealthView {
                backends: Vec::new(),
                primary: None,
                epoch: 0,
                epoch_header: http::HeaderValue::from_static("0"),
                ejection_needs_probe: false,
                any_ejected: false,
                any_drained: false,
            }),
            consecutive: cfg.backends.iter().map(|_| AtomicU32::new(0)).collect(),
            metrics,
            panic_primary: panic("primary"),
            panic_replica: panic("replica"),
            records: Mutex::new(records),
        };
        if let Ok(records) = h.records.lock() {
            h.publish(&records);
        }
        h
    }

    /// The current view (lock-free).
    pub fn view(&self) -> arc_swap::Guard<Arc<HealthView>> {
        self.view.load()
    }

    /// The current view as an owned `Arc`, to hold across awaits.
    pub fn view_full(&self) -> Arc<HealthView> {
        self.view.load_full()
    }

    /// Whether evaluating a probe may block (a plugin policy): then probes are recorded
    /// on the blocking pool.
    pub fn policy_may_block(&self) -> bool {
        self.policy.may_block()
    }

    /// Active-check settings, if any.
    pub fn active(&self) -> Option<&HealthConfig> {
        self.active.as_ref()
    }

    fn publish(&self, records: &[Record]) {
        let backends: Vec<BackendView> = records
            .iter()
            .map(|r| BackendView {
                health: r.health,
                ejected_until: r.ejected_until,
                lag_ms: r.lag_ms,
                role: r.role,
                fenced: r.fenced,
                drain: r.drain,
            })
            .collect();
        for (r, m) in records.iter().zip(&self.metrics) {
            m.healthy.set(
                if r.health == Health::Healthy && r.ejected_until.is_none() {
                    1.0
                } else {
                    0.0
                },
            );
            m.degraded.set(if r.health == Health::Degraded {
                1.0
            } else {
                0.0
            });
            if let Some((primary, fenced)) = &m.role {
                primary.set(if r.role == Role::Primary { 1.0 } else { 0.0 });
                fenced.set(if r.fenced { 1.0 } else { 0.0 });
            }
        }
        let panic = |role| records.iter().any(|r| r.role == role && r.kept_in_panic);
        self.panic_primary
            .set(if panic(Role::Primary) { 1.0 } else { 0.0 });
        self.panic_replica
            .set(if panic(Role::Replica) { 1.0 } else { 0.0 });
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.view.store(Arc::new(HealthView {
            any_ejected: backends.iter().any(|b| b.ejected_until.is_some()),
            any_drained: backends.iter().any(|b| b.drain.is_some()),
            primary: backends.iter().position(|b| b.role == Role::Primary),
            epoch,
            epoch_header: http::HeaderValue::from(epoch),
            backends,
            ejection_needs_probe: self.active.is_some(),
        }));
    }

    fn transition(&self, i: usize, r: &mut Record, to: Health, reason: String) {
        let from = r.health;
        r.health = to;
        r.since = SystemTime::now();
        if !reason.is_empty() {
            r.reason = reason;
            r.reason_at = r.since;
        }
        match to {
            Health::Healthy => self.metrics[i].to_healthy.increment(1),
            Health::Degraded => self.metrics[i].to_degraded.increment(1),
            Health::Unhealthy => self.metrics[i].to_unhealthy.increment(1),
            Health::Unknown => {}
        }
        tracing::info!(
            cluster = %self.cluster,
            backend = %self.ids[i],
            from = from.as_str(),
            to = to.as_str(),
            reason = %r.reason,
            "backend health changed"
        );
    }

    /// Applies a topology: `primary` takes writes, `fenced` backends take nothing, every
    /// other backend is a replica. Published at once to the request path.
    pub fn set_topology(&self, epoch: u64, primary: Option<usize>, fenced: &[usize]) {
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        for (i, r) in records.iter_mut().enumerate() {
            r.role = if Some(i) == primary {
                Role::Primary
            } else {
                Role::Replica
            };
            r.fenced = fenced.contains(&i) && Some(i) != primary;
        }
        self.epoch.store(epoch, Ordering::Relaxed);
        self.publish(&records);
    }

    /// Applies the operator's drains: `drains[i]` is `Some(deadline)` for a drained
    /// backend. Published at once to the request path.
    pub fn set_drains(&self, drains: &[Option<Option<u64>>]) {
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        for (i, r) in records.iter_mut().enumerate() {
            r.drain = drains.get(i).copied().flatten();
        }
        self.publish(&records);
    }

    /// When backend `i` last passed an active check (within the kept history), in Unix
    /// milliseconds by that check's wall clock (0: never): the promotion plugins'
    /// `last-ok-ms`, on the same clock as their `now-ms` and the probes' `at-ms`.
    pub fn last_ok_unix_ms(&self, i: usize) -> u64 {
        let Ok(records) = self.records.lock() else {
            return 0;
        };
        records.get(i).map_or(0, |r| {
            r.history
                .iter()
                .rev()
                .find(|p| p.ok)
                .map_or(0, |p| crate::unix_ms(p.at_wall).max(1))
        })
    }

    /// When backend `i` last passed an active check (within the kept history).
    pub fn last_ok(&self, i: usize) -> Option<Instant> {
        self.records
            .lock()
            .ok()?
            .get(i)?
            .history
            .iter()
            .rev()
            .find(|p| p.ok)
            .map(|p| p.at)
    }

    /// Since when backend `i` has had its current health (for failback stability).
    pub fn since(&self, i: usize) -> Option<SystemTime> {
        self.records.lock().ok()?.get(i).map(|r| r.since)
    }

    /// Takes over the state of backends that survive a reload: `pairs` maps this
    /// cluster's backend index to the old cluster's. Their health, history, lag and
    /// ejection carry over, so a reload opens no window where a healthy primary is
    /// "unknown" and writes would be refused.
    pub fn inherit(&self, old: &ClusterHealth, pairs: &[(usize, usize)]) {
        let (Ok(mut new), Ok(old_records)) = (self.records.lock(), old.records.lock()) else {
            return;
        };
        for &(n, o) in pairs {
            if let (Some(dst), Some(src)) = (new.get_mut(n), old_records.get(o)) {
                dst.health = src.health;
                dst.reason.clone_from(&src.reason);
                dst.reason_at = src.reason_at;
                dst.verdict.clone_from(&src.verdict);
                dst.since = src.since;
                dst.history.clone_from(&src.history);
                dst.lag_ms = src.lag_ms;
                dst.ejections = src.ejections;
                dst.ejected_until = src.ejected_until;
                dst.last_ejection = src.last_ejection;
            }
        }
        self.publish(&new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backend_own_failures_are_its_fault() {
        let sent = BodyFacts::NONE;
        let streaming = BodyFacts {
            client_failed: false,
            sent: false,
        };
        let aborted = BodyFacts {
            client_failed: true,
            sent: false,
        };
        let reset = Ending::Broken {
            user: false,
            unsent: false,
        };
        let body_error = Ending::Broken {
            user: true,
            unsent: false,
        };
        let stale = Ending::Broken {
            user: false,
            unsent: true,
        };
        // The backend's failures.
        assert_eq!(Fault::of(reset, sent, true), Fault::Backend);
        assert_eq!(Fault::of(reset, streaming, true), Fault::Backend);
        assert_eq!(Fault::of(Ending::TimedOut, sent, true), Fault::Backend);
        assert_eq!(Fault::of(Ending::Answered(502), sent, true), Fault::Backend);
        assert_eq!(Fault::of(Ending::BodyBroken, sent, true), Fault::Backend);
        // 5xx count only when configured to.
        assert_eq!(Fault::of(Ending::Answered(503), sent, false), Fault::None);
        assert_eq!(Fault::of(Ending::Answered(200), sent, true), Fault::None);
        assert_eq!(Fault::of(Ending::Answered(404), sent, true), Fault::None);
        // The client's: an aborted, truncated or oversized body, whatever hyper reports.
        for ending in [
            reset,
            body_error,
            stale,
            Ending::TimedOut,
            Ending::BodyBroken,
            Ending::Answered(500),
        ] {
            assert_eq!(
                Fault::of(ending, aborted, true),
                Fault::Client,
                "{ending:?}"
            );
        }
        // A connection closed before the request was written: the backend's.
        assert_eq!(Fault::of(stale, sent, true), Fault::Backend);
        // Nobody's: a timeout while the client still streams, a request hyper refused
        // to send.
        assert_eq!(Fault::of(Ending::TimedOut, streaming, true), Fault::None);
        assert_eq!(Fault::of(body_error, streaming, true), Fault::None);
    }

    fn bcfg() -> BackendConfig {
        cluster("").backends.remove(0)
    }

    fn probes(results: &[bool]) -> VecDeque<Probe> {
        let now = Instant::now();
        results
            .iter()
            .map(|&ok| Probe {
                at: now,
                at_wall: SystemTime::now(),
                ok,
                status: Some(if ok { 200 } else { 500 }),
                latency: Duration::from_millis(1),
                error: None,
                lag_ms: None,
            })
            .collect()
    }

    fn cluster(health: &str) -> ClusterConfig {
        let text = format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.c]\n{health}\nbackends = [{{ id = \"a\", address = \"127.0.0.1:1\" }}, {{ id = \"b\", address = \"127.0.0.1:2\" }}]\n"
        );
        crate::Config::from_str_with_base(&text, "t", std::path::Path::new("."))
            .unwrap()
            .clusters
            .remove(0)
    }

    #[test]
    fn initial_state_follows_config() {
        let none = ClusterHealth::new(&cluster(""), None);
        assert!(none.view().usable(0, None), "no active checks: healthy");
        let unknown = ClusterHealth::new(&cluster("health = { path = \"/h\" }"), None);
        assert!(
            !unknown.view().usable(0, None),
            "default initial = unknown routes nothing"
        );
        assert!(!unknown.view().checked(0));
        let trusted = ClusterHealth::new(
            &cluster("health = { path = \"/h\", initial = \"healthy\" }"),
            None,
        );
        assert!(trusted.view().usable(1, None));
    }

    #[test]
    fn passive_ejection_spares_the_last_usable_backend() {
        let h = ClusterHealth::new(
            &cluster("outlier = { consecutive_failures = 2, base_ejection = \"1h\" }"),
            None,
        );
        for _ in 0..2 {
            h.report(0, false);
        }
        assert!(!h.view().usable(0, Some(Instant::now())), "a ejected");
        for _ in 0..5 {
            h.report(1, false);
        }
        assert!(
            h.view().usable(1, Some(Instant::now())),
            "b is the last usable: kept"
        );
        assert_eq!(h.status_json(1)["panic"], true);
        h.report(1, true);
        assert_eq!(
            h.status_json(1)["panic"],
            false,
            "a success ends panic for b"
        );
    }

    #[test]
    fn rise_fall() {
        let p = RiseFall { rise: 2, fall: 3 };
        let now = Instant::now();
        assert_eq!(
            p.evaluate(&bcfg(), Health::Unknown, &probes(&[true]), now)
                .0,
            Health::Healthy
        );
        assert_eq!(
            p.evaluate(
                &bcfg(),
                Health::Healthy,
                &probes(&[true, false, false]),
                now
            )
            .0,
            Health::Healthy
        );
        assert_eq!(
            p.evaluate(
                &bcfg(),
                Health::Healthy,
                &probes(&[false, false, false]),
                now
            )
            .0,
            Health::Unhealthy
        );
        assert_eq!(
            p.evaluate(&bcfg(), Health::Unhealthy, &probes(&[false, true]), now)
                .0,
            Health::Unhealthy
        );
        assert_eq!(
            p.evaluate(
                &bcfg(),
                Health::Unhealthy,
                &probes(&[false, true, true]),
                now
            )
            .0,
            Health::Healthy
        );
    }

    #[test]
    fn failed_checks_counts_within_the_window() {
        let p = FailedChecks {
            failures: 5,
            window: Duration::from_secs(300),
        };
        let now = Instant::now();
        let four = probes(&[false, true, false, false, true, false]);
        assert_eq!(
            p.evaluate(&bcfg(), Health::Healthy, &four, now).0,
            Health::Healthy
        );
        let five = probes(&[false, true, false, false, false, false]);
        let (h, why) = p.evaluate(&bcfg(), Health::Healthy, &five, now);
        assert_eq!(h, Health::Unhealthy);
        assert!(why.contains("5 failed checks"), "{why}");
        // Old failures age out of the window.
        let mut old = probes(&[false, false, false, false, false, true]);
        for p in old.iter_mut().take(5) {
            p.at = now - Duration::from_secs(600);
        }
        assert_eq!(
            p.evaluate(&bcfg(), Health::Unhealthy, &old, now).0,
            Health::Healthy
        );
    }
}
