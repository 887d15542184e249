//! A WebSocket tunnel: the upgrade sent to the origin, its answer relayed, and after a 101
//! the bytes relayed both ways until one side ends, the tunnel idles out, or a write stalls.
//!
//! wsedge relays the upgraded connection itself instead of leaving it to Pingora's
//! `proxy_h1` pipe. Pingora 0.9.1 tears a tunnel down when the origin's 101 is read before
//! the upgrade request's own (empty) end of body has been handed to the upstream half
//! (cloudflare/pingora#946): both halves run in one `select!`, which picks at random among
//! ready branches, so the order depends on scheduling and no hook can fix it.
//!
//! After the 101 the tunnel leaves Pingora: the client's stream is taken out of the
//! session (with any bytes the session had already read), plain TCP sockets leave
//! Pingora's stream wrapper, and the tunnel runs as one small task of its own ([`Tunnel`])
//! while Pingora's request state is dropped. There is no end-of-body message to misorder,
//! one timer covers both directions (the heartbeat interval) and the lifetime, the close
//! reason is known exactly, and an idle tunnel holds no buffer: reads go into one buffer
//! per worker thread and are written on at once; only bytes a destination cannot take yet
//! are kept, by the tunnel that read them.

use crate::access_log::{AccessLog, JsonLine};
use crate::config::Resource;
use crate::frames::FrameReader;
use crate::limits::Slot;
use crate::listener::ClientConn;
use crate::origin::{self, OriginGroup};
use crate::stats::ResourceStats;
use bytes::Bytes;
use futures_util::FutureExt;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as OriginSession;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use prometheus::IntCounter;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};

/// Why a tunnel ended (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client ended the connection.
    ClientClosed,
    /// The origin ended the connection.
    OriginClosed,
    /// No data either way for the resource's `idle_timeout`.
    IdleTimeout,
    /// A read or write failed.
    Error,
    /// The process shut down (or the task was dropped) with the tunnel still open.
    Shutdown,
    /// The tunnel reached the resource's `max_lifetime`.
    MaxLifetime,
}

impl CloseReason {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::ClientClosed,
        CloseReason::OriginClosed,
        CloseReason::IdleTimeout,
        CloseReason::Error,
        CloseReason::Shutdown,
        CloseReason::MaxLifetime,
    ];

    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::OriginClosed => "origin_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::MaxLifetime => "max_lifetime",
        }
    }
}

/// What became of an upgrade request the gate allowed.
#[derive(Debug)]
pub enum Outcome {
    /// No server of the group could be reached: answer 502.
    Unreachable,
    /// The origin answered 101 without `Upgrade: websocket`: answer 502.
    BadUpgradeAnswer,
    /// The origin did not answer within `handshake_timeout`: answer 504.
    HandshakeTimeout,
    /// The origin answered with something other than 101, which was passed on unchanged.
    Refused(u16),
    /// The 101 went out and the tunnel runs as a task of its own (its guard logs it
    /// when it ends).
    Opened,
}

/// Who and what a tunnel is for, for its log line.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    /// The resource's name.
    pub resource: String,
    /// The client's address.
    pub client: String,
    /// The Host the client asked for, without port.
    pub host: String,
    /// The request path (and query).
    pub path: String,
    /// The client's IP (the key of sticky balancing).
    pub client_ip: Option<std::net::IpAddr>,
    /// Whether the client came over TLS.
    pub tls: bool,
    /// Whether the client's socket may leave Pingora's stream wrapper once the tunnel is
    /// open (the listener has no read buffer that could hold bytes).
    pub detachable: bool,
}

/// Where a tunnel reports: the resource's counters, the access log, and whether per-chunk
/// metrics are on.
pub struct Reporting {
    /// The resource's counters.
    pub site: Arc<ResourceStats>,
    /// The access log.
    pub log: Arc<AccessLog>,
    /// Count bytes and messages into metrics as they pass (and parse frame headers).
    pub metrics: bool,
}

