//! `[[route]]`: the host pattern, the path prefix and the cluster a route points at
//! (which must be defined). It never routes a request.

use super::*;

pub(super) fn route(
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
