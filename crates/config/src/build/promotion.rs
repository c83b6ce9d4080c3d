//! A cluster's promotion (hooks checked as URLs; their TLS is the loader's), read/write
//! split and plugin settings. It never calls a hook or compiles a plugin.

use super::*;

pub(super) fn promotion(
    p: &FilePromotion,
    path: &KeyPath,
    strategy: Strategy,
    health: Option<&HealthConfig>,
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
        file if is_plugin_path(file) => PromotionPolicyKind::Plugin {
            plugin: PluginRef {
                path: resolve(base, file),
                config_json: plugin_config_json(cfg),
            },
            on_error,
        },
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
                Some(scheme @ ("http" | "https")) => Some(HookConfig { url: h.url.clone(), timeout, https: scheme == "https" }),
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

pub(super) fn split(
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
pub(super) fn route_pattern(text: &str) -> Result<RoutePattern, &'static str> {
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

pub(super) fn on_error(v: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> OnError {
    let text = v.unwrap_or("fallback");
    parse_on_error(text).unwrap_or_else(|| {
        errs.push(
            path,
            format!("unknown on_error `{text}`"),
            "use \"fallback\" (the native built-in), \"fail-closed\" (the safe answer) or \"fail-open\"",
        );
        OnError::Fallback
    })
}

pub(super) fn plugin_config_json(table: Option<&toml::Table>) -> String {
    table
        .and_then(|t| serde_json::to_string(t).ok())
        .unwrap_or_else(|| "{}".into())
}
