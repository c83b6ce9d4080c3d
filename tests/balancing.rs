//! Balanced clusters: each balance mode's distribution, weights, sticky pin and re-pin,
//! and retries across backends.

use std::collections::HashMap;
use std::time::Duration;

use keyway_tests::*;

fn cluster_config(balance: &str, extra: &str, backends: &[(&TestBackend, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(b, w)| {
            format!(
                r#"{{ id = "{}", address = "{}", weight = {w} }}"#,
                name_of(b),
                b.addr
            )
        })
        .collect();
    format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
host = "*"
cluster = "farm"
[cluster.farm]
balance = "{balance}"
{extra}
backends = [{}]
"#,
        list.join(", ")
    )
}

fn name_of(b: &TestBackend) -> String {
    format!("b{}", b.addr.port())
}

async fn distribution(proxy: &Proxy, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = get(proxy.addr, "pvwa.corp.test", "/").await;
        assert_eq!(r.status, 200, "{}", r.body);
        *counts.entry(r.backend()).or_default() += 1;
    }
    counts
}

async fn backends(n: usize) -> Vec<TestBackend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestBackend::start(&format!("x{i}")).await);
    }
    v
}

#[tokio::test]
async fn round_robin_honours_weights_exactly() {
    let b = backends(2).await;
    let proxy = Proxy::start(&cluster_config(
        "round-robin",
        "",
        &[(&b[0], 3), (&b[1], 1)],
    ))
    .await;
    let c = distribution(&proxy, 200).await;
    assert_eq!(c["x0"], 150, "{c:?}");
    assert_eq!(c["x1"], 50, "{c:?}");
}

#[tokio::test]
async fn random_follows_weights() {
    let b = backends(2).await;
    let proxy = Proxy::start(&cluster_config("random", "", &[(&b[0], 1), (&b[1], 4)])).await;
    let c = distribution(&proxy, 400).await;
    let heavy = c.get("x1").copied().unwrap_or(0);
    // Expected 320; binomial sd ≈ 8, so 260..380 is far beyond noise.
    assert!((260..=380).contains(&heavy), "{c:?}");
}

#[tokio::test]
async fn p2c_uses_every_backend_when_idle() {
    let b = backends(3).await;
    let proxy = Proxy::start(&cluster_config(
        "p2c",
        "",
        &[(&b[0], 1), (&b[1], 1), (&b[2], 1)],
    ))
    .await;
    let c = distribution(&proxy, 300).await;
    assert_eq!(c.len(), 3, "{c:?}");
    assert!(c.values().all(|&n| n > 40), "{c:?}");
}

/// With one backend slow, load-aware modes send concurrent traffic to the fast one.
async fn load_aware_prefers_fast(balance: &str) {
    let b = backends(2).await;
    b[0].set_mode(Mode::Delay(Duration::from_millis(300)));
    let proxy = Proxy::start(&cluster_config(balance, "", &[(&b[0], 1), (&b[1], 1)])).await;
    // Pin a few requests on the slow backend, then send a burst while they are in flight.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(
            async move { get(addr, "h", "/").await.backend() },
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        *c.entry(t.await.unwrap()).or_default() += 1;
    }
    let slow = c.get("x0").copied().unwrap_or(0);
    assert!(
        slow <= 10,
        "{balance}: slow backend got {slow} of 40: {c:?}"
    );
}

#[tokio::test]
async fn least_requests_avoids_the_busy_backend() {
    load_aware_prefers_fast("least-requests").await;
}

#[tokio::test]
async fn p2c_avoids_the_busy_backend() {
    load_aware_prefers_fast("p2c").await;
}

