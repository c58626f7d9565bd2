//! Just enough rtnetlink for pool addresses: add/refresh (`RTM_NEWADDR` with
//! create+replace, as `ip addr replace` does) and remove (`RTM_DELADDR`) many host
//! addresses in one `sendmsg`, and dump an interface's addresses with their `IFA_PROTO`.
//! Blocking calls on a socket opened per exchange; run them off the async workers.
//!
//! Written against the stable kernel ABI (`linux/netlink.h`, `linux/if_addr.h`) rather
//! than a netlink crate: the few messages needed are fixed-layout, and the marking
//! attribute (`IFA_PROTO`, Linux 6.1) is missing from some crates' address types.

use std::net::IpAddr;

use crate::error::Error;

/// `IFA_PROTO` stamped on every address berth adds (any value above the kernel's own,
/// 0-3, is free for user space; 0x62 is `b`). Kernels before 6.1 ignore the attribute:
/// there berth never removes a leftover itself, and its finite lifetime removes it.
pub const BERTH_PROTO: u8 = 0x62;

const NLMSG_HDR: usize = 16;
const IFADDRMSG: usize = 8;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
const IFA_PROTO: u16 = 11;
const IFA_F_NODAD: u32 = 0x02;
const RT_SCOPE_UNIVERSE: u8 = 0;
/// Requests per `sendmsg`: their acks must fit the receive buffer at once.
const BATCH: usize = 256;
const RCVBUF: libc::c_int = 4 << 20;

/// One change of an address on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add or refresh, valid and preferred for this many seconds.
    Hold(IpAddr, u32),
    Remove(IpAddr),
}

impl Op {
    pub fn addr(&self) -> IpAddr {
        match self {
            Op::Hold(a, _) | Op::Remove(a) => *a,
        }
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align(buf.len()), 0);
}

fn octets(a: &IpAddr) -> (u8, u8, Vec<u8>) {
    match a {
        IpAddr::V4(v4) => (libc::AF_INET as u8, 32, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, 128, v6.octets().to_vec()),
    }
}

/// Appends one netlink message (`seq` identifies its ack) to `buf`. Pure.
pub fn encode(buf: &mut Vec<u8>, op: &Op, index: u32, seq: u32) {
    let start = buf.len();
    let (kind, flags) = match op {
        Op::Hold(..) => (RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE),
        Op::Remove(_) => (RTM_DELADDR, 0),
    };
    buf.extend_from_slice(&[0; 4]); // length, set below
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    let addr = op.addr();
    let (family, prefix, bytes) = octets(&addr);
    buf.extend_from_slice(&[family, prefix, 0, RT_SCOPE_UNIVERSE]);
    buf.extend_from_slice(&index.to_ne_bytes());
    push_attr(buf, IFA_LOCAL, &bytes);
    push_attr(buf, IFA_ADDRESS, &bytes);
    if let Op::Hold(_, secs) = op {
        let mut cache = Vec::with_capacity(16);
        cache.extend_from_slice(&secs.to_ne_bytes()); // preferred
        cache.extend_from_slice(&secs.to_ne_bytes()); // valid
        cache.extend_from_slice(&[0; 8]);
        push_attr(buf, IFA_CACHEINFO, &cache);
        // Duplicate address detection would hold a moving IPv6 address back.
        let flags = if addr.is_ipv6() { IFA_F_NODAD } else { 0 };
        push_attr(buf, IFA_FLAGS, &flags.to_ne_bytes());
        push_attr(buf, IFA_PROTO, &[BERTH_PROTO]);
    }
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A netlink route socket, closed on drop.
struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor was opened by `Socket::open` and is closed once.
        unsafe { libc::close(self.0) };
    }
}

