//! keyway's configuration: read a TOML file, validate it as a whole, produce an
//! immutable [`Config`].
//!
//! Three steps, as in the proxies we learn from: `file` (serde structs, the file's shape),
//! `build` (every field checked, and fields against each other, with every error collected)
//! and the validated types (`cluster`, `listen`, `state`, `values`, `defaults`, all
//! re-exported here, typed and ready for the engine). The engine only ever sees
//! a [`Config`]; it never parses text. A config that fails any check produces
//! [`ConfigErrors`], which lists every problem with its file, line and a fix.
//!
//! Building a config is pure: it reads the TOML text and the small files a config names
//! (admin token, cookie secret, the upstream CA as PEM; `/etc/hostname` for a default
//! `[coordination] instance` name) and checks that certificate, key
//! and plugin files exist, but it never resolves a host name, never builds a TLS object,
//! never compiles a plugin and never binds a socket. Addresses stay as written
//! ([`Address`]), certificates and keys as paths, plugins as [`PluginRef`]s. The loaders
//! turn a config into running parts: `keyway_proxy::load` (listener certificates, backend
//! addresses, health and classifier plugins) and `keyway_coord::failover::load` (the promotion
//! plugin, etcd endpoints and TLS, hook TLS). They report their problems as
//! [`ConfigError`]s at the config's lines ([`Config::error_at`]), so an operator gets
//! every problem of a file at once, whichever step found it.

#![deny(missing_docs)]

mod build;
mod file;
mod locate;
pub mod pem;

mod cluster;
mod defaults;
mod listen;
mod state;
mod values;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

pub use build::parse_duration;
pub use cluster::*;
pub use defaults::*;
pub use listen::*;
pub use locate::{KeyPath, Seg};
pub use state::*;
pub use values::*;

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
    /// The text it was built from, so later steps can name the line of a key.
    source: Source,
    /// Where each kept item was written (items with problems are left out).
    origins: Origins,
}

/// For each listener, TCP listener and cluster kept (in order): its index in the file
/// and the file indices of its certificates or backends kept.
#[derive(Clone, Debug, Default)]
struct Origins {
    listeners: Vec<(usize, Vec<usize>)>,
    tcp_listeners: Vec<(usize, Vec<usize>)>,
    backends: Vec<Vec<usize>>,
    /// Per etcd endpoint kept: its index in `etcd` and the text as written.
    etcd: Vec<(usize, String)>,
}

/// The config text, shared by clones (not printed by `Debug`).
#[derive(Clone, Default)]
struct Source(Arc<str>);

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({} bytes)", self.0.len())
    }
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
    /// The plugins this cluster names, each with its kind (`classifier`, `health`,
    /// `promotion`).
    pub fn plugins(&self) -> Vec<(&'static str, &PluginRef)> {
        let mut out = Vec::new();
        if let Some(h) = &self.split.classifier {
            out.push(("classifier", &h.plugin));
        }
        if let Some(HealthConfig {
            policy: HealthPolicyKind::Plugin { plugin, .. },
            ..
        }) = &self.health
        {
            out.push(("health", plugin));
        }
        if let Some(PromotionConfig {
            policy: PromotionPolicyKind::Plugin { plugin, .. },
            ..
        }) = &self.promotion
        {
            out.push(("promotion", plugin));
        }
        out
    }
}

impl Config {
    /// Read, parse and validate a config file. Relative paths inside it (certificates,
    /// CA files) are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = Self::read_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_str_with_base(&text, &path.display().to_string(), base)
    }

    /// The text of a config file, or the one problem that it cannot be read.
    pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
        std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.display().to_string(),
            errors: vec![ConfigError {
                line: None,
                path: String::new(),
                message: format!("cannot read the file: {e}"),
                fix: "check the path given to --config and that keyway may read it".into(),
            }],
        })
    }

    /// Parse and validate config text. `name` labels errors; relative paths resolve
    /// against `base`.
    pub fn from_str_with_base(text: &str, name: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let (config, errors) = Self::build_all(text, base).map_err(|errors| ConfigErrors {
            file: name.to_string(),
            errors,
        })?;
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors {
                file: name.to_string(),
                errors,
            })
        }
    }

    /// Parses and checks config text as far as it can be built: `Ok` holds the config
    /// (an item with a problem left out) with every problem found, in line order, so a
    /// loader can run on it and add its own; `Err` means the text has no usable shape
    /// (TOML syntax, wrong types).
    pub fn build_all(
        text: &str,
        base: &Path,
    ) -> Result<(Config, Vec<ConfigError>), Vec<ConfigError>> {
        build::build_all(text, base)
    }

    /// The key of listener `i` of [`Config::listeners`] (`tcp`: of
    /// [`Config::tcp_listeners`]), e.g. `listener[2]`.
    pub fn listener_key(&self, tcp: bool, i: usize) -> KeyPath {
        let (table, list) = self.listener_origins(tcp);
        KeyPath::root()
            .key(table)
            .index(list.get(i).map_or(i, |o| o.0))
    }

    /// The key of certificate `j` of listener `i` (see [`Config::listener_key`]).
    pub fn cert_key(&self, tcp: bool, i: usize, j: usize) -> KeyPath {
        let (_, list) = self.listener_origins(tcp);
        let at = list.get(i).and_then(|o| o.1.get(j)).copied().unwrap_or(j);
        self.listener_key(tcp, i).key("tls").index(at)
    }

    fn listener_origins(&self, tcp: bool) -> (&'static str, &[(usize, Vec<usize>)]) {
        if tcp {
            ("tcp_listener", &self.origins.tcp_listeners)
        } else {
            ("listener", &self.origins.listeners)
        }
    }

    /// The key of cluster `c` of [`Config::clusters`], e.g. `cluster.vault`.
    pub fn cluster_key(&self, c: usize) -> KeyPath {
        let name = self.clusters.get(c).map_or("", |c| c.name.as_str());
        KeyPath::root().key("cluster").key(name)
    }

    /// The key of backend `b` of cluster `c`, e.g. `cluster.vault.backends[1]`.
    pub fn backend_key(&self, c: usize, b: usize) -> KeyPath {
        let at = self
            .origins
            .backends
            .get(c)
            .and_then(|list| list.get(b))
            .copied()
            .unwrap_or(b);
        self.cluster_key(c).key("backends").index(at)
    }

    /// The key of etcd endpoint `i` of `[coordination]` and the text written there.
    pub fn etcd_endpoint_key(&self, i: usize) -> (KeyPath, &str) {
        let (at, text) = self
            .origins
            .etcd
            .get(i)
            .map_or((i, ""), |(at, text)| (*at, text.as_str()));
        (
            KeyPath::root().key("coordination").key("etcd").index(at),
            text,
        )
    }

    /// A problem a later step (a loader) found at `path`, with the line it is written on.
    pub fn error_at(
        &self,
        path: &KeyPath,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            line: locate::Locator::new(&self.source.0).line(path),
            path: path.to_string(),
            message: message.into(),
            fix: fix.into(),
        }
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
