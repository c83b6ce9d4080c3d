//! Header rewriting between client and backend: hop-by-hop removal, `X-Forwarded-*`,
//! `Via`, and the sticky cookie.
//!
//! Only this module edits forwarded headers. It runs once per request and once per
//! response; it must not allocate more than the headers it adds.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any named in `Connection`. `Upgrade` is removed
/// too unless `keep_upgrade` (a WebSocket handshake keeps `Connection: upgrade` and
/// `Upgrade`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names records which hop-by-hop headers are present, so only
    // those are removed: hashing all eight names for lookups costs more than the scan.
    let mut present = [false; 8];
    let mut upgrade = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        } else if name == header::UPGRADE {
            upgrade = true;
        }
    }
    // `present[0]` is Connection: headers it names are per-connection as well. The
    // tokens seen on nearly every request need no lookup: `keep-alive` is removed below
    // anyway and `close` names no header.
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("close")
                    && !t.eq_ignore_ascii_case("upgrade")
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (h, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// True when the request asks for an HTTP/1.1 protocol upgrade (e.g. WebSocket).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Adds `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    tls: bool,
    host: &HeaderValue,
    via: &'static str,
) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

    // X-Forwarded-For: previous value, ", ", client address, built in one buffer.
    let prev = headers
        .get(&XFF)
        .map(HeaderValue::as_bytes)
        .filter(|p| !p.is_empty());
    let mut buf = Vec::with_capacity(prev.map_or(0, |p| p.len() + 2) + 39);
    if let Some(p) = prev {
        buf.extend_from_slice(p);
        buf.extend_from_slice(b", ");
    }
    let _ = write!(buf, "{client}");
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(buf)) {
        headers.insert(XFF.clone(), v);
    }
    headers.insert(
        XFP.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    headers.insert(XFH.clone(), host.clone());
    append_via(headers, via);
}

/// Appends this hop to `Via`.
pub fn append_via(headers: &mut HeaderMap, via: &'static str) {
    headers.append(header::VIA, HeaderValue::from_static(via));
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value pinning the client to a backend token.
pub fn affinity_cookie(
    name: &str,
    token: &str,
    max_age: Option<std::time::Duration>,
    secure: bool,
) -> Option<HeaderValue> {
    let mut s = format!("{name}={token}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(age) = max_age {
        s.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if secure {
        s.push_str("; Secure");
    }
    HeaderValue::from_str(&s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_headers_append_xff() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        add_forwarded(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            true,
            &HeaderValue::from_static("pvwa.corp.test"),
            "1.1 keyway",
        );
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "pvwa.corp.test");
        assert_eq!(h[header::VIA], "1.1 keyway");
    }

    #[test]
    fn cookie_lookup() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; keyway_affinity=abc ; b=2"),
        );
        assert_eq!(cookie(&h, "keyway_affinity"), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}

/// Adversarial input: header helpers never panic on arbitrary bytes.
#[cfg(test)]
mod adversarial {
    use super::*;

    #[test]
    fn random_header_values_never_panic() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..5000 {
            let bytes: Vec<u8> = (0..rng.usize(0..80)).map(|_| rng.u8(..)).collect();
            let mut h = HeaderMap::new();
            for name in [header::COOKIE, header::CONNECTION, header::UPGRADE] {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    h.append(name, v);
                }
            }
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                h.insert("x-forwarded-for", v);
            }
            let _ = cookie(&h, "keyway_affinity");
            let _ = is_upgrade_request(&h);
            strip_hop_by_hop(&mut h, rng.bool());
            add_forwarded(
                &mut h,
                "::1".parse().unwrap(),
                true,
                &HeaderValue::from_static("h"),
                "1.1 keyway",
            );
            let text = String::from_utf8_lossy(&bytes);
            let _ = crate::router::strip_port(&text);
        }
    }
}
