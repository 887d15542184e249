//! Running an edge: [`Edge`] builds everything a configuration asks for (the proxy behind
//! its header guard on every listener, the background services, the admin listener), for
//! the `wsedge` binary ([`run`]) and for a Pingora server of an embedder's own alike.

use crate::config::Config;
use crate::observe::access_log::{error_log_dropped, AccessLog, ErrorLog, LineWriter};
use crate::observe::analytics::{self, Feed};
use crate::observe::metrics::EdgeStats;
use crate::ops::drain::{DrainOnShutdown, OnDrained};
use crate::ops::reload::Reloader;
use crate::ops::{admin, ready, services};
use crate::policy::drain::Drain;
use crate::request::header_guard::HeaderGuard;
use crate::request::proxy::EdgeProxy;
use crate::sites::router::{Lasting, Router, SharedRouter};
use crate::sites::tls::{RecordSni, SniResolver};
use crate::ConfigError;
use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::net::SocketAddr;
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
    /// The configuration is valid but could not be built into what serves it: a defect,
    /// reported instead of a panic.
    #[error("{file}: cannot build the edge: {why}")]
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
    /// Port-0 listeners sharing an IP could not be given free ports.
    #[error("cannot find free ports for the port-0 listeners: {source}")]
    Port {
        /// What the OS said.
        source: std::io::Error,
    },
    /// A start that cannot go on (etcd and the last-known-good file both unreadable, the
    /// upgrade socket's directory not writable, `--demo` on a real configuration), with
    /// what to do.
    #[error("{0}")]
    Start(String),
    /// The demo origin could not start.
    #[error("cannot start the demo origin on {addr}: {source}")]
    Demo {
        /// Where it tried to listen.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Pingora's `ServerConf` from the file's `pingora:` section (validated at load).
///
/// Unless the section sets `work_stealing`, wsedge turns it off: each of the `threads`
/// runs a runtime of its own, as nginx's workers are processes of their own. A
/// connection, its origin connection and its tunnel then stay on the thread that took
/// the connection, and handing the relay to a task of its own or waking it for a message
/// does not wake another thread (measured in docs/benchmarks.md, issue 19).
pub fn server_conf(config: &Config) -> ServerConf {
    let yaml = config.pingora_yaml.as_deref();
    let mut conf = yaml
        .and_then(|y| ServerConf::from_yaml(y).ok())
        .or_else(ServerConf::new)
        .unwrap_or_default();
    let set = yaml
        .and_then(|y| serde_yaml::from_str::<serde_yaml::Mapping>(y).ok())
        .is_some_and(|m| m.contains_key("work_stealing"));
    if !set {
        conf.work_stealing = false;
    }
    conf
}

/// Builds the resource table as a start would, turning a panic into an error: `-t` and
/// the start itself use it, so a file `-t` accepts also starts.
fn build_router(config: &Config, lasting: &Lasting) -> Result<SharedRouter, RunError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Router::new(config, lasting)
    }))
    .map(|router| Arc::new(ArcSwap::from_pointee(router)))
    .map_err(|panic| RunError::Build {
        file: config.source.display().to_string(),
        why: panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
    })
}

/// An edge built from a configuration, to add to a Pingora server: the proxy behind the
/// header guard on every listener of `listen` (TLS listeners with the certificates of the
/// resources), origin health checks, the `/stats` ticker, reload on SIGHUP and reopening
/// the access log on SIGUSR1; with [`Edge::with_admin`], the admin listener. The binary and
/// `examples/embed.rs` run the same edge.
pub struct Edge {
    config: Config,
    router: SharedRouter,
    lasting: Arc<Lasting>,
    access_log: Arc<AccessLog>,
    reloader: Arc<Reloader>,
    services: Vec<Box<dyn ServiceWithDependents>>,
    on_drained: Option<OnDrained>,
    analytics: Option<Arc<Feed>>,
}

