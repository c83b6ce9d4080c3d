//! Accepting and serving client connections on an HTTP listener: TLS, PROXY header,
//! HTTP/1.1 or HTTP/2, idle and header timeouts, and activity tracking.
//! It makes no routing decision.

use super::*;
use futures_util::FutureExt as _;
use std::future::Future;

/// What a reload may change on a running listener: certificates and limits. Read once
/// per accepted connection; connections keep the settings they started with.
pub(super) struct ListenerState {
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(super) limits: Arc<crate::config::Limits>,
    pub(super) door: Arc<crate::config::FrontDoorConfig>,
    pub(super) builder: Arc<http_conn::Builder>,
    pub(super) proxy_protocol: proxy_protocol::Accept,
}

impl ListenerState {
    pub(super) fn new(cfg: &ListenerConfig, loaded: &crate::load::Listener) -> Self {
        Self {
            tls: tls::server_config(&loaded.certs).map(tokio_rustls::TlsAcceptor::from),
            limits: Arc::new(cfg.limits.clone()),
            door: Arc::new(cfg.door.clone()),
            builder: Arc::new(http_builder(cfg)),
            proxy_protocol: cfg.proxy_protocol,
        }
    }
}

/// hyper's settings for one listener. Every HTTP/2 limit is set here explicitly (the
/// values and what h2 does beyond them are in `docs/http2-limits.md`), so a dependency
/// upgrade that moves a default cannot loosen what keyway promises.
pub(super) fn http_builder(cfg: &ListenerConfig) -> http_conn::Builder {
    use crate::config::{
        H2_KEEP_ALIVE_INTERVAL, H2_KEEP_ALIVE_TIMEOUT, H2_MAX_CONCURRENT_STREAMS,
        H2_MAX_FRAME_SIZE, H2_MAX_LOCAL_ERROR_RESET_STREAMS, H2_MAX_PENDING_ACCEPT_RESET_STREAMS,
        H2_MAX_SEND_BUF_SIZE,
    };
    let mut builder = http_conn::Builder::new();
    builder
        .http1
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.limits.header_read_timeout)
        .max_buf_size(cfg.limits.max_request_header_bytes);
    builder.own = Some(crate::h1::serve::Settings {
        max_head: cfg.limits.max_request_header_bytes,
        header_read_timeout: cfg.limits.header_read_timeout,
    });
    builder
        .http2
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(cfg.limits.max_request_header_bytes).unwrap_or(u32::MAX),
        )
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_frame_size(H2_MAX_FRAME_SIZE)
        .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

pub(super) async fn accept_loop(
    sock: TcpListener,
    label: String,
    state: Arc<ArcSwap<ListenerState>>,
    limit: Arc<ConnLimit>,
    runtime: Arc<ArcSwap<Runtime>>,
    mut shutdown: watch::Receiver<bool>,
    serving: crate::workers::Serving,
) {
    let open = metrics::gauge!("keyway_downstream_connections", "listener" => label.clone());
    let reached =
        metrics::counter!("keyway_listener_limit_reached_total", "listener" => label.clone());
    // A slot first: at max_connections, stop accepting until a connection closes.
    while let Some((stream, client, slot)) =
        crate::limits::accept_under(&sock, &limit, &reached, &mut shutdown).await
    {
        let current = state.load();
        let conn = Connection {
            builder: current.builder.clone(),
            tls: current.tls.clone(),
            proxy_protocol: current.proxy_protocol,
            runtime: runtime.clone(),
            info: ConnInfo {
                client,
                tls: current.tls.is_some(),
                limits: current.limits.clone(),
                door: current.door.clone(),
                drain: DrainGuard::new(serving.drain.clone(), Some(slot)),
            },
            shutdown: shutdown.clone(),
            open: open.clone(),
        };
        serving
            .workers
            .place(stream, move |stream| conn.serve(stream));
    }
    tracing::info!(listen = %label, "stopped accepting");
}

pub(super) struct Connection {
    pub(super) builder: Arc<http_conn::Builder>,
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(super) proxy_protocol: proxy_protocol::Accept,
    pub(super) runtime: Arc<ArcSwap<Runtime>>,
    pub(super) info: ConnInfo,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) open: metrics::Gauge,
}

