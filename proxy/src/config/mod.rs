//! Configuration: read a TOML file, validate it as a whole, produce an immutable [`Config`].
//!
//! Three steps, as in the proxies we learn from: `file` (serde structs, the file's shape),
//! `build` (every field checked, and fields against each other, with every error collected)
//! and the types below (validated, typed, ready for the engine). The engine only ever sees
//! a [`Config`]; it never parses text. A config that fails any check produces
//! [`ConfigErrors`], which lists every problem with its file, line and a fix.
//!
//! This module must never touch sockets or live state: building a config is pure, so a
//! reload can build the next one while the current one keeps serving.

mod build;
mod file;
mod locate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

pub use build::parse_duration;

// === defaults ===

/// Time allowed to establish a TCP (and TLS) connection to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default deadline of a promotion hook call.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time the primary must stay unhealthy before a promotion.
pub const DEFAULT_PROMOTION_HOLD: Duration = Duration::from_secs(10);
/// Default wait for in-flight requests to the old primary in a planned switchover.
pub const DEFAULT_SWITCHOVER_DRAIN: Duration = Duration::from_secs(5);
/// Default lease of the etcd promotion leader.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
/// Default deadline of one etcd request.
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(2);
/// Default state file of a single instance, relative to the config file.
pub const DEFAULT_STATE_FILE: &str = "keyway-state.json";
/// BeyondTrust's `masterdelay` default: how long the first backend of an ordered
/// cluster has before the next one is tried in parallel.
pub const DEFAULT_CONNECT_STAGGER: Duration = Duration::from_millis(500);
/// How long to wait for a backend's response headers once the request is sent.
pub const DEFAULT_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times one request may be retried on another backend.
pub const DEFAULT_RETRIES: u32 = 2;
/// Retries may add at most this fraction of the cluster's request rate...
pub const DEFAULT_RETRY_RATIO: f64 = 0.2;
/// ...plus this many retries per second, so a quiet cluster can still retry.
pub const DEFAULT_RETRY_MIN_PER_SECOND: u32 = 10;
/// Idle upstream connections kept per backend.
pub const DEFAULT_POOL_MAX_IDLE: usize = 128;
/// An idle upstream connection older than this is closed, not reused.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Largest request head (request line + headers) a listener accepts. hyper's floor is 8 KiB.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
/// Largest request body a listener accepts (PAM uploads are small; raise for file transfer).
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Time a client has to send a complete request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A downstream connection with no request in flight and no bytes moving is closed after this.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long in-flight requests get to finish on shutdown before connections are cut.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The affinity cookie's name when `sticky = {}` names none.
pub const DEFAULT_STICKY_COOKIE: &str = "keyway_affinity";
/// Active health checks: time between probes of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Active health checks: time one probe may take.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
/// rise-fall: consecutive passes that make a backend healthy.
pub const DEFAULT_RISE: u32 = 2;
/// rise-fall: consecutive failures that make a backend unhealthy.
pub const DEFAULT_FALL: u32 = 3;
/// failed-checks: failures within the window that make a backend unhealthy (CyberArk PADR).
pub const DEFAULT_FAILED_CHECKS: u32 = 5;
/// failed-checks: the window (CyberArk PADR: 5 failed checks in 5 minutes).
pub const DEFAULT_FAILED_CHECKS_WINDOW: Duration = Duration::from_secs(300);
/// Passive ejection: consecutive failures of the backend's own making (connect failures,
/// broken exchanges, timeouts, 5xx answers) that eject it.
pub const DEFAULT_OUTLIER_FAILURES: u32 = 5;
/// Passive ejection: the first ejection's length; each repeat doubles it.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(10);
/// Passive ejection: the longest ejection.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
/// Client connections one listener holds open at once. Past it, keyway stops accepting
/// and new connections wait in the kernel's backlog. Each client connection can need
/// a second descriptor for its backend connection, so 10 000 stays within the common
/// `LimitNOFILE` settings (65 536 and up) with room to spare, and bounds the worst-case
/// memory for request heads to 10 000 × `max_request_header_bytes`.
pub const DEFAULT_LISTENER_MAX_CONNECTIONS: u32 = 10_000;
/// Largest `max_connections` a listener accepts.
pub const MAX_LISTENER_MAX_CONNECTIONS: u32 = 1_000_000;
/// Exchanges (requests with their response bodies, or WebSocket tunnels) one backend
/// carries at once (HAProxy's `maxconn` on a server). Far more than a PAM web server
/// serves concurrently in normal use, yet finite, so a storm of clients cannot
/// multiply into a storm of backend connections: the excess waits in the queue.
pub const DEFAULT_BACKEND_MAX_CONNECTIONS: u32 = 512;
/// Requests that may wait for a backend slot at once (HAProxy's `maxqueue`). Bounded so
/// waiting requests cannot grow memory without end; past it, requests get 503.
pub const DEFAULT_BACKEND_MAX_QUEUE: u32 = 1024;
/// Longest wait for a backend slot before 503 (HAProxy's `timeout queue`).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `max_connections` / `max_queue` a backend accepts.
pub const MAX_BACKEND_LIMIT: u32 = 100_000;
/// Longest `queue_timeout` accepted: a client waiting longer holds its connection for
/// nothing.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(300);
/// A TCP connection with no byte moving either way for this long is closed. An hour:
/// an RDP or vault session sits idle while its user reads, and both protocols send
/// keep-alives of their own well within it.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Time a TCP listener gives a client for what it reads before choosing a backend: a
/// PROXY header, a ClientHello (SNI routing) or a TLS handshake (termination).
pub const DEFAULT_TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Smallest request-head limit hyper can enforce.
pub const MIN_MAX_REQUEST_HEADER_BYTES: usize = 8192;

