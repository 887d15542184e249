//! A WebSocket tunnel: the upgrade sent to the origin, its answer relayed, and after a 101
//! the two connections handed to a relay of their own.
//!
//! wsedge relays the upgraded connection itself instead of leaving it to Pingora's
//! `proxy_h1` pipe. Pingora 0.9.1 tears a tunnel down when the origin's 101 is read before
//! the upgrade request's own (empty) end of body has been handed to the upstream half
//! (cloudflare/pingora#946): both halves run in one `select!`, which picks at random among
//! ready branches, so the order depends on scheduling and no hook can fix it.
//!
//! The family, in the order a tunnel lives: this module connects to the origin and reads
//! its answer (for an HTTP/2 client, [`over_h2`] makes the upgrade and checks the answer);
//! [`handoff`] takes the connections out of Pingora; [`relay`] moves the bytes;
//! [`frames`] reads frame headers and writes the edge's own frames; [`heartbeat`] pings
//! quiet sides; [`closing`] says who gets which Close when a tunnel ends; [`tally`] counts
//! the bytes and records the tunnel's end.

pub mod closing;
pub mod frames;
mod handoff;
pub mod heartbeat;
pub mod over_h2;
pub mod relay;
pub mod tally;

use crate::config::Resource;
use crate::deadline::{until, within};
use crate::observe::labels::CloseReason;
use crate::policy::answer::Answer;
use crate::policy::drain::Drain;
use crate::policy::handshake::has_token;
use crate::policy::limits::Slot;
use crate::sites::origin::{self, OriginGroup};
use crate::streams::bare_tcp::BareTcp;
use bytes::Bytes;
use handoff::{detach, poll_preread, take_client, take_h2};
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::HttpSession as OriginSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use relay::Relay;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tally::{Reporting, TunnelGuard, TunnelInfo};
use tokio::net::TcpStream;

/// An HTTP/2 stream's tunnel, to be awaited in the stream's task.
pub type Streaming = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// What became of an upgrade request the gate allowed.
pub enum Outcome {
    /// The 101 went out and the tunnel runs as a task of its own (its guard records it
    /// when it ends).
    Opened,
    /// The `200` went out on the client's HTTP/2 stream: the tunnel is this future, to be
    /// run in the stream's own task (an HTTP/2 connection counts its streams by their
    /// tasks, and closes one it thinks idle).
    Streaming(Streaming),
    /// The origin answered with something other than 101, which was passed on unchanged.
    Refused(u16),
    /// The origin failed: the edge answers for it (502, 504).
    Failed(Answer),
}

/// A tunnel to open: what it is for, where it reports, and the slot it holds.
pub struct Request<'a> {
    /// The resource.
    pub resource: &'a Resource,
    /// Its origin group.
    pub group: &'a OriginGroup,
    /// The upgrade request as the origin gets it.
    pub header: RequestHeader,
    /// Who and what the tunnel is for.
    pub info: TunnelInfo,
    /// Where it reports.
    pub report: Reporting,
    /// Its slot, held by the tunnel and given back as soon as the answer is not a 101.
    pub slot: Slot,
    /// The edge's drain, which tells the tunnel to go when it comes to it.
    pub drain: Option<Arc<Drain>>,
    /// For a client on HTTP/2, the `Sec-WebSocket-Key` the edge made for the origin
    /// ([`over_h2::upgrade_request`]).
    pub h2_key: Option<String>,
}

/// Sends the upgrade to the resource's origin group and, on 101, hands the connections to
/// a [`Relay`] of their own. Errors are the client's side failing while the origin's
/// answer is written.
pub async fn open(
    session: &mut Session,
    connector: &Connector,
    tunnel: Request<'_>,
) -> pingora::Result<Outcome> {
    let Request {
        resource: res,
        group,
        header: req,
        info,
        report,
        slot,
        drain,
        h2_key,
    } = tunnel;
    let Some((mut up, server)) = send_upgrade(res, group, connector, req, &info).await else {
        return Ok(Outcome::Failed(Answer::OriginUnreachable));
    };
    let resp = match read_answer(session, &mut up, res, server).await? {
        Ok(resp) => resp,
        Err(answer) => return Ok(Outcome::Failed(answer)),
    };
    // Over HTTP/2 a 2xx to the CONNECT would tell the client its tunnel is open (RFC 8441
    // §5): an origin that answers the upgrade with a page must not pass for one.
    if h2_key.is_some() && resp.status.is_success() {
        log::warn!(
            "resource {}: origin {server} answered the upgrade with {} instead of 101",
            res.name,
            resp.status.as_u16()
        );
        return Ok(Outcome::Failed(Answer::OriginInvalid));
    }
    if resp.status.as_u16() != 101 {
        // Not a tunnel: its slot is free now, and the answer is passed on within bounds.
        drop(slot);
        let status = resp.status.as_u16();
        // Boxed, as every path off the 101's: a future kept inline makes every handshake's
        // larger, and each move of it costs a copy of its size.
        Box::pin(pass_answer(
            session,
            &mut up,
            resp,
            res.websocket.handshake_timeout,
        ))
        .await?;
        return Ok(Outcome::Refused(status));
    }
    // RFC 6455 §4.1: a 101 that does not switch to websocket is not a WebSocket answer;
    // relaying it would hand the client a connection in an unknown protocol.
    if !has_token(&resp.headers, http::header::UPGRADE, "websocket") {
        log::warn!(
            "resource {}: origin {server} answered 101 without Upgrade: websocket",
            res.name
        );
        return Ok(Outcome::Failed(Answer::OriginInvalid));
    }
    // For an HTTP/2 client the edge made the key: the answer must be to it (else 502,
    // nothing sent to the client), and the client gets `200` on its stream.
    let answer = match &h2_key {
        None => resp,
        Some(key) if over_h2::accepts(&resp, key) => over_h2::answer(&resp)?,
        Some(_) => {
            log::warn!(
                "resource {}: origin {server} answered 101 with a wrong Sec-WebSocket-Accept",
                res.name
            );
            return Ok(Outcome::Failed(Answer::OriginInvalid));
        }
    };
    session.write_response_header(answer, false).await?;

    let (detachable, tls) = (info.detachable, info.tls);
    let mut guard = TunnelGuard::new(info, report, slot, server);
    let idle = res.websocket.idle_timeout;
    if h2_key.is_some() {
        // The stream is relayed like a socket and ended with END_STREAM, in the stream's
        // own task (see `Outcome::Streaming`).
        let Some(client) = take_h2(session) else {
            // An HTTP/2 session whose response stream is gone: not reached.
            guard.finish(CloseReason::Error, Default::default());
            return Ok(Outcome::Opened);
        };
        let (origin, from_origin) = origin_stream(up, idle);
        let early = [None, from_origin];
        let relay = Relay::new(
            client,
            origin,
            &res.websocket,
            guard,
            early,
            true,
            drain.as_ref(),
        );
        return Ok(Outcome::Streaming(Box::pin(relay)));
    }
    let Some((client, from_client)) = take_client(session) else {
        // Not an HTTP/1 session (HTTP/2 clients came with a key): not reached.
        guard.finish(CloseReason::Error, Default::default());
        return Ok(Outcome::Opened);
    };
    let (origin, from_origin) = origin_stream(up, idle);
    let client = match detachable {
        true => detach(client),
        false => client,
    };
    crate::os::set_user_timeout(&*client, idle);
    // The tunnel runs as a task of its own; Pingora's request state ends here. A TLS
    // client is sent its close_notify when the tunnel ends.
    tokio::spawn(Relay::new(
        client,
        origin,
        &res.websocket,
        guard,
        [from_client, from_origin],
        tls,
        drain.as_ref(),
    ));
    Ok(Outcome::Opened)
}

