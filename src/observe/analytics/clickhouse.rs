//! ClickHouse's HTTP interface (the documented one: a query in the URL or the body, rows
//! in the body, the user in `X-ClickHouse-User`/`X-ClickHouse-Key`), over hyper.

use crate::config::Analytics;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// The largest answer read from ClickHouse.
const MAX_ANSWER: usize = 16 << 20;

/// Why a request to ClickHouse failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection, or it broke.
    Unreachable(String),
    /// No answer within the timeout.
    TimedOut,
    /// ClickHouse answered with an error (its status and first line).
    Refused {
        /// The HTTP status.
        status: u16,
        /// ClickHouse's message, its first line.
        message: String,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(why) => write!(f, "cannot reach ClickHouse: {why}"),
            Failure::TimedOut => f.write_str("ClickHouse did not answer in time"),
            Failure::Refused { status, message } => {
                write!(f, "ClickHouse refused ({status}): {message}")
            }
        }
    }
}

/// Where ClickHouse is and who the edge is to it.
#[derive(Clone)]
pub struct Client {
    authority: String,
    database: String,
    user: Option<(String, String)>,
    timeout: Duration,
}

impl Client {
    /// The client `settings` describe.
    pub fn new(settings: &Analytics) -> Client {
        Client {
            authority: settings.authority.clone(),
            database: settings.database.clone(),
            user: settings
                .user
                .as_ref()
                .map(|(u, p)| (u.clone(), p.0.clone())),
            timeout: settings.timeout,
        }
    }

    /// Runs `query` (its text in the URL) with `body` after it (an insert's rows); the
    /// answer's body.
    pub async fn run(&self, query: &str, body: Bytes) -> Result<Bytes, Failure> {
        match tokio::time::timeout(self.timeout, self.exchange(query, body)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::TimedOut),
        }
    }

    async fn exchange(&self, query: &str, body: Bytes) -> Result<Bytes, Failure> {
        let unreachable = |e: &dyn std::fmt::Display| Failure::Unreachable(e.to_string());
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        let conn = tokio::spawn(conn);
        let uri = format!(
            "http://{}/?database={}&query={}",
            self.authority,
            self.database,
            encode(query)
        );
        let mut req = http::Request::post(uri)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_LENGTH, body.len());
        if let Some((user, key)) = &self.user {
            req = req
                .header("X-ClickHouse-User", user)
                .header("X-ClickHouse-Key", key);
        }
        let req = req.body(Full::new(body)).map_err(|e| unreachable(&e))?;
        let answer = sender.send_request(req).await.map_err(|e| unreachable(&e));
        let result = match answer {
            Err(e) => Err(e),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = Limited::new(resp.into_body(), MAX_ANSWER)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .map_err(|e| Failure::Unreachable(format!("reading its answer: {e}")))?;
                if status == 200 {
                    Ok(body)
                } else {
                    let text = String::from_utf8_lossy(&body);
                    let message: String = text
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(300)
                        .collect();
                    Err(Failure::Refused { status, message })
                }
            }
        };
        conn.abort();
        result
    }
}

/// `s` percent-encoded for a query string.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `s` as a ClickHouse string literal (quoted, `\` and `'` escaped).
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}
