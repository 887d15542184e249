//! wsload: the load generator and echo origin of wsedge's benchmarks (`scripts/bench*`).
//!
//! ```text
//! wsload origin 127.0.0.1:9100                          # WebSocket echo origin, prints its address
//! wsload echo ws://127.0.0.1:8080/ws --conns 16 --messages 20000 --size 32 --pid 1234
//! wsload stats-query                                    # /stats rendering time, 366 daily buckets
//! wsload handshakes wss://127.0.0.1:8443/ws --host chat.example.test --ca ca.pem --conns 8 --count 3000 --pid 1234
//! wsload relay 127.0.0.1:0 127.0.0.1:9100 --threads 2   # the benchmark's floor: a bare TCP relay
//! wsload stalled ws://127.0.0.1:8080/push --count 1000 --pid 1234   # clients that never read
//! wsload storm ws://127.0.0.1:8080/ws --count 5000 --window 60      # reconnect on every close
//! wsload h2-handshakes wss://127.0.0.1:8443/ws --host chat.example.test --ca ca.pem --conns 8 --count 3000 --pid 1234
//! wsload tls-idle wss://127.0.0.1:8443/ws --host chat.example.test --ca ca.pem --count 2000 [--h2] --pid 1234
//! ```
//!
//! Results are one JSON line on stdout; progress goes to stderr. CPU figures come from the
//! measured process's own utime+stime in /proc, steadier than wall time on a shared
//! machine.

mod h2;
mod relay;

use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Every network wait of the generator is bounded by this.
const STEP: Duration = Duration::from_secs(30);

fn usage() -> ! {
    eprintln!("usage: wsload origin ADDR | echo URL [--conns N] [--messages N] [--size BYTES] [--window N] [--pid PID,...] | handshakes URL [--host NAME] [--ca PEM] [--conns N] [--count N] [--pid PID,...] | idle URL [--steps 1000,3000,9000] [--hold SECS] [--pid PID,...] | stalled URL [--count N] [--pid PID,...] | storm URL [--count N] [--window SECS] | h2-handshakes URL --host NAME --ca PEM [--conns N] [--count N] [--pid PID,...] | tls-idle URL --host NAME --ca PEM [--count N] [--h2] [--pid PID,...] | relay LISTEN ORIGIN [--threads N] | stats-query");
    std::process::exit(2)
}

fn flag(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(default)
}

/// (utime + stime, utime) of `pid`, in microseconds.
fn cpu_micros(pid: u64) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = f.get(11)?.parse().ok()?;
    let ticks = user + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((ticks * 1_000_000 / hz, user * 1_000_000 / hz))
}

/// Summed CPU of several processes (nginx's and HAProxy's workers, say).
fn cpu_of(pids: &[u64]) -> Option<u64> {
    cpu_split(pids).map(|(all, _)| all)
}

/// Summed (all, user-space) CPU of several processes.
fn cpu_split(pids: &[u64]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|&p| cpu_micros(p))
        .try_fold((0, 0), |(a, u), c| c.map(|(ca, cu)| (a + ca, u + cu)))
}

/// CPU per operation between two readings, as JSON (all, user space): `null` without a pid.
fn per_op(
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
    ops: f64,
    digits: usize,
) -> (String, String) {
    match (before, after) {
        (Some(a), Some(b)) => (
            format!("{:.digits$}", (b.0 - a.0) as f64 / ops),
            format!("{:.digits$}", (b.1 - a.1) as f64 / ops),
        ),
        _ => ("null".into(), "null".into()),
    }
}

/// Summed resident memory of processes, KiB.
fn rss_kib(pids: &[u64]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// `--pid 1,2,3`
fn pids(args: &[String]) -> Vec<u64> {
    text_flag(args, "--pid")
        .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..Default::default()
    }
}

