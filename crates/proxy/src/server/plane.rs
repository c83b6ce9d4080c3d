//! The data plane as the coordinator sees it: [`failover::DataPlane`] for a runtime that
//! does not serve yet ([`Runtime`]) and for the serving one ([`LivePlane`]).
//!
//! Owns the translation between the coordinator's plain types and the data plane's
//! (backend ids to indices, `Health` to `BackendHealth`) and nothing else: it never
//! decides a topology and never swaps a runtime in by itself (the reloader does, through
//! `Failover::swap_in`, under the coordinator's lock).

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::cluster::Cluster;
use crate::config::ClusterConfig;
use crate::failover::{BackendHealth, BackendState, ClusterView, DataPlane, Drains, Topology};
use crate::forward::Runtime;
use crate::health::Health;

/// The serving runtime: every call reads the one published at that moment.
pub struct LivePlane(pub Arc<ArcSwap<Runtime>>);

impl DataPlane for LivePlane {
    fn clusters(&self) -> Vec<Arc<ClusterConfig>> {
        self.0.load().clusters()
    }

    fn view(&self, cluster: &str) -> Option<ClusterView> {
        self.0.load().view(cluster)
    }

    fn apply(&self, cluster: &str, topology: &Topology) {
        DataPlane::apply(&**self.0.load(), cluster, topology);
    }

    fn apply_drains(&self, cluster: &str, drains: &Drains) {
        DataPlane::apply_drains(&**self.0.load(), cluster, drains);
    }
}

impl DataPlane for Runtime {
    fn clusters(&self) -> Vec<Arc<ClusterConfig>> {
        self.clusters.iter().map(|c| c.cfg.clone()).collect()
    }

    fn view(&self, cluster: &str) -> Option<ClusterView> {
        self.cluster(cluster).map(|c| view(c))
    }

    fn apply(&self, cluster: &str, topology: &Topology) {
        if let Some(c) = self.cluster(cluster) {
            apply(c, topology);
        }
    }

    fn apply_drains(&self, cluster: &str, drains: &Drains) {
        if let Some(c) = self.cluster(cluster) {
            let marks: Vec<Option<Option<u64>>> = c
                .backends
                .iter()
                .map(|b| drains.get(&b.cfg.id).map(|d| d.deadline_unix_ms))
                .collect();
            c.health.set_drains(&marks);
        }
    }
}

fn view(c: &Cluster) -> ClusterView {
    let health = c.health.view_full();
    let backends = health
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| BackendState {
            health: match b.health {
                Health::Unknown => BackendHealth::Unknown,
                Health::Healthy => BackendHealth::Healthy,
                Health::Degraded => BackendHealth::Degraded,
                Health::Unhealthy => BackendHealth::Unhealthy,
            },
            address: c.backends[i].address,
            lag_ms: b.lag_ms,
            last_ok_ms: c.health.last_ok_unix_ms(i),
            since: c.health.since(i),
        })
        .collect();
    ClusterView {
        cfg: c.cfg.clone(),
        backends,
        primary: health.primary,
        checked: c.health.active().is_some(),
    }
}

/// Applies a topology to one cluster: ids it does not have are ignored.
fn apply(c: &Cluster, t: &Topology) {
    let index = |id: &String| c.backends.iter().position(|b| b.cfg.id == *id);
    let primary = t.primary.as_ref().and_then(index);
    let fenced: Vec<usize> = t.fenced.iter().filter_map(index).collect();
    c.health.set_topology(t.epoch, primary, &fenced);
}
