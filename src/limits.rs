//! Per-resource protection state that outlives reloads: the open-tunnel slots behind
//! `max_connections` and the per-IP token buckets behind `handshake_rate`.

use crate::config::HandshakeRate;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Buckets per resource. Memory is fixed (512 KiB) whatever the number of client IPs:
/// IPs that hash to the same bucket share it, which can only make limiting stricter for
/// them, never looser.
const BUCKETS: usize = 1 << 16;
/// Tokens are kept in thousandths.
const MILLI: u64 = 1000;

/// Token buckets keyed by client IP in a fixed table.
#[derive(Debug)]
pub struct RateTable {
    start: Instant,
    hasher: std::collections::hash_map::RandomState,
    /// Each slot packs the bucket's deficit (milli-tokens below full, high 32 bits) and the
    /// time of its last update (ms since `start`, low 32 bits). Zero is a full bucket.
    slots: Box<[AtomicU64]>,
}

impl Default for RateTable {
    fn default() -> Self {
        RateTable {
            start: Instant::now(),
            hasher: Default::default(),
            slots: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RateTable {
    /// Takes one token for `ip`; `Err` says how long until one is available.
    pub fn try_take(&self, ip: IpAddr, rate: HandshakeRate) -> Result<(), Duration> {
        self.try_take_at(ip, rate, self.start.elapsed())
    }

    fn try_take_at(&self, ip: IpAddr, rate: HandshakeRate, now: Duration) -> Result<(), Duration> {
        let slot = &self.slots[self.hasher.hash_one(ip) as usize % BUCKETS];
        let now_ms = now.as_millis() as u32;
        let capacity = u64::from(rate.burst.max(1)) * MILLI;
        let per_ms = rate.per_second; // milli-tokens per ms = tokens per second
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let (deficit, last) = (current >> 32, current as u32);
            let elapsed = u64::from(now_ms.wrapping_sub(last));
            let refilled = (elapsed as f64 * per_ms) as u64;
            let deficit = deficit.saturating_sub(refilled);
            if deficit + MILLI > capacity {
                let wait_ms = ((deficit + MILLI - capacity) as f64 / per_ms).ceil() as u64;
                return Err(Duration::from_millis(wait_ms.max(1)));
            }
            let next = ((deficit + MILLI) << 32) | u64::from(now_ms);
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }
}

/// Protection state of one resource.
#[derive(Debug, Default)]
pub struct ResourceLimits {
    open: AtomicU64,
    rates: OnceLock<RateTable>,
}

impl ResourceLimits {
    /// The rate table, allocated on first use (resources without a rate cost nothing).
    pub fn rates(&self) -> &RateTable {
        self.rates.get_or_init(RateTable::default)
    }

    /// Tunnels holding a slot now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

/// A reserved tunnel slot; dropping it frees the slot, however the tunnel ended.
#[derive(Debug)]
pub struct Slot(Arc<ResourceLimits>);

impl Slot {
    /// Reserves a slot if fewer than `max` are taken (`None` = unlimited).
    pub fn reserve(limits: &Arc<ResourceLimits>, max: Option<u32>) -> Option<Slot> {
        let max = max.map_or(u64::MAX, u64::from);
        limits
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(limits.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t = RateTable::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let rate = HandshakeRate {
            per_second: 10.0,
            burst: 5,
        };
        let at = |ms| Duration::from_millis(ms);
        for _ in 0..5 {
            assert!(t.try_take_at(ip, rate, at(1000)).is_ok());
        }
        let wait = t.try_take_at(ip, rate, at(1000)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(
            t.try_take_at(other, rate, at(1000)).is_ok(),
            "another IP has its own bucket"
        );
        assert!(
            t.try_take_at(ip, rate, at(1100)).is_ok(),
            "refilled after 100 ms"
        );
        assert!(t.try_take_at(ip, rate, at(1100)).is_err());
        assert!(t.try_take_at(ip, rate, at(60_000)).is_ok());
    }

    #[test]
    fn slots_are_freed_on_drop() {
        let l = Arc::new(ResourceLimits::default());
        let a = Slot::reserve(&l, Some(2)).unwrap();
        let _b = Slot::reserve(&l, Some(2)).unwrap();
        assert!(Slot::reserve(&l, Some(2)).is_none());
        drop(a);
        assert!(Slot::reserve(&l, Some(2)).is_some());
        assert_eq!(l.open(), 1);
    }
}
