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
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml");
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

/// `keyway run` serves, and SIGTERM drains and exits 0.
#[test]
fn run_serves_and_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = std::env::temp_dir().join(format!("keyway-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        "[proxy]\ndrain_timeout = \"2s\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\nhost = \"only.test\"\ncluster = \"c\"\n[cluster.c]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyway"))
        .args(["--log-json", "run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
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
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: other.test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    let status = Command::new("kill")
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
    // The rest of the log says it drained.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("drained")), "{rest:?}");
}

/// The bundled plugins, built once for this test binary.
fn plugins_dist() -> std::path::PathBuf {
    static DIST: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIST.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
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
    assert_eq!((code, out.trim()), (0, r#"{"kind":"read"}"#));

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

    // A damaged state file is reported, never read as empty.
    std::fs::write(dir.join("keyway-state.json"), b"garbage").unwrap();
    let (code, _, err) = keyway(&["state", "export", "--config", c]);
    assert_eq!(code, 2);
    assert!(err.contains("corrupt"), "{err}");
}
