//! One exchange with a backend: the request made ready for it, sent, and the response
//! head awaited; a request hyper hands back unsent is returned for a retry.

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
        Sender::H1(_) => {
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

pub(super) type Sent = (Response<Incoming>, Option<http1::SendRequest<Body>>);
pub(super) type SendFailure = (ProxyError, Option<Request<Body>>, Ending);

pub(super) async fn send(sender: Sender, req: Request<Body>) -> Result<Sent, SendFailure> {
    let broken = |e: &hyper::Error, unsent: &Option<Request<Body>>| {
        let err = ProxyError::new(
            ErrorKind::UpstreamProtocol,
            Side::Upstream,
            false,
            format!("backend failed before answering: {e}"),
        );
        let ending = Ending::Broken {
            user: e.is_user(),
            unsent: unsent.is_some(),
        };
        (err, ending)
    };
    match sender {
        Sender::H1(mut s) => match s.try_send_request(req).await {
            Ok(resp) => Ok((resp, Some(s))),
            Err(mut e) => {
                let unsent = e.take_message();
                let (err, ending) = broken(e.error(), &unsent);
                Err((err, unsent, ending))
            }
        },
        Sender::H2(mut s) => match s.try_send_request(req).await {
            Ok(resp) => Ok((resp, None)),
            Err(mut e) => {
                let unsent = e.take_message();
                let (err, ending) = broken(e.error(), &unsent);
                Err((err, unsent, ending))
            }
        },
    }
}
