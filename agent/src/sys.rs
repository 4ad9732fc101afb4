//! Every `unsafe` syscall of the agent lives here: the TUN device (`/dev/net/tun` ioctls),
//! epoll, eventfd, signalfd, and UDP sockets with options that must be set before `bind`
//! (`IPV6_V6ONLY`) or that std does not expose (`SO_MARK`, `UDP_SEGMENT`, `UDP_GRO`). Raw
//! ioctls rather than the `tun` crate: it does not expose `IFF_VNET_HDR`, `TUNSETVNETHDRSZ` or
//! `TUNSETOFFLOAD`, which the offloaded fast path needs.

use std::ffi::CString;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ifreq_with_name(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be 1-15 bytes without NUL",
        ));
    }
    // SAFETY: ifreq is a plain C struct (names and a union of integers); all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(ifr)
}

/// A TUN device (`IFF_TUN | IFF_NO_PI`), non-blocking. The interface disappears when this is
/// dropped (it is not made persistent).
#[derive(Debug)]
pub(crate) struct Tun {
    fd: OwnedFd,
}

/// What a TUN accepted: with `vnet_hdr` every read and write carries a 10-byte virtio-net
/// header; `tso` = `TUN_F_CSUM|TSO4|TSO6` (reads may be TCP super-packets, writes may be
/// coalesced); `uso` = `TUN_F_USO4|USO6` as well (UDP super-datagrams both ways).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TunOffload {
    pub(crate) vnet_hdr: bool,
    pub(crate) tso: bool,
    pub(crate) uso: bool,
}

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
const VNET_HDR_SZ: libc::c_int = 10;

impl Tun {
    /// Creates (or attaches to) TUN interface `name`; with `offload`, tries `IFF_VNET_HDR` and
    /// TSO/USO and falls back to a plain TUN when the kernel refuses (reported as warnings).
    pub(crate) fn create(name: &str, offload: bool) -> io::Result<(Tun, TunOffload)> {
        if offload {
            match Tun::open(name, true).and_then(|t| t.enable_offload().map(|o| (t, o))) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(error = %e, "TUN offloads unavailable; plain TUN");
                }
            }
        }
        Ok((Tun::open(name, false)?, TunOffload::default()))
    }

    fn open(name: &str, vnet_hdr: bool) -> io::Result<Tun> {
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: path is a valid NUL-terminated string; the flags are plain integers.
        let raw = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `raw` was just returned by open() and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ifr = ifreq_with_name(name)?;
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is, and lives across the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
        Ok(Tun { fd })
    }

    fn enable_offload(&self) -> io::Result<TunOffload> {
        let fd = self.fd.as_raw_fd();
        let sz: libc::c_int = VNET_HDR_SZ;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which lives across the call.
        cvt(unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &sz) })?;
        let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        // TUNSETOFFLOAD takes the flags as the argument itself, not a pointer.
        // SAFETY: plain integer arguments.
        if cvt(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(tso | uso)) })
            .is_ok()
        {
            return Ok(TunOffload {
                vnet_hdr: true,
                tso: true,
                uso: true,
            });
        }
        // Kernels before 6.2 have no USO on TUN.
        // SAFETY: plain integer arguments.
        cvt(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(tso)) })?;
        Ok(TunOffload {
            vnet_hdr: true,
            tso: true,
            uso: false,
        })
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    #[inline]
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet.
    #[inline]
    pub(crate) fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        // SAFETY: pkt is valid for reads of pkt.len() bytes for the duration of the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Sets the MTU of interface `name` (SIOCSIFMTU).
pub(crate) fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0"))?;
    let mut ifr = ifreq_with_name(name)?;
    ifr.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu).map_err(io::Error::other)?;
    // SAFETY: SIOCSIFMTU reads an ifreq, which `ifr` is, valid across the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &ifr) })?;
    Ok(())
}

/// Level-triggered epoll over file descriptors identified by a `u64` token.
#[derive(Debug)]
pub(crate) struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall with a flag argument.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: raw is a fresh fd owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev is a valid epoll_event that outlives the call.
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: ev is valid (ignored by the kernel for DEL, required non-null by old kernels).
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) })?;
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1 = forever); returns how many entries of `events` are filled.
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ms: i32,
    ) -> io::Result<usize> {
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: events is valid for `max` entries for the duration of the call.
        let n =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }
}

