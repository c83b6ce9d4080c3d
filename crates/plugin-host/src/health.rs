//! The `health` world: a policy that turns one backend's check history into a state.
//! Its inputs ([`Backend`], [`Probe`], [`Health`]) are this crate's own, shaped like the
//! WIT; the caller converts from its configuration and health records. A reason longer
//! than [`MAX_REASON_BYTES`] is refused as an unusable answer.
//! It never reuses a trapped instance and never lets a plugin failure escape as a panic.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bindings;
use crate::engine::PluginState;
use crate::error::PluginError;
use crate::load::{configured_for_call, load_world};
use crate::meta::{PluginMeta, Traced};
use crate::MAX_REASON_BYTES;

/// A backend's state as a health policy sees and answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Healthy,
    /// Serving, but tried after every healthy backend (a standby).
    Degraded,
    /// Not serving (also what a backend not yet judged is shown as).
    Unhealthy,
}

/// A backend's configured role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes writes.
    Primary,
    /// Serves reads.
    Replica,
}

/// The backend a health policy judges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Backend id.
    pub id: String,
    /// Its current role.
    pub role: Role,
    /// Its priority.
    pub priority: u32,
    /// Its location label.
    pub location: String,
    /// Its `weight`.
    pub weight: u32,
}

/// One check of a backend, oldest first in a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// When it ran, Unix milliseconds (wall clock).
    pub at_ms: u64,
    /// Whether it passed.
    pub ok: bool,
    /// The HTTP status, if the backend answered.
    pub status: Option<u16>,
    /// How long it took, microseconds.
    pub latency_us: u32,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Replication lag the backend reported.
    pub lag_ms: Option<u64>,
}

/// A loaded health-policy plugin.
pub struct HealthPlugin {
    /// Facts for `/status`.
    pub meta: PluginMeta,
    pre: bindings::health::HealthPre<PluginState>,
}

/// A plugin's health verdict: the state and its reason.
pub type HealthVerdict = (Health, String);

impl HealthPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        let (meta, pre) = load_world::<bindings::health::Health>(path, config)?;
        Ok(Arc::new(Self { meta, pre }))
    }

    /// Runs the policy for one backend. `backend` carries its current role; `now_ms` and
    /// every probe's `at_ms` are Unix milliseconds (wall clock), as the WIT says.
    pub fn evaluate(
        &self,
        backend: &Backend,
        current: Health,
        history: &[Probe],
        now_ms: u64,
    ) -> Result<HealthVerdict, PluginError> {
        self.evaluate_traced(backend, current, history, now_ms)
            .result
    }

    /// [`Self::evaluate`], with what the plugin wrote to stdout and stderr.
    pub fn evaluate_traced(
        &self,
        backend: &Backend,
        current: Health,
        history: &[Probe],
        now_ms: u64,
    ) -> Traced<HealthVerdict> {
        use bindings::health::keyway::policy::types as t;
        self.meta.calls.fetch_add(1, Ordering::Relaxed);
        let mut output = String::new();
        let result = (|| {
            let (mut store, inst) =
                configured_for_call::<bindings::health::Health>(&self.pre, &self.meta.config)?;
            let wasm_backend = t::Backend {
                id: backend.id.clone(),
                role: match backend.role {
                    Role::Primary => t::Role::Primary,
                    Role::Replica => t::Role::Replica,
                },
                priority: backend.priority,
                location: backend.location.clone(),
                weight: backend.weight,
            };
            let probes: Vec<t::Probe> = history
                .iter()
                .map(|p| t::Probe {
                    at_ms: p.at_ms,
                    ok: p.ok,
                    status: p.status,
                    latency_us: p.latency_us,
                    error: p.error.clone(),
                    lag_ms: p.lag_ms,
                })
                .collect();
            let called = inst.keyway_policy_health_policy().call_evaluate(
                &mut store,
                &wasm_backend,
                to_wasm(current),
                &probes,
                now_ms,
            );
            output = store.data().out.text();
            let verdict = called.map_err(|e| PluginError::from_call(e, &store))?;
            if verdict.reason.len() > MAX_REASON_BYTES {
                return Err(PluginError::InvalidOutput(format!(
                    "a reason of {} bytes (at most {MAX_REASON_BYTES})",
                    verdict.reason.len()
                )));
            }
            let health = match verdict.health {
                t::Health::Healthy => Health::Healthy,
                t::Health::Degraded => Health::Degraded,
                t::Health::Unhealthy => Health::Unhealthy,
            };
            Ok((health, verdict.reason))
        })();
        let traced = Traced { result, output };
        self.meta.record(&traced);
        traced
    }
}

fn to_wasm(h: Health) -> bindings::health::keyway::policy::types::Health {
    use bindings::health::keyway::policy::types::Health as W;
    match h {
        Health::Healthy => W::Healthy,
        Health::Degraded => W::Degraded,
        Health::Unhealthy => W::Unhealthy,
    }
}
