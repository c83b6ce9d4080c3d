//! Graceful drain and connection caps: the guard that marks the end of a client
//! connection (shared by HTTP and TCP listeners and the request path's tunnels), and
//! the resizable per-listener limit taken before `accept`. Owns no policy: the server
//! sets the limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

// === drain ===

/// Held by every client connection and the tunnels upgraded from it: shutdown waits
/// until all are dropped, and the connection's slot under its listener's
/// `max_connections` is free again only when the last of them goes.
#[derive(Clone)]
pub struct DrainGuard(#[allow(dead_code)] Arc<(mpsc::Sender<()>, Option<OwnedSemaphorePermit>)>);

impl DrainGuard {
    /// A guard for one client connection, holding its listener slot if it has one.
    pub(crate) fn new(drain: mpsc::Sender<()>, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self(Arc::new((drain, slot)))
    }
}

// === connection limits ===

/// A listener's cap on open client connections: a permit is taken *before* `accept`,
/// so connections past the cap wait in the kernel's backlog instead of being accepted
/// and dropped. A reload resizes it in place; open connections keep their permits.
pub(crate) struct ConnLimit {
    pub(crate) free: Arc<Semaphore>,
    size: std::sync::Mutex<u32>,
}

impl ConnLimit {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            free: Arc::new(Semaphore::new(size as usize)),
            size: std::sync::Mutex::new(size),
        }
    }

    pub(crate) fn resize(&self, next: u32) {
        let Ok(mut size) = self.size.lock() else {
            return;
        };
        let old = std::mem::replace(&mut *size, next);
        if next > old {
            self.free.add_permits((next - old) as usize);
        } else if next < old {
            let surplus = (old - next) as usize;
            let gone = self.free.forget_permits(surplus);
            if gone < surplus {
                // The rest are held by open connections: retire them as those close.
                // The semaphore is fair, so no new connection is admitted before.
                let free = self.free.clone();
                let rest = u32::try_from(surplus - gone).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = free.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
    }
}

// === accepting under the cap ===

/// A slot under the listener's `max_connections` first (at the cap, new connections
/// wait in the kernel's backlog, not accepted and dropped; `reached` counts each time),
/// then one accepted connection, with Nagle off. An accept error (EMFILE and friends)
/// is logged and retried after a pause instead of spinning. `None` at shutdown.
pub(crate) async fn accept_under(
    sock: &TcpListener,
    limit: &ConnLimit,
    reached: &metrics::Counter,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let slot = match limit.free.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            reached.increment(1);
            tracing::debug!("max_connections reached; new connections wait in the backlog");
            tokio::select! {
                s = limit.free.clone().acquire_owned() => s.ok()?,
                _ = shutdown.changed() => return None,
            }
        }
    };
    loop {
        tokio::select! {
            r = sock.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, slot));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}
