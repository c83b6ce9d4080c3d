//! One exchange with a backend: the request made ready for it, sent, and the response
//! head awaited; a request hyper hands back unsent is returned for a retry.
//! The waits of an exchange live here too: the protocol timeout, which runs from the end
//! of the upload (a backend is never blamed for a client's slow body), the write lease
//! lapsing while the body is still on its way, and what the client's body had done when
//! the exchange ended.

use super::*;

/// Rewrites URI, version and Host for the connection's HTTP version. An HTTP/1.1
/// request in origin form (the common case) passes untouched.
pub(super) fn prepare_upstream(
    req: &mut Request<Body>,
    sender: &Sender,
    host: &HeaderValue,
    tls: bool,
) {
    match sender {
        Sender::H1(_) | Sender::Upgrade(_) => {
            *req.version_mut() = Version::HTTP_11;
            if req.uri().authority().is_some() {
                let pq = req.uri().path_and_query().cloned();
                let mut parts = http::uri::Parts::default();
                parts.path_and_query =
                    Some(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
                if let Ok(u) = Uri::from_parts(parts) {
                    *req.uri_mut() = u;
                }
            }
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut().insert(header::HOST, host.clone());
            }
        }
        Sender::H2(_) => {
            *req.version_mut() = Version::HTTP_2;
            let pq = req.uri().path_and_query().cloned();
            if let Ok(u) = Uri::builder()
                .scheme(if tls { "https" } else { "http" })
                .authority(host.as_bytes())
                .path_and_query(pq.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")))
                .build()
            {
                *req.uri_mut() = u;
            }
            req.headers_mut().remove(header::HOST);
        }
    }
}

pub(super) type Sent = Response<UpBody>;
pub(super) type SendFailure = (ProxyError, Option<Request<Body>>, Ending);

/// A backend's response body: from keyway's own HTTP/1.1 client, or from hyper's
/// (HTTP/2, upgrades).
pub(super) enum UpBody {
    Own(h1::RespBody),
    Hyper(Incoming),
}

impl HttpBody for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Own(b) => Pin::new(b).poll_frame(cx),
            UpBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Own(b) => b.is_end_stream(),
            UpBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Own(b) => b.size_hint(),
            UpBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// Sends `req` over `sender` and waits for the response head. Dispatches to one future
/// per kind of connection rather than awaiting inside one `async fn`, which would keep
/// the arguments beside the chosen future in every request's state.
/// `extra`: header fields keyway's HTTP/1.1 client writes after the request's own (the
/// forwarded identity); for hyper's clients they are already in the request's map.
pub(super) fn send<'a>(
    sender: Sender,
    req: Request<Body>,
    extra: Option<&'a headers::Added>,
    backend: &'a Arc<Backend>,
    connect_timeout: Duration,
) -> impl Future<Output = Result<Sent, SendFailure>> + 'a {
    use futures_util::future::Either;
    match sender {
        Sender::H1(conn) => Either::Left(send_own(conn, req, extra, backend, connect_timeout)),
        Sender::Upgrade(s) => Either::Right(Either::Left(async move {
            let mut s = s;
            from_hyper(s.try_send_request(req).await)
        })),
        Sender::H2(s) => Either::Right(Either::Right(async move {
            let mut s = s;
            from_hyper(s.try_send_request(req).await)
        })),
    }
}

// Deliberately not an `async fn` (the note inside says why).
#[allow(clippy::manual_async_fn)]
fn send_own<'a>(
    conn: Box<h1::Conn>,
    req: Request<Body>,
    extra: Option<&'a headers::Added>,
    backend: &'a Arc<Backend>,
    connect_timeout: Duration,
) -> impl Future<Output = Result<Sent, SendFailure>> + 'a {
    // Not an `async fn`, which would keep a second copy of the arguments (see `h1::send`).
    async move {
        match h1::send(conn, req, extra).await {
            // The keep-alive race says nothing about the backend: one more try on a fresh
            // connection (boxed: the rare path stays out of every request's future).
            Err(h1::SendError::Stale(req)) => {
                Box::pin(send_again(*req, extra, backend, connect_timeout)).await
            }
            sent => from_own(sent),
        }
    }
}

