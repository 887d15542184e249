//! Test harness: a real wsedge process on loopback, real origins in-process, real clients.
//! Ports are 0 everywhere; readiness is the `listening on` line wsedge prints. Every wait
//! is under a timeout.
#![allow(dead_code)]
// tungstenite's accept callback must return Result<Response, ErrorResponse>: its size is not ours.
#![allow(clippy::result_large_err)]

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// The longest any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `f` under [`STEP`], panicking with `what` on timeout.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// The wsedge binary under test: this build's, or another build's given in `WSEDGE_BIN`
/// (to run the suite against an older commit, say).
pub fn wsedge_bin() -> PathBuf {
    std::env::var_os("WSEDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wsedge")))
}

/// A unique scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wsedge-test-{}-{}-{}",
        std::process::id(),
        tag,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running wsedge process; killed on drop.
pub struct Edge {
    child: Child,
    /// The HTTP listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The HTTPS listener, if any.
    pub https: Option<SocketAddr>,
    pub pid: u32,
    /// Everything wsedge wrote on stderr (its log), filled by a reader thread.
    pub log: Arc<Mutex<String>>,
    /// The access-log lines (JSON) wsedge wrote on stdout.
    pub access: Arc<Mutex<Vec<String>>>,
    pub dir: PathBuf,
}

impl Edge {
    /// Starts wsedge with `yaml` (which should listen on 127.0.0.1:0).
    pub fn start(yaml: &str) -> Edge {
        Self::start_with_args(yaml, &[])
    }

    /// Starts wsedge with `yaml` and extra command-line arguments.
    pub fn start_with_args(yaml: &str, args: &[&str]) -> Edge {
        let dir = scratch_dir("edge");
        let path = dir.join("wsedge.yaml");
        std::fs::write(&path, with_admin(yaml)).unwrap();
        Self::start_file(&path, dir, args)
    }

    pub fn start_file(path: &std::path::Path, dir: PathBuf, args: &[&str]) -> Edge {
        Self::start_opts(path, dir, args, false, &wsedge_bin())
    }

    /// Like [`Self::start_file`], running `program`; with `stall_stdout`, stdout (the access
    /// log) is no longer read once the listeners are reported: a log shipper that stopped
    /// reading.
    pub fn start_opts(
        path: &std::path::Path,
        dir: PathBuf,
        args: &[&str],
        stall_stdout: bool,
        program: &std::path::Path,
    ) -> Edge {
        let mut child = Command::new(program)
            .args(args)
            .arg("-c")
            .arg(path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsedge");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let access = Arc::new(Mutex::new(Vec::new()));
        let access2 = access.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                let l = std::mem::take(&mut line);
                let line = l.trim_end_matches('\n').to_string();
                let admin_line = line.starts_with("wsedge: admin on");
                let found = [
                    ("http", "wsedge: listening on http://"),
                    ("https", "wsedge: listening on https://"),
                    ("admin", "wsedge: admin on http://"),
                ]
                .into_iter()
                .find_map(|(kind, prefix)| {
                    Some((kind, line.strip_prefix(prefix)?.parse::<SocketAddr>().ok()?))
                });
                if let Some(f) = found {
                    let _ = tx.send(f);
                } else if line.starts_with('{') {
                    access2.lock().unwrap().push(line);
                }
                if stall_stdout && admin_line {
                    // Keep the pipe open, never read again.
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        });
        let (mut addr, mut https, mut admin) = (None, None, None);
        // The admin line comes last.
        while admin.is_none() {
            match rx.recv_timeout(STEP) {
                Ok(("http", a)) => addr = addr.or(Some(a)),
                Ok(("https", a)) => https = https.or(Some(a)),
                Ok((_, a)) => admin = Some(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "wsedge did not report its listeners; log:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        }
        let pid = child.id();
        Edge {
            child,
            addr: addr.or(https).unwrap(),
            https,
            admin: admin.unwrap(),
            pid,
            log,
            access,
            dir,
        }
    }

    /// The access-log lines so far.
    pub fn access_lines(&self) -> Vec<String> {
        self.access.lock().unwrap().clone()
    }

    /// Sends `signal` (like "HUP", "TERM", "QUIT") to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, up to `limit`; true if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// An admin request; returns (status, body).
    pub async fn admin_request(&self, method: &str, path: &str) -> (u16, String) {
        let host = format!("Host: {}\r\n", self.admin);
        self.admin_request_with(method, path, &host).await
    }

    /// An admin request with these header lines (each ending in CRLF, Host included).
    pub async fn admin_request_with(
        &self,
        method: &str,
        path: &str,
        headers: &str,
    ) -> (u16, String) {
        let answer = raw_request(
            self.admin,
            &format!("{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// Waits (bounded) until the log contains every one of `needles`; returns the log.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let end = std::time::Instant::now() + STEP;
        loop {
            let log = self.log_text();
            if needles.iter().all(|n| log.contains(n)) || std::time::Instant::now() > end {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until `n` access lines satisfy `pred`; returns all lines.
    pub fn wait_access(&self, n: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let end = std::time::Instant::now() + STEP;
        loop {
            let lines = self.access_lines();
            if lines.iter().filter(|l| pred(l)).count() >= n || std::time::Instant::now() > end {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Adds an admin listener on 127.0.0.2:0 unless the file has one: tests never use fixed
/// ports, and a different loopback address keeps it apart from the port-0 HTTP listener.
pub fn with_admin(yaml: &str) -> String {
    if yaml.lines().any(|l| l.starts_with("admin:")) {
        yaml.to_string()
    } else {
        format!("admin: \"127.0.0.2:0\"\n{yaml}")
    }
}

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

/// A minimal YAML for one resource pointing at `origin`, listening on 127.0.0.1:0.
pub fn one_resource(origin: SocketAddr, extra_ws: &str) -> String {
    format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: test
    hostnames: ["127.0.0.1", "localhost"]
    origin:
      servers: [{{ address: "{origin}" }}]
    websocket: {{ idle_timeout: 30s, handshake_timeout: 2s {extra_ws} }}
"#
    )
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

/// A test CA made at test time, issuing certificates for names.
pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    pub dir: PathBuf,
}

/// An issued certificate: files on disk and the DER of the leaf.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = scratch_dir(tag);
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsedge test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { ca, ca_key, dir }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate for `names`, written as `<file>.pem` and `<file>.key`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&key, &self.ca, &self.ca_key)
                .unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        Issued {
            cert: c,
            key: k,
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    /// A TLS acceptor serving `issued` (for origins).
    pub fn acceptor(&self, issued: &Issued) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![issued.der.clone().into()],
                tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
                    issued.key_der.clone().into(),
                ),
            )
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A TLS connector trusting this CA, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
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
