//! The `/stats` windows of one resource: rings of 5-minute, hourly and daily buckets (3,
//! 31 and 366 days), filled once a second from cumulative counters.

use super::metrics::{slot_label, CODE_SLOTS};

/// Cumulative values read once a second.
#[derive(Debug, Default, Clone)]
pub(crate) struct Sample {
    pub c2o: u64,
    pub o2c: u64,
    pub opened: u64,
    pub open: u64,
    pub codes: [u64; CODE_SLOTS],
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

    /// As `/stats` writes it: `5m`, `1h`, `1d`.
    pub fn label(self) -> &'static str {
        match self {
            Granularity::FiveMinutes => "5m",
            Granularity::Hour => "1h",
            Granularity::Day => "1d",
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
pub(crate) struct Ring {
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

    pub(crate) fn range(&self, from: u64, to: u64) -> Vec<BucketView> {
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
pub(crate) struct Windows {
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
    pub(crate) fn add(&mut self, secs: u64, now: &Sample) {
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

    pub(crate) fn ring(&self, g: Granularity) -> &Ring {
        match g {
            Granularity::FiveMinutes => &self.five_minutes,
            Granularity::Hour => &self.hour,
            Granularity::Day => &self.day,
        }
    }
}
