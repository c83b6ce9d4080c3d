//! Criterion benchmarks of the plugin host: one classifier call with a reused instance
//! (per request) and one health evaluation (per probe, instantiation included).
//! Run: `cargo bench -p keyway-bench --bench plugins` (builds the plugins first).

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use keyway_proxy::config::{BackendConfig, Role, UpstreamProtocol};
use keyway_proxy::health::HealthPlugin;
use keyway_proxy::health::{Health, Probe};
use keyway_proxy::plugin::ClassifierPlugin;

fn dist() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new("bash")
        .arg(root.join("plugins/build.sh"))
        .status()
        .expect("run plugins/build.sh");
    assert!(status.success(), "plugins/build.sh failed");
    root.join("plugins/dist")
}

fn bench(c: &mut Criterion) {
    let dist = dist();
    let classifier = ClassifierPlugin::load(&dist.join("pam-classifier.wasm"), "{}").expect("load");
    let native = keyway_proxy::classify::Classifier::new(
        &[keyway_proxy::config::RoutePattern {
            method: Some(http::Method::POST),
            path: "/PasswordVault/api/Accounts/*/Password/Retrieve".into(),
        }],
        &[],
        keyway_proxy::config::PathCase::Sensitive,
    );
    let path = "/PasswordVault/api/Accounts/12_3/Password/Retrieve";
    // Warm this thread's instance: the request path reuses it.
    classifier
        .classify("POST", path, "pvwa.corp.test")
        .expect("classify");
    c.bench_function("plugin: pam-classifier call (reused instance)", |b| {
        b.iter(|| {
            classifier.classify_each_time("POST", std::hint::black_box(path), "pvwa.corp.test")
        })
    });
    c.bench_function("plugin: pam-classifier answer remembered", |b| {
        b.iter(|| classifier.classify("POST", std::hint::black_box(path), "pvwa.corp.test"))
    });
    // A new request every time: a call, plus the slot it takes in the memo.
    let paths: Vec<String> = (0..4096)
        .map(|i| format!("/PasswordVault/api/Accounts/{i}_3/Password/Retrieve"))
        .collect();
    let mut next = 0;
    c.bench_function(
        "plugin: pam-classifier new request (call + remember)",
        |b| {
            b.iter(|| {
                next = (next + 1) % paths.len();
                classifier.classify("POST", &paths[next], "pvwa.corp.test")
            })
        },
    );
    c.bench_function("native: classifier with one read route", |b| {
        b.iter(|| native.classify(&http::Method::POST, std::hint::black_box(path)))
    });

    let health = HealthPlugin::load(&dist.join("rise-fall.wasm"), r#"{"rise": 2, "fall": 3}"#)
        .expect("load");
    let backend = BackendConfig {
        id: "vault-a".into(),
        address: "127.0.0.1:1".parse().expect("addr"),
        weight: 1,
        priority: 0,
        tls: false,
        sni: "vault".into(),
        protocol: UpstreamProtocol::Http1,
        role: Role::Replica,
        location: String::new(),
        max_connections: keyway_proxy::config::DEFAULT_BACKEND_MAX_CONNECTIONS,
        max_queue: keyway_proxy::config::DEFAULT_BACKEND_MAX_QUEUE,
    };
    let history: VecDeque<Probe> = (0..64)
        .map(|i| Probe {
            at: Instant::now(),
            at_wall: SystemTime::now(),
            ok: i % 7 != 0,
            status: Some(200),
            latency: Duration::from_micros(800),
            error: None,
            lag_ms: Some(12),
        })
        .collect();
    let now_ms = keyway_proxy::health::unix_ms_now();
    c.bench_function(
        "plugin: rise-fall evaluation, 64 checks (instantiate + configure + call)",
        |b| b.iter(|| health.evaluate(&backend, Health::Healthy, &history, now_ms)),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
