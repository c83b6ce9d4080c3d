//! Drain (maintenance mode): a drained backend takes no new sessions while the sessions
//! pinned to it keep it until the drain's deadline; the primary is never drained; a
//! drain is kept like the other decisions (reload, restart) and shows in `/status` and
//! `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use keyway_tests::*;

fn sticky_farm(b: &[TestBackend]) -> String {
    let list: Vec<String> = b
        .iter()
        .map(|x| format!(r#"{{ id = "{}", address = "{}" }}"#, x.name(), x.addr))
        .collect();
    one_cluster(
        "farm",
        &format!(
            "balance = \"round-robin\"\nsticky = {{ cookie = \"kw\", max_age = \"1h\" }}\nbackends = [{}]",
            list.join(", ")
        ),
    )
}

async fn farm() -> Vec<TestBackend> {
    vec![
        TestBackend::start("x0").await,
        TestBackend::start("x1").await,
        TestBackend::start("x2").await,
    ]
}

/// POSTs an admin call and returns the answer.
async fn post(admin: SocketAddr, path: &str) -> Got {
    send(admin, request("POST", "admin", path, "")).await
}

/// A cookie pinning to a backend, and that backend's name.
async fn pin(addr: SocketAddr) -> (String, String) {
    let first = get(addr, "h", "/").await;
    let cookie = first.headers["set-cookie"].to_str().unwrap();
    (
        cookie.split(';').next().unwrap().to_string(),
        first.backend(),
    )
}

async fn with_cookie(addr: SocketAddr, cookie: &str) -> Got {
    let mut req = request("GET", "h", "/", "");
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    send(addr, req).await
}

#[tokio::test]
async fn a_drained_backend_keeps_its_sticky_sessions_and_takes_no_new_ones() {
    let b = farm().await;
    let proxy = Proxy::start(&sticky_farm(&b)).await;
    let admin = proxy.admin.unwrap();
    let (cookie, pinned) = pin(proxy.addr).await;

    let mut req = request(
        "POST",
        "admin",
        &format!("/clusters/farm/backends/{pinned}/drain"),
        "",
    );
    req.headers_mut()
        .insert("keyway-operator", "alice".parse().unwrap());
    let r = send(admin, req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["changed"], true);

    for _ in 0..30 {
        let r = get(proxy.addr, "h", "/").await;
        assert_eq!(r.status, 200);
        assert_ne!(
            r.backend(),
            pinned,
            "a cookieless request reached the drained backend"
        );
    }
    for _ in 0..10 {
        let r = with_cookie(proxy.addr, &cookie).await;
        assert_eq!(r.backend(), pinned, "the pinned session was moved");
        assert!(!r.headers.contains_key("set-cookie"));
    }

    let s = backend_status(admin, "farm", &pinned).await;
    let d = &s["drain"];
    assert!(
        d["by"]
            .as_str()
            .unwrap()
            .starts_with("alice from 127.0.0.1"),
        "{d}"
    );
    assert!(d["since_unix_ms"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(d["holding_clients"], 1, "{d}");
    assert_eq!(d["expired"], false, "{d}");
    let page = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(
            &page,
            &format!("keyway_backend_drained{{cluster=\"farm\",backend=\"{pinned}\"}}")
        ),
        1.0
    );

    // Idempotent, then undrained: it takes new sessions again.
    let again = post(admin, &format!("/clusters/farm/backends/{pinned}/drain")).await;
    assert_eq!(
        (again.status.as_u16(), again.json()["changed"].clone()),
        (200, false.into())
    );
    let r = post(admin, &format!("/clusters/farm/backends/{pinned}/undrain")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut seen = false;
    for _ in 0..6 {
        seen |= get(proxy.addr, "h", "/").await.backend() == pinned;
    }
    assert!(seen, "the undrained backend takes new sessions");
    assert!(backend_status(admin, "farm", &pinned).await["drain"].is_null());
}

#[tokio::test]
async fn a_drain_deadline_releases_the_pinned_sessions() {
    let b = farm().await;
    let proxy = Proxy::start(&sticky_farm(&b)).await;
    let admin = proxy.admin.unwrap();
    let (cookie, pinned) = pin(proxy.addr).await;
    let r = post(
        admin,
        &format!("/clusters/farm/backends/{pinned}/drain?deadline=700ms"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["drain"]["deadline_unix_ms"].as_u64().is_some());
    assert_eq!(with_cookie(proxy.addr, &cookie).await.backend(), pinned);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let moved = with_cookie(proxy.addr, &cookie).await;
    assert_eq!(moved.status, 200);
    assert_ne!(
        moved.backend(),
        pinned,
        "the deadline passed: the session moves"
    );
    assert!(
        moved.headers["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("kw="),
        "and is pinned anew"
    );
    assert_eq!(
        backend_status(admin, "farm", &pinned).await["drain"]["expired"],
        true
    );
    let bad = post(
        admin,
        &format!("/clusters/farm/backends/{pinned}/drain?deadline=soon"),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[tokio::test]
async fn the_primary_is_not_drained_and_a_drained_replica_is_not_promoted() {
    let (p, r1, r2) = (
        TestBackend::start("primary").await,
        TestBackend::start("r1").await,
        TestBackend::start("r2").await,
    );
    let proxy = Proxy::start(&one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica" }},
  {{ id = "r2", address = "{}", role = "replica" }},
]"#,
            p.addr, r1.addr, r2.addr
        ),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let r = post(admin, "/clusters/pam/backends/primary/drain").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body.contains("promote another backend first"),
        "{}",
        r.body
    );

    let r = post(admin, "/clusters/nope/backends/r1/drain").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("pam"), "lists the clusters: {}", r.body);
    let r = post(admin, "/clusters/pam/backends/r9/drain").await;
    assert_eq!(r.status, 404);
    assert!(
        r.body.contains("primary, r1, r2"),
        "lists the backends: {}",
        r.body
    );

    assert_eq!(
        post(admin, "/clusters/pam/backends/r1/drain").await.status,
        200
    );
    for _ in 0..10 {
        assert_eq!(
            get(proxy.addr, "h", "/").await.backend(),
            "r2",
            "reads avoid r1"
        );
    }
    let r = post(admin, "/clusters/pam/promote/r1").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("undrain it first"), "{}", r.body);
    // The last replica is drained too: reads fall back to the primary, and the primary
    // is the one backend left, so nothing more may be drained.
    assert_eq!(
        post(admin, "/clusters/pam/backends/r2/drain").await.status,
        200
    );
    assert_eq!(get(proxy.addr, "h", "/").await.backend(), "primary");
}

#[tokio::test]
async fn a_drain_survives_a_reload_and_a_restart() {
    let b = farm().await;
    let dir = unique_dir("drain-restart");
    let file = dir.join("keyway.toml");
    let cfg = sticky_farm(&b);
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(
        post(admin, "/clusters/farm/backends/x1/drain").await.status,
        200
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("keyway-state.json")).unwrap()).unwrap();
    assert!(
        state["drains"]["farm"]["x1"]["unix_ms"].as_u64().is_some(),
        "{state}"
    );

    let r = post(admin, "/reload").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!backend_status(admin, "farm", "x1").await["drain"].is_null());
    for _ in 0..9 {
        assert_ne!(
            get(proxy.addr, "h", "/").await.backend(),
            "x1",
            "after a reload"
        );
    }

    assert!(proxy.shutdown().await);
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    assert!(!backend_status(admin, "farm", "x1").await["drain"].is_null());
    for _ in 0..9 {
        assert_ne!(
            get(proxy.addr, "h", "/").await.backend(),
            "x1",
            "after a restart"
        );
    }
    let page = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(
            &page,
            "keyway_backend_drained{cluster=\"farm\",backend=\"x1\"}"
        ),
        1.0
    );
    // Every other backend drained: the last one is refused.
    assert_eq!(
        post(admin, "/clusters/farm/backends/x0/drain").await.status,
        200
    );
    let r = post(admin, "/clusters/farm/backends/x2/drain").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body.contains("Undrain another backend first"),
        "{}",
        r.body
    );
}
