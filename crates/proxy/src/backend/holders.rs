//! Who holds on to a backend: client addresses its affinity (sticky cookie, client-IP
//! affinity) sent to it, with when each was last seen. A drain keeps a client-IP
//! affinity client on a drained backend only when it is here (it had a session), and
//! `/status` counts the clients still holding on. Bounded in size and in time; one
//! short lock per noted connection or pinned request, never held across an await.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a client counts as holding a session after it was last seen: a TCP
/// client reconnecting within it (an RDP reconnect) keeps a drained backend.
pub const HOLD_WINDOW: Duration = Duration::from_secs(600);

/// Most clients remembered per backend; past it, new ones are not remembered until
/// old ones age out.
const MAX_HOLDERS: usize = 16_384;

/// Clients recently sent to one backend by their affinity.
#[derive(Default)]
pub struct Holders {
    seen: Mutex<HashMap<IpAddr, Instant>>,
}

impl Holders {
    /// Notes that `client` was sent to (or ended a connection with) this backend now.
    pub fn note(&self, client: IpAddr) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let now = Instant::now();
        if seen.len() >= MAX_HOLDERS && !seen.contains_key(&client) {
            seen.retain(|_, at| now.duration_since(*at) < HOLD_WINDOW);
            if seen.len() >= MAX_HOLDERS {
                return;
            }
        }
        seen.insert(client, now);
    }

    /// Whether `client` was seen within [`HOLD_WINDOW`].
    pub fn holds(&self, client: IpAddr) -> bool {
        self.seen
            .lock()
            .is_ok_and(|s| s.get(&client).is_some_and(|at| at.elapsed() < HOLD_WINDOW))
    }

    /// Clients seen within [`HOLD_WINDOW`].
    pub fn count(&self) -> usize {
        self.seen.lock().map_or(0, |s| {
            s.values().filter(|at| at.elapsed() < HOLD_WINDOW).count()
        })
    }

    /// Takes over the clients of the same backend in the runtime a reload replaces.
    pub fn inherit(&self, old: &Holders) {
        let (Ok(mut mine), Ok(theirs)) = (self.seen.lock(), old.seen.lock()) else {
            return;
        };
        mine.extend(theirs.iter().map(|(k, v)| (*k, *v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_remembered_counted_and_inherited() {
        let h = Holders::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!h.holds(a));
        h.note(a);
        assert!(h.holds(a));
        assert_eq!(h.count(), 1);
        let next = Holders::default();
        next.inherit(&h);
        assert!(next.holds(a));
    }
}
