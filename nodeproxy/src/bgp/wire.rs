//! BGP messages on the wire. Encoding and decoding of OPEN, UPDATE and NOTIFICATION
//! bodies is `zettabgp`'s, IPv6 routes included (its MP_REACH_NLRI / MP_UNREACH_NLRI
//! attributes, RFC 4760); this module only frames them (RFC 4271 §4.1 header) and picks
//! the parts the speaker reads.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use zettabgp::prelude::{
    BgpAddr, BgpAddrV4, BgpAddrV6, BgpAddrs, BgpAttrItem, BgpAttrOrigin, BgpAttrUnknown,
    BgpCapability, BgpCommunity, BgpCommunityList, BgpLocalpref, BgpMPUpdates, BgpMPWithdraws,
    BgpMessage, BgpMessageType, BgpNextHop, BgpNotificationMessage, BgpOpenMessage, BgpOrigin,
    BgpSessionParams, BgpTransportMode, BgpUpdateMessage,
};

use super::routes::Attrs;

/// Header length: 16-byte marker, length, type.
pub const HEADER: usize = 19;
/// Largest message without the extended-message capability.
pub const MAX_MESSAGE: usize = 4096;
/// Host routes per UPDATE: 5 bytes each for IPv4, 17 for IPv6, well inside
/// [`MAX_MESSAGE`] with attributes.
const PREFIXES_PER_UPDATE: usize = 500;
const PREFIXES_PER_UPDATE_V6: usize = 200;

/// AS number written in the 2-byte OPEN field when the real one does not fit (RFC 6793).
const AS_TRANS: u32 = 23456;
/// AS_PATH attribute type code, its flags, and the AS_SEQUENCE segment type (RFC 4271).
const AS_PATH: u8 = 2;
const WELL_KNOWN_TRANSITIVE: u8 = 0x40;
const AS_SEQUENCE: u8 = 2;

/// NOTIFICATION codes the speaker sends or names.
pub mod code {
    pub const OPEN_ERROR: u8 = 2;
    pub const BAD_PEER_AS: u8 = 2;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM_ERROR: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad message header: {0}")]
    Header(String),
    #[error("cannot decode {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("cannot encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
}

/// Multiprotocol capability code (RFC 4760 §8) and the AFI/SAFI pairs the speaker knows.
const CAP_MULTIPROTOCOL: u8 = 1;
const AFI_IPV4: u16 = 1;
const AFI_IPV6: u16 = 2;
const SAFI_UNICAST: u8 = 1;

/// The address families a session offers or carries: IPv4 and IPv6 unicast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    /// What a peer without any multiprotocol capability supports (RFC 4760 §8).
    pub const IPV4_ONLY: Self = Self {
        ipv4: true,
        ipv6: false,
    };

    /// The families both sides named.
    pub fn and(self, other: Self) -> Self {
        Self {
            ipv4: self.ipv4 && other.ipv4,
            ipv6: self.ipv6 && other.ipv6,
        }
    }

    pub fn carries(self, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.ipv4,
            IpAddr::V6(_) => self.ipv6,
        }
    }

    pub fn text(self) -> &'static str {
        match (self.ipv4, self.ipv6) {
            (true, true) => "IPv4 and IPv6 unicast",
            (true, false) => "IPv4 unicast",
            (false, true) => "IPv6 unicast",
            (false, false) => "no address family",
        }
    }
}

/// The peer's OPEN, as the speaker needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The peer's AS: the 4-octet capability's when present.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub four_octet_as: bool,
    /// The unicast families the peer's multiprotocol capabilities name.
    pub families: Families,
}

/// A NOTIFICATION's code and subcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
}

impl Notification {
    /// RFC 4271's words for it (`OPEN Message Error: Bad Peer AS`).
    pub fn text(&self) -> String {
        let mut n = BgpNotificationMessage::new();
        n.error_code = self.code;
        n.error_subcode = self.subcode;
        n.error_text()
    }

