//! wg-quick style configuration files (`[Interface]` / `[Peer]`), as read by
//! `skymesh-agent up`. Parsing is strict: unknown or unsupported keys, duplicate single-valued
//! keys and bad values are errors that name the line. Hostname endpoints and the wg-quick hooks
//! (`PostUp`, `DNS`, `Table`, …) are refused rather than silently ignored.

use std::net::SocketAddr;

use ipnet::IpNet;

use crate::key::Key;
use crate::uapi::{PeerChange, SetRequest, Setting};

/// A parsed wg-quick file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickConfig {
    /// The `[Interface]` section.
    pub interface: InterfaceSection,
    /// The `[Peer]` sections, in file order.
    pub peers: Vec<PeerSection>,
}

/// `[Interface]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSection {
    /// `PrivateKey` (required).
    pub private_key: Key,
    /// `Address` (host address with prefix length, e.g. `10.0.0.1/24`), in order.
    pub addresses: Vec<IpNet>,
    /// `ListenPort`.
    pub listen_port: Option<u16>,
    /// `MTU`.
    pub mtu: Option<u32>,
    /// `FwMark` (`off` = `None`).
    pub fwmark: Option<u32>,
}

/// `[Peer]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSection {
    /// `PublicKey` (required).
    pub public_key: Key,
    /// `PresharedKey`.
    pub preshared_key: Option<Key>,
    /// `Endpoint` (an IP literal: no DNS in the agent core).
    pub endpoint: Option<SocketAddr>,
    /// `AllowedIPs`, host bits cleared.
    pub allowed_ips: Vec<IpNet>,
    /// `PersistentKeepalive` in seconds (`off` = `None`).
    pub persistent_keepalive: Option<u16>,
}

/// A wg-quick file error, with its 1-based line number (0 for whole-file errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct WgQuickError {
    /// 1-based line number; 0 when the error is about the file as a whole.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> WgQuickError {
    WgQuickError {
        line,
        message: message.into(),
    }
}

enum Section {
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct PartialPeer {
    line: usize,
    public_key: Option<Key>,
    preshared_key: Option<Key>,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<Option<u16>>,
}

fn set_once<T>(slot: &mut Option<T>, v: T, line: usize, key: &str) -> Result<(), WgQuickError> {
    if slot.is_some() {
        return Err(err(line, format!("{key} given twice")));
    }
    *slot = Some(v);
    Ok(())
}

fn parse_list<T>(
    value: &str,
    line: usize,
    key: &str,
    f: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, WgQuickError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| f(s).ok_or_else(|| err(line, format!("{key}: invalid entry {s:?}"))))
        .collect()
}

