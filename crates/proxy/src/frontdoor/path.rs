//! The normal form of a request path: percent-encoded unreserved characters decoded,
//! other escapes upper-cased, raw non-ASCII bytes escaped, dot segments removed (RFC 3986
//! §5.2.4), repeated slashes merged; encoded `/` (unless allowed), encoded or raw `\`,
//! NUL and control characters refused. A path that is already normal is checked in one
//! pass and borrowed, not copied. Pure functions: never I/O, never a panic on any input.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not origin form: it does not start with `/`.
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` while the listener does not allow encoded slashes.
    EncodedSlash,
    /// `%5C` or a raw `\`: Windows servers read it as `/`.
    Backslash,
    /// `%00`..`%1F`, `%7F` or a raw control byte.
    Control,
    /// `.;x` or `..;x`: Java servlet containers read it as a dot segment.
    DotSegmentWithParameters,
}

impl PathError {
    /// The problem, said so that the client's author knows what to change.
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with `/`",
            PathError::BadEscape => {
                "the path has a `%` that is not followed by two hex digits; encode `%` as %25"
            }
            PathError::EncodedSlash => {
                "the path contains an encoded slash (%2F), which keyway refuses by default; the listener's allow_encoded_slashes = true lets it through"
            }
            PathError::Backslash => {
                "the path contains a backslash (raw or %5C); Windows servers read it as `/`, so keyway refuses it"
            }
            PathError::Control => "the path contains NUL or a control character",
            PathError::DotSegmentWithParameters => {
                "the path has a `.` or `..` segment with `;` parameters, which servlet containers resolve as a dot segment"
            }
        }
    }
}

const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normal form of a request path (see the module doc), or why it is refused.
/// Borrowed when the path is already normal, which is the common case.
pub fn normalize_path(path: &str, allow_encoded_slash: bool) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if already_normal(path.as_bytes(), allow_encoded_slash) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slow(path, allow_encoded_slash).map(Cow::Owned)
}

/// One pass: only visible ASCII, no backslash, escapes only for what must stay escaped
/// (upper-case hex), no empty segment except a trailing one, no dot segment and no dot
/// segment with parameters.
fn already_normal(p: &[u8], allow_encoded_slash: bool) -> bool {
    let mut i = 0;
    while i < p.len() {
        let b = p[i];
        if b == b'%' {
            let upper = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
            let (Some(&h), Some(&l)) = (p.get(i + 1), p.get(i + 2)) else {
                return false;
            };
            if !upper(h) || !upper(l) {
                return false;
            }
            let d = hex_val(h).unwrap_or(0) << 4 | hex_val(l).unwrap_or(0);
            if is_unreserved(d)
                || (d == b'/' && !allow_encoded_slash)
                || d == b'\\'
                || d < 0x20
                || d == 0x7f
            {
                return false;
            }
            i += 3;
            continue;
        }
        if b <= 0x20 || b >= 0x7f || b == b'\\' {
            return false;
        }
        i += 1;
    }
    let mut segments = p[1..].split(|&b| b == b'/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if (s.is_empty() && !last) || is_dot_like(s) {
            return false;
        }
    }
    true
}

/// `.`, `..`, or either followed by `;parameters`.
fn is_dot_like(s: &[u8]) -> bool {
    let name = s.split(|&b| b == b';').next().unwrap_or(s);
    name == b"." || name == b".."
}

fn normalize_slow(path: &str, allow_encoded_slash: bool) -> Result<String, PathError> {
    // 1. Escapes: decode unreserved, upper-case the rest, refuse the dangerous ones.
    let b = path.as_bytes();
    let mut text: Vec<u8> = Vec::with_capacity(b.len() + 8);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex_val),
                    b.get(i + 2).copied().and_then(hex_val),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let d = h << 4 | l;
                if is_unreserved(d) {
                    text.push(d);
                } else if d == b'/' && !allow_encoded_slash {
                    return Err(PathError::EncodedSlash);
                } else if d == b'\\' {
                    return Err(PathError::Backslash);
                } else if d < 0x20 || d == 0x7f {
                    return Err(PathError::Control);
                } else {
                    text.extend_from_slice(&[b'%', HEX[usize::from(h)], HEX[usize::from(l)]]);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x20 | 0x7f => return Err(PathError::Control),
            0x80.. => {
                text.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]])
            }
            _ => text.push(c),
        }
        i += 1;
    }
    // 2. Segments: merge empty ones, resolve `.` and `..` (never above the root).
    let mut out: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    let mut segments = text[1..].split(|&b| b == b'/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        match s {
            b"" | b"." => trailing = last,
            b".." => {
                out.pop();
                trailing = last;
            }
            s if is_dot_like(s) => return Err(PathError::DotSegmentWithParameters),
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut normal = String::with_capacity(text.len());
    for s in &out {
        normal.push('/');
        // Only ASCII remains after step 1.
        normal.push_str(std::str::from_utf8(s).map_err(|_| PathError::Control)?);
    }
    if out.is_empty() || trailing {
        normal.push('/');
    }
    Ok(normal)
}

/// The path as servlet containers resolve it: `;parameters` cut from every segment
/// (`/a;jsessionid=1/b` is `/a/b` to Tomcat). Borrowed when there are none.
pub fn without_parameters(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (n, seg) in path.split('/').enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(seg.split(';').next().unwrap_or(""));
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p, false).map(Cow::into_owned)
    }

    #[test]
    fn paths_are_normalised() {
        for (raw, normal) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a//b", "/a/b"),
            ("//a///b//", "/a/b/"),
            ("/a/b/../c", "/a/c"),
            ("/../../a", "/a"),
            ("/a/..", "/"),
            ("/a/.", "/a/"),
            ("/a/%2e%2E/b", "/b"),
            ("/%4c%4F%67in", "/LOgin"),
            ("/a%7e%5f%2d", "/a~_-"),
            ("/a%3b%20b", "/a%3B%20b"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a;jsessionid=1/b", "/a;jsessionid=1/b"),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(normal), "{raw}");
        }
    }

    #[test]
    fn dangerous_paths_are_refused() {
        for (raw, why) in [
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::Backslash),
            ("/a\\b", PathError::Backslash),
            ("/a%00b", PathError::Control),
            ("/a%0d%0aX: y", PathError::Control),
            ("/a%7f", PathError::Control),
            ("/a%", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%u004c", PathError::BadEscape),
            ("/a/..;/admin", PathError::DotSegmentWithParameters),
            ("/a/.;x/b", PathError::DotSegmentWithParameters),
            ("/a/%2e%2e;/b", PathError::DotSegmentWithParameters),
            ("a/b", PathError::NotAbsolute),
        ] {
            assert_eq!(norm(raw), Err(why), "{raw}");
        }
        assert_eq!(
            normalize_path("/a%2fb/%2E", true).as_deref(),
            Ok("/a%2Fb/"),
            "allowed encoded slashes stay encoded, upper-cased"
        );
    }

    #[test]
    fn normal_paths_are_not_copied() {
        assert!(matches!(
            normalize_path("/PasswordVault/api/Accounts", false),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize_path("/a/", false), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn parameters_are_cut_for_matching() {
        assert_eq!(without_parameters("/a;x=1/b;c"), "/a/b");
        assert_eq!(without_parameters("/a/b"), "/a/b");
    }
}

/// Properties of the normaliser, checked on generated paths (`PROPTEST_CASES` raises
/// the count; `bench/props.sh` runs millions).
#[cfg(test)]
mod props {
    use super::*;
    use crate::frontdoor::valid_authority;
    use http::Method;
    use proptest::prelude::*;

    /// Paths built from the pieces that matter: segments that are empty, dots (plain or
    /// encoded), parameters, escapes of every kind, letters in both cases, non-ASCII.
    fn path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just(".".to_string()),
            Just(";".to_string()),
            Just("%2e".to_string()),
            Just("%2E".to_string()),
            Just("%2f".to_string()),
            Just("%5c".to_string()),
            Just("%00".to_string()),
            Just("%25".to_string()),
            Just("%".to_string()),
            "[a-zA-Z0-9_~-]{1,4}",
            "%[0-9a-fA-F]{2}",
            "[\\x21-\\x7e]",
            "\\PC",
        ];
        let segment = prop_oneof![
            Just(String::new()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e%2e".to_string()),
            Just(".%2E".to_string()),
            Just("..;x".to_string()),
            "[a-zA-Z]{1,3}",
            proptest::collection::vec(piece, 1..4).prop_map(|v| v.concat()),
        ];
        proptest::collection::vec(segment, 0..10).prop_map(|v| format!("/{}", v.join("/")))
    }

    /// What a backend that decodes everything and resolves dot segments serves.
    fn backend_view(p: &str) -> Vec<u8> {
        let b = p.as_bytes();
        let mut d = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                    d.push(h << 4 | l);
                    i += 3;
                    continue;
                }
            }
            d.push(b[i]);
            i += 1;
        }
        let mut out: Vec<&[u8]> = Vec::new();
        let mut trailing = false;
        let mut segs = d[1..].split(|&c| c == b'/').peekable();
        while let Some(s) = segs.next() {
            let last = segs.peek().is_none();
            match s {
                b"" | b"." => trailing = last,
                b".." => {
                    out.pop();
                    trailing = last;
                }
                s => {
                    out.push(s);
                    trailing = false;
                }
            }
        }
        let mut v = Vec::new();
        for s in &out {
            v.push(b'/');
            v.extend_from_slice(s);
        }
        if out.is_empty() || trailing {
            v.push(b'/');
        }
        v
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent(p in path(), slashes in any::<bool>()) {
            if let Ok(n) = normalize_path(&p, slashes) {
                let again = normalize_path(&n, slashes);
                prop_assert_eq!(again.as_deref(), Ok(n.as_ref()));
                prop_assert!(matches!(again, Ok(Cow::Borrowed(_))), "a normal path is recognised as normal");
            }
        }

        #[test]
        fn normal_paths_hold_no_dot_segment_double_slash_or_encoded_unreserved(p in path()) {
            if let Ok(n) = normalize_path(&p, false) {
                prop_assert!(n.starts_with('/'));
                prop_assert!(!n.contains("//"), "{}", n);
                for seg in n.split('/') {
                    let name = seg.split(';').next().unwrap_or("");
                    prop_assert!(name != "." && name != "..", "{}", n);
                }
                let b = n.as_bytes();
                for (i, _) in n.match_indices('%') {
                    let d = hex_val(b[i + 1]).unwrap() << 4 | hex_val(b[i + 2]).unwrap();
                    prop_assert!(!is_unreserved(d), "{}", n);
                    prop_assert!(d != b'/' && d != b'\\' && d >= 0x20 && d != 0x7f, "{}", n);
                    prop_assert!(!b[i + 1].is_ascii_lowercase() && !b[i + 2].is_ascii_lowercase());
                }
                prop_assert!(n.bytes().all(|c| c > 0x20 && c < 0x7f && c != b'\\'));
            }
        }

        #[test]
        fn the_fast_path_agrees_with_the_full_normaliser(p in path(), slashes in any::<bool>()) {
            let fast = normalize_path(&p, slashes).map(Cow::into_owned);
            let full = normalize_slow(&p, slashes);
            prop_assert_eq!(fast, full);
        }

        #[test]
        fn a_backend_serves_the_path_keyway_classified(p in path()) {
            // Whatever a decoding backend makes of the raw path, it makes of the normal
            // form too: the normaliser never changes which resource is meant.
            if let Ok(n) = normalize_path(&p, false) {
                prop_assert_eq!(backend_view(&n), backend_view(&p));
            }
        }

        #[test]
        fn a_path_and_its_normal_form_classify_the_same(p in path(), ci in any::<bool>()) {
            use crate::classify::Classifier;
            use crate::config::{PathCase, RoutePattern};
            let case = if ci { PathCase::Insensitive } else { PathCase::Sensitive };
            let c = Classifier::new(
                &[RoutePattern { method: Some(Method::POST), path: "/api/*/Retrieve".into() }],
                &[RoutePattern { method: None, path: "/admin/**".into() }],
                case,
            );
            if let Ok(n) = normalize_path(&p, false) {
                let n2 = normalize_path(&n, false).unwrap();
                for m in [Method::GET, Method::POST] {
                    prop_assert_eq!(c.classify(&m, &n), c.classify(&m, &n2));
                }
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = normalize_path(&s, true);
            let _ = normalize_path(&format!("/{s}"), false);
            let _ = valid_authority(&bytes);
            let _ = without_parameters(&s);
        }
    }
}
