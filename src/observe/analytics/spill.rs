//! The spill directory: sealed batches that wait for ClickHouse, one file each, named so
//! that name order is the order they were sealed in (`<micros>-<pid>-<seq>.batch`),
//! written to a temporary name and renamed (a reader never sees half a file), and bounded
//! in bytes. A process sends its own files and those of processes that are gone (the old
//! process of an upgrade, a previous run); a live process's files are its own to send.

use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The tables rows go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `tunnels`
    Tunnels,
    /// `requests`
    Requests,
    /// `tunnel_progress`
    Progress,
}

impl Table {
    /// The table's name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Tunnels => "tunnels",
            Table::Requests => "requests",
            Table::Progress => "tunnel_progress",
        }
    }

    fn parse(s: &str) -> Option<Table> {
        match s {
            "tunnels" => Some(Table::Tunnels),
            "requests" => Some(Table::Requests),
            "tunnel_progress" => Some(Table::Progress),
            _ => None,
        }
    }
}

/// A sealed batch: rows of one table as JSONEachRow, with the id each row carries.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Unique over the fleet: the edge, the process, its start and a sequence number.
    pub id: String,
    /// Where its rows go.
    pub table: Table,
    /// How many rows.
    pub rows: u32,
    /// The smallest and largest `ts` of its rows (the lookup by id reads only those days).
    pub min_ts: u64,
    /// See `min_ts`.
    pub max_ts: u64,
    /// The rows, one JSON object a line.
    pub body: Bytes,
    /// Whether it may already be in ClickHouse (an insert was tried, or it comes from a
    /// spill file): then it is looked up by id before it is sent.
    pub attempted: bool,
}

/// A file waiting in the directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its path.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
}

/// The spill directory.
pub struct Spill {
    dir: PathBuf,
    max: u64,
    bytes: u64,
    /// Files to send, by name (the order they were sealed in).
    waiting: BTreeMap<String, u64>,
    /// Files of live processes seen at the last scan (left to them, not counted twice).
    others: HashSet<String>,
    pid: u32,
    seq: u64,
}

impl Spill {
    /// Opens (creating it) the directory bounded to `max` bytes, and takes up the files of
    /// processes that are gone.
    pub fn open(dir: &Path, max: u64) -> std::io::Result<Spill> {
        std::fs::create_dir_all(dir)?;
        let mut s = Spill {
            dir: dir.to_path_buf(),
            max,
            bytes: 0,
            waiting: BTreeMap::new(),
            others: HashSet::new(),
            pid: std::process::id(),
            seq: 0,
        };
        s.scan();
        Ok(s)
    }

    /// Looks for files of processes that are gone (and its own), which become this
    /// process's to send. The bound counts every file in the directory.
    pub fn scan(&mut self) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut total = 0;
        let mut others = HashSet::new();
        for entry in read.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = pid_of(&name) else {
                // A temporary file of a process that stopped mid-write: half a batch.
                if name.starts_with(".tmp-") && pid_of(&name[5..]).is_some_and(gone) {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            };
            let size = entry.metadata().map_or(0, |m| m.len());
            total += size;
            if pid != self.pid && !gone(pid) {
                others.insert(name);
                continue;
            }
            self.waiting.entry(name).or_insert(size);
        }
        self.others = others;
        self.bytes = total;
    }

    /// Bytes in the directory.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes `batch` to its file; `Ok(false)` if it would pass the bound (not written).
    pub fn write(&mut self, batch: &Batch) -> std::io::Result<bool> {
        let header = format!(
            "{}\t{}\t{}\t{}\t{}\n",
            batch.id,
            batch.table.name(),
            batch.rows,
            batch.min_ts,
            batch.max_ts
        );
        let size = (header.len() + batch.body.len()) as u64;
        if self.bytes + size > self.max {
            return Ok(false);
        }
        self.seq += 1;
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let name = format!("{micros:017}-{:010}-{:010}.batch", self.pid, self.seq);
        let tmp = self.dir.join(format!(".tmp-{name}"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(header.as_bytes())?;
            f.write_all(&batch.body)?;
            f.sync_data()?;
            std::fs::rename(&tmp, self.dir.join(&name))
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.bytes += size;
        self.waiting.insert(name, size);
        Ok(true)
    }

    /// The oldest waiting file, read back (a file that cannot be read or parsed is moved
    /// aside as `.bad` and the next one taken; its name is returned for the log).
    pub fn front(&mut self) -> Option<(Entry, Result<Batch, String>)> {
        let (name, size) = self.waiting.iter().next().map(|(n, s)| (n.clone(), *s))?;
        let path = self.dir.join(&name);
        let entry = Entry { path, size };
        let batch = std::fs::read(&entry.path)
            .map_err(|e| e.to_string())
            .and_then(|b| parse(Bytes::from(b)));
        Some((entry, batch))
    }

    /// The oldest waiting file is done with (sent, or unreadable): removed.
    pub fn pop(&mut self, entry: &Entry, bad: bool) {
        let name = entry
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.waiting.remove(&name);
        let gone = if bad {
            std::fs::rename(&entry.path, entry.path.with_extension("bad"))
        } else {
            std::fs::remove_file(&entry.path)
        };
        if gone.is_ok() || !entry.path.exists() {
            self.bytes = self.bytes.saturating_sub(entry.size);
        }
    }
}

/// The writer's pid in a file name `<micros>-<pid>-<seq>.batch`.
fn pid_of(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".batch")?;
    let mut parts = stem.split('-');
    let (_, pid, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` has ended.
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// A spill file back into a batch: a header line (id, table, rows, min and max `ts`), then
/// the rows.
fn parse(bytes: Bytes) -> Result<Batch, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header not UTF-8")?;
    let f: Vec<&str> = header.split('\t').collect();
    let bad = || {
        format!(
            "bad header \"{}\"",
            header.chars().take(200).collect::<String>()
        )
    };
    if f.len() != 5 || f[0].is_empty() || f[0].len() > 200 {
        return Err(bad());
    }
    let n = |s: &str| s.parse::<u64>().map_err(|_| bad());
    let batch = Batch {
        id: f[0].to_string(),
        table: Table::parse(f[1]).ok_or_else(bad)?,
        rows: u32::try_from(n(f[2])?).map_err(|_| bad())?,
        min_ts: n(f[3])?,
        max_ts: n(f[4])?,
        body: bytes.slice(nl + 1..),
        attempted: true,
    };
    let lines = batch.body.iter().filter(|&&b| b == b'\n').count();
    if lines != batch.rows as usize {
        return Err(format!(
            "{} rows announced, {lines} present (cut short?)",
            batch.rows
        ));
    }
    Ok(batch)
}