impl Connection {
    pub(super) async fn serve(mut self, mut stream: TcpStream) {
        self.open.increment(1.0);
        // Behind an L4 balancer: the PROXY header, read exactly (nothing of the client's
        // own bytes), says who the client is. Without a valid one the connection closes.
        let timeout = self.info.limits.header_read_timeout;
        match proxy_protocol::read_header(&mut stream, self.proxy_protocol, timeout).await {
            Ok(header) => self.info.client = header.client(self.info.client),
            Err(e) => {
                tracing::debug!(peer = %self.info.client, error = %e, "connection closed: no valid PROXY header");
                metrics::counter!("keyway_proxy_protocol_rejected_total").increment(1);
                self.open.decrement(1.0);
                return;
            }
        }
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: stream,
            activity: activity.clone(),
        };
        match self.tls.clone() {
            None => self.serve_io(io, activity).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.info.limits.header_read_timeout, acceptor.accept(io))
                        .await;
                match handshake {
                    Ok(Ok(tls)) => self.serve_io(tls, activity).await,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %self.info.client, error = %e, "TLS handshake failed");
                        self.open.decrement(1.0);
                    }
                    Err(_) => {
                        tracing::debug!(client = %self.info.client, "TLS handshake timed out");
                        self.open.decrement(1.0);
                    }
                }
            }
        }
    }

    pub(super) async fn serve_io<IO>(self, io: IO, activity: Arc<Activity>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            builder,
            runtime,
            info,
            mut shutdown,
            open,
            ..
        } = self;
        let idle_timeout = info.limits.idle_timeout;
        let info_client = info.client;
        // Shared by every request on this connection: one reference count per request
        // instead of one per field.
        let info = Arc::new(info);
        let svc_activity = activity.clone();
        let (own_rt, own_info, own_activity) = (runtime.clone(), info.clone(), activity.clone());
        let own = move |req| -> http_conn::OwnAnswer {
            let rt = own_rt.load_full();
            let info = own_info.clone();
            let guard = RequestGuard::new(own_activity.clone());
            pin_in_place(|| Guarded::new(forward::handle(rt, info, req), guard))
        };
        let service = service_fn(move |req| {
            let rt = runtime.load_full();
            let info = info.clone();
            let guard = RequestGuard::new(svc_activity.clone());
            // Boxed: hyper keeps a slot for the request future in every connection,
            // idle ones included, so an inline future would cost its full size (a few
            // KiB) per idle connection; boxed, it costs a pointer until a request comes.
            pin_in_place(|| Guarded::new(forward::handle(rt, info, req), guard).never_error())
        });
        let conn = builder.serve(io, service, own);
        tokio::pin!(conn);
        let mut draining = false;
        // Idle check: every quarter of the timeout, see whether any byte moved or any
        // request is in flight; a connection with neither for the whole timeout closes.
        let tick = (idle_timeout / 4).max(Duration::from_millis(10));
        let mut last_io = activity.io();
        let mut quiet = Duration::ZERO;
        let mut next_check = tokio::time::Instant::now() + tick;
        // An idle connection gets one more tick to say goodbye (GOAWAY, a finished
        // response); one that still has not ended (its peer stopped reading, so nothing
        // can be written) is dropped then, instead of being held for ever. The same timer
        // serves both: the next check, then (once idle) that last tick's end.
        let mut idle_close = false;
        let timer = tokio::time::sleep_until(next_check);
        tokio::pin!(timer);
        let shutdown = shutdown.changed();
        tokio::pin!(shutdown);
        // The connection is polled on every wake-up of this task; the shutdown signal and
        // the timer only when one of them woke it (they fire a few times a minute, the
        // connection thousands of times a second).
        let side = Arc::new(SideWake::default());
        let side_waker = std::task::Waker::from(side.clone());
        loop {
            let turn = std::future::poll_fn(|cx| {
                if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Turn::Ended(res));
                }
                if !side.fired(cx.waker()) {
                    return Poll::Pending;
                }
                let mut side_cx = Context::from_waker(&side_waker);
                if !draining && shutdown.as_mut().poll(&mut side_cx).is_ready() {
                    return Poll::Ready(Turn::Shutdown);
                }
                if (!draining || idle_close) && timer.as_mut().poll(&mut side_cx).is_ready() {
                    return Poll::Ready(Turn::Timer);
                }
                Poll::Pending
            })
            .await;
            // Whatever happened, both are looked at again on the next turn.
            side.rearm();
            match turn {
                Turn::Ended(res) => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    break;
                }
                Turn::Shutdown => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                Turn::Timer if idle_close => {
                    tracing::debug!(client = %info_client, "idle client connection did not close gracefully; dropped");
                    break;
                }
                Turn::Timer => {
                    next_check += tick;
                    let io = activity.io();
                    if io != last_io || activity.in_flight() > 0 {
                        last_io = io;
                        quiet = Duration::ZERO;
                    } else {
                        quiet += tick;
                        if quiet >= idle_timeout {
                            draining = true;
                            idle_close = true;
                            next_check = tokio::time::Instant::now() + tick;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    timer.as_mut().reset(next_check);
                }
            }
        }
        open.decrement(1.0);
    }
}

