//! Runtime state of a cluster: its backends, their counters and pools, the balancer,
//! the retry budget and sticky-cookie tokens.
//!
//! A [`Cluster`] is built from a [`ClusterConfig`] and then shared read-only by every
//! request (`Arc`); per-request state lives in atomics. Metric handles are registered
//! once here so the request path increments counters without hashing label sets.
//! Each backend also owns its exchange slots (`max_connections`) and the bounded queue
//! of requests waiting for one; a slot is held by the exchange's [`InFlight`] guard.
//! This module decides nothing about where a request goes (see `forward`) and performs
//! no I/O.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::balance::{Balancer, Candidate};
use crate::classify::Classifier;
use crate::config::{BackendConfig, ClusterConfig, RetryBudget};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::health::{ClusterHealth, Fault};
use crate::load::ClusterParts;
use crate::permit::{WriteGate, WriteTicket};
use crate::upstream::{self, Pool};

/// One backend at run time.
pub struct Backend {
    /// Its configuration.
    pub cfg: BackendConfig,
    /// Where to connect (`cfg.address`, resolved when the config was loaded).
    pub address: std::net::SocketAddr,
    /// Value of the sticky cookie that pins a client to this backend.
    pub sticky_token: String,
    /// Idle upstream connections.
    pub pool: Pool,
    /// TLS settings for this backend, if it uses TLS.
    pub tls: Option<upstream::BackendTls>,
    /// Position in the cluster's backend list.
    pub index: usize,
    health: Arc<ClusterHealth>,
    in_flight: AtomicU32,
    requests: AtomicU64,
    connect_errors: AtomicU64,
    last_error: Mutex<Option<(SystemTime, String)>>,
    slots: Slots,
    metrics: BackendMetrics,
}

struct BackendMetrics {
    responses: [Counter; 5],
    connect_errors: Counter,
    in_flight: Gauge,
    queued: Gauge,
    queue_full: Counter,
    queue_timeout: Counter,
}

/// A backend's exchange slots and the bounded queue of requests waiting for one.
struct Slots {
    free: Arc<Semaphore>,
    max_queue: u32,
    queued: AtomicU32,
    rejected: AtomicU64,
}

