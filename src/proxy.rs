//! [`EdgeProxy`]: wsedge's `ProxyHttp`. Each hook delegates to a module: routing, the
//! handshake checks, the gate, the origin, the tunnel, the counters.

use crate::access_log::{AccessLog, JsonLine};
use crate::config::Resource;
use crate::handshake::{self, Reject};
use crate::limits::{client_key, Full, Slot};
use crate::origin;
pub use crate::routing::Resources;
use crate::routing::Site;
use crate::stats::EdgeStats;
use crate::tunnel::{self, Outcome, Reporting, TunnelInfo};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Read and write timeout for plain HTTP requests towards the client and the origin.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// wsedge's proxy logic, usable as the `ProxyHttp` of any Pingora HTTP proxy service.
pub struct EdgeProxy {
    resources: Resources,
    stats: Arc<EdgeStats>,
    log: Arc<AccessLog>,
    metrics: bool,
    connector: Connector,
    unbuffered_listeners: bool,
}

/// Per-request state.
pub struct RequestCtx {
    /// The resource the Host matched, fixed for the whole request (a reload does not
    /// change what an open tunnel runs with).
    pub site: Option<Arc<Site>>,
    /// Whether the request asked for an upgrade.
    upgrade: bool,
    /// The Host (or `:authority`) is missing, repeated or not a host name: answer 400.
    bad_host: bool,
    /// A tunnel was opened (it logs itself).
    tunnel: bool,
    /// Origin servers tried for a plain request (each once, but for a retry on a fresh
    /// connection after a pooled one turned out closed).
    tried: Vec<std::net::SocketAddr>,
    /// The last attempt failed on a pooled connection the origin had closed: try the same
    /// server again on another connection.
    retry_same: bool,
    started: Instant,
    received: SystemTime,
}

impl RequestCtx {
    /// The matched resource.
    pub fn resource(&self) -> Option<&Arc<Resource>> {
        self.site.as_ref().map(|s| &s.resource)
    }
}

impl EdgeProxy {
    /// A proxy serving `resources` (built with [`crate::resources`] over the same `stats`),
    /// counting into `stats`, with per-chunk metrics and access lines to stdout.
    pub fn new(resources: Resources, stats: Arc<EdgeStats>) -> EdgeProxy {
        EdgeProxy {
            resources,
            stats,
            log: Arc::new(AccessLog::off()),
            metrics: true,
            connector: Connector::new(None),
            unbuffered_listeners: false,
        }
    }

    /// Writes access lines to `log` (by default there is none).
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> EdgeProxy {
        self.log = log;
        self
    }

    /// Turns per-chunk metrics (and frame parsing) on or off.
    pub fn with_metrics(mut self, on: bool) -> EdgeProxy {
        self.metrics = on;
        self
    }

    /// Declares that the service's listeners have no L4 read buffer
    /// (`L4BufferSettings::read(0)`, as `wsedge` sets them). A tunnel may then take a
    /// plain TCP client socket out of Pingora's stream wrapper, which saves about 0.9 KiB
    /// per open tunnel; with a read buffer, bytes could be left in it, so by default the
    /// wrapper stays.
    pub fn with_unbuffered_listeners(mut self, on: bool) -> EdgeProxy {
        self.unbuffered_listeners = on;
        self
    }

    /// The table the proxy serves from; store a new [`Router`] in it to reload.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The counters this proxy keeps.
    pub fn stats(&self) -> &Arc<EdgeStats> {
        &self.stats
    }

    /// Whether a request for `site` may be served on this TLS connection: the connection
    /// is bound to the resource its SNI routes to (no domain fronting across customers,
    /// RFC 9110 §15.5.20). A client that sent no SNI got the default certificate, and only
    /// the Hosts that certificate is valid for are served on its connection.
    fn bound_to_connection(&self, session: &Session, site: &Site) -> bool {
        let router = self.resources.load();
        match sni_of(session) {
            // Resource names are unique: a reload since routing keeps the binding.
            Some(sni) => router
                .find(&sni)
                .is_some_and(|s| s.resource.name == site.resource.name),
            None => router
                .default_certificate()
                .is_some_and(|c| c.covers(client_host(session.req_header()))),
        }
    }

