//! The cross-platform WireGuard UAPI (<https://www.wireguard.com/xplatform/>), as served by
//! wireguard-go and read by the stock `wg` tool: `set=1` requests are parsed in full into a typed
//! [`SetRequest`] before anything is applied, so a bad line anywhere changes nothing; `get=1`
//! answers are written from a [`DeviceInfo`] snapshot. Framing (reading up to the blank line)
//! is the driver's job.
//!
//! Error numbers follow wireguard-go, which writes them negated (`errno=-22`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::key::Key;

/// `errno` values sent back to the client, as wireguard-go sends them.
pub mod errno {
    /// Invalid key or value (`-EINVAL`).
    pub const INVALID: i32 = -22;
    /// Malformed line (`-EPROTO`).
    pub const PROTOCOL: i32 = -71;
    /// The listen port is taken (`-EADDRINUSE`).
    pub const PORT_IN_USE: i32 = -98;
    /// I/O failure while applying (`-EIO`).
    pub const IO: i32 = -5;
}

/// The operation named by the first line of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `get=1`: dump the configuration and counters.
    Get,
    /// `set=1`: change the configuration.
    Set,
}

impl Operation {
    /// Parses the first line (without the newline). `None` for anything else, on which
    /// wireguard-go closes the connection without an answer.
    pub fn parse(line: &str) -> Option<Operation> {
        match line {
            "get=1" => Some(Operation::Get),
            "set=1" => Some(Operation::Set),
            _ => None,
        }
    }
}

/// Why a `set` request was refused; [`UapiError::errno`] is what goes back on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// A line without `=`.
    #[error("line {line}: expected key=value")]
    Malformed {
        /// 1-based line number after the `set=1` line.
        line: usize,
    },
    /// A known key with a value that does not parse.
    #[error("line {line}: invalid value for {key}: {reason}")]
    InvalidValue {
        /// 1-based line number after the `set=1` line.
        line: usize,
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A key that is unknown, or not valid where it appears (a device key inside a peer section,
    /// a peer key before any `public_key`).
    #[error("line {line}: unexpected key {key}")]
    UnexpectedKey {
        /// 1-based line number after the `set=1` line.
        line: usize,
        /// The key.
        key: String,
    },
}

impl UapiError {
    /// The errno wireguard-go answers for this error.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Malformed { .. } => errno::PROTOCOL,
            UapiError::InvalidValue { .. } | UapiError::UnexpectedKey { .. } => errno::INVALID,
        }
    }
}

/// A set value that can also be cleared (`private_key=000…`, `fwmark=0`, `preshared_key=000…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting<T> {
    /// Set to this value.
    Set(T),
    /// Clear.
    Clear,
}

impl<T> Setting<T> {
    /// `Some(v)` for `Set(v)`, `None` for `Clear`.
    pub fn into_option(self) -> Option<T> {
        match self {
            Setting::Set(v) => Some(v),
            Setting::Clear => None,
        }
    }
}

/// A fully parsed `set=1` request. Fields left `None` are not changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `private_key`: all zeros clears it.
    pub private_key: Option<Setting<Key>>,
    /// `listen_port`: 0 means "pick a random port".
    pub listen_port: Option<u16>,
    /// `fwmark`: 0 clears it.
    pub fwmark: Option<Setting<u32>>,
    /// `replace_peers=true`: remove every peer not named in this request first.
    pub replace_peers: bool,
    /// Peer sections, in order.
    pub peers: Vec<PeerChange>,
}

