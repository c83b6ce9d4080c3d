//! Configuration: read a TOML file, validate it as a whole, produce an immutable [`Config`].
//!
//! Three steps, as in the proxies we learn from: `file` (serde structs, the file's shape),
//! `build` (every field checked, and fields against each other, with every error collected)
//! and the types below (validated, typed, ready for the engine). The engine only ever sees
//! a [`Config`]; it never parses text. A config that fails any check produces
//! [`ConfigErrors`], which lists every problem with its file, line and a fix.
//!
//! This module must never bind sockets or touch live state, so a reload can build the
//! next config while the current one keeps serving. Building one is not pure, though: it
//! reads the files a config names (certificates, tokens, plugins), resolves backend host
//! names and compiles plugins.

mod build;
mod file;
mod locate;

mod cluster;
mod defaults;
mod listen;
mod state;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

pub use build::parse_duration;
pub use cluster::*;
pub use defaults::*;
pub use listen::*;
pub use state::*;

// === the validated config ===

/// A complete, validated keyway configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The admin listener (`/metrics`, `/status`, `/healthz`), if any.
    pub admin: Option<AdminConfig>,
    /// Process-wide settings.
    pub proxy: ProxySettings,
    /// Where keyway accepts client traffic.
    pub listeners: Vec<ListenerConfig>,
    /// Where keyway accepts TCP connections it carries unparsed (`[[tcp_listener]]`).
    pub tcp_listeners: Vec<TcpListenerConfig>,
    /// Host + path prefix → cluster, in file order (first match wins within equal specificity).
    pub routes: Vec<RouteConfig>,
    /// Clusters by name.
    pub clusters: Vec<ClusterConfig>,
    /// Where promotion decisions (epoch, primary, fenced backends) are kept.
    pub state: StateConfig,
}

// === errors ===

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Where in the document, e.g. `cluster.vault.backends[1].address`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

/// Every problem found in one config file.
#[derive(Clone, Debug)]
pub struct ConfigErrors {
    /// The file, as given.
    pub file: String,
    /// All problems, in document order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "{}: {n} error{} in configuration",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            match e.line {
                Some(line) => write!(f, "  {}:{line}: ", self.file)?,
                None => write!(f, "  {}: ", self.file)?,
            }
            if !e.path.is_empty() {
                write!(f, "{}: ", e.path)?;
            }
            writeln!(f, "{}", e.message)?;
            if !e.fix.is_empty() {
                writeln!(f, "      fix: {}", e.fix)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ClusterConfig {
    /// The plugins this cluster uses, each with its kind (`classifier`, `health`,
    /// `promotion`).
    pub fn plugins(&self) -> Vec<(&'static str, &crate::plugin::PluginMeta)> {
        let mut out = Vec::new();
        if let Some(h) = &self.split.classifier {
            out.push(("classifier", &h.plugin.meta));
        }
        if let Some(HealthConfig {
            policy: HealthPolicyKind::Plugin { plugin, .. },
            ..
        }) = &self.health
        {
            out.push(("health", &plugin.meta));
        }
        if let Some(PromotionConfig {
            policy: PromotionPolicyKind::Plugin { plugin, .. },
            ..
        }) = &self.promotion
        {
            out.push(("promotion", &plugin.meta));
        }
        out
    }
}

impl Config {
    /// Read, parse and validate a config file. Relative paths inside it (certificates,
    /// CA files) are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.display().to_string(),
            errors: vec![ConfigError {
                line: None,
                path: String::new(),
                message: format!("cannot read the file: {e}"),
                fix: "check the path given to --config and that keyway may read it".into(),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_str_with_base(&text, &path.display().to_string(), base)
    }

    /// Parse and validate config text. `name` labels errors; relative paths resolve
    /// against `base`.
    pub fn from_str_with_base(text: &str, name: &str, base: &Path) -> Result<Config, ConfigErrors> {
        build::build(text, base).map_err(|errors| ConfigErrors {
            file: name.to_string(),
            errors,
        })
    }

    /// Look up a cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// Parses a host pattern the way route and certificate `host` keys are parsed.
#[doc(hidden)]
pub fn host_pattern_for_tests(text: &str) -> HostPattern {
    build::host_pattern(text).unwrap_or(HostPattern::Any)
}