    /// The gate for an upgrade: policy (enabled, path), the RFC 6455 checks, the Origin,
    /// the client's handshake rate and a tunnel slot (resource and client). Returns the
    /// normal path to send on and the slot.
    fn admit(&self, session: &Session, site: &Site) -> std::result::Result<(String, Slot), Reject> {
        let req = session.req_header();
        let ws = &site.resource.websocket;
        let path = crate::gate::check(&site.resource, req.uri.path())?.into_owned();
        handshake::check(req)?;
        let origin = req.headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
        crate::gate::check_origin(&site.resource, origin)?;
        let key = client_ip(session).map(|ip| client_key(ip, self.resources.load().ipv6_prefix()));
        if let (Some(rate), Some(key)) = (ws.handshake_rate, key) {
            site.stats
                .limits
                .rates()
                .try_take(key, rate)
                .map_err(|wait| Reject::RateLimited(wait.as_secs_f64().ceil() as u64))?;
        }
        let per_client = key.zip(ws.max_connections_per_ip);
        let slot =
            Slot::reserve(&site.stats.limits, ws.max_connections, per_client).map_err(|full| {
                match full {
                    Full::Resource => Reject::OverCapacity,
                    Full::Client => Reject::ClientOverCapacity,
                }
            })?;
        Ok((path, slot))
    }

    /// Opens the tunnel of an upgrade the gate allowed, for the checked (normal) `path`,
    /// and answers for the origin when it fails.
    async fn tunnel(
        &self,
        session: &mut Session,
        site: &Arc<Site>,
        ctx: &mut RequestCtx,
        slot: Slot,
        path: &str,
    ) -> Result<()> {
        let res = &site.resource;
        let mut up_req = session.req_header().clone();
        // What the origin gets is what the gate checked.
        let target = match session.req_header().uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        if up_req.uri.path() != path || up_req.uri.authority().is_some() {
            let uri = target
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "normal path", e))?;
            up_req.set_uri(uri);
        }
        origin_request(&mut up_req, res, session)?;
        let info = TunnelInfo {
            resource: res.name.clone(),
            client: client_addr(session),
            host: client_host(session.req_header()).to_string(),
            path: target,
            client_ip: client_ip(session),
            tls: client_tls(session),
            detachable: self.unbuffered_listeners,
        };
        let report = Reporting {
            site: site.stats.clone(),
            log: self.log.clone(),
            metrics: self.metrics,
        };
        let outcome = tunnel::run(
            session,
            res,
            &site.group,
            &self.connector,
            up_req,
            info,
            report,
            slot,
        )
        .await?;
        let (outcome, answer): (&str, Option<(u16, &'static str)>) = match outcome {
            Outcome::Unreachable => (
                "origin_unreachable",
                Some((502, "The origin could not be reached.\n")),
            ),
            Outcome::BadUpgradeAnswer => (
                "origin_invalid",
                Some((502, "The origin gave an invalid answer.\n")),
            ),
            Outcome::HandshakeTimeout => (
                "origin_timeout",
                Some((504, "The origin did not answer in time.\n")),
            ),
            Outcome::Refused(status) => {
                log::info!(
                    "resource {}: origin refused the upgrade with {status}",
                    res.name
                );
                ("origin_refused", None)
            }
            Outcome::Opened => {
                // Counted as an `ok` handshake when its 101 went out.
                ctx.tunnel = true;
                return Ok(());
            }
        };
        site.stats.handshake(outcome);
        if let Some((status, body)) = answer {
            respond_text(session, status, body, true, &[]).await?;
        }
        Ok(())
    }
}

