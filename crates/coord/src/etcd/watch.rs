//! Watches with progress: one streaming call per watch, asking etcd for progress
//! notifications, reading its newline-separated JSON messages into [`WatchEvent`]s. A
//! watch that hears nothing for [`WATCH_SILENCE`] is given up; this module must never
//! keep trusting a silent stream (the caller re-reads and watches again).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use super::{int, kv, range_end, Client, Kv};

/// A watch that hears nothing (no event, no progress notification) for this long is
/// given up and re-established after a full read.
pub const WATCH_SILENCE: Duration = Duration::from_secs(30);
/// An event of a watch stream.
pub enum WatchEvent {
    /// A key was written.
    Put(Kv),
    /// A key was deleted.
    Delete(String),
    /// Nothing changed up to this store revision (a progress notification, or the
    /// header of any message).
    Progress(i64),
}

impl Client {
    /// Watches every key under `prefix` from revision `from` and hands each event to
    /// `on_event`. Returns when the stream ends or fails (the caller re-reads and
    /// watches again).
    pub async fn watch(
        &self,
        prefix: &str,
        from: i64,
        mut on_event: impl FnMut(WatchEvent),
    ) -> Result<(), String> {
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(range_end(prefix)),
            "start_revision": from.to_string(),
            "progress_notify": true,
        }});
        let mut last = String::from("no etcd endpoint configured");
        for ep in &self.endpoints {
            let mut resp =
                match tokio::time::timeout(self.timeout, self.open(ep, "/v3/watch", &body)).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        last = format!("etcd {}/v3/watch: {e}", ep.at.url());
                        continue;
                    }
                    Err(_) => {
                        last = format!(
                            "etcd {}/v3/watch: no answer within {:?}",
                            ep.at.url(),
                            self.timeout
                        );
                        continue;
                    }
                };
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let frame = match tokio::time::timeout(WATCH_SILENCE, resp.frame()).await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(_) => {
                        return Err(format!(
                            "etcd watch silent for {WATCH_SILENCE:?} (no event, no progress notification): re-reading"
                        ))
                    }
                };
                let frame = frame.map_err(|e| format!("etcd watch stream: {e}"))?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                // Messages are JSON objects, one per line.
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if let Some(err) = msg.get("error") {
                        return Err(format!("etcd watch: {err}"));
                    }
                    let result = &msg["result"];
                    if result["canceled"].as_bool() == Some(true) {
                        return Err(format!(
                            "etcd cancelled the watch: {}",
                            result["cancel_reason"]
                        ));
                    }
                    let revision = int(&result["header"]["revision"]);
                    if revision > 0 {
                        on_event(WatchEvent::Progress(revision));
                    }
                    for ev in result["events"].as_array().into_iter().flatten() {
                        let Some(kv) = kv(&ev["kv"]) else { continue };
                        if ev["type"] == "DELETE" {
                            on_event(WatchEvent::Delete(kv.key));
                        } else {
                            on_event(WatchEvent::Put(kv));
                        }
                    }
                }
                if buf.len() > 16 << 20 {
                    return Err("etcd watch message larger than 16 MiB".into());
                }
            }
            return Ok(());
        }
        Err(last)
    }
}
