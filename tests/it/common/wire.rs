//! Raw HTTP and WebSocket helpers: requests and answers as text, one echo, a counting
//! stream, values from metrics and access lines.

use super::edge::within;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A minimal YAML for one resource pointing at `origin`, listening on 127.0.0.1:0.
pub fn one_resource(origin: SocketAddr, extra_ws: &str) -> String {
    resource_with(
        origin,
        &format!("idle_timeout: 30s, handshake_timeout: 2s {extra_ws}"),
    )
}

/// One resource `test` pointing at `origin`, with exactly these `websocket` keys.
pub fn resource_with(origin: SocketAddr, websocket: &str) -> String {
    format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: test
    hostnames: ["127.0.0.1", "localhost"]
    origin:
      servers: [{{ address: "{origin}" }}]
    websocket: {{ {websocket} }}
"#
    )
}

/// Type of a client WebSocket as `connect_async` gives it.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `n` tunnels to `url`, 50 at a time, each within the test step.
pub async fn open_tunnels(url: &str, n: usize) -> Vec<Ws> {
    let mut all = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(50) {
        let batch = (chunk * 50..((chunk + 1) * 50).min(n))
            .map(|_| tokio_tungstenite::connect_async(url.to_string()));
        let opened = super::within(
            "open a batch of tunnels",
            futures_util::future::join_all(batch),
        );
        for r in opened.await {
            all.push(r.expect("tunnel opens").0);
        }
    }
    all
}

/// A WebSocket client request for `ws://{addr}/ws` with the Host `host` (a resource's
/// name where the address is an IP).
pub fn ws_request_for(
    addr: SocketAddr,
    host: &'static str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static(host));
    req
}

/// Sends a raw HTTP request and reads the whole answer (until the server closes or the
/// answer's Content-Length is complete).
pub async fn raw_request(addr: SocketAddr, req: &str) -> String {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = within("read answer", s.read(&mut buf)).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            // A 101 has no body: the connection is now a tunnel.
            if head.starts_with("HTTP/1.1 101") {
                break;
            }
            let cl = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if cl.is_some_and(|cl| body.len() >= cl) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// [`raw_request`], and how long the whole answer took to come (a timeout's effect).
pub async fn timed_raw_request(addr: SocketAddr, req: &str) -> (String, std::time::Duration) {
    let started = std::time::Instant::now();
    let answer = raw_request(addr, req).await;
    (answer, started.elapsed())
}

/// A valid upgrade request for `path` with extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Echo one message through a WebSocket stream.
pub async fn echo_once<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, msg: Message) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("send", ws.send(msg)).await.unwrap();
    within("receive", ws.next())
        .await
        .expect("stream ended")
        .expect("ws error")
}

/// Deterministic bytes of length `n` that differ at every position.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0] ^ seed)
        .collect()
}

/// Echoes a binary and a text message of each size through `ws`: each must come back
/// byte for byte.
pub async fn echo_sizes<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, sizes: &[usize])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for (i, &n) in sizes.iter().enumerate() {
        let bin = pattern(n, i as u8);
        assert_eq!(
            echo_once(ws, Message::binary(bin.clone())).await,
            Message::binary(bin),
            "binary {n}"
        );
        let text: String = pattern(n, i as u8)
            .iter()
            .map(|b| (b'a' + b % 26) as char)
            .collect();
        assert_eq!(
            echo_once(ws, Message::text(text.clone())).await,
            Message::text(text),
            "text {n}"
        );
    }
}

/// A TCP stream that counts the bytes it reads and writes, so a test knows exactly what
/// crossed the edge.
pub struct Counted {
    pub inner: TcpStream,
    pub read: Arc<AtomicUsize>,
    pub written: Arc<AtomicUsize>,
}

impl Counted {
    pub async fn connect(addr: SocketAddr) -> Counted {
        Counted {
            inner: within("connect", TcpStream::connect(addr)).await.unwrap(),
            read: Arc::default(),
            written: Arc::default(),
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n, Ordering::SeqCst);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n, Ordering::SeqCst);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A metric's value from Prometheus text, by its full series name with labels.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A JSON field's raw value (number or string without quotes) from a flat JSON line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!("\"{key}\":")).nth(1)?;
    if let Some(s) = rest.strip_prefix('"') {
        s.split('"').next()
    } else {
        rest.split([',', '}']).next()
    }
}

/// The status code of a raw HTTP answer.
pub fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// A header's value in a raw HTTP answer.
pub fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next().unwrap();
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An address nothing listens on: a port that was bound on `ip` and closed again (no
/// assumption about the host's ports).
pub fn closed_port(ip: &str) -> SocketAddr {
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}