// === HTTP/2 limits for clients (not configurable; see docs/http2-limits.md) ===

/// Streams one HTTP/2 client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
/// A stream opened beyond it is refused with RST_STREAM(REFUSED_STREAM), which counts
/// towards [`H2_MAX_LOCAL_ERROR_RESET_STREAMS`]. 100 is the floor RFC 9113 §6.5.2
/// recommends, and more than a browser uses.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams a client may open and reset before keyway has accepted them (the "rapid
/// reset" attack, CVE-2023-44487). One more and the connection ends with
/// GOAWAY(ENHANCE_YOUR_CALM, "too_many_resets"). h2's default, set here so it is ours.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams keyway itself may reset because of the client's errors (refused streams,
/// oversized headers, malformed frames: "MadeYouReset", CVE-2025-8671) over the life of one
/// connection. One more and the connection ends with GOAWAY(ENHANCE_YOUR_CALM,
/// "too_many_internal_resets"). Well-behaved clients never come near it.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Largest frame payload keyway accepts (SETTINGS_MAX_FRAME_SIZE): the protocol's minimum,
/// so one frame never costs more than 16 KiB of buffer.
pub const H2_MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Response bytes keyway buffers per stream ahead of the client's flow-control window.
/// A client that stops reading holds at most this times [`H2_MAX_CONCURRENT_STREAMS`]
/// (6.4 MiB) of keyway's memory; the backend is back-pressured beyond it.
pub const H2_MAX_SEND_BUF_SIZE: usize = 64 * 1024;
/// After this long without receiving a frame, keyway PINGs the client.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A client that does not answer keyway's PING within this is closed: a dead peer (or one
/// that floods without reading) holds its connection for at most interval + timeout.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Where to connect (resolved when the config is built).
    pub addr: SocketAddr,
    /// `host:port` as written: the Host header, and its host the TLS server name.
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
/// `--client-cert-auth`, the certificate keyway presents.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The client settings built from the files.
    pub client: Arc<rustls::ClientConfig>,
    /// The `ca`, `cert` and `key` files as configured (what equality compares).
    pub files: [Option<PathBuf>; 3],
}

impl PartialEq for EtcdTls {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
    }
}

impl Eq for EtcdTls {}

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
        /// The loaded plugin.
        plugin: Arc<crate::plugin::PromotionPlugin>,
        /// What a failed call means (fail-closed: no promotion; otherwise the native
        /// priority-promotion decides).
        on_error: crate::plugin::OnError,
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
    /// For `https://`: trusts the cluster's `upstream_ca` (or the system's roots).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// `[admin]`
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Address the admin HTTP server binds.
    pub listen: SocketAddr,
    /// The bearer token that `POST` calls (reload, promote, failback) must carry.
    pub token: Option<Arc<str>>,
}

/// `[proxy]`
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Runtime worker threads; `None` means one per core.
    pub workers: Option<usize>,
    /// Grace period for in-flight requests on shutdown.
    pub drain_timeout: Duration,
    /// Emit one `keyway::access` log line per request.
    pub access_log: bool,
    /// Key that signs keyway's cookies (read-your-writes). `None`: a random key per
    /// process, so such cookies do not survive a restart or cross instances.
    pub secret: Option<Vec<u8>>,
    /// Reload the configuration when a plugin file changes on disk.
    pub watch_plugins: bool,
}

/// `[[listener]]`
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Address to bind (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Certificates; empty means plain HTTP. The first is served when SNI matches none.
    pub tls: Vec<TlsCertConfig>,
    /// Size and time limits for client requests.
    pub limits: Limits,
    /// Whether connections must start with a PROXY protocol header (and which versions).
    pub proxy_protocol: crate::proxy_protocol::Accept,
    /// Client connections held open at once; more wait in the kernel's backlog.
    pub max_connections: u32,
    /// What the front door lets through and whom it trusts.
    pub door: FrontDoorConfig,
}

