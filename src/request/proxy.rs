//! [`EdgeProxy`]: wsedge's `ProxyHttp`. Each hook is a few lines that delegate: routing
//! (`sites`), the gate (`policy::gate::admit`), the answers (`policy::answer`), the origin
//! (`sites::origin`), the tunnel (`tunnel::open`) and the counters (`observe`).

use super::session::{
    checked_host, client_addr, client_host, client_ip, client_tls, origin_request, respond, sni_of,
};
use crate::config::Resource;
use crate::observe::access_log::{AccessLog, JsonLine};
use crate::observe::analytics::{Feed, RequestRow, Row};
use crate::observe::labels::HandshakeOutcome;
use crate::observe::metrics::EdgeStats;
use crate::policy::answer::Answer;
use crate::policy::drain::Drain;
use crate::policy::gate::{self, Admitted};
use crate::policy::handshake;
use crate::sites::origin;
use crate::sites::router::{SharedRouter, Site};
use crate::tunnel::tally::{Reporting, TunnelInfo};
use crate::tunnel::{self, Outcome};
use async_trait::async_trait;
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Read and write timeout for plain HTTP requests towards the client and the origin.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// wsedge's proxy logic, usable as the `ProxyHttp` of any Pingora HTTP proxy service. A
/// `ProxyHttp` that delegates to it must delegate `logging` too: a WebSocket over HTTP/2
/// (RFC 8441) runs there, after `request_filter` answered its `200`.
pub struct EdgeProxy {
    router: SharedRouter,
    stats: Arc<EdgeStats>,
    log: Arc<AccessLog>,
    metrics: bool,
    connector: Connector,
    unbuffered_listeners: bool,
    drain: Arc<Drain>,
    analytics: Option<Arc<Feed>>,
}

/// Per-request state.
pub struct RequestCtx {
    /// The resource the Host matched, fixed for the whole request (a reload does not
    /// change what an open tunnel runs with).
    site: Option<Arc<Site>>,
    /// Whether the request asked for an upgrade.
    upgrade: bool,
    /// The Host (or `:authority`) is missing, repeated or not a host name: answer 400.
    bad_host: bool,
    /// A tunnel was opened (it logs itself).
    tunnel: bool,
    /// An HTTP/2 stream's tunnel, run by the `logging` hook that follows `request_filter`
    /// (in the stream's task, once `request_filter`'s large future is gone).
    streaming: Option<tunnel::Streaming>,
    /// Origin servers tried for a plain request (each once, but for a retry on a fresh
    /// connection after a pooled one turned out closed).
    tried: Vec<SocketAddr>,
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
    /// A proxy serving `router`, counting into `stats` (the `Lasting` the router was built
    /// with), with per-chunk metrics and no access log.
    pub fn new(router: SharedRouter, stats: Arc<EdgeStats>) -> EdgeProxy {
        EdgeProxy {
            router,
            stats,
            log: Arc::new(AccessLog::off()),
            metrics: true,
            connector: Connector::new(None),
            unbuffered_listeners: false,
            drain: Arc::new(Drain::default()),
            analytics: None,
        }
    }

    /// Hands a row for fleet statistics to `feed` for each plain request and each closed
    /// tunnel (by default there is none).
    pub fn with_analytics(mut self, feed: Option<Arc<Feed>>) -> EdgeProxy {
        self.analytics = feed;
        self
    }

    /// Takes part in `drain`: upgrades are refused (503) while it runs, and tunnels are
    /// told to go when it comes to them. By default the proxy has a drain of its own that
    /// nothing starts.
    pub fn with_drain(mut self, drain: Arc<Drain>) -> EdgeProxy {
        self.drain = drain;
        self
    }

    /// Writes access lines to `log` (by default there is none).
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> EdgeProxy {
        self.log = log;
        self
    }

    /// Turns per-chunk metrics on or off (close reasons and codes are read either way).
    pub fn with_metrics(mut self, on: bool) -> EdgeProxy {
        self.metrics = on;
        self
    }

