//! Reload: build a new runtime from a new config, validate it whole, swap it in. A
//! config that fails any step leaves the running one untouched.

use super::*;

// === reload ===

/// Applies a new config to a running server: build, validate, swap. A config that fails
/// any step leaves the running one untouched and reports every error.
pub struct Reloader {
    pub(super) runtime: Arc<ArcSwap<Runtime>>,
    pub(super) listeners: Vec<Arc<ArcSwap<ListenerState>>>,
    pub(super) conn_limits: Vec<Arc<ConnLimit>>,
    pub(super) tcp: Vec<Arc<crate::tcp::TcpListenerHandle>>,
    pub(super) current: std::sync::Mutex<Loaded>,
    pub(super) source: std::sync::Mutex<Option<std::path::PathBuf>>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) last: std::sync::Mutex<Option<serde_json::Value>>,
    pub(super) failover: Arc<Failover>,
}

impl Reloader {
    /// Whether the running config asks for plugin files to be watched.
    pub fn watches_plugins(&self) -> bool {
        self.current
            .lock()
            .is_ok_and(|c| c.config.proxy.watch_plugins)
    }

    /// Promotion, fencing and failback (shared with the admin API).
    pub fn failover(&self) -> &Arc<Failover> {
        &self.failover
    }

    /// The admin token of the running config (a reload may rotate it).
    pub fn admin_token(&self) -> Option<Arc<str>> {
        self.current
            .lock()
            .ok()
            .and_then(|c| c.config.admin.as_ref().and_then(|a| a.token.clone()))
    }

    /// The TCP listeners for `/status`.
    pub fn tcp_status_json(&self) -> serde_json::Value {
        self.tcp.iter().map(|t| t.status_json()).collect()
    }

    /// The outcome of the last reload (for `/status`), `null` before the first.
    pub fn last_json(&self) -> serde_json::Value {
        self.last
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Re-reads the config file the server was started from and applies it.
    pub fn reload(&self) -> Result<String, String> {
        let path = self
            .source
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| {
                "this keyway was not started from a config file; nothing to reload".to_string()
            })?;
        let result = crate::load::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|c| self.apply(c));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        if let Ok(mut last) = self.last.lock() {
            let unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            *last = Some(serde_json::json!({
                "unix_time": unix,
                "result": outcome,
                "detail": match &result { Ok(s) => s, Err(e) => e },
            }));
        }
        metrics::counter!("keyway_config_reloads_total", "result" => outcome).increment(1);
        match &result {
            Ok(summary) => {
                tracing::info!(file = %path.display(), %summary, "configuration reloaded")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "configuration reload refused; the running configuration stays")
            }
        }
        result
    }

    /// The plugin files the running configuration loaded.
    pub fn plugin_files(&self) -> Vec<std::path::PathBuf> {
        let Ok(current) = self.current.lock() else {
            return Vec::new();
        };
        let mut files: Vec<std::path::PathBuf> = current
            .config
            .clusters
            .iter()
            .flat_map(|c| c.plugins().into_iter().map(|(_, p)| p.path.clone()))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// Applies an already validated and loaded config.
    pub fn apply(&self, next: Loaded) -> Result<String, String> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| "reload state poisoned".to_string())?;
        let listen = |l: &[crate::load::Listener]| l.iter().map(|l| l.addr).collect::<Vec<_>>();
        let old_listen: Vec<SocketAddr> = listen(&current.plane.listeners);
        let new_listen: Vec<SocketAddr> = listen(&next.plane.listeners);
        if old_listen != new_listen {
            return Err(format!(
                "listener addresses changed ({old_listen:?} -> {new_listen:?}); restart keyway to apply them. Nothing was changed"
            ));
        }
        let tcp_listen = |c: &Loaded| listen(&c.plane.tcp_listeners);
        if tcp_listen(&current) != tcp_listen(&next) {
            return Err(format!(
                "tcp_listener addresses changed ({:?} -> {:?}); restart keyway to apply them. Nothing was changed",
                tcp_listen(&current),
                tcp_listen(&next)
            ));
        }
        let admin = |c: &Loaded| c.plane.admin;
        if admin(&current) != admin(&next) {
            return Err(
                "the [admin] address changed; restart keyway to apply it. Nothing was changed"
                    .into(),
            );
        }
        self.failover.admit(&next.config)?;
        let runtime = build_runtime(&next.config, &next.plane, &self.failover)?;
        let old = self.runtime.load_full();
        for cluster in &runtime.clusters {
            let Some(prev) = old.cluster(&cluster.cfg.name) else {
                continue;
            };
            let pairs: Vec<(usize, usize)> = cluster
                .backends
                .iter()
                .enumerate()
                .filter_map(|(n, b)| {
                    prev.backends
                        .iter()
                        .position(|p| p.cfg.id == b.cfg.id && p.address == b.address)
                        .map(|o| (n, o))
                })
                .collect();
            cluster.health.inherit(&prev.health, &pairs);
            for &(n, o) in &pairs {
                cluster.backends[n]
                    .holders
                    .inherit(&prev.backends[o].holders);
            }
        }
        let summary = format!(
            "{} route(s), {} cluster(s), {} backend(s)",
            next.config.routes.len(),
            runtime.clusters.len(),
            runtime
                .clusters
                .iter()
                .map(|c| c.backends.len())
                .sum::<usize>()
        );
        let runtime = Arc::new(runtime);
        for c in &runtime.clusters {
            crate::probers::spawn_probers(c, self.shutdown.clone());
        }
        self.failover.use_parts(&next.coordination);
        // Every decision so far is applied to the new runtime under the coordinator's
        // lock, and it is published under that same lock.
        self.failover.swap_in(
            &*runtime,
            || self.runtime.store(runtime.clone()),
            &self.shutdown,
        );
        let (cfg, plane) = (&next.config, &next.plane);
        for ((state, l), at) in self
            .listeners
            .iter()
            .zip(&cfg.listeners)
            .zip(&plane.listeners)
        {
            state.store(Arc::new(ListenerState::new(l, at)));
        }
        for (limit, l) in self.conn_limits.iter().zip(&cfg.listeners) {
            limit.resize(l.max_connections);
        }
        for ((handle, l), at) in self
            .tcp
            .iter()
            .zip(&cfg.tcp_listeners)
            .zip(&plane.tcp_listeners)
        {
            handle.reload(l, at);
        }
        *current = next;
        Ok(summary)
    }
}
