//! Operating keyway: `/metrics` counters move, `/status` and `/healthz` answer, graceful
//! drain finishes in-flight requests, idle client connections are closed.

use std::time::Duration;

use keyway_tests::*;
use tokio::io::AsyncReadExt;

fn config(backend: &TestBackend, extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[proxy]
drain_timeout = "5s"
{extra}
[[listener]]
listen = "127.0.0.1:0"
idle_timeout = "300ms"
[[route]]
cluster = "ops-{port}"
[cluster.ops-{port}]
retries = 1
backends = [{{ id = "up", address = "{addr}" }}, {{ id = "down", address = "{dead}" }}]
"#,
        port = backend.addr.port(),
        addr = backend.addr,
        dead = "127.0.0.1:1",
    )
}

#[tokio::test]
async fn metrics_status_and_healthz() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&config(&a, "")).await;
    let admin = proxy.admin.unwrap();
    let cluster = format!("ops-{}", a.addr.port());

    assert_eq!(admin_get(admin, "/healthz").await, "ok\n");
    let before = admin_get(admin, "/metrics").await;
    for _ in 0..10 {
        assert_eq!(get(proxy.addr, "h", "/").await.status, 200);
    }
    let after = admin_get(admin, "/metrics").await;
    let key = format!(
        "keyway_upstream_responses_total{{cluster=\"{cluster}\",backend=\"up\",class=\"2xx\"}}"
    );
    assert_eq!(
        metric(&after, &key) - metric(&before, &key),
        10.0,
        "{after}"
    );
    let req_key = format!("keyway_requests_total{{cluster=\"{cluster}\"}}");
    assert_eq!(metric(&after, &req_key), 10.0);
    // Round-robin sends some requests to the dead backend first: connect errors and
    // retries are counted.
    let ce =
        format!("keyway_upstream_connect_errors_total{{cluster=\"{cluster}\",backend=\"down\"}}");
    assert!(metric(&after, &ce) >= 1.0, "{after}");
    let rt = format!("keyway_retries_total{{cluster=\"{cluster}\"}}");
    assert_eq!(
        metric(&after, &rt),
        metric(&after, &ce),
        "each connect error was retried once, on `up`: {after}"
    );
    let count = format!("keyway_request_duration_seconds_count{{cluster=\"{cluster}\"}}");
    assert_eq!(
        metric(&after, &count),
        10.0,
        "one latency per request: {after}"
    );
    let within_a_minute =
        format!("keyway_request_duration_seconds_bucket{{cluster=\"{cluster}\",le=\"60\"}}");
    assert_eq!(metric(&after, &within_a_minute), 10.0, "{after}");

    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    let c = &status["clusters"][0];
    assert_eq!(c["name"], cluster);
    assert_eq!(c["backends"][0]["id"], "up");
    assert_eq!(c["backends"][0]["requests"], 10);
    assert!(c["backends"][1]["last_error"]["message"]
        .as_str()
        .unwrap()
        .contains("down"));
}

#[tokio::test]
async fn graceful_drain_finishes_in_flight_requests() {
    let a = TestBackend::start("a").await;
    a.set_mode(Mode::Delay(Duration::from_millis(800)));
    let proxy = Proxy::start(&config(&a, "")).await;
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { get(addr, "h", "/slow").await });
    // Wait until the backend has the request: then it is truly in flight.
    while a.hits() == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = tokio::spawn(proxy.shutdown());
    let r = in_flight.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the in-flight request completes during drain"
    );
    assert!(drained.await.unwrap(), "drain finished before its timeout");
    // After shutdown, the listener no longer accepts.
    assert!(try_send(addr, request("GET", "h", "/", "")).await.is_err());
}

