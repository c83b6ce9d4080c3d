//! The front door: the one step every client request passes before it is routed or
//! classified. What it decides is what the backend receives (design invariant 6), so no
//! encoding trick can make keyway match one request while the backend serves another.
//!
//! It owns, in this order:
//! - **methods**: `CONNECT` is answered 405 and never forwarded; `TRACE` likewise unless
//!   the listener allows it;
//! - **the authority**: exactly one `Host` on HTTP/1.x, an absolute-form target's
//!   authority replacing `Host` (RFC 9112 §3.2.2), on HTTP/2 a `host` header that must
//!   agree with `:authority`, and a host that is a syntactically valid name or address;
//! - **the path**: percent-encoded unreserved characters decoded, other escapes
//!   upper-cased, raw non-ASCII bytes escaped, dot segments removed (RFC 3986 §5.2.4),
//!   repeated slashes merged; encoded `/` (unless the listener allows it), encoded or raw
//!   `\`, NUL and control characters refused. The query is left alone.
//!
//! The request's URI is rewritten to origin form with the normalised path and its `Host`
//! header set to the one authority, so routing, classification, plugins and the backend
//! all see the same request. The common request (already normal) is checked in one pass
//! and not copied. This module never does I/O and never panics on any input.
//!
//! This file holds the entry point ([`admit`]) and the method check; the authority lives
//! in `authority`, the path's normal form in `path`, and address ranges ([`Cidr`], with
//! `FrontDoorConfig::trusts`) in the config crate (pure data, parsed with the file).

mod authority;
mod path;

pub use crate::config::Cidr;
pub use authority::valid_authority;
pub use path::{normalize_path, without_parameters, PathError};

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri};

use crate::config::FrontDoorConfig;
use crate::error::{ErrorKind, ProxyError, Side};

use authority::authority;

/// What the front door established about an admitted request.
#[derive(Debug)]
pub struct Admitted {
    /// The request's one authority (`host[:port]`), as forwarded in `Host`.
    pub host: HeaderValue,
    /// Whether the peer is a listed trusted proxy (its `X-Forwarded-*` are kept).
    pub trusted_peer: bool,
}

impl Admitted {
    /// The host without its port, for routing.
    pub fn host_name(&self) -> &str {
        crate::router::strip_port(self.host.to_str().unwrap_or(""))
    }
}

/// Checks and normalises one request in place. An `Err` is the answer to send.
pub fn admit<B>(
    req: &mut Request<B>,
    door: &FrontDoorConfig,
    peer: IpAddr,
) -> Result<Admitted, ProxyError> {
    check_method(req.method(), door)?;
    let host = authority(req)?;
    let path = req.uri().path();
    let normal = if req.uri() == "*" {
        // asterisk-form: only `OPTIONS *` (RFC 9112 §3.2.4).
        if req.method() != Method::OPTIONS {
            return Err(bad("the `*` target is only valid with OPTIONS"));
        }
        None
    } else {
        match normalize_path(path, door.allow_encoded_slashes) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(p)) => Some(p),
            Err(e) => return Err(bad(e.message())),
        }
    };
    // Origin form with the normalised path; the query is kept byte for byte.
    let absolute = req.uri().authority().is_some() || req.uri().scheme().is_some();
    if normal.is_some() || (absolute && req.uri() != "*") {
        let pq = match (&normal, req.uri().path_and_query()) {
            (Some(path), pq) => match pq.and_then(PathAndQuery::query) {
                Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
                None => PathAndQuery::try_from(path.as_str()),
            }
            .map_err(|_| bad("the request target is not a valid URI"))?,
            (None, Some(pq)) => pq.clone(),
            (None, None) => PathAndQuery::from_static("/"),
        };
        *req.uri_mut() = Uri::from(pq);
    }
    // Origin form on HTTP/1.x already carries exactly this Host.
    if absolute {
        req.headers_mut().insert(header::HOST, host.clone());
    }
    Ok(Admitted {
        host,
        trusted_peer: door.trusts(peer),
    })
}

