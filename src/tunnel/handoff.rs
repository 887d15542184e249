//! The hand-off out of Pingora after the 101: the client's stream is taken out of the
//! session with any bytes the client already sent after its request, and a plain TCP
//! socket leaves Pingora's stream wrapper for a [`BareTcp`] (the one `dup` of a socket,
//! close-on-exec, in `crate::os`). Pingora's per-request state is dropped when
//! `request_filter` returns, so an open tunnel holds only its two connections and its
//! accounting.

use crate::streams::bare_tcp::BareTcp;
use crate::streams::client_conn::ClientConn;
use crate::streams::h2_stream::H2Stream;
use bytes::Bytes;
use futures_util::FutureExt;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use std::future::Future;
use std::os::fd::AsRawFd;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Takes the client's connection out of the Pingora session after the 101 was written,
/// with any bytes the client sent after its request that the session had already read.
/// The session is left with an empty stand-in (nothing to reuse): Pingora's per-request
/// state is dropped when `request_filter` returns, so an open tunnel holds only its two
/// connections and its accounting.
pub(crate) fn take_client(session: &mut Session) -> Option<(Stream, Option<Bytes>)> {
    let stand_in = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::<u8>::new())));
    match std::mem::replace(&mut *session.downstream_session, stand_in) {
        ServerSession::H1(mut h1) => {
            h1.set_read_timeout(None);
            // Behind the header guard the session holds the header only (the body of an
            // upgrade is empty): what the client sent after it is in the guard's stash.
            // Otherwise the session may have read some already.
            if h1.stream().as_any().is::<ClientConn>() {
                let conn = h1.into_inner().into_any().downcast::<ClientConn>().ok()?;
                let (stream, early) = conn.into_parts();
                return Some((stream, (!early.is_empty()).then(|| early.freeze())));
            }
            let early = poll_preread(h1.read_body_bytes());
            Some((h1.into_inner(), early))
        }
        other => {
            *session.downstream_session = other;
            None
        }
    }
}

/// Takes an HTTP/2 stream out of the session after its `200` was written (the session is
/// left with an empty stand-in, as for HTTP/1.1).
pub(crate) fn take_h2(session: &mut Session) -> Option<H2Stream> {
    let stand_in = ServerSession::new_http1(Box::new(std::io::Cursor::new(Vec::<u8>::new())));
    match std::mem::replace(&mut *session.downstream_session, stand_in) {
        ServerSession::H2(h2) => H2Stream::new(Box::new(h2)),
        other => {
            *session.downstream_session = other;
            None
        }
    }
}

/// Bytes a session read past an HTTP header (after a 101 its body reader passes
/// everything through): polled once, so it returns what is buffered, or what the socket
/// already holds, and never waits. A pending read is dropped before it read anything.
pub(crate) fn poll_preread<F>(read: F) -> Option<Bytes>
where
    F: Future<Output = pingora::Result<Option<Bytes>>>,
{
    match read.now_or_never() {
        Some(Ok(Some(bytes))) if !bytes.is_empty() => Some(bytes),
        _ => None,
    }
}

/// A plain TCP client connection leaves Pingora's L4 wrapper (its struct, socket digest
/// and write buffer, about 0.9 KiB a connection) for a [`BareTcp`]: the socket is
/// duplicated and the wrapper dropped, which closes only its own descriptor. Only for
/// streams with no read buffer (wsedge's listeners make none) and nothing left to flush,
/// so no byte stays behind in the wrapper; anything else (TLS) is returned as it is.
pub(crate) fn detach(mut stream: Stream) -> Stream {
    if !stream.as_any().is::<L4Stream>() || !matches!(stream.flush().now_or_never(), Some(Ok(()))) {
        return stream;
    }
    let fd = stream
        .as_any()
        .downcast_ref::<L4Stream>()
        .map(|s| s.as_raw_fd());
    let Some(Ok(dup)) = fd.map(crate::os::dup_socket) else {
        return stream;
    };
    let std = std::net::TcpStream::from(dup);
    // The duplicate shares the socket's non-blocking flag; drop the wrapper (and its
    // registration with the reactor) before registering the duplicate.
    drop(stream);
    match TcpStream::from_std(std) {
        Ok(tcp) => Box::new(BareTcp::new(tcp)),
        Err(e) => {
            log::warn!("tunnel: re-registering a socket: {e}");
            // `std` is gone with the error: the connection is closed, the relay sees it
            // as a failed read.
            Box::new(std::io::Cursor::new(Vec::<u8>::new()))
        }
    }
}
