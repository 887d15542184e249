//! The hardening audit, item by item: each test is named after what the audit found and
//! fails on the code before its fix (run the suite against an older build with
//! `WSEDGE_BIN=/path/to/old/wsedge cargo test --test hardening`). Real wsedge, real clients
//! and origins on loopback.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

/// A client connection that reads one HTTP response at a time, keeping what follows.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: within("connect", TcpStream::connect(addr)).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("write", self.s.write_all(bytes)).await.unwrap();
    }

    /// The next response (header and Content-Length body), or `None` if the connection
    /// ended first.
    async fn response(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                let len = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
                if head.starts_with("HTTP/1.1 1") {
                    self.buf.drain(..end + 4);
                    return Some(head);
                }
                if self.buf.len() >= end + 4 + len {
                    let all: Vec<u8> = self.buf.drain(..end + 4 + len).collect();
                    return Some(String::from_utf8_lossy(&all).into_owned());
                }
            }
            let mut chunk = [0u8; 8192];
            match within("read a response", self.s.read(&mut chunk)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Waits up to `limit` for the edge to close the connection; true if it did.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        let end = Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(end.into(), self.s.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

fn get(host: &str) -> String {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

fn targets(origin: &Origin) -> Vec<String> {
    origin
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Target(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn check_file(yaml: &str) -> std::process::Output {
    check_config("wsedge.yaml", yaml)
}

type Heads = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// An origin of raw TCP: `serve` gets each connection with its request header; the
/// headers are kept, in order.
async fn raw_origin<F, Fut>(serve: F) -> (SocketAddr, Heads)
where
    F: Fn(String, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    let heads = Heads::default();
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let serve = serve.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                seen.lock().unwrap().push(head.clone());
                serve(head, s).await;
            });
        }
    });
    (addr, heads)
}

/// The `Sec-WebSocket-Accept` for the key of a raw request header.
fn accept_for(head: &str) -> String {
    let key = header(head, "sec-websocket-key").unwrap();
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// Echoes WebSocket messages on a connection whose 101 was written.
async fn echo(s: TcpStream) {
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(s, Role::Server, None).await;
    while let Some(Ok(m)) = ws.next().await {
        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
            return;
        }
    }
}

/// Sends one text message on a raw client connection whose 101 was read, and reads the echo.
async fn echo_raw(s: TcpStream, text: &str) -> String {
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    match echo_once(&mut ws, Message::text(text)).await {
        Message::Text(t) => t.to_string(),
        other => panic!("not a text echo: {other:?}"),
    }
}

// 1 (high) ------------------------------------------------------------------------------

#[tokio::test]
async fn websocket_paths_cannot_be_bypassed_with_dot_segments_or_encoded_slashes() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(origin.addr, r#", paths: ["/ws"]"#));
    for (path, want) in [
        ("/ws/../admin", 403),
        ("/ws/%2e%2e/admin", 403),
        ("/ws/..%2Fadmin", 400),
        ("/ws//../admin", 403),
        ("/ws/%2E%2e", 403),
        ("/ws/..%5Cadmin", 400),
        ("/ws/..;/admin", 400),
        ("/ws/%252e%252e/admin", 400),
        ("/ws/../../admin", 400),
        ("/ws/./room/../chat?x=1", 101),
        ("/%77s//a", 101),
    ] {
        let answer = raw_request(edge.addr, &upgrade_request(path, "")).await;
        assert_eq!(status(&answer), want, "{path}: {answer}");
    }
    // What the gate checked is what the origin got; nothing outside /ws reached it.
    assert_eq!(targets(&origin), ["/ws/chat?x=1", "/ws/a"]);
}

// 2 --------------------------------------------------------------------------------------

