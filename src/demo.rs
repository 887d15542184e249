//! A small origin for trying wsedge: a WebSocket echo on every path, and on plain `GET /`
//! a page that opens a WebSocket back through the edge so a person can try it in a
//! browser: it reconnects with jittered backoff when its socket closes, prints each close
//! code and reason, and shows the edge's counters for its resource (`GET /__wsedge/stats`,
//! answered from the edge's own counters, since the demo origin runs in its process).

use crate::observe::metrics::ResourceStats;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wsedge demo</title>
<style>body{font:16px system-ui;margin:2em;max-width:46em}#log{white-space:pre-wrap;border:1px solid #ccc;padding:.5em;min-height:8em;max-height:24em;overflow:auto}
#edge{border:1px solid #ccc;padding:.5em;margin:1em 0}#edge td{padding:0 1em 0 0}</style>
</head><body>
<h1>wsedge demo</h1>
<p>This page came from the demo origin through the edge. The box below shows a WebSocket
opened to <code id="url"></code>, through the edge, to the origin's echo. When it closes
(a drain with <code>curl -X POST http://127.0.0.1:9090/drain</code>, a reload turning
WebSocket off, the origin stopped), the page prints the close code and reason and
reconnects with jittered backoff.</p>
<form id="f"><input id="msg" value="hello through the edge" size="40"> <button>Send</button></form>
<div id="edge"><b>The edge, for this resource</b> (refreshed every second)
<table><tr><td>tunnels open</td><td id="open">?</td></tr>
<tr><td>messages client → origin</td><td id="c2o">?</td></tr>
<tr><td>messages origin → client</td><td id="o2c">?</td></tr>
<tr><td>closes by reason</td><td id="closed">?</td></tr></table></div>
<div id="log"></div>
<script>
const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
document.getElementById("url").textContent = url;
const box = document.getElementById("log");
const log = (t) => { box.textContent += new Date().toLocaleTimeString() + "  " + t + "\n"; box.scrollTop = box.scrollHeight; };
const meaning = {1000: "normal", 1001: "going away", 1006: "no Close frame: the connection dropped",
  1008: "policy", 1009: "message too big", 1011: "server error", 1012: "service restart",
  1013: "try again later", 1014: "bad gateway: the origin failed"};
let ws = null, failures = 0;
function connect() {
  ws = new WebSocket(url);
  ws.onopen = () => { failures = 0; log("open"); ws.send("hello from the page"); };
  ws.onmessage = (e) => log("echo: " + e.data);
  ws.onclose = (e) => {
    // Full jitter: a random wait up to 0.5 s × 2^failures, at most 30 s, so that many
    // pages closed together do not come back together.
    const wait = Math.random() * Math.min(30000, 500 * 2 ** failures++);
    log("closed: " + e.code + " " + (e.reason || "(no reason)") + " — " + (meaning[e.code] || "") +
        "; reconnecting in " + (wait / 1000).toFixed(1) + " s");
    setTimeout(connect, wait);
  };
}
connect();
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(document.getElementById("msg").value);
  else log("not connected: waiting to reconnect");
};
async function refresh() {
  try {
    const s = await (await fetch("/__wsedge/stats", {cache: "no-store"})).json();
    document.getElementById("open").textContent = s.tunnels_open;
    document.getElementById("c2o").textContent = s.messages_client_to_origin;
    document.getElementById("o2c").textContent = s.messages_origin_to_client;
    document.getElementById("closed").textContent =
      Object.entries(s.closed).map(([k, v]) => k + ": " + v).join(", ") || "none yet";
  } catch (e) { document.getElementById("open").textContent = "(the edge did not answer)"; }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;

/// The counters the page's panel shows: the demo resource's, set once the edge is built
/// (the demo origin runs in the edge's process).
static STATS: OnceLock<Arc<ResourceStats>> = OnceLock::new();

/// Lets the page show `stats` (the counters of the resource the demo origin serves).
pub fn show_stats(stats: Arc<ResourceStats>) {
    let _ = STATS.set(stats);
}

/// Serves the demo origin on `listener` until the process ends.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = handle(stream).await {
                log::debug!("demo origin: {e}");
            }
        });
    }
}

/// Binds the demo origin on `addr` (port 0 picks one) and serves it on a thread of its
/// own; returns the bound address.
pub fn spawn(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("demo-origin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime for the demo origin");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                serve(listener).await
            })
        })?;
    Ok(bound)
}

async fn handle(stream: TcpStream) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Look at the request head without consuming it, to hand upgrades to tungstenite.
    let mut head = [0u8; 4096];
    let n = stream.peek(&mut head).await?;
    let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    if text.contains("upgrade: websocket") {
        let mut ws = tokio_tungstenite::accept_async(stream).await?;
        while let Some(msg) = ws.next().await {
            let msg = msg?;
            if msg.is_text() || msg.is_binary() {
                ws.send(msg).await?;
            }
        }
        return Ok(());
    }
    let mut stream = stream;
    let mut buf = vec![0u8; 8192];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") && got < buf.len() {
        let n = stream.read(&mut buf[got..]).await?;
        if n == 0 {
            return Ok(());
        }
        got += n;
    }
    let (kind, body) = if text.starts_with("get /__wsedge/stats ") {
        let stats = STATS
            .get()
            .map_or_else(|| "{}".to_string(), |s| s.summary_json());
        ("application/json", stats)
    } else {
        ("text/html; charset=utf-8", PAGE.to_string())
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