/// One `public_key=` section of a set request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    /// The peer's public key.
    pub public_key: Key,
    /// `remove=true`: remove the peer (other keys of the section are ignored).
    pub remove: bool,
    /// `update_only=true`: only change the peer if it already exists.
    pub update_only: bool,
    /// `preshared_key`: all zeros clears it.
    pub preshared_key: Option<Setting<Key>>,
    /// `endpoint`.
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval` in seconds, 0 = off.
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true`: drop the peer's allowed IPs before adding these.
    pub replace_allowed_ips: bool,
    /// `allowed_ip` lines, host bits cleared.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerChange {
    /// A section that names the peer and changes nothing else.
    pub fn new(public_key: Key) -> Self {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

fn invalid(line: usize, key: &str, reason: impl Into<String>) -> UapiError {
    UapiError::InvalidValue {
        line,
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn parse_num<T: FromStr>(line: usize, key: &str, value: &str) -> Result<T, UapiError> {
    // Decimal digits only, as wireguard-go (no sign, no 0x, no spaces).
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(line, key, "expected a decimal number"));
    }
    value
        .parse()
        .map_err(|_| invalid(line, key, "number out of range"))
}

fn parse_true(line: usize, key: &str, value: &str) -> Result<bool, UapiError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(invalid(line, key, "the only accepted value is true"))
    }
}

fn parse_key(line: usize, key: &str, value: &str) -> Result<Key, UapiError> {
    Key::from_hex(value).map_err(|e| invalid(line, key, e.to_string()))
}

fn parse_key_setting(line: usize, key: &str, value: &str) -> Result<Setting<Key>, UapiError> {
    let k = parse_key(line, key, value)?;
    Ok(if k.is_zero() {
        Setting::Clear
    } else {
        Setting::Set(k)
    })
}

impl SetRequest {
    /// Parses the body of a `set=1` request: the lines after `set=1`, without the terminating
    /// blank line. Either the whole request parses or nothing is returned.
    pub fn parse(body: &str) -> Result<SetRequest, UapiError> {
        let mut req = SetRequest::default();
        for (i, raw) in body.lines().enumerate() {
            let line = i + 1;
            if raw.is_empty() {
                continue;
            }
            let (key, value) = raw.split_once('=').ok_or(UapiError::Malformed { line })?;
            if key == "public_key" {
                req.peers
                    .push(PeerChange::new(parse_key(line, key, value)?));
                continue;
            }
            let Some(peer) = req.peers.last_mut() else {
                match key {
                    "private_key" => {
                        req.private_key = Some(parse_key_setting(line, key, value)?);
                    }
                    "listen_port" => req.listen_port = Some(parse_num(line, key, value)?),
                    "fwmark" => {
                        let mark: u32 = parse_num(line, key, value)?;
                        req.fwmark = Some(if mark == 0 {
                            Setting::Clear
                        } else {
                            Setting::Set(mark)
                        });
                    }
                    "replace_peers" => req.replace_peers = parse_true(line, key, value)?,
                    _ => {
                        return Err(UapiError::UnexpectedKey {
                            line,
                            key: key.to_owned(),
                        })
                    }
                }
                continue;
            };
            match key {
                "remove" => peer.remove = parse_true(line, key, value)?,
                "update_only" => peer.update_only = parse_true(line, key, value)?,
                "preshared_key" => {
                    peer.preshared_key = Some(parse_key_setting(line, key, value)?);
                }
                "endpoint" => {
                    let ep: SocketAddr = value
                        .parse()
                        .map_err(|_| invalid(line, key, "expected IP:port or [IPv6]:port"))?;
                    if ep.port() == 0 || ep.ip().is_unspecified() {
                        return Err(invalid(line, key, "endpoint needs an address and a port"));
                    }
                    peer.endpoint = Some(ep);
                }
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(parse_num(line, key, value)?);
                }
                "replace_allowed_ips" => {
                    peer.replace_allowed_ips = parse_true(line, key, value)?;
                }
                "allowed_ip" => {
                    let net: IpNet = value
                        .parse()
                        .map_err(|_| invalid(line, key, "expected address/prefix-length"))?;
                    peer.allowed_ips.push(net.trunc());
                }
                "protocol_version" => {
                    if value != "1" {
                        return Err(invalid(line, key, "only protocol version 1 exists"));
                    }
                }
                _ => {
                    return Err(UapiError::UnexpectedKey {
                        line,
                        key: key.to_owned(),
                    })
                }
            }
        }
        Ok(req)
    }

    /// Writes the request as UAPI text, starting with `set=1` and ending with the blank line.
    pub fn to_uapi(&self) -> String {
        let mut s = String::from("set=1\n");
        match self.private_key {
            Some(Setting::Set(k)) => push_kv(&mut s, "private_key", k.to_hex()),
            Some(Setting::Clear) => push_kv(&mut s, "private_key", Key::ZERO.to_hex()),
            None => {}
        }
        if let Some(p) = self.listen_port {
            push_kv(&mut s, "listen_port", p);
        }
        match self.fwmark {
            Some(Setting::Set(m)) => push_kv(&mut s, "fwmark", m),
            Some(Setting::Clear) => push_kv(&mut s, "fwmark", 0),
            None => {}
        }
        if self.replace_peers {
            push_kv(&mut s, "replace_peers", "true");
        }
        for p in &self.peers {
            push_kv(&mut s, "public_key", p.public_key.to_hex());
            if p.remove {
                push_kv(&mut s, "remove", "true");
            }
            if p.update_only {
                push_kv(&mut s, "update_only", "true");
            }
            match p.preshared_key {
                Some(Setting::Set(k)) => push_kv(&mut s, "preshared_key", k.to_hex()),
                Some(Setting::Clear) => push_kv(&mut s, "preshared_key", Key::ZERO.to_hex()),
                None => {}
            }
            if let Some(ep) = p.endpoint {
                push_kv(&mut s, "endpoint", ep);
            }
            if let Some(k) = p.persistent_keepalive {
                push_kv(&mut s, "persistent_keepalive_interval", k);
            }
            if p.replace_allowed_ips {
                push_kv(&mut s, "replace_allowed_ips", "true");
            }
            for n in &p.allowed_ips {
                push_kv(&mut s, "allowed_ip", n);
            }
        }
        s.push('\n');
        s
    }
}

