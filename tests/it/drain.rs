//! Drains without a stampede: on SIGTERM, in the old process of a graceful upgrade and on
//! `POST /drain`, every open tunnel gets a Close frame each way at a moment spread over
//! `drain.spread`; the process exits once nothing is left; refusals carry a jittered
//! `Retry-After`.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn config(origin: SocketAddr, top: &str) -> String {
    format!(
        r#"{top}
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: drained
    hostnames: ["127.0.0.1", "localhost"]
    origin: {{ servers: [{{ address: "{origin}" }}] }}
    websocket: {{ idle_timeout: 60s }}
"#
    )
}

async fn open(addr: SocketAddr, n: usize) -> Vec<Ws> {
    open_tunnels(&format!("ws://{addr}/ws"), n).await
}

/// What a client saw at the end of its tunnel.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// A Close frame (code, reason), this long after the start.
    Close(u16, String, Duration),
    /// The connection ended without one, or failed.
    Vanished(String),
}

/// Reads each tunnel until it ends (answering its Close, as browsers do).
async fn ends(tunnels: Vec<Ws>, since: Instant, limit: Duration) -> Vec<End> {
    let reads = tunnels.into_iter().map(|mut ws| async move {
        let r = tokio::time::timeout(limit, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(Some(f)))) => {
                        return End::Close(f.code.into(), f.reason.to_string(), since.elapsed())
                    }
                    Some(Ok(Message::Close(None))) => {
                        return End::Vanished("close without code".into())
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Vanished(e.to_string()),
                    None => return End::Vanished("end of stream".into()),
                }
            }
        })
        .await;
        // Let the closing handshake finish (tungstenite answers the Close).
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
        r.unwrap_or(End::Vanished("no end in time".into()))
    });
    futures_util::future::join_all(reads).await
}

/// The Close frames arrived spread over `spread`: all within it (plus the time to write
/// them), and no 1-second slice holds more than twice its share.
fn assert_spread(ends: &[End], spread: Duration, code: u16, reason: &str) {
    let n = ends.len();
    let mut at = Vec::new();
    for e in ends {
        match e {
            End::Close(c, r, t) if *c == code && r == reason => at.push(*t),
            other => panic!("want Close {code} {reason:?}, got {other:?}"),
        }
    }
    let slices = spread.as_secs().max(1) as usize;
    let mut per = vec![0usize; slices + 2];
    for t in &at {
        per[(t.as_secs() as usize).min(slices + 1)] += 1;
    }
    let share = n.div_ceil(slices);
    assert!(
        per.iter().all(|&k| k <= 2 * share),
        "Close frames per second {per:?} (share {share})"
    );
    assert_eq!(per[slices + 1], 0, "Closes after the window: {per:?}");
}

fn closes_seen(origin: &Origin, code: u16, reason: &str) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| matches!(s, Seen::Close(c, r) if *c == code && r == reason))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_200_tunnels_spread_over_the_window_and_exits_before_the_grace_period() {
    let origin = Origin::start(Mode::Echo).await;
    let top = "pingora: { grace_period_seconds: 12, graceful_shutdown_timeout_seconds: 1 }\ndrain: { spread: 4s, close_code: 1001 }";
    let mut edge = Edge::start(&config(origin.addr, top));
    let mut tunnels = open(edge.addr, 200).await;
    for ws in tunnels.iter_mut().take(5) {
        echo_once(ws, Message::text("before")).await;
    }
    let term = Instant::now();
    edge.signal("TERM");
    let ends = ends(tunnels, term, Duration::from_secs(10)).await;
    assert_spread(&ends, Duration::from_secs(4), 1001, "going away");
    assert!(
        edge.wait_exit(Duration::from_secs(6)),
        "wsedge did not exit once its tunnels were gone"
    );
    assert!(
        term.elapsed() < Duration::from_secs(12),
        "exited only after {:?}, the grace period is 12 s",
        term.elapsed()
    );
    // The origin got its Close for every tunnel too.
    assert_eq!(closes_seen(&origin, 1001, "going away"), 200);
    // Each tunnel logged once, as `shutdown` with the code sent (lines written before exit).
    let lines = edge.access_lines();
    let tunnel_lines: Vec<&String> = lines
        .iter()
        .filter(|l| field(l, "kind") == Some("tunnel"))
        .collect();
    assert_eq!(
        tunnel_lines.len(),
        200,
        "{:?}",
        &tunnel_lines[..3.min(tunnel_lines.len())]
    );
    for l in tunnel_lines {
        assert_eq!(field(l, "close_reason"), Some("shutdown"), "{l}");
        assert!(l.contains("\"close_code\":1001"), "{l}");
    }
}