async fn send_again(
    req: Request<Body>,
    extra: Option<&headers::Added>,
    backend: &Arc<Backend>,
    connect_timeout: Duration,
) -> Result<Sent, SendFailure> {
    tracing::debug!(backend = %backend.cfg.id, "pooled connection closed under a request; sending it again on a new one");
    match upstream::connect_h1(backend, connect_timeout).await {
        Ok(conn) => from_own(h1::send(conn, req, extra).await),
        Err(e) => Err(failed(e, false, Some(req))),
    }
}

/// A failed exchange: `user` when our side failed it (the client's body), and the
/// request when it may be sent again.
fn failed(err: ProxyError, user: bool, unsent: Option<Request<Body>>) -> SendFailure {
    let ending = Ending::Broken {
        user,
        unsent: unsent.is_some(),
    };
    (err, unsent, ending)
}

fn broken_before_answer(e: impl std::fmt::Display) -> ProxyError {
    ProxyError::new(
        ErrorKind::UpstreamProtocol,
        Side::Upstream,
        false,
        format!("backend failed before answering: {e}"),
    )
}

// The same result `send` resolves to (see `from_hyper`).
#[allow(clippy::result_large_err)]
fn from_own(sent: Result<Response<h1::RespBody>, h1::SendError>) -> Result<Sent, SendFailure> {
    match sent {
        Ok(resp) => Ok(resp.map(UpBody::Own)),
        Err(e) => {
            let err = broken_before_answer(&e);
            let (user, unsent) = match e {
                h1::SendError::Unsent(req, _) => (false, Some(*req)),
                // Only a pooled connection is stale, and `send_own` retries those.
                h1::SendError::Stale(req) => (false, Some(*req)),
                h1::SendError::Body(_) => (true, None),
                h1::SendError::Backend(_) => (false, None),
            };
            Err(failed(err, user, unsent))
        }
    }
}

// The same result `send` resolves to; the request handed back for a retry is what makes
// the error large, and it is moved once per failed exchange.
#[allow(clippy::result_large_err)]
fn from_hyper(
    sent: Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>>,
) -> Result<Sent, SendFailure> {
    match sent {
        Ok(resp) => Ok(resp.map(UpBody::Hyper)),
        Err(mut e) => {
            let unsent = e.take_message();
            Err(failed(
                broken_before_answer(e.error()),
                e.error().is_user(),
                unsent,
            ))
        }
    }
}

/// What the client's body had done when an exchange ended.
pub(super) fn body_facts(watch: Option<&BodyWatch>) -> BodyFacts {
    watch.map_or(BodyFacts::NONE, |w| BodyFacts {
        client_failed: w.client_failed(),
        sent: w.sent_at().is_some(),
    })
}

/// Waits for a backend's response head. `limit` is the backend's time to answer once
/// it has the whole request: a body that finished streaming late extends the wait, so a
/// backend is never timed out (and blamed) for a client's slow upload. The wait still
/// ends `limit` after sending began if the body is then still streaming (`None`, as
/// for any timeout; whose fault that is, `Fault::of` decides).
///
/// `timer` is the connection's (see [`h1::Conn::take_timer`]), or made here when it has
/// none; it is left in `timer` for the next exchange. A kept timer is not moved to this
/// exchange's deadline unless it would fire after it: one armed for an earlier exchange
/// fires early, and is only then moved on. A request on a warm connection so costs a
/// clock reading instead of registering and removing a timer.
pub(super) async fn within_protocol_timeout<F: Future>(
    mut fut: Pin<&mut F>,
    limit: Duration,
    body: Option<&BodyWatch>,
    timer: &mut Option<h1::Timer>,
) -> Option<F::Output> {
    let started = tokio::time::Instant::now();
    let mut deadline = started + limit;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if t.deadline() > deadline {
            // Armed for a later moment (an earlier exchange's extended wait, or a longer
            // protocol_timeout before a reload): brought forward to this one's.
            t.as_mut().reset(deadline);
        }
        while t.as_mut().poll(cx).is_ready() {
            if tokio::time::Instant::now() < deadline {
                // An earlier exchange's deadline: moved to this one's, and polled again
                // so that it is registered.
                t.as_mut().reset(deadline);
                continue;
            }
            let sent = body.map_or(Some(started.into_std()), BodyWatch::sent_at);
            match sent.map(|at| tokio::time::Instant::from_std(at) + limit) {
                Some(later) if later > deadline => {
                    deadline = later;
                    t.as_mut().reset(deadline);
                }
                _ => return Poll::Ready(None),
            }
        }
        Poll::Pending
    })
    .await
}