fn push_kv(s: &mut String, key: &str, value: impl std::fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(s, "{key}={value}");
}

/// A snapshot of the device for a `get=1` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's private key, if set.
    pub private_key: Option<Key>,
    /// The bound port (0 = not listening).
    pub listen_port: u16,
    /// The socket mark, 0 = none.
    pub fwmark: u32,
    /// Every peer.
    pub peers: Vec<PeerInfo>,
}

/// One peer in a [`DeviceInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's public key.
    pub public_key: Key,
    /// Its preshared key, if any.
    pub preshared_key: Option<Key>,
    /// Its current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Time of the last completed handshake as UNIX time (seconds, nanoseconds); `(0, 0)` = never.
    pub last_handshake: (u64, u32),
    /// Bytes sent to the peer on the wire.
    pub tx_bytes: u64,
    /// Bytes received from the peer on the wire.
    pub rx_bytes: u64,
    /// Persistent keepalive interval in seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
}

impl DeviceInfo {
    /// Writes the `get=1` answer in wireguard-go's order, ending with `errno=0` and the blank line.
    pub fn to_uapi(&self) -> String {
        let mut s = String::with_capacity(128 + 400 * self.peers.len());
        if let Some(k) = self.private_key {
            push_kv(&mut s, "private_key", k.to_hex());
        }
        if self.listen_port != 0 {
            push_kv(&mut s, "listen_port", self.listen_port);
        }
        if self.fwmark != 0 {
            push_kv(&mut s, "fwmark", self.fwmark);
        }
        for p in &self.peers {
            push_kv(&mut s, "public_key", p.public_key.to_hex());
            push_kv(
                &mut s,
                "preshared_key",
                p.preshared_key.unwrap_or(Key::ZERO).to_hex(),
            );
            push_kv(&mut s, "protocol_version", 1);
            if let Some(ep) = p.endpoint {
                push_kv(&mut s, "endpoint", ep);
            }
            push_kv(&mut s, "last_handshake_time_sec", p.last_handshake.0);
            push_kv(&mut s, "last_handshake_time_nsec", p.last_handshake.1);
            push_kv(&mut s, "tx_bytes", p.tx_bytes);
            push_kv(&mut s, "rx_bytes", p.rx_bytes);
            push_kv(
                &mut s,
                "persistent_keepalive_interval",
                p.persistent_keepalive,
            );
            for n in &p.allowed_ips {
                push_kv(&mut s, "allowed_ip", n);
            }
        }
        s.push_str("errno=0\n\n");
        s
    }

