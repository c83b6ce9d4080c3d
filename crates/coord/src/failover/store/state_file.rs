//! The state file of a single instance: locked against a second process, replaced
//! atomically (write, fsync, rename), refused when corrupt. It never applies a decision;
//! it only makes one durable.

use super::*;

/// The state file of a single instance.
pub struct FileStore {
    pub(crate) path: PathBuf,
    pub(crate) doc: Mutex<StateDoc>,
    /// The lock beside the state file, held while this process may write it
    /// (`Access::Owner` until [`FileStore::release`]).
    pub(crate) lock: Mutex<Option<std::fs::File>>,
}

/// How a process uses the decisions it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// keyway serving traffic, or `state import`: may write. A state file is locked
    /// (`FILE.lock`) for as long as the store lives, so that two processes never
    /// overwrite each other's decisions.
    Owner,
    /// `state export`: reads only, alongside a running keyway.
    Reader,
}

impl FileStore {
    /// Opens the state file. Missing: empty state. Unreadable or corrupt: an error that
    /// stops start-up (a silent reset could resurrect a fenced primary). An `Owner`
    /// takes the file's lock first, or fails saying who holds it.
    pub fn open(path: &Path, access: Access) -> Result<Self, String> {
        let lock = match access {
            Access::Owner => Some(lock_state(path)?),
            Access::Reader => None,
        };
        let doc = match std::fs::read(path) {
            Ok(bytes) => parse_state(&bytes).map_err(|e| {
                format!(
                    "the state file {} is corrupt ({e}). keyway will not start without its promotion decisions: restore it with `keyway state import BACKUP`, or move it away to start from the configured primaries (this forgets every promotion and fence)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateDoc {
                version: 1,
                ..StateDoc::default()
            },
            Err(e) => {
                return Err(format!(
                    "cannot read the state file {}: {e}. Fix its permissions or set [state] file to a readable path",
                    path.display()
                ))
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            doc: Mutex::new(doc),
            lock: Mutex::new(lock),
        })
    }

    /// Gives the lock up (at shutdown): from now on this store refuses to write, and
    /// another process (or a restarted server) may own the file.
    pub fn release(&self) {
        if let Ok(mut l) = self.lock.lock() {
            l.take();
        }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, cluster: &str) -> Option<Topology> {
        self.doc.lock().ok()?.clusters.get(cluster).cloned()
    }

    /// Writes `next` for `cluster` if its epoch is still `expected`.
    pub(crate) fn commit(
        &self,
        cluster: &str,
        expected: u64,
        next: &Topology,
    ) -> Result<Commit, String> {
        let mut doc = self
            .doc
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        let current = doc.clusters.get(cluster).map_or(0, |t| t.epoch);
        if current != expected {
            return Ok(Commit::Lost(doc.clusters.get(cluster).map(|t| Known {
                topology: t.clone(),
                revision: t.epoch as i64,
            })));
        }
        self.check_owner()?;
        let mut updated = doc.clone();
        updated.clusters.insert(cluster.to_string(), next.clone());
        write_atomically(&self.path, &updated)?;
        *doc = updated;
        Ok(Commit::Done(next.epoch as i64))
    }

    /// Only the holder of the lock writes: a reader never took it, and an owner gave it
    /// up at shutdown.
    pub(crate) fn check_owner(&self) -> Result<(), String> {
        if self.lock.lock().is_ok_and(|l| l.is_some()) {
            Ok(())
        } else {
            Err("this keyway does not hold the state file's lock (it is shutting down, or opened the file to read only)".into())
        }
    }

    /// Writes `cluster`'s drains (none: the entry goes), atomically, before they apply.
    pub(crate) fn commit_drains(&self, cluster: &str, drains: &Drains) -> Result<(), String> {
        let mut doc = self
            .doc
            .lock()
            .map_err(|_| "state lock poisoned".to_string())?;
        self.check_owner()?;
        let mut updated = doc.clone();
        if drains.is_empty() {
            updated.drains.remove(cluster);
        } else {
            updated.drains.insert(cluster.to_string(), drains.clone());
        }
        write_atomically(&self.path, &updated)?;
        *doc = updated;
        Ok(())
    }

    /// Every cluster's topology, with its epoch as the compare-and-swap token.
    pub(crate) fn stored(&self) -> HashMap<String, (Topology, i64)> {
        self.doc()
            .clusters
            .into_iter()
            .map(|(k, t)| {
                let rev = t.epoch as i64;
                (k, (t, rev))
            })
            .collect()
    }

    /// The whole document.
    pub fn doc(&self) -> StateDoc {
        self.doc.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Replaces the whole document (import).
    pub fn replace(&self, doc: StateDoc) -> Result<(), String> {
        self.check_owner()?;
        write_atomically(&self.path, &doc)?;
        if let Ok(mut d) = self.doc.lock() {
            *d = doc;
        }
        Ok(())
    }
}

/// Takes `STATE.lock`, the lock of the state file (beside it: the state file itself is
/// replaced on every write, so it cannot carry the lock).
pub(crate) fn lock_state(path: &Path) -> Result<std::fs::File, String> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            format!(
                "cannot create {}: {e}. Create its folder, or set [state] file to a writable path",
                lock_path.display()
            )
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another keyway process is using the state file {} (it holds {}). Each instance needs its own [state] file (instances that share decisions use [coordination]); to restore a backup, stop keyway first: a running instance would not see the import and would overwrite it",
            path.display(),
            lock_path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!(
            "cannot lock {}: {e}. Put the state file on a local file system",
            lock_path.display()
        )),
    }
}

/// Temp file in the same directory, fsync, rename over, fsync the directory: after a
/// crash the file holds either the old or the new state, never a mix.
pub(crate) fn write_atomically(path: &Path, doc: &StateDoc) -> Result<(), String> {
    use std::io::Write;
    let fail = |what: &str, e: std::io::Error| {
        format!(
            "cannot {what} the state file {}: {e}; the decision was not made",
            path.display()
        )
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map_or("keyway-state".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let text = serde_json::to_vec_pretty(doc).map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| fail("create a temporary file for", e))?;
    f.write_all(&text)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| fail("write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| fail("replace", e))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
