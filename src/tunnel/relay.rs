//! The relay after the 101: one future per tunnel that moves bytes both ways until one
//! side ends, nothing moves for the idle timeout, a destination takes nothing for that
//! long, or the lifetime is reached; then the client gets its FIN. Generic over the two
//! streams (any `AsyncRead + AsyncWrite`), like linkerd's `Duplex`, so it runs over
//! in-memory pipes in tests.
//!
//! An idle tunnel holds no buffer: reads go into one buffer per worker thread and are
//! written on at once; only bytes a destination cannot take yet are kept, by the direction
//! that read them, and that direction reads again only once they are written. Every chunk
//! passes the tunnel's accounting ([`TunnelGuard`]), which reads its frame headers: the
//! place where a control frame of the edge's own can be written at a frame boundary.

use super::tally::TunnelGuard;
use crate::config::WebSocket;
use crate::observe::labels::CloseReason;
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The most a tunnel reads from one side at a time, and so the most it can hold for a
/// destination that does not take it: reading from a side resumes only once what was read
/// from it is all written on. A client that never reads thus costs a tunnel at most this
/// much per direction, however much the origin sends (nginx holds its `proxy_buffer_size`,
/// HAProxy its `tune.bufsize`, 16 KiB). Larger reads move large messages in fewer system
/// calls; docs/benchmarks.md has what this size costs against 256 KiB.
pub const RELAY_BUF: usize = 32 * 1024;

thread_local! {
    /// The relay's read buffer: one per worker thread, lent to a tunnel only for the span of
    /// one read and the write that follows it.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; RELAY_BUF].into_boxed_slice());
}

/// Reads and writes per direction before yielding to other tasks.
const ROUNDS: usize = 16;

/// How long a closing tunnel waits for the client to take its FIN (and TLS close_notify).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    ReadError,
    WriteError,
}

/// One direction: bytes read but not yet taken by the destination.
#[derive(Default)]
struct Half {
    /// Bytes the destination pushed back (empty, unallocated, almost always).
    pending: Vec<u8>,
    written: usize,
    /// A write went out that the stream may still hold (TLS records): flush before more.
    flush: bool,
    /// Since when `pending` has been waiting.
    stalled_since: Option<Instant>,
}

impl Half {
    /// Moves bytes from `src` to `dst` until either blocks, each chunk through `account`;
    /// `moved` is set when any were read. Ready means this direction ended.
    fn poll_move<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        mut account: impl FnMut(&[u8]),
        moved: &mut bool,
    ) -> Poll<End>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        for _ in 0..ROUNDS {
            // What the destination pushed back goes first, then a flush.
            while self.written < self.pending.len() {
                match Pin::new(&mut *dst).poll_write(cx, &self.pending[self.written..]) {
                    Poll::Ready(Ok(n)) if n > 0 => self.written += n,
                    Poll::Ready(_) => return Poll::Ready(End::WriteError),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
                self.stalled_since = None;
                self.flush = true;
            }
            if self.flush {
                match Pin::new(&mut *dst).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(End::WriteError),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let step = READ_BUF.with_borrow_mut(|buf| {
                let mut read = ReadBuf::new(buf);
                match Pin::new(&mut *src).poll_read(cx, &mut read) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(_)) => Poll::Ready(Some(End::ReadError)),
                    Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(Some(End::Eof)),
                    Poll::Ready(Ok(())) => {
                        let chunk = read.filled();
                        account(chunk);
                        *moved = true;
                        Poll::Ready(self.write_now(cx, dst, chunk).err())
                    }
                }
            });
            match step {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(end)) => return Poll::Ready(end),
                Poll::Ready(None) => {}
            }
        }
        // Busy: let other tunnels run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes a chunk just read; what the destination does not take now is kept.
    fn write_now<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        chunk: &[u8],
    ) -> Result<(), End> {
        let mut done = 0;
        while done < chunk.len() {
            match Pin::new(&mut *dst).poll_write(cx, &chunk[done..]) {
                Poll::Ready(Ok(n)) if n > 0 => done += n,
                Poll::Ready(_) => return Err(End::WriteError),
                Poll::Pending => {
                    self.keep(&chunk[done..]);
                    return Ok(());
                }
            }
        }
        self.flush = true;
        Ok(())
    }

    /// Keeps bytes for later (the destination is full).
    fn keep(&mut self, rest: &[u8]) {
        self.pending.extend_from_slice(rest);
        self.stalled_since = Some(Instant::now());
    }
}

