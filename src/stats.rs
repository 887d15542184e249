//! What the edge counts: Prometheus metrics (DESIGN.md §5) and the per-resource time
//! windows behind `/stats`. On the per-chunk path a tunnel only adds to counters it
//! resolved when it opened (one atomic add each); everything else happens once per
//! request, once per tunnel, or once a second in the [`Ticker`].

use crate::tunnel::CloseReason;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::collections::HashMap;
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
    http_responses: IntCounterVec,
    reloads: IntCounterVec,
    access_log_dropped: IntCounter,
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
        registry.register(Box::new(crate::access_log::error_log_dropped().clone()))?;
        Ok(Families {
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
const CODE_SLOTS: usize = TRACKED_CODES.len() + 5;

fn code_slot(code: u16) -> usize {
    match TRACKED_CODES.iter().position(|&c| c == code) {
        Some(i) => i,
        None => TRACKED_CODES.len() + (code / 100).clamp(1, 5) as usize - 1,
    }
}

/// The label of a status slot in `/stats`.
fn slot_label(i: usize) -> String {
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
    /// Slots and rate buckets, which like the counters outlive reloads.
    pub limits: Arc<crate::limits::ResourceLimits>,
}

impl ResourceStats {
    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts a refused upgrade request's outcome (a 101 is counted by
    /// [`Self::tunnel_opened`]).
    pub fn handshake(&self, outcome: &str) {
        self.families
            .handshakes
            .with_label_values(&[&self.name, outcome])
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
                    handshakes_ok: f.handshakes.with_label_values(&[name, "ok"]),
                    response_counters: Default::default(),
                    codes: Default::default(),
                    windows: Mutex::default(),
                    limits: Arc::default(),
                })
            })
            .clone()
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

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.families.reloads.with_label_values(&[result]).inc();
    }

    /// Counts a request refused before any resource matched (no resource for its Host, a
    /// bad Host, or a request the header guard refused before Pingora parsed it): a
    /// response with resource `""`, and for an upgrade its handshake outcome.
    pub fn refused_unrouted(&self, reject: crate::handshake::Reject, upgrade: bool) {
        if upgrade {
            self.families
                .handshakes
                .with_label_values(&["", reject.outcome()])
                .inc();
        }
        self.families
            .http_responses
            .with_label_values(&["", &reject.status().to_string()])
            .inc();
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

/// Cumulative values read once a second.
#[derive(Debug, Default, Clone)]
struct Sample {
    c2o: u64,
    o2c: u64,
    opened: u64,
    open: u64,
    codes: [u64; CODE_SLOTS],
}

/// `/stats` granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// 5 minutes, kept 3 days.
    FiveMinutes,
    /// 1 hour, kept 31 days.
    Hour,
    /// 1 day, kept 366 days.
    Day,
}

impl Granularity {
    /// Parses `5m`, `1h`, `1d`.
    pub fn parse(s: &str) -> Option<Granularity> {
        match s {
            "5m" => Some(Granularity::FiveMinutes),
            "1h" => Some(Granularity::Hour),
            "1d" => Some(Granularity::Day),
            _ => None,
        }
    }

    /// Bucket width and how many buckets are kept.
    pub fn shape(self) -> (u64, usize) {
        match self {
            Granularity::FiveMinutes => (300, 3 * 288),
            Granularity::Hour => (3600, 31 * 24),
            Granularity::Day => (86_400, 366),
        }
    }
}

/// One bucket of one window.
#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    start: u64,
    c2o: u64,
    o2c: u64,
    peak_bps: u64,
    opened: u64,
    open_peak: u64,
    codes: [u32; CODE_SLOTS],
}

/// A bucket as `/stats` shows it.
#[derive(Debug, Clone)]
pub struct BucketView {
    /// Start of the bucket, unix seconds.
    pub start: u64,
    /// Width in seconds.
    pub width: u64,
    /// Bytes client → origin.
    pub bytes_client_to_origin: u64,
    /// Bytes origin → client.
    pub bytes_origin_to_client: u64,
    /// Peak bandwidth over one second, bits/s, both directions.
    pub peak_bps: u64,
    /// Tunnels opened in the bucket.
    pub tunnels_opened: u64,
    /// Most tunnels open at once in the bucket.
    pub tunnels_open_peak: u64,
    /// Responses by status (label, count), non-zero only.
    pub codes: Vec<(String, u64)>,
}

