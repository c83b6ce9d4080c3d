//! Turns config text into a validated [`Config`], collecting every error.
//!
//! Order of work: syntax (toml) → shape (serde, with unknown keys collected by
//! `serde_ignored`) → each field (addresses, durations, names, files) → fields against
//! each other (duplicate ids, routes to clusters that do not exist, listeners sharing an
//! address). Each error carries the key path; `Locator` turns it into a line number.
//! Nothing here binds sockets or touches live state.

use std::collections::{BTreeSet, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::file::*;
use super::locate::{KeyPath, Locator};
use super::*;

/// Collects errors while building.
struct Errors<'a> {
    loc: &'a Locator<'a>,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, path: &KeyPath, message: impl Into<String>, fix: impl Into<String>) {
        self.list.push(ConfigError {
            line: self.loc.line(path),
            path: path.to_string(),
            message: message.into(),
            fix: fix.into(),
        });
    }
}

/// Parses a duration written as `"500ms"`, `"2s"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a duration ({e}); write a number with a unit, e.g. \"500ms\", \"2s\", \"5m\"")
    })
}

pub(super) fn build(text: &str, base: &Path) -> Result<Config, Vec<ConfigError>> {
    let loc = Locator::new(text);
    let mut errs = Errors {
        loc: &loc,
        list: Vec::new(),
    };

    let de = match toml::Deserializer::parse(text) {
        Ok(de) => de,
        Err(e) => {
            return Err(vec![toml_error(
                &loc,
                &e,
                "fix the TOML syntax at that line",
            )])
        }
    };
    let mut unknown = Vec::new();
    let file: Result<FileConfig, _> =
        serde_ignored::deserialize(de, |p| unknown.push(KeyPath::from_ignored(&p)));
    // Plugin `config` tables belong to the plugin: their keys are its business.
    unknown.retain(|p| {
        !p.0.iter()
            .any(|s| *s == super::locate::Seg::Key("config".into()))
    });
    for path in &unknown {
        let key = path.last_key().unwrap_or("?");
        let parent = KeyPath(path.0[..path.0.len().saturating_sub(1)].to_vec());
        let known = known_keys(&parent);
        let fix = match closest(key, known) {
            Some(k) => format!(
                "did you mean `{k}`? Keys allowed here: {}",
                known.join(", ")
            ),
            None if known.is_empty() => "remove it".to_string(),
            None => format!("remove it; keys allowed here: {}", known.join(", ")),
        };
        errs.push(path, format!("unknown key `{key}`"), fix);
    }
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            let mut list = errs.list;
            list.push(toml_error(
                &loc,
                &e,
                "give the value the type shown in docs/config.md",
            ));
            return Err(list);
        }
    };

    let cfg = check(&file, base, &mut errs);
    if errs.list.is_empty() {
        Ok(cfg)
    } else {
        let mut list = errs.list;
        list.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        Err(list)
    }
}

fn toml_error(loc: &Locator<'_>, e: &toml::de::Error, fix: &str) -> ConfigError {
    ConfigError {
        line: e.span().map(|s| loc.line_of_offset(s.start)),
        path: String::new(),
        message: e.message().trim().to_string(),
        fix: fix.to_string(),
    }
}

/// The keys each table accepts, for "did you mean" hints on unknown keys.
fn known_keys(parent: &KeyPath) -> &'static [&'static str] {
    use super::locate::Seg::{Index, Key};
    let segs: Vec<Option<&str>> = parent
        .0
        .iter()
        .map(|s| match s {
            Key(k) => Some(k.as_str()),
            Index(_) => None,
        })
        .collect();
    match segs.as_slice() {
        [] => &[
            "admin",
            "proxy",
            "listener",
            "tcp_listener",
            "route",
            "cluster",
            "state",
            "coordination",
        ],
        [Some("state")] => &["file"],
        [Some("coordination")] => &[
            "etcd",
            "prefix",
            "lease_ttl",
            "instance",
            "timeout",
            "ca",
            "cert",
            "key",
            "failsafe",
        ],
        [Some("coordination"), Some("failsafe")] => &["peers"],
        [Some("admin")] => &["listen", "token_file"],
        [Some("proxy")] => &[
            "workers",
            "drain_timeout",
            "access_log",
            "secret_file",
            "watch_plugins",
        ],
        [Some("listener"), None] => &[
            "listen",
            "tls",
            "max_request_header_bytes",
            "max_request_body_bytes",
            "header_read_timeout",
            "idle_timeout",
            "allow_encoded_slashes",
            "allow_trace",
            "trusted_proxies",
            "forwarded",
            "max_connections",
            "proxy_protocol",
        ],
        [Some("listener" | "tcp_listener"), None, Some("tls"), None] => &["hosts", "cert", "key"],
        [Some("tcp_listener"), None] => &[
            "listen",
            "cluster",
            "sni",
            "tls",
            "idle_timeout",
            "handshake_timeout",
            "max_connections",
            "proxy_protocol",
        ],
        [Some("tcp_listener"), None, Some("sni"), None] => &["hosts", "cluster"],
        [Some("route"), None] => &["host", "path", "cluster"],
        [Some("cluster"), Some(_)] => &[
            "strategy",
            "balance",
            "paths",
            "upgrades",
            "sticky",
            "connect_timeout",
            "connect_stagger",
            "protocol_timeout",
            "protocol_check",
            "affinity",
            "retries",
            "retry_budget",
            "upstream_ca",
            "pool",
            "max_connections",
            "max_queue",
            "queue_timeout",
            "health",
            "outlier",
            "read_routes",
            "write_routes",
            "reads_on_primary",
            "max_lag",
            "read_your_writes",
            "classifier",
            "promotion",
            "failback",
            "backends",
        ],
        [Some("cluster"), Some(_), Some("promotion")] => &[
            "policy",
            "config",
            "on_error",
            "auto",
            "hold",
            "require_hook_ok",
            "on_promote",
            "on_repoint",
            "drain",
        ],
        [Some("cluster"), Some(_), Some("promotion"), Some("on_promote" | "on_repoint")] => {
            &["url", "timeout"]
        }
        [Some("cluster"), Some(_), Some("failback")] => &["after"],
        [Some("cluster"), Some(_), Some("health")] => &[
            "kind",
            "path",
            "interval",
            "timeout",
            "expect",
            "rise",
            "fall",
            "policy",
            "failures",
            "window",
            "initial",
            "lag_header",
            "lag_json",
            "config",
            "on_error",
            "port",
        ],
        [Some("cluster"), Some(_), Some("classifier")] => &["policy", "config", "on_error"],
        [Some("cluster"), Some(_), Some("outlier")] => &[
            "consecutive_failures",
            "base_ejection",
            "max_ejection",
            "count_5xx",
        ],
        [Some("cluster"), Some(_), Some("sticky")] => &["cookie", "max_age"],
        [Some("cluster"), Some(_), Some("retry_budget")] => &["ratio", "min_per_second"],
        [Some("cluster"), Some(_), Some("pool")] => &["max_idle", "idle_timeout"],
        [Some("cluster"), Some(_), Some("backends"), None] => &[
            "id",
            "address",
            "weight",
            "priority",
            "tls",
            "sni",
            "protocol",
            "role",
            "location",
            "max_connections",
            "max_queue",
            "proxy_protocol",
        ],
        _ => &[],
    }
}

/// The known key nearest to `key` by edit distance, if it is close enough to be a typo.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                let cost = usize::from(ca != *cb);
                cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn check(file: &FileConfig, base: &Path, errs: &mut Errors<'_>) -> Config {
    let root = KeyPath::root();
    let mut bound: Vec<(SocketAddr, KeyPath)> = Vec::new();

    let admin = file.admin.as_ref().and_then(|a| {
        let p = root.key("admin").key("listen");
        let token = a.token_file.as_deref().and_then(|f| {
            admin_token(
                &resolve(base, f),
                &root.key("admin").key("token_file"),
                errs,
            )
        });
        let addr = socket_addr(&a.listen, &p, errs)?;
        bound.push((addr, p));
        Some(AdminConfig {
            listen: addr,
            token,
        })
    });

    let fp = file.proxy.as_ref();
    let proxy = ProxySettings {
        workers: fp.and_then(|p| p.workers).and_then(|w| {
            if w == 0 || w > 1024 {
                errs.push(
                    &root.key("proxy").key("workers"),
                    format!("workers = {w} is out of range"),
                    "use 1 to 1024, or remove it to use one worker per core",
                );
                None
            } else {
                Some(w)
            }
        }),
        drain_timeout: duration(
            fp.and_then(|p| p.drain_timeout.as_deref()),
            &root.key("proxy").key("drain_timeout"),
            DEFAULT_DRAIN_TIMEOUT,
            errs,
        ),
        access_log: fp.and_then(|p| p.access_log).unwrap_or(false),
        watch_plugins: fp.and_then(|p| p.watch_plugins).unwrap_or(true),
        secret: fp.and_then(|p| p.secret_file.as_deref()).and_then(|f| {
            let path = root.key("proxy").key("secret_file");
            let file = resolve(base, f);
            read_file_checked(&file, &path, errs)?;
            match std::fs::read(&file) {
                Ok(bytes) if bytes.len() >= 16 => Some(bytes),
                Ok(_) => {
                    errs.push(
                        &path,
                        format!("{} holds fewer than 16 bytes", file.display()),
                        "fill it with random bytes: head -c 32 /dev/urandom > FILE",
                    );
                    None
                }
                Err(e) => {
                    errs.push(
                        &path,
                        format!("cannot read {}: {e}", file.display()),
                        "check the path and permissions",
                    );
                    None
                }
            }
        }),
    };

    if file.listeners.is_empty() && file.tcp_listeners.is_empty() {
        errs.push(
            &root,
            "no [[listener]] is defined, so keyway would accept no traffic",
            "add a [[listener]] table with listen = \"127.0.0.1:8080\" (or a [[tcp_listener]])",
        );
    }
    let listeners = file
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| listener(l, &root.key("listener").index(i), base, &mut bound, errs))
        .collect();

    let clusters: Vec<ClusterConfig> = file
        .clusters
        .iter()
        .filter_map(|(name, c)| cluster(name, c, &root.key("cluster").key(name), base, errs))
        .collect();

    let defined: BTreeSet<&str> = file.clusters.keys().map(String::as_str).collect();
    let tcp_listeners = file
        .tcp_listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            tcp_listener(
                l,
                &root.key("tcp_listener").index(i),
                base,
                &file.clusters,
                &mut bound,
                errs,
            )
        })
        .collect();
    tcp_keys_need_a_tcp_listener(file, &root, errs);
    let routes = file
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(r, &root.key("route").index(i), &defined, errs))
        .collect();

    // Two listeners (or a listener and the admin server) on one address would fail at bind.
    for (i, (addr, path)) in bound.iter().enumerate() {
        if addr.port() != 0 && bound[..i].iter().any(|(a, _)| a == addr) {
            errs.push(
                path,
                format!("{addr} is already used by another listener or the admin server"),
                "give each listener and [admin] its own address",
            );
        }
    }

    let state = match &file.coordination {
        Some(c) => {
            let cp = root.key("coordination");
            if file.state.as_ref().is_some_and(|s| s.file.is_some()) {
                errs.push(
                    &root.key("state").key("file"),
                    "[state] file and [coordination] both say where decisions live",
                    "keep [coordination] for several instances sharing etcd, or [state] for one instance",
                );
            }
            if c.etcd.is_empty() {
                errs.push(
                    &cp.key("etcd"),
                    "no etcd endpoint given",
                    "list them: etcd = [\"http://127.0.0.1:2379\"]",
                );
            }
            let endpoints: Vec<EtcdEndpoint> = c
                .etcd
                .iter()
                .enumerate()
                .filter_map(|(i, e)| etcd_endpoint(e, &cp.key("etcd").index(i), errs))
                .collect();
            let tls = etcd_tls(c, &endpoints, &cp, base, errs);
            let prefix = c.prefix.clone().unwrap_or_else(|| "/keyway".into());
            if !prefix.starts_with('/') || prefix.ends_with('/') {
                errs.push(
                    &cp.key("prefix"),
                    format!("prefix `{prefix}` must start with / and not end with one"),
                    "use e.g. \"/keyway\"",
                );
            }
            let lease_ttl = nonzero_duration(
                c.lease_ttl.as_deref(),
                &cp.key("lease_ttl"),
                DEFAULT_LEASE_TTL,
                errs,
            );
            if lease_ttl < Duration::from_secs(1) {
                errs.push(
                    &cp.key("lease_ttl"),
                    "etcd leases are granted in whole seconds",
                    "use 1s or more",
                );
            }
            let timeout = nonzero_duration(
                c.timeout.as_deref(),
                &cp.key("timeout"),
                DEFAULT_ETCD_TIMEOUT,
                errs,
            );
            if timeout >= lease_ttl {
                // A renewal that takes its whole timeout would be answered after the
                // permit it grants had already run out.
                errs.push(
                    &cp.key("timeout"),
                    format!(
                        "timeout ({timeout:?}) must be shorter than lease_ttl ({lease_ttl:?}): a lease renewal that used its whole timeout would grant no time to write"
                    ),
                    format!(
                        "set timeout to {}ms or less (etcd answers in milliseconds on a LAN), or lengthen lease_ttl",
                        (lease_ttl / 3).as_millis().max(1)
                    ),
                );
            }
            StateConfig::Etcd(EtcdConfig {
                endpoints,
                tls,
                prefix,
                lease_ttl: lease_ttl.max(Duration::from_secs(1)),
                instance: c.instance.clone().unwrap_or_else(default_instance_name),
                failsafe_peers: failsafe_peers(c, &cp, errs),
                timeout,
            })
        }
        None => StateConfig::File(resolve(
            base,
            file.state
                .as_ref()
                .and_then(|s| s.file.as_deref())
                .unwrap_or(DEFAULT_STATE_FILE),
        )),
    };

    if let StateConfig::Etcd(e) = &state {
        // A cut-off instance stops writing when its lease runs out; promoting sooner
        // than that would give the farm two writers.
        for c in &clusters {
            if let Some(p) = c
                .promotion
                .as_ref()
                .filter(|p| p.auto && p.hold <= e.lease_ttl)
            {
                errs.push(
                    &root.key("cluster").key(&c.name).key("promotion").key("hold"),
                    format!(
                        "hold ({:?}) must be longer than [coordination] lease_ttl ({:?}) for automatic promotion with etcd",
                        p.hold, e.lease_ttl
                    ),
                    format!(
                        "set hold = \"{}ms\" or more, or shorten lease_ttl",
                        (e.lease_ttl + Duration::from_millis(500)).as_millis()
                    ),
                );
            }
        }
    }

    Config {
        admin,
        proxy,
        listeners,
        tcp_listeners,
        routes,
        clusters,
        state,
    }
}

