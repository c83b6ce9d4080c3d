//! Every default of the config and the fixed HTTP/2 client limits, named and documented
//! (docs/config.md quotes them). Constants only.

use super::*;

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
pub const DEFAULT_POOL_MAX_IDLE: usize = 1024;
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
