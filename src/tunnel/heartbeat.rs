//! The edge's heartbeat toward one side of a tunnel: after `interval` with no byte from
//! the side, a Ping with a token of the edge's own; the Pong that carries it back is taken
//! out of the stream by the other direction's scanner. No Pong, and no other byte, for
//! `timeout` after the Ping went out ends the tunnel: a side still sending bytes is alive,
//! and its Pong may be queued behind a long frame.

use super::frames::TOKEN_LEN;
use crate::config::Heartbeat;
use tokio::time::Instant;

/// Where a heartbeat stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `interval` of silence.
    Quiet,
    /// A Ping waits for a frame boundary toward the side.
    Queued,
    /// A Ping went out at this time.
    Sent(Instant),
    /// No more pings (a closing handshake began, or the stream is not WebSocket).
    Off,
}

/// What a heartbeat asks for at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send the side a Ping with this token.
    Ping([u8; TOKEN_LEN]),
    /// The side did not answer in time.
    Timeout,
}

/// One side's heartbeat.
#[derive(Debug)]
pub struct Beat {
    interval: std::time::Duration,
    timeout: std::time::Duration,
    /// The last time a byte came from the side.
    heard: Instant,
    state: State,
}

impl Beat {
    /// A heartbeat from `now`, the tunnel's start.
    pub fn new(hb: &Heartbeat, now: Instant) -> Beat {
        Beat {
            interval: hb.interval,
            timeout: hb.timeout,
            heard: now,
            state: State::Quiet,
        }
    }

    /// Bytes came from the side.
    pub fn heard(&mut self, now: Instant) {
        self.heard = now;
    }

    /// The side's Pong with the token came back.
    pub fn answered(&mut self) {
        if self.state != State::Off {
            self.state = State::Quiet;
        }
    }

    /// The Ping was written toward the side.
    pub fn sent(&mut self, now: Instant) {
        if self.state == State::Queued {
            self.state = State::Sent(now);
        }
    }

    /// No more pings on this tunnel.
    pub fn stop(&mut self) {
        self.state = State::Off;
    }

    /// When something may next be due, if ever.
    pub fn next(&self) -> Option<Instant> {
        match self.state {
            State::Quiet => Some(self.heard + self.interval),
            State::Sent(at) => Some(at.max(self.heard) + self.timeout),
            State::Queued | State::Off => None,
        }
    }

    /// What is due at `now`: a Ping (with a fresh random token) or the end.
    pub fn due(&mut self, now: Instant) -> Option<Due> {
        match self.state {
            State::Quiet if now >= self.heard + self.interval => {
                self.state = State::Queued;
                Some(Due::Ping(rand::random()))
            }
            State::Sent(at) if now >= at.max(self.heard) + self.timeout => Some(Due::Timeout),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn beat(now: Instant) -> Beat {
        let hb = Heartbeat {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            origin: false,
        };
        Beat::new(&hb, now)
    }

    #[test]
    fn a_silent_side_is_pinged_then_timed_out_and_bytes_count_as_life() {
        let t0 = Instant::now();
        let mut b = beat(t0);
        assert_eq!(b.next(), Some(t0 + Duration::from_secs(30)));
        assert_eq!(b.due(t0 + Duration::from_secs(29)), None);
        b.heard(t0 + Duration::from_secs(20));
        assert_eq!(b.due(t0 + Duration::from_secs(30)), None);
        let Some(Due::Ping(token)) = b.due(t0 + Duration::from_secs(50)) else {
            panic!("no ping");
        };
        let Some(Due::Ping(other)) = beat(t0).due(t0 + Duration::from_secs(30)) else {
            panic!("no ping");
        };
        assert_ne!(token, other, "tokens are random");
        // Queued: nothing is due until it is written.
        assert_eq!(
            (b.next(), b.due(t0 + Duration::from_secs(100))),
            (None, None)
        );
        b.sent(t0 + Duration::from_secs(51));
        assert_eq!(b.due(t0 + Duration::from_secs(60)), None);
        // A byte from the side pushes the deadline.
        b.heard(t0 + Duration::from_secs(55));
        assert_eq!(b.due(t0 + Duration::from_secs(64)), None);
        assert_eq!(b.due(t0 + Duration::from_secs(65)), Some(Due::Timeout));
        // An answer starts over from the last byte heard.
        b.answered();
        assert_eq!(b.next(), Some(t0 + Duration::from_secs(85)));
        b.stop();
        assert_eq!(b.due(t0 + Duration::from_secs(1000)), None);
    }
}
