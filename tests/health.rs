//! Active health checks (rise/fall, failed-checks, tcp, initial state), passive ejection
//! and its return, the last-healthy (panic) rule, and their metrics and `/status`.

use std::time::Duration;

use keyway_tests::*;

async fn two(health: &str, extra: &str) -> (TestBackend, TestBackend, Proxy) {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let cfg = one_cluster(
        "web",
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
    backend_status(p.admin.unwrap(), "web", backend).await["health"].clone()
}

async fn wait(p: &Proxy, backend: &str, want: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{backend} {want}"),
        || async { state(p, backend).await["health"] == want },
    )
    .await;
}

#[tokio::test]
async fn rise_and_fall_drive_transitions_metrics_and_status() {
    let (a, _b, p) = two(
        r#"health = { path = "/health", interval = "50ms", timeout = "500ms", rise = 2, fall = 3 }"#,
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
    wait(&p, "a", "healthy").await;
    assert!(state(&p, "a").await["reason"]
        .as_str()
        .unwrap()
        .contains("rise = 2"));

    let m = admin_get(p.admin.unwrap(), "/metrics").await;
    let to_unhealthy =
        r#"keyway_backend_health_transitions_total{cluster="web",backend="a",to="unhealthy"}"#;
    assert!(metric(&m, to_unhealthy) >= 1.0, "{m}");
    assert_eq!(
        metric(&m, r#"keyway_backend_healthy{cluster="web",backend="a"}"#),
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
    let (a, b, p) = two(
        "",
        r#"outlier = { consecutive_failures = 2, base_ejection = "1m" }"#,
    )
    .await;
    // b refuses connections: ejected (a is still usable).
    b.stop();
    eventually(Duration::from_secs(10), "b ejected", || async {
        let _ = get(p.addr, "h", "/").await;
        state(&p, "b").await["ejected_for_ms"].is_u64()
    })
    .await;
    // a now fails too, but it is the last usable backend: it stays, in panic mode.
    a.set_mode(Mode::Status(500));
    for _ in 0..5 {
        let r = get(p.addr, "h", "/").await;
        assert_eq!(r.status, 500, "still routed to a: {}", r.body);
    }
    let s = state(&p, "a").await;
    assert_eq!(s["panic"], true, "{s}");
    assert!(s["ejected_for_ms"].is_null());
    let m = admin_get(p.admin.unwrap(), "/metrics").await;
    assert_eq!(
        metric(&m, r#"keyway_panic_mode{cluster="web",role="replica"}"#),
        1.0,
        "{m}"
    );

    a.set_mode(Mode::Normal);
    assert_eq!(get(p.addr, "h", "/").await.status, 200);
    assert_eq!(state(&p, "a").await["panic"], false);
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
