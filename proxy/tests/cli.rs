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
