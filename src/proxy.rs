//! [`EdgeProxy`]: wsedge's `ProxyHttp`. Each hook delegates to a module: routing, the
//! handshake checks, the gate, the origin, the tunnel.

use crate::config::Resource;
use crate::handshake::{self, Reject};
use crate::origin;
use crate::routing::Router;
use crate::stats::EdgeStats;
use crate::tunnel::{self, Outcome, TunnelInfo};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;
use std::time::Duration;

/// Read and write timeout for plain HTTP requests towards the client and the origin.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// The resource table, swappable as a whole (a reload builds a new [`Router`]).
pub type Resources = Arc<ArcSwap<Router>>;

/// wsedge's proxy logic, usable as the `ProxyHttp` of any Pingora HTTP proxy service.
pub struct EdgeProxy {
    resources: Resources,
    stats: Arc<EdgeStats>,
    connector: Connector,
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    /// The resource the Host matched, fixed for the whole request (a reload does not
    /// change what an open tunnel runs with).
    pub resource: Option<Arc<Resource>>,
    /// Index of the origin server tried for plain HTTP.
    server_index: usize,
}

impl EdgeProxy {
    /// A proxy serving the resources of `resources`.
    pub fn new(resources: Resources) -> EdgeProxy {
        Self::with_stats(resources, Arc::default())
    }

    /// A proxy that counts into `stats` (shared with an admin listener, say).
    pub fn with_stats(resources: Resources, stats: Arc<EdgeStats>) -> EdgeProxy {
        EdgeProxy {
            resources,
            stats,
            connector: Connector::new(None),
        }
    }

    /// The counters this proxy keeps.
    pub fn stats(&self) -> &Arc<EdgeStats> {
        &self.stats
    }

    /// The table the proxy serves from; store a new [`Router`] in it to reload.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }
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

/// Whether the client came over TLS.
fn client_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Writes a short plain-text answer of the edge's own for a rejected request.
async fn respond(session: &mut Session, reject: Reject, upgrade: bool) -> Result<()> {
    // RFC 6455 §4.2.2: a version mismatch tells the client which version to use.
    let extra: &[(&str, &str)] = if reject == Reject::UnsupportedVersion {
        &[("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")]
    } else {
        &[]
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
        RequestCtx::default()
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.resource = self
            .resources
            .load()
            .find(client_host(session.req_header()))
            .cloned();
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let upgrade = handshake::is_upgrade(session.req_header());
        let Some(res) = ctx.resource.clone() else {
            // Not an open proxy: an unknown Host never leads anywhere.
            respond(session, Reject::UnknownHost, upgrade).await?;
            return Ok(true);
        };
        if !upgrade {
            session.set_read_timeout(Some(HTTP_TIMEOUT));
            session.set_write_timeout(Some(HTTP_TIMEOUT));
            return Ok(false);
        }
        let req = session.req_header();
        let verdict = crate::gate::check(&res, req.uri.path()).and_then(|_| handshake::check(req));
        if let Err(reject) = verdict {
            respond(session, reject, true).await?;
            return Ok(true);
        }

        let mut up_req = session.req_header().clone();
        origin_request(&mut up_req, &res, session)?;
        let host = client_host(session.req_header()).to_string();
        let tls = client_tls(session);
        let info = TunnelInfo {
            resource: res.name.clone(),
            client: session
                .client_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            host,
            path: session
                .req_header()
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
        };
        let outcome = tunnel::run(
            session,
            &res,
            &self.connector,
            up_req,
            tls,
            info,
            &self.stats,
        );
        match outcome.await? {
            Outcome::Unreachable => {
                respond_text(
                    session,
                    502,
                    "The origin could not be reached.\n",
                    true,
                    &[],
                )
                .await?
            }
            Outcome::BadUpgradeAnswer => {
                respond_text(
                    session,
                    502,
                    "The origin gave an invalid answer.\n",
                    true,
                    &[],
                )
                .await?
            }
            Outcome::HandshakeTimeout => {
                respond_text(
                    session,
                    504,
                    "The origin did not answer in time.\n",
                    true,
                    &[],
                )
                .await?
            }
            Outcome::Refused(status) => {
                log::info!(
                    "resource {}: origin refused the upgrade with {status}",
                    res.name
                )
            }
            Outcome::Closed(_) => {}
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let res = ctx
            .resource
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no resource in context"))?;
        let server = res.origin.servers[ctx.server_index % res.origin.servers.len()];
        let mut peer = origin::peer(
            res,
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
        // Try the next server of the group, once each.
        let servers = ctx.resource.as_ref().map_or(0, |r| r.origin.servers.len());
        ctx.server_index += 1;
        if ctx.server_index < servers {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(res) = &ctx.resource {
            origin_request(upstream_request, res, session)?;
        }
        Ok(())
    }
}