/// `[[tcp_listener]]`: bytes in both directions, unparsed, to a cluster.
#[derive(Clone, Debug)]
pub struct TcpListenerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Where connections go that no SNI route takes (and every terminated one).
    pub cluster: Option<String>,
    /// TLS passthrough routes chosen by the ClientHello's server name, in file order.
    pub sni: Vec<SniRoute>,
    /// Certificates to terminate TLS with; empty means no termination.
    pub tls: Vec<TlsCertConfig>,
    /// A connection with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on the PROXY header, ClientHello and TLS handshake of a new connection.
    pub handshake_timeout: Duration,
    /// Client connections held open at once; more wait in the kernel's backlog.
    pub max_connections: u32,
    /// Whether connections must start with a PROXY protocol header (and which versions).
    pub proxy_protocol: crate::proxy_protocol::Accept,
}

/// One `sni = [{ hosts, cluster }]` entry of a TCP listener.
#[derive(Clone, Debug)]
pub struct SniRoute {
    /// Server names (exact or `*.suffix`; `*` takes any hello, with or without a name).
    pub hosts: Vec<HostPattern>,
    /// Cluster the connection goes to, TLS untouched.
    pub cluster: String,
}

/// When a TCP backend counts as established (`protocol_check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolCheck {
    /// The backend has sent at least one byte (vault protocol, SSH, SMTP-like greeters,
    /// and client-first protocols once the client's first bytes are answered).
    FirstByte,
    /// The backend's first bytes are a TLS handshake record (its ServerHello): for TLS
    /// passthrough, where the client's ClientHello is what the backend answers.
    Tls,
    /// Connected is enough.
    None,
}

/// How a TCP cluster keeps a client on one backend (`affinity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// No affinity: the strategy and balance decide.
    None,
    /// Weighted rendezvous hashing on the client's IP address.
    ClientIp,
}

/// Whether keyway sends a PROXY protocol header to a backend (backend `proxy_protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendProxy {
    /// No header.
    Off,
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

/// A cluster's settings that only TCP listeners use.
#[derive(Clone, Debug)]
pub struct TcpClusterSettings {
    /// When a backend counts as established.
    pub protocol_check: ProtocolCheck,
    /// Client affinity.
    pub affinity: Affinity,
    /// Per backend, in the order of `ClusterConfig::backends`: the PROXY header sent.
    pub send_proxy: Vec<SendProxy>,
}

/// Per-listener settings of the front door (see `frontdoor`). The defaults are the
/// strict ones: relax each only for a backend that needs it.
#[derive(Clone, Debug, Default)]
pub struct FrontDoorConfig {
    /// Let `%2F` through in paths (kept encoded) instead of answering 400.
    pub allow_encoded_slashes: bool,
    /// Forward `TRACE` instead of answering 405.
    pub allow_trace: bool,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are kept and appended to;
    /// from every other peer they are replaced.
    pub trusted_proxies: Vec<crate::frontdoor::Cidr>,
    /// Also send an RFC 7239 `Forwarded` header.
    pub forwarded: bool,
}

/// Per-listener request limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_request_header_bytes: usize,
    /// Largest request body accepted; larger bodies get 413.
    pub max_request_body_bytes: u64,
    /// Time a client has to send a request head.
    pub header_read_timeout: Duration,
    /// Idle downstream connections are closed after this.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// One certificate of a TLS listener, already read and parsed.
#[derive(Clone)]
pub struct TlsCertConfig {
    /// Host names (exact or `*.suffix`) this certificate is served for.
    pub hosts: Vec<String>,
    /// Where the chain came from (for messages).
    pub cert_path: PathBuf,
    /// The parsed chain and signing key.
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl fmt::Debug for TlsCertConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCertConfig")
            .field("hosts", &self.hosts)
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// How a route matches the request's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: any host.
    Any,
    /// `pvwa.corp.test`: this host only (compared case-insensitively, port ignored).
    Exact(String),
    /// `*.corp.test`: any host ending in `.corp.test` (stored with the leading dot).
    Suffix(String),
}

/// `[[route]]`
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// Which hosts.
    pub host: HostPattern,
    /// Path prefix, always starting with `/`.
    pub path: String,
    /// Target cluster name (checked to exist).
    pub cluster: String,
}

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
        /// The loaded plugin.
        plugin: Arc<crate::plugin::HealthPlugin>,
        /// What a failed call means.
        on_error: crate::plugin::OnError,
        /// rise/fall of the native fallback.
        rise: u32,
        /// See `rise`.
        fall: u32,
    },
}

/// `classifier = { ... }`: a WebAssembly request classifier.
#[derive(Clone)]
pub struct ClassifierHook {
    /// The loaded plugin.
    pub plugin: Arc<crate::plugin::ClassifierPlugin>,
    /// What a failed call means.
    pub on_error: crate::plugin::OnError,
}

impl fmt::Debug for ClassifierHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClassifierHook({}, {:?})",
            self.plugin.meta.name, self.on_error
        )
    }
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
    /// Where to connect.
    pub address: SocketAddr,
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
