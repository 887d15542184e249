//! Origin groups: weights, backups, health checks, passive failover, sticky balancing, and
//! open tunnels surviving their origin turning unhealthy.

use crate::common::*;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn group(servers: &str, extra: &str) -> String {
    format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: group
    hostnames: ["127.0.0.1"]
    origin:
      servers: [{servers}]{extra}
"#
    )
}

/// `n` handshakes, each with one echo; returns how many failed.
async fn handshakes(edge: &Edge, n: usize) -> usize {
    let mut failed = 0;
    for _ in 0..n {
        let ok = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(edge.url("/ws"))
                .await
                .ok()?;
            use futures_util::{SinkExt, StreamExt};
            ws.send(Message::text("x")).await.ok()?;
            ws.next().await?.ok()?;
            let _ = ws.close(None).await;
            Some(())
        };
        if within("handshake", ok).await.is_none() {
            failed += 1;
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_honoured_over_3000_handshakes() {
    let (a, b, c) = (
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
    );
    let servers = format!(
        r#"{{ address: "{}", weight: 1 }}, {{ address: "{}", weight: 2 }}, {{ address: "{}", weight: 3 }}"#,
        a.addr, b.addr, c.addr
    );
    let edge = Edge::start(&group(&servers, ""));
    assert_eq!(handshakes(&edge, 3000).await, 0);
    for (origin, want) in [(&a, 500.0), (&b, 1000.0), (&c, 1500.0)] {
        let got = origin.upgrades() as f64;
        assert!(
            (got - want).abs() <= want * 0.05,
            "{} got {got}, want {want} ± 5 %",
            origin.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_move_traffic_to_healthy_primaries_then_backups_and_back() {
    let (mut a, mut b, backup) = (
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
    );
    let servers = format!(
        r#"{{ address: "{}" }}, {{ address: "{}" }}, {{ address: "{}", backup: true }}"#,
        a.addr, b.addr, backup.addr
    );
    let hc = "\n      health_check: { path: /healthz, interval: 300ms, healthy_after: 1, unhealthy_after: 1 }";
    let edge = Edge::start(&group(&servers, hc));
    assert_eq!(handshakes(&edge, 20).await, 0);
    assert_eq!(
        backup.upgrades(),
        0,
        "the backup serves nothing while primaries are up"
    );

    // One primary stops: once a health check has seen it (the transition is logged),
    // nothing fails and it gets nothing.
    a.stop();
    let down = |o: &Origin| format!("origin {} is down", o.addr);
    let log = edge.wait_log(&[&down(&a)]);
    assert!(log.contains(&down(&a)), "the transition is logged:\n{log}");
    let a_before = a.upgrades();
    assert_eq!(handshakes(&edge, 50).await, 0);
    assert_eq!(a.upgrades(), a_before);

    // Every primary down: the backup serves.
    b.stop();
    let log = edge.wait_log(&[&down(&b)]);
    assert!(log.contains(&down(&b)), "{log}");
    assert_eq!(handshakes(&edge, 30).await, 0);
    assert_eq!(backup.upgrades(), 30);

    // Primaries back: once both are seen up, traffic returns to them.
    a.restart().await;
    b.restart().await;
    let up = |o: &Origin| format!("origin {} is up", o.addr);
    let log = edge.wait_log(&[&up(&a), &up(&b)]);
    assert!(log.contains(&up(&a)) && log.contains(&up(&b)), "{log}");
    assert_eq!(handshakes(&edge, 30).await, 0);
    assert_eq!(backup.upgrades(), 30, "the backup is idle again");
}

#[tokio::test]
async fn client_ip_stays_on_its_origin_when_another_goes_down() {
    let origins = [
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
    ];
    let servers = origins
        .iter()
        .map(|o| format!(r#"{{ address: "{}" }}"#, o.addr))
        .collect::<Vec<_>>()
        .join(", ");
    let edge = Edge::start(&group(&servers, "\n      balance: client_ip"));
    assert_eq!(handshakes(&edge, 100).await, 0);
    let counts: Vec<usize> = origins.iter().map(Origin::upgrades).collect();
    let chosen = counts
        .iter()
        .position(|&n| n == 100)
        .unwrap_or_else(|| panic!("spread over several: {counts:?}"));
    // Stop another origin: this client does not move.
    let mut origins = origins;
    origins[(chosen + 1) % 3].stop();
    assert_eq!(handshakes(&edge, 100).await, 0);
    assert_eq!(origins[chosen].upgrades(), 200);
}

#[tokio::test]
async fn a_refusing_server_is_skipped_without_health_checks() {
    let good = Origin::start(Mode::Echo).await;
    // A port bound and closed again: it refuses at once.
    let servers = format!(
        r#"{{ address: "{}" }}, {{ address: "{}" }}"#,
        closed_port("127.0.0.2"),
        good.addr
    );
    let edge = Edge::start(&group(&servers, ""));
    let start = Instant::now();
    assert_eq!(handshakes(&edge, 100).await, 0);
    assert_eq!(good.upgrades(), 100);
    println!(
        "100 handshakes with one refusing server took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_survive_their_origin_turning_unhealthy() {
    let (a, b) = (
        Origin::start(Mode::Echo).await,
        Origin::start(Mode::Echo).await,
    );
    let servers = format!(
        r#"{{ address: "{}" }}, {{ address: "{}" }}"#,
        a.addr, b.addr
    );
    let hc = "\n      health_check: { path: /healthz, interval: 200ms, healthy_after: 1, unhealthy_after: 1 }";
    let edge = Edge::start(&group(&servers, hc));
    // Open tunnels on both, then A reports unhealthy.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
                .await
                .unwrap()
                .0,
        );
    }
    assert!(a.upgrades() >= 1 && b.upgrades() >= 1);
    a.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let _ = edge.wait_log(&[&format!("origin {} is down", a.addr)]);
    // Time is the subject here: the open tunnels outlive the transition by a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for ws in &mut open {
        assert_eq!(
            echo_once(ws, Message::text("still here")).await,
            Message::text("still here")
        );
    }
    let a_before = a.upgrades();
    assert_eq!(handshakes(&edge, 10).await, 0);
    assert_eq!(
        a.upgrades(),
        a_before,
        "new tunnels avoid the unhealthy origin"
    );
}
