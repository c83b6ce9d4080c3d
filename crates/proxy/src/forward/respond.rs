//! The response on its way back: cookies (sticky, read-your-writes), the upgraded
//! tunnel, and the streamed body that returns the connection to the pool when it ends.
//! It never buffers a whole body.

use super::*;

/// What `respond` needs besides the response.
pub(super) struct Answer {
    pub(super) pinned: Option<usize>,
    pub(super) idx: usize,
    pub(super) kind: Option<Kind>,
    pub(super) inflight: InFlight,
    pub(super) on_client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    pub(super) watch: Option<Arc<BodyWatch>>,
}

pub(super) fn respond(
    cluster: &Cluster,
    backend: &Arc<Backend>,
    info: &ConnInfo,
    mut resp: Response<UpBody>,
    answer: Answer,
    permit: &Arc<Permit>,
) -> Response<Body> {
    let Answer {
        pinned,
        idx,
        kind,
        inflight,
        on_client_upgrade,
        watch,
    } = answer;
    let status = resp.status();
    backend.record_response(status.as_u16());
    backend.report_answer(Fault::of(
        Ending::Answered(status.as_u16()),
        body_facts(watch.as_deref()),
        cluster.cfg.outlier.count_5xx,
    ));
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let on_backend_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, switching);
    headers::append_via(&mut parts.headers, "1.1 keyway");
    // Writes do not re-pin: the client's read session stays on its replica.
    if let Some(s) = cluster
        .cfg
        .sticky
        .as_ref()
        .filter(|_| kind != Some(Kind::Write))
    {
        if pinned != Some(idx) {
            if let Some(v) =
                headers::affinity_cookie(&s.cookie, &backend.sticky_token, s.max_age, info.tls)
            {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
    }

    // Read-your-writes: after a successful write, this client's reads go to the primary.
    if let (Some(Kind::Write), Some(window)) = (kind, cluster.cfg.split.read_your_writes) {
        if status.as_u16() < 400 {
            let token = cluster.ryw_token(
                crate::unix_ms(std::time::SystemTime::now()) + window.as_millis() as u64,
            );
            let cookie = format!(
                "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
                cluster.ryw_cookie_name(),
                window.as_secs().max(1),
                if info.tls { "; Secure" } else { "" }
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
    }

    if let (Some(client), Some(server)) = (on_client_upgrade, on_backend_upgrade) {
        tunnel(
            client,
            server,
            inflight,
            info.drain.clone(),
            backend.cfg.id.clone(),
            (kind == Some(Kind::Write)).then(|| permit.clone()),
        );
        return Response::from_parts(parts, body::empty());
    }

    let body = if incoming.is_end_stream() {
        if let UpBody::Own(mut b) = incoming {
            if let Some(conn) = b.take_reusable() {
                backend.pool.put_h1(conn);
            }
        }
        drop(inflight);
        body::empty()
    } else {
        UpstreamBody {
            inner: incoming,
            inflight,
            watch,
        }
        .boxed()
    };
    Response::from_parts(parts, body)
}

/// Joins the client and backend ends of an upgraded connection and copies bytes both ways.
/// A tunnel classified as a write (`write_permit`) is closed when this instance's write
/// lease runs out: it must not outlive the permission to write to that primary.
pub(super) fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    inflight: InFlight,
    drain: crate::limits::DrainGuard,
    backend: String,
    write_permit: Option<Arc<Permit>>,
) {
    tokio::spawn(async move {
        let _inflight = inflight;
        let _drain = drain;
        match tokio::try_join!(client, server) {
            Ok((c, s)) => {
                let mut c = TokioIo::new(c);
                let mut s = TokioIo::new(s);
                let lapse = async {
                    match &write_permit {
                        Some(p) => lease_lapses(p).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut s) => match r {
                        Ok((up, down)) => tracing::debug!(%backend, up, down, "tunnel closed"),
                        Err(e) => tracing::debug!(%backend, error = %e, "tunnel ended"),
                    },
                    () = lapse => tracing::warn!(%backend, "write tunnel closed: this instance lost its write lease"),
                }
            }
            Err(e) => tracing::debug!(%backend, error = %e, "upgrade failed"),
        }
    });
}

/// A backend's response body on its way to the client. When it ends cleanly, the
/// HTTP/1.1 connection returns to the pool; dropping it early (the client went away)
/// discards the connection and counts against nobody. A body the backend breaks off
/// counts against the backend.
struct UpstreamBody {
    inner: UpBody,
    inflight: InFlight,
    watch: Option<Arc<BodyWatch>>,
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(e))) => {
                let fault = Fault::of(Ending::BodyBroken, body_facts(this.watch.as_deref()), false);
                this.inflight
                    .backend()
                    .report_failure(fault, &format!("response body broke off: {e}"));
                false
            }
            Poll::Pending => false,
        };
        if done {
            if let UpBody::Own(b) = &mut this.inner {
                if let Some(conn) = b.take_reusable() {
                    this.inflight.backend().pool.put_h1(conn);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once `permit` has run out (never for a single instance's permit).
async fn lease_lapses(permit: &Permit) {
    if !permit.is_coordinated() {
        return std::future::pending().await;
    }
    while permit.holds() {
        tokio::time::sleep(permit.remaining().max(Duration::from_millis(1))).await;
    }
}
