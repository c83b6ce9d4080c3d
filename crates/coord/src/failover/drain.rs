//! Drains (maintenance mode), an operator's decision kept like the others: a drained
//! backend takes no new sessions, while the sessions pinned to it (sticky cookie,
//! client-IP affinity) keep it until they end or the drain's deadline passes. A drain is
//! made durable before it applies (the state file, atomically; etcd, by a
//! compare-and-swap on the cluster's `drains` key, which every instance watches), and
//! it is applied to every runtime a reload builds, so it survives reloads and restarts.
//!
//! Rules: the primary of a `primary-replica` cluster is never drained (promote another
//! backend first), a drained backend is never promoted (not by the controller, nor by
//! an admin call: undrain it first; Patroni's `nofailover`), and the last backend of a
//! cluster that takes new sessions is not drained. This module decides none of the
//! routing: the data plane reads the drains it is given.

use super::*;

/// How many times a drain is retried when another instance changed the cluster's
/// drains between the read and the write.
const DRAIN_ATTEMPTS: usize = 3;

/// The outcome of a drain or undrain call.
#[derive(Clone, Debug, Serialize)]
pub struct DrainChange {
    /// The cluster.
    pub cluster: String,
    /// The backend.
    pub backend: String,
    /// Whether it is drained now.
    pub drained: bool,
    /// `false` when it already was as asked (the call is idempotent).
    pub changed: bool,
    /// The drain in force, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
}

impl Failover {
    /// One cluster's drains now.
    pub fn drains(&self, cluster: &str) -> Drains {
        self.drains
            .lock()
            .ok()
            .and_then(|d| d.get(cluster).map(|(d, _)| d.clone()))
            .unwrap_or_default()
    }

    /// Whether `backend` of `cluster` is drained.
    pub fn is_drained(&self, cluster: &str, backend: &str) -> bool {
        self.drains
            .lock()
            .is_ok_and(|d| d.get(cluster).is_some_and(|(d, _)| d.contains_key(backend)))
    }

    /// Drains `backend` of `cluster`: `by` names the caller, `deadline` (from now) ends
    /// the pinned sessions' grace. Already drained: nothing changes (200).
    pub async fn drain(
        self: &Arc<Self>,
        cluster: &str,
        backend: &str,
        by: &str,
        deadline: Option<Duration>,
    ) -> Result<DrainChange, Refused> {
        let view = self.drain_target(cluster, backend)?;
        let _guard = self.drain_guard(cluster).await?;
        if let Some(existing) = self.drains(cluster).get(backend) {
            return Ok(DrainChange {
                cluster: cluster.into(),
                backend: backend.into(),
                drained: true,
                changed: false,
                drain: Some(existing.clone()),
            });
        }
        if view.cfg.strategy == Strategy::PrimaryReplica
            && self
                .topology(cluster)
                .is_some_and(|t| t.primary.as_deref() == Some(backend))
        {
            return Err(refused(
                409,
                format!("`{backend}` is the primary of `{cluster}` and takes every write: promote another backend first (POST /clusters/{cluster}/promote/BACKEND), then drain it"),
            ));
        }
        let now = crate::unix_ms(SystemTime::now());
        let drain = Drain {
            by: by.to_string(),
            unix_ms: now,
            deadline_unix_ms: deadline.map(|d| now + d.as_millis() as u64),
            instance: match &self.store {
                Store::Etcd(e) => Some(e.cfg.instance.clone()),
                Store::File(_) => None,
            },
        };
        let ids: Vec<String> = view.cfg.backends.iter().map(|b| b.id.clone()).collect();
        let added = drain.clone();
        let now_drains = self
            .change_drains(cluster, |drains| {
                if drains.contains_key(backend) {
                    return Ok(false);
                }
                if !ids
                    .iter()
                    .any(|id| id != backend && !drains.contains_key(id))
                {
                    return Err(refused(
                        409,
                        format!("every other backend of `{cluster}` is drained: `{backend}` is the last one taking new sessions. Undrain another backend first"),
                    ));
                }
                drains.insert(backend.to_string(), added.clone());
                Ok(true)
            })
            .await?;
        tracing::info!(cluster, backend, by, deadline_unix_ms = ?drain.deadline_unix_ms, "backend drained: no new sessions");
        Ok(DrainChange {
            cluster: cluster.into(),
            backend: backend.into(),
            drained: true,
            changed: true,
            drain: now_drains.get(backend).cloned(),
        })
    }

    /// Ends the drain of `backend` of `cluster`. Not drained: nothing changes (200).
    pub async fn undrain(
        self: &Arc<Self>,
        cluster: &str,
        backend: &str,
        by: &str,
    ) -> Result<DrainChange, Refused> {
        self.drain_target(cluster, backend)?;
        let _guard = self.drain_guard(cluster).await?;
        let was = self.is_drained(cluster, backend);
        if was {
            self.change_drains(cluster, |drains| Ok(drains.remove(backend).is_some()))
                .await?;
            tracing::info!(
                cluster,
                backend,
                by,
                "backend undrained: takes new sessions again"
            );
        }
        Ok(DrainChange {
            cluster: cluster.into(),
            backend: backend.into(),
            drained: false,
            changed: was,
            drain: None,
        })
    }