#[tokio::test]
async fn idle_client_connections_are_closed() {
    let a = TestBackend::start("a").await;
    let proxy = Proxy::start(&config(&a, "")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // idle_timeout is 300 ms; the server must close well within 5 s.
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("idle connection closed by keyway")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// With `[admin] token_file`, reload, promote and failback need `Authorization: Bearer
/// TOKEN` (401 otherwise, nothing done); reads stay open for scrapers; a reload rotates
/// the token.
#[tokio::test]
async fn admin_calls_that_change_things_need_the_token() {
    let a = TestBackend::start("a").await;
    let (p, r) = (TestBackend::start("p").await, TestBackend::start("r").await);
    let dir = unique_dir("admin-token");
    std::fs::write(dir.join("token"), "first-token-0123456789\n").unwrap();
    let file = dir.join("k.toml");
    // A primary-replica cluster to promote and fail back, without health checks so a
    // promotion needs nothing but the token.
    let cfg = config(&a, "").replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"",
        1,
    ) + &format!(
        r#"[[route]]
host = "pam.test"
cluster = "pam"
[cluster.pam]
strategy = "primary-replica"
backends = [{{ id = "p", address = "{}", role = "primary" }}, {{ id = "r", address = "{}" }}]
"#,
        p.addr, r.addr
    );
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    let post = |path: &str, token: Option<&str>| {
        let mut r = request("POST", "admin", path, "");
        if let Some(t) = token {
            r.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        send(admin, r)
    };
    let ops_backends = || async {
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
        status["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str().unwrap().starts_with("ops-"))
            .unwrap()["backends"]
            .as_array()
            .unwrap()
            .len()
    };
    let pam = || async {
        let d = decision(admin, "pam").await;
        (d.epoch, d.primary.unwrap_or_default())
    };

    // A changed config on disk: a refused reload must not load it.
    let more = cfg.replacen(
        "{ id = \"down\", address = \"127.0.0.1:1\" }",
        "{ id = \"down\", address = \"127.0.0.1:1\" }, { id = \"later\", address = \"127.0.0.1:2\" }",
        1,
    );
    assert_ne!(more, cfg);
    std::fs::write(&file, &more).unwrap();
    let r = post("/reload", None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        r.headers["www-authenticate"],
        "Bearer realm=\"keyway-admin\""
    );
    assert!(r.body.contains("token_file"), "{}", r.body);
    assert_eq!(
        post("/reload", Some("first-token-0123456788")).await.status,
        401
    );
    assert_eq!(post("/reload", Some("first")).await.status, 401);
    assert_eq!(
        ops_backends().await,
        2,
        "a refused reload loaded the new config"
    );
    // Refused promotions and failbacks change no topology.
    assert_eq!(post("/clusters/pam/promote/r", None).await.status, 401);
    assert_eq!(
        post("/clusters/pam/promote/r", Some("wrong-token-0123456789"))
            .await
            .status,
        401
    );
    assert_eq!(
        pam().await,
        (0, "p".to_string()),
        "a refused promotion acted"
    );
    assert_eq!(
        get(admin, "admin", "/status").await.status,
        200,
        "reads need no token"
    );

    // With the token each call acts.
    let r = post("/reload", Some("first-token-0123456789")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ops_backends().await, 3);
    let r = post("/clusters/pam/promote/r", Some("first-token-0123456789")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let promoted = pam().await;
    assert_eq!(promoted.1, "r");
    assert_eq!(post("/clusters/pam/failback", None).await.status, 401);
    assert_eq!(pam().await, promoted, "a refused failback acted");
    let r = post("/clusters/pam/failback", Some("first-token-0123456789")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(pam().await.1, "p");
    // Every refusal was counted (no other test of this binary is refused).
    assert_eq!(
        metric(
            &admin_get(admin, "/metrics").await,
            "keyway_admin_denied_total"
        ),
        6.0
    );

    // A reload picks up a new token; the old one stops working.
    std::fs::write(dir.join("token"), "second-token-0123456789\n").unwrap();
    assert_eq!(
        post("/reload", Some("first-token-0123456789")).await.status,
        200
    );
    assert_eq!(
        post("/reload", Some("first-token-0123456789")).await.status,
        401
    );
    assert_eq!(
        post("/reload", Some("second-token-0123456789"))
            .await
            .status,
        200
    );
}