    /// Declares that the service's listeners have no L4 read buffer
    /// (`L4BufferSettings::read(0)`, as [`crate::Edge`] sets them). A tunnel may then take a
    /// plain TCP client socket out of Pingora's stream wrapper, which saves about 0.9 KiB
    /// per open tunnel; with a read buffer, bytes could be left in it, so by default the
    /// wrapper stays.
    pub fn with_unbuffered_listeners(mut self, on: bool) -> EdgeProxy {
        self.unbuffered_listeners = on;
        self
    }

    /// Whether a request for `site` may be served on this TLS connection: the connection
    /// is bound to the resource its SNI routes to (no domain fronting across customers,
    /// RFC 9110 §15.5.20). A client that sent no SNI got the default certificate, and only
    /// the Hosts that certificate is valid for are served on its connection.
    fn bound_to_connection(&self, session: &Session, site: &Site) -> bool {
        let router = self.router.load();
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

    /// Opens the tunnel of an upgrade the gate admitted, for the checked (normal) path, and
    /// answers for the origin when it fails.
    async fn open_tunnel(
        &self,
        session: &mut Session,
        site: &Arc<Site>,
        ctx: &mut RequestCtx,
        admitted: Admitted,
    ) -> Result<()> {
        let res = &site.resource;
        let mut header = session.req_header().clone();
        // An HTTP/2 client's extended CONNECT goes to the origin as an HTTP/1.1 upgrade,
        // with a key of the edge's own.
        let h2 = handshake::is_extended_connect(&header);
        let h2_key = match h2 {
            true => Some(tunnel::over_h2::upgrade_request(&mut header)?),
            false => None,
        };
        // What the origin gets is what the gate checked.
        let target = match session.req_header().uri.query() {
            Some(q) => format!("{}?{q}", admitted.path),
            None => admitted.path,
        };
        let as_checked = header.uri.path_and_query().map(|p| p.as_str()) == Some(target.as_str());
        if !as_checked || header.uri.authority().is_some() {
            let uri = target
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "normal path", e))?;
            header.set_uri(uri);
        }
        origin_request(&mut header, res, session)?;
        let request = tunnel::Request {
            resource: res,
            group: &site.group,
            header,
            info: TunnelInfo {
                resource: res.name.clone(),
                client: client_addr(session),
                host: client_host(session.req_header()).to_string(),
                path: target,
                client_ip: client_ip(session),
                tls: client_tls(session),
                detachable: self.unbuffered_listeners,
                h2,
            },
            report: Reporting {
                site: site.stats.clone(),
                log: self.log.clone(),
                metrics: self.metrics,
                analytics: self.analytics.clone(),
            },
            slot: admitted.slot,
            drain: Some(self.drain.clone()),
            h2_key,
        };
        match tunnel::open(session, &self.connector, request).await? {
            // Counted as an `ok` handshake when its 101 went out; it logs itself.
            Outcome::Opened => {
                ctx.tunnel = true;
                site.stats.response(101);
            }
            // An HTTP/2 stream's tunnel runs in the stream's task, which keeps its
            // connection from being closed as idle while it lasts: in `logging`, which
            // Pingora calls right after this hook returns.
            Outcome::Streaming(relay) => {
                ctx.tunnel = true;
                site.stats.response(200);
                ctx.streaming = Some(relay);
            }
            Outcome::Refused(status) => {
                log::info!(
                    "resource {}: origin refused the upgrade with {status}",
                    res.name
                );
                site.stats.handshake(HandshakeOutcome::OriginRefused);
            }
            Outcome::Failed(answer) => {
                site.stats.handshake(answer.outcome());
                Box::pin(respond(session, answer, true)).await?;
            }
        }
        Ok(())
    }

    /// The access line of a plain request.
    fn log_request(&self, session: &Session, ctx: &RequestCtx, status: u16) {
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
            .str("protocol", protocol(session))
            .num("bytes_client_to_origin", session.body_bytes_read())
            .num("bytes_origin_to_client", session.body_bytes_sent())
            .num("duration_ms", ctx.started.elapsed().as_millis())
            .finish();
        self.log.write(line);
    }
}

