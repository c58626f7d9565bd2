//! Incremental syncs over a netlink socket kept open: the element changes of one sync go
//! to the kernel as one nftables batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_DELSETELEM` /
//! `NFT_MSG_NEWSETELEM` per map, `NFNL_MSG_BATCH_END`), committed atomically like an
//! `nft -f` input, without starting a process or closing a socket per change.
//!
//! The messages are encoded here rather than with `netlink-packet-netfilter`: that crate
//! has no nf_tables set-element messages (it covers nflog and conntrack), and berth needs
//! few of them: concatenated keys, `ip . port` map data, `goto chain` verdicts, interval
//! ends. The encodings are the ones `nft --debug=netlink` shows nft sending for the same
//! statements; the property test in `nftcheck` compares the kernel's resulting ruleset
//! with `nft -f`'s.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::proxy::model::Family;
use crate::proxy::netlink::{attr, check};
use crate::proxy::ruleset::{ElemKey, MapName, TABLE};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NETLINK_CAP_ACK: libc::c_int = 10;
/// Elements per message: keeps each message far below the 64 KiB an attribute length can
/// describe, whatever the key size.
const ELEMENTS_PER_MESSAGE: usize = 256;

/// The element changes of one incremental sync, in the order the kernel applies them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElementChange {
    /// Maps emptied first (the `affinity` map when an endpoint of an affinity Service
    /// goes), by name: it is part of the skeleton, not a [`MapName`].
    pub flush: Vec<(Family, &'static str)>,
    pub deletes: Vec<(ElemKey, Option<String>)>,
    pub adds: Vec<(ElemKey, Option<String>)>,
}

impl ElementChange {
    pub fn is_empty(&self) -> bool {
        self.flush.is_empty() && self.deletes.is_empty() && self.adds.is_empty()
    }
}

/// A key or value berth rendered that this encoder does not know (a bug, never input).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {what} {text:?} of map {map}")]
pub struct EncodeError {
    what: &'static str,
    text: String,
    map: String,
}

/// One field of a key or value, in nft's concatenation layout.
#[derive(Clone, Copy)]
enum Field {
    Addr,
    Proto,
    Port,
    /// A host-order 32-bit integer (`numgen` index, decimal).
    Int,
    /// A host-order 32-bit mark (`0x...`).
    Mark,
    /// A prefix: the key holds its first address, the interval end its last.
    Prefix,
}

fn key_fields(map: MapName) -> &'static [Field] {
    use Field::*;
    match map {
        MapName::ServiceIps
        | MapName::ServiceNodeports
        | MapName::ServiceIpsInternal
        | MapName::NoEndpoints
        | MapName::InternalShortcut
        | MapName::ExternalMasq
        | MapName::FirewallFrontends
        | MapName::AffinityIds => &[Addr, Proto, Port],
        MapName::Backends | MapName::BackendsInternal => &[Addr, Proto, Port, Int],
        MapName::ClusterIps | MapName::LbAddresses => &[Addr],
        MapName::Hairpin => &[Addr, Addr],
        MapName::FirewallAllow => &[Addr, Proto, Port, Prefix],
        MapName::AffinityTimeout(_) => &[Addr, Mark],
    }
}

/// What a map's values are: verdicts, data fields, or none (a set).
enum Values {
    Verdict,
    Data(&'static [Field]),
    None,
}

fn values(map: MapName) -> Values {
    match map {
        MapName::ServiceIps
        | MapName::ServiceNodeports
        | MapName::ServiceIpsInternal
        | MapName::NoEndpoints => Values::Verdict,
        MapName::Backends | MapName::BackendsInternal => Values::Data(&[Field::Addr, Field::Port]),
        MapName::AffinityIds => Values::Data(&[Field::Mark]),
        _ => Values::None,
    }
}

/// The first and last address of `addr/prefix` (rendered from a [`Cidr`], so `addr` is
/// the network address already).
fn prefix_range(text: &str) -> Option<(IpAddr, IpAddr)> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let bits: u32 = prefix.parse().ok()?;
    let last = match addr {
        IpAddr::V4(a) => {
            let host = u32::MAX.checked_shr(bits).unwrap_or(0);
            IpAddr::V4((u32::from(a) | host).into())
        }
        IpAddr::V6(a) => {
            let host = u128::MAX.checked_shr(bits).unwrap_or(0);
            IpAddr::V6((u128::from(a) | host).into())
        }
    };
    Some((addr, last))
}

