//! Fleet statistics: one row per closed tunnel and per plain request, sent to ClickHouse
//! in batches (`deploy/clickhouse/schema.sql` has the tables).
//!
//! The relay and the request path only [`Feed::push`] a row into a bounded queue (a lock
//! held for a `VecDeque::push_back`; a full queue drops the row and counts it). The
//! shipper ([`ship`]) takes the rows off the queue, adds the edge and the client's network
//! (MaxMind), seals batches of `batch` rows or `flush` old, and sends them in order over
//! ClickHouse's HTTP interface ([`clickhouse`]); while ClickHouse is slow or away, sealed
//! batches past a small memory bound wait in the spill directory ([`spill`]) and are sent
//! from there, oldest first, when it returns. A batch that may have reached ClickHouse
//! before (a retry, a spilled batch) is looked up by its id first, so no row is stored
//! twice. A stopping edge spills what is in memory ([`Feed::finish`]); the next process
//! (the new one of an upgrade) sends it.

pub mod clickhouse;
pub mod fleet_stats;
pub mod ship;
pub mod spill;

use crate::config::Analytics;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Rows the queue holds, at least (a burst while the shipper writes a spill file).
const MIN_QUEUE: usize = 100_000;

/// One row, as the hot path hands it over (the edge, the network and the batch are added
/// by the shipper).
#[derive(Debug, Clone)]
pub enum Row {
    /// A tunnel that closed.
    Tunnel(TunnelRow),
    /// A plain request (or a refused upgrade).
    Request(RequestRow),
    /// Bytes an open tunnel moved since its last report.
    Progress(ProgressRow),
}

/// Bytes an open tunnel moved since its last report (or its opening).
#[derive(Debug, Clone)]
pub struct ProgressRow {
    /// When.
    pub ts: SystemTime,
    /// The resource's name.
    pub resource: String,
    /// The Host the client asked for.
    pub hostname: String,
    /// The status the client got (101 or 200).
    pub status: u16,
    /// The client's IP.
    pub client_ip: Option<IpAddr>,
    /// Client to origin.
    pub bytes_in: u64,
    /// Origin to client.
    pub bytes_out: u64,
}

/// A closed tunnel.
#[derive(Debug, Clone)]
pub struct TunnelRow {
    /// When it closed.
    pub closed: SystemTime,
    /// When its 101 (or h2's 200) went out.
    pub opened: SystemTime,
    /// The resource's name.
    pub resource: String,
    /// The Host the client asked for.
    pub hostname: String,
    /// `http/1.1` or `h2`.
    pub protocol: &'static str,
    /// The status the client got (101 or 200).
    pub status: u16,
    /// Why it closed (`client_close`, ...).
    pub close_reason: &'static str,
    /// The client's IP.
    pub client_ip: Option<IpAddr>,
    /// Client to origin.
    pub bytes_in: u64,
    /// Origin to client.
    pub bytes_out: u64,
    /// Data messages client to origin.
    pub messages_in: u64,
    /// Data messages origin to client.
    pub messages_out: u64,
    /// How long it was open.
    pub duration_ms: u64,
    /// Of `bytes_in`, what no progress row reported.
    pub bytes_in_rest: u64,
    /// Of `bytes_out`, what no progress row reported.
    pub bytes_out_rest: u64,
}

/// A plain request.
#[derive(Debug, Clone)]
pub struct RequestRow {
    /// When it was received.
    pub ts: SystemTime,
    /// The resource's name (empty if none matched).
    pub resource: String,
    /// The Host the client asked for.
    pub hostname: String,
    /// The method.
    pub method: String,
    /// The status the client got.
    pub status: u16,
    /// The client's IP.
    pub client_ip: Option<IpAddr>,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// What happened to rows: `wsedge_analytics_rows_total{result}`, and the state of the
/// way to ClickHouse.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Stored in ClickHouse (an insert answered 200, or found there by its batch id).
    pub sent: IntCounter,
    /// Written to the spill directory (counted again as `sent` once replayed).
    pub spilled: IntCounter,
    /// Lost: the queue or the spill directory was full.
    pub dropped: IntCounter,
    /// Requests to ClickHouse that failed (`wsedge_analytics_errors_total`).
    pub errors: IntCounter,
    /// Bytes in the spill directory now.
    pub spill_bytes: IntGauge,
}

