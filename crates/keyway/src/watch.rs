//! Reloads the configuration when a plugin file changes on disk.
//!
//! The watcher follows the *directories* that hold the configured plugins, not the files:
//! deploy tools and editors replace a file by writing a temporary one and renaming it over
//! the old, which a watch on the old inode would miss. Events are debounced (a copy in
//! progress fires many), then the whole configuration goes through the same
//! build-validate-swap path as SIGHUP and `POST /reload`: a plugin that fails to compile,
//! instantiate or configure is refused with the reason and the running one stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};

/// What the watcher needs from the server: the plugin files of the running config, and
/// a reload through the same build-validate-swap path as SIGHUP.
pub trait Reload: Send + Sync + 'static {
    /// Rebuilds and swaps the whole configuration; logs and counts its own outcome.
    fn reload(&self) -> Result<String, String>;
    /// The plugin files the running configuration loads.
    fn plugin_files(&self) -> Vec<PathBuf>;
}

impl Reload for keyway_proxy::server::Reloader {
    fn reload(&self) -> Result<String, String> {
        keyway_proxy::server::Reloader::reload(self)
    }

    fn plugin_files(&self) -> Vec<PathBuf> {
        keyway_proxy::server::Reloader::plugin_files(self)
    }
}

/// Stops the watcher thread when dropped.
pub struct PluginWatcher {
    stop: Arc<AtomicBool>,
}

impl Drop for PluginWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts watching the plugin files of the running configuration. Must be called inside
/// a tokio runtime (reloads start health probers on it).
pub fn watch_plugins(
    reloader: Arc<dyn Reload>,
    debounce: Duration,
) -> Result<PluginWatcher, String> {
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| format!("cannot watch plugin files: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = tokio::runtime::Handle::current();
    let stopped = stop.clone();
    let mut watched = Watched::default();
    watched.sync(&mut watcher, reloader.plugin_files());
    std::thread::Builder::new()
        .name("keyway-plugin-watch".into())
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let ev = match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                let Ok(ev): Result<notify::Event, _> = ev else {
                    continue;
                };
                if matches!(ev.kind, EventKind::Access(_)) || !ev.paths.iter().any(|p| watched.covers(p)) {
                    continue;
                }
                // Debounce: wait until the directory has been quiet for `debounce`.
                loop {
                    match rx.recv_timeout(debounce) {
                        Ok(_) => continue,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let changed: Vec<String> = ev.paths.iter().map(|p| p.display().to_string()).collect();
                tracing::info!(files = ?changed, "plugin file changed on disk; reloading the configuration");
                let _rt = handle.enter();
                // `reload` logs and counts its own outcome.
                let _ = reloader.reload();
                watched.sync(&mut watcher, reloader.plugin_files());
            }
        })
        .map_err(|e| format!("cannot start the plugin watcher thread: {e}"))?;
    Ok(PluginWatcher { stop })
}

/// The plugin files being watched, and the directories holding them.
#[derive(Default)]
struct Watched {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Watched {
    fn covers(&self, path: &Path) -> bool {
        self.files.iter().any(|f| {
            f == path
                || (f.file_name() == path.file_name()
                    && f.parent().map(canonical) == path.parent().map(canonical))
        })
    }

    /// Watches exactly the directories of `files`.
    fn sync(&mut self, watcher: &mut impl Watcher, files: Vec<PathBuf>) {
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(canonical))
            .collect();
        dirs.sort();
        dirs.dedup();
        for old in self.dirs.iter().filter(|d| !dirs.contains(d)) {
            let _ = watcher.unwatch(old);
        }
        for new in dirs.iter().filter(|d| !self.dirs.contains(d)) {
            if let Err(e) = watcher.watch(new, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %new.display(), error = %e, "cannot watch a plugin directory; reload that plugin with SIGHUP or POST /plugins/reload");
            }
        }
        self.files = files;
        self.dirs = dirs;
    }
}

fn canonical(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    };
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
