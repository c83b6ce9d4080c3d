//! Turns config text into a validated [`Config`], collecting every error.
//!
//! Order of work: syntax (toml) → shape (serde, with unknown keys collected by
//! `serde_ignored`) → each field (addresses, durations, names, files) → fields against
//! each other (duplicate ids, routes to clusters that do not exist, listeners sharing an
//! address). Each error carries the key path; `Locator` turns it into a line number.
//! Pure: nothing here resolves a name, builds a TLS object, compiles a plugin, binds a
//! socket or touches live state (that, and checks on resolved addresses such as two
//! listeners on one address, is the loaders' work).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use super::file::*;
use super::locate::{KeyPath, Locator};
use super::*;

mod backends;
mod clusters;
mod coordination;
mod fields;
mod keys;
mod listeners;
mod promotion;
mod routes;

use backends::*;
use clusters::*;
use coordination::*;
pub(crate) use fields::host_pattern;
use fields::*;
use keys::*;
use listeners::*;
use promotion::*;
use routes::*;

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

/// Builds a config, failing on any problem (what the unit tests check).
#[cfg(test)]
fn build(text: &str, base: &Path) -> Result<Config, Vec<ConfigError>> {
    match build_all(text, base)? {
        (cfg, errors) if errors.is_empty() => Ok(cfg),
        (_, errors) => Err(errors),
    }
}

/// The config as far as it can be built, with every problem in line order; `Err` when
/// the text has no usable shape.
pub(super) fn build_all(
    text: &str,
    base: &Path,
) -> Result<(Config, Vec<ConfigError>), Vec<ConfigError>> {
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

    let mut cfg = check(&file, base, &mut errs);
    cfg.source = Source(Arc::from(text));
    let mut list = errs.list;
    list.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Ok((cfg, list))
}

fn toml_error(loc: &Locator<'_>, e: &toml::de::Error, fix: &str) -> ConfigError {
    ConfigError {
        line: e.span().map(|s| loc.line_of_offset(s.start)),
        path: String::new(),
        message: e.message().trim().to_string(),
        fix: fix.to_string(),
    }
}

fn check(file: &FileConfig, base: &Path, errs: &mut Errors<'_>) -> Config {
    let root = KeyPath::root();

    let admin = file.admin.as_ref().and_then(|a| {
        let p = root.key("admin").key("listen");
        let token = a.token_file.as_deref().and_then(|f| {
            admin_token(
                &resolve(base, f),
                &root.key("admin").key("token_file"),
                errs,
            )
        });
        Some(AdminConfig {
            listen: address(&a.listen, &p, errs)?,
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
    let mut origins = Origins::default();
    let listeners = file
        .listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let (kept, certs) = listener(l, &root.key("listener").index(i), base, errs)?;
            origins.listeners.push((i, certs));
            Some(kept)
        })
        .collect();

    let clusters: Vec<ClusterConfig> = file
        .clusters
        .iter()
        .filter_map(|(name, c)| {
            let (kept, backends) = cluster(name, c, &root.key("cluster").key(name), base, errs)?;
            origins.backends.push(backends);
            Some(kept)
        })
        .collect();

    let defined: BTreeSet<&str> = file.clusters.keys().map(String::as_str).collect();
    let tcp_listeners = file
        .tcp_listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let (kept, certs) = tcp_listener(
                l,
                &root.key("tcp_listener").index(i),
                base,
                &file.clusters,
                errs,
            )?;
            origins.tcp_listeners.push((i, certs));
            Some(kept)
        })
        .collect();
    tcp_keys_need_a_tcp_listener(file, &root, errs);
    let routes = file
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(r, &root.key("route").index(i), &defined, errs))
        .collect();

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
                .filter_map(|(i, e)| {
                    let kept = etcd_endpoint(e, &cp.key("etcd").index(i), errs)?;
                    origins.etcd.push((i, e.clone()));
                    Some(kept)
                })
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
        source: Source::default(),
        origins,
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

    const SEED: &str = include_str!("../../../../config/demo.toml");

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
        use crate::Accept;
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
        assert_eq!(l.proxy_protocol, Accept::V2);
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
