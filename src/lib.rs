//! # wsedge
//!
//! The WebSocket feature of a CDN edge, on Cloudflare's [Pingora](https://github.com/cloudflare/pingora).
//! Operators declare CDN *resources* in YAML (hostnames, an origin group, WebSocket policy);
//! each request is matched to a resource by Host, plain HTTP is proxied, and WebSocket
//! upgrades are checked against RFC 6455 and the resource's settings before any origin is
//! contacted, then relayed for as long as both sides want, within the resource's idle
//! timeout.
//!
//! The binary is `wsedge -c wsedge.yaml`. To embed wsedge in a Pingora server of your own,
//! load a [`Config`], build an [`EdgeProxy`] over its resources and add it as an HTTP proxy
//! service; `examples/embed.rs` does exactly that:
//!
//! ```text
//! cargo run --example embed -- conf/demo.yaml
//! ```
//!
//! Or call the gate from your own `ProxyHttp`: [`handshake::check`] and [`gate::check`]
//! are pure functions over the request header and the resource.
#![deny(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod config;
pub mod demo;
pub mod frames;
pub mod gate;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod listening;
pub mod origin;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod stats;
pub mod tls;
pub mod tunnel;

pub use config::{Config, ConfigError, Resource};
pub use proxy::{EdgeProxy, RequestCtx, Resources};
pub use routing::Router;

use arc_swap::ArcSwap;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The configuration file (`-c`).
    pub config: PathBuf,
    /// Check the configuration and exit (`-t`).
    pub test: bool,
    /// Run in the background (`-d`, Pingora's).
    pub daemon: bool,
    /// Take the listening sockets over from a running wsedge (`-u`, Pingora's).
    pub upgrade: bool,
    /// Also start the built-in demo origin on the first resource's first server address.
    pub demo: bool,
}

