//! The relay after the 101: one future per tunnel that moves bytes both ways until one
//! side ends, nothing moves for the idle timeout, a destination takes nothing for that
//! long, the lifetime is reached, a heartbeat goes unanswered or a side breaks a limit.
//! Then the edge says so: each side still there gets a Close frame at a frame boundary
//! (the table is [`super::closing::plan`]) and a second to answer with its own, and then
//! its FIN. Generic over the two streams (any `AsyncRead + AsyncWrite`), like linkerd's
//! `Duplex`, so it runs over in-memory pipes in tests.
//!
//! An idle tunnel holds no buffer: reads go into one buffer per worker thread and are
//! written on at once; only bytes a destination cannot take yet are kept, by the direction
//! that read them, and that direction reads again only once they are written. Every chunk
//! passes the direction's [`Scanner`], which knows where frames end: the place where a
//! frame of the edge's own (a heartbeat Ping, a Close) is written.

use super::closing::{plan, Cause, Owed, Side};
use super::frames::{Control, Fed, Rules, Say, Scanner, Stop, Violation};
use super::heartbeat::{Beat, Due};
use super::tally::{Codes, TunnelGuard};
use crate::config::WebSocket;
use crate::observe::labels::CloseReason;
use crate::observe::labels::HeartbeatResult;
use crate::policy::drain::{Drain, Kind};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::futures::OwnedNotified;
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

/// How long a Close of the edge's own waits for the frame in progress to end, and then
/// for the side's own Close in answer (RFC 6455 §7.1.1: the closing handshake).
const CLOSE_FRAME_WAIT: Duration = Duration::from_secs(1);

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    ReadError,
    WriteError,
    /// The source broke a limit: nothing more is forwarded.
    Broke(Violation),
}

/// What a direction did in one poll.
#[derive(Debug, Default)]
struct Moved {
    /// Bytes came from the source.
    read: bool,
    /// Bytes of the source's went on to the destination.
    forwarded: bool,
    /// The source's Pong with the edge's token came back.
    pong: bool,
    /// The edge's Ping went out to the destination.
    ping_out: bool,
}

/// Bytes a destination has not taken yet.
#[derive(Default)]
struct Outbox {
    /// Bytes the destination pushed back (empty, unallocated, almost always).
    pending: Vec<u8>,
    written: usize,
    /// A write went out that the stream may still hold (TLS records): flush before more.
    flush: bool,
    /// Since when `pending` has been waiting.
    stalled_since: Option<Instant>,
}

