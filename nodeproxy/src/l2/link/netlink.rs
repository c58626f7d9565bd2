//! Pool addresses over rtnetlink: add/refresh (`RTM_NEWADDR` with create+replace, as
//! `ip addr replace` does) and remove (`RTM_DELADDR`) many host addresses in one
//! `sendmsg`, and dump an interface's addresses with their `IFA_PROTO`. The messages are
//! `netlink-packet-route`'s; the exchange is [`crate::netlink`]'s. Blocking: run these
//! off the async workers.

use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol, AddressScope, CacheInfo,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::error::Error;
use crate::netlink::Netlink;

/// `IFA_PROTO` stamped on every address berth adds (any value above the kernel's own,
/// 0-3, is free for user space; 0x62 is `b`). Kernels before 6.1 ignore the attribute:
/// there berth never removes a leftover itself, and its finite lifetime removes it.
pub const BERTH_PROTO: u8 = 0x62;

/// Requests per `sendmsg`: their acks must fit the receive buffer at once.
const BATCH: usize = 256;
const RCVBUF: usize = 4 << 20;
/// A kernel that never answers must not hang the announcer.
const TIMEOUT: Duration = Duration::from_secs(2);

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

fn header(msg: &mut AddressMessage, addr: IpAddr, index: u32) {
    msg.header.family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.prefix_len = if addr.is_ipv6() { 128 } else { 32 };
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
}

/// The request for `op` on interface `index`, with its `NLM_F_*` flags. Pure.
pub fn request(op: &Op, index: u32) -> (u16, RouteNetlinkMessage) {
    let addr = op.addr();
    let mut msg = AddressMessage::default();
    header(&mut msg, addr, index);
    msg.attributes = vec![
        AddressAttribute::Local(addr),
        AddressAttribute::Address(addr),
    ];
    match op {
        Op::Remove(_) => (0, RouteNetlinkMessage::DelAddress(msg)),
        Op::Hold(_, secs) => {
            let mut cache = CacheInfo::default();
            cache.ifa_preferred = *secs;
            cache.ifa_valid = *secs;
            // Duplicate address detection would hold a moving IPv6 address back.
            let flags = if addr.is_ipv6() {
                AddressFlags::Nodad
            } else {
                AddressFlags::empty()
            };
            msg.attributes.extend([
                AddressAttribute::CacheInfo(cache),
                AddressAttribute::Flags(flags),
                AddressAttribute::Protocol(AddressProtocol::Other(BERTH_PROTO)),
            ]);
            let flags = NLM_F_CREATE | NLM_F_REPLACE;
            (flags, RouteNetlinkMessage::NewAddress(msg))
        }
    }
}

