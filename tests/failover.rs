//! Promotion, fencing, failback and durable decisions on one keyway instance (state file).
//! The multi-instance (etcd) cases are in `coordination.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyway_tests::*;

/// A PAM360-style farm: `primary` and two read-only servers, checked every 50 ms.
fn farm(p: &TestBackend, r1: &TestBackend, r2: &TestBackend, promotion: &str) -> String {
    farm_with("pam", p, r1, r2, HEALTH, promotion)
}

const HEALTH: &str =
    r#"health = { path = "/health", interval = "50ms", timeout = "300ms", rise = 1, fall = 2 }"#;
const HEALTH_WITH_LAG: &str = r#"health = { path = "/health", interval = "50ms", timeout = "300ms", rise = 1, fall = 2, lag_header = "x-replication-lag-ms" }"#;

/// The farm as cluster `name`. Tests that read process-wide metrics give their cluster a
/// name of its own, since every test in this binary shares one metrics registry.
fn farm_with(
    name: &str,
    p: &TestBackend,
    r1: &TestBackend,
    r2: &TestBackend,
    health: &str,
    promotion: &str,
) -> String {
    one_cluster(
        name,
        &format!(
            r#"strategy = "primary-replica"
{health}
{promotion}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica", priority = 1, location = "west" }},
  {{ id = "r2", address = "{}", role = "replica", priority = 2, location = "east" }},
]"#,
            p.addr, r1.addr, r2.addr
        ),
    )
}

async fn three() -> (TestBackend, TestBackend, TestBackend) {
    (
        TestBackend::start("primary").await,
        TestBackend::start("r1").await,
        TestBackend::start("r2").await,
    )
}

async fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&admin_get(admin, "/status").await).expect("status JSON")
}

/// (epoch, primary, fenced) of cluster `pam` as `/status` reports it.
async fn topology(admin: std::net::SocketAddr) -> (u64, String, Vec<String>) {
    topology_in(admin, "pam").await
}

/// The same for cluster `name` (see [`farm_with`]).
async fn topology_in(admin: std::net::SocketAddr, name: &str) -> (u64, String, Vec<String>) {
    let s = status(admin).await;
    let t = &s["coordination"]["clusters"][name];
    (
        t["epoch"].as_u64().unwrap_or(u64::MAX),
        t["primary"].as_str().unwrap_or("").to_string(),
        t["fenced"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

async fn all_healthy(admin: std::net::SocketAddr) {
    all_healthy_in(admin, "pam").await
}

async fn all_healthy_in(admin: std::net::SocketAddr, name: &str) {
    eventually(Duration::from_secs(10), "every backend healthy", || async {
        for id in ["primary", "r1", "r2"] {
            if backend_status(admin, name, id).await["health"]["health"] != "healthy" {
                return false;
            }
        }
        true
    })
    .await;
}

/// Starts keyway with `cfg` and waits until every backend of `pam` is healthy.
async fn started(cfg: &str) -> (Proxy, std::net::SocketAddr) {
    let proxy = Proxy::start(cfg).await;
    let admin = proxy.admin.unwrap();
    all_healthy(admin).await;
    (proxy, admin)
}

/// Waits until `/status` names `primary` as the primary of `pam`.
async fn promoted(admin: std::net::SocketAddr, primary: &str, what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        topology(admin).await.1 == primary
    })
    .await;
}

fn write() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request("POST", "pam", "/api/resources", "{}")
}

#[derive(Clone, Debug)]
struct Outcome {
    /// When the request was sent.
    sent: Instant,
    /// When its answer arrived.
    at: Instant,
    write: bool,
    status: u16,
    backend: String,
    retry_after: bool,
}

