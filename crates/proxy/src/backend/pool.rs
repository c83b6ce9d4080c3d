//! A backend's keep-alive pool: idle HTTP/1.1 connections (LIFO, so warm connections
//! are reused and cold ones age out past `idle_timeout`) and the one shared HTTP/2 sender.
//!
//! An HTTP/1.1 connection is keyway's own client ([`crate::h1::Conn`]), driven by the
//! request that uses it; checking one out looks for an EOF or stray bytes first. An
//! HTTP/2 one is a hyper `SendRequest` whose connection task runs on its own.
//! HTTP/1.1 connections are kept per worker: a connection is registered with the poller
//! of the worker that made it, so only that worker takes it again (another would wait on
//! a poller that is not its own, and could miss a close that poller has not seen yet).
//! The pool is our own rather than hyper-util's because an `ordered` cluster races
//! connections to *different* backends and keeps the winner, which a pool keyed by URI
//! cannot express. It only keeps connections others made (`upstream` connects); it
//! never opens one and never keeps more than `max_idle` idle HTTP/1.1 connections.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use hyper::client::conn::{http1, http2};

use crate::body::Body;
use crate::config::PoolConfig;
use crate::h1;

/// A ready-to-use connection to a backend.
pub enum Sender {
    /// An HTTP/1.1 connection for ordinary requests: one request at a time, pooled.
    H1(h1::Conn),
    /// An HTTP/2 connection: shared, multiplexed.
    H2(http2::SendRequest<Body>),
    /// A dedicated HTTP/1.1 connection through hyper's client, never pooled: Upgrade
    /// (WebSocket) requests and health probes.
    Upgrade(http1::SendRequest<Body>),
}

struct Idle {
    conn: h1::Conn,
    since: Instant,
}

/// Idle connections of one backend.
pub struct Pool {
    cfg: PoolConfig,
    /// Per worker ([`crate::workers::current`]; workers past the slots share them):
    /// oldest first, taken from the back (warm), aged out from the front.
    h1: Box<[Mutex<VecDeque<Idle>>]>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            cfg,
            h1: (0..crate::workers::slots())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
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
        let mut idle = self.here().lock().ok()?;
        while let Some(mut idle_conn) = idle.pop_back() {
            if idle_conn.since.elapsed() < self.cfg.idle_timeout && idle_conn.conn.still_idle() {
                idle_conn.conn.set_reused();
                return Some(Sender::H1(idle_conn.conn));
            }
        }
        None
    }

    /// This worker's idle HTTP/1.1 connections.
    fn here(&self) -> &Mutex<VecDeque<Idle>> {
        &self.h1[crate::workers::current() % self.h1.len()]
    }

    /// Whether an idle connection is available right now, on any worker.
    pub fn has_idle(&self) -> bool {
        let h2 = self
            .h2
            .lock()
            .map(|g| g.as_ref().is_some_and(|s| !s.is_closed()))
            .unwrap_or(false);
        h2 || self.h1.iter().any(|h1| {
            h1.lock()
                .map(|g| g.iter().any(|c| c.since.elapsed() < self.cfg.idle_timeout))
                .unwrap_or(false)
        })
    }

    /// Returns an HTTP/1.1 connection after its exchange ended cleanly.
    /// Connections idle past `idle_timeout` at the cold end are closed on the way, so a
    /// burst's surplus does not stay open once traffic is back to normal.
    pub fn put_h1(&self, conn: h1::Conn) {
        if let Ok(mut idle) = self.here().lock() {
            let now = Instant::now();
            while idle
                .front()
                .is_some_and(|c| now.duration_since(c.since) >= self.cfg.idle_timeout)
            {
                idle.pop_front();
            }
            if idle.len() < self.cfg.max_idle {
                idle.push_back(Idle { conn, since: now });
            }
        }
    }

    pub(crate) fn put_h2(&self, sender: http2::SendRequest<Body>) {
        if let Ok(mut h2) = self.h2.lock() {
            *h2 = Some(sender);
        }
    }
}
