//! A small synchronous rtnetlink client: exactly the requests `up`/`down` need (addresses, MTU,
//! link up, device routes), each acknowledged before the next. Messages are plain
//! `netlink-packet-route` data; [`Rtnl::request`] is the only I/O.

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
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
