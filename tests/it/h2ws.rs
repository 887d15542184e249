//! 16: WebSockets over HTTP/2 (RFC 8441) on the TLS listener. A real h2 client (the `h2`
//! crate over rustls) opens extended CONNECT streams through a real wsedge to real
//! origins: the setting is advertised (and not when switched off), messages echo like over
//! HTTP/1.1, the origin gets an HTTP/1.1 upgrade with a key of the edge's own, every
//! refusal has its status with the origin untouched, 100 WebSockets share a connection
//! with one stalled stream, and resets, a closed connection and a shutdown end tunnels
//! the way the log and metrics say.

use crate::common::raw::{close, frame, read_frame};
use crate::common::*;
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const NAMES: &[&str] = &[
    "ws.test",
    "other.test",
    "off.test",
    "paths.test",
    "strict.test",
    "rate.test",
    "full.test",
    "down.test",
    "slow.test",
    "liar.test",
    "beat.test",
    "page.test",
    "deny.test",
];

struct Origins {
    echo: SocketAddr,
    silent: SocketAddr,
    liar: SocketAddr,
    page: SocketAddr,
    deny: SocketAddr,
}

/// The resources of these tests, all on one certificate, after the top-level keys `top`.
fn config(cert: &Issued, o: &Origins, top: &str) -> String {
    let tls = format!(
        "tls: {{ certificate: \"{}\", private_key: \"{}\" }}",
        cert.cert.display(),
        cert.key.display()
    );
    let down = closed_port("127.0.0.1");
    let r = |name: &str, origin: SocketAddr, ws: &str| {
        format!(
            "  - name: {name}\n    hostnames: [\"{name}.test\"]\n    origin: {{ servers: [{{ address: \"{origin}\" }}] }}\n    websocket: {{ idle_timeout: 30s, handshake_timeout: 2s{ws} }}\n    {tls}\n"
        )
    };
    format!(
        "{top}listen:\n  http: [\"127.0.0.1:0\"]\n  https: [\"127.0.0.3:0\"]\nresources:\n{}{}{}{}{}{}{}{}{}{}{}{}{}",
        r("ws", o.echo, ""),
        r("other", o.echo, ""),
        r("off", o.echo, ", enabled: false"),
        r("paths", o.echo, ", paths: [\"/ws\"]"),
        r("strict", o.echo, ", allowed_origins: [\"https://good.test\"]"),
        r("rate", o.echo, ", handshake_rate: { rate: 1/s, burst: 1 }"),
        r("full", o.echo, ", max_connections: 1"),
        r("down", down, ""),
        r("slow", o.silent, ""),
        r("liar", o.liar, ""),
        r("page", o.page, ""),
        r("deny", o.deny, ""),
        r(
            "beat",
            o.echo,
            ", heartbeat: { interval: 1s, timeout: 1s }, max_message_size: 64KiB",
        ),
    )
}

/// An origin that answers every upgrade with a 101 whose `Sec-WebSocket-Accept` answers
/// some other key.
async fn lying_origin() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    (addr, task)
}

struct Setup {
    pki: Pki,
    edge: Edge,
    echo: Origin,
    silent: Origin,
    page: Origin,
    deny: Origin,
    _liar: tokio::task::JoinHandle<()>,
}

async fn setup(tag: &str, top: &str) -> Setup {
    let pki = Pki::new(tag);
    let cert = pki.issue("sites", NAMES);
    let echo = Origin::start(Mode::Echo).await;
    let silent = Origin::start(Mode::Silent).await;
    let page = Origin::start(Mode::Status(200)).await;
    let deny = Origin::start(Mode::Status(403)).await;
    let (liar, liar_task) = lying_origin().await;
    let origins = Origins {
        echo: echo.addr,
        silent: silent.addr,
        liar,
        page: page.addr,
        deny: deny.addr,
    };
    let edge = Edge::start(&with_admin(&config(&cert, &origins, top)));
    Setup {
        pki,
        edge,
        echo,
        silent,
        page,
        deny,
        _liar: liar_task,
    }
}

impl Setup {
    fn https(&self) -> SocketAddr {
        self.edge.https.expect("an https listener")
    }

    async fn connect(&self, sni: &str) -> h2::client::SendRequest<bytes::Bytes> {
        h2_connect(&self.pki, self.https(), sni).await.0
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki.dir);
    }
}

