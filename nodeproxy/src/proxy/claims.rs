//! Which Service may have which frontend (`address . protocol . port`): the step between
//! the Services as the API holds them and the model the ruleset is computed from. It
//! makes the model conflict-free, so no tenant takes another Service's traffic and no
//! pair of Services yields a ruleset nft refuses (e.g. overlapping source ranges of two
//! Services on one load-balancer address, which failed every full transaction):
//!
//! - a ClusterIP always wins: an externalIP or load-balancer IP equal to any ClusterIP
//!   is refused, and a duplicate ClusterIP stays with the oldest Service;
//! - externalIPs inside the service CIDRs, equal to any Node's address, inside a pool
//!   class's range, or outside `--external-ip-cidrs` are refused (load-balancer IPs are
//!   written by a controller, not by tenants, so only the first two ClusterIP rules
//!   apply to them);
//! - a Service over `--max-rules-per-service` is left out whole;
//! - among other equal claims the oldest Service (creationTimestamp, then uid) keeps
//!   the frontend. The ruleset cannot leave out one port of an address, so a Service
//!   losing one frontend on an address loses that address (every port on it); a lost
//!   NodePort is left out alone.
//!
//! Every refused or losing claim is a [`Refusal`] the agent reports as a Warning Event.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use berth_crds::addresses::AddressPool;

use crate::proxy::model::{Cidr, NodeFacts, Protocol, Service, ServiceId, Slice};

/// Default of `--max-rules-per-service`: see the README (about 30 MiB of agent memory).
pub const DEFAULT_MAX_RULES_PER_SERVICE: usize = 50_000;

/// The operator's rules for claims (flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// externalIPs must be inside one of these; empty refuses every externalIP.
    pub external_ip_cidrs: Vec<Cidr>,
    /// A Service whose [`rule_estimate`] exceeds this is not programmed.
    pub max_rules_per_service: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            external_ip_cidrs: Vec::new(),
            max_rules_per_service: DEFAULT_MAX_RULES_PER_SERVICE,
        }
    }
}

/// A Service's age for "oldest wins": creationTimestamp (seconds), then uid. A Service
/// without a timestamp counts as the newest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Age {
    pub created: Option<i64>,
    pub uid: String,
}

impl Age {
    fn key(&self) -> (bool, i64, &str) {
        (self.created.is_none(), self.created.unwrap_or(0), &self.uid)
    }
}

/// Why a claim was refused; the Event reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    ExternalIPRefused,
    LoadBalancerIPRefused,
    FrontendConflict,
    OverBudget,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::ExternalIPRefused,
        Reason::LoadBalancerIPRefused,
        Reason::FrontendConflict,
        Reason::OverBudget,
    ];

    /// The Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ExternalIPRefused => "ExternalIPRefused",
            Reason::LoadBalancerIPRefused => "LoadBalancerIPRefused",
            Reason::FrontendConflict => "FrontendConflict",
            Reason::OverBudget => "OverBudget",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::ExternalIPRefused => "external_ip",
            Reason::LoadBalancerIPRefused => "load_balancer_ip",
            Reason::FrontendConflict => "frontend_conflict",
            Reason::OverBudget => "over_budget",
        }
    }
}

/// One refused or losing claim of one Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

/// What the cluster looks like, beside the Services.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// This node: its NodePort addresses and the service CIDRs.
    pub node: &'a NodeFacts,
    /// Every Node's InternalIPs and ExternalIPs.
    pub node_addresses: &'a BTreeSet<IpAddr>,
    /// Pool classes by name.
    pub pools: &'a BTreeMap<String, AddressPool>,
    pub policy: &'a Policy,
}

/// One Service as the API holds it, with its age and size.
#[derive(Clone, Copy, Debug)]
pub struct Claimant<'a> {
    pub svc: &'a Service,
    pub age: &'a Age,
    pub rules: usize,
}

/// What becomes of a Service that cannot be programmed as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Left out whole.
    Skip,
    /// Programmed without the refused addresses and NodePorts.
    Trim(Box<Service>),
}

/// The outcome for every Service: only those not programmed as they are have a verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    pub verdicts: BTreeMap<ServiceId, Verdict>,
    pub refusals: BTreeMap<ServiceId, BTreeSet<Refusal>>,
}

impl Resolution {
    fn refuse(&mut self, id: &ServiceId, reason: Reason, message: String) {
        self.refusals
            .entry(id.clone())
            .or_default()
            .insert(Refusal { reason, message });
    }
}