/// Resolves when `permit` runs out while the body is still on its way to the backend;
/// never once the whole body was handed over (the backend has the request).
pub(super) async fn lease_lapses_mid_body(permit: &Permit, body: &BodyWatch) {
    loop {
        if body.sent_at().is_some() {
            return std::future::pending().await;
        }
        if !permit.holds() {
            return;
        }
        // Wake at the deadline itself, and now and then to notice the body ended.
        let wait = permit.remaining().min(Duration::from_millis(200));
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The backend's time to answer starts when it has the whole request.
    #[tokio::test]
    async fn protocol_timeout_runs_from_the_end_of_the_upload() {
        let ms = Duration::from_millis;
        let limit = ms(150);
        let answer = || async move {
            tokio::time::sleep(ms(200)).await;
            7
        };
        // The upload ends at 100 ms; the answer at 200 ms is within 150 ms of it.
        let watch = Arc::new(BodyWatch::new());
        let w = watch.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(100)).await;
            w.mark_sent();
        });
        let a = std::pin::pin!(answer());
        assert_eq!(
            within_protocol_timeout(a, limit, Some(&watch), &mut None).await,
            Some(7)
        );
        // Without a body, sending ended at once: the same answer is late.
        let a = std::pin::pin!(answer());
        assert_eq!(
            within_protocol_timeout(a, limit, None, &mut None).await,
            None
        );
        // A body still streaming when the limit passes is cut.
        let streaming = BodyWatch::new();
        let started = Instant::now();
        let never = std::pin::pin!(std::future::pending::<()>());
        let cut = within_protocol_timeout(never, limit, Some(&streaming), &mut None).await;
        assert_eq!(cut, None);
        assert!(started.elapsed() >= limit);
    }

    /// A timer kept from earlier exchanges serves the next one whatever it was armed
    /// for: one that already fired does not time the new exchange out, one armed for a
    /// later moment does not let it wait past its own deadline, and the timer is left
    /// in the slot for the exchange after.
    #[tokio::test]
    async fn a_kept_timer_serves_the_next_exchange() {
        let ms = Duration::from_millis;
        let limit = ms(300);
        let answer = |after| async move {
            tokio::time::sleep(after).await;
            7
        };
        // Fired long ago (armed for an earlier exchange's deadline).
        let mut slot: Option<h1::Timer> = Some(Box::pin(tokio::time::sleep(ms(0))));
        tokio::time::sleep(ms(5)).await;
        let a = std::pin::pin!(answer(ms(50)));
        assert_eq!(
            within_protocol_timeout(a, limit, None, &mut slot).await,
            Some(7)
        );
        assert!(slot.is_some(), "the timer is kept for the next exchange");
        // Still armed for an earlier, nearer deadline (the previous exchange's): fires
        // first, then waits on for this one.
        slot.as_mut()
            .unwrap()
            .as_mut()
            .reset(tokio::time::Instant::now() + ms(20));
        let a = std::pin::pin!(answer(ms(100)));
        assert_eq!(
            within_protocol_timeout(a, limit, None, &mut slot).await,
            Some(7)
        );
        // Armed for an hour from now: this exchange still ends at its own deadline.
        slot.as_mut()
            .unwrap()
            .as_mut()
            .reset(tokio::time::Instant::now() + ms(3_600_000));
        let started = Instant::now();
        let never = std::pin::pin!(std::future::pending::<()>());
        let waited = tokio::time::timeout(
            ms(10_000),
            within_protocol_timeout(never, limit, None, &mut slot),
        )
        .await;
        assert_eq!(waited, Ok(None), "timed out at protocol_timeout");
        assert!(started.elapsed() >= limit);
    }
}