// tungstenite's accept callback returns its own (large) error response.
#[allow(clippy::result_large_err)]
async fn origin(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind the origin");
    println!("wsload: origin on {}", listener.local_addr().unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let push = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let on_push = push.clone();
            let callback =
                move |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                    on_push.store(req.uri().path() == "/push", Ordering::Relaxed);
                    Ok(resp)
                };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(
                stream,
                callback,
                Some(ws_config()),
            )
            .await
            else {
                return;
            };
            if push.load(Ordering::Relaxed) {
                // `/push`: binary messages of 16 KiB as fast as the connection takes them,
                // whatever the client does.
                let m = Message::binary(vec![0x5a; 16 * 1024]);
                while ws.send(m.clone()).await.is_ok() {}
                return;
            }
            loop {
                match ws.next().await {
                    Some(Ok(m)) => {
                        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                    // A client that breaks the protocol: the connection is failed with a
                    // Close that says why (RFC 6455 §7.1.7), as a good origin does, rather
                    // than just dropped (through wsedge a dropped connection is reported
                    // to the client as 1014, "bad gateway").
                    Some(Err(e)) => {
                        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
                        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
                        use tokio_tungstenite::tungstenite::Error;
                        let code = match e {
                            Error::Utf8 => CloseCode::Invalid,
                            Error::Capacity(_) => CloseCode::Size,
                            Error::Protocol(_) => CloseCode::Protocol,
                            _ => return,
                        };
                        let frame = CloseFrame {
                            code,
                            reason: "".into(),
                        };
                        let _ = ws.close(Some(frame)).await;
                        return;
                    }
                    None => return,
                }
            }
        });
    }
}

/// Opens `count` tunnels to `url` (an origin path that pushes, `/push`) whose clients read
/// the 101 and then never read again, as a stalled or malicious client does; reports the
/// measured processes' memory per tunnel once the pushes have filled every buffer.
async fn stalled(url: &str, count: u64, pids: &[u64]) {
    let settle = || tokio::time::sleep(Duration::from_millis(3000));
    settle().await;
    let base = rss_kib(pids);
    let rest = url.strip_prefix("ws://").expect("a ws:// URL");
    let (authority, path) = rest.split_once('/').map_or((rest, "/"), |(a, p)| (a, p));
    let addr: std::net::SocketAddr = authority.parse().expect("ws://ip:port/path");
    let mut open = Vec::new();
    for _ in 0..count {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        // A small receive buffer, as a phone's: the stall reaches the proxy quickly.
        let _ = sock.set_recv_buffer_size(16 * 1024);
        let mut s = tokio::time::timeout(STEP, sock.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let req = format!("GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(req.as_bytes()).await.expect("send the upgrade");
        // Read the 101, byte by byte so that nothing after it is taken.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(STEP, s.read(&mut b))
                .await
                .expect("101 in time")
                .expect("read the 101");
            assert!(n == 1, "closed before the 101");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "not a 101");
        open.push(s);
    }
    settle().await;
    let rss = rss_kib(pids);
    println!(
        "{{\"tunnels\":{count},\"rss_kib\":{rss},\"kib_per_tunnel\":{:.1}}}",
        rss.saturating_sub(base) as f64 / count as f64
    );
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `conns` connections, `window` messages in flight each, until `messages` round trips.
async fn echo(url: &str, conns: u64, messages: u64, size: u64, window: u64, pids: &[u64]) {
    let mut sockets = Vec::new();
    for _ in 0..conns {
        let (ws, _) = tokio::time::timeout(
            STEP,
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        sockets.push(ws);
    }
    let done = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_split(pids);
    let start = Instant::now();
    let payload = vec![b'x'; size as usize];
    let window = window.max(1) as usize;
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let (done, payload) = (done.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut in_flight = std::collections::VecDeque::with_capacity(window);
            loop {
                // Keep `window` messages in flight while there are round trips left.
                while in_flight.len() < window
                    && done.fetch_add(1, Ordering::Relaxed) < messages as usize
                {
                    tokio::time::timeout(STEP, ws.feed(Message::binary(payload.clone())))
                        .await
                        .expect("send in time")
                        .expect("send");
                    in_flight.push_back(Instant::now());
                }
                if in_flight.is_empty() {
                    break;
                }
                tokio::time::timeout(STEP, ws.flush())
                    .await
                    .expect("flush in time")
                    .expect("flush");
                match tokio::time::timeout(STEP, ws.next())
                    .await
                    .expect("echo in time")
                {
                    Some(Ok(m)) if m.len() == payload.len() => {}
                    other => panic!("bad echo: {other:?}"),
                }
                let sent = in_flight.pop_front().expect("a message in flight");
                lat.push(sent.elapsed().as_micros() as u64);
            }
            let _ = ws.close(None).await;
            lat
        }));
    }
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                eprint!(
                    "\rwsload: {} / {messages} round trips",
                    done.load(Ordering::Relaxed).min(messages as usize)
                );
            }
        })
    };
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("a client task"));
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = cpu_split(pids);
    progress.abort();
    eprintln!();
    lat.sort_unstable();
    let n = lat.len() as f64;
    let (cpu, user) = per_op(cpu0, cpu1, n, 2);
    println!(
        "{{\"round_trips\":{},\"seconds\":{secs:.3},\"round_trips_per_s\":{:.0},\"mb_per_s_each_way\":{:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"cpu_us_per_round_trip\":{cpu},\"user_us_per_round_trip\":{user}}}",
        lat.len(),
        n / secs,
        n * size as f64 / secs / 1e6,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
    );
}

