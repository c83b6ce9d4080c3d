//! The keys each table of the file accepts, and the nearest known key to a mistyped
//! one, for the "unknown key" errors and their "did you mean" fixes. Knows names only;
//! never reads a value.

use super::*;

/// The keys each table accepts, for "did you mean" hints on unknown keys.
pub(super) fn known_keys(parent: &KeyPath) -> &'static [&'static str] {
    use Seg::{Index, Key};
    let segs: Vec<Option<&str>> = parent
        .0
        .iter()
        .map(|s| match s {
            Key(k) => Some(k.as_str()),
            Index(_) => None,
        })
        .collect();
    match segs.as_slice() {
        [] => &[
            "admin",
            "proxy",
            "listener",
            "tcp_listener",
            "route",
            "cluster",
            "state",
            "coordination",
        ],
        [Some("state")] => &["file"],
        [Some("coordination")] => &[
            "etcd",
            "prefix",
            "lease_ttl",
            "instance",
            "timeout",
            "ca",
            "cert",
            "key",
            "failsafe",
        ],
        [Some("coordination"), Some("failsafe")] => &["peers"],
        [Some("admin")] => &["listen", "token_file"],
        [Some("proxy")] => &[
            "workers",
            "drain_timeout",
            "access_log",
            "secret_file",
            "watch_plugins",
        ],
        [Some("listener"), None] => &[
            "listen",
            "tls",
            "max_request_header_bytes",
            "max_request_body_bytes",
            "header_read_timeout",
            "idle_timeout",
            "allow_encoded_slashes",
            "allow_trace",
            "trusted_proxies",
            "forwarded",
            "max_connections",
            "proxy_protocol",
        ],
        [Some("listener" | "tcp_listener"), None, Some("tls"), None] => &["hosts", "cert", "key"],
        [Some("tcp_listener"), None] => &[
            "listen",
            "cluster",
            "sni",
            "tls",
            "idle_timeout",
            "handshake_timeout",
            "max_connections",
            "proxy_protocol",
        ],
        [Some("tcp_listener"), None, Some("sni"), None] => &["hosts", "cluster"],
        [Some("route"), None] => &["host", "path", "cluster"],
        [Some("cluster"), Some(_)] => &[
            "strategy",
            "balance",
            "paths",
            "upgrades",
            "sticky",
            "connect_timeout",
            "connect_stagger",
            "protocol_timeout",
            "protocol_check",
            "affinity",
            "retries",
            "retry_budget",
            "upstream_ca",
            "pool",
            "max_connections",
            "max_queue",
            "queue_timeout",
            "health",
            "outlier",
            "read_routes",
            "write_routes",
            "reads_on_primary",
            "max_lag",
            "read_your_writes",
            "classifier",
            "promotion",
            "failback",
            "backends",
        ],
        [Some("cluster"), Some(_), Some("promotion")] => &[
            "policy",
            "config",
            "on_error",
            "auto",
            "hold",
            "require_hook_ok",
            "on_promote",
            "on_repoint",
            "drain",
        ],
        [Some("cluster"), Some(_), Some("promotion"), Some("on_promote" | "on_repoint")] => {
            &["url", "timeout"]
        }
        [Some("cluster"), Some(_), Some("failback")] => &["after"],
        [Some("cluster"), Some(_), Some("health")] => &[
            "kind",
            "path",
            "interval",
            "timeout",
            "expect",
            "rise",
            "fall",
            "policy",
            "failures",
            "window",
            "initial",
            "lag_header",
            "lag_json",
            "config",
            "on_error",
            "port",
        ],
        [Some("cluster"), Some(_), Some("classifier")] => {
            &["policy", "config", "on_error", "remember_answers"]
        }
        [Some("cluster"), Some(_), Some("outlier")] => &[
            "consecutive_failures",
            "base_ejection",
            "max_ejection",
            "count_5xx",
        ],
        [Some("cluster"), Some(_), Some("sticky")] => &["cookie", "max_age"],
        [Some("cluster"), Some(_), Some("retry_budget")] => &["ratio", "min_per_second"],
        [Some("cluster"), Some(_), Some("pool")] => &["max_idle", "idle_timeout"],
        [Some("cluster"), Some(_), Some("backends"), None] => &[
            "id",
            "address",
            "weight",
            "priority",
            "tls",
            "sni",
            "protocol",
            "role",
            "location",
            "max_connections",
            "max_queue",
            "proxy_protocol",
        ],
        _ => &[],
    }
}

/// The known key nearest to `key` by edit distance, if it is close enough to be a typo.
pub(super) fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                let cost = usize::from(ca != *cb);
                cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}
