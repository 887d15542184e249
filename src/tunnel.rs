//! A WebSocket tunnel: the upgrade sent to the origin, its answer relayed, and after a 101
//! the bytes relayed both ways until one side ends, the tunnel idles out, or a write stalls.
//!
//! wsedge relays the upgraded connection itself instead of leaving it to Pingora's
//! `proxy_h1` pipe. Pingora 0.9.1 tears a tunnel down when the origin's 101 is read before
//! the upgrade request's own (empty) end of body has been handed to the upstream half
//! (cloudflare/pingora#946): both halves run in one `select!`, which picks at random among
//! ready branches, so the order depends on scheduling and no hook can fix it. Here one
//! loop owns both sessions: there is no end-of-body message to misorder, the idle timer
//! covers both directions (the heartbeat interval), and the close reason is known exactly.

use crate::access_log::{AccessLog, JsonLine};
use crate::config::Resource;
use crate::frames::FrameReader;
use crate::limits::Slot;
use crate::origin::{self, OriginGroup};
use crate::stats::ResourceStats;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as OriginSession;
use pingora::proxy::Session;
use prometheus::IntCounter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};
use tokio::time::timeout;

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
    /// A tunnel was open and has now ended (its guard logged it).
    Closed(CloseReason),
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
}

/// Where a tunnel reports: the process-wide and the resource's counters, the access log,
/// and whether per-chunk metrics are on.
pub struct Reporting {
    /// The resource's tunnel slot (`max_connections`), freed when the tunnel ends.
    pub slot: Slot,
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
    /// Accounts for a chunk; per chunk this is two additions and, with metrics on, a walk
    /// over the frame headers in it and two atomic adds.
    fn pass(&mut self, chunk: &[u8], metrics: bool, bytes: &IntCounter, messages: &IntCounter) {
        self.bytes += chunk.len() as u64;
        if metrics {
            let seen = self.frames.feed(chunk);
            self.messages += u64::from(seen.messages);
            if seen.close && self.close_at.is_none() {
                self.close_at = Some(Instant::now());
            }
            bytes.inc_by(chunk.len() as u64);
            if seen.messages > 0 {
                messages.inc_by(u64::from(seen.messages));
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
    server: SocketAddr,
    opened_at: SystemTime,
    started: Instant,
    c2o: Direction,
    o2c: Direction,
    reason: Option<CloseReason>,
}

impl TunnelGuard {
    fn new(info: TunnelInfo, report: Reporting, server: SocketAddr) -> TunnelGuard {
        report.site.tunnel_opened();
        TunnelGuard {
            info,
            report,
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
        self.report.log.write(&line);
    }
}

/// Sends the upgrade to the resource's origin group and, on 101, relays until the end.
/// Errors are the client's side failing while the origin's answer is written.
pub async fn run(
    session: &mut Session,
    res: &Resource,
    group: &OriginGroup,
    connector: &Connector,
    req: RequestHeader,
    info: TunnelInfo,
    report: Reporting,
) -> pingora::Result<Outcome> {
    // Try the group's servers (healthy primaries, then backups), each once; a server that
    // refuses or cannot be reached costs no more than its connect attempt.
    let mut conn = None;
    let mut tried = Vec::with_capacity(group.size());
    while let Some(server) = group.next(info.client_ip, &tried) {
        tried.push(server);
        let peer = origin::peer(res, server, info.tls, &info.host);
        match connector.get_http_session(&peer).await {
            Ok((mut up, _reused)) => match up.write_request_header(Box::new(req.clone())).await {
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

    let resp = match timeout(res.websocket.handshake_timeout, up.read_resp_header_parts()).await {
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

    if resp.status.as_u16() != 101 {
        let status = resp.status.as_u16();
        pass_answer(session, &mut up, resp).await?;
        return Ok(Outcome::Refused(status));
    }

    // RFC 6455 §4.1: a 101 that does not switch to websocket is not a WebSocket answer;
    // relaying it would hand the client a connection in an unknown protocol.
    let upgrades_to_ws = resp.headers.get_all(http::header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    });
    if !upgrades_to_ws {
        log::warn!(
            "resource {}: origin {server} answered 101 without Upgrade: websocket",
            res.name
        );
        return Ok(Outcome::BadUpgradeAnswer);
    }

    session.write_response_header(resp, false).await?;
    let mut guard = TunnelGuard::new(info, report, server);
    let transport = relay(session, &mut up, &res.websocket, &mut guard).await;
    let reason = guard.close_reason(transport);
    guard.reason = Some(reason);
    Ok(Outcome::Closed(reason))
}

/// Passes an origin's non-101 answer (header and body) to the client unchanged.
async fn pass_answer(
    session: &mut Session,
    up: &mut OriginSession,
    resp: Box<ResponseHeader>,
) -> pingora::Result<()> {
    session.set_keepalive(None);
    session.write_response_header(resp, false).await?;
    loop {
        match up.read_body_bytes().await {
            Ok(Some(b)) => session.write_response_body(Some(b), false).await?,
            Ok(None) => break,
            Err(e) => {
                log::warn!("origin answer body cut short: {e}");
                break;
            }
        }
    }
    session.write_response_body(None, true).await
}

/// Relays bytes both ways until one side closes or nothing moves for `idle`; counts the
/// bytes in `guard` as they pass.
async fn relay(
    session: &mut Session,
    up: &mut OriginSession,
    ws: &crate::config::WebSocket,
    guard: &mut TunnelGuard,
) -> CloseReason {
    let idle = ws.idle_timeout;
    // Far enough to never fire when no lifetime is set (tokio caps deadlines anyway).
    let lifetime_end = tokio::time::Instant::now()
        + ws.max_lifetime
            .unwrap_or(Duration::from_secs(100 * 365 * 86_400));
    // Our idle timer replaces the per-side read timeouts: a tunnel where only one side
    // talks is not idle. Writes keep a timeout so a peer that stops reading cannot pin
    // the tunnel forever.
    session.set_read_timeout(None);
    session.set_write_timeout(Some(idle));
    up.read_timeout = None;
    up.write_timeout = Some(idle);
    up.maybe_upgrade_body_writer();

    // One timer for both limits, armed once and moved only when it fires: traffic just
    // records when it passed (a clock read per chunk, no timer registration).
    let mut last_activity = tokio::time::Instant::now();
    let timer = tokio::time::sleep_until((last_activity + idle).min(lifetime_end));
    tokio::pin!(timer);
    let mut client_open = true;
    let site = guard.report.site.clone();
    let metrics = guard.report.metrics;
    let reason = loop {
        tokio::select! {
            r = session.downstream_session.read_request_body(), if client_open => match r {
                Ok(Some(b)) => {
                    guard.c2o.pass(&b, metrics, &site.bytes_c2o, &site.messages_c2o);
                    last_activity = tokio::time::Instant::now();
                    if up.write_body(&b).await.is_err() {
                        break CloseReason::Error;
                    }
                }
                Ok(None) => {
                    // The client is done sending; the origin may still answer (its Close
                    // frame): half-close towards it and keep relaying its side.
                    client_open = false;
                    up.shutdown().await;
                }
                Err(_) => break CloseReason::Error,
            },
            r = up.read_body_bytes() => match r {
                Ok(Some(b)) => {
                    guard.o2c.pass(&b, metrics, &site.bytes_o2c, &site.messages_o2c);
                    last_activity = tokio::time::Instant::now();
                    if session.downstream_session.write_response_body(b, false).await.is_err() {
                        break CloseReason::Error;
                    }
                }
                Ok(None) if client_open => break CloseReason::OriginClosed,
                Ok(None) => break CloseReason::ClientClosed,
                Err(_) if client_open => break CloseReason::Error,
                Err(_) => break CloseReason::ClientClosed,
            },
            _ = &mut timer => {
                let now = tokio::time::Instant::now();
                if now >= lifetime_end {
                    break CloseReason::MaxLifetime;
                }
                let idle_end = last_activity + idle;
                if now >= idle_end {
                    break CloseReason::IdleTimeout;
                }
                timer.as_mut().reset(idle_end.min(lifetime_end));
            }
        }
    };
    let _ = session
        .downstream_session
        .write_response_body(Bytes::new(), true)
        .await;
    reason
}
