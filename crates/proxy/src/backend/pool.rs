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
    H1(Box<h1::Conn>),
    /// An HTTP/2 connection: shared, multiplexed.
    H2(http2::SendRequest<Body>),
    /// A dedicated HTTP/1.1 connection through hyper's client, never pooled: Upgrade
    /// (WebSocket) requests and health probes.
    Upgrade(http1::SendRequest<Body>),
}

struct Idle {
    conn: Box<h1::Conn>,
    /// When it will have been idle for `idle_timeout` (`None`: past the clock's range,
    /// never). Kept instead of when it went idle, so a check compares two readings
    /// rather than subtracting them.
    expires: Option<Instant>,
}

impl Idle {
    /// Whether it has been idle for less than `idle_timeout` at `now`.
    fn fresh_at(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

/// Idle connections of one backend.
pub struct Pool {
    cfg: PoolConfig,
    /// Per worker ([`crate::workers::current`]; workers past the slots share them):
    /// oldest first, taken from the back (warm), aged out from the front.
    h1: Box<[Mutex<VecDeque<Idle>>]>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    /// The other worker's slot the next return trims, so a worker that stopped using
    /// this backend does not keep its idle connections past `idle_timeout` for ever.
    sweep: std::sync::atomic::AtomicUsize,
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
            sweep: std::sync::atomic::AtomicUsize::new(0),
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
        // One clock reading for the whole look (none when nothing is idle).
        let mut now = None;
        while let Some(mut idle_conn) = idle.pop_back() {
            let now = *now.get_or_insert_with(Instant::now);
            if idle_conn.fresh_at(now) && idle_conn.conn.still_idle() {
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
        let now = Instant::now();
        h2 || self.h1.iter().any(|h1| {
            h1.lock()
                .map(|g| g.iter().any(|c| c.fresh_at(now)))
                .unwrap_or(false)
        })
    }

    /// Returns an HTTP/1.1 connection after its exchange ended cleanly.
    /// Connections idle past `idle_timeout` at the cold end are closed on the way, so a
    /// burst's surplus does not stay open once traffic is back to normal.
    pub fn put_h1(&self, conn: Box<h1::Conn>) {
        let now = Instant::now();
        let here = crate::workers::current() % self.h1.len();
        if let Ok(mut idle) = self.h1[here].lock() {
            self.age_out(&mut idle, now);
            if idle.len() < self.cfg.max_idle {
                idle.push_back(Idle {
                    conn,
                    expires: now.checked_add(self.cfg.idle_timeout),
                });
            }
        }
        // One other worker's slot too, in turn.
        if self.h1.len() > 1 {
            let other = self
                .sweep
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % self.h1.len();
            if other != here {
                if let Ok(mut idle) = self.h1[other].try_lock() {
                    self.age_out(&mut idle, now);
                }
            }
        }
    }

    /// Closes the connections idle past `idle_timeout`, from the cold end.
    fn age_out(&self, idle: &mut VecDeque<Idle>, now: Instant) {
        while idle.front().is_some_and(|c| !c.fresh_at(now)) {
            idle.pop_front();
        }
    }

    pub(crate) fn put_h2(&self, sender: http2::SendRequest<Body>) {
        if let Ok(mut h2) = self.h2.lock() {
            *h2 = Some(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn conn() -> Box<h1::Conn> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(
            tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        std::mem::forget(b.unwrap());
        h1::Conn::new(h1::Stream::Plain(a.unwrap()))
    }

    fn idle(pool: &Pool) -> Vec<usize> {
        pool.h1.iter().map(|s| s.lock().unwrap().len()).collect()
    }

    /// Each worker takes back only the connections it returned, and a worker that stops
    /// using a backend has its idle connections closed past `idle_timeout` by the
    /// returns of the others.
    #[tokio::test]
    async fn each_worker_keeps_its_own_idle_connections_and_stale_ones_are_swept() {
        // At least two slots, whatever the machine's cores.
        let _workers = crate::workers::Workers::start(2).unwrap();
        let pool = Pool::new(PoolConfig {
            max_idle: 8,
            idle_timeout: Duration::from_millis(20),
        });
        assert!(
            pool.h1.len() >= 2,
            "a slot per core, at least two workers started"
        );
        crate::workers::set_current(1);
        pool.put_h1(conn().await);
        crate::workers::set_current(0);
        assert!(
            pool.take().is_none(),
            "worker 0 does not take worker 1's connection"
        );
        assert_eq!(idle(&pool)[..2], [0, 1]);
        // Worker 1 goes quiet; its connection ages past idle_timeout while worker 0's
        // returns go on.
        tokio::time::sleep(Duration::from_millis(60)).await;
        for _ in 0..pool.h1.len() {
            let c = conn().await;
            pool.put_h1(c);
            assert!(pool.take().is_some());
        }
        assert_eq!(idle(&pool)[1], 0, "worker 1's stale connection was swept");
    }
}