/// An open tunnel, as one task. Both directions and the one timer are polled from this
/// single future, and its guard records the tunnel when it ends.
pub struct Relay<C, O> {
    client: C,
    origin: O,
    guard: TunnelGuard,
    c2o: Half,
    o2c: Half,
    idle: Duration,
    lifetime_end: Instant,
    last_activity: Instant,
    /// Armed once and moved only when it fires: traffic just records the time.
    timer: Pin<Box<Sleep>>,
    /// The client is done sending; the origin was (`origin_shut`) or is being shut down
    /// for writing.
    client_eof: bool,
    origin_shut: bool,
    /// Whether the client's stream needs a shutdown to end (TLS: close_notify); a bare
    /// socket's FIN comes with its close.
    shutdown_client: bool,
    /// Set once the relay ended: the FIN to the client is on its way.
    closing: bool,
}

impl<C, O> Relay<C, O>
where
    C: AsyncRead + AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite + Unpin,
{
    /// A relay between `client` and `origin` under the resource's `ws` settings; `early`
    /// holds bytes each side sent along with the handshake (client's, origin's), which go
    /// first.
    pub(crate) fn new(
        client: C,
        origin: O,
        ws: &WebSocket,
        guard: TunnelGuard,
        early: [Option<Bytes>; 2],
        shutdown_client: bool,
    ) -> Relay<C, O> {
        let now = Instant::now();
        let idle = ws.idle_timeout;
        // Far enough to never fire when no lifetime is set (tokio caps deadlines anyway).
        let lifetime_end = now
            + ws.max_lifetime
                .unwrap_or(Duration::from_secs(100 * 365 * 86_400));
        let mut relay = Relay {
            client,
            origin,
            guard,
            c2o: Half::default(),
            o2c: Half::default(),
            idle,
            lifetime_end,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until((now + idle).min(lifetime_end))),
            client_eof: false,
            origin_shut: false,
            shutdown_client,
            closing: false,
        };
        // Bytes that came with the handshake go first, counted like any other.
        let [from_client, from_origin] = early;
        if let Some(b) = from_client {
            relay.guard.client_to_origin(&b);
            relay.c2o.keep(&b);
        }
        if let Some(b) = from_origin {
            relay.guard.origin_to_client(&b);
            relay.o2c.keep(&b);
        }
        relay
    }

    /// Moves bytes both ways; Ready with the transport's reason when the relay is over.
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        let mut moved = false;
        if !self.client_eof {
            let guard = &mut self.guard;
            match self.c2o.poll_move(
                cx,
                &mut self.client,
                &mut self.origin,
                |chunk| guard.client_to_origin(chunk),
                &mut moved,
            ) {
                Poll::Pending => {}
                // The client is done sending; the origin may still answer (its Close
                // frame): half-close towards it and keep relaying its side.
                Poll::Ready(End::Eof) => self.client_eof = true,
                Poll::Ready(_) => return Poll::Ready(CloseReason::Error),
            }
        }
        if self.client_eof && !self.origin_shut {
            if let Poll::Ready(r) = Pin::new(&mut self.origin).poll_shutdown(cx) {
                self.origin_shut = true;
                if r.is_err() {
                    return Poll::Ready(CloseReason::ClientClosed);
                }
            }
        }
        let client_open = !self.client_eof;
        let guard = &mut self.guard;
        let o2c = self.o2c.poll_move(
            cx,
            &mut self.origin,
            &mut self.client,
            |chunk| guard.origin_to_client(chunk),
            &mut moved,
        );
        if moved {
            self.last_activity = Instant::now();
        }
        match o2c {
            Poll::Pending => self.poll_limits(cx),
            Poll::Ready(End::Eof) if client_open => Poll::Ready(CloseReason::OriginClosed),
            Poll::Ready(End::Eof) => Poll::Ready(CloseReason::ClientClosed),
            Poll::Ready(End::ReadError) if client_open => Poll::Ready(CloseReason::Error),
            Poll::Ready(End::ReadError) => Poll::Ready(CloseReason::ClientClosed),
            Poll::Ready(End::WriteError) => Poll::Ready(CloseReason::Error),
        }
    }

    /// When the timer fires: whether a limit was reached, else the timer is moved on.
    fn poll_limits(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if now >= self.lifetime_end {
                return Poll::Ready(CloseReason::MaxLifetime);
            }
            let idle_end = self.last_activity + self.idle;
            if now >= idle_end {
                return Poll::Ready(CloseReason::IdleTimeout);
            }
            // A destination that takes nothing for the idle timeout is as good as gone,
            // even while the other direction talks.
            let mut next = idle_end.min(self.lifetime_end);
            for stalled in [self.c2o.stalled_since, self.o2c.stalled_since]
                .into_iter()
                .flatten()
            {
                if now >= stalled + self.idle {
                    return Poll::Ready(CloseReason::Error);
                }
                next = next.min(stalled + self.idle);
            }
            self.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl<C, O> Future for Relay<C, O>
where
    C: AsyncRead + AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.closing {
            let Poll::Ready(transport) = this.poll_relay(cx) else {
                return Poll::Pending;
            };
            this.guard.finish(transport);
            this.closing = true;
            this.timer.as_mut().reset(Instant::now() + CLOSE_WAIT);
        }
        // A TLS client gets its close_notify and FIN, bounded: it may have stopped reading.
        if !this.shutdown_client
            || Pin::new(&mut this.client).poll_shutdown(cx).is_ready()
            || this.timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::access_log::AccessLog;
    use crate::observe::metrics::EdgeStats;
    use crate::policy::limits::{ResourceLimits, Slot};
    use crate::tunnel::tally::{Reporting, TunnelInfo};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// The settings of a resource with these `websocket` keys.
    fn websocket(keys: &str) -> WebSocket {
        let yaml = format!("listen: {{ http: [\"127.0.0.1:0\"] }}\nresources:\n  - name: t\n    hostnames: [a.b]\n    origin: {{ servers: [{{ address: \"127.0.0.1:1\" }}] }}\n    websocket: {{ {keys} }}\n");
        crate::Config::from_yaml("t.yaml", &yaml).unwrap().resources[0]
            .websocket
            .clone()
    }

    struct Setup {
        relay: Relay<DuplexStream, DuplexStream>,
        client: DuplexStream,
        origin: DuplexStream,
        stats: Arc<EdgeStats>,
    }

    /// A relay between two in-memory pipes (the far ends are the client and the origin);
    /// each pipe holds `capacity` bytes.
    fn relay(keys: &str, capacity: usize) -> Setup {
        relay_with(keys, capacity, capacity)
    }

    fn relay_with(keys: &str, client_capacity: usize, origin_capacity: usize) -> Setup {
        let stats = Arc::new(EdgeStats::default());
        let site = stats.resource("t");
        let slot = Slot::reserve(&Arc::new(ResourceLimits::default()), None, None).unwrap();
        let report = Reporting {
            site,
            log: Arc::new(AccessLog::off()),
            metrics: true,
        };
        let info = TunnelInfo {
            resource: "t".into(),
            client: String::new(),
            host: String::new(),
            path: "/".into(),
            client_ip: None,
            tls: false,
            detachable: false,
        };
        let guard = TunnelGuard::new(info, report, slot, "127.0.0.1:1".parse().unwrap());
        let (edge_client, client) = tokio::io::duplex(client_capacity);
        let (edge_origin, origin) = tokio::io::duplex(origin_capacity);
        let relay = Relay::new(
            edge_client,
            edge_origin,
            &websocket(keys),
            guard,
            [None, None],
            true,
        );
        Setup {
            relay,
            client,
            origin,
            stats,
        }
    }

    /// How many tunnels closed for `reason`.
    fn closed(stats: &EdgeStats, reason: &str) -> usize {
        let text = stats.prometheus_text();
        let series = format!("wsedge_ws_closed_total{{reason=\"{reason}\",resource=\"t\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    /// A masked text frame of `text` (a client's), or unmasked (an origin's).
    fn frame(text: &str, masked: bool) -> Vec<u8> {
        let mut f = vec![0x81, text.len() as u8 | if masked { 0x80 } else { 0 }];
        if masked {
            f.extend_from_slice(&[0, 0, 0, 0]);
        }
        f.extend_from_slice(text.as_bytes());
        f
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_tunnel_closes_at_its_idle_timeout_and_traffic_keeps_it_open() {
        let mut s = relay("idle_timeout: 90s", 4096);
        let started = Instant::now();
        let task = tokio::spawn(s.relay);
        // 65 s of silence (past Pingora's 60 s read timeout): still open.
        tokio::time::sleep(Duration::from_secs(65)).await;
        s.client
            .write_all(&frame("still here", true))
            .await
            .unwrap();
        let mut got = vec![0u8; 16];
        s.origin.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[6..], b"still here");
        // Then 90 s of silence: closed, at the idle timeout counted from the message.
        task.await.unwrap();
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_secs(155) && lasted < Duration::from_secs(156),
            "{lasted:?}"
        );
        assert_eq!(closed(&s.stats, "idle_timeout"), 1);
        // The client got its FIN.
        assert_eq!(s.client.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_one_way_keeps_a_tunnel_open_and_the_lifetime_ends_it() {
        let mut s = relay("idle_timeout: 10s, max_lifetime: 60s", 1 << 20);
        let started = Instant::now();
        let task = tokio::spawn(s.relay);
        // The origin pushes every 5 s; the client never writes.
        let pusher = tokio::spawn(async move {
            for _ in 0..100 {
                if s.origin.write_all(&frame("tick", false)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let mut sink = vec![0u8; 1 << 16];
        let reader =
            tokio::spawn(async move { while s.client.read(&mut sink).await.unwrap_or(0) > 0 {} });
        task.await.unwrap();
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_secs(60) && lasted < Duration::from_secs(61),
            "{lasted:?}"
        );
        assert_eq!(closed(&s.stats, "max_lifetime"), 1);
        pusher.abort();
        reader.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_that_takes_nothing_is_cut_after_the_idle_timeout_either_way() {
        for client_stalls in [true, false] {
            let Setup {
                relay,
                client,
                origin,
                stats,
            } = relay_with("idle_timeout: 30s", 4096, 4096);
            let task = tokio::spawn(relay);
            let started = Instant::now();
            // Both sides talk without end; one of them never reads.
            let (reading, stalled) = match client_stalls {
                true => (origin, client),
                false => (client, origin),
            };
            let talk = |stream: DuplexStream, masked: bool, reads: bool| {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = tokio::io::split(stream);
                    if reads {
                        tokio::spawn(async move {
                            let mut sink = vec![0u8; 4096];
                            while rd.read(&mut sink).await.unwrap_or(0) > 0 {}
                        });
                    }
                    let f = frame(&"x".repeat(100), masked);
                    while wr.write_all(&f).await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
            };
            let a = talk(reading, !client_stalls, true);
            let b = talk(stalled, client_stalls, false);
            task.await.unwrap();
            let lasted = started.elapsed();
            assert!(
                lasted >= Duration::from_secs(30) && lasted < Duration::from_secs(60),
                "{lasted:?}"
            );
            assert_eq!(closed(&stats, "error"), 1, "{}", stats.prometheus_text());
            a.abort();
            b.abort();
        }
    }

    #[tokio::test]
    async fn a_client_that_never_reads_holds_at_most_one_read_per_direction() {
        // The origin's side holds a lot, the client's little.
        let s = relay_with("", 4096, 4 << 20);
        let mut t = s.relay;
        let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let to_send = sent.clone();
        let mut origin = s.origin;
        let writer = tokio::spawn(async move {
            origin.write_all(&to_send).await.unwrap();
            origin
        });
        // Relay until nothing moves: the client reads nothing.
        for _ in 0..200 {
            assert!(futures_util::poll!(&mut t).is_pending());
            tokio::task::yield_now().await;
        }
        let held = t.o2c.pending.len();
        assert!(held > 0, "the client's side never filled");
        // The documented bound: one read, 32 KiB (nginx and HAProxy hold 16 KiB).
        assert!(held <= 32 * 1024, "a stalled client pins {held} bytes");
        // The client reads again: every byte arrives, in order.
        let mut client = s.client;
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4 << 20];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        let task = tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        });
        let got = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(got == sent, "bytes were lost or reordered");
        drop(writer.await.unwrap());
        task.abort();
    }

    #[tokio::test]
    async fn half_closes_pass_both_ways_and_the_first_close_frame_names_the_closer() {
        // The client says Close and ends its side; the origin answers and ends.
        let mut s = relay("", 4096);
        let task = tokio::spawn(s.relay);
        let close = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]; // 1000, masked with a zero key
        s.client.write_all(&close).await.unwrap();
        s.client.shutdown().await.unwrap();
        let mut got = [0u8; 8];
        s.origin.read_exact(&mut got).await.unwrap();
        assert_eq!(got, close);
        // The origin saw the end of the client's side, and can still answer.
        assert_eq!(s.origin.read(&mut got).await.unwrap(), 0);
        s.origin.write_all(&[0x88, 0x02, 0x03, 0xe8]).await.unwrap();
        let mut answer = [0u8; 4];
        s.client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [0x88, 0x02, 0x03, 0xe8]);
        drop(s.origin);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed(&s.stats, "client_closed"), 1);

        // The origin ends first, without a Close frame: origin_closed.
        let mut s = relay("", 4096);
        let task = tokio::spawn(s.relay);
        s.origin.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed(&s.stats, "origin_closed"), 1);
        assert_eq!(
            s.client.read(&mut got).await.unwrap(),
            0,
            "the client got its FIN"
        );
    }

    #[tokio::test]
    async fn a_failed_write_ends_the_tunnel_as_an_error() {
        let mut s = relay("", 4096);
        let task = tokio::spawn(s.relay);
        drop(s.client);
        let _ = s.origin.write_all(&frame("to nobody", false)).await;
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            closed(&s.stats, "error") + closed(&s.stats, "client_closed"),
            1,
            "{}",
            s.stats.prometheus_text()
        );
    }

    #[tokio::test]
    async fn frames_are_counted_across_chunk_boundaries() {
        let mut s = relay("", 1 << 16);
        let task = tokio::spawn(s.relay);
        // Three messages, the second in two fragments, written a few bytes at a time.
        let mut bytes = frame("one", true);
        bytes.extend_from_slice(&[0x01, 0x83, 0, 0, 0, 0, b't', b'w', b'o']); // text, not final
        bytes.extend_from_slice(&[0x80, 0x81, 0, 0, 0, 0, b'!']); // continuation, final
        bytes.extend_from_slice(&frame("three", true));
        for piece in bytes.chunks(3) {
            s.client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut got = vec![0u8; bytes.len()];
        s.origin.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes);
        s.client.shutdown().await.unwrap();
        drop(s.origin);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let text = s.stats.prometheus_text();
        assert!(
            text.contains(
                "wsedge_ws_messages_total{direction=\"client_to_origin\",resource=\"t\"} 3"
            ),
            "{text}"
        );
    }
}