    /// The one-word reason a condition carries.
    pub fn reason(&self) -> &'static str {
        match (self.code, self.subcode) {
            (code::OPEN_ERROR, code::BAD_PEER_AS) => "BadPeerAS",
            (code::OPEN_ERROR, _) => "OpenError",
            (code::HOLD_TIMER_EXPIRED, _) => "HoldTimerExpired",
            (code::CEASE, _) => "Cease",
            _ => "Notification",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    /// The speaker imports no routes: the UPDATE's content is not read.
    Update,
    Notification(Notification),
    Keepalive,
    RouteRefresh,
}

/// Parameters zettabgp encodes with (AS number width, address family).
pub fn params(
    my_asn: u32,
    hold: u16,
    router_id: Ipv4Addr,
    four_octet_as: bool,
) -> BgpSessionParams {
    let mut p = BgpSessionParams::new(
        my_asn,
        hold,
        BgpTransportMode::IPv4,
        router_id,
        vec![BgpCapability::SafiIPv4u, BgpCapability::CapASN32(my_asn)],
    );
    p.has_as32bit = four_octet_as;
    // The peer's UPDATEs are never decoded; no guessing of ADD-PATH identifiers.
    p.fuzzy_pathid = false;
    p
}

fn frame(kind: BgpMessageType, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0xff; 16];
    let len = (HEADER + body.len()) as u16;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind.encode());
    out.extend_from_slice(body);
    out
}

fn encode(
    what: &'static str,
    kind: BgpMessageType,
    params: &BgpSessionParams,
    msg: &impl BgpMessage,
) -> Result<Vec<u8>, WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE - HEADER];
    let n = msg
        .encode_to(params, &mut buf)
        .map_err(|e| WireError::Encode {
            what,
            detail: e.to_string(),
        })?;
    Ok(frame(kind, &buf[..n]))
}

/// Our OPEN: a multiprotocol capability per family in `families`, and 4-octet AS.
pub fn open(
    my_asn: u32,
    hold: u16,
    router_id: Ipv4Addr,
    families: Families,
) -> Result<Vec<u8>, WireError> {
    let p = params(my_asn, hold, router_id, true);
    let mut m: BgpOpenMessage = p.open_message();
    m.caps = [
        families.ipv4.then_some(BgpCapability::SafiIPv4u),
        families.ipv6.then_some(BgpCapability::SafiIPv6u),
        Some(BgpCapability::CapASN32(my_asn)),
    ]
    .into_iter()
    .flatten()
    .collect();
    m.as_num = if my_asn > u32::from(u16::MAX) {
        AS_TRANS
    } else {
        my_asn
    };
    encode("OPEN", BgpMessageType::Open, &p, &m)
}

pub fn keepalive() -> Vec<u8> {
    frame(BgpMessageType::Keepalive, &[])
}

/// A NOTIFICATION without data.
pub fn notification(n: Notification) -> Vec<u8> {
    frame(BgpMessageType::Notification, &[n.code, n.subcode])
}

/// What a session needs to build its UPDATEs.
#[derive(Clone, Debug)]
pub struct Speaker {
    pub my_asn: u32,
    pub peer_asn: u32,
    pub next_hop: Ipv4Addr,
    /// Next hop of IPv6 routes: this node's address on the session's side.
    pub next_hop_v6: Option<Ipv6Addr>,
    pub router_id: Ipv4Addr,
    pub four_octet_as: bool,
    /// The families both sides agreed to.
    pub families: Families,
}

impl Speaker {
    fn ebgp(&self) -> bool {
        self.my_asn != self.peer_asn
    }

    /// AS_PATH: our AS as one AS_SEQUENCE towards an eBGP peer, empty towards iBGP.
    /// Built by hand: zettabgp 0.6 writes its `Seq` segments with type 1, which RFC 4271
    /// assigns to AS_SET (routers then show `{64513}` and treat the path as aggregated).
    fn as_path(&self) -> BgpAttrItem {
        let mut value = Vec::new();
        if self.ebgp() {
            value.extend_from_slice(&[AS_SEQUENCE, 1]);
            if self.four_octet_as {
                value.extend_from_slice(&self.my_asn.to_be_bytes());
            } else {
                // A 2-octet peer sees AS_TRANS for a 4-octet AS (RFC 6793).
                let asn = u16::try_from(self.my_asn).unwrap_or(AS_TRANS as u16);
                value.extend_from_slice(&asn.to_be_bytes());
            }
        }
        let mut attr = BgpAttrUnknown::new(AS_PATH, WELL_KNOWN_TRANSITIVE);
        attr.value = value;
        BgpAttrItem::Unknown(attr)
    }

    /// Whether routes to `ip` go to this peer: its family was agreed to and it has a
    /// next hop.
    pub fn carries(&self, ip: &IpAddr) -> bool {
        self.families.carries(ip) && (ip.is_ipv4() || self.next_hop_v6.is_some())
    }

