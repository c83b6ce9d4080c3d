//! keyway's side of the WebAssembly plugins: every wasmtime decision lives in the
//! `keyway-plugin-host` crate, which knows nothing of keyway's configuration or health
//! types. This module re-exports what the rest of keyway uses and converts at the
//! boundary: a [`HealthPlugin`] takes a [`BackendConfig`] and keyway's probe history, a
//! [`ClassifierPlugin`] answers a [`crate::classify::Kind`]. It holds no policy and makes
//! no wasmtime decision of its own.

use std::collections::VecDeque;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

pub use crate::config::{is_plugin_path, parse_on_error, OnError};
pub use keyway_plugin_host::{
    classifier_instances_on_this_thread, PluginError, PluginMeta, PromotionCandidate,
    PromotionDecision, PromotionPlugin, Traced, CLASSIFY_DEADLINE, MAX_REASON_BYTES, MEMORY_LIMIT,
    OUTPUT_LIMIT, POLICY_DEADLINE, TICK,
};

use crate::config::{BackendConfig, Role};
use crate::health::{Health, Probe};
use keyway_plugin_host as host;

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

/// A loaded request-classifier plugin, answering keyway's [`crate::classify::Kind`].
pub struct ClassifierPlugin(Arc<host::ClassifierPlugin>);

impl std::fmt::Debug for ClassifierPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Deref for ClassifierPlugin {
    type Target = host::ClassifierPlugin;
    fn deref(&self) -> &host::ClassifierPlugin {
        &self.0
    }
}

impl ClassifierPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        host::ClassifierPlugin::load(path, config).map(|p| Arc::new(Self(p)))
    }

    /// Classifies one request with this thread's instance (made on first use).
    pub fn classify(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Result<crate::classify::Kind, PluginError> {
        self.0.classify(method, path, host).map(from_host_kind)
    }

    /// [`Self::classify`], with what the plugin wrote to stdout and stderr.
    pub fn classify_traced(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Traced<crate::classify::Kind> {
        let t = self.0.classify_traced(method, path, host);
        Traced {
            result: t.result.map(from_host_kind),
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

fn from_host_kind(k: host::Kind) -> crate::classify::Kind {
    match k {
        host::Kind::Read => crate::classify::Kind::Read,
        host::Kind::Write => crate::classify::Kind::Write,
    }
}