fn push_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// Encodes `text` (fields joined by " . ") as the key (and, for intervals, the key end)
/// registers: every field padded to 4 bytes, as nft concatenates them.
fn encode_fields(fields: &[Field], text: &str) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let parts: Vec<&str> = text.split(" . ").collect();
    if parts.len() != fields.len() {
        return None;
    }
    let mut key = Vec::with_capacity(40);
    let mut end: Option<Vec<u8>> = None;
    for (field, part) in fields.iter().zip(parts) {
        let start = key.len();
        match field {
            Field::Addr => push_addr(&mut key, part.parse().ok()?),
            Field::Proto => key.push(match part {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                _ => return None,
            }),
            Field::Port => key.extend_from_slice(&part.parse::<u16>().ok()?.to_be_bytes()),
            Field::Int => key.extend_from_slice(&part.parse::<u32>().ok()?.to_ne_bytes()),
            Field::Mark => {
                let hex = part.strip_prefix("0x")?;
                key.extend_from_slice(&u32::from_str_radix(hex, 16).ok()?.to_ne_bytes());
            }
            Field::Prefix => {
                let (first, last) = prefix_range(part)?;
                push_addr(&mut key, first);
                let mut e = key[..start].to_vec();
                push_addr(&mut e, last);
                end = Some(e);
            }
        }
        key.resize(key.len().next_multiple_of(4), 0);
    }
    Some((key, end))
}

fn verdict(text: &str) -> Option<(i32, Option<&str>)> {
    match text.split_once(' ') {
        Some(("goto", chain)) => Some((NFT_GOTO, Some(chain))),
        Some(("jump", chain)) => Some((NFT_JUMP, Some(chain))),
        None if text == "drop" => Some((NF_DROP, None)),
        None if text == "accept" => Some((NF_ACCEPT, None)),
        _ => None,
    }
}

/// Appends a nested attribute whose content `f` writes.
fn nest(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    f(buf);
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    buf[at + 2..at + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

fn data_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    nest(buf, kind, |b| attr(b, NFTA_DATA_VALUE, value));
}

/// The value of a map element, encoded.
enum Data<'a> {
    Value(Vec<u8>),
    Verdict(i32, Option<&'a str>),
}

/// The value of an element added to `map`; `None` for a set.
fn data<'a>(map: MapName, value: Option<&'a str>) -> Result<Option<Data<'a>>, EncodeError> {
    let fail = |what: &'static str, text: &str| EncodeError {
        what,
        text: text.to_string(),
        map: map.name(),
    };
    Ok(match (values(map), value) {
        (Values::None, None) => None,
        (Values::None, Some(v)) => return Err(fail("value of a set", v)),
        (_, None) => return Err(fail("missing value", "")),
        (Values::Verdict, Some(v)) => {
            let (code, chain) = verdict(v).ok_or_else(|| fail("verdict", v))?;
            Some(Data::Verdict(code, chain))
        }
        (Values::Data(fields), Some(v)) => {
            let (d, _) = encode_fields(fields, v).ok_or_else(|| fail("value", v))?;
            Some(Data::Value(d))
        }
    })
}

/// One `NFTA_LIST_ELEM`: key, interval end, and the value when adding to a map (a delete
/// names the key only).
fn element(
    buf: &mut Vec<u8>,
    key: &ElemKey,
    value: Option<&str>,
    with_value: bool,
) -> Result<(), EncodeError> {
    let (k, end) = encode_fields(key_fields(key.map), &key.key).ok_or_else(|| EncodeError {
        what: "key",
        text: key.key.clone(),
        map: key.map.name(),
    })?;
    let data = if with_value {
        data(key.map, value)?
    } else {
        None
    };
    nest(buf, NFTA_LIST_ELEM, |b| {
        data_attr(b, NFTA_SET_ELEM_KEY, &k);
        if let Some(e) = &end {
            data_attr(b, NFTA_SET_ELEM_KEY_END, e);
        }
        match data {
            Some(Data::Value(d)) => data_attr(b, NFTA_SET_ELEM_DATA, &d),
            Some(Data::Verdict(code, chain)) => nest(b, NFTA_SET_ELEM_DATA, |b| {
                nest(b, NFTA_DATA_VERDICT, |b| {
                    attr(b, NFTA_VERDICT_CODE, &code.to_be_bytes());
                    if let Some(c) = chain {
                        attr(b, NFTA_VERDICT_CHAIN, &cstr(c));
                    }
                })
            }),
            None => {}
        }
    });
    Ok(())
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

/// A batch being encoded: messages with consecutive sequence numbers.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
}