    /// Path attributes in type order; IPv4 routes take NEXT_HOP, IPv6 ones (`mp`) go in
    /// MP_REACH_NLRI with its own next hop and no NEXT_HOP (RFC 4760 §3).
    fn attrs(&self, a: &Attrs, mp: Option<BgpMPUpdates>) -> Vec<BgpAttrItem> {
        let mut attrs = vec![
            BgpAttrItem::Origin(BgpOrigin::new(BgpAttrOrigin::Igp)),
            self.as_path(),
        ];
        if mp.is_none() {
            attrs.push(BgpAttrItem::NextHop(BgpNextHop {
                value: IpAddr::V4(self.next_hop),
            }));
        }
        // LOCAL_PREF is for iBGP only (RFC 4271 §5.1.5).
        if let Some(lp) = a.local_pref.filter(|_| !self.ebgp()) {
            attrs.push(BgpAttrItem::LocalPref(BgpLocalpref::new(lp)));
        }
        if !a.communities.is_empty() {
            attrs.push(BgpAttrItem::CommunityList(BgpCommunityList {
                value: a
                    .communities
                    .iter()
                    .map(|c| BgpCommunity { value: *c })
                    .collect(),
            }));
        }
        attrs.extend(mp.map(BgpAttrItem::MPUpdates));
        attrs
    }

    /// UPDATEs withdrawing `withdraw` and announcing `announce` as host routes: IPv4 in
    /// the UPDATE's own fields, IPv6 in MP_REACH_NLRI / MP_UNREACH_NLRI. The caller
    /// leaves out what the session does not [carry](Speaker::carries).
    pub fn updates(
        &self,
        withdraw: &[IpAddr],
        announce: &BTreeMap<Attrs, Vec<IpAddr>>,
    ) -> Result<Vec<Vec<u8>>, WireError> {
        let p = params(self.my_asn, 0, self.router_id, self.four_octet_as);
        let (w4, w6) = split(withdraw);
        let mut out = Vec::new();
        for chunk in w4.chunks(PREFIXES_PER_UPDATE) {
            let mut m = BgpUpdateMessage::new();
            m.withdraws = BgpAddrs::IPV4U(host4(chunk));
            out.push(encode("UPDATE", BgpMessageType::Update, &p, &m)?);
        }
        for chunk in w6.chunks(PREFIXES_PER_UPDATE_V6) {
            let mut m = BgpUpdateMessage::new();
            m.attrs = vec![BgpAttrItem::MPWithdraws(BgpMPWithdraws::new(
                BgpAddrs::IPV6U(host6(chunk)),
            ))];
            out.push(encode("UPDATE", BgpMessageType::Update, &p, &m)?);
        }
        for (attrs, ips) in announce {
            let (a4, a6) = split(ips);
            for chunk in a4.chunks(PREFIXES_PER_UPDATE) {
                let mut m = BgpUpdateMessage::new();
                m.attrs = self.attrs(attrs, None);
                m.updates = BgpAddrs::IPV4U(host4(chunk));
                out.push(encode("UPDATE", BgpMessageType::Update, &p, &m)?);
            }
            if a6.is_empty() {
                continue;
            }
            let next_hop = self.next_hop_v6.ok_or_else(|| WireError::Encode {
                what: "UPDATE",
                detail: "IPv6 routes without an IPv6 next hop".into(),
            })?;
            for chunk in a6.chunks(PREFIXES_PER_UPDATE_V6) {
                let mp = BgpMPUpdates {
                    nexthop: BgpAddr::V6(next_hop),
                    addrs: BgpAddrs::IPV6U(host6(chunk)),
                };
                let mut m = BgpUpdateMessage::new();
                m.attrs = self.attrs(attrs, Some(mp));
                out.push(encode("UPDATE", BgpMessageType::Update, &p, &m)?);
            }
        }
        Ok(out)
    }
}

fn split(ips: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in ips {
        match ip {
            IpAddr::V4(a) => v4.push(*a),
            IpAddr::V6(a) => v6.push(*a),
        }
    }
    (v4, v6)
}

fn host4(ips: &[Ipv4Addr]) -> Vec<BgpAddrV4> {
    ips.iter().map(|ip| BgpAddrV4::new(*ip, 32)).collect()
}

fn host6(ips: &[Ipv6Addr]) -> Vec<BgpAddrV6> {
    ips.iter().map(|ip| BgpAddrV6::new(*ip, 128)).collect()
}

