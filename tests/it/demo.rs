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

    // The page's live panel: the edge's own counters for the demo resource, and after a
    // drain the page's socket gets its Close (the page prints it and reconnects).
    let stats = |edge: &Edge| {
        let addr = edge.addr;
        async move {
            raw_request(
                addr,
                "GET /__wsedge/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
        }
    };
    let panel = stats(&edge).await;
    assert!(panel.starts_with("HTTP/1.1 200"), "{panel}");
    assert!(panel.contains("\"resource\":\"demo\""), "{panel}");
    assert!(panel.contains("\"tunnels_open\":1"), "{panel}");
    assert!(panel.contains("\"messages_client_to_origin\":1"), "{panel}");
    assert!(
        page.contains("reconnecting in"),
        "the page reconnects: {page}"
    );
    assert_eq!(edge.admin_request("POST", "/drain").await.0, 202);
    let close = within("the drain's Close", async {
        use futures_util::StreamExt;
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert_eq!(close, Some(1001));
    let _ = within("closing handshake", futures_util::StreamExt::next(&mut ws)).await;
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let panel = stats(&edge).await;
        if panel.contains("\"closed\":{\"shutdown\":1}") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{panel}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(edge.admin_request("POST", "/drain/cancel").await.0, 200);

    // The static-only resource of the demo refuses upgrades.
    let req = upgrade_request("/ws", "").replace("Host: localhost", "Host: static.localhost");
    assert!(raw_request(edge.addr, &req)
        .await
        .starts_with("HTTP/1.1 403"));
}
