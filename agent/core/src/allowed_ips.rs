//! Cryptokey routing table: longest-prefix match from an IP address to a value (a peer slot),
//! for IPv4 and IPv6. A path-compressed binary trie per family over left-aligned `u128` keys
//! (the layout of Linux WireGuard's `allowedips.c`): a node stores its whole prefix, so a lookup
//! visits only branching points (about log2(prefixes) nodes), each an index into a `Vec` arena,
//! and never allocates. Updates (control path only) may allocate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node<T> {
    /// The prefix, host bits zero.
    key: u128,
    /// Its length in bits.
    plen: u8,
    /// Child arena indexes by the bit after the prefix; `NONE` = absent.
    child: [u32; 2],
    /// `None` for a pure branching node.
    value: Option<T>,
}

#[derive(Debug, Clone)]
struct Trie<T> {
    nodes: Vec<Node<T>>,
    root: u32,
    len: usize,
}

#[inline]
fn mask(plen: u8) -> u128 {
    if plen == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(plen))
    }
}

#[inline]
fn bit(key: u128, depth: u8) -> usize {
    // Only called with depth < 128.
    ((key >> (127 - u32::from(depth))) & 1) as usize
}

impl<T: Copy> Trie<T> {
    fn new() -> Self {
        Trie {
            nodes: Vec::new(),
            root: NONE,
            len: 0,
        }
    }

    fn alloc(&mut self, key: u128, plen: u8, value: Option<T>) -> u32 {
        self.nodes.push(Node {
            key: key & mask(plen),
            plen,
            child: [NONE; 2],
            value,
        });
        // Arena index fits u32: a table of 4 billion nodes is not a real configuration.
        (self.nodes.len() - 1) as u32
    }

    fn insert(&mut self, key: u128, plen: u8, value: T) -> Option<T> {
        let key = key & mask(plen);
        // `slot` is where the link to the current node lives: (parent, side) or the root.
        let mut parent: Option<(u32, usize)> = None;
        let mut at = self.root;
        while at != NONE {
            let n = &self.nodes[at as usize];
            if n.plen > plen || (n.key ^ key) & mask(n.plen) != 0 {
                break;
            }
            if n.plen == plen {
                let old = self.nodes[at as usize].value.replace(value);
                if old.is_none() {
                    self.len += 1;
                }
                return old;
            }
            let side = bit(key, n.plen);
            parent = Some((at, side));
            at = n.child[side];
        }
        self.len += 1;
        let new = self.alloc(key, plen, Some(value));
        let replacement = if at == NONE {
            new
        } else {
            // `at` does not lie under the new prefix path: split at the common bits.
            let other = self.nodes[at as usize].key;
            let common = ((other ^ key).leading_zeros() as u8)
                .min(plen)
                .min(self.nodes[at as usize].plen);
            if common == plen {
                // The new prefix covers `at`: it becomes `at`'s parent.
                self.nodes[new as usize].child[bit(other, plen)] = at;
                new
            } else {
                let mid = self.alloc(key, common, None);
                self.nodes[mid as usize].child[bit(other, common)] = at;
                self.nodes[mid as usize].child[bit(key, common)] = new;
                mid
            }
        };
        match parent {
            Some((p, side)) => self.nodes[p as usize].child[side] = replacement,
            None => self.root = replacement,
        }
        None
    }

    fn find_node(&self, key: u128, plen: u8) -> Option<usize> {
        let key = key & mask(plen);
        let mut at = self.root;
        while at != NONE {
            let n = &self.nodes[at as usize];
            if n.plen > plen || (n.key ^ key) & mask(n.plen) != 0 {
                return None;
            }
            if n.plen == plen {
                return Some(at as usize);
            }
            at = n.child[bit(key, n.plen)];
        }
        None
    }

    fn exact(&self, key: u128, plen: u8) -> Option<T> {
        self.find_node(key, plen).and_then(|n| self.nodes[n].value)
    }

    fn remove(&mut self, key: u128, plen: u8) -> Option<T> {
        let n = self.find_node(key, plen)?;
        let old = self.nodes[n].value.take();
        if old.is_some() {
            self.len -= 1;
        }
        // The emptied node stays as a branching node until the next `retain` compacts it.
        old
    }

