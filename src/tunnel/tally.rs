//! A tunnel's accounting: bytes, messages and the first Close frame of each direction,
//! counted into the resource's metrics as they pass ([`Counters`]), and the tunnel's guard,
//! whose `Drop` records how it ended (metrics and the access line), however it ends.

use super::closing::Side;
use super::frames::Fed;
use crate::observe::access_log::{AccessLog, JsonLine};
use crate::observe::analytics::{Feed, ProgressRow, Row, TunnelRow};
use crate::observe::labels::{CloseReason, HeartbeatResult};
use crate::observe::metrics::ResourceStats;
use crate::policy::limits::Slot;
use prometheus::IntCounter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Who and what a tunnel is for, for its log line.
#[derive(Debug, Clone)]
pub struct TunnelInfo {
    /// The resource's name.
    pub resource: String,
    /// The client's address.
    pub client: String,
    /// The Host the client asked for, without port.
    pub host: String,
    /// The request path (and query) sent to the origin.
    pub path: String,
    /// The client's IP (the key of sticky balancing).
    pub client_ip: Option<std::net::IpAddr>,
    /// Whether the client came over TLS.
    pub tls: bool,
    /// Whether the client's socket may leave Pingora's stream wrapper once the tunnel is
    /// open (the listener has no read buffer that could hold bytes).
    pub detachable: bool,
    /// Whether the client's WebSocket is a stream of its HTTP/2 connection (RFC 8441).
    pub h2: bool,
}

/// Where a tunnel reports: the resource's counters, the access log, and whether per-chunk
/// metrics are on.
pub struct Reporting {
    /// The resource's counters.
    pub site: Arc<ResourceStats>,
    /// The access log.
    pub log: Arc<AccessLog>,
    /// Count bytes and messages into metrics as they pass (and parse frame headers).
    pub metrics: bool,
    /// Where the tunnel's row for fleet statistics goes, if anywhere.
    pub analytics: Option<Arc<Feed>>,
}

/// One direction's accounting.
#[derive(Default)]
struct Direction {
    bytes: u64,
    messages: u64,
    /// When this direction's first Close frame passed, if one did.
    close_at: Option<Instant>,
}

impl Direction {
    /// Accounts for what the scanner passed of a chunk: with metrics on, two atomic adds.
    fn pass(&mut self, fed: &Fed, counters: &Counters<'_>) {
        self.bytes += fed.forwarded as u64;
        self.messages += u64::from(fed.messages);
        if fed.close && self.close_at.is_none() {
            self.close_at = Some(Instant::now());
        }
        if counters.metrics {
            if fed.forwarded > 0 {
                counters.bytes.inc_by(fed.forwarded as u64);
            }
            if fed.messages > 0 {
                counters.messages.inc_by(u64::from(fed.messages));
            }
        }
    }
}

/// The close codes of a tunnel: of each side's first Close frame, and of the edge's own
/// when it was the first on the tunnel.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Codes {
    pub client: Option<u16>,
    pub origin: Option<u16>,
    pub edge: Option<u16>,
}

/// An open tunnel's accounting. Its `Drop` records the close, so a tunnel is counted and
/// logged however it ends, including when the runtime is dropped at shutdown with the
/// tunnel still open (then the reason is `shutdown`).
pub(crate) struct TunnelGuard {
    info: TunnelInfo,
    report: Reporting,
    /// The tunnel's slot (`max_connections`, `max_connections_per_ip`), freed with it.
    _slot: Slot,
    server: SocketAddr,
    opened_at: SystemTime,
    started: Instant,
    c2o: Direction,
    o2c: Direction,
    reason: Option<CloseReason>,
    codes: Codes,
    /// With analytics: how often the tunnel reports its bytes, when it next does, and
    /// what it reported so far (each way).
    interim: Option<Interim>,
}

/// An open tunnel's reports of the bytes it moved.
struct Interim {
    every: std::time::Duration,
    due: Instant,
    reported: (u64, u64),
}

impl TunnelGuard {
    pub(crate) fn new(
        info: TunnelInfo,
        report: Reporting,
        slot: Slot,
        server: SocketAddr,
    ) -> TunnelGuard {
        report.site.tunnel_opened();
        let started = Instant::now();
        let interim = report.analytics.as_ref().map(|feed| Interim {
            every: feed.interim(),
            due: started + feed.interim(),
            reported: (0, 0),
        });
        TunnelGuard {
            info,
            report,
            _slot: slot,
            server,
            opened_at: SystemTime::now(),
            started,
            c2o: Direction::default(),
            o2c: Direction::default(),
            reason: None,
            codes: Codes::default(),
            interim,
        }
    }

    /// Data moved at `now`: with analytics, once `interim` has passed since the last
    /// report, the bytes since then are reported (a compare when it has not).
    pub(crate) fn progress(&mut self, now: Instant) {
        if self.interim.as_ref().is_some_and(|i| now >= i.due) {
            self.report_progress(now);
        }
    }

    #[cold]
    #[inline(never)]
    fn report_progress(&mut self, now: Instant) {
        let (Some(i), Some(feed)) = (self.interim.as_mut(), self.report.analytics.as_ref()) else {
            return;
        };
        i.due = now + i.every;
        let (bytes_in, bytes_out) = (self.c2o.bytes - i.reported.0, self.o2c.bytes - i.reported.1);
        if bytes_in == 0 && bytes_out == 0 {
            return;
        }
        i.reported = (self.c2o.bytes, self.o2c.bytes);
        feed.push(Row::Progress(ProgressRow {
            ts: SystemTime::now(),
            resource: self.info.resource.clone(),
            hostname: self.info.host.clone(),
            status: if self.info.h2 { 200 } else { 101 },
            client_ip: self.info.client_ip,
            bytes_in,
            bytes_out,
        }));
    }

