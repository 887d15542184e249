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
use std::time::{Duration, Instant, SystemTime};

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
        json_str(&mut s, &super::time::rfc3339(time));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001""#);
    }
}
