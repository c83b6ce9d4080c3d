//! One backend at run time: its configuration and resolved address, its keep-alive pool
//! and TLS settings, its counters and metric handles, the exchange slots
//! (`max_connections`) with the bounded queue of requests waiting for one, and the
//! sticky-cookie token that pins a client to it, and the clients holding on to it
//! (`holders`).
//!
//! A slot is held by the exchange's [`InFlight`] guard. This module counts and limits;
//! it never connects (see `upstream`) and never decides where a request goes (see
//! `forward`).

mod holders;
mod pool;
mod tls;

pub use holders::{Holders, HOLD_WINDOW};
pub use pool::{Pool, Sender};
pub use tls::BackendTls;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, Counter, Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::balance::Candidate;
use crate::config::{BackendConfig, ClusterConfig};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::health::{ClusterHealth, Fault};
use crate::permit::WriteTicket;

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
    pub tls: Option<BackendTls>,
    /// Position in the cluster's backend list.
    pub index: usize,
    /// Clients its affinity sent to it lately (drains keep them; `/status` counts them).
    pub holders: Holders,
    health: Arc<ClusterHealth>,
    in_flight: AtomicU32,
    requests: AtomicU64,
    connect_errors: AtomicU64,
    responses_5xx: AtomicU64,
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
    pub(crate) fn new(
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
            Some(BackendTls::new(cluster.upstream_ca.as_deref(), &cfg)?)
        } else {
            None
        };
        Ok(Self {
            address,
            sticky_token: sticky_token(&cluster.name, &cfg.id),
            pool: Pool::new(cluster.pool),
            tls,
            index,
            holders: Holders::default(),
            health,
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            responses_5xx: AtomicU64::new(0),
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

    /// Answers with a 5xx status passed on since start (the dashboard's error rate is
    /// these and the connect errors over the requests).
    pub fn responses_5xx(&self) -> u64 {
        self.responses_5xx.load(Ordering::Relaxed)
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
        if idx == 4 {
            self.responses_5xx.fetch_add(1, Ordering::Relaxed);
        }
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
