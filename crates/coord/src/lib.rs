//! keyway's coordinator: who is primary, and making that true everywhere.
//!
//! It owns the topology of every primary-replica cluster (epoch, primary, fenced), the
//! promotion controller, switchovers and failbacks in two acknowledged epochs, the
//! promote and repoint hooks, the stores that keep decisions (the state file, etcd), the
//! instance's write permit and each cluster's write gate. It reaches the data plane only
//! through the narrow [`failover::DataPlane`] trait (read a view, apply a topology) and
//! never names a data-plane type; the data plane depends on this crate, not the reverse.
//! Read `docs/architecture.md` for the invariants it keeps.
#![deny(missing_docs)]

pub mod etcd;
pub mod failover;
pub mod oneshot;
pub mod permit;
pub mod tls;

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