/// One direction's accounting.
#[derive(Default)]
struct Direction {
    bytes: u64,
    messages: u64,
    frames: FrameReader,
    /// When this direction's first Close frame passed, if one did.
    close_at: Option<Instant>,
}

impl Direction {
    /// Accounts for a chunk; per chunk this is a walk over the frame headers in it (the
    /// close reason and code come from them, metrics or not) and, with metrics on, two
    /// atomic adds.
    fn pass(&mut self, chunk: &[u8], counters: &Counters<'_>) {
        self.bytes += chunk.len() as u64;
        let seen = self.frames.feed(chunk);
        self.messages += u64::from(seen.messages);
        if seen.close && self.close_at.is_none() {
            self.close_at = Some(Instant::now());
        }
        if counters.metrics {
            counters.bytes.inc_by(chunk.len() as u64);
            if seen.messages > 0 {
                counters.messages.inc_by(u64::from(seen.messages));
            }
        }
    }
}

/// An open tunnel's accounting. Its `Drop` records the close, so a tunnel is counted and
/// logged however it ends, including when the runtime is dropped at shutdown with the
/// tunnel still open (then the reason is `shutdown`).
struct TunnelGuard {
    info: TunnelInfo,
    report: Reporting,
    /// The tunnel's slot (`max_connections`, `max_connections_per_ip`), freed with it.
    _slot: Slot,
    server: SocketAddr,
    opened_at: SystemTime,
    started: Instant,
    c2o: Direction,
    o2c: Direction,
    reason: Option<CloseReason>,
}

impl TunnelGuard {
    fn new(info: TunnelInfo, report: Reporting, slot: Slot, server: SocketAddr) -> TunnelGuard {
        report.site.tunnel_opened();
        TunnelGuard {
            info,
            report,
            _slot: slot,
            server,
            opened_at: SystemTime::now(),
            started: Instant::now(),
            c2o: Direction::default(),
            o2c: Direction::default(),
            reason: None,
        }
    }

    /// "Closed by" is who sent the first Close frame (RFC 6455 §7.1.1: after a client's
    /// Close it is the origin that ends TCP); without Close frames, who ended TCP.
    fn close_reason(&self, transport: CloseReason) -> CloseReason {
        if matches!(
            transport,
            CloseReason::IdleTimeout | CloseReason::Shutdown | CloseReason::MaxLifetime
        ) {
            return transport;
        }
        match (self.c2o.close_at, self.o2c.close_at) {
            (Some(c), Some(o)) if o < c => CloseReason::OriginClosed,
            (Some(_), _) => CloseReason::ClientClosed,
            (None, Some(_)) => CloseReason::OriginClosed,
            (None, None) => transport,
        }
    }

