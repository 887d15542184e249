//! Live operations: reloads that never cut tunnels, SIGTERM with a grace period, and the
//! zero-downtime upgrade (`-u` + SIGQUIT).

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn config(origin: SocketAddr, round: usize, valid: bool, pingora: &str) -> String {
    let typo = if valid { "" } else { "\n    surprise_key: 1" };
    with_admin(&format!(
        r#"{pingora}
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: live
    hostnames: ["127.0.0.1", "localhost", "v{round}.localhost"]
    origin: {{ servers: [{{ address: "{origin}" }}] }}{typo}
    websocket: {{ idle_timeout: 60s }}
"#
    ))
}

async fn handshake_status(edge: &Edge, host: &str, path: &str) -> u16 {
    let answer = raw_request(
        edge.addr,
        &upgrade_request(path, "").replace("Host: localhost", &format!("Host: {host}")),
    )
    .await;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn open_tunnels(edge: &Edge, n: usize) -> Vec<Ws> {
    crate::common::open_tunnels(&edge.url("/ws"), n).await
}

/// Every tunnel sends `tag-i` and must get exactly that back next.
async fn exchange(tunnels: &mut [Ws], tag: &str) {
    let rounds = tunnels.iter_mut().enumerate().map(|(i, ws)| async move {
        let msg = format!("{tag}-{i}");
        ws.send(Message::text(msg.clone()))
            .await
            .map_err(|e| format!("tunnel {i}: send: {e}"))?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == msg => Ok(()),
            other => Err(format!("tunnel {i}: want {msg}, got {other:?}")),
        }
    });
    let results = within(
        "exchange on every tunnel",
        futures_util::future::join_all(rounds),
    )
    .await;
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        errors.is_empty(),
        "{} tunnels failed, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_tunnels_survive_fifty_reloads_and_new_handshakes_see_each_config() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(origin.addr, 0, true, ""));
    let path = edge.dir.join("wsedge.yaml");
    let mut tunnels = open_tunnels(&edge, 1000).await;
    exchange(&mut tunnels, "start").await;

    let mut last_valid = 0;
    for round in 1..=50 {
        let valid = round % 3 != 0;
        std::fs::write(&path, config(origin.addr, round, valid, "")).unwrap();
        if round % 2 == 0 {
            let (status, body) = edge.admin_request("POST", "/reload").await;
            assert_eq!(
                status,
                if valid { 200 } else { 422 },
                "round {round}: {body}"
            );
        } else {
            let before = edge.admin_request("GET", "/healthz").await.1;
            edge.signal("HUP");
            let deadline = Instant::now() + STEP;
            while edge.admin_request("GET", "/healthz").await.1 == before {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: SIGHUP did not reload"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if valid {
            last_valid = round;
            assert_eq!(
                handshake_status(&edge, &format!("v{round}.localhost"), "/probe").await,
                101,
                "round {round}"
            );
        } else {
            assert_eq!(
                handshake_status(&edge, &format!("v{round}.localhost"), "/probe").await,
                404,
                "round {round}"
            );
            assert_eq!(
                handshake_status(&edge, &format!("v{last_valid}.localhost"), "/probe").await,
                101,
                "round {round}: the previous config serves on"
            );
        }
        exchange(&mut tunnels, &format!("round{round}")).await;
    }
    // No tunnel of the thousand closed during all that: the only closes logged are probes.
    let closed_tunnels: Vec<String> = edge
        .access_lines()
        .into_iter()
        .filter(|l| l.contains("\"path\":\"/ws\""))
        .collect();
    assert!(
        closed_tunnels.is_empty(),
        "tunnels closed during reloads: {:?}",
        &closed_tunnels[..closed_tunnels.len().min(3)]
    );
    let metrics = edge.admin_request("GET", "/metrics").await.1;
    assert!(
        metrics.contains("wsedge_config_reloads_total{result=\"ok\"} 34"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsedge_config_reloads_total{result=\"failed\"} 16"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsedge_ws_tunnels_open{resource=\"live\"} 1000"),
        "{metrics}"
    );
}

#[tokio::test]
async fn invalid_reload_keeps_the_old_config_and_healthz_says_where() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(origin.addr, 1, true, ""));
    let path = edge.dir.join("wsedge.yaml");
    std::fs::write(&path, config(origin.addr, 2, false, "")).unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    let (status, health) = edge.admin_request("GET", "/healthz").await;
    assert_eq!(status, 200);
    assert!(health.contains("\"ok\":false"), "{health}");
    // Line 8 is `surprise_key: 1`, under resources[0].
    assert!(health.contains("wsedge.yaml:8:5"), "the line: {health}");
    assert!(
        health.contains("resources[0]") && health.contains("unknown field `surprise_key`"),
        "the key: {health}"
    );
    assert!(
        health.contains("still serving the previous configuration"),
        "{health}"
    );
    assert!(
        edge.wait_log(&["unknown field `surprise_key`"])
            .contains("unknown field `surprise_key`"),
        "logged too"
    );
    assert_eq!(handshake_status(&edge, "v1.localhost", "/ws").await, 101);
    assert_eq!(handshake_status(&edge, "v2.localhost", "/ws").await, 404);
}

#[tokio::test]
async fn sigterm_stops_new_connections_tells_tunnels_to_go_and_exits_before_the_grace_period() {
    let origin = Origin::start(Mode::Echo).await;
    // A grace period of 3 s leaves no room for a spread (the default is what fits: 0 s).
    let pingora = "pingora: { grace_period_seconds: 3, graceful_shutdown_timeout_seconds: 1 }";
    let mut edge = Edge::start(&config(origin.addr, 0, true, pingora));
    let (mut quiet, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    let (mut busy, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    echo_once(&mut quiet, Message::text("before")).await;
    echo_once(&mut busy, Message::text("before")).await;

    let term = Instant::now();
    edge.signal("TERM");
    // New connections stop being served.
    let deadline = Instant::now() + STEP;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio_tungstenite::connect_async(edge.url("/ws")),
        )
        .await;
        if !matches!(attempt, Ok(Ok(_))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still accepting new tunnels after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both open tunnels are told to go with a Close frame, not cut.
    for ws in [&mut quiet, &mut busy] {
        let end = within("the edge's Close", async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(f))) => {
                        return f.map(|f| (u16::from(f.code), f.reason.to_string()))
                    }
                    Some(Ok(_)) => {}
                    other => panic!("the tunnel ended without a Close: {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(end, Some((1001, "going away".to_string())));
    }
    assert!(
        edge.wait_exit(Duration::from_secs(10)),
        "wsedge did not exit"
    );
    assert!(
        term.elapsed() < Duration::from_secs(3),
        "exited after {:?}: it waited out the grace period with nothing open",
        term.elapsed()
    );
    // Both tunnels, and any a probe above opened just before the listener closed, were
    // told to go and logged so.
    let lines = edge.wait_access(2, |l| l.contains("close_reason"));
    let tunnels: Vec<&String> = lines
        .iter()
        .filter(|l| field(l, "kind") == Some("tunnel"))
        .collect();
    assert!(tunnels.len() >= 2, "{lines:?}");
    assert!(
        tunnels
            .iter()
            .all(|l| field(l, "close_reason") == Some("shutdown")
                && l.contains("\"close_code\":1001")),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_refuses_no_connection_and_keeps_old_tunnels() {
    let origin = Origin::start(Mode::Echo).await;
    let dir = scratch_dir("upgrade");
    let sock = dir.join("upgrade.sock");
    let pingora = format!(
        "pingora: {{ upgrade_sock: \"{}\", pid_file: \"{}\", grace_period_seconds: 4, graceful_shutdown_timeout_seconds: 1 }}",
        sock.display(),
        dir.join("wsedge.pid").display()
    );
    let mut old = Edge::start(&config(origin.addr, 0, true, &pingora));
    let path = old.dir.join("wsedge.yaml");
    let mut before = open_tunnels(&old, 10).await;
    exchange(&mut before, "before").await;

    // Clients keep making handshakes through the whole upgrade.
    let addr = old.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let clients = tokio::spawn(async move {
        let (mut ok, mut failures) = (0usize, Vec::new());
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && ok + failures.len() < 100_000 {
            let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
            req.headers_mut()
                .insert("Host", "localhost".parse().unwrap());
            let one = async {
                let (mut ws, _) = tokio_tungstenite::connect_async(req)
                    .await
                    .map_err(|e| e.to_string())?;
                ws.send(Message::text("during"))
                    .await
                    .map_err(|e| e.to_string())?;
                ws.next()
                    .await
                    .ok_or("no echo")?
                    .map_err(|e| e.to_string())?;
                ws.close(None).await.map_err(|e| e.to_string())
            };
            match tokio::time::timeout(STEP, one).await {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push("timed out".into()),
            }
        }
        (ok, failures)
    });

    // The new process waits for the old one's sockets on upgrade_sock.
    let new_path = path.clone();
    let new_dir = scratch_dir("upgrade-new");
    let new = tokio::task::spawn_blocking(move || Edge::start_file(&new_path, new_dir, &["-u"]));
    let deadline = Instant::now() + STEP;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never listened on {}",
            sock.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No event says the new process is ready for the sockets once its upgrade socket
    // exists (it listens, then waits in accept): a moment's head start, a race guard.
    tokio::time::sleep(Duration::from_millis(200)).await;
    old.signal("QUIT");
    let new = within("the new process takes over", new).await.unwrap();
    assert_eq!(new.addr, old.addr, "same listening socket");

    // Old tunnels keep working while the old process hands over and drains.
    for round in 0..6 {
        exchange(&mut before, &format!("draining{round}")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for ws in &mut before {
        within("close an old tunnel", ws.close(None)).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failures) = within("client loop", clients).await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} handshakes failed during the upgrade, first: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(ok > 20, "the loop made only {ok} handshakes");
    assert!(
        old.wait_exit(Duration::from_secs(15)),
        "the old process did not exit"
    );
    // The new process serves.
    let (mut ws, _) = within(
        "connect to the new process",
        tokio_tungstenite::connect_async(new.url("/ws")),
    )
    .await
    .unwrap();
    echo_once(&mut ws, Message::text("new")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reload_turning_websocket_off_refuses_new_upgrades_but_open_tunnels_carry_on() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&config(origin.addr, 1, true, ""));
    let path = edge.dir.join("wsedge.yaml");
    let (mut open, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    echo_once(&mut open, Message::text("before")).await;

    let off = config(origin.addr, 1, true, "")
        .replace("idle_timeout: 60s", "idle_timeout: 1s, enabled: false");
    std::fs::write(&path, off).unwrap();
    let (status, body) = edge.admin_request("POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(handshake_status(&edge, "localhost", "/ws").await, 403);
    // The open tunnel keeps its settings: WebSocket on, and a 60 s idle timeout, not 1 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        echo_once(&mut open, Message::text("after")).await,
        Message::text("after")
    );
}

/// A reload reads files (and resolves names): one that blocks (here a FIFO nobody writes,
/// as a stuck network file system would) must not take the admin listener with it.
#[tokio::test]
async fn a_reload_stuck_on_a_file_does_not_stall_the_admin_listener() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&format!(
        "pingora: {{ threads: 1 }}\n{}",
        one_resource(origin.addr, "")
    ));
    let fifo = edge.dir.join("ca.pem");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let file = edge.dir.join("wsedge.yaml");
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "      servers:",
        &format!("      ca_file: \"{}\"\n      servers:", fifo.display()),
    );
    std::fs::write(&file, text).unwrap();
    let (admin, host) = (edge.admin, format!("Host: {}\r\n", edge.admin));
    let stuck = tokio::spawn(async move {
        let req = format!(
            "POST /reload HTTP/1.1\r\n{host}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        tokio::time::timeout(Duration::from_secs(30), raw_request(admin, &req)).await
    });
    // The reload is waiting on the file; the admin listener answers meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = edge.admin_request("GET", "/healthz").await;
    assert_eq!(code, 200, "{body}");
    // The file turns up (not a certificate): the reload ends, refused.
    std::fs::write(&fifo, "not a certificate\n").unwrap();
    let answer = within("the stuck reload ends", stuck)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(&answer), 422, "{answer}");
}

/// With http and https both on 127.0.0.1 port 0, each readiness line names the listener
/// of its scheme (the two bound sockets cannot be told apart afterwards, so they get their
/// ports before binding).
#[tokio::test]
async fn the_readiness_lines_name_port_0_listeners_on_one_ip_by_their_scheme() {
    let pki = Pki::new("ready-labels");
    let cert = pki.issue("site", &["localhost"]);
    let origin = Origin::start(Mode::Status(200)).await;
    for _ in 0..3 {
        let edge = Edge::start(&format!(
            r#"
listen:
  http: ["127.0.0.1:0"]
  https: ["127.0.0.1:0"]
resources:
  - name: site
    hostnames: ["localhost"]
    origin: {{ servers: [{{ address: "{}" }}] }}
    tls: {{ certificate: "{}", private_key: "{}" }}
"#,
            origin.addr,
            cert.cert.display(),
            cert.key.display()
        ));
        let https = edge.https.unwrap();
        assert_ne!(https, edge.addr);
        let plain = raw_request(
            edge.addr,
            "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            status(&plain),
            200,
            "the http line names a plain listener: {plain}"
        );
        let tcp = within("connect", tokio::net::TcpStream::connect(https))
            .await
            .unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = within("tls", pki.connector(&[]).connect(name, tcp)).await;
        assert!(tls.is_ok(), "the https line names a TLS listener: {tls:?}");
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
}