#[tokio::test]
async fn an_edge_with_no_tunnel_exits_within_a_second_of_sigterm() {
    let origin = Origin::start(Mode::Echo).await;
    // Pingora's default grace period (300 s) and the default spread.
    let mut edge = Edge::start(&config(origin.addr, ""));
    // A tunnel that came and went leaves nothing behind.
    let mut ws = open(edge.addr, 1).await.remove(0);
    echo_once(&mut ws, Message::text("one")).await;
    within("close", ws.close(None)).await.unwrap();
    let deadline = Instant::now() + STEP;
    while edge
        .admin_request("GET", "/healthz")
        .await
        .1
        .contains("\"tunnels_open\":1")
    {
        assert!(Instant::now() < deadline, "the tunnel never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = Instant::now();
    edge.signal("TERM");
    assert!(
        edge.wait_exit(Duration::from_secs(1)),
        "still running 1 s after SIGTERM with nothing open"
    );
    assert!(term.elapsed() < Duration::from_millis(1500));
    let log = edge.log_text();
    assert!(
        log.contains("drained: no tunnel and no request left"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_in_flight_at_sigterm_is_answered_before_the_exit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An origin that answers only when told to.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut b).await.is_ok() {
            head.push(b[0]);
        }
        let _ = arrived_tx.send(());
        let _ = go_rx.await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await;
    });
    let top = "pingora: { grace_period_seconds: 10, graceful_shutdown_timeout_seconds: 1 }";
    let mut edge = Edge::start(&config(origin, top));
    let addr = edge.addr;
    let client = tokio::spawn(async move {
        raw_request(
            addr,
            "GET /slow HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await
    });
    within("the request at the origin", arrived).await.unwrap();
    edge.signal("TERM");
    // With a request in flight the stopping edge waits for it...
    assert!(
        !edge.wait_exit(Duration::from_millis(700)),
        "exited with a request in flight"
    );
    go.send(()).unwrap();
    let answer = within("the answer", client).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"),
        "{answer}"
    );
    // ...and exits once it is answered.
    assert!(edge.wait_exit(Duration::from_secs(5)), "did not exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_spreads_closes_refuses_upgrades_with_jitter_and_cancel_restores() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(origin.addr, "drain: { spread: 2s }"));
    let (status, body) = edge.admin_request("POST", "/drain/cancel").await;
    assert_eq!(status, 409, "{body}");
    let tunnels = open(edge.addr, 40).await;
    let start = Instant::now();
    let (status, body) = edge.admin_request("POST", "/drain").await;
    assert_eq!(status, 202, "{body}");
    // At once: /healthz says draining (503), and upgrades get 503 with a jittered
    // Retry-After; plain requests still pass.
    let (status, health) = edge.admin_request("GET", "/healthz").await;
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("\"status\":\"draining\""), "{health}");
    assert!(health.contains("\"by\":\"admin\""), "{health}");
    let mut waits = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let answer = raw_request(edge.addr, &upgrade_request("/ws", "")).await;
        assert_eq!(crate::common::status(&answer), 503, "{answer}");
        let wait: u64 = header(&answer, "retry-after").unwrap().parse().unwrap();
        assert!((5..=10).contains(&wait), "{answer}");
        waits.insert(wait);
    }
    assert!(waits.len() > 1, "Retry-After without jitter: {waits:?}");
    let ends = ends(tunnels, start, Duration::from_secs(8)).await;
    assert_spread(&ends, Duration::from_secs(2), 1001, "edge draining");
    assert_eq!(closes_seen(&origin, 1001, "edge draining"), 40);
    let metrics = edge.admin_request("GET", "/metrics").await.1;
    assert_eq!(
        metric(&metrics, "wsedge_ws_drained_total{resource=\"drained\"}"),
        Some(40.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "wsedge_ws_handshakes_total{outcome=\"draining\",resource=\"drained\"}"
        ),
        Some(20.0)
    );
    // The process stays up: cancel, and upgrades are served again.
    let (status, body) = edge.admin_request("POST", "/drain/cancel").await;
    assert_eq!(status, 200, "{body}");
    let (status, health) = edge.admin_request("GET", "/healthz").await;
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    let mut ws = open(edge.addr, 1).await.remove(0);
    echo_once(&mut ws, Message::text("back")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_drain_leaves_the_tunnels_it_has_not_told_open() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(origin.addr, "drain: { spread: 60s }"));
    let mut tunnels = open(edge.addr, 10).await;
    assert_eq!(edge.admin_request("POST", "/drain").await.0, 202);
    assert_eq!(
        edge.admin_request("POST", "/drain").await.0,
        200,
        "twice is once"
    );
    assert_eq!(edge.admin_request("POST", "/drain/cancel").await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A tunnel whose moment fell in the few milliseconds before the cancel was told; the
    // others carry on.
    let mut alive = 0;
    for ws in &mut tunnels {
        let echo = async {
            ws.send(Message::text("still")).await.ok()?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t == "still" => Some(()),
                _ => None,
            }
        };
        if within("echo", echo).await.is_some() {
            alive += 1;
        }
    }
    assert!(alive >= 9, "only {alive} of 10 tunnels survived the cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_reconnect_on_close_live_through_a_graceful_upgrade() {
    let origin = Origin::start(Mode::Echo).await;
    let dir = scratch_dir("drain-upgrade");
    let sock = dir.join("upgrade.sock");
    let top = format!(
        "pingora: {{ upgrade_sock: \"{}\", pid_file: \"{}\", grace_period_seconds: 8, graceful_shutdown_timeout_seconds: 1 }}\ndrain: {{ spread: 3s, close_code: 1012 }}",
        sock.display(),
        dir.join("wsedge.pid").display()
    );
    let mut old = Edge::start(&config(origin.addr, &top));
    let addr = old.addr;
    const SESSIONS: usize = 200;
    // Each session: a tunnel that echoes; on a Close it reconnects at once, and counts a
    // refused or failed reconnect.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sessions = (0..SESSIONS).map(|i| {
        let stop = stop.clone();
        async move {
            let (mut reconnects, mut failures, mut codes) = (0usize, Vec::new(), Vec::new());
            let connect = || async {
                let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
                req.headers_mut()
                    .insert("Host", "localhost".parse().unwrap());
                tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req)).await
            };
            let mut ws = match connect().await {
                Ok(Ok((ws, _))) => ws,
                other => panic!("session {i} could not start: {other:?}"),
            };
            let mut n = 0u64;
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                n += 1;
                let msg = format!("{i}-{n}");
                let sent = ws.send(Message::text(msg.clone())).await.is_ok();
                let answer = tokio::time::timeout(STEP, ws.next()).await;
                match answer {
                    Ok(Some(Ok(Message::Text(t)))) if sent && t == msg => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Ok(Some(Ok(Message::Close(f)))) => codes.push(f.map(|f| u16::from(f.code))),
                    _ => codes.push(None),
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
                match connect().await {
                    Ok(Ok((new, _))) => {
                        ws = new;
                        reconnects += 1;
                    }
                    Ok(Err(e)) => {
                        failures.push(e.to_string());
                        break;
                    }
                    Err(_) => {
                        failures.push("reconnect timed out".into());
                        break;
                    }
                }
            }
            (ws, reconnects, failures, codes)
        }
    });
    let running = tokio::spawn(futures_util::future::join_all(sessions));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The new process takes the listeners; the old one drains.
    let path = old.dir.join("wsedge.yaml");
    let new_dir = scratch_dir("drain-upgrade-new");
    let new = tokio::task::spawn_blocking(move || Edge::start_file(&path, new_dir, &["-u"]));
    let deadline = Instant::now() + STEP;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the new process never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new process listens on its upgrade socket, then waits in accept: a head start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    old.signal("QUIT");
    let new = within("the new process takes over", new).await.unwrap();
    // The old process hands over, waits 5 s (Pingora), drains over 3 s and exits.
    assert!(
        old.wait_exit(Duration::from_secs(20)),
        "the old process did not exit"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("sessions end")
        .unwrap();
    let mut live = Vec::new();
    let mut failures = Vec::new();
    let mut reconnects = 0;
    for (ws, r, f, codes) in results {
        reconnects += r;
        failures.extend(f);
        assert!(
            codes.iter().all(|c| *c == Some(1012)),
            "a session saw {codes:?}, not Close 1012"
        );
        live.push(ws);
    }
    assert!(
        failures.is_empty(),
        "refused or failed reconnects: {failures:?}"
    );
    assert_eq!(reconnects, SESSIONS, "every session reconnected once");
    // Every session now lives on the new process (the old one is gone), and echoes.
    let metrics = new.admin_request("GET", "/metrics").await.1;
    assert_eq!(
        metric(&metrics, "wsedge_ws_tunnels_open{resource=\"drained\"}"),
        Some(SESSIONS as f64)
    );
    for ws in live.iter_mut().take(20) {
        echo_once(ws, Message::text("after")).await;
    }
    assert_eq!(closes_seen(&origin, 1012, "edge restarting"), SESSIONS);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_cannot_stretch_the_spread_past_the_grace_period_the_process_runs_with() {
    let origin = Origin::start(Mode::Echo).await;
    let top = |grace: u64, spread: &str| {
        format!("pingora: {{ grace_period_seconds: {grace} }}\ndrain: {{ spread: {spread} }}")
    };
    let edge = Edge::start(&config(origin.addr, &top(10, "2s")));
    let path = edge.dir.join("wsedge.yaml");
    // The file alone is valid (grace 300), but Pingora keeps the grace period it started
    // with (10 s): a 200 s spread would be cut short with no Close.
    std::fs::write(&path, with_admin(&config(origin.addr, &top(300, "200s")))).unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("restart"), "{body}");
    // What fits in the running grace period is taken.
    std::fs::write(&path, with_admin(&config(origin.addr, &top(300, "7s")))).unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(edge.admin_request("POST", "/drain").await.0, 202);
    let health = edge.admin_request("GET", "/healthz").await.1;
    assert!(health.contains("\"spread_seconds\":7.0"), "{health}");
}