/// Type and body length from a header.
pub fn header(buf: &[u8; HEADER]) -> Result<(BgpMessageType, usize), WireError> {
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(WireError::Header("marker is not all ones".into()));
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    if !(HEADER..=MAX_MESSAGE).contains(&len) {
        return Err(WireError::Header(format!("length {len}")));
    }
    let kind = BgpMessageType::decode_from(buf[18])
        .map_err(|_| WireError::Header(format!("type {}", buf[18])))?;
    Ok((kind, len - HEADER))
}

/// The fields of a peer's OPEN the speaker uses. Written here rather than through
/// zettabgp's decoder, which refuses a whole OPEN over one capability it misreads (an
/// FQDN capability carrying a domain name); the speaker needs only the fixed fields and
/// the 4-octet AS and multiprotocol capabilities, and skips every other capability as
/// RFC 5492 allows.
fn parse_open(body: &[u8]) -> Result<Open, WireError> {
    let bad = |detail: String| WireError::Decode {
        what: "OPEN",
        detail,
    };
    if body.len() < 10 {
        return Err(bad(format!("{} bytes", body.len())));
    }
    if body[0] != 4 {
        return Err(bad(format!("BGP version {}", body[0])));
    }
    let as2 = u32::from(u16::from_be_bytes([body[1], body[2]]));
    let hold_time = u16::from_be_bytes([body[3], body[4]]);
    let router_id = Ipv4Addr::new(body[5], body[6], body[7], body[8]);
    let params_len = usize::from(body[9]);
    let params = body
        .get(10..10 + params_len)
        .ok_or_else(|| bad("optional parameters longer than the message".into()))?;
    let mut four = None;
    let mut families: Option<Families> = None;
    let mut rest = params;
    while let [kind, len, tail @ ..] = rest {
        let value = tail
            .get(..usize::from(*len))
            .ok_or_else(|| bad("truncated optional parameter".into()))?;
        // Type 2: capabilities, each a (code, length, value) triple.
        if *kind == 2 {
            let mut caps = value;
            while let [code, clen, ctail @ ..] = caps {
                let cval = ctail
                    .get(..usize::from(*clen))
                    .ok_or_else(|| bad("truncated capability".into()))?;
                if *code == 65 && cval.len() == 4 {
                    four = Some(u32::from_be_bytes([cval[0], cval[1], cval[2], cval[3]]));
                }
                // AFI (2 bytes), reserved, SAFI.
                if *code == CAP_MULTIPROTOCOL && cval.len() == 4 && cval[3] == SAFI_UNICAST {
                    let f = families.get_or_insert_default();
                    match u16::from_be_bytes([cval[0], cval[1]]) {
                        AFI_IPV4 => f.ipv4 = true,
                        AFI_IPV6 => f.ipv6 = true,
                        _ => {}
                    }
                } else if *code == CAP_MULTIPROTOCOL {
                    // Another family: the peer names its families, IPv4 is no longer implied.
                    families.get_or_insert_default();
                }
                caps = &ctail[usize::from(*clen)..];
            }
        }
        rest = &tail[usize::from(*len)..];
    }
    Ok(Open {
        asn: four.unwrap_or(as2),
        hold_time,
        router_id,
        four_octet_as: four.is_some(),
        families: families.unwrap_or(Families::IPV4_ONLY),
    })
}

