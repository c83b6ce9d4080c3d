//! WebAssembly policy plugins: the bundled ones behave as documented; plugins that loop,
//! hog memory, trap, return nonsense or refuse their config are contained; classifier
//! and health plugins work inside the proxy with every `on_error` rule; reload swaps them.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use keyway::classify::Kind;
use keyway::config::{BackendConfig, Role, UpstreamProtocol};
use keyway::health::{Health, Probe};
use keyway::plugin::{
    ClassifierPlugin, HealthPlugin, PluginError, PromotionCandidate, PromotionDecision,
    PromotionPlugin,
};
use keyway_tests::*;

fn backend() -> BackendConfig {
    BackendConfig {
        id: "vault-a".into(),
        address: "127.0.0.1:1".parse().unwrap(),
        weight: 1,
        priority: 0,
        tls: false,
        sni: "vault".into(),
        protocol: UpstreamProtocol::Http1,
        role: Role::Replica,
        location: String::new(),
        max_connections: keyway::config::DEFAULT_BACKEND_MAX_CONNECTIONS,
        max_queue: keyway::config::DEFAULT_BACKEND_MAX_QUEUE,
    }
}

fn history(results: &[bool]) -> VecDeque<Probe> {
    results
        .iter()
        .map(|&ok| Probe {
            at: Instant::now(),
            at_wall: SystemTime::now(),
            ok,
            status: Some(if ok { 200 } else { 500 }),
            latency: Duration::from_millis(1),
            error: None,
            lag_ms: None,
        })
        .collect()
}

