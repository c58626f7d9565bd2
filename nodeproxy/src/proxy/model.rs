//! The node agent's view of the cluster: Services, their endpoints and this node's facts,
//! as plain values. Everything here is already validated: addresses are parsed, ports are
//! numbers, names are only ever used as map keys (never rendered into nftables syntax).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::Error;

/// Address family of a table, a Service address or an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The protocol of a Kubernetes port (`None` means TCP, as in the API defaults).
    pub fn parse(value: Option<&str>) -> Result<Self, Error> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(Error::InvalidInput(format!("unknown protocol {other:?}"))),
        }
    }

    /// nftables' name of the protocol.
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// An address prefix such as `10.244.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, Error> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > max {
            return Err(Error::InvalidInput(format!(
                "prefix /{prefix} too long for {addr}"
            )));
        }
        Ok(Self {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        Family::of(ip) == self.family() && mask(*ip, self.prefix) == self.addr
    }

    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(&other.addr)
    }

    /// The same address space without prefixes nested in others (nft interval sets
    /// refuse overlapping elements).
    pub fn minimal(cidrs: &[Cidr]) -> Vec<Cidr> {
        let mut sorted = cidrs.to_vec();
        sorted.sort_by_key(|c| (c.prefix, c.addr));
        let mut kept: Vec<Cidr> = Vec::new();
        for c in sorted {
            if !kept.iter().any(|k| k.contains_cidr(&c)) {
                kept.push(c);
            }
        }
        kept.sort();
        kept
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidInput(format!("invalid CIDR {s:?}"));
        let s = s.trim();
        match s.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                Cidr::new(addr, prefix)
            }
            None => {
                let addr: IpAddr = s.parse().map_err(|_| bad())?;
                let prefix = if addr.is_ipv4() { 32 } else { 128 };
                Cidr::new(addr, prefix)
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// namespace/name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
}

