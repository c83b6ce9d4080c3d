//! Process-wide metrics recorder (Prometheus) and log set-up.
//!
//! The `metrics` facade has one global recorder per process; [`metrics_handle`] installs
//! it on first use and returns the handle `/metrics` renders. It must run before any
//! cluster registers its metric handles, so `server::build_runtime` calls it before building any cluster.
//!
//! Histogram samples are buffered in the recorder until something drains them into their
//! fixed buckets: `/metrics` does, and so does [`PrometheusHandle::run_upkeep`]. Since
//! nobody is obliged to scrape, the recorder is installed together with one upkeep thread
//! that drains every [`UPKEEP_INTERVAL`]; without it every request's latency sample is
//! kept forever (about 20 bytes per request, measured with `bench/soak.sh`).
//! It keeps no per-request data beyond one upkeep period.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: fine below 10 ms where a proxy's overhead lives, coarse
/// up to the minute-long requests PAM exports can take.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often buffered histogram samples are folded into their buckets when nobody
/// scrapes `/metrics`. The buffer holds at most this long's worth of samples (a few
/// hundred kilobytes at 10 k requests/s); a scrape drains it too.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The Prometheus handle, installing the global recorder on first call. If another
/// recorder was installed first, keyway's handle still renders (its own, empty) registry.
pub fn metrics_handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_duration_seconds".into()),
                &LATENCY_BUCKETS,
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        start_upkeep(handle.clone());
        handle
    })
}

/// One thread for the process, started with the recorder: a plain thread rather than a
/// task, because the recorder can be installed before (or outside) a tokio runtime and
/// must be drained for as long as the process lives.
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("keyway-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; latency samples are only drained when /metrics is scraped");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("keyway_requests_total", "Requests routed to a cluster");
    describe_counter!(
        "keyway_upstream_responses_total",
        "Backend responses by cluster, backend and status class"
    );
    describe_counter!(
        "keyway_upstream_connect_errors_total",
        "Failed connection attempts to a backend"
    );
    describe_counter!(
        "keyway_retries_total",
        "Requests retried on another backend"
    );
    describe_counter!(
        "keyway_retries_denied_total",
        "Retries refused because the cluster's retry budget was spent"
    );
    describe_counter!(
        "keyway_proxy_protocol_rejected_total",
        "Client connections closed for a missing or invalid PROXY protocol header"
    );
    describe_gauge!(
        "keyway_requests_in_flight",
        "Requests in flight per cluster"
    );
    describe_gauge!(
        "keyway_upstream_in_flight",
        "Requests in flight per backend"
    );
    describe_gauge!(
        "keyway_downstream_connections",
        "Open client connections per listener"
    );
    describe_histogram!(
        "keyway_request_duration_seconds",
        Unit::Seconds,
        "Time from request arrival to response headers"
    );
}

/// Installs the log subscriber: `RUST_LOG`-style filter (default `info`), text or JSON.
pub fn init_logs(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
