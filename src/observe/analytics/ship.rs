//! The shipper: two loops of one background service. The collector takes rows off the
//! feed's queue into a batch per table, seals a batch when it has `batch` rows or is
//! `flush` old, and keeps at most [`OUTBOX`] sealed batches in memory (older ones go to the
//! spill directory). The sender sends the oldest batch there is, spilled ones first, one
//! at a time, and on a failure waits (0.5 s doubling to 10 s) and tries the same batch
//! again, so batches arrive in the order they were sealed.

use super::clickhouse::{literal, Client, Failure};
use super::spill::{Batch, Spill, Table};
use super::{unix, unix_ms, Counters, Feed, Row};
use crate::config::geo::GeoIp;
use crate::config::Analytics;
use crate::observe::access_log::json_str;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Sealed batches kept in memory; older ones wait in the spill directory.
pub const OUTBOX: usize = 2;
/// The longest wait between two tries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The first wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A failure of the same kind is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// How often the spill directory is looked at for files of processes that ended.
const RESCAN: Duration = Duration::from_secs(10);

/// A batch being filled.
#[derive(Default)]
struct Open {
    body: Vec<u8>,
    rows: u32,
    min_ts: u64,
    max_ts: u64,
    since: Option<Instant>,
    /// Its id, given with its first row (every row carries it).
    id: String,
}

struct State {
    open: [Open; 3],
    outbox: VecDeque<Batch>,
    /// The batch being sent, for `finish` to spill.
    in_flight: Option<Batch>,
    spill: Option<Spill>,
    seq: u64,
    closed: bool,
}

/// What the collector, the sender and [`Feed::finish`] share.
pub struct Shared {
    settings: Analytics,
    geoip: ArcSwap<GeoIp>,
    state: Mutex<State>,
    counters: Counters,
    /// This process's part of every batch id.
    run: String,
    /// Wakes the sender when a batch is sealed.
    sealed: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `rows` to the open batches, sealing the full ones.
    fn collect(&self, st: &mut State, rows: VecDeque<Row>) {
        let geoip = self.geoip.load();
        let mut line = String::with_capacity(512);
        for row in rows {
            line.clear();
            let (table, ts) = self.format(&mut line, &row, &geoip);
            if st.open[table as usize].rows == 0 {
                st.seq += 1;
                let open = &mut st.open[table as usize];
                open.since = Some(Instant::now());
                open.min_ts = ts;
                open.max_ts = ts;
                open.id = format!("{}-{}", self.run, st.seq);
            }
            let open = &mut st.open[table as usize];
            open.min_ts = open.min_ts.min(ts);
            open.max_ts = open.max_ts.max(ts);
            open.body.extend_from_slice(line.as_bytes());
            // The batch id is every row's last field.
            let _ = writeln!(open.body, ",\"batch_id\":\"{}\"}}", open.id);
            open.rows += 1;
            if open.rows as usize >= self.settings.batch {
                self.seal(st, table);
            }
        }
    }

    /// Seals the open batches that are `flush` old (all of them with `all`).
    fn seal_old(&self, st: &mut State, all: bool) {
        for table in [Table::Tunnels, Table::Requests, Table::Progress] {
            let open = &st.open[table as usize];
            let old = open
                .since
                .is_some_and(|s| all || s.elapsed() >= self.settings.flush);
            if open.rows > 0 && old {
                self.seal(st, table);
            }
        }
    }

    fn seal(&self, st: &mut State, table: Table) {
        let open = std::mem::take(&mut st.open[table as usize]);
        let batch = Batch {
            id: open.id,
            table,
            rows: open.rows,
            min_ts: open.min_ts,
            max_ts: open.max_ts,
            body: Bytes::from(open.body),
            attempted: false,
        };
        st.outbox.push_back(batch);
        while st.outbox.len() > OUTBOX {
            let oldest = st.outbox.pop_front().expect("longer than OUTBOX");
            self.to_spill(st, &oldest);
        }
        self.sealed.notify_one();
    }

    /// Writes `batch` to the spill directory; counted as spilled, or as dropped when the
    /// directory is full or unusable.
    fn to_spill(&self, st: &mut State, batch: &Batch) {
        let rows = u64::from(batch.rows);
        let written = match &mut st.spill {
            Some(spill) => match spill.write(batch) {
                Ok(w) => w,
                Err(e) => {
                    log::error!("analytics: cannot write the spill directory: {e}");
                    false
                }
            },
            None => false,
        };
        if written {
            self.counters.spilled.inc_by(rows);
        } else {
            self.counters.dropped.inc_by(rows);
        }
        if let Some(spill) = &st.spill {
            self.counters.spill_bytes.set(spill.bytes() as i64);
        }
    }

