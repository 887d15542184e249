//! The connection-level guard in front of Pingora's HTTP handling. Every request header of
//! a connection, not only the first, must arrive whole within `client.header_timeout` from
//! its first byte (slowloris holds connections with a trickle of header bytes, each
//! resetting a per-read timeout) and in at most `client.max_header_bytes` (else 431), with
//! CRLF line ends and unambiguous framing (else 400), as nginx's `client_header_timeout`
//! and HAProxy's `timeout http-request` do. Between requests a kept-alive connection waits
//! at most `client.keepalive_timeout`. On TLS listeners the handshake itself, and on HTTP/2
//! connections the client preface, must come within the header timeout too.
//!
//! The guard reads each header itself and hands it to Pingora as a pipelined prefix; the
//! connection is given to Pingora as a [`ClientConn`], which hands out exactly the current
//! request's body and keeps back what follows it (pipelined requests), so that the guard
//! reads the next header from where the previous request ended, and no pipelined request
//! is lost. Whatever the guard refuses gets its answer, an access-log line and a count.

use crate::config::ClientLimits;
use crate::deadline::{until, within};
use crate::observe::access_log::{AccessLog, JsonLine};
use crate::observe::metrics::EdgeStats;
use crate::policy::answer::Answer;
use crate::streams::client_conn::{Chunks, ClientConn, Framing};
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::v1::server::HttpSession as H1Session;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Instant;
use std::time::SystemTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// RFC 9113 §3.4.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Header fields a request may have (Pingora's own limit).
const MAX_HEADERS: usize = 256;

/// How long, and for how many bytes at most, a refused client's bytes are read and
/// dropped before its connection is closed.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Wraps an HTTP app (Pingora's proxy) with the header deadlines, size limit and framing
/// checks, for plain TCP or, with [`Self::with_tls`], TLS listeners.
pub struct HeaderGuard<A> {
    inner: Arc<A>,
    limits: ClientLimits,
    tls: Option<Arc<Acceptor>>,
    log: Option<Arc<AccessLog>>,
    stats: Option<Arc<EdgeStats>>,
}

impl<A> HeaderGuard<A> {
    /// Guards `inner` with `limits`.
    pub fn new(inner: Arc<A>, limits: ClientLimits) -> HeaderGuard<A> {
        HeaderGuard {
            inner,
            limits,
            tls: None,
            log: None,
            stats: None,
        }
    }

    /// Makes the TLS handshake with `acceptor` (on a listener added without TLS), under the
    /// header deadline.
    pub fn with_tls(mut self, acceptor: Arc<Acceptor>) -> HeaderGuard<A> {
        self.tls = Some(acceptor);
        self
    }

    /// Logs and counts the requests the guard refuses.
    pub fn with_reporting(mut self, log: Arc<AccessLog>, stats: Arc<EdgeStats>) -> HeaderGuard<A> {
        self.log = Some(log);
        self.stats = Some(stats);
        self
    }
}

/// What the guard learned from a request header.
struct Head {
    bytes: BytesMut,
    framing: Framing,
}

/// A refusal with what is known of the request, for its log line.
struct Refusal {
    /// The answer; `None` for a header that never came whole (logged as 408, unanswered).
    reject: Option<Answer>,
    method: String,
    path: String,
    upgrade: bool,
}

impl Refusal {
    fn timed_out() -> Refusal {
        Refusal {
            reject: None,
            method: String::new(),
            path: String::new(),
            upgrade: false,
        }
    }

    fn bare(reject: Answer) -> Refusal {
        Refusal {
            reject: Some(reject),
            method: String::new(),
            path: String::new(),
            upgrade: false,
        }
    }
}

/// Why no header came.
enum NoHead {
    /// The connection ended, idled out between requests, or the server is shutting down:
    /// nothing to answer.
    Closed,
    /// The header did not arrive within the header timeout: logged as 408, closed.
    TimedOut,
    /// Answered with this.
    Refused(Refusal),
}

