//! What the edge tells operators: the labels of metrics and logs ([`labels`]), Prometheus
//! metrics per resource ([`metrics`]) and the `/stats` windows behind them ([`windows`]),
//! the access log and the process's own log, written off the hot path ([`access_log`]),
//! the time format they share ([`time`]), and the rows of fleet statistics for ClickHouse
//! ([`analytics`]).

pub mod access_log;
pub mod analytics;
pub mod labels;
pub mod metrics;
pub mod stats_api;
pub mod time;
pub mod windows;
