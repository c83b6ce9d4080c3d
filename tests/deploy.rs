//! The packaging in `deploy/` matches the program it packages: every metric the Grafana
//! dashboard and the Prometheus alert rules name is one a running keyway serves on
//! `/metrics`, the example config loads, and the systemd unit keeps its hardening.
//! These tests only read `deploy/`; they never write to it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyway_tests::*;

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

fn read(name: &str) -> String {
    let path = deploy_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `keyway_...` name in `text` (a PromQL expression).
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let mut rest = text;
    while let Some(at) = rest.find("keyway_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            into.insert(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
}

/// The metric names in every `expr` of the dashboard (panel targets, nested rows'
/// panels, annotations).
fn dashboard_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, into: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => metric_names(e, into),
                        _ => walk(v, into),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, into)),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    walk(dashboard, &mut names);
    names
}

/// The metric names in every `expr:` of the alert rules, including block scalars
/// (`expr: |` and the more indented lines after it). No YAML parser in the workspace:
/// the file keeps to `key: value` lines and indented blocks.
fn alert_metrics(rules: &str) -> (BTreeSet<String>, usize) {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut names = BTreeSet::new();
    let mut exprs = 0;
    let mut in_expr: Option<usize> = None;
    for line in rules.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(at) = in_expr {
            if indent(line) > at {
                metric_names(line, &mut names);
                continue;
            }
            in_expr = None;
        }
        let key = line.trim_start().trim_start_matches("- ");
        if let Some(expr) = key.strip_prefix("expr:") {
            exprs += 1;
            metric_names(expr, &mut names);
            in_expr = Some(indent(line));
        }
    }
    (names, exprs)
}

/// Names of the samples on a `/metrics` page (`name{labels} value` or `name value`).
fn served(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn missing(wanted: &BTreeSet<String>, page: &str) -> Vec<String> {
    let have = served(page);
    wanted.difference(&have).cloned().collect()
}

#[test]
fn metric_names_are_found_in_expressions_and_rule_blocks() {
    let mut n = BTreeSet::new();
    metric_names(
        r#"sum by (le) (rate(keyway_a_bucket{x="keyway_not_a_label_value"}[5m])) / my_keyway_b"#,
        &mut n,
    );
    // A label value is a name too (harmless: a test would then ask for it); a suffix of
    // another word is not.
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["keyway_a_bucket", "keyway_not_a_label_value"]
    );
    let rules = "groups:\n  - rules:\n      - alert: A\n        expr: |\n          rate(keyway_one[5m])\n            / keyway_two\n        for: 1m\n        labels:\n          m: keyway_label_not_expr\n      - expr: keyway_three\n";
    let (names, exprs) = alert_metrics(rules);
    assert_eq!(exprs, 2);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["keyway_one", "keyway_three", "keyway_two"]
    );
}

/// A keyway with every kind of thing the dashboard shows: a primary-replica cluster with
/// health checks, a classifier plugin that fails, promotion hooks, a TCP listener, etcd
/// coordination and an admin token; traffic, reloads (one refused), a refused admin call,
/// a dead primary and a manual promotion, so lazily registered series appear too. Then
/// every metric the dashboard and the alert rules name must be on `/metrics`.
#[tokio::test]
async fn dashboard_and_alert_rules_name_only_metrics_keyway_serves() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/keyway.json")).expect("dashboard JSON");
    let mut wanted = dashboard_metrics(&dashboard);
    assert!(
        wanted.len() >= 30,
        "dashboard names few metrics: {wanted:?}"
    );
    let (alerts, exprs) = alert_metrics(&read("prometheus/keyway-alerts.yml"));
    assert!(exprs >= 10, "alert rules: only {exprs} expr lines found");
    wanted.extend(alerts);

    let etcd = Etcd::start().await;
    let primary = TestBackend::start("primary").await;
    let replica = TestBackend::start("replica").await;
    let dir = unique_dir("deploy");
    let token = "deploy-test-token-0123456789";
    std::fs::write(dir.join("admin-token"), token).unwrap();
    let file = dir.join("keyway.toml");
    let config = format!(
        r#"[admin]
listen = "127.0.0.1:0"
token_file = "admin-token"

[[listener]]
listen = "127.0.0.1:0"

[[route]]
cluster = "pam"

[cluster.pam]
strategy = "primary-replica"
health = {{ path = "/health", interval = "50ms", timeout = "300ms", rise = 1, fall = 2 }}
classifier = {{ policy = "{classifier}", config = {{ mode = "trap" }}, on_error = "fallback" }}
promotion = {{ policy = "priority-promotion", auto = false, hold = "100ms", on_promote = {{ url = "http://{{address}}/admin/promote", timeout = "1s" }} }}
backends = [
  {{ id = "primary", address = "{primary}", role = "primary" }},
  {{ id = "replica", address = "{replica}", role = "replica" }},
]

[[tcp_listener]]
listen = "127.0.0.1:0"
cluster = "farm"

[cluster.farm]
backends = [{{ id = "farm-1", address = "{replica}" }}]

[coordination]
etcd = ["{etcd}"]
prefix = "/keyway-deploy"
lease_ttl = "2s"
instance = "kw-deploy"
timeout = "500ms"
"#,
        classifier = plugin("misbehave-classifier").display(),
        primary = primary.addr,
        replica = replica.addr,
        etcd = etcd.url(),
    );
    let proxy = Proxy::start_file(&file, &config).await;
    let admin = proxy.admin.expect("admin listener");
    let write = || request("POST", "pam", "/api/resources", "{}");
    let authorized = |mut r: http::Request<_>| {
        r.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        r
    };

    // Traffic: writes once the write permit is held, reads, bytes through TCP.
    eventually(Duration::from_secs(15), "a write to succeed", || async {
        send(proxy.addr, write()).await.status == 200
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(proxy.addr, "pam", "/read").await.status, 200);
        assert_eq!(send(proxy.addr, write()).await.status, 200);
    }
    let tcp = proxy.server().tcp_addrs()[0];
    assert_eq!(get(tcp, "pam", "/through-tcp").await.status, 200);

    // Both reload outcomes are served from the start, at 0, so that an alert on
    // `increase(...{result="error"})` sees the first failure.
    let before = admin_get(admin, "/metrics").await;
    assert!(
        before.contains("keyway_config_reloads_total{result=\"error\"} 0"),
        "{before}"
    );
    // Reloads: one without the token (refused), one good, one broken (refused, kept).
    let denied = send(admin, request("POST", "admin", "/reload", "")).await;
    assert_eq!(denied.status, 401);
    proxy.server().reload().expect("reload of the same file");
    std::fs::write(&file, "this is not TOML").unwrap();
    assert!(proxy.server().reload().is_err(), "a broken file is refused");
    std::fs::write(&file, &config).unwrap();

    // The primary dies: promotion needed (auto = false), writes refused; then an
    // operator promotes the replica (hook called, the old primary fenced).
    primary.set_health(500);
    eventually(Duration::from_secs(10), "writes refused", || async {
        send(proxy.addr, write()).await.status == 503
    })
    .await;
    eventually(Duration::from_secs(10), "promotion needed", || async {
        metric(
            &admin_get(admin, "/metrics").await,
            "keyway_promotion_needed{cluster=\"pam\"}",
        ) == 1.0
    })
    .await;
    let promoted = send(
        admin,
        authorized(request(
            "POST",
            "admin",
            "/clusters/pam/promote/replica",
            "",
        )),
    )
    .await;
    assert_eq!(promoted.status, 200, "{}", promoted.body);

    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let page = admin_get(admin, "/metrics").await;
        if missing(&wanted, &page).is_empty() || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let absent = missing(&wanted, &page);
    assert!(
        absent.is_empty(),
        "deploy/ names metrics keyway does not serve: {absent:?}\n(rename them to what /metrics serves, or add the metric in crates/)\n/metrics:\n{page}"
    );
    // The role gauges say who takes writes now.
    assert_eq!(
        metric(
            &page,
            r#"keyway_backend_primary{cluster="pam",backend="replica"}"#
        ),
        1.0,
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            r#"keyway_backend_primary{cluster="pam",backend="primary"}"#
        ),
        0.0
    );
    assert_eq!(
        metric(&page, r#"keyway_config_reloads_total{result="error"}"#),
        1.0
    );
    proxy.shutdown().await;
}

