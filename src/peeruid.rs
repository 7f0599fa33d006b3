//! The local user behind a loopback TCP connection, asked of the kernel with one
//! `NETLINK_SOCK_DIAG` request (what `ss` uses): the client's own socket is the TCP socket whose
//! local end is the address we see as the peer and whose remote end is our side. The kernel
//! finds it by its four addresses (no dump, so the cost does not grow with the number of
//! sockets) and reports its owner's uid.
//!
//! Building the request and reading the reply are pure ([`request`], [`parse_reply`],
//! [`trusted_uid`]); [`local_uid`] is the one function that talks to the kernel.
//!
//! The uid found this way is for connection caps and audit rate limits only. It never grants a
//! role: over TCP only the bearer token does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerUidError {
    #[error("sock_diag: {0}")]
    Io(#[from] std::io::Error),
    #[error("sock_diag: malformed reply ({0})")]
    Malformed(&'static str),
    #[error("sock_diag: the kernel refused the request: {0}")]
    Kernel(std::io::Error),
    #[error("sock_diag: the reply is about another socket ({0} -> {1})")]
    OtherSocket(SocketAddr, SocketAddr),
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
/// `struct inet_diag_req_v2`.
const REQ_V2_LEN: usize = 56;
/// `struct inet_diag_msg`.
const DIAG_MSG_LEN: usize = 72;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const TCP_ESTABLISHED: u8 = 1;

/// Whether `ip` is a loopback address (`127.0.0.0/8`, `::1`, or `127.x` mapped into IPv6).
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// What the kernel says about one TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SockInfo {
    /// The socket's own end.
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// TCP state, as in `include/net/tcp_states.h` (1: established).
    pub(crate) state: u8,
    pub(crate) uid: u32,
}

/// The request for the one TCP socket with these ends (`None` when one is IPv4 and the other
/// IPv6 even once mapped addresses are unmapped: no such socket exists).
pub(crate) fn request(local: SocketAddr, remote: SocketAddr, seq: u32) -> Option<Vec<u8>> {
    let (local_ip, remote_ip) = (local.ip().to_canonical(), remote.ip().to_canonical());
    let (family, src, dst) = match (local_ip, remote_ip) {
        (IpAddr::V4(l), IpAddr::V4(r)) => (AF_INET, v4_bytes(l), v4_bytes(r)),
        (IpAddr::V6(l), IpAddr::V6(r)) => (AF_INET6, l.octets(), r.octets()),
        _ => return None,
    };
    let mut b = Vec::with_capacity(NLMSG_HDRLEN + REQ_V2_LEN);
    // struct nlmsghdr
    b.extend_from_slice(&((NLMSG_HDRLEN + REQ_V2_LEN) as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext, pad, states (all)
    b.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order, any interface, no cookie
    b.extend_from_slice(&local.port().to_be_bytes());
    b.extend_from_slice(&remote.port().to_be_bytes());
    b.extend_from_slice(&src);
    b.extend_from_slice(&dst);
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    Some(b)
}

fn v4_bytes(a: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.octets());
    out
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2)?.try_into().ok().map(u16::from_ne_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)?.try_into().ok().map(u32::from_ne_bytes)
}

/// Reads the kernel's answer: the socket, `None` if there is none (`ENOENT`), or an error.
pub(crate) fn parse_reply(mut buf: &[u8]) -> Result<Option<SockInfo>, PeerUidError> {
    while !buf.is_empty() {
        let len = u32_at(buf, 0).ok_or(PeerUidError::Malformed("short header"))? as usize;
        let kind = u16_at(buf, 4).ok_or(PeerUidError::Malformed("short header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(PeerUidError::Malformed("bad message length"));
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_ERROR => {
                let errno =
                    u32_at(payload, 0).ok_or(PeerUidError::Malformed("short error"))? as i32;
                match errno {
                    0 => {}
                    e if e == -libc::ENOENT => return Ok(None),
                    e => {
                        return Err(PeerUidError::Kernel(std::io::Error::from_raw_os_error(
                            e.checked_neg().unwrap_or(e),
                        )));
                    }
                }
            }
            NLMSG_DONE => return Ok(None),
            SOCK_DIAG_BY_FAMILY => return parse_msg(payload).map(Some),
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(None)
}

/// `struct inet_diag_msg`.
fn parse_msg(m: &[u8]) -> Result<SockInfo, PeerUidError> {
    if m.len() < DIAG_MSG_LEN {
        return Err(PeerUidError::Malformed("short inet_diag_msg"));
    }
    let (family, state) = (m[0], m[1]);
    let port = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]);
    let addr = |at: usize| -> Result<IpAddr, PeerUidError> {
        let mut o = [0u8; 16];
        o.copy_from_slice(&m[at..at + 16]);
        match family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))),
            AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(o))),
            _ => Err(PeerUidError::Malformed("unknown address family")),
        }
    };
    Ok(SockInfo {
        local: SocketAddr::new(addr(8)?, port(4)),
        remote: SocketAddr::new(addr(24)?, port(6)),
        state,
        uid: u32_at(m, 64).ok_or(PeerUidError::Malformed("short inet_diag_msg"))?,
    })
}

