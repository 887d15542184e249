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
pub mod os;
pub mod path;
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
    /// The configuration is valid but could not be built into a resource table: a defect,
    /// reported instead of a panic.
    #[error("{file}: cannot build the resource table: {why}")]
    Build {
        /// The configuration file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// The access log file could not be opened.
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        /// The configured target.
        target: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The demo origin could not start.
    #[error("cannot start the demo origin on {addr}: {source}")]
    Demo {
        /// Where it tried to listen.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Builds Pingora's `ServerConf` from the file's `pingora:` section (validated at load,
/// kept as text because `ServerConf` is not `Clone`).
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

/// Builds the resource table as a start would, turning a panic into an error: `-t` and
/// the start itself use it, so a file `-t` accepts also starts.
fn build_table(config: &Config, stats: &stats::EdgeStats) -> Result<Resources, RunError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| resources(config, stats))).map_err(
        |panic| RunError::Build {
            file: config.source.display().to_string(),
            why: panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into()),
        },
    )
}

/// Runs wsedge as the command line asked. Returns for `-t`, on an error, or once the
/// server has shut down (with its access log flushed).
pub fn run(opts: Options) -> Result<(), RunError> {
    let mut config = Config::load(&opts.config)?;
    for w in &config.warnings {
        eprintln!("wsedge: warning: {w}");
    }
    if opts.test {
        build_table(&config, &stats::EdgeStats::default())?;
        println!(
            "wsedge: the configuration file {} syntax is ok ({} resources)",
            opts.config.display(),
            config.resources.len()
        );
        return Ok(());
    }
    match os::raise_nofile_limit() {
        Ok(n) => log::info!("open files: up to {n} (each connection takes one, a tunnel two)"),
        Err(e) => log::warn!("cannot read the open-file limit: {e}"),
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
    let table = build_table(&config, &stats)?;
    let access_log = Arc::new(
        access_log::AccessLog::open(&config.access_log, stats.access_log_dropped()).map_err(
            |source| RunError::AccessLog {
                target: format!("{:?}", config.access_log),
                source,
            },
        )?,
    );
    let proxy = EdgeProxy::new(table.clone(), stats.clone())
        .with_access_log(access_log.clone())
        .with_metrics(config.metrics)
        .with_unbuffered_listeners(true);
    let mut http = pingora::proxy::http_proxy(&server.configuration, proxy);
    // An HTTP/2 connection without a stream is closed after the keep-alive timeout, and
    // its header blocks are held to the same limit as HTTP/1.1 headers (431).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(config.client.keepalive_timeout);
    http.server_options = Some(options);
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_header_list_size(u32::try_from(config.client.max_header_bytes).unwrap_or(u32::MAX));
    http.h2_options = Some(h2);
    let http = Arc::new(http);
    let guard = || {
        listener::HeaderGuard::new(http.clone(), config.client)
            .with_reporting(access_log.clone(), stats.clone())
    };
    // Pingora puts a 64 KiB read buffer under every client connection by default. Nothing
    // here reads in small pieces (the header guard, Pingora's parsers and the tunnel relay
    // all read into buffers of their own), so it would only cost memory per connection.
    let l4 = pingora::listeners::L4BufferSettings::default().read(0);
    let listener = |addr: &std::net::SocketAddr| {
        pingora::listeners::ListenerConfig::tcp(addr.to_string()).l4_buffer(l4)
    };
    if !config.listen.http.is_empty() {
        let mut service = pingora::services::listening::Service::new("wsedge".into(), guard());
        for addr in &config.listen.http {
            service.add_listener(listener(addr));
        }
        server.add_service(service);
    }
    if !config.listen.https.is_empty() {
        // The TLS listeners are TCP listeners to Pingora: the guard makes the handshake,
        // under the header deadline (Pingora would wait 60 s for a ClientHello).
        let mut settings =
            pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(tls::RecordSni))
                .map_err(|e| RunError::Build {
                    file: config.source.display().to_string(),
                    why: format!("TLS: {e}"),
                })?;
        settings.set_cert_resolver(Arc::new(tls::SniResolver::new(table.clone())));
        // h2 for plain requests; WebSocket upgrades stay on HTTP/1.1 (no RFC 8441), and
        // browsers open WebSockets on a connection of their own, offering http/1.1.
        settings.enable_h2();
        let acceptor = Arc::new(settings.build());
        let mut service = pingora::services::listening::Service::new(
            "wsedge tls".into(),
            guard().with_tls(acceptor),
        );
        for addr in &config.listen.https {
            service.add_listener(listener(addr));
        }
        server.add_service(service);
    }

    let admin_addr = config.admin.addr;
    let stats_for_ticker = stats.clone();
    let table_for_checks = table.clone();
    let mut wanted = config.listen.http.clone();
    wanted.extend(&config.listen.https);
    let http_count = config.listen.http.len();
    let first_host = config.resources[0].hostnames[0].replace("*.", "www.");
    let reloader = Arc::new(
        reload::Reloader::new(config, table, stats.clone()).with_access_log(access_log.clone()),
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
        reload::SighupReload(reloader.clone()),
    ));
    server.add_service(pingora::services::background::background_service(
        "reopen the access log on SIGUSR1",
        reload::ReopenOnUsr1(reloader),
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
    server.run(pingora::server::RunArgs::default());
    // Tunnels cut at shutdown were logged as the runtimes dropped them: write those lines.
    access_log.flush(Duration::from_secs(5));
    Ok(())
}
