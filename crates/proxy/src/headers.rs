//! Header rewriting between client and backend: hop-by-hop removal, `X-Forwarded-*`,
//! `Via`, and the sticky cookie.
//!
//! Only this module edits forwarded headers. It runs once per request and once per
//! response; it must not allocate more than the headers it adds.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1;
/// `HTTP2-Settings` belongs to an `h2c` upgrade, RFC 7540 §3.2.1). A `static`, not a
/// `const`: a `const` array is built and dropped again at every use, once per header
/// field scanned (about 500 instructions per request).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("http2-settings"),
];

/// `hop_by_hop`'s answer for `Upgrade`, which is not in [`HOP_BY_HOP`].
const UPGRADE: usize = HOP_BY_HOP.len();

/// Where `name` (lower case, as a `HeaderName` spells it) sits in [`HOP_BY_HOP`], or
/// [`UPGRADE`]. Picks the candidate by length first: most fields (`host`, `date`,
/// `content-length`) are rejected by one jump, where comparing each against the nine
/// names cost about 150 instructions per field.
fn hop_by_hop(name: &str) -> Option<usize> {
    let candidates: &[usize] = match name.len() {
        2 => &[5],
        7 => &[6, UPGRADE],
        10 => &[0, 1],
        14 => &[8],
        16 => &[2],
        17 => &[7],
        18 => &[3],
        19 => &[4],
        _ => return None,
    };
    candidates.iter().copied().find(|&i| {
        let known = HOP_BY_HOP.get(i).unwrap_or(&header::UPGRADE);
        known.as_str() == name
    })
}

/// Removes hop-by-hop headers, including any named in `Connection`. `Upgrade` is removed
/// too unless `keep_upgrade` (a WebSocket handshake keeps `Connection: upgrade` and
/// `Upgrade`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names records which hop-by-hop headers are present, so only
    // those are removed: hashing all eight names for lookups costs more than the scan.
    let mut present = [false; 9];
    let mut upgrade = false;
    for name in headers.keys() {
        match hop_by_hop(name.as_str()) {
            Some(UPGRADE) => upgrade = true,
            Some(i) => present[i] = true,
            None => {}
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

/// Which protocols of an HTTP/1.1 upgrade request may pass. Returns `true` when the
/// request asks for an upgrade and at least one of its protocols is in `allowed` (lower
/// case); `Upgrade` then names only those. Otherwise the request is plain HTTP and
/// [`strip_hop_by_hop`] removes its `Upgrade`.
pub fn allow_upgrade(headers: &mut HeaderMap, allowed: &[String]) -> bool {
    if !is_upgrade_request(headers) {
        return false;
    }
    let mut kept: Vec<&str> = Vec::new();
    for v in headers.get_all(header::UPGRADE) {
        let Ok(v) = v.to_str() else { continue };
        for token in v.split(',').map(str::trim) {
            // `websocket` or `name/version`: the name decides.
            let name = token.split('/').next().unwrap_or("");
            if allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                kept.push(token);
            }
        }
    }
    if kept.is_empty() {
        return false;
    }
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) => {
            headers.insert(header::UPGRADE, v);
            true
        }
        Err(_) => false,
    }
}

/// Who sent a request, for the headers that carry it to the backend.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// The client's address (the peer, or the PROXY protocol's source).
    pub client: IpAddr,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// Whether the peer is a trusted proxy whose forwarding headers are kept.
    pub trusted: bool,
    /// Also write an RFC 7239 `Forwarded` header.
    pub rfc7239: bool,
}

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Writes the client's identity for the backend's audit trail: `X-Forwarded-For`,
/// `-Proto`, `-Host`, optionally `Forwarded`, and `Via`. From an untrusted peer every
/// such header the client sent (and `X-Real-IP`) is replaced, so nobody can put another
/// address in the audit trail; from a trusted proxy `X-Forwarded-For` and `Forwarded`
/// are appended to and its `-Proto`/`-Host` kept.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    who: Identity,
    host: &HeaderValue,
    via: &'static str,
) {
    forwarded(headers, who, host, via).apply(headers);
}