/// A message body of the given type.
pub fn parse(kind: BgpMessageType, body: &[u8]) -> Result<Message, WireError> {
    Ok(match kind {
        BgpMessageType::Open => Message::Open(parse_open(body)?),
        BgpMessageType::Notification => {
            if body.len() < 2 {
                return Err(WireError::Decode {
                    what: "NOTIFICATION",
                    detail: format!("{} bytes", body.len()),
                });
            }
            Message::Notification(Notification {
                code: body[0],
                subcode: body[1],
            })
        }
        BgpMessageType::Keepalive => Message::Keepalive,
        BgpMessageType::Update => Message::Update,
        BgpMessageType::Routerefresh => Message::RouteRefresh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(msg: &[u8]) -> Message {
        let head: [u8; HEADER] = msg[..HEADER].try_into().expect("header");
        let (kind, len) = header(&head).expect("header");
        assert_eq!(len, msg.len() - HEADER);
        parse(kind, &msg[HEADER..]).expect("parse")
    }

    #[test]
    fn open_round_trips_with_four_octet_as() {
        let rid = Ipv4Addr::new(198, 18, 1, 10);
        let both = Families {
            ipv4: true,
            ipv6: true,
        };
        let Message::Open(o) = split(&open(64513, 9, rid, both).expect("open")) else {
            panic!("not an OPEN");
        };
        assert_eq!(
            o,
            Open {
                asn: 64513,
                hold_time: 9,
                router_id: rid,
                four_octet_as: true,
                families: both,
            }
        );
        let v4 = open(4_200_000_000, 90, rid, Families::IPV4_ONLY).expect("open");
        let Message::Open(big) = split(&v4) else {
            panic!("not an OPEN");
        };
        assert_eq!(big.asn, 4_200_000_000);
        assert_eq!(big.families, Families::IPV4_ONLY);
        // The IPv6 unicast capability: code 1, length 4, AFI 2, reserved, SAFI 1.
        let cap6 = [CAP_MULTIPROTOCOL, 4, 0, 2, 0, 1];
        assert!(
            !v4.windows(6).any(|w| w == cap6),
            "no IPv6 offered: {v4:x?}"
        );
    }

    /// An OPEN body of AS 64512 with these capabilities.
    fn open_body(caps: &[u8]) -> Vec<u8> {
        let mut body = vec![4, 0xfc, 0, 0, 9, 10, 0, 0, 1, (caps.len() + 2) as u8];
        body.extend_from_slice(&[2, caps.len() as u8]);
        body.extend_from_slice(caps);
        body
    }

    #[test]
    fn the_peers_families_come_from_its_multiprotocol_capabilities() {
        let families = |caps: &[u8]| match parse(BgpMessageType::Open, &open_body(caps)) {
            Ok(Message::Open(o)) => o.families,
            other => panic!("{other:?}"),
        };
        // None at all: IPv4 unicast is implied.
        assert_eq!(families(&[65, 4, 0, 0, 0xfc, 0]), Families::IPV4_ONLY);
        let v6_only = Families {
            ipv4: false,
            ipv6: true,
        };
        assert_eq!(families(&[1, 4, 0, 2, 0, 1]), v6_only);
        // IPv4 and IPv6 unicast, and IPv4 multicast (SAFI 2), which is not used.
        let both = families(&[1, 4, 0, 1, 0, 1, 1, 4, 0, 2, 0, 1, 1, 4, 0, 1, 0, 2]);
        assert_eq!((both.ipv4, both.ipv6), (true, true));
        // Only a family the speaker does not know: nothing in common.
        assert_eq!(families(&[1, 4, 0, 1, 0, 2]), Families::default());
        assert_eq!(Families::IPV4_ONLY.and(v6_only), Families::default());
    }

    #[test]
    fn open_with_unknown_and_fqdn_capabilities_parses() {
        // AS 64512, hold 9, router id 10.0.0.1; capabilities: FQDN "r"/"example"
        // (code 73), an unknown code 200, 4-octet AS 64512.
        let mut caps = vec![73, 10, 1, b'r', 7];
        caps.extend_from_slice(b"example");
        caps.extend_from_slice(&[200, 1, 0, 65, 4, 0, 0, 0xfc, 0]);
        let body = open_body(&caps);
        let Message::Open(o) = parse(BgpMessageType::Open, &body).expect("open") else {
            panic!("not an OPEN");
        };
        assert_eq!((o.asn, o.hold_time, o.four_octet_as), (64512, 9, true));
        assert!(
            parse(BgpMessageType::Open, &body[..body.len() - 3]).is_err(),
            "truncated"
        );
    }

    #[test]
    fn notifications_and_keepalives() {
        let n = Notification {
            code: code::OPEN_ERROR,
            subcode: code::BAD_PEER_AS,
        };
        assert_eq!(split(&notification(n)), Message::Notification(n));
        assert_eq!(n.reason(), "BadPeerAS");
        assert!(n.text().contains("Bad Peer AS"), "{}", n.text());
        assert_eq!(split(&keepalive()), Message::Keepalive);
        let mut bad = keepalive();
        bad[0] = 0;
        let head: [u8; HEADER] = bad[..HEADER].try_into().expect("header");
        assert!(header(&head).is_err());
    }

    fn speaker() -> Speaker {
        Speaker {
            my_asn: 64513,
            peer_asn: 64512,
            next_hop: Ipv4Addr::new(198, 18, 1, 10),
            next_hop_v6: Some("fd00:1846::1:10".parse().expect("v6")),
            router_id: Ipv4Addr::new(198, 18, 1, 10),
            four_octet_as: true,
            families: Families {
                ipv4: true,
                ipv6: true,
            },
        }
    }

    #[test]
    fn updates_carry_path_next_hop_and_split_large_sets() {
        let s = speaker();
        let ips: Vec<IpAddr> = (0..1200u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0xC613_0000 + i)))
            .collect();
        let attrs = Attrs {
            communities: [0xFFFF_FF01].into(),
            local_pref: Some(200),
        };
        let msgs = s
            .updates(&ips[..3], &BTreeMap::from([(attrs, ips.clone())]))
            .expect("updates");
        assert_eq!(msgs.len(), 1 + 3, "one withdrawal, 1200 prefixes in three");
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE));
        let p = params(64513, 0, s.router_id, true);
        let mut u = BgpUpdateMessage::new();
        u.decode_from(&p, &msgs[1][HEADER..]).expect("decode");
        assert!(matches!(&u.updates, BgpAddrs::IPV4U(v) if v.len() == 500));
        assert_eq!(
            u.get_attr_nexthop().map(|n| n.value),
            Some(IpAddr::V4(s.next_hop))
        );
        assert!(u.get_attr_communitylist().is_some());
        // AS_PATH (type 2, 6 bytes): one AS_SEQUENCE (2) of one AS, 64513.
        let path = [AS_PATH, 6, AS_SEQUENCE, 1, 0, 0, 0xfc, 0x01];
        assert!(
            msgs[1].windows(path.len()).any(|w| w == path),
            "{:x?}",
            msgs[1]
        );
        assert!(
            !u.attrs
                .iter()
                .any(|a| matches!(a, BgpAttrItem::LocalPref(_))),
            "no LOCAL_PREF to an eBGP peer"
        );
    }

    #[test]
    fn ipv6_routes_go_in_mp_reach_and_mp_unreach_with_the_ipv6_next_hop() {
        let s = speaker();
        let v6 = |i: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x1946, 0, 0, 0, 0, 0, i));
        let ips: Vec<IpAddr> = (0..450).map(v6).collect();
        let attrs = Attrs::default();
        let withdraw = [v6(1000), IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))];
        let msgs = s
            .updates(&withdraw, &BTreeMap::from([(attrs, ips)]))
            .expect("updates");
        assert_eq!(msgs.len(), 2 + 3, "two withdrawals, 450 prefixes in three");
        assert!(msgs.iter().all(|m| m.len() <= MAX_MESSAGE));
        let p = params(64513, 0, s.router_id, true);
        let decode = |m: &[u8]| {
            let mut u = BgpUpdateMessage::new();
            u.decode_from(&p, &m[HEADER..]).expect("decode");
            u
        };
        let w = decode(&msgs[1]);
        let unreach: Vec<_> = w
            .attrs
            .iter()
            .filter_map(|a| match a {
                BgpAttrItem::MPWithdraws(m) => Some(&m.addrs),
                _ => None,
            })
            .collect();
        assert!(
            matches!(unreach.as_slice(), [BgpAddrs::IPV6U(v)] if v == &host6(&[Ipv6Addr::new(0xfd00, 0x1946, 0, 0, 0, 0, 0, 1000)])),
            "{unreach:?}"
        );
        let u = decode(&msgs[2]);
        let reach = u
            .attrs
            .iter()
            .find_map(|a| match a {
                BgpAttrItem::MPUpdates(m) => Some(m),
                _ => None,
            })
            .expect("MP_REACH_NLRI");
        assert_eq!(reach.nexthop, BgpAddr::V6(s.next_hop_v6.expect("v6")));
        assert!(
            matches!(&reach.addrs, BgpAddrs::IPV6U(v) if v.len() == 200 && v[0].prefixlen == 128)
        );
        assert!(
            u.get_attr_nexthop().is_none(),
            "no IPv4 NEXT_HOP with IPv6 routes"
        );
        assert!(u.updates.is_empty(), "no IPv4 NLRI: {:?}", u.updates);

        let no_hop = Speaker {
            next_hop_v6: None,
            ..s.clone()
        };
        assert!(!no_hop.carries(&v6(1)));
        assert!(
            no_hop
                .updates(&[], &BTreeMap::from([(Attrs::default(), vec![v6(1)])]))
                .is_err()
        );
        let v4_only = Speaker {
            families: Families::IPV4_ONLY,
            ..s
        };
        assert!(!v4_only.carries(&v6(1)));
        assert!(v4_only.carries(&withdraw[1]));
    }
}
