//! The admin listener: `GET /healthz`, `GET /metrics`, `GET /stats`, `POST /reload`,
//! `POST /drain` and `POST /drain/cancel`.
//! Loopback by default. A web page must not be able to reach it through the browser of
//! someone on the host: requests that carry a foreign `Origin` (cross-site requests) or a
//! Host that is not an IP address, `localhost` or one of `admin.hostnames` (DNS rebinding)
//! are refused with 403, and with `admin.token_file` set the POST endpoints require
//! `Authorization: Bearer <token>` (else 401).

use super::reload::Reloader;
use crate::observe::access_log::json_str;
use crate::observe::analytics::fleet_stats::FleetStats;
use crate::observe::metrics::EdgeStats;
use crate::observe::stats_api::{error_body, route, Route};
use crate::observe::time::rfc3339;
use crate::policy::drain::{CancelError, Drain, Kind};
use crate::syntax::host::valid_host;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::fmt::Write as _;
use std::sync::Arc;

/// The admin HTTP app.
pub struct Admin {
    /// Counters to show.
    pub stats: Arc<EdgeStats>,
    /// The reloader behind `/reload`.
    pub reloader: Arc<Reloader>,
    /// The edge's drain, behind `/drain` and `/drain/cancel`.
    pub drain: Arc<Drain>,
    /// The fleet's statistics in ClickHouse, behind `/stats` when analytics is configured.
    pub fleet: Option<FleetStats>,
}

const ROUTES: &str =
    "GET /healthz, GET /metrics, GET /stats, POST /reload, POST /drain, POST /drain/cancel\n";

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .header("Cache-Control", "no-store")
        .body(body.into_bytes())
        // Invariant: the status and headers above are all valid.
        .expect("a valid admin response")
}

/// The answer of a POST endpoint: `{"ok":..,"message":".."}`.
fn outcome(status: StatusCode, ok: bool, message: &str) -> Response<Vec<u8>> {
    let mut b = format!("{{\"ok\":{ok},\"message\":");
    json_str(&mut b, message);
    b.push_str("}\n");
    reply(status, "application/json", b)
}

impl Admin {
    /// `/stats`: from the fleet's statistics in ClickHouse, or this edge's windows.
    async fn stats_answer(&self, query: Option<&str>) -> (u16, String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match route(query.unwrap_or(""), self.fleet.is_some(), now) {
            Route::Edge => self.stats.stats_page(query),
            Route::Refused(status, body) => (status, body),
            Route::Fleet(q) => {
                let Some(fleet) = &self.fleet else {
                    return (500, error_body("no fleet statistics"));
                };
                match fleet.answer(&q, now).await {
                    Ok(body) => (200, body),
                    Err((status, why)) => (status, error_body(&why)),
                }
            }
        }
    }

