//! The edge speaks WebSocket: heartbeats, honest close frames and message limits, each row
//! of README's "What the edge says on a tunnel" seen from a raw client and a raw origin
//! that read every frame.

use crate::common::raw::{
    close, frame, next_frame, raw_client, read_to_end, send, Frame, RawOrigin,
};
use crate::common::{field, metric, one_resource, raw_request, upgrade_request, within, Edge};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A wsedge in front of a raw origin, with these `websocket` keys.
async fn setup(ws: &str) -> (Edge, RawOrigin) {
    let origin = RawOrigin::start().await;
    let yaml = crate::common::resource_with(origin.addr, &format!("handshake_timeout: 2s, {ws}"));
    (Edge::start(&yaml), origin)
}

/// A tunnel through `edge` to `origin`: (client, origin) connections.
async fn tunnel(edge: &Edge, origin: &mut RawOrigin, path: &str) -> (TcpStream, TcpStream) {
    let client = raw_client(edge.addr, path).await;
    let at_origin = origin.accept().await;
    (client, at_origin)
}

const KEY: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

/// A client's masked text frame.
fn text(s: &str) -> Vec<u8> {
    frame(true, 1, s.as_bytes(), KEY)
}

/// The access line of the tunnel on `path`, once written.
fn tunnel_line(edge: &Edge, path: &str) -> String {
    let lines = edge.wait_access(1, |l| {
        l.contains("\"kind\":\"tunnel\"") && field(l, "path") == Some(path)
    });
    lines
        .into_iter()
        .find(|l| l.contains("\"kind\":\"tunnel\"") && field(l, "path") == Some(path))
        .unwrap_or_else(|| panic!("no access line for {path}"))
}

