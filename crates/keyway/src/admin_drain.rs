//! The drain calls of the admin API: `POST /clusters/C/backends/B/drain[?deadline=10m]`
//! and `POST /clusters/C/backends/B/undrain`, and how a drain shows in `/status`.
//!
//! It parses the call, names the caller (the `keyway-operator` header a client such as
//! `keyway ctl` sends, and the peer address: the admin API knows no other identity, its
//! token is shared) and hands the decision to the coordinator, which keeps it with the
//! other decisions. It never decides or routes anything itself.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use keyway_proxy::backend::Backend;
use keyway_proxy::body::Body;
use keyway_proxy::failover::Drain;

use crate::admin::{decided, reply};

/// The request header naming the operator behind a call (`keyway ctl` sends `$USER`).
pub const OPERATOR_HEADER: &str = "keyway-operator";

/// Longest drain deadline accepted: a week. A drain without one lasts until undrained.
const MAX_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Answers a drain or undrain call; `None` when `req` is neither.
pub(crate) async fn call(
    reloader: &keyway_proxy::server::Reloader,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    let rest = req.uri().path().strip_prefix("/clusters/")?;
    let (cluster, rest) = rest.split_once("/backends/")?;
    let (backend, action) = rest.split_once('/')?;
    if cluster.is_empty() || cluster.contains('/') || backend.is_empty() {
        return None;
    }
    let by = caller(req, peer);
    let failover = reloader.failover();
    let result = match action {
        "drain" => {
            let deadline = match deadline(req.uri().query()) {
                Ok(d) => d,
                Err(e) => return Some(reply(StatusCode::BAD_REQUEST, "text/plain", e)),
            };
            failover.drain(cluster, backend, &by, deadline).await
        }
        "undrain" => failover.undrain(cluster, backend, &by).await,
        _ => return None,
    };
    Some(decided(result))
}

/// `OPERATOR from PEER-IP`, or the peer address alone. The operator's name is what the
/// client says (trimmed to 64 visible characters): a label for the record, not a proof.
fn caller(req: &Request<Incoming>, peer: SocketAddr) -> String {
    let named = req
        .headers()
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect::<String>()
        })
        .filter(|v| !v.is_empty());
    match named {
        Some(name) => format!("{name} from {}", peer.ip()),
        None => peer.ip().to_string(),
    }
}

/// `deadline=DURATION` from the query (`600s`, `10m`, `1h30m`), if given.
fn deadline(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(q) = query else { return Ok(None) };
    let mut found = None;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "deadline" {
            return Err(format!(
                "unknown parameter `{k}`: the only one is deadline=DURATION (e.g. deadline=10m)\n"
            ));
        }
        let d = humantime::parse_duration(v).map_err(|e| {
            format!("deadline `{v}` is not a duration ({e}); write it like 600s, 10m or 1h30m\n")
        })?;
        if d.is_zero() || d > MAX_DEADLINE {
            return Err(format!(
                "deadline `{v}` must be more than 0 and at most 7 days; without one, pinned sessions keep the backend until they end\n"
            ));
        }
        found = Some(d);
    }
    Ok(found)
}

/// A backend's `drain` in `/status`: who, when, the deadline and who still holds on.
pub(crate) fn backend_json(drain: Option<&Drain>, b: &Backend) -> serde_json::Value {
    let Some(d) = drain else {
        return serde_json::Value::Null;
    };
    let now = keyway_proxy::unix_ms(std::time::SystemTime::now());
    serde_json::json!({
        "by": d.by,
        "since_unix_ms": d.unix_ms,
        "deadline_unix_ms": d.deadline_unix_ms,
        "expired": d.expired(now),
        "instance": d.instance,
        "holding_clients": b.holders.count(),
        "in_flight": b.in_flight(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_parse_as_durations_and_are_bounded() {
        assert_eq!(deadline(None).unwrap(), None);
        assert_eq!(
            deadline(Some("deadline=10m")).unwrap(),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            deadline(Some("deadline=600s")).unwrap(),
            Some(Duration::from_secs(600))
        );
        assert!(deadline(Some("deadline=soon")).is_err());
        assert!(deadline(Some("deadline=30d")).is_err());
        assert!(deadline(Some("until=1")).is_err());
    }
}
