//! A WebSocket client over HTTP/2 (RFC 8441) for the tests: the `h2` crate's client over
//! rustls, an extended CONNECT, and the stream as bytes (`h2io::H2Io`, shared with
//! wsload) for tungstenite or raw frames.

use super::edge::within;
use super::pki::Pki;
use bytes::Bytes;
use h2::client::SendRequest;
use std::net::SocketAddr;
use tokio_rustls::rustls::pki_types::ServerName;

/// An h2 connection to `addr` over TLS with SNI `sni`: its request handle and the task
/// that drives it. The client's connection window is large (as browsers make it), so that
/// one stream the test does not read cannot use up its siblings' credit.
pub async fn h2_connect(
    pki: &Pki,
    addr: SocketAddr,
    sni: &str,
) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tls = tls_h2(pki, addr, sni).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = within(
        "h2 handshake",
        h2::client::Builder::new()
            .initial_connection_window_size(64 << 20)
            .handshake::<_, Bytes>(tls),
    )
    .await
    .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

/// TCP (`TCP_NODELAY`, as browsers set it) and TLS offering only h2, with SNI `sni`.
async fn tls_h2(
    pki: &Pki,
    addr: SocketAddr,
    sni: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = within("connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    within(
        "tls handshake",
        pki.connector(&[b"h2"])
            .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp),
    )
    .await
    .unwrap()
}

/// Whether the edge's SETTINGS said `ENABLE_CONNECT_PROTOCOL = 1`, once they arrived (a
/// plain request's answer comes after them).
pub async fn advertises_extended_connect(send: &mut SendRequest<Bytes>, authority: &str) -> bool {
    let req = http::Request::get(format!("https://{authority}/healthz"))
        .body(())
        .unwrap();
    let (resp, _) = within("ready", send.clone().ready())
        .await
        .unwrap()
        .send_request(req, true)
        .unwrap();
    let _ = within("a plain answer", resp).await;
    send.is_extended_connect_protocol_enabled()
}

pub use h2io::H2Io;

/// Opens a WebSocket to `path` with an extended CONNECT (`protocol` as `:protocol`, none
/// for a plain CONNECT) and these extra fields. The answer's header, and the stream when
/// it is `200`.
pub async fn h2_open(
    send: &SendRequest<Bytes>,
    authority: &str,
    path: &str,
    protocol: Option<&str>,
    fields: &[(&str, &str)],
) -> Result<(http::response::Parts, Option<H2Io>), h2::Error> {
    let mut req = match protocol {
        Some(_) => http::Request::builder()
            .method("CONNECT")
            .uri(format!("https://{authority}{path}")),
        None => http::Request::builder().method("CONNECT").uri(authority),
    };
    if !fields
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-version"))
    {
        req = req.header("sec-websocket-version", "13");
    }
    for (k, v) in fields {
        req = req.header(*k, *v);
    }
    let mut req = req.body(()).unwrap();
    if let Some(p) = protocol {
        req.extensions_mut().insert(h2::ext::Protocol::from(p));
    }
    let mut send = within("stream slot", send.clone().ready()).await?;
    let (resp, stream) = send.send_request(req, false)?;
    let resp = within("the answer", resp).await?;
    let (parts, recv) = resp.into_parts();
    if parts.status != 200 {
        return Ok((parts, None));
    }
    let io = H2Io::new(recv, stream);
    Ok((parts, Some(io)))
}

/// A client WebSocket over an h2 stream (messages up to 64 MiB).
pub async fn h2_websocket(io: H2Io) -> tokio_tungstenite::WebSocketStream<H2Io> {
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
    let config = WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..Default::default()
    };
    tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await
}

/// HTTP/2 spoken by hand over TLS, for what the `h2` crate's client will not send (a
/// GOAWAY of the client's own, a `:protocol` the server did not offer): frames in and out,
/// header blocks as HPACK literals (no table, no Huffman).
pub struct RawH2 {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

/// One frame: type, flags, stream, payload.
pub type H2Frame = (u8, u8, u32, Vec<u8>);

impl RawH2 {
    /// TLS with ALPN h2, the preface and an empty SETTINGS.
    pub async fn connect(pki: &Pki, addr: SocketAddr, sni: &str) -> RawH2 {
        use tokio::io::AsyncWriteExt;
        let mut raw = RawH2 {
            tls: tls_h2(pki, addr, sni).await,
        };
        raw.tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        raw.send(4, 0, 0, &[]).await;
        raw
    }

    /// Writes one frame.
    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        within("write a frame", self.tls.write_all(&f))
            .await
            .unwrap();
    }

    /// Reads the next frame (None at the end of the connection), acknowledging SETTINGS.
    pub async fn next(&mut self) -> Option<H2Frame> {
        use tokio::io::AsyncReadExt;
        loop {
            let mut head = [0u8; 9];
            within("a frame", self.tls.read_exact(&mut head))
                .await
                .ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            within("a frame's payload", self.tls.read_exact(&mut payload))
                .await
                .ok()?;
            if head[3] == 4 && head[4] & 1 == 0 {
                self.send(4, 1, 0, &[]).await;
                continue;
            }
            return Some((head[3], head[4], stream, payload));
        }
    }

    /// The next frame on `stream` (others skipped).
    pub async fn next_on(&mut self, stream: u32) -> Option<H2Frame> {
        loop {
            let f = self.next().await?;
            if f.2 == stream {
                return Some(f);
            }
        }
    }

    /// A header block of literal fields (pseudo-fields first, as given).
    pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in fields {
            b.push(0);
            for s in [name, value] {
                assert!(s.len() < 127, "a short field");
                b.push(s.len() as u8);
                b.extend_from_slice(s.as_bytes());
            }
        }
        b
    }
}
