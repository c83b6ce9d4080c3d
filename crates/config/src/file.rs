//! The on-disk shape of a keyway config file, exactly as serde reads it.
//!
//! These structs say which keys exist and what TOML type each holds; nothing more.
//! Strings that need interpretation (addresses, durations, enum names, file paths) stay
//! strings here so that the builder (`build`) can check every one of them and report
//! all problems at once, each with the line it came from. Unknown keys are not rejected
//! by serde (that would stop at the first one); `build` collects them with
//! `serde_ignored` instead. This module never validates.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A whole config file.
#[derive(Debug, Default, Deserialize)]
pub struct FileConfig {
    pub admin: Option<FileAdmin>,
    pub proxy: Option<FileProxy>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<FileListener>,
    #[serde(default, rename = "tcp_listener")]
    pub tcp_listeners: Vec<FileTcpListener>,
    #[serde(default, rename = "route")]
    pub routes: Vec<FileRoute>,
    #[serde(default, rename = "cluster")]
    pub clusters: BTreeMap<String, FileCluster>,
    pub state: Option<FileState>,
    pub coordination: Option<FileCoordination>,
}

/// `[state]`: where a single instance keeps its promotion decisions.
#[derive(Debug, Deserialize)]
pub struct FileState {
    pub file: Option<String>,
}

/// `[coordination]`: several instances agree through etcd.
#[derive(Debug, Deserialize)]
pub struct FileCoordination {
    pub etcd: Vec<String>,
    pub prefix: Option<String>,
    pub lease_ttl: Option<String>,
    pub instance: Option<String>,
    pub timeout: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub failsafe: Option<FileFailsafe>,
}

/// `failsafe = { peers = [...] }` of `[coordination]`.
#[derive(Debug, Deserialize)]
pub struct FileFailsafe {
    pub peers: Vec<String>,
}

/// `promotion = { ... }`
#[derive(Debug, Deserialize)]
pub struct FilePromotion {
    pub policy: Option<String>,
    pub config: Option<toml::Table>,
    pub on_error: Option<String>,
    pub auto: Option<bool>,
    pub hold: Option<String>,
    pub require_hook_ok: Option<bool>,
    pub on_promote: Option<FileHook>,
    pub on_repoint: Option<FileHook>,
    pub drain: Option<String>,
}

/// `on_promote = { url = "...", timeout = "5s" }`
#[derive(Debug, Deserialize)]
pub struct FileHook {
    pub url: String,
    pub timeout: Option<String>,
}