impl Edge {
    /// Builds the edge for `config` with the server's configuration `server_conf`
    /// (`server.configuration`).
    pub fn build(config: Config, server_conf: &Arc<ServerConf>) -> Result<Edge, RunError> {
        let stats = Arc::new(EdgeStats::default());
        let lasting = Arc::new(Lasting::new(stats.clone()));
        lasting.drain.set_settings(config.drain);
        let router = build_router(&config, &lasting)?;
        let access_log =
            AccessLog::open(&config.access_log, stats.access_log_dropped()).map_err(|source| {
                RunError::AccessLog {
                    target: format!("{:?}", config.access_log),
                    source,
                }
            })?;
        let access_log = Arc::new(access_log);
        let analytics = config
            .analytics
            .as_ref()
            .map(|a| Feed::new(a, analytics::Counters::new(&stats)));
        let reloader = Arc::new(
            Reloader::new(config.clone(), router.clone(), lasting.clone())
                .with_access_log(access_log.clone())
                .with_analytics(analytics.clone()),
        );
        let mut edge = Edge {
            config,
            router,
            lasting,
            access_log,
            reloader,
            services: Vec::new(),
            on_drained: None,
            analytics,
        };
        if let (Some(feed), Some(settings)) = (&edge.analytics, &edge.config.analytics) {
            edge.services.push(Box::new(background_service(
                "analytics to ClickHouse",
                analytics::ship::Shipper::new(feed.clone(), settings),
            )));
        }
        edge.add_listeners(server_conf)?;
        let (router, stats, reloader) = (edge.router.clone(), stats, edge.reloader.clone());
        edge.services.push(Box::new(background_service(
            "origin health checks",
            services::HealthChecker(router),
        )));
        edge.services.push(Box::new(background_service(
            "stats windows",
            services::Ticker(stats),
        )));
        edge.services.push(Box::new(background_service(
            "reload on SIGHUP",
            services::SighupReload(reloader.clone()),
        )));
        if let Some(settings) = &edge.config.etcd {
            edge.services.push(Box::new(background_service(
                "watch etcd",
                crate::fleet::watch::WatchEtcd::new(reloader.clone(), settings.clone()),
            )));
        }
        if edge.config.watch {
            edge.services.push(Box::new(background_service(
                "reload when the file changes",
                crate::ops::watch::WatchFile(reloader.clone()),
            )));
        }
        edge.services.push(Box::new(background_service(
            "reopen the access log on SIGUSR1",
            services::ReopenOnUsr1(reloader),
        )));
        Ok(edge)
    }

    /// The proxy on the `listen` addresses: plain listeners in one service, TLS listeners
    /// (TCP to Pingora; the guard makes the handshake under the header deadline) in another.
    fn add_listeners(&mut self, server_conf: &Arc<ServerConf>) -> Result<(), RunError> {
        let config = &self.config;
        let proxy = EdgeProxy::new(self.router.clone(), self.lasting.stats.clone())
            .with_access_log(self.access_log.clone())
            .with_metrics(config.metrics)
            .with_unbuffered_listeners(true)
            .with_drain(self.lasting.drain.clone())
            .with_analytics(self.analytics.clone());
        let mut http = pingora::proxy::http_proxy(server_conf, proxy);
        // An HTTP/2 connection without a stream is closed after the keep-alive timeout, its
        // header blocks are held to the HTTP/1.1 limit (431), and an HTTP/1.1 connection
        // carries at most `max_requests_per_connection` requests (Pingora counts reuses).
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2_idle_timeout = Some(config.client.keepalive_timeout);
        options.keepalive_request_limit = config
            .client
            .max_requests_per_connection
            .map(|n| n.saturating_sub(1));
        let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
        h2.max_header_list_size(u32::try_from(config.client.max_header_bytes).unwrap_or(u32::MAX));
        // h2 runs only on the TLS listeners (no h2c). With `h2_websockets`, they advertise
        // RFC 8441's extended CONNECT, and CONNECT reaches the hooks instead of Pingora's 405:
        // the gate serves `:protocol websocket` and refuses any other CONNECT itself (the
        // header guard refuses HTTP/1.1 CONNECT before Pingora sees it).
        if config.listen.h2_websockets && !config.listen.https.is_empty() {
            options.allow_connect_method_proxying = true;
            h2.enable_connect_protocol();
            crate::streams::h2_stream::tune(&mut h2);
        }
        http.server_options = Some(options);
        http.h2_options = Some(h2);
        let http = Arc::new(http);
        let guard = || {
            let stats = self.lasting.stats.clone();
            HeaderGuard::new(http.clone(), config.client)
                .with_reporting(self.access_log.clone(), stats)
        };
        // Pingora puts a 64 KiB read buffer under every client connection by default.
        // Nothing here reads in small pieces (the header guard, Pingora's parsers and the
        // relay all read into buffers of their own), so it would only cost memory.
        let l4 = L4BufferSettings::default().read(0);
        let listener = |addr: &SocketAddr| ListenerConfig::tcp(addr.to_string()).l4_buffer(l4);
        let service = |name: &str, app, addrs: &[SocketAddr]| {
            let mut service = Service::new(name.to_string(), app);
            addrs.iter().for_each(|a| service.add_listener(listener(a)));
            Box::new(service) as Box<dyn ServiceWithDependents>
        };
        let mut services = Vec::new();
        if !config.listen.http.is_empty() {
            services.push(service("wsedge", guard(), &config.listen.http));
        }
        if !config.listen.https.is_empty() {
            let mut settings =
                TlsSettings::with_callbacks(Box::new(RecordSni)).map_err(|e| RunError::Build {
                    file: config.source.display().to_string(),
                    why: format!("TLS: {e}"),
                })?;
            settings.set_cert_resolver(Arc::new(SniResolver::new(self.router.clone())));
            // h2 for plain requests and (with `h2_websockets`) WebSockets as h2 streams.
            settings.enable_h2();
            let acceptor = Arc::new(settings.build());
            let app = guard().with_tls(acceptor);
            services.push(service("wsedge tls", app, &config.listen.https));
        }
        self.services.extend(services);
        Ok(())
    }