    #[inline]
    fn lookup(&self, key: u128, width: u8) -> Option<T> {
        let mut best = None;
        let mut at = self.root;
        while at != NONE {
            let n = &self.nodes[at as usize];
            if (n.key ^ key) & mask(n.plen) != 0 {
                break;
            }
            if n.value.is_some() {
                best = n.value;
            }
            if n.plen >= width {
                break;
            }
            at = n.child[bit(key, n.plen)];
        }
        best
    }

    /// Every `(key, plen, value)`, in address order, shorter prefixes first.
    fn entries(&self) -> Vec<(u128, u8, T)> {
        let mut out = Vec::with_capacity(self.len);
        let mut stack = vec![self.root];
        while let Some(at) = stack.pop() {
            if at == NONE {
                continue;
            }
            let n = &self.nodes[at as usize];
            if let Some(v) = n.value {
                out.push((n.key, n.plen, v));
            }
            // Push 1 first so 0 is visited first.
            stack.push(n.child[1]);
            stack.push(n.child[0]);
        }
        out
    }
}

/// The allowed-IPs table of a device: prefix → value (normally a peer slot).
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Trie<T>,
    v6: Trie<T>,
}

impl<T: Copy> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn v4_key(a: Ipv4Addr) -> u128 {
    u128::from(u32::from(a)) << 96
}

fn v6_key(a: Ipv6Addr) -> u128 {
    u128::from(a)
}

