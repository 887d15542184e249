//! Bounded waits on a connection's path (a header, a TLS handshake, an origin's connect and
//! answer), on Pingora's shared timer (`pingora::time::fast_timeout`: 10 ms ticks armed by
//! Pingora's own clock thread), as Pingora bounds its own reads. Arming it costs no system
//! call, where a tokio timer due before its runtime's next wake-up writes the runtime's
//! eventfd when it is set (even from the runtime's own thread) and costs an extra
//! `epoll_wait`. A tunnel's own timer stays tokio's (`tunnel::relay`).

use pingora::time::fast_timeout::{fast_timeout, FastOrTokioTimeout};
use pingora::time::Timeout;
use std::future::Future;
use std::time::{Duration, Instant};

/// `fut`, given up on after `limit`.
pub(crate) fn within<F: Future>(limit: Duration, fut: F) -> Timeout<F, FastOrTokioTimeout> {
    fast_timeout(limit, fut)
}

/// `fut`, given up on at `deadline` (at once if it has passed).
pub(crate) fn until<F: Future>(deadline: Instant, fut: F) -> Timeout<F, FastOrTokioTimeout> {
    fast_timeout(deadline.saturating_duration_since(Instant::now()), fut)
}
