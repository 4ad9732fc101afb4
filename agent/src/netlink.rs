//! A small synchronous rtnetlink client: exactly the requests `up`/`down` need (addresses, MTU,
//! link up, device routes), each acknowledged before the next. Messages are plain
//! `netlink-packet-route` data; [`Rtnl::request`] is the only I/O. [`LinkMonitor`] is the
//! data plane's non-blocking subscription to link and address notifications (uplink failover).

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A connected NETLINK_ROUTE socket.
pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub(crate) fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement; a netlink error becomes the
    /// matching `io::Error` (e.g. `EEXIST`).
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut nl = NetlinkMessage::from(msg);
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = msg.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// Sets the MTU and brings the link up.
    pub(crate) fn set_link_up(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Adds `addr` (host address with prefix length) to the link.
    pub(crate) fn add_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewAddress(address_message(index, addr)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub(crate) fn del_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::DelAddress(address_message(index, addr)),
            0,
        )
    }

    /// Adds a device route for `net` via the link (`ip route add NET dev IFACE`).
    pub(crate) fn add_route(&mut self, index: u32, net: IpNet) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(route_message(index, net)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub(crate) fn del_route(&mut self, index: u32, net: IpNet) -> io::Result<()> {
        self.request(RouteNetlinkMessage::DelRoute(route_message(index, net)), 0)
    }

    /// The addresses on link `index` a peer can be told to use, in the kernel's order: not
    /// tentative (DAD running), DAD-failed, deprecated (leaving), nor an IPv6 temporary
    /// (privacy) address or an IPv4 secondary.
    pub(crate) fn addresses(&mut self, index: u32) -> io::Result<Vec<IpAddr>> {
        Ok(self
            .dump_addresses(Some(index))?
            .into_iter()
            .map(|(_, a)| a)
            .collect())
    }

    /// Like [`Rtnl::addresses`], of every link: `(link index, address)`.
    pub(crate) fn all_addresses(&mut self) -> io::Result<Vec<(u32, IpAddr)>> {
        self.dump_addresses(None)
    }

    fn dump_addresses(&mut self, index: Option<u32>) -> io::Result<Vec<(u32, IpAddr)>> {
        self.seq = self.seq.wrapping_add(1);
        let mut nl =
            NetlinkMessage::from(RouteNetlinkMessage::GetAddress(AddressMessage::default()));
        nl.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        nl.header.sequence_number = self.seq;
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq {
                    match msg.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            if let Some(code) = e.code {
                                return Err(io::Error::from_raw_os_error(-code.get()));
                            }
                        }
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m))
                            if index.is_none_or(|i| m.header.index == i) && stable(&m) =>
                        {
                            if let Some(LinkChange::Address { addr, .. }) = address_change(&m, true)
                            {
                                out.push((m.header.index, addr));
                            }
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.index = index;
    m.header.prefix_len = addr.prefix_len();
    match addr.addr() {
        IpAddr::V4(a) => {
            m.header.family = AddressFamily::Inet;
            m.attributes.push(AddressAttribute::Local(a.into()));
            m.attributes.push(AddressAttribute::Address(a.into()));
        }
        IpAddr::V6(a) => {
            m.header.family = AddressFamily::Inet6;
            m.attributes.push(AddressAttribute::Address(a.into()));
        }
    }
    m
}

fn route_message(index: u32, net: IpNet) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.kind = RouteType::Unicast;
    m.header.destination_prefix_length = net.prefix_len();
    match net.network() {
        IpAddr::V4(a) => {
            m.header.address_family = AddressFamily::Inet;
            m.header.scope = RouteScope::Link;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(a)));
        }
        IpAddr::V6(a) => {
            m.header.address_family = AddressFamily::Inet6;
            m.header.scope = RouteScope::Universe;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet6(a)));
        }
    }
    m.attributes.push(RouteAttribute::Oif(index));
    m
}

/// A link or address change the device cares about (see [`LinkMonitor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkChange {
    /// A link appeared or changed: its index, name and whether it is operationally up
    /// (administratively up with carrier).
    Link {
        index: u32,
        name: String,
        running: bool,
    },
    /// A link was deleted.
    Removed { index: u32 },
    /// An address was added to (`added`) or removed from a link.
    Address {
        index: u32,
        addr: IpAddr,
        added: bool,
    },
}

/// A non-blocking NETLINK_ROUTE socket subscribed to link and address multicast groups,
/// polled by the data plane next to its other fds.
pub(crate) struct LinkMonitor {
    sock: Socket,
    buf: Vec<u8>,
}

impl LinkMonitor {
    pub(crate) fn open() -> io::Result<LinkMonitor> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        let groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        sock.bind(&SocketAddr::new(0, groups))?;
        sock.set_non_blocking(true)?;
        Ok(LinkMonitor {
            sock,
            buf: vec![0u8; 64 * 1024],
        })
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    /// Reads every pending notification and passes the relevant ones to `f`. An overrun
    /// (`ENOBUFS`) is reported as `Err` so the caller can re-read link states.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(LinkChange)) -> io::Result<()> {
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut off = 0;
            while off < n {
                let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                else {
                    break;
                };
                let len = msg.header.length as usize;
                if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                    if let Some(change) = link_change(inner) {
                        f(change);
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn link_change(msg: RouteNetlinkMessage) -> Option<LinkChange> {
    match msg {
        RouteNetlinkMessage::NewLink(m) => {
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })?;
            let running = m.header.flags.contains(LinkFlags::Up)
                && m.header.flags.contains(LinkFlags::Running);
            Some(LinkChange::Link {
                index: m.header.index,
                name,
                running,
            })
        }
        RouteNetlinkMessage::DelLink(m) => Some(LinkChange::Removed {
            index: m.header.index,
        }),
        RouteNetlinkMessage::NewAddress(m) => address_change(&m, true),
        RouteNetlinkMessage::DelAddress(m) => address_change(&m, false),
        _ => None,
    }
}

/// Whether an address is fit to announce (see [`Rtnl::addresses`]). The header holds the low
/// eight flag bits; `IFA_FLAGS`, when present, all of them.
fn stable(m: &AddressMessage) -> bool {
    let flags = m
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())));
    // IFA_F_SECONDARY is IFA_F_TEMPORARY for IPv6.
    !flags.intersects(
        AddressFlags::Tentative
            | AddressFlags::Dadfailed
            | AddressFlags::Deprecated
            | AddressFlags::Secondary,
    )
}

fn address_change(m: &AddressMessage, added: bool) -> Option<LinkChange> {
    let addr = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(a) => Some(*a),
        _ => None,
    });
    let addr = addr.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) => Some(*a),
            _ => None,
        })
    })?;
    Some(LinkChange::Address {
        index: m.header.index,
        addr,
        added,
    })
}

/// Whether interface `name` is operationally up, from sysfs (`operstate` `up`, or `unknown`
/// for devices without carrier reporting). A missing interface is down.
pub(crate) fn link_running(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"))
        .is_ok_and(|s| matches!(s.trim(), "up" | "unknown"))
}