fn assert_close(f: &Frame, code: u16, reason: &str) {
    assert_eq!(
        (f.opcode, f.code(), f.reason().as_str()),
        (8, Some(code), reason),
        "{f:?}"
    );
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_cut_after_interval_and_timeout() {
    let (edge, mut origin) = setup("heartbeat: { interval: 1s, timeout: 1s }").await;
    let started = Instant::now();
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/silent").await;
    // A Ping after the interval: unmasked, an 8-byte token.
    let ping = next_frame(&mut client, false).await.expect("a ping");
    assert_eq!((ping.opcode, ping.payload.len()), (9, 8));
    let pinged = started.elapsed();
    assert!(
        pinged >= Duration::from_millis(900) && pinged < Duration::from_secs(3),
        "{pinged:?}"
    );
    // No answer: the client's connection is closed without a Close frame, at interval +
    // timeout.
    let rest = read_to_end(&mut client).await;
    let cut = started.elapsed();
    assert!(rest.is_empty(), "the client got {rest:?}");
    assert!(
        cut >= Duration::from_secs(2) && cut < Duration::from_secs(4),
        "{cut:?}"
    );
    // The origin is told, masked as a client's frames are.
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1001, "heartbeat timeout");
    let line = tunnel_line(&edge, "/silent");
    assert_eq!(
        field(&line, "close_reason"),
        Some("heartbeat_timeout"),
        "{line}"
    );
    assert_eq!(field(&line, "close_code"), Some("1001"), "{line}");
    let m = edge.admin_request("GET", "/metrics").await.1;
    let series = |result: &str| {
        metric(
            &m,
            &format!("wsedge_ws_heartbeats_total{{peer=\"client\",resource=\"test\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(
        (series("sent"), series("timeout")),
        (Some(1.0), Some(1.0)),
        "{m}"
    );
}

#[tokio::test]
async fn a_client_that_answers_keeps_its_tunnel_and_the_origin_never_sees_a_pong() {
    let (edge, mut origin) =
        setup("idle_timeout: 30s, heartbeat: { interval: 1s, timeout: 1s }").await;
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/answers").await;
    let started = Instant::now();
    let mut tokens = Vec::new();
    // Three intervals with no application data, each ping answered.
    while started.elapsed() < Duration::from_secs(3) || tokens.len() < 3 {
        assert!(tokens.len() < 10, "too many pings");
        let ping = next_frame(&mut client, false).await.expect("a ping");
        assert_eq!(ping.opcode, 9);
        send(&mut client, &frame(true, 0xA, &ping.payload, KEY)).await;
        tokens.push(ping.payload);
    }
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        3.max(tokens.len()),
        "every ping has its own token"
    );
    // Still open: a message goes through, and it is the first thing the origin sees.
    send(&mut client, &text("still here")).await;
    let f = next_frame(&mut at_origin, true).await.expect("the message");
    assert_eq!((f.opcode, f.payload.as_slice()), (1, &b"still here"[..]));
    let m = edge.admin_request("GET", "/metrics").await.1;
    let answered = metric(
        &m,
        "wsedge_ws_heartbeats_total{peer=\"client\",resource=\"test\",result=\"answered\"}",
    );
    assert!(answered >= Some(3.0), "{m}");
}

#[tokio::test]
async fn the_origin_heartbeat_pings_masked_and_takes_its_pong_out() {
    let (edge, mut origin) = setup("heartbeat: { interval: 1s, timeout: 1s, origin: true }").await;
    let (client, mut at_origin) = tunnel(&edge, &mut origin, "/both").await;
    let (mut client_r, mut client_w) = client.into_split();
    // The client keeps talking, so only the origin is pinged.
    let talker = tokio::spawn(async move {
        for i in 0..30 {
            if client_w.write_all(&text(&format!("m{i}"))).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut seen_ping = None;
    for _ in 0..40 {
        let f = next_frame(&mut at_origin, true).await.expect("a frame");
        if f.opcode == 9 {
            seen_ping = Some(f.payload.clone());
            send(&mut at_origin, &frame(true, 0xA, &f.payload, None)).await;
            break;
        }
        assert_eq!(f.opcode, 1);
    }
    assert_eq!(seen_ping.map(|t| t.len()), Some(8), "the origin was pinged");
    // The client never sees the origin's pong: the first frame it reads is the Close.
    send(&mut at_origin, &close(1000, "", None)).await;
    let f = next_frame(&mut client_r, false)
        .await
        .expect("the origin's Close");
    assert_close(&f, 1000, "");
    talker.abort();
}

#[tokio::test]
async fn an_origin_that_resets_or_ends_without_close_gives_the_client_1014() {
    let (edge, mut origin) = setup("").await;
    for (path, reset) in [("/reset", true), ("/fin", false)] {
        let (mut client, at_origin) = tunnel(&edge, &mut origin, path).await;
        if reset {
            // SO_LINGER 0: close sends a reset, as a killed origin's kernel does (a zero
            // linger does not block).
            #[allow(deprecated)]
            at_origin.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(at_origin);
        let f = next_frame(&mut client, false).await.expect("a Close");
        assert_close(&f, 1014, "bad gateway");
        send(&mut client, &close(1014, "", KEY)).await;
        assert!(read_to_end(&mut client).await.is_empty());
        let line = tunnel_line(&edge, path);
        let reason = if reset { "error" } else { "origin_closed" };
        assert_eq!(field(&line, "close_reason"), Some(reason), "{line}");
        assert_eq!(field(&line, "close_code"), Some("1014"), "{line}");
    }
}

#[tokio::test]
async fn a_killed_origin_process_gives_the_client_1014() {
    // A real origin process: wsedge's demo origin (`--demo`, on a port of its choosing),
    // killed with SIGKILL mid-tunnel.
    let dir = crate::common::scratch_dir("killed");
    let demo = dir.join("demo.yaml");
    std::fs::write(
        &demo,
        crate::common::with_admin("listen: { http: [\"127.0.0.1:0\"] }\nresources:\n  - name: demo\n    hostnames: [\"localhost\"]\n    origin: { servers: [{ address: \"127.0.0.1:0\" }] }\n"),
    )
    .unwrap();
    let mut origin = std::process::Command::new(crate::common::wsedge_bin())
        .args(["--demo", "-c"])
        .arg(&demo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = origin.stdout.take().unwrap();
    let origin_addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(50)
            .find_map(|l| l.strip_prefix("wsedge: demo origin on ")?.parse().ok())
    });
    let origin_addr: std::net::SocketAddr = within("the demo origin", origin_addr)
        .await
        .unwrap()
        .expect("the demo origin's address");
    let edge = Edge::start(&one_resource(origin_addr, ""));
    // A raw client reads the frames as a browser gets them.
    let mut client = raw_client(edge.addr, "/killed").await;
    send(&mut client, &text("before")).await;
    let echo = next_frame(&mut client, false).await.expect("the echo");
    assert_eq!(echo.payload, b"before");
    origin.kill().unwrap();
    origin.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    // A Close frame with 1014, not an abnormal closure (browsers report 1006 for that).
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1014, "bad gateway");
}

#[tokio::test]
async fn a_client_gone_without_close_gives_the_origin_1001() {
    let (edge, mut origin) = setup("").await;
    for (path, reset) in [("/client-reset", true), ("/client-fin", false)] {
        let (client, mut at_origin) = tunnel(&edge, &mut origin, path).await;
        if reset {
            #[allow(deprecated)]
            client.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(client);
        let f = next_frame(&mut at_origin, true).await.expect("a Close");
        assert_close(&f, 1001, "going away");
        send(&mut at_origin, &close(1001, "", None)).await;
        let line = tunnel_line(&edge, path);
        let reason = if reset { "error" } else { "client_closed" };
        assert_eq!(field(&line, "close_reason"), Some(reason), "{line}");
        assert_eq!(field(&line, "close_code"), Some("1001"), "{line}");
    }
}

#[tokio::test]
async fn idle_timeout_and_max_lifetime_tell_both_sides_1001() {
    let (edge, mut origin) = setup("idle_timeout: 1s").await;
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/idle").await;
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1001, "idle timeout");
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1001, "idle timeout");
    // Both answer; the origin ends TCP first, as RFC 6455 §7.1.1 has it, then the client
    // gets its FIN.
    send(&mut client, &close(1001, "", KEY)).await;
    send(&mut at_origin, &close(1001, "", None)).await;
    drop(at_origin);
    assert!(read_to_end(&mut client).await.is_empty());
    let line = tunnel_line(&edge, "/idle");
    assert_eq!(field(&line, "close_reason"), Some("idle_timeout"));

    let (edge, mut origin) = setup("idle_timeout: 30s, max_lifetime: 2s").await;
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/old").await;
    // Traffic all along: the lifetime ends it anyway.
    let mut echoed = 0;
    let f = loop {
        send(&mut client, &text("tick")).await;
        let at = next_frame(&mut at_origin, true).await.expect("a frame");
        if at.opcode == 8 {
            break at;
        }
        send(&mut at_origin, &frame(true, 1, b"tock", None)).await;
        let back = next_frame(&mut client, false).await.expect("a frame");
        if back.opcode == 8 {
            assert_close(&back, 1001, "max lifetime");
            break next_frame(&mut at_origin, true).await.expect("a Close");
        }
        echoed += 1;
        assert!(echoed < 100);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_close(&f, 1001, "max lifetime");
    assert!(echoed > 5, "traffic flowed until the lifetime: {echoed}");
    let line = tunnel_line(&edge, "/old");
    assert_eq!(field(&line, "close_reason"), Some("max_lifetime"));
}

#[tokio::test]
async fn a_close_is_written_only_at_a_frame_boundary() {
    let (edge, mut origin) = setup("idle_timeout: 1s").await;
    // The origin writes half a frame and stops: the client's Close cannot be written; a
    // second later its connection is closed without one, and it got only the half frame.
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/half").await;
    let whole = frame(true, 2, &[7u8; 1000], None);
    send(&mut at_origin, &whole[..500]).await;
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1001, "idle timeout");
    let started = Instant::now();
    let got = read_to_end(&mut client).await;
    assert_eq!(got, &whole[..500], "nothing inside the frame");
    assert!(started.elapsed() < Duration::from_secs(3));

    // The same, but the frame ends within the second: it arrives whole, then the Close.
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/ends").await;
    send(&mut at_origin, &whole[..500]).await;
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1001, "idle timeout");
    send(&mut at_origin, &whole[500..]).await;
    let f = next_frame(&mut client, false).await.expect("the frame");
    assert_eq!(f.raw, whole);
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1001, "idle timeout");
}

