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

use crate::access_log;
use crate::config::Resource;
use crate::origin;
use crate::stats::EdgeStats;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as OriginSession;
use pingora::proxy::Session;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};
use tokio::time::{sleep_until, timeout};

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
}

impl CloseReason {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [CloseReason; 5] = [
        CloseReason::ClientClosed,
        CloseReason::OriginClosed,
        CloseReason::IdleTimeout,
        CloseReason::Error,
        CloseReason::Shutdown,
    ];

    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::OriginClosed => "origin_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
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
}

/// An open tunnel's accounting. Its `Drop` records the close, so a tunnel is counted and
/// logged however it ends, including when the runtime is dropped at shutdown with the
/// tunnel still open (then the reason is `shutdown`).
struct TunnelGuard {
    info: TunnelInfo,
    stats: Arc<EdgeStats>,
    server: SocketAddr,
    opened_at: SystemTime,
    started: Instant,
    client_to_origin: u64,
    origin_to_client: u64,
    reason: Option<CloseReason>,
}

impl TunnelGuard {
    fn new(info: TunnelInfo, stats: Arc<EdgeStats>, server: SocketAddr) -> TunnelGuard {
        stats.tunnel_opened();
        TunnelGuard {
            info,
            stats,
            server,
            opened_at: SystemTime::now(),
            started: Instant::now(),
            client_to_origin: 0,
            origin_to_client: 0,
            reason: None,
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(CloseReason::Shutdown);
        self.stats.tunnel_closed(reason);
        let mut line = String::with_capacity(256);
        line.push_str("{\"time\":");
        access_log::json_str(&mut line, &access_log::rfc3339(self.opened_at));
        line.push_str(",\"kind\":\"tunnel\",\"resource\":");
        access_log::json_str(&mut line, &self.info.resource);
        line.push_str(",\"client\":");
        access_log::json_str(&mut line, &self.info.client);
        line.push_str(",\"host\":");
        access_log::json_str(&mut line, &self.info.host);
        line.push_str(",\"path\":");
        access_log::json_str(&mut line, &self.info.path);
        let _ = write!(
            line,
            ",\"status\":101,\"bytes_client_to_origin\":{},\"bytes_origin_to_client\":{},\"duration_ms\":{},\"close_reason\":\"{}\",\"origin\":\"{}\"}}",
            self.client_to_origin,
            self.origin_to_client,
            self.started.elapsed().as_millis(),
            reason.as_str(),
            self.server
        );
        access_log::write_line(&line);
    }
}

/// Sends the upgrade to the resource's origin group and, on 101, relays until the end.
/// Errors are the client's side failing while the origin's answer is written.
pub async fn run(
    session: &mut Session,
    res: &Resource,
    connector: &Connector,
    req: RequestHeader,
    client_tls: bool,
    info: TunnelInfo,
    stats: &Arc<EdgeStats>,
) -> pingora::Result<Outcome> {
    // Try the servers of the group in order; a server that refuses or cannot be reached
    // costs no more than its connect attempt.
    let mut conn = None;
    for &server in &res.origin.servers {
        let peer = origin::peer(res, server, client_tls, &info.host);
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
    let mut guard = TunnelGuard::new(info, stats.clone(), server);
    let reason = relay(session, &mut up, res.websocket.idle_timeout, &mut guard).await;
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
    idle: Duration,
    guard: &mut TunnelGuard,
) -> CloseReason {
    // Our idle timer replaces the per-side read timeouts: a tunnel where only one side
    // talks is not idle. Writes keep a timeout so a peer that stops reading cannot pin
    // the tunnel forever.
    session.set_read_timeout(None);
    session.set_write_timeout(Some(idle));
    up.read_timeout = None;
    up.write_timeout = Some(idle);
    up.maybe_upgrade_body_writer();

    let mut deadline = tokio::time::Instant::now() + idle;
    let mut client_open = true;
    let reason = loop {
        tokio::select! {
            r = session.downstream_session.read_request_body(), if client_open => match r {
                Ok(Some(b)) => {
                    guard.client_to_origin += b.len() as u64;
                    deadline = tokio::time::Instant::now() + idle;
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
                Err(_) => break CloseReason::ClientClosed,
            },
            r = up.read_body_bytes() => match r {
                Ok(Some(b)) => {
                    guard.origin_to_client += b.len() as u64;
                    deadline = tokio::time::Instant::now() + idle;
                    if session.downstream_session.write_response_body(b, false).await.is_err() {
                        break CloseReason::Error;
                    }
                }
                Ok(None) if client_open => break CloseReason::OriginClosed,
                Ok(None) => break CloseReason::ClientClosed,
                Err(_) if client_open => break CloseReason::Error,
                Err(_) => break CloseReason::ClientClosed,
            },
            _ = sleep_until(deadline) => break CloseReason::IdleTimeout,
        }
    };
    let _ = session
        .downstream_session
        .write_response_body(Bytes::new(), true)
        .await;
    reason
}
