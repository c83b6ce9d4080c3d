//! A cluster's `health` table (a plugin policy stays a [`PluginRef`]) and its backends
//! (addresses as written). It never resolves an address or compiles a plugin.

use super::*;

pub(super) fn health(
    h: &FileHealth,
    path: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> HealthConfig {
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
        wasm if is_plugin_path(wasm) => {
            let on_error = on_error(h.on_error.as_deref(), &path.key("on_error"), errs);
            HealthPolicyKind::Plugin {
                plugin: PluginRef {
                    path: resolve(base, wasm),
                    config_json: plugin_config_json(h.config.as_ref()),
                },
                on_error,
                rise: at_least_one("rise", h.rise, DEFAULT_RISE, errs),
                fall: at_least_one("fall", h.fall, DEFAULT_FALL, errs),
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
pub(super) struct SlotDefaults {
    pub(super) max_connections: u32,
    pub(super) max_queue: u32,
}

/// A backend's `max_connections` (`min` 1) or `max_queue` (`min` 0), checked.
pub(super) fn backend_limit(
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

pub(super) fn backend(
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
    let address = address(&b.address, &path.key("address"), errs);
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
