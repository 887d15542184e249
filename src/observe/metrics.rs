//! What the edge counts: Prometheus metrics (docs/design.md, "Metrics") and the
//! per-resource time windows behind `/stats`. On the per-chunk path a tunnel only adds to
//! counters it resolved when it opened (one atomic add each); everything else happens once
//! per request, once per tunnel, or once a second ([`EdgeStats::tick`]).

use super::access_log::json_str;
use super::labels::{CloseReason, HandshakeOutcome, HeartbeatResult};
use super::windows::{BucketView, Granularity, Sample, Windows};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The Prometheus metric families, registered in one registry.
#[derive(Debug, Clone)]
struct Families {
    handshakes: IntCounterVec,
    tunnels_open: IntGaugeVec,
    tunnel_seconds: HistogramVec,
    bytes: IntCounterVec,
    messages: IntCounterVec,
    closed: IntCounterVec,
    heartbeats: IntCounterVec,
    drained: IntCounterVec,
    http_responses: IntCounterVec,
    reloads: IntCounterVec,
    access_log_dropped: IntCounter,
    config_revision: IntGauge,
    config_applied: IntGauge,
    config_source_up: IntGauge,
}

impl Families {
    fn new(registry: &Registry) -> prometheus::Result<Families> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let tunnels_open = IntGaugeVec::new(
            Opts::new("wsedge_ws_tunnels_open", "WebSocket tunnels open now."),
            &["resource"],
        )?;
        registry.register(Box::new(tunnels_open.clone()))?;
        let tunnel_seconds = HistogramVec::new(
            HistogramOpts::new("wsedge_ws_tunnel_seconds", "How long tunnels stayed open.")
                .buckets(vec![
                    1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0,
                ]),
            &["resource"],
        )?;
        registry.register(Box::new(tunnel_seconds.clone()))?;
        let access_log_dropped = IntCounter::new(
            "wsedge_access_log_dropped_total",
            "Access-log lines dropped because the log's reader or disk did not keep up.",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        registry.register(Box::new(super::access_log::error_log_dropped().clone()))?;
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Families {
            config_revision: gauge(
                "wsedge_config_revision",
                "The etcd revision of the configuration being served (0 without etcd).",
            )?,
            config_applied: gauge(
                "wsedge_config_applied_timestamp_seconds",
                "When the configuration being served was applied (Unix time).",
            )?,
            config_source_up: gauge(
                "wsedge_config_source_up",
                "1 while the edge is connected to etcd and watching it, 0 when not (always 1 without etcd).",
            )?,
            access_log_dropped,
            handshakes: counter(
                "wsedge_ws_handshakes_total",
                "WebSocket upgrade requests by outcome.",
                &["resource", "outcome"],
            )?,
            tunnels_open,
            tunnel_seconds,
            bytes: counter(
                "wsedge_ws_bytes_total",
                "Bytes relayed through tunnels after the 101.",
                &["resource", "direction"],
            )?,
            messages: counter(
                "wsedge_ws_messages_total",
                "WebSocket data messages relayed.",
                &["resource", "direction"],
            )?,
            closed: counter(
                "wsedge_ws_closed_total",
                "Tunnels closed, by reason.",
                &["resource", "reason"],
            )?,
            heartbeats: counter(
                "wsedge_ws_heartbeats_total",
                "The edge's heartbeat pings on tunnels, by peer and result.",
                &["resource", "peer", "result"],
            )?,
            drained: counter(
                "wsedge_ws_drained_total",
                "Tunnels told to go by a drain (shutdown, upgrade or POST /drain).",
                &["resource"],
            )?,
            http_responses: counter(
                "wsedge_http_responses_total",
                "Responses sent to clients, by status code.",
                &["resource", "code"],
            )?,
            reloads: counter(
                "wsedge_config_reloads_total",
                "Configuration reloads by result.",
                &["result"],
            )?,
        })
    }
}

