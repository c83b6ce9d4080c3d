//! `keyway plugin new`: a policy plugin crate that builds on its own, outside this
//! repository.
//!
//! The crate gets a vendored copy of the plugin SDK (`sdk/`, with the WIT contract this
//! keyway speaks, so it never points back into a keyway checkout), a `Cargo.lock` pinned
//! to the versions keyway's own plugins are built and tested with, and a small working
//! policy of the chosen kind to edit. It is its own Cargo workspace, so it builds the
//! same wherever it is put. This module only writes files; it never builds anything.

use std::path::{Path, PathBuf};

/// The plugin SDK, as keyway's own plugins use it (`plugins/sdk`).
const SDK_LIB: &str = include_str!("../../../plugins/sdk/src/lib.rs");
/// The WIT contract (`wit/policy.wit`; the SDK's copy is checked to be identical).
const WIT: &str = include_str!("../../../wit/policy.wit");
/// The lock file keyway's plugins are built with: the versions a scaffold pins.
const PLUGINS_LOCK: &str = include_str!("../../../plugins/Cargo.lock");

const SDK_MANIFEST: &str = r#"[package]
name = "keyway-plugin-sdk"
description = "Write keyway policies (health, promotion, request classification) as small Rust trait impls"
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"
publish = false

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"
wit-bindgen = { version = "0.61", default-features = false, features = ["macros", "realloc"] }
"#;

/// Which world the new plugin exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `world health`.
    Health,
    /// `world promotion`.
    Promotion,
    /// `world classifier`.
    Classifier,
}

impl Kind {
    /// Parses `health`, `promotion` or `classifier`.
    pub fn parse(text: &str) -> Result<Kind, String> {
        match text {
            "health" => Ok(Kind::Health),
            "promotion" => Ok(Kind::Promotion),
            "classifier" => Ok(Kind::Classifier),
            other => Err(format!(
                "--kind `{other}`: use health, promotion or classifier"
            )),
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Health => "health policy",
            Kind::Promotion => "promotion policy",
            Kind::Classifier => "request classifier",
        }
    }

    fn source(self, name: &str) -> String {
        let body = match self {
            Kind::Health => HEALTH_SRC,
            Kind::Promotion => PROMOTION_SRC,
            Kind::Classifier => CLASSIFIER_SRC,
        };
        format!(
            "//! `{name}`: a keyway {noun}. Build it with\n//! `cargo build --release --target wasm32-wasip2`; the plugin is\n//! `target/wasm32-wasip2/release/{file}.wasm`. The contract is `sdk/wit/policy.wit`.\n{body}",
            noun = self.noun(),
            file = name.replace('-', "_"),
        )
    }
}

const HEALTH_SRC: &str = r#"use keyway_plugin_sdk::health::*;

/// Unhealthy after `failures` failed checks in a row; degraded (a standby) while fewer
/// have failed; healthy once the last check passed.
struct Policy {
    failures: usize,
}

impl HealthPolicy for Policy {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let failures = match config.get("failures") {
            None => 3,
            Some(v) => v
                .as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("`failures` must be a number >= 1, got {v}"))?
                as usize,
        };
        Ok(Policy { failures })
    }

    fn evaluate(&self, _backend: &Backend, current: Health, history: &[Probe], _now_ms: u64) -> Verdict {
        let failed = history.iter().rev().take_while(|p| !p.ok).count();
        let (health, reason) = if history.is_empty() {
            (current, String::new())
        } else if failed >= self.failures {
            (Health::Unhealthy, format!("{failed} checks failed in a row"))
        } else if failed > 0 {
            (Health::Degraded, format!("{failed} check(s) failed in a row"))
        } else {
            (Health::Healthy, "last check passed".to_string())
        };
        Verdict { health, reason }
    }
}

keyway_plugin_sdk::health_policy!(Policy);
"#;

const PROMOTION_SRC: &str = r#"use keyway_plugin_sdk::promotion::*;

/// Keeps a primary that is not unhealthy; otherwise promotes the healthy candidate of
/// lowest priority (a degraded one only when none is healthy).
struct Policy;

impl PromotionPolicy for Policy {
    fn configure(_config: serde_json::Value) -> Result<Self, String> {
        Ok(Policy)
    }

    fn decide(&self, primary: Option<&Candidate>, candidates: &[Candidate], _now_ms: u64) -> Decision {
        if primary.is_some_and(|p| p.health != Health::Unhealthy) {
            return Decision::Keep;
        }
        candidates
            .iter()
            .filter(|c| c.health != Health::Unhealthy)
            .min_by_key(|c| (c.health != Health::Healthy, c.backend.priority))
            .map_or(Decision::None, |c| Decision::Promote(c.backend.id.clone()))
    }
}

keyway_plugin_sdk::promotion_policy!(Policy);
"#;

const CLASSIFIER_SRC: &str = r#"use keyway_plugin_sdk::classifier::*;

/// GET, HEAD and OPTIONS are reads, plus the POST paths listed in `read_posts`;
/// everything else is a write.
struct Policy {
    read_posts: Vec<String>,
}

