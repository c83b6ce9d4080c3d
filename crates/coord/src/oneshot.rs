//! One-shot HTTP/1.1 calls of the control plane: etcd's JSON gateway and promotion
//! hooks, over plain TCP or TLS.
//!
//! A hook call opens its own connection. The etcd client keeps one idle connection per
//! endpoint for its unary calls (lease keep-alives run every few hundred milliseconds)
//! through [`connect`] and [`post_on`]; a watch has a connection of its own. TLS
//! sessions are resumed by the shared `rustls::ClientConfig`, so a reconnect costs no
//! full handshake. It is never used on the request path.

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

/// The sending half of an open HTTP/1.1 connection.
pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An open connection: its sender, and why its connection task ended (if it did), so
/// that a failure reads as itself (a TLS alert such as "certificate required" arrives
/// only on the first read) rather than as a cancelled request.
pub struct Conn {
    send: Sender,
    died: tokio::sync::oneshot::Receiver<String>,
}

impl Conn {
    /// Whether the connection can take another request (not closed by either side).
    pub fn is_open(&self) -> bool {
        !self.send.is_closed()
    }
}

/// Opens a connection to `target` (TCP, then TLS when configured).
pub async fn connect<A: ToSocketAddrs + Clone>(target: &Target<'_, A>) -> Result<Conn, String> {
    let stream = TcpStream::connect(target.connect.clone())
        .await
        .map_err(|e| format!("connect {}: {e}", target.authority))?;
    let _ = stream.set_nodelay(true);
    match target.tls {
        None => handshake(stream).await,
        Some(cfg) => {
            let host = host_of(target.authority);
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
            handshake(tls).await
        }
    }
}

async fn handshake<IO>(io: IO) -> Result<Conn, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| chain(&e))?;
    let (tx, died) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let why = match conn.await {
            Ok(()) => "the connection closed".to_string(),
            Err(e) => chain(&e),
        };
        let _ = tx.send(why);
    });
    Ok(Conn { send, died })
}

/// POSTs the JSON `body` to `path` on an open connection; the response body streams.
pub async fn post_on(
    conn: &mut Conn,
    authority: &str,
    path: &str,
    body: String,
) -> Result<hyper::Response<Incoming>, String> {
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    send_on(conn, req).await
}

/// GETs `path` on a new connection to `target`, with `headers`; the response body
/// streams.
pub async fn get<A: ToSocketAddrs + Clone>(
    target: Target<'_, A>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<hyper::Response<Incoming>, String> {
    let mut conn = connect(&target).await?;
    let mut req = hyper::Request::get(path).header(hyper::header::HOST, target.authority);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    send_on(&mut conn, req).await
}

async fn send_on(
    conn: &mut Conn,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, String> {
    let result = match conn.send.ready().await {
        Err(e) => Err(e),
        Ok(()) => conn.send.send_request(req).await,
    };
    match result {
        Ok(r) => Ok(r),
        // The connection task's own error says more than the request's ("canceled"):
        // give it a moment to report why the connection ended.
        Err(e) => Err(
            match tokio::time::timeout(std::time::Duration::from_millis(50), &mut conn.died).await {
                Ok(Ok(why)) => why,
                _ => chain(&e),
            },
        ),
    }
}

/// POSTs the JSON `body` to `path` on a new connection and returns the response; its
/// body streams.
pub async fn post_json<A: ToSocketAddrs + Clone>(
    target: Target<'_, A>,
    path: &str,
    body: String,
) -> Result<hyper::Response<Incoming>, String> {
    let mut conn = connect(&target).await?;
    post_on(&mut conn, target.authority, path, body).await
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