fn os_err(what: &str) -> Error {
    Error::Io {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

impl Socket {
    fn open() -> Result<Self, Error> {
        // SAFETY: plain socket(2); ownership passes to `Socket`.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(os_err("open netlink socket"));
        }
        let s = Self(fd);
        s.set(libc::SO_RCVBUF, &RCVBUF)?;
        // A kernel that never answers must not hang the announcer.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        s.set(libc::SO_RCVTIMEO, &timeout)?;
        Ok(s)
    }

    fn set<T>(&self, opt: libc::c_int, value: &T) -> Result<(), Error> {
        // SAFETY: `value` is a live T and the length given is its size.
        let r = unsafe {
            libc::setsockopt(
                self.0,
                libc::SOL_SOCKET,
                opt,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os_err("set netlink socket option"));
        }
        Ok(())
    }

    fn send(&self, buf: &[u8]) -> Result<(), Error> {
        // SAFETY: an all-zero sockaddr_nl with the family set addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buf and `to` outlive the call; the lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.0,
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(os_err("send to netlink"));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| os_err("receive from netlink"))
    }
}

/// The messages of one datagram: (type, seq, payload).
fn messages(data: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR <= data.len() {
        let field = |o: usize| {
            [
                data[at + o],
                data[at + o + 1],
                data[at + o + 2],
                data[at + o + 3],
            ]
        };
        let len = u32::from_ne_bytes(field(0)) as usize;
        if len < NLMSG_HDR || at + len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
        let seq = u32::from_ne_bytes(field(8));
        out.push((kind, seq, &data[at + NLMSG_HDR..at + len]));
        at += align(len);
    }
    out
}

/// The errno of an `NLMSG_ERROR` payload (0 for an ack).
fn errno(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Carries out `ops` on interface `index`; the operations that failed, with why. Removing
/// an address that is gone already is success.
pub fn apply(index: i32, ops: &[Op]) -> Result<Vec<(IpAddr, Error)>, Error> {
    let index = u32::try_from(index).map_err(|_| Error::InvalidInput("interface index".into()))?;
    let sock = Socket::open()?;
    let mut failed = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    for (n, chunk) in ops.chunks(BATCH).enumerate() {
        let base = u32::try_from(n * BATCH).unwrap_or(0) + 1;
        let mut out = Vec::with_capacity(chunk.len() * 80);
        for (i, op) in chunk.iter().enumerate() {
            encode(&mut out, op, index, base + i as u32);
        }
        sock.send(&out)?;
        let mut acked = 0;
        while acked < chunk.len() {
            let got = sock.recv(&mut buf)?;
            for (kind, seq, payload) in messages(&buf[..got]) {
                if kind != NLMSG_ERROR {
                    continue;
                }
                acked += 1;
                let Some(op) = seq.checked_sub(base).and_then(|i| chunk.get(i as usize)) else {
                    continue;
                };
                let e = errno(payload);
                let gone = matches!(op, Op::Remove(_)) && e == libc::EADDRNOTAVAIL;
                if e != 0 && !gone {
                    let what = match op {
                        Op::Hold(..) => "add address",
                        Op::Remove(_) => "remove address",
                    };
                    let source = std::io::Error::from_raw_os_error(e);
                    failed.push((
                        op.addr(),
                        Error::Io {
                            what: what.into(),
                            source,
                        },
                    ));
                }
            }
        }
    }
    Ok(failed)
}

/// The attributes of an address message: (type, data).
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[align(len).min(data.len())..];
    }
    out
}

/// One `RTM_NEWADDR` of a dump, when it is on interface `index`. Pure.
pub fn parse_address(payload: &[u8], index: u32) -> Option<super::LinkAddr> {
    let head = payload.get(..IFADDRMSG)?;
    let (family, prefix) = (head[0], head[1]);
    if u32::from_ne_bytes([head[4], head[5], head[6], head[7]]) != index {
        return None;
    }
    let mut local = None;
    let mut address = None;
    let mut proto = None;
    for (kind, data) in attrs(&payload[IFADDRMSG..]) {
        match kind {
            IFA_LOCAL => local = Some(data),
            IFA_ADDRESS => address = Some(data),
            IFA_PROTO => proto = data.first().copied(),
            _ => {}
        }
    }
    // IPv4 names the local address IFA_LOCAL (IFA_ADDRESS is the peer on point-to-point
    // links); IPv6 gives IFA_ADDRESS only.
    let raw = local.or(address)?;
    let addr = match i32::from(family) {
        libc::AF_INET => IpAddr::from(<[u8; 4]>::try_from(raw).ok()?),
        libc::AF_INET6 => IpAddr::from(<[u8; 16]>::try_from(raw).ok()?),
        _ => return None,
    };
    Some(super::LinkAddr {
        addr,
        prefix,
        proto,
    })
}

