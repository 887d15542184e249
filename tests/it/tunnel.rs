//! Messages through a real wsedge to a real origin: every kind and size arrives
//! byte-identical and in order.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

fn big_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..Default::default()
    }
}

#[tokio::test]
async fn text_and_binary_from_0_bytes_to_16_mib_are_byte_identical_and_in_order() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(origin.addr, ""));
    let (mut ws, resp) = within(
        "connect",
        tokio_tungstenite::connect_async_with_config(edge.url("/ws"), Some(big_config()), false),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);

    let sizes = [
        0usize,
        1,
        125,
        126,
        127,
        65535,
        65536,
        65537,
        1 << 20,
        16 << 20,
    ];
    echo_sizes(&mut ws, &sizes).await;

    // Pipelined: 1,000 messages sent before any is read come back in order.
    for i in 0..1000u32 {
        within("send", ws.feed(Message::text(format!("m{i}"))))
            .await
            .unwrap();
    }
    within("flush", ws.flush()).await.unwrap();
    for i in 0..1000u32 {
        let m = within("receive", ws.next()).await.unwrap().unwrap();
        assert_eq!(m, Message::text(format!("m{i}")));
    }
    within("close", ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn fragmented_messages_and_ping_pong_pass() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(origin.addr, ""));
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();

    // A text message in three frames: the origin reassembles it, so the edge passed
    // every frame, in order, with its FIN and opcode bits.
    let parts = ["frag", "ment", "ed"];
    let frames = [
        Frame::message(
            parts[0].as_bytes().to_vec(),
            OpCode::Data(Data::Text),
            false,
        ),
        Frame::message(
            parts[1].as_bytes().to_vec(),
            OpCode::Data(Data::Continue),
            false,
        ),
        Frame::message(
            parts[2].as_bytes().to_vec(),
            OpCode::Data(Data::Continue),
            true,
        ),
    ];
    for f in frames {
        within("send frame", ws.send(Message::Frame(f)))
            .await
            .unwrap();
    }
    let m = within("receive", ws.next()).await.unwrap().unwrap();
    assert_eq!(m, Message::text("fragmented"));

    within("ping", ws.send(Message::Ping(b"are you there".to_vec())))
        .await
        .unwrap();
    let m = within("pong", ws.next()).await.unwrap().unwrap();
    assert_eq!(m, Message::Pong(b"are you there".to_vec()));
    within("close", ws.close(None)).await.unwrap();
}

#[tokio::test]
async fn close_codes_and_reasons_pass_both_ways() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(origin.addr, ""));

    // Client → origin.
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    let frame = CloseFrame {
        code: 4001.into(),
        reason: "client bye".into(),
    };
    within("close", ws.close(Some(frame))).await.unwrap();
    // The origin's answering Close comes back through the edge.
    let m = within("close answer", ws.next()).await;
    assert!(
        matches!(m, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 4001),
        "{m:?}"
    );
    let deadline = std::time::Instant::now() + STEP;
    while !origin
        .seen()
        .contains(&Seen::Close(4001, "client bye".into()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "origin never saw the close: {:?}",
            origin.seen()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Origin → client.
    let (mut ws, _) = within(
        "connect",
        tokio_tungstenite::connect_async(edge.url("/close-me")),
    )
    .await
    .unwrap();
    let m = within("origin close", ws.next()).await.unwrap().unwrap();
    match m {
        Message::Close(Some(f)) => {
            assert_eq!(u16::from(f.code), 4002);
            assert_eq!(f.reason, "origin bye");
        }
        other => panic!("expected the origin's close, got {other:?}"),
    }
}

#[tokio::test]
async fn subprotocol_selection_and_extension_headers_pass_untouched() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&one_resource(origin.addr, ""));
    let mut req = edge.url("/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "chat.v2, chat.v1".parse().unwrap(),
    );
    let (mut ws, resp) = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v2"
    );
    let seen = origin.seen();
    let Some(Seen::Request(headers)) = seen.first() else {
        panic!("{seen:?}")
    };
    assert!(headers.contains(&("sec-websocket-protocol".into(), "chat.v2, chat.v1".into())));
    echo_once(&mut ws, Message::text("hi")).await;
}

/// permessage-deflate is negotiated by the origin and the compressed frames (RSV1 set)
/// pass unchanged: a raw client offers the extension, a raw origin accepts it and sends a
/// deflated message, and the client inflates it.
#[tokio::test]
async fn permessage_deflate_negotiated_by_origin_works_end_to_end() {
    use flate2::{Compress, Compression, FlushCompress};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let text = "hello hello hello hello compressed world";
    let origin = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let req = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(
            req.contains("sec-websocket-extensions: permessage-deflate; client_max_window_bits"),
            "{req}"
        );
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n").await.unwrap();
        // RFC 7692 §7.2.1: deflate, sync flush, drop the trailing 00 00 ff ff.
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(256);
        c.compress_vec(text.as_bytes(), &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        let mut frame = vec![0x80 | 0x40 | 0x1, out.len() as u8]; // FIN, RSV1, text
        frame.extend_from_slice(&out);
        s.write_all(&frame).await.unwrap();
        // Read the client's (masked, compressed) frame and keep it.
        let n = s.read(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    });
    let edge = Edge::start(&one_resource(origin_addr, ""));
    let mut c = within("connect", tokio::net::TcpStream::connect(edge.addr))
        .await
        .unwrap();
    let req = upgrade_request(
        "/ws",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    );
    within("write", c.write_all(req.as_bytes())).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n")
        || got.len() < got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 6
    {
        let n = within("read", c.read(&mut buf)).await.unwrap();
        assert!(
            n > 0,
            "edge closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover"),
        "{head}"
    );
    let mut frame = got[split..].to_vec();
    while frame.len() < 2 || frame.len() < 2 + frame[1] as usize {
        let n = within("read frame", c.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        frame.extend_from_slice(&buf[..n]);
    }
    assert_eq!(frame[0], 0xC1, "FIN+RSV1+text must pass unchanged");
    let mut payload = frame[2..2 + frame[1] as usize].to_vec();
    payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(256);
    d.decompress_vec(&payload, &mut out, flate2::FlushDecompress::Sync)
        .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), text);

    // And client → origin: a masked RSV1 frame arrives byte-identical.
    let sent = [0xC1u8, 0x85, 1, 2, 3, 4, 9, 8, 7, 6, 5];
    within("write frame", c.write_all(&sent)).await.unwrap();
    let at_origin = within("origin", origin).await.unwrap();
    assert_eq!(at_origin, sent);
}

/// An origin that pushes a frame in the same write as its 101 (a welcome message): the
/// frame must reach the client, and a 101 that is not a WebSocket switch is a 502.
#[tokio::test]
async fn origin_bytes_right_after_its_101_are_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for upgrade in ["websocket", "h2c"] {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                let mut out = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n").into_bytes();
                out.extend_from_slice(&[0x81, 7]);
                out.extend_from_slice(b"welcome");
                s.write_all(&out).await.unwrap();
                // Hold the connection until the peer goes.
                while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    let edge = Edge::start(&one_resource(origin_addr, ""));
    let mut c = within("connect", tokio::net::TcpStream::connect(edge.addr))
        .await
        .unwrap();
    within("write", c.write_all(upgrade_request("/ws", "").as_bytes()))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\x81\x07welcome") {
        let n = within("read", c.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"));

    let answer = raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
}
