//! The admin listener, proxy-wide settings, HTTP and TCP listeners, TLS certificates,
//! the front door and routes. Plain data: no I/O.

use super::*;

/// `[admin]`
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Address the admin HTTP server binds, as written.
    pub listen: Address,
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
    /// Address to bind (`127.0.0.1:0` picks a free port), as written.
    pub listen: Address,
    /// Certificates; empty means plain HTTP. The first is served when SNI matches none.
    pub tls: Vec<TlsCertConfig>,
    /// Size and time limits for client requests.
    pub limits: Limits,
    /// Whether connections must start with a PROXY protocol header (and which versions).
    pub proxy_protocol: Accept,
    /// Client connections held open at once; more wait in the kernel's backlog.
    pub max_connections: u32,
    /// What the front door lets through and whom it trusts.
    pub door: FrontDoorConfig,
}

/// `[[tcp_listener]]`: bytes in both directions, unparsed, to a cluster.
#[derive(Clone, Debug)]
pub struct TcpListenerConfig {
    /// Address to bind, as written.
    pub listen: Address,
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
    pub proxy_protocol: Accept,
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
    pub trusted_proxies: Vec<Cidr>,
    /// Also send an RFC 7239 `Forwarded` header.
    pub forwarded: bool,
}

impl FrontDoorConfig {
    /// Whether `peer` is a listed trusted proxy.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        !self.trusted_proxies.is_empty() && self.trusted_proxies.iter().any(|c| c.contains(peer))
    }
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

/// One certificate of a TLS listener: its files (checked to exist; the loader parses
/// them and checks that the key is the certificate's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCertConfig {
    /// Host names (exact or `*.suffix`) this certificate is served for.
    pub hosts: Vec<String>,
    /// The PEM certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// The PEM private key.
    pub key_path: PathBuf,
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