/// `failsafe = { peers = ["http://HOST:PORT", ...] }`: other instances' admin listeners.
fn failsafe_peers(c: &FileCoordination, cp: &KeyPath, errs: &mut Errors<'_>) -> Vec<String> {
    let Some(f) = &c.failsafe else {
        return Vec::new();
    };
    let path = cp.key("failsafe").key("peers");
    if f.peers.is_empty() {
        errs.push(
            &path,
            "the failsafe lists no peer",
            "list every other instance's admin address, e.g. peers = [\"http://kw2.corp:9900\"], or remove failsafe",
        );
    }
    let mut out = Vec::new();
    for (i, peer) in f.peers.iter().enumerate() {
        let at = path.index(i);
        if peer.starts_with("https://") {
            errs.push(
                &at,
                format!("`{peer}`: the admin listener serves plain HTTP, so a failsafe peer is reached over http://"),
                "write it http://HOST:PORT and keep the admin listeners on a trusted network",
            );
            continue;
        }
        let authority = peer
            .strip_prefix("http://")
            .unwrap_or(peer)
            .trim_end_matches('/');
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok || authority.contains('/') {
            errs.push(
                &at,
                format!("`{peer}` is not an admin address"),
                "write it like \"http://10.0.0.2:9900\" (the peer's [admin] listen)",
            );
            continue;
        }
        out.push(format!("http://{authority}"));
    }
    out
}

/// `http://host:port`, `https://host:port` (or `host:port`) of an etcd client endpoint.
fn etcd_endpoint(text: &str, path: &KeyPath, errs: &mut Errors<'_>) -> Option<EtcdEndpoint> {
    let (tls, rest) = match text.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix("http://").unwrap_or(text)),
    };
    let authority = rest.trim_end_matches('/');
    match authority.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(addr) if !authority.contains('/') => Some(EtcdEndpoint {
            addr,
            authority: authority.to_string(),
            tls,
        }),
        _ => {
            errs.push(
                path,
                format!("`{text}` is not a reachable host:port"),
                "write it like \"http://127.0.0.1:2379\" or \"https://etcd1.corp:2379\"",
            );
            None
        }
    }
}

/// `ca`, `cert` and `key` of `[coordination]`: the TLS settings for `https://` endpoints.
fn etcd_tls(
    c: &FileCoordination,
    endpoints: &[EtcdEndpoint],
    cp: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> Option<EtcdTls> {
    let any_tls = endpoints.iter().any(|e| e.tls);
    if any_tls && endpoints.iter().any(|e| !e.tls) {
        errs.push(
            &cp.key("etcd"),
            "some etcd endpoints are https:// and some http://",
            "use one scheme for all endpoints of an etcd cluster",
        );
    }
    if !any_tls {
        for (key, set) in [("ca", &c.ca), ("cert", &c.cert), ("key", &c.key)] {
            if set.is_some() {
                errs.push(
                    &cp.key(key),
                    format!("`{key}` is for TLS, but the etcd endpoints are http://"),
                    "write the endpoints as https://host:port, or remove it",
                );
            }
        }
        return None;
    }
    let files = [&c.ca, &c.cert, &c.key].map(|f| f.as_deref().map(|f| resolve(base, f)));
    let ca = match &files[0] {
        Some(f) => Some(pem_certs(
            f,
            &cp.key("ca"),
            "point ca at the PEM file of the CA that signed etcd's server certificates (etcd's --trusted-ca-file)",
            errs,
        )?),
        None => None,
    };
    let identity = match (&files[1], &files[2]) {
        (Some(cert), Some(key)) => Some((
            pem_certs(
                cert,
                &cp.key("cert"),
                "point cert at keyway's client certificate (PEM, leaf first)",
                errs,
            )?,
            pem_key(key, &cp.key("key"), errs)?,
        )),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            errs.push(
                &cp.key(if files[1].is_some() { "key" } else { "cert" }),
                "a client certificate needs both `cert` and `key`",
                "give both (for etcd with --client-cert-auth), or neither",
            );
            return None;
        }
    };
    match crate::tls::client_config(ca.as_deref(), identity) {
        Ok(client) => Some(EtcdTls { client, files }),
        Err(e) => {
            errs.push(
                cp,
                format!("TLS to etcd: {e}"),
                "check ca, cert and key (the key must be the certificate's)",
            );
            None
        }
    }
}

/// `hostname-pid`: unique per process on one machine, readable in etcd and logs.
fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyway".into());
    format!("{host}-{}", std::process::id())
}

fn listener(
    l: &FileListener,
    path: &KeyPath,
    base: &Path,
    bound: &mut Vec<(SocketAddr, KeyPath)>,
    errs: &mut Errors<'_>,
) -> Option<ListenerConfig> {
    let listen = socket_addr(&l.listen, &path.key("listen"), errs);
    if let Some(a) = listen {
        bound.push((a, path.key("listen")));
    }
    let tls: Vec<TlsCertConfig> = l
        .tls
        .iter()
        .enumerate()
        .filter_map(|(i, t)| tls_cert(t, &path.key("tls").index(i), base, errs))
        .collect();
    let max_header = l
        .max_request_header_bytes
        .unwrap_or(DEFAULT_MAX_REQUEST_HEADER_BYTES);
    if max_header < MIN_MAX_REQUEST_HEADER_BYTES {
        errs.push(
            &path.key("max_request_header_bytes"),
            format!("{max_header} bytes is below the smallest limit keyway can enforce"),
            format!("raise it to >= {MIN_MAX_REQUEST_HEADER_BYTES} or remove it"),
        );
    }
    let limits = Limits {
        max_request_header_bytes: max_header.max(MIN_MAX_REQUEST_HEADER_BYTES),
        max_request_body_bytes: l
            .max_request_body_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES),
        header_read_timeout: nonzero_duration(
            l.header_read_timeout.as_deref(),
            &path.key("header_read_timeout"),
            DEFAULT_HEADER_READ_TIMEOUT,
            errs,
        ),
        idle_timeout: nonzero_duration(
            l.idle_timeout.as_deref(),
            &path.key("idle_timeout"),
            DEFAULT_IDLE_TIMEOUT,
            errs,
        ),
    };
    let trusted_proxies = l
        .trusted_proxies
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, t)| match crate::frontdoor::Cidr::parse(t) {
            Ok(c) => Some(c),
            Err(e) => {
                errs.push(
                    &path.key("trusted_proxies").index(i),
                    e,
                    "list the addresses of your own proxies or L4 balancers, e.g. \"10.0.0.0/8\" or \"192.0.2.7\"",
                );
                None
            }
        })
        .collect();
    let door = FrontDoorConfig {
        allow_encoded_slashes: l.allow_encoded_slashes.unwrap_or(false),
        allow_trace: l.allow_trace.unwrap_or(false),
        trusted_proxies,
        forwarded: l.forwarded.unwrap_or(false),
    };
    let max_connections = l
        .max_connections
        .unwrap_or(DEFAULT_LISTENER_MAX_CONNECTIONS);
    if max_connections == 0 || max_connections > MAX_LISTENER_MAX_CONNECTIONS {
        errs.push(
            &path.key("max_connections"),
            format!("max_connections = {max_connections} is out of range"),
            format!(
                "use 1 to {MAX_LISTENER_MAX_CONNECTIONS} (keep it below the process's open-file limit), or remove it to use {DEFAULT_LISTENER_MAX_CONNECTIONS}"
            ),
        );
    }
    let proxy_protocol = proxy_protocol(
        l.proxy_protocol.as_deref(),
        &path.key("proxy_protocol"),
        errs,
    );
    Some(ListenerConfig {
        listen: listen?,
        tls,
        limits,
        door,
        max_connections: max_connections.clamp(1, MAX_LISTENER_MAX_CONNECTIONS),
        proxy_protocol,
    })
}

