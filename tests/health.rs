//! Active health checks (rise/fall, failed-checks, tcp, initial state), passive ejection
//! and its return, the last-healthy (panic) rule, and their metrics and `/status`.

use std::time::Duration;

use keyway_tests::*;

async fn two(health: &str, extra: &str) -> (TestBackend, TestBackend, Proxy) {
    two_in("web", health, extra).await
}

/// [`two`] as cluster `name`: a test that reads the process-wide metrics needs a cluster
/// name of its own, or another test's `web` sets the same gauges meanwhile.
async fn two_in(name: &str, health: &str, extra: &str) -> (TestBackend, TestBackend, Proxy) {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let cfg = one_cluster(
        name,
        &format!(
            r#"balance = "round-robin"
{health}
{extra}
backends = [{{ id = "a", address = "{}" }}, {{ id = "b", address = "{}" }}]
"#,
            a.addr, b.addr
        ),
    );
    (a, b, Proxy::start(&cfg).await)
}

async fn state(p: &Proxy, backend: &str) -> serde_json::Value {
    state_in(p, "web", backend).await
}

async fn state_in(p: &Proxy, cluster: &str, backend: &str) -> serde_json::Value {
    backend_status(p.admin.unwrap(), cluster, backend).await["health"].clone()
}

async fn wait(p: &Proxy, backend: &str, want: &str) {
    wait_in(p, "web", backend, want).await
}

async fn wait_in(p: &Proxy, cluster: &str, backend: &str, want: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{backend} {want}"),
        || async { state_in(p, cluster, backend).await["health"] == want },
    )
    .await;
}