/// Time to answer `/stats` for 366 daily buckets, rendering included, in-process.
fn stats_query() {
    use wsedge::EdgeStats;
    let stats = EdgeStats::default();
    let r = stats.resource("chat");
    let day0 = 1_764_547_200; // 2025-12-01
    for h in 0..400 * 24u64 {
        r.bytes_c2o.inc_by(1000);
        r.bytes_o2c.inc_by(2000);
        r.response(101);
        r.response(200);
        stats.tick(std::time::UNIX_EPOCH + Duration::from_secs(day0 + h * 3600));
    }
    let q = "resource=chat&granularity=1d&from=2025-01-01T00:00:00Z&to=2027-12-31T00:00:00Z";
    let (_, body) = stats.stats_page(Some(q));
    let buckets = body.matches("\"start\"").count();
    assert_eq!(buckets, 366, "{body}");
    let runs = 2000;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let page = stats.stats_page(Some(q));
        std::hint::black_box(page);
        times.push(t.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    println!(
        "{{\"buckets\":{buckets},\"bytes\":{},\"runs\":{runs},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1}}}",
        body.len(),
        percentile(&times, 0.5) as f64 / 1000.0,
        percentile(&times, 0.99) as f64 / 1000.0,
        *times.last().unwrap() as f64 / 1000.0
    );
}

fn text_flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// A TLS client config trusting `ca` (PEM), with session resumption off so every
/// handshake is a full one.
fn tls_client(ca: &str) -> Arc<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("read the CA file");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// New connection, (TLS,) upgrade, one echo, close; `count` times over `conns` workers.
async fn handshakes(
    url: &str,
    host: Option<&str>,
    ca: Option<&str>,
    conns: u64,
    count: u64,
    pids: &[u64],
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = url
        .starts_with("wss://")
        .then(|| tls_client(ca.expect("--ca for wss://")));
    let h2::Target {
        authority,
        host,
        path,
        ..
    } = h2::Target::parse(url, host, ca);
    let target = Arc::new((tls, authority, host, path));
    let one: Arc<Attempt<()>> = Arc::new(move |_: &()| {
        let target = target.clone();
        Box::pin(async move {
            let (tls, authority, host, path) = &*target;
            let tcp = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let scheme = if tls.is_some() { "wss" } else { "ws" };
            let mut req = format!("{scheme}://{host}{path}")
                .into_client_request()
                .map_err(|e| e.to_string())?;
            req.headers_mut()
                .insert("Host", host.parse().map_err(|_| "bad host")?);
            let stream: Box<dyn AsyncStream> = match tls {
                Some(config) => {
                    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| e.to_string())?;
                    Box::new(
                        tokio_rustls::TlsConnector::from(config.clone())
                            .connect(name, tcp)
                            .await
                            .map_err(|e| e.to_string())?,
                    )
                }
                None => Box::new(tcp),
            };
            let (ws, _) = tokio_tungstenite::client_async(req, stream)
                .await
                .map_err(|e| e.to_string())?;
            h2::echo_and_close(ws).await
        })
    });
    run_handshakes(vec![(); conns as usize], count, pids, one).await
}

