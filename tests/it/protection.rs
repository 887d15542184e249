//! Protection: allowed origins, connection caps, handshake rates, lifetimes, and hostile
//! HTTP, against a real wsedge; rejected requests never reach the origin.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn resource(origin: std::net::SocketAddr, name: &str, host: &str, ws: &str) -> String {
    format!(
        r#"
  - name: {name}
    hostnames: ["{host}"]
    origin: {{ servers: [{{ address: "{origin}" }}] }}
    websocket: {{ {ws} }}"#
    )
}

fn config(resources: &[String], top: &str) -> String {
    format!(
        "{top}\nlisten: {{ http: [\"127.0.0.1:0\"] }}\nresources:{}\n",
        resources.concat()
    )
}

async fn upgrade(edge: &Edge, host: &str, extra: &str) -> String {
    raw_request(
        edge.addr,
        &upgrade_request("/ws", extra).replace("Host: localhost", &format!("Host: {host}")),
    )
    .await
}

#[tokio::test]
async fn allowed_origins_gate_browsers_and_none_admits_clients_without_origin() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(
        &[
            resource(
                origin.addr,
                "strict",
                "strict.localhost",
                r#"allowed_origins: ["https://chat.example.com", "http://localhost:8080"]"#,
            ),
            resource(
                origin.addr,
                "apps",
                "apps.localhost",
                r#"allowed_origins: ["https://chat.example.com", "none"]"#,
            ),
        ],
        "",
    ));
    for (host, extra) in [
        ("strict.localhost", "Origin: https://evil.example\r\n"),
        (
            "strict.localhost",
            "Origin: https://chat.example.com.evil.example\r\n",
        ),
        ("strict.localhost", "Origin: http://chat.example.com\r\n"),
        ("strict.localhost", ""),
        ("apps.localhost", "Origin: https://evil.example\r\n"),
    ] {
        let a = upgrade(&edge, host, extra).await;
        assert_eq!(status(&a), 403, "{host} {extra:?}: {a}");
        assert!(a.contains("not allowed"), "{a}");
    }
    assert_eq!(
        origin.count(),
        0,
        "rejected upgrades never reach the origin"
    );
    for (host, extra) in [
        ("strict.localhost", "Origin: https://chat.example.com\r\n"),
        ("strict.localhost", "Origin: HTTP://LOCALHOST:8080\r\n"),
        ("apps.localhost", ""),
        ("apps.localhost", "Origin: https://chat.example.com\r\n"),
    ] {
        assert_eq!(
            status(&upgrade(&edge, host, extra).await),
            101,
            "{host} {extra:?}"
        );
    }
}

#[tokio::test]
async fn handshake_rate_per_ip_gives_429_with_retry_after() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(
        &[resource(
            origin.addr,
            "rated",
            "localhost",
            "handshake_rate: { rate: 1/s, burst: 3 }",
        )],
        "",
    ));
    for i in 0..3 {
        assert_eq!(
            status(&upgrade(&edge, "localhost", "").await),
            101,
            "handshake {i} is within the burst"
        );
    }
    let a = upgrade(&edge, "localhost", "").await;
    assert_eq!(status(&a), 429, "{a}");
    let retry: u64 = header(&a, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    // The bucket's wait (1 s here), with jitter up to twice that.
    assert!((1..=2).contains(&retry), "{a}");
    assert_eq!(
        origin.count(),
        3,
        "the refused handshake never reached the origin"
    );
}

