//! Cheap reads of nftables state over netlink (`NETLINK_NETFILTER`), for drift
//! detection: the ruleset generation (bumped by every commit of anyone in the network
//! namespace) and a fingerprint of berth's tables — table, rule and set handles — whose
//! size depends on the fixed chain layout, never on the number of Services. Set elements
//! are not read: that would cost as much as listing the table. The messages are
//! `netlink-packet-netfilter`'s; the exchange is [`crate::netlink`]'s.

use std::io;
use std::time::Duration;

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_netfilter::nftables::{
    GenAttribute, GenMessage, NfTablesMessage, RuleAttribute, RuleMessage, SetAttribute,
    SetMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::netlink::Netlink;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// A kernel that never answers must not stall the sync loop or `/healthz`.
const TIMEOUT: Duration = Duration::from_secs(1);

/// One family's part of a [`Fingerprint`]: (family, table handle, sorted (chain, rule
/// handle), sorted (set, set handle)).
type TableMark = (u8, Option<u64>, Vec<(String, u64)>, Vec<(String, u64)>);

/// What of berth's tables another tool cannot change without changing this: whether each
/// table exists (and which incarnation), and every rule and set by chain/name and handle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    tables: Vec<TableMark>,
}

impl Fingerprint {
    /// A fingerprint of one IPv4 table with handle `n`, for tests.
    #[cfg(test)]
    pub fn test(n: u64) -> Self {
        Self {
            tables: vec![(NFPROTO_IPV4, Some(n), Vec::new(), Vec::new())],
        }
    }

    /// A short human description of how `self` differs from `before`.
    pub fn difference(&self, before: &Fingerprint) -> String {
        let mut out = Vec::new();
        for (now, was) in self.tables.iter().zip(&before.tables) {
            let family = if now.0 == NFPROTO_IPV4 { "ip" } else { "ip6" };
            match (now.1, was.1) {
                (None, _) => out.push(format!("table {family} is gone")),
                (Some(a), Some(b)) if a != b => out.push(format!("table {family} was replaced")),
                _ => {
                    if now.2 != was.2 {
                        out.push(format!(
                            "rules of table {family} changed ({} now, {} expected)",
                            now.2.len(),
                            was.2.len()
                        ));
                    }
                    if now.3 != was.3 {
                        out.push(format!("sets of table {family} changed"));
                    }
                }
            }
        }
        out.join("; ")
    }
}

fn open() -> io::Result<Netlink> {
    Netlink::open(NETLINK_NETFILTER, TIMEOUT, None)
}

/// One nf_tables request for `family` (`NFNETLINK_V0`, resource id 0).
fn request(family: u8, msg: NfTablesMessage) -> NetfilterMessage {
    let family = NetfilterProtoFamily::from(family);
    NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg)
}

/// The nf_tables messages of one answer, for the one request sent.
fn one(answers: Vec<crate::netlink::Answer<NetfilterMessage>>) -> io::Result<Vec<NfTablesMessage>> {
    let answer = answers
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::other("no answer"))??;
    Ok(answer
        .into_iter()
        .filter_map(|m| match m.inner {
            NetfilterMessageInner::NfTables(t) => Some(t),
            _ => None,
        })
        .collect())
}

/// The ruleset generation of this network namespace.
pub fn generation() -> io::Result<u32> {
    let get = NfTablesMessage::GetGen(GenMessage { attributes: vec![] });
    let answers = open()?.exchange(vec![(0, request(0, get))])?;
    one(answers)?
        .iter()
        .flat_map(|m| match m {
            NfTablesMessage::NewGen(g) => g.attributes.as_slice(),
            _ => &[],
        })
        .find_map(|a| match a {
            GenAttribute::Id(id) => Some(*id),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("no generation in the answer"))
}

/// The fingerprint of table `table` in both families.
pub fn fingerprint(table: &str) -> io::Result<Fingerprint> {
    let mut nl = open()?;
    let mut tables = Vec::new();
    for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
        let handle = table_handle(&mut nl, family, table)?;
        let (mut rules, mut sets) = (Vec::new(), Vec::new());
        if handle.is_some() {
            // One dump per exchange: the kernel runs one dump per socket at a time.
            rules = listing(&mut nl, family, table, Listing::Rules)?;
            sets = listing(&mut nl, family, table, Listing::Sets)?;
        }
        tables.push((family, handle, rules, sets));
    }
    Ok(Fingerprint { tables })
}

