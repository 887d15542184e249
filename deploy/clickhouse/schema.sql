-- wsedge fleet statistics in ClickHouse (issue 18): the raw rows every edge sends, and
-- rollups at 5 minutes, 1 hour and 1 day kept by materialized views.
-- Apply with scripts/clickhouse-migrate (it replaces the database name `wsedge` and drops
-- partitions past their retention). Written for the SQL that ClickHouse 18.16 (Debian's
-- package, what the tests run) accepts; on ClickHouse 19.6 or later, production would add
-- `TTL toDate(ts) + INTERVAL 93 DAY` (and toDate(bucket) with 93, 186, 366) to each table
-- instead of the prune, and
-- LowCardinality(String) for the dimension columns.
-- Tables are partitioned by day (YYYYMMDD), which the prune drops.
-- Statements end with `;` at the end of a line; every one may run again (IF NOT EXISTS).

CREATE DATABASE IF NOT EXISTS wsedge;

-- One row per closed tunnel: the access line's fields, the edge, and the client's network.
CREATE TABLE IF NOT EXISTS wsedge.tunnels (
    ts DateTime,                 -- when it closed
    opened DateTime,             -- when the 101 (or h2's 200) went out
    edge_id String,
    edge_region String,
    resource String,
    hostname String,
    protocol String,             -- http/1.1 or h2
    status UInt16,
    close_reason String,
    client_country String,
    client_region String,
    client_asn UInt32,
    isp String,
    bytes_in UInt64,             -- client to origin
    bytes_out UInt64,            -- origin to client
    messages_in UInt64,
    messages_out UInt64,
    duration_ms UInt64,
    opened_ms UInt64,            -- opened and ts to the millisecond (peak open tunnels)
    closed_ms UInt64,
    bytes_in_rest UInt64,        -- of bytes_in and bytes_out, what no tunnel_progress row
    bytes_out_rest UInt64,       -- reported (the rollups count these at the close)
    batch_id String
) ENGINE = MergeTree() PARTITION BY toYYYYMMDD(ts) ORDER BY (resource, ts);

-- One row per plain request (and per refused upgrade).
CREATE TABLE IF NOT EXISTS wsedge.requests (
    ts DateTime,
    edge_id String,
    edge_region String,
    resource String,
    hostname String,
    method String,
    status UInt16,
    client_country String,
    client_region String,
    client_asn UInt32,
    isp String,
    bytes_in UInt64,
    bytes_out UInt64,
    duration_ms UInt64,
    batch_id String
) ENGINE = MergeTree() PARTITION BY toYYYYMMDD(ts) ORDER BY (resource, ts);

-- Bytes an open tunnel moved since its last report (every analytics.interim while data
-- flows), so that a long tunnel's traffic lands in the buckets it happened in.
CREATE TABLE IF NOT EXISTS wsedge.tunnel_progress (
    ts DateTime,
    edge_id String,
    edge_region String,
    resource String,
    hostname String,
    status UInt16,
    client_country String,
    client_region String,
    client_asn UInt32,
    isp String,
    bytes_in UInt64,
    bytes_out UInt64,
    batch_id String
) ENGINE = MergeTree() PARTITION BY toYYYYMMDD(ts) ORDER BY (resource, ts);

-- The rollups: per bucket and dimension, bytes each way, tunnels opened and closed, and
-- requests (SummingMergeTree adds rows of equal keys up; queries still sum, since merges
-- happen when they do).
CREATE TABLE IF NOT EXISTS wsedge.traffic_5m (
    bucket DateTime,
    resource String,
    hostname String,
    edge_region String,
    client_region String,
    isp String,
    status UInt16,
    bytes_in UInt64,
    bytes_out UInt64,
    tunnels_opened UInt64,
    tunnels_closed UInt64,
    requests UInt64
) ENGINE = SummingMergeTree((bytes_in, bytes_out, tunnels_opened, tunnels_closed, requests))
  PARTITION BY toYYYYMMDD(bucket)
  ORDER BY (resource, bucket, hostname, edge_region, client_region, isp, status);

CREATE TABLE IF NOT EXISTS wsedge.traffic_1h AS wsedge.traffic_5m
  ENGINE = SummingMergeTree((bytes_in, bytes_out, tunnels_opened, tunnels_closed, requests))
  PARTITION BY toYYYYMMDD(bucket)
  ORDER BY (resource, bucket, hostname, edge_region, client_region, isp, status);

CREATE TABLE IF NOT EXISTS wsedge.traffic_1d AS wsedge.traffic_5m
  ENGINE = SummingMergeTree((bytes_in, bytes_out, tunnels_opened, tunnels_closed, requests))
  PARTITION BY toYYYYMMDD(bucket)
  ORDER BY (resource, bucket, hostname, edge_region, client_region, isp, status);

-- Each granularity reads the raw rows itself: ClickHouse 18.16 does not pass rows that a
-- view wrote into traffic_5m on to traffic_5m's own views (tried: the hourly and daily
-- tables stayed empty), so the 1 h and 1 d views cannot be fed from the 5-minute table.

