//! The least a Pingora `ProxyHttp` does to proxy a WebSocket: every request to one origin,
//! Pingora's own upgrade handling and body pass-through after the 101, no filters, no
//! policy, no metrics, no access log. It is a yardstick for `scripts/bench` and
//! `scripts/profile` (target `pingora`): what a handshake costs in Pingora's connection
//! task, HTTP session and proxy before wsedge adds anything. wsedge's handshake goes
//! through the same task and session; after the 101 it leaves Pingora for its own relay.
//!
//! ```text
//! cargo run --release -p wsload --bin bare_pingora -- 127.0.0.1:0 127.0.0.1:9000 [threads] [steal|accept]
//! ```
//! Prints `bare_pingora: listening on <addr>` (port 0 resolved) just before Pingora binds
//! that address: a caller waits for the port to open, as scripts/bench does. With `accept`
//! it is printed once every listener is bound.
//!
//! `accept` measures what Pingora's listening service costs a connection: the same
//! `HttpProxy` is given its connections by an accept loop on each of `threads` one-thread
//! runtimes (one `SO_REUSEPORT` listener each), which runs each connection on the runtime
//! that accepted it, in a task that holds only the proxy's boxed future. Pingora's service
//! spawns each connection onto a random runtime, in a task that also holds its TLS
//! handshake's future, while the socket stays registered with the accepting runtime.

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::prelude::*;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::{http_proxy, HttpProxy};
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;
use std::sync::Arc;

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

/// Who accepts the connections and runs them.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Mode {
    /// Pingora's listening service on one-thread runtimes (work stealing off, as in wsedge).
    Service,
    /// Pingora's listening service on its work-stealing runtime.
    Steal,
    /// An accept loop per one-thread runtime, each connection run where it was accepted.
    Accept,
}

/// The command line: where to listen, the origin, the threads (1 to 64, default 2) and
/// the [`Mode`] (`steal`, `accept`; Pingora's service without work stealing by default).
#[derive(Debug, PartialEq)]
struct Args {
    listen: SocketAddr,
    origin: SocketAddr,
    threads: usize,
    mode: Mode,
}

const USAGE: &str = "usage: bare_pingora LISTEN ORIGIN [threads 1-64] [steal|accept]";

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
    let mode = match args.get(3).map(String::as_str) {
        None => Mode::Service,
        Some("steal") => Mode::Steal,
        Some("accept") => Mode::Accept,
        Some(other) => return Err(format!("{USAGE}: {other:?} is not steal or accept")),
    };
    if args.len() > 4 {
        return Err(format!("{USAGE}: too many arguments"));
    }
    Ok(Args {
        listen,
        origin,
        threads,
        mode,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Args {
        listen,
        origin,
        threads,
        mode,
    } = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads,
        work_stealing: mode == Mode::Steal,
        ..ServerConf::default()
    };
    if mode == Mode::Accept {
        own_accept(
            listen,
            threads,
            http_proxy(&Arc::new(conf), Bare { origin }),
        );
    }
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
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare { origin });
    proxy.add_tcp(&addr.to_string());
    server.add_service(proxy);
    println!("bare_pingora: listening on {addr}");
    server.run_forever();
}

/// Runs `proxy` on `threads` one-thread runtimes, each accepting on a listener of its own
/// (`SO_REUSEPORT` on `listen`, port 0 resolved by the first) and running each connection
/// in a task of its own there. The address is printed once every listener is bound.
fn own_accept(listen: SocketAddr, threads: usize, proxy: HttpProxy<Bare>) -> ! {
    let proxy = Arc::new(proxy);
    // Never sent: the process ends by signal.
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let bind = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?.into_std()?;
        Ok(listener)
    };
    // tokio's listen needs a runtime; each listener is handed to its own runtime below.
    let setup = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a runtime");
    let entered = setup.enter();
    let bound = bind(listen).and_then(|first| {
        let addr = first.local_addr()?;
        let rest = (1..threads).map(|_| bind(addr));
        std::iter::once(Ok(first))
            .chain(rest)
            .collect::<Result<Vec<_>, _>>()
    });
    let listeners = bound.unwrap_or_else(|e| {
        eprintln!("bare_pingora: {listen}: {e}");
        std::process::exit(1);
    });
    let addr = listeners[0]
        .local_addr()
        .expect("a bound listener has an address");
    drop(entered);
    println!("bare_pingora: listening on {addr}");
    let workers: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let (proxy, shutdown) = (proxy.clone(), shutdown.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
                    loop {
                        let tcp = match listener.accept().await {
                            Ok((tcp, _)) => tcp,
                            Err(e) => {
                                // Out of descriptors, say: back off instead of spinning.
                                eprintln!("bare_pingora: accept: {e}");
                                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        let _ = tcp.set_nodelay(true);
                        let (proxy, shutdown) = (proxy.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            let stream: Stream = Box::new(L4Stream::from(tcp));
                            proxy.process_new(stream, &shutdown).await;
                        });
                    }
                })
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    std::process::exit(1)
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
        assert_eq!((a.threads, a.mode), (2, Mode::Service));
        let a = parse(&["127.0.0.1:0", "[::1]:9", "4", "steal"]).unwrap();
        assert_eq!(
            (a.origin, a.threads, a.mode),
            ("[::1]:9".parse().unwrap(), 4, Mode::Steal)
        );
        let a = parse(&["127.0.0.1:0", "127.0.0.1:9", "1", "accept"]).unwrap();
        assert_eq!((a.threads, a.mode), (1, Mode::Accept));
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
            &["127.0.0.1:0", "127.0.0.1:9", "2", "accept\0"],
            &["127.0.0.1:0", "127.0.0.1:9", "2", ""],
            &["127.0.0.1:0", "127.0.0.1:9", "2", "steal", "more"],
        ] {
            let e = parse(bad).expect_err(&format!("{bad:?} is refused"));
            assert!(e.starts_with(USAGE), "{e}");
        }
    }
}