    /// The serving cluster and backend a drain call names, or a 404 that lists the
    /// names there are.
    fn drain_target(&self, cluster: &str, backend: &str) -> Result<ClusterView, Refused> {
        let plane = self
            .live()
            .ok_or_else(|| refused(503, "keyway is starting"))?;
        let Some(view) = plane.view(cluster) else {
            let names: Vec<String> = plane.clusters().iter().map(|c| c.name.clone()).collect();
            return Err(refused(
                404,
                format!(
                    "no cluster `{cluster}`; the clusters are: {}",
                    names.join(", ")
                ),
            ));
        };
        if index(&view.cfg, backend).is_none() {
            let ids: Vec<&str> = view.cfg.backends.iter().map(|b| b.id.as_str()).collect();
            return Err(refused(
                404,
                format!(
                    "cluster `{cluster}` has no backend `{backend}`; its backends are: {}",
                    ids.join(", ")
                ),
            ));
        }
        Ok(view)
    }

    /// Serializes drain calls with each other and, for a `primary-replica` cluster,
    /// with its switchovers (a drain never races a promotion of the same backend).
    async fn drain_guard(
        &self,
        cluster: &str,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, ()>,
            Option<tokio::sync::OwnedMutexGuard<()>>,
        ),
        Refused,
    > {
        let drains = self.drain_lock.lock().await;
        let switchovers = match self.lock_of(cluster) {
            Some(l) => Some(
                tokio::time::timeout(Duration::from_secs(30), l.lock_owned())
                    .await
                    .map_err(|_| {
                        refused(
                            409,
                            "a switchover of this cluster is still running; try again when it ends",
                        )
                    })?,
            ),
            None => None,
        };
        Ok((drains, switchovers))
    }

    /// Changes a cluster's drains with `edit` (which says whether it changed them),
    /// makes the result durable, then applies it. A concurrent change by another
    /// instance is read back and `edit` runs again on it.
    async fn change_drains(
        &self,
        cluster: &str,
        edit: impl Fn(&mut Drains) -> Result<bool, Refused>,
    ) -> Result<Drains, Refused> {
        for _ in 0..DRAIN_ATTEMPTS {
            let (mut drains, revision) = self
                .drains
                .lock()
                .ok()
                .and_then(|d| d.get(cluster).cloned())
                .unwrap_or_default();
            if !edit(&mut drains)? {
                return Ok(drains);
            }
            match self.store.commit_drains(cluster, revision, &drains).await {
                Ok(DrainCommit::Done(rev)) => {
                    self.record_drains(cluster, drains.clone(), rev);
                    return Ok(drains);
                }
                Ok(DrainCommit::Lost((current, rev))) => self.record_drains(cluster, current, rev),
                Err(e) => {
                    return Err(refused(
                        503,
                        format!("the drain could not be made durable ({e}); nothing changed"),
                    ))
                }
            }
        }
        Err(refused(
            409,
            "the drains of this cluster kept changing on other instances; try again",
        ))
    }

    /// Keeps a cluster's drains (from a commit, the store at start, or etcd) and applies
    /// them to the serving data plane.
    pub(super) fn record_drains(&self, cluster: &str, drains: Drains, revision: i64) {
        let _applying = self.applying.lock();
        if let Ok(mut all) = self.drains.lock() {
            all.insert(cluster.to_string(), (drains.clone(), revision));
        }
        if let Some(plane) = self.live() {
            plane.apply_drains(cluster, &drains);
            drain_metrics(&**plane, cluster, &drains);
        }
    }

    /// Applies every cluster's drains to a data plane (a runtime before it serves).
    pub(super) fn apply_drains(&self, next: &dyn DataPlane) {
        let all = self.drains.lock().map(|d| d.clone()).unwrap_or_default();
        for cfg in next.clusters() {
            let drains = all
                .get(&cfg.name)
                .map(|(d, _)| d.clone())
                .unwrap_or_default();
            next.apply_drains(&cfg.name, &drains);
            drain_metrics(next, &cfg.name, &drains);
        }
    }

    /// Adopts the drains read from the store at start; those naming a backend the
    /// configuration lacks stay stored but do nothing (a warning says so).
    pub(super) fn adopt_drains(&self, config: &Config, stored: HashMap<String, (Drains, i64)>) {
        for (name, (d, _)) in &stored {
            let Some(c) = config.clusters.iter().find(|c| c.name == *name) else {
                tracing::warn!(cluster = %name, "a drain names a cluster the configuration does not have; ignored");
                continue;
            };
            for id in d.keys().filter(|id| index(c, id).is_none()) {
                tracing::warn!(cluster = %name, backend = %id, "a drain names a backend the configuration does not have; ignored");
            }
        }
        if let Ok(mut all) = self.drains.lock() {
            all.extend(stored);
        }
    }

    /// A put on a cluster's `drains` key in etcd (another instance drained or undrained).
    pub(super) fn on_drains_put(&self, cluster: &str, kv: &etcd::Kv) {
        let Some(d) = parse_drains(kv) else { return };
        let newer = self.drains.lock().is_ok_and(|all| {
            all.get(cluster)
                .is_none_or(|(_, rev)| kv.mod_revision > *rev)
        });
        if newer {
            tracing::info!(cluster, drained = ?d.keys().collect::<Vec<_>>(), "drains changed");
            self.record_drains(cluster, d, kv.mod_revision);
        }
    }
}

/// `keyway_backend_drained{cluster,backend}`: 1 while drained.
fn drain_metrics(plane: &dyn DataPlane, cluster: &str, drains: &Drains) {
    let Some(cfg) = plane.clusters().into_iter().find(|c| c.name == cluster) else {
        return;
    };
    for b in &cfg.backends {
        metrics::gauge!("keyway_backend_drained", "cluster" => cluster.to_string(), "backend" => b.id.clone())
            .set(if drains.contains_key(&b.id) { 1.0 } else { 0.0 });
    }
}