impl Batch {
    fn message(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, body: &[u8]) {
        self.seq = self.seq.wrapping_add(1);
        let len = (16 + 4 + body.len()) as u32;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(body);
    }

    fn set_message(&mut self, msg: u16, family: Family, set: &str, elems: Option<&[u8]>) {
        let mut body = Vec::with_capacity(64 + elems.map_or(0, <[u8]>::len));
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(TABLE));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        if let Some(e) = elems {
            nest(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                b.extend_from_slice(e)
            });
        }
        let create = if msg == NFT_MSG_NEWSETELEM {
            NLM_F_CREATE
        } else {
            0
        };
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | msg;
        self.message(
            kind,
            NLM_F_REQUEST | NLM_F_ACK | create,
            nfproto(family),
            0,
            &body,
        );
    }

    /// One message per map and chunk of elements, keeping the given order of maps.
    fn elements(
        &mut self,
        msg: u16,
        ops: &[(ElemKey, Option<String>)],
        with_value: bool,
    ) -> Result<(), EncodeError> {
        let mut at = 0;
        while at < ops.len() {
            let (family, map) = (ops[at].0.family, ops[at].0.map);
            let mut elems = Vec::new();
            let mut n = 0;
            while at < ops.len()
                && (ops[at].0.family, ops[at].0.map) == (family, map)
                && n < ELEMENTS_PER_MESSAGE
            {
                element(&mut elems, &ops[at].0, ops[at].1.as_deref(), with_value)?;
                at += 1;
                n += 1;
            }
            self.set_message(msg, family, &map.name(), Some(&elems));
        }
        Ok(())
    }
}

/// The whole batch for `change`, its messages numbered after `seq`; returns the bytes and
/// the sequence numbers of the first and last element message.
pub fn encode(change: &ElementChange, seq: u32) -> Result<(Vec<u8>, u32, u32), EncodeError> {
    let mut b = Batch {
        buf: Vec::with_capacity(512),
        seq,
    };
    b.message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let first = b.seq.wrapping_add(1);
    for (family, set) in &change.flush {
        b.set_message(NFT_MSG_DELSETELEM, *family, set, None);
    }
    b.elements(NFT_MSG_DELSETELEM, &sorted(&change.deletes), false)?;
    b.elements(NFT_MSG_NEWSETELEM, &sorted(&change.adds), true)?;
    let last = b.seq;
    b.message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    Ok((b.buf, first, last))
}

/// Elements grouped by map (their order within a map is kept).
fn sorted(ops: &[(ElemKey, Option<String>)]) -> Vec<(ElemKey, Option<String>)> {
    let mut v = ops.to_vec();
    v.sort_by_key(|(k, _)| (k.family, k.map));
    v
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("nftables netlink batch: {0}")]
    Io(#[from] io::Error),
}

