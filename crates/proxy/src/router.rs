//! Chooses a cluster for a request from its host and path.
//!
//! Routes are compiled once into a table ordered by specificity: exact hosts before
//! `*.suffix` patterns (longest suffix first) before `*`, and within a host the longest
//! path prefix first. Lookup allocates nothing. Path prefixes match on segment
//! boundaries, so `/api` matches `/api` and `/api/x` but not `/apix`, and without case
//! when the target cluster says its backends compare paths that way. The path given is
//! the front door's normal form (see `frontdoor`).

use crate::config::{HostPattern, PathCase, RouteConfig};

/// A compiled route table.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    host: HostPattern,
    path: String,
    /// Index of the target cluster in the runtime's cluster list.
    cluster: usize,
    /// How the target cluster compares paths.
    case: PathCase,
}

impl Router {
    /// Compiles `routes`; `cluster_index` maps a cluster name to its runtime index and
    /// how its backends compare paths.
    pub fn new(
        routes: &[RouteConfig],
        cluster_index: impl Fn(&str) -> Option<(usize, PathCase)>,
    ) -> Self {
        let mut compiled: Vec<(usize, Compiled)> = routes
            .iter()
            .enumerate()
            .filter_map(|(order, r)| {
                let (cluster, case) = cluster_index(&r.cluster)?;
                Some((
                    order,
                    Compiled {
                        host: r.host.clone(),
                        path: r.path.clone(),
                        cluster,
                        case,
                    },
                ))
            })
            .collect();
        compiled.sort_by(|(oa, a), (ob, b)| {
            host_rank(&b.host)
                .cmp(&host_rank(&a.host))
                .then(b.path.len().cmp(&a.path.len()))
                .then(oa.cmp(ob))
        });
        Self {
            routes: compiled.into_iter().map(|(_, c)| c).collect(),
        }
    }

    /// The cluster index for `host` (without port; any case) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .find(|r| host_matches(&r.host, host) && prefix_matches(&r.path, path, r.case))
            .map(|r| r.cluster)
    }
}

/// Higher is more specific.
fn host_rank(h: &HostPattern) -> (u8, usize) {
    match h {
        HostPattern::Exact(_) => (2, 0),
        HostPattern::Suffix(s) => (1, s.len()),
        HostPattern::Any => (0, 0),
    }
}

fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    match pattern {
        HostPattern::Any => true,
        HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
        HostPattern::Suffix(s) => {
            host.len() > s.len()
                && host.is_char_boundary(host.len() - s.len())
                && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
        }
    }
}

fn prefix_matches(prefix: &str, path: &str, case: PathCase) -> bool {
    if prefix == "/" {
        return true;
    }
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    let head = path.as_bytes().get(..prefix.len());
    let starts = match case {
        PathCase::Sensitive => head == Some(prefix.as_bytes()),
        PathCase::Insensitive => head.is_some_and(|h| h.eq_ignore_ascii_case(prefix.as_bytes())),
    };
    starts
        && matches!(
            path.as_bytes().get(prefix.len()),
            None | Some(b'/') | Some(b'?')
        )
}

/// Splits the port off a Host header value or URI authority: `a.test:8443` → `a.test`,
/// `[::1]:80` → `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, path: &str, cluster: &str) -> RouteConfig {
        RouteConfig {
            host: crate::config::host_pattern_for_tests(host),
            path: path.into(),
            cluster: cluster.into(),
        }
    }

    fn router(routes: &[RouteConfig]) -> (Router, Vec<String>) {
        let names: Vec<String> = routes.iter().map(|r| r.cluster.clone()).collect();
        let n2 = names.clone();
        (
            Router::new(routes, move |c| {
                n2.iter().position(|n| n == c).map(|i| {
                    (
                        i,
                        if c.ends_with("-ci") {
                            PathCase::Insensitive
                        } else {
                            PathCase::Sensitive
                        },
                    )
                })
            }),
            names,
        )
    }

    #[test]
    fn exact_beats_suffix_beats_any_and_longest_prefix_wins() {
        let (r, names) = router(&[
            route("*", "/", "any"),
            route("*.corp.test", "/", "suffix"),
            route("pvwa.corp.test", "/", "exact"),
            route("pvwa.corp.test", "/PasswordVault/api", "api"),
        ]);
        let name = |h, p| r.route(h, p).map(|i| names[i].as_str());
        assert_eq!(name("PVWA.corp.test", "/x"), Some("exact"));
        assert_eq!(
            name("pvwa.corp.test", "/PasswordVault/api/Accounts"),
            Some("api")
        );
        assert_eq!(name("pvwa.corp.test", "/PasswordVault/apix"), Some("exact"));
        assert_eq!(name("psm.corp.test", "/"), Some("suffix"));
        assert_eq!(name("corp.test", "/"), Some("any"));
        assert_eq!(name("other", "/"), Some("any"));
    }

    #[test]
    fn case_follows_the_target_cluster() {
        let (r, names) = router(&[
            route("a.test", "/PasswordVault", "iis-ci"),
            route("a.test", "/api", "java"),
            route("a.test", "/", "rest"),
        ]);
        let name = |p| r.route("a.test", p).map(|i| names[i].as_str());
        assert_eq!(name("/passwordvault/x"), Some("iis-ci"));
        assert_eq!(name("/PASSWORDVAULT"), Some("iis-ci"));
        assert_eq!(name("/api/x"), Some("java"));
        assert_eq!(name("/API/x"), Some("rest"));
    }

    #[test]
    fn no_match_is_none() {
        let (r, _) = router(&[route("a.test", "/app", "a")]);
        assert_eq!(r.route("a.test", "/other"), None);
        assert_eq!(r.route("b.test", "/app"), None);
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.test:8443"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