/// One of a backend's `max_connections` slots, held for a whole exchange.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Candidate for Arc<Backend> {
    fn weight(&self) -> u32 {
        self.cfg.weight
    }
    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl Backend {
    fn new(
        cluster: &ClusterConfig,
        cfg: BackendConfig,
        address: std::net::SocketAddr,
        index: usize,
        health: Arc<ClusterHealth>,
    ) -> Result<Self, String> {
        let labels = [
            ("cluster", cluster.name.clone()),
            ("backend", cfg.id.clone()),
        ];
        let class = |c: &'static str| {
            let mut l = labels.to_vec();
            l.push(("class", c.to_string()));
            counter!("keyway_upstream_responses_total", &l)
        };
        let rejected = |why: &'static str| {
            let mut l = labels.to_vec();
            l.push(("reason", why.to_string()));
            counter!("keyway_upstream_queue_rejected_total", &l)
        };
        let tls = if cfg.tls {
            Some(upstream::BackendTls::new(
                cluster.upstream_ca.as_deref(),
                &cfg,
            )?)
        } else {
            None
        };
        Ok(Self {
            address,
            sticky_token: sticky_token(&cluster.name, &cfg.id),
            pool: Pool::new(cluster.pool),
            tls,
            index,
            health,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            slots: Slots {
                free: Arc::new(Semaphore::new(cfg.max_connections as usize)),
                max_queue: cfg.max_queue,
                queued: AtomicU32::new(0),
                rejected: AtomicU64::new(0),
            },
            metrics: BackendMetrics {
                responses: [
                    class("1xx"),
                    class("2xx"),
                    class("3xx"),
                    class("4xx"),
                    class("5xx"),
                ],
                connect_errors: counter!("keyway_upstream_connect_errors_total", &labels),
                in_flight: gauge!("keyway_upstream_in_flight", &labels),
                queued: gauge!("keyway_upstream_queued", &labels),
                queue_full: rejected("full"),
                queue_timeout: rejected("timeout"),
            },
            cfg,
        })
    }

    /// Requests in flight on this backend.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this backend since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Failed connection attempts since start.
    pub fn connect_errors(&self) -> u64 {
        self.connect_errors.load(Ordering::Relaxed)
    }

    /// The most recent failure, with when it happened.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> u32 {
        self.slots.queued.load(Ordering::Relaxed)
    }

    /// Requests refused since start because the queue was full or the wait ran out.
    pub fn queue_rejected(&self) -> u64 {
        self.slots.rejected.load(Ordering::Relaxed)
    }

    /// Whether a slot is free now (a hint: another request may take it first).
    pub fn has_free_slot(&self) -> bool {
        self.slots.free.available_permits() > 0
    }

    /// A free slot, if one is free now (no waiting, no allocation).
    pub fn try_slot(&self) -> Option<Slot> {
        self.slots.free.clone().try_acquire_owned().ok().map(Slot)
    }

    /// Waits in the backend's bounded queue for a slot, for at most `timeout`. Refused
    /// at once when `max_queue` requests already wait. A request that gives up (its
    /// client went away and the future is dropped) leaves the queue at once: the
    /// semaphore forgets the waiter and the queue place is returned on drop.
    pub async fn queue_for_slot(self: &Arc<Self>, timeout: Duration) -> Result<Slot, ProxyError> {
        let ahead = self.slots.queued.fetch_add(1, Ordering::Relaxed);
        self.metrics.queued.increment(1.0);
        let _place = QueuePlace(self);
        if ahead >= self.slots.max_queue {
            self.metrics.queue_full.increment(1);
            return Err(self.busy(format!(
                "backend `{}` carries its max_connections ({}) and {} requests already wait for it",
                self.cfg.id, self.cfg.max_connections, self.slots.max_queue
            )));
        }
        let got = tokio::time::timeout(timeout, self.slots.free.clone().acquire_owned()).await;
        match got {
            Ok(Ok(permit)) => Ok(Slot(permit)),
            _ => {
                self.metrics.queue_timeout.increment(1);
                Err(self.busy(format!(
                    "no slot of backend `{}` (max_connections = {}) came free within {timeout:?}",
                    self.cfg.id, self.cfg.max_connections
                )))
            }
        }
    }

    fn busy(&self, detail: String) -> ProxyError {
        self.slots.rejected.fetch_add(1, Ordering::Relaxed);
        ProxyError::new(ErrorKind::BackendBusy, Side::Internal, true, detail)
    }

    /// Marks a request as started; the guard holds `slot` and marks the request
    /// finished when dropped.
    pub fn start_request(self: &Arc<Self>, slot: Slot) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.increment(1.0);
        InFlight {
            backend: self.clone(),
            _slot: slot,
            write: None,
        }
    }

    /// Counts a response by status class.
    pub fn record_response(&self, status: u16) {
        let idx = usize::from((status / 100).clamp(1, 5) - 1);
        self.metrics.responses[idx].increment(1);
    }

    /// Records a failed connection attempt (a passive health signal too).
    pub fn record_connect_error(&self, detail: &str) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.connect_errors.increment(1);
        self.record_error(detail);
        self.health.report(self.index, false);
    }

    /// Feeds a response head to passive ejection: an answer that was the backend's fault
    /// (a counted 5xx) counts against it, any other answer for it; when the client's
    /// body failed it counts for nothing.
    pub fn report_answer(&self, fault: Fault) {
        match fault {
            Fault::Backend => self.health.report(self.index, false),
            Fault::None => self.health.report(self.index, true),
            Fault::Client => {}
        }
    }

    /// Feeds a failed exchange to passive ejection. Only a failure that was the
    /// backend's own counts against it and becomes its `last_error`.
    pub fn report_failure(&self, fault: Fault, detail: &str) {
        if fault == Fault::Backend {
            self.record_error(detail);
            self.health.report(self.index, false);
        }
    }

    /// Records the latest error seen on this backend (for `/status`).
    pub fn record_error(&self, detail: &str) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some((SystemTime::now(), detail.to_string()));
        }
    }
}

/// One exchange with a backend: holds its slot, and decrements the backend's in-flight
/// count and frees the slot when dropped (response body done, tunnel closed, or the
/// client gone).
pub struct InFlight {
    backend: Arc<Backend>,
    _slot: Slot,
    /// A write stays counted in its cluster's gate until its exchange ends (body,
    /// tunnel and all), so a drain never misses it.
    write: Option<WriteTicket>,
}

impl InFlight {
    /// Carries a write's ticket for as long as this exchange lasts.
    pub fn carry(&mut self, ticket: Option<WriteTicket>) {
        self.write = ticket;
    }

    /// The backend this exchange is with.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.metrics.in_flight.decrement(1.0);
    }
}

/// A place in a backend's queue, returned when dropped (slot granted, refused, timed
/// out, or the waiting request cancelled).
struct QueuePlace<'a>(&'a Backend);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.slots.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.queued.decrement(1.0);
    }
}