/// Header fields keyway adds to a request on its way to a backend. keyway's HTTP/1.1
/// client writes them straight into the request head ([`Added::write`]); for hyper's
/// client (HTTP/2, upgrades) they go into the header map ([`Added::apply`]). Either way
/// the map was first cleared of what they replace ([`forwarded`]). Kept small: it lives
/// in every request's future.
#[derive(Clone, Debug)]
pub struct Added {
    /// The `X-Forwarded-For` value.
    xff: Vec<u8>,
    /// The `X-Forwarded-Proto` value, unless a trusted peer's is kept.
    xfp: Option<&'static str>,
    /// The `X-Forwarded-Host` value, unless a trusted peer's is kept.
    xfh: Option<HeaderValue>,
    /// An RFC 7239 `Forwarded` element, appended.
    forwarded: Option<String>,
    /// The `Via` entry, appended.
    via: &'static str,
}

impl Added {
    /// Writes the fields as header lines (`name: value\r\n`).
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut line = |name: &str, value: &[u8]| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        line("x-forwarded-for", &self.xff);
        if let Some(v) = self.xfp {
            line("x-forwarded-proto", v.as_bytes());
        }
        if let Some(v) = &self.xfh {
            line("x-forwarded-host", v.as_bytes());
        }
        if let Some(v) = &self.forwarded {
            line("forwarded", v.as_bytes());
        }
        line("via", self.via.as_bytes());
    }

    /// Appends the fields to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.reserve(5);
        if let Ok(v) = HeaderValue::from_bytes(&self.xff) {
            headers.append(XFF.clone(), v);
        }
        if let Some(v) = self.xfp {
            headers.append(XFP.clone(), HeaderValue::from_static(v));
        }
        if let Some(v) = &self.xfh {
            headers.append(XFH.clone(), v.clone());
        }
        if let Some(v) = self.forwarded.as_deref() {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(header::FORWARDED, v);
            }
        }
        headers.append(header::VIA, HeaderValue::from_static(self.via));
    }
}

/// The client's identity for the backend's audit trail: `X-Forwarded-For`, `-Proto`,
/// `-Host`, optionally `Forwarded`, and `Via`. From an untrusted peer every such header
/// the client sent (and `X-Real-IP`) is removed from `headers` here, so nobody can put
/// another address in the audit trail; from a trusted proxy `X-Forwarded-For` is
/// replaced by its value with the client appended, `Forwarded` appended to, and its
/// `-Proto`/`-Host` kept. Returns what is to be added.
pub fn forwarded(
    headers: &mut HeaderMap,
    who: Identity,
    host: &HeaderValue,
    via: &'static str,
) -> Added {
    // One pass over the names finds which identity headers are present (and whether
    // any name holds `_`), so only those are touched: hashing every name for a removal
    // or a lookup costs more than the scan.
    let identity: [&HeaderName; 5] = [&XFF, &XFP, &XFH, &X_REAL_IP, &header::FORWARDED];
    let mut present = [false; 5];
    let mut underscore = false;
    for name in headers.keys() {
        if let Some(i) = identity.iter().position(|h| *h == name) {
            present[i] = true;
        } else if name.as_str().contains('_') {
            underscore = true;
        }
    }
    if underscore {
        drop_lookalikes(headers, who.trusted);
    }
    if !who.trusted {
        for (h, _) in identity.iter().zip(present).filter(|(_, p)| *p) {
            headers.remove(*h);
        }
        present = [false; 5];
    }
    let scheme = if who.tls { "https" } else { "http" };
    // X-Forwarded-For: previous value (trusted peers only), ", ", client address.
    let prev = present[0]
        .then(|| headers.get(&XFF))
        .flatten()
        .map(HeaderValue::as_bytes)
        .filter(|p| !p.is_empty());
    let mut buf = Vec::with_capacity(prev.map_or(0, |p| p.len() + 2) + 39);
    if let Some(p) = prev {
        buf.extend_from_slice(p);
        buf.extend_from_slice(b", ");
    }
    push_ip(&mut buf, who.client);
    if present[0] {
        headers.remove(&XFF);
    }
    let mut added = Added {
        xff: buf,
        xfp: (!present[1]).then_some(scheme),
        xfh: (!present[2]).then(|| host.clone()),
        forwarded: None,
        via,
    };
    if who.rfc7239 {
        // RFC 7239 §6: IPv6 addresses are bracketed and quoted; the host is quoted (it
        // may carry a port). The host passed the front door's syntax check.
        let client = who.client.to_canonical();
        let node = match client {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let element = format!(
            "for={node};proto={scheme};host=\"{}\"",
            host.to_str().unwrap_or("")
        );
        added.forwarded = Some(element);
    }
    added
}

/// Appends `ip` as text, as `Display` writes it. IPv4 (nearly every client) is written
/// digit by digit: through the formatter it cost about 1,000 instructions per request.
fn push_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                if o >= 100 {
                    buf.push(b'0' + o / 100);
                }
                if o >= 10 {
                    buf.push(b'0' + o / 10 % 10);
                }
                buf.push(b'0' + o % 10);
            }
        }
        IpAddr::V6(a) => {
            let _ = write!(buf, "{a}");
        }
    }
}

