//! Overlay address allocation. Pure; the store persists the high-water mark.
//!
//! Model: the i-th node ever registered gets host number i+1 in both the IPv4 and the IPv6
//! pool. The index only ever grows (a high-water mark kept in the database and advanced inside
//! the registration's write transaction), so an address is never handed out twice, even after
//! its node is revoked or deleted — a revoked node's address stays dead, so stale peer configs
//! or cached netmaps can never point at a new owner. The schema's UNIQUE constraints back this
//! up. Capacity is the smaller pool's host count; an IPv4 /16 gives 65,534 nodes.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pools {
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("overlay address pool exhausted")]
pub struct Exhausted;

impl Pools {
    /// Usable IPv4 hosts: all but the network and broadcast addresses.
    fn v4_hosts(&self) -> u64 {
        (1u64 << (32 - u32::from(self.v4.prefix_len()))).saturating_sub(2)
    }

    /// Usable IPv6 hosts: all but the subnet-router anycast (all-zero) address.
    fn v6_hosts(&self) -> u64 {
        let bits = 128 - u32::from(self.v6.prefix_len());
        if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// How many nodes the pools can ever hold.
    pub fn capacity(&self) -> u64 {
        self.v4_hosts().min(self.v6_hosts())
    }

    /// The address pair for allocation index `index` (0-based), if within capacity.
    pub fn addresses_at(&self, index: u64) -> Option<(Ipv4Addr, Ipv6Addr)> {
        if index >= self.capacity() {
            return None;
        }
        let host = index + 1;
        let v4 = u32::from(self.v4.network()).checked_add(u32::try_from(host).ok()?)?;
        let v6 = u128::from(self.v6.network()).checked_add(u128::from(host))?;
        Some((Ipv4Addr::from(v4), Ipv6Addr::from(v6)))
    }

    /// Inverse of [`Pools::addresses_at`] for an IPv4 address, used to check stored data.
    pub fn index_of(&self, v4: Ipv4Addr) -> Option<u64> {
        if !self.v4.contains(&v4) {
            return None;
        }
        let host = u64::from(u32::from(v4) - u32::from(self.v4.network()));
        host.checked_sub(1).filter(|i| *i < self.capacity())
    }
}

/// The allocator state: the next index to hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocator {
    pub next: u64,
}

impl Allocator {
    /// Hands out the next address pair and advances the high-water mark.
    pub fn allocate(&mut self, pools: &Pools) -> Result<(Ipv4Addr, Ipv6Addr), Exhausted> {
        let pair = pools.addresses_at(self.next).ok_or(Exhausted)?;
        self.next += 1;
        Ok(pair)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn pools(v4_len: u8, v6_len: u8) -> Pools {
        Pools {
            v4: Ipv4Net::new(Ipv4Addr::new(10, 77, 0, 0), v4_len)
                .expect("len")
                .trunc(),
            v6: Ipv6Net::new("fd7a:5c3e:77::".parse().expect("v6"), v6_len)
                .expect("len")
                .trunc(),
        }
    }

    #[test]
    fn first_node_gets_host_one_and_a_slash_30_holds_two() {
        let p = pools(30, 64);
        let mut a = Allocator { next: 0 };
        let first = a.allocate(&p).expect("first");
        assert_eq!(first.0, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(first.1, "fd7a:5c3e:77::1".parse::<Ipv6Addr>().expect("v6"));
        assert_eq!(
            a.allocate(&p).expect("second").0,
            Ipv4Addr::new(10, 77, 0, 2)
        );
        assert_eq!(a.allocate(&p), Err(Exhausted), "10.77.0.3 is the broadcast");
        assert_eq!(a.allocate(&p), Err(Exhausted), "stays exhausted");
    }

    #[test]
    fn capacity_is_bounded_by_the_smaller_pool() {
        assert_eq!(pools(16, 64).capacity(), 65_534);
        assert_eq!(pools(16, 120).capacity(), 255);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register,
        Revoke(usize),
    }

    proptest! {
        /// Whatever mix of registrations and revocations happens, every address handed out is a
        /// usable host inside its pool and none is ever handed out twice, in either family.
        #[test]
        fn addresses_are_unique_in_pool_and_never_reused(
            v4_len in 20u8..=30,
            v6_len in 64u8..=124,
            ops in proptest::collection::vec(
                prop_oneof![3 => Just(Op::Register), 1 => (0usize..1000).prop_map(Op::Revoke)],
                0..400,
            ),
        ) {
            let p = pools(v4_len, v6_len);
            let mut alloc = Allocator { next: 0 };
            let mut live: Vec<(Ipv4Addr, Ipv6Addr)> = Vec::new();
            let (mut seen4, mut seen6) = (HashSet::new(), HashSet::new());
            for op in ops {
                match op {
                    Op::Register => match alloc.allocate(&p) {
                        Ok((v4, v6)) => {
                            prop_assert!(p.v4.contains(&v4) && p.v6.contains(&v6));
                            prop_assert_ne!(v4, p.v4.network());
                            prop_assert_ne!(v4, p.v4.broadcast());
                            prop_assert_ne!(v6, p.v6.network());
                            prop_assert!(seen4.insert(v4), "v4 {} reused", v4);
                            prop_assert!(seen6.insert(v6), "v6 {} reused", v6);
                            prop_assert_eq!(p.index_of(v4), Some(alloc.next - 1));
                            live.push((v4, v6));
                        }
                        Err(Exhausted) => prop_assert_eq!(seen4.len() as u64, p.capacity()),
                    },
                    Op::Revoke(i) => {
                        if !live.is_empty() {
                            let n = live.len();
                            live.remove(i % n);
                        }
                    }
                }
            }
        }
    }
}