impl Counters {
    /// The counters, registered in `stats`' registry (unregistered if that fails, as for a
    /// second feed in one registry).
    pub fn new(stats: &super::metrics::EdgeStats) -> Counters {
        let rows = IntCounterVec::new(
            Opts::new(
                "wsedge_analytics_rows_total",
                "Rows for ClickHouse by what became of them: sent, spilled (to the local file while ClickHouse is away) or dropped (the bounds reached).",
            ),
            &["result"],
        )
        .expect("a valid metric");
        let errors = IntCounter::new(
            "wsedge_analytics_errors_total",
            "Requests to ClickHouse that failed (refused, unreachable, timed out).",
        )
        .expect("a valid metric");
        let spill_bytes = IntGauge::new(
            "wsedge_analytics_spill_bytes",
            "Bytes of batches waiting in the spill directory.",
        )
        .expect("a valid metric");
        let _ = stats.register(Box::new(rows.clone()));
        let _ = stats.register(Box::new(errors.clone()));
        let _ = stats.register(Box::new(spill_bytes.clone()));
        Counters {
            sent: rows.with_label_values(&["sent"]),
            spilled: rows.with_label_values(&["spilled"]),
            dropped: rows.with_label_values(&["dropped"]),
            errors,
            spill_bytes,
        }
    }
}

/// The queue between the hot path and the shipper.
pub struct Feed {
    queue: Mutex<VecDeque<Row>>,
    capacity: usize,
    /// Wakes the shipper when a batch is full.
    wake: tokio::sync::Notify,
    batch: usize,
    /// How often an open tunnel reports its bytes.
    interim: std::time::Duration,
    counters: Counters,
    /// The shipper's state, for [`Feed::finish`] to spill.
    pub(crate) shipper: Mutex<Option<Arc<ship::Shared>>>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("capacity", &self.capacity)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Feed {
    /// A feed for `settings`, counting into `counters`.
    pub fn new(settings: &Analytics, counters: Counters) -> Arc<Feed> {
        let capacity = (settings.batch * 4).max(MIN_QUEUE);
        Arc::new(Feed {
            queue: Mutex::new(VecDeque::with_capacity(settings.batch.min(MIN_QUEUE))),
            capacity,
            wake: tokio::sync::Notify::new(),
            batch: settings.batch,
            interim: settings.interim,
            counters,
            shipper: Mutex::new(None),
        })
    }

    /// Hands a row over; never waits (a full queue drops it, counted).
    pub fn push(&self, row: Row) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            drop(q);
            self.counters.dropped.inc();
            return;
        }
        q.push_back(row);
        let full = q.len() == self.batch;
        drop(q);
        if full {
            self.wake.notify_one();
        }
    }

    /// Everything queued, oldest first.
    pub(crate) fn take(&self) -> VecDeque<Row> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *q)
    }

    /// How often an open tunnel reports the bytes it moved.
    pub fn interim(&self) -> std::time::Duration {
        self.interim
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Spills what is in memory (queued rows, open and sealed batches) to the spill
    /// directory, for a stopping process: the next one sends it. Blocking (file writes);
    /// call it once nothing more is served, and again after the runtime is dropped.
    pub fn finish(&self) {
        let shared = self
            .shipper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match shared {
            Some(s) => s.finish(self),
            None => {
                let n = self.take().len() as u64;
                self.counters.dropped.inc_by(n);
            }
        }
    }
}

/// Milliseconds since the epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the epoch.
pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