/// The client's HTTP version, for the access log.
fn protocol(session: &Session) -> &'static str {
    match session.req_header().version {
        http::Version::HTTP_2 => "h2",
        http::Version::HTTP_10 => "http/1.0",
        _ => "http/1.1",
    }
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
            streaming: None,
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
            Ok(host) => ctx.site = self.router.load().find(host).cloned(),
            Err(()) => ctx.bad_host = true,
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let Some(site) = ctx.site.clone() else {
            // Not an open proxy: a Host that is not a host name, or that no resource
            // serves, never leads anywhere.
            let answer = if ctx.bad_host {
                Answer::BadHost
            } else {
                Answer::UnknownHost
            };
            let stats = &self.stats;
            stats.refused_unrouted(answer.status(), answer.outcome(), ctx.upgrade);
            respond(session, answer, ctx.upgrade).await?;
            return Ok(true);
        };
        let admitted = if client_tls(session) && !self.bound_to_connection(session, &site) {
            Err(Answer::Misdirected)
        } else if !ctx.upgrade {
            session.set_read_timeout(Some(HTTP_TIMEOUT));
            session.set_write_timeout(Some(HTTP_TIMEOUT));
            return Ok(false);
        } else {
            let ipv6_prefix = self.router.load().ipv6_prefix();
            let (res, req) = (&site.resource, session.req_header());
            let draining = self.drain.draining();
            gate::admit(
                res,
                &site.limits,
                req,
                client_ip(session),
                ipv6_prefix,
                draining,
            )
        };
        match admitted {
            Ok(admitted) => self.open_tunnel(session, &site, ctx, admitted).await?,
            Err(answer) => {
                if ctx.upgrade {
                    site.stats.handshake(answer.outcome());
                }
                respond(session, answer, ctx.upgrade).await?;
            }
        }
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
                    let e = Error::explain(ErrorType::ConnectNoRoute, "no origin server left");
                    return Err(e.into_up());
                };
                ctx.tried.push(server);
                server
            }
        };
        let (tls, host) = (client_tls(session), client_host(session.req_header()));
        let mut peer = origin::peer(&site.resource, server, tls, host);
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
        let req = session.req_header();
        if !req.method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
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
        match ctx.resource() {
            Some(res) => origin_request(upstream_request, res, session),
            None => Ok(()),
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // A tunnel took the connection (or stream) out of the session; its answer was
        // counted when it went out, and it logs itself when it closes (also at shutdown,
        // when this is not called). An HTTP/2 stream's tunnel runs here: `request_filter`
        // returned, so the stream's task holds this hook's small future (the relay is
        // boxed) instead of that hook's, which is sized for an origin connect (about
        // 12 KB); the stream's task itself is what keeps the connection open.
        if ctx.tunnel {
            if let Some(relay) = ctx.streaming.take() {
                relay.await;
            }
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // Without a resource the refusal was counted when it was made.
        if let Some(site) = &ctx.site {
            site.stats.response(status);
        }
        if self.log.enabled() {
            self.log_request(session, ctx, status);
        }
        if let Some(feed) = &self.analytics {
            let req = session.req_header();
            feed.push(Row::Request(RequestRow {
                ts: ctx.received,
                resource: ctx
                    .site
                    .as_ref()
                    .map_or_else(String::new, |s| s.resource.name.clone()),
                hostname: client_host(req).to_string(),
                method: req.method.as_str().to_string(),
                status,
                client_ip: client_ip(session),
                bytes_in: session.body_bytes_read() as u64,
                bytes_out: session.body_bytes_sent() as u64,
                duration_ms: ctx.started.elapsed().as_millis() as u64,
            }));
        }
    }
}