#[tokio::test]
async fn a_message_over_max_message_size_gives_the_sender_1009_and_never_reaches_the_origin() {
    let (edge, mut origin) = setup("max_message_size: 1MiB").await;
    // 2 MiB in 64 KiB fragments from the client.
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/big-fragments").await;
    let piece = vec![0x5au8; 64 * 1024];
    let mut message = Vec::new();
    for i in 0..32 {
        let opcode = if i == 0 { 2 } else { 0 };
        message.extend(frame(i == 31, opcode, &piece, KEY));
    }
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&message).await;
        client
    });
    let mut payload = 0;
    let f = loop {
        let f = next_frame(&mut at_origin, true).await.expect("a frame");
        if f.opcode == 8 {
            break f;
        }
        payload += f.payload.len();
    };
    assert_close(&f, 1001, "client message too big");
    assert!(payload <= 1 << 20, "the origin got {payload} bytes of it");
    let mut client = within("writer", writer).await.unwrap();
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1009, "message too big");
    let line = tunnel_line(&edge, "/big-fragments");
    assert_eq!(
        field(&line, "close_reason"),
        Some("message_too_big"),
        "{line}"
    );
    assert_eq!(field(&line, "close_code"), Some("1009"), "{line}");

    // One 2 MiB frame: not a byte of it.
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/big-frame").await;
    send(&mut client, &text("fits")).await;
    let big = frame(true, 2, &vec![1u8; 2 << 20], KEY);
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&big).await;
        client
    });
    let f = next_frame(&mut at_origin, true)
        .await
        .expect("the small one");
    assert_eq!(f.payload, b"fits");
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1001, "client message too big");
    drop(within("writer", writer).await);

    // From the origin: the origin is the sender and gets 1009, the client 1001.
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/origin-big").await;
    let big = frame(true, 1, &vec![b'x'; (1 << 20) + 1], None);
    let writer = tokio::spawn(async move {
        let _ = at_origin.write_all(&big).await;
        at_origin
    });
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1001, "origin message too big");
    let mut at_origin = within("writer", writer).await.unwrap();
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1009, "message too big");
}