/// The first `n` tunnel lines of the access log, once there are that many.
fn tunnel_lines(edge: &Edge, n: usize) -> Vec<String> {
    let is_tunnel = |l: &str| l.contains("\"kind\":\"tunnel\"");
    let lines = edge.wait_access(n, is_tunnel);
    lines.into_iter().filter(|l| is_tunnel(l)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_websockets_are_advertised_and_echo_as_over_http1() {
    let s = setup("h2ws-echo", "").await;
    let mut h2 = s.connect("ws.test").await;
    assert!(
        advertises_extended_connect(&mut h2, "ws.test").await,
        "SETTINGS_ENABLE_CONNECT_PROTOCOL is not advertised"
    );

    // The handshake: 200, the origin's subprotocol; the origin got an HTTP/1.1 upgrade
    // with a fresh key, the client's fields and the path.
    let (resp, io) = h2_open(
        &h2,
        "ws.test",
        "/chat?room=1",
        Some("websocket"),
        &[
            ("sec-websocket-protocol", "chat, superchat"),
            ("origin", "https://ws.test"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers["sec-websocket-protocol"], "chat");
    assert!(!resp.headers.contains_key("sec-websocket-accept"));
    let seen = s.echo.seen();
    let Some(Seen::Request(fields)) = seen.iter().find(|x| matches!(x, Seen::Request(_))) else {
        panic!("the origin saw no upgrade: {seen:?}");
    };
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("upgrade"), Some("websocket"));
    assert_eq!(get("sec-websocket-version"), Some("13"));
    assert_eq!(get("sec-websocket-key").map(str::len), Some(24));
    assert_eq!(get("sec-websocket-protocol"), Some("chat, superchat"));
    assert_eq!(get("host"), Some("ws.test"));
    assert_eq!(get("cookie"), Some("a=1; b=2"));
    assert_eq!(get("x-forwarded-proto"), Some("https"));
    assert!(
        seen.contains(&Seen::Target("/chat?room=1".into())),
        "{seen:?}"
    );

    // Text and binary from 0 bytes to 16 MiB come back byte for byte.
    let mut ws = h2_websocket(io.unwrap()).await;
    echo_sizes(&mut ws, &[0, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20]).await;
    within(
        "close",
        ws.close(Some(CloseFrame {
            code: CloseCode::Library(4001),
            reason: "bye".into(),
        })),
    )
    .await
    .unwrap();
    let back = within("the origin's close", ws.next()).await;
    assert!(
        matches!(&back, Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 4001),
        "{back:?}"
    );
    let line = tunnel_lines(&s.edge, 1);
    let line = &line[0];
    assert_eq!(field(line, "protocol"), Some("h2"), "{line}");
    assert_eq!(field(line, "status"), Some("200"), "{line}");
    assert_eq!(field(line, "close_reason"), Some("client_closed"), "{line}");
    assert_eq!(field(line, "close_code"), Some("4001"), "{line}");
    let up: u64 = field(line, "bytes_client_to_origin")
        .unwrap()
        .parse()
        .unwrap();
    assert!(up > 16 << 20, "{line}");
    let (_, metrics) = s.edge.admin_request("GET", "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "wsedge_ws_handshakes_total{outcome=\"ok\",resource=\"ws\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "wsedge_http_responses_total{code=\"200\",resource=\"ws\"}"
        ),
        Some(2.0),
        "the plain request's 200 and the tunnel's"
    );
    assert_eq!(
        metric(&metrics, "wsedge_ws_tunnels_open{resource=\"ws\"}"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_fragments_pings_and_the_origins_close_pass_a_stream() {
    let s = setup("h2ws-frames", "").await;
    let h2 = s.connect("ws.test").await;
    let (_, io) = h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    let mut io = io.unwrap();
    let mask = Some([1, 2, 3, 4]);
    // A text message in three fragments comes back whole.
    let mut bytes = frame(false, 1, b"hel", mask);
    bytes.extend(frame(false, 0, b"lo ", mask));
    bytes.extend(frame(true, 0, b"there", mask));
    bytes.extend(frame(true, 9, b"are you there", mask));
    within("write", io.write_all(&bytes)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let f = within("a frame", read_frame(&mut io, false)).await.unwrap();
        got.push((f.opcode, f.payload));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (1, b"hello there".to_vec()),
            (10, b"are you there".to_vec())
        ]
    );
    // The client's Close passes, and so does the origin's answer.
    within("write", io.write_all(&close(1000, "done", mask)))
        .await
        .unwrap();
    let f = within("the close", read_frame(&mut io, false))
        .await
        .unwrap();
    assert_eq!((f.opcode, f.code()), (8, Some(1000)));

    // An origin that closes first: its code reaches the client, then END_STREAM.
    let (_, io) = h2_open(&h2, "ws.test", "/close-me", Some("websocket"), &[])
        .await
        .unwrap();
    let mut io = io.unwrap();
    let f = within("the origin's close", read_frame(&mut io, false))
        .await
        .unwrap();
    assert_eq!(
        (f.code(), f.reason()),
        (Some(4002), "origin bye".to_string())
    );
    within("write", io.write_all(&close(4002, "", mask)))
        .await
        .unwrap();
    let rest = within("the end of the stream", read_to_end(&mut io)).await;
    assert!(rest.is_empty(), "{rest:?}");
    let lines = tunnel_lines(&s.edge, 2);
    assert!(
        lines.iter().any(|l| field(l, "close_code") == Some("4002")
            && field(l, "close_reason") == Some("origin_closed")),
        "{lines:?}"
    );
}

async fn read_to_end(io: &mut H2Io) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = io.read_to_end(&mut all).await;
    all
}

/// An origin that takes one upgrade, checks `sec-websocket-extensions` came as offered,
/// agrees to permessage-deflate with the right accept, and hands over the connection.
async fn deflating_origin(
    offer: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<tokio::net::TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
            c.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let value = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        assert_eq!(
            value("sec-websocket-extensions").as_deref(),
            Some(offer),
            "{head}"
        );
        let key = value("sec-websocket-key").expect("a key");
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n");
        c.write_all(resp.as_bytes()).await.unwrap();
        c
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_is_negotiated_by_the_origin_and_its_frames_pass_a_stream() {
    let offer = "permessage-deflate; client_max_window_bits";
    let (addr, origin) = deflating_origin(offer).await;
    let pki = Pki::new("h2ws-deflate");
    let cert = pki.issue("sites", NAMES);
    let yaml = format!(
        "listen: {{ http: [\"127.0.0.1:0\"], https: [\"127.0.0.3:0\"] }}\nresources:\n  - name: ws\n    hostnames: [\"ws.test\"]\n    origin: {{ servers: [{{ address: \"{addr}\" }}] }}\n    tls: {{ certificate: \"{}\", private_key: \"{}\" }}\n",
        cert.cert.display(),
        cert.key.display()
    );
    let edge = Edge::start(&yaml);
    let (h2, _conn) = h2_connect(&pki, edge.https.unwrap(), "ws.test").await;
    let (resp, io) = h2_open(
        &h2,
        "ws.test",
        "/",
        Some("websocket"),
        &[("sec-websocket-extensions", offer)],
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.headers["sec-websocket-extensions"],
        "permessage-deflate; server_no_context_takeover"
    );
    let mut io = io.unwrap();
    let mut origin = within("the origin's side", origin).await.unwrap();
    // Frames with RSV1 (compressed) pass both ways untouched.
    let compressed = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    let mut f = frame(true, 1, &compressed, Some([9, 9, 9, 9]));
    f[0] |= 0x40;
    within("write", io.write_all(&f)).await.unwrap();
    // (The raw reader refuses reserved bits: read this one by hand.)
    let mut at_origin = [0u8; 2 + 4 + 7];
    within("at the origin", origin.read_exact(&mut at_origin))
        .await
        .unwrap();
    assert_eq!(at_origin[..], f[..], "the frame changed on its way");
    let mut back = frame(true, 1, &compressed, None);
    back[0] |= 0x40;
    within("write", origin.write_all(&back)).await.unwrap();
    let mut head = [0u8; 2];
    within("read", io.read_exact(&mut head)).await.unwrap();
    assert_eq!(head[0], 0xc1, "FIN, RSV1, text");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_their_status_on_the_stream_and_the_origin_is_not_contacted() {
    let s = setup("h2ws-refusals", "").await;
    let ask = |sni: &'static str,
               path: &'static str,
               protocol: Option<&'static str>,
               fields: Vec<(&'static str, &'static str)>| {
        let s = &s;
        async move {
            let h2 = s.connect(sni).await;
            let (resp, _) = h2_open(&h2, sni, path, protocol, &fields).await.unwrap();
            resp.status.as_u16()
        }
    };
    assert_eq!(ask("off.test", "/", Some("websocket"), vec![]).await, 403);
    assert_eq!(
        ask("paths.test", "/other", Some("websocket"), vec![]).await,
        403
    );
    assert_eq!(
        ask("paths.test", "/ws/../other", Some("websocket"), vec![]).await,
        403
    );
    // Encoded twice: the dot segments decode to a path outside /ws.
    let twice = ask(
        "paths.test",
        "/ws/%252e%252e/%2e%2e/other",
        Some("websocket"),
        vec![],
    )
    .await;
    assert!(matches!(twice, 400 | 403), "{twice}");
    assert_eq!(
        ask(
            "strict.test",
            "/",
            Some("websocket"),
            vec![("origin", "https://evil.test")]
        )
        .await,
        403
    );
    assert_eq!(ask("ws.test", "/", Some("webtransport"), vec![]).await, 400);
    assert_eq!(
        ask(
            "ws.test",
            "/",
            Some("websocket"),
            vec![("sec-websocket-version", "8")]
        )
        .await,
        426
    );
    assert_eq!(
        ask(
            "ws.test",
            "/",
            Some("websocket"),
            vec![("content-length", "5")]
        )
        .await,
        400
    );
    // A plain CONNECT (a forward proxy's) is refused.
    assert_eq!(ask("ws.test", "ws.test:443", None, vec![]).await, 405);
    // 421: an :authority of another resource than the connection's SNI.
    {
        let h2 = s.connect("ws.test").await;
        let (resp, _) = h2_open(&h2, "other.test", "/", Some("websocket"), &[])
            .await
            .unwrap();
        assert_eq!(resp.status, 421);
    }
    assert_eq!(s.echo.upgrades(), 0, "a refused stream reached the origin");
    assert_eq!(s.echo.count(), 0, "a refused stream reached the origin");

    // 429 over the handshake rate, 503 over max_connections: the first is served.
    let h2 = s.connect("rate.test").await;
    let (first, _keep) = h2_open(&h2, "rate.test", "/", Some("websocket"), &[])
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    let (second, _) = h2_open(&h2, "rate.test", "/", Some("websocket"), &[])
        .await
        .unwrap();
    assert_eq!(second.status, 429);
    assert!(second.headers.contains_key("retry-after"));
    let h2 = s.connect("full.test").await;
    let (first, _keep_full) = h2_open(&h2, "full.test", "/", Some("websocket"), &[])
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    let (second, _) = h2_open(&h2, "full.test", "/", Some("websocket"), &[])
        .await
        .unwrap();
    assert_eq!(second.status, 503);
    assert_eq!(
        s.echo.upgrades(),
        2,
        "only the two admitted streams reached the origin"
    );

    // The origin's failures: unreachable 502, silent 504, a wrong accept 502.
    assert_eq!(ask("down.test", "/", Some("websocket"), vec![]).await, 502);
    assert_eq!(ask("slow.test", "/", Some("websocket"), vec![]).await, 504);
    assert_eq!(ask("liar.test", "/", Some("websocket"), vec![]).await, 502);
    assert_eq!(s.silent.count(), 1);
    // An origin that answers the upgrade with a page (200) must not pass for a tunnel
    // over h2, where 200 is what opens one: 502. Its refusal (403) is passed on.
    assert_eq!(ask("page.test", "/", Some("websocket"), vec![]).await, 502);
    assert_eq!(s.page.count(), 1);
    assert_eq!(ask("deny.test", "/", Some("websocket"), vec![]).await, 403);
    assert_eq!(s.deny.count(), 1);

    // Draining: 503.
    let (code, _) = s.edge.admin_request("POST", "/drain").await;
    assert_eq!(code, 202);
    assert_eq!(ask("ws.test", "/", Some("websocket"), vec![]).await, 503);

    let (_, metrics) = s.edge.admin_request("GET", "/metrics").await;
    for (outcome, resource, n) in [
        ("disabled", "off", 1.0),
        ("path_not_allowed", "paths", 2.0),
        ("origin_not_allowed", "strict", 1.0),
        ("bad_version", "ws", 1.0),
        ("malformed", "ws", 2.0),
        ("misdirected", "other", 1.0),
        ("draining", "ws", 1.0),
        ("origin_unreachable", "down", 1.0),
        ("origin_invalid", "liar", 1.0),
        ("method_not_allowed", "ws", 1.0),
        ("rate_limited", "rate", 1.0),
        ("over_capacity", "full", 1.0),
        ("origin_timeout", "slow", 1.0),
        ("origin_invalid", "page", 1.0),
        ("origin_refused", "deny", 1.0),
    ] {
        let series =
            format!("wsedge_ws_handshakes_total{{outcome=\"{outcome}\",resource=\"{resource}\"}}");
        assert_eq!(metric(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_websockets_share_a_connection_and_one_stalled_stream_stalls_nobody() {
    let s = setup("h2ws-hundred", "").await;
    let (h2, _conn) = h2_connect(&s.pki, s.https(), "ws.test").await;
    // One stream whose origin floods it, never read by the client.
    let (resp, stalled) = h2_open(&h2, "ws.test", "/flood", Some("websocket"), &[])
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let mut stalled = stalled.unwrap();
    // 99 more that echo, all at once, with plain requests between them.
    let opens = (0..99).map(|_| h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[]));
    let opened = within("99 streams", futures_util::future::join_all(opens)).await;
    let mut sockets = Vec::new();
    for o in opened {
        let (resp, io) = o.unwrap();
        assert_eq!(resp.status, 200);
        sockets.push(h2_websocket(io.unwrap()).await);
    }
    let echoes = sockets.iter_mut().enumerate().map(|(i, ws)| async move {
        for j in 0..20 {
            let m = Message::binary(pattern(4096, (i + j) as u8));
            assert_eq!(echo_once(ws, m.clone()).await, m);
        }
    });
    let plain = async {
        for _ in 0..10 {
            let req = http::Request::get("https://ws.test/healthz")
                .body(())
                .unwrap();
            let (resp, _) = h2
                .clone()
                .ready()
                .await
                .unwrap()
                .send_request(req, true)
                .unwrap();
            assert_eq!(within("a plain answer", resp).await.unwrap().status(), 200);
        }
    };
    within("echoes beside a stalled stream", async {
        tokio::join!(futures_util::future::join_all(echoes), plain)
    })
    .await;

    // The flood stopped: what the origin got to send is bounded (the edge's buffers for the
    // stream and the sockets' between it and the origin), and it no longer grows.
    let flooded = || {
        s.echo
            .seen()
            .iter()
            .filter_map(|x| match x {
                Seen::Message(m) => m.strip_prefix("flood ")?.parse::<usize>().ok(),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = flooded();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = flooded();
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    assert_eq!(flooded(), last, "the flood never stopped");
    assert!(
        last < 48 << 20,
        "the edge took {last} bytes for a stream nobody reads"
    );
    // The stalled stream then reads what was held for it, in order.
    let first = within("the stalled stream", read_frame(&mut stalled, false))
        .await
        .unwrap();
    assert_eq!((first.opcode, first.payload.len()), (2, 64 << 10));
    stalled.reset(h2::Reason::CANCEL);
    for ws in &mut sockets {
        let _ = within("close", ws.close(None)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_a_lost_connection_and_a_shutdown_end_tunnels_honestly() {
    let mut s = setup("h2ws-ends", "drain: { spread: 0 }\n").await;
    let (h2, conn) = h2_connect(&s.pki, s.https(), "ws.test").await;
    // RST_STREAM (CANCEL) from the client: the origin is told 1001, the line says client_closed.
    let (_, io) = h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    let mut io = io.unwrap();
    io.reset(h2::Reason::CANCEL);
    let line = tunnel_lines(&s.edge, 1);
    assert_eq!(
        field(&line[0], "close_reason"),
        Some("client_closed"),
        "{line:?}"
    );
    // Another reason is an error.
    let (_, io) = h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    io.unwrap().reset(h2::Reason::INTERNAL_ERROR);
    let lines = tunnel_lines(&s.edge, 2);
    assert_eq!(field(&lines[1], "close_reason"), Some("error"), "{lines:?}");
    // The other streams of the connection are unaffected.
    let (resp, io) = h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    let mut ws = h2_websocket(io.unwrap()).await;
    assert_eq!(
        echo_once(&mut ws, Message::text("still")).await,
        Message::text("still")
    );
    // The whole connection lost: every tunnel on it ends (client gone).
    conn.abort();
    drop(ws);
    drop(h2);
    let lines = tunnel_lines(&s.edge, 3);
    assert_eq!(
        field(&lines[2], "close_reason"),
        Some("client_closed"),
        "{lines:?}"
    );
    within("the origin's close", async {
        while !s
            .echo
            .seen()
            .iter()
            .any(|x| matches!(x, Seen::Close(1001, _)))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Shutdown: a stream's tunnel gets the edge's 1001, then the connection its GOAWAY.
    let (h2, conn) = h2_connect(&s.pki, s.https(), "ws.test").await;
    let (_, io) = h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    let mut io = io.unwrap();
    s.edge.signal("TERM");
    let f = within("the edge's close", read_frame(&mut io, false))
        .await
        .unwrap();
    assert_eq!(f.code(), Some(1001), "{}", f.reason());
    within("write", io.write_all(&close(1001, "", Some([1, 1, 1, 1]))))
        .await
        .unwrap();
    within("the connection's end", conn).await.unwrap();
    assert!(
        s.edge.wait_exit(Duration::from_secs(20)),
        "the edge did not exit"
    );
    drop(h2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_the_setting_is_not_advertised_and_h2_carries_plain_requests_only() {
    let s = setup("h2ws-off", "").await;
    let yaml = std::fs::read_to_string(s.edge.dir.join("wsedge.yaml")).unwrap();
    let off = yaml.replace(
        "  https: [\"127.0.0.3:0\"]\n",
        "  https: [\"127.0.0.3:0\"]\n  h2_websockets: false\n",
    );
    assert_ne!(off, yaml);
    let edge = Edge::start(&off);
    let (mut h2, _conn) = h2_connect(&s.pki, edge.https.unwrap(), "ws.test").await;
    assert!(
        !advertises_extended_connect(&mut h2, "ws.test").await,
        "advertised while switched off"
    );
    // The h2 client does not send an extended CONNECT to a server that did not offer it.
    assert!(h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .is_err());
    // A plain CONNECT is Pingora's 405 there.
    let (resp, _) = h2_open(&h2, "ws.test", "ws.test:443", None, &[])
        .await
        .unwrap();
    assert_eq!(resp.status, 405);
    assert_eq!(s.echo.upgrades(), 0);
    // wss:// over HTTP/1.1 is unchanged.
    let tcp = within(
        "connect",
        tokio::net::TcpStream::connect(edge.https.unwrap()),
    )
    .await
    .unwrap();
    let tls = within(
        "tls handshake",
        s.pki.connector(&[b"http/1.1"]).connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from("ws.test").unwrap(),
            tcp,
        ),
    )
    .await
    .unwrap();
    let (mut ws, resp) = within(
        "wss handshake",
        tokio_tungstenite::client_async("wss://ws.test/ws", tls),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(
        echo_once(&mut ws, Message::text("over HTTP/1.1")).await,
        Message::text("over HTTP/1.1")
    );
    within("close", ws.close(None)).await.unwrap();
    let lines = tunnel_lines(&edge, 1);
    assert_eq!(field(&lines[0], "protocol"), Some("http/1.1"), "{lines:?}");
}

#[test]
fn a_bad_h2_websockets_value_is_an_error_naming_the_file_line_and_key() {
    for value in ["maybe", "1", "[true]", "{ on: true }"] {
        let yaml = format!(
            "listen:\n  http: [\"127.0.0.1:0\"]\n  h2_websockets: {value}\nresources:\n  - name: r\n    hostnames: [a.test]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n"
        );
        let out = check_config("h2.yaml", &yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: accepted");
        assert!(err.contains("h2.yaml:3:"), "{value}: {err}");
        assert!(err.contains("h2_websockets"), "{value}: {err}");
    }
    let yaml = "listen:\n  http: [\"127.0.0.1:0\"]\n  h2_websockets: false\nresources:\n  - name: r\n    hostnames: [a.test]\n    origin: { servers: [{ address: \"127.0.0.1:1\" }] }\n";
    assert!(check_config("h2.yaml", yaml).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_speaks_websocket_on_a_stream_heartbeats_and_message_limits() {
    let s = setup("h2ws-speaks", "").await;
    let h2 = s.connect("beat.test").await;
    let mask = Some([5, 6, 7, 8]);
    // A quiet client is pinged after the interval; its Pong keeps the tunnel.
    let (_, io) = h2_open(&h2, "beat.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    let mut io = io.unwrap();
    let ping = within("a ping", read_frame(&mut io, false)).await.unwrap();
    assert_eq!((ping.opcode, ping.payload.len()), (9, 8));
    within("write", io.write_all(&frame(true, 10, &ping.payload, mask)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    within("write", io.write_all(&frame(true, 1, b"still here", mask)))
        .await
        .unwrap();
    let mut f = within("the echo", read_frame(&mut io, false))
        .await
        .unwrap();
    while f.opcode == 9 {
        within("write", io.write_all(&frame(true, 10, &f.payload, mask)))
            .await
            .unwrap();
        f = within("the echo", read_frame(&mut io, false))
            .await
            .unwrap();
    }
    assert_eq!((f.opcode, f.payload.as_slice()), (1, &b"still here"[..]));
    // A message over max_message_size: 1009 to the client, then END_STREAM.
    within(
        "write",
        io.write_all(&frame(true, 2, &vec![1u8; 128 << 10], mask)),
    )
    .await
    .unwrap();
    let close = loop {
        let f = within("the close", read_frame(&mut io, false))
            .await
            .unwrap();
        if f.opcode == 8 {
            break f;
        }
    };
    assert_eq!(
        (close.code(), close.reason()),
        (Some(1009), "message too big".to_string())
    );
    let rest = within("the end of the stream", read_to_end(&mut io)).await;
    assert!(rest.is_empty(), "{rest:?}");
    let lines = tunnel_lines(&s.edge, 1);
    assert_eq!(
        field(&lines[0], "close_reason"),
        Some("message_too_big"),
        "{lines:?}"
    );

    // A client that never answers the ping: its stream is ended at interval + timeout.
    let started = Instant::now();
    let (_, io) = h2_open(&h2, "beat.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    let mut io = io.unwrap();
    let ping = within("a ping", read_frame(&mut io, false)).await.unwrap();
    assert_eq!(ping.opcode, 9);
    let rest = within("the end of the stream", read_to_end(&mut io)).await;
    assert!(rest.is_empty(), "{rest:?}");
    let cut = started.elapsed();
    assert!(
        cut >= Duration::from_secs(2) && cut < Duration::from_secs(5),
        "{cut:?}"
    );
    let lines = tunnel_lines(&s.edge, 2);
    assert_eq!(
        field(&lines[1], "close_reason"),
        Some("heartbeat_timeout"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_before_the_200_are_relayed_after_it_in_order() {
    // A client that does not wait for the answer: its first frames ride the CONNECT's
    // stream at once; the edge holds them (flow control) until the origin said 101.
    let s = setup("h2ws-early", "").await;
    let h2 = s.connect("ws.test").await;
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri("https://ws.test/ws")
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from("websocket"));
    let mut send = within("ready", h2.clone().ready()).await.unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    let mask = Some([3, 1, 4, 1]);
    let mut early = Vec::new();
    for i in 0..50 {
        early.extend(frame(true, 1, format!("early {i}").as_bytes(), mask));
    }
    stream.send_data(bytes::Bytes::from(early), false).unwrap();
    let resp = within("the answer", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut recv = resp.into_body();
    let whole: usize = (0..50).map(|i| 2 + format!("early {i}").len()).sum();
    let mut got = Vec::new();
    while got.len() < whole {
        let data = within("echoes", recv.data()).await.unwrap().unwrap();
        let _ = recv.flow_control().release_capacity(data.len());
        got.extend_from_slice(&data);
    }
    let mut at = &got[..];
    for i in 0..50 {
        let f = within("an echo", read_frame(&mut at, false)).await.unwrap();
        assert_eq!(f.payload, format!("early {i}").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_websocket_keeps_its_connection_past_the_keepalive_timeout() {
    // The connection's idle timeout (client.keepalive_timeout) closes an h2 connection
    // without streams; a connection whose only stream is a quiet WebSocket is not idle.
    let s = setup("h2ws-keepalive", "client: { keepalive_timeout: 1s }\n").await;
    let h2 = s.connect("ws.test").await;
    let (_, io) = h2_open(&h2, "ws.test", "/ws", Some("websocket"), &[])
        .await
        .unwrap();
    let mut ws = h2_websocket(io.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        echo_once(&mut ws, Message::text("after 2.5 s")).await,
        Message::text("after 2.5 s")
    );
    // Once it is gone, the connection is closed after the timeout.
    within("close", ws.close(None)).await.unwrap();
    drop(ws);
    let (_, conn) = h2_connect(&s.pki, s.https(), "ws.test").await;
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an idle h2 connection is held");
}

/// The extended CONNECT of a WebSocket to `/ws` on `ws.test`, as literal fields.
fn connect_block() -> Vec<u8> {
    RawH2::block(&[
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":path", "/ws"),
        (":authority", "ws.test"),
        ("sec-websocket-version", "13"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_goaway_leaves_its_open_websocket_running() {
    let s = setup("h2ws-goaway", "").await;
    let mut raw = RawH2::connect(&s.pki, s.https(), "ws.test").await;
    // HEADERS with END_HEADERS on stream 1; the answer is :status 200 (HPACK's static
    // entry 8, which h2 encodes as the single byte 0x88).
    raw.send(1, 0x4, 1, &connect_block()).await;
    let (kind, _, _, block) = raw.next_on(1).await.expect("an answer");
    assert_eq!((kind, block.first()), (1, Some(&0x88)), "{block:?}");
    // The client's GOAWAY (last stream 0, NO_ERROR): no new streams from the server, and
    // the open one goes on.
    raw.send(7, 0, 0, &[0; 8]).await;
    raw.send(
        0,
        0,
        1,
        &frame(true, 1, b"after goaway", Some([7, 7, 7, 7])),
    )
    .await;
    let (kind, _, _, data) = raw.next_on(1).await.expect("the echo");
    assert_eq!(kind, 0, "DATA");
    let mut at = &data[..];
    let echo = within("the echo", read_frame(&mut at, false))
        .await
        .unwrap();
    assert_eq!(echo.payload, b"after goaway");
    // The closing handshake, then the edge's END_STREAM.
    raw.send(0, 0, 1, &close(1000, "", Some([1, 2, 3, 4])))
        .await;
    let mut ended = false;
    while let Some((kind, flags, _, data)) = raw.next_on(1).await {
        if kind == 0 && !data.is_empty() {
            let mut at = &data[..];
            let f = within("the close", read_frame(&mut at, false))
                .await
                .unwrap();
            assert_eq!(f.code(), Some(1000));
        }
        if kind == 3 || (kind == 0 && flags & 1 != 0) {
            ended = true;
            break;
        }
    }
    assert!(ended, "the stream never ended");
    let lines = tunnel_lines(&s.edge, 1);
    assert_eq!(
        field(&lines[0], "close_reason"),
        Some("client_closed"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_the_edge_did_not_offer_is_refused_and_reaches_no_origin() {
    let s = setup("h2ws-unoffered", "").await;
    let yaml = std::fs::read_to_string(s.edge.dir.join("wsedge.yaml")).unwrap();
    let off = yaml.replace(
        "  https: [\"127.0.0.3:0\"]\n",
        "  https: [\"127.0.0.3:0\"]\n  h2_websockets: false\n",
    );
    let edge = Edge::start(&off);
    let mut raw = RawH2::connect(&s.pki, edge.https.unwrap(), "ws.test").await;
    raw.send(1, 0x4, 1, &connect_block()).await;
    // A stream error (RST_STREAM) or a connection error (GOAWAY), never an answer
    // (SETTINGS acknowledgements and window updates aside).
    let f = loop {
        match raw.next().await {
            Some((4 | 8, ..)) => continue,
            other => break other,
        }
    };
    eprintln!("an unoffered :protocol got {f:?}");
    assert!(
        matches!(f, None | Some((3, ..)) | Some((7, ..))),
        "answered: {f:?}"
    );
    assert_eq!(s.echo.count(), 0, "the origin was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_authorities_and_hosts_on_a_connect_are_refused_before_any_origin() {
    // Sent by hand: what the h2 client's URI type would not let through.
    let s = setup("h2ws-authority", "").await;
    for (authority, host) in [
        ("ws.test:notaport", None),
        ("ws..test", None),
        ("-ws.test", None),
        ("ws.test", Some("other.test")),
        ("ws.test", Some("ws.test, other.test")),
    ] {
        let mut raw = RawH2::connect(&s.pki, s.https(), "ws.test").await;
        let mut fields = vec![
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":path", "/ws"),
            (":authority", authority),
            ("sec-websocket-version", "13"),
        ];
        if let Some(h) = host {
            fields.push(("host", h));
        }
        raw.send(1, 0x4, 1, &RawH2::block(&fields)).await;
        let f = raw.next_on(1).await;
        // An answer other than 200 (HPACK's 0x88), or a reset: never a tunnel.
        let refused = match &f {
            Some((1, _, _, block)) => block.first() != Some(&0x88),
            Some((3, ..)) | None => true,
            _ => false,
        };
        assert!(refused, "{authority} {host:?}: {f:?}");
    }
    assert_eq!(s.echo.count(), 0, "a hostile request reached the origin");
}
