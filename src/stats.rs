//! Counters the edge keeps about itself: open tunnels, closes by reason, reloads. Plain
//! atomics: updated once per tunnel or reload, never per chunk.

use crate::tunnel::CloseReason;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

/// Process-wide counters, shared by the proxy, the reloader and the admin listener.
#[derive(Debug)]
pub struct EdgeStats {
    started: Instant,
    tunnels_open: AtomicI64,
    tunnels_opened: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Default for EdgeStats {
    fn default() -> Self {
        EdgeStats {
            started: Instant::now(),
            tunnels_open: AtomicI64::new(0),
            tunnels_opened: AtomicU64::new(0),
            closed: Default::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }
}

impl EdgeStats {
    /// A tunnel got its 101.
    pub fn tunnel_opened(&self) {
        self.tunnels_open.fetch_add(1, Ordering::Relaxed);
        self.tunnels_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel ended.
    pub fn tunnel_closed(&self, reason: CloseReason) {
        self.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        self.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Tunnels open now.
    pub fn tunnels_open(&self) -> i64 {
        self.tunnels_open.load(Ordering::Relaxed)
    }

    /// Tunnels opened since start.
    pub fn tunnels_opened(&self) -> u64 {
        self.tunnels_opened.load(Ordering::Relaxed)
    }

    /// Tunnels closed for `reason` since start.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let c = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful and failed reloads since start.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Seconds since the process started.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
