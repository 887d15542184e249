//! Embedding wsedge in a Pingora server of your own: load a configuration and add the same
//! edge the `wsedge` binary runs (listeners, health checks, `/stats`, reload on SIGHUP, the
//! admin listener) next to your other services.
//!
//! ```text
//! cargo run --example embed -- conf/demo.yaml
//! ```

use pingora::server::Server;

fn main() {
    env_logger::init();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "conf/demo.yaml".to_string());
    let config = match wsedge::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let resources = config.resources.len();
    let mut server = Server::new_with_opt_and_conf(None, wsedge::server_conf(&config));
    server.bootstrap();
    let edge = match wsedge::Edge::build(config, &server.configuration) {
        Ok(edge) => edge.with_admin(),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    edge.add_to(&mut server);

    // ... add your own services here ...

    println!("embedded wsedge serving {resources} resources");
    server.run_forever();
}
