//! The model → nftables translation. One table `berth` per address family with a FIXED
//! set of chains: the number of chains never grows with Services or endpoints. Every
//! per-Service and per-endpoint fact is a map element, keyed on
//! `address . protocol . port` (a "frontend"):
//!
//! - `service-ips` / `service-nodeports` (verdict maps): frontend → `goto ep-N`, where N is
//!   the frontend's endpoint count and `ep-N` is a shared chain doing
//!   `dnat to daddr . l4proto . dport . numgen random mod N map @backends`;
//! - `backends`: frontend . index → endpoint address . port;
//! - `no-endpoints` (verdict map, filter hooks): frontend → reject or drop;
//! - sets for masquerading, hairpin, source ranges and session affinity.
//!
//! The one exception: IPv6 ClientIP affinity needs a set and a chain per endpoint (see
//! [`Affinity6`]), created by full syncs.
//!
//! Only typed values (addresses, numbers, protocol keywords) are ever written into nft
//! syntax; names of Services and ports stay in Rust, so no user string can inject rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::proxy::model::{
    Cidr, Endpoint, Family, Model, NodeFacts, Protocol, Service, ServiceId, ServicePort, Slice,
    Topology,
};

pub const TABLE: &str = "berth";
/// Packet mark bit asking the postrouting chain to masquerade.
pub const MASQ_MARK: u32 = 0x4000;
/// `ep-1` to `ep-PRECREATED_LB_CHAINS` exist in every table: nft 1.0.6 cannot add a rule
/// using the `backends` map (its key is a `typeof ... numgen` concatenation) to a table
/// already in the kernel, so larger endpoint counts are added only by full syncs.
pub const PRECREATED_LB_CHAINS: usize = 64;
/// Connection-mark flag of a connection to a frontend with ClientIP affinity.
const AFFINITY_FLAG: u32 = 0x0100_0000;

/// A map or set of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    ServiceIps,
    ServiceNodeports,
    /// ETP=Local external frontends → cluster-wide balancing, for pods and the node itself.
    ServiceIpsInternal,
    NoEndpoints,
    Backends,
    BackendsInternal,
    InternalShortcut,
    ClusterIps,
    ExternalMasq,
    Hairpin,
    FirewallFrontends,
    FirewallAllow,
    AffinityIds,
    /// Frontends (address . connection mark) whose affinity lasts this many seconds.
    AffinityTimeout(u32),
    /// Pool addresses: traffic to them that no Service frontend took is dropped.
    LbAddresses,
}

impl MapName {
    pub fn name(self) -> String {
        match self {
            MapName::ServiceIps => "service-ips".into(),
            MapName::ServiceNodeports => "service-nodeports".into(),
            MapName::ServiceIpsInternal => "service-ips-internal".into(),
            MapName::BackendsInternal => "backends-internal".into(),
            MapName::InternalShortcut => "internal-shortcut".into(),
            MapName::NoEndpoints => "no-endpoints".into(),
            MapName::Backends => "backends".into(),
            MapName::ClusterIps => "cluster-ips".into(),
            MapName::ExternalMasq => "external-masq".into(),
            MapName::Hairpin => "hairpin".into(),
            MapName::FirewallFrontends => "firewall-frontends".into(),
            MapName::FirewallAllow => "firewall-allow".into(),
            MapName::AffinityIds => "affinity-ids".into(),
            MapName::AffinityTimeout(t) => format!("affinity-timeout-{t}"),
            MapName::LbAddresses => "lb-addresses".into(),
        }
    }

    fn is_map(self) -> bool {
        matches!(
            self,
            MapName::ServiceIps
                | MapName::ServiceNodeports
                | MapName::ServiceIpsInternal
                | MapName::NoEndpoints
                | MapName::Backends
                | MapName::BackendsInternal
                | MapName::AffinityIds
        )
    }

    /// Its declaration inside `table <family> berth { ... }`.
    fn declaration(self, f: Family) -> String {
        let a = addr_type(f);
        let ip = ip_kw(f);
        let frontend = format!("{a} . inet_proto . inet_service");
        let body = match self {
            MapName::ServiceIps
            | MapName::ServiceNodeports
            | MapName::ServiceIpsInternal
            | MapName::NoEndpoints => {
                format!("type {frontend} : verdict;")
            }
            MapName::Backends | MapName::BackendsInternal => format!(
                "typeof {ip} daddr . meta l4proto . th dport . numgen random mod 1 : {ip} daddr . th dport;"
            ),
            MapName::ClusterIps | MapName::LbAddresses => format!("type {a};"),
            MapName::ExternalMasq | MapName::FirewallFrontends | MapName::InternalShortcut => {
                format!("type {frontend};")
            }
            MapName::Hairpin => format!("type {a} . {a};"),
            MapName::FirewallAllow => format!("type {frontend} . {a}; flags interval;"),
            MapName::AffinityIds => format!("type {frontend} : mark;"),
            MapName::AffinityTimeout(_) => format!("type {a} . mark;"),
        };
        let kind = if self.is_map() { "map" } else { "set" };
        format!("  {kind} {} {{ {body} }}\n", self.name())
    }
}

/// One element of one map/set of one table. The key is already nft syntax built from
/// typed values only.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ElemKey {
    pub family: Family,
    pub map: MapName,
    pub key: String,
}

/// A Service address, protocol and port that traffic is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl Frontend {
    fn key(&self) -> String {
        format!("{} . {} . {}", self.addr, self.protocol.nft(), self.port)
    }

    /// Connection mark identifying this frontend's protocol and port (with its address,
    /// which the affinity map keys on separately, it is unique).
    fn affinity_mark(&self) -> u32 {
        let proto: u32 = match self.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        };
        AFFINITY_FLAG | (proto << 16) | u32::from(self.port)
    }
}

/// The ETP=Local health check a Service needs on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub local_endpoints: usize,
}

