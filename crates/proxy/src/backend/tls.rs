//! A TLS backend's client settings: its trust roots (the cluster's `upstream_ca`, or the
//! system's), ALPN for the configured protocol (and an HTTP/1.1-only variant for
//! upgrades) and the server name it is checked against. Built once per backend when
//! its cluster is built; it never opens a connection.

use std::sync::Arc;

use rustls::pki_types::ServerName;

use crate::config::{BackendConfig, UpstreamProtocol};

/// TLS client settings for one backend.
pub struct BackendTls {
    /// ALPN per the backend's `protocol`.
    pub(crate) normal: Arc<rustls::ClientConfig>,
    /// ALPN `http/1.1` only, for Upgrade requests.
    pub(crate) h1_only: Arc<rustls::ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
}

impl BackendTls {
    /// Builds TLS settings that verify the backend against `ca` (or the system store).
    pub fn new(
        ca: Option<&[rustls::pki_types::CertificateDer<'static>]>,
        cfg: &BackendConfig,
    ) -> Result<Self, String> {
        let roots = crate::tls::roots(ca).map_err(|e| match ca {
            Some(_) => format!("upstream_ca: {e}"),
            None => format!(
                "backend `{}` uses tls but no upstream_ca is set and {e}; set upstream_ca",
                cfg.id
            ),
        })?;
        let base = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let with_alpn = |alpn: &[&[u8]]| {
            let mut c = base.clone();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(c)
        };
        let normal = match cfg.protocol {
            UpstreamProtocol::Http1 => with_alpn(&[b"http/1.1"]),
            UpstreamProtocol::Http2 => with_alpn(&[b"h2"]),
            UpstreamProtocol::Auto => with_alpn(&[b"h2", b"http/1.1"]),
        };
        let server_name = ServerName::try_from(cfg.sni.clone())
            .map_err(|e| format!("backend `{}`: bad sni `{}`: {e}", cfg.id, cfg.sni))?;
        Ok(Self {
            normal,
            h1_only: with_alpn(&[b"http/1.1"]),
            server_name,
        })
    }
}
