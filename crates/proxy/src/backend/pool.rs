//! A backend's keep-alive pool: idle HTTP/1.1 senders (LIFO, so warm connections are
//! reused and cold ones age out past `idle_timeout`) and the one shared HTTP/2 sender.
//!
//! A connection is a hyper client `SendRequest` whose connection task runs on its own.
//! The pool is our own rather than hyper-util's because an `ordered` cluster races
//! connections to *different* backends and keeps the winner, which a pool keyed by URI
//! cannot express. It only keeps connections others made (`upstream` connects); it
//! never opens one and never keeps more than `max_idle` idle HTTP/1.1 senders.

use std::sync::Mutex;
use std::time::Instant;

use hyper::client::conn::{http1, http2};

use crate::body::Body;
use crate::config::PoolConfig;

/// A ready-to-use connection to a backend.
pub enum Sender {
    /// An HTTP/1.1 connection: one request at a time.
    H1(http1::SendRequest<Body>),
    /// An HTTP/2 connection: shared, multiplexed.
    H2(http2::SendRequest<Body>),
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Idle connections of one backend.
pub struct Pool {
    cfg: PoolConfig,
    h1: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            cfg,
            h1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// A live idle connection, if there is one.
    pub(crate) fn take(&self) -> Option<Sender> {
        if let Ok(h2) = self.h2.lock() {
            if let Some(s) = h2.as_ref().filter(|s| !s.is_closed()) {
                return Some(Sender::H2(s.clone()));
            }
        }
        let mut idle = self.h1.lock().ok()?;
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.cfg.idle_timeout {
                return Some(Sender::H1(conn.sender));
            }
        }
        None
    }

    /// Whether an idle connection is available right now.
    pub fn has_idle(&self) -> bool {
        let h2 = self
            .h2
            .lock()
            .map(|g| g.as_ref().is_some_and(|s| !s.is_closed()))
            .unwrap_or(false);
        h2 || self
            .h1
            .lock()
            .map(|g| g.iter().any(|c| !c.sender.is_closed()))
            .unwrap_or(false)
    }

    /// Returns an HTTP/1.1 connection after its response completed.
    pub fn put_h1(&self, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.h1.lock() {
            if idle.len() < self.cfg.max_idle {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    pub(crate) fn put_h2(&self, sender: http2::SendRequest<Body>) {
        if let Ok(mut h2) = self.h2.lock() {
            *h2 = Some(sender);
        }
    }
}