/// Everything one Service contributes to the tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Element → its value (`None` for set elements).
    pub elements: BTreeMap<ElemKey, Option<String>>,
    /// `ep-N` chains its frontends jump to.
    pub lb_chains: BTreeSet<(Family, usize)>,
    /// `epi-N` chains (cluster-wide balancing of ETP=Local frontends for internal sources).
    pub internal_chains: BTreeSet<(Family, usize)>,
    /// ClientIP affinity timeouts it uses.
    pub timeouts: BTreeSet<(Family, u32)>,
    /// Endpoints behind each UDP frontend (stale conntrack entries are deleted on change).
    pub udp_endpoints: BTreeMap<Frontend, BTreeSet<IpAddr>>,
    /// Whether some frontend has ClientIP affinity.
    pub affinity: bool,
    pub health_check: Option<HealthCheck>,
    /// IPv6 ClientIP affinity: its per-endpoint sets and chains.
    pub affinity6: Affinity6,
}

/// IPv6 ClientIP affinity in the layout of kube-proxy's nftables mode, the only one nft
/// 1.0.6 writes correctly (its dynamic updates store keys of 16 bytes intact, longer or
/// concatenated ones corrupted): one set of client addresses per (Service port,
/// endpoint), refreshed by that endpoint's chain before it DNATs; the Service port's
/// chain first sends a client found in one of its endpoints' sets there, then picks at
/// random. Names are built from addresses, protocols and ports only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Affinity6 {
    /// Set name → its timeout in seconds.
    pub sets: BTreeMap<String, u32>,
    /// Chain name → its rules.
    pub chains: BTreeMap<String, Vec<String>>,
}

impl Affinity6 {
    /// Adds the chains of one Service port's frontends balancing over `eps` (`tag` tells
    /// the endpoint lists of one port apart: all, or this node's) and returns the name
    /// of the chain to `goto`. `port_id` names the Service port (address, protocol, port).
    fn add(
        &mut self,
        port_id: &str,
        tag: &str,
        eps: &[(IpAddr, u16)],
        aff: (Protocol, u32),
    ) -> String {
        let (proto, secs) = aff;
        let mut checks = Vec::new();
        let mut picks = Vec::new();
        for (i, (addr, p)) in eps.iter().enumerate() {
            let ep_id = format!("{port_id}-{}-{p}", addr_hex(addr));
            let set = format!("aff-{ep_id}");
            let chain = format!("affep-{ep_id}");
            self.sets.insert(set.clone(), secs);
            self.chains.insert(
                chain.clone(),
                vec![
                    format!("update @{set} {{ ip6 saddr }}"),
                    format!("meta l4proto {} dnat ip6 to [{addr}]:{p}", proto.nft()),
                ],
            );
            checks.push(format!("ip6 saddr @{set} goto {chain}"));
            picks.push(format!("{i} : goto {chain}"));
        }
        checks.push(format!(
            "numgen random mod {} vmap {{ {} }}",
            eps.len(),
            picks.join(", ")
        ));
        let name = format!("affsvc-{port_id}-{tag}");
        self.chains.insert(name.clone(), checks);
        name
    }

    /// `add` statements creating these sets and chains in the ip6 table (sets first:
    /// rules refer to them; all chains before any rule: rules jump between them).
    pub fn statements(&self) -> String {
        let mut out = String::new();
        for (set, secs) in &self.sets {
            let _ = writeln!(
                out,
                "add set ip6 {TABLE} {set} {{ type ipv6_addr; flags dynamic,timeout; timeout {secs}s; }}"
            );
        }
        for chain in self.chains.keys() {
            let _ = writeln!(out, "add chain ip6 {TABLE} {chain}");
        }
        for (chain, rules) in &self.chains {
            for r in rules {
                let _ = writeln!(out, "add rule ip6 {TABLE} {chain} {r}");
            }
        }
        out
    }
}

/// An address as hex digits, usable in set and chain names.
fn addr_hex(addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{:x}", u32::from(*a)),
        IpAddr::V6(a) => format!("{:x}", u128::from(*a)),
    }
}

impl ServiceRules {
    fn put(&mut self, family: Family, map: MapName, key: String, value: Option<String>) {
        self.elements
            .entry(ElemKey { family, map, key })
            .or_insert(value);
    }
}

/// An endpoint address and target port of one Service port.
#[derive(Clone, Debug)]
struct Candidate {
    ep: Endpoint,
    port: u16,
}

fn candidates<'a>(
    port: &ServicePort,
    slices: impl Iterator<Item = &'a Slice>,
    f: Family,
) -> Vec<Candidate> {
    let mut by_addr: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| Family::of(&e.addr) == f) {
            by_addr
                .entry((ep.addr, target.port))
                .and_modify(|seen| {
                    // The same address in two slices (mid-update): keep the better state.
                    if ep.ready && !seen.ready {
                        *seen = ep.clone();
                    }
                })
                .or_insert_with(|| ep.clone());
        }
    }
    by_addr
        .into_iter()
        .map(|((_, port), ep)| Candidate { ep, port })
        .collect()
}

/// Ready endpoints, or if there are none the serving-terminating ones (graceful
/// termination fallback); only this node's when `local_only`, else only those the
/// topology hints allow (see [`Topology`]).
fn select(cands: &[Candidate], local_only: bool, node: &NodeFacts) -> Vec<(IpAddr, u16)> {
    let topology = if local_only {
        Topology::Any
    } else {
        Topology::from_hints(cands.iter().map(|c| &c.ep), node)
    };
    let pool: Vec<&Candidate> = cands
        .iter()
        .filter(|c| !local_only || c.ep.node.as_deref() == Some(node.name.as_str()))
        .collect();
    let ready: Vec<_> = pool
        .iter()
        .filter(|c| c.ep.ready && topology.allows(&c.ep, node))
        .map(|c| (c.ep.addr, c.port))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    // As kube-proxy: hints were already ignored if no ready endpoint matched them, so
    // serving-terminating endpoints are taken from everywhere.
    pool.iter()
        .filter(|c| c.ep.serving && c.ep.terminating)
        .map(|c| (c.ep.addr, c.port))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cluster,
    External,
    NodePort,
}

