//! A cluster at run time: its backends (see `backend`), balancer, classifier, health,
//! write gate, retry budget, read-your-writes tokens and request metrics, built from a
//! `ClusterConfig` and the loader's [`ClusterParts`]. Shared read-only by every request
//! (`Arc`); per-request state lives in atomics. It decides nothing about where a
//! request goes (see `forward`) and performs no I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, Counter, Gauge};

use crate::balance::Balancer;
use crate::classify::Classifier;
use crate::config::{ClusterConfig, RetryBudget};
use crate::health::ClusterHealth;
use crate::health::HealthPlugin;
use crate::permit::WriteGate;
use crate::plugin::ClassifierPlugin;

pub use crate::backend::{sticky_token, Backend, InFlight, Slot};

/// A cluster's resolved backend addresses and compiled plugins.
#[derive(Clone, Debug, Default)]
pub struct ClusterParts {
    /// Per backend, in config order: where to connect.
    pub addresses: Vec<std::net::SocketAddr>,
    /// The health-policy plugin, when `health.policy` names one.
    pub health: Option<Arc<HealthPlugin>>,
    /// The request classifier, when `classifier` is set.
    pub classifier: Option<Arc<ClassifierPlugin>>,
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
    /// See [`Cluster::plain_http1`].
    plain_http1: bool,
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
    duration: Arc<crate::telemetry::Latency>,
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
        // Plain backends not set to HTTP/2, and TLS backends set to HTTP/1.1 (which offer
        // no `h2` by ALPN).
        let plain_http1 = backends.iter().all(|b| match b.cfg.protocol {
            crate::config::UpstreamProtocol::Http1 => true,
            crate::config::UpstreamProtocol::Auto => b.tls.is_none(),
            crate::config::UpstreamProtocol::Http2 => false,
        });
        Ok(Self {
            plain_http1,
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
                duration: crate::telemetry::request_latency(&cfg.name),
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
    /// One clock reading serves the budget's window and the request's start.
    pub fn start_request(&self) -> ClusterRequest<'_> {
        let now = Instant::now();
        self.budget.deposit(now);
        self.metrics.requests.increment(1);
        self.metrics.in_flight.increment(1.0);
        ClusterRequest {
            cluster: self,
            started: now,
        }
    }

    /// Whether every request connection of this cluster is keyway's own HTTP/1.1
    /// client (decided once, when the cluster is built).
    pub fn plain_http1(&self) -> bool {
        self.plain_http1
    }

    /// Classifies a request: the WebAssembly classifier when one is configured (its
    /// failures answered by `on_error`), else the native method + route rules.
    pub fn classify(&self, method: &http::Method, path: &str, host: &str) -> crate::classify::Kind {
        use crate::config::OnError;
        let (Some(hook), Some(plugin)) = (&self.cfg.split.classifier, &self.plugins.classifier)
        else {
            return self.classifier.classify(method, path);
        };
        let answer = if hook.remember_answers {
            plugin.classify(method.as_str(), path, host)
        } else {
            plugin.classify_each_time(method.as_str(), path, host)
        };
        match answer {
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
        if self.budget.withdraw(Instant::now()) {
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
        self.cluster.metrics.duration.record(self.started.elapsed());
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

    fn roll(&self, now: Instant) {
        let now = now.saturating_duration_since(self.epoch).as_secs() / BUDGET_WINDOW_SECS;
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

    fn deposit(&self, now: Instant) {
        self.roll(now);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw(&self, now: Instant) -> bool {
        self.roll(now);
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
        let now = Instant::now();
        for _ in 0..10 {
            b.deposit(now);
        }
        let granted = (0..20).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 5);
    }
}
