//! Loading a config into everything keyway runs with: the config itself (pure, see
//! `config`), then the data plane's parts ([`plane`]: addresses, listener certificates,
//! health and classifier plugins) and the coordination parts (`failover::load`: the
//! promotion plugin, etcd endpoints and TLS, hook TLS). Every problem of every step
//! comes back at once, as one [`ConfigErrors`] in line order, as an operator expects
//! from `keyway check`. This module only wires the steps; it owns no check of its own.

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors};
use crate::failover::load::Coordination;

pub mod plane;

pub use plane::{Cert, ClusterParts, Listener, Plane};

/// A config with the parts loaded from it.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The validated config.
    pub config: Config,
    /// The data plane's parts.
    pub plane: Plane,
    /// The failover manager's parts.
    pub coordination: Coordination,
}

/// Reads, validates and loads a config file. Relative paths inside it resolve against
/// the file's directory.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = Config::read_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    from_str_with_base(&text, &path.display().to_string(), base)
}

/// Validates and loads config text. `name` labels errors; relative paths resolve
/// against `base`.
pub fn from_str_with_base(text: &str, name: &str, base: &Path) -> Result<Loaded, ConfigErrors> {
    let errors = |errors| ConfigErrors {
        file: name.to_string(),
        errors,
    };
    let (config, mut list) = Config::build_all(text, base).map_err(errors)?;
    let loaded = parts(config, &mut list);
    if list.is_empty() {
        Ok(loaded)
    } else {
        Err(errors(list))
    }
}

/// Loads the parts of an already validated config. `name` labels errors.
pub fn config(config: Config, name: &str) -> Result<Loaded, ConfigErrors> {
    let mut list = Vec::new();
    let loaded = parts(config, &mut list);
    if list.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors {
            file: name.to_string(),
            errors: list,
        })
    }
}

/// Runs both loaders; their problems join `list` in line order (a config's own
/// problems first among those on one line).
fn parts(config: Config, list: &mut Vec<ConfigError>) -> Loaded {
    let plane = plane::load(&config, list);
    let coordination = crate::failover::load::load(&config, list);
    list.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Loaded {
        config,
        plane,
        coordination,
    }
}
