//! A plain TCP socket as a Pingora stream ([`BareTcp`]), with a "quiet" switch that makes
//! reads pending without a system call: polling a session for bytes it already holds then
//! costs nothing.

use pingora::protocols::Stream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A plain TCP socket as a Pingora stream, without Pingora's L4 wrapper (its socket
/// digest and buffers): the origins wsedge connects itself, and client sockets a tunnel
/// took out of that wrapper (`tunnel::handoff::detach`).
#[derive(Debug)]
pub struct BareTcp {
    tcp: TcpStream,
    /// Once set, reads return Pending without touching the socket: polling a session
    /// for bytes it already holds then costs no system call.
    quiet: AtomicBool,
}

impl BareTcp {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> BareTcp {
        BareTcp {
            tcp,
            quiet: AtomicBool::new(false),
        }
    }

    /// Sets `quiet` if `stream` is a `BareTcp` (a TLS stream has no such switch).
    pub fn set_quiet(stream: &Stream, quiet: bool) {
        if let Some(bare) = stream.as_any().downcast_ref::<BareTcp>() {
            bare.quiet.store(quiet, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for BareTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.quiet.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

super::forward_async_write!(BareTcp, tcp);

#[async_trait::async_trait]
impl pingora::protocols::Shutdown for BareTcp {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(&mut self.tcp).await;
    }
}

impl pingora::protocols::UniqueID for BareTcp {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl pingora::protocols::Ssl for BareTcp {}

impl pingora::protocols::GetTimingDigest for BareTcp {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        Vec::new()
    }
}

impl pingora::protocols::GetProxyDigest for BareTcp {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        None
    }
}

impl pingora::protocols::GetSocketDigest for BareTcp {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        None
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Peek for BareTcp {}