/// Removes headers that spell an identity header with `_` for `-` (`X_Forwarded_For`):
/// CGI-style servers (IIS server variables, PHP, WSGI) map both spellings to one
/// variable, so such a header would slip past the replacement above. From trusted
/// proxies only a `keyway-epoch` lookalike is removed. Called only when a name holds `_`.
fn drop_lookalikes(headers: &mut HeaderMap, trusted: bool) {
    const GUARDED: [&str; 6] = [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "forwarded",
        "keyway-epoch",
    ];
    let guarded = |name: &str| {
        let n = name.len();
        GUARDED.iter().enumerate().any(|(i, g)| {
            (!trusted || i == GUARDED.len() - 1)
                && g.len() == n
                && g.bytes()
                    .zip(name.bytes())
                    .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
        })
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_') && guarded(k.as_str()))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
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
    fn every_hop_by_hop_name_is_recognised_and_no_other() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name.as_str()), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop("upgrade"), Some(UPGRADE));
        for other in [
            "host",
            "date",
            "content-length",
            "content-type",
            "accept",
            "cookie",
            "set-cookie",
            "tk",
            "trailers",
            "connections",
            "keep-alive2",
            "x-forwarded-for",
            "authorization",
            "proxy-authorizatio",
            "transfer-encodinx",
            "http2-settingz",
        ] {
            assert_eq!(hop_by_hop(other), None, "{other}");
        }
    }

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

    fn who(client: &str, trusted: bool, rfc7239: bool) -> Identity {
        Identity {
            client: client.parse().unwrap(),
            tls: true,
            trusted,
            rfc7239,
        }
    }

    fn forged() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.test"));
        h.insert("x-real-ip", HeaderValue::from_static("10.9.9.9"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=10.2.2.2"));
        h.insert("x_forwarded_for", HeaderValue::from_static("10.3.3.3"));
        h.insert("x-real_ip", HeaderValue::from_static("10.3.3.4"));
        h.insert("keyway_epoch", HeaderValue::from_static("7"));
        h.insert("x_custom_header", HeaderValue::from_static("kept"));
        h
    }

    #[test]
    fn a_trusted_proxy_s_forwarding_headers_are_appended_to() {
        let mut h = forged();
        let host = HeaderValue::from_static("pvwa.corp.test");
        add_forwarded(&mut h, who("127.0.0.1", true, true), &host, "1.1 keyway");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(
            h["x-forwarded-proto"], "http",
            "the proxy in front saw http"
        );
        assert_eq!(h["x-forwarded-host"], "evil.test");
        let fwd: Vec<_> = h.get_all(header::FORWARDED).iter().collect();
        assert_eq!(fwd.len(), 2);
        assert_eq!(fwd[1], "for=127.0.0.1;proto=https;host=\"pvwa.corp.test\"");
        assert_eq!(
            h["x_forwarded_for"], "10.3.3.3",
            "a trusted proxy's headers stay"
        );
        assert!(
            !h.contains_key("keyway_epoch"),
            "but never an epoch lookalike"
        );
        assert_eq!(h[header::VIA], "1.1 keyway");
    }

    #[test]
    fn an_untrusted_client_s_forwarding_headers_are_replaced() {
        let mut h = forged();
        let host = HeaderValue::from_static("pvwa.corp.test:8443");
        add_forwarded(&mut h, who("::1", false, true), &host, "1.1 keyway");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "pvwa.corp.test:8443");
        assert!(!h.contains_key("x-real-ip"));
        assert!(!h.contains_key("x_forwarded_for") && !h.contains_key("x-real_ip"));
        assert!(!h.contains_key("keyway_epoch"));
        assert_eq!(h["x_custom_header"], "kept");
        assert_eq!(
            h[header::FORWARDED],
            "for=\"[::1]\";proto=https;host=\"pvwa.corp.test:8443\""
        );
        let mut h = forged();
        add_forwarded(&mut h, who("192.0.2.1", false, false), &host, "1.1 keyway");
        assert!(!h.contains_key(header::FORWARDED));
    }

    #[test]
    fn only_allowed_upgrades_pass() {
        let allowed = vec!["websocket".to_string()];
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        assert!(!allow_upgrade(&mut h, &allowed));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c, WebSocket"));
        assert!(allow_upgrade(&mut h, &allowed));
        assert_eq!(h[header::UPGRADE], "WebSocket");
    }

    #[test]
    fn client_addresses_are_written_as_display_writes_them() {
        let mut addrs: Vec<IpAddr> = ["::1", "2001:db8::7", "::ffff:10.0.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        for o in [0u8, 1, 9, 10, 42, 99, 100, 109, 110, 199, 200, 255] {
            addrs.push(IpAddr::from([o, 255 - o, o / 3, 7]));
        }
        for ip in addrs {
            let mut buf = b"x, ".to_vec();
            push_ip(&mut buf, ip);
            assert_eq!(buf, format!("x, {ip}").into_bytes());
        }
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
            let _ = allow_upgrade(&mut h, &["websocket".to_string()]);
            add_forwarded(
                &mut h,
                Identity {
                    client: "::1".parse().unwrap(),
                    tls: true,
                    trusted: rng.bool(),
                    rfc7239: true,
                },
                &HeaderValue::from_static("h"),
                "1.1 keyway",
            );
            let text = String::from_utf8_lossy(&bytes);
            let _ = crate::router::strip_port(&text);
        }
    }
}

