//! The subnet-route guard (pure): which routes a node may advertise and which may be approved.
//!
//! Agents install every approved peer route and the longest prefix wins, so one node's route
//! must never equal, contain or sit inside another node's route (a captured unit advertising
//! two /25s would take a /24 LAN from its owner), nor cover an address the mesh itself needs
//! (the controller, any node's announced endpoint: traffic to it would enter the tunnel it
//! carries), nor grow beyond what an admin allows one node to route.

use std::net::IpAddr;

use ipnet::IpNet;
use skymesh_proto::NodeId;

/// Defaults for [`RouteLimits`]: a node's routes together cover at most as many addresses as
/// one IPv4 /16 (a large site LAN) and one IPv6 /48 (a whole site allocation).
pub const DEFAULT_MAX_ROUTE_PREFIX_V4: u8 = 16;
pub const DEFAULT_MAX_ROUTE_PREFIX_V6: u8 = 48;

/// How much address space one node may route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLimits {
    /// A node's IPv4 routes together cover at most as many addresses as one `/max_prefix_v4`.
    pub max_prefix_v4: u8,
    /// A node's IPv6 routes together cover at most as many addresses as one `/max_prefix_v6`.
    pub max_prefix_v6: u8,
}

impl Default for RouteLimits {
    fn default() -> Self {
        Self {
            max_prefix_v4: DEFAULT_MAX_ROUTE_PREFIX_V4,
            max_prefix_v6: DEFAULT_MAX_ROUTE_PREFIX_V6,
        }
    }
}

/// Everything a route is checked against, taken from the store inside the write transaction.
#[derive(Debug, Clone, Default)]
pub struct RouteGuard {
    pub limits: RouteLimits,
    /// Addresses no route may cover besides node endpoints (the controller's own).
    pub protected: Vec<IpAddr>,
}

/// A route somebody else holds, or an address that must stay outside every route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Node(NodeId),
    SameNode,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("`{field}`: route {route} overlaps route {other} of node {node}")]
    Overlaps {
        field: &'static str,
        route: IpNet,
        other: IpNet,
        node: NodeId,
    },
    #[error("`{field}`: routes {route} and {other} overlap each other")]
    OverlapsItself {
        field: &'static str,
        route: IpNet,
        other: IpNet,
    },
    #[error("`{field}`: route {route} covers {what} {addr}, which must stay reachable outside the overlay")]
    CoversProtected {
        field: &'static str,
        route: IpNet,
        what: &'static str,
        addr: IpAddr,
    },
    #[error(
        "`{field}`: these routes together cover more addresses than one /{max} \
         (the controller's `{setting}`)"
    )]
    TooLarge {
        field: &'static str,
        max: u8,
        setting: &'static str,
    },
}

/// Whether two prefixes share any address (one contains the other, or they are equal).
pub fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Addresses covered by `n`, saturating (a /0 is refused before it gets here).
fn size(n: &IpNet) -> u128 {
    let bits = u32::from(n.max_prefix_len() - n.prefix_len());
    1u128.checked_shl(bits).unwrap_or(u128::MAX)
}

/// Checks one node's complete set of `routes` (as named by `field` in errors):
/// pairwise disjoint, disjoint from every route in `others`, clear of the controller's
/// protected addresses and of every endpoint in `endpoints`, and within the size limits.
pub fn check(
    field: &'static str,
    routes: &[IpNet],
    others: &[(NodeId, IpNet)],
    endpoints: &[IpAddr],
    guard: &RouteGuard,
) -> Result<(), RouteError> {
    for (i, r) in routes.iter().enumerate() {
        if let Some(o) = routes[i + 1..].iter().find(|o| overlap(r, o)) {
            return Err(RouteError::OverlapsItself {
                field,
                route: *r,
                other: *o,
            });
        }
        if let Some((node, o)) = others.iter().find(|(_, o)| overlap(r, o)) {
            return Err(RouteError::Overlaps {
                field,
                route: *r,
                other: *o,
                node: *node,
            });
        }
        let protected = guard
            .protected
            .iter()
            .map(|a| ("the controller's address", a));
        let eps = endpoints.iter().map(|a| ("the announced endpoint", a));
        if let Some((what, addr)) = protected.chain(eps).find(|(_, a)| r.contains(*a)) {
            return Err(RouteError::CoversProtected {
                field,
                route: *r,
                what,
                addr: *addr,
            });
        }
    }
    let total = |v4: bool| {
        routes
            .iter()
            .filter(|r| matches!(r, IpNet::V4(_)) == v4)
            .fold(0u128, |acc, r| acc.saturating_add(size(r)))
    };
    let limits = guard.limits;
    if total(true) > 1u128 << (32 - u32::from(limits.max_prefix_v4.min(32))) {
        return Err(RouteError::TooLarge {
            field,
            max: limits.max_prefix_v4,
            setting: "max_route_prefix_v4",
        });
    }
    if total(false) > 1u128 << (128 - u32::from(limits.max_prefix_v6.clamp(1, 128))) {
        return Err(RouteError::TooLarge {
            field,
            max: limits.max_prefix_v6,
            setting: "max_route_prefix_v6",
        });
    }
    Ok(())
}

