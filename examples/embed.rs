//! Embedding wsedge in a Pingora server of your own: load a config, build an `EdgeProxy`
//! over its resources, and add it as an HTTP proxy service next to your other services.
//!
//! ```text
//! cargo run --example embed -- conf/demo.yaml
//! ```

use pingora::server::Server;
use wsedge::{Config, EdgeProxy};

fn main() {
    env_logger::init();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "conf/demo.yaml".to_string());
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };

    let mut server = Server::new_with_opt_and_conf(None, wsedge::server_conf(&config));
    server.bootstrap();

    // The resource table can be swapped at any time (a reload): keep a handle to it.
    // The counters are shared with whatever serves them (wsedge's admin app, say).
    let stats = std::sync::Arc::new(wsedge::stats::EdgeStats::default());
    let resources = wsedge::resources(&config, &stats);
    let mut edge = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        EdgeProxy::new(resources.clone(), stats),
        "wsedge",
    );
    for addr in &config.listen.http {
        edge.add_tcp(&addr.to_string());
    }
    server.add_service(edge);

    // ... add your own services here ...

    println!(
        "embedded wsedge serving {} resources",
        config.resources.len()
    );
    server.run_forever();
}