    /// The close code of the first Close frame, whichever side sent it.
    fn close_code(&self) -> Option<u16> {
        match (self.c2o.close_at, self.o2c.close_at) {
            (Some(c), Some(o)) if o < c => self.o2c.frames.close_code,
            (Some(_), _) => self.c2o.frames.close_code,
            (None, Some(_)) => self.o2c.frames.close_code,
            (None, None) => None,
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(CloseReason::Shutdown);
        let seconds = self.started.elapsed().as_secs_f64();
        self.report.site.tunnel_closed(reason, seconds);
        if !self.report.metrics {
            // Bytes were not added chunk by chunk: add them now.
            self.report.site.bytes_c2o.inc_by(self.c2o.bytes);
            self.report.site.bytes_o2c.inc_by(self.o2c.bytes);
        }
        if !self.report.log.enabled() {
            return;
        }
        let line = JsonLine::new(self.opened_at)
            .str("kind", "tunnel")
            .str("resource", &self.info.resource)
            .str("client", &self.info.client)
            .str("host", &self.info.host)
            .str("path", &self.info.path)
            .num("status", 101)
            .num("bytes_client_to_origin", self.c2o.bytes)
            .num("bytes_origin_to_client", self.o2c.bytes)
            .num("messages_client_to_origin", self.c2o.messages)
            .num("messages_origin_to_client", self.o2c.messages)
            .num("duration_ms", self.started.elapsed().as_millis())
            .str("close_reason", reason.as_str())
            .opt("close_code", self.close_code())
            .str("origin", &self.server.to_string())
            .finish();
        self.report.log.write(line);
    }
}

/// Sends the upgrade to the resource's origin group and, on 101, relays until the end.
/// `slot` is held by the tunnel, and given back as soon as the answer is not a 101.
/// Errors are the client's side failing while the origin's answer is written.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    session: &mut Session,
    res: &Resource,
    group: &OriginGroup,
    connector: &Connector,
    req: RequestHeader,
    info: TunnelInfo,
    report: Reporting,
    slot: Slot,
) -> pingora::Result<Outcome> {
    // Try the group's servers (healthy primaries, then backups), each once; a server that
    // refuses or cannot be reached costs no more than its connect attempt.
    let mut conn = None;
    let mut tried = Vec::with_capacity(group.size());
    while let Some(server) = group.next(info.client_ip, &tried) {
        tried.push(server);
        match connect(res, server, &info, connector).await {
            Ok(mut up) => match up.write_request_header(Box::new(req.clone())).await {
                Ok(_) => {
                    conn = Some((up, server));
                    break;
                }
                Err(e) => log::warn!(
                    "resource {}: origin {server}: sending the upgrade: {e}",
                    res.name
                ),
            },
            Err(e) => log::warn!("resource {}: origin {server}: {e}", res.name),
        }
    }
    let Some((mut up, server)) = conn else {
        return Ok(Outcome::Unreachable);
    };

    // The whole answer header, interim answers included, within the handshake timeout.
    let deadline = tokio::time::Instant::now() + res.websocket.handshake_timeout;
    let resp = loop {
        let resp = match tokio::time::timeout_at(deadline, up.read_resp_header_parts()).await {
            Err(_) => return Ok(Outcome::HandshakeTimeout),
            Ok(Err(e)) => {
                log::warn!(
                    "resource {}: origin {server}: reading the upgrade answer: {e}",
                    res.name
                );
                return Ok(Outcome::Unreachable);
            }
            Ok(Ok(resp)) => resp,
        };
        // RFC 9110 §15.2: a proxy forwards 1xx answers (103 Early Hints, a 100 Continue)
        // and reads on for the final one.
        if resp.status.is_informational() && resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            match timeout_at(deadline, session.write_response_header(resp, false)).await {
                Ok(r) => r?,
                Err(_) => return Ok(Outcome::HandshakeTimeout),
            }
            continue;
        }
        break resp;
    };

    if resp.status.as_u16() != 101 {
        // Not a tunnel: its slot is free now, and the answer is passed on within bounds.
        drop(slot);
        let status = resp.status.as_u16();
        pass_answer(session, &mut up, resp, res.websocket.handshake_timeout).await?;
        return Ok(Outcome::Refused(status));
    }

    // RFC 6455 §4.1: a 101 that does not switch to websocket is not a WebSocket answer;
    // relaying it would hand the client a connection in an unknown protocol.
    if !crate::handshake::has_token(&resp.headers, http::header::UPGRADE, "websocket") {
        log::warn!(
            "resource {}: origin {server} answered 101 without Upgrade: websocket",
            res.name
        );
        return Ok(Outcome::BadUpgradeAnswer);
    }

    session.write_response_header(resp, false).await?;
    let idle = res.websocket.idle_timeout;
    let guard = TunnelGuard::new(info, report, slot, server);
    let Some((client, from_client)) = take_client(session) else {
        // Upgrades only come over HTTP/1 (there is no RFC 8441 here): not reached.
        let mut guard = guard;
        guard.reason = Some(CloseReason::Error);
        return Ok(Outcome::Opened);
    };
    up.read_timeout = None;
    // What the session holds is all there is to take now: no read from the socket.
    BareTcp::set_quiet(up.stream(), true);
    let from_origin = poll_preread(up.read_body_bytes());
    let origin = up.into_inner();
    BareTcp::set_quiet(&origin, false);
    let client = match guard.info.detachable {
        true => detach(client),
        false => client,
    };
    crate::os::set_user_timeout(&*client, idle);
    crate::os::set_user_timeout(&*origin, idle);
    // The tunnel runs as a task of its own; Pingora's request state ends here.
    tokio::spawn(Tunnel::new(
        client,
        origin,
        &res.websocket,
        guard,
        [from_client, from_origin],
    ));
    Ok(Outcome::Opened)
}

