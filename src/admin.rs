//! The admin listener: `GET /healthz`, `GET /metrics`, `GET /stats`, `POST /reload`.
//! Loopback by default.

use crate::access_log::{json_str, parse_rfc3339, rfc3339};
use crate::reload::Reloader;
use crate::stats::{EdgeStats, Granularity};
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The admin HTTP app.
pub struct Admin {
    /// Counters to show.
    pub stats: Arc<EdgeStats>,
    /// The reloader behind `/reload`.
    pub reloader: Arc<Reloader>,
}

const ROUTES: &str = "GET /healthz, GET /metrics, GET /stats, POST /reload\n";

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
        reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            self.stats.prometheus_text(),
        )
    }
}

/// The answer to `/stats?resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d`.
pub fn stats_response(stats: &EdgeStats, query: Option<&str>) -> Response<Vec<u8>> {
    let usage = "use /stats?resource=NAME&from=RFC3339&to=RFC3339&granularity=5m|1h|1d, like /stats?resource=chat&from=2026-11-22T00:00:00Z&to=2026-11-23T00:00:00Z&granularity=1h";
    let bad = |why: String| {
        let mut b = String::from("{\"error\":");
        json_str(&mut b, &format!("{why}; {usage}"));
        b.push_str("}\n");
        reply(StatusCode::BAD_REQUEST, "application/json", b)
    };
    let (mut resource, mut from, mut to, mut granularity) = (None, None, None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = v
            .replace("%3A", ":")
            .replace("%3a", ":")
            .replace("%2B", "+")
            .replace("%2b", "+");
        match k {
            "resource" => resource = Some(v),
            "from" => from = Some(v),
            "to" => to = Some(v),
            "granularity" => granularity = Some(v),
            other => return bad(format!("unknown parameter \"{other}\"")),
        }
    }
    let Some(resource) = resource else {
        return bad("resource is missing".into());
    };
    let Some(g) = granularity.as_deref().and_then(Granularity::parse) else {
        return bad(format!(
            "granularity {granularity:?} is not one of 5m, 1h, 1d"
        ));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (width, len) = g.shape();
    let parse = |name: &str, v: Option<String>, default: u64| match v {
        None => Ok(default),
        Some(v) => parse_rfc3339(&v).ok_or_else(|| format!("{name}={v} is not an RFC 3339 time")),
    };
    let to = match parse("to", to, now) {
        Ok(t) => t,
        Err(e) => return bad(e),
    };
    let from = match parse("from", from, to.saturating_sub(width * len as u64)) {
        Ok(t) => t,
        Err(e) => return bad(e),
    };
    if from >= to {
        return bad("from must be before to".into());
    }
    let Some(buckets) = stats.query(&resource, from, to, g) else {
        return reply(
            StatusCode::NOT_FOUND,
            "application/json",
            format!(
                "{{\"error\":\"no resource named {}\"}}\n",
                resource.escape_default()
            ),
        );
    };
    let mut b = String::with_capacity(64 + buckets.len() * 256);
    b.push_str("{\"resource\":");
    json_str(&mut b, &resource);
    let _ = write!(
        b,
        ",\"granularity\":\"{}\",\"from\":",
        granularity.unwrap_or_default()
    );
    json_str(&mut b, &rfc3339(UNIX_EPOCH + Duration::from_secs(from)));
    b.push_str(",\"to\":");
    json_str(&mut b, &rfc3339(UNIX_EPOCH + Duration::from_secs(to)));
    b.push_str(",\"buckets\":[");
    for (i, k) in buckets.iter().enumerate() {
        if i > 0 {
            b.push(',');
        }
        b.push_str("{\"start\":");
        json_str(&mut b, &rfc3339(UNIX_EPOCH + Duration::from_secs(k.start)));
        let _ = write!(
            b,
            ",\"bytes_client_to_origin\":{},\"bytes_origin_to_client\":{},\"bandwidth_avg_bps\":{},\"bandwidth_peak_bps\":{},\"tunnels_opened\":{},\"tunnels_open_peak\":{},\"status\":{{",
            k.bytes_client_to_origin,
            k.bytes_origin_to_client,
            k.avg_bps(),
            k.peak_bps,
            k.tunnels_opened,
            k.tunnels_open_peak
        );
        for (j, (code, n)) in k.codes.iter().enumerate() {
            let _ = write!(b, "{}\"{code}\":{n}", if j > 0 { "," } else { "" });
        }
        b.push_str("}}");
    }
    b.push_str("]}\n");
    reply(StatusCode::OK, "application/json", b)
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (method, path) = (req.method.clone(), req.uri.path());
        match (method, path) {
            (Method::GET, "/healthz") => self.healthz(),
            (Method::GET, "/metrics") => self.metrics(),
            (Method::GET, "/stats") => stats_response(&self.stats, req.uri.query()),
            (Method::POST, "/reload") => self.reload(),
            (_, "/healthz" | "/metrics" | "/stats" | "/reload") => {
                reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", ROUTES.into())
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", ROUTES.into()),
        }
    }
}
