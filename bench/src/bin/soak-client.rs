//! The client side of `bench/soak.sh`: a fixed number of requests as fast as keep-alive
//! connections carry them, or many idle keep-alive connections held open for a while.
//!
//! `soak-client requests --addr 127.0.0.1:18181 --count 1000000 --connections 32`
//! sends `count` `GET /` requests over `connections` HTTP/1.1 keep-alive connections
//! (closed loop, raw sockets: the client must cost less than the proxy) and prints one
//! JSON line. `soak-client idle --addr ... --count 10000 --hold-seconds 20` opens `count`
//! connections, sends one request on each and reads the answer (so each is a served,
//! idle keep-alive connection), prints `ready N` and holds them, then closes them all.
//! wrk cannot hold connections idle, hence this tool. Loopback only; both modes stop by
//! themselves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Send a fixed number of requests.
    Requests {
        /// Target address.
        #[arg(long)]
        addr: SocketAddr,
        /// Requests in all.
        #[arg(long)]
        count: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: u64,
    },
    /// Hold idle keep-alive connections.
    Idle {
        /// Target address.
        #[arg(long)]
        addr: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        count: usize,
        /// How long to hold them once all are open.
        #[arg(long, default_value_t = 20)]
        hold_seconds: u64,
    },
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// Sends one request and reads one response (head + Content-Length body); `buf` keeps
/// its capacity between calls. Returns the status code.
async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    s.write_all(REQUEST).await?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            anyhow::ensure!(buf.len() < 64 * 1024, "response head too long");
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad status line"))?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .ok_or_else(|| anyhow::anyhow!("no content-length"))?;
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "connection closed in the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        anyhow::ensure!(
            buf.len() == end + 4 + len,
            "unexpected bytes after the body"
        );
        return Ok(status);
    }
}

async fn requests(addr: SocketAddr, count: u64, connections: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, errors) = (next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut conn: Option<TcpStream> = None;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let s = match conn.as_mut() {
                    Some(s) => s,
                    None => match TcpStream::connect(addr).await {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            conn.insert(s)
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                match exchange(s, &mut buf).await {
                    Ok(200) => {}
                    Ok(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"requests\":{count},\"errors\":{},\"seconds\":{secs:.1},\"rps\":{:.0}}}",
        errors.load(Ordering::Relaxed),
        count as f64 / secs
    );
    Ok(())
}

async fn idle(addr: SocketAddr, count: usize, hold: Duration) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(count);
    let mut buf = Vec::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.len() < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} connections opened in 120 s",
            held.len()
        );
        let mut s = TcpStream::connect(addr).await?;
        let status = exchange(&mut s, &mut buf).await?;
        anyhow::ensure!(status == 200, "status {status}");
        held.push(s);
    }
    println!("ready {}", held.len());
    tokio::time::sleep(hold).await;
    drop(held);
    println!("closed");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.mode {
            Mode::Requests {
                addr,
                count,
                connections,
            } => requests(addr, count, connections).await,
            Mode::Idle {
                addr,
                count,
                hold_seconds,
            } => idle(addr, count, Duration::from_secs(hold_seconds)).await,
        }
    })
}
