//! WebAssembly policy plugins: the bundled ones behave as documented; plugins that loop,
//! hog memory, trap, return nonsense or refuse their config are contained; classifier
//! and health plugins work inside the proxy with every `on_error` rule; reload swaps them.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use keyway_proxy::classify::Kind;
use keyway_proxy::config::{BackendConfig, Role, UpstreamProtocol};
use keyway_proxy::health::{Health, HealthPlugin, Probe};
use keyway_proxy::plugin::{
    ClassifierPlugin, PluginError, PromotionCandidate, PromotionDecision, PromotionPlugin,
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
        max_connections: keyway_proxy::config::DEFAULT_BACKEND_MAX_CONNECTIONS,
        max_queue: keyway_proxy::config::DEFAULT_BACKEND_MAX_QUEUE,
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
    let e = keyway_proxy::health::unix_ms_now();
    let b = backend();
    let eval = |cur, h: &[bool]| rf.evaluate(&b, cur, &history(h), e).unwrap().0;
    assert_eq!(
        eval(Health::Healthy, &[false, false, false]),
        Health::Unhealthy
    );
    assert_eq!(
        eval(Health::Healthy, &[true, false, false]),
        Health::Degraded,
        "failing, not yet down: a standby"
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
        weight: 1,
        healthy,
        degraded: false,
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

/// A classifier remembers its answers per request: a request seen before costs no
/// call, a request that differs in method, host or path is never answered for another,
/// a thousand distinct requests sharing the fixed table still get their own answers,
/// and a request too long to remember is always a call.
#[test]
fn a_classifier_answers_a_request_it_has_seen_from_memory_and_never_mixes_requests() {
    let c = ClassifierPlugin::load(
        &plugin("pam-classifier"),
        r#"{"extra_reads": ["POST /custom/*/peek"]}"#,
    )
    .unwrap();
    let k = |m: &str, p: &str, h: &str| c.classify(m, p, h).unwrap();
    assert_eq!(k("POST", "/custom/1/poke", "a"), Kind::Write);
    assert_eq!(k("POST", "/custom/1/poke", "a"), Kind::Write);
    assert_eq!((c.meta.calls(), c.meta.remembered()), (1, 1));
    // Same path and host, another method: its own answer.
    assert_eq!(k("GET", "/custom/1/poke", "a"), Kind::Read);
    assert_eq!(k("POST", "/custom/1/peek", "a"), Kind::Read);
    assert_eq!((c.meta.calls(), c.meta.remembered()), (3, 1));

    // More distinct requests than slots: they collide, and each still gets its answer.
    let expect = |i: usize| {
        if i.is_multiple_of(2) {
            Kind::Read
        } else {
            Kind::Write
        }
    };
    let path = |i: usize| {
        format!(
            "/custom/{i}/{}",
            if i.is_multiple_of(2) { "peek" } else { "poke" }
        )
    };
    for round in 0..2 {
        for i in 0..3000 {
            assert_eq!(
                k("POST", &path(i), "pvwa"),
                expect(i),
                "round {round}, request {i}"
            );
        }
    }
    let calls = c.meta.calls();
    assert!(
        calls > 3 + 3000,
        "colliding requests are called again: {calls} calls"
    );
    assert!(c.meta.remembered() > 1, "some answers come from memory");

    let long = format!("/custom/{}/poke", "x".repeat(300));
    assert_eq!(k("POST", &long, "a"), Kind::Write);
    assert_eq!(k("POST", &long, "a"), Kind::Write);
    assert_eq!(
        c.meta.calls(),
        calls + 2,
        "a long request is not remembered"
    );
    // `keyway plugin classify` and `remember_answers = false` always call.
    let (before, remembered) = (c.meta.calls(), c.meta.remembered());
    assert_eq!(
        c.classify_traced("POST", "/custom/1/poke", "a")
            .result
            .unwrap(),
        Kind::Write
    );
    assert_eq!(
        c.classify_each_time("POST", "/custom/1/poke", "a").unwrap(),
        Kind::Write
    );
    assert_eq!(
        c.classify_each_time("POST", "/custom/1/poke", "a").unwrap(),
        Kind::Write
    );
    assert_eq!(
        (c.meta.calls(), c.meta.remembered()),
        (before + 3, remembered)
    );
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
        let count = keyway_proxy::plugin::classifier_instances_on_this_thread;
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
        keyway_proxy::health::unix_ms_now(),
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
    farm_with("", classifier).await
}

/// [`farm`] with `proxy` (e.g. `[proxy]` settings) before the rest of the config.
async fn farm_with(proxy: &str, classifier: &str) -> (TestBackend, TestBackend, Proxy) {
    let primary = TestBackend::start("primary").await;
    let replica = TestBackend::start("replica").await;
    let cfg = proxy.to_string()
        + &one_cluster(
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

/// In the proxy, a request seen before is answered from memory (`/status` counts
/// `answers_remembered`); `remember_answers = false` calls the plugin every time. One
/// worker: each worker thread has an instance, and its own memo.
#[tokio::test]
async fn remember_answers_false_calls_the_classifier_for_every_request() {
    for (remember, calls, remembered) in [(true, 1, 2), (false, 3, 0)] {
        let hook = format!(
            r#"classifier = {{ policy = "{}", remember_answers = {remember} }}"#,
            plugin("pam-classifier").display()
        );
        let (_p, _r, proxy) = farm_with("[proxy]\nworkers = 1\n", &hook).await;
        for _ in 0..3 {
            let r = request(
                "POST",
                "pvwa",
                "/PasswordVault/api/Accounts/1/Password/Retrieve",
                "{}",
            );
            assert_eq!(send(proxy.addr, r).await.backend(), "replica");
        }
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(proxy.admin.unwrap(), "/status").await).unwrap();
        let p = &status["clusters"][0]["plugins"][0];
        assert_eq!(
            (p["calls"].as_u64(), p["answers_remembered"].as_u64()),
            (Some(calls), Some(remembered)),
            "remember_answers = {remember}: {p}"
        );
    }
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
    let err = keyway_proxy::load::from_str_with_base(&text, "p.toml", &temp_dir()).unwrap_err();
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

// === the plugin contract, told true ===

/// A cluster `name` of backends `a` and `b` (and the rest of `body`), judged every 50 ms
/// by the `misbehave-health` fixture with `config`.
fn judged(name: &str, config: &str, body: &str, a: &TestBackend, b: &TestBackend) -> String {
    one_cluster(
        name,
        &format!(
            r#"health = {{ path = "/health", interval = "50ms", timeout = "500ms", policy = "{}", config = {config} }}
{body}
backends = [{{ id = "a", address = "{}", priority = 1 }}, {{ id = "b", address = "{}", priority = 0 }}]"#,
            plugin("misbehave-health").display(),
            a.addr,
            b.addr
        ),
    )
}

async fn health_of(admin: std::net::SocketAddr, cluster: &str, id: &str) -> serde_json::Value {
    backend_status(admin, cluster, id).await["health"].clone()
}

/// Who served `n` GETs in a row.
async fn served(p: &Proxy, n: usize) -> Vec<String> {
    let mut who = Vec::new();
    for _ in 0..n {
        let r = get(p.addr, "h", "/x").await;
        assert_eq!(r.status, 200, "{}", r.body);
        who.push(r.backend());
    }
    who
}

#[tokio::test]
async fn a_degraded_backend_is_a_standby_for_every_balancer_and_ordered_clusters() {
    let mut wrong = Vec::new();
    for (name, body) in [
        ("deg-rr", r#"balance = "round-robin""#),
        ("deg-lr", r#"balance = "least-requests""#),
        ("deg-p2c", r#"balance = "p2c""#),
        ("deg-random", r#"balance = "random""#),
        // b has the better priority: an ordered cluster would try it first.
        ("deg-ordered", r#"strategy = "ordered""#),
    ] {
        let a = TestBackend::start("a").await;
        let b = TestBackend::start("b").await;
        let p = Proxy::start(&judged(
            name,
            r#"{ mode = "ok", degraded = ["b"] }"#,
            body,
            &a,
            &b,
        ))
        .await;
        let admin = p.admin.unwrap();
        eventually(Duration::from_secs(10), "a healthy, b degraded", || async {
            health_of(admin, name, "a").await["health"] == "healthy"
                && health_of(admin, name, "b").await["health"] == "degraded"
        })
        .await;
        let who = served(&p, 20).await;
        if who.iter().any(|w| w != "a") {
            wrong.push(format!("{name}: {who:?}"));
        }
        // No healthy backend left: the standby serves.
        a.set_health(500);
        eventually(Duration::from_secs(10), "a unhealthy", || async {
            health_of(admin, name, "a").await["health"] == "unhealthy"
        })
        .await;
        let who = served(&p, 5).await;
        assert!(who.iter().all(|w| w == "b"), "{name}: {who:?}");
        // Shown and exported as degraded.
        let m = admin_get(admin, "/metrics").await;
        let labels = format!("{{cluster=\"{name}\",backend=\"b\"}}");
        assert_eq!(metric(&m, &format!("keyway_backend_degraded{labels}")), 1.0);
        assert_eq!(metric(&m, &format!("keyway_backend_healthy{labels}")), 0.0);
        assert!(
            metric(
                &m,
                &format!(
                    "keyway_backend_health_transitions_total{{cluster=\"{name}\",backend=\"b\",to=\"degraded\"}}"
                )
            ) >= 1.0,
            "{m}"
        );
    }
    assert!(
        wrong.is_empty(),
        "the degraded b took requests while a is healthy: {wrong:#?}"
    );
}

#[test]
fn native_promotion_takes_a_degraded_candidate_only_when_none_is_healthy() {
    use keyway_proxy::failover::{native_least_lag, native_priority};
    let c = |id: &str, priority: u32, healthy: bool, degraded: bool, lag: u64| PromotionCandidate {
        id: id.into(),
        priority,
        location: String::new(),
        weight: 1,
        healthy,
        degraded,
        lag_ms: Some(lag),
        last_ok_ms: 1,
    };
    let promote = |id: &str| PromotionDecision::Promote(id.into());
    // The degraded one has the better priority and the least lag: not chosen.
    let mixed = [c("deg", 0, false, true, 0), c("ok", 5, true, false, 900)];
    assert_eq!(native_priority(&mixed, None), promote("ok"));
    assert_eq!(native_least_lag(&mixed, None), promote("ok"));
    // Nobody healthy: the standby rather than no primary.
    let standby = [c("down", 0, false, false, 0), c("deg", 5, false, true, 50)];
    assert_eq!(native_priority(&standby, None), promote("deg"));
    assert_eq!(native_least_lag(&standby, None), promote("deg"));
}

/// The `echo` fixture's reason, split into its `key=value` fields.
fn echoed(reason: &str) -> std::collections::HashMap<String, String> {
    reason
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn health_plugins_get_location_current_role_and_unix_times_kept_across_reloads() {
    let p = TestBackend::start("primary").await;
    let r = TestBackend::start("r1").await;
    let started = keyway_proxy::health::unix_ms_now();
    let cfg = one_cluster(
        "echo",
        &format!(
            r#"strategy = "primary-replica"
health = {{ path = "/health", interval = "50ms", timeout = "500ms", policy = "{}", config = {{ mode = "echo" }} }}
backends = [
  {{ id = "primary", address = "{}", role = "primary", location = "east", weight = 3 }},
  {{ id = "r1", address = "{}", role = "replica", location = "west", weight = 7 }},
]"#,
            plugin("misbehave-health").display(),
            p.addr,
            r.addr
        ),
    );
    let file = unique_dir("echo").join("k.toml");
    let proxy = Proxy::start_file(&file, &cfg).await;
    let admin = proxy.admin.unwrap();
    // Two checks judged, so the history has two times.
    eventually(Duration::from_secs(10), "two checks echoed", || async {
        let v = health_of(admin, "echo", "r1").await;
        echoed(v["reason"].as_str().unwrap_or(""))
            .get("at")
            .is_some_and(|a| a.split(',').count() >= 2)
    })
    .await;
    let primary = echoed(
        health_of(admin, "echo", "primary").await["reason"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(primary["location"], "east");
    assert_eq!(primary["weight"], "3");
    assert_eq!(primary["role"], "Role::Primary");
    let v = health_of(admin, "echo", "r1").await;
    let r1 = echoed(v["reason"].as_str().unwrap());
    assert_eq!(r1["location"], "west", "{v}");
    assert_eq!(r1["role"], "Role::Replica");
    // One clock: Unix milliseconds, probe times no later than the call's now.
    let now: u64 = r1["now"].parse().unwrap();
    let at: Vec<u64> = r1["at"].split(',').map(|t| t.parse().unwrap()).collect();
    let end = keyway_proxy::health::unix_ms_now();
    assert!(
        now >= started && now <= end,
        "now-ms {now} not in [{started}, {end}]"
    );
    assert!(
        at.iter().all(|&t| t >= started && t <= now),
        "at-ms {at:?} not in [{started}, {now}]"
    );
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "oldest first: {at:?}");
    // /status: the latest verdict with its time.
    let verdict = &v["verdict"];
    assert_eq!(verdict["health"], "healthy");
    assert_eq!(verdict["reason"], v["reason"]);
    assert!(verdict["at_unix_ms"].as_u64().unwrap() >= now);

    // A reload keeps the history, and its times: the first probe keeps its time.
    let first = at[0];
    let r = send(admin, request("POST", "admin", "/reload", "")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(10),
        "a check after the reload",
        || async {
            let v = health_of(admin, "echo", "r1").await;
            echoed(v["reason"].as_str().unwrap_or(""))
                .get("now")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > end)
        },
    )
    .await;
    let v = health_of(admin, "echo", "r1").await;
    let after: Vec<u64> = echoed(v["reason"].as_str().unwrap())["at"]
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    assert!(
        after.contains(&first) && after.iter().all(|&t| t >= started),
        "probe times changed across the reload: {at:?} then {after:?}"
    );

    // After a promotion the plugin sees the new primary's role.
    let r = send(
        admin,
        request("POST", "admin", "/clusters/echo/promote/r1", ""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(10),
        "r1 judged as the primary",
        || async {
            let v = health_of(admin, "echo", "r1").await;
            echoed(v["reason"].as_str().unwrap_or(""))
                .get("role")
                .is_some_and(|r| r == "Role::Primary")
        },
    )
    .await;
}

#[tokio::test]
async fn promotion_plugins_get_the_configured_weight() {
    let p = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let r2 = TestBackend::start("r2").await;
    let cfg = one_cluster(
        "weights",
        &format!(
            r#"strategy = "primary-replica"
health = {{ path = "/health", interval = "50ms", timeout = "300ms", rise = 1, fall = 2 }}
promotion = {{ policy = "{}", hold = "100ms" }}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica", weight = 1 }},
  {{ id = "r2", address = "{}", role = "replica", weight = 5 }},
]"#,
            plugin("weight-promotion").display(),
            p.addr,
            r1.addr,
            r2.addr
        ),
    );
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin.unwrap();
    eventually(Duration::from_secs(10), "all healthy", || async {
        for id in ["primary", "r1", "r2"] {
            if health_of(admin, "weights", id).await["health"] != "healthy" {
                return false;
            }
        }
        true
    })
    .await;
    p.stop();
    eventually(
        Duration::from_secs(10),
        "the heavier r2 promoted",
        || async {
            let s: serde_json::Value =
                serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
            s["coordination"]["clusters"]["weights"]["primary"] == "r2"
        },
    )
    .await;
}

#[test]
fn a_plugin_s_output_is_captured_bounded_and_a_trap_names_its_panic() {
    let b = backend();
    let now = keyway_proxy::health::unix_ms_now();
    let chatty = HealthPlugin::load(
        &plugin("misbehave-health"),
        r#"{"mode": "ok", "say": "checking"}"#,
    )
    .unwrap();
    let t = chatty.evaluate_traced(&b, Health::Healthy, &history(&[true]), now);
    assert_eq!(t.result.unwrap().0, Health::Healthy);
    assert_eq!(t.output, "stdout: checking\nstderr: checking\n");

    let trap = HealthPlugin::load(
        &plugin("misbehave-health"),
        r#"{"mode": "trap", "say": "about to fail"}"#,
    )
    .unwrap();
    let t = trap.evaluate_traced(&b, Health::Healthy, &history(&[true]), now);
    let Err(PluginError::Trap(why)) = &t.result else {
        panic!("{:?}", t.result)
    };
    assert!(why.contains("trapping on purpose"), "{why}");
    assert!(why.contains("lib.rs"), "the panic's location: {why}");
    assert!(
        !why.contains("backtrace") && why.lines().count() <= 2,
        "no wasm backtrace: {why}"
    );
    assert!(t.output.contains("stderr: about to fail"), "{}", t.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classifier_that_prints_on_the_request_path_is_captured_not_fatal() {
    // Called right here, on an async worker: WASI's own blocking stream calls would
    // panic here ("cannot start a runtime from within a runtime").
    let c = ClassifierPlugin::load(
        &plugin("misbehave-classifier"),
        r#"{"mode": "chatty", "answer": "read"}"#,
    )
    .unwrap();
    let t = c.classify_traced("GET", "/x", "h");
    assert_eq!(t.result, Ok(Kind::Read));
    assert!(t.output.starts_with("classifying /x\n"), "{}", t.output);
    assert!(
        t.output.len() < 4096 + 100 && t.output.ends_with("more bytes not kept)"),
        "bounded at 4 KiB: {} bytes",
        t.output.len()
    );
    // The next call starts a fresh buffer.
    let t = c.classify_traced("GET", "/y", "h");
    assert!(
        t.output.starts_with("classifying /y\n"),
        "{}",
        &t.output[..40]
    );

    // And in the proxy: every request served.
    let (_p, _r, proxy) = farm(&classifier(
        "misbehave-classifier",
        r#"{ mode = "chatty", answer = "read" }"#,
        "fail-closed",
    ))
    .await;
    for _ in 0..10 {
        let r = get(proxy.addr, "h", "/x").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.backend(), "replica");
    }
}

#[tokio::test]
async fn a_promotion_plugin_s_degraded_choice_waits_until_no_candidate_is_healthy() {
    let p = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let r2 = TestBackend::start("r2").await;
    // r2 is degraded and the heaviest: the plugin wants it.
    let cfg = one_cluster(
        "standby-promo",
        &format!(
            r#"strategy = "primary-replica"
health = {{ path = "/health", interval = "50ms", timeout = "300ms", policy = "{}", config = {{ mode = "ok", degraded = ["r2"] }} }}
promotion = {{ policy = "{}", hold = "100ms" }}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica", weight = 1 }},
  {{ id = "r2", address = "{}", role = "replica", weight = 5 }},
]"#,
            plugin("misbehave-health").display(),
            plugin("weight-promotion").display(),
            p.addr,
            r1.addr,
            r2.addr
        ),
    );
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin.unwrap();
    let status = || async {
        serde_json::from_str::<serde_json::Value>(&admin_get(admin, "/status").await).unwrap()
    };
    eventually(
        Duration::from_secs(10),
        "r2 degraded, the rest healthy",
        || async {
            health_of(admin, "standby-promo", "primary").await["health"] == "healthy"
                && health_of(admin, "standby-promo", "r1").await["health"] == "healthy"
                && health_of(admin, "standby-promo", "r2").await["health"] == "degraded"
        },
    )
    .await;
    p.stop();
    // Readiness: the policy was asked (and answered r2) several times, or a decision
    // was taken.
    eventually(
        Duration::from_secs(10),
        "the policy asked 3 times",
        || async {
            let s = status().await;
            s["coordination"]["clusters"]["standby-promo"]["primary"] != "primary"
                || s["clusters"][0]["plugins"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|pl| pl["kind"] == "promotion" && pl["calls"].as_u64() >= Some(3))
        },
    )
    .await;
    let s = status().await;
    let t = &s["coordination"]["clusters"]["standby-promo"];
    assert!(
        t["primary"] == "primary" && t["promotion_needed"] == true,
        "a degraded candidate promoted while r1 is healthy: {t}"
    );
    // No healthy candidate left: the standby is promoted.
    r1.stop();
    eventually(
        Duration::from_secs(10),
        "the standby r2 promoted",
        || async { status().await["coordination"]["clusters"]["standby-promo"]["primary"] == "r2" },
    )
    .await;
}

#[tokio::test]
async fn a_degraded_primary_keeps_its_writes_and_is_not_replaced() {
    let p = TestBackend::start("primary").await;
    let r1 = TestBackend::start("r1").await;
    let cfg = one_cluster(
        "deg-primary",
        &format!(
            r#"strategy = "primary-replica"
health = {{ path = "/health", interval = "50ms", timeout = "300ms", policy = "{}", config = {{ mode = "ok", degraded = ["primary"] }} }}
promotion = {{ hold = "100ms" }}
backends = [
  {{ id = "primary", address = "{}", role = "primary" }},
  {{ id = "r1", address = "{}", role = "replica" }},
]"#,
            plugin("misbehave-health").display(),
            p.addr,
            r1.addr
        ),
    );
    let proxy = Proxy::start(&cfg).await;
    let admin = proxy.admin.unwrap();
    eventually(
        Duration::from_secs(10),
        "primary degraded, r1 healthy",
        || async {
            health_of(admin, "deg-primary", "primary").await["health"] == "degraded"
                && health_of(admin, "deg-primary", "r1").await["health"] == "healthy"
        },
    )
    .await;
    // Readiness: ten more checks of the primary, each a chance to promote r1.
    let checks = p.health_checks();
    eventually(Duration::from_secs(10), "ten more checks", || async {
        p.health_checks() >= checks + 10
    })
    .await;
    let s: serde_json::Value = serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    let t = &s["coordination"]["clusters"]["deg-primary"];
    assert!(
        t["primary"] == "primary" && t["epoch"] == 0 && t["promotion_needed"] == false,
        "a degraded primary was replaced: {t}"
    );
    let w = send(proxy.addr, request("POST", "h", "/x", "")).await;
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(w.backend(), "primary");
}