/// Status codes counted one by one in `/stats`; others are counted by class (`2xx`...).
pub const TRACKED_CODES: [u16; 20] = [
    101, 200, 204, 206, 301, 302, 304, 400, 401, 403, 404, 421, 426, 429, 431, 500, 501, 502, 503,
    504,
];
pub(crate) const CODE_SLOTS: usize = TRACKED_CODES.len() + 5;

fn code_slot(code: u16) -> usize {
    match TRACKED_CODES.iter().position(|&c| c == code) {
        Some(i) => i,
        None => TRACKED_CODES.len() + (code / 100).clamp(1, 5) as usize - 1,
    }
}

/// The label of a status slot in `/stats`.
pub(crate) fn slot_label(i: usize) -> String {
    if i < TRACKED_CODES.len() {
        TRACKED_CODES[i].to_string()
    } else {
        format!("{}xx", i - TRACKED_CODES.len() + 1)
    }
}

/// Counters of one resource, resolved once so the hot path never looks up a label.
#[derive(Debug)]
pub struct ResourceStats {
    name: String,
    families: Families,
    /// Bytes client → origin.
    pub bytes_c2o: IntCounter,
    /// Bytes origin → client.
    pub bytes_o2c: IntCounter,
    /// Data messages client → origin.
    pub messages_c2o: IntCounter,
    /// Data messages origin → client.
    pub messages_o2c: IntCounter,
    tunnels_open: IntGauge,
    tunnel_seconds: Histogram,
    /// `wsedge_ws_handshakes_total{outcome="ok"}`, which is also "tunnels opened".
    handshakes_ok: IntCounter,
    /// `wsedge_http_responses_total` of the tracked codes, resolved on first use so a
    /// request does not look up a label (or format its code) to count itself.
    response_counters: [OnceLock<IntCounter>; TRACKED_CODES.len()],
    codes: [AtomicU64; CODE_SLOTS],
    windows: Mutex<Windows>,
}

impl ResourceStats {
    /// Counts a refused upgrade request's outcome (a 101 is counted by
    /// [`Self::tunnel_opened`]).
    pub fn handshake(&self, outcome: HandshakeOutcome) {
        self.families
            .handshakes
            .with_label_values(&[&self.name, outcome.as_str()])
            .inc();
    }

    /// Counts a response status sent to a client.
    pub fn response(&self, code: u16) {
        let slot = code_slot(code);
        match self.response_counters.get(slot) {
            Some(cached) => cached.get_or_init(|| self.response_counter(code)).inc(),
            None => self.response_counter(code).inc(),
        }
        self.codes[slot].fetch_add(1, Ordering::Relaxed);
    }

    fn response_counter(&self, code: u16) -> IntCounter {
        self.families
            .http_responses
            .with_label_values(&[self.name.as_str(), &code.to_string()])
    }

    /// A tunnel opened: its handshake succeeded.
    pub fn tunnel_opened(&self) {
        self.tunnels_open.inc();
        self.handshakes_ok.inc();
    }

    /// Counts a heartbeat toward a tunnel's client (or origin).
    pub fn heartbeat(&self, origin: bool, result: HeartbeatResult) {
        let peer = if origin { "origin" } else { "client" };
        self.families
            .heartbeats
            .with_label_values(&[self.name.as_str(), peer, result.as_str()])
            .inc();
    }

    /// The resource's tunnels at a glance, as JSON: open now, messages each way, and
    /// closes by reason (the demo page's live panel).
    pub fn summary_json(&self) -> String {
        let mut closed = String::new();
        for r in CloseReason::ALL {
            let n = self
                .families
                .closed
                .with_label_values(&[self.name.as_str(), r.as_str()])
                .get();
            if n > 0 {
                if !closed.is_empty() {
                    closed.push(',');
                }
                json_str(&mut closed, r.as_str());
                let _ = write!(closed, ":{n}");
            }
        }
        let mut b = String::from("{\"resource\":");
        json_str(&mut b, &self.name);
        let _ = write!(
            b,
            ",\"tunnels_open\":{},\"messages_client_to_origin\":{},\"messages_origin_to_client\":{},\"closed\":{{{closed}}}}}",
            self.tunnels_open.get(),
            self.messages_c2o.get(),
            self.messages_o2c.get()
        );
        b
    }