/// The origin's connection after its 101 (with `TCP_USER_TIMEOUT` at the idle timeout),
/// with what it sent after the answer that the session already holds (taken without
/// reading the socket).
fn origin_stream(mut up: OriginSession, idle: Duration) -> (Stream, Option<Bytes>) {
    up.read_timeout = None;
    BareTcp::set_quiet(up.stream(), true);
    let from_origin = poll_preread(up.read_body_bytes());
    let origin = up.into_inner();
    BareTcp::set_quiet(&origin, false);
    crate::os::set_user_timeout(&*origin, idle);
    (origin, from_origin)
}

/// Sends the upgrade to the group's servers (healthy primaries, then backups), each once,
/// until one takes it; a server that refuses or cannot be reached costs no more than its
/// connect attempt.
async fn send_upgrade(
    res: &Resource,
    group: &OriginGroup,
    connector: &Connector,
    req: RequestHeader,
    info: &TunnelInfo,
) -> Option<(OriginSession, SocketAddr)> {
    let mut tried = Vec::with_capacity(group.size());
    // Copied for each server but the last one the group can give (usually the first).
    let mut req = Some(Box::new(req));
    while let Some(server) = group.next(info.client_ip, &tried) {
        tried.push(server);
        let this = match tried.len() < group.size() {
            true => req.clone(),
            false => req.take(),
        };
        let Some(this) = this else { break };
        match connect(res, server, info, connector).await {
            Ok(mut up) => match up.write_request_header(this).await {
                Ok(_) => return Some((up, server)),
                Err(e) => log::warn!(
                    "resource {}: origin {server}: sending the upgrade: {e}",
                    res.name
                ),
            },
            Err(e) => log::warn!("resource {}: origin {server}: {e}", res.name),
        }
    }
    None
}

/// The origin's final answer to the upgrade, read within the handshake timeout; interim
/// 1xx answers (103 Early Hints, a 100 Continue) are forwarded on the way, as RFC 9110
/// §15.2 asks of a proxy. `Err` is a failure of the client's side; `Ok(Err)` the edge's
/// answer for an origin that failed.
async fn read_answer(
    session: &mut Session,
    up: &mut OriginSession,
    res: &Resource,
    server: SocketAddr,
) -> pingora::Result<Result<Box<ResponseHeader>, Answer>> {
    let deadline = std::time::Instant::now() + res.websocket.handshake_timeout;
    loop {
        let resp = match until(deadline, up.read_resp_header_parts()).await {
            Err(_) => return Ok(Err(Answer::OriginTimeout)),
            Ok(Err(e)) => {
                log::warn!(
                    "resource {}: origin {server}: reading the upgrade answer: {e}",
                    res.name
                );
                return Ok(Err(Answer::OriginUnreachable));
            }
            Ok(Ok(resp)) => resp,
        };
        if !resp.status.is_informational() || resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(Ok(resp));
        }
        match until(deadline, session.write_response_header(resp, false)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Err(Answer::OriginTimeout)),
        }
    }
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
        // Boxed: the TLS connect's future is about 10 KB, which a plain origin's
        // handshake would otherwise carry (and copy) too.
        return match Box::pin(connector.get_http_session(&peer)).await {
            Ok((up, _reused)) => Ok(up),
            Err(e) => Err(e.to_string()),
        };
    }
    let limit = res.origin.connect_timeout;
    let tcp = match within(limit, TcpStream::connect(server)).await {
        Err(_) => return Err(format!("connect timed out after {limit:?}")),
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Ok(Ok(tcp)) => tcp,
    };
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    Ok(OriginSession::new(Box::new(BareTcp::new(tcp))))
}
