//! Per-key rate limiting (pure, `now` passed in): the generic cell rate algorithm, one
//! `Instant` per key. A key may make `burst` requests at once, then one per `interval`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// What per-source limits count by: the IPv4 address, or the IPv6 /64 (one host usually
/// holds a whole /64, so counting addresses would let it spray).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[derive(Debug)]
pub struct RateLimiter<K> {
    interval: Duration,
    /// How far ahead of `now` a key's next theoretical arrival may be: `interval * (burst-1)`.
    tolerance: Duration,
    /// Keys tracked at most; past it, keys back at full burst are forgotten first, and a new
    /// key is refused while none can be (an address spray must not grow memory).
    max_keys: usize,
    tat: HashMap<K, Instant>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    pub fn new(burst: u32, interval: Duration, max_keys: usize) -> Self {
        Self {
            interval,
            tolerance: interval.saturating_mul(burst.saturating_sub(1)),
            max_keys,
            tat: HashMap::new(),
        }
    }

    /// Whether `key` may make a request at `now` (and, if so, counts it).
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if !self.tat.contains_key(&key) && self.tat.len() >= self.max_keys {
            self.tat.retain(|_, tat| *tat > now);
            if self.tat.len() >= self.max_keys {
                return false;
            }
        }
        let tat = self.tat.get(&key).map_or(now, |t| (*t).max(now));
        if tat.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        self.tat.insert(key, tat + self.interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_burst_passes_then_one_request_per_interval() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(3, ms(1000), 10);
        assert!(l.allow(1, t0) && l.allow(1, t0) && l.allow(1, t0));
        assert!(!l.allow(1, t0), "burst spent");
        assert!(l.allow(2, t0), "keys are independent");
        assert!(!l.allow(1, t0 + ms(999)));
        assert!(l.allow(1, t0 + ms(1000)));
        assert!(!l.allow(1, t0 + ms(1000)));
        // Idle for long enough: the full burst is back.
        let later = t0 + ms(10_000);
        assert!(l.allow(1, later) && l.allow(1, later) && l.allow(1, later));
        assert!(!l.allow(1, later));
    }

    #[test]
    fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().expect("ip");
        assert_eq!(source_key(a), source_key(b));
        assert_eq!(
            source_key(a),
            "2001:db8:1:2::".parse::<IpAddr>().expect("ip")
        );
        let mapped: IpAddr = "::ffff:198.18.0.7".parse().expect("ip");
        assert_eq!(
            source_key(mapped),
            "198.18.0.7".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn the_key_table_is_bounded_and_forgets_idle_keys_first() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, ms(1000), 2);
        assert!(l.allow(1, t0) && l.allow(2, t0));
        assert!(!l.allow(3, t0), "table full of busy keys");
        assert!(l.allow(3, t0 + ms(1000)), "idle keys forgotten");
        assert!(l.tat.len() <= 2);
    }
}
