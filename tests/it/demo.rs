//! The demo of the README's first command: wsedge with `conf/demo.yaml` and the built-in
//! origin serves the page through the edge, and a WebSocket client gets echoes.

use crate::common::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn demo_serves_the_page_and_echoes_through_the_edge() {
    // The shipped file, with port 0 instead of its fixed ports so tests never collide.
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9001", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.2:0");
    let edge = Edge::start_with_args(&yaml, &["--demo"]);

    let page = raw_request(
        edge.addr,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("new WebSocket(url)"), "{page}");

    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    assert_eq!(
        echo_once(&mut ws, Message::text("hello")).await,
        Message::text("hello")
    );

    // The static-only resource of the demo refuses upgrades.
    let req = upgrade_request("/ws", "").replace("Host: localhost", "Host: static.localhost");
    assert!(raw_request(edge.addr, &req)
        .await
        .starts_with("HTTP/1.1 403"));
}
