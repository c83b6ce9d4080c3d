//! `tcpgen`: bulk TCP for `bench/tcp.sh`.
//!
//! `tcpgen serve --listen ADDR`: a backend. A connection's first byte picks its role:
//! `U` (upload) reads and discards everything, `D` (download) sends 64 KiB writes until
//! the peer goes away.
//!
//! `tcpgen run --addr ADDR --mode up|down --conns N --secs S`: N connections for S
//! seconds, each writing (up) or reading (down) 64 KiB at a time; prints the bytes moved
//! (warm-up included) and the MB/s after the warm-up as one line: `all=... mbps=...`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the backend.
    Serve {
        #[arg(long)]
        listen: String,
    },
    /// Moves bytes through ADDR and reports the rate.
    Run {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        mode: String,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        secs: u64,
    },
}

const CHUNK: usize = 64 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve { listen } => serve(&listen).await,
        Command::Run {
            addr,
            mode,
            conns,
            secs,
        } => run(&addr, &mode, conns, secs).await,
    }
}

async fn serve(listen: &str) -> anyhow::Result<()> {
    let sock = TcpListener::bind(listen).await?;
    loop {
        let (mut s, _) = sock.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            let mut role = [0u8; 1];
            if s.read_exact(&mut role).await.is_err() {
                return;
            }
            if role[0] == b'D' {
                while s.write_all(&buf).await.is_ok() {}
            } else {
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}

async fn run(addr: &str, mode: &str, conns: usize, secs: u64) -> anyhow::Result<()> {
    let up = match mode {
        "up" => true,
        "down" => false,
        other => anyhow::bail!("mode `{other}`: use up or down"),
    };
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        s.write_all(if up { b"U" } else { b"D" }).await?;
        let (total, stop) = (total.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![7u8; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                let n = if up {
                    match s.write(&buf).await {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    }
                } else {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    }
                };
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    // Let the connections get through keyway's establishment before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start_bytes = total.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let all = total.load(Ordering::Relaxed);
    let bytes = all - start_bytes;
    let took = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    // `all` includes the warm-up: what the proxy's CPU time is divided by.
    println!("all={all} mbps={:.0}", bytes as f64 / took / 1e6);
    Ok(())
}
