//! `keyway state export` and `import`: every stored decision out, and a backup back in,
//! checked against the configuration. An imported epoch never moves a cluster backwards.

use super::*;

impl Failover {
    /// Every stored decision.
    pub async fn export(&self) -> Result<StateDoc, String> {
        let all = self.store.load_all().await?;
        let drains = self.store.load_drains().await?;
        Ok(StateDoc {
            version: 1,
            clusters: all.into_iter().map(|(k, (t, _))| (k, t)).collect(),
            drains: drains
                .into_iter()
                .filter(|(_, (d, _))| !d.is_empty())
                .map(|(k, (d, _))| (k, d))
                .collect(),
        })
    }

    /// Restores decisions, validated against `config`. An imported epoch never moves a
    /// cluster backwards: it becomes at least the stored epoch + 1.
    pub async fn import(&self, config: &Config, doc: StateDoc) -> Result<Vec<String>, String> {
        for (name, t) in &doc.clusters {
            let c = config
                .clusters
                .iter()
                .find(|c| c.name == *name)
                .ok_or_else(|| {
                    format!(
                        "the backup names cluster `{name}`, which the configuration does not have"
                    )
                })?;
            t.validate(c)?;
        }
        let current = self.store.load_all().await?;
        let mut report = Vec::new();
        let mut merged: BTreeMap<String, (Topology, i64)> = BTreeMap::new();
        for (name, mut t) in doc.clusters {
            let (cur_epoch, rev) = current.get(&name).map_or((0, 0), |(t, r)| (t.epoch, *r));
            if t.epoch <= cur_epoch {
                report.push(format!(
                    "{name}: epoch {} raised to {} (epochs only grow)",
                    t.epoch,
                    cur_epoch + 1
                ));
                t.epoch = cur_epoch + 1;
            }
            t.reason = format!("imported: {}", t.reason);
            t.unix_ms = crate::unix_ms(SystemTime::now());
            report.push(format!(
                "{name}: epoch {}, primary {}, fenced {:?}",
                t.epoch,
                t.primary.as_deref().unwrap_or("(none)"),
                t.fenced
            ));
            merged.insert(name, (t, rev));
        }
        match &self.store {
            Store::File(f) => {
                let mut d = f.doc();
                d.version = 1;
                for (name, (t, _)) in merged {
                    d.clusters.insert(name, t);
                }
                f.replace(d)?;
            }
            Store::Etcd(e) => {
                for (name, (t, rev)) in merged {
                    let value = serde_json::to_vec(&t).map_err(|e| e.to_string())?;
                    match e.client.swap(&e.key(&name), rev, &value, None).await? {
                        etcd::Swap::Done(_) => {}
                        etcd::Swap::Lost(_) => {
                            return Err(format!(
                                "{name}: changed in etcd during the import; run it again"
                            ))
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}
