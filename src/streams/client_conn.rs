//! The client connection as the header guard hands it to Pingora ([`ClientConn`]): it
//! gives out exactly the current request's body and keeps back what the client sent after
//! it, so that the guard reads the next request header itself and no pipelined request is
//! lost. Everything else (writes, TLS and socket details) is the underlying stream's.

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::protocols::{Stream, ALPN};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// How the body of a request is framed (RFC 9112 §6.3), as far as the guard must know to
/// hand Pingora exactly that body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes (0: no body).
    Length(u64),
    /// Chunked: until the last chunk and the trailer section.
    Chunked(Chunks),
    /// The request is over: what the client sends now belongs to the next one.
    Rest,
    /// Everything goes through (an HTTP/2 connection).
    Passthrough,
}

/// Follows a chunked body's framing (RFC 9112 §7.1) over the bytes as they pass, without
/// copying them, to find where it ends. Strict: CRLF line ends, hex sizes that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chunks {
    state: ChunkState,
    size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// The hex digits of a chunk size (`digits` seen so far).
    #[default]
    Size,
    SizeDigits,
    /// A chunk extension, up to the CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// The start of a trailer line (an empty line ends the body).
    TrailerStart,
    Trailer,
    TrailerLf,
    LastLf,
}

/// A chunked body that does not follow the grammar.
#[derive(Debug)]
pub(crate) struct BadChunk;

impl Chunks {
    /// Feeds bytes; `Some(n)` when the body ends after the first `n` of them.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<Option<usize>, BadChunk> {
        let total = data.len();
        while let Some(&b) = data.first() {
            use ChunkState::*;
            if self.state == Data {
                let n = (self.size as usize).min(data.len());
                self.size -= n as u64;
                data = &data[n..];
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            data = &data[1..];
            self.state = match (self.state, b) {
                (Size | SizeDigits, b) if (b as char).is_ascii_hexdigit() => {
                    let digit = (b as char).to_digit(16).unwrap_or(0);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(digit)))
                        .filter(|s| *s < 1 << 60)
                        .ok_or(BadChunk)?;
                    SizeDigits
                }
                (SizeDigits, b';' | b' ' | b'\t') => Extension,
                (SizeDigits | Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(BadChunk),
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => TrailerStart,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => LastLf,
                (Trailer, b'\r') => TrailerLf,
                (TrailerStart | Trailer, b'\n') => return Err(BadChunk),
                (TrailerStart | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => TrailerStart,
                (LastLf, b'\n') => return Ok(Some(total - data.len())),
                _ => return Err(BadChunk),
            };
        }
        Ok(None)
    }
}

/// A client connection as Pingora sees it: it hands out the current request's body and no
/// more, keeping back (in `stash`) whatever the client sent after it. Everything else
/// (writes, TLS and socket details) is the underlying stream's.
#[derive(Debug)]
pub struct ClientConn {
    /// The connection (TCP or TLS).
    pub(crate) inner: Stream,
    /// Bytes read from `inner` and not handed out yet.
    pub(crate) stash: BytesMut,
    /// How much of what follows may be handed out now.
    pub(crate) framing: Framing,
}

impl ClientConn {
    /// A connection with nothing read yet.
    pub(crate) fn new(inner: Stream) -> ClientConn {
        ClientConn {
            inner,
            stash: BytesMut::new(),
            framing: Framing::Rest,
        }
    }

    /// The underlying stream and the bytes read from it that were not handed out: after
    /// a 101, the start of the tunnel.
    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.inner, self.stash)
    }

    /// Reads more into the stash; `Ok(0)` at the end of the stream.
    pub(crate) async fn read_more(&mut self) -> std::io::Result<usize> {
        self.stash.reserve(4096);
        self.inner.read_buf(&mut self.stash).await
    }

    /// Hands out stashed bytes, at most `limit`.
    fn take_stash(&mut self, buf: &mut ReadBuf<'_>, limit: usize) -> usize {
        let n = self.stash.len().min(buf.remaining()).min(limit);
        buf.put_slice(&self.stash.split_to(n));
        n
    }
}

impl AsyncRead for ClientConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_framed(cx, buf)
    }
}

