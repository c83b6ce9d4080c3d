//! Whole-config reload: build, validate, swap while traffic flows; a bad config changes
//! nothing; certificates are replaced for new connections; backend health survives.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_tests::*;

fn config(primary: &TestBackend, replicas: &[&TestBackend], extra_route: &str) -> String {
    let reps: Vec<String> = replicas
        .iter()
        .map(|r| {
            format!(
                r#"{{ id = "{}", address = "{}", role = "replica" }}"#,
                r.name(),
                r.addr
            )
        })
        .collect();
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
{extra_route}
[[route]]
cluster = "pam"
[cluster.pam]
strategy = "primary-replica"
health = {{ path = "/health", interval = "100ms" }}
backends = [{{ id = "primary", address = "{}", role = "primary" }}, {}]
"#,
        primary.addr,
        reps.join(", ")
    )
}

async fn reload(p: &Proxy) -> Got {
    send(p.admin.unwrap(), request("POST", "admin", "/reload", "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request() {
    let primary = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let r2 = TestBackend::start("r2").await;
    let file = unique_dir("reload").join("keyway.toml");
    let p = Proxy::start_file(&file, &config(&primary, &[&r1], "")).await;
    let admin = p.admin.unwrap();
    eventually(Duration::from_secs(10), "primary healthy", || async {
        backend_status(admin, "pam", "primary").await["health"]["health"] == "healthy"
    })
    .await;

    // Mixed load on kept-alive and fresh connections while the config changes under it.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, failures, done, addr) = (stop.clone(), failures.clone(), done.clone(), p.addr);
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (m, body) = if (n + i).is_multiple_of(3) {
                    ("POST", "{}")
                } else {
                    ("GET", "")
                };
                match try_send(
                    addr,
                    request(m, "pvwa.corp.test", "/PasswordVault/api/Accounts", body),
                )
                .await
                {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        eprintln!("{m} failed: {} {}", r.status, r.body);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("{m} failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let wait_requests = |n: usize| {
        let done = done.clone();
        async move {
            let target = done.load(Ordering::Relaxed) + n;
            while done.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_requests(100).await;
    // Add r2 and a route; reload five times while requests flow.
    for round in 0..5 {
        let replicas: Vec<&TestBackend> = if round % 2 == 0 {
            vec![&r1, &r2]
        } else {
            vec![&r1]
        };
        std::fs::write(&file, config(&primary, &replicas, "")).unwrap();
        let r = reload(&p).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.starts_with("reloaded:"), "{}", r.body);
        wait_requests(50).await;
    }
    std::fs::write(&file, config(&primary, &[&r1, &r2], "")).unwrap();
    assert_eq!(reload(&p).await.status, 200);
    let before = r2.hits();
    wait_requests(100).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let total = done.load(Ordering::Relaxed);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "{total} requests, some failed across reloads"
    );
    assert!(
        r2.hits() > before,
        "the backend added by the reload takes reads"
    );
    assert!(total >= 300);
    let m = admin_get(admin, "/metrics").await;
    assert!(metric(&m, r#"keyway_config_reloads_total{result="ok"}"#) >= 6.0);
}

#[tokio::test]
async fn a_bad_config_is_refused_and_the_running_one_stays() {
    let primary = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let file = unique_dir("reload-bad").join("keyway.toml");
    let p = Proxy::start_file(&file, &config(&primary, &[&r1], "")).await;
    eventually(Duration::from_secs(10), "r1 serves", || async {
        get(p.addr, "pvwa.corp.test", "/").await.status == 200
    })
    .await;

    std::fs::write(
        &file,
        config(
            &primary,
            &[&r1],
            "[[route]]\nhost = \"x.test\"\ncluster = \"missing\"\n",
        )
        .replace("interval = \"100ms\"", "interval = \"soon\""),
    )
    .unwrap();
    let r = reload(&p).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.body.contains("cluster `missing`") && r.body.contains("`soon` is not a duration"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("keyway.toml:"),
        "errors name file and line: {}",
        r.body
    );
    assert_eq!(
        get(p.addr, "pvwa.corp.test", "/").await.status,
        200,
        "old config still serves"
    );

    // Changing a listener address needs a restart: refused with that reason.
    let text = config(&primary, &[&r1], "");
    let moved = text.replacen(
        "[[listener]]\nlisten = \"127.0.0.1:0\"",
        "[[listener]]\nlisten = \"127.0.0.2:0\"",
        1,
    );
    std::fs::write(&file, moved).unwrap();
    let r = reload(&p).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("restart keyway"), "{}", r.body);
    let m = admin_get(p.admin.unwrap(), "/metrics").await;
    assert!(metric(&m, r#"keyway_config_reloads_total{result="error"}"#) >= 2.0);
}

#[tokio::test]
async fn certificates_are_replaced_for_new_connections() {
    let pki = TestPki::new();
    let old = pki.leaf("old", &["pvwa.corp.test"]);
    let new = pki.leaf("new", &["pvwa.corp.test"]);
    let a = TestBackend::start("a").await;
    let cfg = |leaf: &Leaf| {
        format!(
            r#"
[admin]
listen = "127.0.0.1:0"
[[listener]]
listen = "127.0.0.1:0"
tls = [{{ hosts = ["pvwa.corp.test"], cert = "{}", key = "{}" }}]
[[route]]
cluster = "c"
[cluster.c]
backends = [{{ id = "a", address = "{}" }}]
"#,
            leaf.cert_pem.display(),
            leaf.key_pem.display(),
            a.addr
        )
    };
    let file = unique_dir("reload-tls").join("keyway.toml");
    let p = Proxy::start_file(&file, &cfg(&old)).await;
    let client = pki.client_config(&[b"http/1.1"]);
    let before = tls_connect(p.addr, "pvwa.corp.test", client.clone()).await;
    assert_eq!(before.peer_cert.as_ref(), Some(&old.der));

    std::fs::write(&file, cfg(&new)).unwrap();
    assert_eq!(reload(&p).await.status, 200);
    let after = tls_connect(p.addr, "pvwa.corp.test", client).await;
    assert_eq!(
        after.peer_cert.as_ref(),
        Some(&new.der),
        "new connections get the new certificate"
    );
    // The connection opened before the reload still works.
    assert_eq!(tls_get(before, "pvwa.corp.test", "/").await.status, 200);
}