#[tokio::test]
async fn header_guard_applies_to_every_request_of_a_kept_alive_connection() {
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&format!(
        "client: {{ header_timeout: 1s, max_header_bytes: 4096 }}\n{}",
        one_resource(origin.addr, "")
    ));

    // A second request trickled a byte at a time is cut at the header timeout.
    let mut slow = Client::connect(edge.addr).await;
    slow.send(get("localhost").as_bytes()).await;
    assert!(slow.response().await.unwrap().starts_with("HTTP/1.1 200"));
    slow.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await;
    let (mut rd, mut wr) = slow.s.split();
    let trickle = async {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"a").await.is_err() {
                break;
            }
        }
        // Still being read after 5 s of trickling (the header timeout is 1 s).
        std::future::pending::<()>().await;
    };
    let closed = async {
        let mut rest = [0u8; 64];
        loop {
            match rd.read(&mut rest).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let cut = tokio::time::timeout(Duration::from_secs(6), async {
        tokio::select! {
            _ = closed => true,
            _ = trickle => false,
        }
    })
    .await;
    assert_eq!(cut, Ok(true), "the trickled second header was read for 5 s");

    // A second request with a header over the limit gets 431.
    let mut big = Client::connect(edge.addr).await;
    big.send(get("localhost").as_bytes()).await;
    assert!(big.response().await.unwrap().starts_with("HTTP/1.1 200"));
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    big.s.write_all(huge.as_bytes()).await.ok();
    let answer = big.response().await.unwrap();
    assert_eq!(status(&answer), 431, "{answer}");

    // A second request with both Content-Length and Transfer-Encoding is refused, never
    // forwarded.
    let mut smuggle = Client::connect(edge.addr).await;
    smuggle.send(get("localhost").as_bytes()).await;
    assert!(smuggle
        .response()
        .await
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    smuggle
        .send(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await;
    let answer = smuggle.response().await.unwrap();
    assert_eq!(status(&answer), 400, "{answer}");
    assert_eq!(
        origin.count(),
        3,
        "only the three first requests reach the origin"
    );
}

// 3 --------------------------------------------------------------------------------------

fn tls_config(cert: &Issued, origin: SocketAddr, client: &str) -> String {
    format!(
        r#"
client: {{ {client} }}
listen:
  http: ["127.0.0.1:0"]
  https: ["127.0.0.3:0"]
resources:
  - name: site
    hostnames: ["localhost"]
    origin: {{ servers: [{{ address: "{origin}" }}] }}
    tls: {{ certificate: "{}", private_key: "{}" }}
"#,
        cert.cert.display(),
        cert.key.display()
    )
}

/// A TLS connection offering `alpn`, trusting the test CA, to `localhost`.
async fn tls(
    pki: &Pki,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = within("connect", TcpStream::connect(addr)).await.unwrap();
    within(
        "tls handshake",
        pki.connector(alpn)
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn tls_handshakes_and_http2_headers_are_held_to_the_header_limits() {
    let pki = Pki::new("deadlines");
    let cert = pki.issue("site", &["localhost"]);
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&tls_config(
        &cert,
        origin.addr,
        "header_timeout: 1s, max_header_bytes: 4096",
    ));
    let https = edge.https.unwrap();

    // A TLS connection that never sends its ClientHello is closed at the header timeout.
    let mut silent = Client::connect(https).await;
    assert!(
        silent.closed_within(Duration::from_secs(5)).await,
        "a TLS connection without a ClientHello is held"
    );

    // HTTP/2: a request works, a header block over max_header_bytes does not.
    let (mut h2, conn) = within(
        "h2 handshake",
        h2::client::handshake(tls(&pki, https, &[b"h2"]).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/").body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = within("h2 response", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let req = http::Request::get("https://localhost/")
        .header("x-big", "a".repeat(20_000))
        .body(())
        .unwrap();
    let big = match h2.send_request(req, true) {
        Ok((resp, _)) => within("h2 big response", resp)
            .await
            .map(|r| r.status().as_u16()),
        Err(e) => Err(e),
    };
    assert!(
        matches!(big, Ok(431) | Err(_)),
        "a 20 KB header block was served: {big:?}"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_keepalive_timeout() {
    let pki = Pki::new("h2-idle");
    let cert = pki.issue("site", &["localhost"]);
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&tls_config(&cert, origin.addr, "keepalive_timeout: 1s"));
    let (h2, conn) = within(
        "h2 handshake",
        h2::client::handshake(tls(&pki, edge.https.unwrap(), &[b"h2"]).await),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection is held");
    drop(h2);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

// 4 and 14 -------------------------------------------------------------------------------

#[tokio::test]
async fn tls_without_sni_serves_only_hosts_of_the_default_certificate() {
    let pki = Pki::new("no-sni");
    let shop = pki.issue("shop", &["shop.test"]);
    let fallback = pki.issue("default", &["127.0.0.1", "edge.test"]);
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&format!(
        r#"
listen:
  http: ["127.0.0.1:0"]
  https: ["127.0.0.3:0"]
  default_certificate: {{ certificate: "{}", private_key: "{}" }}
resources:
  - name: shop
    hostnames: ["shop.test"]
    origin: {{ servers: [{{ address: "{o}" }}] }}
    tls: {{ certificate: "{}", private_key: "{}" }}
  - name: edge
    hostnames: ["edge.test"]
    origin: {{ servers: [{{ address: "{o}" }}] }}
"#,
        fallback.cert.display(),
        fallback.key.display(),
        shop.cert.display(),
        shop.key.display(),
        o = origin.addr
    ));
    let https = edge.https.unwrap();
    // An IP address as the server name: rustls sends no SNI.
    let no_sni = || async {
        let tcp = TcpStream::connect(https).await.unwrap();
        pki.connector(&[b"http/1.1"])
            .connect(
                ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
                tcp,
            )
            .await
            .unwrap()
    };
    for (host, want) in [("shop.test", 421), ("edge.test", 200)] {
        let mut tls = no_sni().await;
        tls.write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = String::new();
        let _ = within("answer", tls.read_to_string(&mut answer)).await;
        assert_eq!(status(&answer), want, "{host}: {answer}");
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn certificate_choice_follows_routing_under_another_customers_wildcard() {
    let pki = Pki::new("follows-routing");
    let wild = pki.issue("wild", &["*.example.test"]);
    let fallback = pki.issue("default", &["edge.test"]);
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&format!(
        r#"
listen:
  http: ["127.0.0.1:0"]
  https: ["127.0.0.3:0"]
  default_certificate: {{ certificate: "{}", private_key: "{}" }}
resources:
  - name: wild
    hostnames: ["*.example.test"]
    origin: {{ servers: [{{ address: "{o}" }}] }}
    tls: {{ certificate: "{}", private_key: "{}" }}
  - name: shop
    hostnames: ["shop.example.test"]
    origin: {{ servers: [{{ address: "{o}" }}] }}
"#,
        fallback.cert.display(),
        fallback.key.display(),
        wild.cert.display(),
        wild.key.display(),
        o = origin.addr
    ));
    let https = edge.https.unwrap();
    // Accept any certificate: what matters is which one the edge offers.
    let offered = |sni: &'static str| {
        let pki = &pki;
        async move {
            let tcp = TcpStream::connect(https).await.unwrap();
            match pki
                .connector(&[])
                .connect(ServerName::try_from(sni).unwrap(), tcp)
                .await
            {
                Ok(tls) => Some(
                    tls.get_ref().1.peer_certificates().unwrap()[0]
                        .as_ref()
                        .to_vec(),
                ),
                Err(_) => None,
            }
        }
    };
    assert_eq!(
        offered("news.example.test").await.as_deref(),
        Some(wild.der.as_slice())
    );
    // shop.example.test routes to "shop", which has no certificate: it must not get the
    // other customer's wildcard (the default one does not name it, so a verifying client
    // refuses the handshake).
    assert_eq!(offered("shop.example.test").await, None);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

// 5 --------------------------------------------------------------------------------------

#[tokio::test]
async fn a_host_that_is_not_a_host_name_is_refused_before_routing() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: wild
    hostnames: ["*.example.test", "localhost"]
    origin: {{ servers: [{{ address: "{}" }}] }}
"#,
        origin.addr
    ));
    for host in [
        "evil/.example.test",
        "2130706433/.example.test",
        "a b.example.test",
        "\"q\".example.test",
        "x%2F.example.test",
        "u@ok.example.test",
        "ok.example.test:99999",
    ] {
        let req = upgrade_request("/ws", "").replace("Host: localhost", &format!("Host: {host}"));
        let answer = raw_request(edge.addr, &req).await;
        assert_eq!(status(&answer), 400, "{host}: {answer}");
        let plain = raw_request(
            edge.addr,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&plain), 400, "{host}: {plain}");
    }
    let none = raw_request(edge.addr, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&none), 400, "{none}");
    let ok = raw_request(
        edge.addr,
        &upgrade_request("/ws", "").replace("Host: localhost", "Host: ok.example.test"),
    )
    .await;
    assert_eq!(status(&ok), 101, "{ok}");
    assert_eq!(
        origin.upgrades(),
        1,
        "only the valid Host reached the origin"
    );
}

// 6 --------------------------------------------------------------------------------------

#[tokio::test]
async fn an_origin_1xx_before_its_101_is_forwarded_and_the_tunnel_opens() {
    let origin = raw_origin(|head, mut s| async move {
        let interim = if head.contains("/continue") {
            "HTTP/1.1 100 Continue\r\n\r\n".to_string()
        } else {
            "HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n".to_string()
        };
        let switch = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&head)
        );
        let _ = s.write_all(interim.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = s.write_all(switch.as_bytes()).await;
        echo(s).await;
    })
    .await;
    let edge = Edge::start(&one_resource(origin.0, ""));
    for (path, interim) in [("/hints", 103), ("/continue", 100)] {
        let mut c = Client::connect(edge.addr).await;
        c.send(upgrade_request(path, "").as_bytes()).await;
        let first = c.response().await.expect("an answer");
        assert_eq!(status(&first), interim, "{first}");
        if interim == 103 {
            assert_eq!(header(&first, "link"), Some("</app.js>; rel=preload"));
        }
        let second = c.response().await.expect("the 101");
        assert_eq!(status(&second), 101, "{second}");
        assert!(c.buf.is_empty());
        assert_eq!(echo_raw(c.s, "through").await, "through");
    }
}

// 7 --------------------------------------------------------------------------------------

#[tokio::test]
async fn a_refused_upgrade_answer_is_bounded_and_frees_its_slot_at_once() {
    let origin = raw_origin(|head, mut s| async move {
        if head.starts_with("GET /stall") {
            // Answers 200, sends part of the body, and goes silent.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
                .await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let switch = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&head)
        );
        let _ = s.write_all(switch.as_bytes()).await;
        echo(s).await;
    })
    .await;
    let edge = Edge::start(
        &one_resource(origin.0, ", max_connections: 1")
            .replace("handshake_timeout: 2s", "handshake_timeout: 1s"),
    );
    let mut stalled = Client::connect(edge.addr).await;
    stalled.send(upgrade_request("/stall", "").as_bytes()).await;
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 256];
        let n = within("the origin's 200", stalled.s.read(&mut b))
            .await
            .unwrap();
        assert!(n > 0);
        head.extend_from_slice(&b[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    // The refused upgrade holds no tunnel slot: another upgrade gets the only one.
    let answer = raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&answer), 101, "{answer}");
    // And its answer is not relayed for ever.
    assert!(
        stalled.closed_within(Duration::from_secs(5)).await,
        "a silent origin answer holds the client"
    );
}

// 9 --------------------------------------------------------------------------------------

#[tokio::test]
async fn one_client_address_cannot_take_every_slot() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(
        origin.addr,
        ", max_connections: 10, max_connections_per_ip: 3",
    ));
    let from = |ip: &'static str| {
        let addr = edge.addr;
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            let mut s = within("connect", sock.connect(addr)).await.unwrap();
            s.write_all(upgrade_request("/ws", "").as_bytes())
                .await
                .unwrap();
            let mut c = Client { s, buf: Vec::new() };
            let answer = c.response().await.unwrap();
            (status(&answer), answer, c)
        }
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        let (code, answer, c) = from("127.0.0.1").await;
        assert_eq!(code, 101, "{answer}");
        open.push(c);
    }
    let (code, answer, _) = from("127.0.0.1").await;
    assert_eq!(code, 429, "{answer}");
    assert!(header(&answer, "retry-after").is_some(), "{answer}");
    // Another address still gets in, and so does the first once one of its tunnels ends.
    let (code, _, other) = from("127.0.0.5").await;
    assert_eq!(code, 101);
    drop(open.pop());
    let deadline = Instant::now() + STEP;
    loop {
        let (code, _, c) = from("127.0.0.1").await;
        if code == 101 {
            open.push(c);
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(other);
}

// 10 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_never_block_the_proxy() {
    let origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("stalled-log");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, with_admin(&one_resource(origin.addr, ""))).unwrap();
    // Nobody reads wsedge's stdout once it is up: a log shipper that stalled.
    let edge = Edge::start_opts(&path, dir, &[], true, &wsedge_bin());
    // More lines than the pipe and the log's queue hold: pipelined, 100 at a time.
    let mut c = Client::connect(edge.addr).await;
    let batch = "GET /p HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(100);
    for round in 0..200 {
        c.send(batch.as_bytes()).await;
        for i in 0..100 {
            let answer = c
                .response()
                .await
                .unwrap_or_else(|| panic!("request {} got no answer", round * 100 + i));
            assert_eq!(status(&answer), 200, "{}", edge.log_text());
        }
    }
    let metrics = edge.admin_request("GET", "/metrics").await.1;
    let dropped = metric(&metrics, "wsedge_access_log_dropped_total").unwrap();
    assert!(dropped > 0.0, "{metrics}");
}