/// One handshake of a worker (`W`: what the worker holds, an h2 connection say).
type Attempt<W> =
    dyn for<'a> Fn(&'a W) -> futures_util::future::BoxFuture<'a, Result<(), String>> + Send + Sync;

/// Runs `count` handshakes (`one`, each within [`STEP`]) over one task per worker, then
/// prints `{"handshakes","failures","seconds","handshakes_per_s","cpu_us_per_handshake"}`.
async fn run_handshakes<W: Send + Sync + 'static>(
    workers: Vec<W>,
    count: u64,
    pids: &[u64],
    one: Arc<Attempt<W>>,
) {
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_split(pids);
    let start = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|worker| {
            let (done, failures, one) = (done.clone(), failures.clone(), one.clone());
            tokio::spawn(async move {
                while done.fetch_add(1, Ordering::Relaxed) < count as usize {
                    match tokio::time::timeout(STEP, one(&worker)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("wsload: handshake failed: {e}");
                            }
                        }
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a client task");
    }
    let secs = start.elapsed().as_secs_f64();
    let (cpu, user) = per_op(cpu0, cpu_split(pids), count as f64, 1);
    println!(
        "{{\"handshakes\":{count},\"failures\":{},\"seconds\":{secs:.3},\"handshakes_per_s\":{:.0},\"cpu_us_per_handshake\":{cpu},\"user_us_per_handshake\":{user}}}",
        failures.load(Ordering::Relaxed),
        count as f64 / secs
    );
}

/// Opens idle tunnels up to each step and reports the processes' RSS after each, as JSON
/// lines: memory per idle tunnel is (rss - baseline) / tunnels.
async fn idle(url: &str, steps: &[u64], pids: &[u64], hold: u64) {
    let settle = || tokio::time::sleep(Duration::from_millis(1500));
    settle().await;
    let base = rss_kib(pids);
    println!("{{\"tunnels\":0,\"rss_kib\":{base}}}");
    let mut open = Vec::new();
    for &step in steps {
        while (open.len() as u64) < step {
            let batch = (step - open.len() as u64).min(100);
            let conns = (0..batch)
                .map(|_| tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url)));
            for r in futures_util::future::join_all(conns).await {
                let (mut ws, _) = r.expect("connect in time").expect("connect");
                // One echo so the tunnel has carried data, as real ones have.
                ws.send(Message::text("hi")).await.expect("send");
                ws.next().await.expect("echo").expect("echo");
                open.push(ws);
            }
        }
        settle().await;
        let rss = rss_kib(pids);
        println!(
            "{{\"tunnels\":{step},\"rss_kib\":{rss},\"kib_per_tunnel\":{:.1}}}",
            rss.saturating_sub(base) as f64 / step as f64
        );
    }
    if hold > 0 {
        hold_idle(open, pids, base, hold).await;
    }
}