#[tokio::test]
async fn a_burst_over_message_rate_gives_the_client_1008() {
    let (edge, mut origin) = setup("message_rate: { rate: 100/s, burst: 200 }").await;
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/rate").await;
    let burst: Vec<u8> = (0..500).flat_map(|i| text(&format!("m{i}"))).collect();
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&burst).await;
        client
    });
    let mut passed = 0;
    let f = loop {
        let f = next_frame(&mut at_origin, true).await.expect("a frame");
        if f.opcode == 8 {
            break f;
        }
        assert_eq!(f.payload, format!("m{passed}").as_bytes(), "in order");
        passed += 1;
    };
    assert_close(&f, 1001, "client message rate exceeded");
    // The burst, and what refilled while it was read (a few at 100/s).
    assert!((200..300).contains(&passed), "{passed} passed");
    let mut client = within("writer", writer).await.unwrap();
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1008, "message rate exceeded");
    let line = tunnel_line(&edge, "/rate");
    assert_eq!(field(&line, "close_reason"), Some("message_rate"), "{line}");
    assert_eq!(field(&line, "close_code"), Some("1008"), "{line}");
}

#[tokio::test]
async fn under_limits_a_reserved_opcode_cannot_switch_them_off() {
    let (edge, mut origin) = setup("max_message_size: 1KiB").await;
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/reserved").await;
    send(&mut client, &frame(true, 3, b"not a websocket frame", KEY)).await;
    send(&mut client, &frame(true, 2, &[0u8; 4096], KEY)).await;
    let f = next_frame(&mut at_origin, true).await.expect("a Close");
    assert_close(&f, 1001, "client protocol error");
    let f = next_frame(&mut client, false).await.expect("a Close");
    assert_close(&f, 1002, "protocol error");
}

#[tokio::test]
async fn closes_of_the_endpoints_pass_untouched() {
    let (edge, mut origin) = setup("heartbeat: { interval: 30s }, max_message_size: 1MiB").await;
    let (mut client, mut at_origin) = tunnel(&edge, &mut origin, "/bye").await;
    let bye = close(4000, "bye", KEY);
    send(&mut client, &bye).await;
    let f = next_frame(&mut at_origin, true).await.expect("the Close");
    assert_eq!(f.raw, bye, "byte for byte");
    let answer = close(4000, "bye too", None);
    send(&mut at_origin, &answer).await;
    drop(at_origin);
    assert_eq!(read_to_end(&mut client).await, answer, "and then the FIN");
    let line = tunnel_line(&edge, "/bye");
    assert_eq!(
        field(&line, "close_reason"),
        Some("client_closed"),
        "{line}"
    );
    assert_eq!(field(&line, "close_code"), Some("4000"), "{line}");
}

