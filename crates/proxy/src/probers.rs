//! The active health checks: one task per backend that probes it on its interval
//! (through `upstream::probe`) and records the result in its cluster's health.
//!
//! It ties three layers together (cluster, upstream, health) so that none of them has
//! to know the others: health only judges probe histories, upstream only performs one
//! probe. A prober holds its cluster weakly and ends when the cluster is dropped (a
//! reload retired it) or at shutdown. It never blocks an async worker on a plugin.

use std::sync::{Arc, Weak};

/// Runs active checks for every backend of `cluster` until it is dropped or shutdown.
pub fn spawn_probers(
    cluster: &Arc<crate::cluster::Cluster>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Some(cfg) = cluster.health.active().cloned() else {
        return;
    };
    for i in 0..cluster.backends.len() {
        let weak: Weak<crate::cluster::Cluster> = Arc::downgrade(cluster);
        let cfg = cfg.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            // Spread first probes over the interval so a large farm is not probed in bursts.
            let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
            let mut next = tokio::time::Instant::now() + jitter;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = shutdown.changed() => return,
                }
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                let backend = cluster.backends[i].clone();
                let probe = crate::upstream::probe(&backend, &cfg).await;
                if cluster.health.policy_may_block() {
                    // A plugin may run to its deadline: never on an async worker.
                    let c = cluster.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || c.health.record_probe(i, probe)).await;
                } else {
                    cluster.health.record_probe(i, probe);
                }
                drop(cluster);
                next += cfg.interval;
                let now = tokio::time::Instant::now();
                if next < now {
                    next = now;
                }
            }
        });
    }
}