/// Passes an origin's non-101 answer (header and body) to the client unchanged. Each read
/// from the origin must come within `limit` (an origin that answers and goes silent is not
/// waited for), and so must each write to the client.
async fn pass_answer(
    session: &mut Session,
    up: &mut OriginSession,
    resp: Box<ResponseHeader>,
    limit: Duration,
) -> pingora::Result<()> {
    session.set_keepalive(None);
    session.set_write_timeout(Some(limit));
    up.read_timeout = Some(limit);
    session.write_response_header(resp, false).await?;
    loop {
        match up.read_body_bytes().await {
            Ok(Some(b)) => session.write_response_body(Some(b), false).await?,
            Ok(None) => break,
            Err(e) => {
                log::warn!("origin answer body cut short: {e}");
                // The client must not take a cut body for a whole one.
                return Err(e);
            }
        }
    }
    session.write_response_body(None, true).await
}

/// A session to one origin server. Plain TCP origins are connected here (a socket,
/// `TCP_NODELAY`, the resource's connect timeout) as a [`BareTcp`], which the tunnel
/// keeps after a 101; TLS origins go through Pingora's connector
/// (verification, SNI, CA).
async fn connect(
    res: &Resource,
    server: SocketAddr,
    info: &TunnelInfo,
    connector: &Connector,
) -> Result<OriginSession, String> {
    if origin::uses_tls(res.origin.protocol, info.tls) {
        let peer = origin::peer(res, server, info.tls, &info.host);
        return match connector.get_http_session(&peer).await {
            Ok((up, _reused)) => Ok(up),
            Err(e) => Err(e.to_string()),
        };
    }
    let limit = res.origin.connect_timeout;
    let tcp = match timeout(limit, TcpStream::connect(server)).await {
        Err(_) => return Err(format!("connect timed out after {limit:?}")),
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Ok(Ok(tcp)) => tcp,
    };
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    Ok(OriginSession::new(Box::new(BareTcp::new(tcp))))
}

/// A plain TCP socket as a Pingora stream, without Pingora's L4 wrapper (its socket
/// digest and buffers): the origins wsedge connects itself, and client sockets a tunnel
/// took out of that wrapper ([`detach`]).
#[derive(Debug)]
struct BareTcp {
    tcp: TcpStream,
    /// Once set, reads return Pending without touching the socket: polling a session
    /// for bytes it already holds then costs no system call.
    quiet: AtomicBool,
}

impl BareTcp {
    fn new(tcp: TcpStream) -> BareTcp {
        BareTcp {
            tcp,
            quiet: AtomicBool::new(false),
        }
    }

