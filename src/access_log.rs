//! One JSON line per plain request (from Pingora's `logging` hook) and per tunnel at its
//! close (from the tunnel guard's `Drop`, so tunnels cut at shutdown, when Pingora no
//! longer calls `logging`, are logged too). To stdout, a file, or nowhere.
//!
//! Lines never block the proxy: they go through a bounded queue to a writer thread of
//! their own ([`LineWriter`]). When the reader of stdout (a log shipper) stalls, or the disk
//! is slow, the queue fills and further lines are dropped and counted
//! (`wsedge_access_log_dropped_total`) while traffic carries on. The same writer carries the
//! process's own log on stderr (`wsedge_error_log_dropped_total`).

use crate::config::AccessLogTarget;
use prometheus::IntCounter;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Lines a log may hold in memory before it drops them (about 5 MiB of access lines).
pub const QUEUE_LINES: usize = 16 * 1024;

/// Where the access lines go, through a [`LineWriter`].
#[derive(Debug)]
pub struct AccessLog {
    writer: Option<LineWriter>,
}

impl AccessLog {
    /// Opens the target (creating a file in append mode); `dropped` counts lines dropped
    /// while the queue is full.
    pub fn open(target: &AccessLogTarget, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let sink = match Sink::open(target)? {
            None => return Ok(AccessLog { writer: None }),
            Some(sink) => sink,
        };
        Ok(AccessLog {
            writer: Some(LineWriter::new("access log", sink, dropped)),
        })
    }

    /// An access log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog { writer: None }
    }

    /// Whether lines are written at all (so callers can skip building them).
    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Queues one line (without its newline); never waits.
    pub fn write(&self, line: String) {
        if let Some(w) = &self.writer {
            w.send(line);
        }
    }

    /// Reopens the target at the next line (log rotation: SIGUSR1 or a reload). A target
    /// that changed kind (file to stdout, say) takes effect only after a restart.
    pub fn reopen(&self, target: &AccessLogTarget) {
        if let (Some(w), AccessLogTarget::File(_)) = (&self.writer, target) {
            w.reopen(target.clone());
        }
    }

    /// Waits (up to `limit`) until every queued line is written: at shutdown.
    pub fn flush(&self, limit: Duration) {
        if let Some(w) = &self.writer {
            w.flush(limit);
        }
    }
}

/// Where a [`LineWriter`] writes.
enum Sink {
    Stdout,
    Stderr,
    File(std::fs::File),
}

impl Sink {
    fn open(target: &AccessLogTarget) -> std::io::Result<Option<Sink>> {
        Ok(match target {
            AccessLogTarget::Off => None,
            AccessLogTarget::Stdout => Some(Sink::Stdout),
            AccessLogTarget::File(p) => Some(Sink::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(bytes),
            Sink::Stderr => std::io::stderr().lock().write_all(bytes),
            Sink::File(f) => f.write_all(bytes),
        }
    }
}

enum Msg {
    Line(String),
    /// Wakes the writer (to reopen, or to answer a flush).
    Wake,
    Flushed(SyncSender<()>),
}

/// A bounded queue of lines and the thread that writes them. Senders never wait: a full
/// queue drops the line and counts it. The thread starts with the first line, so that a
/// daemonizing process (Pingora forks in `run`) starts it in the child.
pub struct LineWriter {
    name: &'static str,
    dropped: IntCounter,
    tx: OnceLock<SyncSender<Msg>>,
    shared: Arc<Shared>,
}

/// What the writer thread shares with the senders.
struct Shared {
    /// The sink until the thread takes it.
    sink: Mutex<Option<Sink>>,
    /// A target to reopen before the next write.
    reopen: Mutex<Option<AccessLogTarget>>,
}

impl std::fmt::Debug for LineWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LineWriter({})", self.name)
    }
}

impl LineWriter {
    fn new(name: &'static str, sink: Sink, dropped: IntCounter) -> LineWriter {
        LineWriter {
            name,
            dropped,
            tx: OnceLock::new(),
            shared: Arc::new(Shared {
                sink: Mutex::new(Some(sink)),
                reopen: Mutex::new(None),
            }),
        }
    }

    /// A writer to stderr, for the process's own log.
    pub fn stderr(dropped: IntCounter) -> LineWriter {
        LineWriter::new("error log", Sink::Stderr, dropped)
    }

