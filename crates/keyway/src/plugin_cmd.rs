//! `keyway plugin`: make a plugin crate, and run a plugin offline against a JSON input
//! (`test`, `classify`, `promote`), printing one JSON document. It loads plugins exactly
//! as a running keyway does and never starts a server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum PluginCommand {
    /// Make a new plugin crate that builds on its own (outside any keyway checkout):
    /// `keyway plugin new my-health --kind health --dir ~/src`.
    New {
        /// Crate name (lower-case letters, digits, `-`, `_`).
        name: String,
        /// health, promotion or classifier.
        #[arg(long)]
        kind: String,
        /// Where to create the crate's folder (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Test a health policy: `keyway plugin test P.wasm --config '{..}' --history probes.json`.
    /// Prints the verdict and what the plugin wrote to stdout and stderr.
    Test {
        /// The plugin (.wasm component).
        plugin: PathBuf,
        /// Its configuration, as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
        /// JSON list of checks, oldest first: [{"ok": true, "status": 200, "at_ms": 1700000000000, "latency_us": 900, "lag_ms": 5}, ...]; `at_ms` in Unix milliseconds, as keyway passes them.
        #[arg(long)]
        history: PathBuf,
        /// State before the newest check: healthy, degraded, unhealthy or unknown.
        #[arg(long, default_value = "healthy")]
        current: String,
        /// The backend judged, as JSON: {"id": "vault-a", "role": "primary", "priority": 0, "location": "east", "weight": 1}.
        #[arg(long, default_value = "{}")]
        backend: String,
        /// The call's `now-ms` (Unix milliseconds); default: the newest check's `at_ms`.
        #[arg(long)]
        now_ms: Option<u64>,
    },
    /// Test a request classifier: `keyway plugin classify P.wasm --config '{..}' POST /path [host]`.
    Classify {
        /// The plugin (.wasm component).
        plugin: PathBuf,
        /// Its configuration, as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
        /// Request method.
        method: String,
        /// Request path.
        path: String,
        /// Request host.
        #[arg(default_value = "localhost")]
        host: String,
    },
    /// Test a promotion policy: `keyway plugin promote P.wasm --config '{..}' --candidates c.json`.
    Promote {
        /// The plugin (.wasm component).
        plugin: PathBuf,
        /// Its configuration, as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
        /// JSON: {"primary": {..} | null, "candidates": [{"id": "ro-1", "priority": 1, "location": "east", "weight": 1, "health": "healthy", "lag_ms": 20, "last_ok_ms": 1700000000000}, ...]}; `health` is healthy, degraded or unhealthy (or `"healthy": true|false`).
        #[arg(long)]
        candidates: PathBuf,
        /// The call's `now-ms` (Unix milliseconds); default: now.
        #[arg(long)]
        now_ms: Option<u64>,
    },
}

