//! Health policies: the native `rise-fall` and `failed-checks`, and the adapter that
//! asks a WebAssembly health plugin. A policy judges a copy of the history; it never
//! holds a lock the request path takes.

use super::*;

/// Turns probe history into a state. Must be cheap and must not panic.
pub trait HealthPolicy: Send + Sync {
    /// The new state and a reason, given the current state and the history (oldest first;
    /// the last element is the probe that just finished).
    fn evaluate(
        &self,
        backend: &BackendConfig,
        current: Health,
        history: &VecDeque<Probe>,
        now: Instant,
    ) -> (Health, String);

    /// Whether a call may take long (a plugin): then it runs off the async workers.
    fn may_block(&self) -> bool {
        false
    }
}

/// HAProxy's rise/fall.
pub struct RiseFall {
    /// Passes in a row to become healthy.
    pub rise: u32,
    /// Failures in a row to become unhealthy.
    pub fall: u32,
}

impl HealthPolicy for RiseFall {
    fn evaluate(
        &self,
        _backend: &BackendConfig,
        current: Health,
        history: &VecDeque<Probe>,
        _now: Instant,
    ) -> (Health, String) {
        let Some(last) = history.back() else {
            return (current, "no probe yet".into());
        };
        let streak = history.iter().rev().take_while(|p| p.ok == last.ok).count() as u32;
        match (current, last.ok) {
            // The first probe decides an unknown backend either way.
            (Health::Unknown, true) => (Health::Healthy, "first probe passed".into()),
            (Health::Unknown, false) => (
                Health::Unhealthy,
                format!("first probe failed: {}", why(last)),
            ),
            (Health::Healthy, false) if streak >= self.fall => (
                Health::Unhealthy,
                format!(
                    "{streak} probes failed in a row (fall = {}): {}",
                    self.fall,
                    why(last)
                ),
            ),
            (Health::Unhealthy, true) if streak >= self.rise => (
                Health::Healthy,
                format!("{streak} probes passed in a row (rise = {})", self.rise),
            ),
            (state, _) => (state, String::new()),
        }
    }
}

/// CyberArk PADR's "N failed checks": unhealthy once `failures` probes failed within
/// `window`; healthy again when the last probe passed and fewer than `failures` failures
/// remain in the window.
pub struct FailedChecks {
    /// Failures that count.
    pub failures: u32,
    /// Window they must fall in.
    pub window: Duration,
}

impl HealthPolicy for FailedChecks {
    fn evaluate(
        &self,
        _backend: &BackendConfig,
        current: Health,
        history: &VecDeque<Probe>,
        now: Instant,
    ) -> (Health, String) {
        let Some(last) = history.back() else {
            return (current, "no probe yet".into());
        };
        let failed = history
            .iter()
            .filter(|p| !p.ok && now.duration_since(p.at) <= self.window)
            .count() as u32;
        if failed >= self.failures {
            (
                Health::Unhealthy,
                format!(
                    "{failed} failed checks within {} (limit {}): {}",
                    humantime::format_duration(self.window),
                    self.failures,
                    why(last)
                ),
            )
        } else if last.ok {
            (
                Health::Healthy,
                format!("{failed} failed checks within the window"),
            )
        } else if current == Health::Unknown {
            (
                Health::Unhealthy,
                format!("first probe failed: {}", why(last)),
            )
        } else {
            (current, String::new())
        }
    }
}

pub(super) fn why(p: &Probe) -> String {
    match (&p.error, p.status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("status {s}"),
        (None, None) => "failed".into(),
    }
}

/// The policy a config names: a native built-in or a plugin (compiled by the loader)
/// behind its `on_error` rule; without the compiled plugin, its rise-fall fallback.
pub fn policy_for(
    kind: &HealthPolicyKind,
    plugin: Option<&Arc<super::HealthPlugin>>,
) -> Box<dyn HealthPolicy> {
    match kind {
        HealthPolicyKind::RiseFall { rise, fall } => Box::new(RiseFall {
            rise: *rise,
            fall: *fall,
        }),
        HealthPolicyKind::FailedChecks { failures, window } => Box::new(FailedChecks {
            failures: *failures,
            window: *window,
        }),
        HealthPolicyKind::Plugin {
            on_error,
            rise,
            fall,
            ..
        } => {
            let fallback = RiseFall {
                rise: *rise,
                fall: *fall,
            };
            match plugin {
                Some(plugin) => Box::new(PluginPolicy {
                    plugin: plugin.clone(),
                    on_error: *on_error,
                    fallback,
                }),
                None => Box::new(fallback),
            }
        }
    }
}

/// A WebAssembly health policy; a failed call is answered by `on_error`.
pub(super) struct PluginPolicy {
    pub(super) plugin: Arc<super::HealthPlugin>,
    pub(super) on_error: crate::config::OnError,
    pub(super) fallback: RiseFall,
}

impl HealthPolicy for PluginPolicy {
    fn evaluate(
        &self,
        b: &BackendConfig,
        current: Health,
        history: &VecDeque<Probe>,
        now: Instant,
    ) -> (Health, String) {
        use crate::config::OnError;
        let name = &self.plugin.meta.name;
        let now_ms = crate::unix_ms(SystemTime::now());
        match self.plugin.evaluate(b, current, history, now_ms) {
            Ok(v) => v,
            Err(e) => match self.on_error {
                OnError::Fallback => {
                    let (h, why) = self.fallback.evaluate(b, current, history, now);
                    (h, format!("plugin {name} {e}; built-in rise-fall: {why}"))
                }
                OnError::FailClosed => (
                    Health::Unhealthy,
                    format!("plugin {name} {e} (on_error = fail-closed)"),
                ),
                OnError::FailOpen => (
                    Health::Healthy,
                    format!("plugin {name} {e} (on_error = fail-open)"),
                ),
            },
        }
    }

    fn may_block(&self) -> bool {
        true
    }
}