impl ClientConn {
    /// A read as the framing allows: all of it (HTTP/2), the rest of the body, or nothing
    /// but the news of the client going away (the request is over).
    fn poll_framed(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.framing {
            Framing::Passthrough => {
                if !self.stash.is_empty() {
                    self.take_stash(buf, usize::MAX);
                    return Poll::Ready(Ok(()));
                }
                Pin::new(&mut self.inner).poll_read(cx, buf)
            }
            Framing::Length(0) | Framing::Rest => {
                self.framing = Framing::Rest;
                // The request is complete. Pingora reads here only to notice a client
                // that goes away during the response: report the end of the stream, but
                // keep any bytes for the next request and give Pingora nothing.
                if !self.stash.is_empty() {
                    return Poll::Pending;
                }
                let mut probe = [0u8; 4096];
                let mut probe = ReadBuf::new(&mut probe);
                match Pin::new(&mut self.inner).poll_read(cx, &mut probe) {
                    Poll::Ready(Ok(())) if probe.filled().is_empty() => Poll::Ready(Ok(())),
                    Poll::Ready(Ok(())) => {
                        self.stash.extend_from_slice(probe.filled());
                        Poll::Pending
                    }
                    other => other,
                }
            }
            Framing::Length(left) => {
                let limit = usize::try_from(left).unwrap_or(usize::MAX);
                let n = if !self.stash.is_empty() {
                    self.take_stash(buf, limit)
                } else if buf.remaining() <= limit {
                    // Cannot read past the body: straight into Pingora's buffer.
                    let before = buf.filled().len();
                    match Pin::new(&mut self.inner).poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {}
                        other => return other,
                    }
                    buf.filled().len() - before
                } else {
                    let mut small = [0u8; 8192];
                    let len = small.len().min(limit);
                    let mut part = ReadBuf::new(&mut small[..len]);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut part) {
                        Poll::Ready(Ok(())) => {}
                        other => return other,
                    }
                    buf.put_slice(part.filled());
                    part.filled().len()
                };
                self.framing = Framing::Length(left - n as u64);
                Poll::Ready(Ok(()))
            }
            Framing::Chunked(mut chunks) => {
                let before = buf.filled().len();
                if !self.stash.is_empty() {
                    // Hand out at most the rest of the body from the stash.
                    let end = chunks.feed_peek(&self.stash).map_err(|_| bad_chunk())?;
                    let limit = end.unwrap_or(self.stash.len());
                    let n = self.take_stash(buf, limit);
                    let done = chunks
                        .feed(&buf.filled()[before..before + n])
                        .map_err(|_| bad_chunk())?;
                    self.framing = match done {
                        Some(_) => Framing::Rest,
                        None => Framing::Chunked(chunks),
                    };
                    return Poll::Ready(Ok(()));
                }
                match Pin::new(&mut self.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
                let read = &buf.filled()[before..];
                match chunks.feed(read).map_err(|_| bad_chunk())? {
                    Some(end) => {
                        // What follows the body is the next request: keep it.
                        self.stash.extend_from_slice(&read[end..]);
                        buf.set_filled(before + end);
                        self.framing = Framing::Rest;
                    }
                    None => self.framing = Framing::Chunked(chunks),
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl Chunks {
    /// Where the body would end within `data`, without moving this state.
    fn feed_peek(&self, data: &[u8]) -> Result<Option<usize>, BadChunk> {
        let mut copy = *self;
        copy.feed(data)
    }
}

fn bad_chunk() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed chunked body")
}

super::forward_async_write!(ClientConn, inner);

#[async_trait]
impl pingora::protocols::Shutdown for ClientConn {
    async fn shutdown(&mut self) {
        pingora::protocols::Shutdown::shutdown(self.inner.as_mut()).await;
    }
}

impl pingora::protocols::UniqueID for ClientConn {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        self.inner.id()
    }
}

impl pingora::protocols::Ssl for ClientConn {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl pingora::protocols::GetTimingDigest for ClientConn {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl pingora::protocols::GetProxyDigest for ClientConn {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl pingora::protocols::GetSocketDigest for ClientConn {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl pingora::protocols::Peek for ClientConn {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        assert_eq!(Chunks::default().feed(body).unwrap(), Some(15));
        // Any split gives the same end.
        for split in 0..body.len() {
            let mut c = Chunks::default();
            let first = c.feed(&body[..split]).unwrap();
            let end = match first {
                Some(e) => e,
                None => split + c.feed(&body[split..]).unwrap().unwrap(),
            };
            assert_eq!(end, 15, "split at {split}");
        }
        let trailers = b"3;ext=1\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n";
        assert_eq!(
            Chunks::default().feed(trailers).unwrap(),
            Some(trailers.len())
        );
        for bad in [
            &b"5\nhello\r\n"[..],
            b"z\r\n",
            b"5\r\nhelloX\r\n",
            b"0\r\nX: y\n\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(Chunks::default().feed(bad).is_err(), "{bad:?}");
        }
    }
}
