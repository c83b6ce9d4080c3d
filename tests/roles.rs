//! primary-replica clusters: the read/write split, 503 for writes without a healthy
//! primary, lag, read-your-writes, sticky with roles, and the write and fencing
//! invariants under randomized failover schedules.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_tests::*;

struct Farm {
    primary: TestBackend,
    r1: TestBackend,
    r2: TestBackend,
    proxy: Proxy,
}

const HEALTH: &str = r#"health = { path = "/health", interval = "50ms", timeout = "500ms", rise = 1, fall = 1, lag_header = "X-Replication-Lag-Ms" }"#;

async fn farm(extra: &str) -> Farm {
    farm_with(HEALTH, extra).await
}

/// The farm with its own `health` line.
async fn farm_with(health: &str, extra: &str) -> Farm {
    let primary = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let r2 = TestBackend::start("r2").await;
    let cfg = one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
balance = "round-robin"
{health}
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

/// The requests the clients of the randomized test send, and whether `farm`'s rules
/// (method, `read_routes`, `write_routes`) make each a write.
const MIX: [(&str, &str, bool); 6] = [
    ("POST", "/PasswordVault/api/Accounts", true),
    ("DELETE", "/PasswordVault/api/Accounts/3", true),
    ("GET", "/PasswordVault/api/Accounts/3/Password/Reset", true),
    (
        "POST",
        "/PasswordVault/api/Accounts/3/Password/Retrieve",
        false,
    ),
    ("POST", "/api/sessions/psm/launch", false),
    ("GET", "/PasswordVault/api/Accounts", false),
];

fn is_write(s: &Seen) -> bool {
    MIX.iter()
        .find(|(m, p, _)| *m == s.method && *p == s.path)
        .map(|x| x.2)
        .unwrap_or_else(|| {
            panic!(
                "a backend received {} {}, which no client sent",
                s.method, s.path
            )
        })
}

/// What the clients got, summed.
#[derive(Default, Debug)]
struct Tally {
    writes_ok: usize,
    writes_refused: usize,
    reads_ok: usize,
    forged: usize,
    other: usize,
}

/// Concurrent clients sending [`MIX`] until stopped; a third of the requests forge a
/// `keyway-epoch` of their own.
struct Clients {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Clients {
    fn start(addr: std::net::SocketAddr, n: u64, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let tasks = (0..n)
            .map(|c| {
                let (stop, sent) = (stop.clone(), sent.clone());
                let mut rng = Rng::new(seed * 31 + c);
                tokio::spawn(async move {
                    let mut t = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        let (m, path, write) = MIX[rng.below(MIX.len())];
                        let mut req = request(
                            m,
                            "pvwa.corp.test",
                            path,
                            if m == "GET" { "" } else { "{}" },
                        );
                        if rng.below(3) == 0 {
                            let forged = if rng.below(2) == 0 { "0" } else { "77" };
                            req.headers_mut()
                                .insert("keyway-epoch", forged.parse().unwrap());
                            t.forged += 1;
                        }
                        match try_send(addr, req).await.map(|r| r.status.as_u16()) {
                            Ok(200) if write => t.writes_ok += 1,
                            Ok(503) if write => t.writes_refused += 1,
                            Ok(200) => t.reads_ok += 1,
                            _ => t.other += 1,
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    t
                })
            })
            .collect();
        Self { stop, sent, tasks }
    }

    /// Waits until the clients have completed `n` more requests (traffic in the state an
    /// event left behind).
    async fn more(&self, n: usize) {
        let from = self.sent.load(Ordering::Relaxed);
        eventually(Duration::from_secs(10), "client traffic", || async {
            self.sent.load(Ordering::Relaxed) >= from + n
        })
        .await;
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for t in self.tasks {
            let t = t.await.expect("client task");
            all.writes_ok += t.writes_ok;
            all.writes_refused += t.writes_refused;
            all.reads_ok += t.reads_ok;
            all.forged += t.forged;
            all.other += t.other;
        }
        all
    }
}

const IDS: [&str; 3] = ["primary", "r1", "r2"];

fn index(id: &str) -> usize {
    IDS.iter().position(|x| *x == id).expect("known backend")
}

async fn topology_changed(admin: std::net::SocketAddr, from_epoch: u64, what: &str) -> Decision {
    eventually(Duration::from_secs(10), what, || async {
        let d = decision(admin, "pam").await;
        d.epoch > from_epoch && d.primary.is_some()
    })
    .await;
    decision(admin, "pam").await
}

/// Invariants 1 and 2 under failovers: a single keyway (state file) in front of a
/// primary and two replicas, while four clients send mixed reads and writes (some
/// forging `keyway-epoch`), runs seeded schedules of events: the primary killed (an
/// automatic failover fences it), a backend restarted (it comes back fenced), manual
/// promotions and failbacks, health flaps long enough to fail over a live primary or
/// too short to, and lag flaps. Afterwards every request each backend recorded is
/// judged against the decision history in `/status` ([`split_violations`]): each write
/// reached the primary of the epoch it carries, unfenced, and not after another
/// backend had been primary for 100 ms; nothing reached a fenced backend; no read
/// carried an epoch. An epoch without a primary (a drain) takes no writes, so the
/// checks hold whether a change of primary takes one epoch or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_failovers_keep_every_write_on_its_epoch_s_primary() {
    const SEEDS: u64 = 4;
    const EVENTS: usize = 14;
    const MARGIN_MS: u64 = 100;
    let started = std::time::Instant::now();
    let mut events: std::collections::BTreeMap<&str, usize> = Default::default();
    let (mut total, mut writes_seen, mut epochs_with_writes) = (Tally::default(), 0, 0);
    for seed in 0..SEEDS {
        // Checks that tolerate a busy machine: two failures in a row, 1 s each, so only
        // the schedule's events change health.
        let f = farm_with(
            r#"health = { path = "/health", interval = "50ms", timeout = "1s", rise = 1, fall = 2, lag_header = "X-Replication-Lag-Ms" }"#,
            r#"max_lag = "300ms"
outlier = { consecutive_failures = 2, base_ejection = "100ms" }
promotion = { auto = true, hold = "300ms", drain = "300ms" }"#,
        )
        .await;
        let admin = f.proxy.admin.unwrap();
        let backends = [&f.primary, &f.r1, &f.r2];
        let mut rng = Rng::new(seed);
        let mut alive = [true; 3];
        let mut lagging = [false; 3];
        let clients = Clients::start(f.proxy.addr, 4, seed);
        clients.more(20).await;
        for step in 0..EVENTS {
            let d = decision(admin, "pam").await;
            let primary = d.primary.as_deref().map(index);
            let fenced = |i: usize| d.fenced.iter().any(|x| x == IDS[i]);
            let candidates: Vec<usize> = (0..3)
                .filter(|&i| alive[i] && Some(i) != primary && !fenced(i))
                .collect();
            let dead: Vec<usize> = (0..3).filter(|&i| !alive[i]).collect();
            let mut what = rng.below(8);
            if what <= 1 && (primary.is_none_or(|p| !alive[p]) || candidates.is_empty()) {
                what = 2;
            }
            if what == 2 && dead.is_empty() {
                what = 3;
            }
            let ctx = format!("seed {seed}, event {step}, {d:?}");
            match what {
                0 | 1 => {
                    // Kill the primary: a replica is promoted and the old primary fenced.
                    let p = primary.expect("checked");
                    backends[p].stop();
                    alive[p] = false;
                    let now = topology_changed(
                        admin,
                        d.epoch,
                        &format!("failover after killing {}", IDS[p]),
                    )
                    .await;
                    assert_ne!(now.primary.as_deref(), Some(IDS[p]), "{ctx}");
                    assert!(now.fenced.iter().any(|x| x == IDS[p]), "{ctx}: {now:?}");
                    *events.entry("kill primary, failover").or_default() += 1;
                }
                2 => {
                    // Restart a killed backend: it was fenced, and comes back fenced.
                    let i = dead[rng.below(dead.len())];
                    backends[i].restart().await;
                    alive[i] = true;
                    f.wait_health(IDS[i], "healthy").await;
                    let now = decision(admin, "pam").await;
                    assert!(
                        now.fenced.iter().any(|x| x == IDS[i]),
                        "{ctx}: {} came back unfenced: {now:?}",
                        IDS[i]
                    );
                    *events.entry("restart, fenced").or_default() += 1;
                }
                3 | 4 => {
                    // A manual promotion of any live backend, or a failback to the
                    // configured primary.
                    let (path, target, kind) = if what == 4 && alive[0] && primary != Some(0) {
                        ("/clusters/pam/failback".to_string(), 0, "failback")
                    } else {
                        let targets: Vec<usize> =
                            (0..3).filter(|&i| alive[i] && Some(i) != primary).collect();
                        if targets.is_empty() {
                            continue;
                        }
                        let t = targets[rng.below(targets.len())];
                        (
                            format!("/clusters/pam/promote/{}", IDS[t]),
                            t,
                            "manual promotion",
                        )
                    };
                    let r = send(admin, request("POST", "admin", &path, "")).await;
                    if r.status == 200 {
                        let now = decision(admin, "pam").await;
                        assert_eq!(now.primary.as_deref(), Some(IDS[target]), "{ctx}");
                        assert!(
                            !now.fenced.iter().any(|x| x == IDS[target]),
                            "{ctx}: {now:?}"
                        );
                        *events.entry(kind).or_default() += 1;
                    } else {
                        // Only a decision that landed meanwhile (a late failover) may
                        // refuse it.
                        let now = decision(admin, "pam").await;
                        assert!(
                            now.epoch > d.epoch,
                            "{ctx}: POST {path} answered {}: {}",
                            r.status,
                            r.body
                        );
                        *events.entry("switchover raced").or_default() += 1;
                    }
                }
                5 | 6 => {
                    // A health flap: long enough to fail over a live primary when a
                    // candidate exists (it is then fenced while it still answers), or as
                    // short as the checks allow.
                    let live: Vec<usize> = (0..3).filter(|&i| alive[i]).collect();
                    let i = match primary {
                        Some(p) if alive[p] && rng.below(3) != 0 => p,
                        _ => live[rng.below(live.len())],
                    };
                    let long = Some(i) == primary && !candidates.is_empty() && rng.below(4) != 0;
                    backends[i].set_health(500);
                    f.wait_health(IDS[i], "unhealthy").await;
                    if long {
                        topology_changed(admin, d.epoch, "failover of an unhealthy primary").await;
                        *events.entry("health flap, failover").or_default() += 1;
                    } else {
                        *events.entry("health flap").or_default() += 1;
                    }
                    backends[i].set_health(200);
                    f.wait_health(IDS[i], "healthy").await;
                }
                _ => {
                    // A lag flap: beyond max_lag, then caught up.
                    let live: Vec<usize> = (0..3).filter(|&i| alive[i]).collect();
                    let i = live[rng.below(live.len())];
                    lagging[i] = !lagging[i];
                    let lag = if lagging[i] { 1_000 } else { 0 };
                    backends[i].set_lag(lag);
                    eventually(Duration::from_secs(10), "lag reported", || async {
                        backend_status(admin, "pam", IDS[i]).await["health"]["lag_ms"] == lag
                    })
                    .await;
                    *events.entry("lag flap").or_default() += 1;
                }
            }
            clients.more(40).await;
        }
        let tally = clients.stop().await;
        let epoch0 = Decision {
            epoch: 0,
            primary: Some("primary".into()),
            fenced: vec![],
            unix_ms: 0,
        };
        let history = decision_history(admin, "pam", epoch0).await;
        let mut violations = Vec::new();
        let mut epochs = std::collections::BTreeSet::new();
        for (i, b) in backends.iter().enumerate() {
            let seen = b.seen();
            for s in seen.iter().filter(|s| is_write(s)) {
                writes_seen += 1;
                epochs.insert(s.epoch_header().unwrap_or("").to_string());
            }
            violations.extend(split_violations(
                &history, IDS[i], &seen, is_write, MARGIN_MS,
            ));
        }
        assert!(
            violations.is_empty(),
            "seed {seed}: {} violations, the first:\n{}\nhistory: {history:#?}",
            violations.len(),
            violations
                .iter()
                .take(12)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        epochs_with_writes += epochs.len();
        total.writes_ok += tally.writes_ok;
        total.writes_refused += tally.writes_refused;
        total.reads_ok += tally.reads_ok;
        total.forged += tally.forged;
        total.other += tally.other;
        println!(
            "seed {seed}: {} epochs, {} with writes; clients: {tally:?}",
            history.len(),
            epochs.len()
        );
    }
    println!(
        "{SEEDS} schedules of {EVENTS} events in {:?}: {events:?}; {writes_seen} writes checked in {epochs_with_writes} epochs; clients: {total:?}",
        started.elapsed()
    );
    // The schedules really moved the primary under write traffic.
    for kind in [
        "kill primary, failover",
        "restart, fenced",
        "manual promotion",
        "failback",
        "health flap, failover",
    ] {
        assert!(
            events.get(kind).is_some_and(|n| *n > 0),
            "no {kind} happened: {events:?}"
        );
    }
    assert!(
        epochs_with_writes > 2 * SEEDS as usize,
        "writes in too few epochs"
    );
    assert!(total.writes_ok > 0 && total.reads_ok > 0 && total.forged > 0);
}

/// A failing schedule replays from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// splitmix64: neighbouring seeds give unrelated sequences.
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z % n as u64) as usize
    }
}