/// Carries out `ops` on interface `index`, one exchange per [`BATCH`]; the operations
/// that failed, with why. Removing an address that is gone already is success.
pub fn apply(index: i32, ops: &[Op]) -> Result<Vec<(IpAddr, Error)>, Error> {
    let index = u32::try_from(index).map_err(|_| Error::InvalidInput("interface index".into()))?;
    let mut nl = Netlink::open(NETLINK_ROUTE, TIMEOUT, Some(RCVBUF))
        .map_err(Error::io("open netlink socket"))?;
    let mut failed = Vec::new();
    for chunk in ops.chunks(BATCH) {
        let requests = chunk.iter().map(|op| request(op, index)).collect();
        let answers = nl
            .exchange(requests)
            .map_err(Error::io("exchange with netlink"))?;
        for (op, answer) in chunk.iter().zip(answers) {
            if let Err(source) = answer {
                let gone = source.raw_os_error() == Some(libc::EADDRNOTAVAIL);
                let what = match op {
                    Op::Remove(_) if gone => continue,
                    Op::Remove(_) => "remove address",
                    Op::Hold(..) => "add address",
                };
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
    Ok(failed)
}

/// One `RTM_NEWADDR` of a dump, when it is on interface `index`. Pure.
pub fn parse_address(msg: &AddressMessage, index: u32) -> Option<super::LinkAddr> {
    if msg.header.index != index {
        return None;
    }
    let mut local = None;
    let mut address = None;
    let mut proto = None;
    for a in &msg.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Protocol(p) => proto = Some(u8::from(*p)),
            _ => {}
        }
    }
    // IPv4 names the local address IFA_LOCAL (IFA_ADDRESS is the peer on point-to-point
    // links); IPv6 gives IFA_ADDRESS only.
    Some(super::LinkAddr {
        addr: local.or(address)?,
        prefix: msg.header.prefix_len,
        proto,
    })
}

/// Every address on interface `index`.
pub fn dump_addresses(index: i32) -> Result<Vec<super::LinkAddr>, Error> {
    let index = u32::try_from(index).map_err(|_| Error::InvalidInput("interface index".into()))?;
    let mut nl =
        Netlink::open(NETLINK_ROUTE, TIMEOUT, None).map_err(Error::io("open netlink socket"))?;
    let mut get = AddressMessage::default();
    get.header.index = index;
    let request = (NLM_F_DUMP, RouteNetlinkMessage::GetAddress(get));
    let mut answers = nl
        .exchange(vec![request])
        .map_err(Error::io("dump addresses"))?;
    let entries = answers
        .pop()
        .unwrap_or_else(|| Ok(Vec::new()))
        .map_err(Error::io("dump addresses"))?;
    Ok(entries
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) => parse_address(a, index),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    };

    use super::*;

    /// `op` as it goes on the wire (alone, sequence 42), and read back by the crate.
    fn wire(op: &Op, index: u32) -> (Vec<u8>, NetlinkMessage<RouteNetlinkMessage>) {
        let (flags, inner) = request(op, index);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = 42;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        let back = NetlinkMessage::deserialize(&buf).expect("decodes");
        (buf, back)
    }

    /// The attribute types of an address message's bytes (after the netlink header and
    /// the 8-byte ifaddrmsg), in order.
    fn kinds(buf: &[u8]) -> Vec<u16> {
        NlasIterator::new(&buf[16 + 8..])
            .map(|a| a.expect("attribute").kind())
            .collect()
    }

    fn address(msg: NetlinkMessage<RouteNetlinkMessage>) -> AddressMessage {
        match msg.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a),
            ) => a,
            other => panic!("not an address message: {other:?}"),
        }
    }

    /// The request `ip addr replace 198.19.8.5/32 dev <7> valid_lft 5 preferred_lft 5
    /// proto 0x62` sends, and its reading back as a dump entry.
    #[test]
    fn a_held_address_encodes_as_ip_addr_replace_with_berths_proto() {
        let a: IpAddr = "198.19.8.5".parse().expect("ip");
        let (buf, back) = wire(&Op::Hold(a, 5), 7);
        assert_eq!(buf.len(), 16 + 8 + 8 + 8 + 20 + 8 + 8);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 20, "RTM_NEWADDR");
        assert_eq!(
            back.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(&buf[16..20], &[libc::AF_INET as u8, 32, 0, 0]);
        // IFA_LOCAL, IFA_ADDRESS, IFA_CACHEINFO, IFA_FLAGS, IFA_PROTO.
        assert_eq!(kinds(&buf), [2, 1, 6, 8, 11]);
        // IFA_CACHEINFO's preferred and valid lifetimes, then IFA_PROTO's value byte.
        assert_eq!(&buf[44..52], &[5, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(buf[buf.len() - 4], BERTH_PROTO);
        let msg = address(back);
        let entry = parse_address(&msg, 7).expect("parsed");
        assert_eq!(
            (entry.addr, entry.prefix, entry.proto),
            (a, 32, Some(BERTH_PROTO))
        );
        assert_eq!(parse_address(&msg, 8), None, "another interface");
    }

    #[test]
    fn removals_and_ipv6_addresses_encode() {
        let v6: IpAddr = "fd00::5".parse().expect("ip");
        let (buf, back) = wire(&Op::Remove(v6), 3);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 21, "RTM_DELADDR");
        assert_eq!(back.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(kinds(&buf), [2, 1], "a removal names the address only");

        let (buf, back) = wire(&Op::Hold(v6, 9), 3);
        assert_eq!(kinds(&buf), [2, 1, 6, 8, 11]);
        let msg = address(back);
        assert!(
            msg.attributes
                .contains(&AddressAttribute::Flags(AddressFlags::Nodad))
        );
        assert_eq!(
            parse_address(&msg, 3).map(|a| (a.addr, a.prefix, a.proto)),
            Some((v6, 128, Some(BERTH_PROTO)))
        );
    }

    /// A dump entry of someone else's address: no stamp, or another one, read as such.
    #[test]
    fn dump_entries_keep_foreign_stamps() {
        let mut msg = AddressMessage::default();
        msg.header.index = 2;
        msg.header.prefix_len = 16;
        msg.attributes = vec![
            AddressAttribute::Address("198.18.0.1".parse().expect("ip")),
            AddressAttribute::Local("198.18.1.10".parse().expect("ip")),
        ];
        let plain = parse_address(&msg, 2).expect("parsed");
        assert_eq!(
            (plain.addr, plain.prefix, plain.proto),
            ("198.18.1.10".parse().expect("ip"), 16, None)
        );
        msg.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::LinkLocal));
        assert_eq!(parse_address(&msg, 2).and_then(|a| a.proto), Some(3));
    }

    /// Against the real kernel, in a network namespace of this thread's own (needs root,
    /// like the rest of `make test`), on its loopback: held addresses carry the stamp and
    /// the lifetime, foreign ones none, a refused request fails alone, and removing an
    /// address twice is no error.
    #[test]
    fn addresses_round_trip_through_the_kernel() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread only; the thread ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let lo = 1;
            let a: IpAddr = "198.19.8.5".parse().expect("ip");
            let v6: IpAddr = "fd00::5".parse().expect("ip");
            let foreign = std::process::Command::new("ip")
                .args(["addr", "add", "198.19.8.9/32", "dev", "lo"])
                .status()
                .expect("ip");
            assert!(foreign.success());
            let failed = apply(lo, &[Op::Hold(a, 30), Op::Hold(v6, 30)]).expect("apply");
            assert!(failed.is_empty(), "{failed:?}");
            let on = dump_addresses(lo).expect("dump");
            let ours: Vec<(IpAddr, u8)> = on
                .iter()
                .filter(|e| e.proto == Some(BERTH_PROTO))
                .map(|e| (e.addr, e.prefix))
                .collect();
            assert_eq!(ours, [(a, 32), (v6, 128)], "{on:?}");
            let other = IpAddr::from([198, 19, 8, 9]);
            assert!(
                on.iter().any(|e| e.addr == other && e.proto.is_none()),
                "{on:?}"
            );
            let shown = std::process::Command::new("ip")
                .args(["-j", "addr", "show", "dev", "lo"])
                .output()
                .expect("ip");
            let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("json");
            let lifetimes: Vec<u64> = shown[0]["addr_info"]
                .as_array()
                .expect("addr_info")
                .iter()
                .filter(|i| i["local"] != "198.19.8.9")
                .filter_map(|i| i["valid_life_time"].as_u64())
                .collect();
            assert!(
                lifetimes.len() == 2 && lifetimes.iter().all(|l| (28..=30).contains(l)),
                "{shown}"
            );
            // Index 999 does not exist: that request fails, the others in the batch do not.
            let failed = apply(999, &[Op::Hold(a, 30)]).expect("apply");
            assert_eq!(failed.len(), 1);
            let failed = apply(lo, &[Op::Remove(a), Op::Remove(a), Op::Remove(v6)]).expect("apply");
            assert!(failed.is_empty(), "{failed:?}");
            let left = dump_addresses(lo).expect("dump");
            let left: Vec<IpAddr> = left.iter().map(|e| e.addr).collect();
            assert_eq!(left, [other]);
        })
        .join()
        .expect("netns thread");
    }
}
