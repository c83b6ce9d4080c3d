//! `[coordination]`: etcd endpoints (as written) and TLS files, the failsafe peers, the
//! instance name. It never resolves an endpoint or builds a TLS object.

use super::*;

/// `failsafe = { peers = ["http://HOST:PORT", ...] }`: other instances' admin listeners.
pub(super) fn failsafe_peers(
    c: &FileCoordination,
    cp: &KeyPath,
    errs: &mut Errors<'_>,
) -> Vec<String> {
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
pub(super) fn etcd_endpoint(
    text: &str,
    path: &KeyPath,
    errs: &mut Errors<'_>,
) -> Option<EtcdEndpoint> {
    let (tls, rest) = match text.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix("http://").unwrap_or(text)),
    };
    let authority = rest.trim_end_matches('/');
    // Syntax only: the loader resolves the name and reports one that does not resolve.
    match authority.parse::<Address>() {
        Ok(_) if !authority.contains('/') => Some(EtcdEndpoint {
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
pub(super) fn etcd_tls(
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
    // The files must exist; the loader parses them and builds the client settings.
    if let Some(ca) = &files[0] {
        read_file_checked(ca, &cp.key("ca"), errs)?;
    }
    match (&files[1], &files[2]) {
        (Some(cert), Some(key)) => {
            read_file_checked(cert, &cp.key("cert"), errs)?;
            read_file_checked(key, &cp.key("key"), errs)?;
        }
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            errs.push(
                &cp.key(if files[1].is_some() { "key" } else { "cert" }),
                "a client certificate needs both `cert` and `key`",
                "give both (for etcd with --client-cert-auth), or neither",
            );
            return None;
        }
    }
    Some(EtcdTls { files })
}

/// `hostname-pid`: unique per process on one machine, readable in etcd and logs.
pub(super) fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keyway".into());
    format!("{host}-{}", std::process::id())
}
