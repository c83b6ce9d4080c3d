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

/// One HTTP/1.1 connection kept alive across requests.
struct KeptAlive {
    tx: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    /// Requests answered on it.
    sent: usize,
}

impl KeptAlive {
    async fn open(addr: std::net::SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        Self { tx, sent: 0 }
    }

    async fn send(
        &mut self,
        req: http::Request<http_body_util::Full<bytes::Bytes>>,
    ) -> anyhow::Result<Got> {
        self.tx.ready().await?;
        let got = read(self.tx.send_request(req).await?).await?;
        self.sent += 1;
        Ok(got)
    }
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

    // Mixed load while the config changes under it: two clients open a connection per
    // request, two keep one connection alive throughout (a reload must not close it).
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for i in 0..4u64 {
        let (stop, failures, done, addr) = (stop.clone(), failures.clone(), done.clone(), p.addr);
        load.push(tokio::spawn(async move {
            let keep_alive = i % 2 == 1;
            let mut conn = if keep_alive {
                Some(KeptAlive::open(addr).await)
            } else {
                None
            };
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (m, body) = if (n + i).is_multiple_of(3) {
                    ("POST", "{}")
                } else {
                    ("GET", "")
                };
                let req = request(m, "pvwa.corp.test", "/PasswordVault/api/Accounts", body);
                let got = match &mut conn {
                    Some(c) => c.send(req).await,
                    None => try_send(addr, req).await,
                };
                match got {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        eprintln!("{m} failed: {} {}", r.status, r.body);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("{m} failed (kept alive: {keep_alive}): {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Some(c) = &mut conn {
                            *c = KeptAlive::open(addr).await;
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            conn.map_or(0, |c| c.sent)
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
    // Add and remove r2: reload five times while requests flow.
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
    let mut on_kept_alive = 0;
    for t in load {
        on_kept_alive += t.await.unwrap();
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
    assert!(
        on_kept_alive >= 100,
        "{on_kept_alive} requests on the kept-alive connections"
    );
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