/// The rules of one Service on this node.
pub fn service_rules<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a Slice> + Clone,
    node: &NodeFacts,
) -> ServiceRules {
    let mut out = ServiceRules::default();
    let mut local_addrs: BTreeSet<IpAddr> = BTreeSet::new();
    for f in [Family::V4, Family::V6] {
        let fam = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter().copied().filter(|i| Family::of(i) == f).collect()
        };
        let cluster_ips = fam(&svc.cluster_ips);
        let mut external = fam(&svc.external_ips);
        let lb_ips = fam(&svc.load_balancer_ips);
        external.extend(lb_ips.iter().copied());
        let node_addrs = fam(&node.addresses);
        for ip in &cluster_ips {
            out.put(f, MapName::ClusterIps, ip.to_string(), None);
        }
        for port in &svc.ports {
            let cands = candidates(port, slices.clone(), f);
            let all = select(&cands, false, node);
            let local = select(&cands, true, node);
            for c in cands
                .iter()
                .filter(|c| c.ep.node.as_deref() == Some(node.name.as_str()))
            {
                if all.contains(&(c.ep.addr, c.port)) || local.contains(&(c.ep.addr, c.port)) {
                    local_addrs.insert(c.ep.addr);
                }
            }
            // IPv6 affinity names its sets and chains after the Service port's first
            // address (every frontend of the port shares its clients' affinity).
            let aff6 = match (
                f,
                svc.affinity_timeout,
                cluster_ips.first().or(external.first()),
            ) {
                (Family::V6, Some(t), Some(a)) => Some((
                    format!("{}-{}-{}", addr_hex(a), port.protocol.nft(), port.port),
                    (port.protocol, t),
                )),
                _ => None,
            };
            let mut frontends: Vec<(Kind, Frontend)> = Vec::new();
            for ip in &cluster_ips {
                frontends.push((
                    Kind::Cluster,
                    Frontend {
                        addr: *ip,
                        protocol: port.protocol,
                        port: port.port,
                    },
                ));
            }
            for ip in &external {
                frontends.push((
                    Kind::External,
                    Frontend {
                        addr: *ip,
                        protocol: port.protocol,
                        port: port.port,
                    },
                ));
            }
            if let Some(np) = port.node_port {
                for ip in &node_addrs {
                    frontends.push((
                        Kind::NodePort,
                        Frontend {
                            addr: *ip,
                            protocol: port.protocol,
                            port: np,
                        },
                    ));
                }
            }
            for (kind, fe) in frontends {
                let local_only = match kind {
                    Kind::Cluster => svc.internal_local,
                    Kind::External | Kind::NodePort => svc.external_local,
                };
                let eps = if local_only { &local } else { &all };
                let key = fe.key();
                if kind != Kind::Cluster && !svc.external_local {
                    out.put(f, MapName::ExternalMasq, key.clone(), None);
                }
                if kind == Kind::External
                    && lb_ips.contains(&fe.addr)
                    && !svc.source_ranges.is_empty()
                {
                    out.put(f, MapName::FirewallFrontends, key.clone(), None);
                    for r in Cidr::minimal(&svc.source_ranges)
                        .iter()
                        .filter(|r| r.family() == f)
                    {
                        out.put(f, MapName::FirewallAllow, format!("{key} . {r}"), None);
                    }
                }
                if port.protocol == Protocol::Udp {
                    out.udp_endpoints
                        .insert(fe, eps.iter().map(|(a, _)| *a).collect());
                }
                // Pods and the node itself reach an ETP=Local frontend through every
                // endpoint, as kube-proxy does: only outside traffic is kept local.
                if kind != Kind::Cluster && svc.external_local && !all.is_empty() {
                    out.put(f, MapName::InternalShortcut, key.clone(), None);
                    if let Some((id, t)) = &aff6 {
                        let chain = out.affinity6.add(id, "all", &all, *t);
                        let verdict = Some(format!("goto {chain}"));
                        out.put(f, MapName::ServiceIpsInternal, key.clone(), verdict);
                    } else {
                        out.put(
                            f,
                            MapName::ServiceIpsInternal,
                            key.clone(),
                            Some(format!("goto epi-{}", all.len())),
                        );
                        out.internal_chains.insert((f, all.len()));
                        for (i, (addr, p)) in all.iter().enumerate() {
                            out.put(
                                f,
                                MapName::BackendsInternal,
                                format!("{key} . {i}"),
                                Some(format!("{addr} . {p}")),
                            );
                        }
                    }
                }
                if eps.is_empty() {
                    let verdict = if local_only && !all.is_empty() {
                        "drop"
                    } else {
                        "goto reject-chain"
                    };
                    out.put(f, MapName::NoEndpoints, key, Some(verdict.into()));
                    continue;
                }
                let map = if kind == Kind::NodePort {
                    MapName::ServiceNodeports
                } else {
                    MapName::ServiceIps
                };
                if let Some((id, t)) = &aff6 {
                    let tag = if local_only { "local" } else { "all" };
                    let chain = out.affinity6.add(id, tag, eps, *t);
                    out.put(f, map, key, Some(format!("goto {chain}")));
                    continue;
                }
                out.put(f, map, key.clone(), Some(format!("goto ep-{}", eps.len())));
                out.lb_chains.insert((f, eps.len()));
                for (i, (addr, p)) in eps.iter().enumerate() {
                    out.put(
                        f,
                        MapName::Backends,
                        format!("{key} . {i}"),
                        Some(format!("{addr} . {p}")),
                    );
                }
                // IPv6 affinity took its own path above ([`Affinity6`]).
                if let (Some(t), Family::V4) = (svc.affinity_timeout, f) {
                    let mark = fe.affinity_mark();
                    out.put(
                        f,
                        MapName::AffinityIds,
                        key.clone(),
                        Some(format!("0x{mark:08x}")),
                    );
                    out.put(
                        f,
                        MapName::AffinityTimeout(t),
                        format!("{} . 0x{mark:08x}", fe.addr),
                        None,
                    );
                    out.timeouts.insert((f, t));
                    out.affinity = true;
                }
            }
            // A pod reaching itself through a Service must be masqueraded (hairpin).
            for c in &cands {
                if c.ep.node.as_deref().is_none_or(|n| n == node.name) {
                    out.put(
                        f,
                        MapName::Hairpin,
                        format!("{} . {}", c.ep.addr, c.ep.addr),
                        None,
                    );
                }
            }
        }
    }
    if svc.external_local
        && let Some(port) = svc.health_check_node_port
    {
        out.health_check = Some(HealthCheck {
            port,
            local_endpoints: local_addrs.len(),
        });
    }
    out
}

