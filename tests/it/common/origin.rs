//! Origins in-process on 127.0.0.1:0: a WebSocket echo (with a few behaviours by path), a
//! fixed status, or silence; each counts its connections and keeps what it saw.
// tungstenite's accept callback must return Result<Response, ErrorResponse>: its size is not ours.
#![allow(clippy::result_large_err)]

use super::edge::STEP;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// What a test origin does with an upgrade request.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Accept, select the first offered subprotocol, echo data messages.
    Echo,
    /// Answer the upgrade with this status and a short body.
    Status(u16),
    /// Accept the TCP connection and never answer.
    Silent,
}

/// Something an origin saw, for tests to assert on.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    /// A close frame from the client: code and reason.
    Close(u16, String),
    /// A text message received on `/sink`.
    Message(String),
    /// The request headers of an upgrade, as (name, value) lower-cased names.
    Request(Vec<(String, String)>),
    /// The request target (path and query) of an upgrade.
    Target(String),
}

/// An in-process origin on 127.0.0.1:0 that counts its connections.
pub struct Origin {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// What `GET /healthz` answers: 200 while true, 503 when false.
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    mode: Mode,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub async fn start(mode: Mode) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, mode, None)
    }

    /// Serves over TLS with `acceptor`.
    pub async fn start_tls(mode: Mode, acceptor: tokio_rustls::TlsAcceptor) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, mode, Some(acceptor))
    }

    pub fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Upgrade connections only (health checks excluded).
    pub fn upgrades(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s, Seen::Request(_)))
            .count()
    }

    /// Stops listening (new connections are refused); open connections carry on.
    pub fn stop(&mut self) {
        self.task.abort();
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) {
        self.task.abort();
        let deadline = std::time::Instant::now() + STEP;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        let again = Self::serve_with(
            listener,
            self.mode.clone(),
            None,
            self.connections.clone(),
            self.seen.clone(),
            self.healthy.clone(),
        );
        self.task = again;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn serve(listener: TcpListener, mode: Mode, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let task = Self::serve_with(
            listener,
            mode.clone(),
            tls,
            connections.clone(),
            seen.clone(),
            healthy.clone(),
        );
        Origin {
            addr,
            connections,
            seen,
            healthy,
            mode,
            task,
        }
    }

    fn serve_with(
        listener: TcpListener,
        mode: Mode,
        tls: Option<tokio_rustls::TlsAcceptor>,
        c: Arc<AtomicUsize>,
        s: Arc<Mutex<Vec<Seen>>>,
        healthy: Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                if tls.is_none() {
                    // Health checks: a plain GET /healthz is answered here.
                    let mut head = [0u8; 12];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut head)).await
                    {
                        if head[..n].starts_with(b"GET /healthz") {
                            let ok = healthy.load(Ordering::SeqCst);
                            let resp: &[u8] = if ok {
                                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                            } else {
                                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\ndown\n"
                            };
                            tokio::spawn(async move {
                                let mut buf = [0u8; 1024];
                                let _ = stream.read(&mut buf).await;
                                let _ = stream.write_all(resp).await;
                            });
                            continue;
                        }
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
                let (mode, seen, tls) = (mode.clone(), s.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acc) => {
                            if let Ok(s) = acc.accept(stream).await {
                                origin_conn(s, mode, seen).await
                            }
                        }
                        None => origin_conn(stream, mode, seen).await,
                    }
                });
            }
        })
    }
}

async fn origin_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mode: Mode,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    match mode {
        Mode::Silent => {
            let mut buf = [0u8; 1024];
            // Hold the connection open without answering, until the peer goes away.
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        Mode::Status(code) => {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let body = format!("origin says {code}\n");
            let resp = format!(
                "HTTP/1.1 {code} Whatever\r\nContent-Type: text/plain\r\nX-Origin: yes\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.flush().await;
        }
        Mode::Echo => {
            let seen2 = seen.clone();
            let callback = move |req: &Request, mut resp: Response| {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                seen2.lock().unwrap().push(Seen::Request(headers));
                if let Some(p) = req.headers().get("sec-websocket-protocol") {
                    let first = p
                        .to_str()
                        .unwrap()
                        .split(',')
                        .next()
                        .unwrap()
                        .trim()
                        .to_string();
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_str(&first).unwrap(),
                    );
                }
                Ok(resp)
            };
            let path_holder = Arc::new(Mutex::new(String::new()));
            let ph = path_holder.clone();
            let seen3 = seen.clone();
            let cb = move |req: &Request, resp: Response| {
                *ph.lock().unwrap() = req.uri().path().to_string();
                let answer = callback(req, resp);
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                seen3.lock().unwrap().push(Seen::Target(target.to_string()));
                answer
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
                return;
            };
            let path = path_holder.lock().unwrap().clone();
            if path == "/close-me" {
                // Not in the same packet as the 101: tests count bytes after the handshake.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = ws
                    .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: 4002.into(),
                        reason: "origin bye".into(),
                    }))
                    .await;
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            if path == "/sink" {
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m {
                        seen.lock().unwrap().push(Seen::Message(t.to_string()));
                    }
                }
                return;
            }
            if path == "/flood" {
                // 64 KiB binary messages as fast as they are taken, never reading; every
                // MiB sent is recorded as `flood <bytes>`.
                let chunk = vec![7u8; 64 << 10];
                let mut sent = 0usize;
                while ws.send(Message::binary(chunk.clone())).await.is_ok() {
                    sent += chunk.len();
                    if sent.is_multiple_of(1 << 20) {
                        seen.lock()
                            .unwrap()
                            .push(Seen::Message(format!("flood {sent}")));
                    }
                }
                return;
            }
            if let Some(n) = path.strip_prefix("/push/") {
                // Push one small message every `n` milliseconds, ignoring the client.
                let every = Duration::from_millis(n.parse().unwrap());
                loop {
                    tokio::select! {
                        m = ws.next() => match m {
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                            _ => {}
                        },
                        _ = tokio::time::sleep(every) => {
                            if ws.send(Message::text("tick")).await.is_err() { return; }
                        }
                    }
                }
            }
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Close(frame)) => {
                        if let Some(f) = frame {
                            seen.lock()
                                .unwrap()
                                .push(Seen::Close(f.code.into(), f.reason.to_string()));
                        }
                        // tungstenite answers the close itself on the next flush.
                        let _ = ws.flush().await;
                        break;
                    }
                    Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                        if ws.send(m).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
