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
    /// Start demo backends on loopback and keyway in front of them.
    Demo {
        /// Demo config (its backend addresses become demo servers).
        #[arg(long, short, default_value = "config/demo.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    keyway::telemetry::init_logs(cli.log_json);
    let (path, demo) = match &cli.command {
        Command::Check { config } => {
            return match Config::load(config) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} listener(s), {} route(s), {} cluster(s))",
                        config.display(),
                        c.listeners.len(),
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
        Command::Demo { config } => (config.clone(), true),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
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
    match rt.block_on(run(config, path, demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: PathBuf, demo: bool) -> anyhow::Result<()> {
    if demo {
        let backends = keyway::demo::start_backends(&config)
            .await
            .context("starting demo backends")?;
        for (cluster, id, addr) in &backends {
            tracing::info!(%cluster, backend = %id, %addr, "demo backend up");
        }
    }
    let server = Server::start(config.clone()).await?;
    server.set_config_source(path);
    spawn_reload_on_sighup(server.reloader());
    if demo {
        print_demo_help(&config, &server);
    }
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    server.shutdown().await;
    Ok(())
}

fn print_demo_help(config: &Config, server: &Server) {
    let Some(addr) = server.listen_addrs().first() else {
        return;
    };
    println!("\nkeyway demo is running. Try:\n");
    for r in &config.routes {
        let host = match &r.host {
            keyway::config::HostPattern::Exact(h) => h.clone(),
            keyway::config::HostPattern::Suffix(s) => format!("demo{s}"),
            keyway::config::HostPattern::Any => "localhost".into(),
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
    println!("\nSticky sessions: add -c /tmp/kw.jar -b /tmp/kw.jar to the psm curl and repeat it.");
    println!("Read/write split: compare `curl -s -X POST -H 'Host: pam360.demo.test' http://{addr}/api/x` (primary)");
    println!("  with a GET to the same host (a read-only server).");
    println!("Press Ctrl-C to stop.\n");
}

/// SIGHUP re-reads the config file: build, validate, swap; a bad file changes nothing.
fn spawn_reload_on_sighup(reloader: std::sync::Arc<keyway::server::Reloader>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!(
                "cannot listen for SIGHUP; reload with POST /reload on the admin listener"
            );
            return;
        };
        while hup.recv().await.is_some() {
            let r = reloader.clone();
            // The outcome is logged by the reloader itself.
            let _ = tokio::task::spawn_blocking(move || r.reload()).await;
        }
    });
    #[cfg(not(unix))]
    let _ = reloader;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// mimalloc: the request path allocates small, short-lived buffers on every request;
/// measured faster than glibc malloc for that pattern (see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