/// Rules of every Service of the model.
pub fn all_rules(model: &Model) -> BTreeMap<ServiceId, ServiceRules> {
    model
        .services
        .iter()
        .map(|(id, svc)| {
            (
                id.clone(),
                service_rules(svc, model.slices_of(id), &model.node),
            )
        })
        .collect()
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn ip_kw(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

pub fn table_family(f: Family) -> &'static str {
    ip_kw(f)
}

/// The `ep-N` chain, inside a table block: pick one of N endpoints of the frontend at
/// random.
pub fn lb_chain(f: Family, n: usize, internal: bool) -> String {
    let ip = ip_kw(f);
    let (chain, map) = if internal {
        ("epi", MapName::BackendsInternal)
    } else {
        ("ep", MapName::Backends)
    };
    format!(
        "  chain {chain}-{n} {{ dnat {ip} to {ip} daddr . meta l4proto . th dport . numgen random mod {n} map @{}; }}\n",
        map.name()
    )
}

/// A set of frontends with ClientIP affinity of `secs` seconds, and the rule recording
/// new connections to them in the affinity map.
pub fn timeout_set(f: Family, secs: u32) -> String {
    let ip = ip_kw(f);
    let a = addr_type(f);
    let set = MapName::AffinityTimeout(secs).name();
    format!(
        "add set {ip} {TABLE} {set} {{ type {a} . mark; }}\n\
         add rule {ip} {TABLE} affinity-record ct state new ct mark != 0 ct original {ip} daddr . ct mark @{set} \
         update @affinity {{ ct original {ip} daddr . ct mark . {ip} saddr timeout {secs}s : {ip} daddr . th dport }}\n"
    )
}

/// Pool addresses only answer on their Services' frontends, and those are DNATed before
/// the input hook: what still reaches it addressed to a pool address is for a host
/// listener (sshd, the kubelet, this agent) and is dropped. Replies to the node's own
/// connections and their ICMP errors pass, and for IPv6 neighbour discovery (ARP, the
/// IPv4 equivalent, never passes through `ip` tables).
fn lb_address_check(f: Family) -> String {
    let nd = match f {
        Family::V4 => "",
        Family::V6 => " icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } return;",
    };
    format!(
        "  chain lb-address-check {{{nd} ct direction reply return; ct state related return; drop; }}\n"
    )
}

/// Marks `addrs` (a pool Service's load-balancer addresses) for [`lb_address_check`] in
/// the Service's rules. Node addresses are never marked: host listeners stay reachable on
/// them whatever a Service's status says.
pub fn protect(
    rules: &mut ServiceRules,
    addrs: impl IntoIterator<Item = IpAddr>,
    node: &NodeFacts,
) {
    for a in addrs {
        if !node.addresses.contains(&a) {
            rules.put(Family::of(&a), MapName::LbAddresses, a.to_string(), None);
        }
    }
}

/// The fixed part of one family's table: maps, sets and chains (no elements).
pub fn skeleton(
    f: Family,
    node: &NodeFacts,
    lb_chains: &BTreeSet<usize>,
    internal_chains: &BTreeSet<usize>,
) -> String {
    let ip = ip_kw(f);
    let a = addr_type(f);
    let mut s = String::new();
    let _ = writeln!(s, "table {ip} {TABLE} {{");
    for m in [
        MapName::ServiceIps,
        MapName::ServiceNodeports,
        MapName::ServiceIpsInternal,
        MapName::NoEndpoints,
        MapName::Backends,
        MapName::BackendsInternal,
        MapName::InternalShortcut,
        MapName::ClusterIps,
        MapName::ExternalMasq,
        MapName::Hairpin,
        MapName::FirewallFrontends,
        MapName::FirewallAllow,
        MapName::AffinityIds,
        MapName::LbAddresses,
    ] {
        s.push_str(&m.declaration(f));
    }
    let node_addrs: Vec<String> = node
        .addresses
        .iter()
        .filter(|i| Family::of(i) == f)
        .map(|i| i.to_string())
        .collect();
    let elems = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", v.join(", "))
        }
    };
    let _ = writeln!(
        s,
        "  set node-addresses {{ type {a};{} }}",
        elems(&node_addrs)
    );
    let _ = writeln!(
        s,
        "  map affinity {{ type {a} . mark . {a} : {a} . inet_service; flags dynamic,timeout; size 1048576; timeout 3h; }}"
    );
    let cidrs = |v: &[crate::proxy::model::Cidr]| -> Vec<String> {
        v.iter()
            .filter(|c| c.family() == f)
            .map(|c| c.to_string())
            .collect()
    };
    let cluster_cidrs = cidrs(&node.cluster_cidrs);
    let service_cidrs = cidrs(&node.service_cidrs);
    let _ = writeln!(
        s,
        "  chain reject-chain {{ meta l4proto tcp reject with tcp reset; reject; }}"
    );
    let _ = writeln!(
        s,
        "  chain mark-for-masquerade {{ meta mark set meta mark | 0x{MASQ_MARK:x}; }}"
    );
    let frontend = format!("{ip} daddr . meta l4proto . th dport");
    let mut services = String::new();
    if !cluster_cidrs.is_empty() {
        // Traffic to a ClusterIP from outside the pod network must come back the same way.
        let _ = write!(
            services,
            " {ip} daddr @cluster-ips {ip} saddr != {{ {} }} jump mark-for-masquerade;",
            cluster_cidrs.join(", ")
        );
    }
    // Internal sources (pods, the node itself) of ETP=Local external frontends.
    let mut internal_sources = vec!["fib saddr type local".to_string()];
    if !cluster_cidrs.is_empty() {
        internal_sources.insert(0, format!("{ip} saddr {{ {} }}", cluster_cidrs.join(", ")));
    }
    let mut shortcut_checks = String::new();
    for src in &internal_sources {
        let _ = write!(services, " {src} {frontend} vmap @service-ips-internal;");
        let _ = write!(
            shortcut_checks,
            " {src} {frontend} @internal-shortcut return;"
        );
    }
    let _ = write!(
        services,
        " {frontend} @external-masq jump mark-for-masquerade; \
         ct mark set {frontend} map @affinity-ids; \
         meta l4proto {{ tcp, udp, sctp }} ct mark != 0 dnat {ip} to {ip} daddr . ct mark . {ip} saddr map @affinity; \
         {frontend} vmap @service-ips; \
         {ip} daddr @node-addresses {frontend} vmap @service-nodeports;"
    );
    let _ = writeln!(s, "  chain services {{{services} }}");
    let _ = writeln!(
        s,
        "  chain firewall-check {{ {frontend} @firewall-frontends {frontend} . {ip} saddr != @firewall-allow drop; }}"
    );
    let _ = writeln!(
        s,
        "  chain endpoints-check {{{shortcut_checks} {frontend} vmap @no-endpoints; }}"
    );
    let mut cluster_check = format!(" {ip} daddr @cluster-ips reject;");
    if !service_cidrs.is_empty() {
        let _ = write!(
            cluster_check,
            " {ip} daddr {{ {} }} drop;",
            service_cidrs.join(", ")
        );
    }
    let _ = writeln!(s, "  chain cluster-ips-check {{{cluster_check} }}");
    let _ = writeln!(s, "  chain affinity-record {{ }}");
    s.push_str(&lb_address_check(f));
    let hook = |name: &str, kind: &str, hook: &str, prio: i32, body: &str| {
        format!(
            "  chain {name} {{ type {kind} hook {hook} priority {prio}; policy accept; {body} }}\n"
        )
    };
    s.push_str(&hook(
        "nat-prerouting",
        "nat",
        "prerouting",
        -100,
        "jump services;",
    ));
    s.push_str(&hook("nat-output", "nat", "output", -100, "jump services;"));
    s.push_str(&hook(
        "nat-postrouting",
        "nat",
        "postrouting",
        100,
        &format!(
            "ct status dnat {ip} saddr . {ip} daddr @hairpin masquerade; \
             meta mark & 0x{MASQ_MARK:x} == 0x{MASQ_MARK:x} meta mark set meta mark ^ 0x{MASQ_MARK:x} masquerade;"
        ),
    ));
    s.push_str(&hook(
        "filter-prerouting",
        "filter",
        "prerouting",
        -110,
        "ct state new jump firewall-check;",
    ));
    s.push_str(&hook(
        "filter-input",
        "filter",
        "input",
        -110,
        &format!(
            "ct state new jump endpoints-check; {ip} daddr @lb-addresses jump lb-address-check;"
        ),
    ));
    s.push_str(&hook(
        "filter-forward",
        "filter",
        "forward",
        -110,
        "ct state new jump endpoints-check; ct state new jump cluster-ips-check;",
    ));
    s.push_str(&hook(
        "filter-output",
        "filter",
        "output",
        -110,
        "ct state new jump firewall-check; ct state new jump endpoints-check;",
    ));
    s.push_str(&hook(
        "filter-output-post-dnat",
        "filter",
        "output",
        -90,
        "ct state new jump cluster-ips-check; ct state new jump affinity-record;",
    ));
    s.push_str(&hook(
        "filter-prerouting-post-dnat",
        "filter",
        "prerouting",
        -90,
        "ct state new jump affinity-record;",
    ));
    for (internal, extra) in [(false, lb_chains), (true, internal_chains)] {
        let beyond = extra.iter().copied().filter(|n| *n > PRECREATED_LB_CHAINS);
        for n in (1..=PRECREATED_LB_CHAINS).chain(beyond) {
            s.push_str(&lb_chain(f, n, internal));
        }
    }
    s.push_str("}\n");
    s
}