    /// A tunnel was told to go by a drain.
    pub fn drained(&self) {
        self.families
            .drained
            .with_label_values(&[self.name.as_str()])
            .inc();
    }

    /// A tunnel closed after `seconds`.
    pub fn tunnel_closed(&self, reason: CloseReason, seconds: f64) {
        self.tunnels_open.dec();
        self.tunnel_seconds.observe(seconds);
        self.families
            .closed
            .with_label_values(&[self.name.as_str(), reason.as_str()])
            .inc();
    }
}

/// Process-wide counters and the registry of per-resource ones, shared by the proxy, the
/// reloader, the ticker and the admin listener.
#[derive(Debug)]
pub struct EdgeStats {
    started: Instant,
    registry: Registry,
    families: Families,
    resources: Mutex<HashMap<String, Arc<ResourceStats>>>,
    /// Client connections being served (a tunnel's leaves this count at its 101).
    connections: Arc<AtomicU64>,
}

/// A client connection being served; counted in [`EdgeStats::connections`] until dropped.
#[derive(Debug)]
pub struct Serving(Arc<AtomicU64>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for EdgeStats {
    fn default() -> Self {
        let registry = Registry::new();
        // Invariant: fixed, distinct, valid metric names registered once in a new registry.
        let families = Families::new(&registry).expect("wsedge metric families register");
        EdgeStats {
            started: Instant::now(),
            registry,
            families,
            resources: Mutex::default(),
            connections: Arc::default(),
        }
    }
}

impl EdgeStats {
    /// The counters of resource `name`, created on first use and kept across reloads.
    pub fn resource(&self, name: &str) -> Arc<ResourceStats> {
        let mut map = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| {
                let f = &self.families;
                Arc::new(ResourceStats {
                    name: name.to_string(),
                    bytes_c2o: f.bytes.with_label_values(&[name, "client_to_origin"]),
                    bytes_o2c: f.bytes.with_label_values(&[name, "origin_to_client"]),
                    messages_c2o: f.messages.with_label_values(&[name, "client_to_origin"]),
                    messages_o2c: f.messages.with_label_values(&[name, "origin_to_client"]),
                    tunnels_open: f.tunnels_open.with_label_values(&[name]),
                    tunnel_seconds: f.tunnel_seconds.with_label_values(&[name]),
                    families: f.clone(),
                    handshakes_ok: f
                        .handshakes
                        .with_label_values(&[name, HandshakeOutcome::Ok.as_str()]),
                    response_counters: Default::default(),
                    codes: Default::default(),
                    windows: Mutex::default(),
                })
            })
            .clone()
    }

    /// Counts a client connection until the returned guard is dropped.
    pub fn serving(&self) -> Serving {
        self.connections.fetch_add(1, Ordering::AcqRel);
        Serving(self.connections.clone())
    }

    /// Client connections being served now (requests in progress or awaited; tunnels
    /// are counted apart).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// Tunnels open now, all resources.
    pub fn tunnels_open(&self) -> i64 {
        let map = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|r| r.tunnels_open.get()).sum()
    }

    /// Counts a request header that did not arrive in time (logged as 408, closed without
    /// an answer, as nginx does).
    pub fn timed_out_header(&self) {
        self.families
            .http_responses
            .with_label_values(&["", "408"])
            .inc();
    }

    /// `wsedge_access_log_dropped_total`, for the access log to count into.
    pub fn access_log_dropped(&self) -> IntCounter {
        self.families.access_log_dropped.clone()
    }

    /// The configuration being served was applied now, at etcd `revision` (0: a file).
    pub fn config_applied(&self, revision: i64, at: SystemTime) {
        self.families.config_revision.set(revision);
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        self.families.config_applied.set(secs as i64);
    }

    /// Whether the configuration's source (etcd) is connected and watched.
    pub fn config_source_up(&self, up: bool) {
        self.families.config_source_up.set(i64::from(up));
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.families.reloads.with_label_values(&[result]).inc();
    }

    /// Counts a request refused before any resource matched (no resource for its Host, a
    /// bad Host, or a request the header guard refused before Pingora parsed it): a
    /// response with resource `""`, and for an upgrade its handshake outcome.
    pub fn refused_unrouted(&self, status: u16, outcome: HandshakeOutcome, upgrade: bool) {
        if upgrade {
            self.families
                .handshakes
                .with_label_values(&["", outcome.as_str()])
                .inc();
        }
        self.families
            .http_responses
            .with_label_values(&["", &status.to_string()])
            .inc();
    }

    /// Registers metrics of another part of the edge (analytics) in this registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(c)
    }

    /// Seconds since the process started.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The Prometheus text exposition of every metric.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        // Encoding our own families into a String cannot fail.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// Folds the last second into every resource's windows (called by the [`Ticker`]).
    pub fn tick(&self, now: SystemTime) {
        let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let all: Vec<Arc<ResourceStats>> = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for r in all {
            let sample = Sample {
                c2o: r.bytes_c2o.get(),
                o2c: r.bytes_o2c.get(),
                opened: r.handshakes_ok.get(),
                open: r.tunnels_open.get().max(0) as u64,
                codes: std::array::from_fn(|i| r.codes[i].load(Ordering::Relaxed)),
            };
            r.windows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(secs, &sample);
        }
    }

    /// The `/stats` buckets of `resource` between `from` and `to` (unix seconds).
    pub fn query(
        &self,
        resource: &str,
        from: u64,
        to: u64,
        g: Granularity,
    ) -> Option<Vec<BucketView>> {
        let r = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(resource)
            .cloned()?;
        let w = r.windows.lock().unwrap_or_else(|e| e.into_inner());
        Some(w.ring(g).range(from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_bucket_by_time_and_keep_a_fixed_span() {
        let stats = EdgeStats::default();
        let r = stats.resource("chat");
        let day0 = 1_795_392_000; // a midnight
                                  // One second of traffic every hour for 400 days.
        for h in 0..400 * 24u64 {
            r.bytes_c2o.inc_by(10);
            r.bytes_o2c.inc_by(20);
            r.response(101);
            r.response(404);
            r.response(599);
            stats.tick(UNIX_EPOCH + std::time::Duration::from_secs(day0 + h * 3600));
        }
        let end = day0 + 400 * 86_400;
        let days = stats.query("chat", 0, end, Granularity::Day).unwrap();
        assert_eq!(days.len(), 366, "a year and a day of daily buckets");
        let last = days.last().unwrap();
        assert_eq!(last.start, end - 86_400);
        assert_eq!(last.bytes_client_to_origin, 240);
        assert_eq!(last.bytes_origin_to_client, 480);
        assert_eq!(last.peak_bps, 240);
        assert_eq!(
            last.codes,
            vec![("101".into(), 24), ("404".into(), 24), ("5xx".into(), 24)]
        );
        assert_eq!(last.avg_bps(), 720 * 8 / 86_400);
        let hours = stats.query("chat", 0, end, Granularity::Hour).unwrap();
        assert_eq!(hours.len(), 31 * 24);
        let five = stats
            .query("chat", end - 3600, end, Granularity::FiveMinutes)
            .unwrap();
        assert_eq!(five.len(), 1, "one active 5-minute bucket per hour");
        assert!(stats.query("other", 0, end, Granularity::Day).is_none());
    }
}