/// The routes of `advertised` that an enrollment key's `allowed` prefixes approve at once.
pub fn auto_approved(advertised: &[IpNet], allowed: &[IpNet]) -> Vec<IpNet> {
    advertised
        .iter()
        .filter(|r| allowed.iter().any(|a| a.contains(*r)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn guard() -> RouteGuard {
        RouteGuard {
            limits: RouteLimits::default(),
            protected: vec!["198.18.0.1".parse().expect("ip")],
        }
    }

    #[test]
    fn two_halves_of_a_held_lan_are_refused_naming_the_owner() {
        let others = [(NodeId(3), n("192.168.50.0/24"))];
        let e =
            check("routes", &[n("192.168.50.0/25")], &others, &[], &guard()).expect_err("inside");
        assert!(e.to_string().contains("node 3"), "{e}");
        assert!(e.to_string().contains("`routes`"), "{e}");
        for r in ["192.168.50.0/24", "192.168.0.0/16", "192.168.50.128/25"] {
            assert!(
                check("routes", &[n(r)], &others, &[], &guard()).is_err(),
                "{r}"
            );
        }
        check("routes", &[n("192.168.51.0/24")], &others, &[], &guard()).expect("disjoint");
    }

    #[test]
    fn routes_covering_the_controller_or_an_endpoint_or_too_much_space_are_refused() {
        let ep: IpAddr = "198.19.7.7".parse().expect("ip");
        let e = check("routes", &[n("198.18.0.0/24")], &[], &[], &guard()).expect_err("ctl");
        assert!(e.to_string().contains("controller"), "{e}");
        let e = check("routes", &[n("198.19.7.0/24")], &[], &[ep], &guard()).expect_err("ep");
        assert!(e.to_string().contains("198.19.7.7"), "{e}");
        // 16 /5s would be all of IPv4; two /17s are exactly one /16 and allowed.
        let e = check("routes", &[n("8.0.0.0/5")], &[], &[], &guard()).expect_err("big");
        assert!(e.to_string().contains("max_route_prefix_v4"), "{e}");
        check(
            "routes",
            &[n("10.1.0.0/17"), n("10.1.128.0/17")],
            &[],
            &[],
            &guard(),
        )
        .expect("one /16");
        let e = check(
            "routes",
            &[n("10.1.0.0/17"), n("10.1.128.0/17"), n("10.2.0.0/24")],
            &[],
            &[],
            &guard(),
        )
        .expect_err("more than a /16");
        assert!(matches!(e, RouteError::TooLarge { .. }), "{e}");
        let e = check("routes", &[n("fd00::/40")], &[], &[], &guard()).expect_err("v6");
        assert!(e.to_string().contains("max_route_prefix_v6"), "{e}");
        let e = check(
            "routes",
            &[n("10.1.0.0/16"), n("10.1.2.0/24")],
            &[],
            &[],
            &guard(),
        )
        .expect_err("self");
        assert!(matches!(e, RouteError::OverlapsItself { .. }), "{e}");
    }

    #[test]
    fn only_routes_inside_an_allowed_prefix_are_auto_approved() {
        let adv = [n("192.168.50.0/24"), n("10.9.0.0/24")];
        assert_eq!(auto_approved(&adv, &[]), Vec::<IpNet>::new());
        assert_eq!(
            auto_approved(&adv, &[n("192.168.0.0/16")]),
            vec![n("192.168.50.0/24")]
        );
        assert_eq!(
            auto_approved(&adv, &[n("192.168.50.0/25")]),
            Vec::<IpNet>::new()
        );
    }
}
