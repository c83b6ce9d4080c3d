//! With etcd: this instance's lease, registration and acknowledgements, its write
//! permit, the leader election, and the watch that follows every decision; when etcd
//! is gone it asks the failsafe (`failsafe.rs`). Never extends the permit without a
//! renewal etcd answered (or every failsafe peer agreeing).

use super::*;

impl Failover {
    // --- etcd: election and watch ---

    /// With etcd: keeps this instance's lease, its registration (with its
    /// acknowledgements) and its write permit; campaigns for the leader key; re-reads
    /// every decision on each renewal; falls back to the failsafe when etcd is gone.
    pub(super) async fn coordinate(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Store::Etcd(e) = &self.store else { return };
        let ttl = e.cfg.lease_ttl.as_secs().max(1);
        let period = Duration::from_millis((ttl * 1000 / 3).max(300));
        let mut lease: Option<i64> = None;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.acks_changed.notified() => {
                    if let Some(id) = lease {
                        if self.registered() {
                            let r = self.write_registration(e, id).await;
                            e.note(&r);
                        }
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    // No new writes; the registration goes only once the writes in
                    // flight have ended (or one lease has passed), so a promotion that
                    // stops waiting for this instance finds none of its writes left.
                    self.permit.revoke();
                    let gates: Vec<Arc<WriteGate>> = self
                        .cells
                        .lock()
                        .map(|c| c.values().map(|c| c.gate.clone()).collect())
                        .unwrap_or_default();
                    let deadline = Instant::now() + e.cfg.lease_ttl;
                    for gate in gates {
                        gate.fence(deadline).await;
                    }
                    if let Some(id) = lease {
                        let _ = e.client.revoke(id).await;
                    }
                    return;
                }
            }
            next = Instant::now() + period;
            let sent = Instant::now();
            match self.renew(e, &mut lease, ttl, sent).await {
                Ok(granted) => {
                    self.permit
                        .extend(sent + permit::valid_for(granted), Grant::Etcd);
                    if let Ok(mut s) = e.status.lock() {
                        if s.failsafe.take().is_some() {
                            tracing::info!("etcd reachable again: the failsafe ends");
                        }
                    }
                }
                Err(err) => {
                    e.note::<()>(&Err(err));
                    if let Ok(mut s) = e.status.lock() {
                        // Leadership is only as good as a lease we can refresh.
                        s.leader = None;
                    }
                    metrics::gauge!("keyway_coordination_leader").set(0.0);
                    if !e.cfg.failsafe_peers.is_empty() {
                        let asked = Instant::now();
                        match self.failsafe(e).await {
                            Ok(()) => {
                                self.permit.extend(
                                    asked + permit::valid_for(e.cfg.lease_ttl),
                                    Grant::Failsafe,
                                );
                                if let Ok(mut s) = e.status.lock() {
                                    if s.failsafe.replace("active".into()).is_none() {
                                        tracing::warn!("etcd unreachable for every instance; the failsafe keeps the last primaries (all peers reached and agree)");
                                    }
                                }
                            }
                            Err(why) => {
                                if let Ok(mut s) = e.status.lock() {
                                    if s.failsafe.as_deref() != Some(why.as_str()) {
                                        tracing::warn!(reason = %why, "failsafe refused: writes stop when the permit runs out");
                                    }
                                    s.failsafe = Some(why);
                                }
                            }
                        }
                    }
                }
            }
            metrics::gauge!("keyway_write_permit").set(if self.permit.holds() { 1.0 } else { 0.0 });
        }
    }

    pub(super) fn registered(&self) -> bool {
        match &self.store {
            Store::Etcd(e) => e.status.lock().is_ok_and(|s| s.registered),
            Store::File(_) => true,
        }
    }

    pub(super) fn set_registered(&self, e: &EtcdStore, registered: bool) {
        if let Ok(mut s) = e.status.lock() {
            if s.registered && !registered {
                tracing::warn!(instance = %e.cfg.instance, "this instance's registration in etcd is gone: writes stop until it is restored");
            }
            s.registered = registered;
        }
        if !registered {
            self.permit.revoke();
        }
    }

    /// The acknowledgements to publish: this instance's own, except while it vouched
    /// for a peer's failsafe, when the ones published before stand (that peer may still
    /// write to the old primary on the strength of it).
    pub(super) fn publishable_acks(&self, e: &EtcdStore) -> BTreeMap<String, u64> {
        let vouched = self
            .vouched_until
            .lock()
            .ok()
            .and_then(|v| *v)
            .is_some_and(|until| Instant::now() < until);
        let published = e
            .status
            .lock()
            .map(|s| s.published.clone())
            .unwrap_or_default();
        if vouched {
            published
        } else {
            self.acks()
        }
    }

    pub(super) fn registration(&self, acks: &BTreeMap<String, u64>, e: &EtcdStore) -> Vec<u8> {
        serde_json::to_vec(&Registration {
            instance: e.cfg.instance.clone(),
            acks: acks.clone(),
        })
        .unwrap_or_default()
    }

    /// Rewrites this instance's registration under `lease` when its acknowledgements
    /// changed.
    pub(super) async fn write_registration(&self, e: &EtcdStore, lease: i64) -> Result<(), String> {
        let acks = self.publishable_acks(e);
        if e.status.lock().is_ok_and(|s| s.published == acks) {
            return Ok(());
        }
        if e.client
            .put_under(&e.instance_key(), &self.registration(&acks, e), lease)
            .await?
        {
            if let Ok(mut s) = e.status.lock() {
                s.published = acks;
            }
            Ok(())
        } else {
            self.set_registered(e, false);
            Err("this instance's registration disappeared from etcd".into())
        }
    }

    /// One renewal: the lease, the registration, every decision, the election.
    /// Returns the TTL etcd granted (the permit is counted from before the call).
    pub(super) async fn renew(
        self: &Arc<Self>,
        e: &EtcdStore,
        lease: &mut Option<i64>,
        ttl: u64,
        sent: Instant,
    ) -> Result<Duration, String> {
        let (id, granted) = match *lease {
            Some(id) => match e.client.keep_alive(id).await? {
                0 => {
                    // Expired in etcd: the registration went with it. Start over; until
                    // registered and caught up again, no writes.
                    tracing::warn!(instance = %e.cfg.instance, "this instance's etcd lease expired; registering again");
                    self.set_registered(e, false);
                    *lease = None;
                    let (id, g) = e.client.grant(ttl).await?;
                    *lease = Some(id);
                    (id, g)
                }
                left => {
                    // Registered and renewed: the permit holds from the renewal alone
                    // (a promotion waits for this instance's acknowledgement while its
                    // key exists), so slow calls after it do not eat into it.
                    if self.registered() {
                        self.permit.extend(
                            sent + permit::valid_for(Duration::from_secs(left)),
                            Grant::Etcd,
                        );
                    }
                    (id, left)
                }
            },
            None => {
                self.set_registered(e, false);
                let (id, g) = e.client.grant(ttl).await?;
                *lease = Some(id);
                (id, g)
            }
        };
        if let Ok(mut s) = e.status.lock() {
            s.lease = Some(id);
        }
        // Registered before the decisions are read: a promotion that lists instances
        // after this point waits for this one's acknowledgement.
        if self.registered() {
            self.write_registration(e, id).await?;
        }
        if !self.registered() {
            let acks = self.publishable_acks(e);
            match e
                .client
                .claim(&e.instance_key(), &self.registration(&acks, e), id)
                .await?
            {
                etcd::Claim::Ours => {
                    tracing::info!(instance = %e.cfg.instance, lease = id, "registered in etcd");
                    if let Ok(mut s) = e.status.lock() {
                        s.published = acks;
                    }
                }
                etcd::Claim::Taken { lease: other } => {
                    return Err(format!(
                        "the instance name `{}` is registered by another process (lease {other}): give every keyway its own [coordination] instance name. If this is a restart, the old registration expires within lease_ttl",
                        e.cfg.instance
                    ));
                }
            }
        }
        // Every decision, and who is registered, as of now.
        let (kvs, read_at) = e.client.get_prefix(&format!("{}/", e.cfg.prefix)).await?;
        let clusters = format!("{}/clusters/", e.cfg.prefix);
        let mut instances = Vec::new();
        let mut listed = HashSet::new();
        let mut ours = false;
        for kv in kvs {
            if let Some(name) = kv.key.strip_prefix(&e.instances_prefix()) {
                ours |= name == e.cfg.instance && kv.lease == id;
                instances.push(name.to_string());
            } else if kv.key.starts_with(&clusters) {
                if let Some(n) = kv
                    .key
                    .strip_prefix(&clusters)
                    .and_then(|k| k.strip_suffix("/topology"))
                {
                    listed.insert(n.to_string());
                }
                self.on_etcd_put(&clusters, kv);
            }
        }
        if !ours {
            self.set_registered(e, false);
            return Err("this instance's registration is not in etcd after claiming it".into());
        }
        self.confirm_undecided(&listed);
        let holder = e
            .client
            .campaign(&e.leader_key(), &e.cfg.instance, id)
            .await?;
        if let Ok(mut s) = e.status.lock() {
            s.registered = true;
            s.instances = instances;
            s.instances_revision = read_at;
            let was = s.leader.as_deref() == Some(e.cfg.instance.as_str());
            let now = holder == e.cfg.instance;
            if was != now {
                tracing::info!(instance = %e.cfg.instance, leader = %holder, "promotion leader changed");
            }
            s.leader = Some(holder);
            metrics::gauge!("keyway_coordination_leader").set(if now { 1.0 } else { 0.0 });
        }
        e.note::<()>(&Ok(()));
        Ok(Duration::from_secs(granted))
    }

    /// Clusters that started unconfirmed and that etcd has no decision for: the
    /// configured primary stands.
    pub(super) fn confirm_undecided(self: &Arc<Self>, listed: &HashSet<String>) {
        let pending: Vec<(String, Topology)> = self
            .cells
            .lock()
            .map(|cells| {
                cells
                    .iter()
                    .filter(|(n, c)| c.unconfirmed && !listed.contains(*n))
                    .map(|(n, c)| (n.clone(), c.configured.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (name, t) in pending {
            self.record(
                &name,
                Known {
                    topology: t,
                    revision: 0,
                },
            );
        }
    }

    /// Follows every decision in etcd as it is made: a full read, then a watch from the
    /// next revision (no change is missed between the two). A watch that ends, fails or
    /// goes silent (`etcd::WATCH_SILENCE`) is re-established the same way; each lease
    /// renewal also re-reads everything, so a lost watch delays but never hides a
    /// decision.
    pub(super) async fn watch_etcd(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Store::Etcd(e) = &self.store else { return };
        let prefix = format!("{}/clusters/", e.cfg.prefix);
        loop {
            let from = match e.client.get_prefix(&prefix).await {
                Ok((kvs, rev)) => {
                    e.note::<()>(&Ok(()));
                    let listed: HashSet<String> = kvs
                        .iter()
                        .filter_map(|kv| {
                            kv.key
                                .strip_prefix(&prefix)
                                .and_then(|k| k.strip_suffix("/topology"))
                                .map(String::from)
                        })
                        .collect();
                    for kv in kvs {
                        self.on_etcd_put(&prefix, kv);
                    }
                    self.confirm_undecided(&listed);
                    Some(rev + 1)
                }
                Err(err) => {
                    e.note::<()>(&Err(err));
                    None
                }
            };
            if let Some(from) = from {
                let this = self.clone();
                let prefix2 = prefix.clone();
                let watch = e.client.watch(&prefix, from, move |ev| match ev {
                    etcd::WatchEvent::Put(kv) => this.on_etcd_put(&prefix2, kv),
                    etcd::WatchEvent::Progress(rev) => {
                        if let Store::Etcd(e) = &this.store {
                            if let Ok(mut s) = e.status.lock() {
                                s.watch_revision = s.watch_revision.max(rev);
                            }
                        }
                    }
                    etcd::WatchEvent::Delete(_) => {}
                });
                tokio::select! {
                    r = watch => {
                        if let Err(err) = r {
                            // A quiet etcd that sends no progress notifications ends its
                            // watches every WATCH_SILENCE: routine, so not logged loudly.
                            tracing::debug!(error = %err, "etcd watch ended; re-reading");
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    pub(super) fn on_etcd_put(self: &Arc<Self>, prefix: &str, kv: etcd::Kv) {
        if let Some(name) = kv
            .key
            .strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("/drains"))
        {
            self.on_drains_put(name, &kv);
            return;
        }
        let Some(name) = kv
            .key
            .strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("/topology"))
        else {
            return;
        };
        match serde_json::from_slice::<Topology>(&kv.value) {
            Ok(t) => {
                self.record(
                    name,
                    Known {
                        topology: t,
                        revision: kv.mod_revision,
                    },
                );
            }
            Err(err) => {
                tracing::error!(key = %kv.key, error = %err, "unreadable topology in etcd; ignoring it")
            }
        }
    }
}