/// Why wsedge could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The access log file could not be opened.
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        /// The configured target.
        target: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TLS listeners could not be set up.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The demo origin could not start.
    #[error("cannot start the demo origin on {addr}: {source}")]
    Demo {
        /// Where it tried to listen.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Builds Pingora's `ServerConf` from the file's `pingora:` section.
pub fn server_conf(config: &Config) -> ServerConf {
    config
        .pingora_yaml
        .as_deref()
        .and_then(|y| ServerConf::from_yaml(y).ok())
        .or_else(ServerConf::new)
        .unwrap_or_default()
}

/// The shareable resource table for a configuration, counting into `stats`.
pub fn resources(config: &Config, stats: &stats::EdgeStats) -> Resources {
    Arc::new(ArcSwap::from_pointee(Router::new(config, stats)))
}

/// Runs wsedge as the command line asked. Returns only for `-t` or on an error.
pub fn run(opts: Options) -> Result<(), RunError> {
    let mut config = Config::load(&opts.config)?;
    for w in &config.warnings {
        eprintln!("wsedge: warning: {w}");
    }
    if opts.test {
        println!(
            "wsedge: the configuration file {} syntax is ok ({} resources)",
            opts.config.display(),
            config.resources.len()
        );
        return Ok(());
    }

    let mut demo_addr = None;
    if opts.demo {
        let addr = config.resources[0].origin.servers[0].addr;
        let bound = demo::spawn(addr).map_err(|source| RunError::Demo { addr, source })?;
        if bound != addr {
            // Port 0 in the file: point every server at that address to the bound one.
            for r in &mut config.resources {
                let r = Arc::make_mut(r);
                for s in &mut r.origin.servers {
                    if s.addr == addr {
                        s.addr = bound;
                    }
                }
            }
        }
        println!("wsedge: demo origin on {bound}");
        demo_addr = Some(bound);
    }

    let pingora_opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(pingora_opt, server_conf(&config));
    server.bootstrap();
    let stats = Arc::new(stats::EdgeStats::default());
    let table = resources(&config, &stats);
    let access_log =
        access_log::AccessLog::open(&config.access_log).map_err(|source| RunError::AccessLog {
            target: format!("{:?}", config.access_log),
            source,
        })?;
    let proxy = EdgeProxy::new(table.clone(), stats.clone())
        .with_access_log(access_log)
        .with_metrics(config.metrics)
        .with_unbuffered_listeners(true);
    let app = listener::HeaderGuard::new(
        pingora::proxy::http_proxy(&server.configuration, proxy),
        config.client,
    );
    let mut service = pingora::services::listening::Service::new("wsedge".to_string(), app);
    // Pingora puts a 64 KiB read buffer under every client connection by default. Nothing
    // here reads in small pieces (the header guard, Pingora's parsers and the tunnel relay
    // all read into buffers of their own), so it would only cost memory per connection.
    let l4 = pingora::listeners::L4BufferSettings::default().read(0);
    for addr in &config.listen.http {
        service
            .add_listener(pingora::listeners::ListenerConfig::tcp(addr.to_string()).l4_buffer(l4));
    }
    let resolver = Arc::new(tls::SniResolver::new(tls::CertTable::new(&config)));
    for addr in &config.listen.https {
        let mut settings =
            pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(tls::RecordSni))
                .map_err(|e| RunError::Tls(e.to_string()))?;
        settings.set_cert_resolver(resolver.clone());
        // h2 for plain requests; WebSocket upgrades stay on HTTP/1.1 (no RFC 8441), and
        // browsers open WebSockets on a connection of their own, offering http/1.1.
        settings.enable_h2();
        service.add_listener(
            pingora::listeners::ListenerConfig::tcp(addr.to_string())
                .tls(settings)
                .l4_buffer(l4),
        );
    }
    server.add_service(service);

    let admin_addr = config.admin;
    let stats_for_ticker = stats.clone();
    let table_for_checks = table.clone();
    let mut wanted = config.listen.http.clone();
    wanted.extend(&config.listen.https);
    let http_count = config.listen.http.len();
    let reloader = Arc::new(
        reload::Reloader::new(config.clone(), table, stats.clone()).with_certificates(resolver),
    );
    let mut admin = pingora::services::listening::Service::new(
        "wsedge admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(admin::Admin {
            stats,
            reloader: reloader.clone(),
        }),
    );
    admin.add_tcp(&admin_addr.to_string());
    server.add_service(admin);
    server.add_service(pingora::services::background::background_service(
        "reload on SIGHUP",
        reload::SighupReload(reloader),
    ));
    server.add_service(pingora::services::background::background_service(
        "origin health checks",
        origin::HealthChecker(table_for_checks),
    ));
    server.add_service(pingora::services::background::background_service(
        "stats windows",
        stats::Ticker(stats_for_ticker),
    ));
    wanted.push(admin_addr);
    let first_host = config.resources[0].hostnames[0].replace("*.", "www.");
    std::thread::spawn(move || {
        let exclude: Vec<_> = demo_addr.into_iter().collect();
        match listening::wait_for(&wanted, &exclude, Duration::from_secs(30)) {
            Some(mut bound) => {
                let admin = bound.pop();
                for (i, a) in bound.iter().enumerate() {
                    let scheme = if i < http_count { "http" } else { "https" };
                    println!("wsedge: listening on {scheme}://{a}");
                }
                if let Some(a) = admin {
                    println!("wsedge: admin on http://{a}");
                }
                if demo_addr.is_some() {
                    let port = bound[0].port();
                    let scheme = if http_count > 0 { "http" } else { "https" };
                    println!("wsedge: demo ready: open {scheme}://{first_host}:{port}/ (resolve {first_host} to 127.0.0.1), or:");
                    println!("  curl -k -H 'Host: {first_host}' {scheme}://127.0.0.1:{port}/");
                }
            }
            None => eprintln!("wsedge: listeners did not come up within 30s"),
        }
    });
    server.run_forever()
}