/// A stable, non-secret token naming a backend in a sticky cookie. The same on every
/// keyway instance and across restarts, and it does not reveal the backend's address.
pub fn sticky_token(cluster: &str, backend: &str) -> String {
    // FNV-1a, 64 bit: stable across Rust versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster.bytes().chain([0xff]).chain(backend.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A cluster at run time.
pub struct Cluster {
    /// Its configuration (shared with the coordinator's view of the cluster).
    pub cfg: Arc<ClusterConfig>,
    /// Backends, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// Backend indices by ascending priority (config order within a priority).
    pub by_priority: Vec<usize>,
    /// Chooses among candidates.
    pub balancer: Balancer,
    /// Backend health (active checks, passive ejection).
    pub health: Arc<ClusterHealth>,
    /// Read/write classification (`primary-replica`).
    pub classifier: Classifier,
    /// The parts loaded for it: resolved addresses and compiled plugins.
    pub plugins: ClusterParts,
    ryw_key: ring::hmac::Key,
    ryw_cookie: String,
    budget: Budget,
    metrics: ClusterMetrics,
    /// Writes in flight (`primary-replica`): shared with the failover manager, so it
    /// outlives reloads and counts writes of every runtime that served this cluster.
    pub gate: Arc<WriteGate>,
}

struct ClusterMetrics {
    requests: Counter,
    retries: Counter,
    retries_denied: Counter,
    writes_refused: Counter,
    in_flight: Gauge,
    duration: Histogram,
}

impl Cluster {
    /// Builds runtime state for a cluster from its config and the parts loaded for it
    /// (`crate::load`). `secret` signs its cookies. Fails only if TLS settings cannot be
    /// built.
    pub fn new(cfg: ClusterConfig, parts: ClusterParts, secret: &[u8]) -> Result<Self, String> {
        let health = Arc::new(ClusterHealth::new(&cfg, parts.health.as_ref()));
        let backends = cfg
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let address = parts.addresses.get(i).copied().ok_or_else(|| {
                    format!(
                        "backend `{}` of cluster `{}` was not loaded",
                        b.id, cfg.name
                    )
                })?;
                Backend::new(&cfg, b.clone(), address, i, health.clone()).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut by_priority: Vec<usize> = (0..backends.len()).collect();
        by_priority.sort_by_key(|&i| backends[i].cfg.priority);
        let weights: Vec<u32> = backends.iter().map(|b| b.cfg.weight).collect();
        let labels = [("cluster", cfg.name.clone())];
        Ok(Self {
            balancer: Balancer::new(cfg.balance, &weights),
            health,
            classifier: Classifier::new(&cfg.split.read_routes, &cfg.split.write_routes, cfg.paths),
            ryw_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            ryw_cookie: format!("keyway_ryw_{}", cfg.name),
            budget: Budget::new(cfg.retry_budget),
            gate: Arc::default(),
            metrics: ClusterMetrics {
                requests: counter!("keyway_requests_total", &labels),
                retries: counter!("keyway_retries_total", &labels),
                retries_denied: counter!("keyway_retries_denied_total", &labels),
                writes_refused: counter!("keyway_writes_refused_total", &labels),
                in_flight: gauge!("keyway_requests_in_flight", &labels),
                duration: histogram!("keyway_request_duration_seconds", &labels),
            },
            by_priority,
            backends,
            plugins: parts,
            cfg: Arc::new(cfg),
        })
    }

    /// The backend a sticky cookie value names, if any.
    pub fn backend_by_token(&self, token: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.sticky_token == token)
    }

    /// `randomizelogservers`: shuffles backends of equal priority in `order` (indices
    /// sorted by priority), keeping the tiers in order. For HTTP and TCP alike.
    pub fn shuffle_within_priority(&self, order: &mut [usize]) {
        let mut start = 0;
        while start < order.len() {
            let p = self.backends[order[start]].cfg.priority;
            let end = order[start..]
                .iter()
                .position(|&i| self.backends[i].cfg.priority != p)
                .map_or(order.len(), |n| start + n);
            fastrand::shuffle(&mut order[start..end]);
            start = end;
        }
    }

    /// Notes a new request (for metrics and the retry budget); the guard ends it.
    pub fn start_request(&self) -> ClusterRequest<'_> {
        self.budget.deposit();
        self.metrics.requests.increment(1);
        self.metrics.in_flight.increment(1.0);
        ClusterRequest {
            cluster: self,
            started: Instant::now(),
        }
    }

    /// Classifies a request: the WebAssembly classifier when one is configured (its
    /// failures answered by `on_error`), else the native method + route rules.
    pub fn classify(&self, method: &http::Method, path: &str, host: &str) -> crate::classify::Kind {
        use crate::plugin::OnError;
        let (Some(hook), Some(plugin)) = (&self.cfg.split.classifier, &self.plugins.classifier)
        else {
            return self.classifier.classify(method, path);
        };
        match plugin.classify(method.as_str(), path, host) {
            Ok(kind) => kind,
            Err(_) => match hook.on_error {
                OnError::Fallback => self.classifier.classify(method, path),
                OnError::FailClosed => crate::classify::Kind::Write,
                OnError::FailOpen => crate::classify::Kind::Read,
            },
        }
    }

    /// Counts a write refused because the cluster has no healthy primary.
    pub fn count_write_refused(&self) {
        self.metrics.writes_refused.increment(1);
    }

    /// Name of this cluster's read-your-writes cookie.
    pub fn ryw_cookie_name(&self) -> &str {
        &self.ryw_cookie
    }

    /// A signed read-your-writes token valid until `until_ms` (Unix milliseconds).
    pub fn ryw_token(&self, until_ms: u64) -> String {
        let tag = ring::hmac::sign(
            &self.ryw_key,
            ryw_message(&self.cfg.name, until_ms).as_bytes(),
        );
        format!("{until_ms}.{}", hex(tag.as_ref()))
    }

    /// Whether `token` is a read-your-writes token this cluster signed and still valid at
    /// `now_ms`. Forged, altered, expired or malformed tokens are simply not valid.
    pub fn ryw_valid(&self, token: &str, now_ms: u64) -> bool {
        let Some((until, tag)) = token.split_once('.') else {
            return false;
        };
        let Ok(until_ms) = until.parse::<u64>() else {
            return false;
        };
        if until_ms <= now_ms || tag.len() != 64 {
            return false;
        }
        let Some(tag) = unhex(tag) else { return false };
        ring::hmac::verify(
            &self.ryw_key,
            ryw_message(&self.cfg.name, until_ms).as_bytes(),
            &tag,
        )
        .is_ok()
    }

    /// Asks the retry budget for one retry; counts the retry or the refusal.
    pub fn try_retry(&self) -> bool {
        if self.budget.withdraw() {
            self.metrics.retries.increment(1);
            true
        } else {
            self.metrics.retries_denied.increment(1);
            false
        }
    }
}