/// How many map elements one Service adds on a node, roughly: each frontend of a port
/// has one element plus one per endpoint of that port (ports × endpoints × frontends).
pub fn rule_estimate<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a Slice> + Clone,
    node_addresses: usize,
) -> usize {
    let addresses = svc.cluster_ips.len() + svc.external_ips.len() + svc.load_balancer_ips.len();
    svc.ports.iter().fold(0usize, |total, port| {
        let frontends = addresses + port.node_port.map_or(0, |_| node_addresses);
        let endpoints: usize = slices
            .clone()
            .filter(|s| {
                s.ports
                    .iter()
                    .any(|p| p.name == port.name && p.protocol == port.protocol)
            })
            .map(|s| s.endpoints.len())
            .sum();
        total.saturating_add(frontends.saturating_mul(endpoints.saturating_add(1)))
    })
}

type Key = (IpAddr, Protocol, u16);

/// Decides every claim; oldest Service first.
pub fn resolve<'a>(claimants: impl IntoIterator<Item = Claimant<'a>>, ctx: &Context) -> Resolution {
    let mut order: Vec<Claimant<'a>> = claimants.into_iter().collect();
    order.sort_by(|a, b| (a.age.key(), &a.svc.id).cmp(&(b.age.key(), &b.svc.id)));
    let mut out = Resolution::default();
    // Every ClusterIP counts, also those of Services left out: no one else may take it.
    let mut cluster_owner: HashMap<IpAddr, &'a ServiceId> = HashMap::new();
    // Services are copied only when something of theirs is refused (rarely).
    let mut kept: Vec<(&'a ServiceId, Cow<'a, Service>)> = Vec::with_capacity(order.len());
    for c in &order {
        let id = &c.svc.id;
        let lost: Vec<IpAddr> = c
            .svc
            .cluster_ips
            .iter()
            .filter(|ip| cluster_owner.get(*ip).is_some_and(|o| *o != id))
            .copied()
            .collect();
        for ip in &lost {
            let owner = cluster_owner
                .get(ip)
                .map(|o| o.to_string())
                .unwrap_or_default();
            out.refuse(
                id,
                Reason::FrontendConflict,
                format!("clusterIP {ip} is already Service {owner}'s"),
            );
        }
        for ip in &c.svc.cluster_ips {
            cluster_owner.entry(*ip).or_insert(id);
        }
        let mut svc = Cow::Borrowed(c.svc);
        if !lost.is_empty() {
            svc.to_mut().cluster_ips.retain(|ip| !lost.contains(ip));
        }
        if c.rules > ctx.policy.max_rules_per_service {
            out.refuse(
                id,
                Reason::OverBudget,
                format!(
                    "not programmed: about {} rules (ports x endpoints x frontends) exceed \
                     the agent's --max-rules-per-service={}",
                    c.rules, ctx.policy.max_rules_per_service
                ),
            );
            out.verdicts.insert(id.clone(), Verdict::Skip);
        } else {
            kept.push((id, svc));
        }
    }
    let mut claimed: HashMap<Key, &'a ServiceId> = HashMap::new();
    for (id, mut svc) in kept {
        dedup_ports(&mut svc);
        refuse_addresses(&mut svc, &cluster_owner, ctx, &mut out);
        claim_addresses(id, &mut svc, &mut claimed, &mut out);
        claim_node_ports(id, &mut svc, ctx.node, &mut claimed, &mut out);
        if let Cow::Owned(svc) = svc {
            out.verdicts
                .insert(id.clone(), Verdict::Trim(Box::new(svc)));
        }
    }
    out
}

/// Keeps the first of ports with the same protocol and number (the API forbids them;
/// the ruleset could not tell them apart).
fn dedup_ports(svc: &mut Cow<'_, Service>) {
    let distinct: BTreeSet<(Protocol, u16)> =
        svc.ports.iter().map(|p| (p.protocol, p.port)).collect();
    if distinct.len() != svc.ports.len() {
        let mut seen = BTreeSet::new();
        svc.to_mut()
            .ports
            .retain(|p| seen.insert((p.protocol, p.port)));
    }
}

