//! Stale UDP conntrack entries deleted over a conntrack netlink socket kept open, instead
//! of a `conntrack -D` process per flow: one dump of the family's entries per sync that
//! removed UDP endpoints, filtered here, then one `IPCTNL_MSG_CT_DELETE` per matching
//! entry (by its exact original tuple), all sent in one datagram.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::proxy::model::{Family, Protocol};
use crate::proxy::netlink::{attr, check};
use crate::proxy::nlnft::{error_code, messages, open_netfilter, send_all, wait_acks};
use crate::proxy::ruleset::Frontend;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

/// The attributes in `data` (kind without flags, payload).
fn nested(data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > data.len() {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[at], data[at + 1]]));
        let kind = u16::from_ne_bytes([data[at + 2], data[at + 3]]) & 0x3fff;
        if len < 4 || at + len > data.len() {
            return None;
        }
        let value = &data[at + 4..at + len];
        at += len.next_multiple_of(4);
        Some((kind, value))
    })
}

fn find(data: &[u8], kind: u16) -> Option<&[u8]> {
    nested(data).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

fn ip(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?))),
        _ => None,
    }
}

/// (protocol, source, destination, destination port) of a tuple attribute.
fn tuple(t: &[u8]) -> Option<(u8, IpAddr, IpAddr, u16)> {
    let ips = find(t, CTA_TUPLE_IP)?;
    let (src, dst) = match (find(ips, CTA_IP_V4_SRC), find(ips, CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (find(ips, CTA_IP_V6_SRC)?, find(ips, CTA_IP_V6_DST)?),
    };
    let proto = find(t, CTA_TUPLE_PROTO)?;
    let num = *find(proto, CTA_PROTO_NUM)?.first()?;
    let port = u16::from_be_bytes(find(proto, CTA_PROTO_DST_PORT)?.try_into().ok()?);
    Some((num, ip(src)?, ip(dst)?, port))
}

/// The body of a delete for the entry whose dumped attributes are `entry` (after the
/// nfgenmsg), when it is a UDP flow to one of `stale`'s frontends answered by its
/// endpoint.
fn delete_body(entry: &[u8], stale: &[(Frontend, IpAddr)]) -> Option<Vec<u8>> {
    let orig = find(entry, CTA_TUPLE_ORIG)?;
    let (proto, _, dst, dport) = tuple(orig)?;
    let (_, reply_src, _, _) = tuple(find(entry, CTA_TUPLE_REPLY)?)?;
    let hit = proto == IPPROTO_UDP
        && stale.iter().any(|(fe, ep)| {
            fe.protocol == Protocol::Udp && fe.addr == dst && fe.port == dport && *ep == reply_src
        });
    if !hit {
        return None;
    }
    let mut body = Vec::with_capacity(orig.len() + 16);
    attr(&mut body, CTA_TUPLE_ORIG | NLA_F_NESTED, orig);
    if let Some(zone) = find(entry, CTA_ZONE) {
        attr(&mut body, CTA_ZONE, zone);
    }
    Some(body)
}

fn l3(f: Family) -> u8 {
    match f {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    }
}

/// A conntrack netlink socket kept open.
pub struct ConntrackSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl ConntrackSocket {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            fd: open_netfilter()?,
            seq: 0,
            buf: vec![0; 256 * 1024],
        })
    }

    fn header(&mut self, out: &mut Vec<u8>, msg: u16, flags: u16, family: u8, body: &[u8]) {
        self.seq = self.seq.wrapping_add(1);
        let len = (16 + 4 + body.len()) as u32;
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, 0, 0, 0]);
        out.extend_from_slice(body);
    }

    /// The delete bodies of the family's entries matching `stale`.
    fn matching(&mut self, family: u8, stale: &[(Frontend, IpAddr)]) -> io::Result<Vec<Vec<u8>>> {
        let mut req = Vec::with_capacity(20);
        self.header(
            &mut req,
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[],
        );
        send_all(&self.fd, &req)?;
        let seq = self.seq;
        let mut out = Vec::new();
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = check(unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            })? as usize;
            for (kind, s, body) in messages(&self.buf[..n]) {
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        return Err(io::Error::from_raw_os_error(-error_code(body)));
                    }
                    _ => out.extend(body.get(4..).and_then(|e| delete_body(e, stale))),
                }
            }
        }
    }

    /// Deletes the UDP entries of `stale` (frontend, endpoint) flows; returns how many.
    pub fn delete_udp(&mut self, stale: &[(Frontend, IpAddr)]) -> io::Result<usize> {
        let mut deleted = 0;
        for f in [Family::V4, Family::V6] {
            let ours: Vec<_> = stale
                .iter()
                .filter(|(fe, _)| Family::of(&fe.addr) == f)
                .copied()
                .collect();
            if ours.is_empty() {
                continue;
            }
            let bodies = self.matching(l3(f), &ours)?;
            if bodies.is_empty() {
                continue;
            }
            let mut req = Vec::new();
            let first = self.seq.wrapping_add(1);
            for b in &bodies {
                self.header(
                    &mut req,
                    IPCTNL_MSG_CT_DELETE,
                    NLM_F_REQUEST | NLM_F_ACK,
                    l3(f),
                    b,
                );
            }
            send_all(&self.fd, &req)?;
            // Each delete is answered on its own; an entry that expired meanwhile is gone
            // as wanted.
            let mut next = first;
            while next.wrapping_sub(first) < bodies.len() as u32 {
                match wait_acks(&self.fd, &mut self.buf, next, next) {
                    Ok(()) => deleted += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
                next = next.wrapping_add(1);
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple_attr(kind: u16, src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut ips = Vec::new();
        attr(&mut ips, CTA_IP_V4_SRC, &src);
        attr(&mut ips, CTA_IP_V4_DST, &dst);
        let mut proto = Vec::new();
        attr(&mut proto, CTA_PROTO_NUM, &[IPPROTO_UDP]);
        attr(&mut proto, 2, &5000u16.to_be_bytes());
        attr(&mut proto, CTA_PROTO_DST_PORT, &dport.to_be_bytes());
        let mut t = Vec::new();
        attr(&mut t, CTA_TUPLE_IP | NLA_F_NESTED, &ips);
        attr(&mut t, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
        let mut out = Vec::new();
        attr(&mut out, kind | NLA_F_NESTED, &t);
        out
    }

    #[test]
    fn only_flows_of_the_frontend_answered_by_the_endpoint_are_deleted() {
        let mut entry = tuple_attr(CTA_TUPLE_ORIG, [10, 244, 1, 5], [10, 96, 0, 10], 53);
        entry.extend(tuple_attr(
            CTA_TUPLE_REPLY,
            [10, 244, 2, 2],
            [10, 244, 1, 5],
            5000,
        ));
        let fe = Frontend {
            addr: "10.96.0.10".parse().expect("ip"),
            protocol: Protocol::Udp,
            port: 53,
        };
        let body =
            delete_body(&entry, &[(fe, "10.244.2.2".parse().expect("ip"))]).expect("matches");
        let orig = find(&body, CTA_TUPLE_ORIG).expect("tuple");
        assert_eq!(
            tuple(orig),
            Some((IPPROTO_UDP, "10.244.1.5".parse().expect("ip"), fe.addr, 53))
        );
        let other_ep = [(fe, "10.244.2.3".parse().expect("ip"))];
        assert!(delete_body(&entry, &other_ep).is_none());
        let other_port = Frontend { port: 54, ..fe };
        assert!(delete_body(&entry, &[(other_port, "10.244.2.2".parse().expect("ip"))]).is_none());
    }

    fn conntrack(args: &[&str]) -> String {
        let out = std::process::Command::new("conntrack")
            .args(args)
            .output()
            .expect("conntrack");
        assert!(out.status.success(), "conntrack {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn insert(sport: &str, endpoint: &str) {
        conntrack(&[
            "-I",
            "-p",
            "udp",
            "-s",
            "10.244.1.5",
            "-d",
            "10.96.0.10",
            "--sport",
            sport,
            "--dport",
            "53",
            "-r",
            endpoint,
            "-q",
            "10.244.1.5",
            "--reply-port-src",
            "5353",
            "--reply-port-dst",
            sport,
            "-t",
            "60",
        ]);
    }

    /// Against the real kernel in a network namespace of this thread's own (entries made
    /// with the conntrack tool): only the flows answered by the removed endpoint go, and
    /// the socket serves the next sync too.
    #[test]
    fn stale_flows_are_deleted_in_the_kernel() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread only; the thread ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            insert("5000", "10.244.2.2");
            insert("5001", "10.244.2.3");
            let fe = Frontend {
                addr: "10.96.0.10".parse().expect("ip"),
                protocol: Protocol::Udp,
                port: 53,
            };
            let mut sock = ConntrackSocket::open().expect("socket");
            let stale = [(fe, "10.244.2.2".parse().expect("ip"))];
            assert_eq!(sock.delete_udp(&stale).expect("delete"), 1);
            let left = conntrack(&["-L", "-p", "udp"]);
            assert!(!left.contains("sport=5000"), "{left}");
            assert!(left.contains("sport=5001"), "{left}");
            assert_eq!(sock.delete_udp(&stale).expect("again"), 0, "nothing left");
        })
        .join()
        .expect("netns thread");
    }
}
