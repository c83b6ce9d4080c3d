//! Worker threads, one runtime each: `workers = N` serves connections on N
//! single-threaded tokio runtimes, the one keyway starts on (which also runs the control
//! plane: probers, failover, the admin API) and N-1 more, each on a thread of its own.
//!
//! Listeners accept on the starting runtime and place each connection on the worker with
//! the fewest open connections (as HAProxy does with `nbthread`). A connection stays on its
//! worker until it closes: its requests, upstream exchanges, timers and classifier
//! instance never cross a thread, so the request path takes no cross-thread wake-up and
//! no work-stealing queue. This module never blocks a worker and never moves a
//! connection once placed.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker: 0 for the runtime keyway starts on (and any thread that is
    /// not a worker), I for `keyway-worker-I`.
    static WORKER: Cell<usize> = const { Cell::new(0) };
    /// Requests this thread is handling: from the request head read to the answer's head
    /// (see [`Handling`]).
    static HANDLING: Cell<u32> = const { Cell::new(0) };
}

/// Counts one request as handled on this thread while it lives (the server holds one
/// per request, beside the connection's in-flight count). A send that would wait behind
/// the turn's other ready tasks asks [`others_handling`] first: with no other request on
/// the thread there is nothing to wait for, and the wait (one more poll of the request's
/// future) is skipped.
///
/// Every runtime that serves connections is single-threaded, so a guard is dropped on
/// the thread that made it; were one dropped elsewhere, the counts would only be off
/// (never below zero), which changes when sends wait, never what they send.
pub(crate) struct Handling(());

impl Handling {
    pub(crate) fn enter() -> Self {
        HANDLING.with(|n| n.set(n.get().saturating_add(1)));
        Self(())
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        HANDLING.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Whether this thread handles requests other than the caller's: `own` says whether
/// the caller's own request still holds its [`Handling`].
pub(crate) fn others_handling(own: bool) -> bool {
    HANDLING.with(Cell::get) > u32::from(own)
}

/// How many tasks a worker runs before it asks the poller for new events (tokio's
/// default is 61). A turn under load has a task per ready connection, each polled two or
/// three times per request (read, the pause before the answer, write); asking the poller
/// in the middle of that starts the next turn's reads between this turn's writes, and
/// the peers, woken by each write on its own, fall asleep between them. With 256, wrk
/// at 256 connections got 5.9% more requests through one worker and keyway woke its
/// peers 0.137 instead of 0.187 times per request (an A/B of two instances of one
/// binary, three alternating rounds); 1024 measured the same as 256.
const TASKS_BETWEEN_IO_POLLS: u32 = 256;

/// A runtime that serves connections: single-threaded, running `TASKS_BETWEEN_IO_POLLS`
/// (256) tasks between polls for new I/O events.
/// Every worker's, the first included (the one keyway starts on, built by the binary):
/// with `workers = 1` that one serves every connection.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .event_interval(TASKS_BETWEEN_IO_POLLS)
        .enable_all()
        .build()
}

/// The most workers started in this process, at least one per core: how many slots a
/// per-worker structure (a backend's pool) makes.
static SLOTS: AtomicUsize = AtomicUsize::new(0);

/// The worker this code runs on.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Makes this thread count as worker `i` (tests of per-worker structures).
#[cfg(test)]
pub(crate) fn set_current(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// How many per-worker slots to make: one per core, or more if more workers started.
pub fn slots() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    SLOTS.load(Ordering::Relaxed).max(cores)
}

/// What every accept loop hands its connections to: the workers, and the drain that
/// shutdown waits on (each connection holds a sender until it closes).
#[derive(Clone)]
pub(crate) struct Serving {
    pub(crate) workers: Arc<Workers>,
    pub(crate) drain: tokio::sync::mpsc::Sender<()>,
}

/// The workers connections are placed on.
pub struct Workers {
    workers: Vec<Worker>,
    /// Where the next search for the least busy worker starts, so ties rotate.
    next: AtomicUsize,
}

struct Worker {
    /// `None`: the runtime that accepts (worker 0).
    handle: Option<Handle>,
    open: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
    /// Dropped with the workers: the thread's runtime returns and drops its tasks.
    _stop: Option<oneshot::Sender<()>>,
}

impl Workers {
    /// Only the runtime the listeners accept on.
    pub fn here() -> Arc<Self> {
        Self::start(1).expect("one worker starts no thread")
    }