impl<T: Copy> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        AllowedIps {
            v4: Trie::new(),
            v6: Trie::new(),
        }
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.len + self.v6.len
    }

    /// Whether the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Maps `net` (host bits are ignored) to `value`, returning the value it replaced. As in
    /// WireGuard, a prefix belongs to one peer: inserting it for another moves it.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(v4_key(n.network()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(v6_key(n.network()), n.prefix_len(), value),
        }
    }

    /// Removes exactly `net`, returning its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(v4_key(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(v6_key(n.network()), n.prefix_len()),
        }
    }

    /// The value stored for exactly `net`.
    pub fn exact(&self, net: IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.exact(v4_key(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.exact(v6_key(n.network()), n.prefix_len()),
        }
    }

    /// Longest-prefix match for an IPv4 address.
    #[inline]
    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<T> {
        self.v4.lookup(v4_key(addr), 32)
    }

    /// Longest-prefix match for an IPv6 address.
    #[inline]
    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<T> {
        self.v6.lookup(v6_key(addr), 128)
    }

    /// Longest-prefix match for any address.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    /// Every prefix with its value: IPv4 first, then IPv6, each in address order.
    pub fn entries(&self) -> Vec<(IpNet, T)> {
        let mut out = Vec::with_capacity(self.len());
        for (k, plen, v) in self.v4.entries() {
            let a = Ipv4Addr::from((k >> 96) as u32);
            // plen <= 32 by construction of the v4 trie.
            if let Ok(n) = Ipv4Net::new(a, plen) {
                out.push((IpNet::V4(n), v));
            }
        }
        for (k, plen, v) in self.v6.entries() {
            if let Ok(n) = Ipv6Net::new(Ipv6Addr::from(k), plen) {
                out.push((IpNet::V6(n), v));
            }
        }
        out
    }

    /// Keeps only the prefixes for which `keep` is true, and compacts the arenas.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet, &T) -> bool) {
        let entries = self.entries();
        *self = AllowedIps::new();
        for (net, v) in entries {
            if keep(&net, &v) {
                self.insert(net, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn longest_prefix_wins_for_v4_and_v6() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("fd00::/8"), 4);
        t.insert(net("fd00:1::/32"), 5);
        assert_eq!(t.lookup("10.9.9.9".parse().expect("ip")), Some(1));
        assert_eq!(t.lookup("10.1.9.9".parse().expect("ip")), Some(2));
        assert_eq!(t.lookup("10.1.2.3".parse().expect("ip")), Some(3));
        assert_eq!(t.lookup("11.0.0.1".parse().expect("ip")), None);
        assert_eq!(t.lookup("fd00:1::9".parse().expect("ip")), Some(5));
        assert_eq!(t.lookup("fd01::9".parse().expect("ip")), Some(4));
        assert_eq!(t.lookup("fe80::1".parse().expect("ip")), None);
        // An IPv4 default route does not match IPv6 and vice versa.
        t.insert(net("0.0.0.0/0"), 9);
        assert_eq!(t.lookup("fe80::1".parse().expect("ip")), None);
        assert_eq!(t.lookup("11.0.0.1".parse().expect("ip")), Some(9));
    }

    #[test]
    fn host_bits_are_ignored_and_a_prefix_moves_between_peers() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("192.168.1.77/24"), 1), None);
        assert_eq!(t.insert(net("192.168.1.0/24"), 2), Some(1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.entries(), vec![(net("192.168.1.0/24"), 2)]);
        assert_eq!(t.remove(net("192.168.1.0/24")), Some(2));
        assert_eq!(t.lookup("192.168.1.1".parse().expect("ip")), None);
        assert!(t.is_empty());
    }

    #[test]
    fn retain_drops_one_peers_prefixes_only() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/24"), 1);
        t.insert(net("10.0.1.0/24"), 2);
        t.insert(net("fd00::/64"), 1);
        t.retain(|_, v| *v != 1);
        assert_eq!(t.entries(), vec![(net("10.0.1.0/24"), 2)]);
    }

    fn brute_force(table: &[(IpNet, u32)], addr: IpAddr) -> Option<u32> {
        // Later inserts of the same prefix win, as in the trie.
        let mut best: Option<(u8, u32)> = None;
        for (n, v) in table {
            if n.contains(&addr) {
                match best {
                    Some((l, _)) if l > n.prefix_len() => {}
                    _ => best = Some((n.prefix_len(), *v)),
                }
            }
        }
        best.map(|(_, v)| v)
    }

    fn arb_v4net() -> impl Strategy<Value = IpNet> {
        // Few distinct high bits so that prefixes nest and collide often.
        (0u32..16, any::<u32>(), 0u8..=32).prop_map(|(hi, lo, len)| {
            let a = Ipv4Addr::from((hi << 28) | (lo >> 4));
            IpNet::V4(Ipv4Net::new(a, len).expect("len <= 32").trunc())
        })
    }

    fn arb_v6net() -> impl Strategy<Value = IpNet> {
        (0u128..16, any::<u128>(), 0u8..=128).prop_map(|(hi, lo, len)| {
            let a = Ipv6Addr::from((hi << 124) | (lo >> 4));
            IpNet::V6(Ipv6Net::new(a, len).expect("len <= 128").trunc())
        })
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..16, any::<u32>())
                .prop_map(|(hi, lo)| IpAddr::V4(Ipv4Addr::from((hi << 28) | (lo >> 4)))),
            (0u128..16, any::<u128>())
                .prop_map(|(hi, lo)| IpAddr::V6(Ipv6Addr::from((hi << 124) | (lo >> 4)))),
        ]
    }

    proptest! {
        #[test]
        fn lookup_matches_brute_force(
            inserts in prop::collection::vec((prop_oneof![arb_v4net(), arb_v6net()], 0u32..8), 0..40),
            removes in prop::collection::vec(0usize..40, 0..10),
            probes in prop::collection::vec(arb_addr(), 1..40),
        ) {
            let mut t = AllowedIps::new();
            let mut model: Vec<(IpNet, u32)> = Vec::new();
            for (n, v) in &inserts {
                t.insert(*n, *v);
                model.retain(|(m, _)| m != n);
                model.push((*n, *v));
            }
            for r in removes {
                if let Some((n, v)) = model.get(r).copied() {
                    prop_assert_eq!(t.remove(n), Some(v));
                    model.remove(r);
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for a in &probes {
                prop_assert_eq!(t.lookup(*a), brute_force(&model, *a));
            }
            // Probe the inserted networks' own addresses too (exact boundaries).
            for (n, _) in &inserts {
                prop_assert_eq!(t.lookup(n.addr()), brute_force(&model, n.addr()));
                prop_assert_eq!(t.lookup(n.broadcast()), brute_force(&model, n.broadcast()));
            }
            let mut sorted_model = model.clone();
            sorted_model.sort();
            let mut entries = t.entries();
            entries.sort();
            prop_assert_eq!(entries, sorted_model);
        }
    }
}
