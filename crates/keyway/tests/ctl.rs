//! The `keyway` program as an operator runs it: `keyway ctl` against a running keyway
//! (tables, `--json`, exit statuses) and `keyway --version`. These live beside the
//! program because Cargo tells only its own package's tests where its binary is
//! (`CARGO_BIN_EXE_keyway`); the suites in `tests/` run keyway in-process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A keyway with a token-protected admin listener and a three-backend farm (nothing
/// listens on the backends: the admin calls do not need them).
async fn start(dir: &Path) -> (keyway::Server, SocketAddr, PathBuf) {
    let token = dir.join("admin.token");
    std::fs::write(&token, "s3cret-admin-token-for-the-ctl-test\n").unwrap();
    let text = format!(
        r#"[admin]
listen = "127.0.0.1:0"
token_file = "{}"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "farm"
[cluster.farm]
sticky = {{ cookie = "kw" }}
backends = [
  {{ id = "x0", address = "127.0.0.1:1" }},
  {{ id = "x1", address = "127.0.0.1:1" }},
  {{ id = "x2", address = "127.0.0.1:1" }},
]
"#,
        token.display()
    );
    let cfg = keyway::Config::from_str_with_base(&text, "ctl.toml", dir).unwrap();
    let server = keyway::Server::start(cfg).await.unwrap();
    let admin = server.admin_addr().unwrap();
    (server, admin, token)
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keyway-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `keyway ARGS` off the async workers (the server under test runs on them).
async fn keyway<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.as_ref().to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_keyway"))
            .args(&args)
            .env_remove("KEYWAY_ADMIN_TOKEN")
            .env_remove("KEYWAY_ADMIN")
            .env_remove("KEYWAY_CONFIG")
            .env("USER", "ops-alice")
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn out(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drains_shows_status_and_says_what_went_wrong() {
    let d = dir("ctl");
    let (server, admin, token) = start(&d).await;
    let url = format!("http://{admin}");
    let token = token.to_str().unwrap();
    let with = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["ctl", "--admin", url.as_str(), "--token-file", token]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let (code, stdout, stderr) =
        out(&keyway(&with(&["drain", "farm", "x1", "--deadline", "10m"]), &[]).await);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("farm/x1 drained"), "{stdout}");

    let (code, stdout, _) = out(&keyway(&with(&["status"]), &[]).await);
    assert_eq!(code, 0);
    assert!(stdout.contains("cluster farm (balanced)"), "{stdout}");
    let header = stdout.lines().find(|l| l.contains("BACKEND")).unwrap();
    let x1 = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("x1 "))
        .unwrap();
    assert_eq!(
        header.find("ADDRESS"),
        x1.find("127.0.0.1:1"),
        "columns align:\n{stdout}"
    );
    assert!(
        x1.contains("drained by ops-alice from 127.0.0.1"),
        "{stdout}"
    );

    // --json: the server's document unchanged.
    let (code, stdout, _) = out(&keyway(&with(&["status", "--json"]), &[]).await);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["clusters"][0]["drained"][0], "x1");
    let (code, stdout, _) = out(&keyway(&with(&["state", "export"]), &[]).await);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["drains"]["farm"]["x1"]["by"], "ops-alice from 127.0.0.1");

    // The token from the environment works too; a wrong one is refused (1).
    let (code, stdout, _) = out(&keyway(
        &["ctl", "--admin", &url, "undrain", "farm", "x1"],
        &[("KEYWAY_ADMIN_TOKEN", "s3cret-admin-token-for-the-ctl-test")],
    )
    .await);
    assert_eq!(code, 0);
    assert!(stdout.contains("undrained"), "{stdout}");
    let (code, _, stderr) = out(&keyway(
        &["ctl", "--admin", &url, "drain", "farm", "x1"],
        &[("KEYWAY_ADMIN_TOKEN", "wrong")],
    )
    .await);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");

    // Refused by keyway (1) with its message; an unknown backend lists the valid ones.
    let (code, _, stderr) = out(&keyway(&with(&["drain", "farm", "nope"]), &[]).await);
    assert_eq!(code, 1);
    assert!(stderr.contains("x0, x1, x2"), "{stderr}");
    // A usage error (2).
    let (code, _, _) = out(&keyway(&with(&["drain", "farm"]), &[]).await);
    assert_eq!(code, 2);
    let (code, _, stderr) =
        out(&keyway(&with(&["drain", "farm", "x1", "--deadline", "soon"]), &[]).await);
    assert_eq!(code, 2, "{stderr}");

    server.shutdown().await;
    // Nobody listens any more (3).
    let (code, _, stderr) = out(&keyway(&with(&["status"]), &[]).await);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("cannot reach the admin API"), "{stderr}");
}

#[tokio::test]
async fn version_names_the_build() {
    let (code, stdout, _) = out(&keyway(&["--version"], &[]).await);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("keyway 0."), "{stdout}");
    assert!(stdout.contains("commit "), "{stdout}");
    let commit = stdout
        .split("commit ")
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches(')');
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{stdout}"
    );
}
