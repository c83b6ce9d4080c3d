//! keyway's side of the WebAssembly plugins: every wasmtime decision lives in the
//! `keyway-plugin-host` crate, which knows nothing of keyway's configuration or health
//! types. This module re-exports what the rest of keyway uses and converts at the
//! boundary: a [`ClassifierPlugin`] answers a [`crate::classify::Kind`]. The health
//! plugin's conversions live with health (`health::plugin`), the promotion plugin's with
//! the coordinator. It holds no policy and makes no wasmtime decision of its own.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

pub use crate::config::{is_plugin_path, parse_on_error, OnError};
pub use keyway_plugin_host::{
    classifier_instances_on_this_thread, PluginError, PluginMeta, PromotionCandidate,
    PromotionDecision, PromotionPlugin, Traced, CLASSIFY_DEADLINE, MAX_REASON_BYTES, MEMORY_LIMIT,
    OUTPUT_LIMIT, POLICY_DEADLINE, TICK,
};

use keyway_plugin_host as host;

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

    /// Classifies one request with this thread's instance (made on first use), or from
    /// the answers that instance remembers.
    pub fn classify(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Result<crate::classify::Kind, PluginError> {
        self.0.classify(method, path, host).map(from_host_kind)
    }

    /// [`Self::classify`] with a call every time, never an answer remembered.
    pub fn classify_each_time(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> Result<crate::classify::Kind, PluginError> {
        self.0
            .classify_each_time(method, path, host)
            .map(from_host_kind)
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

fn from_host_kind(k: host::Kind) -> crate::classify::Kind {
    match k {
        host::Kind::Read => crate::classify::Kind::Read,
        host::Kind::Write => crate::classify::Kind::Write,
    }
}