#[test]
fn rise_fall_and_failed_checks_plugins() {
    let rf = HealthPlugin::load(&plugin("rise-fall"), r#"{"rise": 2, "fall": 3}"#).unwrap();
    let e = Instant::now();
    let b = backend();
    let eval = |cur, h: &[bool]| rf.evaluate(&b, cur, &history(h), e).unwrap().0;
    assert_eq!(
        eval(Health::Healthy, &[false, false, false]),
        Health::Unhealthy
    );
    assert_eq!(
        eval(Health::Healthy, &[true, false, false]),
        Health::Healthy,
        "degraded still routes"
    );
    assert_eq!(eval(Health::Unhealthy, &[false, true]), Health::Unhealthy);
    assert_eq!(
        eval(Health::Unhealthy, &[false, true, true]),
        Health::Healthy
    );

    let fc = HealthPlugin::load(
        &plugin("failed-checks"),
        r#"{"failures": 3, "window": "5m"}"#,
    )
    .unwrap();
    let (h, why) = fc
        .evaluate(
            &b,
            Health::Healthy,
            &history(&[false, true, false, false]),
            e,
        )
        .unwrap();
    assert_eq!(h, Health::Unhealthy);
    assert!(why.contains("3 failed checks"), "{why}");
    assert_eq!(
        fc.evaluate(&b, Health::Healthy, &history(&[false, true, true]), e)
            .unwrap()
            .0,
        Health::Healthy
    );

    let bad = HealthPlugin::load(&plugin("failed-checks"), r#"{"window": "soon"}"#).unwrap_err();
    assert!(
        bad.contains("refused its configuration") && bad.contains("soon"),
        "{bad}"
    );
}

fn cand(
    id: &str,
    priority: u32,
    location: &str,
    healthy: bool,
    lag: Option<u64>,
) -> PromotionCandidate {
    PromotionCandidate {
        id: id.into(),
        priority,
        location: location.into(),
        healthy,
        lag_ms: lag,
        last_ok_ms: 1,
    }
}

#[test]
fn promotion_plugins_choose_as_documented() {
    let cands = [
        cand("ro-west", 2, "west", true, Some(50)),
        cand("ro-east", 1, "east", true, Some(900)),
        cand("ro-dead", 0, "east", false, Some(0)),
    ];
    let dead_primary = cand("primary", 0, "east", false, None);
    let live_primary = cand("primary", 0, "east", true, None);

    let prio = PromotionPlugin::load(&plugin("priority-promotion"), "{}").unwrap();
    assert_eq!(
        prio.decide(Some(&live_primary), &cands, 0).unwrap(),
        PromotionDecision::Keep
    );
    assert_eq!(
        prio.decide(Some(&dead_primary), &cands, 0).unwrap(),
        PromotionDecision::Promote("ro-east".into()),
        "first healthy by priority"
    );
    let west = PromotionPlugin::load(
        &plugin("priority-promotion"),
        r#"{"prefer_location": "west"}"#,
    )
    .unwrap();
    assert_eq!(
        west.decide(None, &cands, 0).unwrap(),
        PromotionDecision::Promote("ro-west".into())
    );
    assert_eq!(
        prio.decide(None, &cands[2..], 0).unwrap(),
        PromotionDecision::None
    );

    let lag = PromotionPlugin::load(&plugin("least-lag-promotion"), "{}").unwrap();
    assert_eq!(
        lag.decide(Some(&dead_primary), &cands, 0).unwrap(),
        PromotionDecision::Promote("ro-west".into())
    );
    let strict =
        PromotionPlugin::load(&plugin("least-lag-promotion"), r#"{"max_lag_ms": 10}"#).unwrap();
    assert_eq!(
        strict.decide(None, &cands, 0).unwrap(),
        PromotionDecision::None
    );
}

#[test]
fn pam_classifier_knows_the_read_only_calls() {
    let c = ClassifierPlugin::load(
        &plugin("pam-classifier"),
        r#"{"extra_reads": ["POST /custom/*/peek"]}"#,
    )
    .unwrap();
    let k = |m: &str, p: &str| c.classify(m, p, "pvwa.corp.test").unwrap();
    assert_eq!(k("GET", "/PasswordVault/api/Accounts"), Kind::Read);
    assert_eq!(
        k("POST", "/PasswordVault/api/Accounts/12_3/Password/Retrieve"),
        Kind::Read
    );
    assert_eq!(
        k("POST", "/PasswordVault/api/Accounts/12_3/PSMConnect"),
        Kind::Read
    );
    assert_eq!(
        k("POST", "/restapi/json/v1/resources/4/accounts/9/password"),
        Kind::Read
    );
    assert_eq!(k("POST", "/custom/7/peek"), Kind::Read);
    assert_eq!(
        k("POST", "/PasswordVault/api/Accounts/12_3/Password/Update"),
        Kind::Write
    );
    assert_eq!(k("DELETE", "/PasswordVault/api/Accounts/12_3"), Kind::Write);
    let err =
        ClassifierPlugin::load(&plugin("pam-classifier"), r#"{"extra_reads": [5]}"#).unwrap_err();
    assert!(err.contains("refused its configuration"), "{err}");
}

/// A thread keeps one configured instance per classifier version; once a version is
/// swapped out and dropped, its instances go with the thread's next call of the new
/// one, so hot swaps do not pile up instances (each holds its own linear memory).
#[test]
fn swapped_out_classifier_versions_free_their_thread_instances() {
    let v = |extra: &str| {
        ClassifierPlugin::load(
            &plugin("pam-classifier"),
            &format!(r#"{{"extra_reads": ["POST /{extra}"]}}"#),
        )
        .unwrap()
    };
    // A thread of its own: the test harness may run other tests on this one.
    std::thread::spawn(move || {
        let count = keyway::plugin::classifier_instances_on_this_thread;
        let mut current = v("v0");
        assert_eq!(current.classify("POST", "/v0", "h").unwrap(), Kind::Read);
        assert_eq!(count(), 1);
        for n in 1..=20 {
            let next = v(&format!("v{n}"));
            // While a request may still use the old version, both are kept.
            assert_eq!(
                next.classify("POST", &format!("/v{n}"), "h").unwrap(),
                Kind::Read
            );
            assert_eq!(count(), 2);
            drop(std::mem::replace(&mut current, next));
            let other = v("other");
            other.classify("GET", "/", "h").unwrap();
            assert_eq!(count(), 2, "the dropped version's instance is gone");
            drop(other);
        }
        assert_eq!(current.classify("POST", "/v20", "h").unwrap(), Kind::Read);
        assert_eq!(current.classify("POST", "/v0", "h").unwrap(), Kind::Write);
    })
    .join()
    .unwrap();
}

#[test]
fn misbehaving_plugins_are_contained() {
    let mk = |mode: &str| {
        ClassifierPlugin::load(
            &plugin("misbehave-classifier"),
            &format!(r#"{{"mode": "{mode}"}}"#),
        )
        .unwrap()
    };

    let spin = mk("spin");
    let t = Instant::now();
    assert_eq!(spin.classify("GET", "/", "h"), Err(PluginError::Timeout));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "interrupted at its deadline: {:?}",
        t.elapsed()
    );

    assert_eq!(
        mk("hog").classify("GET", "/", "h"),
        Err(PluginError::Memory)
    );
    assert!(matches!(
        mk("trap").classify("GET", "/", "h"),
        Err(PluginError::Trap(_))
    ));

    let refused = ClassifierPlugin::load(&plugin("misbehave-classifier"), r#"{"mode": "reject"}"#)
        .unwrap_err();
    assert!(refused.contains("refused on purpose"), "{refused}");

    let nonsense =
        HealthPlugin::load(&plugin("misbehave-health"), r#"{"mode": "nonsense"}"#).unwrap();
    let r = nonsense.evaluate(
        &backend(),
        Health::Healthy,
        &history(&[true]),
        Instant::now(),
    );
    assert!(matches!(r, Err(PluginError::InvalidOutput(_))), "{r:?}");

    // A good instance keeps answering after its neighbours failed, and a trapped one is
    // replaced: the next call works again.
    let ok = mk("ok");
    for _ in 0..100 {
        assert_eq!(ok.classify("POST", "/x", "h"), Ok(Kind::Write));
    }
    assert_eq!(ok.meta.errors(), 0);
    assert_eq!(spin.meta.errors(), 1);

    let not_a_plugin = unique_dir("bad-plugin").join("x.wasm");
    std::fs::write(&not_a_plugin, b"\0asm garbage").unwrap();
    let err = ClassifierPlugin::load(&not_a_plugin, "{}").unwrap_err();
    assert!(err.contains("not a WebAssembly component"), "{err}");
    let wrong_world = ClassifierPlugin::load(&plugin("rise-fall"), "{}").unwrap_err();
    assert!(
        wrong_world.contains("not a keyway request classifier"),
        "{wrong_world}"
    );
}

async fn farm(classifier: &str) -> (TestBackend, TestBackend, Proxy) {
    let primary = TestBackend::start("primary").await;
    let replica = TestBackend::start("replica").await;
    let cfg = one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
{classifier}
backends = [{{ id = "primary", address = "{}", role = "primary" }}, {{ id = "replica", address = "{}", role = "replica" }}]
"#,
            primary.addr, replica.addr
        ),
    );
    (primary, replica, Proxy::start(&cfg).await)
}

fn classifier(plugin_name: &str, config: &str, on_error: &str) -> String {
    format!(
        r#"classifier = {{ policy = "{}", config = {config}, on_error = "{on_error}" }}"#,
        plugin(plugin_name).display()
    )
}

#[tokio::test]
async fn classifier_plugin_routes_requests_in_the_proxy() {
    let (_p, _r, proxy) = farm(&classifier("pam-classifier", "{}", "fallback")).await;
    let call = |m: &'static str, path: &'static str| async move {
        send(proxy.addr, request(m, "pvwa.corp.test", path, "{}"))
            .await
            .backend()
    };
    assert_eq!(
        call("POST", "/PasswordVault/api/Accounts/1/Password/Retrieve").await,
        "replica"
    );
    assert_eq!(
        call("POST", "/PasswordVault/api/Accounts/1/Password/Update").await,
        "primary"
    );
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin.unwrap(), "/status").await).unwrap();
    let p = &status["clusters"][0]["plugins"][0];
    assert_eq!(p["name"], "pam-classifier");
    assert_eq!(p["kind"], "classifier");
    assert!(p["calls"].as_u64().unwrap() >= 2);
    assert_eq!(p["sha256"].as_str().unwrap().len(), 16);
}

#[tokio::test]
async fn a_failing_classifier_never_stops_traffic_and_on_error_applies() {
    // trap on every call; each on_error rule decides where a GET and a POST go.
    for (on_error, get_to, post_to) in [
        ("fallback", "replica", "primary"),
        ("fail-closed", "primary", "primary"),
        ("fail-open", "replica", "replica"),
    ] {
        let (_p, _r, proxy) = farm(&classifier(
            "misbehave-classifier",
            r#"{ mode = "trap" }"#,
            on_error,
        ))
        .await;
        for _ in 0..5 {
            let g = send(proxy.addr, request("GET", "h", "/x", "")).await;
            assert_eq!(
                (g.status.as_u16(), g.backend()),
                (200, get_to.to_string()),
                "{on_error} GET"
            );
            let p = send(proxy.addr, request("POST", "h", "/x", "{}")).await;
            assert_eq!(
                (p.status.as_u16(), p.backend()),
                (200, post_to.to_string()),
                "{on_error} POST"
            );
        }
        let m = admin_get(proxy.admin.unwrap(), "/metrics").await;
        assert!(
            metric(
                &m,
                r#"keyway_plugin_errors_total{plugin="misbehave-classifier",kind="trap"}"#
            ) >= 1.0,
            "{m}"
        );
    }

    // A classifier that loops: interrupted each time, then bypassed by the breaker;
    // every request still succeeds.
    let (_p, _r, proxy) = farm(&classifier(
        "misbehave-classifier",
        r#"{ mode = "spin" }"#,
        "fallback",
    ))
    .await;
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(proxy.addr, "h", "/x").await.status, 200);
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin.unwrap(), "/status").await).unwrap();
    let p = &status["clusters"][0]["plugins"][0];
    assert_eq!(p["kind"], "classifier", "{p}");
    let (calls, errors) = (p["calls"].as_u64().unwrap(), p["errors"].as_u64().unwrap());
    assert_eq!(errors, calls, "every call was interrupted: {p}");
    assert!(
        (3..20).contains(&calls),
        "the breaker opened after 3 failures and skipped the plugin: {p}"
    );
}

