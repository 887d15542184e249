//! WebSocket peers at the frame level, for tests that must see every byte: a raw origin
//! that answers the upgrade and hands each connection to the test, a raw client, and a
//! frame reader that checks what RFC 6455 §5.2 asks of every frame.

use super::edge::within;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    /// Unmasked.
    pub payload: Vec<u8>,
    /// The frame exactly as it came (header, key, masked payload).
    pub raw: Vec<u8>,
}

impl Frame {
    /// The status code of a Close frame.
    pub fn code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// The reason text of a Close frame.
    pub fn reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// A frame's bytes; masked with `mask` when given (a client's frames must be, §5.3).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push((u8::from(fin) << 7) | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A Close frame with `code` and `reason`.
pub fn close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    frame(true, 8, &p, mask)
}

/// Reads one frame and checks it is well formed: no reserved bits, no reserved opcode,
/// control frames final and at most 125 bytes, masked exactly when `masked` (frames to a
/// server are masked, frames to a client are not). None at the end of the stream.
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, masked: bool) -> Option<Frame> {
    let mut h = [0u8; 2];
    match s.read_exact(&mut h).await {
        Ok(_) => {}
        Err(_) => return None,
    }
    let mut raw = h.to_vec();
    let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
    assert_eq!(h[0] & 0x70, 0, "reserved bits set: {h:?}");
    assert!(
        !matches!(opcode, 3..=7 | 11..=15),
        "reserved opcode {opcode}"
    );
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.ok()?;
        raw.extend_from_slice(&b);
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.ok()?;
        raw.extend_from_slice(&b);
        len = u64::from_be_bytes(b);
    }
    if opcode & 8 != 0 {
        assert!(
            fin && len <= 125,
            "bad control frame: fin {fin}, {len} bytes"
        );
    }
    assert!(len <= 1 << 30, "a frame of {len} bytes");
    let is_masked = h[1] & 0x80 != 0;
    assert_eq!(is_masked, masked, "masking of a frame with opcode {opcode}");
    let mut key = [0u8; 4];
    if is_masked {
        s.read_exact(&mut key).await.ok()?;
        raw.extend_from_slice(&key);
    }
    let at = raw.len();
    raw.resize(at + len as usize, 0);
    s.read_exact(&mut raw[at..]).await.ok()?;
    let mut payload = raw[at..].to_vec();
    if is_masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some(Frame {
        fin,
        opcode,
        masked: is_masked,
        payload,
        raw,
    })
}

/// [`read_frame`] within the test step.
pub async fn next_frame<S: AsyncRead + Unpin>(s: &mut S, masked: bool) -> Option<Frame> {
    within("read a frame", read_frame(s, masked)).await
}

/// Reads until the end of the stream; the bytes that came.
pub async fn read_to_end<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = within("read to the end", s.read_to_end(&mut rest)).await;
    rest
}

/// An origin that answers every upgrade with a 101 and hands the connection to the test.
pub struct RawOrigin {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<TcpStream>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawOrigin {
    pub async fn start() -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut s).await else {
                        return;
                    };
                    let key = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("sec-websocket-key")
                                .then(|| value.trim().to_string())
                        })
                        .unwrap_or_default();
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        derive_accept_key(key.as_bytes())
                    );
                    if s.write_all(answer.as_bytes()).await.is_ok() {
                        let _ = tx.send(s);
                    }
                });
            }
        });
        RawOrigin { addr, conns, task }
    }

    /// The next upgraded connection.
    pub async fn accept(&mut self) -> TcpStream {
        within("an upgrade at the origin", self.conns.recv())
            .await
            .expect("origin stopped")
    }
}

/// Reads an HTTP head byte by byte (so no byte after it is taken).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || s.read_exact(&mut b).await.is_err() {
            return None;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).ok()
}

/// A raw client: the upgrade sent to `edge` for `path`, its 101 read; the connection.
pub async fn raw_client(edge: SocketAddr, path: &str) -> TcpStream {
    let mut s = within("connect", TcpStream::connect(edge)).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = super::wire::upgrade_request(path, "");
    within("send the upgrade", s.write_all(req.as_bytes()))
        .await
        .unwrap();
    let head = within("the 101", read_head(&mut s))
        .await
        .expect("no answer");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Writes all of `bytes` within the test step.
pub async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    within("write", s.write_all(bytes)).await.unwrap();
}
