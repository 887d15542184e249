//! A tiny WebSocket client: connects, sends each argument as a text message, prints the
//! answers, closes.
//!
//! ```text
//! cargo run --example ws_client -- ws://127.0.0.1:8080/ws hello world
//! ```

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".to_string());
    let messages: Vec<String> = args.collect();
    let messages = if messages.is_empty() {
        vec!["hello through the edge".to_string()]
    } else {
        messages
    };
    let step = Duration::from_secs(10);
    let (mut ws, resp) =
        tokio::time::timeout(step, tokio_tungstenite::connect_async(url.as_str())).await??;
    println!("connected to {url}: {}", resp.status());
    for m in messages {
        tokio::time::timeout(step, ws.send(Message::text(m.clone()))).await??;
        match tokio::time::timeout(step, ws.next()).await? {
            Some(Ok(answer)) => println!("sent {m:?}, got {answer}"),
            other => return Err(format!("no echo for {m:?}: {other:?}").into()),
        }
    }
    tokio::time::timeout(step, ws.close(None)).await??;
    Ok(())
}