#[tokio::test]
async fn sticky_pins_and_repins_without_a_502() {
    let b = backends(3).await;
    let proxy = Proxy::start(&cluster_config(
        "round-robin",
        r#"sticky = { cookie = "kw", max_age = "1h" }"#,
        &[(&b[0], 1), (&b[1], 1), (&b[2], 1)],
    ))
    .await;
    let first = get(proxy.addr, "h", "/").await;
    let cookie = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("kw=") && cookie.contains("Max-Age=3600") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let pinned = first.backend();

    for _ in 0..20 {
        let mut req = request("GET", "h", "/", "");
        req.headers_mut().insert("cookie", pair.parse().unwrap());
        let r = send(proxy.addr, req).await;
        assert_eq!(r.backend(), pinned);
        assert!(
            !r.headers.contains_key("set-cookie"),
            "a pinned request is not re-pinned"
        );
    }

    // The pinned backend dies: the client is served elsewhere and re-pinned.
    let dead = b.iter().find(|x| x.name() == pinned).unwrap();
    dead.stop();
    let mut req = request("GET", "h", "/", "");
    req.headers_mut().insert("cookie", pair.parse().unwrap());
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(r.backend(), pinned);
    let repin = r.headers["set-cookie"].to_str().unwrap();
    assert!(
        repin.starts_with("kw=") && !repin.starts_with(&pair),
        "{repin}"
    );

    // A forged or stale cookie value is simply ignored.
    let mut req = request("GET", "h", "/", "");
    req.headers_mut()
        .insert("cookie", "kw=not-a-backend".parse().unwrap());
    let r = send(proxy.addr, req).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("set-cookie"));
}

#[tokio::test]
async fn connect_failures_are_retried_for_any_method() {
    let good = TestBackend::start("good").await;
    let dead = refused_addr().await;
    let cfg = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "farm"
[cluster.farm]
balance = "round-robin"
retries = 1
backends = [{{ id = "dead", address = "{dead}" }}, {{ id = "good", address = "{}" }}]
"#,
        good.addr
    );
    let proxy = Proxy::start(&cfg).await;
    for i in 0..10 {
        let r = send(
            proxy.addr,
            request("POST", "h", "/api/Accounts", &format!("body {i}")),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.backend(), "good");
    }
    // Each POST reached the good backend exactly once.
    assert_eq!(
        good.seen().iter().filter(|s| s.method == "POST").count(),
        10
    );
}

#[tokio::test]
async fn a_post_that_reached_a_backend_is_never_resent_but_a_get_is_retried_once() {
    let dropping = DroppingBackend::start().await;
    let good = TestBackend::start("good").await;
    let cfg = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "farm"
[cluster.farm]
strategy = "ordered"
retries = 2
backends = [{{ id = "drops", address = "{}", priority = 0 }}, {{ id = "good", address = "{}", priority = 1 }}]
"#,
        dropping.addr, good.addr
    );
    let proxy = Proxy::start(&cfg).await;

    let r = send(
        proxy.addr,
        request("POST", "h", "/PasswordVault/api/Accounts", "x"),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.json()["cluster"], "farm");
    assert_eq!(dropping.requests(), 1);
    assert_eq!(good.hits(), 0, "the POST must not be re-sent");

    let r = get(proxy.addr, "h", "/PasswordVault/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.backend(), "good");
    assert_eq!(dropping.requests(), 2);
}

#[tokio::test]
async fn all_backends_down_is_a_problem_json_answer() {
    let a = refused_addr().await;
    let b = refused_addr().await;
    let cfg = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "vault"
[cluster.vault]
backends = [{{ id = "a", address = "{a}" }}, {{ id = "b", address = "{b}" }}]
"#
    );
    let proxy = Proxy::start(&cfg).await;
    // Connection failures to every backend: exactly 503 no-backend-available with
    // Retry-After (docs/config.md, error table; docs/architecture.md).
    let r = get(proxy.addr, "h", "/").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let j = r.json();
    assert_eq!(j["cluster"], "vault");
    assert_eq!(j["status"], 503);
    assert_eq!(j["type"], "urn:keyway:error:no-backend-available", "{j}");
}
