//! One stream of an HTTP/2 client connection (the `h2` crate's) as `AsyncRead` +
//! `AsyncWrite`: what a WebSocket over HTTP/2 (RFC 8441) is to its client once the
//! extended CONNECT got its `200`. Used by wsedge's tests and by `wsload`; the edge's own
//! server-side adapter is `wsedge`'s `streams::h2_stream`.
//!
//! Reads hand the stream's flow-control credit back as each DATA frame is taken; writes
//! hand h2 only what the peer's window grants (no unbounded buffering); shutdown is
//! END_STREAM.

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client's h2 stream as bytes.
pub struct H2Io {
    recv: RecvStream,
    send: SendStream<Bytes>,
    pending: Bytes,
}

impl H2Io {
    /// The stream whose response body is `recv` and request body `send`.
    pub fn new(recv: RecvStream, send: SendStream<Bytes>) -> H2Io {
        H2Io {
            recv,
            send,
            pending: Bytes::new(),
        }
    }

    /// Resets the stream with `reason` (RST_STREAM).
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // h2 wakes a waiting writer only when its room grows: room already granted is
        // taken first.
        this.send.reserve_capacity(buf.len());
        while this.send.capacity() == 0 {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = this.send.capacity().min(buf.len());
        Poll::Ready(
            this.send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .map(|()| n)
                .map_err(io::Error::other),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        Poll::Ready(
            this.send
                .send_data(Bytes::new(), true)
                .map_err(io::Error::other),
        )
    }
}
