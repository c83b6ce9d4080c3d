//! The operator's dashboard in a real headless Chromium (WebDriver through chromedriver):
//! it renders every backend, shows a health change and a drain without a reload, and an
//! action without the admin token is refused while the same one with it succeeds. The
//! screenshots land in `target/dashboard-screenshots/` for people to look at.
//!
//! Also, without a browser: the page's security headers, and the demo's stop/start calls
//! (404 outside `keyway demo`; in a demo they stop a backend for real and start it again).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use keyway_tests::*;

const TOKEN: &str = "dashboard-token-0123456789";
const HEALTH: &str =
    r#"health = { path = "/health", interval = "100ms", timeout = "500ms", rise = 1, fall = 2 }"#;
/// Every browser step's bound: generous, a loaded CI machine is slow.
const STEP: Duration = Duration::from_secs(30);

fn config(p: &[TestBackend], w: &[TestBackend]) -> String {
    let ids = |bs: &[TestBackend], roles: bool| {
        bs.iter()
            .enumerate()
            .map(|(i, b)| {
                let role = match (roles, i) {
                    (false, _) => "",
                    (true, 0) => r#", role = "primary""#,
                    (true, _) => r#", role = "replica""#,
                };
                format!(r#"{{ id = "{}", address = "{}"{role} }}"#, b.name(), b.addr)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"[admin]
listen = "127.0.0.1:0"
token_file = "token"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
host = "pam.test"
cluster = "pam"
[[route]]
cluster = "web"
[cluster.pam]
strategy = "primary-replica"
{HEALTH}
backends = [{}]
[cluster.web]
strategy = "balanced"
{HEALTH}
backends = [{}]
"#,
        ids(p, true),
        ids(w, false)
    )
}

fn screenshot_dir() -> PathBuf {
    // target/debug/deps/dashboard-HASH → target/
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

async fn browser(driver: &ChromeDriver) -> Client {
    let bins = chromium_binaries();
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": bins.chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1300", "--no-first-run", "--disable-extensions"],
        },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    tokio::time::timeout(
        STEP,
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url()),
    )
    .await
    .expect("chromium started within 30 s")
    .expect("a WebDriver session")
}

/// Polls the page until `css` matches an element whose `attr` is `want` (the text when
/// `attr` is None contains `want`).
async fn wait_for(c: &Client, css: &str, attr: Option<&str>, want: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    let mut seen = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            let got = match attr {
                Some(a) => e.attr(a).await.ok().flatten(),
                None => e.text().await.ok(),
            };
            if let Some(g) = got {
                if (attr.is_some() && g == want) || (attr.is_none() && g.contains(want)) {
                    return;
                }
                seen = g;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page did not show {want:?} at {css} {attr:?} within {STEP:?}; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the button at `css` and accepts the confirmation it asks for. The table is
/// re-rendered on every poll, so a button found may be replaced before the click: retry.
async fn click_and_confirm(c: &Client, css: &str) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let clicked = match c.find(Locator::Css(css)).await {
            Ok(e) => e.click().await.is_ok(),
            Err(_) => false,
        };
        if clicked {
            // The confirm() is up once the click returned; accept it (bounded retry).
            for _ in 0..50 {
                if c.accept_alert().await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("clicking {css} asked for no confirmation");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not click {css}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn save_screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let file = screenshot_dir().join(name);
    std::fs::write(&file, png).expect("write screenshot");
    println!("dashboard screenshot: {}", file.display());
}

/// Whether the page is still the one first loaded (a reload would drop the marker).
async fn same_page(c: &Client) -> bool {
    c.execute("return window.keywayTestMarker === 42;", vec![])
        .await
        .is_ok_and(|v| v == serde_json::Value::Bool(true))
}

async fn post(admin: SocketAddr, path: &str, token: Option<&str>) -> Got {
    let mut r = request("POST", "admin", path, "");
    if let Some(t) = token {
        r.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    send(admin, r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_backend_and_changes_live_and_guards_its_actions() {
    let pam = vec![
        TestBackend::start("pam-a").await,
        TestBackend::start("pam-b").await,
        TestBackend::start("pam-c").await,
    ];
    let web = vec![
        TestBackend::start("web-1").await,
        TestBackend::start("web-2").await,
    ];
    let dir = unique_dir("dashboard");
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let proxy = Proxy::start_file(&dir.join("k.toml"), &config(&pam, &web)).await;
    let admin = proxy.admin.unwrap();

    let driver = ChromeDriver::start().await;
    let c = browser(&driver).await;
    tokio::time::timeout(STEP, c.goto(&format!("http://{admin}/")))
        .await
        .expect("page load within 30 s")
        .expect("page loads");

    // Every backend of every cluster renders, healthy.
    for id in [
        "pam/pam-a",
        "pam/pam-b",
        "pam/pam-c",
        "web/web-1",
        "web/web-2",
    ] {
        wait_for(
            &c,
            &format!("tr[data-backend='{id}']"),
            Some("data-health"),
            "healthy",
        )
        .await;
    }
    wait_for(&c, "section[data-cluster='pam'] h2", None, "primary pam-a").await;
    c.execute("window.keywayTestMarker = 42;", vec![])
        .await
        .expect("mark the page");

    // A health change shows without a reload.
    web[1].stop();
    wait_for(
        &c,
        "tr[data-backend='web/web-2']",
        Some("data-health"),
        "unhealthy",
    )
    .await;
    // A drain made through the admin API (not the page) shows without a reload.
    let r = post(admin, "/clusters/pam/backends/pam-c/drain", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for(
        &c,
        "tr[data-backend='pam/pam-c']",
        Some("data-drained"),
        "yes",
    )
    .await;
    wait_for(&c, "tr[data-backend='pam/pam-c'] td.drain", None, "drained").await;
    assert!(same_page(&c).await, "the page was reloaded");
    save_screenshot(&c, "live-health-and-drain.png").await;

    // An action without the token is refused, and the page says so.
    click_and_confirm(&c, "tr[data-backend='pam/pam-b'] button.drain").await;
    wait_for(&c, "#result", None, "401").await;
    wait_for(&c, "#result", Some("class"), "result err").await;
    let b = backend_status(admin, "pam", "pam-b").await;
    assert!(b["drain"].is_null(), "refused, yet drained: {b}");
    save_screenshot(&c, "action-refused-without-token.png").await;

    // With the token typed in, the same action succeeds and shows.
    c.find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(TOKEN)
        .await
        .expect("type the token");
    c.find(Locator::Css("#token-save"))
        .await
        .expect("token button")
        .click()
        .await
        .expect("use the token");
    wait_for(&c, "#token-state", None, "token set").await;
    click_and_confirm(&c, "tr[data-backend='pam/pam-b'] button.drain").await;
    wait_for(&c, "#result", None, "200").await;
    wait_for(
        &c,
        "tr[data-backend='pam/pam-b']",
        Some("data-drained"),
        "yes",
    )
    .await;
    assert!(!backend_status(admin, "pam", "pam-b").await["drain"].is_null());
    // The token never went into the URL.
    let url = c.current_url().await.expect("url");
    assert!(!url.as_str().contains(TOKEN), "{url}");
    assert!(same_page(&c).await, "the page was reloaded");
    save_screenshot(&c, "action-with-token.png").await;

    let _ = c.close().await;
    drop(driver);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_page_is_served_with_its_security_headers_and_demo_calls_only_in_a_demo() {
    let pam = vec![TestBackend::start("p").await, TestBackend::start("r").await];
    let web = vec![TestBackend::start("w").await];
    let dir = unique_dir("dashboard-headers");
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let proxy = Proxy::start_file(&dir.join("k.toml"), &config(&pam, &web)).await;
    let admin = proxy.admin.unwrap();

    let page = get(admin, "admin", "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/dashboard.js"), "{}", page.body);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers["x-frame-options"], "DENY");
    for (path, ctype) in [
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
    ] {
        let r = get(admin, "admin", path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(ctype),
            "{path}"
        );
        assert_eq!(r.headers["cache-control"], "no-cache", "{path}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{path}");
    }
    // Outside `keyway demo` the demo calls do not exist, token or not.
    let r = post(admin, "/demo/backends/web/w/stop", Some(TOKEN)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    assert!(status["demo"].is_null(), "{status}");
    proxy.shutdown().await;
}

/// `keyway demo`'s "break something": stopping a demo backend makes it unhealthy for
/// real, starting it makes it healthy again; the calls need the token like any other.
#[tokio::test]
async fn a_demo_backend_stops_and_starts_through_the_admin_api() {
    let (a, b) = (free_port(), free_port());
    let dir = unique_dir("dashboard-demo");
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let cfg = format!(
        r#"[admin]
listen = "127.0.0.1:0"
token_file = "token"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "web"
[cluster.web]
strategy = "balanced"
{HEALTH}
backends = [{{ id = "a", address = "{a}" }}, {{ id = "b", address = "{b}" }}]
"#
    );
    let file = dir.join("demo.toml");
    std::fs::write(&file, cfg).unwrap();
    let loaded = keyway_proxy::load::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let demo = keyway::demo::start_backends(&loaded)
        .await
        .expect("demo backends");
    let server = keyway::Server::start_demo(loaded, demo)
        .await
        .expect("start");
    let admin = server.admin_addr().unwrap();
    let health = |id: &'static str| async move {
        backend_status(admin, "web", id).await["health"]["health"].clone()
    };
    eventually(STEP, "both demo backends healthy", || async {
        health("a").await == "healthy" && health("b").await == "healthy"
    })
    .await;

    let r = post(admin, "/demo/backends/web/b/stop", None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        post(admin, "/demo/backends/web/zz/stop", Some(TOKEN))
            .await
            .status,
        404
    );
    let r = post(admin, "/demo/backends/web/b/stop", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(STEP, "the stopped demo backend turns unhealthy", || async {
        health("b").await == "unhealthy"
    })
    .await;
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    let running: Vec<_> = status["demo"]
        .as_array()
        .expect("demo in /status")
        .iter()
        .map(|d| {
            (
                d["backend"].as_str().unwrap().to_string(),
                d["running"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(running, [("a".to_string(), true), ("b".to_string(), false)]);
    assert_eq!(health("a").await, "healthy");

    let r = post(admin, "/demo/backends/web/b/start", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        STEP,
        "the restarted demo backend is healthy again",
        || async { health("b").await == "healthy" },
    )
    .await;
    server.shutdown().await;
}