impl<A> HeaderGuard<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Reads the next request header of `conn`. `deadline` is set for the first request
    /// (counted from the accept); later ones first wait up to the keep-alive timeout for a
    /// first byte, and then get the header timeout.
    async fn next_head(
        &self,
        conn: &mut ClientConn,
        deadline: Option<Instant>,
        shutdown: &ShutdownWatch,
    ) -> Result<Head, NoHead> {
        let deadline = match deadline {
            Some(d) => d,
            None => {
                if conn.stash.is_empty() {
                    let mut shutdown = shutdown.clone();
                    let first = tokio::select! {
                        r = within(self.limits.keepalive_timeout, conn.read_more()) => r,
                        _ = shutdown.changed() => return Err(NoHead::Closed),
                    };
                    if !matches!(first, Ok(Ok(n)) if n > 0) {
                        return Err(NoHead::Closed);
                    }
                }
                Instant::now() + self.limits.header_timeout
            }
        };
        let max = self.limits.max_header_bytes;
        // Lines before this are whole and checked: each read is scanned once, however the
        // header is trickled in.
        let mut scanned = 0;
        let end = loop {
            // RFC 9112 §2.2: empty lines before a request line are ignored.
            while conn.stash.starts_with(b"\r\n") {
                let _ = conn.stash.split_to(2);
                scanned = 0;
            }
            match head_end(&conn.stash, scanned) {
                Ok(Ok(end)) if end > max => {
                    return Err(NoHead::Refused(Refusal::bare(Answer::HeaderTooLarge)))
                }
                Ok(Ok(end)) => break end,
                Ok(Err(_)) if conn.stash.len() > max => {
                    return Err(NoHead::Refused(Refusal::bare(Answer::HeaderTooLarge)))
                }
                Ok(Err(resume)) => scanned = resume,
                Err(BareLf) => {
                    return Err(NoHead::Refused(Refusal::bare(Answer::Malformed(
                        "Request header lines must end with CRLF.\n",
                    ))))
                }
            }
            match until(deadline, conn.read_more()).await {
                Err(_) if conn.stash.is_empty() => return Err(NoHead::Closed),
                Err(_) => return Err(NoHead::TimedOut),
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(NoHead::Closed),
            }
        };
        let bytes = conn.stash.split_to(end);
        let framing = check_head(&bytes).map_err(NoHead::Refused)?;
        Ok(Head { bytes, framing })
    }

    /// Answers a refused request on `conn`, logs and counts it, and closes. The close
    /// lingers (as nginx's `lingering_close` does): what the client is still sending is read
    /// and dropped for a moment, so that closing with unread bytes (which sends a reset)
    /// does not destroy the answer before the client has read it.
    async fn refuse(&self, conn: &mut ClientConn, refusal: Refusal, received: SystemTime) {
        let Some(reject) = refusal.reject else { return };
        let answer = reject.raw_response();
        // A client that does not read its answer is not waited for.
        let _ = within(self.limits.header_timeout, async {
            conn.write_all(&answer).await?;
            conn.flush().await?;
            conn.inner.shutdown().await
        })
        .await;
        self.report(conn, &refusal, received);
        let _ = within(LINGER, async {
            let mut sink = [0u8; 16 * 1024];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match conn.inner.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    fn report(&self, conn: &ClientConn, refusal: &Refusal, received: SystemTime) {
        if let Some(stats) = &self.stats {
            match refusal.reject {
                Some(answer) => {
                    stats.refused_unrouted(answer.status(), answer.outcome(), refusal.upgrade)
                }
                None => stats.timed_out_header(),
            }
        }
        let status = refusal.reject.map_or(408, Answer::status);
        let Some(log) = self.log.as_ref().filter(|l| l.enabled()) else {
            return;
        };
        let client = conn
            .inner
            .get_socket_digest()
            .and_then(|d| d.peer_addr().map(|a| a.to_string()))
            .unwrap_or_default();
        let line = JsonLine::new(received)
            .str("kind", "http")
            .str("resource", "")
            .str("client", &client)
            .str("host", "")
            .str("method", &refusal.method)
            .str("path", &refusal.path)
            .num("status", status)
            .num("bytes_client_to_origin", 0)
            .num("bytes_origin_to_client", 0)
            .num(
                "duration_ms",
                received.elapsed().map_or(0, |d| d.as_millis()),
            )
            .finish();
        log.write(line);
    }

    /// Serves the requests of an HTTP/1 connection one after the other: the guard reads
    /// each header (the first within `deadline`), Pingora the rest, until either side ends
    /// the connection.
    async fn serve_http1(
        self: &Arc<Self>,
        mut conn: ClientConn,
        deadline: Instant,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut first = Some(deadline);
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let received = SystemTime::now();
            let head = match self.next_head(&mut conn, first.take(), shutdown).await {
                Ok(head) => head,
                Err(NoHead::Closed) => return None,
                Err(NoHead::TimedOut) => {
                    log::debug!(
                        "request header not complete within {:?}: closing",
                        self.limits.header_timeout
                    );
                    self.report(&conn, &Refusal::timed_out(), received);
                    return None;
                }
                Err(NoHead::Refused(refusal)) => {
                    // Boxed: its 16 KiB drain buffer stays out of every connection's future.
                    Box::pin(self.refuse(&mut conn, refusal, received)).await;
                    return None;
                }
            };
            conn.framing = head.framing;
            let mut h1 = H1Session::new(Box::new(conn));
            h1.set_pipelined_prefix(head.bytes);
            let mut session = ServerSession::H1(h1);
            match settings.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => {
                    // Pingora waits for nothing between requests here (the guard does): this
                    // only lets the connection be kept alive, for as many requests as the
                    // app allows (as Pingora sets up a new connection).
                    session.set_keepalive(Some(self.limits.keepalive_timeout.as_secs().max(1)));
                    session.set_keepalive_reuses_remaining(
                        self.inner
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let (stream, next_settings) = self
                .inner
                .process_new_http(session, shutdown)
                .await?
                .consume();
            // The stream is the `ClientConn` given to the session: take it back, with
            // whatever the client sent after this request.
            conn = *stream.into_any().downcast::<ClientConn>().ok()?;
            settings = next_settings;
        }
    }
}

#[async_trait]
impl<A> ServerApp for HeaderGuard<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Counted while served, so a stopping edge knows when its last request is done.
        let _serving = self.stats.as_ref().map(|s| s.serving());
        let deadline = Instant::now() + self.limits.header_timeout;
        let stream = match &self.tls {
            None => stream,
            Some(acceptor) => match until(deadline, tls_handshake(acceptor, stream)).await {
                Ok(Some(tls)) => tls,
                Ok(None) => return None,
                Err(_) => {
                    log::debug!("TLS handshake not complete within the header timeout: closing");
                    return None;
                }
            },
        };
        let mut conn = ClientConn::new(stream);
        if matches!(conn.inner.selected_alpn_proto(), Some(ALPN::H2)) {
            // HTTP/2 has its own framing; Pingora serves it with the idle timeout and header
            // limit it was given. Only the preface is waited for here.
            while conn.stash.len() < H2_PREFACE.len() {
                match until(deadline, conn.read_more()).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
            if !conn.stash.starts_with(H2_PREFACE) {
                return None;
            }
            conn.framing = Framing::Passthrough;
            return self.inner.process_new(Box::new(conn), shutdown).await;
        }
        self.serve_http1(conn, deadline, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await;
    }
}

/// The TLS handshake of a connection from a listener added without TLS.
async fn tls_handshake(acceptor: &Acceptor, stream: Stream) -> Option<Stream> {
    let l4 = match stream.into_any().downcast::<L4Stream>() {
        Ok(l4) => *l4,
        Err(_) => {
            log::error!("a TLS listener gave a stream that is not TCP");
            return None;
        }
    };
    match acceptor.tls_handshake(l4).await {
        Ok(tls) => Some(Box::new(tls)),
        Err(e) => {
            log::debug!("TLS handshake failed: {e}");
            None
        }
    }
}

/// A line of the header ends with a bare LF.
struct BareLf;

/// Where the header in `buf` ends (just past its empty line), if it is complete. A bare LF
/// (RFC 9112 §2.2 allows a server to accept it, but proxies that disagree on it can be
/// made to see different requests) is refused.
fn head_end(buf: &[u8], mut from: usize) -> Result<Result<usize, usize>, BareLf> {
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + i;
        if lf == 0 || buf[lf - 1] != b'\r' {
            return Err(BareLf);
        }
        if lf >= 3 && &buf[lf - 3..=lf] == b"\r\n\r\n" {
            return Ok(Ok(lf + 1));
        }
        from = lf + 1;
    }
    Ok(Err(from))
}

/// Parses a complete header and decides its framing: what Pingora would refuse with a 400
/// of its own (before any hook, so unlogged) is refused here, and anything whose framing
/// two parsers could read differently is refused too.
fn check_head(head: &[u8]) -> Result<Framing, Refusal> {
    // Uninitialised slots: filling 256 empty headers (8 KiB) for every request would cost
    // more than the parse of a usual header.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let bad = |why: &'static str| Refusal::bare(Answer::Malformed(why));
    // The method and path are copied only into a refusal.
    let (method, path, version) = match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => (
            req.method.unwrap_or(""),
            req.path.unwrap_or(""),
            req.version.unwrap_or(1),
        ),
        Ok(httparse::Status::Partial) => return Err(bad("The request header is incomplete.\n")),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::bare(Answer::HeaderTooLarge)),
        Err(httparse::Error::Token | httparse::Error::Version) => {
            // Pingora escapes characters a request target should not have (`|`, `{`,
            // raw UTF-8) instead of refusing them; its headers must still parse.
            let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
            let line = String::from_utf8_lossy(&head[..line_end]);
            let mut parts = line.split(' ');
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let version = if line.ends_with(" HTTP/1.0") { 0 } else { 1 };
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(&head[line_end + 2..], &mut headers) {
                Ok(httparse::Status::Complete(_)) => {
                    let found: Vec<(String, Vec<u8>)> = headers
                        .iter()
                        .take_while(|h| !h.name.is_empty())
                        .map(|h| (h.name.to_string(), h.value.to_vec()))
                        .collect();
                    return framing(
                        &method,
                        &path,
                        version,
                        found.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
                    );
                }
                _ => return Err(bad("The request header is malformed.\n")),
            }
        }
        Err(_) => return Err(bad("The request header is malformed.\n")),
    };
    framing(
        method,
        path,
        version,
        req.headers.iter().map(|h| (h.name, h.value)),
    )
}

