//! The data plane's loader: turns what a [`Config`] names into the parts the proxy runs
//! with. It resolves listener, admin and backend addresses (the first address the
//! system returns for a name), parses listener certificates and checks that each key
//! is its certificate's, and compiles the health and classifier plugins. Problems are
//! [`ConfigError`]s at the config's keys and lines, exactly as if the config itself had
//! found them. It binds no socket and changes no live state: a reload loads the next
//! config while the current one serves.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use rustls::sign::CertifiedKey;

pub use crate::cluster::ClusterParts;
use crate::config::{
    pem, Address, Config, ConfigError, HealthConfig, HealthPolicyKind, KeyPath, TlsCertConfig,
};
use crate::health::HealthPlugin;
use crate::plugin::ClassifierPlugin;
pub use crate::tls::Cert;

/// What the data plane runs with, beside its config (lists in the config's order).
#[derive(Clone, Debug, Default)]
pub struct Plane {
    /// The admin listener's address.
    pub admin: Option<SocketAddr>,
    /// Per `[[listener]]`.
    pub listeners: Vec<Listener>,
    /// Per `[[tcp_listener]]`.
    pub tcp_listeners: Vec<Listener>,
    /// Per cluster.
    pub clusters: Vec<ClusterParts>,
}

/// A listener's address and certificates.
#[derive(Clone, Debug)]
pub struct Listener {
    /// Where it binds.
    pub addr: SocketAddr,
    /// Its certificates, in config order (empty: no TLS).
    pub certs: Vec<Cert>,
}

/// Where a part that failed to load points (never used: a problem fails the load).
const NOWHERE: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Loads the data plane's parts of `config`, adding every problem to `errs`.
pub fn load(config: &Config, errs: &mut Vec<ConfigError>) -> Plane {
    let mut bound: Vec<(SocketAddr, KeyPath)> = Vec::new();
    let admin = config.admin.as_ref().and_then(|a| {
        let at = KeyPath::root().key("admin").key("listen");
        let addr = resolve(config, &a.listen, &at, errs)?;
        bound.push((addr, at));
        Some(addr)
    });
    let mut listeners = |tcp: bool, list: Vec<(&Address, &[TlsCertConfig])>| -> Vec<Listener> {
        list.into_iter()
            .enumerate()
            .map(|(i, (listen, tls))| {
                let at = config.listener_key(tcp, i).key("listen");
                let addr = resolve(config, listen, &at, errs);
                if let Some(a) = addr {
                    bound.push((a, at));
                }
                let certs = tls
                    .iter()
                    .enumerate()
                    .filter_map(|(j, t)| cert(config, t, &config.cert_key(tcp, i, j), errs))
                    .collect();
                Listener {
                    addr: addr.unwrap_or(NOWHERE),
                    certs,
                }
            })
            .collect()
    };
    let http = listeners(
        false,
        config
            .listeners
            .iter()
            .map(|l| (&l.listen, &l.tls[..]))
            .collect(),
    );
    let tcp = listeners(
        true,
        config
            .tcp_listeners
            .iter()
            .map(|l| (&l.listen, &l.tls[..]))
            .collect(),
    );
    // Two listeners (or a listener and the admin server) on one address would fail at bind.
    for (i, (addr, path)) in bound.iter().enumerate() {
        if addr.port() != 0 && bound[..i].iter().any(|(a, _)| a == addr) {
            errs.push(config.error_at(
                path,
                format!("{addr} is already used by another listener or the admin server"),
                "give each listener and [admin] its own address",
            ));
        }
    }
    let clusters = (0..config.clusters.len())
        .map(|c| cluster(config, c, errs))
        .collect();
    Plane {
        admin,
        listeners: http,
        tcp_listeners: tcp,
        clusters,
    }
}

/// An address as written, resolved: an IP address as is, a name by the system.
fn resolve(
    config: &Config,
    address: &Address,
    at: &KeyPath,
    errs: &mut Vec<ConfigError>,
) -> Option<SocketAddr> {
    let text = match address {
        Address::Ip(a) => return Some(*a),
        Address::Name(text) => text,
    };
    if let Some(a) = text.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        return Some(a);
    }
    errs.push(config.error_at(
        at,
        format!("`{text}` does not resolve to an address"),
        "use an IP address with a port, e.g. \"10.0.0.1:443\", or a name this host can resolve",
    ));
    None
}

/// A listener certificate: chain and key parsed, the key usable and the certificate's.
fn cert(
    config: &Config,
    t: &TlsCertConfig,
    at: &KeyPath,
    errs: &mut Vec<ConfigError>,
) -> Option<Cert> {
    let chain = pem::certs(&t.cert_path).map_err(|e| {
        errs.push(config.error_at(
            &at.key("cert"),
            e,
            "point cert at a PEM file with -----BEGIN CERTIFICATE----- blocks (leaf first)",
        ))
    });
    let key = pem::key(&t.key_path).map_err(|e| {
        errs.push(config.error_at(
            &at.key("key"),
            e,
            "point key at a PEM file with a PKCS#8, PKCS#1 or SEC1 private key",
        ))
    });
    let (chain, key) = (chain.ok()?, key.ok()?);
    let signer = match rustls::crypto::ring::sign::any_supported_type(&key) {
        Ok(s) => s,
        Err(e) => {
            errs.push(config.error_at(
                &at.key("key"),
                format!("unsupported private key: {e}"),
                "use an RSA, ECDSA (P-256/P-384) or Ed25519 key",
            ));
            return None;
        }
    };
    let certified = CertifiedKey::new(chain, signer);
    if certified.keys_match().is_err() {
        errs.push(config.error_at(
            &at.key("key"),
            format!(
                "{} does not match the certificate in {}",
                t.key_path.display(),
                t.cert_path.display()
            ),
            "pair each certificate with the key it was issued for",
        ));
        return None;
    }
    Some(Cert {
        hosts: t.hosts.clone(),
        certified: Arc::new(certified),
    })
}

/// Cluster `c`'s backend addresses and plugins.
fn cluster(config: &Config, c: usize, errs: &mut Vec<ConfigError>) -> ClusterParts {
    let cfg = &config.clusters[c];
    let at = config.cluster_key(c);
    let addresses = cfg
        .backends
        .iter()
        .enumerate()
        .map(|(b, backend)| {
            let key = config.backend_key(c, b).key("address");
            resolve(config, &backend.address, &key, errs).unwrap_or(NOWHERE)
        })
        .collect();
    let classifier = cfg.split.classifier.as_ref().and_then(|h| {
        ClassifierPlugin::load(&h.plugin.path, &h.plugin.config_json)
            .map_err(|e| {
                errs.push(config.error_at(
                    &at.key("classifier").key("policy"),
                    e,
                    "fix the plugin or its `config`, or remove `classifier` to use read_routes/write_routes",
                ))
            })
            .ok()
    });
    let health = match &cfg.health {
        Some(HealthConfig {
            policy: HealthPolicyKind::Plugin { plugin, .. },
            ..
        }) => HealthPlugin::load(&plugin.path, &plugin.config_json)
            .map_err(|e| {
                errs.push(config.error_at(
                    &at.key("health").key("policy"),
                    e,
                    "fix the plugin or its `config`, or use a built-in policy (\"rise-fall\", \"failed-checks\")",
                ))
            })
            .ok(),
        _ => None,
    };
    ClusterParts {
        addresses,
        health,
        classifier,
    }
}