/// The Host a request is for (the Host header, else the `:authority` or absolute-form
/// target's authority), checked: exactly one Host header at most, agreeing with the
/// authority when both are there (RFC 9112 §3.2.2, RFC 9113 §8.3.1), and a valid host name
/// or address ([`crate::routing::valid_host`]). An HTTP/1.1 request without any gets an
/// error (RFC 9112 §3.2); an HTTP/1.0 request without one is for the empty host (404).
fn checked_host(req: &RequestHeader) -> std::result::Result<&str, ()> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(()),
        (Some(h), None) => Some(h.to_str().map_err(|_| ())?),
        (None, None) => None,
    };
    let authority = req.uri.authority().map(|a| a.as_str());
    let value = match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => return Err(()),
        (Some(h), _) => h,
        (None, Some(a)) => a,
        (None, None) if req.version == http::Version::HTTP_10 => return Ok(""),
        (None, None) => return Err(()),
    };
    crate::routing::valid_host(value).ok_or(())
}

/// The client's Host (or HTTP/2 :authority), without port.
fn client_host(req: &RequestHeader) -> &str {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    crate::routing::strip_port(host)
}

/// The SNI the client's TLS connection asked for, if any.
fn sni_of(session: &Session) -> Option<String> {
    let ssl = session.digest()?.ssl_digest.as_ref()?;
    ssl.extension.get::<crate::tls::Sni>().map(|s| s.0.clone())
}