    /// Accounts for a chunk from the client.
    pub(crate) fn client_to_origin(&mut self, fed: &Fed) {
        let counters = Counters::c2o(&self.report.site, self.report.metrics);
        self.c2o.pass(fed, &counters);
    }

    /// Accounts for a chunk from the origin.
    pub(crate) fn origin_to_client(&mut self, fed: &Fed) {
        let counters = Counters::o2c(&self.report.site, self.report.metrics);
        self.o2c.pass(fed, &counters);
    }

    /// Counts a heartbeat toward `side`.
    pub(crate) fn heartbeat(&self, side: Side, result: HeartbeatResult) {
        self.report.site.heartbeat(side == Side::Origin, result);
    }

    /// Counts the tunnel as told to go by a drain.
    pub(crate) fn drained(&self) {
        self.report.site.drained();
    }

    /// The relay is over: the tunnel's reason (`transport`, unless a Close frame says who
    /// ended it) and its close codes are settled.
    pub(crate) fn finish(&mut self, transport: CloseReason, codes: Codes) {
        self.codes = codes;
        self.reason = Some(self.close_reason(transport));
    }

    /// "Closed by" is who sent the first Close frame (RFC 6455 §7.1.1: after a client's
    /// Close it is the origin that ends TCP); without Close frames, who ended TCP.
    fn close_reason(&self, transport: CloseReason) -> CloseReason {
        // The edge's own Close went out before any side's: the Closes after it are
        // answers, and the relay's reason stands.
        if transport.by_edge() || self.codes.edge.is_some() {
            return transport;
        }
        match (self.c2o.close_at, self.o2c.close_at) {
            (Some(c), Some(o)) if o < c => CloseReason::OriginClosed,
            (Some(_), _) => CloseReason::ClientClosed,
            (None, Some(_)) => CloseReason::OriginClosed,
            (None, None) => transport,
        }
    }

    /// The close code of the first Close frame, whichever side sent it; the edge's when
    /// it spoke first.
    fn close_code(&self) -> Option<u16> {
        let c = &self.codes;
        if c.edge.is_some() {
            return c.edge;
        }
        match (self.c2o.close_at, self.o2c.close_at) {
            (Some(a), Some(b)) if b < a => c.origin,
            (Some(_), _) => c.client,
            (None, Some(_)) => c.origin,
            (None, None) => c.edge,
        }
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(CloseReason::Shutdown);
        let seconds = self.started.elapsed().as_secs_f64();
        self.report.site.tunnel_closed(reason, seconds);
        if !self.report.metrics {
            // Bytes were not added chunk by chunk: add them now.
            self.report.site.bytes_c2o.inc_by(self.c2o.bytes);
            self.report.site.bytes_o2c.inc_by(self.o2c.bytes);
        }
        if let Some(feed) = &self.report.analytics {
            let reported = self.interim.as_ref().map_or((0, 0), |i| i.reported);
            feed.push(Row::Tunnel(TunnelRow {
                closed: SystemTime::now(),
                opened: self.opened_at,
                resource: self.info.resource.clone(),
                hostname: self.info.host.clone(),
                protocol: if self.info.h2 { "h2" } else { "http/1.1" },
                status: if self.info.h2 { 200 } else { 101 },
                close_reason: reason.as_str(),
                client_ip: self.info.client_ip,
                bytes_in: self.c2o.bytes,
                bytes_out: self.o2c.bytes,
                messages_in: self.c2o.messages,
                messages_out: self.o2c.messages,
                duration_ms: self.started.elapsed().as_millis() as u64,
                bytes_in_rest: self.c2o.bytes - reported.0,
                bytes_out_rest: self.o2c.bytes - reported.1,
            }));
        }
        if !self.report.log.enabled() {
            return;
        }
        let line = JsonLine::new(self.opened_at)
            .str("kind", "tunnel")
            .str("resource", &self.info.resource)
            .str("client", &self.info.client)
            .str("host", &self.info.host)
            .str("path", &self.info.path)
            .num("status", if self.info.h2 { 200 } else { 101 })
            .str("protocol", if self.info.h2 { "h2" } else { "http/1.1" })
            .num("bytes_client_to_origin", self.c2o.bytes)
            .num("bytes_origin_to_client", self.o2c.bytes)
            .num("messages_client_to_origin", self.c2o.messages)
            .num("messages_origin_to_client", self.o2c.messages)
            .num("duration_ms", self.started.elapsed().as_millis())
            .str("close_reason", reason.as_str())
            .opt("close_code", self.close_code())
            .str("origin", &self.server.to_string())
            .finish();
        self.report.log.write(line);
    }
}

/// Counters one direction reports into.
struct Counters<'a> {
    metrics: bool,
    bytes: &'a IntCounter,
    messages: &'a IntCounter,
}

impl<'a> Counters<'a> {
    fn c2o(site: &'a ResourceStats, metrics: bool) -> Counters<'a> {
        Counters {
            metrics,
            bytes: &site.bytes_c2o,
            messages: &site.messages_c2o,
        }
    }

    fn o2c(site: &'a ResourceStats, metrics: bool) -> Counters<'a> {
        Counters {
            metrics,
            bytes: &site.bytes_o2c,
            messages: &site.messages_o2c,
        }
    }
}