    /// 200 `ok`, or 503 `draining` while a drain runs (a load balancer or a readiness
    /// probe then takes the edge out), with the tunnels still open.
    fn healthz(&self) -> Response<Vec<u8>> {
        let mut b = String::with_capacity(320);
        let order = self.drain.order();
        let _ = write!(
            b,
            "{{\"status\":\"{}\",\"version\":\"{}\",\"uptime_seconds\":{},\"resources\":{},\"tunnels_open\":{},",
            if order.is_some() { "draining" } else { "ok" },
            env!("CARGO_PKG_VERSION"),
            self.stats.uptime_seconds(),
            self.reloader.resources_count(),
            self.stats.tunnels_open()
        );
        match order {
            None => b.push_str("\"drain\":null,"),
            Some(o) => {
                let _ = write!(
                    b,
                    "\"drain\":{{\"by\":\"{}\",\"seconds_since_start\":{:.1},\"spread_seconds\":{:.1},\"close_code\":{}}},",
                    o.kind.as_str(),
                    o.started.elapsed().as_secs_f64(),
                    o.spread.as_secs_f64(),
                    o.close_code
                );
            }
        }
        let source = self.reloader.source();
        let _ = write!(
            b,
            "\"config\":{{\"source\":\"{}\",\"revision\":{},\"applied_at\":",
            source.kind, source.revision
        );
        json_str(&mut b, &rfc3339(source.applied_at));
        let _ = write!(
            b,
            ",\"source_up\":{},\"last_known_good\":{},\"error\":",
            source.up, source.last_known_good
        );
        match &source.error {
            None => b.push_str("null"),
            Some(e) => json_str(&mut b, e),
        }
        b.push_str("},");
        b.push_str("\"last_reload\":");
        match self.reloader.last() {
            None => b.push_str("null"),
            Some(r) => {
                b.push_str("{\"time\":");
                json_str(&mut b, &rfc3339(r.at));
                let _ = write!(b, ",\"ok\":{},\"message\":", r.ok);
                json_str(&mut b, &r.message);
                b.push('}');
            }
        }
        b.push_str("}\n");
        let status = match order {
            None => StatusCode::OK,
            Some(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        reply(status, "application/json", b)
    }

    /// `POST /drain`: every open tunnel is told to go over the spread, upgrades get 503,
    /// `/healthz` 503; the listeners stay open.
    fn drain(&self) -> Response<Vec<u8>> {
        let open = self.stats.tunnels_open();
        let (status, message) = match self.drain.start(Kind::Admin) {
            true => {
                let spread = self.drain.order().map_or(0.0, |o| o.spread.as_secs_f64());
                log::info!("POST /drain: {open} tunnels are told to go over {spread}s");
                (
                    StatusCode::ACCEPTED,
                    format!("draining: {open} tunnels are told to go over {spread}s; upgrades get 503 until POST /drain/cancel"),
                )
            }
            false => (
                StatusCode::OK,
                format!("already draining ({open} tunnels open)"),
            ),
        };
        outcome(status, true, &message)
    }

    /// `POST /drain/cancel`: upgrades are served again; tunnels not yet told stay open.
    fn cancel_drain(&self) -> Response<Vec<u8>> {
        let (status, ok, message) = match self.drain.cancel() {
            Ok(()) => {
                log::info!("POST /drain/cancel: serving upgrades again");
                (
                    StatusCode::OK,
                    true,
                    "drain cancelled: serving upgrades again",
                )
            }
            Err(CancelError::NotDraining) => (StatusCode::CONFLICT, false, "no drain runs"),
            Err(CancelError::Stopping) => (
                StatusCode::CONFLICT,
                false,
                "the process is stopping (SIGTERM or an upgrade): its drain cannot be cancelled",
            ),
        };
        outcome(status, ok, message)
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        let (status, ok, message) = match self.reloader.reload_async().await {
            Ok(m) => (StatusCode::OK, true, m),
            Err(m) => (StatusCode::UNPROCESSABLE_ENTITY, false, m),
        };
        outcome(status, ok, &message)
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            self.stats.prometheus_text(),
        )
    }
}

/// Why an admin request is refused before it is routed.
fn refused(
    req: &pingora::http::RequestHeader,
    policy: &crate::config::Admin,
) -> Option<Response<Vec<u8>>> {
    let forbidden = |why: &str| {
        Some(reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!("{why}\n"),
        ))
    };
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok());
    if let Some(host) = host {
        let name = valid_host(host).map(|h| h.to_ascii_lowercase());
        let ok = name.is_some_and(|h| {
            h == "localhost"
                || h.parse::<std::net::Ipv4Addr>().is_ok()
                || h.starts_with('[')
                || policy.hostnames.contains(&h)
        });
        if !ok {
            return forbidden("This Host is not the admin listener's (an IP address, localhost or admin.hostnames).");
        }
    }
    // Browsers send Origin on cross-site and on scripted requests; the admin endpoints have
    // no pages of their own, so only a same-origin one is let through.
    if let Some(origin) = req.headers.get(http::header::ORIGIN) {
        let same = host.is_some_and(|h| {
            origin
                .as_bytes()
                .eq_ignore_ascii_case(format!("http://{h}").as_bytes())
        });
        if !same {
            return forbidden("Cross-origin requests to the admin listener are refused.");
        }
    }
    if req
        .headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return forbidden("Cross-site requests to the admin listener are refused.");
    }
    None
}

/// Whether `req` carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized(req: &pingora::http::RequestHeader, token: &str) -> bool {
    let Some(given) = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    let want = token.as_bytes();
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let policy = self.reloader.admin();
        if let Some(refusal) = refused(req, &policy) {
            return refusal;
        }
        let (method, path) = (req.method.clone(), req.uri.path());
        if method == Method::POST {
            if let Some(token) = &policy.token {
                if !authorized(req, token) {
                    let mut r = reply(
                        StatusCode::UNAUTHORIZED,
                        "text/plain",
                        "POST endpoints need Authorization: Bearer <the token of admin.token_file>.\n".into(),
                    );
                    r.headers_mut().insert(
                        "WWW-Authenticate",
                        http::HeaderValue::from_static("Bearer realm=\"wsedge admin\""),
                    );
                    return r;
                }
            }
        }
        match (method, path) {
            (Method::GET, "/healthz") => self.healthz(),
            (Method::GET, "/metrics") => self.metrics(),
            (Method::GET, "/stats") => {
                let query = req.uri.query().map(str::to_string);
                let (status, body) = self.stats_answer(query.as_deref()).await;
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                reply(status, "application/json", body)
            }
            (Method::POST, "/reload") => self.reload().await,
            (Method::POST, "/drain") => self.drain(),
            (Method::POST, "/drain/cancel") => self.cancel_drain(),
            (_, "/healthz" | "/metrics" | "/stats" | "/reload" | "/drain" | "/drain/cancel") => {
                reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", ROUTES.into())
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", ROUTES.into()),
        }
    }
}
