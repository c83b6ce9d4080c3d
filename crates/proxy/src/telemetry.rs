//! Process-wide metrics recorder (Prometheus) and log set-up.
//!
//! The `metrics` facade has one global recorder per process; [`metrics_handle`] installs
//! it on first use and returns the handle `/metrics` renders. It must run before any
//! cluster registers its metric handles, so `server::build_runtime` calls it before building any cluster.
//!
//! The recorder buffers histogram samples until something drains them into their fixed
//! buckets: `/metrics` does, and so does [`PrometheusHandle::run_upkeep`]. Since nobody is
//! obliged to scrape, the recorder is installed together with one upkeep thread that
//! drains every [`UPKEEP_INTERVAL`]. Only rare events use it (hook calls); the request
//! latency, recorded for every request, is keyway's own fixed-bucket [`Latency`], which
//! buffers nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets in seconds: fine below 10 ms where a proxy's overhead lives, coarse
/// up to the minute-long requests PAM exports can take.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often the recorder's buffered histogram samples (hook calls) are folded into
/// their buckets when nobody scrapes `/metrics`; a scrape drains them too.
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

/// Request latency per cluster in fixed buckets (`keyway_request_duration_seconds`).
///
/// Not the recorder's histogram: that one buffers every sample until a scrape or the
/// upkeep thread folds it into its buckets, which cost every request about 300
/// instructions and a cache line written now and read seconds later. Here a request
/// finds its bucket and adds to two relaxed atomic counters; a scrape sums them. Memory
/// is fixed: one series per cluster name the process has served.
pub struct Latency {
    /// Observations at or below each bound (and above every bound, the last).
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// [`LATENCY_BUCKETS`] in nanoseconds, the unit a request's elapsed time is compared in.
const BOUNDS_NANOS: [u64; LATENCY_BUCKETS.len()] = {
    let mut out = [0; LATENCY_BUCKETS.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = (LATENCY_BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    out
};

impl Latency {
    fn new() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one request that took `took`.
    pub fn record(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // Prometheus buckets are "less than or equal": a bound's own value falls in it.
        let i = BOUNDS_NANOS.partition_point(|&b| b < nanos);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends this series in the Prometheus text format: cumulative buckets, `+Inf`,
    /// sum and count. `labels` is the rendered label set (`cluster="…"`).
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write as _;
        let mut total = 0u64;
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Ordering::Relaxed);
            let le = match LATENCY_BUCKETS.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {total}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// Every cluster's latency series, by cluster name: a reloaded cluster of the same name
/// keeps counting into its series, as the recorder's counters do.
static LATENCIES: Mutex<BTreeMap<String, Arc<Latency>>> = Mutex::new(BTreeMap::new());

const LATENCY_NAME: &str = "keyway_request_duration_seconds";

/// The latency series of cluster `name`, created on first use.
pub fn request_latency(name: &str) -> Arc<Latency> {
    let mut all = LATENCIES.lock().unwrap_or_else(|e| e.into_inner());
    all.entry(name.to_owned())
        .or_insert_with(|| Arc::new(Latency::new()))
        .clone()
}

/// Everything `/metrics` serves: the recorder's metrics, then the latency histograms.
pub fn render() -> String {
    let mut out = metrics_handle().render();
    let all = LATENCIES.lock().unwrap_or_else(|e| e.into_inner());
    if !all.is_empty() {
        out.push_str(&format!(
            "# HELP {LATENCY_NAME} Time from request arrival to response headers\n# TYPE {LATENCY_NAME} histogram\n"
        ));
        for (cluster, latency) in all.iter() {
            latency.render(
                LATENCY_NAME,
                &format!("cluster=\"{}\"", label_value(cluster)),
                &mut out,
            );
        }
    }
    out
}

/// A label value escaped for the text format (backslash, double quote, line feed).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(l: &Latency) -> String {
        let mut out = String::new();
        l.render("t", "cluster=\"c\"", &mut out);
        out
    }

    fn line<'a>(text: &'a str, key: &str) -> &'a str {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(str::trim))
            .unwrap_or_else(|| panic!("no `{key}` in:\n{text}"))
    }

    #[test]
    fn a_bound_belongs_to_its_own_bucket_and_buckets_are_cumulative() {
        let l = Latency::new();
        l.record(Duration::from_micros(500));
        l.record(Duration::from_micros(500) + Duration::from_nanos(1));
        l.record(Duration::from_millis(1));
        l.record(Duration::from_secs(61));
        let out = rendered(&l);
        for (le, cumulative) in [("0.0005", "1"), ("0.001", "3"), ("60", "3"), ("+Inf", "4")] {
            let key = format!("t_bucket{{cluster=\"c\",le=\"{le}\"}}");
            assert_eq!(line(&out, &key), cumulative, "{out}");
        }
        assert_eq!(line(&out, "t_count{cluster=\"c\"}"), "4", "{out}");
        let sum: f64 = line(&out, "t_sum{cluster=\"c\"}").parse().unwrap();
        assert!((sum - 61.002_000_001).abs() < 1e-9, "{out}");
        assert_eq!(out.lines().count(), LATENCY_BUCKETS.len() + 3);
    }

    #[test]
    fn every_bound_is_its_value_in_nanoseconds() {
        for (b, n) in LATENCY_BUCKETS.iter().zip(BOUNDS_NANOS) {
            assert_eq!(Duration::from_secs_f64(*b), Duration::from_nanos(n));
        }
    }

    #[test]
    fn a_cluster_keeps_its_series_and_names_are_escaped() {
        let name = "tele\"metry\\test\n";
        request_latency(name).record(Duration::from_millis(2));
        request_latency(name).record(Duration::from_millis(3));
        let out = render();
        let key = "keyway_request_duration_seconds_count{cluster=\"tele\\\"metry\\\\test\\n\"}";
        assert_eq!(line(&out, key), "2", "{out}");
        assert_eq!(
            out.matches("# TYPE keyway_request_duration_seconds histogram")
                .count(),
            1
        );
    }
}
