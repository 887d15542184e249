//! 18 (the schema, first part): deploy/clickhouse/schema.sql, applied by
//! scripts/clickhouse-migrate to a real ClickHouse on loopback: every rollup (5 min, 1 h,
//! 1 d) holds exactly what the raw rows say, by every dimension; the migration runs again
//! without harm; the prune drops only the partitions past each table's retention.

use crate::common::*;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

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
    let mut progress = String::new();
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
        // Some tunnels reported part of their bytes while open, in the bucket of the report.
        let mut reported = (0, 0);
        if g.next(3) == 0 {
            let at = opened + g.next(closed - opened + 1);
            reported = (g.next(bin + 1), g.next(bout + 1));
            progress.push_str(&format!(
                "{{\"ts\":{at},\"edge_id\":\"e-{region}\",\"edge_region\":\"{region}\",\"resource\":\"{resource}\",\"hostname\":\"{hostname}\",\"status\":101,\"client_region\":\"{client}\",\"isp\":\"{isp}\",\"bytes_in\":{},\"bytes_out\":{}}}\n",
                reported.0, reported.1
            ));
            add(at, dims, 0, reported.0);
            add(at, dims, 1, reported.1);
        }
        tunnels.push_str(&format!(
            "{{\"ts\":{closed},\"opened\":{opened},\"edge_id\":\"e-{region}\",\"edge_region\":\"{region}\",\"resource\":\"{resource}\",\"hostname\":\"{hostname}\",\"protocol\":\"http/1.1\",\"status\":101,\"close_reason\":\"client_close\",\"client_region\":\"{client}\",\"isp\":\"{isp}\",\"bytes_in\":{bin},\"bytes_out\":{bout},\"bytes_in_rest\":{},\"bytes_out_rest\":{}}}\n",
            bin - reported.0,
            bout - reported.1
        ));
        add(closed, dims, 0, bin - reported.0);
        add(closed, dims, 1, bout - reported.1);
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
    ch.query(
        "INSERT INTO stats.tunnel_progress FORMAT JSONEachRow",
        &progress,
    )
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
            "SELECT isp, sum(b) FROM (SELECT isp, sum(bytes_out_rest) AS b FROM stats.tunnels GROUP BY isp UNION ALL SELECT isp, sum(bytes_out) AS b FROM stats.requests GROUP BY isp UNION ALL SELECT isp, sum(bytes_out) AS b FROM stats.tunnel_progress GROUP BY isp) GROUP BY isp ORDER BY isp FORMAT TSV",
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

// ---- 18, the edges' feed: real wsedge processes sending to a real ClickHouse ----

/// An edge's file: resource `chat` (WebSockets to `ws_origin`) and `web` (plain HTTP to
/// `web_origin`), analytics to `ch`'s `database` as edge `id` in `region`.
fn fleet_yaml(
    ch: &ClickHouse,
    database: &str,
    ws_origin: SocketAddr,
    web_origin: SocketAddr,
    id: &str,
    region: &str,
    analytics_extra: &str,
) -> String {
    format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
pingora: {{ grace_period_seconds: 10 }}
drain: {{ spread: 1s }}
analytics:
  clickhouse: {{ url: "{}", database: {database}, batch: 50, flush: 200ms, timeout: 2s }}
  edge: {{ id: {id}, region: {region} }}
{analytics_extra}
resources:
  - name: chat
    hostnames: ["chat.test"]
    origin: {{ servers: [{{ address: "{ws_origin}" }}] }}
    websocket: {{ idle_timeout: 30s }}
  - name: web
    hostnames: ["web.test"]
    origin: {{ servers: [{{ address: "{web_origin}" }}] }}
"#,
        ch.url()
    )
}

/// What clients saw through one edge.
#[derive(Default, Debug, PartialEq)]
struct Seen {
    /// Bytes each way after the 101, summed over tunnels.
    c2o: u64,
    o2c: u64,
    tunnels: u64,
    /// Plain requests by (resource, status): count and body bytes received.
    requests: BTreeMap<(String, u16), (u64, u64)>,
}

/// A tunnel to `chat.test` over a socket that counts its bytes, from its 101 on.
struct Metered {
    ws: tokio_tungstenite::WebSocketStream<Counted>,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    written: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    at_101: (usize, usize),
}

impl Metered {
    async fn open(edge: &Edge) -> Metered {
        let stream = Counted::connect(edge.addr).await;
        let (read, written) = (stream.read.clone(), stream.written.clone());
        let req = ws_request_for(edge.addr, "chat.test");
        let (ws, _) = within("handshake", tokio_tungstenite::client_async(req, stream))
            .await
            .unwrap();
        let at_101 = (written.load(Ordering::SeqCst), read.load(Ordering::SeqCst));
        Metered {
            ws,
            read,
            written,
            at_101,
        }
    }

    /// Closes it (`code`) and waits for its end; the bytes each way after the 101, as the
    /// client counted them: (client to origin, origin to client).
    async fn close(mut self, code: Option<u16>) -> (u64, u64) {
        let frame = code.map(|c| CloseFrame {
            code: c.into(),
            reason: "".into(),
        });
        within("close", self.ws.close(frame)).await.unwrap();
        while let Some(Ok(_)) = within("close answer", self.ws.next()).await {}
        (
            (self.written.load(Ordering::SeqCst) - self.at_101.0) as u64,
            (self.read.load(Ordering::SeqCst) - self.at_101.1) as u64,
        )
    }
}

/// `n` tunnels to `chat.test`, each echoing `messages` messages of growing sizes and closed
/// by the client; their bytes as the client counted them.
async fn tunnels_through(edge: &Edge, n: usize, messages: usize, seen: &mut Seen) {
    for t in 0..n {
        let mut tunnel = Metered::open(edge).await;
        for m in 0..messages {
            let body = pattern(1 + (t * 37 + m * 101) % 300, m as u8);
            assert_eq!(
                echo_once(&mut tunnel.ws, Message::binary(body.clone())).await,
                Message::binary(body)
            );
        }
        let (c2o, o2c) = tunnel.close(Some(1000)).await;
        seen.c2o += c2o;
        seen.o2c += o2c;
        seen.tunnels += 1;
    }
}

