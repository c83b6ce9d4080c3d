//! Puts the build's git commit into `keyway --version` (`KEYWAY_GIT_COMMIT`): the short
//! hash of HEAD, `KEYWAY_GIT_COMMIT` from the environment when set (a packager's
//! override), or "unknown" outside a git checkout (a source tarball) or without git.
//! It never fails the build.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// A path git names, made absolute against this crate's folder (git answers relative
/// paths for the main checkout).
fn git_path(args: &[&str]) -> Option<PathBuf> {
    let p = PathBuf::from(git(args)?);
    Some(if p.is_absolute() {
        p
    } else {
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?).join(p)
    })
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=KEYWAY_GIT_COMMIT");
    let commit = std::env::var("KEYWAY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]));
    if commit.is_some() {
        // A new commit moves HEAD (a checkout) or the branch it names (a commit).
        for p in [
            git_path(&["rev-parse", "--git-path", "HEAD"]),
            git(&["symbolic-ref", "-q", "HEAD"])
                .and_then(|r| git_path(&["rev-parse", "--git-path", &r])),
            git_path(&["rev-parse", "--git-path", "packed-refs"]),
        ]
        .into_iter()
        .flatten()
        .filter(|p| p.exists())
        {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    println!(
        "cargo:rustc-env=KEYWAY_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
