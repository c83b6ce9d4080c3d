//! The keyway command line: `run`, `check`, `demo`. All behaviour lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyway::{Config, Server};

#[derive(Parser)]
#[command(
    name = "keyway",
    version,
    about = "An L7 proxy for privileged-access-management server farms"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy from a config file.
    Run {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (non-zero on errors).
    Check {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a policy plugin offline and print its decision.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Back up or restore the promotion decisions (epoch, primary, fenced backends).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Start demo backends on loopback and keyway in front of them.
    Demo {
        /// Demo config (its backend addresses become demo servers).
        #[arg(long, short, default_value = "config/demo.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print every cluster's stored decisions as JSON (from the state file or etcd).
    Export {
        /// Path to the TOML config (says where the state lives).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Restore decisions from an export, checked against the config. Epochs never go
    /// back: an older backup is restored with a newer epoch. With a state file, run it
    /// while keyway is stopped (it refuses while keyway holds the file); with etcd,
    /// running instances apply it at once.
    Import {
        /// The exported JSON.
        file: PathBuf,
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    keyway_proxy::telemetry::init_logs(cli.log_json);
    if let Command::Plugin { command } = &cli.command {
        return match plugin_command(command) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keyway plugin: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::State { command } = &cli.command {
        return match state_command(command) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keyway state: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let (path, demo) = match &cli.command {
        Command::Check { config } => {
            return match keyway_proxy::load::load(config) {
                Ok(keyway_proxy::load::Loaded { config: c, .. }) => {
                    println!(
                        "{}: ok ({} listener(s), {} TCP listener(s), {} route(s), {} cluster(s))",
                        config.display(),
                        c.listeners.len(),
                        c.tcp_listeners.len(),
                        c.routes.len(),
                        c.clusters.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprint!("{e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Run { config } => (config.clone(), false),
        Command::Plugin { .. } | Command::State { .. } => unreachable!("handled above"),
        Command::Demo { config } => (config.clone(), true),
    };
    let mut loaded = match keyway_proxy::load::load(&path) {
        Ok(l) => l,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    let config = &mut loaded.config;
    if demo && matches!(config.state, keyway_proxy::config::StateConfig::File(_)) {
        // Each demo starts from the configured primaries, without touching the repo.
        let file =
            std::env::temp_dir().join(format!("keyway-demo-state-{}.json", std::process::id()));
        config.state = keyway_proxy::config::StateConfig::File(file);
    }
    let mut rt = if config.proxy.workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(n) = config.proxy.workers.filter(|&n| n > 1) {
        rt.worker_threads(n);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(loaded, path, demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(loaded: keyway_proxy::load::Loaded, path: PathBuf, demo: bool) -> anyhow::Result<()> {
    // Signal handlers first: a SIGTERM or SIGHUP that arrives while keyway starts would
    // otherwise meet the default action and kill the process.
    let stop = shutdown_signal();
    let hangups = Hangups::register();
    if demo {
        let backends = keyway::demo::start_backends(&loaded)
            .await
            .context("starting demo backends")?;
        for (cluster, id, addr) in &backends {
            tracing::info!(%cluster, backend = %id, %addr, "demo backend up");
        }
    }
    let config = loaded.config.clone();
    let server = Server::start_loaded(loaded).await?;
    server.set_config_source(path);
    hangups.reload_with(server.reloader());
    if demo {
        print_demo_help(&config, &server);
    }
    stop.await;
    tracing::info!("shutting down: draining in-flight requests");
    server.shutdown().await;
    Ok(())
}

fn state_command(command: &StateCommand) -> anyhow::Result<String> {
    let config_path = match command {
        StateCommand::Export { config } | StateCommand::Import { config, .. } => config,
    };
    let loaded = keyway_proxy::load::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let config = &loaded.config;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let access = match command {
            StateCommand::Export { .. } => keyway_proxy::failover::Access::Reader,
            StateCommand::Import { .. } => keyway_proxy::failover::Access::Owner,
        };
        let failover = keyway_proxy::failover::Failover::open(config, &loaded.coordination, access)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        match command {
            StateCommand::Export { .. } => {
                let doc = failover.export().await.map_err(|e| anyhow::anyhow!(e))?;
                Ok(serde_json::to_string_pretty(&doc)?)
            }
            StateCommand::Import { file, .. } => {
                let bytes =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                let doc = keyway_proxy::failover::parse_state(&bytes)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let report = failover
                    .import(config, doc)
                    .await
                    .map_err(|e| anyhow::anyhow!("nothing imported: {e}"))?;
                Ok(format!("imported:\n  {}", report.join("\n  ")))
            }
        }
    })
}

fn print_demo_help(config: &Config, server: &Server) {
    let Some(addr) = server.listen_addrs().first() else {
        return;
    };
    println!("\nkeyway demo is running. Try:\n");
    for r in &config.routes {
        let host = match &r.host {
            keyway_proxy::config::HostPattern::Exact(h) => h.clone(),
            keyway_proxy::config::HostPattern::Suffix(s) => format!("demo{s}"),
            keyway_proxy::config::HostPattern::Any => "localhost".into(),
        };
        println!(
            "  curl -s -H 'Host: {host}' http://{addr}{}    # cluster `{}`",
            r.path, r.cluster
        );
    }
    if let Some(a) = server.admin_addr() {
        println!("\n  curl -s http://{a}/status      # clusters and backends");
        println!("  curl -s http://{a}/metrics     # Prometheus metrics");
    }
    for (l, addr) in config.tcp_listeners.iter().zip(server.tcp_addrs()) {
        println!(
            "  nc {} {}    # TCP farm `{}` (greets, then echoes)",
            addr.ip(),
            addr.port(),
            l.cluster.as_deref().unwrap_or("by SNI")
        );
    }
    println!("\nSticky sessions: add -c /tmp/kw.jar -b /tmp/kw.jar to the psm curl and repeat it.");
    println!("Read/write split: compare `curl -s -X POST -H 'Host: pam360.demo.test' http://{addr}/api/x` (primary)");
    println!("  with a GET to the same host (a read-only server).");
    println!("Press Ctrl-C to stop.\n");
}

/// Runs a plugin offline. Output is one JSON document.
fn plugin_command(cmd: &PluginCommand) -> anyhow::Result<String> {
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

/// SIGHUP, registered at start and handled once the server runs: re-read the config
/// file (build, validate, swap; a bad file changes nothing).
struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    fn register() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup()).ok();
            if signal.is_none() {
                tracing::warn!(
                    "cannot listen for SIGHUP; reload with POST /reload on the admin listener"
                );
            }
            Self { signal }
        }
        #[cfg(not(unix))]
        Self {}
    }

    fn reload_with(self, reloader: std::sync::Arc<keyway_proxy::server::Reloader>) {
        #[cfg(unix)]
        if let Some(mut hup) = self.signal {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let r = reloader.clone();
                    // The outcome is logged by the reloader itself.
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                }
            });
        }
        #[cfg(not(unix))]
        let _ = reloader;
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are registered by this call,
/// not when the future is first polled.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            tokio::select! {
                _ = recv(term) => {}
                _ = recv(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// mimalloc: the request path allocates small, short-lived buffers on every request;
/// measured faster than glibc malloc for that pattern (see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
