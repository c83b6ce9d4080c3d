//! TLS: SNI picks the certificate, ALPN offers h2, backends verified against
//! `upstream_ca`, and WebSocket through TLS.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use keyway_tests::*;

struct Setup {
    pki: TestPki,
    pvwa: Leaf,
    psm: Leaf,
    proxy: Proxy,
    backend: TestBackend,
}

async fn setup(backend_tls: bool) -> Setup {
    let pki = TestPki::new();
    let pvwa = pki.leaf("pvwa", &["pvwa.corp.test"]);
    let psm = pki.leaf("psm", &["psm.corp.test", "*.psm.corp.test"]);
    let upstream = pki.leaf("backend", &["backend.corp.test"]);
    let backend = if backend_tls {
        TestBackend::start_tls("secure", &upstream, Duration::ZERO).await
    } else {
        TestBackend::start("plain").await
    };
    let cfg = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
tls = [
  {{ hosts = ["pvwa.corp.test"], cert = "{}", key = "{}" }},
  {{ hosts = ["psm.corp.test", "*.psm.corp.test"], cert = "{}", key = "{}" }},
]
[[route]]
cluster = "farm"
[cluster.farm]
upstream_ca = "{}"
backends = [{{ id = "b", address = "{}", tls = {backend_tls}, sni = "backend.corp.test" }}]
"#,
        pvwa.cert_pem.display(),
        pvwa.key_pem.display(),
        psm.cert_pem.display(),
        psm.key_pem.display(),
        pki.ca_pem.display(),
        backend.addr
    );
    let proxy = Proxy::start(&cfg).await;
    Setup {
        pki,
        pvwa,
        psm,
        proxy,
        backend,
    }
}

#[tokio::test]
async fn sni_selects_the_certificate_and_the_first_is_default() {
    let s = setup(false).await;
    let client = s.pki.client_config(&[b"http/1.1"]);

    let c = tls_connect(s.proxy.addr, "pvwa.corp.test", client.clone()).await;
    assert_eq!(c.peer_cert.as_ref(), Some(&s.pvwa.der));
    let r = tls_get(c, "pvwa.corp.test", "/").await;
    assert_eq!(r.status, 200);

    let c = tls_connect(s.proxy.addr, "psm.corp.test", client.clone()).await;
    assert_eq!(c.peer_cert.as_ref(), Some(&s.psm.der));

    let c = tls_connect(s.proxy.addr, "gw1.psm.corp.test", client.clone()).await;
    assert_eq!(c.peer_cert.as_ref(), Some(&s.psm.der), "wildcard host");

    // Unknown SNI gets the default (first) certificate. It does not cover that name, so
    // the client accepts any certificate and compares the one presented.
    let tcp = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let mut cfg = (*client).clone();
    cfg.dangerous()
        .set_certificate_verifier(std::sync::Arc::new(AcceptAny));
    let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("unknown.example".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let presented = conn.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented, s.pvwa.der);
}

#[tokio::test]
async fn alpn_h2_downstream_and_forwarded_proto_https() {
    let s = setup(false).await;
    let c = tls_connect(
        s.proxy.addr,
        "pvwa.corp.test",
        s.pki.client_config(&[b"h2", b"http/1.1"]),
    )
    .await;
    assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
    let r = tls_get(c, "pvwa.corp.test", "/PasswordVault/").await;
    assert_eq!(r.status, 200);
    let seen = &s.backend.seen()[0];
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["via"], "2 keyway");
}

#[tokio::test]
async fn tls_backend_verified_with_upstream_ca_and_h2_by_alpn() {
    let s = setup(true).await;
    let c = tls_connect(
        s.proxy.addr,
        "pvwa.corp.test",
        s.pki.client_config(&[b"http/1.1"]),
    )
    .await;
    let r = tls_get(c, "pvwa.corp.test", "/").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.backend(), "secure");
    assert_eq!(
        s.backend.seen()[0].version,
        "HTTP/2.0",
        "ALPN picked h2 upstream"
    );
}

#[tokio::test]
async fn tls_backend_with_untrusted_certificate_fails_closed() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let leaf = other.leaf("rogue", &["backend.corp.test"]);
    let rogue = TestBackend::start_tls("rogue", &leaf, Duration::ZERO).await;
    let cfg = format!(
        r#"
[[listener]]
listen = "127.0.0.1:0"
[[route]]
cluster = "farm"
[cluster.farm]
upstream_ca = "{}"
retries = 0
backends = [{{ id = "b", address = "{}", tls = true, sni = "backend.corp.test" }}]
"#,
        pki.ca_pem.display(),
        rogue.addr
    );
    let proxy = Proxy::start(&cfg).await;
    let r = get(proxy.addr, "h", "/").await;
    // No backend could be reached: 503, with the TLS failure in the detail.
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("TLS handshake"), "{}", r.body);
    assert_eq!(rogue.hits(), 0);
}

#[tokio::test]
async fn websocket_through_tls() {
    let s = setup(false).await;
    let c = tls_connect(
        s.proxy.addr,
        "psm.corp.test",
        s.pki.client_config(&[b"http/1.1"]),
    )
    .await;
    let (mut ws, resp) =
        tokio_tungstenite::client_async("wss://psm.corp.test/guac/websocket-tunnel", c.stream)
            .await
            .expect("wss handshake");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(format!("key {i}").into()).await.unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.to_text().unwrap(), format!("plain:key {i}"));
    }
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
