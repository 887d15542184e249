//! 18 (the schema, first part): deploy/clickhouse/schema.sql, applied by
//! scripts/clickhouse-migrate to a real ClickHouse on loopback: every rollup (5 min, 1 h,
//! 1 d) holds exactly what the raw rows say, by every dimension; the migration runs again
//! without harm; the prune drops only the partitions past each table's retention.

use crate::common::*;
use std::collections::BTreeMap;
use std::process::Command;

/// 2026-11-28 00:00:00 UTC.
const START: u64 = 1795824000;

fn migrate(ch: &ClickHouse, args: &[&str]) -> std::process::Output {
    Command::new("scripts/clickhouse-migrate")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--url", &ch.url()])
        .args(args)
        .output()
        .unwrap()
}

/// Key of a rollup row: bucket, resource, hostname, edge region, client region, ISP, status.
type Key = (u64, String, String, String, String, String, u16);
/// Bytes in, bytes out, tunnels opened, tunnels closed, requests.
type Sums = [u64; 5];

/// A small deterministic generator (no clock, no randomness from outside).
struct Gen(u64);
impl Gen {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn every_rollup_holds_exactly_what_the_raw_rows_say() {
    let ch = ClickHouse::start();
    let out = migrate(&ch, &["--database", "stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Again: nothing changes, nothing fails.
    let out = migrate(&ch, &["--database", "stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pick = |g: &mut Gen, xs: &[&'static str]| xs[g.next(xs.len() as u64) as usize];
    let mut g = Gen(7);
    let mut tunnels = String::new();
    let mut requests = String::new();
    let mut expected: [BTreeMap<Key, Sums>; 3] = Default::default();
    let grains = [300u64, 3600, 86_400];
    let mut add = |at: u64, dims: (&str, &str, &str, &str, &str, u16), i: usize, v: u64| {
        for (k, grain) in grains.iter().enumerate() {
            let key = (
                at / grain * grain,
                dims.0.to_string(),
                dims.1.to_string(),
                dims.2.to_string(),
                dims.3.to_string(),
                dims.4.to_string(),
                dims.5,
            );
            expected[k].entry(key).or_default()[i] += v;
        }
    };
    for _ in 0..400 {
        let resource = pick(&mut g, &["chat", "feed"]);
        let hostname = if resource == "chat" {
            pick(&mut g, &["chat.a", "chat.b"])
        } else {
            "feed.a"
        };
        let region = pick(&mut g, &["eu", "us"]);
        let client = pick(&mut g, &["DE", "FR", "US", ""]);
        let isp = pick(&mut g, &["AS3320 Deutsche Telekom", "AS7922 Comcast", ""]);
        let opened = START + g.next(3 * 86_400);
        let closed = opened + g.next(7200);
        let (bin, bout) = (g.next(1 << 20), g.next(1 << 24));
        let dims = (resource, hostname, region, client, isp, 101u16);
        tunnels.push_str(&format!(
            "{{\"ts\":{closed},\"opened\":{opened},\"edge_id\":\"e-{region}\",\"edge_region\":\"{region}\",\"resource\":\"{resource}\",\"hostname\":\"{hostname}\",\"protocol\":\"http/1.1\",\"status\":101,\"close_reason\":\"client_close\",\"client_region\":\"{client}\",\"isp\":\"{isp}\",\"bytes_in\":{bin},\"bytes_out\":{bout}}}\n"
        ));
        add(closed, dims, 0, bin);
        add(closed, dims, 1, bout);
        add(opened, dims, 2, 1);
        add(closed, dims, 3, 1);
    }
    for _ in 0..300 {
        let resource = pick(&mut g, &["chat", "feed"]);
        let region = pick(&mut g, &["eu", "us"]);
        let client = pick(&mut g, &["DE", "US"]);
        let isp = pick(&mut g, &["AS7922 Comcast", ""]);
        let status = [200u16, 404, 502][g.next(3) as usize];
        let ts = START + g.next(3 * 86_400);
        let (bin, bout) = (g.next(4096), g.next(1 << 16));
        let dims = (resource, "h", region, client, isp, status);
        requests.push_str(&format!(
            "{{\"ts\":{ts},\"edge_id\":\"e\",\"edge_region\":\"{region}\",\"resource\":\"{resource}\",\"hostname\":\"h\",\"method\":\"GET\",\"status\":{status},\"client_region\":\"{client}\",\"isp\":\"{isp}\",\"bytes_in\":{bin},\"bytes_out\":{bout}}}\n"
        ));
        add(ts, dims, 0, bin);
        add(ts, dims, 1, bout);
        add(ts, dims, 4, 1);
    }
    // In several inserts, as edges' batches arrive.
    for part in tunnels.lines().collect::<Vec<_>>().chunks(150) {
        ch.query(
            "INSERT INTO stats.tunnels FORMAT JSONEachRow",
            &part.join("\n"),
        )
        .unwrap();
    }
    ch.query("INSERT INTO stats.requests FORMAT JSONEachRow", &requests)
        .unwrap();

    for (k, table) in ["traffic_5m", "traffic_1h", "traffic_1d"]
        .iter()
        .enumerate()
    {
        let got = ch
            .query(
                &format!(
                    "SELECT toUInt32(bucket), resource, hostname, edge_region, client_region, isp, status, sum(bytes_in), sum(bytes_out), sum(tunnels_opened), sum(tunnels_closed), sum(requests) FROM stats.{table} GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status FORMAT TSV"
                ),
                "",
            )
            .unwrap();
        let mut rows: BTreeMap<Key, Sums> = BTreeMap::new();
        for line in got.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap();
            let key = (
                n(0),
                f[1].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4].to_string(),
                f[5].to_string(),
                f[6].parse().unwrap(),
            );
            rows.insert(key, [n(7), n(8), n(9), n(10), n(11)]);
        }
        assert_eq!(rows.len(), expected[k].len(), "{table}: buckets");
        assert!(rows == expected[k], "{table} differs from the raw rows");
    }
    // The totals, by region and by ISP, as /stats will ask.
    let by_isp = ch
        .query(
            "SELECT isp, sum(bytes_out) FROM stats.traffic_1d GROUP BY isp ORDER BY isp FORMAT TSV",
            "",
        )
        .unwrap();
    let raw = ch
        .query(
            "SELECT isp, sum(b) FROM (SELECT isp, sum(bytes_out) AS b FROM stats.tunnels GROUP BY isp UNION ALL SELECT isp, sum(bytes_out) AS b FROM stats.requests GROUP BY isp) GROUP BY isp ORDER BY isp FORMAT TSV",
            "",
        )
        .unwrap();
    assert_eq!(by_isp, raw);
}

#[test]
fn the_prune_drops_only_partitions_past_each_tables_retention() {
    let ch = ClickHouse::start();
    assert!(migrate(&ch, &["--database", "p"]).status.success());
    // Days 2 (kept everywhere), 123, 184 and 396 days before 2026-12-02.
    for day in ["2026-11-30", "2026-08-01", "2026-06-01", "2025-11-01"] {
        let row = format!(
            "{{\"ts\":\"{day} 12:00:00\",\"opened\":\"{day} 11:00:00\",\"resource\":\"r\",\"status\":101,\"bytes_in\":1,\"bytes_out\":1}}"
        );
        ch.query("INSERT INTO p.tunnels FORMAT JSONEachRow", &row)
            .unwrap();
    }
    let out = migrate(
        &ch,
        &["--database", "p", "--prune", "--today", "2026-12-02"],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let days = |table: &str| {
        let at = if table == "tunnels" { "ts" } else { "bucket" };
        let sql = format!(
            "SELECT DISTINCT toString(toDate({at})) AS d FROM p.{table} ORDER BY d FORMAT TSV"
        );
        ch.query(&sql, "").unwrap()
    };
    assert_eq!(days("tunnels"), "2026-11-30\n", "{said}");
    assert_eq!(days("traffic_5m"), "2026-11-30\n");
    assert_eq!(days("traffic_1h"), "2026-06-01\n2026-08-01\n2026-11-30\n");
    assert_eq!(days("traffic_1d"), "2026-06-01\n2026-08-01\n2026-11-30\n");
    assert!(said.contains("dropped"), "{said}");

    // Hostile arguments, and a server that is not there.
    let out = migrate(&ch, &["--database", "x; DROP DATABASE p"]);
    assert_eq!(out.status.code(), Some(2));
    let out = migrate(&ch, &["--today", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new("scripts/clickhouse-migrate")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--url", &format!("http://{}", closed_port("127.0.0.1"))])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach ClickHouse"));
}