/// The handle of `table` in `family`, `None` when there is no such table.
fn table_handle(nl: &mut Netlink, family: u8, table: &str) -> io::Result<Option<u64>> {
    let get = NfTablesMessage::GetTable(TableMessage {
        attributes: vec![TableAttribute::Name(table.into())],
    });
    let answers = nl.exchange(vec![(0, request(family, get))])?;
    let msgs = match one(answers) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(msgs
        .iter()
        .flat_map(|m| match m {
            NfTablesMessage::NewTable(t) => t.attributes.as_slice(),
            _ => &[],
        })
        .find_map(|a| match a {
            TableAttribute::Handle(h) => Some(*h),
            _ => None,
        }))
}

#[derive(Clone, Copy)]
enum Listing {
    Rules,
    Sets,
}

/// A dump of `table`'s rules (by chain) or sets (by name) as sorted (name, handle) pairs.
fn listing(
    nl: &mut Netlink,
    family: u8,
    table: &str,
    what: Listing,
) -> io::Result<Vec<(String, u64)>> {
    let get = match what {
        Listing::Rules => NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(table.into())],
        }),
        Listing::Sets => NfTablesMessage::GetSet(SetMessage {
            attributes: vec![SetAttribute::Table(table.into())],
        }),
    };
    let answers = nl.exchange(vec![(NLM_F_DUMP, request(family, get))])?;
    let mut out: Vec<(String, u64)> = one(answers)?
        .iter()
        .filter_map(|m| entry(m, table))
        .collect();
    out.sort();
    Ok(out)
}