impl Classifier for Policy {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let read_posts = match config.get("read_posts") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|p| p.as_str().map(String::from)).collect())
                .ok_or_else(|| format!("`read_posts` must be a list of paths, got {v}"))?,
        };
        Ok(Policy { read_posts })
    }

    fn classify(&self, method: &str, path: &str, _host: &str) -> Kind {
        match method {
            "GET" | "HEAD" | "OPTIONS" => Kind::Read,
            "POST" if self.read_posts.iter().any(|p| p == path) => Kind::Read,
            _ => Kind::Write,
        }
    }
}

keyway_plugin_sdk::classifier!(Policy);
"#;

/// Checks a crate name: lower-case letters, digits, `-` and `_`, starting with a letter.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    // A name Cargo.lock already holds (the SDK, one of its dependencies) would clash.
    let taken = PLUGINS_LOCK
        .lines()
        .any(|l| l.strip_prefix("name = ") == Some(&format!("\"{name}\"")));
    if ok && !taken {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a usable crate name: use lower-case letters, digits, `-` and `_`, starting with a letter (e.g. \"my-health\")"
        ))
    }
}

/// keyway's plugin lock file, with its own workspace members replaced by `name`: the
/// same external versions, in Cargo's order (by name), so `--locked` builds accept it.
pub fn lock_file(name: &str) -> String {
    let (head, rest) = PLUGINS_LOCK
        .split_once("[[package]]")
        .unwrap_or((PLUGINS_LOCK, ""));
    let mut blocks: Vec<String> = rest
        .split("[[package]]")
        .map(|b| format!("[[package]]\n{}\n", b.trim()))
        .filter(|b| b.contains("\nsource = ") || b.contains("name = \"keyway-plugin-sdk\""))
        .collect();
    // Cargo orders packages by name (then version): the new one goes before the first
    // package named after it, the rest keep the order Cargo wrote them in.
    let at = blocks
        .iter()
        .position(|b| block_name(b) > name)
        .unwrap_or(blocks.len());
    blocks.insert(
        at,
        format!(
            "[[package]]\nname = \"{name}\"\nversion = \"0.1.0\"\ndependencies = [\n \"keyway-plugin-sdk\",\n \"serde_json\",\n]\n"
        ),
    );
    format!("{}{}", head, blocks.join("\n"))
}

fn block_name(block: &str) -> &str {
    block
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .map_or("", |v| v.trim_matches('"'))
}

/// Writes the crate `name` under `dir` and returns its path. Refuses an existing,
/// non-empty destination.
pub fn create(dir: &Path, name: &str, kind: Kind) -> Result<PathBuf, String> {
    check_name(name)?;
    let root = dir.join(name);
    if std::fs::read_dir(&root).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!(
            "{} exists and is not empty: choose another name or --dir",
            root.display()
        ));
    }
    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
keyway-plugin-sdk = {{ path = "sdk" }}
serde_json = "1"

# A workspace of its own: builds the same wherever this folder is.
[workspace]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    );
    let file = name.replace('-', "_");
    let readme = format!(
        "# {name}\n\nA keyway {noun}, made by `keyway plugin new`.\n\n```\nrustup target add wasm32-wasip2      # once\ncargo build --release --target wasm32-wasip2\n```\n\nThe plugin is `target/wasm32-wasip2/release/{file}.wasm`. Try it offline with\n`keyway plugin {cmd} target/wasm32-wasip2/release/{file}.wasm ...`, then name it in a\ncluster's config (`docs/plugins.md` in keyway). `sdk/` is keyway's plugin SDK with the\nWIT contract (`sdk/wit/policy.wit`) of the keyway that made this crate; `Cargo.lock`\npins the versions keyway's own plugins are built with.\n",
        noun = kind.noun(),
        cmd = match kind {
            Kind::Health => "test",
            Kind::Promotion => "promote",
            Kind::Classifier => "classify",
        },
    );
    let files: [(&str, String); 7] = [
        ("Cargo.toml", manifest),
        ("Cargo.lock", lock_file(name)),
        ("README.md", readme),
        ("src/lib.rs", kind.source(name)),
        ("sdk/Cargo.toml", SDK_MANIFEST.to_string()),
        ("sdk/src/lib.rs", SDK_LIB.to_string()),
        ("sdk/wit/policy.wit", WIT.to_string()),
    ];
    for (path, text) in files {
        let to = root.join(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&to, text).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_the_lock_keeps_external_versions_in_order() {
        assert!(check_name("my-health").is_ok());
        for bad in ["", "My", "1x", "a/b", "../x", "keyway-plugin-sdk", "serde"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let lock = lock_file("zz-policy");
        assert!(lock.starts_with("# This file is automatically @generated by Cargo."));
        assert!(lock.contains("name = \"wit-bindgen\""));
        assert!(lock.contains("name = \"keyway-plugin-sdk\""));
        assert!(
            !lock.contains("name = \"failed-checks\""),
            "no other plugins"
        );
        let names: Vec<&str> = lock
            .lines()
            .filter_map(|l| l.strip_prefix("name = "))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.last(), Some(&"\"zz-policy\""));
    }
}
