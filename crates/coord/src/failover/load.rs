//! The coordination loader: turns what a [`Config`] names for promotion and coordination
//! into the parts the failover manager runs with. It compiles promotion plugins, builds
//! the TLS settings of `https://` hooks (trusting the cluster's `upstream_ca`), resolves
//! the etcd endpoints and builds the TLS settings for etcd from `ca`, `cert` and `key`.
//! Problems are [`ConfigError`]s at the config's keys and lines, exactly as if the config
//! itself had found them. It opens no store, talks to no etcd and calls no hook.

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;

use crate::etcd::Endpoint;
use keyway_config::{
    pem, Config, ConfigError, EtcdConfig, HookConfig, KeyPath, PromotionPolicyKind, StateConfig,
};
use keyway_plugin_host::PromotionPlugin;

/// What the failover manager runs with, beside its config.
#[derive(Clone, Debug, Default)]
pub struct Coordination {
    /// With `[coordination]`: the etcd client's endpoints and TLS.
    pub etcd: Option<EtcdParts>,
    /// Per cluster with `promotion`: its plugin and hook TLS.
    pub clusters: HashMap<String, PromotionParts>,
}

/// The etcd client's endpoints, resolved, and its TLS settings.
#[derive(Clone, Debug, Default)]
pub struct EtcdParts {
    /// In config order.
    pub endpoints: Vec<Endpoint>,
    /// For `https://` endpoints.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A cluster's compiled promotion plugin and the TLS settings of its `https://` hooks.
#[derive(Clone, Debug, Default)]
pub struct PromotionParts {
    /// When `promotion.policy` names a plugin.
    pub plugin: Option<Arc<PromotionPlugin>>,
    /// When a hook is `https://`.
    pub hook_tls: Option<Arc<rustls::ClientConfig>>,
}

impl super::Failover {
    /// Takes the parts loaded with a reloaded config (just before its runtime is
    /// swapped in).
    pub fn use_parts(&self, parts: &Coordination) {
        if let Ok(mut p) = self.parts.lock() {
            *p = parts.clusters.clone();
        }
    }

    /// The compiled promotion plugin of `cluster`, when its policy names one.
    pub fn promotion_plugin(&self, cluster: &str) -> Option<Arc<PromotionPlugin>> {
        self.parts.lock().ok()?.get(cluster)?.plugin.clone()
    }

    /// The TLS settings of `cluster`'s `https://` hooks.
    pub(super) fn hook_tls(&self, cluster: &str) -> Option<Arc<rustls::ClientConfig>> {
        self.parts.lock().ok()?.get(cluster)?.hook_tls.clone()
    }
}

/// Loads the coordination parts of `config`, adding every problem to `errs`.
pub fn load(config: &Config, errs: &mut Vec<ConfigError>) -> Coordination {
    let mut clusters = HashMap::new();
    for (i, c) in config.clusters.iter().enumerate() {
        let Some(p) = &c.promotion else {
            continue;
        };
        let at = config.cluster_key(i).key("promotion");
        let plugin = match &p.policy {
            PromotionPolicyKind::Plugin { plugin, .. } => {
                PromotionPlugin::load(&plugin.path, &plugin.config_json)
                    .map_err(|e| {
                        errs.push(config.error_at(
                    &at.key("policy"),
                    e,
                    "fix the plugin or its `config`, or use policy = \"priority-promotion\"",
                ))
                    })
                    .ok()
            }
            _ => None,
        };
        let https: Vec<&str> = [("on_promote", &p.on_promote), ("on_repoint", &p.on_repoint)]
            .into_iter()
            .filter(|(_, h)| h.as_ref().is_some_and(|h: &HookConfig| h.https))
            .map(|(key, _)| key)
            .collect();
        // Hooks go to the backends: trust what the cluster trusts for them.
        let hook_tls = if https.is_empty() {
            None
        } else {
            match crate::tls::client_config(c.upstream_ca.as_deref(), None) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    for key in https {
                        errs.push(config.error_at(
                            &at.key(key).key("url"),
                            format!("https hook: {e}"),
                            "set the cluster's upstream_ca to the CA that signed the backends' certificates",
                        ));
                    }
                    None
                }
            }
        };
        clusters.insert(c.name.clone(), PromotionParts { plugin, hook_tls });
    }
    let etcd = match &config.state {
        StateConfig::Etcd(e) => Some(etcd(config, e, errs)),
        StateConfig::File(_) => None,
    };
    Coordination { etcd, clusters }
}

/// The etcd endpoints resolved and the TLS settings built.
fn etcd(config: &Config, e: &EtcdConfig, errs: &mut Vec<ConfigError>) -> EtcdParts {
    let mut endpoints = Vec::new();
    for (i, ep) in e.endpoints.iter().enumerate() {
        match ep
            .authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(addr) => endpoints.push(Endpoint {
                addr,
                at: ep.clone(),
            }),
            None => {
                let (at, text) = config.etcd_endpoint_key(i);
                errs.push(config.error_at(
                    &at,
                    format!("`{text}` is not a reachable host:port"),
                    "write it like \"http://127.0.0.1:2379\" or \"https://etcd1.corp:2379\"",
                ));
            }
        }
    }
    let tls = e.tls.as_ref().and_then(|t| {
        let cp = KeyPath::root().key("coordination");
        let [ca, cert, key] = &t.files;
        let ca = match ca {
            Some(f) => Some(parsed(config, pem::certs(f), &cp.key("ca"), "point ca at the PEM file of the CA that signed etcd's server certificates (etcd's --trusted-ca-file)", errs)?),
            None => None,
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((
                parsed(config, pem::certs(cert), &cp.key("cert"), "point cert at keyway's client certificate (PEM, leaf first)", errs)?,
                parsed(config, pem::key(key), &cp.key("key"), "point key at a PEM file with a PKCS#8, PKCS#1 or SEC1 private key", errs)?,
            )),
            _ => None,
        };
        match crate::tls::client_config(ca.as_deref(), identity) {
            Ok(client) => Some(client),
            Err(e) => {
                errs.push(config.error_at(
                    &cp,
                    format!("TLS to etcd: {e}"),
                    "check ca, cert and key (the key must be the certificate's)",
                ));
                None
            }
        }
    });
    EtcdParts { endpoints, tls }
}

/// A parsed file, or its problem reported at `at`.
fn parsed<T>(
    config: &Config,
    result: Result<T, String>,
    at: &KeyPath,
    fix: &str,
    errs: &mut Vec<ConfigError>,
) -> Option<T> {
    result
        .map_err(|e| errs.push(config.error_at(at, e, fix)))
        .ok()
}