/// (chain, handle) of a rule or (name, handle) of a set in `table`. Pure.
fn entry(msg: &NfTablesMessage, table: &str) -> Option<(String, u64)> {
    let (mut in_table, mut name, mut handle) = (false, None, None);
    match msg {
        NfTablesMessage::NewRule(r) => {
            for a in &r.attributes {
                match a {
                    RuleAttribute::Table(t) => in_table = t == table,
                    RuleAttribute::Chain(c) => name = Some(c.clone()),
                    RuleAttribute::Handle(h) => handle = Some(*h),
                    _ => {}
                }
            }
        }
        NfTablesMessage::NewSet(s) => {
            for a in &s.attributes {
                match a {
                    SetAttribute::Table(t) => in_table = t == table,
                    SetAttribute::Name(n) => name = Some(n.clone()),
                    SetAttribute::Handle(h) => handle = Some(*h),
                    _ => {}
                }
            }
        }
        _ => {}
    }
    // The kernel filters both dumps by table; the check keeps a foreign entry out anyway.
    Some((name.filter(|_| in_table)?, handle?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `msg` through the crate to bytes and back, as the kernel would send it.
    fn round_trip(msg: NfTablesMessage) -> NfTablesMessage {
        let mut nl = netlink_packet_core::NetlinkMessage::from(request(NFPROTO_IPV4, msg));
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        let back = netlink_packet_core::NetlinkMessage::<NetfilterMessage>::deserialize(&buf)
            .expect("decodes");
        match back.payload {
            netlink_packet_core::NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfTables(m),
                ..
            }) => m,
            other => panic!("not an nf_tables message: {other:?}"),
        }
    }

    #[test]
    fn rules_and_sets_of_the_table_give_their_handles() {
        let rule = |table: &str| {
            round_trip(NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(table.into()),
                    RuleAttribute::Chain("ep-1".into()),
                    RuleAttribute::Handle(7),
                ],
            }))
        };
        assert_eq!(entry(&rule("berth"), "berth"), Some(("ep-1".into(), 7)));
        assert_eq!(entry(&rule("other"), "berth"), None);
        let set = round_trip(NfTablesMessage::NewSet(SetMessage {
            attributes: vec![
                SetAttribute::Table("berth".into()),
                SetAttribute::Name("lb-addresses".into()),
                SetAttribute::Handle(1 << 40),
            ],
        }));
        assert_eq!(entry(&set, "berth"), Some(("lb-addresses".into(), 1 << 40)));
        let nameless = round_trip(NfTablesMessage::NewSet(SetMessage {
            attributes: vec![SetAttribute::Table("berth".into())],
        }));
        assert_eq!(entry(&nameless, "berth"), None);
    }

    #[test]
    fn differences_are_described() {
        let t = |h: Option<u64>, rules: &[(&str, u64)]| Fingerprint {
            tables: vec![(
                NFPROTO_IPV4,
                h,
                rules.iter().map(|(c, h)| (c.to_string(), *h)).collect(),
                Vec::new(),
            )],
        };
        let base = t(Some(1), &[("services", 3)]);
        assert_eq!(t(None, &[]).difference(&base), "table ip is gone");
        assert_eq!(t(Some(2), &[]).difference(&base), "table ip was replaced");
        assert!(
            t(Some(1), &[])
                .difference(&base)
                .starts_with("rules of table ip changed")
        );
        assert_eq!(base.difference(&base), "");
    }

    fn nft(input: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        assert!(child.wait().expect("nft").success(), "nft -f: {input}");
    }

    /// Against the real kernel, in a network namespace of this thread's own (needs root,
    /// like the rest of `make test`): one generation step per `nft -f`, and the
    /// fingerprint follows rule, set and table changes but not element changes.
    #[test]
    fn generation_and_fingerprint_follow_the_kernel() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread only; the thread ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let empty = fingerprint("berth").expect("fingerprint");
            assert!(empty.tables.iter().all(|t| t.1.is_none()));
            let g0 = generation().expect("generation");
            nft(
                "table ip berth { set s { type ipv4_addr; }; chain c { ip daddr @s drop; }; }\n\
                 table ip6 berth { chain c { drop; }; }\n",
            );
            assert_eq!(generation().expect("generation"), g0.wrapping_add(1));
            let made = fingerprint("berth").expect("fingerprint");
            assert_eq!(made.tables[0].2.len(), 1, "{made:?}");
            assert_eq!(made.tables[0].3.len(), 1, "{made:?}");
            assert!(made.tables[1].1.is_some());
            nft("add element ip berth s { 10.0.0.1 }\n");
            assert_eq!(fingerprint("berth").expect("fingerprint"), made);
            nft("add rule ip berth c drop\n");
            let more = fingerprint("berth").expect("fingerprint");
            assert!(
                more.difference(&made)
                    .starts_with("rules of table ip changed")
            );
            nft("delete table ip berth\n");
            let gone = fingerprint("berth").expect("fingerprint");
            assert_eq!(gone.difference(&made), "table ip is gone");
        })
        .join()
        .expect("netns thread");
    }

    /// berth's own full ruleset (every kind of rule the agent writes, both families)
    /// decodes through the crate: a rule it could not read would blind the drift check.
    #[test]
    fn berths_own_ruleset_fingerprints() {
        use crate::proxy::model::fixtures::ip;
        use crate::proxy::model::{Endpoint, Model, NodeFacts, Protocol, Service, Slice};
        use crate::proxy::ruleset::{all_rules, full_transaction, protect};

        let mut node = NodeFacts::test("n1", "198.18.1.10");
        node.addresses.push(ip("fd00:18::10"));
        let mut web = Service::test("default", "web", "10.96.0.10")
            .with_port("http", Protocol::Tcp, 80)
            .with_node_port(30080);
        web.load_balancer_ips = vec![ip("198.19.8.5")];
        web.external_ips = vec![ip("203.0.113.7")];
        web.source_ranges = vec!["198.18.0.0/16".parse().expect("cidr")];
        web.affinity_timeout = Some(600);
        web.external_local = true;
        web.health_check_node_port = Some(31000);
        let mut dns =
            Service::test("kube-system", "dns", "fd00:96::a").with_port("dns", Protocol::Udp, 53);
        dns.internal_local = true;
        let model = Model::test(node.clone())
            .with_slice(
                "web-1",
                Slice::test(&web)
                    .with_port("http", Protocol::Tcp, 8080)
                    .with(Endpoint::test("10.244.1.5", "n1"))
                    .with(Endpoint::test("10.244.2.5", "n2")),
            )
            .with_slice(
                "dns-1",
                Slice::test(&dns)
                    .with_port("dns", Protocol::Udp, 5353)
                    .with(Endpoint::test("fd00:244::5", "n1")),
            )
            .with_service(web.clone())
            .with_service(dns);
        let mut rules = all_rules(&model);
        if let Some(r) = rules.get_mut(&web.id) {
            protect(r, web.load_balancer_ips.clone(), &node);
        }
        let transaction = full_transaction(&node, &rules);
        std::thread::spawn(move || {
            // SAFETY: unshare(2) of this thread only; the thread ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            nft(&transaction);
            let print = fingerprint(crate::proxy::ruleset::TABLE).expect("fingerprint");
            for t in &print.tables {
                assert!(t.1.is_some() && !t.2.is_empty() && !t.3.is_empty(), "{t:?}");
            }
            nft(&transaction);
            let again = fingerprint(crate::proxy::ruleset::TABLE).expect("fingerprint");
            assert!(again.difference(&print).contains("was replaced"));
        })
        .join()
        .expect("netns thread");
    }
}
