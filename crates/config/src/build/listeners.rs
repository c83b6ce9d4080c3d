//! `[[listener]]` and `[[tcp_listener]]`: addresses (as written), TLS certificate files,
//! PROXY protocol, limits, and the TCP-only cluster keys.

use super::*;

pub(super) fn listener(
    l: &FileListener,
    path: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> Option<(ListenerConfig, Vec<usize>)> {
    let listen = address(&l.listen, &path.key("listen"), errs);
    let (tls, tls_at) = certs(&l.tls, &path.key("tls"), base, errs);
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
        .filter_map(|(i, t)| match Cidr::parse(t) {
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
    let listener = ListenerConfig {
        listen: listen?,
        tls,
        limits,
        door,
        max_connections: max_connections.clamp(1, MAX_LISTENER_MAX_CONNECTIONS),
        proxy_protocol,
    };
    Some((listener, tls_at))
}

pub(super) fn tcp_listener(
    l: &FileTcpListener,
    path: &KeyPath,
    base: &Path,
    clusters: &std::collections::BTreeMap<String, FileCluster>,
    errs: &mut Errors<'_>,
) -> Option<(TcpListenerConfig, Vec<usize>)> {
    let listen = address(&l.listen, &path.key("listen"), errs);
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
    let (tls, tls_at) = certs(&l.tls, &path.key("tls"), base, errs);
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
    let listener = TcpListenerConfig {
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
    };
    Some((listener, tls_at))
}

/// `protocol_check`, `affinity` and a backend's `proxy_protocol` do nothing on a cluster
/// that only HTTP routes use: refused there, like other keys that do not apply.
pub(super) fn tcp_keys_need_a_tcp_listener(
    file: &FileConfig,
    root: &KeyPath,
    errs: &mut Errors<'_>,
) {
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

pub(super) fn protocol_check(
    text: Option<&str>,
    path: &KeyPath,
    errs: &mut Errors<'_>,
) -> ProtocolCheck {
    let choices = [
        ("first-byte", ProtocolCheck::FirstByte),
        ("tls", ProtocolCheck::Tls),
        ("none", ProtocolCheck::None),
    ];
    one_of(text, &choices, path, "protocol_check", "use \"first-byte\" (the backend must send a byte: vault, SSH, RDP), \"tls\" (its first record must be a TLS handshake: TLS passthrough) or \"none\" (connected is enough); docs/config.md lists which protocols speak first", errs)
}

pub(super) fn affinity(text: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> Affinity {
    let choices = [("none", Affinity::None), ("client-ip", Affinity::ClientIp)];
    one_of(text, &choices, path, "affinity", "use \"client-ip\" (a client's connections land on one backend while it is healthy) or \"none\"", errs)
}

pub(super) fn backend_proxy_protocol(
    text: Option<&str>,
    path: &KeyPath,
    errs: &mut Errors<'_>,
) -> SendProxy {
    let choices = [
        ("off", SendProxy::Off),
        ("v1", SendProxy::V1),
        ("v2", SendProxy::V2),
    ];
    one_of(text, &choices, &path.key("proxy_protocol"), "proxy_protocol", "use \"off\", \"v1\" or \"v2\": the PROXY header version the backend accepts (only TCP listeners send it)", errs)
}

pub(super) fn proxy_protocol(text: Option<&str>, path: &KeyPath, errs: &mut Errors<'_>) -> Accept {
    let choices = [
        ("off", Accept::Off),
        ("v1", Accept::V1),
        ("v2", Accept::V2),
        ("v1-or-v2", Accept::V1OrV2),
    ];
    one_of(text, &choices, path, "proxy_protocol", "use \"off\" (no header), \"v1\", \"v2\" or \"v1-or-v2\": what the load balancer in front sends (HAProxy `send-proxy` is v1, `send-proxy-v2` and AWS NLB are v2)", errs)
}

/// A listener's `tls` list: the certificates kept, and where each was written.
fn certs(
    list: &[FileTlsCert],
    path: &KeyPath,
    base: &Path,
    errs: &mut Errors<'_>,
) -> (Vec<TlsCertConfig>, Vec<usize>) {
    list.iter()
        .enumerate()
        .filter_map(|(i, t)| Some((tls_cert(t, &path.index(i), base, errs)?, i)))
        .unzip()
}

pub(super) fn tls_cert(
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
    // The loader parses both and checks that the key is the certificate's.
    let cert = read_file_checked(&cert_path, &path.key("cert"), errs);
    let key = read_file_checked(&key_path, &path.key("key"), errs);
    (ok && cert.is_some() && key.is_some()).then(|| TlsCertConfig {
        hosts: t.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        cert_path,
        key_path,
    })
}
