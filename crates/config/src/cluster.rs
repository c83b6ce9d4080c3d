//! Clusters and backends: strategies, balancing, health, the read/write split, sticky
//! sessions, retries, pools and limits. Plain data: no I/O.

use super::*;

/// How a cluster chooses among its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Spread load across all backends with the balance algorithm.
    Balanced,
    /// Lowest priority first; the next is added after `connect_stagger`.
    Ordered,
    /// Writes to the one primary, reads balanced over read-only replicas.
    PrimaryReplica,
}

/// A backend's role in a `primary-replica` cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes writes (and reads, per `reads_on_primary`).
    Primary,
    /// Read-only.
    Replica,
}

/// Whether the primary also serves reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadsOnPrimary {
    /// Only when no replica can serve.
    Fallback,
    /// Always a read candidate, balanced with the replicas.
    Always,
    /// Never: reads fail when no replica can serve.
    Never,
}

/// How active checks probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// HTTP GET of a path, over the backend's own TLS setting.
    Http {
        /// Path to request.
        path: String,
        /// Expected status.
        expect: u16,
    },
    /// A TCP connect.
    Tcp,
}

/// Which health policy turns probe history into a state.
#[derive(Clone, Debug)]
pub enum HealthPolicyKind {
    /// HAProxy-style: `rise` passes in a row → healthy, `fall` failures in a row → unhealthy.
    RiseFall {
        /// Passes in a row.
        rise: u32,
        /// Failures in a row.
        fall: u32,
    },
    /// CyberArk PADR-style: `failures` failed checks within `window` → unhealthy.
    FailedChecks {
        /// Failures that count.
        failures: u32,
        /// Window they must fall in.
        window: Duration,
    },
    /// A WebAssembly policy; `fallback` is the native rise-fall used when `on_error =
    /// "fallback"`.
    Plugin {
        /// The plugin file and its configuration (compiled by the loader).
        plugin: PluginRef,
        /// What a failed call means.
        on_error: OnError,
        /// rise/fall of the native fallback.
        rise: u32,
        /// See `rise`.
        fall: u32,
    },
}

/// `classifier = { ... }`: a WebAssembly request classifier.
#[derive(Clone, Debug)]
pub struct ClassifierHook {
    /// The plugin file and its configuration (compiled by the loader).
    pub plugin: PluginRef,
    /// What a failed call means.
    pub on_error: OnError,
    /// `remember_answers` (default true): answer a request seen before from the
    /// instance's memo. Off for a classifier whose answer depends on more than the
    /// request (the clock, say).
    pub remember_answers: bool,
}

/// How replication lag is read from a health response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LagSource {
    /// A response header holding milliseconds.
    Header(http::HeaderName),
    /// A top-level numeric JSON field of the body, in milliseconds.
    JsonField(String),
}

/// `health = { ... }`
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Probe kind.
    pub kind: CheckKind,
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Probe history → state.
    pub policy: HealthPolicyKind,
    /// State before the first probe: `true` = healthy (trust the list), `false` = unknown
    /// (route nothing to it until a probe passes).
    pub initially_healthy: bool,
    /// Where lag is read from, if anywhere.
    pub lag: Option<LagSource>,
    /// Probe this port of the backend's host instead of its own (a status page beside
    /// a vault or RDP port).
    pub port: Option<u16>,
}

/// `outlier = { ... }`
#[derive(Clone, Copy, Debug)]
pub struct OutlierConfig {
    /// Consecutive failures that eject; 0 disables passive ejection.
    pub consecutive_failures: u32,
    /// First ejection's length.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Whether a 5xx answer counts as a backend failure.
    pub count_5xx: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_OUTLIER_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            count_5xx: true,
        }
    }
}

/// One `read_routes`/`write_routes` entry: a method and a path glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePattern {
    /// Method, or `None` for `*` (any).
    pub method: Option<http::Method>,
    /// Path glob: `*` matches within one segment, `**` matches the rest.
    pub path: String,
}

/// Read/write split of a `primary-replica` cluster.
#[derive(Clone, Debug)]
pub struct SplitConfig {
    /// Requests that are reads although their method says write.
    pub read_routes: Vec<RoutePattern>,
    /// Requests that are writes although their method says read.
    pub write_routes: Vec<RoutePattern>,
    /// Whether the primary serves reads.
    pub reads_on_primary: ReadsOnPrimary,
    /// Replicas reporting more lag than this serve no reads.
    pub max_lag: Option<Duration>,
    /// After a client's write, its reads go to the primary for this long.
    pub read_your_writes: Option<Duration>,
    /// A WebAssembly classifier consulted before the native rules.
    pub classifier: Option<ClassifierHook>,
}

/// Load-balancing algorithm within a set of equal candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round-robin.
    RoundRobin,
    /// Fewest in-flight requests relative to weight.
    LeastRequests,
    /// Power of two random choices on in-flight requests.
    P2c,
    /// Weighted random.
    Random,
    /// Fewest open connections relative to weight (TCP listeners); on HTTP clusters the
    /// same as least-requests.
    LeastConnections,
}