/// Opens a tunnel and returns it, or the status that refused it.
async fn try_open(edge: &Edge, path: &str) -> Result<WsStream, u16> {
    match within("connect", tokio_tungstenite::connect_async(edge.url(path))).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Waits until a new tunnel can be opened (the slot came back), bounded.
async fn slot_frees(edge: &Edge, how: &str) -> WsStream {
    let end = Instant::now() + STEP;
    loop {
        match try_open(edge, "/ws").await {
            Ok(ws) => return ws,
            Err(503) if Instant::now() < end => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("the slot never came back after {how}: {s}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_gives_503_and_frees_the_slot_however_a_tunnel_ends() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(
        &[resource(
            origin.addr,
            "capped",
            "127.0.0.1",
            "max_connections: 2, idle_timeout: 1s, max_lifetime: 3s",
        )],
        "",
    ));
    let mut a = try_open(&edge, "/ws").await.unwrap();
    let b = try_open(&edge, "/ws").await.unwrap();
    let answer = raw_request(
        edge.addr,
        &upgrade_request("/ws", "").replace("Host: localhost", "Host: 127.0.0.1"),
    )
    .await;
    assert_eq!(status(&answer), 503, "{answer}");
    // 5 to 10 s, drawn for each answer: refused clients do not all come back together.
    let retry: u64 = header(&answer, "retry-after").unwrap().parse().unwrap();
    assert!((5..=10).contains(&retry), "{answer}");
    let before = origin.count();

    // Client close.
    within("close", a.close(None)).await.unwrap();
    let mut c = slot_frees(&edge, "a client close").await;
    // Abrupt client drop (reset, no Close frame).
    if let tokio_tungstenite::MaybeTlsStream::Plain(s) = b.get_ref() {
        // A zero linger sends RST at once instead of blocking.
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(b);
    let d = slot_frees(&edge, "an abrupt drop").await;
    // Origin close: one slot is taken by `c`; the origin closes the other.
    drop(d);
    let _ = slot_frees(&edge, "the drop of d").await; // takes the slot d had; closes on idle
                                                      // Idle timeout: the tunnel above sits silent for 1 s and is closed.
    let _idle = slot_frees(&edge, "an idle timeout").await;
    // Lifetime: keep `c` busy; it is closed at 3 s regardless.
    let busy = async {
        loop {
            if c.send(Message::text("keepalive")).await.is_err() {
                break;
            }
            match c.next().await {
                Some(Ok(Message::Text(_))) => {}
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    within("lifetime", busy).await;
    let _after_lifetime = slot_frees(&edge, "max_lifetime").await;
    let mut origin_closes = try_open(&edge, "/close-me").await;
    while origin_closes.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        origin_closes = try_open(&edge, "/close-me").await;
    }
    let mut oc = origin_closes.unwrap();
    while let Some(Ok(_)) = within("origin close", oc.next()).await {}
    let _after_origin_close = slot_frees(&edge, "an origin close").await;

    // The slot can come back a moment before the access line is written: wait for the
    // last tunnel's line, not for a count of lines.
    let lines = edge.wait_access(1, |l| field(l, "close_reason") == Some("origin_closed"));
    let reasons: Vec<&str> = lines
        .iter()
        .filter_map(|l| field(l, "close_reason"))
        .collect();
    for want in [
        "client_closed",
        "error",
        "idle_timeout",
        "max_lifetime",
        "origin_closed",
    ] {
        assert!(reasons.contains(&want), "no {want} in {reasons:?}");
    }
    assert!(origin.count() > before);
}

#[tokio::test]
async fn max_lifetime_closes_a_busy_tunnel_at_most_a_second_late() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(
        &[resource(
            origin.addr,
            "short",
            "127.0.0.1",
            "max_lifetime: 2s",
        )],
        "",
    ));
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    let opened = Instant::now();
    loop {
        if ws.send(Message::text("busy")).await.is_err() {
            break;
        }
        match within("echo", ws.next()).await {
            Some(Ok(Message::Text(_))) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => break,
        }
        assert!(
            opened.elapsed() < Duration::from_secs(5),
            "still open after 5 s"
        );
    }
    let lived = opened.elapsed();
    assert!(
        lived >= Duration::from_millis(1900) && lived <= Duration::from_secs(3),
        "{lived:?}"
    );
    let lines = edge.wait_access(1, |l| l.contains("max_lifetime"));
    assert!(
        lines
            .iter()
            .any(|l| field(l, "close_reason") == Some("max_lifetime")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn hostile_http_never_reaches_the_origin() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(
        &[resource(origin.addr, "site", "localhost", "")],
        "client: { header_timeout: 1s, max_header_bytes: 8192 }",
    ));
    // Oversized header → 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let a = raw_request(edge.addr, &big).await;
    assert_eq!(status(&a), 431, "{a}");
    // An upgrade with a body, and conflicting framing on a plain request → 400.
    for req in [
        upgrade_request("/ws", "Content-Length: 5\r\n") + "hello",
        upgrade_request("/ws", "Transfer-Encoding: chunked\r\n") + "0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string(),
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_string(),
    ] {
        let a = raw_request(edge.addr, &req).await;
        assert_eq!(status(&a), 400, "{req:?}: {a}");
    }
    // Slowloris: a header trickled in a byte at a time is cut at the header timeout.
    let mut s = within("connect", tokio::net::TcpStream::connect(edge.addr))
        .await
        .unwrap();
    let start = Instant::now();
    let trickle =
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in trickle {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            assert!(matches!(r, Ok(0) | Err(_)), "no answer expected, got {r:?}");
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled header was not cut");
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(origin.count(), 0, "nothing reached the origin");
}

/// 500 slowloris connections on one resource while another resource serves handshakes:
/// every handshake succeeds, and the slow connections are all cut at the header timeout.
/// The latencies are printed (`--nocapture`) for the record, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slowloris_connections_do_not_starve_another_resource() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(
        &[
            resource(origin.addr, "victim", "victim.localhost", ""),
            resource(origin.addr, "other", "127.0.0.1", ""),
        ],
        "pingora: { threads: 2 }\nclient: { header_timeout: 3s }",
    ));
    async fn handshake_times(edge: &Edge, n: usize) -> Vec<Duration> {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let (mut ws, _) = within(
                "handshake",
                tokio_tungstenite::connect_async(edge.url("/ws")),
            )
            .await
            .unwrap();
            times.push(t.elapsed());
            let _ = ws.close(None).await;
        }
        times.sort();
        times
    }
    let baseline = handshake_times(&edge, 100).await;

    let mut slow = Vec::with_capacity(500);
    for _ in 0..500 {
        let mut s = within("connect", tokio::net::TcpStream::connect(edge.addr))
            .await
            .unwrap();
        within(
            "write",
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: victim.localhost\r\n"),
        )
        .await
        .unwrap();
        slow.push(s);
    }
    let opened = Instant::now();
    let under_attack = handshake_times(&edge, 100).await;
    let p = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "handshake latency on another resource: baseline p50 {:?} p99 {:?}; with 500 slowloris p50 {:?} p99 {:?}",
        p(&baseline, 0.5),
        p(&baseline, 0.99),
        p(&under_attack, 0.5),
        p(&under_attack, 0.99)
    );
    // Each slow connection is closed by the edge at the header timeout.
    let mut cut = 0;
    for s in &mut slow {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(STEP, s.read(&mut buf))
            .await
            .expect("closed by the edge");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        cut += 1;
    }
    assert_eq!(cut, 500);
    let took = opened.elapsed();
    println!(
        "all 500 slowloris connections were closed {took:?} after opening (header_timeout 3s)"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert_eq!(
        origin.count(),
        200,
        "only the 200 real handshakes reached the origin"
    );
}

/// The header guard reads every request of a connection itself; the limit on requests per
/// connection (Pingora's `keepalive_request_limit`, `client.max_requests_per_connection`)
/// still ends the connection after the last one.
#[tokio::test]
async fn a_connection_carries_at_most_max_requests_per_connection() {
    let origin = Origin::start(Mode::Status(200)).await;
    let edge = Edge::start(&format!(
        "client: {{ max_requests_per_connection: 2 }}\n{}",
        one_resource(origin.addr, "")
    ));
    let mut s = within("connect", tokio::net::TcpStream::connect(edge.addr))
        .await
        .unwrap();
    let get = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut answers = String::new();
    for _ in 0..2 {
        within("send", s.write_all(get)).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = within("answer", s.read(&mut buf)).await.unwrap();
        answers.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    // After the second, the connection ends: a third request gets nothing.
    let _ = s.write_all(get).await;
    let mut buf = [0u8; 64];
    let n = within("the end of the connection", s.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "a third answer: {}",
        String::from_utf8_lossy(&buf[..n])
    );
}
