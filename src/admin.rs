//! The admin listener: `GET /healthz`, `POST /reload`, `GET /metrics`. Loopback by default.

use crate::access_log::{json_str, rfc3339};
use crate::reload::Reloader;
use crate::stats::EdgeStats;
use crate::tunnel::CloseReason;
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
}

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

impl Admin {
    fn healthz(&self) -> Response<Vec<u8>> {
        let mut b = String::with_capacity(256);
        let _ = write!(
            b,
            "{{\"status\":\"ok\",\"version\":\"{}\",\"uptime_seconds\":{},\"resources\":{},\"tunnels_open\":{},\"last_reload\":",
            env!("CARGO_PKG_VERSION"),
            self.stats.uptime_seconds(),
            self.reloader.resources_count(),
            self.stats.tunnels_open()
        );
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
        reply(StatusCode::OK, "application/json", b)
    }

    fn reload(&self) -> Response<Vec<u8>> {
        let (status, ok, message) = match self.reloader.reload() {
            Ok(m) => (StatusCode::OK, true, m),
            Err(m) => (StatusCode::UNPROCESSABLE_ENTITY, false, m),
        };
        let mut b = format!("{{\"ok\":{ok},\"message\":");
        json_str(&mut b, &message);
        b.push_str("}\n");
        reply(status, "application/json", b)
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        let s = &self.stats;
        let mut b = String::with_capacity(1024);
        b.push_str("# HELP wsedge_ws_tunnels_open Open WebSocket tunnels.\n# TYPE wsedge_ws_tunnels_open gauge\n");
        let _ = writeln!(b, "wsedge_ws_tunnels_open {}", s.tunnels_open());
        b.push_str("# HELP wsedge_ws_closed_total Closed tunnels by reason.\n# TYPE wsedge_ws_closed_total counter\n");
        for r in CloseReason::ALL {
            let _ = writeln!(
                b,
                "wsedge_ws_closed_total{{reason=\"{}\"}} {}",
                r.as_str(),
                s.closed(r)
            );
        }
        let (ok, failed) = s.reloads();
        b.push_str("# HELP wsedge_config_reloads_total Configuration reloads by result.\n# TYPE wsedge_config_reloads_total counter\n");
        let _ = writeln!(b, "wsedge_config_reloads_total{{result=\"ok\"}} {ok}");
        let _ = writeln!(
            b,
            "wsedge_config_reloads_total{{result=\"failed\"}} {failed}"
        );
        reply(StatusCode::OK, "text/plain; version=0.0.4", b)
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path().to_string());
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => self.healthz(),
            (Method::GET, "/metrics") => self.metrics(),
            (Method::POST, "/reload") => self.reload(),
            (_, "/healthz" | "/metrics" | "/reload") => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET /healthz, GET /metrics, POST /reload\n".into(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "GET /healthz, GET /metrics, POST /reload\n".into(),
            ),
        }
    }
}