#[tokio::test]
async fn access_log_file_is_reopened_on_sigusr1_and_on_reload() {
    let origin = Origin::start(Mode::Status(200)).await;
    let dir = scratch_dir("rotate");
    let log = dir.join("access.log");
    let path = dir.join("wsedge.yaml");
    std::fs::write(
        &path,
        with_admin(&format!(
            "access_log: {}\n{}",
            log.display(),
            one_resource(origin.addr, "")
        )),
    )
    .unwrap();
    let edge = Edge::start_file(&path, dir.clone(), &[]);
    let wait_for = |file: &std::path::Path, needle: &str| {
        let end = Instant::now() + STEP;
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if text.contains(needle) || Instant::now() > end {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    raw_request(
        edge.addr,
        "GET /one HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(wait_for(&log, "/one").contains("/one"));
    // Log rotation: the file is moved away, then the edge is told.
    // The writer thread creates the file when it has reopened it: the event to wait for
    // (a line sent before that still goes to the file that was moved away).
    let reopened = |file: &std::path::Path| {
        let end = Instant::now() + STEP;
        while !file.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(file.exists(), "{} was not reopened", file.display());
    };
    std::fs::rename(&log, dir.join("access.log.1")).unwrap();
    edge.signal("USR1");
    edge.wait_log(&["SIGUSR1"]);
    reopened(&log);
    raw_request(
        edge.addr,
        "GET /two HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = wait_for(&log, "/two");
    assert!(text.contains("/two") && !text.contains("/one"), "{text}");
    std::fs::rename(&log, dir.join("access.log.2")).unwrap();
    let (code, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    reopened(&log);
    raw_request(
        edge.addr,
        "GET /three HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(wait_for(&log, "/three").contains("/three"));
}

// 11 -------------------------------------------------------------------------------------

#[tokio::test]
async fn a_file_that_passes_t_starts_and_a_failed_reload_never_stops_reloads() {
    let origin = Origin::start(Mode::Echo).await;
    let with_check = |path: &str| {
        one_resource(origin.addr, "").replace(
            "      servers:",
            &format!("      health_check: {{ path: \"{path}\", interval: 1s }}\n      servers:"),
        )
    };
    let out = check_file(&with_check("/health check"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("health_check.path"), "{err}");
    for hostile in ["weight: 4000000000", "weight: 0"] {
        let yaml = one_resource(origin.addr, "").replace(
            &format!("{{ address: \"{}\" }}", origin.addr),
            &format!("{{ address: \"{}\", {hostile} }}", origin.addr),
        );
        let out = check_file(&yaml);
        assert!(!out.status.success(), "{hostile} passed -t");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("weight"),
            "{hostile}"
        );
    }

    let edge = Edge::start(&with_check("/healthz"));
    let file = edge.dir.join("wsedge.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("/healthz", "/health check")).unwrap();
    let (code, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("health_check.path"), "{body}");
    edge.signal("HUP");
    let end = Instant::now() + STEP;
    while edge.log_text().matches("reload failed").count() < 2 {
        assert!(Instant::now() < end, "the SIGHUP reload never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both reload paths still work afterwards.
    std::fs::write(&file, good.replace("/healthz", "/ready")).unwrap();
    edge.signal("HUP");
    let log = edge.wait_log(&["reloaded"]);
    assert!(log.contains("reloaded"), "{log}");
    let (code, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(code, 200, "{body}");
    let answer = raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&answer), 101);
}

// 12 -------------------------------------------------------------------------------------

#[tokio::test]
async fn requests_refused_before_the_hooks_are_logged_and_counted() {
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&format!(
        "client: {{ max_header_bytes: 4096 }}\n{}",
        one_resource(origin.addr, "")
    ));
    let cases: [(&str, u16); 5] = [
        (
            "POST /smuggle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        ("CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 405),
        ("GET /lf HTTP/1.1\nHost: localhost\n\n", 400),
        ("GET /nobody HTTP/1.1\r\nHost: nobody.test\r\n\r\n", 404),
        ("GET /dup HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let answer = raw_request(edge.addr, req).await;
        assert_eq!(status(&answer), want, "{req:?}: {answer}");
    }
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX: {}\r\n\r\n",
        "a".repeat(8000)
    );
    assert_eq!(status(&raw_request(edge.addr, &big).await), 431);
    let lines = edge.wait_access(6, |l| l.contains("\"kind\":\"http\""));
    for code in ["400", "405", "404", "431"] {
        assert!(
            lines.iter().any(|l| field(l, "status") == Some(code)),
            "no access line with {code}: {lines:?}"
        );
    }
    let m = edge.admin_request("GET", "/metrics").await.1;
    for (code, n) in [("400", 3.0), ("404", 1.0), ("405", 1.0), ("431", 1.0)] {
        let series = format!("wsedge_http_responses_total{{code=\"{code}\",resource=\"\"}}");
        assert_eq!(metric(&m, &series), Some(n), "{series}\n{m}");
    }
    assert_eq!(origin.count(), 0);
}

// 13 -------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_refuses_web_pages_foreign_hosts_and_posts_without_the_token() {
    let origin = Origin::start(Mode::Echo).await;
    let dir = scratch_dir("admin-token");
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    let edge = Edge::start(&format!(
        "admin: {{ listen: \"127.0.0.2:0\", token_file: \"{}\", hostnames: [\"edge-admin.internal\"] }}\n{}",
        dir.join("token").display(),
        one_resource(origin.addr, "")
    ));
    let host = format!("Host: {}\r\n", edge.admin);
    let auth = format!("Authorization: Bearer {token}\r\n");
    for (method, path, headers, want) in [
        ("GET", "/healthz", host.clone(), 200),
        ("GET", "/healthz", "Host: localhost:9090\r\n".into(), 200),
        (
            "GET",
            "/healthz",
            "Host: edge-admin.internal\r\n".into(),
            200,
        ),
        // DNS rebinding: a name of the attacker's pointing at the admin address.
        (
            "GET",
            "/metrics",
            "Host: rebind.attacker.test\r\n".into(),
            403,
        ),
        (
            "POST",
            "/reload",
            format!("{host}{auth}Origin: https://attacker.test\r\n"),
            403,
        ),
        (
            "POST",
            "/reload",
            format!("{host}{auth}Sec-Fetch-Site: cross-site\r\n"),
            403,
        ),
        ("POST", "/reload", host.clone(), 401),
        (
            "POST",
            "/reload",
            format!("{host}Authorization: Bearer wrong\r\n"),
            401,
        ),
        ("POST", "/reload", format!("{host}{auth}"), 200),
        // The drain endpoints are POSTs like /reload, with the same guard.
        (
            "POST",
            "/drain",
            format!("{host}{auth}Origin: https://attacker.test\r\n"),
            403,
        ),
        ("POST", "/drain", host.clone(), 401),
        ("POST", "/drain/cancel", host.clone(), 401),
        ("GET", "/drain", format!("{host}{auth}"), 405),
        ("POST", "/drain/", format!("{host}{auth}"), 404),
        ("POST", "/drain/cancel", format!("{host}{auth}"), 409),
    ] {
        let (code, body) = edge.admin_request_with(method, path, &headers).await;
        assert_eq!(code, want, "{method} {path} {headers:?}: {body}");
    }
    let out = check_file(&format!(
        "admin: {{ listen: \"127.0.0.1:0\", token_file: \"{}\" }}\n{}",
        dir.join("missing").display(),
        one_resource(origin.addr, "")
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.token_file"));
}

// 15 -------------------------------------------------------------------------------------

#[tokio::test]
async fn two_origin_headers_are_refused() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(
        origin.addr,
        r#", allowed_origins: ["https://good.test"]"#,
    ));
    let answer = raw_request(
        edge.addr,
        &upgrade_request(
            "/ws",
            "Origin: https://good.test\r\nOrigin: https://evil.test\r\n",
        ),
    )
    .await;
    assert_eq!(status(&answer), 400, "{answer}");
    assert_eq!(origin.count(), 0);
}

// 16 -------------------------------------------------------------------------------------

#[tokio::test]
async fn huge_durations_are_refused_by_the_check() {
    let origin = Origin::start(Mode::Echo).await;
    for bad in [
        ", idle_timeout: 18446744073709551615h",
        ", max_lifetime: 5124095576030431h",
        ", max_lifetime: 100000h",
    ] {
        let out = check_file(&one_resource(origin.addr, bad).replace("idle_timeout: 30s, ", ""));
        assert!(!out.status.success(), "{bad} passed -t");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("too long"),
            "{bad}"
        );
    }
    // The longest allowed lifetime works end to end.
    let edge = Edge::start(
        &one_resource(origin.addr, ", max_lifetime: 8784h, idle_timeout: 8784h")
            .replace("idle_timeout: 30s, ", ""),
    );
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    assert_eq!(
        echo_once(&mut ws, Message::text("long")).await,
        Message::text("long")
    );
}

// 17 -------------------------------------------------------------------------------------

#[tokio::test]
async fn close_codes_are_logged_with_metrics_off() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&format!(
        "metrics: false\n{}",
        one_resource(origin.addr, "")
    ));
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    echo_once(&mut ws, Message::text("hi")).await;
    within(
        "close",
        ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        })),
    )
    .await
    .unwrap();
    while let Some(Ok(_)) = within("drain", ws.next()).await {}
    let lines = edge.wait_access(1, |l| l.contains("\"kind\":\"tunnel\""));
    let line = lines
        .iter()
        .find(|l| l.contains("\"kind\":\"tunnel\""))
        .unwrap();
    assert_eq!(field(line, "close_reason"), Some("client_closed"), "{line}");
    assert_eq!(field(line, "close_code"), Some("1000"), "{line}");
}

