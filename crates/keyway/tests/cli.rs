//! The `keyway check` command: exit codes and error output.

use std::path::Path;

const BROKEN: &str = "[[listener]]\nlisten = \"0.0.0.0\"\n\n[[route]]\ncluster = \"nope\"\n";

#[test]
fn check_exits_non_zero_with_located_errors() {
    let dir = std::env::temp_dir().join(format!("keyway-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, BROKEN).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyway"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:2:"), "{stderr}");
    assert!(stderr.contains("bad.toml:5:"), "{stderr}");
    assert!(stderr.contains("fix:"), "{stderr}");
}

#[test]
fn check_accepts_the_demo_config() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/demo.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyway"))
        .args(["check", "--config"])
        .arg(&demo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

type LogLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// Starts `keyway --log-json run --config CFG` and waits for its "listening" log line.
/// Returns the process, the listener's address and the rest of its log.
fn start_run(cfg: &Path) -> (std::process::Child, String, LogLines) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyway"))
        .args(["--log-json", "run", "--config"])
        .arg(cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // Readiness: the "listening" log line carries the bound address.
    let addr = loop {
        let line = lines
            .next()
            .expect("keyway exited before listening")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "listening" {
            break v["fields"]["listen"].as_str().unwrap().to_string();
        }
    };
    (child, addr, lines)
}

/// SIGTERM, then waits (at most 20 s) for a successful exit.
fn stop_run(child: &mut std::process::Child) {
    use std::time::{Duration, Instant};
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "keyway did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}

/// `keyway run` serves, and SIGTERM drains and exits 0.
#[test]
fn run_serves_and_exits_cleanly_on_sigterm() {
    use std::io::{Read, Write};

    let dir = std::env::temp_dir().join(format!("keyway-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        "[proxy]\ndrain_timeout = \"2s\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\nhost = \"only.test\"\ncluster = \"c\"\n[cluster.c]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let (child, addr, lines) = start_run(&cfg);
    let mut child = child;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    stop_run(&mut child);
    // The rest of the log says it drained.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("drained")), "{rest:?}");
}

/// The access log records the path keyway routed (the front door's normal form), and the
/// path as sent for a request the front door refused.
#[test]
fn the_access_log_records_the_admitted_path() {
    use std::io::{Read, Write};

    let dir = std::env::temp_dir().join(format!("keyway-cli-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("log.toml");
    std::fs::write(
        &cfg,
        "[proxy]\naccess_log = true\ndrain_timeout = \"2s\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\nhost = \"only.test\"\ncluster = \"c\"\n[cluster.c]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let (mut child, addr, lines) = start_run(&cfg);
    for (head, status) in [
        ("GET /a/./b//%63 HTTP/1.1\r\nhost: other.test\r\n", "404"),
        (
            "GET /x/../y HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\n",
            "400",
        ),
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{resp}");
    }
    stop_run(&mut child);
    let paths: Vec<String> = lines
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|v| v["target"] == "keyway::access")
        .map(|v| v["fields"]["path"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(paths, ["/a/b/c", "/x/../y"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bundled plugins, built once for this test binary.
fn plugins_dist() -> std::path::PathBuf {
    static DIST: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new("bash")
            .arg(root.join("plugins/build.sh"))
            .output()
            .expect("run plugins/build.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("plugins/dist")
    })
    .clone()
}

fn keyway(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyway"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plugin_commands_run_policies_offline() {
    let dist = plugins_dist();
    let dir = std::env::temp_dir().join(format!("keyway-cli-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let history = dir.join("probes.json");
    std::fs::write(
        &history,
        r#"[{"ok": true, "at_ms": 0}, {"ok": false, "status": 500, "at_ms": 1000}, {"ok": false, "status": 500, "at_ms": 2000}]"#,
    )
    .unwrap();
    let p = |n: &str| dist.join(format!("{n}.wasm")).display().to_string();

    let (code, out, err) = keyway(&[
        "plugin",
        "test",
        &p("rise-fall"),
        "--config",
        r#"{"rise":1,"fall":2}"#,
        "--history",
        history.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["health"], "unhealthy", "{out}");

    let (code, out, _) = keyway(&[
        "plugin",
        "classify",
        &p("pam-classifier"),
        "POST",
        "/PasswordVault/api/Accounts/1/Password/Retrieve",
    ]);
    assert_eq!((code, out.trim()), (0, r#"{"kind":"read","output":""}"#));

    let cands = dir.join("c.json");
    std::fs::write(
        &cands,
        r#"{"primary": null, "candidates": [{"id": "a", "priority": 1, "healthy": true, "lag_ms": 500}, {"id": "b", "priority": 2, "healthy": true, "lag_ms": 5}]}"#,
    )
    .unwrap();
    let (code, out, _) = keyway(&[
        "plugin",
        "promote",
        &p("least-lag-promotion"),
        "--candidates",
        cands.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains(r#""backend":"b""#), "{out}");

    // A plugin that refuses its config, and one that loops: exit 2 with the reason.
    let (code, _, err) = keyway(&[
        "plugin",
        "test",
        &p("failed-checks"),
        "--config",
        r#"{"window":"soon"}"#,
        "--history",
        history.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("refused its configuration"), "{err}");
    let (code, _, err) = keyway(&[
        "plugin",
        "classify",
        &p("misbehave-classifier"),
        "--config",
        r#"{"mode":"spin"}"#,
        "GET",
        "/",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("interrupted at its deadline"), "{err}");
}

#[test]
fn state_export_and_import_back_up_and_restore_decisions() {
    let dir = std::env::temp_dir().join(format!("keyway-cli-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("k.toml");
    std::fs::write(
        &cfg,
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "pam"
[cluster.pam]
strategy = "primary-replica"
backends = [
  { id = "primary", address = "127.0.0.1:1", role = "primary" },
  { id = "r1", address = "127.0.0.1:2", role = "replica" },
]
"#,
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, out, err) = keyway(&["state", "export", "--config", c]);
    assert_eq!(code, 0, "{err}");
    let empty: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(empty["version"], 1);
    assert!(empty["clusters"].as_object().unwrap().is_empty());

    let backup = dir.join("backup.json");
    std::fs::write(
        &backup,
        r#"{"version": 1, "clusters": {"pam": {"epoch": 3, "primary": "r1", "fenced": ["primary"], "reason": "promoted", "unix_ms": 1}}}"#,
    )
    .unwrap();
    let (code, out, err) = keyway(&["state", "import", backup.to_str().unwrap(), "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pam: epoch 3, primary r1"), "{out}");
    let (_, out, _) = keyway(&["state", "export", "--config", c]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["clusters"]["pam"]["primary"], "r1");
    assert_eq!(doc["clusters"]["pam"]["fenced"][0], "primary");

    // Restoring the same backup again cannot move the epoch back or sideways.
    let (code, out, _) = keyway(&["state", "import", backup.to_str().unwrap(), "--config", c]);
    assert_eq!(code, 0);
    assert!(out.contains("raised to 4"), "{out}");

    // A backup that does not fit the config is refused, and nothing changes.
    std::fs::write(
        &backup,
        r#"{"version": 1, "clusters": {"pam": {"epoch": 9, "primary": "elsewhere", "fenced": []}}}"#,
    )
    .unwrap();
    let (code, _, err) = keyway(&["state", "import", backup.to_str().unwrap(), "--config", c]);
    assert_eq!(code, 2);
    assert!(
        err.contains("nothing imported") && err.contains("`elsewhere`"),
        "{err}"
    );
    let (_, out, _) = keyway(&["state", "export", "--config", c]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["clusters"]["pam"]["epoch"], 4);

    // While keyway runs it owns the state file: a backup can be taken, but an import
    // (which the running instance would not see, and would overwrite) is refused, and
    // so is a second instance on the same file.
    let (mut running, _, _log) = start_run(&cfg);
    let (code, out, err) = keyway(&["state", "export", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"epoch\": 4"), "{out}");
    let (code, _, err) = keyway(&["state", "import", backup.to_str().unwrap(), "--config", c]);
    assert_eq!(code, 2);
    assert!(err.contains("another keyway process"), "{err}");
    let (code, _, err) = keyway(&["run", "--config", c]);
    assert_ne!(code, 0);
    assert!(
        err.contains("another keyway process") && err.contains("[coordination]"),
        "{err}"
    );
    stop_run(&mut running);

    // A damaged state file is reported, never read as empty.
    std::fs::write(dir.join("keyway-state.json"), b"garbage").unwrap();
    let (code, _, err) = keyway(&["state", "export", "--config", c]);
    assert_eq!(code, 2);
    assert!(err.contains("corrupt"), "{err}");
}

/// The status line of `GET /` with Host `host` on a fresh connection.
fn status_of(addr: &str, host: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines().next().unwrap_or_default().to_string()
}

/// SIGHUP re-reads the config file: a good file takes effect, a broken one changes
/// nothing, and a SIGHUP right after start-up never kills the process.
#[test]
fn sighup_reloads_the_config_file_and_a_broken_one_changes_nothing() {
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("keyway-cli-hup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("hup.toml");
    let config = |host: &str| {
        format!("[proxy]\ndrain_timeout = \"2s\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\nhost = \"{host}\"\ncluster = \"c\"\n[cluster.c]\nbackends = [{{ id = \"a\", address = \"127.0.0.1:1\" }}]\n")
    };
    std::fs::write(&cfg, config("only.test")).unwrap();
    let (mut child, addr, mut log) = start_run(&cfg);
    let hup = |child: &std::process::Child| {
        let st = std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    // Reloads are logged; wait for the next one's outcome.
    let next_reload = |log: &mut LogLines| -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no reload logged");
            let line = log.next().expect("keyway exited").unwrap();
            if line.contains("reload") {
                return line;
            }
        }
    };

    hup(&child); // at once, with nothing changed
    let line = next_reload(&mut log);
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed keyway");
    assert!(line.contains("configuration reloaded"), "{line}");
    assert!(status_of(&addr, "other.test").contains(" 404 "));

    // A broken file: refused, the running config stays.
    std::fs::write(&cfg, "[[listener]]\nlisten = \"nowhere\"\n").unwrap();
    hup(&child);
    let line = next_reload(&mut log);
    assert!(
        line.contains("reload refused") && line.contains("`nowhere` is not an address"),
        "{line}"
    );
    assert!(status_of(&addr, "other.test").contains(" 404 "));

    // A good file: now every host routes to `c`, whose only backend refuses connections.
    std::fs::write(&cfg, config("*")).unwrap();
    hup(&child);
    let line = next_reload(&mut log);
    assert!(line.contains("configuration reloaded"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status_of(&addr, "other.test").contains(" 503 ") {
        assert!(Instant::now() < deadline, "the reloaded route was not used");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_run(&mut child);
}

#[test]
fn the_sdk_carries_the_wit_keyway_speaks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let keyway = std::fs::read(root.join("wit/policy.wit")).unwrap();
    let sdk = std::fs::read(root.join("plugins/sdk/wit/policy.wit")).unwrap();
    assert!(
        keyway == sdk,
        "plugins/sdk/wit/policy.wit differs from wit/policy.wit (the one source of truth): cp wit/policy.wit plugins/sdk/wit/"
    );
}

/// Runs `keyway ARGS`, expecting success, and returns its stdout as JSON.
fn keyway_json(args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = keyway(args);
    assert_eq!(code, 0, "keyway {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// `keyway plugin new` makes crates that build for wasm32-wasip2 outside the repository,
/// as made (pinned lock file, `--locked`), and load as plugins of their kind. The three
/// share one target dir, so the SDK's dependencies are built once.
#[test]
fn plugin_new_scaffolds_crates_that_build_alone_and_load() {
    let installed = std::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip2"))
        .unwrap_or(false);
    if !installed {
        let st = std::process::Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .status()
            .unwrap();
        assert!(st.success(), "rustup target add wasm32-wasip2");
    }
    let dir = std::env::temp_dir().join(format!("keyway-plugin-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let d = dir.to_str().unwrap();
    for (name, kind) in [
        ("kw-health", "health"),
        ("kw-promotion", "promotion"),
        ("kw-classifier", "classifier"),
    ] {
        let (code, _, stderr) = keyway(&["plugin", "new", name, "--kind", kind, "--dir", d]);
        assert_eq!(code, 0, "{stderr}");
        let out = std::process::Command::new(&cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
            ])
            .current_dir(dir.join(name))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} does not build as made:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wasm = |file: &str| {
        target
            .join("wasm32-wasip2/release")
            .join(format!("{file}.wasm"))
            .to_str()
            .unwrap()
            .to_string()
    };

    // The health policy: two failed checks in a row make a standby, three a fall.
    let history = dir.join("history.json");
    let check = |ok: bool, at: u64| serde_json::json!({ "ok": ok, "at_ms": at });
    std::fs::write(
        &history,
        serde_json::json!([check(true, 1), check(false, 2), check(false, 3)]).to_string(),
    )
    .unwrap();
    let h = wasm("kw_health");
    let v = keyway_json(&["plugin", "test", &h, "--history", history.to_str().unwrap()]);
    assert_eq!(v["health"], "degraded", "{v}");
    let v = keyway_json(&[
        "plugin",
        "test",
        &h,
        "--config",
        r#"{"failures": 2}"#,
        "--history",
        history.to_str().unwrap(),
    ]);
    assert_eq!(v["health"], "unhealthy", "{v}");

    // The promotion policy: a healthy candidate before a degraded one of better priority.
    let cands = dir.join("candidates.json");
    std::fs::write(
        &cands,
        r#"{"primary": {"id": "p", "health": "unhealthy"}, "candidates": [
            {"id": "standby", "priority": 0, "health": "degraded"},
            {"id": "ok", "priority": 5, "health": "healthy"}]}"#,
    )
    .unwrap();
    let v = keyway_json(&[
        "plugin",
        "promote",
        &wasm("kw_promotion"),
        "--candidates",
        cands.to_str().unwrap(),
    ]);
    assert_eq!(
        (v["decision"].as_str(), v["backend"].as_str()),
        (Some("promote"), Some("ok")),
        "{v}"
    );

    // The classifier.
    let c = wasm("kw_classifier");
    let kind =
        |method: &str| keyway_json(&["plugin", "classify", &c, method, "/x"])["kind"].clone();
    assert_eq!(kind("GET"), "read");
    assert_eq!(kind("POST"), "write");

    // An existing crate is never overwritten.
    let (code, _, stderr) = keyway(&["plugin", "new", "kw-health", "--kind", "health", "--dir", d]);
    assert_eq!(code, 2);
    assert!(stderr.contains("exists"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plugin_test_shows_degraded_and_the_plugin_s_own_output() {
    let wasm = plugins_dist()
        .join("misbehave-health.wasm")
        .display()
        .to_string();
    let dir = std::env::temp_dir().join(format!("keyway-cli-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let history = dir.join("h.json");
    std::fs::write(&history, r#"[{"ok": true, "at_ms": 1700000000000}]"#).unwrap();
    let h = history.to_str().unwrap();
    let v = keyway_json(&[
        "plugin",
        "test",
        &wasm,
        "--config",
        r#"{"mode": "ok", "degraded": ["b"], "say": "hello"}"#,
        "--backend",
        r#"{"id": "b"}"#,
        "--history",
        h,
    ]);
    assert_eq!(v["health"], "degraded", "{v}");
    assert_eq!(v["output"], "stdout: hello\nstderr: hello\n", "{v}");

    // A trap: its panic message and the output, no wasm backtrace; the log line of the
    // failure carries the output too.
    let (code, _, stderr) = keyway(&[
        "--log-json",
        "plugin",
        "test",
        &wasm,
        "--config",
        r#"{"mode": "trap", "say": "hello"}"#,
        "--history",
        h,
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("trapped: panicked at") && stderr.contains("trapping on purpose"),
        "{stderr}"
    );
    assert!(stderr.contains("stderr: hello"), "{stderr}");
    assert!(!stderr.contains("wasm backtrace"), "{stderr}");
    let logged = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["kind"] == "trap")
        .unwrap_or_else(|| panic!("no log line for the trap: {stderr}"));
    let fields = &logged["fields"];
    assert!(
        fields["output"]
            .as_str()
            .is_some_and(|o| o.contains("stdout: hello") && o.contains("trapping on purpose")),
        "{logged}"
    );
    assert_eq!(fields["unlogged"], 0, "{logged}");
}

/// The README's run command, `cargo run --release -- demo`, needs exactly one binary
/// among the workspace's default members, and that binary must be `keyway`; a second
/// one (a bench tool, the test harness's instance) makes `cargo run` refuse to guess.
#[test]
fn cargo_run_at_the_root_runs_keyway() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let defaults: Vec<&str> = meta["workspace_default_members"]
        .as_array()
        .expect("cargo reports the default members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let bins: Vec<&str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| defaults.contains(&p["id"].as_str().unwrap_or_default()))
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(bins, ["keyway"], "binaries among the default members");
}