/// Keeps idle tunnels open for `hold` seconds, each read by a task of its own so that a
/// Ping from the proxy is answered (tungstenite answers as it reads), and prints the
/// proxy's CPU over that time, the pings the clients got, and tunnels that closed.
async fn hold_idle<S>(open: Vec<WebSocketStream<S>>, pids: &[u64], base: u64, hold: u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tunnels = open.len() as u64;
    let pings = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_of(pids);
    let started = Instant::now();
    let readers: Vec<_> = open
        .into_iter()
        .map(|mut ws| {
            let (pings, closed) = (pings.clone(), closed.clone());
            tokio::spawn(async move {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Ping(_))) => {
                            pings.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Ok(_)) => {}
                        _ => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let held = started.elapsed().as_secs_f64();
    let cpu_s = match (cpu0, cpu_of(pids)) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1e6,
        _ => 0.0,
    };
    let rss = rss_kib(pids);
    // CPU per tunnel-hour: the proxy's CPU over the hold, per tunnel, scaled to an hour.
    println!(
        "{{\"held_s\":{held:.1},\"tunnels\":{tunnels},\"pings\":{},\"closed\":{},\"cpu_s\":{cpu_s:.3},\"cpu_ms_per_tunnel_hour\":{:.4},\"rss_kib\":{rss},\"kib_per_tunnel\":{:.1}}}",
        pings.load(Ordering::Relaxed),
        closed.load(Ordering::Relaxed),
        cpu_s * 1e3 / tunnels.max(1) as f64 * 3600.0 / held,
        rss.saturating_sub(base) as f64 / tunnels.max(1) as f64
    );
    for r in readers {
        r.abort();
    }
}

/// A reconnect storm from the clients' side: `count` tunnels that each reconnect at once
/// (no backoff: the worst case an edge must absorb) when their tunnel ends, by a Close
/// frame or without one. Prints `{"ready":count}` once all are open (the caller then
/// restarts or drains the proxy), then, once every tunnel has reconnected or `window`
/// seconds have passed since the first end: how the tunnels ended, the reconnects that
/// were refused or failed (each is retried after 250 ms, up to 20 times), the peak of
/// reconnects completed per second and per 100 ms, and the handshake latency percentiles.
async fn storm(url: &str, count: u64, window: u64) {
    let mut open = Vec::new();
    while (open.len() as u64) < count {
        let batch = (count - open.len() as u64).min(100);
        let conns =
            (0..batch).map(|_| tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url)));
        for r in futures_util::future::join_all(conns).await {
            let (mut ws, _) = r.expect("connect in time").expect("connect");
            ws.send(Message::text("hi")).await.expect("send");
            ws.next().await.expect("echo").expect("echo");
            open.push(ws);
        }
    }
    println!("{{\"ready\":{count}}}");
    let first_end: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    type Outcome = (Option<u16>, u32, Option<(Instant, Duration)>);
    let outcomes: Arc<std::sync::Mutex<Vec<Outcome>>> = Arc::default();
    let url = Arc::new(url.to_string());
    let tasks: Vec<_> = open
        .into_iter()
        .map(|mut ws| {
            let (first_end, url, outcomes) = (first_end.clone(), url.clone(), outcomes.clone());
            tokio::spawn(async move {
                // How the tunnel ended: Some(code) for a Close frame.
                let code = loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(f))) => {
                            break Some(f.map_or(1005, |f| u16::from(f.code)))
                        }
                        Some(Ok(_)) => {}
                        _ => break None,
                    }
                };
                first_end.get_or_init(Instant::now);
                drop(ws);
                let mut failures = 0u32;
                for _ in 0..20 {
                    let t = Instant::now();
                    let attempt = tokio_tungstenite::connect_async(url.as_str());
                    if let Ok(Ok((ws, _))) = tokio::time::timeout(STEP, attempt).await {
                        let done = Instant::now();
                        outcomes
                            .lock()
                            .unwrap()
                            .push((code, failures, Some((done, done - t))));
                        // The new tunnel stays open until the end of the run.
                        return Some(ws);
                    }
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                outcomes.lock().unwrap().push((code, failures, None));
                None
            })
        })
        .collect();
    // Until every tunnel reconnected (or gave up), or the window is over.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if outcomes.lock().unwrap().len() as u64 == count {
            break;
        }
        if first_end
            .get()
            .is_some_and(|t| t.elapsed() > Duration::from_secs(window))
        {
            eprintln!("storm: window over before every tunnel reconnected");
            break;
        }
    }
    let results = std::mem::take(&mut *outcomes.lock().unwrap());
    let t0 = first_end.get().copied().unwrap_or_else(Instant::now);
    let (mut framed, mut vanished, mut failed, mut reconnected) = (0u64, 0u64, 0u64, 0u64);
    let mut lat = Vec::new();
    let mut per_s = std::collections::BTreeMap::<u64, u64>::new();
    let mut per_100ms = std::collections::BTreeMap::<u64, u64>::new();
    let mut last = Duration::ZERO;
    for (code, failures, done) in results {
        match code {
            Some(_) => framed += 1,
            None => vanished += 1,
        }
        failed += u64::from(failures);
        if let Some((at, took)) = done {
            reconnected += 1;
            lat.push(took.as_micros() as u64);
            let since = at.saturating_duration_since(t0);
            last = last.max(since);
            *per_s.entry(since.as_secs()).or_default() += 1;
            *per_100ms.entry(since.as_millis() as u64 / 100).or_default() += 1;
        }
    }
    lat.sort_unstable();
    println!(
        "{{\"tunnels\":{count},\"closed_with_frame\":{framed},\"vanished\":{vanished},\"reconnected\":{reconnected},\"failed_attempts\":{failed},\"peak_per_s\":{},\"peak_per_100ms\":{},\"spread_s\":{:.1},\"handshake_p50_ms\":{:.2},\"handshake_p99_ms\":{:.2},\"handshake_max_ms\":{:.2}}}",
        per_s.values().max().copied().unwrap_or(0),
        per_100ms.values().max().copied().unwrap_or(0),
        last.as_secs_f64(),
        percentile(&lat, 0.50) as f64 / 1e3,
        percentile(&lat, 0.99) as f64 / 1e3,
        lat.last().copied().unwrap_or(0) as f64 / 1e3,
    );
    for t in tasks {
        t.abort();
    }
}

