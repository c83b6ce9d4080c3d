//! The write permit of an instance and the write gate of a cluster: the two halves of
//! "no two backends take writes at the same time" (invariant 3 in `docs/architecture.md`).
//!
//! - [`Permit`]: whether this instance may route writes at all. A single instance (state
//!   file) always may. With `[coordination]`, it may only until its etcd lease could
//!   have expired: the deadline is measured on this process's monotonic clock from the
//!   moment the last successful lease renewal was *sent* (etcd restarts the TTL when it
//!   receives it, which is later), minus a margin for clock-rate drift ([`valid_for`]).
//!   So once etcd has deleted this instance's registration, this instance has already
//!   stopped writing, whatever the network did meanwhile.
//! - [`WriteGate`]: how many writes of one cluster are in flight, counted from the
//!   moment their eligibility is decided (before the topology snapshot is read) until
//!   their response ends. After a new topology is applied, [`WriteGate::fence`] returns
//!   once every write that could have read an older snapshot has ended: that is what
//!   an instance acknowledges before another backend may become primary.
//!
//! Neither blocks the request path: a write costs one clock read and two atomic
//! increments; only the fence (off the request path) waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Fraction of a lease kept as a margin for clock-rate drift between this host and etcd's
/// (NTP keeps rate errors far below this; a VM paused longer is covered by the lease
/// expiring in etcd before anyone promotes).
const DRIFT_PERCENT: u32 = 5;
/// A fixed margin on top, for scheduling delay between reading the clock and acting.
const MARGIN: Duration = Duration::from_millis(50);

/// How long after *sending* a successful renewal of a `ttl` lease this instance may
/// route writes.
pub fn valid_for(ttl: Duration) -> Duration {
    ttl.saturating_sub(ttl * DRIFT_PERCENT / 100)
        .saturating_sub(MARGIN)
}

/// Milliseconds on this process's monotonic clock (never 0, so 0 can mean "never").
fn mono_ms(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| Instant::now() - Duration::from_millis(1));
    at.saturating_duration_since(base).as_millis() as u64
}

// === impl Permit ===

/// Whether this instance may route writes now.
#[derive(Debug)]
pub struct Permit {
    /// `false`: a single instance, which always holds its permit.
    coordinated: bool,
    /// Monotonic milliseconds until which writes may be routed (0: not held).
    until: AtomicU64,
    /// How the permit was last extended (for `/status`): 0 none, 1 etcd, 2 failsafe.
    by: AtomicU64,
}

/// How a permit was extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// A lease renewal etcd answered.
    Etcd,
    /// Every failsafe peer agreed while etcd was unreachable for all.
    Failsafe,
}

impl Permit {
    /// The permit of a single instance: always held.
    pub fn always() -> Self {
        Self {
            coordinated: false,
            until: AtomicU64::new(u64::MAX),
            by: AtomicU64::new(0),
        }
    }

    /// The permit of a coordinated instance: not held until the first renewal.
    pub fn coordinated() -> Self {
        Self {
            coordinated: true,
            until: AtomicU64::new(0),
            by: AtomicU64::new(0),
        }
    }

    /// Whether writes may be routed now. On the request path: one clock read.
    #[inline]
    pub fn holds(&self) -> bool {
        !self.coordinated || mono_ms(Instant::now()) < self.until.load(Ordering::Acquire)
    }

    /// Whether this permit depends on etcd at all.
    pub fn is_coordinated(&self) -> bool {
        self.coordinated
    }

    /// Holds the permit until `until` (never moves an existing deadline backwards
    /// through this call: use [`Permit::revoke`] for that).
    pub fn extend(&self, until: Instant, by: Grant) {
        if !self.coordinated {
            return;
        }
        self.until.fetch_max(mono_ms(until), Ordering::AcqRel);
        self.by.store(
            match by {
                Grant::Etcd => 1,
                Grant::Failsafe => 2,
            },
            Ordering::Relaxed,
        );
    }

    /// Gives the permit up at once (the registration or the lease is gone).
    pub fn revoke(&self) {
        if self.coordinated {
            self.until.store(0, Ordering::Release);
        }
    }

    /// How long the permit still holds (zero when it does not).
    pub fn remaining(&self) -> Duration {
        if !self.coordinated {
            return Duration::MAX;
        }
        let until = self.until.load(Ordering::Acquire);
        Duration::from_millis(until.saturating_sub(mono_ms(Instant::now())))
    }

    /// `/status`: held, for how long, and by what.
    pub fn status_json(&self) -> serde_json::Value {
        if !self.coordinated {
            return serde_json::json!({ "held": true, "by": "state-file" });
        }
        let held = self.holds();
        serde_json::json!({
            "held": held,
            "remaining_ms": if held { self.remaining().as_millis() as u64 } else { 0 },
            "by": match self.by.load(Ordering::Relaxed) {
                1 => "etcd",
                2 => "failsafe",
                _ => "none",
            },
        })
    }
}

