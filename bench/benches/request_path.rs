//! Criterion micro-benchmarks of the per-request work keyway adds: route lookup, backend
//! choice, header rewriting, cookie lookup. Run: `cargo bench -p keyway-bench`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use keyway_proxy::balance::{Balancer, Candidate};
use keyway_proxy::config::{host_pattern_for_tests, Balance, RouteConfig};
use keyway_proxy::headers;
use keyway_proxy::router::Router;

struct B {
    weight: u32,
    in_flight: u32,
}

impl Candidate for B {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn in_flight(&self) -> u32 {
        self.in_flight
    }
}

fn routes() -> (Router, usize) {
    let mut rs = Vec::new();
    for i in 0..10 {
        rs.push(RouteConfig {
            host: host_pattern_for_tests(&format!("app{i}.corp.test")),
            path: "/".into(),
            cluster: format!("c{i}"),
        });
        rs.push(RouteConfig {
            host: host_pattern_for_tests(&format!("app{i}.corp.test")),
            path: "/PasswordVault/api".into(),
            cluster: format!("api{i}"),
        });
    }
    rs.push(RouteConfig {
        host: host_pattern_for_tests("*.corp.test"),
        path: "/".into(),
        cluster: "wild".into(),
    });
    let names: Vec<String> = rs.iter().map(|r| r.cluster.clone()).collect();
    let n = names.len();
    let router = Router::new(&rs, |c| {
        names
            .iter()
            .position(|x| x == c)
            .map(|i| (i, keyway_proxy::config::PathCase::Sensitive))
    });
    (router, n)
}

fn bench(c: &mut Criterion) {
    let (router, _) = routes();
    c.bench_function("router: exact host, api prefix (21 routes)", |b| {
        b.iter(|| {
            router.route(
                black_box("app7.corp.test"),
                black_box("/PasswordVault/api/Accounts/12/Password/Retrieve"),
            )
        })
    });
    c.bench_function("router: wildcard fallthrough (21 routes)", |b| {
        b.iter(|| router.route(black_box("psm.corp.test"), black_box("/")))
    });

    let backends: Vec<B> = (0..8)
        .map(|i| B {
            weight: 1 + i % 3,
            in_flight: i * 2 % 5,
        })
        .collect();
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    for (name, kind) in [
        ("round-robin", Balance::RoundRobin),
        ("least-requests", Balance::LeastRequests),
        ("p2c", Balance::P2c),
        ("random", Balance::Random),
    ] {
        let bal = Balancer::new(kind, &weights);
        c.bench_function(&format!("balance: {name} over 8 backends"), |b| {
            b.iter(|| bal.pick(black_box(&backends), |i| i != 3))
        });
    }

    let mut base = HeaderMap::new();
    base.insert("host", HeaderValue::from_static("pvwa.corp.test"));
    base.insert(
        "user-agent",
        HeaderValue::from_static("Mozilla/5.0 (X11; Linux x86_64)"),
    );
    base.insert("accept", HeaderValue::from_static("application/json"));
    base.insert(
        "cookie",
        HeaderValue::from_static("CA66666=abc; keyway_affinity=0123456789abcdef; x=1"),
    );
    base.insert("connection", HeaderValue::from_static("keep-alive"));
    let host = HeaderValue::from_static("pvwa.corp.test");
    let ip = "10.1.2.3".parse().expect("ip");
    c.bench_function("headers: strip hop-by-hop + add forwarded", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h, false);
                let who = headers::Identity {
                    client: ip,
                    tls: true,
                    trusted: false,
                    rfc7239: false,
                };
                headers::add_forwarded(&mut h, who, &host, "1.1 keyway");
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("headers: sticky cookie lookup", |b| {
        b.iter(|| headers::cookie(black_box(&base), "keyway_affinity"))
    });

    // The front door on a request that is already normal (the common case) and on one
    // it must rewrite (dot segment, escapes).
    let door = keyway_proxy::config::FrontDoorConfig::default();
    let peer = "10.1.2.3".parse().expect("ip");
    for (name, path) in [
        (
            "normal path",
            "/PasswordVault/api/Accounts/12/Password/Retrieve",
        ),
        (
            "rewritten path",
            "/PasswordVault/api/./Accounts/%31%32/Password/Retrieve",
        ),
    ] {
        let request = || {
            let mut req = http::Request::get(path).body(()).expect("request");
            *req.headers_mut() = base.clone();
            req
        };
        c.bench_function(&format!("front door: {name}"), |b| {
            b.iter_batched(
                request,
                |mut r| keyway_proxy::frontdoor::admit(&mut r, &door, peer).map(|_| r),
                criterion::BatchSize::SmallInput,
            )
        });
    }
}

/// What a write costs for the no-split-brain rules: the permit check (a clock read) and
/// counting it in its cluster's write gate (two atomic operations).
fn write_accounting(c: &mut Criterion) {
    let permit = keyway_proxy::permit::Permit::coordinated();
    permit.extend(
        std::time::Instant::now() + std::time::Duration::from_secs(3600),
        keyway_proxy::permit::Grant::Etcd,
    );
    c.bench_function("write: permit check (coordinated)", |b| {
        b.iter(|| std::hint::black_box(&permit).holds())
    });
    let gate = std::sync::Arc::new(keyway_proxy::permit::WriteGate::default());
    c.bench_function("write: count in the write gate and release", |b| {
        b.iter(|| drop(std::hint::black_box(&gate).enter()))
    });
}

criterion_group!(benches, bench, write_accounting);
criterion_main!(benches);