/// Two readers and two writers until `stop`.
fn mixed_load(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Outcome>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|n| {
            let (stop, log) = (stop.clone(), log.clone());
            tokio::spawn(async move {
                let is_write = n % 2 == 1;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let req = if is_write {
                        write()
                    } else {
                        request("GET", "pam", "/api/read", "")
                    };
                    let (status, backend, retry_after) = match try_send(addr, req).await {
                        Ok(r) => {
                            let b = if r.status == 200 {
                                r.backend()
                            } else {
                                String::new()
                            };
                            (r.status.as_u16(), b, r.headers.contains_key("retry-after"))
                        }
                        Err(_) => (0, String::new(), false),
                    };
                    log.lock().unwrap().push(Outcome {
                        sent,
                        at: Instant::now(),
                        write: is_write,
                        status,
                        backend,
                        retry_after,
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_under_load_promotes_a_replica_fences_the_old_one_and_survives_a_restart(
) {
    let (p, r1, r2) = three().await;
    let dir = unique_dir("failover");
    let file = dir.join("keyway.toml");
    let cfg = farm(
        &p,
        &r1,
        &r2,
        r#"promotion = { auto = true, hold = "200ms" }"#,
    );
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    all_healthy(admin).await;
    assert_eq!(topology(admin).await, (0, "primary".into(), vec![]));
    assert_eq!(send(proxy.addr, write()).await.backend(), "primary");

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let load = mixed_load(proxy.addr, stop.clone(), log.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    p.stop();
    eventually(
        Duration::from_secs(15),
        "a write to succeed on the promoted replica",
        || {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .iter()
                    .any(|o| o.write && o.at > killed && o.status == 200 && o.backend == "r1")
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    let first_write = log
        .iter()
        // A write already at the primary when it died may still complete after `killed`;
        // the window ends with the first write the promoted replica took.
        .filter(|o| o.write && o.at > killed && o.status == 200 && o.backend == "r1")
        .map(|o| o.at)
        .min()
        .unwrap();
    println!(
        "kill to first successful write on the promoted replica: {} ms",
        (first_write - killed).as_millis()
    );
    let reads: Vec<_> = log.iter().filter(|o| !o.write).collect();
    assert!(reads.len() > 20);
    assert!(
        reads.iter().all(|o| o.status == 200),
        "every read succeeds: {:?}",
        reads.iter().filter(|o| o.status != 200).collect::<Vec<_>>()
    );
    let refused: Vec<_> = log.iter().filter(|o| o.write && o.status == 503).collect();
    assert!(
        !refused.is_empty(),
        "writes are refused while there is no primary"
    );
    assert!(refused
        .iter()
        .all(|o| o.retry_after && o.at > killed && o.sent < first_write));
    // A write that was on the wire to the primary when it died can fail; nothing else.
    let broken = log
        .iter()
        .filter(|o| o.write && o.status != 200 && o.status != 503)
        .count();
    assert!(broken <= 2, "{broken} writes failed otherwise");
    assert!(log
        .iter()
        .filter(|o| o.write && o.status == 200 && o.at > first_write)
        .all(|o| o.backend == "r1"));
    assert_eq!(
        topology(admin).await,
        (2, "r1".into(), vec!["primary".into()])
    );

    // The old primary comes back: healthy, fenced, no traffic.
    let p = p.restart().await;
    eventually(
        Duration::from_secs(10),
        "the old primary healthy again",
        || async { backend_status(admin, "pam", "primary").await["health"]["health"] == "healthy" },
    )
    .await;
    let before = p.hits();
    for _ in 0..10 {
        assert_eq!(send(proxy.addr, write()).await.backend(), "r1");
        assert_ne!(
            get(proxy.addr, "pam", "/api/read").await.backend(),
            "primary"
        );
    }
    assert_eq!(p.hits(), before, "a fenced primary takes nothing");
    assert_eq!(r1.write_epochs().last(), Some(&2));

    // Restart keyway: the same primary, epoch and fence.
    assert!(proxy.shutdown().await);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("keyway-state.json")).unwrap()).unwrap();
    assert_eq!(state["clusters"]["pam"]["primary"], "r1");
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(
        topology(admin).await,
        (2, "r1".into(), vec!["primary".into()])
    );
    all_healthy(admin).await;
    assert_eq!(send(proxy.addr, write()).await.backend(), "r1");

    // Failback: a drain epoch, then the old primary in a new one.
    let r = send(
        admin,
        request("POST", "admin", "/clusters/pam/failback", ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(topology(admin).await, (4, "primary".into(), vec![]));
    let w = send(proxy.addr, write()).await;
    assert_eq!(w.backend(), "primary");
    assert_eq!(p.write_epochs().last(), Some(&4));
    let again = send(
        admin,
        request("POST", "admin", "/clusters/pam/failback", ""),
    )
    .await;
    assert_eq!(again.status, 409, "{}", again.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_start_up_with_a_clear_message() {
    let (p, r1, r2) = three().await;
    let dir = unique_dir("corrupt");
    std::fs::write(
        dir.join("keyway-state.json"),
        b"{\"version\": 1, \"clusters\": {",
    )
    .unwrap();
    let cfg = keyway::Config::from_str_with_base(&farm(&p, &r1, &r2, ""), "t.toml", &dir).unwrap();
    let err = keyway::Server::start(cfg)
        .await
        .err()
        .expect("start refused");
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains("keyway state import"),
        "{msg}"
    );

    // A state naming a backend the config lacks is refused too, never silently reset.
    std::fs::write(
        dir.join("keyway-state.json"),
        br#"{"version": 1, "clusters": {"pam": {"epoch": 4, "primary": "gone", "fenced": []}}}"#,
    )
    .unwrap();
    let cfg = keyway::Config::from_str_with_base(&farm(&p, &r1, &r2, ""), "t.toml", &dir).unwrap();
    let msg = keyway::Server::start(cfg)
        .await
        .err()
        .expect("start refused")
        .to_string();
    assert!(msg.contains("`gone`"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_promote_hook_keeps_writes_off_the_candidate_and_repoint_reaches_the_rest() {
    let (p, r1, r2) = three().await;
    r1.set_hook_status(500);
    let (proxy, admin) = started(&farm(
        &p,
        &r1,
        &r2,
        r#"promotion = { hold = "100ms", require_hook_ok = true,
  on_promote = { url = "http://{address}/admin/promote?epoch={epoch}", timeout = "1s" },
  on_repoint = { url = "http://{address}/admin/repoint", timeout = "1s" } }"#,
    ))
    .await;
    p.stop();
    promoted(admin, "r2", "r2 promoted").await;
    assert_eq!(
        r1.hooks().first().map(String::as_str),
        Some("/admin/promote")
    );
    assert!(r2.hooks().contains(&"/admin/promote".to_string()));
    eventually(Duration::from_secs(5), "r1 repointed", || async {
        r1.hooks().contains(&"/admin/repoint".to_string())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(send(proxy.addr, write()).await.backend(), "r2");
    }
    assert!(
        r1.write_epochs().is_empty(),
        "the candidate whose hook failed took no write"
    );
    let metrics = admin_get(admin, "/metrics").await;
    assert!(
        metric(
            &metrics,
            "keyway_hook_calls_total{cluster=\"pam\",hook=\"on_promote\",result=\"error\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_promotion_keyway_reports_and_an_operator_promotes() {
    let (p, r1, r2) = three().await;
    let proxy = Proxy::start(&farm_with(
        "pam-manual",
        &p,
        &r1,
        &r2,
        HEALTH,
        r#"promotion = { auto = false, hold = "100ms" }"#,
    ))
    .await;
    let admin = proxy.admin.unwrap();
    all_healthy_in(admin, "pam-manual").await;
    p.stop();
    eventually(Duration::from_secs(10), "promotion needed", || async {
        status(admin).await["coordination"]["clusters"]["pam-manual"]["promotion_needed"] == true
    })
    .await;
    let w = send(proxy.addr, write()).await;
    assert_eq!(w.status, 503);
    assert!(w.headers.contains_key("retry-after"));
    assert_eq!(get(proxy.addr, "pam", "/api/read").await.status, 200);
    assert_eq!(
        topology_in(admin, "pam-manual").await.0,
        0,
        "nothing promoted by itself"
    );
    assert!(
        metric(
            &admin_get(admin, "/metrics").await,
            "keyway_promotion_needed{cluster=\"pam-manual\"}"
        ) == 1.0
    );

    // Unknown cluster and backend are 404; an unhealthy target is 409.
    let r = send(
        admin,
        request("POST", "admin", "/clusters/nope/promote/r1", ""),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = send(
        admin,
        request("POST", "admin", "/clusters/pam-manual/promote/nope", ""),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = send(
        admin,
        request("POST", "admin", "/clusters/pam-manual/promote/primary", ""),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);

    let r = send(
        admin,
        request("POST", "admin", "/clusters/pam-manual/promote/r2", ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Switchover from a primary: a drain epoch, then r2.
    assert_eq!(
        topology_in(admin, "pam-manual").await,
        (2, "r2".into(), vec![])
    );
    assert_eq!(send(proxy.addr, write()).await.backend(), "r2");
    assert_eq!(r2.write_epochs(), vec![2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_policies_choose_as_documented_in_the_proxy() {
    // Native least-lag: r2 is closest to the primary.
    let (p, r1, r2) = three().await;
    r1.set_lag(900);
    r2.set_lag(20);
    let (_proxy, admin) = started(&farm_with(
        "pam",
        &p,
        &r1,
        &r2,
        HEALTH_WITH_LAG,
        r#"promotion = { policy = "least-lag-promotion", hold = "100ms" }"#,
    ))
    .await;
    p.stop();
    promoted(admin, "r2", "least lag promoted").await;

    // The priority-promotion plugin preferring the east site: r2 despite priorities.
    let (p, r1, r2) = three().await;
    let (_proxy, admin) = started(&farm(
        &p,
        &r1,
        &r2,
        &format!(
            r#"promotion = {{ policy = "{}", config = {{ prefer_location = "east" }}, hold = "100ms" }}"#,
            plugin("priority-promotion").display()
        ),
    ))
    .await;
    p.stop();
    promoted(admin, "r2", "east promoted").await;
    let s = status(admin).await;
    let plugins = s["clusters"][0]["plugins"].as_array().unwrap().clone();
    assert!(plugins
        .iter()
        .any(|p| p["kind"] == "promotion" && p["calls"].as_u64() >= Some(1)));

    // The least-lag plugin with a lag bound nobody meets: no promotion at all.
    let (p, r1, r2) = three().await;
    r1.set_lag(900);
    r2.set_lag(800);
    let (proxy, admin) = started(&farm_with(
        "pam",
        &p,
        &r1,
        &r2,
        HEALTH_WITH_LAG,
        &format!(
            r#"promotion = {{ policy = "{}", config = {{ max_lag_ms = 100 }}, hold = "100ms" }}"#,
            plugin("least-lag-promotion").display()
        ),
    ))
    .await;
    p.stop();
    eventually(Duration::from_secs(10), "promotion needed", || async {
        status(admin).await["coordination"]["clusters"]["pam"]["promotion_needed"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(topology(admin).await.0, 0);
    assert_eq!(send(proxy.addr, write()).await.status, 503);
}

/// Randomized: kills, restarts, manual promotions and failbacks under write load. Every
/// write carries the epoch that routed it; each must have been taken by that epoch's
/// primary (from the decision history in `/status`), so no epoch has two primaries and
/// no non-primary takes a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_failovers_never_let_a_non_primary_take_a_write() {
    let runs = 6;
    let (mut total_writes, mut total_epochs, mut total_refused) = (0, 0, 0);
    for run in 0..runs {
        let seed = 0x5eed_0000 + run as u64;
        let mut rng = Rng(seed);
        let (p, r1, r2) = three().await;
        let backends = [p.clone(), r1.clone(), r2.clone()];
        let (proxy, admin) = started(&farm(
            &p,
            &r1,
            &r2,
            r#"promotion = { hold = "100ms", drain = "500ms" }"#,
        ))
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let load = mixed_load(proxy.addr, stop.clone(), log.clone());
        let ids = ["primary", "r1", "r2"];
        let mut down = [false; 3];
        for _ in 0..10 {
            match rng.below(4) {
                0 => {
                    // Kill a live backend, keeping one alive.
                    let i = rng.below(3);
                    if !down[i] && down.iter().filter(|d| !**d).count() > 1 {
                        backends[i].stop();
                        down[i] = true;
                    }
                }
                1 => {
                    let i = rng.below(3);
                    if down[i] {
                        backends[i].restart().await;
                        down[i] = false;
                    }
                }
                2 => {
                    let path = format!("/clusters/pam/promote/{}", ids[rng.below(3)]);
                    let _ = send(admin, request("POST", "admin", &path, "")).await;
                }
                _ => {
                    let _ = send(
                        admin,
                        request("POST", "admin", "/clusters/pam/failback", ""),
                    )
                    .await;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in load {
            t.await.unwrap();
        }
        let s = status(admin).await;
        let mut history: std::collections::BTreeMap<u64, Option<String>> = Default::default();
        history.insert(0, Some("primary".into()));
        for h in s["coordination"]["clusters"]["pam"]["history"]
            .as_array()
            .unwrap()
        {
            let e = h["epoch"].as_u64().unwrap();
            let prim = h["primary"].as_str().map(String::from);
            assert!(
                history.insert(e, prim).is_none(),
                "run {run}: epoch {e} decided twice"
            );
        }
        let last = *history.keys().last().unwrap();
        assert_eq!(
            history.len() as u64,
            last + 1,
            "run {run}: every epoch is in the history: {history:?}"
        );
        for (i, b) in backends.iter().enumerate() {
            for e in b.write_epochs() {
                total_writes += 1;
                assert_eq!(
                    history.get(&e).cloned().flatten().as_deref(),
                    Some(ids[i]),
                    "run {run} (seed {seed:#x}): {} took a write in epoch {e}; history {history:?}",
                    ids[i]
                );
            }
        }
        total_refused += log
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.write && o.status == 503)
            .count();
        total_epochs += history.len();
    }
    println!("randomized failover: {runs} runs, {total_epochs} epochs, {total_writes} writes served, {total_refused} refused with 503, 0 taken by a non-primary");
    assert!(total_writes > 0);
}

/// xorshift: a failing run replays from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0 | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_after_a_stable_period_and_reloads_keep_the_decision() {
    let (p, r1, r2) = three().await;
    let dir = unique_dir("failback");
    let file = dir.join("keyway.toml");
    let cfg = farm_with(
        "pam-failback",
        &p,
        &r1,
        &r2,
        HEALTH,
        "promotion = { hold = \"100ms\", drain = \"200ms\" }\nfailback = { after = \"700ms\" }",
    );
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    all_healthy_in(admin, "pam-failback").await;
    p.stop();
    eventually(Duration::from_secs(10), "r1 promoted", || async {
        topology_in(admin, "pam-failback").await == (2, "r1".into(), vec!["primary".into()])
    })
    .await;

    // A reload keeps the decision (the new runtime starts with it).
    let r = send(admin, request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(send(proxy.addr, write()).await.backend(), "r1");
    // A config that drops the current primary is refused.
    let without_r1 = cfg.replace(
        &format!("  {{ id = \"r1\", address = \"{}\", role = \"replica\", priority = 1, location = \"west\" }},\n", r1.addr),
        "",
    );
    assert_ne!(without_r1, cfg);
    std::fs::write(&file, without_r1).unwrap();
    let r = send(admin, request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("`r1`"), "{}", r.body);
    std::fs::write(&file, &cfg).unwrap();

    // The old primary returns; once healthy for `after`, keyway fails back by itself.
    let returned = Instant::now();
    let p = p.restart().await;
    eventually(Duration::from_secs(10), "automatic failback", || async {
        topology_in(admin, "pam-failback").await == (4, "primary".into(), vec![])
    })
    .await;
    assert!(returned.elapsed() >= Duration::from_millis(700));
    assert_eq!(send(proxy.addr, write()).await.backend(), "primary");
    assert_eq!(p.write_epochs().last(), Some(&4));
    let m = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(
            &m,
            "keyway_promotions_total{cluster=\"pam-failback\",kind=\"failback\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "keyway_topology_epoch{cluster=\"pam-failback\"}"),
        4.0
    );
}

/// A cluster that a reload adds back starts from the decisions stored under its name,
/// never from the configured primary (which may have been demoted and fenced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_added_by_a_reload_keeps_its_stored_decisions() {
    let (p, r1, r2) = three().await;
    let dir = unique_dir("reload-stored");
    let file = dir.join("keyway.toml");
    std::fs::write(
        dir.join("keyway-state.json"),
        r#"{"version": 1, "clusters": {"pam2": {"epoch": 2, "primary": "r1", "fenced": ["primary"], "reason": "promoted before it was removed"}}}"#,
    )
    .unwrap();
    let v1 = farm_with("pam", &p, &r1, &r2, "", "");
    let proxy = Proxy::start_file(&file, &v1).await;
    let admin = proxy.admin.unwrap();
    let v2 = format!(
        r#"{v1}
[[route]]
host = "pam2"
cluster = "pam2"
[cluster.pam2]
strategy = "primary-replica"
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica" }},
]
"#,
        p.addr, r1.addr
    );
    std::fs::write(&file, v2).unwrap();
    let r = send(admin, request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        topology_in(admin, "pam2").await,
        (2, "r1".into(), vec!["primary".into()])
    );
    let w = send(proxy.addr, request("POST", "pam2", "/api/resources", "{}")).await;
    assert_eq!(
        (w.status.as_u16(), w.backend()),
        (200, "r1".to_string()),
        "{}",
        w.body
    );
    assert!(
        p.seen()
            .iter()
            .all(|s| s.headers.get("host").map(String::as_str) != Some("pam2")),
        "the fenced primary took a request of the re-added cluster"
    );
}
