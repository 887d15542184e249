//! Draining an edge: every open tunnel is told to go (a Close frame each way) at a moment
//! of its own drawn uniformly over the drain's `spread`, so the clients reconnect spread
//! over it too, and new upgrades are refused (503) while it lasts. A drain starts at
//! shutdown (SIGTERM), in the old process of a graceful upgrade, or from the admin
//! listener (`POST /drain`, undone by `POST /drain/cancel`).
//!
//! The [`Drain`] is shared by the gate (refusals), the relays (each waits on it and draws
//! its moment when a drain starts) and the admin listener (state, start, cancel). Starting
//! or cancelling wakes every relay once; nothing is done per tunnel while no drain runs
//! but holding one waiter.

use rand::Rng;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What started a drain (it says which reason the Close frames carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SIGTERM: the process is stopping.
    Shutdown,
    /// The old process of a graceful upgrade: a new one took the listeners.
    Upgrade,
    /// `POST /drain`: the edge is emptied and stays up.
    Admin,
}

impl Kind {
    /// The label in `/healthz` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Shutdown => "shutdown",
            Kind::Upgrade => "upgrade",
            Kind::Admin => "admin",
        }
    }
}

/// A drain that runs: when it started, over how long, and what the tunnels are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    /// Which drain this is (a cancelled drain's moments are void).
    pub generation: u64,
    /// What started it.
    pub kind: Kind,
    /// When it started.
    pub started: Instant,
    /// The window the tunnels' moments are drawn from.
    pub spread: Duration,
    /// The code of the Close frames.
    pub close_code: u16,
}

impl Order {
    /// A moment drawn uniformly over the window (a tunnel's, to be told to go).
    pub fn moment(&self) -> Instant {
        let spread = self.spread.as_micros() as u64;
        let at = match spread {
            0 => 0,
            s => rand::thread_rng().gen_range(0..s),
        };
        self.started + Duration::from_micros(at)
    }
}

/// The settings a drain starts with (`drain:` in the file; a reload may change them).
pub use crate::config::DrainSettings as Settings;

#[derive(Debug)]
struct State {
    settings: Settings,
    order: Option<Order>,
    generation: u64,
}

/// Why a drain cannot be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelError {
    /// No drain runs.
    NotDraining,
    /// The process is stopping (SIGTERM or an upgrade): its drain is not undone.
    Stopping,
}

/// The edge's drain state, shared by the gate, the relays and the admin listener.
#[derive(Debug)]
pub struct Drain {
    notify: Arc<Notify>,
    /// Moves on at every start and cancel: a relay compares it with the one it last saw
    /// (one atomic load per poll; a waiter's own poll would take the Notify's lock).
    epoch: AtomicU64,
    /// Mirrors `state.order.is_some()`, for the gate's check of every upgrade.
    draining: AtomicBool,
    state: Mutex<State>,
}