/// The uid a socket's owner really has. Once its process has closed it, a socket lives on for
/// a while (`FIN_WAIT1`, `FIN_WAIT2`, `TIME_WAIT`, ...) and the kernel may report it as uid 0:
/// a time-wait stub always, an orphaned socket on kernels whose `sock_i_uid` reads the (gone)
/// file's owner. So 0 means root only for an established socket, and unknown otherwise; any
/// other uid is the socket's creator.
pub(crate) fn trusted_uid(s: &SockInfo) -> Option<u32> {
    match (s.state, s.uid) {
        (TCP_ESTABLISHED, uid) => Some(uid),
        (_, 0) => None,
        (_, uid) => Some(uid),
    }
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// The uid owning the client socket of a TCP connection we accepted from `peer` on our
/// address `ours` (`None`: no such socket any more, or one whose owner is unknown). Only
/// meaningful for a loopback peer, whose socket is in this network namespace.
pub(crate) fn local_uid(peer: SocketAddr, ours: SocketAddr) -> Result<Option<u32>, PeerUidError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let Some(req) = request(peer, ours, 1) else {
        return Ok(None);
    };
    // SAFETY: plain system calls on a descriptor we own; buffers outlive the calls and their
    // lengths are passed with them.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The kernel answers while handling the request; the timeout only bounds the impossible.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: see above.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: an all-zero sockaddr_nl is valid; the kernel is pid 0.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: see above.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut buf = [0u8; 4096];
    let n = loop {
        // SAFETY: see above.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let Some(sock) = parse_reply(&buf[..n])? else {
        return Ok(None);
    };
    if !same(sock.local, peer) || !same(sock.remote, ours) {
        return Err(PeerUidError::OtherSocket(sock.local, sock.remote));
    }
    Ok(trusted_uid(&sock))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply laid out as the kernel sends it (`struct nlmsghdr` + `struct inet_diag_msg`),
    /// built field by field so each test states its socket; the real kernel's replies are read
    /// in `finds_the_owner_of_a_real_loopback_connection`.
    fn reply(family: u8, state: u8, local: SocketAddr, remote: SocketAddr, uid: u32) -> Vec<u8> {
        let bytes = |ip: IpAddr| match ip {
            IpAddr::V4(a) => v4_bytes(a),
            IpAddr::V6(a) => a.octets(),
        };
        let mut m = vec![family, state, 0, 0];
        m.extend_from_slice(&local.port().to_be_bytes());
        m.extend_from_slice(&remote.port().to_be_bytes());
        m.extend_from_slice(&bytes(local.ip()));
        m.extend_from_slice(&bytes(remote.ip()));
        m.extend_from_slice(&[0u8; 12]); // interface, cookie
        m.extend_from_slice(&[0u8; 12]); // expires, rqueue, wqueue
        m.extend_from_slice(&uid.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes()); // inode
        let mut b = ((NLMSG_HDRLEN + m.len()) as u32).to_ne_bytes().to_vec();
        b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&m);
        b
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_addresses_include_mapped_ones() {
        for a in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(a.parse().unwrap()), "{a}");
        }
        for a in [
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "::",
            "0.0.0.0",
            "::127.0.0.1",
        ] {
            assert!(!is_loopback(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn request_ipv4_is_the_kernel_layout() {
        let r = request(sa("127.0.0.1:40000"), sa("127.0.0.1:8000"), 7).unwrap();
        assert_eq!(r.len(), 72);
        assert_eq!(u32_at(&r, 0), Some(72));
        assert_eq!(u16_at(&r, 4), Some(20));
        assert_eq!(u16_at(&r, 6), Some(NLM_F_REQUEST));
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(&r[16..20], &[AF_INET, IPPROTO_TCP, 0, 0]);
        assert_eq!(u32_at(&r, 20), Some(u32::MAX), "every state");
        assert_eq!(
            &r[24..28],
            &[0x9c, 0x40, 0x1f, 0x40],
            "ports in network order"
        );
        assert_eq!(
            &r[28..44],
            &[127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&r[44..48], &[127, 0, 0, 1]);
        assert_eq!(&r[64..72], &[0xff; 8], "no cookie");
    }

    #[test]
    fn request_unmaps_v4_mapped_peers_and_keeps_ipv6() {
        // A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1; its socket is IPv4.
        let mapped = request(
            sa("[::ffff:127.0.0.1]:40000"),
            sa("[::ffff:127.0.0.1]:8000"),
            1,
        );
        let plain = request(sa("127.0.0.1:40000"), sa("127.0.0.1:8000"), 1);
        assert_eq!(mapped, plain);
        let r = request(sa("[::1]:40000"), sa("[::1]:8000"), 1).unwrap();
        assert_eq!(r[16], AF_INET6);
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(&r[28..44], &one);
        assert_eq!(&r[44..60], &one);
        assert_eq!(request(sa("[::1]:1"), sa("127.0.0.1:2"), 1), None);
    }

    #[test]
    fn reply_ipv4_gives_the_socket_and_its_uid() {
        let b = reply(
            AF_INET,
            1,
            sa("127.0.0.1:40000"),
            sa("127.0.0.1:8000"),
            65534,
        );
        let s = parse_reply(&b).unwrap().unwrap();
        assert_eq!(s.local, sa("127.0.0.1:40000"));
        assert_eq!(s.remote, sa("127.0.0.1:8000"));
        assert_eq!((s.state, s.uid), (1, 65534));
        assert_eq!(trusted_uid(&s), Some(65534));
    }

    #[test]
    fn reply_ipv6_gives_the_socket_and_its_uid() {
        let b = reply(AF_INET6, 1, sa("[::1]:51234"), sa("[::1]:8000"), 1000);
        let s = parse_reply(&b).unwrap().unwrap();
        assert_eq!(s.local, sa("[::1]:51234"));
        assert_eq!(s.remote, sa("[::1]:8000"));
        assert_eq!(s.uid, 1000);
        // An IPv6 client socket talking to a mapped address is reported as such.
        let b = reply(
            AF_INET6,
            1,
            sa("[::ffff:127.0.0.1]:51234"),
            sa("[::ffff:127.0.0.1]:8000"),
            0,
        );
        let s = parse_reply(&b).unwrap().unwrap();
        assert!(same(s.local, sa("127.0.0.1:51234")));
        assert_eq!(trusted_uid(&s), Some(0), "an established root socket");
    }

    #[test]
    fn closed_sockets_are_not_root() {
        // FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
        for state in [4, 5, 6, 8, 9, 11] {
            let b = reply(AF_INET, state, sa("127.0.0.1:1"), sa("127.0.0.1:2"), 0);
            assert_eq!(
                trusted_uid(&parse_reply(&b).unwrap().unwrap()),
                None,
                "{state}"
            );
            let b = reply(AF_INET, state, sa("127.0.0.1:1"), sa("127.0.0.1:2"), 1000);
            assert_eq!(
                trusted_uid(&parse_reply(&b).unwrap().unwrap()),
                Some(1000),
                "{state}"
            );
        }
        let b = reply(AF_INET, 1, sa("127.0.0.1:1"), sa("127.0.0.1:2"), 0);
        assert_eq!(trusted_uid(&parse_reply(&b).unwrap().unwrap()), Some(0));
    }

    #[test]
    fn errors_and_malformed_replies() {
        let err = |errno: i32| {
            let mut b = 36u32.to_ne_bytes().to_vec();
            b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b.extend_from_slice(&[0u8; 10]);
            b.extend_from_slice(&(-errno).to_ne_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b
        };
        assert!(matches!(parse_reply(&err(libc::ENOENT)), Ok(None)));
        assert!(matches!(
            parse_reply(&err(libc::EPERM)),
            Err(PeerUidError::Kernel(e)) if e.raw_os_error() == Some(libc::EPERM)
        ));
        let full = reply(AF_INET, 1, sa("127.0.0.1:1"), sa("127.0.0.1:2"), 5);
        for cut in [3, 15, 40, full.len() - 1] {
            assert!(
                matches!(parse_reply(&full[..cut]), Err(PeerUidError::Malformed(_))),
                "cut at {cut}"
            );
        }
        let mut bad = full.clone();
        bad[16] = 99;
        assert!(matches!(parse_reply(&bad), Err(PeerUidError::Malformed(_))));
        assert!(matches!(parse_reply(&[]), Ok(None)));
    }

    /// Against the real kernel: our own loopback connections, IPv4, IPv6, and IPv4 seen by a
    /// dual-stack listener as a mapped address (from an IPv4 or an IPv6 client socket).
    #[test]
    fn finds_the_owner_of_a_real_loopback_connection() {
        let me = nix::unistd::geteuid().as_raw();
        for (bind, to) in [
            ("127.0.0.1:0", "127.0.0.1"),
            ("[::1]:0", "::1"),
            ("[::]:0", "127.0.0.1"),
            // An IPv6 client socket talking to a mapped address.
            ("[::]:0", "::ffff:127.0.0.1"),
        ] {
            let l = match std::net::TcpListener::bind(bind) {
                Ok(l) => l,
                Err(_) if bind.starts_with('[') => continue, // no IPv6 here
                Err(e) => panic!("{bind}: {e}"),
            };
            let port = l.local_addr().unwrap().port();
            let to: IpAddr = to.parse().unwrap();
            let client = std::net::TcpStream::connect((to, port)).unwrap();
            let (server, peer) = l.accept().unwrap();
            assert!(same(peer, client.local_addr().unwrap()), "{bind}");
            let ours = server.local_addr().unwrap();
            assert_eq!(local_uid(peer, ours).unwrap(), Some(me), "{bind} {peer}");
            // A port no socket has: none.
            let gone = SocketAddr::new(peer.ip(), 1);
            assert_eq!(local_uid(gone, ours).unwrap(), None, "{bind}");
            // Once the client closed its socket, a 0 the kernel reports is not root.
            drop(client);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let after = local_uid(peer, ours).unwrap();
            assert!(
                after.is_none() || (me != 0 && after == Some(me)),
                "{bind}: {after:?}"
            );
        }
    }
}
