//! The idle timeout (the heartbeat interval): a silent tunnel closes within a second of it,
//! traffic either way keeps it open, and Pingora's own 60 s read timeout does not apply.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Waits for the tunnel to end and returns how long after `since` it did.
async fn time_to_close<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    since: Instant,
    limit: Duration,
) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let end = tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "tunnel still open after {limit:?}");
    since.elapsed()
}

#[tokio::test]
async fn silent_tunnel_closes_within_a_second_of_idle_timeout() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(
        &one_resource(origin.addr, "").replace("idle_timeout: 30s", "idle_timeout: 2s"),
    );
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    echo_once(&mut ws, Message::text("last words")).await;
    let last = Instant::now();
    let took = time_to_close(&mut ws, last, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(1900),
        "closed too early: {took:?}"
    );
    assert!(took <= Duration::from_secs(3), "closed too late: {took:?}");
}

#[tokio::test]
async fn traffic_in_either_direction_keeps_the_tunnel_open() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(
        &one_resource(origin.addr, "").replace("idle_timeout: 30s", "idle_timeout: 2s"),
    );

    // Origin → client only: the origin pushes every 500 ms and the client never writes.
    let (mut ws, _) = within(
        "connect",
        tokio_tungstenite::connect_async(edge.url("/push/500")),
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut ticks = 0;
    while start.elapsed() < Duration::from_secs(6) {
        match within("tick", ws.next()).await {
            Some(Ok(Message::Text(t))) if t.as_str() == "tick" => ticks += 1,
            other => panic!(
                "origin → client traffic did not keep the tunnel open: {other:?} after {:?}",
                start.elapsed()
            ),
        }
    }
    assert!(ticks >= 10, "{ticks}");

    // Client → origin only: the origin reads and never writes; the client sends every
    // 500 ms for 6 s (3 idle timeouts).
    let (mut ws, _) = within(
        "connect",
        tokio_tungstenite::connect_async(edge.url("/sink")),
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(6) {
        within("send", ws.send(Message::text(format!("m{sent}"))))
            .await
            .expect("tunnel cut while the client was talking");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The origin got every message, in order, and the tunnel is still open: a ping is
    // answered.
    within("ping", ws.send(Message::Ping(b"p".to_vec())))
        .await
        .unwrap();
    let m = within("pong", ws.next()).await;
    assert!(matches!(m, Some(Ok(Message::Pong(_)))), "{m:?}");
    let got: Vec<Seen> = origin
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Message(_)))
        .collect();
    let want: Vec<Seen> = (0..sent).map(|i| Seen::Message(format!("m{i}"))).collect();
    assert_eq!(got, want);
}

/// A client that stops reading while the origin floods it cannot pin the tunnel by
/// talking: once the edge holds bytes the client will not take for the idle timeout, the
/// tunnel ends (reason `error`), though client → origin traffic never stopped.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_idle_timeout_even_while_it_talks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw origin: answers 101, then writes 64 KiB binary frames as fast as it can while
    // discarding what the client sends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = rd.read(&mut b).await.unwrap();
            assert!(n > 0, "no upgrade request");
            head.extend_from_slice(&b[..n]);
        }
        tokio::spawn(async move { while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {} });
        wr.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
            .await
            .unwrap();
        let mut frame = vec![0x82u8, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        frame.resize(10 + 65536, b'x');
        // Bounded: the edge cuts the tunnel long before 64 GiB.
        for _ in 0..1_000_000 {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let edge =
        Edge::start(&one_resource(origin, "").replace("idle_timeout: 30s", "idle_timeout: 2s"));
    let mut s = within("connect", tokio::net::TcpStream::connect(edge.addr))
        .await
        .unwrap();
    within(
        "upgrade",
        s.write_all(upgrade_request("/ws", "").as_bytes()),
    )
    .await
    .unwrap();
    let mut b = [0u8; 512];
    let n = within("101", s.read(&mut b)).await.unwrap();
    assert!(
        b[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&b[..n])
    );
    // From now on the client never reads; it sends a small masked text frame every 300 ms.
    let start = Instant::now();
    let is_tunnel = |l: &str| l.contains("\"kind\":\"tunnel\"");
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(10)
        && !edge.access_lines().iter().any(|l| is_tunnel(l))
    {
        let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        if within("send", s.write_all(&frame)).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let took = start.elapsed();
    let line = edge
        .wait_access(1, is_tunnel)
        .into_iter()
        .find(|l| is_tunnel(l))
        .expect("the tunnel was never cut");
    assert_eq!(field(&line, "close_reason"), Some("error"), "{line}");
    assert!(sent >= 5, "the client talked {sent} times");
    assert!(
        took >= Duration::from_millis(1900),
        "cut too early: {took:?}"
    );
}