// 18 -------------------------------------------------------------------------------------

#[tokio::test]
async fn pipelined_requests_are_all_answered_and_bare_lf_gets_400() {
    // An origin that reads each request's body and answers once per connection.
    let (origin, heads) = raw_origin(|head, mut s| async move {
        if let Some(len) = header(&head, "content-length") {
            let mut body = vec![0u8; len.parse().unwrap()];
            let _ = s.read_exact(&mut body).await;
        } else if header(&head, "transfer-encoding").is_some() {
            let mut body = Vec::new();
            let mut b = [0u8; 1];
            while !body.ends_with(b"0\r\n\r\n") && s.read(&mut b).await.is_ok_and(|n| n == 1) {
                body.push(b[0]);
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await;
    })
    .await;
    let edge = Edge::start(&one_resource(origin, ""));
    let mut c = Client::connect(edge.addr).await;
    let body_post = "POST /b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nbody";
    let chunked = "POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    c.send(format!("GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n{body_post}{chunked}GET /d HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await;
    for i in 0..4 {
        let answer = c
            .response()
            .await
            .unwrap_or_else(|| panic!("pipelined request {i} was dropped"));
        assert_eq!(status(&answer), 200, "request {i}: {answer}");
    }
    let paths: Vec<String> = heads
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/d"]);
    let answer = raw_request(edge.addr, "GET / HTTP/1.1\nHost: localhost\n\n").await;
    assert_eq!(status(&answer), 400, "{answer}");
}

// 19 -------------------------------------------------------------------------------------

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit_and_logged() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap();
    if hard <= 256 {
        return; // nothing to raise on this host
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::start(Mode::Echo));
    let dir = scratch_dir("nofile");
    let path = dir.join("wsedge.yaml");
    std::fs::write(&path, with_admin(&one_resource(origin.addr, ""))).unwrap();
    // Start it with a low soft limit, as many hosts do.
    let wrapper = dir.join("low-limit.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -Sn 256\nexec {} \"$@\"\n",
            wsedge_bin().display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    let edge = Edge::start_opts(&path, dir, &[], false, &wrapper);
    let log = edge.wait_log(&["open files: up to"]);
    assert!(log.contains(&format!("open files: up to {hard}")), "{log}");
    let theirs = std::fs::read_to_string(format!("/proc/{}/limits", edge.pid)).unwrap();
    let soft = theirs
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    assert_eq!(soft, hard.to_string(), "{theirs}");
    drop(edge);
    drop(origin);
}

// 20 -------------------------------------------------------------------------------------

/// `TCP_USER_TIMEOUT` of the socket of process `pid` whose peer or local address is `addr`.
#[allow(unsafe_code)]
fn user_timeout_of(pid: u32, addr: SocketAddr, peer: bool) -> Option<u32> {
    // SAFETY (all below): plain syscalls on descriptors this function owns or checks.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
    if pidfd < 0 {
        return None;
    }
    let mut found = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, n, 0) } as i32;
        if fd < 0 {
            continue;
        }
        let sock = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let other = if peer {
            sock.peer_addr()
        } else {
            sock.local_addr()
        };
        if other.ok() == Some(addr) {
            let mut v: u32 = 0;
            let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_USER_TIMEOUT,
                    &mut v as *mut u32 as *mut libc::c_void,
                    &mut len,
                )
            };
            if r == 0 {
                found = Some(v);
            }
        }
        drop(sock);
    }
    unsafe { libc::close(pidfd) };
    found
}