/// The client's address, for logs.
fn client_addr(session: &Session) -> String {
    session
        .client_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// The client's IP address.
fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Whether the client came over TLS.
fn client_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Writes a short plain-text answer of the edge's own for a rejected request.
async fn respond(session: &mut Session, reject: Reject, upgrade: bool) -> Result<()> {
    let retry;
    let extra: &[(&str, &str)] = match reject {
        // RFC 6455 §4.2.2: a version mismatch tells the client which version to use.
        Reject::UnsupportedVersion => &[("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")],
        Reject::RateLimited(secs) => {
            retry = secs.max(1).to_string();
            &[("Retry-After", retry.as_str())]
        }
        // Tunnels end at their own pace; a few seconds spreads the retries out.
        Reject::OverCapacity | Reject::ClientOverCapacity => &[("Retry-After", "5")],
        _ => &[],
    };
    // A client that asked to leave HTTP on this connection does not keep it for more.
    respond_text(session, reject.status(), reject.body(), upgrade, extra).await
}

/// Writes `status` with a plain-text `body`, closing the connection after it if `close`.
async fn respond_text(
    session: &mut Session,
    status: u16,
    body: &'static str,
    close: bool,
    extra: &[(&str, &str)],
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
    resp.insert_header("Content-Type", "text/plain; charset=utf-8")?;
    resp.insert_header("Content-Length", body.len().to_string())?;
    for (name, value) in extra {
        resp.insert_header(name.to_string(), *value)?;
    }
    if close {
        resp.insert_header("Connection", "close")?;
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await
}

/// Adds the usual proxy headers: the client's address and scheme.
fn add_forwarded(req: &mut RequestHeader, session: &Session) -> Result<()> {
    if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
        let ip = addr.ip().to_string();
        let xff = match req
            .headers
            .get("X-Forwarded-For")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        req.insert_header("X-Forwarded-For", xff)?;
    }
    let proto = if client_tls(session) { "https" } else { "http" };
    req.insert_header("X-Forwarded-Proto", proto)?;
    Ok(())
}

/// The request as the origin gets it: Host rewritten if the resource says so.
fn origin_request(req: &mut RequestHeader, res: &Resource, session: &Session) -> Result<()> {
    if let Some(host) = &res.origin.host {
        req.insert_header(http::header::HOST, host.as_str())?;
    }
    add_forwarded(req, session)
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            site: None,
            upgrade: false,
            bad_host: false,
            tunnel: false,
            tried: Vec::new(),
            retry_same: false,
            started: Instant::now(),
            received: SystemTime::now(),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let req = session.req_header();
        ctx.upgrade = handshake::is_upgrade(req);
        match checked_host(req) {
            Ok(host) => ctx.site = self.resources.load().find(host).cloned(),
            Err(()) => ctx.bad_host = true,
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(site) = ctx.site.clone() else {
            // Not an open proxy: a Host that is not a host name, or that no resource
            // serves, never leads anywhere.
            let reject = match ctx.bad_host {
                true => Reject::BadHost,
                false => Reject::UnknownHost,
            };
            self.stats.refused_unrouted(reject, ctx.upgrade);
            respond(session, reject, ctx.upgrade).await?;
            return Ok(true);
        };
        if client_tls(session) && !self.bound_to_connection(session, &site) {
            if ctx.upgrade {
                site.stats.handshake(Reject::Misdirected.outcome());
            }
            respond(session, Reject::Misdirected, ctx.upgrade).await?;
            return Ok(true);
        }
        if !ctx.upgrade {
            session.set_read_timeout(Some(HTTP_TIMEOUT));
            session.set_write_timeout(Some(HTTP_TIMEOUT));
            return Ok(false);
        }
        let (path, slot) = match self.admit(session, &site) {
            Ok(admitted) => admitted,
            Err(reject) => {
                site.stats.handshake(reject.outcome());
                respond(session, reject, true).await?;
                return Ok(true);
            }
        };
        self.tunnel(session, &site, ctx, slot, &path).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let site = ctx
            .site
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no resource in context"))?;
        let server = match (std::mem::take(&mut ctx.retry_same), ctx.tried.last()) {
            (true, Some(&last)) => last,
            _ => {
                let Some(server) = site.group.next(client_ip(session), &ctx.tried) else {
                    // Every server of the group failed: the origin's fault (502).
                    return Err(Error::explain(
                        ErrorType::ConnectNoRoute,
                        "no origin server left to try",
                    )
                    .into_up());
                };
                ctx.tried.push(server);
                server
            }
        };
        let mut peer = origin::peer(
            &site.resource,
            server,
            client_tls(session),
            client_host(session.req_header()),
        );
        peer.options.read_timeout = Some(HTTP_TIMEOUT);
        peer.options.write_timeout = Some(HTTP_TIMEOUT);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Try another server of the group, each once.
        let size = ctx.site.as_ref().map_or(0, |s| s.group.size());
        if ctx.tried.len() < size {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // Pingora's policy: an idempotent request that failed on a reused (pooled)
        // connection is retried. The connection was likely closed by the origin while
        // idle, so the retry goes to the same server, on another connection.
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        ctx.retry_same = client_reused && e.retry();
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(res) = ctx.resource() {
            origin_request(upstream_request, res, session)?;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // A tunnel took the connection out of the session: its answer was the 101.
        let status = match ctx.tunnel {
            true => 101,
            false => session.response_written().map_or(0, |r| r.status.as_u16()),
        };
        if let Some(site) = &ctx.site {
            site.stats.response(status);
        } // else counted by `refused_unrouted` already
          // A tunnel logs itself when it closes (also at shutdown, when this is not called).
        if ctx.tunnel || !self.log.enabled() {
            return;
        }
        let req = session.req_header();
        let line = JsonLine::new(ctx.received)
            .str("kind", "http")
            .str(
                "resource",
                ctx.site.as_ref().map_or("", |s| &s.resource.name),
            )
            .str("client", &client_addr(session))
            .str("host", client_host(req))
            .str("method", req.method.as_str())
            .str("path", req.uri.path_and_query().map_or("/", |p| p.as_str()))
            .num("status", status)
            .num("bytes_client_to_origin", session.body_bytes_read())
            .num("bytes_origin_to_client", session.body_bytes_sent())
            .num("duration_ms", ctx.started.elapsed().as_millis())
            .finish();
        self.log.write(line);
    }
}
