//! The least a Pingora `ProxyHttp` does to proxy a WebSocket: every request to one origin,
//! Pingora's own upgrade handling and body pass-through after the 101, no filters, no
//! policy, no metrics, no access log. It is a yardstick for `scripts/profile` (target
//! `pingora`): the CPU a handshake costs in Pingora's connection task, HTTP session and
//! proxy loop before wsedge adds anything, which wsedge's handshake (gated in the same
//! request filters) cannot go below.
//!
//! ```text
//! cargo run --release -p wsload --bin bare_pingora -- 127.0.0.1:0 127.0.0.1:9000 [threads] [steal]
//! ```
//! Prints `bare_pingora: listening on <addr>` once it accepts.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Bare {
    origin: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.origin, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_pingora LISTEN ORIGIN [threads] [steal]";
    let (Some(listen), Some(origin)) = (args.next(), args.next()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let threads = args.next().map_or(Ok(2), |t| t.parse()).unwrap_or(2);
    let steal = args.next().is_some_and(|s| s == "steal");
    let (Ok(listen), Ok(origin)) = (listen.parse::<SocketAddr>(), origin.parse::<SocketAddr>())
    else {
        eprintln!("{usage} (addresses as ip:port)");
        std::process::exit(2);
    };
    // Port 0 is resolved here, so the address can be printed before Pingora listens on it.
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bare_pingora: {listen}: {e}");
            std::process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    drop(listener);
    let conf = ServerConf {
        threads,
        work_stealing: steal,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { origin });
    proxy.add_tcp(&addr.to_string());
    server.add_service(proxy);
    println!("bare_pingora: listening on {addr}");
    server.run_forever();
}
