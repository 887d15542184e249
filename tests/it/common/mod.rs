//! Test harness: a real wsedge process on loopback ([`edge`]), real origins in-process
//! ([`origin`]), real clients and raw HTTP ([`wire`]), a CA made at test time ([`pki`]).
//! Ports are 0 everywhere; readiness is the `listening on` line wsedge prints. Every wait
//! is under a timeout.
#![allow(dead_code)]

pub mod clickhouse;
pub mod edge;
pub mod etcd;
pub mod h2ws;
pub mod mmdb;
pub mod origin;
pub mod pki;
pub mod raw;
pub mod wire;

pub use clickhouse::*;
pub use edge::*;
pub use etcd::*;
pub use h2ws::*;
pub use origin::*;
pub use pki::*;
pub use wire::*;