fn bad(detail: impl Into<String>) -> ProxyError {
    ProxyError::new(ErrorKind::BadRequest, Side::Downstream, false, detail)
}

fn check_method(method: &Method, door: &FrontDoorConfig) -> Result<(), ProxyError> {
    let refused = if method == Method::CONNECT {
        "CONNECT is not forwarded: keyway opens no tunnels to arbitrary destinations"
    } else if method == Method::TRACE && !door.allow_trace {
        "TRACE is refused (it echoes credentials back); set allow_trace = true on the listener to forward it"
    } else {
        return Ok(());
    };
    Err(ProxyError::new(
        ErrorKind::MethodNotAllowed,
        Side::Downstream,
        false,
        refused,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::Version;

    fn door() -> FrontDoorConfig {
        FrontDoorConfig::default()
    }

    fn admit_req(req: http::request::Builder) -> Result<(Request<()>, Admitted), ProxyError> {
        let mut req = req.body(()).unwrap();
        let a = admit(&mut req, &door(), "192.0.2.1".parse().unwrap())?;
        Ok((req, a))
    }

    #[test]
    fn one_host_on_http1() {
        let two = Request::get("/")
            .header("host", "a.test")
            .header("host", "b.test");
        assert_eq!(admit_req(two).unwrap_err().kind, ErrorKind::BadRequest);
        let none = Request::get("/");
        assert_eq!(admit_req(none).unwrap_err().kind, ErrorKind::BadRequest);
        let bad = Request::get("/").header("host", "a.test, b.test");
        assert_eq!(admit_req(bad).unwrap_err().kind, ErrorKind::BadRequest);
        let (req, a) = admit_req(Request::get("/x?q=%2f..").header("host", "a.test")).unwrap();
        assert_eq!(a.host, "a.test");
        assert_eq!(req.uri(), "/x?q=%2f..", "the query is left alone");
    }

    #[test]
    fn absolute_form_replaces_host() {
        let r = Request::get("http://a.test:81/x/../y?z").header("host", "b.test");
        let (req, a) = admit_req(r).unwrap();
        assert_eq!(a.host, "a.test:81");
        assert_eq!(a.host_name(), "a.test");
        assert_eq!(req.headers()["host"], "a.test:81");
        assert_eq!(req.uri(), "/y?z");
        assert!(req.uri().authority().is_none());
        let ftp = Request::get("ftp://a.test/x").header("host", "a.test");
        assert!(admit_req(ftp).is_err());
    }

    #[test]
    fn http2_host_must_agree_with_authority() {
        let agree = Request::get("https://a.test/x")
            .version(Version::HTTP_2)
            .header("host", "A.test");
        let (req, a) = admit_req(agree).unwrap();
        assert_eq!(a.host, "a.test");
        assert_eq!(req.uri(), "/x");
        let disagree = Request::get("https://a.test/x")
            .version(Version::HTTP_2)
            .header("host", "b.test");
        assert!(admit_req(disagree).is_err());
    }

    #[test]
    fn connect_and_trace_are_refused() {
        let c = Request::builder()
            .method(Method::CONNECT)
            .uri("a.test:443")
            .header("host", "a.test:443");
        assert_eq!(admit_req(c).unwrap_err().kind, ErrorKind::MethodNotAllowed);
        let t = Request::builder()
            .method(Method::TRACE)
            .uri("/")
            .header("host", "a.test");
        assert_eq!(admit_req(t).unwrap_err().kind, ErrorKind::MethodNotAllowed);
        let mut req = Request::builder()
            .method(Method::TRACE)
            .uri("/")
            .header("host", "a.test")
            .body(())
            .unwrap();
        let allow = FrontDoorConfig {
            allow_trace: true,
            ..door()
        };
        assert!(admit(&mut req, &allow, "192.0.2.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn options_star_only() {
        let o = Request::builder()
            .method(Method::OPTIONS)
            .uri("*")
            .header("host", "a.test");
        assert!(admit_req(o).is_ok());
        let g = Request::get("*").header("host", "a.test");
        assert!(admit_req(g).is_err());
    }
}
