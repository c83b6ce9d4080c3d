//! Several keyway instances agreeing on the primary through a real etcd: each instance
//! is its own process (`keyway-instance`), so killing one is a real crash.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use keyway_tests::*;

/// One keyway process.
struct Instance {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Instance {
    fn start(config: &Path) -> Self {
        let log = config.with_extension("log");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyway-instance"))
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keyway-instance");
        let line = instance_ready_line(&mut child, &log);
        let words: Vec<&str> = line.split_whitespace().collect();
        Self {
            child,
            addr: words[1].parse().unwrap(),
            admin: words[3].parse().unwrap(),
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILL: no lease revoked, nothing flushed.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The farm's promotion table when a test sets none.
/// `hold` must exceed the 2 s lease: a cut-off instance stops writing first.
const PROMOTION: &str = r#"promotion = { hold = "2500ms" }"#;

fn config(
    dir: &Path,
    n: usize,
    etcd: &Etcd,
    b: &[TestBackend; 4],
    promotion: &str,
) -> std::path::PathBuf {
    config_via(dir, n, &etcd.url(), b, promotion, "", None)
}

/// An instance's config reaching etcd at `etcd_url`, with `extra` lines in
/// `[coordination]` and, when given, a fixed admin address (for failsafe peers).
fn config_via(
    dir: &Path,
    n: usize,
    etcd_url: &str,
    b: &[TestBackend; 4],
    promotion: &str,
    extra: &str,
    admin: Option<SocketAddr>,
) -> std::path::PathBuf {
    let file = dir.join(format!("keyway-{n}.toml"));
    let mut text = one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
health = {{ path = "/health", interval = "50ms", timeout = "300ms", rise = 1, fall = 2 }}
{}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica", priority = 1 }},
  {{ id = "r2", address = "{}", role = "replica", priority = 2 }},
  {{ id = "r3", address = "{}", role = "replica", priority = 3 }},
]
[coordination]
etcd = ["{}"]
prefix = "/keyway-test"
lease_ttl = "2s"
instance = "kw-{n}"
timeout = "500ms"
{extra}"#,
            promotion, b[0].addr, b[1].addr, b[2].addr, b[3].addr, etcd_url
        ),
    );
    if let Some(a) = admin {
        text = text.replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{a}\""),
            1,
        );
    }
    std::fs::write(&file, text).unwrap();
    file
}

/// The tests of this file run one at a time: each runs three keyway processes, etcd and
/// a farm, with 50 ms health checks and 500 ms etcd deadlines, on a 2-core machine.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

async fn coordination(admin: SocketAddr) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).expect("status JSON");
    s["coordination"].clone()
}

async fn topology(admin: SocketAddr) -> (u64, String) {
    let c = coordination(admin).await;
    let t = &c["clusters"]["pam"];
    (
        t["epoch"].as_u64().unwrap_or(u64::MAX),
        t["primary"].as_str().unwrap_or("").to_string(),
    )
}

async fn all_agree(instances: &[&Instance], want: (u64, &str), what: &str) {
    eventually(Duration::from_secs(15), what, || async {
        for i in instances {
            if topology(i.admin).await != (want.0, want.1.to_string()) {
                return false;
            }
        }
        true
    })
    .await;
}

async fn leader(instances: &[&Instance]) -> Option<usize> {
    for (n, i) in instances.iter().enumerate() {
        if coordination(i.admin).await["decides"] == true {
            return Some(n);
        }
    }
    None
}

/// Waits until one instance leads and every instance routes writes to the primary.
async fn ready(inst: &[Instance]) {
    eventually(Duration::from_secs(15), "one leader", || async {
        let all: Vec<&Instance> = inst.iter().collect();
        leader(&all).await.is_some()
    })
    .await;
    for i in inst {
        writes_reach_primary(i.addr, Duration::from_secs(10)).await;
    }
}

/// Waits until a write through `addr` is answered by the configured primary.
async fn writes_reach_primary(addr: SocketAddr, within: Duration) {
    eventually(within, "writes reach the primary", || async {
        try_send(addr, write())
            .await
            .is_ok_and(|r| r.status == 200 && r.backend() == "primary")
    })
    .await;
}

/// Every instance but the `n`th.
fn except(inst: &[Instance], n: usize) -> Vec<&Instance> {
    inst.iter()
        .enumerate()
        .filter(|(i, _)| *i != n)
        .map(|(_, i)| i)
        .collect()
}

/// Stops the primary `dying` with `next`'s promote hook answering only after 3 s (longer
/// than the 2 s lease), and returns once the leader's hook call reached `next`: the
/// leader is then between its hook and its commit.
async fn kill_with_promotion_in_flight(dying: &TestBackend, next: &TestBackend) {
    next.set_hook_delay(Duration::from_secs(3));
    dying.stop();
    eventually(
        Duration::from_secs(10),
        "the leader calls the promote hook",
        || async { !next.hooks().is_empty() },
    )
    .await;
}