/// Properties of cookie parsing and header rewriting on generated headers.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_cookie_is_found_among_others(
            others in proptest::collection::vec(("[a-z]{1,6}", "[a-zA-Z0-9]{0,8}"), 0..6),
            value in "[a-zA-Z0-9]{1,16}",
            at in 0usize..6,
        ) {
            let mut pairs: Vec<String> = others
                .iter()
                .filter(|(k, _)| k != "keyway_affinity")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            pairs.insert(at.min(pairs.len()), format!("keyway_affinity={value}"));
            let mut h = HeaderMap::new();
            h.insert(header::COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
            prop_assert_eq!(cookie(&h, "keyway_affinity"), Some(value.as_str()));
        }

        #[test]
        fn no_hop_by_hop_header_survives(
            named in proptest::collection::vec("x-[a-z]{1,6}", 0..4),
            extra in proptest::collection::vec(0usize..9, 0..9),
        ) {
            let mut h = HeaderMap::new();
            for i in &extra {
                h.append(HOP_BY_HOP[*i].clone(), HeaderValue::from_static("1"));
            }
            for n in &named {
                h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_static("v"));
            }
            h.append(header::CONNECTION, HeaderValue::from_str(&named.join(", ")).unwrap());
            h.insert("x-end-to-end", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut h, false);
            for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
                prop_assert!(!h.contains_key(name), "{name} survived");
            }
            for n in &named {
                prop_assert!(!h.contains_key(n.as_str()), "{n}, named in Connection, survived");
            }
            prop_assert_eq!(&h["x-end-to-end"], "kept");
        }

        #[test]
        fn an_untrusted_client_cannot_choose_its_audited_address(
            forged in "[0-9a-f.:, ]{0,40}",
            client in any::<std::net::IpAddr>(),
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&forged) {
                h.insert("x-forwarded-for", v.clone());
                h.insert("x-real-ip", v.clone());
                h.insert(header::FORWARDED, v);
            }
            let who = Identity { client, tls: false, trusted: false, rfc7239: false };
            add_forwarded(&mut h, who, &HeaderValue::from_static("a.test"), "1.1 keyway");
            prop_assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
            prop_assert_eq!(h["x-forwarded-for"].to_str().unwrap(), client.to_string());
            prop_assert!(!h.contains_key("x-real-ip") && !h.contains_key(header::FORWARDED));
        }
    }
}