#[tokio::test]
async fn rise_and_fall_drive_transitions_metrics_and_status() {
    let (a, _b, p) = two_in(
        "rise-fall",
        r#"health = { path = "/health", interval = "50ms", timeout = "500ms", rise = 2, fall = 3 }"#,
        "",
    )
    .await;
    wait_in(&p, "rise-fall", "a", "healthy").await;
    a.set_health(500);
    wait_in(&p, "rise-fall", "a", "unhealthy").await;
    let s = state_in(&p, "rise-fall", "a").await;
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("3 probes failed in a row"),
        "{s}"
    );
    // fall = 3: the three latest checks all failed with status 500.
    let checks = s["last_checks"].as_array().unwrap();
    assert!(checks.len() >= 3, "{s}");
    assert!(
        checks
            .iter()
            .take(3)
            .all(|c| c["ok"] == false && c["status"] == 500),
        "{s}"
    );

    for _ in 0..6 {
        assert_eq!(
            get(p.addr, "h", "/").await.backend(),
            "b",
            "an unhealthy backend takes no traffic"
        );
    }
    a.set_health(200);
    wait_in(&p, "rise-fall", "a", "healthy").await;
    assert!(state_in(&p, "rise-fall", "a").await["reason"]
        .as_str()
        .unwrap()
        .contains("rise = 2"));

    let m = admin_get(p.admin.unwrap(), "/metrics").await;
    let to_unhealthy = r#"keyway_backend_health_transitions_total{cluster="rise-fall",backend="a",to="unhealthy"}"#;
    assert!(metric(&m, to_unhealthy) >= 1.0, "{m}");
    assert_eq!(
        metric(
            &m,
            r#"keyway_backend_healthy{cluster="rise-fall",backend="a"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn failed_checks_policy_counts_failures_in_a_window() {
    let (a, _b, p) = two(
        r#"health = { path = "/health", interval = "40ms", policy = "failed-checks", failures = 4, window = "5m" }"#,
        "",
    )
    .await;
    wait(&p, "a", "healthy").await;
    a.set_health(500);
    wait(&p, "a", "unhealthy").await;
    let s = state(&p, "a").await;
    assert!(
        s["reason"]
            .as_str()
            .unwrap()
            .contains("failed checks within 5m"),
        "{s}"
    );
    // PADR semantics: failures stay counted for the window, so one pass is not enough.
    a.set_health(200);
    let from = a.health_checks();
    eventually(Duration::from_secs(10), "passing checks", || async {
        a.health_checks() >= from + 3 && state(&p, "a").await["last_checks"][0]["ok"] == true
    })
    .await;
    assert_eq!(state(&p, "a").await["health"], "unhealthy");
}

#[tokio::test]
async fn tcp_checks_and_refused_connections() {
    let (a, _b, p) = two(
        r#"health = { kind = "tcp", interval = "50ms", fall = 1 }"#,
        "",
    )
    .await;
    wait(&p, "a", "healthy").await;
    assert_eq!(a.health_checks(), 0, "a tcp check sends no HTTP request");
    a.stop();
    wait(&p, "a", "unhealthy").await;
    let _a = a.restart().await;
    wait(&p, "a", "healthy").await;
}

#[tokio::test]
async fn initial_unknown_routes_nothing_to_a_backend_that_never_passed() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    // Failing before keyway starts: its first probe fails, so it never passes.
    a.set_health(500);
    let p = Proxy::start(&one_cluster(
        "web",
        &format!(
            r#"balance = "round-robin"
health = {{ path = "/health", interval = "50ms" }}
backends = [{{ id = "a", address = "{}" }}, {{ id = "b", address = "{}" }}]
"#,
            a.addr, b.addr
        ),
    ))
    .await;
    wait(&p, "b", "healthy").await;
    for _ in 0..10 {
        let r = get(p.addr, "h", "/").await;
        assert_eq!(
            (r.status.as_u16(), r.backend()),
            (200, "b".into()),
            "{}",
            r.body
        );
    }
    assert_eq!(state(&p, "a").await["health"], "unhealthy");
    // No backend healthy: still nothing for `a`, but 503 (docs/config.md).
    b.set_health(500);
    wait(&p, "b", "unhealthy").await;
    let r = get(p.addr, "h", "/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:keyway:error:no-backend-available");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn passive_ejection_and_return_through_active_checks() {
    let (a, _b, p) = two(
        r#"health = { path = "/health", interval = "50ms", rise = 1, fall = 5 }"#,
        r#"outlier = { consecutive_failures = 3, base_ejection = "300ms", max_ejection = "5s" }"#,
    )
    .await;
    wait(&p, "a", "healthy").await;
    wait(&p, "b", "healthy").await;
    // `a` answers 502 to real requests while its health endpoint says 200: only live
    // traffic can find it out.
    a.set_mode(Mode::Status(502));
    eventually(Duration::from_secs(10), "a ejected", || async {
        let _ = get(p.addr, "h", "/").await;
        state(&p, "a").await["ejected_for_ms"].is_u64()
    })
    .await;
    let s = state(&p, "a").await;
    assert_eq!(s["ejections"], 1, "{s}");
    assert_eq!(
        s["health"], "healthy",
        "ejection is separate from active health"
    );
    let before = a.hits();
    for _ in 0..6 {
        assert_eq!(get(p.addr, "h", "/").await.backend(), "b");
    }
    assert_eq!(a.hits(), before, "an ejected backend takes no traffic");
    let m = admin_get(p.admin.unwrap(), "/metrics").await;
    assert_eq!(
        metric(
            &m,
            r#"keyway_backend_ejections_total{cluster="web",backend="a"}"#
        ),
        1.0
    );

    // Healed: after the ejection, the next passing probe returns it.
    a.set_mode(Mode::Normal);
    eventually(Duration::from_secs(10), "a returns", || async {
        get(p.addr, "h", "/").await.backend() == "a"
    })
    .await;
}

#[tokio::test]
async fn the_last_usable_backend_is_never_ejected_panic_mode() {
    // Its own cluster name: the panic gauge is process-wide, and other tests' `web`
    // clusters set it meanwhile.
    let (a, b, p) = two_in(
        "panic",
        "",
        r#"outlier = { consecutive_failures = 2, base_ejection = "1m" }"#,
    )
    .await;
    // b refuses connections: ejected (a is still usable).
    b.stop();
    eventually(Duration::from_secs(10), "b ejected", || async {
        let _ = get(p.addr, "h", "/").await;
        state_in(&p, "panic", "b").await["ejected_for_ms"].is_u64()
    })
    .await;
    // a now fails too, but it is the last usable backend: it stays, in panic mode.
    a.set_mode(Mode::Status(500));
    for _ in 0..5 {
        let r = get(p.addr, "h", "/").await;
        assert_eq!(r.status, 500, "still routed to a: {}", r.body);
    }
    let s = state_in(&p, "panic", "a").await;
    assert_eq!(s["panic"], true, "{s}");
    assert!(s["ejected_for_ms"].is_null());
    let m = admin_get(p.admin.unwrap(), "/metrics").await;
    assert_eq!(
        metric(&m, r#"keyway_panic_mode{cluster="panic",role="replica"}"#),
        1.0,
        "{m}"
    );

    a.set_mode(Mode::Normal);
    assert_eq!(get(p.addr, "h", "/").await.status, 200);
    assert_eq!(state_in(&p, "panic", "a").await["panic"], false);
}

#[tokio::test]
async fn lag_can_come_from_a_json_field() {
    let (a, _b, p) = two(
        r#"health = { path = "/health", interval = "50ms", lag_json = "lag_ms" }"#,
        "",
    )
    .await;
    a.set_lag(1234);
    eventually(Duration::from_secs(10), "lag from JSON", || async {
        state(&p, "a").await["lag_ms"] == 1234
    })
    .await;
    assert_eq!(state(&p, "a").await["last_checks"][0]["lag_ms"], 1234);
}

/// A primary and two replicas serving reads under `max_lag = "1s"`, never the primary.
/// `fall = 1000` keeps a replica healthy through failed checks, so the lag rule alone
/// decides.
async fn lag_farm() -> (TestBackend, TestBackend, TestBackend, Proxy) {
    let p = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let r2 = TestBackend::start("r2").await;
    let cfg = one_cluster(
        "lag",
        &format!(
            r#"strategy = "primary-replica"
max_lag = "1s"
reads_on_primary = "never"
health = {{ path = "/health", interval = "50ms", timeout = "500ms", rise = 1, fall = 1000, lag_header = "x-replication-lag-ms" }}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica" }},
  {{ id = "r2", address = "{}", role = "replica" }},
]"#,
            p.addr, r1.addr, r2.addr
        ),
    );
    let proxy = Proxy::start(&cfg).await;
    (p, r1, r2, proxy)
}

async fn lag_state(p: &Proxy, id: &str) -> serde_json::Value {
    backend_status(p.admin.unwrap(), "lag", id).await["health"].clone()
}

#[tokio::test]
async fn a_replica_of_unknown_lag_leaves_the_read_set_under_max_lag() {
    let (_p, r1, r2, proxy) = lag_farm().await;
    eventually(
        Duration::from_secs(10),
        "replicas healthy, lag 0",
        || async {
            for id in ["r1", "r2"] {
                let s = lag_state(&proxy, id).await;
                if s["health"] != "healthy" || s["lag_ms"] != 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;

    // A passing check that stops reporting lag: unknown, so no reads for r1.
    r1.set_lag(NO_LAG);
    eventually(Duration::from_secs(10), "r1's lag unknown", || async {
        lag_state(&proxy, "r1").await["lag_ms"].is_null()
    })
    .await;
    for _ in 0..10 {
        let r = get(proxy.addr, "h", "/x").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.backend(), "r2", "r1 reported no lag");
    }
    assert_eq!(lag_state(&proxy, "r1").await["health"], "healthy");

    // A failed check carries no lag either: r2 stays healthy (fall = 1000) but its lag
    // is unknown now, and no replica is left for reads.
    r2.set_health(500);
    eventually(Duration::from_secs(10), "r2's lag unknown", || async {
        let s = lag_state(&proxy, "r2").await;
        s["lag_ms"].is_null() && s["last_checks"][0]["ok"] == false
    })
    .await;
    assert_eq!(lag_state(&proxy, "r2").await["health"], "healthy");
    let r = get(proxy.addr, "h", "/x").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body.contains("`r1` reported no lag") && r.body.contains("`r2` reported no lag"),
        "the 503 names the replicas of unknown lag: {}",
        r.body
    );

    // Lag reported again: back in the read set.
    r1.set_lag(10);
    eventually(Duration::from_secs(10), "r1 serves reads again", || async {
        let r = get(proxy.addr, "h", "/x").await;
        r.status == 200 && r.backend() == "r1"
    })
    .await;
}

#[test]
fn max_lag_without_a_lag_source_is_a_config_error_with_a_fix() {
    let text = one_cluster(
        "pam",
        r#"strategy = "primary-replica"
max_lag = "1s"
health = { path = "/health" }
backends = [{ id = "p", address = "127.0.0.1:1", role = "primary" }, { id = "r", address = "127.0.0.1:2" }]"#,
    );
    let Err(err) = keyway::Config::from_str_with_base(&text, "t.toml", std::path::Path::new("."))
    else {
        panic!("max_lag without a lag source was accepted");
    };
    let err = err.to_string();
    assert!(
        err.contains("max_lag") && err.contains("no health check reports replication lag"),
        "{err}"
    );
    assert!(err.contains("lag_header"), "the fix: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_path_never_waits_for_a_health_policy() {
    // A health policy that runs to its 500 ms deadline on every check (fail-open keeps
    // the backend healthy), and a backend whose every answer is a 500: each request's
    // failure reaches the passive-ejection path, which takes the health lock.
    let a = TestBackend::start("a").await;
    a.set_mode(Mode::Status(500));
    let cfg = one_cluster(
        "slowpolicy",
        &format!(
            r#"health = {{ path = "/health", interval = "10ms", timeout = "500ms", policy = "{}", config = {{ mode = "spin" }}, on_error = "fail-open" }}
outlier = {{ consecutive_failures = 1 }}
retries = 0
backends = [{{ id = "a", address = "{}" }}]"#,
            plugin("misbehave-health").display(),
            a.addr
        ),
    );
    let p = Proxy::start(&cfg).await;
    let admin = p.admin.unwrap();
    eventually(Duration::from_secs(10), "judged by the policy", || async {
        let s = backend_status(admin, "slowpolicy", "a").await["health"].clone();
        s["health"] == "healthy" && s["reason"].as_str().unwrap_or("").contains("fail-open")
    })
    .await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(get(p.addr, "h", "/x").await.status, 500);
    }
    let took = started.elapsed();
    eprintln!("20 requests beside a 500 ms health policy took {took:?}");
    // With the lock held through each 500 ms evaluation, the requests wait for it.
    assert!(
        took < Duration::from_millis(2500),
        "20 requests took {took:?}: the request path waited for the health policy"
    );
}