impl Outbox {
    /// Writes what waits, then flushes.
    #[inline(always)]
    fn poll_drain<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
    ) -> Poll<Result<(), ()>> {
        if self.pending.is_empty() && !self.flush {
            return Poll::Ready(Ok(()));
        }
        self.poll_drain_some(cx, dst)
    }

    /// [`Self::poll_drain`] when there is something to write or flush.
    fn poll_drain_some<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
    ) -> Poll<Result<(), ()>> {
        while self.written < self.pending.len() {
            match Pin::new(&mut *dst).poll_write(cx, &self.pending[self.written..]) {
                Poll::Ready(Ok(n)) if n > 0 => self.written += n,
                Poll::Ready(_) => return Poll::Ready(Err(())),
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
                Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bytes` now, after what waits; what the destination does not take is kept.
    #[inline(always)]
    fn put<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        bytes: &[u8],
    ) -> Result<(), ()> {
        if !self.pending.is_empty() {
            self.keep(bytes);
            return Ok(());
        }
        let mut done = 0;
        while done < bytes.len() {
            match Pin::new(&mut *dst).poll_write(cx, &bytes[done..]) {
                Poll::Ready(Ok(n)) if n > 0 => done += n,
                Poll::Ready(_) => return Err(()),
                Poll::Pending => {
                    self.keep(&bytes[done..]);
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
        self.stalled_since.get_or_insert_with(Instant::now);
    }

    /// Everything was written and flushed.
    fn empty(&self) -> bool {
        self.pending.is_empty() && !self.flush
    }
}

/// One direction: its scanner, what its destination has not taken, and a frame of the
/// edge's own waiting for a boundary.
struct Half {
    out: Outbox,
    scan: Scanner,
    /// A frame of the edge's own, written at the next frame boundary.
    inject: Option<Control>,
    /// Frames the edge writes this way are masked: they go to an origin (§5.3).
    masked: bool,
    /// The source is not read any more (it ended, or its side is cut).
    src_done: bool,
    /// A write to the destination failed.
    dst_failed: bool,
    /// The code of the Close the edge wrote this way.
    sent_close: Option<u16>,
}

impl Half {
    fn new(rules: Rules, masked: bool) -> Half {
        Half {
            out: Outbox::default(),
            scan: Scanner::new(rules),
            inject: None,
            masked,
            src_done: false,
            dst_failed: false,
            sent_close: None,
        }
    }

    /// Moves bytes from `src` to `dst` until either blocks, each chunk through the scanner
    /// and then `account`. Ready means this direction ended.
    #[inline(always)]
    fn poll_move<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        mut account: impl FnMut(&Fed),
        moved: &mut Moved,
    ) -> Poll<End>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        for _ in 0..ROUNDS {
            // What the destination pushed back goes first, then a flush.
            match self.out.poll_drain(cx, dst) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(())) => return Poll::Ready(End::WriteError),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(c) = self.inject.filter(|_| self.scan.at_boundary()) {
                if self.write_control(cx, dst, c, moved).is_err() {
                    return Poll::Ready(End::WriteError);
                }
                continue;
            }
            if self.src_done {
                return Poll::Pending;
            }
            let step = READ_BUF.with_borrow_mut(|buf| {
                let mut read = ReadBuf::new(buf);
                match Pin::new(&mut *src).poll_read(cx, &mut read) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(_)) => Poll::Ready(Some(End::ReadError)),
                    Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(Some(End::Eof)),
                    Poll::Ready(Ok(())) => {
                        moved.read = true;
                        Poll::Ready(self.pass(cx, dst, read.filled(), &mut account, moved))
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

    /// Passes a chunk just read through the scanner to the destination, with the edge's
    /// frame at the first boundary if one waits. Some(end) when the direction ended.
    #[inline(always)]
    fn pass<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        mut chunk: &[u8],
        account: &mut impl FnMut(&Fed),
        moved: &mut Moved,
    ) -> Option<End> {
        loop {
            let mut failed = false;
            let out = &mut self.out;
            let fed = self
                .scan
                .feed(chunk, self.inject.is_some(), &mut |bytes: &[u8]| {
                    failed = failed || out.put(cx, dst, bytes).is_err();
                });
            account(&fed);
            moved.forwarded |= fed.forwarded > 0;
            moved.pong |= fed.pong;
            if failed {
                return Some(End::WriteError);
            }
            chunk = &chunk[fed.consumed..];
            match fed.stop {
                Some(Stop::Boundary) => {
                    if let Some(c) = self.inject {
                        if self.write_control(cx, dst, c, moved).is_err() {
                            return Some(End::WriteError);
                        }
                    }
                }
                Some(Stop::Violation(v)) => return Some(End::Broke(v)),
                None => return None,
            }
        }
    }

    /// Passes bytes that came with the handshake: kept, to be written first. Some when
    /// they break a limit.
    fn pass_early(&mut self, chunk: &[u8], mut account: impl FnMut(&Fed)) -> Option<Violation> {
        let out = &mut self.out;
        let fed = self
            .scan
            .feed(chunk, false, &mut |bytes: &[u8]| out.keep(bytes));
        account(&fed);
        match fed.stop {
            Some(Stop::Violation(v)) => Some(v),
            _ => None,
        }
    }

    /// Writes a frame of the edge's own (the scanner is at a boundary).
    fn write_control<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
        c: Control,
        moved: &mut Moved,
    ) -> Result<(), ()> {
        self.inject = None;
        let mask = self.masked.then(rand::random::<[u8; 4]>);
        let (frame, len) = c.encode(mask);
        self.out.put(cx, dst, &frame[..len])?;
        match c {
            Control::Ping(_) => moved.ping_out = true,
            Control::Close(code, _) => {
                // After its Close nothing more goes this way (§5.5.1).
                self.sent_close = Some(code);
                self.scan.seal();
            }
        }
        Ok(())
    }

    /// Queues a Close for this direction's destination, unless one went that way already
    /// or none can be written (the stream is not WebSocket, or the destination failed).
    /// Whether one is owed.
    fn owe_close(&mut self, owed: Owed) -> bool {
        let Some((code, say)) = owed else {
            return false;
        };
        if self.scan.close_forwarded()
            || self.sent_close.is_some()
            || self.dst_failed
            || self.scan.stuck()
        {
            return false;
        }
        self.inject = Some(Control::Close(code, say));
        true
    }
}

/// The edge's heartbeats on a tunnel (boxed: a tunnel without them carries a pointer).
struct Beats {
    client: Option<Beat>,
    origin: Option<Beat>,
}

/// Where the edge's Close to one side stands, once the tunnel is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owing {
    /// Queued, waiting for a frame boundary.
    Waiting,
    /// Written at this time; the side's own Close is awaited.
    Sent(Instant),
    /// Nothing (more) to wait for from this side.
    Done,
}

/// A tunnel that the edge is ending.
struct Ending {
    reason: CloseReason,
    /// Until when a queued Close may wait for a frame boundary.
    boundary_until: Instant,
    client: Owing,
    origin: Owing,
    /// The client's connection is to be shut at once (it is presumed gone).
    shut_client: bool,
    /// No side had sent a Close when the edge decided to end: the edge's, if it writes
    /// one, is the tunnel's first.
    first: bool,
}

/// A tunnel's link to the edge's drain: woken when one starts or is cancelled, and the
/// moment this tunnel is to be told to go.
struct DrainLink {
    hub: Arc<Drain>,
    /// Holds the task's waker in the drain's list (registered at the first poll; polled
    /// again only when the drain changed, as each poll of it takes the list's lock).
    wake: Pin<Box<OwnedNotified>>,
    /// The drain's epoch when this tunnel last looked (`None`: not yet registered).
    seen: Option<u64>,
    /// This tunnel's moment, and the drain (generation) it was drawn for.
    at: Option<(Instant, u64)>,
}

impl DrainLink {
    fn new(hub: &Arc<Drain>) -> DrainLink {
        let mut link = DrainLink {
            hub: hub.clone(),
            wake: Box::pin(hub.waiter()),
            seen: None,
            at: None,
        };
        // A tunnel opened as a drain began is drawn a moment in it like the others.
        link.redraw();
        link
    }

    /// Draws this tunnel's moment for the drain that runs (kept if already drawn for it),
    /// or forgets it if none runs.
    fn redraw(&mut self) {
        self.at = self.hub.order().map(|o| match self.at {
            Some((at, generation)) if generation == o.generation => (at, generation),
            _ => (o.moment(), o.generation),
        });
    }

    /// Whether the drain changed since the last look; if so, the waiter is armed again
    /// (with the task's waker) and the moment redrawn. One atomic load otherwise.
    #[inline(always)]
    fn changed(&mut self, cx: &mut Context<'_>) -> bool {
        let epoch = self.hub.epoch();
        if self.seen == Some(epoch) {
            return false;
        }
        self.rearm(cx);
        true
    }

    /// The drain changed (or this is the first look): the waiter is armed again and the
    /// moment redrawn. Kept out of line: the relay's hot path only compares the epoch.
    #[cold]
    #[inline(never)]
    fn rearm(&mut self, cx: &mut Context<'_>) {
        self.seen = Some(self.hub.arm(&mut self.wake, cx));
        self.redraw();
    }

    /// The Close this tunnel is to send now, if its moment came in the drain that runs.
    fn due(&mut self, now: Instant, next: &mut Instant) -> Option<Cause> {
        let (at, generation) = self.at?;
        if now < at {
            *next = (*next).min(at);
            return None;
        }
        let Some(order) = self.hub.order().filter(|o| o.generation == generation) else {
            self.at = None;
            return None;
        };
        let say = match order.kind {
            Kind::Shutdown => Say::GoingAway,
            Kind::Upgrade => Say::Restarting,
            Kind::Admin => Say::Draining,
        };
        Some(Cause::Drain(order.close_code, say))
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
    /// Armed once and moved only when it fires (or when a Ping went out): traffic just
    /// records the time.
    timer: Pin<Box<Sleep>>,
    /// The timer was polled since it was last set, so it holds this task's waker (a reset
    /// keeps it): until its deadline, it need not be polled again.
    timer_polled: bool,
    /// The client is done sending after its Close; the origin was (`origin_shut`) or is
    /// being shut down for writing.
    client_eof: bool,
    origin_shut: bool,
    /// Whether the client's stream needs a shutdown to end (TLS: close_notify); a bare
    /// socket's FIN comes with its close.
    shutdown_client: bool,
    beats: Option<Box<Beats>>,
    drain: Option<DrainLink>,
    ending: Option<Box<Ending>>,
    /// Set once the relay ended: the FIN to the client is on its way.
    closing: bool,
    /// The timer bounds a client's shutdown that did not complete at once.
    close_wait_set: bool,
}

impl<C, O> Relay<C, O>
where
    C: AsyncRead + AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite + Unpin,
{
    /// A relay between `client` and `origin` under the resource's `ws` settings; `early`
    /// holds bytes each side sent along with the handshake (client's, origin's), which go
    /// first. With `drain`, the tunnel is told to go when a drain of the edge comes to it.
    pub(crate) fn new(
        client: C,
        origin: O,
        ws: &WebSocket,
        guard: TunnelGuard,
        early: [Option<Bytes>; 2],
        shutdown_client: bool,
        drain: Option<&Arc<Drain>>,
    ) -> Relay<C, O> {
        let now = Instant::now();
        let idle = ws.idle_timeout;
        // Far enough to never fire when no lifetime is set (tokio caps deadlines anyway).
        let lifetime_end = now
            + ws.max_lifetime
                .unwrap_or(Duration::from_secs(100 * 365 * 86_400));
        let hb = ws.heartbeat.as_ref();
        let c2o_rules = Rules {
            max_message: ws.max_message_size,
            rate: ws.message_rate.map(|r| (r.per_second, r.burst)),
            pongs: hb.is_some(),
        };
        let o2c_rules = Rules {
            max_message: ws.max_message_size,
            rate: None,
            pongs: hb.is_some_and(|h| h.origin),
        };
        let beats = hb.map(|h| {
            Box::new(Beats {
                client: Some(Beat::new(h, now)),
                origin: h.origin.then(|| Beat::new(h, now)),
            })
        });
        let first_beat = hb.map_or(lifetime_end, |h| now + h.interval);
        let drain = drain.map(DrainLink::new);
        let first_beat = match drain.as_ref().and_then(|d| d.at) {
            Some((at, _)) => first_beat.min(at),
            None => first_beat,
        };
        let mut relay = Relay {
            client,
            origin,
            guard,
            c2o: Half::new(c2o_rules, true),
            o2c: Half::new(o2c_rules, false),
            idle,
            lifetime_end,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(
                (now + idle).min(lifetime_end).min(first_beat),
            )),
            timer_polled: false,
            client_eof: false,
            origin_shut: false,
            shutdown_client,
            beats,
            drain,
            ending: None,
            closing: false,
            close_wait_set: false,
        };
        // Bytes that came with the handshake go first, through the scanners like any
        // other (a frame that breaks a limit among them ends the tunnel at once).
        let [from_client, from_origin] = early;
        let guard = &mut relay.guard;
        let client_broke =
            from_client.and_then(|b| relay.c2o.pass_early(&b, |f| guard.client_to_origin(f)));
        let origin_broke =
            from_origin.and_then(|b| relay.o2c.pass_early(&b, |f| guard.origin_to_client(f)));
        match (client_broke, origin_broke) {
            (Some(v), _) => relay.begin_end(Cause::Broke(Side::Client, v)),
            (None, Some(v)) => relay.begin_end(Cause::Broke(Side::Origin, v)),
            (None, None) => {}
        }
        relay
    }

    /// Moves bytes both ways; Ready with the cause when the tunnel is to end.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<Cause> {
        self.poll_drain(cx);
        let mut from_client = Moved::default();
        let mut from_origin = Moved::default();
        if !self.client_eof {
            let guard = &mut self.guard;
            let end = self.c2o.poll_move(
                cx,
                &mut self.client,
                &mut self.origin,
                |f| guard.client_to_origin(f),
                &mut from_client,
            );
            let closed = self.c2o.scan.close_forwarded();
            match end {
                Poll::Pending => {}
                // The client is done sending after its Close; the origin may still answer
                // with its own: half-close towards it and keep relaying its side.
                Poll::Ready(End::Eof) if closed => self.client_eof = true,
                Poll::Ready(end) => return Poll::Ready(self.client_end(end, closed)),
            }
        }
        if self.client_eof && !self.origin_shut {
            if let Poll::Ready(r) = Pin::new(&mut self.origin).poll_shutdown(cx) {
                self.origin_shut = true;
                if r.is_err() {
                    return Poll::Ready(Cause::Done(CloseReason::ClientClosed));
                }
            }
        }
        let guard = &mut self.guard;
        let o2c = self.o2c.poll_move(
            cx,
            &mut self.origin,
            &mut self.client,
            |f| guard.origin_to_client(f),
            &mut from_origin,
        );
        let now = self.note(&from_client, &from_origin);
        match o2c {
            Poll::Pending => self.poll_limits(cx, now),
            Poll::Ready(end) => Poll::Ready(self.origin_end(end)),
        }
    }

    /// Why the tunnel ends when the client's direction ended with `end`.
    #[cold]
    #[inline(never)]
    fn client_end(&mut self, end: End, after_close: bool) -> Cause {
        match end {
            End::Eof | End::ReadError => {
                self.c2o.src_done = true;
                // After a Close either way, a side's end without its own is the end of
                // the closing handshake, not a failure to report.
                let closing = after_close || self.o2c.scan.close_forwarded();
                match (end, closing) {
                    (End::Eof, true) => Cause::Done(CloseReason::ClientClosed),
                    (_, true) => Cause::Done(CloseReason::Error),
                    _ => Cause::Ended {
                        side: Side::Client,
                        error: end == End::ReadError,
                    },
                }
            }
            End::WriteError => {
                self.c2o.dst_failed = true;
                Cause::WriteFailed(Side::Origin)
            }
            End::Broke(v) => Cause::Broke(Side::Client, v),
        }
    }

    /// Why the tunnel ends when the origin's direction ended with `end`.
    #[cold]
    #[inline(never)]
    fn origin_end(&mut self, end: End) -> Cause {
        match end {
            End::Eof | End::ReadError => {
                self.o2c.src_done = true;
                // After the client's Close and end, the origin's end closes the tunnel.
                if self.client_eof {
                    return Cause::Done(CloseReason::ClientClosed);
                }
                let closing = self.o2c.scan.close_forwarded() || self.c2o.scan.close_forwarded();
                match (end, closing) {
                    (End::Eof, true) => Cause::Done(CloseReason::OriginClosed),
                    (_, true) => Cause::Done(CloseReason::Error),
                    _ => Cause::Ended {
                        side: Side::Origin,
                        error: end == End::ReadError,
                    },
                }
            }
            End::WriteError => {
                self.o2c.dst_failed = true;
                Cause::WriteFailed(Side::Client)
            }
            End::Broke(v) => Cause::Broke(Side::Origin, v),
        }
    }

    /// Records what moved: the time of the last application data (the edge's pings and
    /// the pongs they bring are not application data), and heartbeats heard and sent.
    /// Returns the time it read, if it read the clock.
    fn note(&mut self, c: &Moved, o: &Moved) -> Option<Instant> {
        if !(c.read || o.read || c.ping_out || o.ping_out) {
            return None;
        }
        let now = Instant::now();
        if c.forwarded || o.forwarded {
            self.last_activity = now;
            self.guard.progress(now.into_std());
        }
        let Some(beats) = self.beats.as_deref_mut() else {
            return Some(now);
        };
        // The client's heartbeat: its bytes come on c2o, its pings go on o2c.
        for (beat, side, from, toward) in [
            (beats.client.as_mut(), Side::Client, c, o),
            (beats.origin.as_mut(), Side::Origin, o, c),
        ] {
            let Some(beat) = beat else { continue };
            if from.read {
                beat.heard(now);
            }
            if from.pong {
                beat.answered();
                self.guard.heartbeat(side, HeartbeatResult::Answered);
            }
            if toward.ping_out {
                beat.sent(now);
                self.guard.heartbeat(side, HeartbeatResult::Sent);
                // The timer may be set later than the answer is due.
                if let Some(due) = beat.next().filter(|&d| d < self.timer.deadline()) {
                    self.timer.as_mut().reset(due);
                    self.timer_polled = false;
                }
            }
        }
        Some(now)
    }

    /// A drain started or was cancelled: this tunnel's moment is drawn (or forgotten), and
    /// the timer set for it.
    #[inline(always)]
    fn poll_drain(&mut self, cx: &mut Context<'_>) {
        let Some(link) = self.drain.as_mut() else {
            return;
        };
        if !link.changed(cx) {
            return;
        }
        if let Some((at, _)) = link.at.filter(|&(at, _)| at < self.timer.deadline()) {
            self.timer.as_mut().reset(at);
            self.timer_polled = false;
        }
    }

    /// When the timer fires: whether a limit was reached or a heartbeat is due, else the
    /// timer is moved on. `seen` is the time this poll read, if it read the clock: a timer
    /// that holds this task's waker and is not due by then has not fired, and is not
    /// polled (most polls of a busy tunnel are for a message, not for the timer).
    fn poll_limits(&mut self, cx: &mut Context<'_>, seen: Option<Instant>) -> Poll<Cause> {
        if self.timer_polled && seen.is_some_and(|now| now < self.timer.deadline()) {
            return Poll::Pending;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if now >= self.lifetime_end {
                return Poll::Ready(Cause::MaxLifetime);
            }
            let idle_end = self.last_activity + self.idle;
            if now >= idle_end {
                return Poll::Ready(Cause::IdleTimeout);
            }
            // A destination that takes nothing for the idle timeout is as good as gone,
            // even while the other direction talks.
            let mut next = idle_end.min(self.lifetime_end);
            for (stalled, side) in [
                (self.c2o.out.stalled_since, Side::Origin),
                (self.o2c.out.stalled_since, Side::Client),
            ] {
                if let Some(since) = stalled {
                    if now >= since + self.idle {
                        return Poll::Ready(Cause::Stalled(side));
                    }
                    next = next.min(since + self.idle);
                }
            }
            if let Some(cause) = self.drain.as_mut().and_then(|d| d.due(now, &mut next)) {
                self.guard.drained();
                return Poll::Ready(cause);
            }
            if let Some(cause) = self.beat(cx, now, &mut next) {
                return Poll::Ready(cause);
            }
            self.timer.as_mut().reset(next);
        }
        self.timer_polled = true;
        Poll::Pending
    }

    /// The heartbeats at `now`: a Ping queued for a quiet side, or a side that did not
    /// answer; `next` is moved to when they next need a look.
    #[cold]
    #[inline(never)]
    fn beat(&mut self, cx: &mut Context<'_>, now: Instant, next: &mut Instant) -> Option<Cause> {
        let beats = self.beats.as_deref_mut()?;
        // Once a closing handshake began, the edge sends no more pings.
        let closing = self.c2o.scan.close_seen() || self.o2c.scan.close_seen();
        for (beat, side) in [
            (beats.client.as_mut(), Side::Client),
            (beats.origin.as_mut(), Side::Origin),
        ] {
            let Some(beat) = beat else { continue };
            let (toward, from) = match side {
                Side::Client => (&mut self.o2c, &mut self.c2o),
                Side::Origin => (&mut self.c2o, &mut self.o2c),
            };
            // While what the side sent waits for the other side to take it, the side is
            // not read: its silence (and its Pong's) is the other side's doing. The stall
            // rule (idle_timeout) covers that.
            if !from.out.empty() {
                beat.heard(now);
            }
            if closing || toward.scan.lost() || from.scan.lost() {
                beat.stop();
                continue;
            }
            match beat.due(now) {
                Some(Due::Ping(token)) => {
                    from.scan.expect_pong(token);
                    toward.inject = Some(Control::Ping(token));
                    // The direction toward the side writes it at its next boundary.
                    cx.waker().wake_by_ref();
                }
                Some(Due::Timeout) => {
                    self.guard.heartbeat(side, HeartbeatResult::Timeout);
                    return Some(Cause::Heartbeat(side));
                }
                None => {}
            }
            if let Some(t) = beat.next() {
                *next = (*next).min(t);
            }
        }
        None
    }

    /// The tunnel is to end for `cause`: the Close frames it owes are queued.
    #[cold]
    #[inline(never)]
    fn begin_end(&mut self, cause: Cause) {
        let plan = plan(cause);
        let owing = |owed: bool| if owed { Owing::Waiting } else { Owing::Done };
        let client = owing(self.o2c.owe_close(plan.to_client));
        let origin = owing(self.c2o.owe_close(plan.to_origin));
        if plan.cut_client {
            self.o2c.scan.seal();
            self.c2o.src_done = true;
        }
        if plan.cut_origin {
            self.c2o.scan.seal();
            self.o2c.src_done = true;
        }
        let first = !(self.c2o.scan.close_seen() || self.o2c.scan.close_seen());
        // Nothing is written toward a side that is cut, a Ping that waited included.
        if plan.cut_client {
            self.o2c.inject = None;
        }
        if plan.cut_origin {
            self.c2o.inject = None;
        }
        self.ending = Some(Box::new(Ending {
            reason: plan.reason,
            boundary_until: Instant::now() + CLOSE_FRAME_WAIT,
            client,
            origin,
            shut_client: plan.cut_client,
            first,
        }));
    }

    /// Drives an ending tunnel: each owed Close written at a boundary, each side's own
    /// Close awaited, all within bounds. Ready when there is nothing more to wait for.
    #[cold]
    #[inline(never)]
    fn poll_ending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(e) = self.ending.as_deref_mut() else {
                return Poll::Ready(());
            };
            if e.shut_client && Pin::new(&mut self.client).poll_shutdown(cx).is_ready() {
                e.shut_client = false;
            }
            if e.client == Owing::Done && e.origin == Owing::Done {
                // A cut client's close_notify that did not go out yet is left to the
                // closing phase, which bounds it.
                return Poll::Ready(());
            }
            let guard = &mut self.guard;
            let mut moved = Moved::default();
            let c2o = self.c2o.poll_move(
                cx,
                &mut self.client,
                &mut self.origin,
                |f| guard.client_to_origin(f),
                &mut moved,
            );
            self.c2o.ended(c2o);
            let o2c = self.o2c.poll_move(
                cx,
                &mut self.origin,
                &mut self.client,
                |f| guard.origin_to_client(f),
                &mut moved,
            );
            self.o2c.ended(o2c);
            let now = Instant::now();
            e.client = e
                .client
                .step(&mut self.o2c, &self.c2o, e.boundary_until, now);
            e.origin = e
                .origin
                .step(&mut self.c2o, &self.o2c, e.boundary_until, now);
            let next = [e.client, e.origin]
                .into_iter()
                .filter_map(|o| match o {
                    Owing::Waiting => Some(e.boundary_until),
                    Owing::Sent(at) => Some(at + CLOSE_FRAME_WAIT),
                    Owing::Done => None,
                })
                .min();
            let Some(next) = next else {
                continue;
            };
            if self.timer.deadline() != next {
                self.timer.as_mut().reset(next);
                self.timer_polled = false;
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// The close codes for the log.
    fn codes(&self, edge: Option<u16>) -> Codes {
        Codes {
            client: self.c2o.scan.close_code(),
            origin: self.o2c.scan.close_code(),
            edge,
        }
    }
}

impl Half {
    /// Records how a direction of an ending tunnel ended, if it did.
    fn ended(&mut self, end: Poll<End>) {
        match end {
            Poll::Ready(End::Eof | End::ReadError) => self.src_done = true,
            Poll::Ready(End::WriteError) => {
                // Nothing more can go this way; what waited is dropped.
                self.dst_failed = true;
                self.scan.seal();
                self.out = Outbox::default();
                self.inject = None;
            }
            Poll::Ready(End::Broke(_)) | Poll::Pending => {}
        }
    }
}

impl Owing {
    /// Where the Close to a side stands now: `toward` is the direction to the side, `from`
    /// the direction from it.
    fn step(self, toward: &mut Half, from: &Half, boundary_until: Instant, now: Instant) -> Owing {
        match self {
            Owing::Waiting if toward.sent_close.is_some() && toward.out.empty() => Owing::Sent(now),
            // The frame in progress never ends (its source ended, or is not WebSocket),
            // or not in time, or the side is gone: it is cut without a Close.
            Owing::Waiting
                if toward.dst_failed
                    || now >= boundary_until
                    || (toward.inject.is_some()
                        && (toward.scan.stuck()
                            || (toward.src_done && !toward.scan.at_boundary()))) =>
            {
                toward.inject = None;
                Owing::Done
            }
            Owing::Sent(at)
                if from.scan.close_seen() || from.src_done || now >= at + CLOSE_FRAME_WAIT =>
            {
                Owing::Done
            }
            other => other,
        }
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
            if this.ending.is_none() {
                let Poll::Ready(cause) = this.poll_open(cx) else {
                    return Poll::Pending;
                };
                this.begin_end(cause);
            }
            if this.poll_ending(cx).is_pending() {
                return Poll::Pending;
            }
            let (reason, first) = this
                .ending
                .take()
                .map_or((CloseReason::Error, false), |e| (e.reason, e.first));
            // The edge's code for the log: the one it wrote to the client, else to the
            // origin, when its Close was the tunnel's first.
            let edge = first
                .then(|| this.o2c.sent_close.or(this.c2o.sent_close))
                .flatten();
            let codes = this.codes(edge);
            this.guard.finish(reason, codes);
            this.closing = true;
        }
        // A TLS client gets its close_notify and FIN, bounded: it may have stopped reading.
        if !this.shutdown_client || Pin::new(&mut this.client).poll_shutdown(cx).is_ready() {
            return Poll::Ready(());
        }
        // The bound is set only for a shutdown that waits: moving the timer earlier wakes
        // the runtime's driver (an eventfd write), which most tunnels' ends need not pay.
        if !this.close_wait_set {
            this.close_wait_set = true;
            this.timer.as_mut().reset(Instant::now() + CLOSE_WAIT);
            this.timer_polled = false;
        }
        if this.timer.as_mut().poll(cx).is_ready() {
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
        let (edge_client, client) = tokio::io::duplex(client_capacity);
        let (edge_origin, origin) = tokio::io::duplex(origin_capacity);
        Setup {
            relay: relay_between(edge_client, edge_origin, keys, &stats),
            client,
            origin,
            stats,
        }
    }

    /// A relay between the edge's ends of a client and an origin, counted in `stats`.
    fn relay_between<C: AsyncRead + AsyncWrite + Unpin>(
        client: C,
        origin: DuplexStream,
        keys: &str,
        stats: &Arc<EdgeStats>,
    ) -> Relay<C, DuplexStream> {
        let guard = tunnel_guard(stats);
        Relay::new(
            client,
            origin,
            &websocket(keys),
            guard,
            [None, None],
            true,
            None,
        )
    }

    /// A tunnel's accounting, counted in `stats` as resource "t".
    fn tunnel_guard(stats: &Arc<EdgeStats>) -> TunnelGuard {
        let site = stats.resource("t");
        let slot = Slot::reserve(&Arc::new(ResourceLimits::default()), None, None).unwrap();
        let report = Reporting {
            site,
            log: Arc::new(AccessLog::off()),
            metrics: true,
            analytics: None,
        };
        let info = TunnelInfo {
            resource: "t".into(),
            client: String::new(),
            host: String::new(),
            path: "/".into(),
            client_ip: None,
            tls: false,
            detachable: false,
            h2: false,
        };
        TunnelGuard::new(info, report, slot, "127.0.0.1:1".parse().unwrap())
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

    /// Reads one frame: opcode, unmasked payload, whether it was masked.
    async fn read_frame(s: &mut DuplexStream) -> (u8, Vec<u8>, bool) {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h[0] & 0x70, 0, "no RSV bits");
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from_be_bytes(b);
        }
        let masked = h[1] & 0x80 != 0;
        let mut key = [0u8; 4];
        if masked {
            s.read_exact(&mut key).await.unwrap();
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        (h[0] & 0x0f, payload, masked)
    }

    /// A Close frame with `code`, masked with a zero key or not.
    fn close_frame(code: u16, masked: bool) -> Vec<u8> {
        let mut f = vec![0x88, 2 | if masked { 0x80 } else { 0 }];
        if masked {
            f.extend_from_slice(&[0, 0, 0, 0]);
        }
        f.extend_from_slice(&code.to_be_bytes());
        f
    }

    /// A frame with `opcode` and `payload` masked with `key` (a client's).
    fn masked(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_client_is_pinged_its_pong_stays_out_of_the_origin_and_idle_is_untouched() {
        let mut s = relay(
            "idle_timeout: 10s, heartbeat: { interval: 2s, timeout: 1s }",
            4096,
        );
        let started = Instant::now();
        let task = tokio::spawn(s.relay);
        // Three pings, two seconds apart, each answered at once.
        for n in 1..=3u64 {
            let (op, token, masked) = read_frame(&mut s.client).await;
            assert_eq!((op, token.len(), masked), (9, 8, false), "ping {n}");
            assert_eq!(started.elapsed().as_secs(), 2 * n);
            s.client.write_all(&masked_pong(&token)).await.unwrap();
        }
        // Application data still flows, and the origin saw none of the pongs.
        s.client.write_all(&frame("data", true)).await.unwrap();
        let mut got = [0u8; 10];
        s.origin.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[6..], b"data");
        // Pings are not traffic: the idle timeout counts from the data at 6 s.
        let (op, _, _) = read_frame(&mut s.client).await; // the ping at 8 s, unanswered
        assert_eq!(op, 9);
        task.await.unwrap();
        // The unanswered ping at 8 s ends it at 9 s: heartbeat_timeout, the origin told 1001.
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_secs(9) && lasted < Duration::from_secs(11),
            "{lasted:?}"
        );
        assert_eq!(closed(&s.stats, "heartbeat_timeout"), 1);
        let (op, payload, masked) = read_frame(&mut s.origin).await;
        assert_eq!((op, masked), (8, true));
        assert_eq!(payload, b"\x03\xe9heartbeat timeout");
        // The client got no Close: its connection is closed.
        assert_eq!(s.client.read(&mut got).await.unwrap(), 0);
        let text = s.stats.prometheus_text();
        for (result, n) in [("sent", 4), ("answered", 3), ("timeout", 1)] {
            let series = format!(
                "wsedge_ws_heartbeats_total{{peer=\"client\",resource=\"t\",result=\"{result}\"}} {n}"
            );
            assert!(text.contains(&series), "{series}\n{text}");
        }
    }

    /// The client's Pong to `token`, masked.
    fn masked_pong(token: &[u8]) -> Vec<u8> {
        masked(0xA, token, [0x11, 0x22, 0x33, 0x44])
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_held_back_by_an_origin_that_does_not_read_is_not_timed_out() {
        // The origin reads nothing: the client's bytes (and its Pongs) wait in the edge,
        // unread. That is the origin's stall, ended at the idle timeout, not the client's
        // heartbeat.
        let s = relay_with(
            "idle_timeout: 30s, heartbeat: { interval: 1s, timeout: 1s }",
            1 << 16,
            4096,
        );
        let started = Instant::now();
        let task = tokio::spawn(s.relay);
        let mut client = s.client;
        let writer = tokio::spawn(async move {
            let f = frame(&"x".repeat(100), true);
            for _ in 0..2000 {
                if client.write_all(&f).await.is_err() {
                    break;
                }
            }
            client
        });
        task.await.unwrap();
        let lasted = started.elapsed();
        assert!(lasted >= Duration::from_secs(30), "{lasted:?}");
        assert_eq!(closed(&s.stats, "heartbeat_timeout"), 0);
        assert_eq!(
            closed(&s.stats, "idle_timeout") + closed(&s.stats, "error"),
            1,
            "{}",
            s.stats.prometheus_text()
        );
        writer.abort();
        drop(s.origin);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_waits_for_the_end_of_a_frame_in_progress() {
        let mut s = relay(
            "idle_timeout: 60s, heartbeat: { interval: 1s, timeout: 5s }",
            1 << 16,
        );
        let task = tokio::spawn(s.relay);
        // The origin starts a 1000-byte frame, half of it now, the rest after 3 s.
        let mut big = vec![0x82, 126, 0x03, 0xe8];
        big.extend((0..1000u32).map(|i| i as u8));
        s.origin.write_all(&big[..504]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.origin.write_all(&big[504..]).await.unwrap();
        // The client reads the whole frame, then the ping.
        let (op, payload, _) = read_frame(&mut s.client).await;
        assert_eq!((op, payload.as_slice()), (2, &big[4..]));
        let (op, token, _) = read_frame(&mut s.client).await;
        assert_eq!((op, token.len()), (9, 8));
        drop(s.client);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_pong_with_another_payload_and_pings_of_the_endpoints_pass_untouched() {
        let mut s = relay("heartbeat: { interval: 1s }", 4096);
        let task = tokio::spawn(s.relay);
        let (_, token, _) = read_frame(&mut s.client).await;
        // An unsolicited pong, a ping of the client's, then ours.
        let mut other = token.clone();
        other[0] ^= 0xff;
        let mut sent = masked_pong(&other);
        sent.extend(masked(0x9, b"client ping", [1, 2, 3, 4]));
        s.client.write_all(&sent).await.unwrap();
        s.client.write_all(&masked_pong(&token)).await.unwrap();
        s.client.write_all(&frame("after", true)).await.unwrap();
        let mut want = sent.clone();
        want.extend(frame("after", true));
        let mut got = vec![0u8; want.len()];
        s.origin.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        // The origin's ping passes to the client.
        s.origin.write_all(&[0x89, 0x01, b'o']).await.unwrap();
        let (op, payload, _) = read_frame(&mut s.client).await;
        assert_eq!((op, payload.as_slice()), (9, &b"o"[..]));
        drop(s.client);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_message_over_the_limit_tells_the_sender_1009_and_the_other_side_1001() {
        let mut s = relay("max_message_size: 1KiB", 1 << 16);
        let task = tokio::spawn(s.relay);
        let small = frame("fits", true);
        let mut big = vec![0x82, 0x80 | 126, 0x08, 0x00, 0, 0, 0, 0];
        big.extend(std::iter::repeat_n(7u8, 2048));
        let mut sent = small.clone();
        sent.extend(&big);
        s.client.write_all(&sent).await.unwrap();
        // The origin gets what fits, then a Close; not a byte of the big frame.
        let mut got = vec![0u8; small.len()];
        s.origin.read_exact(&mut got).await.unwrap();
        assert_eq!(got, small);
        let (op, payload, _) = read_frame(&mut s.origin).await;
        assert_eq!(
            (op, payload.as_slice()),
            (8, &b"\x03\xe9client message too big"[..])
        );
        let (op, payload, _) = read_frame(&mut s.client).await;
        assert_eq!(
            (op, payload.as_slice()),
            (8, &b"\x03\xf1message too big"[..])
        );
        s.client.write_all(&close_frame(1009, true)).await.unwrap();
        s.origin.write_all(&close_frame(1001, false)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed(&s.stats, "message_too_big"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_messages_from_the_client_end_with_1008() {
        let mut s = relay("message_rate: { rate: 10/s, burst: 5 }", 1 << 16);
        let task = tokio::spawn(s.relay);
        let one = frame("m", true);
        let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 8).collect();
        s.client.write_all(&burst).await.unwrap();
        let mut got = vec![0u8; one.len() * 5];
        s.origin.read_exact(&mut got).await.unwrap();
        let (op, payload, _) = read_frame(&mut s.origin).await;
        assert_eq!((op, &payload[..2]), (8, &[0x03, 0xe9][..]));
        let (op, payload, _) = read_frame(&mut s.client).await;
        assert_eq!(
            (op, payload.as_slice()),
            (8, &b"\x03\xf0message rate exceeded"[..])
        );
        task.await.unwrap();
        assert_eq!(closed(&s.stats, "message_rate"), 1);
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
        // Then 90 s of silence: both sides are told, at the idle timeout counted from the
        // message.
        let (op, payload, masked) = read_frame(&mut s.client).await;
        assert_eq!(started.elapsed().as_secs(), 155);
        assert_eq!((op, masked), (8, false));
        assert_eq!(payload, b"\x03\xe9idle timeout");
        let (op, payload, masked) = read_frame(&mut s.origin).await;
        assert_eq!((op, masked), (8, true), "frames to an origin are masked");
        assert_eq!(payload, b"\x03\xe9idle timeout");
        // The client answers its Close; the origin does not and gets a second.
        s.client.write_all(&close_frame(1001, true)).await.unwrap();
        task.await.unwrap();
        let lasted = started.elapsed();
        assert!(
            lasted >= Duration::from_secs(156) && lasted < Duration::from_secs(157),
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
        // At the lifetime both sides get a Close; neither answers, a second is given.
        assert!(
            lasted >= Duration::from_secs(60) && lasted < Duration::from_secs(62),
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
        let held = t.o2c.out.pending.len();
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

        // The origin ends first, without a Close frame: origin_closed, and the client is
        // told 1014 (bad gateway) rather than seeing its connection vanish.
        let mut s = relay("", 4096);
        let task = tokio::spawn(s.relay);
        s.origin.shutdown().await.unwrap();
        let (op, payload, _) = read_frame(&mut s.client).await;
        assert_eq!((op, payload.as_slice()), (8, &b"\x03\xf6bad gateway"[..]));
        s.client.write_all(&close_frame(1000, true)).await.unwrap();
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

    /// A client stream whose shutdown never completes: a TLS client that stopped reading,
    /// so that its close_notify cannot go out.
    struct NeverShuts(DuplexStream);

    impl AsyncRead for NeverShuts {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for NeverShuts {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_shutdown_that_never_completes_is_bounded_and_one_that_completes_is_not_waited(
    ) {
        for stuck in [true, false] {
            let stats = Arc::new(EdgeStats::default());
            let (edge_client, mut client) = tokio::io::duplex(4096);
            let (edge_origin, mut origin) = tokio::io::duplex(4096);
            let start = Instant::now();
            let task = if stuck {
                tokio::spawn(relay_between(
                    NeverShuts(edge_client),
                    edge_origin,
                    "",
                    &stats,
                ))
            } else {
                tokio::spawn(relay_between(edge_client, edge_origin, "", &stats))
            };
            // The origin goes: the client is told 1014 and answers with its own Close.
            origin.shutdown().await.unwrap();
            let (op, _, _) = read_frame(&mut client).await;
            assert_eq!(op, 8);
            client.write_all(&close_frame(1000, true)).await.unwrap();
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the tunnel ends")
                .unwrap();
            let waited = start.elapsed();
            if stuck {
                assert!(
                    waited >= CLOSE_WAIT && waited < CLOSE_WAIT + CLOSE_FRAME_WAIT,
                    "a shutdown that never completes is waited for CLOSE_WAIT: {waited:?}"
                );
            } else {
                assert!(waited < CLOSE_WAIT, "nothing is waited for: {waited:?}");
            }
            assert_eq!(closed(&stats, "origin_closed"), 1);
        }
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