#[test]
fn the_dashboard_is_importable_and_filters_by_instance_and_cluster() {
    let d: serde_json::Value = serde_json::from_str(&read("grafana/keyway.json")).unwrap();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["DS_PROMETHEUS", "instance", "cluster"] {
        assert!(vars.contains(&v), "templating lacks {v}: {vars:?}");
    }
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            assert!(e.contains("instance=~\"$instance\""), "{title}: {e}");
        }
    }
}

/// `key=value` lines of a unit file, comments and sections left out.
fn unit_keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_systemd_unit_is_hardened_and_matches_the_example_config() {
    let unit = read("keyway.service");
    let keys = unit_keys(&unit);
    let get = |k: &str| {
        keys.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("keyway.service lacks {k}="))
    };
    for (k, v) in [
        ("Type", "exec"), // keyway does not speak sd_notify
        ("User", "keyway"),
        ("Group", "keyway"),
        (
            "ExecStart",
            "/usr/local/bin/keyway run --config /etc/keyway/keyway.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("StateDirectory", "keyway"),
        ("ReadWritePaths", "/var/lib/keyway"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert_eq!(get(k), v, "keyway.service {k}=");
    }
    assert!(get("LimitNOFILE").parse::<u64>().unwrap() >= 65536);
    // wasmtime compiles plugins to machine code: W^X toggling must stay allowed.
    assert!(
        !keys.iter().any(|(k, _)| k == "MemoryDenyWriteExecute"),
        "MemoryDenyWriteExecute breaks plugin compilation"
    );
    // The state must persist in a directory the user owns across restarts.
    assert!(!keys.iter().any(|(k, _)| k == "DynamicUser"));
    let example = read("keyway.toml");
    assert!(
        example.contains("file = \"/var/lib/keyway/"),
        "the example config keeps its state in the unit's StateDirectory"
    );
    let sysusers = read("keyway.sysusers");
    assert!(sysusers.lines().any(|l| l.starts_with("u keyway ")));

    // systemd's own check, where it is installed (the binary path swapped for one that
    // exists, since the unit is verified before keyway is installed).
    let verify = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if verify.is_ok_and(|o| o.status.success()) {
        let copy = unique_dir("unit").join("keyway.service");
        std::fs::write(&copy, unit.replace("/usr/local/bin/keyway", "/bin/true")).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify: {said}"
        );
    }
}

#[test]
fn the_example_config_for_the_unit_loads() {
    let pki = TestPki::new();
    let leaf = pki.leaf("pam360", &["pam360.corp.test"]);
    let tls_dir = leaf.cert_pem.parent().unwrap().display().to_string();
    let state_dir = unique_dir("state").display().to_string();
    let text = read("keyway.toml")
        .replace("/etc/keyway/tls", &tls_dir)
        .replace("/var/lib/keyway", &state_dir);
    keyway::Config::from_str_with_base(&text, "keyway.toml", &temp_dir())
        .unwrap_or_else(|e| panic!("deploy/keyway.toml: {e}"));
}
