//! The least a Pingora `ProxyHttp` does to proxy a WebSocket: every request to one origin,
//! Pingora's own upgrade handling and body pass-through after the 101, no filters, no
//! policy, no metrics, no access log. It is a yardstick for `scripts/bench` and
//! `scripts/profile` (target `pingora`): what a handshake costs in Pingora's connection
//! task, HTTP session and proxy before wsedge adds anything. wsedge's handshake goes
//! through the same task and session; after the 101 it leaves Pingora for its own relay.
//!
//! ```text
//! cargo run --release -p wsload --bin bare_pingora -- 127.0.0.1:0 127.0.0.1:9000 [threads] [steal]
//! ```
//! Prints `bare_pingora: listening on <addr>` (port 0 resolved) just before Pingora binds
//! that address: a caller waits for the port to open, as scripts/bench does.

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

/// The command line: where to listen, the origin, the threads (1 to 64, default 2) and
/// whether Pingora's work stealing is on (`steal`; off by default, as in wsedge).
#[derive(Debug, PartialEq)]
struct Args {
    listen: SocketAddr,
    origin: SocketAddr,
    threads: usize,
    steal: bool,
}

const USAGE: &str = "usage: bare_pingora LISTEN ORIGIN [threads 1-64] [steal]";

fn parse_args(args: &[String]) -> Result<Args, String> {
    let addr = |i: usize, what: &str| -> Result<SocketAddr, String> {
        let a = args.get(i).ok_or_else(|| format!("{USAGE}: no {what}"))?;
        a.parse()
            .map_err(|_| format!("{USAGE}: {what} {a:?} is not ip:port"))
    };
    let listen = addr(0, "LISTEN")?;
    let origin = addr(1, "ORIGIN")?;
    let threads = match args.get(2) {
        None => 2,
        Some(t) => match t.parse::<usize>() {
            Ok(n @ 1..=64) => n,
            _ => return Err(format!("{USAGE}: threads {t:?} is not 1 to 64")),
        },
    };
    let steal = match args.get(3).map(String::as_str) {
        None => false,
        Some("steal") => true,
        Some(other) => return Err(format!("{USAGE}: {other:?} is not \"steal\"")),
    };
    if args.len() > 4 {
        return Err(format!("{USAGE}: too many arguments"));
    }
    Ok(Args {
        listen,
        origin,
        threads,
        steal,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Args {
        listen,
        origin,
        threads,
        steal,
    } = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // Port 0 is resolved here (Pingora takes an address, not a socket), so the address can
    // be printed; Pingora binds it again on start.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments_and_hostile_ones() {
        let a = parse(&["127.0.0.1:0", "127.0.0.1:9"]).unwrap();
        assert_eq!((a.threads, a.steal), (2, false));
        let a = parse(&["127.0.0.1:0", "[::1]:9", "4", "steal"]).unwrap();
        assert_eq!(
            (a.origin, a.threads, a.steal),
            ("[::1]:9".parse().unwrap(), 4, true)
        );
        for bad in [
            &[][..],
            &["127.0.0.1:0"],
            &["127.0.0.1", "127.0.0.1:9"],
            &["127.0.0.1:0", "localhost:9"],
            &["127.0.0.1:0", "127.0.0.1:99999"],
            &["127.0.0.1:0", "127.0.0.1:9", "0"],
            &["127.0.0.1:0", "127.0.0.1:9", "65"],
            &["127.0.0.1:0", "127.0.0.1:9", "-1"],
            &["127.0.0.1:0", "127.0.0.1:9", "99999999999999999999999"],
            &["127.0.0.1:0", "127.0.0.1:9", "2", "STEAL"],
            &["127.0.0.1:0", "127.0.0.1:9", "2", "steal", "more"],
        ] {
            let e = parse(bad).expect_err(&format!("{bad:?} is refused"));
            assert!(e.starts_with(USAGE), "{e}");
        }
    }
}
