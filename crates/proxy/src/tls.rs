//! Server-side TLS: certificates chosen by SNI, ALPN for HTTP/2 and HTTP/1.1. Upstream
//! client settings are `backend::tls`; their trust roots are `keyway_coord::tls::roots`,
//! re-exported here as [`roots`].
//!
//! Certificates are parsed and checked by the loader (`crate::load`); this module only arranges
//! them for lookup. The first certificate of a listener is served when the client sends
//! no SNI or a name no certificate covers, as operators expect from a "default" vhost.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// One certificate of a TLS listener, parsed, with its signing key.
#[derive(Clone)]
pub struct Cert {
    /// Host names (exact or `*.suffix`, lower case) it is served for.
    pub hosts: Vec<String>,
    /// The chain and signing key.
    pub certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Cert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cert").field("hosts", &self.hosts).finish()
    }
}

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

pub use keyway_coord::tls::roots;