/// `failback = { after = "10m" }`
#[derive(Debug, Deserialize)]
pub struct FileFailback {
    pub after: String,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
pub struct FileAdmin {
    pub listen: String,
    pub token_file: Option<String>,
}

/// `[proxy]`: process-wide settings.
#[derive(Debug, Default, Deserialize)]
pub struct FileProxy {
    pub workers: Option<usize>,
    pub drain_timeout: Option<String>,
    pub access_log: Option<bool>,
    pub secret_file: Option<String>,
    pub watch_plugins: Option<bool>,
}

/// `[[listener]]`
#[derive(Debug, Deserialize)]
pub struct FileListener {
    pub listen: String,
    #[serde(default)]
    pub tls: Vec<FileTlsCert>,
    pub max_request_header_bytes: Option<usize>,
    pub max_request_body_bytes: Option<u64>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub allow_encoded_slashes: Option<bool>,
    pub allow_trace: Option<bool>,
    pub trusted_proxies: Option<Vec<String>>,
    pub forwarded: Option<bool>,
    pub max_connections: Option<u32>,
    pub proxy_protocol: Option<String>,
}

/// `[[tcp_listener]]`: bytes carried unparsed to a cluster.
#[derive(Debug, Deserialize)]
pub struct FileTcpListener {
    pub listen: String,
    pub cluster: Option<String>,
    #[serde(default)]
    pub sni: Vec<FileSniRoute>,
    #[serde(default)]
    pub tls: Vec<FileTlsCert>,
    pub idle_timeout: Option<String>,
    pub handshake_timeout: Option<String>,
    pub max_connections: Option<u32>,
    pub proxy_protocol: Option<String>,
}

/// One entry of a TCP listener's `sni = [...]`.
#[derive(Debug, Deserialize)]
pub struct FileSniRoute {
    pub hosts: Vec<String>,
    pub cluster: String,
}

/// One entry of a listener's `tls = [...]`.
#[derive(Debug, Deserialize)]
pub struct FileTlsCert {
    pub hosts: Vec<String>,
    pub cert: String,
    pub key: String,
}

/// `[[route]]`
#[derive(Debug, Deserialize)]
pub struct FileRoute {
    pub host: Option<String>,
    pub path: Option<String>,
    pub cluster: String,
}

/// `[cluster.NAME]`
#[derive(Debug, Deserialize)]
pub struct FileCluster {
    pub strategy: Option<String>,
    pub balance: Option<String>,
    pub paths: Option<String>,
    pub upgrades: Option<Vec<String>>,
    pub sticky: Option<FileSticky>,
    pub connect_timeout: Option<String>,
    pub connect_stagger: Option<String>,
    pub protocol_timeout: Option<String>,
    pub protocol_check: Option<String>,
    pub affinity: Option<String>,
    pub retries: Option<u32>,
    pub retry_budget: Option<FileRetryBudget>,
    pub upstream_ca: Option<String>,
    pub pool: Option<FilePool>,
    pub max_connections: Option<u32>,
    pub max_queue: Option<u32>,
    pub queue_timeout: Option<String>,
    pub health: Option<FileHealth>,
    pub outlier: Option<FileOutlier>,
    pub read_routes: Option<Vec<String>>,
    pub write_routes: Option<Vec<String>>,
    pub reads_on_primary: Option<String>,
    pub max_lag: Option<String>,
    pub read_your_writes: Option<String>,
    pub classifier: Option<FileClassifier>,
    pub promotion: Option<FilePromotion>,
    pub failback: Option<FileFailback>,
    #[serde(default)]
    pub backends: Vec<FileBackend>,
}

/// `health = { ... }`: active checks.
#[derive(Debug, Deserialize)]
pub struct FileHealth {
    pub kind: Option<String>,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub expect: Option<u16>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub policy: Option<String>,
    pub failures: Option<u32>,
    pub window: Option<String>,
    pub initial: Option<String>,
    pub lag_header: Option<String>,
    pub lag_json: Option<String>,
    pub config: Option<toml::Table>,
    pub on_error: Option<String>,
    pub port: Option<u16>,
}

/// `classifier = { policy = "x.wasm", config = { ... }, on_error = "...", remember_answers = true }`
#[derive(Debug, Deserialize)]
pub struct FileClassifier {
    pub policy: String,
    pub config: Option<toml::Table>,
    pub on_error: Option<String>,
    pub remember_answers: Option<bool>,
}

/// `outlier = { ... }`: passive ejection from live traffic.
#[derive(Debug, Deserialize)]
pub struct FileOutlier {
    pub consecutive_failures: Option<u32>,
    pub base_ejection: Option<String>,
    pub max_ejection: Option<String>,
    pub count_5xx: Option<bool>,
}

/// `sticky = { cookie = "...", max_age = "..." }`
#[derive(Debug, Deserialize)]
pub struct FileSticky {
    pub cookie: Option<String>,
    pub max_age: Option<String>,
}

/// `retry_budget = { ratio = 0.2, min_per_second = 10 }`
#[derive(Debug, Deserialize)]
pub struct FileRetryBudget {
    pub ratio: Option<f64>,
    pub min_per_second: Option<u32>,
}

/// `pool = { max_idle = 64, idle_timeout = "90s" }`
#[derive(Debug, Deserialize)]
pub struct FilePool {
    pub max_idle: Option<usize>,
    pub idle_timeout: Option<String>,
}

/// One entry of a cluster's `backends = [...]`.
#[derive(Debug, Deserialize)]
pub struct FileBackend {
    pub id: String,
    pub address: String,
    pub weight: Option<u32>,
    pub priority: Option<u32>,
    pub tls: Option<bool>,
    pub sni: Option<String>,
    pub protocol: Option<String>,
    pub role: Option<String>,
    pub location: Option<String>,
    pub max_connections: Option<u32>,
    pub max_queue: Option<u32>,
    pub proxy_protocol: Option<String>,
}