/// The farm: a primary and three replicas.
async fn farm() -> [TestBackend; 4] {
    [
        TestBackend::start("primary").await,
        TestBackend::start("r1").await,
        TestBackend::start("r2").await,
        TestBackend::start("r3").await,
    ]
}

/// The epochs of an instance's decision history, oldest first.
async fn epochs(admin: SocketAddr) -> Vec<(u64, String)> {
    coordination(admin).await["clusters"]["pam"]["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|t| {
                    (
                        t["epoch"].as_u64().unwrap_or(u64::MAX),
                        t["primary"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request("POST", "pam", "/api/resources", "{}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_one_etcd_agree_survive_a_leader_crash_and_never_promote_without_etcd() {
    let _serial = one_at_a_time().await;
    let mut etcd = Etcd::start().await;
    let b = farm().await;
    let (p, r1, r2, r3) = (&b[0], &b[1], &b[2], &b[3]);
    let dir = unique_dir("coordination");
    let mut inst: Vec<Instance> = (0..3)
        .map(|n| Instance::start(&config(&dir, n, &etcd, &b, PROMOTION)))
        .collect();
    ready(&inst).await;

    // 1. The primary dies: every instance routes writes to the same new primary in the
    // same epoch (epoch 1 drained the old primary, epoch 2 names the new one).
    let killed = Instant::now();
    p.stop();
    let all: Vec<&Instance> = inst.iter().collect();
    all_agree(&all, (2, "r1"), "all instances on r1 in epoch 2").await;
    println!(
        "three instances agreed on the promoted primary {} ms after the kill",
        killed.elapsed().as_millis()
    );
    for i in &inst {
        let r = send(i.addr, write()).await;
        assert_eq!(r.backend(), "r1");
    }
    assert!(r1.write_epochs().iter().all(|&e| e == 2));
    for i in &inst {
        assert_eq!(epochs(i.admin).await.last(), Some(&(2, "r1".to_string())));
    }

    // 2. The leader crashes while the new primary dies: another instance takes the
    // lease and promotes; the survivors agree.
    let l = leader(&all).await.expect("a leader");
    inst[l].kill();
    r1.stop();
    let survivors = except(&inst, l);
    all_agree(&survivors, (4, "r2"), "the survivors on r2 in epoch 4").await;
    for i in &survivors {
        assert_eq!(send(i.addr, write()).await.backend(), "r2");
    }

    // 3. etcd stops, then the primary dies: nobody promotes, everyone keeps the last
    // primary it knew (writes refused, reads go on).
    etcd.stop();
    for i in &survivors {
        eventually(
            Duration::from_secs(10),
            "etcd seen as unreachable",
            || async { coordination(i.admin).await["connected"] == false },
        )
        .await;
    }
    r2.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in &survivors {
        assert_eq!(
            topology(i.admin).await,
            (4, "r2".into()),
            "no promotion without etcd"
        );
        let w = send(i.addr, write()).await;
        assert_eq!(
            w.status, 503,
            "the known primary is down and nobody may promote"
        );
        assert_eq!(
            w.json()["type"],
            "urn:keyway:error:coordination-lost",
            "without etcd the lease ran out: {}",
            w.body
        );
        assert_eq!(
            get(i.addr, "pam", "/api/read").await.status,
            200,
            "reads go on"
        );
    }

    // 4. etcd returns: they converge on one new primary (r3: the others are fenced).
    etcd.restart().await;
    all_agree(
        &survivors,
        (6, "r3"),
        "convergence on r3 in epoch 6 after etcd returns",
    )
    .await;
    // Each instance takes writes again once it holds a fresh permit (its next renewal).
    for i in &survivors {
        eventually(Duration::from_secs(5), "writes reach r3", || async {
            try_send(i.addr, write())
                .await
                .is_ok_and(|r| r.status == 200 && r.backend() == "r3")
        })
        .await;
    }
    assert!(r3.write_epochs().iter().all(|&e| e == 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_starts_without_etcd_refuses_writes_until_etcd_answers() {
    let _serial = one_at_a_time().await;
    let mut etcd = Etcd::start().await;
    etcd.stop();
    let b = farm().await;
    let dir = unique_dir("coordination-cold");
    let i = Instance::start(&config(&dir, 0, &etcd, &b, PROMOTION));
    eventually(Duration::from_secs(10), "reads served", || async {
        try_send(i.addr, request("GET", "pam", "/api/read", ""))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    // Another instance may have promoted while this one was down: it cannot know.
    let w = send(i.addr, write()).await;
    assert_eq!(w.status, 503, "{}", w.body);
    assert_eq!(coordination(i.admin).await["connected"], false);
    assert!(b[0].write_epochs().is_empty());

    etcd.restart().await;
    writes_reach_primary(i.addr, Duration::from_secs(15)).await;
    assert_eq!(topology(i.admin).await, (0, "primary".into()));
}

/// The instance holding the lease is lost between a promotion's `on_promote` hook and
/// its commit. Killed: its successor makes the promotion once, in the same epoch.
/// Stalled past its lease (SIGSTOP) and woken after another instance decided: its
/// hook answers, but its stale decision cannot commit. Either way one epoch, one
/// primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_lost_in_the_middle_of_a_promotion_leaves_exactly_one_decision() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let b = farm().await;
    let (p, r1, r2) = (&b[0], &b[1], &b[2]);
    // Hooks that answer after 3 s hold a promotion open longer than the 2 s lease.
    let promotion = r#"promotion = { hold = "2500ms", on_promote = { url = "http://{address}/admin/promote", timeout = "10s" } }"#;
    let dir = unique_dir("coordination-mid-promotion");
    let mut inst: Vec<Instance> = (0..3)
        .map(|n| Instance::start(&config(&dir, n, &etcd, &b, promotion)))
        .collect();
    ready(&inst).await;

    // 1. The leader is SIGKILLed while r1's promote hook is in flight.
    kill_with_promotion_in_flight(p, r1).await;
    let all: Vec<&Instance> = inst.iter().collect();
    let l = leader(&all).await.expect("a leader");
    assert_eq!(
        topology(inst[l].admin).await,
        (1, "".into()),
        "only the drain epoch (no primary) is committed before the hook answers"
    );
    inst[l].kill();
    r1.set_hook_delay(Duration::ZERO);
    let survivors = except(&inst, l);
    all_agree(&survivors, (2, "r1"), "the survivors on r1 in epoch 2").await;
    assert!(
        r1.hooks().len() >= 2,
        "the successor called the hook again: {:?}",
        r1.hooks()
    );
    for i in &survivors {
        assert_eq!(send(i.addr, write()).await.backend(), "r1");
    }
    assert!(r1.write_epochs().iter().all(|&e| e == 2));

    // 2. The new leader is stopped while r2's promote hook is in flight, longer than
    // its lease; the other survivor takes the lease and promotes r2; then the stalled
    // one wakes, its hook answers 200, and its commit must lose.
    kill_with_promotion_in_flight(r1, r2).await;
    let l = leader(&survivors).await.expect("a leader");
    let (stalled, other) = (survivors[l], survivors[1 - l]);
    stalled.signal("STOP");
    r2.set_hook_delay(Duration::ZERO);
    all_agree(&[other], (4, "r2"), "the other survivor promotes r2").await;
    stalled.signal("CONT");
    all_agree(&survivors, (4, "r2"), "the woken leader adopts epoch 4").await;
    // Give a stale commit every chance to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in &survivors {
        assert_eq!(topology(i.admin).await, (4, "r2".into()));
        let history = epochs(i.admin).await;
        let mut seen: Vec<u64> = history.iter().map(|(e, _)| *e).collect();
        seen.dedup();
        assert_eq!(
            seen.len(),
            history.len(),
            "one primary per epoch: {history:?}"
        );
        assert_eq!(
            history.last(),
            Some(&(4, "r2".to_string())),
            "no epoch after 4: {history:?}"
        );
        assert_eq!(send(i.addr, write()).await.backend(), "r2");
    }
    assert!(r2.hooks().len() >= 2, "{:?}", r2.hooks());
    assert!(r2.write_epochs().iter().all(|&e| e == 4));
}

/// etcd as production runs it: TLS on the client port and `--client-cert-auth`. keyway
/// elects, stores and watches through it with `ca`/`cert`/`key`, and calls an
/// `https://` promote hook verified with the cluster's `upstream_ca`. Without a client
/// certificate etcd refuses keyway, and `/status` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate_and_https_hooks() {
    let _serial = one_at_a_time().await;
    let pki = TestPki::new();
    let etcd = Etcd::start_tls(&pki).await;
    let leaf = pki.leaf("backends", &["127.0.0.1"]);
    let p = TestBackend::start_tls("primary", &leaf, Duration::ZERO).await;
    let r1 = TestBackend::start_tls("r1", &leaf, Duration::ZERO).await;
    let me = pki.leaf("keyway-client", &["keyway"]);
    let config = |identity: &str| {
        one_cluster(
            "pam",
            &format!(
                r#"strategy = "primary-replica"
upstream_ca = "{ca}"
health = {{ path = "/health", interval = "50ms", timeout = "300ms", rise = 1, fall = 2 }}
promotion = {{ hold = "2500ms", on_promote = {{ url = "https://{{address}}/admin/promote", timeout = "2s" }} }}
backends = [
  {{ id = "primary", address = "{}", role = "primary", tls = true }},
  {{ id = "r1", address = "{}", role = "replica", tls = true }},
]
[coordination]
etcd = ["{}"]
prefix = "/keyway-tls"
lease_ttl = "2s"
timeout = "500ms"
ca = "{ca}"
{identity}"#,
                p.addr,
                r1.addr,
                etcd.url(),
                ca = pki.ca_pem.display(),
            ),
        )
    };
    let proxy = Proxy::start(&config(&format!(
        "cert = \"{}\"\nkey = \"{}\"",
        me.cert_pem.display(),
        me.key_pem.display()
    )))
    .await;
    let admin = proxy.admin.unwrap();
    eventually(Duration::from_secs(15), "leader over TLS", || async {
        coordination(admin).await["decides"] == true
    })
    .await;
    writes_reach_primary(proxy.addr, Duration::from_secs(10)).await;

    p.stop();
    eventually(Duration::from_secs(15), "r1 promoted", || async {
        topology(admin).await == (2, "r1".to_string())
    })
    .await;
    assert_eq!(r1.hooks(), vec!["/admin/promote".to_string()]);
    assert_eq!(send(proxy.addr, write()).await.backend(), "r1");
    // The decision is in etcd, read back over TLS with another client identity.
    let reader = pki.client_config_as(&pki.leaf("reader", &["reader"]));
    let key = base64::engine::general_purpose::STANDARD.encode("/keyway-tls/clusters/pam/topology");
    let got = try_send_tls(
        etcd.addr,
        "127.0.0.1",
        reader,
        request(
            "POST",
            "etcd",
            "/v3/kv/range",
            &format!(r#"{{"key":"{key}"}}"#),
        ),
    )
    .await
    .expect("etcd over TLS");
    let v: serde_json::Value = serde_json::from_str(&got.body).unwrap();
    use base64::Engine as _;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(v["kvs"][0]["value"].as_str().expect("the topology key"))
        .unwrap();
    let t: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        (t["epoch"].as_u64(), t["primary"].as_str()),
        (Some(2), Some("r1"))
    );

    // No client certificate: etcd refuses the handshake; keyway says so and decides nothing.
    let anonymous = Proxy::start(&config("")).await;
    let admin = anonymous.admin.unwrap();
    eventually(Duration::from_secs(10), "the refusal reported", || async {
        let c = coordination(admin).await;
        // etcd answers the handshake with a TLS alert (bad_certificate or
        // certificate_required, by version), which keyway reports as it came.
        c["connected"] == false
            && c["last_error"]
                .as_str()
                .is_some_and(|e| e.to_ascii_lowercase().contains("certificate"))
    })
    .await;
    assert_eq!(coordination(admin).await["decides"], false);
    proxy.shutdown().await;
    anonymous.shutdown().await;
}

// === write leases: no split brain ===

/// One request of the load, as its client saw it.
#[derive(Clone, Debug)]
struct Sent {
    instance: usize,
    write: bool,
    at: Instant,
    status: u16,
    problem: String,
}

/// One client per instance, alternating writes and reads (each tagged with the
/// instance it went through) until `stop`.
fn tagged_load(
    addrs: Vec<SocketAddr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Sent>>> {
    addrs
        .into_iter()
        .enumerate()
        .map(|(n, addr)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut log = Vec::new();
                let mut k = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && log.len() < 100_000 {
                    k += 1;
                    let write = k.is_multiple_of(2);
                    let mut req = if write {
                        write_req()
                    } else {
                        request("GET", "pam", "/api/read", "")
                    };
                    req.headers_mut()
                        .insert("x-test-instance", n.to_string().parse().unwrap());
                    let at = Instant::now();
                    let (status, problem) =
                        match tokio::time::timeout(Duration::from_secs(3), try_send(addr, req))
                            .await
                        {
                            Ok(Ok(r)) => {
                                let problem = if r.status == 200 {
                                    String::new()
                                } else {
                                    r.json()["type"].as_str().unwrap_or("").to_string()
                                };
                                (r.status.as_u16(), problem)
                            }
                            _ => (0, String::new()),
                        };
                    log.push(Sent {
                        instance: n,
                        write,
                        at,
                        status,
                        problem,
                    });
                    if status != 200 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                log
            })
        })
        .collect()
}

fn write_req() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    write()
}

/// Requests a backend took, with the instance that sent each.
fn taken(b: &TestBackend, writes: bool) -> Vec<(usize, Instant, Option<u64>)> {
    b.seen()
        .into_iter()
        .filter(|s| (s.method == "POST") == writes)
        .filter_map(|s| {
            let n = s.headers.get("x-test-instance")?.parse().ok()?;
            let epoch = s.headers.get("keyway-epoch").and_then(|e| e.parse().ok());
            Some((n, s.at, epoch))
        })
        .collect()
}

/// The issue's scenario: instance 0 is cut off from etcd, the primary dies, the others
/// promote r1; the old primary comes back healthy while instance 0 is still cut off;
/// then the partition heals. From the backends' own records: the old primary took no
/// write after r1 took its first, and instance 0 sent nothing to it once its permit ran
/// out.
async fn partition(link: Link) {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let b = farm().await;
    let (p, r1) = (&b[0], &b[1]);
    let dir = unique_dir("coordination-partition");
    let mut fwd = Vec::new();
    for _ in 0..3 {
        fwd.push(Forwarder::start(etcd.addr).await);
    }
    let inst: Vec<Instance> = (0..3)
        .map(|n| {
            Instance::start(&config_via(
                &dir,
                n,
                &format!("http://{}", fwd[n].addr),
                &b,
                PROMOTION,
                "",
                None,
            ))
        })
        .collect();
    ready(&inst).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tagged_load(inst.iter().map(|i| i.addr).collect(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Cut instance 0 and kill the primary.
    let cut = Instant::now();
    fwd[0].set(link);
    p.stop();
    let others: Vec<&Instance> = inst[1..].iter().collect();
    all_agree(&others, (2, "r1"), "instances 1 and 2 promote r1").await;
    // The old primary comes back healthy while instance 0 is still cut off, for longer
    // than the lease.
    let p = p.restart().await;
    let back = Instant::now();
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let held_while_cut = coordination(inst[0].admin).await["write_permit"]["held"].clone();
    let heal = Instant::now();
    fwd[0].set(Link::Open);
    let all: Vec<&Instance> = inst.iter().collect();
    all_agree(&all, (2, "r1"), "instance 0 converges on r1 after the heal").await;
    eventually(
        Duration::from_secs(10),
        "instance 0 writes to r1",
        || async {
            let mut w = write();
            w.headers_mut()
                .insert("x-test-instance", "0".parse().unwrap());
            try_send(inst[0].addr, w)
                .await
                .is_ok_and(|r| r.status == 200 && r.backend() == "r1")
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = Vec::new();
    for t in load {
        sent.extend(t.await.unwrap());
    }

    // Writes per backend per instance between the cut and the heal.
    let between = |v: &[(usize, Instant, Option<u64>)], n: usize| {
        v.iter()
            .filter(|(i, at, _)| *i == n && *at >= cut && *at <= heal)
            .count()
    };
    let (pw, r1w) = (taken(&p, true), taken(r1, true));
    println!(
        "{link:?}: writes between cut and heal per instance 0/1/2: old primary {:?}, r1 {:?}",
        (0..3).map(|n| between(&pw, n)).collect::<Vec<_>>(),
        (0..3).map(|n| between(&r1w, n)).collect::<Vec<_>>(),
    );
    let first_r1 = r1w
        .iter()
        .map(|(_, at, _)| *at)
        .min()
        .expect("r1 took writes");
    let last_p = pw
        .iter()
        .map(|(_, at, _)| *at)
        .max()
        .expect("the primary took writes");
    assert!(
        last_p < first_r1,
        "{link:?}: the old primary took a write {:?} after r1 took its first",
        last_p - first_r1
    );
    assert!(
        pw.iter().all(|(_, at, _)| *at < back),
        "the fenced old primary took writes after it came back"
    );
    assert!(
        r1w.iter().all(|(_, _, e)| *e == Some(2)),
        "every write on r1 carries epoch 2"
    );
    assert_eq!(
        between(&r1w, 0),
        0,
        "instance 0 wrote nowhere while cut off"
    );
    // Instance 0 refused writes with coordination-lost within its lease.
    let refused = sent
        .iter()
        .filter(|s| s.instance == 0 && s.write && s.at > cut)
        .find(|s| s.problem == "urn:keyway:error:coordination-lost")
        .expect("instance 0 refused writes while cut off");
    let after = refused.at - cut;
    println!(
        "{link:?}: instance 0 refused writes {} ms after the cut",
        after.as_millis()
    );
    // The permit runs out 1.85 s after the last renewal sent before the cut; the next
    // write the client sends after that is refused.
    assert!(
        after < Duration::from_millis(2500),
        "{after:?}: not within the 2 s lease"
    );
    // And read nothing from the old primary once its permit ran out.
    let p_reads = taken(&p, false)
        .into_iter()
        .filter(|(n, at, _)| *n == 0 && *at >= refused.at && *at <= heal)
        .count();
    assert_eq!(
        p_reads, 0,
        "instance 0 read from the primary it could not confirm"
    );
    assert!(
        sent.iter()
            .filter(|s| !s.write)
            .all(|s| s.status == 200 || s.at < cut + Duration::from_millis(600)),
        "reads kept working: {:?}",
        sent.iter()
            .filter(|s| !s.write && s.status != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        held_while_cut, false,
        "/status shows no permit while cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_instance_stops_writing_before_the_others_promote_refused() {
    partition(Link::Refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_instance_stops_writing_before_the_others_promote_black_holed() {
    partition(Link::BlackHoled).await;
}

/// The failsafe: one instance cut off alone gets none; etcd gone for all three keeps
/// writes going past the lease; a peer down ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_the_failsafe_keeps_writes_only_while_every_peer_agrees() {
    let _serial = one_at_a_time().await;
    let mut etcd = Etcd::start().await;
    let b = farm().await;
    let dir = unique_dir("coordination-failsafe");
    let admins: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let mut fwd = Vec::new();
    for _ in 0..3 {
        fwd.push(Forwarder::start(etcd.addr).await);
    }
    let mut inst: Vec<Instance> = (0..3)
        .map(|n| {
            let peers: Vec<String> = (0..3)
                .filter(|&m| m != n)
                .map(|m| format!("\"http://{}\"", admins[m]))
                .collect();
            Instance::start(&config_via(
                &dir,
                n,
                &format!("http://{}", fwd[n].addr),
                &b,
                PROMOTION,
                &format!("failsafe = {{ peers = [{}] }}", peers.join(", ")),
                Some(admins[n]),
            ))
        })
        .collect();
    ready(&inst).await;
    let write_status = |addr: SocketAddr| async move {
        let r = send(addr, write()).await;
        (
            r.status.as_u16(),
            r.json()["type"].as_str().unwrap_or("").to_string(),
        )
    };

    // 1. Instance 0 alone is cut off: its peers still reach etcd, so no failsafe.
    fwd[0].set(Link::Refused);
    eventually(
        Duration::from_secs(10),
        "instance 0 refuses writes",
        || async {
            write_status(inst[0].addr).await == (503, "urn:keyway:error:coordination-lost".into())
        },
    )
    .await;
    let c = coordination(inst[0].admin).await;
    assert!(
        c["failsafe"]
            .as_str()
            .is_some_and(|f| f.contains("still reaches etcd")),
        "{c}"
    );
    assert_eq!(write_status(inst[1].addr).await.0, 200);
    fwd[0].set(Link::Open);
    writes_reach_primary(inst[0].addr, Duration::from_secs(10)).await;

    // 2. etcd is gone for everyone: every instance keeps the primary through the
    // failsafe, longer than the lease.
    etcd.stop();
    let lost = Instant::now();
    for i in &inst {
        eventually(Duration::from_secs(10), "failsafe active", || async {
            coordination(i.admin).await["failsafe"] == "active"
        })
        .await;
    }
    println!(
        "failsafe active on all three {} ms after etcd stopped",
        lost.elapsed().as_millis()
    );
    let until = Instant::now() + Duration::from_secs(3);
    let mut ok = 0;
    while Instant::now() < until {
        for i in &inst {
            let r = send(i.addr, write()).await;
            assert_eq!(
                (r.status.as_u16(), r.backend()),
                (200, "primary".to_string()),
                "a write under the failsafe: {}",
                r.body
            );
            ok += 1;
        }
    }
    println!("{ok} writes through three instances in 3 s under the failsafe");
    assert!(
        lost.elapsed() > Duration::from_secs(3),
        "writes went on well past the 2 s lease"
    );

    // 3. A peer dies: the others cannot reach every peer, so writes stop; reads go on.
    inst[2].kill();
    let killed = Instant::now();
    for i in &inst[..2] {
        eventually(Duration::from_secs(10), "writes refused", || async {
            write_status(i.addr).await.0 == 503
        })
        .await;
        assert_eq!(get(i.addr, "pam", "/api/read").await.status, 200);
        let c = coordination(i.admin).await;
        assert!(
            c["failsafe"]
                .as_str()
                .is_some_and(|f| f.contains(&admins[2].to_string())),
            "{c}"
        );
    }
    println!(
        "writes refused {} ms after a failsafe peer died",
        killed.elapsed().as_millis()
    );
}

/// A switchover waits for another instance's write in flight to the old primary (even
/// across that instance's reload) instead of sleeping a fixed drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_waits_for_writes_in_flight_on_every_instance() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let b = farm().await;
    let (p, r1) = (&b[0], &b[1]);
    let dir = unique_dir("coordination-switchover");
    let inst: Vec<Instance> = (0..2)
        .map(|n| Instance::start(&config(&dir, n, &etcd, &b, PROMOTION)))
        .collect();
    ready(&inst).await;
    // A slow write on instance 0: the primary answers it after 2.5 s.
    let addr = inst[0].addr;
    let slow = tokio::spawn(async move {
        let mut w = write();
        w.headers_mut()
            .insert("x-test-delay-ms", "2500".parse().unwrap());
        let r = send(addr, w).await;
        (r.status.as_u16(), r.backend(), Instant::now())
    });
    eventually(
        Duration::from_secs(5),
        "the slow write reached the primary",
        || async {
            p.seen()
                .iter()
                .any(|s| s.headers.contains_key("x-test-delay-ms"))
        },
    )
    .await;
    // Instance 0 reloads meanwhile; the write stays counted.
    let r = send(inst[0].admin, request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let asked = Instant::now();
    let r = send(
        inst[1].admin,
        request("POST", "admin", "/clusters/pam/promote/r1", ""),
    )
    .await;
    let done = Instant::now();
    assert_eq!(r.status, 200, "{}", r.body);
    let (status, backend, ended) = slow.await.unwrap();
    assert_eq!((status, backend.as_str()), (200, "primary"));
    println!(
        "the switchover waited {} ms for instance 0's write",
        (done - asked).as_millis()
    );
    // The write's ticket is released when keyway has sent its response; its client
    // notes the end a moment later.
    assert!(
        ended_before(ended, done + Duration::from_millis(150)),
        "the switchover returned {:?} before the write in flight ended",
        ended.saturating_duration_since(done)
    );
    let all: Vec<&Instance> = inst.iter().collect();
    all_agree(&all, (2, "r1"), "both on r1").await;
    for i in &inst {
        assert_eq!(send(i.addr, write()).await.backend(), "r1");
    }
    let first_r1 = r1
        .seen()
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| s.at)
        .min()
        .unwrap();
    assert!(
        p.seen()
            .iter()
            .filter(|s| s.method == "POST")
            .all(|s| s.at < first_r1),
        "the old primary took a write after the new one"
    );
    assert!(
        ended_before(ended, first_r1),
        "r1 took a write before the slow write to the primary ended"
    );
}

/// `a` came before `b`, give or take the scheduling of the client that saw `a`.
fn ended_before(a: Instant, b: Instant) -> bool {
    a <= b + Duration::from_millis(50)
}

// === the etcd client ===

fn endpoint(addr: SocketAddr) -> keyway_proxy::etcd::Endpoint {
    keyway_proxy::etcd::Endpoint {
        addr,
        at: keyway_proxy::config::EtcdEndpoint {
            authority: addr.to_string(),
            tls: false,
        },
    }
}

/// A compare-and-swap whose answer is lost (the transaction reached etcd and committed)
/// is read back, not re-sent blindly: the client reports it done, with the revision it
/// committed at, and the key holds the value once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_transaction_is_read_back_not_sent_again() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let lossy = Forwarder::start(etcd.addr).await;
    lossy.set(Link::OneWay);
    let client = keyway_proxy::etcd::Client::new(
        vec![endpoint(lossy.addr), endpoint(etcd.addr)],
        None,
        Duration::from_millis(500),
    );
    let seed =
        keyway_proxy::etcd::Client::new(vec![endpoint(etcd.addr)], None, Duration::from_secs(2));
    let before = match seed.swap("/t/key", 0, b"v1", None).await.unwrap() {
        keyway_proxy::etcd::Swap::Done(rev) => rev,
        keyway_proxy::etcd::Swap::Lost(kv) => panic!("seed lost: {kv:?}"),
    };
    // The swap reaches etcd through the one-way endpoint, commits, and its answer is
    // lost; a blind re-send to the second endpoint would fail its compare.
    match client.swap("/t/key", before, b"v2", None).await.unwrap() {
        keyway_proxy::etcd::Swap::Done(rev) => assert!(rev > before),
        keyway_proxy::etcd::Swap::Lost(kv) => panic!("a committed swap reported lost: {kv:?}"),
    }
    let kv = seed.get("/t/key").await.unwrap().unwrap();
    assert_eq!(kv.value, b"v2");
    // A swap that really lost says so, with the current value.
    match client.swap("/t/key", before, b"v3", None).await.unwrap() {
        keyway_proxy::etcd::Swap::Lost(Some(kv)) => assert_eq!(kv.value, b"v2"),
        other => panic!("a stale swap must lose: {other:?}"),
    }
}

/// Lease keep-alives reuse one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_reuse_one_connection() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let fwd = Forwarder::start(etcd.addr).await;
    let client =
        keyway_proxy::etcd::Client::new(vec![endpoint(fwd.addr)], None, Duration::from_secs(2));
    let (lease, ttl) = client.grant(5).await.unwrap();
    assert_eq!(ttl, 5);
    for _ in 0..20 {
        assert!(client.keep_alive(lease).await.unwrap() > 0);
    }
    assert_eq!(
        fwd.accepted(),
        1,
        "one connection for a grant and 20 keep-alives"
    );
    client.revoke(lease).await.unwrap();
    assert_eq!(
        client.keep_alive(lease).await.unwrap(),
        0,
        "a revoked lease has no TTL"
    );
}

/// An instance name is claimed by one process at a time (a second one could otherwise
/// acknowledge drains for the first); a registration deleted by hand is restored; and
/// `/status` shows the registration, the instances and the watch's progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_name_is_claimed_once_and_a_deleted_registration_comes_back() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let b = farm().await;
    let dir = unique_dir("coordination-names");
    let first = Instance::start(&config(&dir, 0, &etcd, &b, PROMOTION));
    ready(std::slice::from_ref(&first)).await;
    let c = coordination(first.admin).await;
    assert_eq!(c["registered"], true, "{c}");
    assert_eq!(c["instances"], serde_json::json!(["kw-0"]), "{c}");
    assert_eq!(c["write_permit"]["held"], true, "{c}");
    assert_eq!(c["write_permit"]["by"], "etcd", "{c}");
    eventually(
        Duration::from_secs(5),
        "the watch reports progress",
        || async {
            coordination(first.admin).await["watch_current_revision"]
                .as_i64()
                .is_some_and(|r| r > 0)
        },
    )
    .await;

    // A second process with the same name is refused its registration, so no permit.
    let dup_dir = unique_dir("coordination-names-dup");
    let second = Instance::start(&config(&dup_dir, 0, &etcd, &b, PROMOTION));
    eventually(
        Duration::from_secs(10),
        "the duplicate name reported",
        || async {
            let c = coordination(second.admin).await;
            c["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("is registered by another process"))
        },
    )
    .await;
    let w = send(second.addr, write()).await;
    assert_eq!(w.status, 503, "{}", w.body);
    assert_eq!(coordination(second.admin).await["registered"], false);
    assert_eq!(send(first.addr, write()).await.backend(), "primary");

    drop(second);

    // The registration is deleted by hand: the first instance restores it.
    let client =
        keyway_proxy::etcd::Client::new(vec![endpoint(etcd.addr)], None, Duration::from_secs(2));
    let key = "/keyway-test/instances/kw-0";
    let lease = client.get(key).await.unwrap().expect("registered").lease;
    delete(&etcd, key).await;
    eventually(
        Duration::from_secs(5),
        "the registration restored",
        || async {
            client
                .get(key)
                .await
                .ok()
                .flatten()
                .is_some_and(|kv| kv.lease == lease)
        },
    )
    .await;
    writes_reach_primary(first.addr, Duration::from_secs(5)).await;
}

/// Deletes one key through etcd's gateway.
async fn delete(etcd: &Etcd, key: &str) {
    use base64::Engine as _;
    let k = base64::engine::general_purpose::STANDARD.encode(key);
    let r = send(
        etcd.addr,
        request(
            "POST",
            "etcd",
            "/v3/kv/deleterange",
            &format!(r#"{{"key":"{k}"}}"#),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A write whose body is still arriving when the instance's lease runs out is cut off
/// before the primary has all of it, so the primary never acts on it after another
/// backend could have become primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_still_uploading_when_the_lease_lapses_is_cut_off() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let b = farm().await;
    let fwd = Forwarder::start(etcd.addr).await;
    let dir = unique_dir("coordination-upload");
    let inst = Instance::start(&config_via(
        &dir,
        0,
        &format!("http://{}", fwd.addr),
        &b,
        PROMOTION,
        "",
        None,
    ));
    ready(std::slice::from_ref(&inst)).await;
    // 30 chunks of 1 KiB, one every 200 ms: 6 s of upload.
    let chunks = futures_util::stream::unfold(0u32, |n| async move {
        if n == 30 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((
            Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
                b'x';
                1024
            ]))),
            n + 1,
        ))
    });
    let addr = inst.addr;
    let upload = tokio::spawn(async move {
        let resp = send_streaming(addr, "POST", "pam", "/api/upload", chunks).await;
        let status = resp.status().as_u16();
        let body = read(resp).await.map(|g| g.body).unwrap_or_default();
        (status, body)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = Instant::now();
    fwd.set(Link::Refused);
    let (status, body) = upload.await.unwrap();
    println!(
        "the upload was answered {status} {} ms after the cut",
        cut.elapsed().as_millis()
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("coordination-lost"), "{body}");
    assert!(
        cut.elapsed() < Duration::from_secs(4),
        "cut off within the lease, not at the end of the upload"
    );
    // Give a late body every chance to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        b[0].seen().iter().all(|s| s.path != "/api/upload"),
        "the primary received the whole write after the lease ran out"
    );
}

/// One etcd endpoint black-holed: the client learns which endpoint answers and goes
/// there first, so each call does not pay the dead one's timeout again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_etcd_endpoint_costs_one_timeout_not_one_per_call() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let dead = Forwarder::start(etcd.addr).await;
    dead.set(Link::BlackHoled);
    let client = keyway_proxy::etcd::Client::new(
        vec![endpoint(dead.addr), endpoint(etcd.addr)],
        None,
        Duration::from_millis(500),
    );
    let (lease, _) = client.grant(5).await.unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        assert!(client.keep_alive(lease).await.unwrap() > 0);
    }
    // Ten calls each paying the 500 ms timeout would take 5 s.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "10 keep-alives took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_made_on_one_instance_is_seen_by_every_instance() {
    let _serial = one_at_a_time().await;
    let etcd = Etcd::start().await;
    let b = farm().await;
    let dir = unique_dir("coordination-drain");
    let inst: Vec<Instance> = (0..2)
        .map(|n| Instance::start(&config(&dir, n, &etcd, &b, PROMOTION)))
        .collect();
    ready(&inst).await;
    let r = send(
        inst[0].admin,
        request("POST", "admin", "/clusters/pam/backends/r1/drain", ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["drain"]["instance"], "kw-0");
    eventually(
        Duration::from_secs(10),
        "the other instance to see the drain",
        || async { !backend_status(inst[1].admin, "pam", "r1").await["drain"].is_null() },
    )
    .await;
    for _ in 0..20 {
        let r = get(inst[1].addr, "h", "/").await;
        assert_eq!(r.status, 200);
        assert_ne!(
            r.backend(),
            "r1",
            "a read took a new session on the drained replica"
        );
    }
    // Undrained on the other instance: the first sees that too.
    let r = send(
        inst[1].admin,
        request("POST", "admin", "/clusters/pam/backends/r1/undrain", ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(10),
        "the first instance to see the undrain",
        || async { backend_status(inst[0].admin, "pam", "r1").await["drain"].is_null() },
    )
    .await;
}
