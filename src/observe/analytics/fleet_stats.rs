//! `/stats` for the whole fleet, from ClickHouse: the rollup of the granularity asked
//! for (5 min, 1 h, 1 d), filtered by hostname, the client's region, ISP and the edge's
//! region; the peak bandwidth of a bucket from the next finer rollup still kept, and the
//! peak of open tunnels from the raw rows (each tunnel's opening and close, summed in
//! order).

use super::clickhouse::{literal, Client, Failure};
use crate::config::Analytics;
use crate::observe::stats_api::answer;
use crate::observe::windows::{BucketView, Granularity};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The longest range one query covers: three months.
pub const MAX_RANGE_DAYS: u64 = 93;
/// How long each rollup is kept (`scripts/clickhouse-migrate --prune`).
pub fn retention_days(g: Granularity) -> u64 {
    match g {
        Granularity::FiveMinutes => 93,
        Granularity::Hour => 186,
        Granularity::Day => 366,
    }
}

/// The granularities a range of `secs` may be asked at, finest first: 5 min or 1 h
/// within 3 days, 1 h or 1 d up to 31 days, 1 d beyond.
pub fn allowed(secs: u64) -> &'static [Granularity] {
    const DAY: u64 = 86_400;
    if secs <= 3 * DAY {
        &[Granularity::FiveMinutes, Granularity::Hour]
    } else if secs <= 31 * DAY {
        &[Granularity::Hour, Granularity::Day]
    } else {
        &[Granularity::Day]
    }
}

/// A checked fleet query.
#[derive(Debug, Clone, Default)]
pub struct FleetQuery {
    /// The resource.
    pub resource: String,
    /// Unix seconds, `from` rounded down to a bucket.
    pub from: u64,
    /// Unix seconds (exclusive).
    pub to: u64,
    /// The bucket width.
    pub granularity: Option<Granularity>,
    /// Filters: the Host, the client's region, the client's ISP, the edge's region.
    pub hostname: Option<String>,
    /// See `hostname`.
    pub region: Option<String>,
    /// See `hostname`.
    pub isp: Option<String>,
    /// See `hostname`.
    pub edge_region: Option<String>,
}

/// One bucket of the answer.
#[derive(Debug, Default, Clone)]
struct Bucket {
    bytes_in: u64,
    bytes_out: u64,
    tunnels_opened: u64,
    peak_bps: u64,
    open_peak: i64,
    codes: BTreeMap<u16, u64>,
}

/// Fleet queries run at once from one edge; more get a 503 (each may scan three months
/// of raw rows for the peak of open tunnels).
pub const MAX_QUERIES: usize = 2;

/// Answers fleet queries from ClickHouse.
#[derive(Clone)]
pub struct FleetStats {
    client: Client,
    running: std::sync::Arc<tokio::sync::Semaphore>,
}

fn table(g: Granularity) -> &'static str {
    match g {
        Granularity::FiveMinutes => "traffic_5m",
        Granularity::Hour => "traffic_1h",
        Granularity::Day => "traffic_1d",
    }
}

