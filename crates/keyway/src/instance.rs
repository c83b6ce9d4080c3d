//! A running keyway: the data plane ([`keyway_proxy::server::Proxy`]), the admin API and the
//! plugin-file watcher, started together and stopped together.
//!
//! This is the wiring the binary (and the integration tests) start. It owns no policy and
//! no request handling: the data plane serves clients, the admin API serves operators, the
//! watcher turns plugin-file changes into reloads. The admin socket is bound before
//! anything starts, so a busy admin port fails the start without leaving listeners open.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::demo::DemoBackends;
use crate::watch::PluginWatcher;
use keyway_proxy::config::Config;
use keyway_proxy::forward::Runtime;
use keyway_proxy::load::Loaded;
use keyway_proxy::server::{Proxy, Reloader, StartError};

/// How long plugin files must be quiet after a change before keyway reloads.
const PLUGIN_WATCH_DEBOUNCE: Duration = Duration::from_millis(300);

/// A running keyway instance.
pub struct Server {
    proxy: Proxy,
    admin_addr: Option<SocketAddr>,
    plugin_watcher: Mutex<Option<PluginWatcher>>,
}

impl Server {
    /// Loads a validated config (resolves addresses, reads certificates, compiles
    /// plugins: `keyway_proxy::load`), then starts it as [`Server::start_loaded`] does.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let loaded = keyway_proxy::load::config(config, "the configuration")
            .map_err(|e| StartError::Build(e.to_string()))?;
        Self::start_loaded(loaded).await
    }

    /// Binds the admin listener and every proxy listener, then starts serving.
    pub async fn start_loaded(loaded: Loaded) -> Result<Server, StartError> {
        Self::start_with(loaded, None).await
    }

    /// As [`Server::start_loaded`], for `keyway demo`: the admin API also says it is a
    /// demo in `/status` and serves the calls that stop and start `demo`'s backends.
    pub async fn start_demo(loaded: Loaded, demo: Arc<DemoBackends>) -> Result<Server, StartError> {
        Self::start_with(loaded, Some(demo)).await
    }

    async fn start_with(
        loaded: Loaded,
        demo: Option<Arc<DemoBackends>>,
    ) -> Result<Server, StartError> {
        let admin = match loaded.plane.admin {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|source| StartError::Bind { addr: a, source })?,
            ),
            None => None,
        };
        let proxy = Proxy::start(loaded).await?;
        let admin_addr = admin.map(|sock| {
            let addr = sock.local_addr().ok();
            tokio::spawn(crate::admin::serve(
                sock,
                proxy.runtime_cell(),
                proxy.reloader(),
                demo,
                proxy.shutdown_signal(),
            ));
            addr
        });
        Ok(Server {
            proxy,
            admin_addr: admin_addr.flatten(),
            plugin_watcher: Mutex::new(None),
        })
    }

    /// Bound addresses of the listeners, in config order (ports resolved when `:0`).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        self.proxy.listen_addrs()
    }

    /// Open downstream connections on each worker, in worker order.
    pub fn worker_connections(&self) -> Vec<usize> {
        self.proxy.worker_connections()
    }

    /// Bound addresses of the TCP listeners, in config order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        self.proxy.tcp_addrs()
    }

    /// Bound address of the admin server, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Remembers the file this server's config came from, so reloads re-read it.
    /// Also starts the plugin-file watcher, unless `[proxy] watch_plugins = false`.
    pub fn set_config_source(&self, path: PathBuf) {
        self.proxy.set_config_source(path);
        let reloader = self.proxy.reloader();
        if !reloader.watches_plugins() {
            return;
        }
        match crate::watch::watch_plugins(reloader, PLUGIN_WATCH_DEBOUNCE) {
            Ok(w) => {
                if let Ok(mut slot) = self.plugin_watcher.lock() {
                    *slot = Some(w);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "plugin files are not watched; reload with SIGHUP or POST /plugins/reload")
            }
        }
    }

    fn stop_watching(&self) {
        if let Ok(mut slot) = self.plugin_watcher.lock() {
            slot.take();
        }
    }

    /// Re-reads the config file and applies it (see [`Reloader::reload`]).
    pub fn reload(&self) -> Result<String, String> {
        self.proxy.reload()
    }

    /// The reloader, for callers that outlive a borrow of the server (signal handlers).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.proxy.reloader()
    }

    /// The live runtime snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.proxy.runtime()
    }

    /// Stops the watcher, stops accepting, lets in-flight requests finish for up to the
    /// drain timeout, then returns. Returns `true` if everything drained in time.
    pub async fn shutdown(self) -> bool {
        self.stop_watching();
        self.proxy.shutdown().await
    }
}