-- Closed tunnels: the close, and the bytes no progress row reported, in the bucket of the
-- close.
CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.tunnels_closed_5m TO wsedge.traffic_5m AS
  SELECT toStartOfFiveMinute(ts) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in_rest) AS bytes_in,
         sum(bytes_out_rest) AS bytes_out, toUInt64(0) AS tunnels_opened,
         count() AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnels
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.tunnels_closed_1h TO wsedge.traffic_1h AS
  SELECT toStartOfHour(ts) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in_rest) AS bytes_in,
         sum(bytes_out_rest) AS bytes_out, toUInt64(0) AS tunnels_opened,
         count() AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnels
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.tunnels_closed_1d TO wsedge.traffic_1d AS
  SELECT toDateTime(toDate(ts)) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in_rest) AS bytes_in,
         sum(bytes_out_rest) AS bytes_out, toUInt64(0) AS tunnels_opened,
         count() AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnels
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

-- Opened tunnels: counted in the bucket of the opening.
CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.tunnels_opened_5m TO wsedge.traffic_5m AS
  SELECT toStartOfFiveMinute(opened) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, toUInt64(0) AS bytes_in,
         toUInt64(0) AS bytes_out, count() AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnels
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.tunnels_opened_1h TO wsedge.traffic_1h AS
  SELECT toStartOfHour(opened) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, toUInt64(0) AS bytes_in,
         toUInt64(0) AS bytes_out, count() AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnels
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.tunnels_opened_1d TO wsedge.traffic_1d AS
  SELECT toDateTime(toDate(opened)) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, toUInt64(0) AS bytes_in,
         toUInt64(0) AS bytes_out, count() AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnels
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

-- Plain requests.
CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.requests_5m TO wsedge.traffic_5m AS
  SELECT toStartOfFiveMinute(ts) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in) AS bytes_in,
         sum(bytes_out) AS bytes_out, toUInt64(0) AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, count() AS requests
  FROM wsedge.requests
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.requests_1h TO wsedge.traffic_1h AS
  SELECT toStartOfHour(ts) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in) AS bytes_in,
         sum(bytes_out) AS bytes_out, toUInt64(0) AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, count() AS requests
  FROM wsedge.requests
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.requests_1d TO wsedge.traffic_1d AS
  SELECT toDateTime(toDate(ts)) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in) AS bytes_in,
         sum(bytes_out) AS bytes_out, toUInt64(0) AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, count() AS requests
  FROM wsedge.requests
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

-- Open tunnels' progress: bytes in the bucket they were reported in.
CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.progress_5m TO wsedge.traffic_5m AS
  SELECT toStartOfFiveMinute(ts) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in) AS bytes_in,
         sum(bytes_out) AS bytes_out, toUInt64(0) AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnel_progress
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.progress_1h TO wsedge.traffic_1h AS
  SELECT toStartOfHour(ts) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in) AS bytes_in,
         sum(bytes_out) AS bytes_out, toUInt64(0) AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnel_progress
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS wsedge.progress_1d TO wsedge.traffic_1d AS
  SELECT toDateTime(toDate(ts)) AS bucket, resource, hostname,
         edge_region, client_region, isp, status, sum(bytes_in) AS bytes_in,
         sum(bytes_out) AS bytes_out, toUInt64(0) AS tunnels_opened,
         toUInt64(0) AS tunnels_closed, toUInt64(0) AS requests
  FROM wsedge.tunnel_progress
  GROUP BY bucket, resource, hostname, edge_region, client_region, isp, status;