    fn sender(&self) -> &SyncSender<Msg> {
        self.tx.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
            let sink = lock(&self.shared.sink).take();
            let (name, shared) = (self.name, self.shared.clone());
            if let Some(sink) = sink {
                let spawned = std::thread::Builder::new()
                    .name(format!("wsedge {name}"))
                    .spawn(move || write_lines(name, rx, sink, &shared));
                if let Err(e) = spawned {
                    eprintln!("wsedge: cannot start the {name} writer: {e}");
                }
            }
            tx
        })
    }

    /// Queues a line (without its newline); drops and counts it when the queue is full.
    pub fn send(&self, line: String) {
        if self.sender().try_send(Msg::Line(line)).is_err() {
            self.dropped.inc();
        }
    }

    fn reopen(&self, target: AccessLogTarget) {
        *lock(&self.shared.reopen) = Some(target);
        // A full queue means the writer is busy and reopens before its next write anyway.
        let _ = self.sender().try_send(Msg::Wake);
    }

    /// Waits (up to `limit`) until every queued line is written.
    pub fn flush(&self, limit: Duration) {
        if self.tx.get().is_none() {
            return; // nothing was ever written
        }
        let end = Instant::now() + limit;
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        let mut msg = Msg::Flushed(ack);
        loop {
            match self.sender().try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < end => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(end.saturating_duration_since(Instant::now()));
    }
}

/// Poisoning would mean a panic while a lock was held; the data is still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer thread: takes what is queued, writes it in one go, repeats.
fn write_lines(name: &str, rx: Receiver<Msg>, mut sink: Sink, shared: &Shared) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut acks = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
                Msg::Wake => {}
                Msg::Flushed(ack) => acks.push(ack),
            }
            next = if buf.len() < 60 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Some(target) = lock(&shared.reopen).take() {
            match Sink::open(&target) {
                Ok(Some(new)) => sink = new,
                Ok(None) => {}
                Err(e) => eprintln!("wsedge: cannot reopen the {name}: {e}"),
            }
        }
        if !buf.is_empty() {
            // A failing log is not worth failing anything over; the lines are gone.
            let _ = sink.write_all(&buf);
            buf.clear();
        }
        for ack in acks.drain(..) {
            let _ = ack.try_send(());
        }
    }
}

/// The process's own log (`log`/`env_logger`, Pingora's included) as a `Write` for
/// `env_logger::Target::Pipe`: each record goes through a [`LineWriter`] to stderr, so a
/// stalled stderr reader never stops a worker thread either.
pub struct ErrorLog(pub Arc<LineWriter>);

impl std::io::Write for ErrorLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.send(text.trim_end_matches('\n').to_string());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `wsedge_error_log_dropped_total`: one counter for the process, registered by every
/// [`crate::stats::EdgeStats`].
pub fn error_log_dropped() -> &'static IntCounter {
    static C: OnceLock<IntCounter> = OnceLock::new();
    C.get_or_init(|| {
        // Invariant: a fixed, valid name and help text.
        IntCounter::new(
            "wsedge_error_log_dropped_total",
            "Lines of the process's own log (stderr) dropped because its reader did not keep up.",
        )
        .expect("a valid counter")
    })
}

/// Builds a JSON object one field at a time.
pub struct JsonLine(String);

impl JsonLine {
    /// Starts an object with `time`.
    pub fn new(time: SystemTime) -> JsonLine {
        let mut s = String::with_capacity(320);
        s.push_str("{\"time\":");
        json_str(&mut s, &rfc3339(time));
        JsonLine(s)
    }

    /// Adds a string field.
    pub fn str(mut self, key: &str, value: &str) -> JsonLine {
        let _ = write!(self.0, ",\"{key}\":");
        json_str(&mut self.0, value);
        self
    }

    /// Adds a number field.
    pub fn num(mut self, key: &str, value: impl std::fmt::Display) -> JsonLine {
        let _ = write!(self.0, ",\"{key}\":{value}");
        self
    }

    /// Adds a number field, or `null`.
    pub fn opt(self, key: &str, value: Option<impl std::fmt::Display>) -> JsonLine {
        match value {
            Some(v) => self.num(key, v),
            None => self.num(key, "null"),
        }
    }

    /// The finished line.
    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// Appends `s` as a JSON string (with quotes) to `out`.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `SystemTime` as RFC 3339 UTC with milliseconds, like `2026-11-23T01:02:03.456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Parses RFC 3339 (`2026-11-23T01:02:03Z`, fractions and `±hh:mm` offsets allowed) into
/// unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = rest.get(1..)?;
            if o.len() != 5 || o.as_bytes()[2] != b':' {
                return None;
            }
            sign * (o[..2].parse::<i64>().ok()? * 3600 + o[3..].parse::<i64>().ok()? * 60)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_round_trips_and_rejects_junk() {
        for secs in [0u64, 951_782_400, 1_795_395_723, 4_102_444_800] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(secs));
        }
        assert_eq!(
            parse_rfc3339("2026-11-23T02:02:03+01:00"),
            Some(1_795_395_723)
        );
        for bad in [
            "",
            "2026-11-23",
            "2026-13-01T00:00:00Z",
            "2026-11-23T00:00:00",
            "2026-11-23T00:00:00.Z",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_395_723_456);
        assert_eq!(rfc3339(t), "2026-11-23T01:02:03.456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001""#);
    }
}
