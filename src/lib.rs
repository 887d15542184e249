//! # wsedge
//!
//! The WebSocket feature of a CDN edge, on Cloudflare's [Pingora](https://github.com/cloudflare/pingora).
//! Operators declare CDN *resources* in YAML (hostnames, an origin group, WebSocket policy);
//! each request is matched to a resource by Host, plain HTTP is proxied, and WebSocket
//! upgrades are checked against RFC 6455 and the resource's settings before any origin is
//! contacted, then relayed for as long as both sides want, within the resource's idle
//! timeout.
//!
//! The binary is `wsedge -c wsedge.yaml`. To run the same edge in a Pingora server of your
//! own, load a [`Config`] and add an [`Edge`] to the server (`examples/embed.rs` is the
//! whole program: `cargo run --example embed -- conf/demo.yaml`):
//!
//! ```no_run
//! use pingora::server::Server;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = wsedge::Config::load("conf/demo.yaml")?;
//! let mut server = Server::new_with_opt_and_conf(None, wsedge::server_conf(&config));
//! server.bootstrap();
//! wsedge::Edge::build(config, &server.configuration)?
//!     .with_admin()
//!     .add_to(&mut server);
//! // ... add your own services here ...
//! server.run_forever();
//! # }
//! ```
//!
//! Or use the pieces from a `ProxyHttp` of your own: [`EdgeProxy`] is wsedge's, and the
//! checks are pure functions over a request header and a [`Resource`]:
//! [`handshake::check`] (RFC 6455), [`gate::check`] and [`gate::admit`] (the resource's
//! policy), [`path::normalize`] and [`host::valid_host`].
//!
//! The modules read in the order a request travels, each using only those before it:
//! `syntax` and `config` (what the operator and the client wrote), `observe` (what is
//! counted and logged), `policy` (whether a request may go on), `sites` (the resources as
//! served: routing, origin groups, certificates), `streams` and `tunnel` (the relay after
//! the 101), `request` (the header guard and the hooks), `ops` (reload, admin, background
//! services), `fleet` (resources from etcd: the watch, the last-known-good file,
//! `wsedge resource`) and `app` (putting it together). docs/design.md tells the same story.
#![deny(missing_docs)]

mod app;
mod config;
mod deadline;
#[cfg(feature = "demo")]
mod demo;
pub mod fleet;
mod observe;
mod ops;
mod os;
mod policy;
mod request;
mod sites;
mod streams;
mod syntax;
mod tunnel;

pub use app::{healthcheck, init_logging, run, server_conf, Edge, Options, RunError};
pub use config::store::{EtcdSettings, Snapshot};
pub use config::{Config, ConfigError, Resource};
pub use observe::access_log::AccessLog;
pub use observe::analytics::Feed;
pub use observe::labels::{CloseReason, HandshakeOutcome};
pub use observe::metrics::EdgeStats;
pub use policy::answer::Answer;
pub use policy::{gate, handshake};
pub use request::proxy::{EdgeProxy, RequestCtx};
pub use sites::router::{Lasting, Router, SharedRouter};
pub use syntax::{host, path};

/// The README's Rust snippets, compiled as doc tests so that they cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