    /// Parses a `get=1` answer (as written by [`DeviceInfo::to_uapi`], wireguard-go or
    /// boringtun), for clients such as `skymesh-agent status` and tests. A non-zero `errno` is
    /// returned as `Err(errno)`; a malformed answer as `Err(errno::PROTOCOL)`.
    pub fn parse(text: &str) -> Result<DeviceInfo, i32> {
        let mut info = DeviceInfo::default();
        for raw in text.lines() {
            if raw.is_empty() {
                continue;
            }
            let (key, value) = raw.split_once('=').ok_or(errno::PROTOCOL)?;
            let bad = |_| errno::PROTOCOL;
            match key {
                "errno" => {
                    let e: i32 = value.parse().map_err(bad)?;
                    return if e == 0 { Ok(info) } else { Err(e) };
                }
                "private_key" => {
                    info.private_key = Some(Key::from_hex(value).map_err(|_| errno::PROTOCOL)?)
                }
                "listen_port" => info.listen_port = value.parse().map_err(bad)?,
                "fwmark" => info.fwmark = value.parse().map_err(bad)?,
                "public_key" => info.peers.push(PeerInfo {
                    public_key: Key::from_hex(value).map_err(|_| errno::PROTOCOL)?,
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: (0, 0),
                    tx_bytes: 0,
                    rx_bytes: 0,
                    persistent_keepalive: 0,
                    allowed_ips: Vec::new(),
                }),
                _ => {
                    let p = info.peers.last_mut().ok_or(errno::PROTOCOL)?;
                    match key {
                        "preshared_key" => {
                            let k = Key::from_hex(value).map_err(|_| errno::PROTOCOL)?;
                            p.preshared_key = (!k.is_zero()).then_some(k);
                        }
                        "protocol_version" => {}
                        "endpoint" => {
                            p.endpoint = Some(value.parse().map_err(|_| errno::PROTOCOL)?)
                        }
                        "last_handshake_time_sec" => {
                            p.last_handshake.0 = value.parse().map_err(bad)?
                        }
                        "last_handshake_time_nsec" => {
                            p.last_handshake.1 = value.parse().map_err(bad)?
                        }
                        "tx_bytes" => p.tx_bytes = value.parse().map_err(bad)?,
                        "rx_bytes" => p.rx_bytes = value.parse().map_err(bad)?,
                        "persistent_keepalive_interval" => {
                            p.persistent_keepalive = value.parse().map_err(bad)?
                        }
                        "allowed_ip" => p
                            .allowed_ips
                            .push(value.parse().map_err(|_| errno::PROTOCOL)?),
                        _ => return Err(errno::PROTOCOL),
                    }
                }
            }
        }
        // No errno line: truncated answer.
        Err(errno::PROTOCOL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

    fn key(h: &str) -> Key {
        Key::from_hex(h).expect("test key")
    }

    #[test]
    fn parses_the_documented_example_request() {
        let body = format!(
            "private_key={K1}\nfwmark=0\nlisten_port=12912\nreplace_peers=true\n\
             public_key={K2}\npreshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52\n\
             replace_allowed_ips=true\nallowed_ip=192.168.4.4/32\nendpoint=[abcd:23::33%2]:51820\n\
             public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\n\
             update_only=true\nendpoint=182.122.22.19:3233\npersistent_keepalive_interval=111\n\
             replace_allowed_ips=true\nallowed_ip=192.168.4.6/32\nallowed_ip=fd00::1/64\n\
             protocol_version=1\n"
        );
        // Scope ids (`%2`) are not kept by `SocketAddr`; use a plain address.
        let body = body.replace("[abcd:23::33%2]", "[abcd:23::33]");
        let req = SetRequest::parse(&body).expect("valid request");
        assert_eq!(req.private_key, Some(Setting::Set(key(K1))));
        assert_eq!(req.fwmark, Some(Setting::Clear));
        assert_eq!(req.listen_port, Some(12912));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 2);
        assert_eq!(req.peers[0].public_key, key(K2));
        assert_eq!(
            req.peers[0].endpoint,
            Some("[abcd:23::33]:51820".parse().expect("addr"))
        );
        assert!(req.peers[1].update_only);
        assert_eq!(req.peers[1].persistent_keepalive, Some(111));
        assert_eq!(
            req.peers[1].allowed_ips,
            vec![
                "192.168.4.6/32".parse::<IpNet>().expect("net"),
                "fd00::/64".parse::<IpNet>().expect("net"),
            ]
        );
    }

    #[test]
    fn malformed_requests_name_the_line_and_map_to_wireguard_go_errnos() {
        let cases: &[(&str, i32, usize)] = &[
            ("private_key=zz", errno::INVALID, 1),
            ("listen_port=abc", errno::INVALID, 1),
            ("listen_port=65536", errno::INVALID, 1),
            ("listen_port=-1", errno::INVALID, 1),
            ("fwmark=0x10", errno::INVALID, 1),
            ("bogus=1", errno::INVALID, 1),
            ("remove=true", errno::INVALID, 1),
            ("listen_port=1\nnoequals", errno::PROTOCOL, 2),
            ("replace_peers=false", errno::INVALID, 1),
        ];
        for (body, want, line) in cases {
            let err = SetRequest::parse(body).expect_err(body);
            assert_eq!(err.errno(), *want, "{body}: {err}");
            assert!(
                err.to_string().starts_with(&format!("line {line}:")),
                "{err}"
            );
        }
        let peer_cases = [
            "endpoint=nonsense",
            "endpoint=1.2.3.4",
            "endpoint=1.2.3.4:0",
            "endpoint=0.0.0.0:51820",
            "allowed_ip=10.0.0.0/33",
            "allowed_ip=10.0.0.1",
            "protocol_version=2",
            "persistent_keepalive_interval=70000",
            "listen_port=1",
            "preshared_key=00",
            "update_only=yes",
        ];
        for l in peer_cases {
            let body = format!("public_key={K1}\n{l}");
            let err = SetRequest::parse(&body).expect_err(l);
            assert_eq!(err.errno(), errno::INVALID, "{l}");
        }
    }

    #[test]
    fn zero_keys_and_zero_fwmark_clear() {
        let zero = Key::ZERO.to_hex();
        let req = SetRequest::parse(&format!(
            "private_key={zero}\nfwmark=0\npublic_key={K1}\npreshared_key={zero}"
        ))
        .expect("valid");
        assert_eq!(req.private_key, Some(Setting::Clear));
        assert_eq!(req.fwmark, Some(Setting::Clear));
        assert_eq!(req.peers[0].preshared_key, Some(Setting::Clear));
    }

    #[test]
    fn get_answer_round_trips_and_matches_wireguard_go_order() {
        let info = DeviceInfo {
            private_key: Some(key(K1)),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: key(K2),
                preshared_key: None,
                endpoint: Some("[fd00::2]:51821".parse().expect("addr")),
                last_handshake: (1_700_000_000, 12),
                tx_bytes: 148,
                rx_bytes: 92,
                persistent_keepalive: 25,
                allowed_ips: vec!["10.0.0.2/32".parse().expect("net")],
            }],
        };
        let text = info.to_uapi();
        let expected = format!(
            "private_key={K1}\nlisten_port=51820\npublic_key={K2}\npreshared_key={}\n\
             protocol_version=1\nendpoint=[fd00::2]:51821\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=12\ntx_bytes=148\nrx_bytes=92\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.2/32\nerrno=0\n\n",
            Key::ZERO.to_hex()
        );
        assert_eq!(text, expected);
        assert_eq!(DeviceInfo::parse(&text), Ok(info));
        assert_eq!(DeviceInfo::parse("errno=-22\n\n"), Err(-22));
        assert_eq!(DeviceInfo::parse("listen_port=1\n"), Err(errno::PROTOCOL));
    }

    #[test]
    fn operation_header() {
        assert_eq!(Operation::parse("get=1"), Some(Operation::Get));
        assert_eq!(Operation::parse("set=1"), Some(Operation::Set));
        assert_eq!(Operation::parse("set=2"), None);
    }

    fn arb_key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>().prop_map(Key)
    }

    fn arb_peer() -> impl Strategy<Value = PeerChange> {
        (
            arb_key(),
            any::<bool>(),
            any::<bool>(),
            prop::option::of(prop_oneof![
                arb_key()
                    .prop_filter("non-zero", |k| !k.is_zero())
                    .prop_map(Setting::Set),
                Just(Setting::Clear)
            ]),
            prop::option::of(
                (any::<[u8; 4]>(), 1u16..)
                    .prop_map(|(a, p)| SocketAddr::from((std::net::Ipv4Addr::from(a), p))),
            ),
            prop::option::of(any::<u16>()),
            any::<bool>(),
            prop::collection::vec(
                (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, l)| {
                    IpNet::new(std::net::Ipv6Addr::from(a).into(), l)
                        .expect("l <= 128")
                        .trunc()
                }),
                0..4,
            ),
        )
            .prop_filter("endpoint must be specified", |p| {
                p.4.is_none_or(|e| !e.ip().is_unspecified())
            })
            .prop_map(
                |(k, remove, update_only, psk, ep, ka, rai, ips)| PeerChange {
                    public_key: k,
                    remove,
                    update_only,
                    preshared_key: psk,
                    endpoint: ep,
                    persistent_keepalive: ka,
                    replace_allowed_ips: rai,
                    allowed_ips: ips,
                },
            )
    }

    proptest! {
        #[test]
        fn set_requests_round_trip(
            pk in prop::option::of(arb_key().prop_filter("non-zero", |k| !k.is_zero())),
            port in prop::option::of(any::<u16>()),
            mark in prop::option::of(1u32..),
            replace in any::<bool>(),
            peers in prop::collection::vec(arb_peer(), 0..4),
        ) {
            let req = SetRequest {
                private_key: pk.map(Setting::Set),
                listen_port: port,
                fwmark: mark.map(Setting::Set),
                replace_peers: replace,
                peers,
            };
            let text = req.to_uapi();
            let body = text.strip_prefix("set=1\n").expect("header");
            prop_assert_eq!(SetRequest::parse(body), Ok(req));
        }

        #[test]
        fn arbitrary_input_never_panics(body in "[a-z_=0-9:./\\[\\]\n-]{0,200}") {
            let _ = SetRequest::parse(&body);
            let _ = DeviceInfo::parse(&body);
        }

        #[test]
        fn corrupting_one_value_is_an_error_not_a_silent_change(
            peers in prop::collection::vec(arb_peer(), 1..3),
            which in any::<prop::sample::Index>(),
        ) {
            let req = SetRequest { peers, ..SetRequest::default() };
            let text = req.to_uapi();
            let body = text.strip_prefix("set=1\n").expect("header");
            let lines: Vec<&str> = body.lines().filter(|l| !l.is_empty()).collect();
            let i = which.index(lines.len());
            let mut corrupted: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            corrupted[i].push('!');
            let err = SetRequest::parse(&corrupted.join("\n"));
            prop_assert!(err.is_err(), "accepted {:?}", corrupted[i]);
        }
    }
}
