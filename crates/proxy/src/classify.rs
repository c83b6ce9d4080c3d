//! Read or write: the native classifier of a `primary-replica` cluster, from method and
//! `read_routes`/`write_routes`. A cluster with a WebAssembly classifier asks the plugin
//! first and falls back here when its `on_error` says so (`Cluster::classify`).
//!
//! GET, HEAD and OPTIONS are reads; every other method is a write; `write_routes` then
//! `read_routes` override that (a write route wins when both match, the safe side).
//! Patterns are compiled once; matching walks the path without allocating. The path is
//! the front door's normal form; a cluster whose backends ignore case (IIS) matches its
//! globs without case.

use http::Method;

use crate::config::{PathCase, RoutePattern};

/// What a request does to the data behind a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// May be served by a read-only replica.
    Read,
    /// Must reach the primary.
    Write,
}

/// Compiled `read_routes` and `write_routes`.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    reads: Vec<Compiled>,
    writes: Vec<Compiled>,
    /// Compare without ASCII case.
    fold: bool,
}

#[derive(Clone, Debug)]
struct Compiled {
    method: Option<Method>,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Literal text, possibly with `*` wildcards inside one segment.
    Glob(String),
    /// `**`: any remaining segments (zero or more).
    Rest,
}

impl Classifier {
    /// Compiles the patterns; `case` says how the backends compare paths.
    pub fn new(reads: &[RoutePattern], writes: &[RoutePattern], case: PathCase) -> Self {
        let compile = |p: &RoutePattern| Compiled {
            method: p.method.clone(),
            segments: p
                .path
                .trim_start_matches('/')
                .split('/')
                .map(|s| {
                    if s == "**" {
                        Segment::Rest
                    } else {
                        Segment::Glob(s.to_string())
                    }
                })
                .collect(),
        };
        Self {
            reads: reads.iter().map(compile).collect(),
            writes: writes.iter().map(compile).collect(),
            fold: case == PathCase::Insensitive,
        }
    }

    /// Classifies a request by method and path (query excluded).
    pub fn classify(&self, method: &Method, path: &str) -> Kind {
        let fold = self.fold;
        if self.writes.iter().any(|c| c.matches(method, path, fold)) {
            return Kind::Write;
        }
        if self.reads.iter().any(|c| c.matches(method, path, fold)) {
            return Kind::Read;
        }
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => Kind::Read,
            _ => Kind::Write,
        }
    }
}