fn tcp_listener(
    l: &FileTcpListener,
    path: &KeyPath,
    base: &Path,
    clusters: &std::collections::BTreeMap<String, FileCluster>,
    bound: &mut Vec<(SocketAddr, KeyPath)>,
    errs: &mut Errors<'_>,
) -> Option<TcpListenerConfig> {
    let listen = socket_addr(&l.listen, &path.key("listen"), errs);
    if let Some(a) = listen {
        bound.push((a, path.key("listen")));
    }
    // A TCP listener carries bytes it cannot classify: every cluster it names must
    // exist and must not split reads from writes.
    let check_cluster = |name: &str, at: &KeyPath, errs: &mut Errors<'_>| {
        match clusters.get(name) {
        None => {
            let names: Vec<&str> = clusters.keys().map(String::as_str).collect();
            errs.push(
                at,
                format!("tcp_listener points at cluster `{name}`, which is not defined"),
                if names.is_empty() {
                    format!("add a [cluster.{name}] table")
                } else {
                    format!("use one of: {}, or add a [cluster.{name}] table", names.join(", "))
                },
            );
        }
        Some(c) if c.strategy.as_deref() == Some("primary-replica") => errs.push(
            at,
            format!("cluster `{name}` is primary-replica, but a TCP listener cannot tell reads from writes"),
            "give the TCP farm a cluster with strategy = \"ordered\" or \"balanced\"",
        ),
        Some(c) if c.backends.iter().any(|b| b.tls == Some(true)) => errs.push(
            at,
            format!("cluster `{name}` has backends with tls = true, but a TCP listener does not originate TLS"),
            "remove tls from its backends: TLS passes through untouched (or terminates at the listener with `tls`)",
        ),
        Some(_) => {}
    }
    };
    if let Some(c) = &l.cluster {
        check_cluster(c, &path.key("cluster"), errs);
    }
    let mut sni = Vec::new();
    for (i, r) in l.sni.iter().enumerate() {
        let rp = path.key("sni").index(i);
        check_cluster(&r.cluster, &rp.key("cluster"), errs);
        if r.hosts.is_empty() {
            errs.push(
                &rp.key("hosts"),
                "an SNI route with no hosts takes no connection",
                "list the server names it takes, e.g. hosts = [\"logs.corp.test\"]",
            );
        }
        let mut hosts = Vec::new();
        for (j, h) in r.hosts.iter().enumerate() {
            match host_pattern(h) {
                Ok(p) => hosts.push(p),
                Err(()) => errs.push(
                    &rp.key("hosts").index(j),
                    format!("`{h}` is not a host name or `*.suffix` pattern"),
                    "write a DNS name such as \"logs.corp.test\", \"*.corp.test\" or \"*\"",
                ),
            }
        }
        sni.push(SniRoute {
            hosts,
            cluster: r.cluster.clone(),
        });
    }
    if l.cluster.is_none() && l.sni.is_empty() {
        errs.push(
            path,
            "this tcp_listener names no cluster and no SNI route, so no connection could go anywhere",
            "add cluster = \"NAME\", or sni = [{ hosts = [\"logs.corp.test\"], cluster = \"NAME\" }]",
        );
    }
    if !l.tls.is_empty() && l.cluster.is_none() {
        errs.push(
            &path.key("tls"),
            "connections whose TLS keyway terminates go to the listener's `cluster`, and it names none",
            "add cluster = \"NAME\" (SNI routes stay passthrough), or remove tls",
        );
    }
    let tls: Vec<TlsCertConfig> = l
        .tls
        .iter()
        .enumerate()
        .filter_map(|(i, t)| tls_cert(t, &path.key("tls").index(i), base, errs))
        .collect();
    let max_connections = l
        .max_connections
        .unwrap_or(DEFAULT_LISTENER_MAX_CONNECTIONS);
    if max_connections == 0 || max_connections > MAX_LISTENER_MAX_CONNECTIONS {
        errs.push(
            &path.key("max_connections"),
            format!("max_connections = {max_connections} is out of range"),
            format!(
                "use 1 to {MAX_LISTENER_MAX_CONNECTIONS} (keep it below the process's open-file limit), or remove it to use {DEFAULT_LISTENER_MAX_CONNECTIONS}"
            ),
        );
    }
    Some(TcpListenerConfig {
        listen: listen?,
        cluster: l.cluster.clone(),
        sni,
        tls,
        idle_timeout: nonzero_duration(
            l.idle_timeout.as_deref(),
            &path.key("idle_timeout"),
            DEFAULT_TCP_IDLE_TIMEOUT,
            errs,
        ),
        handshake_timeout: nonzero_duration(
            l.handshake_timeout.as_deref(),
            &path.key("handshake_timeout"),
            DEFAULT_TCP_HANDSHAKE_TIMEOUT,
            errs,
        ),
        max_connections: max_connections.clamp(1, MAX_LISTENER_MAX_CONNECTIONS),
        proxy_protocol: proxy_protocol(
            l.proxy_protocol.as_deref(),
            &path.key("proxy_protocol"),
            errs,
        ),
    })
}

/// `protocol_check`, `affinity` and a backend's `proxy_protocol` do nothing on a cluster
/// that only HTTP routes use: refused there, like other keys that do not apply.
fn tcp_keys_need_a_tcp_listener(file: &FileConfig, root: &KeyPath, errs: &mut Errors<'_>) {
    let used: BTreeSet<&str> = file
        .tcp_listeners
        .iter()
        .flat_map(|l| {
            l.cluster
                .iter()
                .map(String::as_str)
                .chain(l.sni.iter().map(|r| r.cluster.as_str()))
        })
        .collect();
    let fix =
        "point a [[tcp_listener]] (its cluster or an sni route) at this cluster, or remove the key";
    for (name, c) in file
        .clusters
        .iter()
        .filter(|(n, _)| !used.contains(n.as_str()))
    {
        let cp = root.key("cluster").key(name);
        for (key, set) in [
            ("protocol_check", c.protocol_check.is_some()),
            ("affinity", c.affinity.is_some()),
        ] {
            if set {
                errs.push(
                    &cp.key(key),
                    format!(
                        "{key} only applies to clusters a [[tcp_listener]] uses; `{name}` has none"
                    ),
                    fix,
                );
            }
        }
        for (i, b) in c.backends.iter().enumerate() {
            if b.proxy_protocol.is_some() {
                errs.push(
                    &cp.key("backends").index(i).key("proxy_protocol"),
                    format!("proxy_protocol is sent only by TCP listeners, and none uses cluster `{name}`"),
                    fix,
                );
            }
        }
    }
}