/// `n` plain GETs for `host` (`web.test`, or a host no resource has); statuses and body
/// bytes as the client got them.
async fn requests_through(edge: &Edge, host: &str, n: usize, seen: &mut Seen) {
    for _ in 0..n {
        let answer = raw_request(
            edge.addr,
            &format!("GET /page HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let body = answer.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len()) as u64;
        let resource = if host == "web.test" { "web" } else { "" };
        let e = seen
            .requests
            .entry((resource.to_string(), status(&answer)))
            .or_default();
        e.0 += 1;
        e.1 += body;
    }
}

/// Waits (up to `limit`) until `sql` answers `want`; the last answer.
fn until_number(ch: &ClickHouse, sql: &str, want: u64, limit: Duration) -> u64 {
    let end = Instant::now() + limit;
    loop {
        let got = ch
            .query(sql, "")
            .map_or(0, |a| a.trim().parse().unwrap_or(0));
        if got == want || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per (resource, status): requests and bytes out, from `table` (raw `requests` or a
/// rollup).
fn requests_by_status(
    ch: &ClickHouse,
    db: &str,
    table: &str,
    region: &str,
) -> BTreeMap<(String, u16), (u64, u64)> {
    let count = if table == "requests" {
        "count()"
    } else {
        "sum(requests)"
    };
    let sql = format!(
        "SELECT resource, status, {count}, sum(bytes_out) FROM {db}.{table} WHERE edge_region = '{region}' GROUP BY resource, status HAVING {count} > 0 ORDER BY resource, status FORMAT TSV"
    );
    let mut out = BTreeMap::new();
    for line in ch.query(&sql, "").unwrap().lines() {
        let f: Vec<&str> = line.split('\t').collect();
        out.insert(
            (f[0].to_string(), f[1].parse().unwrap()),
            (f[2].parse().unwrap(), f[3].parse().unwrap()),
        );
    }
    out
}

/// Tunnels and bytes of `region` from `table`: (tunnels, bytes in, bytes out).
fn tunnel_sums(ch: &ClickHouse, db: &str, table: &str, region: &str) -> (u64, u64, u64) {
    let (n, filter) = if table == "tunnels" {
        ("count()", "1")
    } else {
        ("sum(tunnels_closed)", "resource = 'chat'")
    };
    let sql = format!(
        "SELECT {n}, sum(bytes_in), sum(bytes_out) FROM {db}.{table} WHERE edge_region = '{region}' AND {filter} FORMAT TSV"
    );
    let a = ch.query(&sql, "").unwrap();
    let f: Vec<u64> = a
        .trim()
        .split('\t')
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f[0], f[1], f[2])
}

fn metric_of(text: &str, result: &str) -> u64 {
    metric(
        text,
        &format!("wsedge_analytics_rows_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0) as u64
}

async fn rows_metric(edge: &Edge, result: &str) -> u64 {
    let (_, text) = edge.admin_request("GET", "/metrics").await;
    metric_of(&text, result)
}

/// Waits (bounded) until `wsedge_analytics_rows_total{result}` is `want`; the last value.
async fn until_metric(edge: &Edge, result: &str, want: u64) -> u64 {
    let end = Instant::now() + STEP;
    loop {
        let got = rows_metric(edge, result).await;
        if got == want || Instant::now() > end {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_in_two_regions_send_exactly_what_their_clients_saw() {
    let ch = ClickHouse::start();
    ch.migrate("fleet");
    let ws_origin = Origin::start(Mode::Echo).await;
    let web_origin = Origin::start(Mode::Status(200)).await;
    let eu = Edge::start(&fleet_yaml(
        &ch,
        "fleet",
        ws_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        "",
    ));
    let us = Edge::start(&fleet_yaml(
        &ch,
        "fleet",
        ws_origin.addr,
        web_origin.addr,
        "e2",
        "us",
        "",
    ));

    let (mut seen_eu, mut seen_us) = (Seen::default(), Seen::default());
    tunnels_through(&eu, 12, 5, &mut seen_eu).await;
    tunnels_through(&us, 7, 3, &mut seen_us).await;
    requests_through(&eu, "web.test", 40, &mut seen_eu).await;
    requests_through(&eu, "nobody.test", 9, &mut seen_eu).await;
    requests_through(&us, "web.test", 23, &mut seen_us).await;
    let rows_eu = seen_eu.tunnels + 49;
    let rows_us = seen_us.tunnels + 23;

    for (edge, region, rows) in [(&eu, "eu", rows_eu), (&us, "us", rows_us)] {
        let sql = format!(
            "SELECT (SELECT count() FROM fleet.tunnels WHERE edge_region = '{region}') + (SELECT count() FROM fleet.requests WHERE edge_region = '{region}')"
        );
        let got = until_number(&ch, &sql, rows, STEP);
        assert_eq!(
            got,
            rows,
            "{region}: rows in ClickHouse\nlog:\n{}",
            edge.log_text()
        );
        // Counted once ClickHouse answered (its rows can be seen a moment before).
        assert_eq!(until_metric(edge, "sent", rows).await, rows);
        assert_eq!(rows_metric(edge, "dropped").await, 0);
    }
    for (region, seen, id) in [("eu", &seen_eu, "e1"), ("us", &seen_us, "e2")] {
        // The raw rows and every rollup: the bytes each way the clients counted, the
        // tunnels they opened, and the statuses of their requests.
        for table in ["tunnels", "traffic_5m", "traffic_1h", "traffic_1d"] {
            assert_eq!(
                tunnel_sums(&ch, "fleet", table, region),
                (seen.tunnels, seen.c2o, seen.o2c),
                "{region}: {table}"
            );
        }
        for table in ["requests", "traffic_5m", "traffic_1h", "traffic_1d"] {
            assert_eq!(
                requests_by_status(&ch, "fleet", table, region),
                seen.requests,
                "{region}: {table}"
            );
        }
        let opened = ch.number(&format!(
            "SELECT sum(tunnels_opened) FROM fleet.traffic_1h WHERE edge_region = '{region}' AND status = 101"
        ));
        assert_eq!(opened, seen.tunnels);
        // Every row names its edge, and its batch.
        let other = ch.number(&format!(
            "SELECT count() FROM fleet.tunnels WHERE edge_region = '{region}' AND (edge_id != '{id}' OR batch_id = '' OR close_reason != 'client_closed' OR hostname != 'chat.test')"
        ));
        assert_eq!(other, 0);
    }
}

/// The spill directory's files.
fn spill_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "batch"));
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_away_for_thirty_seconds_under_traffic_loses_and_repeats_no_row() {
    let mut ch = ClickHouse::start();
    ch.migrate("f");
    let ws_origin = Origin::start(Mode::Echo).await;
    let web_origin = Origin::start(Mode::Status(200)).await;
    let spill = scratch_dir("spill");
    let extra = format!(
        "  spill: {{ path: \"{}\", max_size: 64MiB }}",
        spill.display()
    );
    let edge = Edge::start(&fleet_yaml(
        &ch,
        "f",
        ws_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra,
    ));
    let mut seen = Seen::default();
    requests_through(&edge, "web.test", 20, &mut seen).await;
    // Stored and answered (ClickHouse does not make an insert and its views' inserts one:
    // stopped between them, the rollups would miss rows the raw table has).
    assert_eq!(until_metric(&edge, "sent", 20).await, 20);

    // Away for 30 s while clients keep coming: a request every 100 ms, a tunnel every 2 s.
    ch.stop();
    let away = Instant::now();
    let mut n = 0;
    while away.elapsed() < Duration::from_secs(30) && n < 400 {
        requests_through(&edge, "web.test", 1, &mut seen).await;
        if n % 20 == 0 {
            tunnels_through(&edge, 1, 2, &mut seen).await;
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the two batches kept in memory, the rows wait on disk.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spilled = rows_metric(&edge, "spilled").await;
    let files = spill_files(&spill);
    assert!(
        spilled > 0 && !files.is_empty(),
        "spilled {spilled}, files {files:?}"
    );
    // One spilled batch kept aside, to hand back once it has been sent.
    let kept = std::fs::read(&files[0]).unwrap();

    ch.restart();
    let requests: u64 = seen.requests.values().map(|v| v.0).sum();
    let rows = requests + seen.tunnels;
    let sql = "SELECT (SELECT count() FROM f.requests) + (SELECT count() FROM f.tunnels)";
    // Sent again within the longest backoff (10 s) and the replay.
    let got = until_number(&ch, sql, rows, Duration::from_secs(40));
    assert_eq!(got, rows, "log:\n{}", edge.log_text());
    assert_eq!(until_metric(&edge, "sent", rows).await, rows);
    assert_eq!(rows_metric(&edge, "dropped").await, 0);
    // Each row once, in the rollups too.
    assert_eq!(
        requests_by_status(&ch, "f", "traffic_5m", "eu"),
        seen.requests
    );
    assert_eq!(
        tunnel_sums(&ch, "f", "traffic_1h", "eu"),
        (seen.tunnels, seen.c2o, seen.o2c)
    );
    assert!(spill_files(&spill).is_empty());
    let logged = edge.log_text();
    assert!(logged.contains("ClickHouse takes rows again"), "{logged}");

    // The batch kept aside comes back, as from a process that is gone: it is looked up
    // by its id, found, and not stored twice.
    let header = String::from_utf8_lossy(&kept[..kept.iter().position(|&b| b == b'\n').unwrap()])
        .into_owned();
    let batch_rows: u64 = header.split('\t').nth(2).unwrap().parse().unwrap();
    let back = spill.join("00000000000000001-0999999999-0000000001.batch");
    std::fs::write(&back, &kept).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while back.exists() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!back.exists(), "the returned batch was not taken up");
    assert_eq!(
        until_metric(&edge, "sent", rows + batch_rows).await,
        rows + batch_rows
    );
    assert_eq!(ch.number(sql), rows, "a batch was stored twice");
    let _ = std::fs::remove_dir_all(&spill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_spill_bound_rows_are_dropped_and_counted_exactly() {
    let mut ch = ClickHouse::start();
    ch.migrate("b");
    ch.stop();
    let web_origin = Origin::start(Mode::Status(200)).await;
    let spill = scratch_dir("spill");
    // About 300 bytes a row, 10 rows a batch: two batches fit in 8 KiB.
    let extra = format!(
        "  spill: {{ path: \"{}\", max_size: 8KiB }}",
        spill.display()
    );
    let yaml = fleet_yaml(
        &ch,
        "b",
        web_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra,
    )
    .replace("batch: 50", "batch: 10");
    let edge = Edge::start(&yaml);
    let mut seen = Seen::default();
    requests_through(&edge, "web.test", 200, &mut seen).await;
    // Every row has been sealed into a batch (flush 200 ms) and is in memory, on disk or
    // dropped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dropped = rows_metric(&edge, "dropped").await;
    assert!(dropped > 0, "nothing dropped");
    assert!(dropped < 200);
    assert_eq!(dropped % 10, 0, "whole batches are dropped");
    let on_disk: u64 = spill_files(&spill)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(on_disk <= 8192, "{on_disk} bytes in the spill directory");

    ch.restart();
    let kept = 200 - dropped;
    assert_eq!(
        until_number(
            &ch,
            "SELECT count() FROM b.requests",
            kept,
            Duration::from_secs(40)
        ),
        kept,
        "log:\n{}",
        edge.log_text()
    );
    assert_eq!(until_metric(&edge, "sent", kept).await, kept);
    assert_eq!(rows_metric(&edge, "dropped").await, dropped);
    let _ = std::fs::remove_dir_all(&spill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_refusing_rows_is_logged_once_a_minute_counted_and_the_edge_serves_on() {
    let ch = ClickHouse::start();
    ch.migrate("ok");
    let web_origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("creds");
    let password = dir.join("password");
    std::fs::write(&password, "not-the-password\n").unwrap();
    // A user ClickHouse does not know.
    let extra = format!("  spill: {{ path: \"{}\" }}", dir.join("spill-a").display());
    let yaml = fleet_yaml(
        &ch,
        "ok",
        web_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra,
    )
    .replace(
        "database: ok,",
        &format!(
            "database: ok, user: intruder, password_file: \"{}\",",
            password.display()
        ),
    );
    let refused = Edge::start(&yaml);
    // A database that has no tables (yet).
    let extra = format!("  spill: {{ path: \"{}\" }}", dir.join("spill-b").display());
    let missing = Edge::start(&fleet_yaml(
        &ch,
        "later",
        web_origin.addr,
        web_origin.addr,
        "e2",
        "eu",
        &extra,
    ));
    let mut seen = Seen::default();
    for edge in [&refused, &missing] {
        requests_through(edge, "web.test", 20, &mut seen).await;
    }
    // Every client was served.
    assert_eq!(
        seen.requests.get(&("web".to_string(), 200)),
        Some(&(40, 40 * 16))
    );
    // Tried again and again (0.5 s, 1 s, 2 s...), logged once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (edge, says) in [(&refused, "intruder"), (&missing, "later")] {
        let (_, text) = edge.admin_request("GET", "/metrics").await;
        let errors = metric(&text, "wsedge_analytics_errors_total").unwrap_or(0.0);
        assert!(errors >= 3.0, "{errors} failures counted");
        let log = edge.log_text();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("not stored")).collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(lines[0].contains(says), "{}", lines[0]);
        assert_eq!(metric_of(&text, "sent"), 0);
    }
    // Once the tables are there, the rows held back arrive.
    ch.migrate("later");
    assert_eq!(
        until_number(
            &ch,
            "SELECT count() FROM later.requests",
            20,
            Duration::from_secs(30)
        ),
        20
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_stopped_and_started_again_loses_no_row_it_counted() {
    let ch = ClickHouse::start();
    ch.migrate("r");
    let ws_origin = Origin::start(Mode::Echo).await;
    let web_origin = Origin::start(Mode::Status(200)).await;
    let spill = scratch_dir("spill");
    // Rows stay in memory (a batch is sent after an hour or 10000 rows).
    let extra = format!("  spill: {{ path: \"{}\" }}", spill.display());
    let yaml = fleet_yaml(
        &ch,
        "r",
        ws_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra,
    )
    .replace("batch: 50, flush: 200ms", "batch: 10000, flush: 1h");
    let mut edge = Edge::start(&yaml);
    let mut seen = Seen::default();
    tunnels_through(&edge, 4, 2, &mut seen).await;
    requests_through(&edge, "web.test", 25, &mut seen).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ch.number("SELECT count() FROM r.requests"), 0);
    edge.signal("TERM");
    assert!(edge.wait_exit(STEP), "{}", edge.log_text());
    assert!(!spill_files(&spill).is_empty(), "{}", edge.log_text());
    assert_eq!(ch.number("SELECT count() FROM r.requests"), 0);

    // The next process sends what the last one spilled.
    let again = Edge::start(&yaml);
    assert_eq!(
        until_number(
            &ch,
            "SELECT count() FROM r.requests",
            25,
            Duration::from_secs(20)
        ),
        25,
        "{}",
        again.log_text()
    );
    assert_eq!(
        until_number(&ch, "SELECT count() FROM r.tunnels", 4, STEP),
        4
    );
    assert_eq!(
        tunnel_sums(&ch, "r", "tunnels", "eu"),
        (seen.tunnels, seen.c2o, seen.o2c)
    );
    // A spill file goes once ClickHouse answered (its rows can be seen a moment before).
    assert_eq!(until_metric(&again, "sent", 29).await, 29);
    assert!(spill_files(&spill).is_empty());
    let _ = std::fs::remove_dir_all(&spill);
}

/// A plain GET for `web.test` from the source address `from`; its status.
async fn request_from(edge: &Edge, from: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = within("connect", socket.connect(edge.addr)).await.unwrap();
    within(
        "write",
        s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    within("read", s.read_to_end(&mut answer)).await.unwrap();
    status(&String::from_utf8_lossy(&answer))
}

fn asn_database(first: (u32, &str)) -> Vec<u8> {
    use mmdb::*;
    ipv4_database(
        "GeoLite2-ASN",
        &[
            (
                "127.0.0.0/24",
                map(&[
                    ("autonomous_system_number", Value::U32(first.0)),
                    ("autonomous_system_organization", s(first.1)),
                ]),
            ),
            (
                "127.0.1.0/24",
                map(&[
                    ("autonomous_system_number", Value::U32(64501)),
                    // A hostile name: control characters are not kept.
                    ("autonomous_system_organization", s("Other\u{7}\nNet")),
                ]),
            ),
            // A record of another shape: known as nothing.
            (
                "127.0.2.0/24",
                map(&[("autonomous_system_number", s("not a number"))]),
            ),
        ],
    )
}

fn country_database() -> Vec<u8> {
    use mmdb::*;
    ipv4_database(
        "GeoLite2-City",
        &[
            (
                "127.0.0.0/24",
                map(&[
                    ("country", map(&[("iso_code", s("DE"))])),
                    (
                        "subdivisions",
                        Value::Array(vec![map(&[("iso_code", s("BY"))])]),
                    ),
                ]),
            ),
            (
                "127.0.1.0/24",
                map(&[("country", map(&[("iso_code", s("FR"))]))]),
            ),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_isp_and_country_come_from_maxmind_databases_read_again_at_reload() {
    let ch = ClickHouse::start();
    ch.migrate("g");
    let web_origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("geo");
    let (asn, country) = (dir.join("asn.mmdb"), dir.join("country.mmdb"));
    std::fs::write(&asn, asn_database((64500, "Loopback Telecom"))).unwrap();
    std::fs::write(&country, country_database()).unwrap();
    let extra = format!(
        "  spill: {{ path: \"{}\" }}\n  geoip: {{ asn: \"{}\", country: \"{}\" }}",
        dir.join("spill").display(),
        asn.display(),
        country.display()
    );
    let edge = Edge::start(&fleet_yaml(
        &ch,
        "g",
        web_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra,
    ));
    for from in [
        "127.0.0.1",
        "127.0.0.1",
        "127.0.1.5",
        "127.0.2.9",
        "127.0.3.1",
    ] {
        assert_eq!(request_from(&edge, from).await, 200);
    }
    assert_eq!(
        until_number(&ch, "SELECT count() FROM g.requests", 5, STEP),
        5
    );
    let rows = |sql: &str| ch.query(sql, "").unwrap();
    let by = "SELECT client_asn, isp, client_country, client_region, count() FROM g.requests GROUP BY client_asn, isp, client_country, client_region ORDER BY client_asn, isp FORMAT TSV";
    assert_eq!(
        rows(by),
        "0\t\t\t\t2\n".to_string()
            + "64500\tAS64500 Loopback Telecom\tDE\tDE-BY\t2\n"
            + "64501\tAS64501 OtherNet\tFR\tFR\t1\n",
    );

    // A new ASN database, read by a reload.
    std::fs::write(&asn, asn_database((64999, "Renamed Carrier"))).unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(request_from(&edge, "127.0.0.1").await, 200);
    assert_eq!(
        until_number(&ch, "SELECT count() FROM g.requests", 6, STEP),
        6
    );
    assert_eq!(until_metric(&edge, "sent", 6).await, 6);
    assert_eq!(
        rows("SELECT isp FROM g.requests WHERE client_asn = 64999 FORMAT TSV"),
        "AS64999 Renamed Carrier\n"
    );
    // By ISP in the rollups, as /stats asks.
    assert_eq!(
        rows("SELECT isp, sum(requests) FROM g.traffic_1d GROUP BY isp ORDER BY isp FORMAT TSV"),
        "\t2\nAS64500 Loopback Telecom\t2\nAS64501 OtherNet\t1\nAS64999 Renamed Carrier\t1\n"
    );

    // A database that is not one: the reload is refused and the old one serves on.
    std::fs::write(&asn, b"\xAB\xCD\xEFMaxMind.com garbage").unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("analytics.geoip.asn"), "{body}");
    assert_eq!(request_from(&edge, "127.0.0.1").await, 200);
    assert_eq!(
        until_number(&ch, "SELECT count() FROM g.requests", 7, STEP),
        7
    );
    assert_eq!(
        rows("SELECT isp FROM g.requests WHERE client_asn = 64999 FORMAT TSV"),
        "AS64999 Renamed Carrier\nAS64999 Renamed Carrier\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_analytics_settings_are_refused_at_their_key() {
    let dir = scratch_dir("geo-hostile");
    let huge = dir.join("huge.mmdb");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(600 << 20)
        .unwrap();
    let cut = dir.join("cut.mmdb");
    let whole = country_database();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    // The metadata marker and nothing sound after it (the reader indexed past the end).
    let marker = dir.join("marker.mmdb");
    std::fs::write(&marker, b"\xAB\xCD\xEFMaxMind.com garbage").unwrap();
    let plain = dir.join("a-file");
    std::fs::write(&plain, "not a directory").unwrap();
    let bad_password = dir.join("bad-password");
    std::fs::write(&bad_password, "pass\u{7f}word\n").unwrap();
    let base = |analytics: &str| {
        format!(
            "listen: {{ http: [\"127.0.0.1:0\"] }}\nanalytics:\n{analytics}\nresources:\n  - name: a\n    hostnames: [a.test]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (
            "  clickhouse: { url: \"https://ch:8443\" }".into(),
            "https is not supported",
        ),
        (
            "  clickhouse: { url: \"ch:8123\" }".into(),
            "not an http:// URL",
        ),
        ("  clickhouse: { url: \"http://ch\" }".into(), "has no port"),
        (
            "  clickhouse: { url: \"http://user:pw@ch:8123\" }".into(),
            "not host:port",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123/x?y\" }".into(),
            "not host:port",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", database: \"x; DROP TABLE t\" }".into(),
            "not a database name",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", batch: 0 }".into(),
            "out of range",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", batch: 99999999 }".into(),
            "out of range",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", flush: 0s }".into(),
            "zero",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", password_file: /x }".into(),
            "needs its `user`",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", user: u, password_file: /nonexistent/pw }"
                .into(),
            "cannot read",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\" }\n  spill: { max_size: 1TB }".into(),
            "invalid size",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\" }\n  edge: { region: \"eu west\" }".into(),
            "not a label",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\" }}\n  edge: {{ id: \"{}\" }}",
                "e".repeat(65)
            ),
            "not a label",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\" }\n  geoip: { asn: /nonexistent.mmdb }".into(),
            "analytics.geoip.asn",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\" }}\n  geoip: {{ asn: \"{}\" }}",
                dir.display()
            ),
            "not a regular file",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\" }}\n  geoip: {{ country: \"{}\" }}",
                huge.display()
            ),
            "larger than 512 MiB",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\" }}\n  geoip: {{ country: \"{}\" }}",
                cut.display()
            ),
            "not a MaxMind-format database",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\" }}\n  geoip: {{ asn: \"{}\" }}",
                marker.display()
            ),
            "malformed",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", unknown: 1 }".into(),
            "unknown field",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\" }\n  interim: 0s".into(),
            "zero",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\" }\n  interim: forever".into(),
            "invalid duration",
        ),
        (
            "  clickhouse: { url: \"http://ch:8123\", user: \"a b\" }".into(),
            "analytics.clickhouse.user",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\", user: \"{}\" }}",
                "u".repeat(129)
            ),
            "analytics.clickhouse.user",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\", user: u, password_file: \"{}\" }}",
                bad_password.display()
            ),
            "printable ASCII",
        ),
        (
            format!(
                "  clickhouse: {{ url: \"http://ch:8123\" }}\n  spill: {{ path: \"{}\" }}",
                plain.display()
            ),
            "not a directory",
        ),
    ];
    for (analytics, says) in cases {
        let out = check_config("wsedge.yaml", &base(&analytics));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{analytics}: accepted");
        assert!(err.contains(says), "{analytics}: {err}");
        assert!(
            err.contains("wsedge.yaml:"),
            "{analytics}: no place in {err}"
        );
    }
    // And a good one passes.
    let out = check_config(
        "wsedge.yaml",
        &base("  clickhouse: { url: \"http://127.0.0.1:8123\", database: wsedge }\n  edge: { id: fra-1, region: eu-central }"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `/stats` answer's buckets, summed: (bytes in, bytes out, tunnels opened, statuses),
/// and the largest `tunnels_open_peak`.
fn stats_sums(body: &str) -> (u64, u64, u64, BTreeMap<String, u64>, u64) {
    let v: serde_yaml::Value = serde_yaml::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let mut sums = (0, 0, 0, BTreeMap::new(), 0);
    for b in v["buckets"].as_sequence().unwrap() {
        let n = |k: &str| b[k].as_u64().unwrap();
        sums.0 += n("bytes_client_to_origin");
        sums.1 += n("bytes_origin_to_client");
        sums.2 += n("tunnels_opened");
        sums.4 = sums.4.max(n("tunnels_open_peak"));
        assert_eq!(
            n("bandwidth_avg_bps"),
            (n("bytes_client_to_origin") + n("bytes_origin_to_client")) * 8
                / match v["granularity"].as_str().unwrap() {
                    "5m" => 300,
                    "1h" => 3600,
                    _ => 86_400,
                }
        );
        assert!(n("bandwidth_peak_bps") >= n("bandwidth_avg_bps"));
        for (code, count) in b["status"].as_mapping().unwrap() {
            *sums
                .3
                .entry(code.as_str().unwrap().to_string())
                .or_default() += count.as_u64().unwrap();
        }
    }
    sums
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_answers_for_the_fleet_by_resource_region_and_isp_with_the_range_rules() {
    let mut ch = ClickHouse::start();
    ch.migrate("s");
    let ws_origin = Origin::start(Mode::Echo).await;
    let web_origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("fleet-stats");
    let (asn, country) = (dir.join("asn.mmdb"), dir.join("country.mmdb"));
    std::fs::write(&asn, asn_database((64500, "Loopback Telecom"))).unwrap();
    std::fs::write(&country, country_database()).unwrap();
    let extra = |name: &str| {
        format!(
            "  spill: {{ path: \"{}\" }}\n  geoip: {{ asn: \"{}\", country: \"{}\" }}",
            dir.join(name).display(),
            asn.display(),
            country.display()
        )
    };
    let eu = Edge::start(&fleet_yaml(
        &ch,
        "s",
        ws_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra("a"),
    ));
    let us = Edge::start(&fleet_yaml(
        &ch,
        "s",
        ws_origin.addr,
        web_origin.addr,
        "e2",
        "us",
        &extra("b"),
    ));
    let (mut seen_eu, mut seen_us) = (Seen::default(), Seen::default());
    tunnels_through(&eu, 6, 3, &mut seen_eu).await;
    tunnels_through(&us, 4, 2, &mut seen_us).await;
    // Five tunnels open at once through eu (apart from the others in time).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let req = ws_request_for(eu.addr, "chat.test");
        held.push(
            within("open", tokio_tungstenite::connect_async(req))
                .await
                .unwrap()
                .0,
        );
    }
    for mut ws in held {
        within("close", ws.close(None)).await.unwrap();
        while let Some(Ok(_)) = within("close answer", ws.next()).await {}
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Plain requests: 7 from AS64500 (DE-BY), 3 from AS64501 (FR), through both edges.
    for i in 0..10 {
        let edge = if i % 2 == 0 { &eu } else { &us };
        let from = if i < 7 { "127.0.0.1" } else { "127.0.1.5" };
        assert_eq!(request_from(edge, from).await, 200);
    }
    let tunnels = seen_eu.tunnels + seen_us.tunnels + 5;
    assert_eq!(
        until_number(
            &ch,
            "SELECT (SELECT count() FROM s.tunnels) + (SELECT count() FROM s.requests)",
            tunnels + 10,
            STEP
        ),
        tunnels + 10
    );
    // Answered, so in the rollups too.
    assert_eq!(
        until_metric(&eu, "sent", seen_eu.tunnels + 5 + 5).await,
        seen_eu.tunnels + 10
    );
    assert_eq!(
        until_metric(&us, "sent", seen_us.tunnels + 5).await,
        seen_us.tunnels + 5
    );
    let stats = |q: String| {
        let eu = &eu;
        async move {
            eu.admin_request("GET", &format!("/stats?resource={q}"))
                .await
        }
    };

    // By resource: everything both edges' clients saw (tunnels are counted with the
    // clients' bytes, the five held ones' too: their bytes are read from ClickHouse).
    let (status, body) = stats("chat".into()).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"source\":\"fleet\"") && body.contains("\"granularity\":\"5m\""),
        "{body}"
    );
    let held_bytes = ch.number("SELECT sum(bytes_in) FROM s.tunnels WHERE messages_in = 0");
    let held_out = ch.number("SELECT sum(bytes_out) FROM s.tunnels WHERE messages_in = 0");
    let all = stats_sums(&body);
    assert_eq!(all.0, seen_eu.c2o + seen_us.c2o + held_bytes);
    assert_eq!(all.1, seen_eu.o2c + seen_us.o2c + held_out);
    assert_eq!(all.2, tunnels);
    assert_eq!(all.3, BTreeMap::from([("101".to_string(), tunnels)]));
    assert_eq!(all.4, 5, "five tunnels were open at once");
    // By the edge's region.
    let (_, body) = stats("chat&edge_region=us".into()).await;
    let us_only = stats_sums(&body);
    assert_eq!(
        (us_only.0, us_only.1, us_only.2),
        (seen_us.c2o, seen_us.o2c, seen_us.tunnels)
    );
    assert_eq!(us_only.4, 1);
    // By the client's region and by ISP, and for an hour.
    let (_, body) = stats("web&region=DE-BY".into()).await;
    assert_eq!(
        stats_sums(&body).3,
        BTreeMap::from([("200".to_string(), 7)])
    );
    let (_, body) = stats("web&isp=AS64501%20OtherNet&granularity=1h".into()).await;
    let fr = stats_sums(&body);
    assert_eq!(fr.3, BTreeMap::from([("200".to_string(), 3)]));
    assert_eq!(fr.1, 3 * 16);
    let (_, body) = stats("web&hostname=web.test&edge_region=eu".into()).await;
    assert_eq!(
        stats_sums(&body).3,
        BTreeMap::from([("200".to_string(), 5)])
    );
    // The hourly peak bandwidth is the busiest five minutes.
    let (_, five) = stats("chat".into()).await;
    let (_, hour) = stats("chat&granularity=1h".into()).await;
    let peak = |body: &str, key: &str| {
        let v: serde_yaml::Value = serde_yaml::from_str(body).unwrap();
        v["buckets"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|b| b[key].as_u64().unwrap())
            .max()
            .unwrap()
    };
    assert_eq!(
        peak(&hour, "bandwidth_peak_bps"),
        peak(&five, "bandwidth_avg_bps")
    );
    // Hostile filters are values, never SQL; encoded twice, decoded once.
    for q in [
        "chat&isp=%27%20OR%201%3D1%20--",
        "chat&isp=a%5C%27b",
        "chat&region=%2527",
    ] {
        let (status, body) = stats(q.into()).await;
        assert_eq!(status, 200, "{q}: {body}");
        assert_eq!(stats_sums(&body).2, 0, "{q}");
    }

    // The range rules, with what is allowed.
    let refused = [
        (
            "chat&from=2026-06-01T00:00:00Z&to=2026-09-15T00:00:00Z",
            "at most 3 months",
        ),
        (
            "chat&from=2026-11-20T00:00:00Z&to=2026-11-25T00:00:00Z&granularity=5m",
            "use 1h or 1d",
        ),
        (
            "chat&from=2026-11-20T00:00:00Z&to=2026-11-22T00:00:00Z&granularity=1d",
            "use 5m or 1h",
        ),
        (
            "chat&from=2026-09-01T00:00:00Z&to=2026-11-01T00:00:00Z&granularity=1h",
            "use 1d",
        ),
        (
            "chat&from=2025-01-01T00:00:00Z&to=2025-01-02T00:00:00Z",
            "kept 93 days",
        ),
        ("chat&granularity=1w", "not one of"),
        ("chat&region=a%0Ab", "control characters"),
        (&format!("chat&isp={}", "x".repeat(300)), "at most 256"),
        ("chat&source=cache", "not fleet or edge"),
        ("chat&source=edge&region=DE", "source=fleet"),
        (
            "chat&from=2026-11-22T00:00:00Z&to=2026-11-21T00:00:00Z",
            "before to",
        ),
    ];
    for (q, says) in refused {
        let (status, body) = stats(q.to_string()).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert!(body.contains(says), "{q}: {body}");
    }
    // The edge's own windows on request.
    let (status, body) = stats("chat&source=edge&granularity=5m".into()).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("\"source\":\"fleet\""));

    // ClickHouse away: the fleet's answer is a 502 that says so; the edge's still works.
    ch.stop();
    let (status, body) = stats("chat".into()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("ClickHouse"), "{body}");
    let (status, _) = stats("chat&source=edge&granularity=1h".into()).await;
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_grafana_dashboards_queries_run_on_the_schema_and_add_up() {
    let ch = ClickHouse::start();
    ch.migrate("wsedge");
    // 2026-11-28: tunnels and requests over the day in two regions.
    let mut rows = String::new();
    let mut total = 0u64;
    for i in 0..50u64 {
        let region = if i % 2 == 0 { "eu" } else { "us" };
        let ts = START + i * 1000;
        let (bin, bout) = (100 + i, 1000 + i * 7);
        total += bin + bout;
        rows.push_str(&format!(
            "{{\"ts\":{ts},\"opened\":{},\"edge_id\":\"e\",\"edge_region\":\"{region}\",\"resource\":\"chat\",\"hostname\":\"chat.test\",\"status\":101,\"isp\":\"AS{}\",\"client_region\":\"DE\",\"bytes_in\":{bin},\"bytes_out\":{bout},\"bytes_in_rest\":{bin},\"bytes_out_rest\":{bout}}}\n",
            ts - 30,
            64500 + i % 3
        ));
    }
    ch.query("INSERT INTO wsedge.tunnels FORMAT JSONEachRow", &rows)
        .unwrap();
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/grafana/wsedge-clickhouse.json"),
    )
    .unwrap();
    let dash: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    // The plugin's macros and variables as Grafana expands them for the day.
    let expand = |sql: &str| {
        sql.replace(
            "$__timeFilter(bucket)",
            &format!(
                "bucket >= toDateTime({START}) AND bucket <= toDateTime({})",
                START + 86_400
            ),
        )
        .replace("${resource:singlequote}", "'chat'")
        .replace("${edge_region:singlequote}", "'eu','us'")
    };
    let mut answers = BTreeMap::new();
    for v in dash["templating"]["list"].as_sequence().unwrap() {
        let got = ch.query(&format!("{} FORMAT TSV", v["query"].as_str().unwrap()), "");
        assert!(got.is_ok(), "{v:?}: {got:?}");
    }
    let values = ch
        .query(
            "SELECT DISTINCT edge_region FROM wsedge.traffic_1d ORDER BY edge_region FORMAT TSV",
            "",
        )
        .unwrap();
    assert_eq!(values, "eu\nus\n");
    for p in dash["panels"].as_sequence().unwrap() {
        let title = p["title"].as_str().unwrap().to_string();
        for t in p["targets"].as_sequence().unwrap() {
            let sql = expand(t["rawSql"].as_str().unwrap());
            assert!(!sql.contains('$'), "{title}: a macro left in {sql}");
            let got = ch
                .query(&format!("{sql} FORMAT TSV"), "")
                .unwrap_or_else(|e| panic!("{title}: {e}"));
            assert!(!got.is_empty(), "{title}: no rows");
            answers.insert(title.clone(), got);
        }
    }
    // The bandwidth panel says, over the day, what the rows carried.
    let bps = answers
        .iter()
        .find(|(t, _)| t.starts_with("Bandwidth"))
        .unwrap()
        .1;
    let bits: f64 = bps
        .lines()
        .map(|l| l.split('\t').nth(2).unwrap().parse::<f64>().unwrap() * 300.0)
        .sum();
    assert!(
        (bits - (total * 8) as f64).abs() < 1.0,
        "{bits} against {}",
        total * 8
    );
    let daily = answers
        .iter()
        .find(|(t, _)| t.starts_with("Daily"))
        .unwrap()
        .1;
    assert_eq!(daily.trim().split('\t').nth(2).unwrap(), total.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_that_never_answers_is_given_up_on_and_the_rows_wait() {
    // Accepts and reads, never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let web_origin = Origin::start(Mode::Status(200)).await;
    let spill = scratch_dir("spill");
    let yaml = format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
analytics:
  clickhouse: {{ url: "http://{addr}", batch: 5, flush: 100ms, timeout: 1s }}
  spill: {{ path: "{}" }}
resources:
  - name: web
    hostnames: ["web.test"]
    origin: {{ servers: [{{ address: "{}" }}] }}
"#,
        spill.display(),
        web_origin.addr
    );
    let edge = Edge::start(&yaml);
    let mut seen = Seen::default();
    requests_through(&edge, "web.test", 30, &mut seen).await;
    assert_eq!(
        seen.requests.get(&("web".to_string(), 200)).map(|v| v.0),
        Some(30)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, text) = edge.admin_request("GET", "/metrics").await;
    let errors = metric(&text, "wsedge_analytics_errors_total").unwrap_or(0.0);
    assert!(errors >= 1.0, "{text}");
    assert!(
        edge.log_text().contains("did not answer in time"),
        "{}",
        edge.log_text()
    );
    // Nothing lost: in memory (two batches) or on disk.
    assert_eq!(metric_of(&text, "dropped"), 0);
    assert_eq!(metric_of(&text, "sent"), 0);
    assert!(metric_of(&text, "spilled") >= 10, "{text}");
    let _ = std::fs::remove_dir_all(&spill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_files_that_are_not_whole_are_set_aside_and_the_good_ones_sent() {
    let ch = ClickHouse::start();
    ch.migrate("h");
    let web_origin = Origin::start(Mode::Status(200)).await;
    let spill = scratch_dir("spill");
    // Files of a process that is gone: a good one, one cut short, one of garbage, one
    // naming a table that is not wsedge's, and one whose id would be SQL.
    let row = |id: &str| {
        format!("{{\"ts\":{START},\"resource\":\"web\",\"status\":200,\"edge_region\":\"old\",\"batch_id\":\"{id}\"}}\n")
    };
    let file = |n: u32, body: String| {
        std::fs::write(
            spill.join(format!("00000000000000001-0999999999-{n:010}.batch")),
            body,
        )
        .unwrap()
    };
    file(
        1,
        format!(
            "good-1\trequests\t2\t{START}\t{START}\n{}{}",
            row("good-1"),
            row("good-1")
        ),
    );
    file(
        2,
        format!("cut-1\trequests\t3\t{START}\t{START}\n{}", row("cut-1")),
    );
    file(3, "\u{0}\u{1}garbage without a header".into());
    file(
        4,
        format!(
            "drop-1\tsystem.users\t1\t{START}\t{START}\n{}",
            row("drop-1")
        ),
    );
    file(
        5,
        format!(
            "x' OR 1=1 --\trequests\t1\t{START}\t{START}\n{}",
            row("evil")
        ),
    );
    let extra = format!("  spill: {{ path: \"{}\" }}", spill.display());
    let edge = Edge::start(&fleet_yaml(
        &ch,
        "h",
        web_origin.addr,
        web_origin.addr,
        "e1",
        "eu",
        &extra,
    ));
    // The good file and the one with the odd id are stored (its id is a value, never SQL).
    assert_eq!(
        until_number(
            &ch,
            "SELECT count() FROM h.requests WHERE edge_region = 'old'",
            3,
            Duration::from_secs(20)
        ),
        3,
        "{}",
        edge.log_text()
    );
    assert_eq!(until_metric(&edge, "sent", 3).await, 3);
    let mut left: Vec<String> = std::fs::read_dir(&spill)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [2, 3, 4].map(|n| format!("00000000000000001-0999999999-{n:010}.bad")),
        "{}",
        edge.log_text()
    );
    assert!(edge.log_text().contains("unreadable"));
    // And the edge serves on, its own rows sent.
    let mut seen = Seen::default();
    requests_through(&edge, "web.test", 4, &mut seen).await;
    assert_eq!(
        until_number(&ch, "SELECT count() FROM h.requests", 7, STEP),
        7
    );
    let _ = std::fs::remove_dir_all(&spill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_tunnel_reports_its_bytes_while_open_and_none_twice() {
    let ch = ClickHouse::start();
    ch.migrate("p");
    let ws_origin = Origin::start(Mode::Echo).await;
    let spill = scratch_dir("spill");
    let extra = format!(
        "  interim: 1s\n  spill: {{ path: \"{}\" }}",
        spill.display()
    );
    let edge = Edge::start(&fleet_yaml(
        &ch,
        "p",
        ws_origin.addr,
        ws_origin.addr,
        "e1",
        "eu",
        &extra,
    ));
    // One tunnel, a message each way every 200 ms for 3.5 s.
    let mut tunnel = Metered::open(&edge).await;
    let started = Instant::now();
    let mut m = 0;
    while started.elapsed() < Duration::from_millis(3500) && m < 100 {
        let body = pattern(100 + m * 13, m as u8);
        assert_eq!(
            echo_once(&mut tunnel.ws, Message::binary(body.clone())).await,
            Message::binary(body)
        );
        m += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (c2o, o2c) = tunnel.close(None).await;

    // The rollups hold every byte once: reported while open, and the rest at the close.
    let sql = "SELECT sum(bytes_in) + sum(bytes_out) FROM p.traffic_5m";
    assert_eq!(
        until_number(&ch, sql, c2o + o2c, STEP),
        c2o + o2c,
        "{}",
        edge.log_text()
    );
    assert_eq!(ch.number("SELECT sum(bytes_in) FROM p.traffic_1h"), c2o);
    assert_eq!(ch.number("SELECT sum(bytes_out) FROM p.traffic_1d"), o2c);
    // The raw row keeps the whole tunnel's bytes, and what the progress rows did not take.
    assert_eq!(ch.number("SELECT sum(bytes_in) FROM p.tunnels"), c2o);
    assert_eq!(ch.number("SELECT sum(bytes_out) FROM p.tunnels"), o2c);
    let reports = ch.number("SELECT count() FROM p.tunnel_progress");
    assert!(
        (2..=4).contains(&reports),
        "{reports} progress rows in 3.5 s at 1 s"
    );
    assert_eq!(
        ch.number("SELECT (SELECT sum(bytes_in) FROM p.tunnel_progress) + (SELECT sum(bytes_in_rest) FROM p.tunnels)"),
        c2o
    );
    assert_eq!(
        ch.number("SELECT countDistinct(ts) FROM p.tunnel_progress"),
        reports,
        "reported at different times"
    );
    let _ = std::fs::remove_dir_all(&spill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_hands_the_rows_in_memory_to_the_new_process() {
    let ch = ClickHouse::start();
    ch.migrate("u");
    let ws_origin = Origin::start(Mode::Echo).await;
    let web_origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("upgrade");
    let sock = dir.join("upgrade.sock");
    // Rows stay in memory until the old process stops (an hour's flush).
    let extra = format!("  spill: {{ path: \"{}\" }}", dir.join("spill").display());
    let yaml = fleet_yaml(&ch, "u", ws_origin.addr, web_origin.addr, "e1", "eu", &extra)
        .replace("batch: 50, flush: 200ms", "batch: 10000, flush: 1h")
        .replace(
            "pingora: { grace_period_seconds: 10 }",
            &format!(
                "pingora: {{ upgrade_sock: \"{}\", pid_file: \"{}\", grace_period_seconds: 10, graceful_shutdown_timeout_seconds: 1 }}",
                sock.display(),
                dir.join("wsedge.pid").display()
            ),
        );
    assert!(yaml.contains("upgrade_sock"));
    let mut old = Edge::start(&yaml);
    let mut seen = Seen::default();
    tunnels_through(&old, 3, 2, &mut seen).await;
    requests_through(&old, "web.test", 12, &mut seen).await;
    assert_eq!(ch.number("SELECT count() FROM u.requests"), 0);

    let path = old.dir.join("wsedge.yaml");
    let new_dir = scratch_dir("upgrade-new");
    let new = tokio::task::spawn_blocking(move || Edge::start_file(&path, new_dir, &["-u"]));
    let deadline = Instant::now() + STEP;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no upgrade socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new process listens on the socket, then waits in accept: a moment's head start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    old.signal("QUIT");
    let new = within("the new process takes over", new).await.unwrap();
    assert!(old.wait_exit(STEP), "{}", old.log_text());
    // The old process spilled its rows; the new one finds its files once it has ended.
    assert_eq!(
        until_number(
            &ch,
            "SELECT count() FROM u.requests",
            12,
            Duration::from_secs(30)
        ),
        12,
        "old:\n{}\nnew:\n{}",
        old.log_text(),
        new.log_text()
    );
    assert_eq!(
        until_number(&ch, "SELECT count() FROM u.tunnels", 3, STEP),
        3
    );
    assert_eq!(
        tunnel_sums(&ch, "u", "tunnels", "eu"),
        (seen.tunnels, seen.c2o, seen.o2c)
    );
    assert!(
        old.log_text().contains("spilled for the next process"),
        "{}",
        old.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_queries_past_two_at_once_are_told_to_come_back() {
    // A ClickHouse that accepts and never answers: every query waits out its timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let dir = scratch_dir("busy");
    let yaml = format!(
        "listen: {{ http: [\"127.0.0.1:0\"] }}\nanalytics:\n  clickhouse: {{ url: \"http://{addr}\", timeout: 2s }}\n  spill: {{ path: \"{}\" }}\nresources:\n  - name: chat\n    hostnames: [chat.test]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n",
        dir.display()
    );
    let edge = Edge::start(&yaml);
    let edge = std::sync::Arc::new(edge);
    let asks = (0..6).map(|_| {
        let edge = edge.clone();
        tokio::spawn(async move { edge.admin_request("GET", "/stats?resource=chat").await })
    });
    let answers: Vec<(u16, String)> = within("six queries", futures_util::future::join_all(asks))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let count = |s: u16| answers.iter().filter(|(st, _)| *st == s).count();
    assert_eq!(count(502), 2, "{answers:?}");
    assert_eq!(count(503), 4, "{answers:?}");
    assert!(answers
        .iter()
        .any(|(s, b)| *s == 503 && b.contains("try again")));
    assert!(answers
        .iter()
        .any(|(s, b)| *s == 502 && b.contains("did not answer in time")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server on loopback that answers every request on it with `answer` (read a little of
/// the request first), then closes: a ClickHouse gone wrong.
async fn answering(answer: Vec<u8>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clickhouse_answers_are_errors_and_the_rows_wait() {
    let web_origin = Origin::start(Mode::Status(200)).await;
    let huge = {
        let mut a = b"HTTP/1.1 200 OK\r\nContent-Length: 20971520\r\n\r\n".to_vec();
        a.resize(a.len() + (20 << 20), b'1');
        a
    };
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "not HTTP",
            b"\x00\x01garbage that is not HTTP\r\n\r\n".to_vec(),
            "cannot reach ClickHouse",
        ),
        ("20 MiB", huge, "reading its answer: length limit exceeded"),
        (
            "an error page",
            b"HTTP/1.1 500 Internal\r\nContent-Length: 22\r\n\r\nCode: 1\x07\x1b[31m evil\nnext"
                .to_vec(),
            "ClickHouse refused (500): Code: 1[31m evil",
        ),
    ];
    for (what, answer, says) in cases {
        let addr = answering(answer).await;
        let dir = scratch_dir("hostile-ch");
        let yaml = format!(
            "listen: {{ http: [\"127.0.0.1:0\"] }}\nanalytics:\n  clickhouse: {{ url: \"http://{addr}\", batch: 5, flush: 100ms, timeout: 2s }}\n  spill: {{ path: \"{}\" }}\nresources:\n  - name: web\n    hostnames: [web.test]\n    origin: {{ servers: [{{ address: \"{}\" }}] }}\n",
            dir.display(),
            web_origin.addr
        );
        let edge = Edge::start(&yaml);
        // /stats for the fleet: a 502 that says what went wrong, one line, no control
        // characters.
        let (status, body) = edge.admin_request("GET", "/stats?resource=web").await;
        assert_eq!(status, 502, "{what}: {body}");
        assert!(body.contains(says), "{what}: {body}");
        assert!(
            !body.contains('\u{7}') && !body.contains("next"),
            "{what}: {body}"
        );
        // Rows: served, counted as not stored, nothing dropped.
        let mut seen = Seen::default();
        requests_through(&edge, "web.test", 10, &mut seen).await;
        assert_eq!(
            seen.requests.get(&("web".to_string(), 200)).map(|v| v.0),
            Some(10)
        );
        let end = Instant::now() + STEP;
        loop {
            let (_, text) = edge.admin_request("GET", "/metrics").await;
            let errors = metric(&text, "wsedge_analytics_errors_total").unwrap_or(0.0);
            if errors >= 1.0 || Instant::now() > end {
                assert!(errors >= 1.0, "{what}: {text}");
                assert_eq!(metric_of(&text, "sent"), 0, "{what}");
                assert_eq!(metric_of(&text, "dropped"), 0, "{what}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