impl Compiled {
    fn matches(&self, method: &Method, path: &str, fold: bool) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let mut parts = path.trim_start_matches('/').split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::Glob(g) => match parts.next() {
                    Some(p) if glob(g.as_bytes(), p.as_bytes(), fold) => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// `*` matches any run of characters within one segment; `fold` compares ASCII letters
/// without case.
pub fn glob(pattern: &[u8], text: &[u8], fold: bool) -> bool {
    let eq = |a: u8, b: u8| a == b || (fold && a.eq_ignore_ascii_case(&b));
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if p < pattern.len() && eq(pattern[p], text[t]) {
            p += 1;
            t += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(m: &str, p: &str) -> RoutePattern {
        RoutePattern {
            method: (m != "*").then(|| Method::from_bytes(m.as_bytes()).unwrap()),
            path: p.into(),
        }
    }

    #[test]
    fn methods_by_default() {
        let c = Classifier::default();
        assert_eq!(c.classify(&Method::GET, "/x"), Kind::Read);
        assert_eq!(c.classify(&Method::HEAD, "/x"), Kind::Read);
        assert_eq!(c.classify(&Method::OPTIONS, "/x"), Kind::Read);
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(c.classify(&m, "/x"), Kind::Write);
        }
        assert_eq!(
            c.classify(&Method::from_bytes(b"PROPFIND").unwrap(), "/x"),
            Kind::Write
        );
    }

    #[test]
    fn read_and_write_routes() {
        let c = Classifier::new(
            &[
                pat("POST", "/PasswordVault/api/Accounts/*/Password/Retrieve"),
                pat("POST", "/api/sessions/**"),
            ],
            &[
                pat("GET", "/PasswordVault/api/Accounts/*/Password/Retrieve"),
                pat("*", "/admin/**"),
            ],
            PathCase::Sensitive,
        );
        assert_eq!(
            c.classify(
                &Method::POST,
                "/PasswordVault/api/Accounts/12_3/Password/Retrieve"
            ),
            Kind::Read
        );
        assert_eq!(
            c.classify(
                &Method::POST,
                "/PasswordVault/api/Accounts/12/Password/Change"
            ),
            Kind::Write
        );
        assert_eq!(
            c.classify(
                &Method::POST,
                "/PasswordVault/api/Accounts/1/2/Password/Retrieve"
            ),
            Kind::Write
        );
        assert_eq!(
            c.classify(&Method::POST, "/api/sessions/a/b/launch"),
            Kind::Read
        );
        // A write route wins over the method's default.
        assert_eq!(
            c.classify(
                &Method::GET,
                "/PasswordVault/api/Accounts/9/Password/Retrieve"
            ),
            Kind::Write
        );
        assert_eq!(c.classify(&Method::GET, "/admin/users"), Kind::Write);
        assert_eq!(c.classify(&Method::GET, "/other"), Kind::Read);
    }

    #[test]
    fn globs() {
        assert!(glob(b"a*c", b"abbbc", false));
        assert!(glob(b"*", b"", false));
        assert!(!glob(b"a*c", b"abd", false));
        assert!(glob(b"*.json", b"x.json", false));
        assert!(!glob(b"*.json", b"x.JSON", false));
        assert!(glob(b"*.json", b"x.JSON", true));
    }

    #[test]
    fn case_insensitive_clusters_match_globs_without_case() {
        let writes = [pat(
            "GET",
            "/PasswordVault/api/Accounts/*/Password/Retrieve",
        )];
        let iis = Classifier::new(&[], &writes, PathCase::Insensitive);
        let java = Classifier::new(&[], &writes, PathCase::Sensitive);
        let path = "/passwordvault/API/accounts/1/PASSWORD/retrieve";
        assert_eq!(iis.classify(&Method::GET, path), Kind::Write);
        assert_eq!(java.classify(&Method::GET, path), Kind::Read);
    }
}

/// Properties of the glob matcher on generated patterns and paths.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_star_free_pattern_matches_exactly_itself(p in "[a-zA-Z0-9._~-]{0,12}", t in "[a-zA-Z0-9._~-]{0,12}") {
            prop_assert_eq!(glob(p.as_bytes(), t.as_bytes(), false), p == t);
            prop_assert_eq!(glob(p.as_bytes(), t.as_bytes(), true), p.eq_ignore_ascii_case(&t));
        }

        #[test]
        fn a_star_matches_any_infix(a in "[a-z]{0,6}", mid in "[a-zA-Z*]{0,8}", b in "[a-z]{0,6}") {
            let pattern = format!("{a}*{b}");
            let text = format!("{a}{mid}{b}");
            prop_assert!(glob(pattern.as_bytes(), text.as_bytes(), false));
        }

        #[test]
        fn folding_is_matching_the_lower_cased_pattern(p in "[a-zA-Z*]{0,8}", t in "[a-zA-Z]{0,10}") {
            let folded = glob(p.as_bytes(), t.as_bytes(), true);
            let lowered = glob(p.to_ascii_lowercase().as_bytes(), t.to_ascii_lowercase().as_bytes(), false);
            prop_assert_eq!(folded, lowered);
        }

        #[test]
        fn a_write_route_always_wins(seg in "[a-zA-Z0-9]{1,8}", rest in "(/[a-z]{1,4}){0,3}") {
            let pattern = RoutePattern { method: None, path: format!("/{seg}/**") };
            let c = Classifier::new(std::slice::from_ref(&pattern), std::slice::from_ref(&pattern), PathCase::Sensitive);
            let path = format!("/{seg}{rest}");
            for m in [Method::GET, Method::POST, Method::HEAD] {
                prop_assert_eq!(c.classify(&m, &path), Kind::Write);
            }
        }
    }
}