fn protocol_check(text: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> ProtocolCheck {
    match text.unwrap_or("first-byte") {
        "first-byte" => ProtocolCheck::FirstByte,
        "tls" => ProtocolCheck::Tls,
        "none" => ProtocolCheck::None,
        other => {
            errs.push(
                path,
                format!("unknown protocol_check `{other}`"),
                "use \"first-byte\" (the backend must send a byte: vault, SSH, RDP), \"tls\" (its first record must be a TLS handshake: TLS passthrough) or \"none\" (connected is enough); docs/config.md lists which protocols speak first",
            );
            ProtocolCheck::FirstByte
        }
    }
}

fn affinity(text: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> Affinity {
    match text.unwrap_or("none") {
        "none" => Affinity::None,
        "client-ip" => Affinity::ClientIp,
        other => {
            errs.push(
                path,
                format!("unknown affinity `{other}`"),
                "use \"client-ip\" (a client's connections land on one backend while it is healthy) or \"none\"",
            );
            Affinity::None
        }
    }
}

fn backend_proxy_protocol(text: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> SendProxy {
    match text.unwrap_or("off") {
        "off" => SendProxy::Off,
        "v1" => SendProxy::V1,
        "v2" => SendProxy::V2,
        other => {
            errs.push(
                &path.key("proxy_protocol"),
                format!("unknown proxy_protocol `{other}`"),
                "use \"off\", \"v1\" or \"v2\": the PROXY header version the backend accepts (only TCP listeners send it)",
            );
            SendProxy::Off
        }
    }
}

fn proxy_protocol(
    text: Option<&str>,
    path: &KeyPath,
    errs: &mut Errors<'_>,
) -> crate::proxy_protocol::Accept {
    use crate::proxy_protocol::Accept;
    match text.unwrap_or("off") {
        "off" => Accept::Off,
        "v1" => Accept::V1,
        "v2" => Accept::V2,
        "v1-or-v2" => Accept::V1OrV2,
        other => {
            errs.push(
                path,
                format!("unknown proxy_protocol `{other}`"),
                "use \"off\" (no header), \"v1\", \"v2\" or \"v1-or-v2\": what the load balancer in front sends (HAProxy `send-proxy` is v1, `send-proxy-v2` and AWS NLB are v2)",
            );
            Accept::Off
        }
    }
}

fn tls_cert(
    t: &FileTlsCert,
    path: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> Option<TlsCertConfig> {
    if t.hosts.is_empty() {
        errs.push(
            &path.key("hosts"),
            "a certificate with no hosts is never chosen by SNI",
            "list the names it serves, e.g. hosts = [\"pvwa.corp.test\"]",
        );
    }
    let mut ok = true;
    for (i, h) in t.hosts.iter().enumerate() {
        if host_pattern(h).is_err() {
            errs.push(
                &path.key("hosts").index(i),
                format!("`{h}` is not a host name or `*.suffix` pattern"),
                "write a DNS name such as \"pvwa.corp.test\" or \"*.corp.test\"",
            );
            ok = false;
        }
    }
    let cert_path = resolve(base, &t.cert);
    let key_path = resolve(base, &t.key);
    let chain = pem_certs(
        &cert_path,
        &path.key("cert"),
        "point cert at a PEM file with -----BEGIN CERTIFICATE----- blocks (leaf first)",
        errs,
    );
    let key = pem_key(&key_path, &path.key("key"), errs);
    let (chain, key) = (chain?, key?);
    let signer = match rustls::crypto::ring::sign::any_supported_type(&key) {
        Ok(s) => s,
        Err(e) => {
            errs.push(
                &path.key("key"),
                format!("unsupported private key: {e}"),
                "use an RSA, ECDSA (P-256/P-384) or Ed25519 key",
            );
            return None;
        }
    };
    let certified = rustls::sign::CertifiedKey::new(chain, signer);
    if certified.keys_match().is_err() {
        errs.push(
            &path.key("key"),
            format!(
                "{} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            "pair each certificate with the key it was issued for",
        );
        return None;
    }
    ok.then(|| TlsCertConfig {
        hosts: t.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        cert_path,
        certified: Arc::new(certified),
    })
}

fn route(
    r: &FileRoute,
    path: &KeyPath,
    defined: &BTreeSet<&str>,
    errs: &mut Errors<'_>,
) -> Option<RouteConfig> {
    let host_text = r.host.as_deref().unwrap_or("*");
    let host = match host_pattern(host_text) {
        Ok(h) => Some(h),
        Err(()) => {
            errs.push(
                &path.key("host"),
                format!("`{host_text}` is not a host pattern"),
                "write an exact name (\"pvwa.corp.test\"), a suffix (\"*.corp.test\") or \"*\"",
            );
            None
        }
    };
    let prefix = r.path.clone().unwrap_or_else(|| "/".to_string());
    if !prefix.starts_with('/') {
        errs.push(
            &path.key("path"),
            format!("path `{prefix}` does not start with `/`"),
            format!("write it as \"/{prefix}\""),
        );
    }
    if !defined.contains(r.cluster.as_str()) {
        let names: Vec<&str> = defined.iter().copied().collect();
        errs.push(
            &path.key("cluster"),
            format!(
                "route points at cluster `{}`, which is not defined",
                r.cluster
            ),
            if names.is_empty() {
                format!("add a [cluster.{}] table", r.cluster)
            } else {
                format!(
                    "use one of: {}, or add a [cluster.{}] table",
                    names.join(", "),
                    r.cluster
                )
            },
        );
    }
    Some(RouteConfig {
        host: host?,
        path: prefix,
        cluster: r.cluster.clone(),
    })
}

fn cluster(
    name: &str,
    c: &FileCluster,
    path: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> Option<ClusterConfig> {
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        errs.push(
            path,
            format!("cluster name `{name}` has characters keyway does not allow"),
            "use letters, digits, '-', '_' and '.' only",
        );
    }
    let strategy = match c.strategy.as_deref().unwrap_or("balanced") {
        "balanced" => Strategy::Balanced,
        "ordered" => Strategy::Ordered,
        "primary-replica" => Strategy::PrimaryReplica,
        other => {
            errs.push(
                &path.key("strategy"),
                format!("unknown strategy `{other}`"),
                "use \"balanced\", \"ordered\" or \"primary-replica\"",
            );
            Strategy::Balanced
        }
    };
    let balance = match c.balance.as_deref().unwrap_or("round-robin") {
        "round-robin" => Balance::RoundRobin,
        "least-requests" => Balance::LeastRequests,
        "p2c" => Balance::P2c,
        "random" => Balance::Random,
        "least-connections" => Balance::LeastConnections,
        other => {
            errs.push(
                &path.key("balance"),
                format!("unknown balance `{other}`"),
                "use \"round-robin\", \"least-requests\", \"least-connections\", \"p2c\" or \"random\"",
            );
            Balance::RoundRobin
        }
    };
    let sticky = c.sticky.as_ref().map(|s| {
        let cookie = s
            .cookie
            .clone()
            .unwrap_or_else(|| DEFAULT_STICKY_COOKIE.into());
        if cookie.is_empty() || !cookie.bytes().all(is_cookie_name_byte) {
            errs.push(
                &path.key("sticky").key("cookie"),
                format!("`{cookie}` is not a valid cookie name"),
                "use letters, digits, '_' and '-' only",
            );
        }
        StickyConfig {
            cookie,
            max_age: s.max_age.as_deref().and_then(|m| {
                let p = path.key("sticky").key("max_age");
                match parse_duration(m) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        errs.push(&p, e, "or remove max_age for a session cookie");
                        None
                    }
                }
            }),
        }
    });
    let retries = c.retries.unwrap_or(DEFAULT_RETRIES);
    if retries > 10 {
        errs.push(
            &path.key("retries"),
            format!("retries = {retries} would multiply an outage"),
            "use 0 to 10",
        );
    }
    let rb = c.retry_budget.as_ref();
    let ratio = rb.and_then(|b| b.ratio).unwrap_or(DEFAULT_RETRY_RATIO);
    if !(0.0..=1.0).contains(&ratio) {
        errs.push(
            &path.key("retry_budget").key("ratio"),
            format!("ratio = {ratio} is outside 0.0 to 1.0"),
            "use a fraction such as 0.2 (retries may add 20% to the request rate)",
        );
    }
    let upstream_ca = c.upstream_ca.as_deref().and_then(|ca| {
        pem_certs(
            &resolve(base, ca),
            &path.key("upstream_ca"),
            "export the backends' CA as PEM (-----BEGIN CERTIFICATE-----) and point upstream_ca at it",
            errs,
        )
    });
    let pool = PoolConfig {
        max_idle: c
            .pool
            .as_ref()
            .and_then(|p| p.max_idle)
            .unwrap_or(DEFAULT_POOL_MAX_IDLE),
        idle_timeout: nonzero_duration(
            c.pool.as_ref().and_then(|p| p.idle_timeout.as_deref()),
            &path.key("pool").key("idle_timeout"),
            DEFAULT_POOL_IDLE_TIMEOUT,
            errs,
        ),
    };

    let slots = SlotDefaults {
        max_connections: backend_limit(
            c.max_connections,
            &path.key("max_connections"),
            DEFAULT_BACKEND_MAX_CONNECTIONS,
            1,
            errs,
        ),
        max_queue: backend_limit(
            c.max_queue,
            &path.key("max_queue"),
            DEFAULT_BACKEND_MAX_QUEUE,
            0,
            errs,
        ),
    };
    let queue_timeout = nonzero_duration(
        c.queue_timeout.as_deref(),
        &path.key("queue_timeout"),
        DEFAULT_QUEUE_TIMEOUT,
        errs,
    );
    if queue_timeout > MAX_QUEUE_TIMEOUT {
        errs.push(
            &path.key("queue_timeout"),
            format!(
                "queue_timeout = {} keeps clients waiting for a backend slot too long",
                humantime::format_duration(queue_timeout)
            ),
            format!(
                "use at most {}; raise max_connections if the backend can take more",
                humantime::format_duration(MAX_QUEUE_TIMEOUT)
            ),
        );
    }

    if c.backends.is_empty() {
        errs.push(
            path,
            format!("cluster `{name}` has no backends"),
            "add backends = [{ id = \"a\", address = \"10.0.0.1:443\" }]",
        );
    }
    let mut seen = HashSet::new();
    let mut backends = Vec::new();
    let mut send_proxy = Vec::new();
    for (i, b) in c.backends.iter().enumerate() {
        let bp = path.key("backends").index(i);
        if !seen.insert(b.id.as_str()) {
            errs.push(
                &bp.key("id"),
                format!("backend id `{}` is used twice in cluster `{name}`", b.id),
                "give every backend of a cluster its own id",
            );
        }
        if b.id.is_empty() {
            errs.push(
                &bp.key("id"),
                "backend id is empty",
                "name the backend, e.g. id = \"vault-a\"",
            );
        }
        let send = backend_proxy_protocol(b.proxy_protocol.as_deref(), &bp, errs);
        if let Some(backend) = backend(b, &bp, strategy, &slots, errs) {
            backends.push(backend);
            send_proxy.push(send);
        }
    }
    if strategy == Strategy::PrimaryReplica {
        let primaries = c
            .backends
            .iter()
            .filter(|b| b.role.as_deref() == Some("primary"))
            .count();
        if primaries != 1 {
            errs.push(
                &path.key("backends"),
                format!("a primary-replica cluster needs exactly one backend with role = \"primary\"; `{name}` has {primaries}"),
                "mark the one server that takes writes with role = \"primary\" and the read-only ones with role = \"replica\"",
            );
        }
    }
    let mut split = split(c, path, strategy, errs);
    if let Some(cl) = &c.classifier {
        let cp = path.key("classifier");
        if strategy != Strategy::PrimaryReplica {
            errs.push(
                &cp,
                "classifier only applies to strategy = \"primary-replica\"",
                "set strategy = \"primary-replica\" or remove it",
            );
        }
        let on_error = on_error(cl.on_error.as_deref(), &cp.key("on_error"), errs);
        if !crate::plugin::is_plugin_path(&cl.policy) {
            errs.push(
                &cp.key("policy"),
                format!("`{}` is not a plugin file", cl.policy),
                "name a .wasm classifier plugin, e.g. \"plugins/pam-classifier.wasm\"",
            );
        } else {
            match crate::plugin::ClassifierPlugin::load(&resolve(base, &cl.policy), &plugin_config_json(cl.config.as_ref())) {
                Ok(plugin) => split.classifier = Some(ClassifierHook { plugin, on_error }),
                Err(e) => errs.push(&cp.key("policy"), e, "fix the plugin or its `config`, or remove `classifier` to use read_routes/write_routes"),
            }
        }
    }
    let health = c
        .health
        .as_ref()
        .map(|h| health(h, &path.key("health"), base, errs));
    // Replicas of unknown lag serve no reads under max_lag: without a lag source every
    // replica's lag is unknown, and no read would ever reach one.
    if split.max_lag.is_some() && health.as_ref().is_none_or(|h| h.lag.is_none()) {
        errs.push(
            &path.key("max_lag"),
            "max_lag is set but no health check reports replication lag, so every replica's lag is unknown and none would serve reads",
            "add lag_header = \"X-Replication-Lag\" (or lag_json = \"lag_ms\" for a JSON health body) to this cluster's `health`, or remove max_lag",
        );
    }
    let promotion = c.promotion.as_ref().and_then(|p| {
        promotion(
            p,
            &path.key("promotion"),
            strategy,
            health.as_ref(),
            upstream_ca.as_deref(),
            base,
            errs,
        )
    });
    let outlier = c.outlier.as_ref().map_or_else(OutlierConfig::default, |o| {
        let op = path.key("outlier");
        OutlierConfig {
            consecutive_failures: o.consecutive_failures.unwrap_or(DEFAULT_OUTLIER_FAILURES),
            base_ejection: nonzero_duration(
                o.base_ejection.as_deref(),
                &op.key("base_ejection"),
                DEFAULT_BASE_EJECTION,
                errs,
            ),
            max_ejection: nonzero_duration(
                o.max_ejection.as_deref(),
                &op.key("max_ejection"),
                DEFAULT_MAX_EJECTION,
                errs,
            ),
            count_5xx: o.count_5xx.unwrap_or(true),
        }
    });

    let paths = match c.paths.as_deref().unwrap_or("case-sensitive") {
        "case-sensitive" => PathCase::Sensitive,
        "case-insensitive" => PathCase::Insensitive,
        other => {
            errs.push(
                &path.key("paths"),
                format!("unknown value `{other}`"),
                "use \"case-insensitive\" for IIS backends (PVWA, PSM) or \"case-sensitive\" (the default; PAM360 and other Java servers)",
            );
            PathCase::Sensitive
        }
    };
    let upgrades = match &c.upgrades {
        None => DEFAULT_UPGRADES.iter().map(|u| u.to_string()).collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, u)| {
                let token = u.trim().to_ascii_lowercase();
                let valid = !token.is_empty()
                    && token.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
                    });
                if token == "h2c" || !valid {
                    errs.push(
                        &path.key("upgrades").index(i),
                        if valid {
                            "`h2c` cannot be forwarded: an HTTP/2 connection behind an upgrade would bypass keyway's per-request routing and read/write split".to_string()
                        } else {
                            format!("`{u}` is not an Upgrade protocol token")
                        },
                        "list protocol names as clients send them in `Upgrade`, e.g. [\"websocket\"]",
                    );
                    return None;
                }
                Some(token)
            })
            .collect(),
    };
    Some(ClusterConfig {
        name: name.to_string(),
        strategy,
        balance,
        paths,
        upgrades,
        sticky,
        connect_timeout: nonzero_duration(
            c.connect_timeout.as_deref(),
            &path.key("connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
            errs,
        ),
        connect_stagger: duration(
            c.connect_stagger.as_deref(),
            &path.key("connect_stagger"),
            DEFAULT_CONNECT_STAGGER,
            errs,
        ),
        protocol_timeout: nonzero_duration(
            c.protocol_timeout.as_deref(),
            &path.key("protocol_timeout"),
            DEFAULT_PROTOCOL_TIMEOUT,
            errs,
        ),
        tcp: TcpClusterSettings {
            protocol_check: protocol_check(c.protocol_check.as_deref(), &path.key("protocol_check"), errs),
            affinity: affinity(c.affinity.as_deref(), &path.key("affinity"), errs),
            send_proxy,
        },
        retries,
        retry_budget: RetryBudget {
            ratio,
            min_per_second: rb
                .and_then(|b| b.min_per_second)
                .unwrap_or(DEFAULT_RETRY_MIN_PER_SECOND),
        },
        upstream_ca,
        pool,
        queue_timeout: queue_timeout.min(MAX_QUEUE_TIMEOUT),
        promotion,
        failback_after: c.failback.as_ref().map(|f| {
            let fp = path.key("failback");
            if strategy != Strategy::PrimaryReplica {
                errs.push(&fp, "failback only applies to strategy = \"primary-replica\"", "remove it");
            }
            if health.is_none() {
                errs.push(&fp, "automatic failback needs active health checks to see the old primary recover", "add health = { path = \"/health\" } to the cluster, or remove failback and fail back with POST /clusters/NAME/failback");
            }
            nonzero_duration(Some(&f.after), &fp.key("after"), Duration::from_secs(600), errs)
        }),
        health,
        outlier,
        split,
        backends,
    })
}