    /// Sets `quiet` if `stream` is a `BareTcp` (a TLS stream has no such switch).
    fn set_quiet(stream: &Stream, quiet: bool) {
        if let Some(bare) = stream.as_any().downcast_ref::<BareTcp>() {
            bare.quiet.store(quiet, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for BareTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.quiet.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for BareTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Shutdown for BareTcp {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(&mut self.tcp).await;
    }
}

impl pingora::protocols::UniqueID for BareTcp {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl pingora::protocols::Ssl for BareTcp {}

impl pingora::protocols::GetTimingDigest for BareTcp {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        Vec::new()
    }
}

impl pingora::protocols::GetProxyDigest for BareTcp {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        None
    }
}

impl pingora::protocols::GetSocketDigest for BareTcp {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        None
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Peek for BareTcp {}

/// Takes the client's connection out of the Pingora session after the 101 was written,
/// with any bytes the client sent after its request that the session had already read.
/// The session is left with an empty stand-in (nothing to reuse): Pingora's per-request
/// state is dropped when `request_filter` returns, so an open tunnel holds only its two
/// connections and its accounting.
fn take_client(session: &mut Session) -> Option<(Stream, Option<Bytes>)> {
    let stand_in = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::<u8>::new())));
    match std::mem::replace(&mut *session.downstream_session, stand_in) {
        ServerSession::H1(mut h1) => {
            h1.set_read_timeout(None);
            // Behind the header guard the session holds the header only (the body of an
            // upgrade is empty): what the client sent after it is in the guard's stash.
            // Otherwise the session may have read some already.
            if h1.stream().as_any().is::<ClientConn>() {
                let conn = h1.into_inner().into_any().downcast::<ClientConn>().ok()?;
                let (stream, early) = conn.into_parts();
                return Some((stream, (!early.is_empty()).then(|| early.freeze())));
            }
            let early = poll_preread(h1.read_body_bytes());
            Some((h1.into_inner(), early))
        }
        other => {
            *session.downstream_session = other;
            None
        }
    }
}

/// Bytes a session read past an HTTP header (after a 101 its body reader passes
/// everything through): polled once, so it returns what is buffered, or what the socket
/// already holds, and never waits. A pending read is dropped before it read anything.
fn poll_preread<F>(read: F) -> Option<Bytes>
where
    F: Future<Output = pingora::Result<Option<Bytes>>>,
{
    match read.now_or_never() {
        Some(Ok(Some(bytes))) if !bytes.is_empty() => Some(bytes),
        _ => None,
    }
}

/// A plain TCP client connection leaves Pingora's L4 wrapper (its struct, socket digest
/// and write buffer, about 0.9 KiB a connection) for a [`BareTcp`]: the socket is
/// duplicated and the wrapper dropped, which closes only its own descriptor. Only for
/// streams with no read buffer (wsedge's listeners make none) and nothing left to flush,
/// so no byte stays behind in the wrapper; anything else (TLS) is returned as it is.
fn detach(mut stream: Stream) -> Stream {
    if !stream.as_any().is::<L4Stream>() || !matches!(stream.flush().now_or_never(), Some(Ok(()))) {
        return stream;
    }
    let fd = stream
        .as_any()
        .downcast_ref::<L4Stream>()
        .map(|s| s.as_raw_fd());
    let Some(Ok(dup)) = fd.map(crate::os::dup_socket) else {
        return stream;
    };
    let std = std::net::TcpStream::from(dup);
    // The duplicate shares the socket's non-blocking flag; drop the wrapper (and its
    // registration with the reactor) before registering the duplicate.
    drop(stream);
    match TcpStream::from_std(std) {
        Ok(tcp) => Box::new(BareTcp::new(tcp)),
        Err(e) => {
            log::warn!("tunnel: re-registering a socket: {e}");
            // `std` is gone with the error: the connection is closed, the relay sees it
            // as a failed read.
            Box::new(std::io::Cursor::new(Vec::<u8>::new()))
        }
    }
}

/// The most a tunnel reads from one side at a time, and so the most it can hold for a
/// destination that does not take it: reading from a side resumes only once what was read
/// from it is all written on. A client that never reads thus costs a tunnel at most this
/// much per direction, however much the origin sends (nginx holds its `proxy_buffer_size`,
/// HAProxy its `tune.bufsize`, 16 KiB). Larger reads move large messages in fewer system
/// calls; docs/benchmarks.md has what this size costs against 256 KiB.
pub const RELAY_BUF: usize = 32 * 1024;