impl ServiceId {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A proxied Service (ExternalName and headless Services never become one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except those with `ipMode: Proxy`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_local: bool,
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP` and its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub source_ranges: Vec<Cidr>,
    pub health_check_node_port: Option<u16>,
    /// For `type: LoadBalancer` only: the LoadBalancerClass named by berth's owner
    /// annotation (pool classes with L2 have their addresses announced).
    pub owner_class: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Topology hints the EndpointSlice controller wrote (`hints.forZones` / `forNodes`).
    pub hints: Hints,
}

/// Where an endpoint should preferably be used from. The EndpointSlice controller sets
/// these for `trafficDistribution: PreferSameZone`/`PreferClose` (zones),
/// `PreferSameNode` (nodes and zones) and the `service.kubernetes.io/topology-mode: Auto`
/// annotation (zones); the proxy only reads the hints, as kube-proxy does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

/// Which endpoints cluster-wide traffic policy uses on this node, read from the hints of
/// the ready endpoints the way kube-proxy does: same node when every ready endpoint has
/// node hints and one names this node; else same zone when every ready endpoint has zone
/// hints and one names this node's zone; else every endpoint. Node-local policies
/// (`externalTrafficPolicy`/`internalTrafficPolicy: Local`) never consult hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Any,
    SameNode,
    SameZone,
}

impl Topology {
    pub fn from_hints<'a>(endpoints: impl Iterator<Item = &'a Endpoint>, node: &NodeFacts) -> Self {
        let zone = node.zone.as_deref();
        let (mut all_nodes, mut for_node) = (true, false);
        let (mut all_zones, mut for_zone) = (true, false);
        let mut any_ready = false;
        for ep in endpoints.filter(|e| e.ready) {
            any_ready = true;
            if ep.hints.nodes.is_empty() {
                all_nodes = false;
            } else if ep.hints.nodes.contains(&node.name) {
                for_node = true;
            }
            if ep.hints.zones.is_empty() {
                all_zones = false;
            } else if zone.is_some_and(|z| ep.hints.zones.iter().any(|h| h == z)) {
                for_zone = true;
            }
        }
        if any_ready && all_nodes && for_node {
            Topology::SameNode
        } else if any_ready && all_zones && for_zone {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    /// Whether `ep` may take this node's cluster-wide traffic.
    pub fn allows(self, ep: &Endpoint, node: &NodeFacts) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameNode => ep.hints.nodes.contains(&node.name),
            Topology::SameZone => node
                .zone
                .as_deref()
                .is_some_and(|z| ep.hints.zones.iter().any(|h| h == z)),
        }
    }
}

/// One EndpointSlice, joined to its Service by the `kubernetes.io/service-name` label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub service: ServiceId,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// What the agent knows about its own node and the cluster's address plan.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub name: String,
    /// Addresses NodePorts are served on.
    pub addresses: Vec<IpAddr>,
    /// Pod addresses; traffic to ClusterIPs from elsewhere is masqueraded.
    pub cluster_cidrs: Vec<Cidr>,
    /// Unallocated addresses in these ranges are dropped.
    pub service_cidrs: Vec<Cidr>,
    /// The Node's `topology.kubernetes.io/zone` label (topology hints are matched on it).
    pub zone: Option<String>,
}

/// Everything the ruleset is computed from.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub node: NodeFacts,
    pub services: BTreeMap<ServiceId, Service>,
    /// Slices by (namespace, slice name).
    slices: BTreeMap<(String, String), Slice>,
    /// Slice names of each Service, so its slices are found without a scan.
    slice_names: BTreeMap<ServiceId, std::collections::BTreeSet<String>>,
}

impl Model {
    /// The slices of one Service.
    pub fn slices_of<'a>(
        &'a self,
        id: &'a ServiceId,
    ) -> impl Iterator<Item = &'a Slice> + Clone + 'a {
        self.slice_names
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(move |name| self.slices.get(&(id.namespace.clone(), name.clone())))
    }

    pub fn slice(&self, namespace: &str, name: &str) -> Option<&Slice> {
        self.slices.get(&(namespace.to_string(), name.to_string()))
    }

    /// Every slice key, for relisting.
    pub fn slice_keys(&self) -> impl Iterator<Item = &(String, String)> {
        self.slices.keys()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Adds or replaces a slice; the one it replaced, if any.
    pub fn insert_slice(&mut self, namespace: &str, name: &str, slice: Slice) -> Option<Slice> {
        let old = self.remove_slice(namespace, name);
        self.slice_names
            .entry(slice.service.clone())
            .or_default()
            .insert(name.to_string());
        self.slices
            .insert((namespace.to_string(), name.to_string()), slice);
        old
    }

    pub fn remove_slice(&mut self, namespace: &str, name: &str) -> Option<Slice> {
        let old = self
            .slices
            .remove(&(namespace.to_string(), name.to_string()))?;
        if let Some(names) = self.slice_names.get_mut(&old.service) {
            names.remove(name);
            if names.is_empty() {
                self.slice_names.remove(&old.service);
            }
        }
        Some(old)
    }
}

/// Fixture builders for unit tests of this crate.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    pub fn ip(s: &str) -> IpAddr {
        s.parse().expect("fixture address")
    }

    impl Service {
        pub fn test(ns: &str, name: &str, cluster_ip: &str) -> Self {
            Self {
                id: ServiceId::new(ns, name),
                cluster_ips: vec![ip(cluster_ip)],
                ports: Vec::new(),
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                external_local: false,
                internal_local: false,
                affinity_timeout: None,
                source_ranges: Vec::new(),
                health_check_node_port: None,
                owner_class: None,
            }
        }

        pub fn with_port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
            self.ports.push(ServicePort {
                name: name.into(),
                protocol,
                port,
                node_port: None,
            });
            self
        }

        pub fn with_node_port(mut self, node_port: u16) -> Self {
            if let Some(p) = self.ports.last_mut() {
                p.node_port = Some(node_port);
            }
            self
        }
    }

    impl Endpoint {
        pub fn test(addr: &str, node: &str) -> Self {
            Self {
                addr: ip(addr),
                node: Some(node.into()),
                ready: true,
                serving: true,
                terminating: false,
                hints: Hints::default(),
            }
        }

        pub fn for_zones(mut self, zones: &[&str]) -> Self {
            self.hints.zones = zones.iter().map(|z| z.to_string()).collect();
            self
        }

        pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
            self.hints.nodes = nodes.iter().map(|n| n.to_string()).collect();
            self
        }

        pub fn terminating(mut self) -> Self {
            self.ready = false;
            self.terminating = true;
            self
        }
    }

    impl Slice {
        pub fn test(svc: &Service) -> Self {
            Self {
                service: svc.id.clone(),
                ports: Vec::new(),
                endpoints: Vec::new(),
            }
        }

        pub fn with_port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
            self.ports.push(EndpointPort {
                name: name.into(),
                protocol,
                port,
            });
            self
        }

        pub fn with(mut self, ep: Endpoint) -> Self {
            self.endpoints.push(ep);
            self
        }
    }

    impl NodeFacts {
        pub fn test(name: &str, addr: &str) -> Self {
            Self {
                name: name.into(),
                addresses: vec![ip(addr)],
                cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
                service_cidrs: vec!["10.96.0.0/16".parse().expect("cidr")],
                zone: None,
            }
        }
    }

    impl Model {
        pub fn test(node: NodeFacts) -> Self {
            Self {
                node,
                ..Default::default()
            }
        }

        pub fn with_service(mut self, svc: Service) -> Self {
            self.services.insert(svc.id.clone(), svc);
            self
        }

        pub fn with_slice(mut self, name: &str, slice: Slice) -> Self {
            let ns = slice.service.namespace.clone();
            self.insert_slice(&ns, name, slice);
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn zoned(zone: &str) -> NodeFacts {
        NodeFacts {
            zone: Some(zone.into()),
            ..NodeFacts::test("n1", "198.18.1.10")
        }
    }

    #[test]
    fn topology_uses_zone_hints_only_when_every_ready_endpoint_has_one() {
        let node = zoned("a");
        let a = Endpoint::test("10.244.1.2", "n1").for_zones(&["a"]);
        let b = Endpoint::test("10.244.2.2", "n2").for_zones(&["b"]);
        let bare = Endpoint::test("10.244.3.2", "n3");
        let mode = Topology::from_hints([&a, &b].into_iter(), &node);
        assert_eq!(mode, Topology::SameZone);
        assert!(mode.allows(&a, &node) && !mode.allows(&b, &node));
        assert_eq!(
            Topology::from_hints([&a, &b, &bare].into_iter(), &node),
            Topology::Any,
            "one ready endpoint without hints"
        );
        // A not-ready endpoint without hints does not count.
        let mut down = bare.clone();
        down.ready = false;
        assert_eq!(
            Topology::from_hints([&a, &down].into_iter(), &node),
            Topology::SameZone
        );
        // No endpoint hinted for this zone, or the node has no zone: fall back.
        assert_eq!(Topology::from_hints([&b].into_iter(), &node), Topology::Any);
        let unzoned = NodeFacts::test("n1", "198.18.1.10");
        assert_eq!(
            Topology::from_hints([&a, &b].into_iter(), &unzoned),
            Topology::Any
        );
        assert_eq!(Topology::from_hints([].into_iter(), &node), Topology::Any);
    }

    #[test]
    fn topology_prefers_node_hints_then_zone_hints() {
        let node = zoned("a");
        let mine = Endpoint::test("10.244.1.2", "n1")
            .for_zones(&["a"])
            .for_nodes(&["n1"]);
        let peer = Endpoint::test("10.244.2.2", "n2")
            .for_zones(&["a"])
            .for_nodes(&["n2"]);
        let mode = Topology::from_hints([&mine, &peer].into_iter(), &node);
        assert_eq!(mode, Topology::SameNode);
        assert!(mode.allows(&mine, &node) && !mode.allows(&peer, &node));
        // No endpoint for this node: the zone hints still apply.
        let other = NodeFacts {
            name: "n3".into(),
            ..zoned("a")
        };
        let mode = Topology::from_hints([&mine, &peer].into_iter(), &other);
        assert_eq!(mode, Topology::SameZone);
        assert!(mode.allows(&mine, &other) && mode.allows(&peer, &other));
    }

    #[test]
    fn cidr_parses_masks_and_contains() {
        let c: Cidr = "10.244.1.7/16".parse().expect("cidr");
        assert_eq!(c.to_string(), "10.244.0.0/16");
        assert!(c.contains(&ip("10.244.200.1")));
        assert!(!c.contains(&ip("10.245.0.1")));
        assert!(!c.contains(&ip("::1")));
        let single: Cidr = "fd00::1".parse().expect("cidr");
        assert_eq!(single.to_string(), "fd00::1/128");
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains(&ip("1.2.3.4")));
    }

    #[test]
    fn minimal_drops_nested_prefixes() {
        let c = |s: &str| s.parse::<Cidr>().expect("cidr");
        let m = Cidr::minimal(&[
            c("10.18.63.104/32"),
            c("10.18.0.0/17"),
            c("10.19.0.0/16"),
            c("10.18.0.0/17"),
        ]);
        assert_eq!(m, vec![c("10.18.0.0/17"), c("10.19.0.0/16")]);
    }

    #[test]
    fn cidr_rejects_garbage() {
        for bad in ["", "10.0.0.0/33", "x/8", "10.0.0.0/-1", "1.2.3.4/8; drop"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn protocol_defaults_to_tcp_and_rejects_unknown() {
        assert_eq!(Protocol::parse(None).expect("tcp"), Protocol::Tcp);
        assert_eq!(Protocol::parse(Some("UDP")).expect("udp"), Protocol::Udp);
        assert_eq!(Protocol::parse(Some("SCTP")).expect("sctp"), Protocol::Sctp);
        assert!(Protocol::parse(Some("ICMP")).is_err());
    }

    #[test]
    fn slices_of_returns_only_that_services_slices() {
        let a = Service::test("ns", "a", "10.96.0.1");
        let b = Service::test("ns", "b", "10.96.0.2");
        let other = Service::test("ns2", "a", "10.96.0.3");
        let m = Model::test(NodeFacts::test("n1", "198.18.1.10"))
            .with_slice("a-1", Slice::test(&a))
            .with_slice("a-2", Slice::test(&a))
            .with_slice("b-1", Slice::test(&b))
            .with_slice("a-x", Slice::test(&other));
        assert_eq!(m.slices_of(&a.id).count(), 2);
        assert_eq!(m.slices_of(&b.id).count(), 1);
        assert_eq!(m.slices_of(&other.id).count(), 1);
    }

    #[test]
    fn moving_a_slice_to_another_service_reindexes_it() {
        let a = Service::test("ns", "a", "10.96.0.1");
        let b = Service::test("ns", "b", "10.96.0.2");
        let mut m =
            Model::test(NodeFacts::test("n1", "198.18.1.10")).with_slice("s", Slice::test(&a));
        let old = m.insert_slice("ns", "s", Slice::test(&b));
        assert_eq!(old.map(|s| s.service), Some(a.id.clone()));
        assert_eq!(m.slices_of(&a.id).count(), 0);
        assert_eq!(m.slices_of(&b.id).count(), 1);
        assert!(m.remove_slice("ns", "s").is_some());
        assert_eq!(m.slices_of(&b.id).count(), 0);
        assert_eq!(m.slice_count(), 0);
    }
}