/// The framing of a request with these header fields (RFC 9112 §6): a `Content-Length`
/// of one value (repeats must agree), or `Transfer-Encoding: chunked` exactly (HTTP/1.1
/// only), never both; none means no body.
fn framing<'a>(
    method: &str,
    path: &str,
    version: u8,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<Framing, Refusal> {
    let mut upgrade = false;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut te: Option<Vec<u8>> = None;
    let refusal = |reject: Answer, upgrade: bool| Refusal {
        reject: Some(reject),
        method: method.to_string(),
        path: path.to_string(),
        upgrade,
    };
    let bad = |why: &'static str, upgrade: bool| refusal(Answer::Malformed(why), upgrade);
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            for v in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = std::str::from_utf8(v)
                    .ok()
                    .filter(|v| {
                        !v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| bad("Content-Length must be a number.\n", upgrade))?;
                if length.is_some_and(|l| l != n) {
                    return Err(refusal(Answer::AmbiguousFraming, upgrade));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let mut all = te.take().unwrap_or_default();
            if !all.is_empty() {
                all.push(b',');
            }
            all.extend_from_slice(value);
            te = Some(all);
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if method == "CONNECT" {
        return Err(refusal(Answer::MethodNotAllowed, upgrade));
    }
    if hosts > 1 {
        return Err(refusal(Answer::BadHost, upgrade));
    }
    match (length, te) {
        (Some(_), Some(_)) => Err(refusal(Answer::AmbiguousFraming, upgrade)),
        (_, Some(_)) if version == 0 => Err(bad(
            "Transfer-Encoding is not allowed in HTTP/1.0.\n",
            upgrade,
        )),
        (_, Some(te)) if te.trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            Ok(Framing::Chunked(Chunks::default()))
        }
        (_, Some(_)) => Err(bad(
            "Only Transfer-Encoding: chunked is supported.\n",
            upgrade,
        )),
        (Some(n), None) => Ok(Framing::Length(n)),
        (None, None) => Ok(Framing::Length(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_ends_and_bare_lf() {
        assert!(matches!(
            head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 0),
            Ok(Ok(27))
        ));
        assert!(matches!(
            head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0),
            Ok(Err(_))
        ));
        assert!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", 0).is_err());
        assert!(head_end(b"GET / HTTP/1.1\r\nHost: a\n\r\n", 0).is_err());
        // Resumed where the last scan stopped, the same head is found, byte by byte too.
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest";
        let mut scanned = 0;
        let mut found = None;
        for n in 1..=head.len() {
            match head_end(&head[..n], scanned) {
                Ok(Ok(end)) => {
                    found = Some(end);
                    break;
                }
                Ok(Err(resume)) => scanned = resume,
                Err(BareLf) => panic!("bare LF at {n}"),
            }
        }
        assert_eq!(found, Some(27));
    }

    fn framing_of(head: &str) -> Result<Framing, Answer> {
        check_head(head.as_bytes()).map_err(|r| r.reject.unwrap())
    }

    #[test]
    fn framing_in_raw_headers() {
        assert_eq!(
            framing_of("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Framing::Length(0))
        );
        assert_eq!(
            framing_of("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing_of("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked(Chunks::default()))
        );
        for (head, reject) in [
            ("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", Answer::AmbiguousFraming),
            ("POST / HTTP/1.1\r\ncontent-length: 5, 6\r\n\r\n", Answer::AmbiguousFraming),
            ("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", Answer::AmbiguousFraming),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", Answer::Malformed("")),
            ("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", Answer::Malformed("")),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Answer::Malformed("")),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Answer::Malformed("")),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Answer::Malformed("")),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", Answer::MethodNotAllowed),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Answer::BadHost),
        ] {
            let got = framing_of(head);
            match (got, reject) {
                (Err(Answer::Malformed(_)), Answer::Malformed(_)) => {}
                (got, want) => assert_eq!(got, Err(want), "{head:?}"),
            }
        }
        assert_eq!(
            framing_of(
                "POST / HTTP/1.1\r\nX: Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            Ok(Framing::Chunked(Chunks::default()))
        );
    }
}
