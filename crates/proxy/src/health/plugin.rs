//! keyway's side of a health-policy plugin: a [`HealthPlugin`] judges a
//! [`BackendConfig`] and keyway's probe history, converted at the boundary into the
//! `keyway-plugin-host` types. It makes no wasmtime decision of its own and holds no
//! state beyond the compiled plugin.

use std::collections::VecDeque;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use keyway_plugin_host as host;
use keyway_plugin_host::{PluginError, Traced};

use super::{Health, Probe};
use crate::config::{BackendConfig, Role};

/// A plugin's health verdict, in keyway's terms.
pub type HealthVerdict = (Health, String);

/// A loaded health-policy plugin, judging keyway's backends and probe histories.
pub struct HealthPlugin(Arc<host::HealthPlugin>);

impl std::fmt::Debug for HealthPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Deref for HealthPlugin {
    type Target = host::HealthPlugin;
    fn deref(&self) -> &host::HealthPlugin {
        &self.0
    }
}

impl HealthPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        host::HealthPlugin::load(path, config).map(|p| Arc::new(Self(p)))
    }

    /// Runs the policy for one backend. `backend` carries its current role; `now_ms` and
    /// every probe's `at-ms` are Unix milliseconds (wall clock), as the WIT says.
    pub fn evaluate(
        &self,
        backend: &BackendConfig,
        current: Health,
        history: &VecDeque<Probe>,
        now_ms: u64,
    ) -> Result<HealthVerdict, PluginError> {
        self.evaluate_traced(backend, current, history, now_ms)
            .result
    }

    /// [`Self::evaluate`], with what the plugin wrote to stdout and stderr.
    pub fn evaluate_traced(
        &self,
        backend: &BackendConfig,
        current: Health,
        history: &VecDeque<Probe>,
        now_ms: u64,
    ) -> Traced<HealthVerdict> {
        let probes: Vec<host::Probe> = history.iter().map(host_probe).collect();
        let t = self.0.evaluate_traced(
            &host_backend(backend),
            host_health(current),
            &probes,
            now_ms,
        );
        Traced {
            result: t.result.map(|(h, why)| (from_host_health(h), why)),
            output: t.output,
        }
    }
}

/// The host's view of a configured backend.
fn host_backend(b: &BackendConfig) -> host::Backend {
    host::Backend {
        id: b.id.clone(),
        role: match b.role {
            Role::Primary => host::Role::Primary,
            Role::Replica => host::Role::Replica,
        },
        priority: b.priority,
        location: b.location.clone(),
        weight: b.weight,
    }
}

/// The host's view of one check (wall-clock time, latency in whole microseconds).
fn host_probe(p: &Probe) -> host::Probe {
    host::Probe {
        at_ms: crate::unix_ms(p.at_wall),
        ok: p.ok,
        status: p.status,
        latency_us: p.latency.as_micros().min(u128::from(u32::MAX)) as u32,
        error: p.error.clone(),
        lag_ms: p.lag_ms,
    }
}

/// A policy sees a backend not yet judged as unhealthy.
fn host_health(h: Health) -> host::Health {
    match h {
        Health::Healthy => host::Health::Healthy,
        Health::Degraded => host::Health::Degraded,
        Health::Unknown | Health::Unhealthy => host::Health::Unhealthy,
    }
}

fn from_host_health(h: host::Health) -> Health {
    match h {
        host::Health::Healthy => Health::Healthy,
        host::Health::Degraded => Health::Degraded,
        host::Health::Unhealthy => Health::Unhealthy,
    }
}