fn promotion(
    p: &FilePromotion,
    path: &KeyPath,
    strategy: Strategy,
    health: Option<&HealthConfig>,
    upstream_ca: Option<&[CertificateDer<'static>]>,
    base: &Path,
    errs: &mut Errors<'_>,
) -> Option<PromotionConfig> {
    if strategy != Strategy::PrimaryReplica {
        errs.push(
            path,
            "promotion only applies to strategy = \"primary-replica\"",
            "set strategy = \"primary-replica\" or remove promotion",
        );
        return None;
    }
    let auto = p.auto.unwrap_or(true);
    if auto && health.is_none() {
        errs.push(
            path,
            "automatic promotion needs active health checks to see the primary die",
            "add health = { path = \"/health\", interval = \"1s\" } to the cluster, or set auto = false",
        );
    }
    let on_error = on_error(p.on_error.as_deref(), &path.key("on_error"), errs);
    let cfg = p.config.as_ref();
    let policy = match p.policy.as_deref().unwrap_or("priority-promotion") {
        "priority-promotion" => PromotionPolicyKind::Priority {
            prefer_location: cfg
                .and_then(|c| c.get("prefer_location"))
                .and_then(|v| v.as_str())
                .map(String::from),
        },
        "least-lag-promotion" => PromotionPolicyKind::LeastLag {
            max_lag_ms: cfg
                .and_then(|c| c.get("max_lag_ms"))
                .and_then(|v| v.as_integer())
                .and_then(|v| u64::try_from(v).ok()),
        },
        file if crate::plugin::is_plugin_path(file) => {
            match crate::plugin::PromotionPlugin::load(
                &resolve(base, file),
                &plugin_config_json(cfg),
            ) {
                Ok(plugin) => PromotionPolicyKind::Plugin { plugin, on_error },
                Err(e) => {
                    errs.push(
                        &path.key("policy"),
                        e,
                        "fix the plugin or its `config`, or use policy = \"priority-promotion\"",
                    );
                    return None;
                }
            }
        }
        other => {
            errs.push(
                &path.key("policy"),
                format!("unknown promotion policy `{other}`"),
                "use \"priority-promotion\", \"least-lag-promotion\" or a .wasm promotion plugin",
            );
            return None;
        }
    };
    let hook = |h: &Option<FileHook>, key: &str, errs: &mut Errors<'_>| {
        h.as_ref().and_then(|h| {
            let hp = path.key(key);
            let timeout = nonzero_duration(h.timeout.as_deref(), &hp.key("timeout"), DEFAULT_HOOK_TIMEOUT, errs);
            let probe = h.url.replace("{address}", "127.0.0.1:1").replace("{id}", "x").replace("{cluster}", "x").replace("{epoch}", "1");
            let uri = probe.parse::<http::Uri>().ok().filter(|u| u.authority().is_some());
            match uri.as_ref().and_then(|u| u.scheme_str()) {
                Some("http") => Some(HookConfig { url: h.url.clone(), timeout, tls: None }),
                // Hooks go to the backends: trust what the cluster trusts for them.
                Some("https") => match crate::tls::client_config(upstream_ca, None) {
                    Ok(tls) => Some(HookConfig { url: h.url.clone(), timeout, tls: Some(tls) }),
                    Err(e) => {
                        errs.push(&hp.key("url"), format!("https hook: {e}"), "set the cluster's upstream_ca to the CA that signed the backends' certificates");
                        None
                    }
                },
                _ => {
                    errs.push(
                        &hp.key("url"),
                        format!("`{}` is not an http:// or https:// URL", h.url),
                        "write it like \"http://{address}/admin/promote\" ({address}, {id}, {cluster} and {epoch} are filled in)",
                    );
                    None
                }
            }
        })
    };
    let on_promote = hook(&p.on_promote, "on_promote", errs);
    let on_repoint = hook(&p.on_repoint, "on_repoint", errs);
    Some(PromotionConfig {
        policy,
        auto,
        hold: duration(
            p.hold.as_deref(),
            &path.key("hold"),
            DEFAULT_PROMOTION_HOLD,
            errs,
        ),
        require_hook_ok: p.require_hook_ok.unwrap_or(true),
        on_promote,
        on_repoint,
        drain: duration(
            p.drain.as_deref(),
            &path.key("drain"),
            DEFAULT_SWITCHOVER_DRAIN,
            errs,
        ),
    })
}

fn split(
    c: &FileCluster,
    path: &KeyPath,
    strategy: Strategy,
    errs: &mut Errors<'_>,
) -> SplitConfig {
    let pr = strategy == Strategy::PrimaryReplica;
    let only_pr = |key: &str, set: bool, errs: &mut Errors<'_>| {
        if set && !pr {
            errs.push(
                &path.key(key),
                format!("{key} only applies to strategy = \"primary-replica\""),
                "set strategy = \"primary-replica\" or remove it",
            );
        }
    };
    only_pr("read_routes", c.read_routes.is_some(), errs);
    only_pr("write_routes", c.write_routes.is_some(), errs);
    only_pr("reads_on_primary", c.reads_on_primary.is_some(), errs);
    only_pr("max_lag", c.max_lag.is_some(), errs);
    only_pr("read_your_writes", c.read_your_writes.is_some(), errs);
    let patterns = |key: &str,
                    list: &Option<Vec<String>>,
                    errs: &mut Errors<'_>|
     -> Vec<RoutePattern> {
        let mut out = Vec::new();
        for (i, text) in list.iter().flatten().enumerate() {
            match route_pattern(text) {
                Ok(p) => out.push(p),
                Err(why) => errs.push(
                    &path.key(key).index(i),
                    format!("`{text}` is not a route pattern: {why}"),
                    "write METHOD and a path glob, e.g. \"POST /PasswordVault/api/Accounts/*/Password/Retrieve\" (`*` = one path segment, `**` = the rest, method `*` = any)",
                ),
            }
        }
        out
    };
    let reads_on_primary = match c.reads_on_primary.as_deref().unwrap_or("fallback") {
        "fallback" => ReadsOnPrimary::Fallback,
        "always" => ReadsOnPrimary::Always,
        "never" => ReadsOnPrimary::Never,
        other => {
            errs.push(
                &path.key("reads_on_primary"),
                format!("unknown value `{other}`"),
                "use \"fallback\" (primary reads only when no replica can), \"always\" or \"never\"",
            );
            ReadsOnPrimary::Fallback
        }
    };
    let opt_duration = |key: &str, v: &Option<String>, errs: &mut Errors<'_>| {
        v.as_deref().and_then(|t| match parse_duration(t) {
            Ok(d) => Some(d),
            Err(e) => {
                errs.push(&path.key(key), e, "or remove it");
                None
            }
        })
    };
    SplitConfig {
        read_routes: patterns("read_routes", &c.read_routes, errs),
        write_routes: patterns("write_routes", &c.write_routes, errs),
        reads_on_primary,
        max_lag: opt_duration("max_lag", &c.max_lag, errs),
        read_your_writes: opt_duration("read_your_writes", &c.read_your_writes, errs),
        classifier: None,
    }
}

/// Parses `"POST /PasswordVault/api/Accounts/*/Password/Retrieve"`.
fn route_pattern(text: &str) -> Result<RoutePattern, &'static str> {
    let (method, path) = text
        .trim()
        .split_once(' ')
        .ok_or("no space between method and path")?;
    let path = path.trim();
    if !path.starts_with('/') {
        return Err("the path must start with `/`");
    }
    if path.contains(char::is_whitespace) {
        return Err("the path contains white space");
    }
    let method = match method {
        "*" => None,
        m => Some(
            http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| "not an HTTP method")?,
        ),
    };
    Ok(RoutePattern {
        method,
        path: path.to_string(),
    })
}

