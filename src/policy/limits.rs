//! Per-resource protection state that outlives reloads: the open-tunnel slots behind
//! `max_connections` and `max_connections_per_ip`, and the per-IP token buckets behind
//! `handshake_rate`. A client is its IPv4 address, or the first `client.ipv6_prefix` bits
//! of its IPv6 address ([`client_key`]): an IPv6 client controls a whole /64 and would
//! otherwise multiply its share by trying addresses.

use crate::config::Rate;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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
    pub fn try_take(&self, ip: IpAddr, rate: Rate) -> Result<(), Duration> {
        self.try_take_at(ip, rate, self.start.elapsed())
    }

    fn try_take_at(&self, ip: IpAddr, rate: Rate, now: Duration) -> Result<(), Duration> {
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

/// Who a client is for per-IP limits: an IPv4 address (also when written as an
/// IPv4-mapped IPv6 address), or an IPv6 address with all but its first `v6_prefix` bits
/// cleared.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// Shards of the per-client counts, so handshakes of different clients rarely share a lock.
const SHARDS: usize = 16;

/// Open tunnels per client. An entry exists only while its client has a tunnel open, so
/// the table is never larger than the number of open tunnels.
#[derive(Debug, Default)]
struct ClientCounts {
    hasher: std::collections::hash_map::RandomState,
    shards: [Mutex<HashMap<IpAddr, u32>>; SHARDS],
}

impl ClientCounts {
    fn shard(&self, key: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // A panic while holding the lock leaves counts that are still whole numbers.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_take(&self, key: IpAddr, max: u32) -> bool {
        let mut shard = self.shard(key);
        let n = shard.entry(key).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, key: IpAddr) {
        let mut shard = self.shard(key);
        if let Some(n) = shard.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&key);
            }
        }
    }

    fn get(&self, key: IpAddr) -> u32 {
        self.shard(key).get(&key).copied().unwrap_or(0)
    }
}

/// Protection state of one resource.
#[derive(Debug, Default)]
pub struct ResourceLimits {
    open: AtomicU64,
    rates: OnceLock<RateTable>,
    per_client: OnceLock<ClientCounts>,
}

/// Which limit a tunnel could not get a slot under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_connections`: the resource is full.
    Resource,
    /// `max_connections_per_ip`: this client has its share.
    Client,
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

    /// Tunnels the client `key` ([`client_key`]) holds a slot for now.
    pub fn open_for(&self, key: IpAddr) -> u32 {
        self.per_client.get().map_or(0, |c| c.get(key))
    }
}

/// A reserved tunnel slot; dropping it frees the slot (and the client's), however the
/// tunnel ended.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ResourceLimits>,
    client: Option<IpAddr>,
}

impl Slot {
    /// Reserves a slot if fewer than `max` are taken (`None` = unlimited) and, with
    /// `per_client = Some((key, max))`, fewer than that `max` for the client `key`.
    pub fn reserve(
        limits: &Arc<ResourceLimits>,
        max: Option<u32>,
        per_client: Option<(IpAddr, u32)>,
    ) -> Result<Slot, Full> {
        let client = match per_client {
            Some((key, max)) => {
                let counts = limits.per_client.get_or_init(ClientCounts::default);
                if !counts.try_take(key, max) {
                    return Err(Full::Client);
                }
                Some(key)
            }
            None => None,
        };
        let max = max.map_or(u64::MAX, u64::from);
        let taken = limits
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            if let Some(key) = client {
                limits.give_back_client(key);
            }
            return Err(Full::Resource);
        }
        Ok(Slot {
            limits: limits.clone(),
            client,
        })
    }
}

impl ResourceLimits {
    fn give_back_client(&self, key: IpAddr) {
        if let Some(counts) = self.per_client.get() {
            counts.give_back(key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = self.client {
            self.limits.give_back_client(key);
        }
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
        let rate = Rate {
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
        let a = Slot::reserve(&l, Some(2), None).unwrap();
        let _b = Slot::reserve(&l, Some(2), None).unwrap();
        assert_eq!(
            Slot::reserve(&l, Some(2), None).unwrap_err(),
            Full::Resource
        );
        drop(a);
        assert!(Slot::reserve(&l, Some(2), None).is_ok());
        assert_eq!(l.open(), 1);
    }

    #[test]
    fn per_client_slots_and_keys() {
        let l = Arc::new(ResourceLimits::default());
        let key = client_key("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        assert_eq!(key, client_key("2001:db8:1:2:ffff::9".parse().unwrap(), 64));
        assert_ne!(key, client_key("2001:db8:1:3::1".parse().unwrap(), 64));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap(), 64), v4);
        let a = Slot::reserve(&l, Some(10), Some((key, 2))).unwrap();
        let b = Slot::reserve(&l, Some(10), Some((key, 2))).unwrap();
        assert_eq!(
            Slot::reserve(&l, Some(10), Some((key, 2))).unwrap_err(),
            Full::Client
        );
        assert!(Slot::reserve(&l, Some(10), Some((v4, 2))).is_ok());
        drop(a);
        assert_eq!(l.open_for(key), 1);
        let c = Slot::reserve(&l, Some(2), Some((key, 2))).unwrap();
        // The resource is full: the client's share taken for the attempt is given back.
        assert_eq!(
            Slot::reserve(&l, Some(2), Some((v4, 2))).unwrap_err(),
            Full::Resource
        );
        assert_eq!(l.open_for(v4), 0);
        drop((b, c));
        assert_eq!(l.open_for(key), 0);
        assert_eq!(l.open(), 0);
    }
}