/// A `NETLINK_NETFILTER` socket kept open for element batches.
pub struct NftSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` outlives the call and its size is passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A netfilter netlink socket whose ACKs carry no copy of the request, and whose reads
/// give up after 5 s (a kernel answers a batch in milliseconds; this only bounds a bug).
pub(crate) fn open_netfilter() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned by `OwnedFd` from here on.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt(&fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, &1 as &libc::c_int)?;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
    Ok(fd)
}

/// Sends `buf` as one datagram, growing the send buffer first if it is too small for
/// the batch (the kernel takes a batch only whole, in one message).
pub(crate) fn send_all(fd: &OwnedFd, buf: &[u8]) -> io::Result<()> {
    if buf.len() > 200 * 1024 {
        let size = libc::c_int::try_from(buf.len() * 2).unwrap_or(libc::c_int::MAX);
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &size)?;
    }
    // SAFETY: `buf` is valid for its length; the kernel is the default destination.
    let n = check(unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) })?;
    if n as usize != buf.len() {
        return Err(io::Error::other("short netlink send"));
    }
    Ok(())
}

/// One netlink message read from a datagram: type, sequence number, payload.
pub(crate) fn messages(data: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 16 > data.len() {
            return None;
        }
        let len = u32::from_ne_bytes(data[at..at + 4].try_into().ok()?) as usize;
        if len < 16 || at + len > data.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
        let seq = u32::from_ne_bytes(data[at + 8..at + 12].try_into().ok()?);
        let body = &data[at + 16..at + len];
        at += len.next_multiple_of(4);
        Some((kind, seq, body))
    })
}

/// The error code of an `NLMSG_ERROR` payload (0 for an ACK).
pub(crate) fn error_code(body: &[u8]) -> i32 {
    body.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(-libc::EPROTO)
}

/// Reads answers until the ACK of `last`; the first error among `first..=last` (or of
/// the batch header, when the commit itself fails) ends the wait.
pub(crate) fn wait_acks(fd: &OwnedFd, buf: &mut [u8], first: u32, last: u32) -> io::Result<()> {
    let begin = first.wrapping_sub(1);
    let ours = |seq: u32| seq.wrapping_sub(begin) <= last.wrapping_sub(begin);
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = check(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })?
            as usize;
        for (kind, seq, body) in messages(&buf[..n]) {
            if kind != NLMSG_ERROR || !ours(seq) {
                continue;
            }
            match error_code(body) {
                0 if seq == last => return Ok(()),
                0 => {}
                code => return Err(io::Error::from_raw_os_error(-code)),
            }
        }
    }
}

impl NftSocket {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            fd: open_netfilter()?,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Commits `change` as one transaction and waits for the kernel's answer to every
    /// message. After an error the socket may still hold answers of the failed batch:
    /// the caller drops it and opens a new one.
    pub fn commit(&mut self, change: &ElementChange) -> Result<(), BatchError> {
        if change.is_empty() {
            return Ok(());
        }
        let (buf, first, last) = encode(change, self.seq)?;
        self.seq = last.wrapping_add(1);
        send_all(&self.fd, &buf)?;
        wait_acks(&self.fd, &mut self.buf, first, last)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(map: MapName, key: &str) -> ElemKey {
        ElemKey {
            family: Family::V4,
            map,
            key: key.into(),
        }
    }

    #[test]
    fn concatenated_fields_are_padded_to_registers() {
        let (k, end) =
            encode_fields(key_fields(MapName::Backends), "10.96.0.1 . udp . 53 . 1").expect("key");
        let mut want = vec![10, 96, 0, 1, 17, 0, 0, 0, 0, 53, 0, 0];
        want.extend_from_slice(&1u32.to_ne_bytes());
        assert_eq!(k, want);
        assert_eq!(end, None);
        let (v, _) = encode_fields(&[Field::Addr, Field::Port], "10.244.2.9 . 8080").expect("v");
        assert_eq!(v, [10, 244, 2, 9, 0x1f, 0x90, 0, 0]);
        let (m, _) = encode_fields(&[Field::Mark], "0x01110035").expect("mark");
        assert_eq!(m, 0x0111_0035u32.to_ne_bytes());
        let (a, _) = encode_fields(&[Field::Addr], "fd00::1").expect("v6");
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn prefixes_become_intervals() {
        let fields = key_fields(MapName::FirewallAllow);
        let (k, end) = encode_fields(fields, "198.19.0.1 . tcp . 80 . 10.0.0.0/8").expect("key");
        assert_eq!(&k[12..], [10, 0, 0, 0]);
        let end = end.expect("interval end");
        assert_eq!(&end[..12], &k[..12]);
        assert_eq!(&end[12..], [10, 255, 255, 255]);
        let (_, end6) = encode_fields(fields, "fd00::1 . udp . 53 . fd00:18::/32").expect("v6");
        let end6 = end6.expect("end");
        assert_eq!(&end6[end6.len() - 12..], [0xff; 12]);
    }

    #[test]
    fn verdicts_and_rendering_mistakes() {
        assert_eq!(verdict("goto ep-3"), Some((NFT_GOTO, Some("ep-3"))));
        assert_eq!(verdict("drop"), Some((NF_DROP, None)));
        assert_eq!(verdict("goto"), None);
        let mut buf = Vec::new();
        assert!(
            element(
                &mut buf,
                &key(MapName::ClusterIps, "10.0.0.1 . tcp"),
                None,
                true
            )
            .is_err()
        );
        let bad = key(MapName::ServiceIps, "10.0.0.1 . tcp . 80");
        assert!(element(&mut buf, &bad, Some("dnat"), true).is_err());
        assert!(
            element(&mut buf, &bad, None, true).is_err(),
            "a map element needs a value"
        );
        assert!(
            element(&mut buf, &bad, None, false).is_ok(),
            "a delete needs none"
        );
    }

    #[test]
    fn batches_are_framed_and_numbered() {
        let change = ElementChange {
            flush: vec![(Family::V4, "affinity")],
            deletes: vec![(key(MapName::ClusterIps, "10.96.0.1"), None)],
            adds: vec![
                (
                    key(MapName::ServiceIps, "10.96.0.2 . tcp . 80"),
                    Some("goto ep-1".into()),
                ),
                (key(MapName::ClusterIps, "10.96.0.2"), None),
            ],
        };
        let (buf, first, last) = encode(&change, 41).expect("encode");
        let msgs: Vec<(u16, u32)> = messages(&buf).map(|(k, s, _)| (k, s)).collect();
        let set = |m| (NFNL_SUBSYS_NFTABLES << 8) | m;
        assert_eq!(
            msgs,
            [
                (NFNL_MSG_BATCH_BEGIN, 42),
                (set(NFT_MSG_DELSETELEM), 43),
                (set(NFT_MSG_DELSETELEM), 44),
                (set(NFT_MSG_NEWSETELEM), 45),
                (set(NFT_MSG_NEWSETELEM), 46),
                (NFNL_MSG_BATCH_END, 47),
            ]
        );
        assert_eq!((first, last), (43, 46));
    }

    fn nft(args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft {args:?}: {input}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Against the real kernel in a network namespace of this thread's own: batches on
    /// one socket commit in turn; a batch the kernel refuses changes nothing and the
    /// error names the cause.
    #[test]
    fn batches_commit_whole_or_not_at_all() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread only; the thread ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            nft(
                &["-f", "-"],
                "table ip berth { set cluster-ips { type ipv4_addr; }\n\
                 map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
                 chain ep-1 { }\n}\n",
            );
            let mut sock = NftSocket::open().expect("socket");
            let add = |ip: &str| ElementChange {
                adds: vec![
                    (key(MapName::ClusterIps, ip), None),
                    (
                        key(MapName::ServiceIps, &format!("{ip} . tcp . 80")),
                        Some("goto ep-1".into()),
                    ),
                ],
                ..Default::default()
            };
            sock.commit(&add("10.96.0.1")).expect("first batch");
            sock.commit(&add("10.96.0.2"))
                .expect("second batch on the same socket");
            let listed = nft(&["list", "table", "ip", "berth"], "");
            assert!(
                listed.contains("10.96.0.2 . tcp . 80 : goto ep-1"),
                "{listed}"
            );
            let mut refused = add("10.96.0.3");
            refused.deletes = vec![(key(MapName::ClusterIps, "10.96.9.9"), None)];
            let err = sock
                .commit(&refused)
                .expect_err("deleting a missing element");
            assert!(err.to_string().contains("No such file"), "{err}");
            let after = nft(&["list", "table", "ip", "berth"], "");
            assert!(
                !after.contains("10.96.0.3"),
                "a refused batch added nothing: {after}"
            );
            let mut fresh = NftSocket::open().expect("socket");
            fresh
                .commit(&add("10.96.0.4"))
                .expect("a new socket after the failure");
        })
        .join()
        .expect("netns thread");
    }
}