    /// One row as a JSON line; its table and `ts`.
    fn format(&self, out: &mut String, row: &Row, geoip: &GeoIp) -> (Table, u64) {
        let ip = match row {
            Row::Tunnel(t) => t.client_ip,
            Row::Request(r) => r.client_ip,
            Row::Progress(p) => p.client_ip,
        };
        let net = match ip {
            Some(ip) if geoip.any() => geoip.lookup(ip),
            _ => Default::default(),
        };
        let s = &self.settings;
        let text = |out: &mut String, key: &str, v: &str| {
            let _ = write!(out, ",\"{key}\":");
            json_str(out, v);
        };
        let (table, ts) = match row {
            Row::Tunnel(t) => {
                let ts = unix(t.closed);
                let _ = write!(
                    out,
                    "{{\"ts\":{ts},\"opened\":{},\"opened_ms\":{},\"closed_ms\":{}",
                    unix(t.opened),
                    unix_ms(t.opened),
                    unix_ms(t.closed)
                );
                text(out, "resource", &t.resource);
                text(out, "hostname", &t.hostname);
                text(out, "protocol", t.protocol);
                text(out, "close_reason", t.close_reason);
                let _ = write!(
                    out,
                    ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"messages_in\":{},\"messages_out\":{},\"duration_ms\":{},\"bytes_in_rest\":{},\"bytes_out_rest\":{}",
                    t.status,
                    t.bytes_in,
                    t.bytes_out,
                    t.messages_in,
                    t.messages_out,
                    t.duration_ms,
                    t.bytes_in_rest,
                    t.bytes_out_rest
                );
                (Table::Tunnels, ts)
            }
            Row::Request(r) => {
                let ts = unix(r.ts);
                let _ = write!(out, "{{\"ts\":{ts}");
                text(out, "resource", &r.resource);
                text(out, "hostname", &r.hostname);
                text(out, "method", &r.method);
                let _ = write!(
                    out,
                    ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{}",
                    r.status, r.bytes_in, r.bytes_out, r.duration_ms
                );
                (Table::Requests, ts)
            }
            Row::Progress(p) => {
                let ts = unix(p.ts);
                let _ = write!(out, "{{\"ts\":{ts}");
                text(out, "resource", &p.resource);
                text(out, "hostname", &p.hostname);
                let _ = write!(
                    out,
                    ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{}",
                    p.status, p.bytes_in, p.bytes_out
                );
                (Table::Progress, ts)
            }
        };
        text(out, "edge_id", &s.edge_id);
        text(out, "edge_region", &s.edge_region);
        text(out, "client_country", &net.country);
        text(out, "client_region", &net.region);
        text(out, "isp", &net.isp);
        let _ = write!(out, ",\"client_asn\":{}", net.asn);
        // The batch id closes the row, written by `collect` (the rows are found by it after
        // an uncertain insert).
        (table, ts)
    }

    /// Spills everything in memory, for a stopping process (see [`Feed::finish`]).
    pub fn finish(&self, feed: &Feed) {
        let mut st = self.lock();
        st.closed = true;
        let rows = feed.take();
        self.collect(&mut st, rows);
        self.seal_old(&mut st, true);
        let mut batches: Vec<Batch> = st.in_flight.take().into_iter().collect();
        batches.extend(st.outbox.drain(..));
        let n = batches.len();
        for mut b in batches {
            b.attempted = true;
            self.to_spill(&mut st, &b);
        }
        if n > 0 {
            log::info!("analytics: {n} batches spilled for the next process to send");
        }
    }
}

/// The background service that ships a feed's rows.
pub struct Shipper {
    feed: Arc<Feed>,
    shared: Arc<Shared>,
    client: Client,
}