/// Every address on interface `index`.
pub fn dump_addresses(index: i32) -> Result<Vec<super::LinkAddr>, Error> {
    let index = u32::try_from(index).map_err(|_| Error::InvalidInput("interface index".into()))?;
    let sock = Socket::open()?;
    let mut req = Vec::with_capacity(NLMSG_HDR + IFADDRMSG);
    let len = u32::try_from(NLMSG_HDR + IFADDRMSG).unwrap_or(0);
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(&RTM_GETADDR.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    req.extend_from_slice(&index.to_ne_bytes());
    sock.send(&req)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let got = sock.recv(&mut buf)?;
        for (kind, _, payload) in messages(&buf[..got]) {
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR if errno(payload) != 0 => {
                    return Err(Error::Io {
                        what: "dump addresses".into(),
                        source: std::io::Error::from_raw_os_error(errno(payload)),
                    });
                }
                RTM_NEWADDR => out.extend(parse_address(payload, index)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request `ip addr replace 198.19.8.5/32 dev <7> valid_lft 5 preferred_lft 5
    /// proto 0x62` sends, byte for byte, and its reading back as a dump entry.
    #[test]
    fn a_held_address_encodes_as_ip_addr_replace_with_berths_proto() {
        let mut buf = Vec::new();
        let a: IpAddr = "198.19.8.5".parse().expect("ip");
        encode(&mut buf, &Op::Hold(a, 5), 7, 42);
        assert_eq!(buf.len(), 16 + 8 + 8 + 8 + 20 + 8 + 8);
        let msgs = messages(&buf);
        assert_eq!(msgs.len(), 1);
        let (kind, seq, payload) = msgs[0];
        assert_eq!((kind, seq), (RTM_NEWADDR, 42));
        let flags = u16::from_ne_bytes([buf[6], buf[7]]);
        assert_eq!(
            flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(&payload[..4], &[libc::AF_INET as u8, 32, 0, 0]);
        let kinds: Vec<u16> = attrs(&payload[IFADDRMSG..]).iter().map(|a| a.0).collect();
        assert_eq!(
            kinds,
            [IFA_LOCAL, IFA_ADDRESS, IFA_CACHEINFO, IFA_FLAGS, IFA_PROTO]
        );
        let cache = attrs(&payload[IFADDRMSG..])[2].1.to_vec();
        assert_eq!(&cache[..8], &[5, 0, 0, 0, 5, 0, 0, 0][..]);
        let back = parse_address(payload, 7).expect("parsed");
        assert_eq!(
            (back.addr, back.prefix, back.proto),
            (a, 32, Some(BERTH_PROTO))
        );
        assert_eq!(parse_address(payload, 8), None, "another interface");
    }

    #[test]
    fn removals_and_ipv6_addresses_encode_and_acks_decode() {
        let mut buf = Vec::new();
        let v6: IpAddr = "fd00::5".parse().expect("ip");
        encode(&mut buf, &Op::Remove(v6), 3, 1);
        encode(&mut buf, &Op::Hold(v6, 9), 3, 2);
        let msgs = messages(&buf);
        assert_eq!(
            msgs.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(),
            [(RTM_DELADDR, 1), (RTM_NEWADDR, 2)]
        );
        assert_eq!(
            attrs(&msgs[0].2[IFADDRMSG..]).len(),
            2,
            "a removal names the address only"
        );
        let flags = attrs(&msgs[1].2[IFADDRMSG..])[3].1.to_vec();
        assert_eq!(flags, IFA_F_NODAD.to_ne_bytes());
        assert_eq!(
            parse_address(msgs[1].2, 3).map(|a| (a.addr, a.prefix)),
            Some((v6, 128))
        );
        assert_eq!(errno(&(-libc::EEXIST).to_ne_bytes()), libc::EEXIST);
        assert_eq!(errno(&0i32.to_ne_bytes()), 0);
    }
}