    /// `n` workers (at least one): the accepting runtime and `n - 1` threads, each
    /// running a single-threaded runtime named `keyway-worker-I`.
    pub fn start(n: usize) -> std::io::Result<Arc<Self>> {
        SLOTS.fetch_max(n, Ordering::Relaxed);
        // The workers' gauges go to the process's recorder, installed by its first use.
        crate::telemetry::metrics_handle();
        let mut workers = vec![Worker::new(0, None, None)];
        for i in 1..n.max(1) {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("keyway-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    let rt = match runtime() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            let handle = ready_rx.recv().map_err(|_| {
                std::io::Error::other(format!(
                    "worker thread {i} ended before its runtime started"
                ))
            })??;
            workers.push(Worker::new(i, Some(handle), Some(stop_tx)));
        }
        Ok(Arc::new(Self {
            workers,
            next: AtomicUsize::new(0),
        }))
    }

    /// How many workers serve connections.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least the accepting runtime.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Open connections per worker, in worker order.
    pub fn open(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Serves `stream` with `serve` on the worker with the fewest open connections.
    /// Called on the accepting runtime. A connection placed on another worker leaves
    /// this runtime's poller and joins that worker's; if that fails, it is closed and
    /// logged.
    pub fn place<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let w = &self.workers[self.least_busy()];
        let open = Open::new(w.open.clone(), w.gauge.clone());
        let Some(handle) = &w.handle else {
            tokio::spawn(async move {
                let _open = open;
                serve(stream).await
            });
            return;
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to its worker; closed");
                return;
            }
        };
        handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "a worker cannot poll a connection; closed"),
            }
        });
    }

    fn least_busy(&self) -> usize {
        let n = self.workers.len();
        if n == 1 {
            return 0;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.workers[i].open.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

impl Worker {
    fn new(i: usize, handle: Option<Handle>, stop: Option<oneshot::Sender<()>>) -> Self {
        Self {
            handle,
            open: Arc::new(AtomicUsize::new(0)),
            gauge: metrics::gauge!("keyway_worker_connections", "worker" => i.to_string()),
            _stop: stop,
        }
    }
}

/// A connection counted on its worker until it closes.
struct Open {
    count: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl Open {
    fn new(count: Arc<AtomicUsize>, gauge: metrics::Gauge) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1.0);
        Self { count, gauge }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections go to the least busy worker, each runs on its worker's thread, and a
    /// closed connection frees its place.
    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_and_run_on_its_thread() {
        let workers = Workers::start(3).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        let mut names = Vec::new();
        for _ in 0..6 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen_tx.clone();
            workers.place(stream, move |mut s| async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                let _ = seen.send(name);
                // Hold the connection open until the client closes it.
                let mut buf = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            });
            // Placed and running before the next one is placed.
            names.push(seen_rx.recv().await.unwrap());
        }
        assert_eq!(workers.open(), vec![2, 2, 2]);
        for i in 1..3 {
            let on = names
                .iter()
                .filter(|n| **n == format!("keyway-worker-{i}"))
                .count();
            assert_eq!(
                on, 2,
                "two connections run on worker {i}'s thread: {names:?}"
            );
        }
        drop(clients.pop());
        for _ in 0..200 {
            if workers.open().iter().sum::<usize>() == 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(workers.open().iter().sum::<usize>(), 5);
        // The next connection goes where one closed.
        let before = workers.open();
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (stream, _) = listener.accept().await.unwrap();
        let seen = seen_tx.clone();
        workers.place(stream, move |_s| async move {
            let _ = seen.send(std::thread::current().name().unwrap_or("").to_string());
            std::future::pending::<()>().await
        });
        let name = seen_rx.recv().await.unwrap();
        let freed = before.iter().position(|&n| n == 1).unwrap();
        assert_eq!(workers.open(), vec![2, 2, 2]);
        if freed > 0 {
            assert_eq!(name, format!("keyway-worker-{freed}"));
        }
    }
}
