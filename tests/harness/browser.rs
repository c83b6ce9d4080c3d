//! A headless Chromium for the dashboard test: the `chromium` and `chromedriver`
//! binaries (found on PATH, or installed from Debian's `chromium` and `chromium-driver`
//! when running as root, as etcd is), and a chromedriver process on a loopback port that
//! is killed when dropped. It drives nothing itself: the test talks WebDriver to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{eventually, free_port, try_send};

/// Where `chromium` and `chromedriver` are.
#[derive(Clone, Debug)]
pub struct ChromiumBinaries {
    /// The browser.
    pub chromium: PathBuf,
    /// Its WebDriver server.
    pub chromedriver: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// `chromium` and `chromedriver`: on PATH, or installed with apt-get when running as
/// root (what `.ci/run` does, too). Panics with what to install otherwise.
pub fn chromium_binaries() -> ChromiumBinaries {
    static BINS: std::sync::OnceLock<Result<ChromiumBinaries, String>> = std::sync::OnceLock::new();
    let found = BINS.get_or_init(|| {
        let both = || {
            Some(ChromiumBinaries {
                chromium: which("chromium").or_else(|| which("chromium-browser"))?,
                chromedriver: which("chromedriver")?,
            })
        };
        if let Some(b) = both() {
            return Ok(b);
        }
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        if root {
            let install = || {
                std::process::Command::new("apt-get")
                    .args(["install", "-y", "-qq", "chromium", "chromium-driver"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
            };
            let _ = install();
            if let Some(b) = both() {
                return Ok(b);
            }
            let _ = std::process::Command::new("apt-get")
                .args(["update", "-qq"])
                .status();
            let _ = install();
        }
        both().ok_or_else(|| {
            "the dashboard test needs a headless Chromium: install it (Debian: apt-get install chromium chromium-driver) or put `chromium` and `chromedriver` on PATH".to_string()
        })
    });
    found.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// A chromedriver listening on a loopback port; killed when dropped.
pub struct ChromeDriver {
    /// Where it listens (`http://` + this is the WebDriver URL).
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl ChromeDriver {
    /// Starts chromedriver and waits (up to 30 s) until it answers `/status`.
    pub async fn start() -> Self {
        let bins = chromium_binaries();
        let addr = free_port();
        // A process group of its own, so the browsers it starts die with it.
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&bins.chromedriver)
            .process_group(0)
            .arg(format!("--port={}", addr.port()))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bins.chromedriver.display()));
        let driver = Self { addr, child };
        eventually(Duration::from_secs(30), "chromedriver answers", || async {
            try_send(addr, crate::request("GET", "127.0.0.1", "/status", ""))
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
        driver
    }

    /// The WebDriver URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group this driver leads: the driver and the browsers it started.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