#[tokio::test]
async fn health_plugin_judges_backends_with_on_error() {
    let start = |policy: String| async move {
        let a = TestBackend::start("a").await;
        let cfg = one_cluster(
            "c",
            &format!(
                r#"health = {{ path = "/health", interval = "50ms", {policy} }}
backends = [{{ id = "a", address = "{}" }}]
"#,
                a.addr
            ),
        );
        let p = Proxy::start(&cfg).await;
        (a, p)
    };
    let wasm = plugin("misbehave-health");
    let state = |p: &Proxy| {
        let admin = p.admin.unwrap();
        async move { backend_status(admin, "c", "a").await["health"]["health"].clone() }
    };

    // A working plugin drives health both ways.
    let (a, p) = start(format!(
        r#"policy = "{}", config = {{ mode = "ok" }}"#,
        wasm.display()
    ))
    .await;
    eventually(Duration::from_secs(10), "healthy", || async {
        state(&p).await == "healthy"
    })
    .await;
    a.set_health(500);
    eventually(Duration::from_secs(10), "unhealthy", || async {
        state(&p).await == "unhealthy"
    })
    .await;

    // A trapping plugin: fail-closed marks backends unhealthy, fallback uses rise-fall.
    let (_a, p) = start(format!(
        r#"policy = "{}", config = {{ mode = "trap" }}, on_error = "fail-closed""#,
        wasm.display()
    ))
    .await;
    eventually(Duration::from_secs(10), "fail-closed", || async {
        state(&p).await == "unhealthy"
    })
    .await;
    assert_eq!(get(p.addr, "h", "/").await.status, 503);
    let (_a, p) = start(format!(
        r#"policy = "{}", config = {{ mode = "spin" }}, on_error = "fallback", rise = 1"#,
        wasm.display()
    ))
    .await;
    eventually(Duration::from_secs(10), "fallback healthy", || async {
        state(&p).await == "healthy"
    })
    .await;
    assert_eq!(
        get(p.addr, "h", "/").await.status,
        200,
        "a looping health plugin never stops traffic"
    );
}

