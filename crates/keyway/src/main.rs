//! The keyway command line: `run`, `check`, `demo`, `plugin` (`plugin_cmd`), `state
//! export|import`, `ctl` (the admin API's client, `ctl`). It parses arguments and calls the libraries; it never serves traffic
//! itself.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyway::{Config, Server};

mod ctl;
mod plugin_cmd;
use plugin_cmd::{plugin_command, PluginCommand};

#[derive(Parser)]
#[command(
    name = "keyway",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KEYWAY_GIT_COMMIT"), ")"),
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
    /// Talk to a running keyway's admin API: status, drain, undrain, promote, failback,
    /// reload, state export. Exit status: 0 done, 1 refused, 2 usage, 3 unreachable.
    Ctl(ctl::Ctl),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Ctl(ctl) = cli.command {
        return ctl::run(ctl);
    }
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
        Command::Plugin { .. } | Command::State { .. } | Command::Ctl(_) => {
            unreachable!("handled above")
        }
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
    // The control plane and the first worker; the data plane starts the other workers
    // (`keyway_proxy::workers`), each on a single-threaded runtime of its own.
    let rt = match keyway_proxy::workers::runtime() {
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
    let demo_backends = if demo {
        let backends = keyway::demo::start_backends(&loaded)
            .await
            .context("starting demo backends")?;
        for (cluster, id, addr) in backends.list() {
            tracing::info!(%cluster, backend = %id, %addr, "demo backend up");
        }
        Some(backends)
    } else {
        None
    };
    let config = loaded.config.clone();
    let server = match demo_backends {
        Some(b) => Server::start_demo(loaded, b).await?,
        None => Server::start_loaded(loaded).await?,
    };
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
        println!("\n  Dashboard: http://{a}/   (\"break something\" stops a demo backend: watch the promotion)");
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
