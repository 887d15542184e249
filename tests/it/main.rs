//! The integration suite, one binary: a real wsedge process, real clients and origins on
//! loopback, one module per feature (linked once, which matters on a two-core builder).
//! `WSEDGE_BIN=/path/to/wsedge cargo test --test it` runs it against another build.

mod common;

mod analytics;
mod answers;
mod config;
mod container;
mod demo;
mod drain;
mod fleet;
mod fresh_tunnels;
mod h2ws;
mod handshake_props;
mod hardening;
mod idle;
mod layers;
mod live_ops;
mod observe;
mod origin_groups;
mod origin_tls;
mod protection;
mod speaks;
mod tls;
mod tunnel;
mod watch;
