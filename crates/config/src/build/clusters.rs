//! `[cluster.NAME]`: strategies, balancing, stickiness, retries, limits, backends and
//! the plugin references of a cluster.
//! It never resolves an address, reads a certificate or compiles a plugin.

use super::*;

pub(super) fn cluster(
    name: &str,
    c: &FileCluster,
    path: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> Option<(ClusterConfig, Vec<usize>)> {
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
    let mut backend_at = Vec::new();
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
            backend_at.push(i);
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
        if !is_plugin_path(&cl.policy) {
            errs.push(
                &cp.key("policy"),
                format!("`{}` is not a plugin file", cl.policy),
                "name a .wasm classifier plugin, e.g. \"plugins/pam-classifier.wasm\"",
            );
        } else {
            split.classifier = Some(ClassifierHook {
                plugin: PluginRef {
                    path: resolve(base, &cl.policy),
                    config_json: plugin_config_json(cl.config.as_ref()),
                },
                on_error,
                remember_answers: cl.remember_answers.unwrap_or(true),
            });
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
    let cluster = ClusterConfig {
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
    };
    Some((cluster, backend_at))
}