thread_local! {
    /// The relay's read buffer: one per worker thread, lent to a tunnel only for the span of
    /// one read and the write that follows it. A tunnel keeps bytes of its own only when the
    /// destination cannot take them right away, so an idle tunnel holds no buffer at all.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; RELAY_BUF].into_boxed_slice());
}

/// Reads and writes per direction before yielding to other tasks.
const ROUNDS: usize = 16;

/// How long a closing tunnel waits for the client to take its FIN (and TLS close_notify).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    ReadError,
    WriteError,
}

/// One direction: bytes read but not yet taken by the destination.
#[derive(Default)]
struct Half {
    /// Bytes the destination pushed back (empty, unallocated, almost always).
    pending: Vec<u8>,
    written: usize,
    /// A write went out that the stream may still hold (TLS records): flush before more.
    flush: bool,
    /// Since when `pending` has been waiting.
    stalled_since: Option<tokio::time::Instant>,
}

/// Counters one direction reports into.
struct Counters<'a> {
    metrics: bool,
    bytes: &'a IntCounter,
    messages: &'a IntCounter,
}

impl<'a> Counters<'a> {
    fn c2o(site: &'a ResourceStats, metrics: bool) -> Counters<'a> {
        Counters {
            metrics,
            bytes: &site.bytes_c2o,
            messages: &site.messages_c2o,
        }
    }

    fn o2c(site: &'a ResourceStats, metrics: bool) -> Counters<'a> {
        Counters {
            metrics,
            bytes: &site.bytes_o2c,
            messages: &site.messages_o2c,
        }
    }
}

impl Half {
    /// Moves bytes from `src` to `dst` until either blocks; `moved` is set when any were
    /// read. Ready means this direction ended.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Stream,
        dst: &mut Stream,
        acct: &mut Direction,
        counters: &Counters<'_>,
        moved: &mut bool,
    ) -> Poll<End> {
        for _ in 0..ROUNDS {
            // What the destination pushed back goes first, then a flush.
            while self.written < self.pending.len() {
                match Pin::new(&mut *dst).poll_write(cx, &self.pending[self.written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => self.written += n,
                    Poll::Ready(_) => return Poll::Ready(End::WriteError),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
                self.stalled_since = None;
                self.flush = true;
            }
            if self.flush {
                match Pin::new(&mut *dst).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(End::WriteError),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let step = READ_BUF.with_borrow_mut(|buf| {
                let mut read = ReadBuf::new(buf);
                match Pin::new(&mut *src).poll_read(cx, &mut read) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(_)) => Poll::Ready(Some(End::ReadError)),
                    Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(Some(End::Eof)),
                    Poll::Ready(Ok(())) => {
                        let chunk = read.filled();
                        acct.pass(chunk, counters);
                        *moved = true;
                        Poll::Ready(self.write_now(cx, dst, chunk).err())
                    }
                }
            });
            match step {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(end)) => return Poll::Ready(end),
                Poll::Ready(None) => {}
            }
        }
        // Busy: let other tunnels run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes a chunk just read; what the destination does not take now is kept.
    fn write_now(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut Stream,
        chunk: &[u8],
    ) -> Result<(), End> {
        let mut done = 0;
        while done < chunk.len() {
            match Pin::new(&mut *dst).poll_write(cx, &chunk[done..]) {
                Poll::Ready(Ok(n)) if n > 0 => done += n,
                Poll::Ready(_) => return Err(End::WriteError),
                Poll::Pending => {
                    self.keep(&chunk[done..]);
                    return Ok(());
                }
            }
        }
        self.flush = true;
        Ok(())
    }

    /// Keeps bytes for later (the destination is full).
    fn keep(&mut self, rest: &[u8]) {
        self.pending.extend_from_slice(rest);
        self.stalled_since = Some(tokio::time::Instant::now());
    }
}

/// An open tunnel, as one task: relays bytes both ways until one side ends, nothing moves
/// for the idle timeout, a destination takes nothing for that long, or the lifetime is
/// reached; then sends the client its FIN. Both directions and the one timer are polled
/// from this single future, and its guard logs the tunnel when the task ends.
struct Tunnel {
    client: Stream,
    origin: Stream,
    guard: TunnelGuard,
    c2o: Half,
    o2c: Half,
    idle: Duration,
    lifetime_end: tokio::time::Instant,
    last_activity: tokio::time::Instant,
    /// Armed once and moved only when it fires: traffic just records the time.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The client is done sending; the origin was (`origin_shut`) or is being shut down
    /// for writing.
    client_eof: bool,
    origin_shut: bool,
    /// Set once the relay ended: the FIN to the client is on its way.
    closing: bool,
}

impl Tunnel {
    fn new(
        client: Stream,
        origin: Stream,
        ws: &crate::config::WebSocket,
        guard: TunnelGuard,
        early: [Option<Bytes>; 2],
    ) -> Tunnel {
        let now = tokio::time::Instant::now();
        let idle = ws.idle_timeout;
        // Far enough to never fire when no lifetime is set (tokio caps deadlines anyway).
        let lifetime_end = now
            + ws.max_lifetime
                .unwrap_or(Duration::from_secs(100 * 365 * 86_400));
        let mut tunnel = Tunnel {
            client,
            origin,
            guard,
            c2o: Half::default(),
            o2c: Half::default(),
            idle,
            lifetime_end,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until((now + idle).min(lifetime_end))),
            client_eof: false,
            origin_shut: false,
            closing: false,
        };
        // Bytes that came with the handshake go first, counted like any other.
        let [from_client, from_origin] = early;
        let t = &mut tunnel;
        let (site, metrics) = (&t.guard.report.site, t.guard.report.metrics);
        if let Some(b) = from_client {
            t.guard.c2o.pass(&b, &Counters::c2o(site, metrics));
            t.c2o.keep(&b);
        }
        if let Some(b) = from_origin {
            t.guard.o2c.pass(&b, &Counters::o2c(site, metrics));
            t.o2c.keep(&b);
        }
        tunnel
    }

    /// Moves bytes both ways; Ready with the transport's reason when the relay is over.
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let site = &self.guard.report.site;
        let metrics = self.guard.report.metrics;
        let mut moved = false;
        if !self.client_eof {
            let counters = Counters::c2o(site, metrics);
            match self.c2o.poll_move(
                cx,
                &mut self.client,
                &mut self.origin,
                &mut self.guard.c2o,
                &counters,
                &mut moved,
            ) {
                Poll::Pending => {}
                // The client is done sending; the origin may still answer (its Close
                // frame): half-close towards it and keep relaying its side.
                Poll::Ready(End::Eof) => self.client_eof = true,
                Poll::Ready(_) => return Poll::Ready(CloseReason::Error),
            }
        }
        if self.client_eof && !self.origin_shut {
            if let Poll::Ready(r) = Pin::new(&mut self.origin).poll_shutdown(cx) {
                self.origin_shut = true;
                if r.is_err() {
                    return Poll::Ready(CloseReason::ClientClosed);
                }
            }
        }
        let counters = Counters::o2c(site, metrics);
        let client_open = !self.client_eof;
        let o2c = self.o2c.poll_move(
            cx,
            &mut self.origin,
            &mut self.client,
            &mut self.guard.o2c,
            &counters,
            &mut moved,
        );
        if moved {
            self.last_activity = tokio::time::Instant::now();
        }
        match o2c {
            Poll::Pending => self.poll_limits(cx),
            Poll::Ready(End::Eof) if client_open => Poll::Ready(CloseReason::OriginClosed),
            Poll::Ready(End::Eof) => Poll::Ready(CloseReason::ClientClosed),
            Poll::Ready(End::ReadError) if client_open => Poll::Ready(CloseReason::Error),
            Poll::Ready(End::ReadError) => Poll::Ready(CloseReason::ClientClosed),
            Poll::Ready(End::WriteError) => Poll::Ready(CloseReason::Error),
        }
    }