#[test]
fn plugin_problems_are_config_errors_with_lines() {
    let text = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.pam]\nstrategy = \"primary-replica\"\nclassifier = {{ policy = \"{}\", config = {{ mode = \"reject\" }} }}\nhealth = {{ policy = \"missing.wasm\" }}\nbackends = [{{ id = \"p\", address = \"127.0.0.1:1\", role = \"primary\" }}]\n",
        plugin("misbehave-classifier").display()
    );
    let err = keyway::Config::from_str_with_base(&text, "p.toml", &temp_dir()).unwrap_err();
    let find = |needle: &str| {
        err.errors
            .iter()
            .find(|e| e.message.contains(needle))
            .unwrap_or_else(|| panic!("{err}"))
    };
    assert_eq!(find("refused on purpose").line, Some(5));
    assert_eq!(find("missing.wasm").line, Some(6));
}

/// A primary-replica farm whose classifier (the `misbehave-classifier` fixture) calls
/// every request `answer` ("read" or "write"); reads never go to the primary.
fn classifier_answering(primary: &TestBackend, replica: &TestBackend, answer: &str) -> String {
    one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
reads_on_primary = "never"
classifier = {{ policy = "{}", config = {{ mode = "ok", answer = "{answer}" }} }}
backends = [{{ id = "primary", address = "{}", role = "primary" }}, {{ id = "replica", address = "{}", role = "replica" }}]
"#,
            plugin("misbehave-classifier").display(),
            primary.addr,
            replica.addr
        ),
    )
}

