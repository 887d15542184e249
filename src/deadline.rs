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

/// The least limit handed to Pingora's timer. Its ticks are 10 ms, so a limit of 1 ms
/// fires when one of 0 would; but a timer of 0 ms set within the first millisecond of
/// Pingora's timer (it starts at its first use) underflows its rounding (`raw - 1`): a panic
/// in a debug build, a wrapped deadline in a release one.
const LEAST: Duration = Duration::from_millis(1);

/// `fut`, given up on after `limit`.
pub(crate) fn within<F: Future>(limit: Duration, fut: F) -> Timeout<F, FastOrTokioTimeout> {
    fast_timeout(limit.max(LEAST), fut)
}

/// `fut`, given up on at `deadline` (at the next tick if it has passed).
pub(crate) fn until<F: Future>(deadline: Instant, fut: F) -> Timeout<F, FastOrTokioTimeout> {
    within(deadline.saturating_duration_since(Instant::now()), fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Never finishes.
    fn never() -> std::future::Pending<()> {
        std::future::pending()
    }

    #[tokio::test]
    async fn a_ready_future_wins_even_at_no_time_left() {
        let past = Instant::now() - Duration::from_secs(1);
        assert_eq!(until(past, async { 7 }).await.ok(), Some(7));
        assert_eq!(within(Duration::ZERO, async { 8 }).await.ok(), Some(8));
    }

    #[tokio::test]
    async fn a_wait_that_never_finishes_is_given_up_on() {
        // A deadline already passed, and one a little ahead (Pingora's timer: 10 ms ticks).
        // Run alone (`cargo test --lib deadline`), the passed deadline is the process's
        // first timer, set within its first millisecond: the case `LEAST` is for.
        let started = Instant::now();
        let past = until(started - Duration::from_secs(3600), never());
        let soon = within(Duration::from_millis(50), never());
        let both = tokio::time::timeout(Duration::from_secs(5), async {
            (past.await.is_err(), soon.await.is_err())
        });
        assert_eq!(both.await.ok(), Some((true, true)));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(40), "{took:?}");
    }

    #[tokio::test]
    async fn a_slow_future_inside_its_limit_finishes() {
        let slow = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            "done"
        };
        let r = tokio::time::timeout(Duration::from_secs(5), within(Duration::from_secs(2), slow));
        assert_eq!(r.await.ok().and_then(Result::ok), Some("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_past_pingoras_fast_timer_falls_to_tokio_and_still_fires() {
        // Over 15 minutes Pingora hands the wait to a tokio timer: with tokio's paused
        // clock, a day's limit fires once the clock is advanced past it.
        let day = within(Duration::from_secs(86_400), never());
        assert!(day.await.is_err());
        // The largest limit does not overflow an Instant (tokio caps it at about 30 years).
        assert!(within(Duration::MAX, never()).await.is_err());
    }
}
