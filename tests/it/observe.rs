//! What operators see, checked against known traffic: /metrics, /stats and the access log
//! agree with each other and with the exact bytes the clients saw, and each close reason
//! comes from its real cause.

use crate::common::*;
use futures_util::StreamExt;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const TUNNELS: usize = 5;
const MESSAGES: usize = 4;
const SIZE: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stats_and_access_log_match_known_traffic_and_real_close_causes() {
    let origin = Origin::start(Mode::Echo).await;
    let yaml = format!(
        r#"
listen: {{ http: ["127.0.0.1:0"] }}
resources:
  - name: obs
    hostnames: ["127.0.0.1", "localhost"]
    origin: {{ servers: [{{ address: "{}" }}] }}
    websocket: {{ idle_timeout: 2s, paths: ["/ws", "/close-me", "/quiet", "/drop"] }}
"#,
        origin.addr
    );
    let edge = Edge::start(&yaml);
    let (mut c2o, mut o2c) = (0usize, 0usize);

    // N tunnels, M messages of SIZE bytes each way, closed by the client with 4000.
    for t in 0..TUNNELS {
        let stream = Counted::connect(edge.addr).await;
        let (read, written) = (stream.read.clone(), stream.written.clone());
        let (mut ws, _) = within(
            "handshake",
            tokio_tungstenite::client_async(edge.url("/ws"), stream),
        )
        .await
        .unwrap();
        let (r0, w0) = (read.load(Ordering::SeqCst), written.load(Ordering::SeqCst));
        for m in 0..MESSAGES {
            let text = format!("{t}-{m}-").repeat(SIZE)[..SIZE].to_string();
            assert_eq!(
                echo_once(&mut ws, Message::text(text.clone())).await,
                Message::text(text)
            );
        }
        within(
            "close",
            ws.close(Some(CloseFrame {
                code: 4000.into(),
                reason: "bye".into(),
            })),
        )
        .await
        .unwrap();
        while let Some(Ok(_)) = within("close answer", ws.next()).await {}
        c2o += written.load(Ordering::SeqCst) - w0;
        o2c += read.load(Ordering::SeqCst) - r0;
    }
    // Closed by the origin (it sends Close 4002 first).
    let stream = Counted::connect(edge.addr).await;
    let (read, written) = (stream.read.clone(), stream.written.clone());
    let (mut ws, _) = within(
        "handshake",
        tokio_tungstenite::client_async(edge.url("/close-me"), stream),
    )
    .await
    .unwrap();
    let (r0, w0) = (read.load(Ordering::SeqCst), written.load(Ordering::SeqCst));
    while let Some(Ok(_)) = within("origin close", ws.next()).await {}
    c2o += written.load(Ordering::SeqCst) - w0;
    o2c += read.load(Ordering::SeqCst) - r0;
    // Idle: nothing for longer than the 2 s idle timeout.
    let (mut quiet, _) = within(
        "handshake",
        tokio_tungstenite::connect_async(edge.url("/quiet")),
    )
    .await
    .unwrap();
    // Error: the client resets the connection.
    let (drop, _) = within(
        "handshake",
        tokio_tungstenite::connect_async(edge.url("/drop")),
    )
    .await
    .unwrap();
    if let tokio_tungstenite::MaybeTlsStream::Plain(s) = drop.get_ref() {
        // A zero linger does not block: close sends RST at once, which is the point.
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
    }
    std::mem::drop(drop);
    within("idle close", async {
        while let Some(Ok(_)) = quiet.next().await {}
    })
    .await;

    // Rejected handshakes: 2 paths not allowed, 3 bad versions, 1 unknown host.
    for _ in 0..2 {
        raw_request(edge.addr, &upgrade_request("/nope", "")).await;
    }
    for _ in 0..3 {
        raw_request(
            edge.addr,
            &upgrade_request("/ws", "").replace("Version: 13", "Version: 8"),
        )
        .await;
    }
    raw_request(
        edge.addr,
        &upgrade_request("/ws", "").replace("Host: localhost", "Host: nobody.example"),
    )
    .await;

    assert!(
        c2o > TUNNELS * MESSAGES * SIZE && o2c > TUNNELS * MESSAGES * SIZE,
        "{c2o} {o2c}"
    );
    let tunnels = TUNNELS + 3; // + origin-closed, idle, dropped
    let lines = edge.wait_access(tunnels, |l| l.contains("\"kind\":\"tunnel\""));
    let tunnel_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"kind\":\"tunnel\""))
        .collect();
    assert_eq!(tunnel_lines.len(), tunnels, "{lines:#?}");
    let reason_of = |path: &str| -> Vec<(String, String)> {
        tunnel_lines
            .iter()
            .filter(|l| field(l, "path") == Some(path))
            .map(|l| {
                (
                    field(l, "close_reason").unwrap().to_string(),
                    field(l, "close_code").unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        reason_of("/ws"),
        vec![("client_closed".to_string(), "4000".to_string()); TUNNELS]
    );
    assert_eq!(
        reason_of("/close-me"),
        vec![("origin_closed".to_string(), "4002".to_string())]
    );
    // The edge ended these two and said so first: its code is the tunnel's (1001 to both
    // sides at the idle timeout; 1001 to the origin when the client vanished).
    assert_eq!(
        reason_of("/quiet"),
        vec![("idle_timeout".to_string(), "1001".to_string())]
    );
    assert_eq!(
        reason_of("/drop"),
        vec![("error".to_string(), "1001".to_string())]
    );
    for l in tunnel_lines
        .iter()
        .filter(|l| field(l, "path") == Some("/ws"))
    {
        assert_eq!(
            field(l, "messages_client_to_origin"),
            Some(MESSAGES.to_string().as_str()),
            "{l}"
        );
        assert_eq!(
            field(l, "messages_origin_to_client"),
            Some(MESSAGES.to_string().as_str()),
            "{l}"
        );
        assert_eq!(field(l, "status"), Some("101"));
        assert_eq!(field(l, "resource"), Some("obs"));
    }
    let sum = |key: &str| -> usize {
        tunnel_lines
            .iter()
            .map(|l| field(l, key).unwrap().parse::<usize>().unwrap())
            .sum()
    };
    assert_eq!(
        sum("bytes_client_to_origin"),
        c2o,
        "access log vs what the clients wrote"
    );
    assert_eq!(
        sum("bytes_origin_to_client"),
        o2c,
        "access log vs what the clients read"
    );

    let m = edge.admin_request("GET", "/metrics").await.1;
    let val = |series: &str| metric(&m, series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(
        val(r#"wsedge_ws_bytes_total{direction="client_to_origin",resource="obs"}"#) as usize,
        c2o
    );
    assert_eq!(
        val(r#"wsedge_ws_bytes_total{direction="origin_to_client",resource="obs"}"#) as usize,
        o2c
    );
    assert_eq!(
        val(r#"wsedge_ws_messages_total{direction="client_to_origin",resource="obs"}"#) as usize,
        TUNNELS * MESSAGES
    );
    assert_eq!(
        val(r#"wsedge_ws_messages_total{direction="origin_to_client",resource="obs"}"#) as usize,
        TUNNELS * MESSAGES
    );
    assert_eq!(
        val(r#"wsedge_ws_handshakes_total{outcome="ok",resource="obs"}"#) as usize,
        tunnels
    );
    assert_eq!(
        val(r#"wsedge_ws_handshakes_total{outcome="path_not_allowed",resource="obs"}"#),
        2.0
    );
    assert_eq!(
        val(r#"wsedge_ws_handshakes_total{outcome="bad_version",resource="obs"}"#),
        3.0
    );
    assert_eq!(
        val(r#"wsedge_ws_handshakes_total{outcome="unknown_host",resource=""}"#),
        1.0
    );
    assert_eq!(
        val(r#"wsedge_ws_closed_total{reason="client_closed",resource="obs"}"#) as usize,
        TUNNELS
    );
    assert_eq!(
        val(r#"wsedge_ws_closed_total{reason="origin_closed",resource="obs"}"#),
        1.0
    );
    assert_eq!(
        val(r#"wsedge_ws_closed_total{reason="idle_timeout",resource="obs"}"#),
        1.0
    );
    assert_eq!(
        val(r#"wsedge_ws_closed_total{reason="error",resource="obs"}"#),
        1.0
    );
    assert_eq!(val(r#"wsedge_ws_tunnels_open{resource="obs"}"#), 0.0);
    assert_eq!(
        val(r#"wsedge_ws_tunnel_seconds_count{resource="obs"}"#) as usize,
        tunnels
    );
    assert_eq!(
        val(r#"wsedge_http_responses_total{code="101",resource="obs"}"#) as usize,
        tunnels
    );
    assert_eq!(
        val(r#"wsedge_http_responses_total{code="403",resource="obs"}"#),
        2.0
    );
    assert_eq!(
        val(r#"wsedge_http_responses_total{code="426",resource="obs"}"#),
        3.0
    );

    // /stats folds the same counters in once a second: ask until the ticker has.
    let total = |stats: &str, key: &str| -> usize {
        stats
            .split(&format!("\"{key}\":"))
            .skip(1)
            .map(|v| {
                v.split([',', '}'])
                    .next()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            })
            .sum()
    };
    let deadline = std::time::Instant::now() + STEP;
    let stats = loop {
        let (status, stats) = edge
            .admin_request("GET", "/stats?resource=obs&granularity=5m")
            .await;
        assert_eq!(status, 200, "{stats}");
        let folded = [
            ("bytes_client_to_origin", c2o),
            ("bytes_origin_to_client", o2c),
            ("tunnels_opened", tunnels),
            ("403", 2),
            ("426", 3),
        ]
        .iter()
        .all(|(key, want)| total(&stats, key) == *want);
        if folded || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let total = |key: &str| total(&stats, key);
    assert_eq!(total("bytes_client_to_origin"), c2o, "{stats}");
    assert_eq!(total("bytes_origin_to_client"), o2c, "{stats}");
    assert_eq!(total("tunnels_opened"), tunnels, "{stats}");
    assert_eq!(total("101"), tunnels, "{stats}");
    assert_eq!(total("403"), 2, "{stats}");
    assert_eq!(total("426"), 3, "{stats}");
    let (_, day) = edge
        .admin_request(
            "GET",
            "/stats?resource=obs&granularity=1d&from=2026-01-01T00:00:00Z&to=2100-01-01T00:00:00Z",
        )
        .await;
    assert!(day.contains("\"granularity\":\"1d\""), "{day}");

    // Bad parameters get 400 with what is allowed.
    for bad in [
        "/stats?resource=obs&granularity=2m",
        "/stats?granularity=1h",
        "/stats?resource=obs&granularity=1h&from=yesterday",
        "/stats?resource=obs&granularity=1h&bogus=1",
    ] {
        let (status, body) = edge.admin_request("GET", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("granularity=5m|1h|1d"), "{bad}: {body}");
    }
    assert_eq!(
        edge.admin_request("GET", "/stats?resource=nope&granularity=1h")
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn plain_requests_get_an_access_line_and_a_status_count() {
    let edge = Edge::start_with_args(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml"))
            .unwrap()
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:9001", "127.0.0.1:0")
            .replace("127.0.0.1:9090", "127.0.0.2:0"),
        &["--demo"],
    );
    let page = raw_request(
        edge.addr,
        "GET /?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"));
    let lines = edge.wait_access(1, |l| l.contains("\"kind\":\"http\""));
    let line = lines
        .iter()
        .find(|l| l.contains("\"kind\":\"http\""))
        .unwrap();
    assert_eq!(field(line, "path"), Some("/?x=1"));
    assert_eq!(field(line, "status"), Some("200"));
    assert_eq!(field(line, "method"), Some("GET"));
    assert_eq!(field(line, "resource"), Some("demo"));
    let body_len = page.split_once("\r\n\r\n").unwrap().1.len();
    assert_eq!(
        field(line, "bytes_origin_to_client"),
        Some(body_len.to_string().as_str())
    );
    let m = edge.admin_request("GET", "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            r#"wsedge_http_responses_total{code="200",resource="demo"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn access_log_to_a_file_and_metrics_off_still_account_bytes_at_close() {
    let origin = Origin::start(Mode::Echo).await;
    let dir = scratch_dir("accesslog");
    let log = dir.join("access.log");
    let yaml = one_resource(origin.addr, "").replace(
        "listen:",
        &format!("metrics: false\naccess_log: \"{}\"\nlisten:", log.display()),
    );
    let edge = Edge::start(&yaml);
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(edge.url("/ws")))
        .await
        .unwrap();
    echo_once(&mut ws, Message::binary(vec![7u8; 1000])).await;
    within("close", ws.close(None)).await.unwrap();
    while let Some(Ok(_)) = within("close answer", ws.next()).await {}
    let deadline = std::time::Instant::now() + STEP;
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("\"kind\":\"tunnel\"")) {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tunnel line in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        edge.access_lines().is_empty(),
        "nothing on stdout when logging to a file"
    );
    let c2o: usize = field(&line, "bytes_client_to_origin")
        .unwrap()
        .parse()
        .unwrap();
    assert!(c2o > 1000, "{line}");
    let m = edge.admin_request("GET", "/metrics").await.1;
    let series = r#"wsedge_ws_bytes_total{direction="client_to_origin",resource="test"}"#;
    assert_eq!(
        metric(&m, series),
        Some(c2o as f64),
        "bytes added at close with metrics off"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
