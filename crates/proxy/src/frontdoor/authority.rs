//! The request's one authority: exactly one `Host` on HTTP/1.x, an absolute-form
//! target's authority replacing `Host` (RFC 9112 §3.2.2), on HTTP/2 a `host` header that
//! must agree with `:authority`, and a host that is a syntactically valid name or
//! address. It only reads the request; it never rewrites it (`admit` does) and never
//! resolves a name.

use http::header::{self, HeaderValue};
use http::{Request, Version};

use super::bad;
use crate::error::ProxyError;

/// The request's one authority, per HTTP version; validates its syntax.
pub(super) fn authority<B>(req: &Request<B>) -> Result<HeaderValue, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(bad(
            "the request has more than one Host header (RFC 9112 §3.2); send exactly one",
        ));
    }
    let uri_authority = req.uri().authority();
    // Origin form: the Host header is the authority; its value is shared, not copied.
    if let (None, Some(h)) = (uri_authority, first) {
        if !valid_authority(h.as_bytes()) {
            return Err(invalid_host(h.as_bytes()));
        }
        return Ok(h.clone());
    }
    let chosen: &[u8] = match (req.version(), uri_authority, first) {
        // HTTP/2 and later: `:authority`, which a `host` header must not contradict.
        (v, Some(a), h) if v >= Version::HTTP_2 => {
            if h.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())) {
                return Err(bad(
                    "the host header disagrees with :authority; send one or make them equal",
                ));
            }
            a.as_str().as_bytes()
        }
        // HTTP/1.x absolute form: the target's authority replaces Host (RFC 9112 §3.2.2).
        (_, Some(a), _) => {
            match req.uri().scheme_str() {
                Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {}
                _ => {
                    return Err(bad(
                        "an absolute request target must be http:// or https://",
                    ))
                }
            }
            a.as_str().as_bytes()
        }
        (_, None, Some(h)) => h.as_bytes(),
        (_, None, None) => {
            return Err(bad("the request names no host (send a Host header)"));
        }
    };
    if !valid_authority(chosen) {
        return Err(invalid_host(chosen));
    }
    HeaderValue::from_bytes(chosen).map_err(|_| bad("the host is not a valid header value"))
}

fn invalid_host(host: &[u8]) -> ProxyError {
    bad(format!(
        "`{}` is not a valid host (a DNS name, IPv4 address or [IPv6] address, optionally with :port)",
        String::from_utf8_lossy(host).escape_debug()
    ))
}

/// `host[:port]` where host is a DNS-style name (letters, digits, `-`, `_`, `.`), an
/// IPv4 address or a bracketed IPv6 address, and port is 1 to 5 digits up to 65535.
/// No user info, no percent-encoding, no spaces.
pub fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(end) = a.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &a[1..end];
        let ok = std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
            .is_some();
        if !ok {
            return false;
        }
        match &a[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&a[..=end], Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|&b| b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    if let Some(port) = port {
        let digits = !port.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
        if !digits
            || std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_none()
        {
            return false;
        }
    }
    if host.first() == Some(&b'[') {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !host.starts_with(b".")
        && !host.windows(2).any(|w| w == b"..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in [
            "a.test",
            "A-b_c.test:8443",
            "127.0.0.1",
            "[::1]",
            "[::1]:80",
            "x:65535",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "user@a.test",
            "a.test:",
            "a.test:65536",
            "a.test:8x",
            "[::1",
            "[zz]",
            "[::1]x",
            "a..test",
            ".a",
            "a/b",
            "a%2eb",
            "a.test:80:80",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }
}