    /// Adds the admin listener (`/healthz`, `/metrics`, `/stats`, `POST /reload`) at the
    /// configuration's `admin` address.
    pub fn with_admin(mut self) -> Edge {
        let app = admin::Admin {
            stats: self.lasting.stats.clone(),
            reloader: self.reloader.clone(),
            drain: self.lasting.drain.clone(),
            fleet: self
                .config
                .analytics
                .as_ref()
                .map(analytics::fleet_stats::FleetStats::new),
        };
        let mut service = Service::new("wsedge admin".into(), HttpServer::new_app(app));
        service.add_tcp(&self.config.admin.addr.to_string());
        self.services.push(Box::new(service));
        self
    }

    /// Says that the configuration is the last-known-good file's, because etcd could not
    /// be read (`why`): `/healthz` and the metrics say so, and the watch reads everything
    /// as soon as etcd answers.
    pub fn started_from_last_known_good(self, why: String) -> Edge {
        self.reloader.set_source(false, Some(why), Some(true));
        self
    }

    /// The live resource table (store a new `Router` in it to reload by hand).
    pub fn router(&self) -> &SharedRouter {
        &self.router
    }

    /// The counters of every resource.
    pub fn stats(&self) -> &Arc<EdgeStats> {
        &self.lasting.stats
    }

    /// The access log (flush it after the server has stopped).
    pub fn access_log(&self) -> &Arc<AccessLog> {
        &self.access_log
    }

    /// The edge's drain (start one with `drain().start(..)`, as `POST /drain` does).
    pub fn drain(&self) -> &Arc<Drain> {
        &self.lasting.drain
    }

    /// Calls `f` once a stopping server (SIGTERM, or the old process of an upgrade) has no
    /// tunnel and no request left, instead of letting it wait out Pingora's whole grace
    /// period: the binary flushes its logs and exits there.
    pub fn on_drained(mut self, f: impl Fn() + Send + Sync + 'static) -> Edge {
        self.on_drained = Some(Arc::new(f));
        self
    }

    /// The feed of fleet statistics, with `analytics` configured: a stopping process
    /// calls [`Feed::finish`] once nothing is served (the edge does before `on_drained`'s
    /// function), so that rows still in memory are spilled for the next process.
    pub fn analytics(&self) -> Option<&Arc<Feed>> {
        self.analytics.as_ref()
    }

    /// Adds every service of the edge to `server`, with the drain at its shutdown: the
    /// tunnels are told to go over `drain.spread` once the listeners are closed or handed
    /// over.
    pub fn add_to(mut self, server: &mut Server) {
        self.services.push(Box::new(background_service(
            "drain at shutdown",
            DrainOnShutdown::new(
                self.lasting.drain.clone(),
                self.lasting.stats.clone(),
                server.watch_execution_phase(),
                self.on_drained.take().map(|done| {
                    let feed = self.analytics.clone();
                    Arc::new(move || {
                        if let Some(feed) = &feed {
                            feed.finish();
                        }
                        done()
                    }) as OnDrained
                }),
            ),
        )));
        server.add_services(self.services);
    }
}

