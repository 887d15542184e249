//! No tunnel dies after its 101 (cloudflare/pingora#946): 10,000 fresh tunnels, 32 at a
//! time, each sending and receiving one message right after its 101, with zero failures.
//! The origin answers the upgrade at once, the order that made Pingora 0.9.1's relay tear
//! tunnels down; wsedge relays the upgraded connection itself, so no order can.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const TUNNELS: usize = 10_000;
const CONCURRENCY: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_fresh_tunnels_each_carry_a_message_with_zero_failures() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(
        &one_resource(origin.addr, "").replace("listen:", "pingora: { threads: 2 }\nlisten:"),
    );
    let url = edge.url("/ws");
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (url, next) = (url.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= TUNNELS {
                    return failures;
                }
                let one = async {
                    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    let msg = format!("tunnel {i}");
                    ws.send(Message::text(msg.clone()))
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str() == msg => {}
                        other => return Err(format!("echo: {other:?}")),
                    }
                    ws.close(None).await.map_err(|e| format!("close: {e}"))?;
                    Ok::<(), String>(())
                };
                match tokio::time::timeout(Duration::from_secs(10), one).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failures.push(format!("#{i}: {e}")),
                    Err(_) => failures.push(format!("#{i}: timed out")),
                }
            }
        }));
    }
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(
            tokio::time::timeout(Duration::from_secs(600), w)
                .await
                .expect("load run bounded")
                .unwrap(),
        );
    }
    assert_eq!(next.load(Ordering::Relaxed).min(TUNNELS), TUNNELS);
    assert!(
        failures.is_empty(),
        "{} of {TUNNELS} tunnels failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(origin.count(), TUNNELS, "one origin connection per tunnel");
}