#[tokio::test]
async fn handshake_rate_and_message_rate_take_the_short_form() {
    let (edge, mut origin) = setup("handshake_rate: 2/s, message_rate: 1000/s").await;
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for _ in 0..3 {
        let answer = raw_request(edge.addr, &upgrade_request("/short", "")).await;
        statuses.push(crate::common::status(&answer));
        if statuses.last() == Some(&101) {
            open.push(origin.accept().await);
        }
    }
    assert_eq!(statuses, [101, 101, 429]);
}

/// `wsedge -t` on a resource with these `websocket` keys: (ok, stderr).
fn check(ws: &str) -> (bool, String) {
    let yaml = format!(
        "listen: {{ http: [\"127.0.0.1:0\"] }}\nresources:\n  - name: r\n    hostnames: [a.example]\n    origin: {{ servers: [{{ address: \"127.0.0.1:9\" }}] }}\n    websocket:\n{ws}"
    );
    let out = crate::common::check_config("w.yaml", &yaml);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_new_keys_refuse_hostile_values_with_line_and_key() {
    for good in [
        "      heartbeat: { interval: 30s }\n",
        "      heartbeat: { interval: 100ms, timeout: 100ms, origin: true }\n",
        "      heartbeat: off\n      max_message_size: off\n      message_rate: false\n",
        "      max_message_size: 1MiB\n",
        "      max_message_size: 1048576\n",
        "      max_message_size: 64k\n",
        "      message_rate: 100/s\n",
        "      message_rate: { rate: 6000/m, burst: 200 }\n",
        "      handshake_rate: 20/s\n",
    ] {
        let (ok, err) = check(good);
        assert!(ok, "{good}: {err}");
    }
    for (bad, says) in [
        ("      heartbeat: { interval: 10ms }\n", "at least 100ms"),
        ("      heartbeat: { interval: 30s, timeout: 0s }\n", "zero"),
        (
            "      heartbeat: { timeout: 10s }\n",
            "missing field `interval`",
        ),
        (
            "      heartbeat: { interval: 30s, every: 5s }\n",
            "unknown field `every`",
        ),
        ("      heartbeat: true\n", "not a setting"),
        ("      heartbeat: { interval: 9999999h }\n", "too long"),
        ("      max_message_size: 1MB\n", "ambiguous"),
        ("      max_message_size: 0\n", "zero"),
        ("      max_message_size: 99999999999999999999\n", "invalid"),
        ("      max_message_size: 2048GiB\n", "too large"),
        ("      max_message_size: \"%31MiB\"\n", "invalid size"),
        ("      max_message_size: -1\n", "invalid size"),
        ("      message_rate: 0/s\n", "zero"),
        ("      message_rate: 100\n", "expected a rate like 20/s"),
        ("      message_rate: 100/h\n", "invalid rate"),
        (
            "      message_rate: { rate: 100/s, burst: 0 }\n",
            "out of range",
        ),
        (
            "      message_rate: { rate: 100/s, bust: 5 }\n",
            "unknown field `bust`",
        ),
        ("      handshake_rate: 20/s/s\n", "invalid rate"),
    ] {
        let (ok, err) = check(bad);
        assert!(!ok, "{bad} was accepted");
        assert!(err.contains("w.yaml:7:"), "{bad}: want line 7 in {err}");
        assert!(err.contains("websocket"), "{bad}: want the key in {err}");
        assert!(err.contains(says), "{bad}: want {says:?} in {err}");
    }
}

/// The 50 MB test: pings injected both ways into streams of large, randomly fragmented
/// messages land only between frames, and every byte arrives unchanged and in order.
mod fuzz {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    const TOTAL: usize = 50 << 20;

    /// The frames one side sends, the same from the same seed: messages of random size
    /// (to 256 KiB, now and then to 2 MiB), each cut into 1 to 6 fragments, some with
    /// RSV1 set on the first (as permessage-deflate sets it); masked with a random key
    /// when `masked`.
    struct Frames {
        rng: StdRng,
        masked: bool,
        pattern: Vec<u8>,
        queued: std::collections::VecDeque<Vec<u8>>,
        sent: usize,
        since_pause: usize,
    }

    impl Frames {
        fn new(seed: u64, masked: bool) -> Frames {
            Frames {
                rng: StdRng::seed_from_u64(seed),
                masked,
                pattern: (0..(2 << 20) + 256).map(|i| (i * 7 % 251) as u8).collect(),
                queued: Default::default(),
                sent: 0,
                since_pause: 0,
            }
        }

        /// The next frame, with a pause before it (ms) now and then; None when all sent.
        fn next(&mut self) -> Option<(Vec<u8>, u64)> {
            if self.queued.is_empty() {
                if self.sent >= TOTAL {
                    return None;
                }
                let size = if self.rng.gen_ratio(1, 40) {
                    self.rng.gen_range(0..=2 << 20)
                } else {
                    self.rng.gen_range(0..=256 << 10)
                };
                self.sent += size;
                let start = self.rng.gen_range(0..256);
                let body = &self.pattern[start..start + size];
                let pieces = self.rng.gen_range(1..=6usize);
                let mut cuts: Vec<usize> = (0..pieces - 1)
                    .map(|_| self.rng.gen_range(0..=size))
                    .collect();
                cuts.push(0);
                cuts.push(size);
                cuts.sort_unstable();
                let rsv1 = self.rng.gen_ratio(1, 3);
                let text = self.rng.gen_bool(0.5);
                for (i, w) in cuts.windows(2).enumerate() {
                    let first = i == 0;
                    let last = i == cuts.len() - 2;
                    let opcode = match (first, text) {
                        (false, _) => 0,
                        (true, true) => 1,
                        (true, false) => 2,
                    };
                    let key = self.masked.then(|| self.rng.gen::<[u8; 4]>());
                    let mut f = frame(last, opcode, &body[w[0]..w[1]], key);
                    if first && rsv1 {
                        f[0] |= 0x40;
                    }
                    self.queued.push_back(f);
                }
            }
            // A pause of more than the heartbeat interval every 40 frames or so: the edge
            // pings the quiet side while the other keeps sending.
            self.since_pause += 1;
            let pause = if self.since_pause >= 40 && self.rng.gen_ratio(1, 4) {
                self.since_pause = 0;
                250
            } else {
                0
            };
            self.queued.pop_front().map(|f| (f, pause))
        }
    }

    /// Writes this side's frames, and the pongs its reader asks for between them.
    async fn write_side<W: AsyncWriteExt + Unpin>(
        mut w: W,
        mut frames: Frames,
        mut pongs: mpsc::UnboundedReceiver<Vec<u8>>,
        masked: bool,
        done: tokio::sync::watch::Receiver<bool>,
    ) -> W {
        let pong = |token: &[u8]| frame(true, 0xA, token, masked.then_some([9, 8, 7, 6]));
        while let Some((f, pause)) = frames.next() {
            while let Ok(token) = pongs.try_recv() {
                w.write_all(&pong(&token)).await.unwrap();
            }
            if pause > 0 {
                let until = tokio::time::Instant::now() + Duration::from_millis(pause);
                while let Ok(Some(token)) = tokio::time::timeout_at(until, pongs.recv()).await {
                    w.write_all(&pong(&token)).await.unwrap();
                }
            }
            // One frame in four is trickled in pieces, so the edge often has half a frame
            // when a ping is due.
            if f.len() > 64 && f[f.len() / 2] % 4 == 0 {
                let cut = f.len() / 3;
                w.write_all(&f[..cut]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
                w.write_all(&f[cut..2 * cut]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
                w.write_all(&f[2 * cut..]).await.unwrap();
            } else {
                w.write_all(&f).await.unwrap();
            }
        }
        // Keep answering until both sides have all they expect.
        let mut done = done;
        loop {
            tokio::select! {
                token = pongs.recv() => match token {
                    Some(t) => w.write_all(&pong(&t)).await.unwrap(),
                    None => break,
                },
                _ = done.changed() => break,
            }
        }
        w
    }

    /// Reads what the other side sent: every frame must be the next one it sent, byte for
    /// byte, except the edge's pings, which are answered. Returns the pings seen.
    async fn read_side<R: AsyncReadExt + Unpin>(
        mut r: R,
        mut expected: Frames,
        pongs: mpsc::UnboundedSender<Vec<u8>>,
        pings_masked: bool,
    ) -> (R, usize) {
        let mut pings = 0;
        let mut frames = 0;
        let mut buf = Vec::new();
        while let Some((want, _)) = expected.next() {
            loop {
                let mut head = [0u8; 2];
                r.read_exact(&mut head).await.unwrap();
                if head[0] & 0x0f == 9 {
                    // An edge ping: final, no RSV, the right masking, an 8-byte token.
                    assert_eq!(head[0], 0x89, "ping after {frames} frames");
                    assert_eq!(head[1] & 0x80 != 0, pings_masked);
                    assert_eq!(head[1] & 0x7f, 8);
                    let mut rest = vec![0u8; if pings_masked { 12 } else { 8 }];
                    r.read_exact(&mut rest).await.unwrap();
                    let token: Vec<u8> = if pings_masked {
                        (0..8).map(|i| rest[4 + i] ^ rest[i % 4]).collect()
                    } else {
                        rest
                    };
                    pongs.send(token).unwrap();
                    pings += 1;
                    continue;
                }
                assert_eq!(head[..], want[..2], "frame {frames}: header");
                buf.resize(want.len() - 2, 0);
                r.read_exact(&mut buf).await.unwrap();
                assert!(buf == want[2..], "frame {frames}: bytes differ");
                frames += 1;
                break;
            }
        }
        (r, pings)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pings_land_only_between_frames_of_50_mb_each_way() {
        let (edge, mut origin) =
            setup("idle_timeout: 60s, heartbeat: { interval: 100ms, timeout: 10s, origin: true }")
                .await;
        let (client, at_origin) = tunnel(&edge, &mut origin, "/fuzz").await;
        let (client_r, client_w) = client.into_split();
        let (origin_r, origin_w) = at_origin.into_split();
        let (client_pongs_tx, client_pongs) = mpsc::unbounded_channel();
        let (origin_pongs_tx, origin_pongs) = mpsc::unbounded_channel();
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let cw = tokio::spawn(write_side(
            client_w,
            Frames::new(1, true),
            client_pongs,
            true,
            done.clone(),
        ));
        let ow = tokio::spawn(write_side(
            origin_w,
            Frames::new(2, false),
            origin_pongs,
            false,
            done,
        ));
        // The client reads the origin's frames (pings unmasked); the origin the client's.
        let cr = tokio::spawn(read_side(
            client_r,
            Frames::new(2, false),
            client_pongs_tx,
            false,
        ));
        let or = tokio::spawn(read_side(
            origin_r,
            Frames::new(1, true),
            origin_pongs_tx,
            true,
        ));
        let limit = Duration::from_secs(120);
        let (_, client_pings) = tokio::time::timeout(limit, cr)
            .await
            .expect("client reader")
            .unwrap();
        let (_, origin_pings) = tokio::time::timeout(limit, or)
            .await
            .expect("origin reader")
            .unwrap();
        let _ = done_tx.send(true);
        let _ = tokio::time::timeout(limit, cw).await;
        let _ = tokio::time::timeout(limit, ow).await;
        eprintln!(
            "50 MB each way in {:?}: {client_pings} pings to the client, {origin_pings} to the origin",
            started.elapsed()
        );
        // How many pings come depends on how often a side looks quiet to the edge, which
        // a loaded machine changes (a pausing writer's earlier bytes may still be queued
        // behind a slow reader): at least one each way, each checked where it landed. (CI
        // saw 2 and 2 once; an idle machine gives 5 to 20.)
        assert!(
            client_pings >= 1 && origin_pings >= 1,
            "{client_pings} {origin_pings}"
        );
        let m = edge.admin_request("GET", "/metrics").await.1;
        for (peer, seen) in [("client", client_pings), ("origin", origin_pings)] {
            let sent = metric(
                &m,
                &format!("wsedge_ws_heartbeats_total{{peer=\"{peer}\",resource=\"test\",result=\"sent\"}}"),
            );
            // Every ping the edge counted was seen, but one or two sent after the reader
            // had all it expected.
            let sent = sent.unwrap_or(0.0) as usize;
            assert!(sent >= seen && sent <= seen + 2, "{peer}: saw {seen}: {m}");
        }
        assert!(!m.contains("result=\"timeout\""), "{m}");
    }
}