    /// When the timer fires: whether a limit was reached, else the timer is moved on.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            if now >= self.lifetime_end {
                return Poll::Ready(CloseReason::MaxLifetime);
            }
            let idle_end = self.last_activity + self.idle;
            if now >= idle_end {
                return Poll::Ready(CloseReason::IdleTimeout);
            }
            // A destination that takes nothing for the idle timeout is as good as gone,
            // even while the other direction talks.
            let mut next = idle_end.min(self.lifetime_end);
            for stalled in [self.c2o.stalled_since, self.o2c.stalled_since]
                .into_iter()
                .flatten()
            {
                if now >= stalled + self.idle {
                    return Poll::Ready(CloseReason::Error);
                }
                next = next.min(stalled + self.idle);
            }
            self.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl Future for Tunnel {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.closing {
            let Poll::Ready(transport) = this.poll_relay(cx) else {
                return Poll::Pending;
            };
            this.guard.reason = Some(this.guard.close_reason(transport));
            this.closing = true;
            this.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + CLOSE_WAIT);
        }
        // A TLS client gets its close_notify and FIN, bounded: it may have stopped reading.
        // A bare socket's FIN comes with its close, when the task ends.
        if this.client.as_any().is::<BareTcp>()
            || Pin::new(&mut this.client).poll_shutdown(cx).is_ready()
            || this.timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::EdgeStats;
    use tokio::io::{AsyncReadExt, DuplexStream};

    fn websocket() -> crate::config::WebSocket {
        let yaml = "listen: { http: [\"127.0.0.1:0\"] }\nresources:\n  - name: t\n    hostnames: [a.b]\n    origin: { servers: [{ address: \"127.0.0.1:1\" }] }\n";
        let config = crate::Config::from_yaml("t.yaml", yaml).unwrap();
        config.resources[0].websocket.clone()
    }

    /// A tunnel between two in-memory pipes: (tunnel, client's far end, origin's far end).
    fn tunnel(client_capacity: usize) -> (Tunnel, DuplexStream, DuplexStream) {
        let stats = EdgeStats::default();
        let site = stats.resource("t");
        let slot = Slot::reserve(&site.limits, None, None).unwrap();
        let report = Reporting {
            site,
            log: Arc::new(AccessLog::off()),
            metrics: true,
        };
        let info = TunnelInfo {
            resource: "t".into(),
            client: String::new(),
            host: String::new(),
            path: "/".into(),
            client_ip: None,
            tls: false,
            detachable: false,
        };
        let guard = TunnelGuard::new(info, report, slot, "127.0.0.1:1".parse().unwrap());
        let (client, client_far) = tokio::io::duplex(client_capacity);
        let (origin, origin_far) = tokio::io::duplex(4 << 20);
        let t = Tunnel::new(
            Box::new(client),
            Box::new(origin),
            &websocket(),
            guard,
            [None, None],
        );
        (t, client_far, origin_far)
    }

    #[tokio::test]
    async fn a_client_that_never_reads_holds_at_most_one_read_per_direction() {
        let (mut t, mut client_far, mut origin_far) = tunnel(4096);
        let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            origin_far.write_all(&to_send).await.unwrap();
            origin_far
        });
        // Relay until nothing moves: the client reads nothing.
        for _ in 0..200 {
            assert!(futures_util::poll!(&mut t).is_pending());
            tokio::task::yield_now().await;
        }
        let held = t.o2c.pending.len();
        assert!(held > 0, "the client's side never filled");
        // The documented bound: one read, 32 KiB (nginx and HAProxy hold 16 KiB).
        assert!(held <= 32 * 1024, "a stalled client pins {held} bytes");
        // The client reads again: every byte arrives, in order.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4 << 20];
            client_far.read_exact(&mut got).await.unwrap();
            got
        });
        let relay = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        });
        let got = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(got == sent, "bytes were lost or reordered");
        drop(writer.await.unwrap());
        relay.abort();
    }
}