/// `make()` in a new pinned box. The room is allocated first and the value written into
/// it, which lets the compiler build it there: `Box::pin(make())` builds it on the stack
/// and copies it, and a request's future is a few KiB.
#[inline(always)]
fn pin_in_place<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let room = Box::<F>::new_uninit();
    Box::into_pin(Box::write(room, make()))
}

/// What woke a connection's task: the connection ended, or one of its side events.
enum Turn<E> {
    Ended(Result<(), E>),
    Shutdown,
    Timer,
}

/// The waker given to a task's rarely ready futures (a shutdown signal, an idle timer):
/// it notes that it fired before waking the task, so the task polls those futures only
/// when one of them can have something to say.
struct SideWake {
    fired: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl Default for SideWake {
    /// Fired: the side futures are polled (and so registered) on the first turn.
    fn default() -> Self {
        Self {
            fired: AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        }
    }
}

impl SideWake {
    /// Whether a side future woke the task since the last call; `task` is what a side
    /// wake-up wakes from now on. Registered before the flag is read, so a wake-up that
    /// lands in between is seen on the next turn.
    fn fired(&self, task: &std::task::Waker) -> bool {
        self.task.register(task);
        self.fired.swap(false, Ordering::AcqRel)
    }

    /// Makes the next turn poll the side futures (after one of them completed or was
    /// reset).
    fn rearm(&self) {
        self.fired.store(true, Ordering::Release);
    }
}

impl std::task::Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

// === activity tracking for idle timeouts ===

/// I/O progress and requests in flight on one client connection. Counting I/O calls
/// instead of reading the clock keeps the per-read cost to one relaxed increment.
pub(super) struct Activity {
    pub(super) io: AtomicU64,
    pub(super) in_flight: AtomicU32,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            io: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
        }
    }

    pub(super) fn touch(&self) {
        self.io.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn io(&self) -> u64 {
        self.io.load(Ordering::Relaxed)
    }

    pub(super) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

pub(super) struct RequestGuard(Arc<Activity>, crate::workers::Handling);

impl RequestGuard {
    pub(super) fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(a, crate::workers::Handling::enter())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pin_project_lite::pin_project! {
    /// A request's future that ends its [`RequestGuard`] when it completes. A named
    /// future rather than an `async` block around the request's, which would keep the
    /// request a second time beside the future that already holds it.
    pub(super) struct Guarded<F> {
        #[pin]
        fut: F,
        guard: Option<RequestGuard>,
    }
}

impl<F> Guarded<F> {
    pub(super) fn new(fut: F, guard: RequestGuard) -> Self {
        Self {
            fut,
            guard: Some(guard),
        }
    }
}

impl<F: std::future::Future> std::future::Future for Guarded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        this.guard.take();
        Poll::Ready(out)
    }
}

pin_project_lite::pin_project! {
    /// A socket that records when bytes last moved.
    struct Tracked<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Wake, Waker};

    /// A request's guard counts it as handled on this thread (what decides whether its
    /// sends wait behind the turn's ready tasks) for as long as it lives.
    #[test]
    fn a_request_counts_as_handled_on_its_thread_while_its_guard_lives() {
        let activity = Arc::new(Activity::new());
        assert!(!crate::workers::others_handling(false));
        let first = RequestGuard::new(activity.clone());
        assert!(crate::workers::others_handling(false));
        assert!(!crate::workers::others_handling(true));
        let second = RequestGuard::new(activity.clone());
        assert!(crate::workers::others_handling(true));
        assert_eq!(activity.in_flight(), 2);
        drop(first);
        drop(second);
        assert!(!crate::workers::others_handling(false));
        assert_eq!(activity.in_flight(), 0);
    }

    /// Counts how often it is woken.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The first turn polls the side futures; later turns only after a side future woke
    /// the task (and that wake-up reaches the task), or after `rearm`.
    #[test]
    fn side_futures_are_polled_only_after_they_woke_the_task() {
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let side = Arc::new(SideWake::default());
        let side_waker = Waker::from(side.clone());

        assert!(side.fired(&task_waker), "the first turn registers them");
        assert!(
            !side.fired(&task_waker),
            "the connection woke the task, not them"
        );
        assert!(!side.fired(&task_waker));

        side_waker.wake_by_ref();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "a side wake-up wakes the task"
        );
        assert!(side.fired(&task_waker));
        assert!(!side.fired(&task_waker), "seen once");

        side.rearm();
        assert!(side.fired(&task_waker), "rearmed after a side event");
        assert!(!side.fired(&task_waker));

        // The task waker in use is the one of the latest turn.
        let moved = Arc::new(Count::default());
        assert!(!side.fired(&Waker::from(moved.clone())));
        side_waker.wake();
        assert_eq!(moved.0.load(Ordering::SeqCst), 1);
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
    }
}
