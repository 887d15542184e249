//! WebSockets over HTTP/2 (RFC 8441) for the benchmarks: `wsload h2-handshakes` opens each
//! WebSocket as a new stream of a few open h2 connections, and `wsload tls-idle` holds idle
//! WebSockets over TLS, as h2 streams or as one HTTP/1.1 connection each, to compare the
//! edge's memory per tunnel.

use super::{rss_kib, AsyncStream, STEP};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use h2::client::SendRequest;
use h2io::H2Io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Where to connect: `wss://ADDR/PATH` with the TLS name `host`.
pub struct Target {
    pub authority: String,
    pub host: String,
    pub path: String,
    /// The CA to trust (PEM), for wss://.
    pub ca: Option<String>,
}

impl Target {
    pub fn parse(url: &str, host: Option<&str>, ca: Option<&str>) -> Target {
        let authority = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .expect("a URL with a host")
            .to_string();
        let path = format!("/{}", url.splitn(4, '/').nth(3).unwrap_or(""));
        let host = host.map_or_else(
            || authority.split(':').next().unwrap().to_string(),
            str::to_string,
        );
        Target {
            authority,
            host,
            path,
            ca: ca.map(str::to_string),
        }
    }

    /// A TCP connection and a full TLS handshake offering `alpn`.
    async fn tls(&self, alpn: &[u8]) -> Result<Box<dyn AsyncStream>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let ca = self.ca.as_deref().ok_or("--ca for wss://")?;
        let mut config = (*super::tls_client(ca)).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Box::new(tls))
    }

    /// An h2 connection (the task driving it runs on its own).
    async fn h2(&self) -> Result<SendRequest<Bytes>, String> {
        let io = self.tls(b"h2").await?;
        let (send, conn) = h2::client::Builder::new()
            .initial_connection_window_size(16 << 20)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// A WebSocket as a new stream of `send`'s connection.
    async fn h2_websocket(
        &self,
        send: &SendRequest<Bytes>,
    ) -> Result<WebSocketStream<H2Io>, String> {
        let mut req = http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://{}{}", self.host, self.path))
            .header("sec-websocket-version", "13")
            .body(())
            .map_err(|e| e.to_string())?;
        req.extensions_mut()
            .insert(h2::ext::Protocol::from("websocket"));
        let mut send = send.clone().ready().await.map_err(|e| e.to_string())?;
        let (resp, stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        let io = H2Io::new(resp.into_body(), stream);
        Ok(WebSocketStream::from_raw_socket(io, Role::Client, None).await)
    }

    /// A WebSocket on a new TCP + TLS connection of its own (HTTP/1.1 upgrade).
    async fn h1_websocket(&self) -> Result<WebSocketStream<Box<dyn AsyncStream>>, String> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let io = self.tls(b"http/1.1").await?;
        let req = format!("wss://{}{}", self.host, self.path)
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let (ws, _) = tokio_tungstenite::client_async(req, io)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ws)
    }
}

/// One echo; the socket, open.
async fn echoed<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
) -> Result<WebSocketStream<S>, String> {
    ws.send(Message::text("hi"))
        .await
        .map_err(|e| e.to_string())?;
    ws.next()
        .await
        .ok_or("no echo")?
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// One echo and the close.
pub(crate) async fn echo_and_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: WebSocketStream<S>,
) -> Result<(), String> {
    echoed(ws)
        .await?
        .close(None)
        .await
        .map_err(|e| e.to_string())
}

/// `count` WebSockets (extended CONNECT, one echo, close), each a new stream of one of
/// `conns` h2 connections opened beforehand: the same JSON as `wsload handshakes`.
pub async fn handshakes(target: Target, conns: u64, count: u64, pids: &[u64]) {
    let target = Arc::new(target);
    let mut senders = Vec::new();
    for _ in 0..conns {
        let send = tokio::time::timeout(STEP, target.h2())
            .await
            .expect("h2 connection in time")
            .expect("h2 connection");
        senders.push(send);
    }
    let one: Arc<super::Attempt<SendRequest<Bytes>>> = Arc::new(move |send| {
        let target = target.clone();
        Box::pin(async move { echo_and_close(target.h2_websocket(send).await?).await })
    });
    super::run_handshakes(senders, count, pids, one).await
}

/// Opens `count` idle WebSockets over TLS, as streams of h2 connections (100 a
/// connection) or as HTTP/1.1 connections of their own, each after one echo, and prints
/// the measured processes' RSS before and after: `{"tunnels","rss_kib","kib_per_tunnel"}`.
pub async fn idle(target: Target, count: u64, h2: bool, pids: &[u64]) {
    let settle = || tokio::time::sleep(Duration::from_millis(1500));
    settle().await;
    let base = rss_kib(pids);
    let mut h2_open = Vec::new();
    let mut h1_open = Vec::new();
    let mut send = None;
    for i in 0..count {
        let one = async {
            if h2 {
                if i % 100 == 0 {
                    send = Some(target.h2().await?);
                }
                let ws = target.h2_websocket(send.as_ref().unwrap()).await?;
                h2_open.push(echoed(ws).await?);
            } else {
                h1_open.push(echoed(target.h1_websocket().await?).await?);
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(STEP, one)
            .await
            .expect("a tunnel in time")
            .expect("a tunnel");
    }
    settle().await;
    let rss = rss_kib(pids);
    println!(
        "{{\"protocol\":\"{}\",\"tunnels\":{count},\"rss_kib\":{rss},\"base_kib\":{base},\"kib_per_tunnel\":{:.1}}}",
        if h2 { "h2" } else { "http/1.1" },
        rss.saturating_sub(base) as f64 / count.max(1) as f64
    );
    drop(h2_open);
    drop(h1_open);
}
