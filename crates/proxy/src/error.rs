//! The one error type of the request path, and its one mapping to an HTTP answer.
//!
//! Every failure between accepting a request and streaming its response becomes a
//! [`ProxyError`]: what happened ([`ErrorKind`]), on which side ([`Side`]) and whether
//! the request may be tried again on another backend. [`ProxyError::into_response`] is
//! the only place that chooses a status code and writes the `application/problem+json`
//! body. Nothing here may panic: it runs on adversarial input.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// Which side of the proxy a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client: bad request, too large, went away.
    Downstream,
    /// A backend: refused, timed out, broke the protocol.
    Upstream,
    /// keyway itself: no route, no backend left, retry budget spent.
    Internal,
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route matches the host and path.
    NoRoute,
    /// Connecting to a backend failed (refused, unreachable, TLS handshake).
    ConnectFailed,
    /// Connecting to a backend did not finish within `connect_timeout`.
    ConnectTimeout,
    /// The backend did not send response headers within `protocol_timeout`.
    ProtocolTimeout,
    /// The backend closed or broke the connection before answering.
    UpstreamProtocol,
    /// Every backend was tried (or none is usable).
    NoBackendAvailable,
    /// A write while this instance does not hold its write permit (its etcd lease may
    /// have expired): another instance may be promoting, so no primary is trusted.
    CoordinationLost,
    /// The backend carries `max_connections` exchanges and its queue was full, or no
    /// slot came free within `queue_timeout`. Nothing reached the backend.
    BackendBusy,
    /// The request body exceeded `max_request_body_bytes`.
    BodyTooLarge,
    /// The client's request was malformed or its body failed mid-stream.
    BadRequest,
    /// The method is never forwarded (`CONNECT`, `TRACE` unless allowed).
    MethodNotAllowed,
}

/// A request-path failure.
#[derive(Debug)]
pub struct ProxyError {
    /// What happened.
    pub kind: ErrorKind,
    /// Where it came from.
    pub side: Side,
    /// Whether the request is known not to have reached a backend's application, so it
    /// may be sent to another backend whatever its method.
    pub retryable: bool,
    /// Human-readable detail (backend id, OS error...).
    pub detail: String,
}

impl ProxyError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, side: Side, retryable: bool, detail: impl Into<String>) -> Self {
        Self {
            kind,
            side,
            retryable,
            detail: detail.into(),
        }
    }

    /// The status this error answers with. The single place status codes are chosen.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::ConnectFailed | ErrorKind::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ErrorKind::NoBackendAvailable
            | ErrorKind::BackendBusy
            | ErrorKind::CoordinationLost => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ConnectTimeout | ErrorKind::ProtocolTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short machine-readable reason, used in the problem body and metrics.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            ErrorKind::NoRoute => "no-route",
            ErrorKind::ConnectFailed => "connect-failed",
            ErrorKind::ConnectTimeout => "connect-timeout",
            ErrorKind::ProtocolTimeout => "protocol-timeout",
            ErrorKind::UpstreamProtocol => "upstream-protocol-error",
            ErrorKind::NoBackendAvailable => "no-backend-available",
            ErrorKind::CoordinationLost => "coordination-lost",
            ErrorKind::BackendBusy => "backend-busy",
            ErrorKind::BodyTooLarge => "body-too-large",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::MethodNotAllowed => "method-not-allowed",
        }
    }

    /// The HTTP answer for this error: status plus an RFC 9457 problem body naming the
    /// cluster (when known) and the reason.
    pub fn into_response(self, cluster: Option<&str>) -> Response<Body> {
        let status = self.status();
        let title = status.canonical_reason().unwrap_or("Error");
        let problem = serde_json::json!({
            "type": format!("urn:keyway:error:{}", self.reason()),
            "title": title,
            "status": status.as_u16(),
            "detail": self.detail,
            "cluster": cluster,
        });
        let mut resp = Response::new(body::full(Bytes::from(problem.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110 §15.5.6: a 405 lists what the target supports.
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}): {}", self.reason(), self.side, self.detail)
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_by_kind() {
        let e = |k| ProxyError::new(k, Side::Upstream, false, "x").status();
        assert_eq!(e(ErrorKind::NoRoute), StatusCode::NOT_FOUND);
        assert_eq!(e(ErrorKind::ConnectFailed), StatusCode::BAD_GATEWAY);
        assert_eq!(e(ErrorKind::ProtocolTimeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            e(ErrorKind::NoBackendAvailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(e(ErrorKind::BodyTooLarge), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e(ErrorKind::BackendBusy), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_lost_lease_answers_503_coordination_lost_with_retry_after() {
        let r = ProxyError::new(ErrorKind::CoordinationLost, Side::Internal, false, "lost")
            .into_response(Some("pam"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(
            ProxyError::new(ErrorKind::CoordinationLost, Side::Internal, false, "").reason(),
            "coordination-lost"
        );
    }

    #[test]
    fn a_busy_backend_answers_503_with_retry_after() {
        let r = ProxyError::new(ErrorKind::BackendBusy, Side::Internal, true, "queue full")
            .into_response(Some("vault"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
    }

    #[test]
    fn problem_body_names_cluster_and_reason() {
        let r = ProxyError::new(
            ErrorKind::NoBackendAvailable,
            Side::Internal,
            false,
            "all down",
        )
        .into_response(Some("vault"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(r.headers().contains_key(header::RETRY_AFTER));
    }
}
