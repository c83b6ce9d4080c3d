//! primary-replica clusters: the read/write split, 503 for writes without a healthy
//! primary, lag, read-your-writes, sticky with roles, and the write invariant under
//! randomized failure schedules.

use std::time::Duration;

use keyway_tests::*;

struct Farm {
    primary: TestBackend,
    r1: TestBackend,
    r2: TestBackend,
    proxy: Proxy,
}

async fn farm(extra: &str) -> Farm {
    let primary = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let r2 = TestBackend::start("r2").await;
    let cfg = one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
balance = "round-robin"
health = {{ path = "/health", interval = "50ms", timeout = "500ms", rise = 1, fall = 1, lag_header = "X-Replication-Lag-Ms" }}
read_routes = ["POST /PasswordVault/api/Accounts/*/Password/Retrieve", "POST /api/sessions/**"]
write_routes = ["GET /PasswordVault/api/Accounts/*/Password/Reset"]
{extra}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica" }},
  {{ id = "r2", address = "{}", role = "replica" }},
]
"#,
            primary.addr, r1.addr, r2.addr
        ),
    );
    let proxy = Proxy::start(&cfg).await;
    let f = Farm {
        primary,
        r1,
        r2,
        proxy,
    };
    f.wait_health("primary", "healthy").await;
    f.wait_health("r1", "healthy").await;
    f.wait_health("r2", "healthy").await;
    f
}

impl Farm {
    async fn wait_health(&self, backend: &str, state: &str) {
        let admin = self.proxy.admin.unwrap();
        eventually(
            Duration::from_secs(10),
            &format!("{backend} {state}"),
            || async { backend_status(admin, "pam", backend).await["health"]["health"] == state },
        )
        .await;
    }

    async fn call(&self, method: &str, path: &str) -> Got {
        send(
            self.proxy.addr,
            request(
                method,
                "pvwa.corp.test",
                path,
                if method == "GET" { "" } else { "{}" },
            ),
        )
        .await
    }
}

fn writes_seen(b: &TestBackend) -> usize {
    b.seen()
        .iter()
        .filter(|s| {
            !matches!(s.method.as_str(), "GET" | "HEAD" | "OPTIONS")
                && !s.path.ends_with("/Password/Retrieve")
                && !s.path.starts_with("/api/sessions/")
                || s.path.ends_with("/Password/Reset")
        })
        .count()
}

#[tokio::test]
async fn reads_go_to_replicas_and_writes_to_the_primary() {
    let f = farm("").await;
    for _ in 0..6 {
        let r = f.call("GET", "/PasswordVault/api/Accounts").await;
        assert!(r.backend().starts_with('r'), "{}", r.backend());
    }
    for m in ["POST", "PUT", "PATCH", "DELETE"] {
        assert_eq!(
            f.call(m, "/PasswordVault/api/Accounts/1").await.backend(),
            "primary",
            "{m}"
        );
    }
    // read_routes: a POST that only retrieves a password is a read.
    let r = f
        .call("POST", "/PasswordVault/api/Accounts/42_7/Password/Retrieve")
        .await;
    assert!(r.backend().starts_with('r'));
    assert!(f
        .call("POST", "/api/sessions/psm/launch")
        .await
        .backend()
        .starts_with('r'));
    // write_routes: a GET that changes state is a write.
    assert_eq!(
        f.call("GET", "/PasswordVault/api/Accounts/42/Password/Reset")
            .await
            .backend(),
        "primary"
    );
    assert_eq!(writes_seen(&f.r1) + writes_seen(&f.r2), 0);
    // Both replicas share the reads.
    assert!(f.r1.hits() > 0 && f.r2.hits() > 0);
}

#[tokio::test]
async fn no_healthy_primary_means_503_for_writes_while_reads_continue() {
    let f = farm("").await;
    let admin = f.proxy.admin.unwrap();
    f.primary.set_health(503);
    f.wait_health("primary", "unhealthy").await;

    let r = f.call("POST", "/PasswordVault/api/Accounts").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(r.body.contains("read-only"), "{}", r.body);
    let reads = f.call("GET", "/PasswordVault/api/Accounts").await;
    assert_eq!(reads.status, 200);
    assert_eq!(
        f.primary
            .seen()
            .iter()
            .filter(|s| s.method == "POST")
            .count(),
        0
    );
    let m = admin_get(admin, "/metrics").await;
    assert!(metric(&m, "keyway_writes_refused_total{cluster=\"pam\"}") >= 1.0);

    f.primary.set_health(200);
    f.wait_health("primary", "healthy").await;
    assert_eq!(
        f.call("POST", "/PasswordVault/api/Accounts")
            .await
            .backend(),
        "primary"
    );
}

