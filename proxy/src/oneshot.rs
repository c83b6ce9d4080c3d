//! One-shot HTTP/1.1 calls of the control plane: etcd's JSON gateway and promotion
//! hooks, over plain TCP or TLS.
//!
//! Each call opens its own connection. These calls run on topology changes, lease
//! keep-alives and watches, never per proxied request, so a pool would buy nothing but
//! state to keep right across etcd restarts; TLS sessions are resumed by the shared
//! `rustls::ClientConfig`, so a reconnect costs no full handshake.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};

/// Where a call goes.
pub struct Target<'a, A> {
    /// What to connect to: a resolved address, or `(host, port)`.
    pub connect: A,
    /// `host:port` for the Host header; its host is the TLS server name.
    pub authority: &'a str,
    /// TLS settings, for `https://`.
    pub tls: Option<&'a Arc<rustls::ClientConfig>>,
}

/// POSTs the JSON `body` to `path` and returns the response; its body streams.
pub async fn post_json<A: ToSocketAddrs>(
    target: Target<'_, A>,
    path: &str,
    body: String,
) -> Result<hyper::Response<Incoming>, String> {
    let stream = TcpStream::connect(target.connect)
        .await
        .map_err(|e| format!("connect {}: {e}", target.authority))?;
    let _ = stream.set_nodelay(true);
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, target.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    match target.tls {
        None => exchange(stream, req).await,
        Some(cfg) => {
            let host = host_of(target.authority);
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
            exchange(tls, req).await
        }
    }
}

async fn exchange<IO>(
    io: IO,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, mut conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| chain(&e))?;
    // Drive the connection here until the response head arrives, so that a failure
    // (a TLS alert such as "certificate required" arrives only on the first read)
    // is reported as itself, not as a cancelled request.
    let resp = {
        let sent = send.send_request(req);
        tokio::pin!(sent);
        tokio::select! {
            r = &mut sent => r.map_err(|e| chain(&e))?,
            c = &mut conn => {
                return Err(match c {
                    Err(e) => chain(&e),
                    Ok(()) => "the connection closed before a response".into(),
                });
            }
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(resp)
}

/// An error and its causes, `outer: inner: ...` (hyper's own message alone says only
/// "connection error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The host of `host:port`, `[v6]:port` or a bare host, without brackets.
pub fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("etcd1.corp:2379"), "etcd1.corp");
        assert_eq!(host_of("127.0.0.1:2379"), "127.0.0.1");
        assert_eq!(host_of("[::1]:2379"), "::1");
        assert_eq!(host_of("etcd1.corp"), "etcd1.corp");
    }
}