fn on_error(v: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> crate::plugin::OnError {
    let text = v.unwrap_or("fallback");
    crate::plugin::parse_on_error(text).unwrap_or_else(|| {
        errs.push(
            path,
            format!("unknown on_error `{text}`"),
            "use \"fallback\" (the native built-in), \"fail-closed\" (the safe answer) or \"fail-open\"",
        );
        crate::plugin::OnError::Fallback
    })
}

fn plugin_config_json(table: Option<&toml::Table>) -> String {
    table
        .and_then(|t| serde_json::to_string(t).ok())
        .unwrap_or_else(|| "{}".into())
}

fn health(h: &FileHealth, path: &KeyPath, base: &Path, errs: &mut Errors<'_>) -> HealthConfig {
    let kind = match h.kind.as_deref().unwrap_or("http") {
        "http" => {
            let p = h.path.clone().unwrap_or_else(|| "/".into());
            if !p.starts_with('/') {
                errs.push(
                    &path.key("path"),
                    format!("`{p}` does not start with `/`"),
                    format!("write \"/{p}\""),
                );
            }
            CheckKind::Http {
                path: p,
                expect: h.expect.unwrap_or(200),
            }
        }
        "tcp" => CheckKind::Tcp,
        other => {
            errs.push(
                &path.key("kind"),
                format!("unknown check kind `{other}`"),
                "use \"http\" or \"tcp\"",
            );
            CheckKind::Tcp
        }
    };
    let at_least_one = |key: &str, v: Option<u32>, default: u32, errs: &mut Errors<'_>| {
        let n = v.unwrap_or(default);
        if n == 0 {
            errs.push(
                &path.key(key),
                format!("{key} = 0 would never change state"),
                "use 1 or more",
            );
            return default;
        }
        n
    };
    let policy = match h.policy.as_deref().unwrap_or("rise-fall") {
        wasm if crate::plugin::is_plugin_path(wasm) => {
            let file = resolve(base, wasm);
            let on_error = on_error(h.on_error.as_deref(), &path.key("on_error"), errs);
            let (rise, fall) = (
                at_least_one("rise", h.rise, DEFAULT_RISE, errs),
                at_least_one("fall", h.fall, DEFAULT_FALL, errs),
            );
            match crate::plugin::HealthPlugin::load(&file, &plugin_config_json(h.config.as_ref())) {
                Ok(plugin) => HealthPolicyKind::Plugin {
                    plugin,
                    on_error,
                    rise,
                    fall,
                },
                Err(e) => {
                    errs.push(&path.key("policy"), e, "fix the plugin or its `config`, or use a built-in policy (\"rise-fall\", \"failed-checks\")");
                    HealthPolicyKind::RiseFall { rise, fall }
                }
            }
        }
        "rise-fall" => HealthPolicyKind::RiseFall {
            rise: at_least_one("rise", h.rise, DEFAULT_RISE, errs),
            fall: at_least_one("fall", h.fall, DEFAULT_FALL, errs),
        },
        "failed-checks" => HealthPolicyKind::FailedChecks {
            failures: at_least_one("failures", h.failures, DEFAULT_FAILED_CHECKS, errs),
            window: nonzero_duration(
                h.window.as_deref(),
                &path.key("window"),
                DEFAULT_FAILED_CHECKS_WINDOW,
                errs,
            ),
        },
        other => {
            errs.push(
                &path.key("policy"),
                format!("unknown health policy `{other}`"),
                "use \"rise-fall\" (rise/fall), \"failed-checks\" (failures/window) or a plugin file ending in .wasm",
            );
            HealthPolicyKind::RiseFall {
                rise: DEFAULT_RISE,
                fall: DEFAULT_FALL,
            }
        }
    };
    let initially_healthy = match h.initial.as_deref().unwrap_or("unknown") {
        "unknown" => false,
        "healthy" => true,
        other => {
            errs.push(
                &path.key("initial"),
                format!("unknown initial state `{other}`"),
                "use \"unknown\" (route nothing until a probe passes) or \"healthy\" (trust the list)",
            );
            false
        }
    };
    let lag = match (&h.lag_header, &h.lag_json) {
        (Some(_), Some(_)) => {
            errs.push(
                &path.key("lag_json"),
                "both lag_header and lag_json are set",
                "keep the one your backends report",
            );
            None
        }
        (Some(name), None) => match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => Some(LagSource::Header(n)),
            Err(_) => {
                errs.push(
                    &path.key("lag_header"),
                    format!("`{name}` is not a header name"),
                    "e.g. \"X-Replication-Lag-Ms\"",
                );
                None
            }
        },
        (None, Some(field)) => Some(LagSource::JsonField(field.clone())),
        (None, None) => None,
    };
    HealthConfig {
        kind,
        interval: nonzero_duration(
            h.interval.as_deref(),
            &path.key("interval"),
            DEFAULT_HEALTH_INTERVAL,
            errs,
        ),
        timeout: nonzero_duration(
            h.timeout.as_deref(),
            &path.key("timeout"),
            DEFAULT_HEALTH_TIMEOUT,
            errs,
        ),
        policy,
        initially_healthy,
        lag,
        port: h.port.filter(|p| {
            if *p == 0 {
                errs.push(
                    &path.key("port"),
                    "port = 0 names no port",
                    "give the port of the backend's status service, e.g. port = 8080, or remove it to check the backend's own port",
                );
            }
            *p != 0
        }),
    }
}

/// A cluster's `max_connections` and `max_queue`, which its backends may override.
struct SlotDefaults {
    max_connections: u32,
    max_queue: u32,
}

/// A backend's `max_connections` (`min` 1) or `max_queue` (`min` 0), checked.
fn backend_limit(
    v: Option<u32>,
    path: &KeyPath,
    default: u32,
    min: u32,
    errs: &mut Errors<'_>,
) -> u32 {
    let n = v.unwrap_or(default);
    if n < min || n > MAX_BACKEND_LIMIT {
        let key = path.last_key().unwrap_or("limit");
        let fix = if n < min {
            "a backend that may carry no exchange takes no traffic: use 1 or more, or remove the backend".to_string()
        } else {
            format!("use at most {MAX_BACKEND_LIMIT}, or remove it to use the default ({default})")
        };
        errs.push(path, format!("{key} = {n} is out of range"), fix);
    }
    n.clamp(min, MAX_BACKEND_LIMIT)
}

fn backend(
    b: &FileBackend,
    path: &KeyPath,
    strategy: Strategy,
    slots: &SlotDefaults,
    errs: &mut Errors<'_>,
) -> Option<BackendConfig> {
    let role = match (b.role.as_deref(), strategy) {
        (None, _) | (Some("replica"), Strategy::PrimaryReplica) => Role::Replica,
        (Some("primary"), Strategy::PrimaryReplica) => Role::Primary,
        (Some(_), Strategy::Balanced | Strategy::Ordered) => {
            errs.push(
                &path.key("role"),
                "role only applies to strategy = \"primary-replica\"",
                "set strategy = \"primary-replica\" on the cluster or remove role",
            );
            Role::Replica
        }
        (Some(other), _) => {
            errs.push(
                &path.key("role"),
                format!("unknown role `{other}`"),
                "use \"primary\" or \"replica\"",
            );
            Role::Replica
        }
    };
    let address = socket_addr(&b.address, &path.key("address"), errs);
    let weight = b.weight.unwrap_or(1);
    if weight == 0 || weight > 10_000 {
        errs.push(
            &path.key("weight"),
            format!("weight = {weight} is out of range"),
            "use 1 to 10000 (remove the backend to take it out of service)",
        );
    }
    let tls = b.tls.unwrap_or(false);
    let protocol = match b.protocol.as_deref().unwrap_or("auto") {
        "http1" | "http/1.1" => UpstreamProtocol::Http1,
        "http2" | "h2" => UpstreamProtocol::Http2,
        "auto" => UpstreamProtocol::Auto,
        other => {
            errs.push(
                &path.key("protocol"),
                format!("unknown protocol `{other}`"),
                "use \"http1\", \"http2\" or \"auto\" (auto: ALPN on TLS, HTTP/1.1 on plain)",
            );
            UpstreamProtocol::Auto
        }
    };
    let host_part = b
        .address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(&b.address);
    let sni = b.sni.clone().unwrap_or_else(|| host_part.to_string());
    if tls && rustls_pki_types::ServerName::try_from(sni.as_str()).is_err() {
        errs.push(
            &path.key("sni"),
            format!("`{sni}` cannot be used as a TLS server name"),
            "set sni to the DNS name on the backend's certificate",
        );
    }
    Some(BackendConfig {
        id: b.id.clone(),
        address: address?,
        weight: weight.clamp(1, 10_000),
        priority: b.priority.unwrap_or(0),
        tls,
        sni,
        protocol,
        role,
        location: b.location.clone().unwrap_or_default(),
        max_connections: backend_limit(
            b.max_connections,
            &path.key("max_connections"),
            slots.max_connections,
            1,
            errs,
        ),
        max_queue: backend_limit(
            b.max_queue,
            &path.key("max_queue"),
            slots.max_queue,
            0,
            errs,
        ),
    })
}

// === field helpers ===

fn socket_addr(text: &str, path: &KeyPath, errs: &mut Errors<'_>) -> Option<SocketAddr> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(a);
    }
    let has_port = text
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    if has_port {
        if let Ok(mut addrs) = text.to_socket_addrs() {
            if let Some(a) = addrs.next() {
                return Some(a);
            }
        }
        errs.push(
            path,
            format!("`{text}` does not resolve to an address"),
            "use an IP address with a port, e.g. \"10.0.0.1:443\", or a name this host can resolve",
        );
    } else {
        errs.push(
            path,
            format!("`{text}` is not an address with a port"),
            "write HOST:PORT, e.g. \"10.0.0.1:443\" or \"[::1]:8443\"",
        );
    }
    None
}

fn duration(
    text: Option<&str>,
    path: &KeyPath,
    default: Duration,
    errs: &mut Errors<'_>,
) -> Duration {
    match text.map(parse_duration) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            errs.push(
                path,
                e,
                format!(
                    "or remove it to use the default ({})",
                    humantime::format_duration(default)
                ),
            );
            default
        }
    }
}

fn nonzero_duration(
    text: Option<&str>,
    path: &KeyPath,
    default: Duration,
    errs: &mut Errors<'_>,
) -> Duration {
    let d = duration(text, path, default, errs);
    if d.is_zero() {
        errs.push(
            path,
            "a zero duration here would fail every request",
            format!(
                "use a positive duration, or remove it to use the default ({})",
                humantime::format_duration(default)
            ),
        );
        return default;
    }
    d
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The admin token in `file`: one line of at least 16 visible ASCII characters
/// (surrounding whitespace and the final newline are ignored).
fn admin_token(file: &Path, path: &KeyPath, errs: &mut Errors<'_>) -> Option<Arc<str>> {
    const FIX: &str = "fill it with a random token: head -c 32 /dev/urandom | base64 > FILE";
    read_file_checked(file, path, errs)?;
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            errs.push(path, format!("cannot read {}: {e}", file.display()), FIX);
            return None;
        }
    };
    let token = text.trim();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        errs.push(
            path,
            format!(
                "{} must hold one token of at least 16 visible ASCII characters",
                file.display()
            ),
            FIX,
        );
        return None;
    }
    Some(Arc::from(token))
}

/// The PEM certificates in `file` (at least one); `fix` says what to point `path` at.
fn pem_certs(
    file: &Path,
    path: &KeyPath,
    fix: &str,
    errs: &mut Errors<'_>,
) -> Option<Vec<CertificateDer<'static>>> {
    read_file_checked(file, path, errs)?;
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_file_iter(file).and_then(|it| it.collect());
    match certs {
        Ok(c) if !c.is_empty() => Some(c),
        Ok(_) => {
            errs.push(
                path,
                format!("{} holds no PEM certificate", file.display()),
                fix,
            );
            None
        }
        Err(e) => {
            errs.push(
                path,
                format!("{} is not a PEM certificate file: {e}", file.display()),
                fix,
            );
            None
        }
    }
}