/// The process's own log once [`init_logging`] set it up (flushed before an exit).
static ERRORS: std::sync::OnceLock<Arc<LineWriter>> = std::sync::OnceLock::new();

/// The process's own log (`log`/`env_logger`, Pingora's included) on stderr through a
/// bounded queue, so a stalled reader never stops the proxy (lines are dropped and
/// counted instead). Returns the writer, to flush at exit.
pub fn init_logging() -> Arc<LineWriter> {
    let errors = Arc::new(LineWriter::stderr(error_log_dropped().clone()));
    let _ = ERRORS.set(errors.clone());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(ErrorLog(errors.clone()))))
        .init();
    errors
}

/// `wsedge healthcheck`: `GET /healthz` on the admin listener of the configuration at
/// `path` (for a container's `HEALTHCHECK`): the body if it answered 200.
pub fn healthcheck(path: &std::path::Path) -> Result<String, String> {
    crate::ops::container::healthcheck(path)
}

/// Runs wsedge as the command line asked. Returns for `-t`, on an error, or once the
/// server has shut down (with its access log flushed).
pub fn run(opts: Options) -> Result<(), RunError> {
    let (mut config, origin) = crate::fleet::load(&opts.config).map_err(|e| match e {
        crate::fleet::LoadError::Config(e) => RunError::Config(e),
        crate::fleet::LoadError::NoSource(why) => RunError::Start(why),
    })?;
    for w in &config.warnings {
        eprintln!("wsedge: warning: {w}");
    }
    let revision = config.store.as_ref().map_or(0, |s| s.revision);
    let from = match &origin {
        crate::fleet::Origin::File => String::new(),
        crate::fleet::Origin::Etcd => format!(", from etcd at revision {revision}"),
        crate::fleet::Origin::LastKnownGood(_) => {
            format!(", from the last-known-good file at etcd revision {revision}")
        }
    };
    if let crate::fleet::Origin::LastKnownGood(why) = &origin {
        let lkg = config
            .etcd
            .as_ref()
            .map(|s| s.last_known_good.display().to_string());
        eprintln!(
            "wsedge: warning: etcd cannot be used ({why}); serving the last-known-good configuration {} (revision {revision}) until it can",
            lkg.unwrap_or_default()
        );
    }
    if opts.test {
        build_router(&config, &Lasting::default())?;
        println!(
            "wsedge: the configuration file {} syntax is ok ({} resources{from})",
            opts.config.display(),
            config.resources.len()
        );
        return Ok(());
    }
    if let Some(hint) = crate::ops::container::loopback_hint(&config) {
        log::warn!("{hint}");
        eprintln!("wsedge: warning: {hint}");
    }
    if opts.upgrade {
        let sock = server_conf(&config).upgrade_sock;
        crate::ops::container::check_upgrade_socket(&sock).map_err(RunError::Start)?;
    }
    match crate::os::raise_nofile_limit() {
        Ok(n) => log::info!("open files: up to {n} (each connection takes one, a tunnel two)"),
        Err(e) => log::warn!("cannot read the open-file limit: {e}"),
    }
    let demo_addr = if opts.demo {
        Some(start_demo(&mut config)?)
    } else {
        None
    };
    let listen = &mut config.listen;
    let mut addrs: Vec<&mut SocketAddr> = listen.http.iter_mut().collect();
    addrs.extend(listen.https.iter_mut());
    addrs.push(&mut config.admin.addr);
    ready::pin_ambiguous_ports(&mut addrs).map_err(|source| RunError::Port { source })?;

    let pingora_opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(pingora_opt, server_conf(&config));
    server.bootstrap();
    let readiness = Readiness::of(&config, demo_addr);
    #[cfg(feature = "demo")]
    let first = config.resources.first().map(|r| r.name.clone());
    let mut edge = Edge::build(config, &server.configuration)?.with_admin();
    if let crate::fleet::Origin::LastKnownGood(why) = origin {
        edge = edge.started_from_last_known_good(why);
    }
    #[cfg(feature = "demo")]
    if let (Some(_), Some(first)) = (demo_addr, &first) {
        crate::demo::show_stats(edge.stats().resource(first));
    }
    let access_log = edge.access_log().clone();
    let last_lines = access_log.clone();
    let last_rows = edge.analytics().cloned();
    // A stopping wsedge exits as soon as nothing is left, its lines written: Pingora
    // would wait out its whole grace period (300 s by default) with nothing open.
    let edge = edge.on_drained(move || {
        last_lines.flush(Duration::from_secs(5));
        if let Some(errors) = ERRORS.get() {
            errors.flush(Duration::from_secs(2));
        }
        std::process::exit(0);
    });
    edge.add_to(&mut server);
    std::thread::spawn(move || readiness.announce());
    server.run(RunArgs::default());
    // Tunnels cut at shutdown were logged as the runtimes dropped them: write those lines,
    // and spill their rows.
    access_log.flush(Duration::from_secs(5));
    if let Some(feed) = last_rows {
        feed.finish();
    }
    Ok(())
}