/// Why an address of `svc` may not be claimed at all; `None` when it may.
fn address_refusal(
    ip: &IpAddr,
    external: bool,
    svc: &ServiceId,
    cluster_owner: &HashMap<IpAddr, &ServiceId>,
    ctx: &Context,
) -> Option<String> {
    if let Some(owner) = cluster_owner.get(ip) {
        let whose = if **owner == *svc {
            "this Service's own".to_string()
        } else {
            format!("Service {owner}'s")
        };
        return Some(format!("{ip} is {whose} clusterIP"));
    }
    if let Some(cidr) = ctx.node.service_cidrs.iter().find(|c| c.contains(ip)) {
        return Some(format!("{ip} is inside the service CIDR {cidr}"));
    }
    if !external {
        return None;
    }
    if ctx.node_addresses.contains(ip) || ctx.node.addresses.contains(ip) {
        return Some(format!("{ip} is a node address"));
    }
    if let Some((class, _)) = ctx.pools.iter().find(|(_, p)| p.contains(ip)) {
        return Some(format!(
            "{ip} is inside the range of pool LoadBalancerClass {class}"
        ));
    }
    if !ctx.policy.external_ip_cidrs.iter().any(|c| c.contains(ip)) {
        return Some(if ctx.policy.external_ip_cidrs.is_empty() {
            format!("{ip}: externalIPs are turned off on this cluster (--external-ip-cidrs)")
        } else {
            format!("{ip} is outside the allowed --external-ip-cidrs")
        });
    }
    None
}

/// Drops the externalIPs and load-balancer IPs no Service may claim (and repeated ones).
fn refuse_addresses(
    svc: &mut Cow<'_, Service>,
    cluster_owner: &HashMap<IpAddr, &ServiceId>,
    ctx: &Context,
    out: &mut Resolution,
) {
    for external in [true, false] {
        let list = if external {
            &svc.external_ips
        } else {
            &svc.load_balancer_ips
        };
        let mut keep: Vec<IpAddr> = Vec::with_capacity(list.len());
        for ip in list {
            if keep.contains(ip) {
                continue;
            }
            match address_refusal(ip, external, &svc.id, cluster_owner, ctx) {
                None => keep.push(*ip),
                Some(why) => {
                    let (reason, what) = if external {
                        (Reason::ExternalIPRefused, "externalIP")
                    } else {
                        (Reason::LoadBalancerIPRefused, "load-balancer IP")
                    };
                    out.refuse(&svc.id, reason, format!("{what} refused: {why}"));
                }
            }
        }
        if keep.len() != list.len() {
            let s = svc.to_mut();
            *(if external {
                &mut s.external_ips
            } else {
                &mut s.load_balancer_ips
            }) = keep;
        }
    }
}

/// Claims the frontends of each external address, or drops the address when an older
/// Service holds one of them.
fn claim_addresses<'a>(
    id: &'a ServiceId,
    svc: &mut Cow<'_, Service>,
    claimed: &mut HashMap<Key, &'a ServiceId>,
    out: &mut Resolution,
) {
    let addrs: BTreeSet<IpAddr> = svc
        .external_ips
        .iter()
        .chain(&svc.load_balancer_ips)
        .copied()
        .collect();
    let mut lost = BTreeSet::new();
    for addr in addrs {
        let keys = || svc.ports.iter().map(move |p| (addr, p.protocol, p.port));
        let taken = keys().find_map(|k| claimed.get(&k).filter(|o| **o != id).map(|o| (k, *o)));
        match taken {
            Some(((ip, proto, port), owner)) => {
                out.refuse(
                    id,
                    Reason::FrontendConflict,
                    format!(
                        "{ip} {}/{port} is already served for the older Service {owner}; \
                         this Service's address {ip} is left out",
                        proto.nft()
                    ),
                );
                lost.insert(addr);
            }
            None => claimed.extend(keys().map(|k| (k, id))),
        }
    }
    if !lost.is_empty() {
        let s = svc.to_mut();
        s.external_ips.retain(|ip| !lost.contains(ip));
        s.load_balancer_ips.retain(|ip| !lost.contains(ip));
    }
}