/// Any byte stream a WebSocket client can run over.
trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("relay") {
        // Threads of its own; no tokio runtime.
        let listen = args.get(1).unwrap_or_else(|| usage());
        let origin = args.get(2).unwrap_or_else(|| usage());
        return relay::run(listen, origin, flag(&args, "--threads", 2));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match args.first().map(String::as_str) {
        Some("origin") => rt.block_on(origin(args.get(1).map_or("127.0.0.1:0", String::as_str))),
        Some("echo") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            rt.block_on(echo(
                url,
                flag(&args, "--conns", 16),
                flag(&args, "--messages", 20_000),
                flag(&args, "--size", 32),
                flag(&args, "--window", 1),
                &pids(&args),
            ))
        }
        Some("idle") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            let steps: Vec<u64> = text_flag(&args, "--steps")
                .unwrap_or("1000,3000,9000")
                .split(',')
                .filter_map(|v| v.parse().ok())
                .collect();
            rt.block_on(idle(url, &steps, &pids(&args), flag(&args, "--hold", 0)))
        }
        Some("stats-query") => stats_query(),
        Some("stalled") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            rt.block_on(stalled(url, flag(&args, "--count", 1000), &pids(&args)))
        }
        Some("storm") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            rt.block_on(storm(
                url,
                flag(&args, "--count", 5000),
                flag(&args, "--window", 60),
            ))
        }
        Some("handshakes") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            rt.block_on(handshakes(
                url,
                text_flag(&args, "--host"),
                text_flag(&args, "--ca"),
                flag(&args, "--conns", 8),
                flag(&args, "--count", 2000),
                &pids(&args),
            ))
        }
        Some("h2-handshakes") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            let target =
                h2::Target::parse(url, text_flag(&args, "--host"), text_flag(&args, "--ca"));
            rt.block_on(h2::handshakes(
                target,
                flag(&args, "--conns", 8),
                flag(&args, "--count", 2000),
                &pids(&args),
            ))
        }
        Some("tls-idle") => {
            let url = args.get(1).unwrap_or_else(|| usage());
            let target =
                h2::Target::parse(url, text_flag(&args, "--host"), text_flag(&args, "--ca"));
            rt.block_on(h2::idle(
                target,
                flag(&args, "--count", 2000),
                args.iter().any(|a| a == "--h2"),
                &pids(&args),
            ))
        }
        _ => usage(),
    }
}