/// Starts the demo origin at the first resource's first server (a port-0 address becomes
/// the port it got, for every server at that address).
#[cfg(feature = "demo")]
fn start_demo(config: &mut Config) -> Result<SocketAddr, RunError> {
    let Some(first) = config.resources.first() else {
        return Err(RunError::Start(
            "--demo needs a resource to serve: this configuration has none".into(),
        ));
    };
    let addr = first.origin.servers[0].addr;
    if !addr.ip().is_loopback() {
        // The demo would take over a real origin's address (an image run with its default
        // command and an operator's configuration mounted over the demo's).
        return Err(RunError::Start(format!(
            "--demo starts the demo origin at the first resource's first server, which must be on loopback ({addr} is not): this looks like a real configuration, whose origin the demo would take the place of; run without --demo"
        )));
    }
    let bound = crate::demo::spawn(addr).map_err(|source| RunError::Demo { addr, source })?;
    for r in &mut config.resources {
        for s in &mut Arc::make_mut(r).origin.servers {
            if s.addr == addr {
                s.addr = bound;
            }
        }
    }
    println!("wsedge: demo origin on {bound}");
    Ok(bound)
}

#[cfg(not(feature = "demo"))]
fn start_demo(config: &mut Config) -> Result<SocketAddr, RunError> {
    let addr = config
        .resources
        .first()
        .map_or(crate::config::DEFAULT_ADMIN, |r| r.origin.servers[0].addr);
    Err(RunError::Demo {
        addr,
        source: std::io::Error::other("this wsedge was built without the `demo` feature"),
    })
}

/// What the readiness lines say, gathered before the configuration moves into the edge.
struct Readiness {
    wanted: Vec<SocketAddr>,
    http_count: usize,
    demo: Option<SocketAddr>,
    host: String,
}

impl Readiness {
    fn of(config: &Config, demo: Option<SocketAddr>) -> Readiness {
        let mut wanted = config.listen.http.clone();
        wanted.extend(&config.listen.https);
        wanted.push(config.admin.addr);
        Readiness {
            wanted,
            http_count: config.listen.http.len(),
            demo,
            host: config
                .resources
                .first()
                .map_or_else(|| "localhost".into(), |r| r.concrete_host()),
        }
    }

    /// Waits for the listeners and prints where to connect (the lines scripts and tests
    /// wait for).
    fn announce(self) {
        let exclude: Vec<_> = self.demo.into_iter().collect();
        let Some(mut bound) = ready::wait_for(&self.wanted, &exclude, Duration::from_secs(30))
        else {
            eprintln!("wsedge: listeners did not come up within 30s");
            return;
        };
        let admin = bound.pop();
        for (i, a) in bound.iter().enumerate() {
            let scheme = if i < self.http_count { "http" } else { "https" };
            println!("wsedge: listening on {scheme}://{a}");
        }
        if let Some(a) = admin {
            println!("wsedge: admin on http://{a}");
        }
        if self.demo.is_some() {
            let (port, host) = (bound[0].port(), &self.host);
            let scheme = if self.http_count > 0 { "http" } else { "https" };
            println!("wsedge: demo ready: open {scheme}://{host}:{port}/ (resolve {host} to 127.0.0.1), or:");
            let insecure = if scheme == "https" { "-k " } else { "" };
            println!("  curl {insecure}-H 'Host: {host}' {scheme}://127.0.0.1:{port}/");
        }
    }
}