impl Drain {
    /// A drain hub with these settings; no drain runs.
    pub fn new(settings: Settings) -> Drain {
        Drain {
            notify: Arc::new(Notify::new()),
            epoch: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            state: Mutex::new(State {
                settings,
                order: None,
                generation: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain values behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the settings of a reloaded file (for drains started from now on).
    pub fn set_settings(&self, settings: Settings) {
        self.state().settings = settings;
    }

    /// Starts a drain. A drain of the process (shutdown, upgrade) replaces one from the
    /// admin listener and keeps its moments; a second start of the same kind does
    /// nothing. Whether a new drain started.
    pub fn start(&self, kind: Kind) -> bool {
        {
            let mut s = self.state();
            if let Some(o) = s.order.as_mut() {
                if o.kind == Kind::Admin && kind != Kind::Admin {
                    // The tunnels keep their moments; what they are told changes.
                    o.kind = kind;
                }
                return false;
            }
            s.generation += 1;
            s.order = Some(Order {
                generation: s.generation,
                kind,
                started: Instant::now(),
                spread: s.settings.spread,
                close_code: s.settings.close_code,
            });
            self.draining.store(true, Ordering::Release);
            self.changed();
        }
        true
    }

    /// Cancels a drain from the admin listener: tunnels not yet told stay open, and
    /// upgrades are served again.
    pub fn cancel(&self) -> Result<(), CancelError> {
        {
            let mut s = self.state();
            match s.order {
                None => return Err(CancelError::NotDraining),
                Some(o) if o.kind != Kind::Admin => return Err(CancelError::Stopping),
                Some(_) => {}
            }
            s.order = None;
            self.draining.store(false, Ordering::Release);
            self.changed();
        }
        Ok(())
    }

    /// Moves the epoch on and wakes every waiter; called with the state locked, so that
    /// [`Self::arm`] sees either both or neither.
    fn changed(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Arms `wake` with the task's waker (a waiter that fired is replaced) and returns the
    /// epoch it is armed for: any later start or cancel moves the epoch and wakes the task.
    pub fn arm(&self, wake: &mut Pin<Box<OwnedNotified>>, cx: &mut Context<'_>) -> u64 {
        let _state = self.state();
        while wake.as_mut().poll(cx).is_ready() {
            *wake = Box::pin(self.waiter());
        }
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether a drain runs (upgrades are refused).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The drain that runs, if one does.
    pub fn order(&self) -> Option<Order> {
        if !self.draining() {
            return None;
        }
        self.state().order
    }

    /// What changed the drain last (compare with an earlier value to see whether anything
    /// did).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A future that is ready at the next start or cancel (from the moment it is made,
    /// polled or not). Polled once, it keeps the task's waker: the task is woken then.
    pub fn waiter(&self) -> OwnedNotified {
        self.notify.clone().notified_owned()
    }
}

impl Default for Drain {
    /// No spread, code 1001: what an edge built without a `drain:` section of its own
    /// (a proxy embedded without [`crate::Edge`]) does.
    fn default() -> Drain {
        Drain::new(Settings {
            spread: Duration::ZERO,
            close_code: 1001,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll};

    fn settings() -> Settings {
        Settings {
            spread: Duration::from_secs(4),
            close_code: 1001,
        }
    }

    #[tokio::test]
    async fn a_waiter_made_before_a_start_is_woken_by_it_even_unpolled() {
        let d = Drain::new(settings());
        let mut w = Box::pin(d.waiter());
        assert!(d.start(Kind::Admin));
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(w.as_mut().poll(&mut cx), Poll::Ready(())));
        assert!(d.draining());
        let o = d.order().unwrap();
        for _ in 0..1000 {
            let m = o.moment();
            assert!(m >= o.started && m < o.started + o.spread);
        }
    }

    #[test]
    fn admin_drains_cancel_and_process_drains_do_not() {
        let d = Drain::new(settings());
        assert_eq!(d.cancel(), Err(CancelError::NotDraining));
        assert!(d.start(Kind::Admin));
        assert!(!d.start(Kind::Admin));
        assert_eq!(d.cancel(), Ok(()));
        assert!(!d.draining() && d.order().is_none());
        assert!(d.start(Kind::Admin));
        let first = d.order().unwrap();
        // A shutdown during an admin drain keeps the moments, and cannot be undone.
        assert!(!d.start(Kind::Shutdown));
        let now = d.order().unwrap();
        assert_eq!(
            (now.generation, now.kind),
            (first.generation, Kind::Shutdown)
        );
        assert_eq!(d.cancel(), Err(CancelError::Stopping));
        assert!(d.draining());
    }

    #[test]
    fn a_zero_spread_tells_every_tunnel_at_once() {
        let d = Drain::new(Settings {
            spread: Duration::ZERO,
            close_code: 4000,
        });
        d.start(Kind::Shutdown);
        let o = d.order().unwrap();
        assert_eq!(o.moment(), o.started);
        assert_eq!(o.close_code, 4000);
    }

    fn futures_noop_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