fn ryw_message(cluster: &str, until_ms: u64) -> String {
    format!("keyway-ryw\0{cluster}\0{until_ms}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// An in-flight request on a cluster; records its duration when dropped.
pub struct ClusterRequest<'a> {
    cluster: &'a Cluster,
    started: Instant,
}

impl ClusterRequest<'_> {
    /// Time since the request started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for ClusterRequest<'_> {
    fn drop(&mut self) {
        self.cluster.metrics.in_flight.decrement(1.0);
        self.cluster
            .metrics
            .duration
            .record(self.started.elapsed().as_secs_f64());
    }
}

// === impl Budget ===

/// Retry budget over a 10-second window: retries ≤ ratio × requests + min_per_second × 10.
/// Lock-free; the window resets coarsely, which is fine for a bound on retry storms.
struct Budget {
    cfg: RetryBudget,
    epoch: Instant,
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

const BUDGET_WINDOW_SECS: u64 = 10;

impl Budget {
    fn new(cfg: RetryBudget) -> Self {
        Self {
            cfg,
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    fn roll(&self) {
        let now = self.epoch.elapsed().as_secs() / BUDGET_WINDOW_SECS;
        let seen = self.window.load(Ordering::Relaxed);
        if now != seen
            && self
                .window
                .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    fn deposit(&self) {
        self.roll();
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw(&self) -> bool {
        self.roll();
        let requests = self.requests.load(Ordering::Relaxed) as f64;
        let allowed = (requests * self.cfg.ratio) as u64
            + u64::from(self.cfg.min_per_second) * BUDGET_WINDOW_SECS;
        let used = self.retries.fetch_add(1, Ordering::Relaxed);
        if used < allowed {
            true
        } else {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_tokens_are_stable_and_distinct() {
        assert_eq!(sticky_token("psm", "a"), sticky_token("psm", "a"));
        assert_ne!(sticky_token("psm", "a"), sticky_token("psm", "b"));
        assert_ne!(sticky_token("psm", "a"), sticky_token("ps", "ma"));
        assert_eq!(sticky_token("psm", "a").len(), 16);
    }

    #[test]
    fn budget_caps_retries() {
        let b = Budget::new(RetryBudget {
            ratio: 0.5,
            min_per_second: 0,
        });
        for _ in 0..10 {
            b.deposit();
        }
        let granted = (0..20).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 5);
    }
}