/// The PEM private key in `file`.
fn pem_key(file: &Path, path: &KeyPath, errs: &mut Errors<'_>) -> Option<PrivateKeyDer<'static>> {
    read_file_checked(file, path, errs)?;
    match PrivateKeyDer::from_pem_file(file) {
        Ok(k) => Some(k),
        Err(e) => {
            errs.push(
                path,
                format!("{} holds no usable private key: {e}", file.display()),
                "point key at a PEM file with a PKCS#8, PKCS#1 or SEC1 private key",
            );
            None
        }
    }
}

fn read_file_checked(file: &Path, path: &KeyPath, errs: &mut Errors<'_>) -> Option<()> {
    match std::fs::metadata(file) {
        Ok(m) if m.is_file() => Some(()),
        Ok(_) => {
            errs.push(
                path,
                format!("{} is not a file", file.display()),
                "point it at a PEM file",
            );
            None
        }
        Err(e) => {
            errs.push(
                path,
                format!("cannot read {}: {e}", file.display()),
                "check the path (relative paths are taken from the config file's folder)",
            );
            None
        }
    }
}

fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Parses a route or certificate host pattern.
pub(crate) fn host_pattern(text: &str) -> Result<HostPattern, ()> {
    let t = text.trim().to_ascii_lowercase();
    if t == "*" {
        return Ok(HostPattern::Any);
    }
    let (suffix, name) = match t.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, t.as_str()),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    match (valid, suffix) {
        (false, _) => Err(()),
        (true, true) => Ok(HostPattern::Suffix(format!(".{name}"))),
        (true, false) => Ok(HostPattern::Exact(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        build(text, Path::new(".")).expect_err("config should be rejected")
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn host_patterns() {
        assert_eq!(host_pattern("*"), Ok(HostPattern::Any));
        assert_eq!(
            host_pattern("PVWA.corp.test"),
            Ok(HostPattern::Exact("pvwa.corp.test".into()))
        );
        assert_eq!(
            host_pattern("*.corp.test"),
            Ok(HostPattern::Suffix(".corp.test".into()))
        );
        assert!(host_pattern("a.*.test").is_err());
        assert!(host_pattern("a b").is_err());
        assert!(host_pattern("host:80").is_err());
    }

    #[test]
    fn unknown_key_suggests_the_near_one() {
        let e = errors(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.a]\nbackends = [{ id = \"x\", adress = \"127.0.0.1:1\" }]\n",
        );
        let unknown = e
            .iter()
            .find(|e| e.message.contains("`adress`"))
            .expect("unknown key reported");
        assert_eq!(unknown.line, Some(4));
        assert!(
            unknown.fix.contains("did you mean `address`"),
            "{}",
            unknown.fix
        );
    }

    #[test]
    fn every_documented_key_is_known() {
        // A config using every key keyway documents must produce no "unknown key" error.
        let text = r#"
[admin]
listen = "127.0.0.1:0"
[proxy]
workers = 2
drain_timeout = "5s"
access_log = true
[[listener]]
listen = "127.0.0.1:0"
max_request_header_bytes = 16384
max_request_body_bytes = 1000
header_read_timeout = "5s"
idle_timeout = "1m"
allow_encoded_slashes = true
allow_trace = true
trusted_proxies = ["10.0.0.0/8", "::1"]
forwarded = true
max_connections = 100
proxy_protocol = "v1-or-v2"
[[route]]
host = "*"
path = "/"
cluster = "c"
[cluster.c]
strategy = "ordered"
max_connections = 8
max_queue = 16
queue_timeout = "2s"
outlier = { consecutive_failures = 3, base_ejection = "5s", max_ejection = "1m", count_5xx = false }
balance = "p2c"
paths = "case-insensitive"
upgrades = ["websocket", "x-custom/2"]
sticky = { cookie = "k", max_age = "1h" }
connect_timeout = "1s"
connect_stagger = "100ms"
protocol_timeout = "2s"
retries = 1
retry_budget = { ratio = 0.5, min_per_second = 3 }
pool = { max_idle = 4, idle_timeout = "10s" }
backends = [{ id = "a", address = "127.0.0.1:1", weight = 2, priority = 1, tls = false, sni = "a.test", protocol = "http1", max_connections = 4, max_queue = 0 }]
"#;
        let cfg = build(text, Path::new(".")).expect("valid");
        assert_eq!(cfg.clusters[0].backends[0].weight, 2);
        assert_eq!(cfg.listeners[0].max_connections, 100);
        assert_eq!(cfg.clusters[0].queue_timeout, Duration::from_secs(2));
        assert!(!cfg.clusters[0].outlier.count_5xx);
        let a = &cfg.clusters[0].backends[0];
        assert_eq!((a.max_connections, a.max_queue), (4, 0));
        assert_eq!(cfg.clusters[0].strategy, Strategy::Ordered);
        assert_eq!(cfg.clusters[0].paths, PathCase::Insensitive);
        assert_eq!(cfg.clusters[0].upgrades, ["websocket", "x-custom/2"]);
        assert_eq!(cfg.listeners[0].door.trusted_proxies.len(), 2);
    }

    #[test]
    fn front_door_settings_are_checked() {
        let errors = errors(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.1/8\", \"x\"]\n[[route]]\ncluster = \"c\"\n[cluster.c]\npaths = \"any\"\nupgrades = [\"h2c\", \"a b\"]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "listener[0].trusted_proxies[0]",
                "listener[0].trusted_proxies[1]",
                "cluster.c.paths",
                "cluster.c.upgrades[0]",
                "cluster.c.upgrades[1]",
            ],
            "{errors:?}"
        );
        assert!(errors.iter().all(|e| !e.fix.is_empty() && e.line.is_some()));
        let defaults = build(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\ncluster = \"c\"\n[cluster.c]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(defaults.clusters[0].upgrades, ["websocket"]);
        assert_eq!(defaults.clusters[0].paths, PathCase::Sensitive);
        let door = &defaults.listeners[0].door;
        assert!(!door.allow_encoded_slashes && !door.allow_trace && !door.forwarded);
        assert!(door.trusted_proxies.is_empty());
    }

    #[test]
    fn connection_limits_take_cluster_defaults_and_refuse_absurd_values() {
        let ok = build(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.c]\nmax_connections = 8\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }, { id = \"b\", address = \"127.0.0.1:2\", max_queue = 3 }]\n",
            Path::new("."),
        )
        .expect("valid");
        assert_eq!(
            ok.listeners[0].max_connections,
            DEFAULT_LISTENER_MAX_CONNECTIONS
        );
        let [a, b] = &ok.clusters[0].backends[..] else {
            panic!("two backends")
        };
        assert_eq!(
            (a.max_connections, a.max_queue),
            (8, DEFAULT_BACKEND_MAX_QUEUE)
        );
        assert_eq!((b.max_connections, b.max_queue), (8, 3));
        assert_eq!(ok.clusters[0].queue_timeout, DEFAULT_QUEUE_TIMEOUT);

        let e = errors(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 0\n[cluster.c]\nmax_connections = 0\nmax_queue = 1000000\nqueue_timeout = \"1h\"\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", max_connections = 200000 }]\n",
        );
        let at = |path: &str| {
            e.iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("no error at {path}: {e:?}"))
        };
        assert_eq!(at("listener[0].max_connections").line, Some(3));
        assert!(at("listener[0].max_connections").fix.contains("use 1 to"));
        assert!(at("cluster.c.max_connections")
            .fix
            .contains("use 1 or more"));
        assert!(at("cluster.c.max_queue").fix.contains("at most 100000"));
        assert!(at("cluster.c.queue_timeout").fix.contains("at most 5m"));
        assert!(at("cluster.c.backends[0].max_connections")
            .message
            .contains("200000"));
        let zero = errors("[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.c]\nqueue_timeout = \"0s\"\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n");
        assert_eq!(zero[0].path, "cluster.c.queue_timeout", "{zero:?}");
    }

    #[test]
    fn the_admin_token_is_one_long_visible_line() {
        let dir = std::env::temp_dir().join(format!("keyway-admin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"t\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n";
        for bad in ["short\n", "has a space in the middle of it\n", ""] {
            std::fs::write(dir.join("t"), bad).unwrap();
            let e = build(text, &dir).unwrap_err();
            assert_eq!(e[0].path, "admin.token_file", "{e:?}");
            assert!(e[0].message.contains("at least 16 visible"), "{e:?}");
        }
        std::fs::write(dir.join("t"), "  0123456789abcdef\n").unwrap();
        let cfg = build(text, &dir).unwrap();
        assert_eq!(
            cfg.admin.unwrap().token.as_deref(),
            Some("0123456789abcdef")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Adversarial input: mutated configs must produce a config or errors, never a panic.
#[cfg(test)]
mod adversarial {
    use super::*;

    const SEED: &str = include_str!("../../../config/demo.toml");

    #[test]
    fn mutated_configs_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x6b65_7977_6179);
        let alphabet: Vec<char> = "[]{}=\",.:#*\n 0123456789abcxyz_-\u{00e9}\u{1F511}"
            .chars()
            .collect();
        for _ in 0..1500 {
            let mut chars: Vec<char> = SEED.chars().collect();
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..chars.len().max(1));
                match rng.u8(..3) {
                    0 if !chars.is_empty() => {
                        chars.remove(i.min(chars.len() - 1));
                    }
                    1 => chars.insert(i.min(chars.len()), alphabet[rng.usize(..alphabet.len())]),
                    _ if !chars.is_empty() => {
                        let j = i.min(chars.len() - 1);
                        chars[j] = alphabet[rng.usize(..alphabet.len())];
                    }
                    _ => {}
                }
            }
            let text: String = chars.into_iter().collect();
            let _ = build(&text, Path::new("."));
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = build(&text, Path::new("."));
            let _ = host_pattern(&text);
        }
    }
}

#[cfg(test)]
mod listener_config {
    use super::*;

    #[test]
    fn proxy_protocol_values_and_a_fix_for_a_wrong_one() {
        let cfg = |v: &str| {
            format!("[[listener]]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = \"{v}\"\n[cluster.c]\nbackends = [{{ id = \"a\", address = \"127.0.0.1:1\" }}]\n")
        };
        use crate::proxy_protocol::Accept;
        for (v, want) in [
            ("off", Accept::Off),
            ("v1", Accept::V1),
            ("v2", Accept::V2),
            ("v1-or-v2", Accept::V1OrV2),
        ] {
            let c = build(&cfg(v), Path::new(".")).expect("valid");
            assert_eq!(c.listeners[0].proxy_protocol, want);
        }
        let e = build(&cfg("any"), Path::new(".")).expect_err("rejected");
        let bad = e
            .iter()
            .find(|e| e.message.contains("unknown proxy_protocol `any`"))
            .expect("reported");
        assert_eq!(bad.line, Some(3));
        assert!(bad.fix.contains("\"v1-or-v2\""), "{}", bad.fix);
    }
}

#[cfg(test)]
mod roles_config {
    use super::*;

    fn errs(cluster: &str) -> Vec<ConfigError> {
        let text = format!("[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.c]\n{cluster}\n");
        build(&text, Path::new(".")).expect_err("rejected")
    }

    #[test]
    fn primary_replica_needs_exactly_one_primary() {
        let e = errs("strategy = \"primary-replica\"\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", role = \"replica\" }]");
        assert!(
            e.iter().any(|e| e
                .message
                .contains("exactly one backend with role = \"primary\"")),
            "{e:?}"
        );
        let e = errs("strategy = \"primary-replica\"\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", role = \"primary\" }, { id = \"b\", address = \"127.0.0.1:2\", role = \"primary\" }]");
        assert!(e.iter().any(|e| e.message.contains("has 2")), "{e:?}");
    }

    #[test]
    fn role_and_split_keys_need_primary_replica() {
        let e = errs("read_routes = [\"POST /x\"]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", role = \"primary\" }]");
        assert!(
            e.iter()
                .any(|e| e.path.ends_with("read_routes") && e.message.contains("only applies")),
            "{e:?}"
        );
        assert!(e.iter().any(|e| e.path.ends_with("role")), "{e:?}");
    }

    #[test]
    fn bad_patterns_policies_and_lag_sources_are_reported() {
        let e = errs(
            "strategy = \"primary-replica\"\nread_routes = [\"POST\", \"GET nope\"]\nhealth = { policy = \"magic\", rise = 0, lag_header = \"bad header\" }\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", role = \"primary\" }]",
        );
        let has = |needle: &str| e.iter().any(|e| e.message.contains(needle));
        assert!(has("no space between method and path"), "{e:?}");
        assert!(has("must start with `/`"), "{e:?}");
        assert!(has("unknown health policy `magic`"), "{e:?}");
        assert!(has("is not a header name"), "{e:?}");
    }
}

#[cfg(test)]
mod failover_config {
    use super::*;

    fn build_text(top: &str, cluster: &str) -> Result<Config, Vec<ConfigError>> {
        let text =
            format!("{top}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.c]\n{cluster}\n");
        build(&text, Path::new("/srv/keyway"))
    }

    const PR: &str = "strategy = \"primary-replica\"\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", role = \"primary\" }, { id = \"b\", address = \"127.0.0.1:2\", location = \"east\" }]";

    #[test]
    fn promotion_is_checked_and_defaults_are_documented_ones() {
        let e = build_text("", "promotion = { policy = \"coin-toss\", on_promote = { url = \"ftp://x\" } }\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]").unwrap_err();
        let has = |needle: &str| e.iter().any(|e| e.message.contains(needle));
        assert!(has("promotion only applies"), "{e:?}");
        let e = build_text("", &format!("promotion = {{ policy = \"coin-toss\", on_promote = {{ url = \"ftp://x\" }} }}\n{PR}")).unwrap_err();
        let has = |needle: &str| e.iter().any(|e| e.message.contains(needle));
        assert!(has("unknown promotion policy `coin-toss`"), "{e:?}");
        assert!(has("needs active health checks"), "{e:?}");
        let e = build_text("", &format!("promotion = {{ on_promote = {{ url = \"ftp://x\" }} }}\nhealth = {{ path = \"/h\" }}\n{PR}")).unwrap_err();
        assert!(
            e.iter().any(|e| e.path.ends_with("on_promote.url")),
            "{e:?}"
        );

        let cfg = build_text("", &format!("promotion = {{ auto = false }}\nfailback = {{ after = \"10m\" }}\nhealth = {{ path = \"/h\" }}\n{PR}")).unwrap();
        let c = &cfg.clusters[0];
        let p = c.promotion.as_ref().unwrap();
        assert!(!p.auto && p.require_hook_ok);
        assert_eq!(p.hold, DEFAULT_PROMOTION_HOLD);
        assert_eq!(c.failback_after, Some(Duration::from_secs(600)));
        assert_eq!(c.backends[1].location, "east");
        assert_eq!(
            cfg.state,
            StateConfig::File(PathBuf::from("/srv/keyway/keyway-state.json"))
        );
    }

    #[test]
    fn coordination_is_checked() {
        let e = build_text("[coordination]\netcd = [\"https://127.0.0.1:2379\", \"http://127.0.0.1:2380\", \"nowhere\"]\nprefix = \"keyway/\"\ncert = \"client.pem\"\n[state]\nfile = \"s.json\"", PR).unwrap_err();
        let has = |needle: &str| e.iter().any(|e| e.message.contains(needle));
        assert!(
            has("some etcd endpoints are https:// and some http://"),
            "{e:?}"
        );
        assert!(has("needs both `cert` and `key`"), "{e:?}");
        assert!(has("not a reachable host:port"), "{e:?}");
        assert!(has("must start with /"), "{e:?}");
        assert!(has("both say where decisions live"), "{e:?}");
        let e = build_text(
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nca = \"ca.pem\"",
            PR,
        )
        .unwrap_err();
        assert!(e[0].message.contains("`ca` is for TLS"), "{e:?}");
        let e = build_text(
            "[coordination]\netcd = [\"https://127.0.0.1:2379\"]\nca = \"missing-ca.pem\"",
            PR,
        )
        .unwrap_err();
        assert_eq!(e[0].path, "coordination.ca", "{e:?}");
        assert!(e[0].message.contains("cannot read"), "{e:?}");
        let cfg = build_text(
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\ninstance = \"kw-a\"",
            PR,
        )
        .unwrap();
        match cfg.state {
            StateConfig::Etcd(e) => {
                assert_eq!(e.prefix, "/keyway");
                assert_eq!(e.instance, "kw-a");
                assert_eq!(e.lease_ttl, DEFAULT_LEASE_TTL);
                assert!(e.failsafe_peers.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn automatic_promotion_with_etcd_holds_longer_than_the_lease() {
        let top = "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"3s\"";
        let pr = format!("{PR}\nhealth = {{ path = \"/health\" }}");
        let e = build_text(top, &format!("{pr}\npromotion = {{ hold = \"2s\" }}")).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "cluster.c.promotion.hold");
        assert!(
            e[0].message
                .contains("longer than [coordination] lease_ttl"),
            "{e:?}"
        );
        assert!(e[0].fix.contains("3500ms"), "{e:?}");
        assert!(e[0].line.is_some(), "{e:?}");
        // Longer than the lease, manual promotion, or one instance: fine.
        build_text(top, &format!("{pr}\npromotion = {{ hold = \"4s\" }}")).unwrap();
        build_text(
            top,
            &format!("{pr}\npromotion = {{ hold = \"1s\", auto = false }}"),
        )
        .unwrap();
        build_text("", &format!("{pr}\npromotion = {{ hold = \"1s\" }}")).unwrap();
    }

    #[test]
    fn failsafe_peers_are_plain_http_admin_addresses() {
        let top = |peers: &str| {
            format!("[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nfailsafe = {{ peers = [{peers}] }}")
        };
        let e = build_text(&top("\"https://kw2:9900\", \"kw3\""), PR).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].path, "coordination.failsafe.peers[0]");
        assert!(e[0].message.contains("plain HTTP"), "{e:?}");
        assert!(e[1].message.contains("not an admin address"), "{e:?}");
        let e = build_text(&top(""), PR).unwrap_err();
        assert!(e[0].message.contains("lists no peer"), "{e:?}");
        let e = build_text(
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"2s\"\ntimeout = \"2s\"",
            PR,
        )
        .unwrap_err();
        assert_eq!(e[0].path, "coordination.timeout", "{e:?}");
        assert!(e[0].fix.contains("666ms"), "{e:?}");
        let cfg = build_text(&top("\"http://127.0.0.1:9901/\", \"127.0.0.1:9902\""), PR).unwrap();
        match cfg.state {
            StateConfig::Etcd(e) => assert_eq!(
                e.failsafe_peers,
                vec!["http://127.0.0.1:9901", "http://127.0.0.1:9902"]
            ),
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod tcp_config {
    use super::*;

    #[test]
    fn every_tcp_key_is_known_and_read() {
        let text = r#"
[[tcp_listener]]
listen = "127.0.0.1:0"
cluster = "psm"
sni = [{ hosts = ["logs.corp.test", "*.corp.test"], cluster = "psm" }]
idle_timeout = "8h"
handshake_timeout = "3s"
max_connections = 50
proxy_protocol = "v2"
[cluster.psm]
balance = "least-connections"
affinity = "client-ip"
protocol_check = "tls"
health = { kind = "tcp", port = 8080 }
backends = [{ id = "a", address = "127.0.0.1:1", proxy_protocol = "v1" }, { id = "b", address = "127.0.0.1:2" }]
"#;
        let cfg = build(text, Path::new(".")).expect("valid");
        let l = &cfg.tcp_listeners[0];
        assert_eq!(l.cluster.as_deref(), Some("psm"));
        assert_eq!(l.sni[0].hosts.len(), 2);
        assert_eq!(l.idle_timeout, Duration::from_secs(8 * 3600));
        assert_eq!(l.handshake_timeout, Duration::from_secs(3));
        assert_eq!(l.max_connections, 50);
        assert_eq!(l.proxy_protocol, crate::proxy_protocol::Accept::V2);
        let c = &cfg.clusters[0];
        assert_eq!(c.balance, Balance::LeastConnections);
        assert_eq!(c.tcp.affinity, Affinity::ClientIp);
        assert_eq!(c.tcp.protocol_check, ProtocolCheck::Tls);
        assert_eq!(c.tcp.send_proxy, [SendProxy::V1, SendProxy::Off]);
        assert_eq!(c.health.as_ref().unwrap().port, Some(8080));
    }

    #[test]
    fn tcp_listener_mistakes_are_reported_with_fixes() {
        let e = build(
            "[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"v\"\ntls = [{ hosts = [\"v.test\"], cert = \"no.pem\", key = \"no.key\" }]\nidle_timout = \"1h\"\n[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\nsni = [{ hosts = [\"bad host\"], cluster = \"v\" }]\ntls = [{ hosts = [\"v.test\"], cert = \"no.pem\", key = \"no.key\" }]\n[cluster.v]\nhealth = { port = 0 }\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", tls = true }]\n",
            Path::new("."),
        )
        .expect_err("rejected");
        let has = |needle: &str| {
            e.iter()
                .find(|x| x.message.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {e:?}"))
        };
        assert!(has("unknown key `idle_timout`")
            .fix
            .contains("idle_timeout"));
        assert!(has("does not originate TLS").line.is_some());
        assert!(has("`bad host` is not a host name").line.is_some());
        assert!(has("names none").fix.contains("cluster"));
        assert!(has("port = 0").fix.contains("port"));
        let e = build(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[cluster.web]\naffinity = \"client-ip\"\nprotocol_check = \"none\"\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\", proxy_protocol = \"v1\" }]\n",
            Path::new("."),
        )
        .expect_err("rejected");
        let paths: Vec<(&str, Option<usize>)> =
            e.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            paths,
            [
                ("cluster.web.affinity", Some(4)),
                ("cluster.web.protocol_check", Some(5)),
                ("cluster.web.backends[0].proxy_protocol", Some(6)),
            ],
            "{e:?}"
        );
        // A config with only TCP listeners is a valid config.
        assert!(build(
            "[[tcp_listener]]\nlisten = \"127.0.0.1:0\"\ncluster = \"v\"\n[cluster.v]\nbackends = [{ id = \"a\", address = \"127.0.0.1:1\" }]\n",
            Path::new(".")
        )
        .is_ok());
    }
}