/// Claims this node's NodePort frontends, or drops a NodePort an older Service holds.
fn claim_node_ports<'a>(
    id: &'a ServiceId,
    svc: &mut Cow<'_, Service>,
    node: &NodeFacts,
    claimed: &mut HashMap<Key, &'a ServiceId>,
    out: &mut Resolution,
) {
    let mut lost = Vec::new();
    for (i, port) in svc.ports.iter().enumerate() {
        let Some(np) = port.node_port else {
            continue;
        };
        let keys = || node.addresses.iter().map(move |a| (*a, port.protocol, np));
        match keys().find_map(|k| claimed.get(&k).filter(|o| **o != id)) {
            Some(owner) => {
                out.refuse(
                    id,
                    Reason::FrontendConflict,
                    format!(
                        "nodePort {}/{np} is already served for the older Service {owner}",
                        port.protocol.nft()
                    ),
                );
                lost.push(i);
            }
            None => claimed.extend(keys().map(|k| (k, id))),
        }
    }
    if !lost.is_empty() {
        let s = svc.to_mut();
        for i in lost {
            s.ports[i].node_port = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::Endpoint;
    use crate::proxy::model::fixtures::*;
    use crate::proxy::ruleset::{self, ElemKey, MapName};
    use rand::{Rng, SeedableRng};

    fn node() -> NodeFacts {
        NodeFacts::test("n1", "198.18.1.10")
    }

    fn age(created: i64, uid: &str) -> Age {
        Age {
            created: Some(created),
            uid: uid.into(),
        }
    }

    fn allow_all() -> Policy {
        Policy {
            external_ip_cidrs: vec!["0.0.0.0/0".parse().expect("cidr")],
            ..Policy::default()
        }
    }

    fn run(services: &[(Service, Age)], policy: &Policy, pools: &[(&str, &str)]) -> Resolution {
        let node = node();
        let nodes = BTreeSet::from([ip("198.18.1.10"), ip("198.18.1.11")]);
        let pools: BTreeMap<String, AddressPool> = pools
            .iter()
            .map(|(n, r)| ((*n).to_string(), AddressPool::parse(&[*r]).expect("pool")))
            .collect();
        let ctx = Context {
            node: &node,
            node_addresses: &nodes,
            pools: &pools,
            policy,
        };
        resolve(
            services
                .iter()
                .map(|(svc, age)| Claimant { svc, age, rules: 1 }),
            &ctx,
        )
    }

    fn reasons(r: &Resolution, ns: &str, name: &str) -> Vec<Reason> {
        r.refusals
            .get(&ServiceId::new(ns, name))
            .into_iter()
            .flatten()
            .map(|f| f.reason)
            .collect()
    }

    fn effective(r: &Resolution, svc: &Service) -> Option<Service> {
        match r.verdicts.get(&svc.id) {
            None => Some(svc.clone()),
            Some(Verdict::Skip) => None,
            Some(Verdict::Trim(s)) => Some((**s).clone()),
        }
    }

    #[test]
    fn external_ip_on_a_cluster_ip_is_refused_and_the_cluster_ip_kept() {
        let dns =
            Service::test("kube-system", "kube-dns", "10.96.0.10").with_port("", Protocol::Udp, 53);
        let mut evil = Service::test("aaa", "evil", "10.96.5.5").with_port("", Protocol::Udp, 53);
        evil.external_ips = vec![ip("10.96.0.10")];
        let r = run(
            &[(dns.clone(), age(200, "b")), (evil.clone(), age(100, "a"))],
            &allow_all(),
            &[],
        );
        assert!(!r.verdicts.contains_key(&dns.id));
        assert_eq!(reasons(&r, "aaa", "evil"), vec![Reason::ExternalIPRefused]);
        let e = effective(&r, &evil).expect("kept");
        assert!(e.external_ips.is_empty());
        assert_eq!(e.cluster_ips, evil.cluster_ips, "its own ClusterIP stays");
    }

    #[test]
    fn external_ips_in_service_cidr_node_pool_or_outside_the_allowlist_are_refused() {
        let mut s = Service::test("ns", "s", "10.96.0.1").with_port("", Protocol::Tcp, 80);
        s.external_ips = [
            "10.96.200.1",
            "198.18.1.11",
            "198.19.0.7",
            "203.0.113.9",
            "192.0.2.1",
        ]
        .map(ip)
        .to_vec();
        let policy = Policy {
            external_ip_cidrs: vec!["192.0.2.0/24".parse().expect("cidr")],
            ..Policy::default()
        };
        let r = run(
            &[(s.clone(), age(1, "a"))],
            &policy,
            &[("lan", "198.19.0.0/24")],
        );
        let e = effective(&r, &s).expect("kept");
        assert_eq!(e.external_ips, vec![ip("192.0.2.1")]);
        assert_eq!(r.refusals[&s.id].len(), 4, "{:?}", r.refusals);
        let off = run(&[(s.clone(), age(1, "a"))], &Policy::default(), &[]);
        assert!(effective(&off, &s).expect("kept").external_ips.is_empty());
    }

    #[test]
    fn load_balancer_ip_on_a_cluster_ip_is_refused_but_pool_addresses_are_fine() {
        let a = Service::test("ns", "a", "10.96.0.1").with_port("", Protocol::Tcp, 80);
        let mut b = Service::test("ns", "b", "10.96.0.2").with_port("", Protocol::Tcp, 80);
        b.load_balancer_ips = vec![ip("10.96.0.1"), ip("198.19.0.7")];
        let r = run(
            &[(a, age(2, "a")), (b.clone(), age(1, "b"))],
            &allow_all(),
            &[("lan", "198.19.0.0/24")],
        );
        assert_eq!(
            effective(&r, &b).expect("kept").load_balancer_ips,
            vec![ip("198.19.0.7")]
        );
        assert_eq!(reasons(&r, "ns", "b"), vec![Reason::LoadBalancerIPRefused]);
    }

    #[test]
    fn the_oldest_claim_wins_not_the_alphabetical_one() {
        let lb = ip("198.19.0.7");
        let mut older = Service::test("zzz", "late-name", "10.96.0.1")
            .with_port("", Protocol::Tcp, 80)
            .with_port("tls", Protocol::Tcp, 443);
        older.load_balancer_ips = vec![lb];
        let mut newer = Service::test("aaa", "early-name", "10.96.0.2")
            .with_port("", Protocol::Tcp, 80)
            .with_port("other", Protocol::Tcp, 8080);
        newer.load_balancer_ips = vec![lb];
        let mut third = Service::test("mmm", "x", "10.96.0.3").with_port("", Protocol::Tcp, 8080);
        third.load_balancer_ips = vec![lb];
        let services = [
            (newer.clone(), age(50, "a")),
            (older.clone(), age(10, "z")),
            (third.clone(), age(60, "m")),
        ];
        let r = run(&services, &allow_all(), &[]);
        assert_eq!(effective(&r, &older), Some(older));
        assert!(
            effective(&r, &newer)
                .expect("kept")
                .load_balancer_ips
                .is_empty()
        );
        assert_eq!(
            reasons(&r, "aaa", "early-name"),
            vec![Reason::FrontendConflict]
        );
        assert_eq!(
            effective(&r, &third),
            Some(third),
            "the address the loser gave up stays free for the next claim"
        );
        let same_time = run(
            &[
                (newer.clone(), age(10, "b")),
                (services[1].0.clone(), age(10, "a")),
            ],
            &allow_all(),
            &[],
        );
        assert_eq!(
            reasons(&same_time, "aaa", "early-name"),
            vec![Reason::FrontendConflict]
        );
    }

    #[test]
    fn over_budget_services_are_skipped_whole() {
        let node = node();
        let nodes = BTreeSet::new();
        let pools = BTreeMap::new();
        let policy = Policy {
            max_rules_per_service: 1000,
            ..allow_all()
        };
        let ctx = Context {
            node: &node,
            node_addresses: &nodes,
            pools: &pools,
            policy: &policy,
        };
        let mut big = Service::test("ns", "big", "10.96.0.1");
        for p in 1..=20 {
            big = big.with_port(&format!("p{p}"), Protocol::Tcp, p);
        }
        let mut slice = Slice::test(&big);
        for p in 1..=20 {
            slice = slice.with_port(&format!("p{p}"), Protocol::Tcp, p);
        }
        for i in 0..50 {
            slice = slice.with(Endpoint::test(&format!("10.244.1.{i}"), "n1"));
        }
        let rules = rule_estimate(&big, [&slice].into_iter(), 1);
        assert_eq!(rules, 20 * 51);
        let small = Service::test("ns", "small", "10.96.0.2").with_port("", Protocol::Tcp, 80);
        let a = age(1, "a");
        let r = resolve(
            [
                Claimant {
                    svc: &big,
                    age: &a,
                    rules,
                },
                Claimant {
                    svc: &small,
                    age: &a,
                    rules: 2,
                },
            ],
            &ctx,
        );
        assert_eq!(r.verdicts.get(&big.id), Some(&Verdict::Skip));
        assert!(!r.verdicts.contains_key(&small.id));
        assert_eq!(reasons(&r, "ns", "big"), vec![Reason::OverBudget]);
    }

    #[test]
    fn a_lost_node_port_is_left_out_alone() {
        let mut a = Service::test("ns", "a", "10.96.0.1").with_port("", Protocol::Tcp, 30080);
        a.load_balancer_ips = vec![ip("198.18.1.10")];
        let b = Service::test("ns", "b", "10.96.0.2")
            .with_port("", Protocol::Tcp, 80)
            .with_node_port(30080);
        let r = run(
            &[(a, age(1, "a")), (b.clone(), age(2, "b"))],
            &allow_all(),
            &[],
        );
        let e = effective(&r, &b).expect("kept");
        assert_eq!(e.ports[0].node_port, None);
        assert_eq!(e.cluster_ips, b.cluster_ips);
    }

    fn random_service(r: &mut rand::rngs::StdRng, i: usize) -> (Service, Age) {
        let pick = |r: &mut rand::rngs::StdRng| -> IpAddr {
            let all = [
                "10.96.0.1",
                "10.96.0.2",
                "10.96.0.3",
                "198.19.0.1",
                "198.19.0.2",
                "198.18.1.10",
                "198.18.1.11",
                "203.0.113.1",
                "203.0.113.2",
                "fd00::1",
            ];
            ip(all[r.random_range(0..all.len())])
        };
        let mut s = Service::test("ns", &format!("s{i}"), "10.96.0.1");
        s.cluster_ips = (0..r.random_range(1..3)).map(|_| pick(r)).collect();
        s.external_ips = (0..r.random_range(0..3)).map(|_| pick(r)).collect();
        s.load_balancer_ips = (0..r.random_range(0..3)).map(|_| pick(r)).collect();
        for p in 0..r.random_range(1..4) {
            let proto = [Protocol::Tcp, Protocol::Udp][r.random_range(0..2)];
            s = s.with_port(&format!("p{p}"), proto, r.random_range(79..82));
            if r.random_bool(0.3) {
                s = s.with_node_port(r.random_range(30000..30003));
            }
        }
        s.source_ranges = (0..r.random_range(0..3))
            .map(|_| {
                let prefix = r.random_range(8..=32);
                Cidr::new(ip("198.18.77.1"), prefix).expect("cidr")
            })
            .collect();
        s.external_local = r.random_bool(0.3);
        s.affinity_timeout = r.random_bool(0.3).then(|| r.random_range(1..3));
        let a = Age {
            created: r.random_bool(0.9).then(|| r.random_range(0..5)),
            uid: format!("{}", r.random_range(0..3)),
        };
        (s, a)
    }

    /// Elements whose key names a frontend: two Services must never share one (shared
    /// ClusterIP and hairpin set elements mean the same for both).
    fn frontend_keyed(k: &ElemKey) -> bool {
        !matches!(k.map, MapName::ClusterIps | MapName::Hairpin)
    }

    #[test]
    fn the_model_never_holds_conflicting_frontends_for_hostile_services() {
        let mut r = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let services: Vec<(Service, Age)> = (0..r.random_range(2..8))
                .map(|i| random_service(&mut r, i))
                .collect();
            let res = run(&services, &allow_all(), &[("lan", "198.19.0.2")]);
            let mut owner: BTreeMap<ElemKey, ServiceId> = BTreeMap::new();
            let model_node = node();
            for (svc, _) in &services {
                let Some(e) = effective(&res, svc) else {
                    continue;
                };
                let slice = Slice::test(&e)
                    .with_port("p0", Protocol::Tcp, 8080)
                    .with(Endpoint::test("10.244.1.2", "n1"));
                let rules = ruleset::service_rules(&e, [&slice].into_iter(), &model_node);
                for k in rules.elements.keys().filter(|k| frontend_keyed(k)) {
                    if let Some(other) = owner.insert(k.clone(), e.id.clone()) {
                        assert_eq!(other, e.id, "{k:?} in two Services: {services:?}");
                    }
                }
                for ext in &e.external_ips {
                    assert!(!model_node.service_cidrs.iter().any(|c| c.contains(ext)));
                    assert!(
                        ![ip("198.19.0.2"), ip("198.18.1.10"), ip("198.18.1.11")].contains(ext)
                    );
                }
            }
            for id in res.refusals.keys() {
                assert!(
                    res.verdicts.contains_key(id),
                    "a refusal changes the Service"
                );
            }
        }
    }
}
