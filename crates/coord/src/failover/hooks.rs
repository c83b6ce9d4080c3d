//! The control plane's outgoing calls: promote and repoint hooks on the backends, and
//! the failsafe query to peers. Off the request path.
//! It never decides anything and never runs on the request path.

use super::*;

// === hooks ===

/// Calls a hook on backend `i` (at `address` as the data plane resolved it; the
/// configured text when none is known): POST with a JSON body saying what changed.
/// 2xx is success. Logged and counted either way.
pub(super) async fn call_hook(
    hook: &HookConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    which: &'static str,
    c: &ClusterConfig,
    i: usize,
    address: Option<std::net::SocketAddr>,
    epoch: u64,
) -> Result<(), String> {
    let b = &c.backends[i];
    let address = address.map_or_else(|| b.address.to_string(), |a| a.to_string());
    let url = hook
        .url
        .replace("{address}", &address)
        .replace("{id}", &b.id)
        .replace("{cluster}", &c.name)
        .replace("{epoch}", &epoch.to_string());
    let body = serde_json::json!({
        "cluster": c.name,
        "epoch": epoch,
        "event": which,
        "backend": b.id,
        "address": address,
    });
    let started = Instant::now();
    let result = tokio::time::timeout(hook.timeout, post_json(&url, tls, &body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", hook.timeout)));
    let took = started.elapsed();
    let labels = [
        ("cluster", c.name.clone()),
        ("hook", which.to_string()),
        (
            "result",
            if result.is_ok() { "ok" } else { "error" }.to_string(),
        ),
    ];
    metrics::counter!("keyway_hook_calls_total", &labels).increment(1);
    metrics::histogram!("keyway_hook_duration_seconds", &labels[..2]).record(took.as_secs_f64());
    match &result {
        Ok(()) => {
            tracing::info!(cluster = %c.name, hook = which, backend = %b.id, %url, epoch, took_ms = took.as_millis() as u64, "hook succeeded")
        }
        Err(e) => {
            tracing::warn!(cluster = %c.name, hook = which, backend = %b.id, %url, epoch, took_ms = took.as_millis() as u64, error = %e, "hook failed")
        }
    }
    result
}

/// GETs a small JSON document from a failsafe peer's admin listener (`http://`).
pub(super) async fn get_json(
    peer: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    use http_body_util::BodyExt;
    let authority = peer
        .strip_prefix("http://")
        .unwrap_or(peer)
        .trim_end_matches('/');
    let host = crate::oneshot::host_of(authority);
    let port: u16 = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| format!("no port in {peer}"))?;
    let target = crate::oneshot::Target {
        connect: (host, port),
        authority,
        tls: None,
    };
    let resp = crate::oneshot::get(target, path, headers).await?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    // An answer is a few hundred bytes; a peer that sends more is refused, not buffered.
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

pub(super) async fn post_json(
    url: &str,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
    body: &serde_json::Value,
) -> Result<(), String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("no host in {url}"))?
        .clone();
    let tls = uri.scheme_str() == Some("https");
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = crate::oneshot::host_of(authority.as_str());
    let target = crate::oneshot::Target {
        connect: (host, port),
        authority: authority.as_str(),
        tls: if tls { tls_config } else { None },
    };
    if tls && target.tls.is_none() {
        return Err("https hook without TLS settings".into());
    }
    let resp = crate::oneshot::post_json(
        target,
        uri.path_and_query().map_or("/", |p| p.as_str()),
        body.to_string(),
    )
    .await?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

impl Failover {
    /// Where the serving data plane connects to backend `i` of `c`, if it serves `c`.
    pub(super) fn address_of(&self, c: &ClusterConfig, i: usize) -> Option<std::net::SocketAddr> {
        let view = self.live()?.view(&c.name)?;
        view.backends.get(i).map(|b| b.address)
    }
}
