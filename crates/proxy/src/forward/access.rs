//! The access log: what one request's line records (indices and cheap clones while the
//! request runs, no strings) and the line itself, target `keyway::access`. It only
//! reads what the request path filled in; it never changes the answer.

use super::*;

/// What the access log records about a request: indices and cheap clones, no strings.
#[derive(Default)]
pub(super) struct AccessLog {
    pub(super) host: Option<HeaderValue>,
    /// The path as sent, replaced by its normal form once the front door admitted it.
    pub(super) path: Option<String>,
    pub(super) cluster: Option<usize>,
    pub(super) backend: Option<usize>,
    pub(super) attempts: u32,
    pub(super) error: Option<&'static str>,
}

impl AccessLog {
    /// Writes the request's access line.
    pub(super) fn emit(
        &self,
        rt: &Runtime,
        info: &ConnInfo,
        method: &Method,
        status: StatusCode,
        started: Instant,
    ) {
        let path = self.path.as_deref().unwrap_or("");
        let cluster = self.cluster.map(|c| &rt.clusters[c]);
        tracing::info!(
            target: "keyway::access",
            client = %info.client,
            method = %method,
            host = self.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
            path = %path,
            status = status.as_u16(),
            cluster = cluster.map(|c| c.cfg.name.as_str()).unwrap_or(""),
            backend = cluster
                .zip(self.backend)
                .map(|(c, b)| c.backends[b].cfg.id.as_str())
                .unwrap_or(""),
            attempts = self.attempts,
            error = self.error.unwrap_or(""),
            ms = started.elapsed().as_secs_f64() * 1000.0,
        );
    }
}