#[tokio::test]
async fn lagging_replicas_serve_no_reads_but_stay_healthy() {
    let f = farm(r#"max_lag = "1s""#).await;
    let admin = f.proxy.admin.unwrap();
    f.r1.set_lag(5_000);
    eventually(Duration::from_secs(10), "r1 lag reported", || async {
        backend_status(admin, "pam", "r1").await["health"]["lag_ms"] == 5000
    })
    .await;
    for _ in 0..8 {
        assert_eq!(f.call("GET", "/x").await.backend(), "r2");
    }
    assert_eq!(
        backend_status(admin, "pam", "r1").await["health"]["health"],
        "healthy"
    );

    // Both replicas lag: reads fall back to the primary (reads_on_primary = "fallback").
    f.r2.set_lag(9_000);
    eventually(Duration::from_secs(10), "r2 lag reported", || async {
        backend_status(admin, "pam", "r2").await["health"]["lag_ms"] == 9000
    })
    .await;
    assert_eq!(f.call("GET", "/x").await.backend(), "primary");

    f.r1.set_lag(10);
    eventually(Duration::from_secs(10), "r1 caught up", || async {
        f.call("GET", "/x").await.backend() == "r1"
    })
    .await;
}

#[tokio::test]
async fn reads_on_primary_never_and_always() {
    let f = farm(r#"reads_on_primary = "never""#).await;
    f.r1.set_health(500);
    f.r2.set_health(500);
    f.wait_health("r1", "unhealthy").await;
    f.wait_health("r2", "unhealthy").await;
    let r = f.call("GET", "/x").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("reads_on_primary"), "{}", r.body);
    assert_eq!(f.primary.hits(), 0);

    let f = farm(r#"reads_on_primary = "always""#).await;
    let mut saw_primary = false;
    for _ in 0..9 {
        saw_primary |= f.call("GET", "/x").await.backend() == "primary";
    }
    assert!(saw_primary, "the primary takes a share of reads");
}

#[tokio::test]
async fn read_your_writes_and_forged_cookies() {
    let f = farm(r#"read_your_writes = "30s""#).await;
    let w = f.call("POST", "/PasswordVault/api/Accounts").await;
    assert_eq!(w.backend(), "primary");
    let set = w
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("keyway_ryw_pam="))
        .expect("read-your-writes cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("Max-Age=30"),
        "{set}"
    );
    let pair = set.split(';').next().unwrap().to_string();

    let read_with = |cookie: String| async move {
        let mut req = request("GET", "pvwa.corp.test", "/PasswordVault/api/Accounts", "");
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        send(f.proxy.addr, req).await.backend()
    };
    for _ in 0..3 {
        assert_eq!(
            read_with(pair.clone()).await,
            "primary",
            "reads after a write see it"
        );
    }
    assert!(f
        .call("GET", "/PasswordVault/api/Accounts")
        .await
        .backend()
        .starts_with('r'));

    // Forged: a later expiry with the old signature; garbage; another cluster's name.
    let (name, value) = pair.split_once('=').unwrap();
    let (until, sig) = value.split_once('.').unwrap();
    let later: u64 = until.parse::<u64>().unwrap() + 86_400_000;
    for forged in [
        format!("{name}={later}.{sig}"),
        format!("{name}=99999999999999.{}", "0".repeat(64)),
        format!("{name}=not-a-token"),
        format!("keyway_ryw_other={value}"),
    ] {
        assert!(
            read_with(forged.clone()).await.starts_with('r'),
            "{forged} must be ignored"
        );
    }
}

#[tokio::test]
async fn sticky_reads_stay_on_their_replica_and_writes_never_follow() {
    let f = farm(r#"sticky = { cookie = "kw" }"#).await;
    let first = f.call("GET", "/x").await;
    let pinned = first.backend();
    assert!(pinned.starts_with('r'));
    let pair = first.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let with = |m: &str, path: &str| {
        let mut req = request(
            m,
            "pvwa.corp.test",
            path,
            if m == "GET" { "" } else { "{}" },
        );
        req.headers_mut().insert("cookie", pair.parse().unwrap());
        req
    };
    for _ in 0..5 {
        assert_eq!(
            send(f.proxy.addr, with("GET", "/x")).await.backend(),
            pinned
        );
    }
    let w = send(f.proxy.addr, with("POST", "/PasswordVault/api/Accounts")).await;
    assert_eq!(w.backend(), "primary");
    assert!(
        !w.headers.contains_key("set-cookie"),
        "a write does not re-pin the session"
    );
    assert_eq!(
        send(f.proxy.addr, with("GET", "/x")).await.backend(),
        pinned
    );

    // The pinned replica goes unhealthy: reads move, and are re-pinned.
    let (dead, other) = if pinned == "r1" {
        (&f.r1, "r2")
    } else {
        (&f.r2, "r1")
    };
    dead.set_health(500);
    f.wait_health(&pinned, "unhealthy").await;
    let moved = send(f.proxy.addr, with("GET", "/x")).await;
    assert_eq!(moved.backend(), other);
    assert!(moved.headers.contains_key("set-cookie"));
    assert_eq!(writes_seen(&f.r1) + writes_seen(&f.r2), 0);
}

/// Invariant 1, randomized: backends go down, come back, flap and lag while concurrent
/// mixed traffic flows; every backend records what it received, and no replica may
/// ever have received a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_schedules_never_send_a_write_to_a_replica() {
    const SCHEDULES: u64 = 12;
    let mut total_writes = 0;
    let mut total_refused = 0;
    for seed in 0..SCHEDULES {
        let f = farm(
            r#"max_lag = "200ms"
outlier = { consecutive_failures = 2, base_ejection = "100ms" }
sticky = { cookie = "kw" }"#,
        )
        .await;
        let rng = std::sync::Mutex::new(fastrand_like(seed));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..4u64 {
            let addr = f.proxy.addr;
            let stop = stop.clone();
            clients.push(tokio::spawn(async move {
                let (mut ok_writes, mut refused) = (0, 0);
                let mut n = seed * 31 + c;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (m, path) = match (n >> 33) % 6 {
                        0 => ("POST", "/PasswordVault/api/Accounts"),
                        1 => ("DELETE", "/PasswordVault/api/Accounts/3"),
                        2 => ("GET", "/PasswordVault/api/Accounts/3/Password/Reset"),
                        3 => ("POST", "/PasswordVault/api/Accounts/3/Password/Retrieve"),
                        _ => ("GET", "/PasswordVault/api/Accounts"),
                    };
                    let body = if m == "GET" { "" } else { "{}" };
                    if let Ok(r) = try_send(addr, request(m, "pvwa.corp.test", path, body)).await {
                        let write = m == "DELETE"
                            || path.ends_with("Reset")
                            || (m == "POST" && !path.ends_with("Retrieve"));
                        if write && r.status == 200 {
                            ok_writes += 1;
                        }
                        if write && r.status == 503 {
                            refused += 1;
                        }
                    }
                }
                (ok_writes, refused)
            }));
        }
        // The schedule: 12 random events, 40 ms apart.
        let backends = [&f.primary, &f.r1, &f.r2];
        let mut stopped = [false; 3];
        for _ in 0..12 {
            let (which, what) = {
                let mut r = rng.lock().unwrap();
                (r.next() % 3, r.next() % 6)
            };
            let b = backends[which as usize];
            match what {
                0 => b.set_health(500),
                1 => b.set_health(200),
                2 => b.set_lag(1_000),
                3 => b.set_lag(0),
                4 if !stopped[which as usize] => {
                    b.stop();
                    stopped[which as usize] = true;
                }
                _ => {
                    if stopped[which as usize] {
                        let _ = b.restart().await;
                        stopped[which as usize] = false;
                    }
                    b.set_health(200);
                }
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            let (w, r) = c.await.unwrap();
            total_writes += w;
            total_refused += r;
        }
        assert_eq!(
            writes_seen(&f.r1),
            0,
            "schedule {seed}: a replica received a write"
        );
        assert_eq!(
            writes_seen(&f.r2),
            0,
            "schedule {seed}: a replica received a write"
        );
    }
    println!(
        "write invariant held over {SCHEDULES} randomized schedules: {total_writes} writes served, {total_refused} refused with 503"
    );
    assert!(total_writes > 0, "the schedules must exercise writes");
}

/// A tiny deterministic generator so each schedule is reproducible from its seed.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

trait Next {
    fn next(&mut self) -> u64;
}

impl<F: FnMut() -> u64> Next for F {
    fn next(&mut self) -> u64 {
        self()
    }
}