impl BucketView {
    /// Average bandwidth over the bucket, bits/s, both directions.
    pub fn avg_bps(&self) -> u64 {
        (self.bytes_client_to_origin + self.bytes_origin_to_client) * 8 / self.width
    }
}

/// A ring of fixed-width buckets; slots are allocated as time reaches them, so a quiet
/// resource costs nothing and a busy one at most `len` buckets.
#[derive(Debug)]
struct Ring {
    width: u64,
    len: usize,
    slots: Vec<Bucket>,
}

impl Ring {
    fn new(g: Granularity) -> Ring {
        let (width, len) = g.shape();
        Ring {
            width,
            len,
            slots: Vec::new(),
        }
    }

    fn slot(&mut self, secs: u64) -> &mut Bucket {
        let start = secs - secs % self.width;
        let i = (start / self.width) as usize % self.len;
        if self.slots.len() <= i {
            self.slots.resize(i + 1, Bucket::default());
        }
        let b = &mut self.slots[i];
        if b.start != start {
            *b = Bucket {
                start,
                ..Bucket::default()
            };
        }
        b
    }

    fn add(&mut self, secs: u64, d: &Sample) {
        let b = self.slot(secs);
        b.c2o += d.c2o;
        b.o2c += d.o2c;
        b.peak_bps = b.peak_bps.max((d.c2o + d.o2c) * 8);
        b.opened += d.opened;
        b.open_peak = b.open_peak.max(d.open);
        for (acc, n) in b.codes.iter_mut().zip(d.codes) {
            *acc = acc.saturating_add(n.min(u64::from(u32::MAX)) as u32);
        }
    }

    fn range(&self, from: u64, to: u64) -> Vec<BucketView> {
        let mut out: Vec<BucketView> = self
            .slots
            .iter()
            .filter(|b| b.start != 0 && b.start + self.width > from && b.start < to)
            .map(|b| BucketView {
                start: b.start,
                width: self.width,
                bytes_client_to_origin: b.c2o,
                bytes_origin_to_client: b.o2c,
                peak_bps: b.peak_bps,
                tunnels_opened: b.opened,
                tunnels_open_peak: b.open_peak,
                codes: b
                    .codes
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n > 0)
                    .map(|(i, &n)| (slot_label(i), u64::from(n)))
                    .collect(),
            })
            .collect();
        out.sort_by_key(|b| b.start);
        out
    }
}

/// The three windows of a resource, and the last cumulative sample.
#[derive(Debug)]
struct Windows {
    last: Sample,
    five_minutes: Ring,
    hour: Ring,
    day: Ring,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            last: Sample::default(),
            five_minutes: Ring::new(Granularity::FiveMinutes),
            hour: Ring::new(Granularity::Hour),
            day: Ring::new(Granularity::Day),
        }
    }
}

impl Windows {
    /// Adds what changed since the last sample to the buckets of `secs`.
    fn add(&mut self, secs: u64, now: &Sample) {
        let l = &self.last;
        let delta = Sample {
            c2o: now.c2o.saturating_sub(l.c2o),
            o2c: now.o2c.saturating_sub(l.o2c),
            opened: now.opened.saturating_sub(l.opened),
            open: now.open,
            codes: std::array::from_fn(|i| now.codes[i].saturating_sub(l.codes[i])),
        };
        for ring in [&mut self.five_minutes, &mut self.hour, &mut self.day] {
            ring.add(secs, &delta);
        }
        self.last = now.clone();
    }

    fn ring(&self, g: Granularity) -> &Ring {
        match g {
            Granularity::FiveMinutes => &self.five_minutes,
            Granularity::Hour => &self.hour,
            Granularity::Day => &self.day,
        }
    }
}

/// Folds counters into the `/stats` windows once a second.
pub struct Ticker(pub Arc<EdgeStats>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Ticker {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.0.tick(SystemTime::now()),
                _ = shutdown.changed() => return,
            }
        }
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