impl Shipper {
    /// A shipper for `feed` with `settings`; opens the spill directory (without one,
    /// rows past the memory bound are dropped and counted, and the error is logged).
    pub fn new(feed: Arc<Feed>, settings: &Analytics) -> Shipper {
        let spill = match Spill::open(&settings.spill_dir, settings.spill_max) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!(
                    "analytics: cannot use the spill directory {}: {e}; batches ClickHouse cannot take now will be dropped",
                    settings.spill_dir.display()
                );
                None
            }
        };
        let started = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            geoip: ArcSwap::from_pointee(settings.geoip.clone()),
            state: Mutex::new(State {
                open: Default::default(),
                outbox: VecDeque::new(),
                in_flight: None,
                spill,
                seq: 0,
                closed: false,
            }),
            counters: feed.counters().clone(),
            run: format!("{}-{}-{started}", settings.edge_id, std::process::id()),
            sealed: tokio::sync::Notify::new(),
        });
        *feed.shipper.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.clone());
        Shipper {
            feed,
            shared,
            client: Client::new(settings),
        }
    }

    /// The collector: rows into batches, every `flush`/4 (at most 1 s) or when a batch
    /// is full.
    async fn collect(&self) {
        let tick = (self.shared.settings.flush / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.feed.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            let rows = self.feed.take();
            let mut st = self.shared.lock();
            if st.closed {
                return;
            }
            self.shared.collect(&mut st, rows);
            self.shared.seal_old(&mut st, false);
        }
    }

    /// The sender: the oldest batch, until it is stored.
    async fn send(&self) {
        let mut backoff = FIRST_BACKOFF;
        let mut logged: Option<(Instant, String)> = None;
        let mut quiet = 0u64;
        let mut scanned = Instant::now();
        loop {
            let next = {
                let mut st = self.shared.lock();
                if st.closed {
                    return;
                }
                if scanned.elapsed() >= RESCAN {
                    scanned = Instant::now();
                    if let Some(spill) = &mut st.spill {
                        spill.scan();
                    }
                }
                self.next(&mut st)
            };
            let Some((batch, from)) = next else {
                tokio::select! {
                    _ = self.shared.sealed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            };
            match self.store(&batch).await {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    self.shared.counters.sent.inc_by(u64::from(batch.rows));
                    let mut st = self.shared.lock();
                    st.in_flight = None;
                    if let (Some(entry), Some(spill)) = (&from, &mut st.spill) {
                        spill.pop(entry, false);
                        self.shared.counters.spill_bytes.set(spill.bytes() as i64);
                    }
                    if let Some((at, what)) = logged.take() {
                        log::info!(
                            "analytics: ClickHouse takes rows again ({what}, first failure {:?} ago; {quiet} more failures since)",
                            at.elapsed()
                        );
                        quiet = 0;
                    }
                }
                Err(failure) => {
                    self.shared.counters.errors.inc();
                    let what = failure.to_string();
                    match &logged {
                        Some((at, _)) if at.elapsed() < LOG_EVERY => quiet += 1,
                        _ => {
                            log::error!(
                                "analytics: batch {} of {} rows not stored: {what}; retried in {backoff:?}, {quiet} more failures in the last minute",
                                batch.id, batch.rows
                            );
                            quiet = 0;
                            logged = Some((Instant::now(), what));
                        }
                    }
                    {
                        let mut st = self.shared.lock();
                        if from.is_none() {
                            // Back to the front of the outbox, to be tried first again.
                            if let Some(mut b) = st.in_flight.take() {
                                b.attempted = true;
                                st.outbox.push_front(b);
                                while st.outbox.len() > OUTBOX {
                                    let oldest = st.outbox.pop_front().expect("longer");
                                    self.shared.to_spill(&mut st, &oldest);
                                }
                            }
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The oldest batch: spilled ones first. An unreadable spill file is set aside.
    fn next(&self, st: &mut State) -> Option<(Batch, Option<super::spill::Entry>)> {
        while let Some(spill) = &mut st.spill {
            let Some((entry, batch)) = spill.front() else {
                break;
            };
            match batch {
                Ok(b) => return Some((b, Some(entry))),
                Err(why) => {
                    log::error!(
                        "analytics: spill file {} is unreadable ({why}); moved aside as .bad",
                        entry.path.display()
                    );
                    spill.pop(&entry, true);
                }
            }
        }
        let batch = st.outbox.pop_front()?;
        st.in_flight = Some(batch.clone());
        Some((batch, None))
    }

    /// Stores `batch` once: a batch that may be there already is looked up by its id.
    async fn store(&self, batch: &Batch) -> Result<(), Failure> {
        let table = batch.table.name();
        if batch.attempted {
            let found = self
                .client
                .run(
                    &format!(
                        "SELECT count() FROM {table} WHERE ts >= toDateTime({}) AND ts <= toDateTime({}) AND batch_id = {}",
                        batch.min_ts,
                        batch.max_ts,
                        literal(&batch.id)
                    ),
                    Bytes::new(),
                )
                .await?;
            // An answer that is not a count is a failure (sending again could store the
            // batch twice).
            let found: u64 = String::from_utf8_lossy(&found)
                .trim()
                .parse()
                .map_err(|_| Failure::Refused {
                    status: 200,
                    message: "the lookup of a batch answered something other than a count".into(),
                })?;
            if found > 0 {
                if found != u64::from(batch.rows) {
                    log::warn!(
                        "analytics: batch {} holds {found} rows in ClickHouse against {} sent; not sent again",
                        batch.id, batch.rows
                    );
                }
                return Ok(());
            }
        }
        self.client
            .run(
                &format!("INSERT INTO {table} FORMAT JSONEachRow"),
                batch.body.clone(),
            )
            .await
            .map(|_| ())
    }
}

impl Feed {
    /// The MaxMind databases a reload read.
    pub fn set_geoip(&self, geoip: &GeoIp) {
        if let Some(s) = &*self.shipper.lock().unwrap_or_else(|e| e.into_inner()) {
            s.geoip.store(Arc::new(geoip.clone()));
        }
    }
}

#[async_trait]
impl BackgroundService for Shipper {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // Not stopped by the shutdown: tunnels that close during the drain still send
        // rows. A stopping process spills the rest (`Feed::finish`).
        tokio::join!(self.collect(), self.send());
    }
}
