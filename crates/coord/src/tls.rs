//! Client-side TLS: trust roots (the operator's CA, or the system's store) and the
//! rustls client config of control-plane calls (etcd, promotion hooks, failsafe peers).
//! The data plane's upstream connections use the same [`roots`].
//!
//! It only builds configs from certificates already read; it never reads a file or
//! opens a connection.

use std::sync::Arc;

/// Trust roots: the certificates of `ca`, or without it the system's store (an error
/// when that is empty).
pub fn roots(
    ca: Option<&[rustls_pki_types::CertificateDer<'static>]>,
) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("cannot use the CA certificate: {e}"))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err("the system has no CA store".into());
            }
        }
    }
    Ok(roots)
}

/// A rustls client config for control-plane calls (etcd, promotion hooks): trusts `ca`
/// (or, without it, the system's roots), presents `identity` (certificate chain and key)
/// when the server asks for one, and speaks http/1.1.
pub fn client_config(
    ca: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    identity: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = roots(ca).map_err(|e| format!("{e}; name the CA with `ca`"))?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("cannot use the client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
