//! The connection-level guard in front of Pingora's HTTP handling: a client must send its
//! whole first request header within `client.header_timeout` (slowloris holds connections
//! with a trickle of header bytes, each resetting a per-read timeout) and in at most
//! `client.max_header_bytes` (else 431). Pingora then parses the header from the bytes
//! read here, as a pipelined prefix. Follow-up requests on a kept-alive connection are read
//! by Pingora, within its keep-alive timeout between reads.

use crate::config::ClientLimits;
use crate::handshake::Reject;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::v1::server::HttpSession as H1Session;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Wraps an HTTP app (Pingora's proxy) with the header deadline and size limit.
pub struct HeaderGuard<A> {
    inner: Arc<A>,
    limits: ClientLimits,
}

impl<A> HeaderGuard<A> {
    /// Guards `inner` with `limits`.
    pub fn new(inner: A, limits: ClientLimits) -> HeaderGuard<A> {
        HeaderGuard {
            inner: Arc::new(inner),
            limits,
        }
    }
}

/// Why the first header could not be read.
enum HeadError {
    TooLarge,
    Closed,
}

/// Reads until the end of the request header (`\r\n\r\n`), keeping everything read.
async fn read_head(stream: &mut Stream, buf: &mut BytesMut, max: usize) -> Result<(), HeadError> {
    let mut scanned = 0;
    loop {
        if let Some(i) = buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            return if scanned + i + 4 > max {
                Err(HeadError::TooLarge)
            } else {
                Ok(())
            };
        }
        if buf.len() > max {
            return Err(HeadError::TooLarge);
        }
        scanned = buf.len().saturating_sub(3);
        buf.reserve(4096);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Whether the raw header has both `Content-Length` and `Transfer-Encoding`, or
/// `Content-Length` values that disagree. Pingora would drop the length and use the
/// encoding (RFC 9112 §6.3), which is safe for itself, but such a request is almost always
/// an attempt at smuggling through a chain of proxies: refuse it (RFC 9112 §6.1 allows).
fn ambiguous_framing(head: &[u8]) -> bool {
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    let mut length: Option<&[u8]> = None;
    let (mut te, mut disagree) = (false, false);
    for line in head[..end].split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for v in value.split(|&b| b == b',').map(|v| v.trim_ascii()) {
                disagree |= length.is_some_and(|l| l != v);
                length = Some(v);
            }
        }
    }
    disagree || (te && length.is_some())
}

#[async_trait]
impl<A> ServerApp for HeaderGuard<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 has its own framing and flow control: Pingora's path as it is.
            return self.inner.process_new(stream, shutdown).await;
        }
        let mut buf = BytesMut::with_capacity(4096);
        match tokio::time::timeout(
            self.limits.header_timeout,
            read_head(&mut stream, &mut buf, self.limits.max_header_bytes),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(HeadError::TooLarge)) => {
                let _ = stream
                    .write_all(&Reject::HeaderTooLarge.raw_response())
                    .await;
                let _ = stream.flush().await;
                return None;
            }
            Ok(Err(HeadError::Closed)) => return None,
            Err(_) => {
                log::debug!(
                    "request header not complete within {:?}: closing",
                    self.limits.header_timeout
                );
                return None;
            }
        }
        if ambiguous_framing(&buf) {
            let _ = stream
                .write_all(&Reject::AmbiguousFraming.raw_response())
                .await;
            let _ = stream.flush().await;
            return None;
        }
        let mut first = H1Session::new(stream);
        first.set_pipelined_prefix(buf);
        let mut session = ServerSession::H1(first);
        // As Pingora does for a new HTTP/1 connection.
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let mut result = self.inner.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            result = self.inner.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_framing_in_raw_headers() {
        assert!(!ambiguous_framing(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ambiguous_framing(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello"
        ));
        assert!(ambiguous_framing(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(ambiguous_framing(
            b"POST / HTTP/1.1\r\ncontent-length: 5, 6\r\n\r\n"
        ));
        assert!(ambiguous_framing(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        ));
        assert!(!ambiguous_framing(
            b"POST / HTTP/1.1\r\nX: Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }
}