fn parse_u32_maybe_hex(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl WgQuickConfig {
    /// Parses the text of a wg-quick file.
    pub fn parse(text: &str) -> Result<WgQuickConfig, WgQuickError> {
        let mut section = Section::None;
        let mut seen_interface = false;
        let mut private_key = None;
        let mut addresses = Vec::new();
        let mut listen_port = None;
        let mut mtu = None;
        let mut fwmark: Option<Option<u32>> = None;
        let mut peers: Vec<PartialPeer> = Vec::new();

        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            if content.starts_with('[') {
                match content.to_ascii_lowercase().as_str() {
                    "[interface]" => {
                        if seen_interface {
                            return Err(err(line, "a second [Interface] section"));
                        }
                        seen_interface = true;
                        section = Section::Interface;
                    }
                    "[peer]" => {
                        section = Section::Peer;
                        peers.push(PartialPeer {
                            line,
                            ..PartialPeer::default()
                        });
                    }
                    _ => return Err(err(line, format!("unknown section {content}"))),
                }
                continue;
            }
            let (key, value) = content
                .split_once('=')
                .ok_or_else(|| err(line, "expected Key = Value"))?;
            let key = key.trim();
            let value = value.trim();
            let lkey = key.to_ascii_lowercase();
            match section {
                Section::None => return Err(err(line, format!("{key} outside of a section"))),
                Section::Interface => match lkey.as_str() {
                    "privatekey" => {
                        let k = Key::from_base64(value)
                            .map_err(|e| err(line, format!("PrivateKey: {e}")))?;
                        set_once(&mut private_key, k, line, "PrivateKey")?;
                    }
                    "address" => addresses.extend(parse_list(value, line, key, |s| {
                        s.parse::<IpNet>().ok().or_else(|| {
                            // A bare address means a host prefix, as in wg-quick.
                            s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
                        })
                    })?),
                    "listenport" => {
                        let p = value
                            .parse::<u16>()
                            .map_err(|_| err(line, "ListenPort: expected 0-65535"))?;
                        set_once(&mut listen_port, p, line, "ListenPort")?;
                    }
                    "mtu" => {
                        let m = value
                            .parse::<u32>()
                            .ok()
                            .filter(|m| (576..=65535).contains(m))
                            .ok_or_else(|| err(line, "MTU: expected 576-65535"))?;
                        set_once(&mut mtu, m, line, "MTU")?;
                    }
                    "fwmark" => {
                        let m = if value.eq_ignore_ascii_case("off") {
                            None
                        } else {
                            Some(
                                parse_u32_maybe_hex(value)
                                    .ok_or_else(|| err(line, "FwMark: expected a number or off"))?,
                            )
                        };
                        set_once(&mut fwmark, m, line, "FwMark")?;
                    }
                    "dns" | "table" | "preup" | "postup" | "predown" | "postdown"
                    | "saveconfig" => {
                        return Err(err(
                            line,
                            format!("{key} is not supported by skymesh-agent up"),
                        ))
                    }
                    _ => return Err(err(line, format!("unknown [Interface] key {key}"))),
                },
                Section::Peer => {
                    // A [Peer] line was seen, so `peers` is not empty.
                    let Some(p) = peers.last_mut() else {
                        return Err(err(line, "internal: peer section without peer"));
                    };
                    match lkey.as_str() {
                        "publickey" => {
                            let k = Key::from_base64(value)
                                .map_err(|e| err(line, format!("PublicKey: {e}")))?;
                            set_once(&mut p.public_key, k, line, "PublicKey")?;
                        }
                        "presharedkey" => {
                            let k = Key::from_base64(value)
                                .map_err(|e| err(line, format!("PresharedKey: {e}")))?;
                            set_once(&mut p.preshared_key, k, line, "PresharedKey")?;
                        }
                        "endpoint" => {
                            let ep = value.parse::<SocketAddr>().map_err(|_| {
                                err(
                                    line,
                                    "Endpoint: expected IP:port or [IPv6]:port (host names are not resolved)",
                                )
                            })?;
                            if ep.port() == 0 || ep.ip().is_unspecified() {
                                return Err(err(line, "Endpoint: needs an address and a port"));
                            }
                            set_once(&mut p.endpoint, ep, line, "Endpoint")?;
                        }
                        "allowedips" => p.allowed_ips.extend(parse_list(value, line, key, |s| {
                            s.parse::<IpNet>().ok().map(|n| n.trunc())
                        })?),
                        "persistentkeepalive" => {
                            let k = if value.eq_ignore_ascii_case("off") {
                                None
                            } else {
                                Some(value.parse::<u16>().map_err(|_| {
                                    err(line, "PersistentKeepalive: expected 0-65535 or off")
                                })?)
                            };
                            set_once(&mut p.persistent_keepalive, k, line, "PersistentKeepalive")?;
                        }
                        _ => return Err(err(line, format!("unknown [Peer] key {key}"))),
                    }
                }
            }
        }

        if !seen_interface {
            return Err(err(0, "no [Interface] section"));
        }
        let private_key = private_key.ok_or_else(|| err(0, "[Interface] has no PrivateKey"))?;
        let mut out_peers = Vec::with_capacity(peers.len());
        for p in peers {
            let public_key = p
                .public_key
                .ok_or_else(|| err(p.line, "[Peer] has no PublicKey"))?;
            if out_peers
                .iter()
                .any(|q: &PeerSection| q.public_key == public_key)
            {
                return Err(err(p.line, "the same PublicKey in two [Peer] sections"));
            }
            out_peers.push(PeerSection {
                public_key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive.flatten().filter(|k| *k != 0),
            });
        }
        Ok(WgQuickConfig {
            interface: InterfaceSection {
                private_key,
                addresses,
                listen_port,
                mtu,
                fwmark: fwmark.flatten().filter(|m| *m != 0),
            },
            peers: out_peers,
        })
    }

    /// The UAPI request that gives a device exactly this configuration (`replace_peers`,
    /// `replace_allowed_ips`), like `wg setconf`.
    pub fn set_request(&self) -> SetRequest {
        SetRequest {
            private_key: Some(Setting::Set(self.interface.private_key)),
            listen_port: Some(self.interface.listen_port.unwrap_or(0)),
            fwmark: Some(match self.interface.fwmark {
                Some(m) => Setting::Set(m),
                None => Setting::Clear,
            }),
            replace_peers: true,
            peers: self
                .peers
                .iter()
                .map(|p| PeerChange {
                    preshared_key: Some(match p.preshared_key {
                        Some(k) => Setting::Set(k),
                        None => Setting::Clear,
                    }),
                    endpoint: p.endpoint,
                    persistent_keepalive: Some(p.persistent_keepalive.unwrap_or(0)),
                    replace_allowed_ips: true,
                    allowed_ips: p.allowed_ips.clone(),
                    ..PeerChange::new(p.public_key)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn sample() -> String {
        format!(
            "# site config\n[Interface]\nPrivateKey = {PRIV}\nAddress = 10.77.0.1/24, fd77::1/64\n\
             ListenPort = 51820\nMTU = 1420\nFwMark = 0x10\n\n[Peer]\nPublicKey = {PUB}\n\
             Endpoint = [fd00::2]:51821\nAllowedIPs = 10.77.0.2/32, 10.99.1.7/24\n\
             AllowedIPs = fd77::2/128\nPersistentKeepalive = 25 # NAT\n"
        )
    }

    #[test]
    fn parses_a_full_file() {
        let c = WgQuickConfig::parse(&sample()).expect("valid file");
        assert_eq!(c.interface.private_key.to_base64(), PRIV);
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.interface.addresses[0].to_string(), "10.77.0.1/24");
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.mtu, Some(1420));
        assert_eq!(c.interface.fwmark, Some(16));
        let p = &c.peers[0];
        assert_eq!(p.public_key.to_base64(), PUB);
        assert_eq!(p.endpoint, Some("[fd00::2]:51821".parse().expect("addr")));
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(ips, ["10.77.0.2/32", "10.99.1.0/24", "fd77::2/128"]);
        assert_eq!(p.persistent_keepalive, Some(25));

        let req = c.set_request();
        assert!(req.replace_peers);
        assert_eq!(req.listen_port, Some(51820));
        assert!(req.peers[0].replace_allowed_ips);
        assert_eq!(req.peers[0].allowed_ips, p.allowed_ips);
    }

    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("[Interface]\nPrivateKey = nope", 2, "PrivateKey"),
            ("[Interface]\nListenPort = 70000", 2, "ListenPort"),
            ("[Interface]\nAddress = 10.0.0.1/40", 2, "Address"),
            ("[Interface]\nPostUp = rm -rf /", 2, "not supported"),
            ("[Interface]\nWhatever = 1", 2, "unknown"),
            ("PrivateKey = x", 1, "outside"),
            ("[Interface]\n[Interface]", 2, "second"),
            ("[Bogus]", 1, "unknown section"),
            ("[Interface]\nnoequals", 2, "Key = Value"),
            ("[Interface]\nMTU = 100", 2, "MTU"),
        ];
        for (text, line, needle) in cases {
            let e = WgQuickConfig::parse(text).expect_err(text);
            assert_eq!(e.line, *line, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
        let peer = |body: &str| format!("[Interface]\nPrivateKey = {PRIV}\n[Peer]\n{body}");
        let e = WgQuickConfig::parse(&peer("AllowedIPs = 10.0.0.0/8")).expect_err("no key");
        assert_eq!((e.line, e.message.contains("PublicKey")), (3, true));
        let e = WgQuickConfig::parse(&peer(&format!(
            "PublicKey = {PUB}\nEndpoint = vpn.example:1"
        )))
        .expect_err("hostname");
        assert_eq!(e.line, 5);
        let e = WgQuickConfig::parse(&peer(&format!("PublicKey = {PUB}\nPublicKey = {PUB}")))
            .expect_err("twice");
        assert_eq!(e.line, 5);
        let e = WgQuickConfig::parse(&format!("[Peer]\nPublicKey = {PUB}")).expect_err("no iface");
        assert_eq!(e.line, 0);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(\\[(Interface|Peer)\\]\n|[A-Za-z]{0,12} ?= ?[ -~]{0,50}\n|#[ -~]{0,20}\n){0,12}") {
            let _ = WgQuickConfig::parse(&text);
        }

        #[test]
        fn any_single_line_deleted_still_parses_or_errors_cleanly(drop in 0usize..16) {
            let text = sample();
            let kept: Vec<&str> = text.lines().enumerate().filter(|(i, _)| *i != drop).map(|(_, l)| l).collect();
            match WgQuickConfig::parse(&kept.join("\n")) {
                Ok(c) => prop_assert_eq!(c.interface.private_key.to_base64(), PRIV),
                Err(e) => prop_assert!(e.line <= kept.len()),
            }
        }
    }
}