#[test]
fn drain_keys_refuse_hostile_values_with_line_and_key() {
    let check = |top: &str| {
        let yaml = format!(
            "{top}\nlisten: {{ http: [\"127.0.0.1:0\"] }}\nresources:\n  - name: r\n    hostnames: [a.example]\n    origin: {{ servers: [{{ address: \"127.0.0.1:9\" }}] }}\n"
        );
        let out = check_config("d.yaml", &yaml);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for good in [
        "drain: { spread: 30s, close_code: 1001 }",
        "drain: { spread: 0 }",
        "drain: { spread: 0s, close_code: 1012 }",
        "drain: { spread: 0m }",
        "drain: { close_code: 4000 }",
        "pingora: { grace_period_seconds: 3 }",
        "pingora: { grace_period_seconds: 25 }\ndrain: { spread: 22s }",
    ] {
        let (ok, err) = check(good);
        assert!(ok, "{good}: {err}");
    }
    for (bad, line, says) in [
        ("drain: { spread: -1s }", 1, "invalid duration"),
        ("drain: { spread: 2h }", 1, "at most 1h"),
        ("drain: { spread: \"%33s\" }", 1, "invalid duration"),
        ("drain: { spread: 30 }", 1, "invalid duration"),
        ("drain: { close_code: 1006 }", 1, "not one a drain may send"),
        ("drain: { close_code: 1005 }", 1, "not one a drain may send"),
        ("drain: { close_code: 999 }", 1, "not one a drain may send"),
        ("drain: { close_code: 5000 }", 1, "not one a drain may send"),
        ("drain: { close_code: 99999999999999999999 }", 1, "invalid"),
        ("drain: { close_code: going }", 1, "invalid type"),
        ("drain: { spred: 3s }", 1, "unknown field `spred`"),
        (
            "pingora: { grace_period_seconds: 25 }\ndrain: { spread: 23s }",
            2,
            "grace period",
        ),
    ] {
        let (ok, err) = check(bad);
        assert!(!ok, "{bad} was accepted");
        assert!(
            err.contains(&format!("d.yaml:{line}:")),
            "{bad}: want line {line} in {err}"
        );
        assert!(err.contains("drain"), "{bad}: want the key in {err}");
        assert!(err.contains(says), "{bad}: want {says:?} in {err}");
    }
}