// === impl WriteGate ===

/// Counts one cluster's writes in flight, in two generations (see the module docs).
#[derive(Debug, Default)]
pub struct WriteGate {
    /// The topology epoch applied last: a write routed by a snapshot of another epoch
    /// (a runtime retired by a reload just as a decision landed) is not sent.
    epoch: AtomicU64,
    generation: AtomicU64,
    counts: [AtomicU64; 2],
    /// Serializes fences, so at most two generations ever hold writes.
    fencing: tokio::sync::Mutex<()>,
}

/// One write in flight; counted until dropped.
#[derive(Debug)]
pub struct WriteTicket {
    gate: Arc<WriteGate>,
    slot: usize,
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.gate.counts[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

impl WriteGate {
    /// Counts a write. Call it *before* reading the topology snapshot the write is
    /// routed by: a fence that starts after this returns waits for it.
    pub fn enter(self: &Arc<Self>) -> WriteTicket {
        loop {
            let g = self.generation.load(Ordering::SeqCst);
            let slot = (g & 1) as usize;
            self.counts[slot].fetch_add(1, Ordering::SeqCst);
            if self.generation.load(Ordering::SeqCst) == g {
                return WriteTicket {
                    gate: self.clone(),
                    slot,
                };
            }
            // A fence flipped the generation meanwhile: count in the new one.
            self.counts[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Records the epoch just applied to the serving runtime. Call it after the
    /// snapshot is published and before [`WriteGate::fence`].
    pub fn applied(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The epoch applied last. A write checks its snapshot against it *after*
    /// [`WriteGate::enter`]: either the fence counts the write, or the write sees the
    /// new epoch here.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Writes in flight now.
    pub fn in_flight(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    /// Call after a new topology was published to the request path. Returns `true`
    /// once every write counted before this call has ended, `false` if some are still
    /// in flight at `deadline`.
    pub async fn fence(&self, deadline: Instant) -> bool {
        let Ok(_one) = tokio::time::timeout_at(deadline.into(), self.fencing.lock()).await else {
            return false;
        };
        let g = self.generation.load(Ordering::SeqCst);
        let (current, other) = ((g & 1) as usize, ((g + 1) & 1) as usize);
        // An earlier fence that timed out may have left writes in the other slot:
        // they predate this topology too, and the slot must be empty before reuse.
        if !self.wait_empty(other, deadline).await {
            return false;
        }
        self.generation.store(g + 1, Ordering::SeqCst);
        self.wait_empty(current, deadline).await
    }

    async fn wait_empty(&self, slot: usize, deadline: Instant) -> bool {
        let mut pause = Duration::from_millis(1);
        loop {
            if self.counts[slot].load(Ordering::SeqCst) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permit_is_valid_for_the_lease_less_the_margins() {
        assert_eq!(
            valid_for(Duration::from_secs(2)),
            Duration::from_millis(1850)
        );
        assert_eq!(valid_for(Duration::from_millis(10)), Duration::ZERO);
        let p = Permit::coordinated();
        assert!(!p.holds(), "a coordinated permit starts not held");
        p.extend(Instant::now() + Duration::from_secs(60), Grant::Etcd);
        assert!(p.holds());
        // Extending to an earlier deadline never shortens it.
        p.extend(Instant::now(), Grant::Etcd);
        assert!(p.holds());
        p.revoke();
        assert!(!p.holds());
        p.extend(Instant::now() - Duration::from_millis(5), Grant::Failsafe);
        assert!(!p.holds(), "a deadline in the past grants nothing");
        assert!(Permit::always().holds());
    }

    #[tokio::test]
    async fn a_fence_waits_for_every_write_counted_before_it() {
        let gate = Arc::new(WriteGate::default());
        let early = gate.enter();
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(!gate.fence(soon).await, "a write in flight holds the fence");
        // Writes counted after a fence began do not hold the next fence's first half
        // forever: they are in the new generation.
        let late = gate.enter();
        let g2 = gate.clone();
        let waiter =
            tokio::spawn(async move { g2.fence(Instant::now() + Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "the fence waits for the early write");
        drop(early);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            !waiter.is_finished(),
            "and for the one counted before it began"
        );
        drop(late);
        assert!(waiter.await.unwrap());
        assert_eq!(gate.in_flight(), 0);
        // A write counted before the next fence holds that one too.
        let after = gate.enter();
        assert!(!gate.fence(Instant::now() + Duration::from_millis(20)).await);
        drop(after);
        assert!(gate.fence(Instant::now() + Duration::from_secs(1)).await);
    }
}