/// Runs a plugin offline. Output is one JSON document.
pub(crate) fn plugin_command(cmd: &PluginCommand) -> anyhow::Result<String> {
    use anyhow::anyhow;
    use keyway_proxy::health::HealthPlugin;
    use keyway_proxy::plugin::{
        ClassifierPlugin, PromotionCandidate, PromotionDecision, PromotionPlugin,
    };
    use serde_json::{json, Value};
    let read_json = |p: &PathBuf| -> anyhow::Result<Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
    };
    match cmd {
        PluginCommand::New { name, kind, dir } => {
            let kind = keyway::scaffold::Kind::parse(kind).map_err(|e| anyhow!(e))?;
            let root = keyway::scaffold::create(dir, name, kind).map_err(|e| anyhow!(e))?;
            Ok(format!(
                "created {root}\nbuild it:  cd {root} && cargo build --release --target wasm32-wasip2\nthe plugin: {root}/target/wasm32-wasip2/release/{file}.wasm",
                root = root.display(),
                file = name.replace('-', "_"),
            ))
        }
        PluginCommand::Test {
            plugin,
            config,
            history,
            current,
            backend,
            now_ms,
        } => {
            use keyway_proxy::health::Health;
            let policy = HealthPlugin::load(plugin, config).map_err(|e| anyhow!(e))?;
            let list = read_json(history)?;
            let list = list
                .as_array()
                .ok_or_else(|| anyhow!("--history must hold a JSON list of checks"))?;
            let newest = list.iter().filter_map(|p| p["at_ms"].as_u64()).max();
            let now_ms = now_ms
                .or(newest)
                .unwrap_or_else(keyway_proxy::health::unix_ms_now);
            let now = std::time::Instant::now();
            let probes: std::collections::VecDeque<keyway_proxy::health::Probe> = list
                .iter()
                .map(|p| {
                    let at_ms = p["at_ms"].as_u64().unwrap_or(0);
                    keyway_proxy::health::Probe {
                        at: now
                            .checked_sub(std::time::Duration::from_millis(
                                now_ms.saturating_sub(at_ms),
                            ))
                            .unwrap_or(now),
                        at_wall: std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms),
                        ok: p["ok"].as_bool().unwrap_or(false),
                        status: p["status"].as_u64().and_then(|s| u16::try_from(s).ok()),
                        latency: std::time::Duration::from_micros(
                            p["latency_us"].as_u64().unwrap_or(0),
                        ),
                        error: p["error"].as_str().map(str::to_string),
                        lag_ms: p["lag_ms"].as_u64(),
                    }
                })
                .collect();
            let current = match current.as_str() {
                "healthy" => Health::Healthy,
                "degraded" => Health::Degraded,
                "unhealthy" => Health::Unhealthy,
                "unknown" => Health::Unknown,
                other => {
                    return Err(anyhow!(
                        "--current `{other}`: use healthy, degraded, unhealthy or unknown"
                    ))
                }
            };
            let b: Value = serde_json::from_str(backend).with_context(|| {
                "--backend is not JSON (e.g. {\"id\": \"a\", \"location\": \"east\"})"
            })?;
            let role = match b["role"].as_str().unwrap_or("replica") {
                "primary" => keyway_proxy::config::Role::Primary,
                "replica" => keyway_proxy::config::Role::Replica,
                other => return Err(anyhow!("--backend role `{other}`: use primary or replica")),
            };
            let id = b["id"].as_str().unwrap_or("backend").to_string();
            let backend = keyway_proxy::config::BackendConfig {
                sni: id.clone(),
                id,
                address: "127.0.0.1:1".parse()?,
                weight: b["weight"]
                    .as_u64()
                    .map_or(1, |w| w.clamp(1, u64::from(u32::MAX)) as u32),
                priority: b["priority"]
                    .as_u64()
                    .map_or(0, |p| p.min(u64::from(u32::MAX)) as u32),
                tls: false,
                protocol: keyway_proxy::config::UpstreamProtocol::Http1,
                role,
                location: b["location"].as_str().unwrap_or("").to_string(),
                max_connections: keyway_proxy::config::DEFAULT_BACKEND_MAX_CONNECTIONS,
                max_queue: keyway_proxy::config::DEFAULT_BACKEND_MAX_QUEUE,
            };
            let traced = policy.evaluate_traced(&backend, current, &probes, now_ms);
            let (health, reason) = traced
                .result
                .map_err(|e| anyhow!("the plugin {e}{}", output_note(&traced.output)))?;
            Ok(
                json!({ "health": health.as_str(), "reason": reason, "output": traced.output })
                    .to_string(),
            )
        }
        PluginCommand::Classify {
            plugin,
            config,
            method,
            path,
            host,
        } => {
            let c = ClassifierPlugin::load(plugin, config).map_err(|e| anyhow!(e))?;
            let traced = c.classify_traced(&method.to_ascii_uppercase(), path, host);
            let kind = traced
                .result
                .map_err(|e| anyhow!("the plugin {e}{}", output_note(&traced.output)))?;
            let kind = match kind {
                keyway_proxy::classify::Kind::Read => "read",
                keyway_proxy::classify::Kind::Write => "write",
            };
            Ok(json!({ "kind": kind, "output": traced.output }).to_string())
        }
        PluginCommand::Promote {
            plugin,
            config,
            candidates,
            now_ms,
        } => {
            let p = PromotionPlugin::load(plugin, config).map_err(|e| anyhow!(e))?;
            let doc = read_json(candidates)?;
            let cand = |v: &Value| {
                let health =
                    v["health"]
                        .as_str()
                        .unwrap_or(if v["healthy"].as_bool().unwrap_or(false) {
                            "healthy"
                        } else {
                            "unhealthy"
                        });
                PromotionCandidate {
                    id: v["id"].as_str().unwrap_or("").to_string(),
                    priority: v["priority"].as_u64().unwrap_or(0) as u32,
                    location: v["location"].as_str().unwrap_or("").to_string(),
                    weight: v["weight"]
                        .as_u64()
                        .map_or(1, |w| w.clamp(1, u64::from(u32::MAX)) as u32),
                    healthy: health == "healthy",
                    degraded: health == "degraded",
                    lag_ms: v["lag_ms"].as_u64(),
                    last_ok_ms: v["last_ok_ms"].as_u64().unwrap_or(0),
                }
            };
            let primary = doc.get("primary").filter(|v| !v.is_null()).map(cand);
            let list: Vec<PromotionCandidate> = doc["candidates"]
                .as_array()
                .ok_or_else(|| anyhow!("--candidates must hold {{\"candidates\": [...]}}"))?
                .iter()
                .map(cand)
                .collect();
            let now_ms = now_ms.unwrap_or_else(keyway_proxy::health::unix_ms_now);
            let traced = p.decide_traced(primary.as_ref(), &list, now_ms);
            let d = traced
                .result
                .map_err(|e| anyhow!("the plugin {e}{}", output_note(&traced.output)))?;
            let mut out = match d {
                PromotionDecision::Keep => json!({ "decision": "keep" }),
                PromotionDecision::None => json!({ "decision": "none" }),
                PromotionDecision::Promote(id) => json!({ "decision": "promote", "backend": id }),
            };
            out["output"] = json!(traced.output);
            Ok(out.to_string())
        }
    }
}

/// What a failed plugin wrote, for the error message.
fn output_note(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("\nthe plugin's output:\n{output}")
    }
}
