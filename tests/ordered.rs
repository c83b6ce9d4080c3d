//! Ordered clusters (Vault.ini semantics) with staggered connect (BeyondTrust
//! `masterdelay`) and `protocol_timeout`.

use std::time::{Duration, Instant};

use keyway_tests::*;

fn ordered_config(extra: &str, backends: &[(&str, String, bool)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, (id, addr, tls))| {
            format!(r#"{{ id = "{id}", address = "{addr}", priority = {i}, tls = {tls}, sni = "vault.corp.test" }}"#)
        })
        .collect();
    format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "vault"
[cluster.vault]
strategy = "ordered"
{extra}
backends = [{}]
"#,
        list.join(", ")
    )
}

#[tokio::test]
async fn first_answering_backend_in_priority_order_wins() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let proxy = Proxy::start(&ordered_config(
        "",
        &[
            ("a", a.addr.to_string(), false),
            ("b", b.addr.to_string(), false),
        ],
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(get(proxy.addr, "h", "/").await.backend(), "a");
    }
    assert_eq!(b.hits(), 0);
}

#[tokio::test]
async fn refused_first_backend_moves_on_at_once() {
    let dead = refused_addr().await;
    let b = TestBackend::start("b").await;
    // A stagger far longer than the test: only "refused moves on at once" can pass it.
    let proxy = Proxy::start(&ordered_config(
        r#"connect_stagger = "30s""#,
        &[
            ("dead", dead.to_string(), false),
            ("b", b.addr.to_string(), false),
        ],
    ))
    .await;
    let t = Instant::now();
    let r = get(proxy.addr, "h", "/").await;
    assert_eq!(r.backend(), "b");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn slow_first_backend_gets_company_after_the_stagger() {
    let pki = TestPki::new();
    let leaf = pki.leaf("vault", &["vault.corp.test"]);
    // `a` accepts TCP at once but its TLS handshake only starts after 3 s: its connection
    // is not up within the 200 ms stagger, so `b` is started in parallel and wins.
    let a = TestBackend::start_tls("a", &leaf, Duration::from_secs(3)).await;
    let b = TestBackend::start_tls("b", &leaf, Duration::ZERO).await;
    let extra = format!(
        "connect_stagger = \"200ms\"\nconnect_timeout = \"10s\"\nupstream_ca = \"{}\"",
        pki.ca_pem.display()
    );
    let proxy = Proxy::start(&ordered_config(
        &extra,
        &[
            ("a", a.addr.to_string(), true),
            ("b", b.addr.to_string(), true),
        ],
    ))
    .await;
    let t = Instant::now();
    let r = get(proxy.addr, "h", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.backend(), "b");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "b should win long before a's handshake: {:?}",
        t.elapsed()
    );
    assert!(a.connections() >= 1, "a was tried first");
}

#[tokio::test]
async fn the_first_connection_up_wins_even_after_others_join() {
    let pki = TestPki::new();
    let leaf = pki.leaf("vault", &["vault.corp.test"]);
    // a: up after 400 ms; b: up after 3 s. With a 100 ms stagger both are racing, and a,
    // which completes first, wins.
    let a = TestBackend::start_tls("a", &leaf, Duration::from_millis(400)).await;
    let b = TestBackend::start_tls("b", &leaf, Duration::from_secs(3)).await;
    let extra = format!(
        "connect_stagger = \"100ms\"\nconnect_timeout = \"10s\"\nupstream_ca = \"{}\"",
        pki.ca_pem.display()
    );
    let proxy = Proxy::start(&ordered_config(
        &extra,
        &[
            ("a", a.addr.to_string(), true),
            ("b", b.addr.to_string(), true),
        ],
    ))
    .await;
    let r = get(proxy.addr, "h", "/").await;
    assert_eq!(r.backend(), "a");
    assert!(b.connections() >= 1, "b joined the race after the stagger");
}

#[tokio::test]
async fn a_backend_that_never_answers_is_bounded_by_protocol_timeout() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    a.set_mode(Mode::Hang);
    let proxy = Proxy::start(&ordered_config(
        r#"protocol_timeout = "300ms""#,
        &[
            ("a", a.addr.to_string(), false),
            ("b", b.addr.to_string(), false),
        ],
    ))
    .await;
    // A GET is retried once on the next backend.
    let t = Instant::now();
    let r = get(proxy.addr, "h", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.backend(), "b");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A POST that reached `a` is not re-sent: 504 after the protocol timeout.
    let t = Instant::now();
    let r = send(proxy.addr, request("POST", "h", "/x", "payload")).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(b.seen().iter().filter(|s| s.method == "POST").count(), 0);
}
