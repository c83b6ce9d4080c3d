//! Where decisions live: the state file, or etcd with its TLS, lease and failsafe; and
//! the promotion settings and hooks. Plain data: no I/O.

use super::*;

/// Where promotion decisions live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateConfig {
    /// A single instance: a local file, written atomically before a decision takes effect.
    File(PathBuf),
    /// Several instances: etcd (`[coordination]`).
    Etcd(EtcdConfig),
}

/// One etcd client endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdEndpoint {
    /// `host:port` as written (the loader resolves it): where to connect: the Host header, and its host the TLS server name.
    pub authority: String,
    /// `https://`.
    pub tls: bool,
}

impl EtcdEndpoint {
    /// The endpoint as an URL, for messages.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// TLS to etcd: the CA its server certificates are checked against and, for etcd with
/// `--client-cert-auth`, the certificate keyway presents. Files only: the loader reads
/// them and builds the client settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The `ca`, `cert` and `key` files as configured.
    pub files: [Option<PathBuf>; 3],
}

/// `[coordination]`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client endpoints, served by etcd's v3 JSON gateway.
    pub endpoints: Vec<EtcdEndpoint>,
    /// TLS settings, when the endpoints are `https://`.
    pub tls: Option<EtcdTls>,
    /// Key prefix, e.g. `/keyway`.
    pub prefix: String,
    /// Lease of the promotion leader: a dead leader is replaced after about this long.
    pub lease_ttl: Duration,
    /// This instance's name in the election and its registration.
    pub instance: String,
    /// Failsafe peers' admin URLs (`http://host:port`): when etcd is unreachable, this
    /// instance keeps routing writes only while every one of them answers, lost etcd
    /// too, and agrees on every primary. Empty: no failsafe.
    pub failsafe_peers: Vec<String>,
    /// Deadline for one etcd request.
    pub timeout: Duration,
}

/// `promotion = { ... }`
#[derive(Clone, Debug)]
pub struct PromotionConfig {
    /// Who chooses the new primary.
    pub policy: PromotionPolicyKind,
    /// Promote by itself (`false`: only report that a promotion is needed).
    pub auto: bool,
    /// How long the primary must stay unhealthy before a promotion.
    pub hold: Duration,
    /// A failing `on_promote` hook keeps writes off the candidate.
    pub require_hook_ok: bool,
    /// Called on the new primary before it takes writes.
    pub on_promote: Option<HookConfig>,
    /// Called on every other backend after a promotion.
    pub on_repoint: Option<HookConfig>,
    /// Planned switchovers wait up to this long for in-flight requests to the old
    /// primary to finish.
    pub drain: Duration,
}

/// A promotion policy.
#[derive(Clone, Debug)]
pub enum PromotionPolicyKind {
    /// Native `priority-promotion`: first healthy candidate by priority, preferring a
    /// location.
    Priority {
        /// Candidates at this location come first.
        prefer_location: Option<String>,
    },
    /// Native `least-lag-promotion`.
    LeastLag {
        /// Candidates further behind (or reporting no lag) are never promoted.
        max_lag_ms: Option<u64>,
    },
    /// A WebAssembly promotion policy.
    Plugin {
        /// The plugin file and its configuration (compiled by the loader).
        plugin: PluginRef,
        /// What a failed call means (fail-closed: no promotion; otherwise the native
        /// priority-promotion decides).
        on_error: OnError,
    },
}

/// An HTTP call keyway makes to a backend when the topology changes.
#[derive(Clone, Debug)]
pub struct HookConfig {
    /// `http://` or `https://` URL; `{address}`, `{id}`, `{cluster}` and `{epoch}` are
    /// filled in.
    pub url: String,
    /// Deadline for the whole call.
    pub timeout: Duration,
    /// An `https://` URL: the loader builds TLS settings trusting the cluster's
    /// `upstream_ca` (or the system's roots).
    pub https: bool,
}