impl FleetStats {
    /// Queries the ClickHouse of `settings`.
    pub fn new(settings: &Analytics) -> FleetStats {
        FleetStats {
            client: Client::new(settings),
            running: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES)),
        }
    }

    /// The answer's JSON, or 502 with what ClickHouse said.
    pub async fn answer(&self, q: &FleetQuery, now: u64) -> Result<String, (u16, String)> {
        let Ok(_running) = self.running.try_acquire() else {
            return Err((
                503,
                format!("{MAX_QUERIES} fleet queries are running on this edge already; try again when they are done"),
            ));
        };
        let g = q.granularity.unwrap_or(Granularity::FiveMinutes);
        let (width, _) = g.shape();
        let failed = |f: Failure| {
            (
                502,
                format!("the fleet's statistics are not available: {f}"),
            )
        };
        let filters = self.filters(q);
        // The rows of a rollup this query reads.
        let rollup = format!(
            "resource = {} AND bucket >= toDateTime({}) AND bucket < toDateTime({}){filters}",
            literal(&q.resource),
            q.from,
            q.to
        );
        let mut buckets: BTreeMap<u64, Bucket> = BTreeMap::new();
        let mut start = q.from;
        while start < q.to {
            buckets.insert(start, Bucket::default());
            start += width;
        }
        // Bytes, tunnels opened and statuses.
        let sql = format!(
            "SELECT toUInt32(bucket), status, sum(bytes_in), sum(bytes_out), sum(tunnels_opened), sum(requests) FROM {} WHERE {rollup} GROUP BY bucket, status FORMAT TSV",
            table(g),
        );
        for f in self.rows(&sql).await.map_err(failed)? {
            let Some(b) = buckets.get_mut(&f[0]) else {
                continue;
            };
            b.bytes_in += f[2];
            b.bytes_out += f[3];
            b.tunnels_opened += f[4];
            let n = f[4] + f[5];
            if n > 0 {
                *b.codes.entry(f[1] as u16).or_default() += n;
            }
        }
        // Peak bandwidth: the busiest bucket of the finer rollup still kept, else the
        // bucket's own average.
        let finer = match g {
            Granularity::FiveMinutes => None,
            Granularity::Hour => Some(Granularity::FiveMinutes),
            Granularity::Day => [Granularity::FiveMinutes, Granularity::Hour]
                .into_iter()
                .find(|f| q.from + retention_days(*f) * 86_400 >= now),
        };
        for b in buckets.values_mut() {
            b.peak_bps = (b.bytes_in + b.bytes_out) * 8 / width;
        }
        if let Some(fine) = finer {
            let (fw, _) = fine.shape();
            let sql = format!(
                "SELECT intDiv(toUInt32(bucket), {width}) * {width} AS b, max(bits) FROM (SELECT bucket, sum(bytes_in + bytes_out) * 8 AS bits FROM {} WHERE {rollup} GROUP BY bucket) GROUP BY b FORMAT TSV",
                table(fine),
            );
            for f in self.rows(&sql).await.map_err(failed)? {
                if let Some(b) = buckets.get_mut(&f[0]) {
                    b.peak_bps = b.peak_bps.max(f[1] / fw);
                }
            }
        }
        self.open_peaks(q, width, &filters, &mut buckets)
            .await
            .map_err(failed)?;

        let views: Vec<BucketView> = buckets
            .into_iter()
            .map(|(start, b)| BucketView {
                start,
                width,
                bytes_client_to_origin: b.bytes_in,
                bytes_origin_to_client: b.bytes_out,
                peak_bps: b.peak_bps,
                tunnels_opened: b.tunnels_opened,
                tunnels_open_peak: b.open_peak.max(0) as u64,
                codes: b.codes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            })
            .collect();
        let mut fields = vec![("source", "fleet")];
        for (k, v) in [
            ("hostname", &q.hostname),
            ("region", &q.region),
            ("isp", &q.isp),
            ("edge_region", &q.edge_region),
        ] {
            if let Some(v) = v {
                fields.push((k, v.as_str()));
            }
        }
        Ok(answer(&q.resource, g, q.from, q.to, &fields, &views))
    }

    /// ` AND column = 'value'` for each filter.
    fn filters(&self, q: &FleetQuery) -> String {
        let mut f = String::new();
        for (column, v) in [
            ("hostname", &q.hostname),
            ("client_region", &q.region),
            ("isp", &q.isp),
            ("edge_region", &q.edge_region),
        ] {
            if let Some(v) = v {
                let _ = write!(f, " AND {column} = {}", literal(v));
            }
        }
        f
    }

    /// The most tunnels open at once in each bucket, to the millisecond: every tunnel
    /// that overlaps the range adds 1 at its opening and takes 1 at its close; the running
    /// sum in time order is the number open. Within one millisecond, openings count before
    /// closes. Tunnels still open are not in ClickHouse yet.
    async fn open_peaks(
        &self,
        q: &FleetQuery,
        width: u64,
        filters: &str,
        buckets: &mut BTreeMap<u64, Bucket>,
    ) -> Result<(), Failure> {
        let sql = format!(
            "SELECT p.1, p.2, p.3, p.4 FROM (SELECT arrayJoin(arrayMap((e, c) -> (e.1, c, e.3, e.2), ev, arrayCumSum(arrayMap(e -> e.2, ev)))) AS p FROM (SELECT arraySort(groupArray((t, d, o))) AS ev FROM (SELECT t, sum(dd) AS d, sumIf(dd, dd > 0) AS o FROM (SELECT arrayJoin([(opened_ms, toInt64(1)), (closed_ms, toInt64(-1))]) AS e, e.1 AS t, e.2 AS dd FROM tunnels WHERE resource = {} AND opened < toDateTime({}) AND ts >= toDateTime({}){filters}) GROUP BY t))) FORMAT TSV",
            literal(&q.resource),
            q.to,
            q.from
        );
        let answer = self.client.run(&sql, Bytes::new()).await?;
        let text = String::from_utf8_lossy(&answer);
        // Per millisecond with a change: (its second, level after it, openings, net).
        let mut points = text.lines().filter_map(|l| {
            let f: Vec<i64> = l
                .split('\t')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?;
            (f.len() == 4 && f[0] >= 0).then(|| (f[0] as u64 / 1000, f[1], f[2], f[3]))
        });
        let mut level: i64 = 0;
        let mut next = points.next();
        for (start, b) in buckets.iter_mut() {
            // The level entering the bucket: after the last change before it.
            while let Some((_, after, _, _)) = next.filter(|p| p.0 < *start) {
                level = after;
                next = points.next();
            }
            let mut peak = level;
            while let Some((_, after, opens, net)) = next.filter(|p| p.0 < start + width) {
                peak = peak.max(after - net + opens);
                level = after;
                next = points.next();
            }
            b.open_peak = peak.max(0);
        }
        Ok(())
    }

    /// A query's TSV answer as rows of numbers.
    async fn rows(&self, sql: &str) -> Result<Vec<Vec<u64>>, Failure> {
        let answer = self.client.run(sql, Bytes::new()).await?;
        Ok(String::from_utf8_lossy(&answer)
            .lines()
            .map(|l| {
                l.split('\t')
                    .map(|x| x.parse().unwrap_or(0))
                    .collect::<Vec<u64>>()
            })
            .filter(|r| r.len() >= 2)
            .collect())
    }
}
