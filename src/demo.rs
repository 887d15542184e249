//! A small origin for trying wsedge: a WebSocket echo on every path, and on plain `GET /`
//! a page that opens a WebSocket back through the edge so a person can try it in a browser.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wsedge demo</title>
<style>body{font:16px system-ui;margin:2em;max-width:40em}#log{white-space:pre-wrap;border:1px solid #ccc;padding:.5em;min-height:8em}</style>
</head><body>
<h1>wsedge demo</h1>
<p>This page came from the demo origin through the edge. The box below shows a WebSocket
opened to <code id="url"></code>, through the edge, to the origin's echo.</p>
<form id="f"><input id="msg" value="hello through the edge" size="40"> <button>Send</button></form>
<div id="log"></div>
<script>
const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
document.getElementById("url").textContent = url;
const log = (t) => { document.getElementById("log").textContent += t + "\n"; };
const ws = new WebSocket(url);
ws.onopen = () => { log("open"); ws.send("hello from the page"); };
ws.onmessage = (e) => log("echo: " + e.data);
ws.onclose = (e) => log("closed: " + e.code + " " + e.reason);
document.getElementById("f").onsubmit = (e) => { e.preventDefault(); ws.send(document.getElementById("msg").value); };
</script></body></html>
"#;

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
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
        PAGE.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