/// An eventfd used to wake the data-plane thread from the control thread.
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall with integer arguments.
        let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: raw is a fresh fd owned by nobody else.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    pub(crate) fn notify(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which lives across the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`, which lives across the call. A failed read
        // (EAGAIN: nothing pending) is fine.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// SIGTERM/SIGINT delivered as a readable fd. [`SignalFd::block_signals`] must run in the main
/// thread before any other thread is spawned, so that every thread inherits the mask.
#[derive(Debug)]
pub(crate) struct SignalFd {
    fd: OwnedFd,
}

fn shutdown_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it as documented.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

impl SignalFd {
    pub(crate) fn block_signals() -> io::Result<()> {
        let set = shutdown_sigset();
        // SAFETY: set is initialised; the old mask is not needed (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    pub(crate) fn new() -> io::Result<SignalFd> {
        let set = shutdown_sigset();
        // SAFETY: set is initialised; -1 asks for a new fd.
        let raw = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) })?;
        // SAFETY: raw is a fresh fd owned by nobody else.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// The pending signal number, if any.
    pub(crate) fn read(&self) -> Option<u32> {
        // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which lives across the call.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n as usize == size).then_some(info.ssi_signo)
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a c_int that lives across the call, with its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Sets `SO_MARK` (0 clears it).
pub(crate) fn set_mark(sock: &UdpSocket, mark: u32) -> io::Result<()> {
    setsockopt_int(
        sock.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        mark as libc::c_int,
    )
}

/// Socket buffer size: a 64 KiB GSO send is 45 datagrams; 8 MiB holds a few milliseconds of
/// a multi-Gbit/s link, enough to absorb a burst while the data-plane thread encrypts.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// A non-blocking UDP socket bound to `addr`; IPv6 sockets are `IPV6_V6ONLY` so that an IPv4
/// socket can share the port. Socket buffers are enlarged (best effort) for bursts. Optionally bound to network interface `device` (`SO_BINDTODEVICE`,
/// set before `bind` so that one port can be bound once per device) and with `SO_REUSEADDR`
/// (lets the wildcard socket and the per-uplink sockets share the listen port; the kernel
/// delivers to the device-bound socket first).
pub(crate) fn udp_socket_on(
    addr: SocketAddr,
    mark: u32,
    device: Option<&str>,
    reuse: bool,
) -> io::Result<UdpSocket> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain syscall with integer arguments.
    let raw = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: raw is a fresh socket owned by nobody else; UdpSocket takes ownership.
    let sock = unsafe { UdpSocket::from_raw_fd(raw) };
    let fd = sock.as_raw_fd();
    if addr.is_ipv6() {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    if mark != 0 {
        set_mark(&sock, mark)?;
    }
    if reuse {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    if let Some(dev) = device {
        let name = CString::new(dev).map_err(io::Error::other)?;
        let bytes = name.as_bytes_with_nul();
        // SAFETY: passes a pointer to a NUL-terminated name that lives across the call, with
        // its exact length.
        cvt(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                bytes.as_ptr().cast(),
                bytes.len() as libc::socklen_t,
            )
        })?;
    }
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // The *FORCE variants (CAP_NET_ADMIN) ignore rmem_max/wmem_max; the plain ones are
        // capped there. Best effort either way.
        if setsockopt_int(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
    let (storage, len) = sockaddr_of(addr);
    // SAFETY: storage holds a sockaddr_in/sockaddr_in6 of `len` bytes, valid across the call.
    cvt(unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    Ok(sock)
}

fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin);
            }
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6);
            }
            (
                storage,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// The index of interface `name` (`if_nametoindex`).
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

/// Sends SIGTERM to `pid`.
pub(crate) fn terminate(pid: i32) -> io::Result<()> {
    // SAFETY: kill() has no memory-safety preconditions.
    cvt(unsafe { libc::kill(pid, libc::SIGTERM) })?;
    Ok(())
}

/// `UDP_SEGMENT` (linux/udp.h): send one buffer as equal-sized datagrams.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): receive coalesced datagrams with their size in a cmsg.
const UDP_GRO: libc::c_int = 104;
/// Most datagrams one `sendmmsg` call takes in the fallback path.
pub(crate) const MMSG_MAX: usize = 64;

/// Turns on `UDP_GRO`: a receive may then return several datagrams of one sender back to back,
/// all of the size reported by [`recv_gro`] except a shorter last one.
pub(crate) fn enable_udp_gro(sock: &UdpSocket) -> io::Result<()> {
    setsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1)
}

/// Control-message space for one `u16`/`c_int` value, 8-byte aligned.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends `buf` to `to` as datagrams of `seg` bytes each (the last may be shorter) with one
/// `sendmsg` and a `UDP_SEGMENT` control message. At most 64 datagrams and 64 KiB per call.
pub(crate) fn send_gso(
    sock: &UdpSocket,
    to: SocketAddr,
    buf: &[u8],
    seg: u16,
) -> io::Result<usize> {
    let (mut storage, len) = sockaddr_of(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; all-zero is valid before the fields are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: msg_control points to 64 aligned bytes, more than CMSG_SPACE(2); CMSG_FIRSTHDR
    // and CMSG_DATA stay inside it. The kernel only reads `buf`, `storage` and `cmsg`, which
    // all outlive the call.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
        libc::sendmsg(sock.as_raw_fd(), &msg, 0)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The fallback of [`send_gso`]: the same datagrams with `sendmmsg` (up to [`MMSG_MAX`] per
/// call). Returns the bytes sent; stops at the first error after some were sent.
pub(crate) fn send_mmsg(
    sock: &UdpSocket,
    to: SocketAddr,
    buf: &[u8],
    seg: usize,
) -> io::Result<usize> {
    let (mut storage, len) = sockaddr_of(to);
    // SAFETY: iovec and mmsghdr are plain data; all-zero is valid.
    let mut iovs: [libc::iovec; MMSG_MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MMSG_MAX] = unsafe { std::mem::zeroed() };
    let mut sent = 0;
    let mut chunks = buf.chunks(seg.max(1)).peekable();
    while chunks.peek().is_some() {
        let mut count = 0;
        let mut bytes = 0;
        for (iov, msg) in iovs.iter_mut().zip(msgs.iter_mut()) {
            let Some(d) = chunks.next() else { break };
            iov.iov_base = d.as_ptr() as *mut libc::c_void;
            iov.iov_len = d.len();
            msg.msg_hdr.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
            msg.msg_hdr.msg_namelen = len;
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            count += 1;
            bytes += d.len();
        }
        let mut done = 0;
        while done < count {
            // SAFETY: msgs[done..count] point to iovecs over `buf` and to `storage`, all alive
            // across the call; the kernel only reads them (and writes msg_len).
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (count - done) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                let e = io::Error::last_os_error();
                if sent > 0 {
                    return Ok(sent);
                }
                return Err(e);
            }
            for m in &msgs[done..done + n as usize] {
                sent += m.msg_len as usize;
            }
            done += n as usize;
        }
        debug_assert!(bytes > 0);
    }
    Ok(sent)
}

/// Receives into `buf`; returns `(bytes, source, segment size)`. With `UDP_GRO` the buffer
/// may hold several datagrams of `segment size` bytes (the last may be shorter); 0 means one
/// datagram.
pub(crate) fn recv_gro(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; all-zero is valid before the fields are set.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    // SAFETY: every pointer in msg refers to memory that lives across the call, with its
    // length; the kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut seg = 0;
    // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only
    // inside it and the data read is the int the kernel put there.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                seg = usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = sockaddr_to(&storage).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    Ok((n as usize, from, seg))
}

fn sockaddr_to(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // enough and aligned for.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

std::thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The global allocator of the agent binary: the system allocator plus a per-thread count of
/// allocations (`alloc`, `alloc_zeroed`, `realloc`), so the data-plane thread can prove it
/// does not allocate per packet. A const-initialised thread-local `Cell` without destructor:
/// no lock, no allocation, one add per call.
pub(crate) struct CountingAlloc;

#[inline]
fn count_allocation() {
    // try_with: fails only while the thread is being torn down; that allocation is not counted.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

/// Binds a UNIX socket at `path` that only root can ever connect to: bound inside a fresh
/// 0700 directory next to it, made 0600, then renamed into place. Binding at `path` directly
/// and `chmod`ing after leaves a moment in which any local user could connect (the socket is
/// created with the umask's mode), and changing the umask is process-wide (threads race).
pub(crate) fn bind_private_unix(
    path: &std::path::Path,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "socket path has no file name")
    })?;
    let private = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private); // left by a crash of this very pid: ours
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("sock");
    let result = std::os::unix::net::UnixListener::bind(&staged).and_then(|l| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Allocations made so far by the calling thread.
pub(crate) fn thread_allocations() -> u64 {
    ALLOCATIONS.try_with(std::cell::Cell::get).unwrap_or(0)
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// GlobalAlloc contract holds exactly as for `System`; the counter does not allocate.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: as for `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_private_unix_socket_is_0600_from_the_start_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wg9.sock");
        let listener = super::bind_private_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        // Only the socket is left in the directory; it answers at its final path.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("wg9.sock")]);
        std::os::unix::net::UnixStream::connect(&path).expect("connect");
        listener.accept().expect("accepted");
    }
}
