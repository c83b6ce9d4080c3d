//! Server-side TLS: certificates chosen by SNI, ALPN for HTTP/2 and HTTP/1.1; and the
//! client side of the control plane (etcd, promotion hooks).
//!
//! Certificates are parsed and checked by the loader (`crate::load`); this module only arranges
//! them for lookup. The first certificate of a listener is served when the client sends
//! no SNI or a name no certificate covers, as operators expect from a "default" vhost.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::load::Cert;

/// Picks a certificate by SNI: exact name, then the longest `*.suffix`, then the default.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// (".suffix", cert), longest suffix first.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Builds a resolver; `None` if `certs` is empty.
    pub fn new(certs: &[Cert]) -> Option<Self> {
        let default = certs.first()?.certified.clone();
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        for c in certs {
            for h in &c.hosts {
                match h.strip_prefix('*') {
                    Some(suffix) => wildcard.push((suffix.to_string(), c.certified.clone())),
                    None => {
                        exact
                            .entry(h.clone())
                            .or_insert_with(|| c.certified.clone());
                    }
                }
            }
        }
        wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        Some(Self {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for `name` (any case).
    pub fn lookup(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c.clone();
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| self.default.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()))
    }
}

/// A rustls server config for a listener's certificates, offering h2 and http/1.1.
pub fn server_config(certs: &[Cert]) -> Option<Arc<rustls::ServerConfig>> {
    let resolver = SniResolver::new(certs)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Some(Arc::new(cfg))
}

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