impl Strategy {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Balanced => "balanced",
            Strategy::Ordered => "ordered",
            Strategy::PrimaryReplica => "primary-replica",
        }
    }
}

impl Balance {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastRequests => "least-requests",
            Balance::P2c => "p2c",
            Balance::Random => "random",
            Balance::LeastConnections => "least-connections",
        }
    }
}

/// Which HTTP version keyway speaks to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default for plain connections).
    Http1,
    /// HTTP/2 (prior knowledge on plain connections, ALPN `h2` on TLS).
    Http2,
    /// TLS: whatever ALPN picks (h2 preferred). Plain: HTTP/1.1.
    Auto,
}

/// How a cluster's backends compare paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathCase {
    /// `/API` and `/api` are different paths (Java servers, PAM360).
    Sensitive,
    /// `/API` and `/api` are the same path (IIS: PVWA, PSM web access); route prefixes
    /// and read/write globs match without case.
    Insensitive,
}

/// Upgrade protocols forwarded when a cluster names none.
pub const DEFAULT_UPGRADES: [&str; 1] = ["websocket"];

/// `sticky = { cookie = "..." }`
#[derive(Clone, Debug)]
pub struct StickyConfig {
    /// Cookie name.
    pub cookie: String,
    /// Cookie lifetime; `None` makes it a session cookie.
    pub max_age: Option<Duration>,
}

/// Bounds on retries, so retries cannot multiply an outage.
#[derive(Clone, Copy, Debug)]
pub struct RetryBudget {
    /// Retries may be at most this fraction of requests (over a 10 s window)...
    pub ratio: f64,
    /// ...plus this many per second.
    pub min_per_second: u32,
}

/// Upstream connection pool settings.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    /// Idle connections kept per backend.
    pub max_idle: usize,
    /// Idle connections older than this are dropped.
    pub idle_timeout: Duration,
}

/// `[cluster.NAME]`
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The cluster's name (the key in `[cluster.NAME]`).
    pub name: String,
    /// Balanced or ordered.
    pub strategy: Strategy,
    /// Algorithm among equal candidates.
    pub balance: Balance,
    /// Whether the backends compare paths with or without case.
    pub paths: PathCase,
    /// `Upgrade` protocols forwarded (lower case); any other token is dropped and the
    /// request served as plain HTTP.
    pub upgrades: Vec<String>,
    /// Session affinity, if enabled.
    pub sticky: Option<StickyConfig>,
    /// TCP + TLS connect bound, per attempt.
    pub connect_timeout: Duration,
    /// Ordered clusters: delay before the next backend joins the race.
    pub connect_stagger: Duration,
    /// Bound on the wait for response headers (TCP: for the `protocol_check`).
    pub protocol_timeout: Duration,
    /// What TCP listeners use of this cluster.
    pub tcp: TcpClusterSettings,
    /// Extra attempts on other backends.
    pub retries: u32,
    /// Cluster-wide retry budget.
    pub retry_budget: RetryBudget,
    /// CA certificates that verify TLS backends; `None` uses the system store.
    pub upstream_ca: Option<Vec<CertificateDer<'static>>>,
    /// Connection pool settings.
    pub pool: PoolConfig,
    /// Longest wait in a backend's queue for a slot before 503.
    pub queue_timeout: Duration,
    /// Active health checks, if configured.
    pub health: Option<HealthConfig>,
    /// Passive ejection from live traffic.
    pub outlier: OutlierConfig,
    /// Read/write split (`primary-replica` clusters).
    pub split: SplitConfig,
    /// Automatic promotion (`primary-replica`); `None`: promotions are manual only.
    pub promotion: Option<PromotionConfig>,
    /// Fail back to the configured primary once it has been healthy this long.
    pub failback_after: Option<Duration>,
    /// Backends in file order.
    pub backends: Vec<BackendConfig>,
}

/// One backend.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Unique within the cluster; shows up in metrics, logs and `/status`.
    pub id: String,
    /// Where to connect, as written (the loader resolves a host name).
    pub address: Address,
    /// Relative share of traffic (≥ 1).
    pub weight: u32,
    /// Lower is preferred by `ordered` clusters.
    pub priority: u32,
    /// Speak TLS to this backend.
    pub tls: bool,
    /// Server name for SNI and certificate verification.
    pub sni: String,
    /// HTTP version towards this backend.
    pub protocol: UpstreamProtocol,
    /// Role in a `primary-replica` cluster (`Replica` elsewhere): the role it starts
    /// with; promotions change who is primary at run time (see `failover`).
    pub role: Role,
    /// A site label (`location = "east"`) that promotion policies may prefer.
    pub location: String,
    /// Exchanges this backend carries at once (cluster default or its own).
    pub max_connections: u32,
    /// Requests that may wait for one of its slots (cluster default or its own).
    pub max_queue: u32,
}
