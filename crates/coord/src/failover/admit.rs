//! Admitting a configuration: checking it against the stored decisions and giving each
//! primary-replica cluster not seen before its topology (stored, configured, or, with
//! etcd after start, unknown until etcd is read). Applies nothing and never replaces the
//! topology of a cluster it already knows.

use super::*;

impl Failover {
    /// Before a reload builds its runtime: checks the new config against the stored
    /// decisions and gives new primary-replica clusters a topology (nothing is
    /// applied: [`Failover::swap_in`] does that).
    pub fn admit(&self, config: &Config) -> Result<(), String> {
        self.check_config(config)?;
        // A cluster added by a reload may have decisions stored under its name (it was
        // there before): they stand, never the configured primary.
        match &self.store {
            Store::File(f) => self.adopt_config(config, &f.stored(), false),
            Store::Etcd(_) => self.adopt_config(config, &HashMap::new(), true),
        }
    }

    /// Makes sure every primary-replica cluster of `config` has a topology and that the
    /// stored ones name only backends the config has. Nothing changes on error.
    pub fn check_config(&self, config: &Config) -> Result<(), String> {
        let cells = self.cells.lock().map_err(|_| "failover lock poisoned")?;
        for c in config
            .clusters
            .iter()
            .filter(|c| c.strategy == Strategy::PrimaryReplica)
        {
            if let Some(cell) = cells.get(&c.name) {
                cell.known.topology.validate(c).map_err(|e| {
                    format!("{e}; keep that backend in the configuration, or promote another one first (POST /clusters/{}/promote/ID)", c.name)
                })?;
            }
        }
        Ok(())
    }

    /// Creates the cells of clusters not seen before: with their stored topology, or
    /// the configured one, or (`unconfirmed`: with etcd, after start) no primary until
    /// etcd is read.
    pub(super) fn adopt_config(
        &self,
        config: &Config,
        stored: &HashMap<String, (Topology, i64)>,
        unconfirmed: bool,
    ) -> Result<(), String> {
        let mut cells = self.cells.lock().map_err(|_| "failover lock poisoned")?;
        for c in config
            .clusters
            .iter()
            .filter(|c| c.strategy == Strategy::PrimaryReplica)
        {
            if cells.contains_key(&c.name) {
                continue;
            }
            let known = match stored.get(&c.name) {
                Some((t, rev)) => {
                    t.validate(c).map_err(|e| {
                        format!("{e}. The stored decisions do not match the configuration: restore the backend, or fix the state with `keyway state import`")
                    })?;
                    Known {
                        topology: t.clone(),
                        revision: *rev,
                    }
                }
                None if unconfirmed => Known {
                    topology: Topology {
                        primary: None,
                        reason: "added by a reload: primary unknown until etcd is read".into(),
                        ..Topology::initial(c)
                    },
                    revision: 0,
                },
                None => Known {
                    topology: Topology::initial(c),
                    revision: 0,
                },
            };
            let gate = Arc::new(WriteGate::default());
            gate.applied(known.topology.epoch);
            cells.insert(
                c.name.clone(),
                Cell {
                    configured: Topology::initial(c),
                    unconfirmed: unconfirmed && !stored.contains_key(&c.name),
                    known,
                    history: std::collections::VecDeque::new(),
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    promotion_needed: false,
                    gate,
                    acked: 0,
                    ack_target: 0,
                    ack_running: false,
                },
            );
        }
        Ok(())
    }
}
