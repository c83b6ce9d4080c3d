//! Open-loop HTTP/1.1 load generator for latency at a fixed rate (wrk2's method).
//!
//! Each of C keep-alive connections sends on its own fixed schedule (rate / C per second).
//! When a request falls due while its connection is still busy with the previous one, its
//! latency is measured from when it was *due*, so a stall in the system under test shows
//! up as latency instead of silently lowering the rate (coordinated omission). When the
//! connection was free, latency is measured from the actual send, so the timer's 1 ms
//! granularity does not count against the system under test. Prints one JSON line.
//!
//! `loadgen --addr 127.0.0.1:18081 --host bench --rate 5000 --seconds 10 --connections 32`

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser)]
struct Args {
    /// Target address.
    #[arg(long)]
    addr: SocketAddr,
    /// Host header.
    #[arg(long, default_value = "bench")]
    host: String,
    /// Requests per second across all connections.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Measured duration.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: u64,
}

struct Outcome {
    hist: Histogram<u64>,
    errors: u64,
}

async fn connection(args: &Args, index: u64, start: Instant) -> anyhow::Result<Outcome> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let interval = Duration::from_nanos(1_000_000_000 * args.connections / args.rate.max(1));
    let end = start + Duration::from_secs(args.seconds);
    // Spread the connections' schedules evenly across one interval.
    let mut due = start + interval * (index as u32) / (args.connections as u32);
    let mut tx = connect(args.addr).await?;
    let mut free_since = Instant::now();
    while due < end {
        tokio::time::sleep_until(due).await;
        let began = if free_since <= due {
            Instant::now()
        } else {
            due
        };
        let req = Request::builder()
            .uri("/")
            .header("host", &args.host)
            .body(Empty::<Bytes>::new())?;
        let ok = match tx.send_request(req).await {
            Ok(resp) => resp.status().is_success() && resp.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        free_since = Instant::now();
        if ok {
            let us = began.elapsed().as_micros() as u64;
            hist.saturating_record(us.max(1));
        } else {
            errors += 1;
        }
        // A server may close a keep-alive connection at any time: reconnect, as clients do.
        if tx.ready().await.is_err() {
            tx = connect(args.addr).await?;
        }
        due += interval;
    }
    Ok(Outcome { hist, errors })
}

async fn connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

fn main() -> anyhow::Result<()> {
    let args: &'static Args = Box::leak(Box::new(Args::parse()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let start = Instant::now() + Duration::from_millis(200);
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| tokio::spawn(connection(args, i, start)))
            .collect();
        let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut errors = 0;
        for t in tasks {
            let o = t.await??;
            total.add(&o.hist)?;
            errors += o.errors;
        }
        println!(
            "{{\"requests\":{},\"errors\":{},\"rate\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
            total.len(),
            errors,
            args.rate,
            total.value_at_quantile(0.5),
            total.value_at_quantile(0.99),
            total.value_at_quantile(0.999),
            total.max()
        );
        Ok(())
    })
}
