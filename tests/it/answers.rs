//! Every answer the edge gives by itself (the answers table of README.md and docs/design.md): status,
//! headers, and that the origin saw no connection for a rejected request.

use crate::common::*;
use std::time::Duration;

fn two_resources(origin: std::net::SocketAddr) -> String {
    format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: site
    hostnames: ["localhost"]
    origin: {{ servers: [{{ address: "{origin}" }}] }}
    websocket: {{ paths: ["/ws", "/live/"], handshake_timeout: 1s }}
  - name: files
    hostnames: ["static.localhost"]
    type: static_only
    origin: {{ servers: [{{ address: "{origin}" }}] }}
  - name: off
    hostnames: ["off.localhost"]
    origin: {{ servers: [{{ address: "{origin}" }}] }}
    websocket: {{ enabled: false }}
  - name: files-ws
    hostnames: ["files-ws.localhost"]
    type: static_only
    origin: {{ servers: [{{ address: "{origin}" }}] }}
    websocket: {{ enabled: true }}
"#
    )
}

async fn assert_rejected(origin: &Origin, edge: &Edge, req: String, want: u16) -> String {
    let answer = raw_request(edge.addr, &req).await;
    assert_eq!(status(&answer), want, "request:\n{req}\nanswer:\n{answer}");
    assert_eq!(
        origin.count(),
        0,
        "the origin must see no connection for:\n{req}"
    );
    answer
}

#[tokio::test]
async fn unknown_host_is_404_without_contacting_anything() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&two_resources(origin.addr));
    let ws = upgrade_request("/ws", "").replace("Host: localhost", "Host: evil.example");
    let a = assert_rejected(&origin, &edge, ws, 404).await;
    assert_eq!(header(&a, "connection"), Some("close"));
    let plain = "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".to_string();
    assert_rejected(&origin, &edge, plain, 404).await;
    let no_host = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_string();
    let a = raw_request(edge.addr, &no_host).await;
    assert!(matches!(status(&a), 400 | 404), "{a}");
    assert_eq!(origin.count(), 0);
}

#[tokio::test]
async fn websocket_off_or_path_not_allowed_is_403_with_connection_close() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&two_resources(origin.addr));
    for (host, path) in [
        ("static.localhost", "/ws"), // static_only: off by default
        ("off.localhost", "/ws"),    // explicitly off
        ("localhost", "/chat"),      // not in paths
        ("localhost", "/wsx"),       // prefix must end at a segment
        ("localhost", "/live"),      // "/live/" needs the slash
    ] {
        let req = upgrade_request(path, "").replace("Host: localhost", &format!("Host: {host}"));
        let a = assert_rejected(&origin, &edge, req, 403).await;
        assert_eq!(header(&a, "connection"), Some("close"), "{a}");
        assert!(a.contains("\r\n\r\nWebSocket is not"), "{a}");
    }
}

#[tokio::test]
async fn malformed_handshakes_are_400() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&two_resources(origin.addr));
    let good = upgrade_request("/ws", "");
    let cases = [
        good.replacen("GET", "POST", 1),
        good.replace("Connection: Upgrade", "Connection: keep-alive"),
        good.replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\n"),
        good.replace("dGhlIHNhbXBsZSBub25jZQ==", "tooshort"),
        good.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ=!"),
        good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
        good.replace("Sec-WebSocket-Version: 13\r\n", ""),
        good.replace("HTTP/1.1", "HTTP/1.0"),
        upgrade_request("/ws", "Content-Length: 5\r\n") + "hello",
    ];
    for req in cases {
        assert_rejected(&origin, &edge, req, 400).await;
    }
}

#[tokio::test]
async fn other_version_is_426_with_version_13_and_upgrade_websocket() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&two_resources(origin.addr));
    let req = upgrade_request("/ws", "").replace("Version: 13", "Version: 8");
    let a = assert_rejected(&origin, &edge, req, 426).await;
    assert_eq!(header(&a, "sec-websocket-version"), Some("13"));
    assert_eq!(header(&a, "upgrade"), Some("websocket"));
}

#[tokio::test]
async fn allowed_upgrades_on_allowed_paths_reach_the_origin() {
    let origin = Origin::start(Mode::Echo).await;
    let edge = Edge::start(&two_resources(origin.addr));
    for (host, path) in [
        ("localhost", "/ws"),
        ("localhost", "/ws/room?x=1"),
        ("localhost", "/live/1"),
        ("files-ws.localhost", "/any"),
    ] {
        let url = format!("ws://{}{}", edge.addr, path);
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        req.headers_mut().insert("Host", host.parse().unwrap());
        let (_ws, resp) = within("connect", tokio_tungstenite::connect_async(req))
            .await
            .unwrap();
        assert_eq!(resp.status(), 101, "{host}{path}");
    }
    assert_eq!(origin.count(), 4);
}

#[tokio::test]
async fn unreachable_origin_is_502_after_trying_every_server_quickly() {
    // Ports bound and closed again: they refuse at once.
    let (a, b) = (closed_port("127.0.0.2"), closed_port("127.0.0.3"));
    let yaml = format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: down
    hostnames: ["localhost"]
    origin: {{ servers: [{{ address: "{a}" }}, {{ address: "{b}" }}] }}
"#
    );
    let edge = Edge::start(&yaml);
    let (answer, took) = timed_raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&answer), 502, "{answer}");
    assert!(
        !answer.to_lowercase().contains("error"),
        "no internal error text in the body: {answer}"
    );
    assert!(took < Duration::from_secs(5));
    let log = edge.wait_log(&[&a.to_string(), &b.to_string()]);
    assert!(
        log.contains(&a.to_string()) && log.contains(&b.to_string()),
        "both servers tried:\n{log}"
    );

    // Plain HTTP too.
    let plain = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&raw_request(edge.addr, plain).await), 502);
}

#[tokio::test]
async fn second_server_serves_when_the_first_refuses() {
    let dead = closed_port("127.0.0.2");
    let origin = Origin::start(Mode::Echo).await;
    let yaml = format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: half
    hostnames: ["localhost", "127.0.0.1"]
    origin: {{ servers: [{{ address: "{dead}" }}, {{ address: "{}" }}] }}
"#,
        origin.addr
    );
    let edge = Edge::start(&yaml);
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    echo_once(&mut ws, tokio_tungstenite::tungstenite::Message::text("x")).await;
}

#[tokio::test]
async fn silent_origin_is_504_after_handshake_timeout() {
    let origin = Origin::start(Mode::Silent).await;
    let edge = Edge::start(&two_resources(origin.addr));
    let (answer, took) = timed_raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&answer), 504, "{answer}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn origin_non_101_answer_reaches_the_client_unchanged() {
    let origin = Origin::start(Mode::Status(403)).await;
    let edge = Edge::start(&two_resources(origin.addr));
    let answer = raw_request(edge.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&answer), 403, "{answer}");
    assert_eq!(header(&answer, "x-origin"), Some("yes"));
    assert!(answer.ends_with("\r\n\r\norigin says 403\n"), "{answer}");
    assert_eq!(origin.count(), 1);
}