#[tokio::test]
async fn both_sockets_of_a_tunnel_have_a_user_timeout() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(
        &one_resource(origin.addr, "").replace("idle_timeout: 30s", "idle_timeout: 45s"),
    );
    let tcp = TcpStream::connect(edge.addr).await.unwrap();
    let mine = tcp.local_addr().unwrap();
    let (mut ws, _) = within(
        "handshake",
        tokio_tungstenite::client_async(edge.url("/ws"), tcp),
    )
    .await
    .unwrap();
    echo_once(&mut ws, Message::text("hi")).await;
    let Some(client_side) = user_timeout_of(edge.pid, mine, true) else {
        eprintln!("cannot read another process's sockets here (pidfd_getfd): skipped");
        return;
    };
    assert_eq!(client_side, 45_000, "the client socket");
    let origin_side = user_timeout_of(edge.pid, origin.addr, true);
    assert_eq!(origin_side, Some(45_000), "the origin socket");
}

// 21 -------------------------------------------------------------------------------------
// The handshake's bounds on Pingora's shared timer (issue 19 moved them off tokio's): an
// origin that never finishes its answer, and one that never finishes accepting.

#[tokio::test]
async fn an_origin_that_sends_interim_answers_for_ever_is_given_up_on_at_the_handshake_timeout() {
    let origin = raw_origin(|_head, mut s| async move {
        for _ in 0..600 {
            if s.write_all(b"HTTP/1.1 103 Early Hints\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let edge = Edge::start(&one_resource(origin.0, ""));
    let started = Instant::now();
    let mut c = Client::connect(edge.addr).await;
    c.send(upgrade_request("/ws", "").as_bytes()).await;
    let mut interim = 0;
    let last = loop {
        let answer = c.response().await.expect("a final answer");
        if status(&answer) != 103 {
            break answer;
        }
        interim += 1;
        assert!(interim < 100, "interim answers are not relayed for ever");
    };
    let took = started.elapsed();
    assert_eq!(status(&last), 504, "{last}");
    assert!(
        interim >= 2,
        "the interim answers were passed on: {interim}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "one handshake timeout (2s) for all of them: {took:?}"
    );
}

#[tokio::test]
async fn an_origin_that_never_completes_the_connect_is_given_up_on_at_the_connect_timeout() {
    // A listener whose accept queue is full and never accepted from: further SYNs are
    // dropped, so a connect neither succeeds nor fails.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            held.push(s);
        }
    }
    if tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
        .await
        .is_ok()
    {
        eprintln!("this kernel completes connects to a full accept queue: skipped");
        return;
    }
    let yaml = one_resource(addr, "").replace(
        &format!("servers: [{{ address: \"{addr}\" }}]"),
        &format!("servers: [{{ address: \"{addr}\" }}]\n      connect_timeout: 1s"),
    );
    assert!(yaml.contains("connect_timeout: 1s"), "{yaml}");
    let edge = Edge::start(&yaml);
    let (answer, took) = timed_raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&answer), 502, "{answer}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "one connect timeout (1s): {took:?}"
    );
    drop(held);
}