/// `add element` / `delete element` statements, one statement per map, in key order.
pub fn element_statements<'a>(
    verb: &str,
    elems: impl IntoIterator<Item = (&'a ElemKey, Option<&'a String>)>,
) -> String {
    let mut grouped: BTreeMap<(Family, MapName), Vec<String>> = BTreeMap::new();
    for (k, v) in elems {
        let text = match v {
            Some(v) if verb == "add" => format!("{} : {v}", k.key),
            _ => k.key.clone(),
        };
        grouped.entry((k.family, k.map)).or_default().push(text);
    }
    let mut out = String::new();
    for ((f, map), items) in grouped {
        // Bounded statement size keeps nft's parser memory flat at 100k elements.
        for chunk in items.chunks(4096) {
            let _ = writeln!(
                out,
                "{verb} element {} {TABLE} {} {{ {} }}",
                ip_kw(f),
                map.name(),
                chunk.join(", ")
            );
        }
    }
    out
}

/// The whole desired state as one transaction that replaces both tables atomically.
pub fn full_transaction(node: &NodeFacts, rules: &BTreeMap<ServiceId, ServiceRules>) -> String {
    let mut chains: BTreeSet<(Family, usize)> = BTreeSet::new();
    let mut internal: BTreeSet<(Family, usize)> = BTreeSet::new();
    let mut timeouts: BTreeSet<(Family, u32)> = BTreeSet::new();
    let mut elements: BTreeMap<&ElemKey, Option<&String>> = BTreeMap::new();
    for r in rules.values() {
        chains.extend(r.lb_chains.iter().copied());
        internal.extend(r.internal_chains.iter().copied());
        timeouts.extend(r.timeouts.iter().copied());
        for (k, v) in &r.elements {
            elements.entry(k).or_insert(v.as_ref());
        }
    }
    let mut out = String::new();
    for f in [Family::V4, Family::V6] {
        let ip = ip_kw(f);
        let _ = writeln!(out, "add table {ip} {TABLE}\ndelete table {ip} {TABLE}");
        let of = |set: &BTreeSet<(Family, usize)>| -> BTreeSet<usize> {
            set.iter()
                .filter(|(cf, _)| *cf == f)
                .map(|(_, n)| *n)
                .collect()
        };
        out.push_str(&skeleton(f, node, &of(&chains), &of(&internal)));
    }
    for (f, t) in &timeouts {
        out.push_str(&timeout_set(*f, *t));
    }
    let mut affinity6 = Affinity6::default();
    for r in rules.values() {
        affinity6.sets.extend(r.affinity6.sets.clone());
        affinity6.chains.extend(r.affinity6.chains.clone());
    }
    out.push_str(&affinity6.statements());
    out.push_str(&element_statements("add", elements));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::Slice;
    use crate::proxy::model::fixtures::ip;

    fn node() -> NodeFacts {
        NodeFacts::test("n1", "198.18.1.10")
    }

    fn web() -> Service {
        Service::test("ns", "web", "10.96.0.10")
            .with_port("http", Protocol::Tcp, 80)
            .with_node_port(30080)
    }

    fn rules_of(svc: &Service, slices: &[Slice]) -> ServiceRules {
        service_rules(svc, slices.iter(), &node())
    }

    fn value(r: &ServiceRules, map: MapName, key: &str) -> Option<String> {
        r.elements
            .get(&ElemKey {
                family: Family::V4,
                map,
                key: key.into(),
            })
            .cloned()
            .flatten()
    }

    fn has(r: &ServiceRules, map: MapName, key: &str) -> bool {
        r.elements.contains_key(&ElemKey {
            family: Family::V4,
            map,
            key: key.into(),
        })
    }

    fn slice(svc: &Service, eps: Vec<Endpoint>) -> Slice {
        eps.into_iter().fold(
            Slice::test(svc).with_port("http", Protocol::Tcp, 8080),
            Slice::with,
        )
    }

    #[test]
    fn cluster_ip_and_node_port_balance_over_ready_endpoints() {
        let svc = web();
        let r = rules_of(
            &svc,
            &[slice(
                &svc,
                vec![
                    Endpoint::test("10.244.2.3", "n2"),
                    Endpoint::test("10.244.1.2", "n1"),
                ],
            )],
        );
        assert_eq!(
            value(&r, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-2")
        );
        assert_eq!(
            value(&r, MapName::ServiceNodeports, "198.18.1.10 . tcp . 30080").as_deref(),
            Some("goto ep-2")
        );
        assert_eq!(
            value(&r, MapName::Backends, "10.96.0.10 . tcp . 80 . 0").as_deref(),
            Some("10.244.1.2 . 8080")
        );
        assert_eq!(
            value(&r, MapName::Backends, "10.96.0.10 . tcp . 80 . 1").as_deref(),
            Some("10.244.2.3 . 8080")
        );
        assert!(has(&r, MapName::ClusterIps, "10.96.0.10"));
        assert!(has(&r, MapName::ExternalMasq, "198.18.1.10 . tcp . 30080"));
        assert!(!has(&r, MapName::ExternalMasq, "10.96.0.10 . tcp . 80"));
        assert!(has(&r, MapName::Hairpin, "10.244.1.2 . 10.244.1.2"));
        assert!(!has(&r, MapName::Hairpin, "10.244.2.3 . 10.244.2.3"));
        assert_eq!(r.lb_chains, BTreeSet::from([(Family::V4, 2)]));
    }

    #[test]
    fn no_endpoints_rejects() {
        let svc = web();
        let r = rules_of(&svc, &[]);
        assert_eq!(
            value(&r, MapName::NoEndpoints, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto reject-chain")
        );
        assert!(!has(&r, MapName::ServiceIps, "10.96.0.10 . tcp . 80"));
        assert!(r.lb_chains.is_empty());
    }

    #[test]
    fn terminating_endpoints_are_a_fallback_only() {
        let svc = web();
        let both = rules_of(
            &svc,
            &[slice(
                &svc,
                vec![
                    Endpoint::test("10.244.1.2", "n1"),
                    Endpoint::test("10.244.2.2", "n2").terminating(),
                ],
            )],
        );
        assert_eq!(
            value(&both, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-1")
        );
        let only_term = rules_of(
            &svc,
            &[slice(
                &svc,
                vec![Endpoint::test("10.244.2.2", "n2").terminating()],
            )],
        );
        assert_eq!(
            value(&only_term, MapName::Backends, "10.96.0.10 . tcp . 80 . 0").as_deref(),
            Some("10.244.2.2 . 8080")
        );
        let mut not_serving = Endpoint::test("10.244.2.2", "n2").terminating();
        not_serving.serving = false;
        let none = rules_of(&svc, &[slice(&svc, vec![not_serving])]);
        assert!(has(&none, MapName::NoEndpoints, "10.96.0.10 . tcp . 80"));
    }

    #[test]
    fn external_local_uses_local_endpoints_drops_without_and_reports_health() {
        let mut svc = web();
        svc.external_local = true;
        svc.health_check_node_port = Some(32000);
        svc.load_balancer_ips = vec![ip("198.19.0.1")];
        let remote_only = rules_of(
            &svc,
            &[slice(&svc, vec![Endpoint::test("10.244.2.3", "n2")])],
        );
        assert_eq!(
            value(
                &remote_only,
                MapName::NoEndpoints,
                "198.18.1.10 . tcp . 30080"
            )
            .as_deref(),
            Some("drop")
        );
        assert_eq!(
            value(&remote_only, MapName::NoEndpoints, "198.19.0.1 . tcp . 80").as_deref(),
            Some("drop")
        );
        assert_eq!(
            value(&remote_only, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-1")
        );
        assert!(!has(
            &remote_only,
            MapName::ExternalMasq,
            "198.18.1.10 . tcp . 30080"
        ));
        // Pods and the node itself still reach it through every endpoint.
        assert!(has(
            &remote_only,
            MapName::InternalShortcut,
            "198.18.1.10 . tcp . 30080"
        ));
        assert_eq!(
            value(
                &remote_only,
                MapName::ServiceIpsInternal,
                "198.19.0.1 . tcp . 80"
            )
            .as_deref(),
            Some("goto epi-1")
        );
        assert_eq!(
            value(
                &remote_only,
                MapName::BackendsInternal,
                "198.19.0.1 . tcp . 80 . 0"
            )
            .as_deref(),
            Some("10.244.2.3 . 8080")
        );
        assert_eq!(
            remote_only.internal_chains,
            BTreeSet::from([(Family::V4, 1)])
        );
        assert!(!has(
            &remote_only,
            MapName::InternalShortcut,
            "10.96.0.10 . tcp . 80"
        ));
        assert_eq!(
            remote_only.health_check,
            Some(HealthCheck {
                port: 32000,
                local_endpoints: 0
            })
        );
        let with_local = rules_of(
            &svc,
            &[slice(
                &svc,
                vec![
                    Endpoint::test("10.244.2.3", "n2"),
                    Endpoint::test("10.244.1.5", "n1"),
                ],
            )],
        );
        assert_eq!(
            value(
                &with_local,
                MapName::Backends,
                "198.18.1.10 . tcp . 30080 . 0"
            )
            .as_deref(),
            Some("10.244.1.5 . 8080")
        );
        assert_eq!(
            value(&with_local, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-2")
        );
        assert_eq!(
            with_local.health_check,
            Some(HealthCheck {
                port: 32000,
                local_endpoints: 1
            })
        );
    }

    #[test]
    fn zone_hints_narrow_cluster_traffic_but_not_local_policies() {
        let mut svc = web();
        let zoned = NodeFacts {
            zone: Some("a".into()),
            ..node()
        };
        let eps = vec![
            Endpoint::test("10.244.2.3", "n2").for_zones(&["a"]),
            Endpoint::test("10.244.3.3", "n3").for_zones(&["b"]),
            Endpoint::test("10.244.1.3", "n1").for_zones(&["b"]),
        ];
        let s = [slice(&svc, eps.clone())];
        let r = service_rules(&svc, s.iter(), &zoned);
        assert_eq!(
            value(&r, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-1")
        );
        assert_eq!(
            value(&r, MapName::Backends, "10.96.0.10 . tcp . 80 . 0").as_deref(),
            Some("10.244.2.3 . 8080")
        );
        // externalTrafficPolicy: Local keeps the node's own endpoint whatever its hints.
        svc.external_local = true;
        let r = service_rules(&svc, s.iter(), &zoned);
        assert_eq!(
            value(&r, MapName::Backends, "198.18.1.10 . tcp . 30080 . 0").as_deref(),
            Some("10.244.1.3 . 8080")
        );
        assert_eq!(
            value(&r, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-1")
        );
        // A node in a zone no endpoint is hinted for uses them all.
        svc.external_local = false;
        let elsewhere = NodeFacts {
            zone: Some("c".into()),
            ..node()
        };
        let r = service_rules(&svc, s.iter(), &elsewhere);
        assert_eq!(
            value(&r, MapName::ServiceIps, "10.96.0.10 . tcp . 80").as_deref(),
            Some("goto ep-3")
        );
    }

    #[test]
    fn internal_local_limits_cluster_ip_to_local_endpoints() {
        let mut svc = web();
        svc.internal_local = true;
        let r = rules_of(
            &svc,
            &[slice(&svc, vec![Endpoint::test("10.244.2.3", "n2")])],
        );
        assert_eq!(
            value(&r, MapName::NoEndpoints, "10.96.0.10 . tcp . 80").as_deref(),
            Some("drop")
        );
        assert_eq!(
            value(&r, MapName::ServiceNodeports, "198.18.1.10 . tcp . 30080").as_deref(),
            Some("goto ep-1")
        );
    }

    #[test]
    fn source_ranges_apply_to_load_balancer_ips() {
        let mut svc = web();
        svc.load_balancer_ips = vec![ip("198.19.0.1")];
        svc.external_ips = vec![ip("198.19.0.9")];
        svc.source_ranges = vec!["198.18.0.0/24".parse::<Cidr>().expect("cidr")];
        let r = rules_of(
            &svc,
            &[slice(&svc, vec![Endpoint::test("10.244.2.3", "n2")])],
        );
        assert!(has(&r, MapName::FirewallFrontends, "198.19.0.1 . tcp . 80"));
        assert!(has(
            &r,
            MapName::FirewallAllow,
            "198.19.0.1 . tcp . 80 . 198.18.0.0/24"
        ));
        assert!(!has(
            &r,
            MapName::FirewallFrontends,
            "198.19.0.9 . tcp . 80"
        ));
        assert!(has(&r, MapName::ServiceIps, "198.19.0.9 . tcp . 80"));
        assert!(has(&r, MapName::ExternalMasq, "198.19.0.1 . tcp . 80"));
    }

    #[test]
    fn affinity_marks_are_per_protocol_and_port() {
        let mut svc = web().with_port("dns", Protocol::Udp, 53);
        svc.affinity_timeout = Some(60);
        let s = slice(&svc, vec![Endpoint::test("10.244.2.3", "n2")]).with_port(
            "dns",
            Protocol::Udp,
            53,
        );
        let r = rules_of(&svc, &[s]);
        assert_eq!(
            value(&r, MapName::AffinityIds, "10.96.0.10 . tcp . 80").as_deref(),
            Some("0x01060050")
        );
        assert_eq!(
            value(&r, MapName::AffinityIds, "10.96.0.10 . udp . 53").as_deref(),
            Some("0x01110035")
        );
        assert!(has(
            &r,
            MapName::AffinityTimeout(60),
            "10.96.0.10 . 0x01060050"
        ));
        assert!(r.affinity);
        assert_eq!(
            r.udp_endpoints.get(&Frontend {
                addr: ip("10.96.0.10"),
                protocol: Protocol::Udp,
                port: 53
            }),
            Some(&BTreeSet::from([ip("10.244.2.3")]))
        );
    }

    #[test]
    fn ports_match_by_name_and_protocol() {
        let svc = web();
        let wrong = Slice::test(&svc)
            .with_port("other", Protocol::Tcp, 9090)
            .with(Endpoint::test("10.244.2.3", "n2"));
        let r = rules_of(&svc, &[wrong]);
        assert!(has(&r, MapName::NoEndpoints, "10.96.0.10 . tcp . 80"));
    }

    #[test]
    fn ipv6_service_goes_to_the_ip6_table() {
        let svc = Service::test("ns", "v6", "fd00:96::10").with_port("http", Protocol::Tcp, 80);
        let s = Slice::test(&svc)
            .with_port("http", Protocol::Tcp, 80)
            .with(Endpoint::test("fd00:244::2", "n2"));
        let r = rules_of(&svc, &[s]);
        let k = ElemKey {
            family: Family::V6,
            map: MapName::ServiceIps,
            key: "fd00:96::10 . tcp . 80".into(),
        };
        assert_eq!(
            r.elements.get(&k).cloned().flatten().as_deref(),
            Some("goto ep-1")
        );
        assert!(r.elements.keys().all(|k| k.family == Family::V6));
    }

    #[test]
    fn ipv6_affinity_keeps_a_set_of_clients_per_endpoint() {
        let mut svc = Service::test("ns", "v6", "fd00:96::10").with_port("http", Protocol::Tcp, 80);
        svc.affinity_timeout = Some(60);
        let s = Slice::test(&svc)
            .with_port("http", Protocol::Tcp, 8080)
            .with(Endpoint::test("fd00:244::3", "n2"))
            .with(Endpoint::test("fd00:244::2", "n1"));
        let r = rules_of(&svc, &[s]);
        let port = "fd000096000000000000000000000010-tcp-80";
        let ep = |a: &str| format!("{port}-fd0002440000000000000000000000{a}-8080");
        let (e2, e3) = (ep("02"), ep("03"));
        let k = ElemKey {
            family: Family::V6,
            map: MapName::ServiceIps,
            key: "fd00:96::10 . tcp . 80".into(),
        };
        assert_eq!(
            r.elements.get(&k).cloned().flatten(),
            Some(format!("goto affsvc-{port}-all"))
        );
        assert!(r.elements.keys().all(|k| k.map != MapName::Backends));
        assert!(r.lb_chains.is_empty() && !r.affinity && r.timeouts.is_empty());
        assert_eq!(
            r.affinity6.sets,
            BTreeMap::from([(format!("aff-{e2}"), 60), (format!("aff-{e3}"), 60)])
        );
        assert_eq!(
            r.affinity6.chains[&format!("affep-{e2}")],
            vec![
                format!("update @aff-{e2} {{ ip6 saddr }}"),
                "meta l4proto tcp dnat ip6 to [fd00:244::2]:8080".to_string(),
            ]
        );
        assert_eq!(
            r.affinity6.chains[&format!("affsvc-{port}-all")],
            vec![
                format!("ip6 saddr @aff-{e2} goto affep-{e2}"),
                format!("ip6 saddr @aff-{e3} goto affep-{e3}"),
                format!("numgen random mod 2 vmap {{ 0 : goto affep-{e2}, 1 : goto affep-{e3} }}"),
            ]
        );
        // Sets before the chains, every chain before the rules jumping to it.
        let text = r.affinity6.statements();
        let set = text.find("add set ip6 berth aff-").expect("set");
        let chain = text.find("add chain ip6 berth affsvc-").expect("chain");
        let rule = text.find("add rule ip6 berth").expect("rule");
        assert!(set < chain && chain < rule, "{text}");
        assert!(text.contains("{ type ipv6_addr; flags dynamic,timeout; timeout 60s; }"));
        let m = Model::test(node()).with_service(svc.clone()).with_slice(
            "a",
            Slice::test(&svc)
                .with_port("http", Protocol::Tcp, 8080)
                .with(Endpoint::test("fd00:244::2", "n1")),
        );
        let full = full_transaction(&m.node, &all_rules(&m));
        let statements = full.find(&format!("add chain ip6 berth affep-{e2}"));
        let elements = full.find("add element ip6 berth service-ips");
        assert!(statements.is_some() && statements < elements, "{full}");
    }

    #[test]
    fn ipv4_affinity_keeps_its_map() {
        let mut svc = web();
        svc.affinity_timeout = Some(60);
        let r = rules_of(
            &svc,
            &[slice(&svc, vec![Endpoint::test("10.244.2.3", "n2")])],
        );
        assert!(r.affinity6.sets.is_empty() && r.affinity6.chains.is_empty());
        assert!(has(&r, MapName::AffinityIds, "10.96.0.10 . tcp . 80"));
    }

    #[test]
    fn full_transaction_is_deterministic() {
        let a = web();
        let b = Service::test("ns", "b", "10.96.0.11").with_port("http", Protocol::Tcp, 80);
        let m1 = Model::test(node())
            .with_service(a.clone())
            .with_service(b.clone())
            .with_slice("a", slice(&a, vec![Endpoint::test("10.244.1.2", "n1")]));
        let m2 = Model::test(node())
            .with_service(b)
            .with_slice("a", slice(&a, vec![Endpoint::test("10.244.1.2", "n1")]))
            .with_service(a);
        let t1 = full_transaction(&m1.node, &all_rules(&m1));
        assert_eq!(t1, full_transaction(&m2.node, &all_rules(&m2)));
        assert!(t1.contains("  chain ep-1 { dnat ip to "));
        assert!(t1.contains("  chain ep-64 { "));
        assert!(!t1.contains("  chain ep-65 { "));
        assert!(t1.contains("delete table ip berth"));
    }

    #[test]
    fn pool_addresses_drop_what_no_frontend_took_but_never_node_addresses() {
        let svc = web();
        let mut r = rules_of(&svc, &[]);
        protect(
            &mut r,
            [ip("198.19.0.1"), ip("198.18.1.10"), ip("fd00:19::1")],
            &node(),
        );
        assert!(has(&r, MapName::LbAddresses, "198.19.0.1"));
        assert!(
            !has(&r, MapName::LbAddresses, "198.18.1.10"),
            "a node address"
        );
        assert!(r.elements.contains_key(&ElemKey {
            family: Family::V6,
            map: MapName::LbAddresses,
            key: "fd00:19::1".into(),
        }));
        let v4 = skeleton(Family::V4, &node(), &BTreeSet::new(), &BTreeSet::new());
        assert!(v4.contains("  set lb-addresses { type ipv4_addr; }"));
        assert!(v4.contains("ip daddr @lb-addresses jump lb-address-check;"));
        assert!(v4.contains(
            "chain lb-address-check { ct direction reply return; ct state related return; drop; }"
        ));
        let v6 = skeleton(Family::V6, &node(), &BTreeSet::new(), &BTreeSet::new());
        assert!(v6.contains("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } return;"));
    }

    #[test]
    fn element_statements_group_by_map() {
        let k1 = ElemKey {
            family: Family::V4,
            map: MapName::ClusterIps,
            key: "10.96.0.1".into(),
        };
        let k2 = ElemKey {
            family: Family::V4,
            map: MapName::ClusterIps,
            key: "10.96.0.2".into(),
        };
        let k3 = ElemKey {
            family: Family::V4,
            map: MapName::ServiceIps,
            key: "10.96.0.1 . tcp . 80".into(),
        };
        let v = "goto ep-1".to_string();
        let add = element_statements("add", [(&k1, None), (&k2, None), (&k3, Some(&v))]);
        assert_eq!(
            add,
            "add element ip berth service-ips { 10.96.0.1 . tcp . 80 : goto ep-1 }\n\
             add element ip berth cluster-ips { 10.96.0.1, 10.96.0.2 }\n"
        );
        let del = element_statements("delete", [(&k3, Some(&v))]);
        assert_eq!(
            del,
            "delete element ip berth service-ips { 10.96.0.1 . tcp . 80 }\n"
        );
    }
}