#[tokio::test]
async fn reload_swaps_the_classifier() {
    let primary = TestBackend::start("primary").await;
    let replica = TestBackend::start("replica").await;
    let cfg = |answer: &str| classifier_answering(&primary, &replica, answer);
    let file = unique_dir("plugin-reload").join("k.toml");
    let p = Proxy::start_file(&file, &cfg("write")).await;
    assert_eq!(get(p.addr, "h", "/").await.backend(), "primary");
    std::fs::write(&file, cfg("read")).unwrap();
    let r = send(p.admin.unwrap(), request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(p.addr, "h", "/").await.backend(), "replica");
    // A version that refuses its config is rejected; the running one stays.
    std::fs::write(
        &file,
        cfg("read").replace(r#"mode = "ok""#, r#"mode = "reject""#),
    )
    .unwrap();
    let r = send(p.admin.unwrap(), request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 422);
    assert!(r.body.contains("refused on purpose"), "{}", r.body);
    assert_eq!(get(p.addr, "h", "/").await.backend(), "replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_of_the_classifier_under_load_fails_no_request() {
    let primary = TestBackend::start("primary").await;
    let replica = TestBackend::start("replica").await;
    let cfg = |answer: &str| classifier_answering(&primary, &replica, answer);
    let file = unique_dir("plugin-swap").join("k.toml");
    let p = Proxy::start_file(&file, &cfg("write")).await;
    let load = GetLoop::start(p.addr, 4, "h", "/x");
    // Each version answers consistently: after every swap, a fresh request lands where
    // that version says a GET belongs.
    for round in 0..6 {
        let answer = if round % 2 == 0 { "read" } else { "write" };
        std::fs::write(&file, cfg(answer)).unwrap();
        let r = send(
            p.admin.unwrap(),
            request("POST", "admin", "/plugins/reload", ""),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let want = if answer == "read" {
            "replica"
        } else {
            "primary"
        };
        for _ in 0..5 {
            assert_eq!(
                get(p.addr, "h", "/x").await.backend(),
                want,
                "version {answer}"
            );
        }
    }
    let (done, fails) = load.stop().await;
    assert_eq!(fails, 0, "{done} requests across six swaps");
    assert!(done > 100);
}

/// Replaces `to` with `from` the way deploy tools do: write a temporary file, rename it.
fn replace_file(to: &std::path::Path, bytes: &[u8]) {
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn plugin_hash(status: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(status).unwrap();
    v["clusters"][0]["plugins"][0]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_changed_on_disk_is_reloaded_and_a_broken_one_refused() {
    let primary = TestBackend::start("primary").await;
    let replica = TestBackend::start("replica").await;
    let dir = unique_dir("plugin-watch");
    let wasm = dir.join("classifier.wasm");
    std::fs::copy(plugin("misbehave-classifier"), &wasm).unwrap();
    let cfg = one_cluster(
        "pam",
        &format!(
            r#"strategy = "primary-replica"
reads_on_primary = "never"
classifier = {{ policy = "classifier.wasm", config = {{ mode = "ok", answer = "write" }} }}
backends = [{{ id = "primary", address = "{}", role = "primary" }}, {{ id = "replica", address = "{}", role = "replica" }}]"#,
            primary.addr, replica.addr
        ),
    );
    let p = Proxy::start_file(&dir.join("k.toml"), &cfg).await;
    let admin = p.admin.unwrap();
    // This version calls every request a write.
    assert_eq!(get(p.addr, "h", "/x").await.backend(), "primary");
    let first = plugin_hash(&admin_get(admin, "/status").await);
    assert!(!first.is_empty());

    // A broken file is refused: the running version keeps answering.
    replace_file(&wasm, b"\0asm this is not a component");
    eventually(
        Duration::from_secs(10),
        "the broken plugin to be refused",
        || async {
            let s: serde_json::Value =
                serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
            s["last_reload"]["result"] == "error"
                && s["last_reload"]["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("classifier.wasm")
        },
    )
    .await;
    assert_eq!(plugin_hash(&admin_get(admin, "/status").await), first);
    assert_eq!(get(p.addr, "h", "/x").await.backend(), "primary");

    // A good new version is loaded without any call: pam-classifier calls a GET a read.
    replace_file(&wasm, &std::fs::read(plugin("pam-classifier")).unwrap());
    eventually(
        Duration::from_secs(10),
        "the new plugin to be swapped in",
        || async { get(p.addr, "h", "/x").await.backend() == "replica" },
    )
    .await;
    assert_ne!(plugin_hash(&admin_get(admin, "/status").await), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_of_the_health_policy_under_load_fails_no_request() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    // Two versions of the policy: one judges both backends by their checks, the other
    // always calls `b` down.
    let cfg = |down: &str| {
        one_cluster(
            "c",
            &format!(
                r#"health = {{ path = "/health", interval = "50ms", policy = "{}", config = {{ mode = "ok", down = [{down}] }} }}
backends = [{{ id = "a", address = "{}" }}, {{ id = "b", address = "{}" }}]"#,
                plugin("misbehave-health").display(),
                a.addr,
                b.addr
            ),
        )
    };
    let file = unique_dir("health-swap").join("k.toml");
    let p = Proxy::start_file(&file, &cfg("")).await;
    let admin = p.admin.unwrap();
    let state = |id: &'static str| async move {
        backend_status(admin, "c", id).await["health"]["health"].clone()
    };
    eventually(Duration::from_secs(10), "both healthy", || async {
        state("a").await == "healthy" && state("b").await == "healthy"
    })
    .await;
    let load = GetLoop::start(p.addr, 4, "h", "/x");
    for round in 0..6 {
        let b_down = round % 2 == 0;
        std::fs::write(&file, cfg(if b_down { "\"b\"" } else { "" })).unwrap();
        let r = send(admin, request("POST", "admin", "/plugins/reload", "")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let want = if b_down { "unhealthy" } else { "healthy" };
        eventually(
            Duration::from_secs(10),
            "the new version's verdict",
            || async { state("b").await == want },
        )
        .await;
        // Once the verdict is published, routing follows it.
        let mut seen_b = 0;
        for _ in 0..10 {
            if get(p.addr, "h", "/x").await.backend() == "b" {
                seen_b += 1;
            }
        }
        if b_down {
            assert_eq!(seen_b, 0, "round {round}: b is down in this version");
        } else {
            assert!(seen_b > 0, "round {round}: b is healthy in this version");
        }
    }
    let (done, fails) = load.stop().await;
    assert_eq!(fails, 0, "{done} requests across six swaps");
    assert!(done > 100, "{done}");
}
