//! A WebSocket carried by one HTTP/2 stream (RFC 8441) as a byte stream: the stream's DATA
//! in, DATA out, END_STREAM as the half-close. The relay runs over it as over a socket.
//!
//! Memory and backpressure stay per stream and bounded. Reading: the edge's receive window
//! for the stream ([`STREAM_WINDOW`]) bounds what the client can send ahead; flow-control
//! credit goes back as each DATA frame is handed to this adapter, which holds at most one
//! frame until the relay takes it, so a tunnel whose origin stops reading stops its client
//! after a window and a frame, without touching the other streams (the connection window
//! leaves room for every stream's full window). Writing: bytes are handed to h2 only as far
//! as the client's window and [`SEND_BUFFER`] grant, so a client that stops reading one
//! stream makes the relay wait (and its origin with it); whether the client's other streams
//! go on then depends on the client's own connection window, which browsers make large.

use bytes::Bytes;
use h2::{Reason, SendStream};
use pingora::protocols::http::v2::server::{H2Options, HttpSession};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Streams an HTTP/2 connection carries at once (nginx's default): room for a page's
/// WebSockets and its requests.
pub const MAX_STREAMS: u32 = 128;
/// The receive window of each stream: what one client may send ahead of its origin.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// What the edge holds for one stream on its way to the client at most.
pub const SEND_BUFFER: usize = 64 * 1024;

/// The h2 settings of listeners that carry WebSockets: [`MAX_STREAMS`], [`STREAM_WINDOW`],
/// a connection window that holds every stream's full window (a stream that is not read
/// cannot use up its siblings' credit), and [`SEND_BUFFER`].
pub fn tune(h2: &mut H2Options) {
    h2.max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(MAX_STREAMS * STREAM_WINDOW)
        .max_send_buffer_size(SEND_BUFFER);
}

/// One HTTP/2 stream after its `200`, read and written as bytes.
pub struct H2Stream {
    /// The request's side (its body is the client's bytes).
    session: Box<HttpSession>,
    send: SendStream<Bytes>,
    /// What came in a DATA frame and was not read yet.
    pending: Bytes,
    /// END_STREAM was sent.
    ended: bool,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("pending", &self.pending.len())
            .field("ended", &self.ended)
            .finish()
    }
}

impl H2Stream {
    /// The stream of `session`, whose response header was written.
    pub fn new(mut session: Box<HttpSession>) -> Option<H2Stream> {
        let send = session.take_response_body_writer()?;
        // The request's header was read and sent on: an open tunnel need not keep it.
        if let Ok(empty) = pingora::http::RequestHeader::build("CONNECT", b"/", Some(0)) {
            *session.req_header_mut() = empty;
        }
        Some(H2Stream {
            session,
            send,
            pending: Bytes::new(),
            ended: false,
        })
    }

    /// The error a write gets once the stream cannot take data: a reset by the client
    /// (`CANCEL` and `NO_ERROR` are a client that left, the others errors), or the stream
    /// or connection gone.
    fn write_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => reset_error(reason),
            Err(e) => io::Error::other(e),
        })
    }
}

/// A reset as an I/O error: a client that cancelled its stream went away (a reset
/// connection, as for TCP), any other reason is an error of the stream.
fn reset_error(reason: Reason) -> io::Error {
    match reason {
        Reason::NO_ERROR | Reason::CANCEL => {
            io::Error::new(io::ErrorKind::ConnectionReset, "stream reset by the client")
        }
        other => io::Error::other(format!("stream reset: {other}")),
    }
}

/// Whether a stream's error is its client leaving: a reset with `CANCEL` or `NO_ERROR`, a
/// GOAWAY without error, or the connection closed under it.
fn client_left(e: &h2::Error) -> bool {
    let polite = matches!(e.reason(), Some(Reason::CANCEL | Reason::NO_ERROR));
    ((e.is_reset() || e.is_go_away()) && polite)
        || e.get_io().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
            )
        })
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            // The session hands the credit of a frame back as it returns it: at most one
            // frame is held here beyond the stream's window.
            match ready!(this.session.poll_read_body_bytes(cx)) {
                // END_STREAM: the client is done sending (the relay sees an end of file).
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.pending = data,
                // A client that cancelled its stream, or whose connection ended, left
                // (an end of file, as a closed socket is); any other reset is an error.
                Some(Err(e)) if client_left(&e) => return Poll::Ready(Ok(())),
                Some(Err(e)) => {
                    return Poll::Ready(Err(match e.reason() {
                        Some(reason) if e.is_reset() => reset_error(reason),
                        _ => io::Error::other(e),
                    }))
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Ask for room for the whole buffer; write what the client's window and the send
        // buffer grant now. (h2 wakes a waiting writer only when its room grows: room
        // left from an earlier grant is taken first.)
        this.send.reserve_capacity(buf.len());
        loop {
            let room = this.send.capacity();
            if room > 0 {
                let n = room.min(buf.len());
                let data = Bytes::copy_from_slice(&buf[..n]);
                return match this.send.send_data(data, false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => this.write_error(cx).map(Err),
                };
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return this.write_error(cx).map(Err),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what was handed to it.
        Poll::Ready(Ok(()))
    }

    /// END_STREAM: the edge is done sending on this stream.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.ended = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => this.write_error(cx).map(Err),
        }
    }
}
