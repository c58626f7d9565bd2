//! L2 announcement of pool addresses, the pure part: which addresses this node competes
//! for, how the eligible nodes are ranked per address, and what to do with each
//! address's Lease at a given moment. The I/O around it is in [`crate::l2::announcer`] and
//! [`super::link`].
//!
//! One `coordination.k8s.io/v1` Lease per address decides which node announces it. A
//! holder renews every third of the lease duration; the others take a Lease only when it
//! is absent, released or expired, the best-ranked node at once and each next one a step
//! later, so addresses spread over the nodes and a silent node does not block the rest.
//! Expired means this node has seen the Lease unchanged for a whole duration
//! ([`berth_runtime::lease::Observed`]): the holder's clock never enters the decision.
//! Every time is a monotonic [`Instant`] passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use berth_crds::LoadBalancerClassSpec;
use berth_crds::addresses::AddressPool;
use berth_runtime::lease::Observed;
use kube::core::{Selector, SelectorExt};
use sha2::{Digest, Sha256};

use crate::proxy::model::Model;

pub use berth_crds::l2::{LEASE_LABEL, lease_name};
/// Annotation naming the node that released a Lease: the others do not wait for it.
pub const RELEASED_BY: &str = "berth.dev/released-by";

/// What the announcer needs of a `pool` LoadBalancerClass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolClass {
    /// `spec.pool.l2` is not `false`.
    pub l2: bool,
    /// The class's usable addresses, as the controller allocates them.
    pub addresses: AddressPool,
    /// `spec.pool.bgp` when it is enabled: the BGP speaker announces the addresses.
    pub bgp: Option<crate::bgp::routes::Advertisement>,
    /// `spec.pool.announce`.
    pub scope: Scope,
}

impl PoolClass {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.addresses.contains(ip)
    }
}

/// Node labels by node name.
pub type NodeLabels = BTreeMap<String, BTreeMap<String, String>>;

/// Which nodes announce a class's addresses (L2 and BGP), and on which interfaces (L2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub nodes: ScopeNodes,
    /// The first of these the node has carries the addresses; empty: the agent's own.
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ScopeNodes {
    #[default]
    Every,
    Matching(Selector),
    /// The selector does not parse (the controller refuses the class): nobody announces.
    Invalid,
}

impl Scope {
    /// Whether a node with `labels` announces the class.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        match &self.nodes {
            ScopeNodes::Every => true,
            ScopeNodes::Matching(s) => s.matches(labels),
            ScopeNodes::Invalid => false,
        }
    }
}

/// The pool part of a class; `None` for classes of another provider. Unparsable
/// entries are skipped with a warning: the good ones keep being announced.
pub fn pool_class(spec: &LoadBalancerClassSpec, warnings: &mut Vec<String>) -> Option<PoolClass> {
    let pool = spec.pool.as_ref()?;
    let (addresses, errors) = AddressPool::parse_lenient(&pool.addresses);
    warnings.extend(errors.iter().map(|e| format!("pool addresses: {e}")));
    let nodes = match pool.announce_nodes() {
        Ok(None) => ScopeNodes::Every,
        Ok(Some(s)) => ScopeNodes::Matching(s),
        Err(e) => {
            warnings.push(format!("{e}; no node announces the class"));
            ScopeNodes::Invalid
        }
    };
    Some(PoolClass {
        l2: pool.l2 != Some(false),
        addresses,
        bgp: pool
            .bgp
            .as_ref()
            .and_then(|b| crate::bgp::routes::Advertisement::of(b, warnings)),
        scope: Scope {
            nodes,
            interfaces: pool.announce_interfaces().to_vec(),
        },
    })
}

/// Every address to announce with the nodes eligible for it: the load-balancer ingress
/// IPs of Services whose owner class is a pool class with L2 on, inside that class's
/// ranges. Eligible for one Service are `nodes` (the live ones not excluded from load
/// balancers) that the class's scope selects (by their `labels`; a node missing there
/// has none), with `externalTrafficPolicy: Local` only those with a ready local
/// endpoint; for an address several Services share, see [`serving_nodes`]. Addresses
/// outside their class's ranges are left out with a warning. Pure.
pub fn wanted(
    model: &Model,
    classes: &BTreeMap<String, PoolClass>,
    nodes: &BTreeSet<String>,
    labels: &NodeLabels,
    warnings: &mut Vec<String>,
) -> BTreeMap<IpAddr, BTreeSet<String>> {
    let mut claims: BTreeMap<IpAddr, Vec<(String, BTreeSet<String>)>> = BTreeMap::new();
    let no_labels = BTreeMap::new();
    for svc in model.services.values() {
        let Some(class_name) = svc.owner_class.as_deref() else {
            continue;
        };
        let Some(class) = classes.get(class_name).filter(|c| c.l2) else {
            continue;
        };
        let nodes: BTreeSet<String> = nodes
            .iter()
            .filter(|n| class.scope.selects(labels.get(*n).unwrap_or(&no_labels)))
            .cloned()
            .collect();
        let nodes = &nodes;
        let eligible: BTreeSet<String> = if svc.external_local {
            model
                .slices_of(&svc.id)
                .flat_map(|s| &s.endpoints)
                .filter(|e| e.ready)
                .filter_map(|e| e.node.clone())
                .filter(|n| nodes.contains(n))
                .collect()
        } else {
            nodes.clone()
        };
        for ip in &svc.load_balancer_ips {
            if !class.contains(ip) {
                warnings.push(format!(
                    "{ip} of Service {} is outside the pool of class {class_name}; not announced",
                    svc.id
                ));
                continue;
            }
            claims
                .entry(*ip)
                .or_default()
                .push((svc.id.to_string(), eligible.clone()));
        }
    }
    claims
        .into_iter()
        .map(|(ip, claims)| {
            let (serving, missed) = serving_nodes(&claims);
            if !missed.is_empty() {
                warnings.push(format!(
                    "no node is eligible for every Service on {ip}: announced from {serving:?}, \
                     which has no ready local endpoint of {} (externalTrafficPolicy: Local)",
                    missed.join(", ")
                ));
            }
            (ip, serving)
        })
        .collect()
}

/// The class and the interfaces it names of each address (the first Service's class,
/// in name order, for a shared address); addresses of classes naming none are left out.
/// Pure.
pub fn interfaces(
    model: &Model,
    classes: &BTreeMap<String, PoolClass>,
) -> BTreeMap<IpAddr, (String, Vec<String>)> {
    let mut out = BTreeMap::new();
    for svc in model.services.values() {
        let Some((name, class)) = svc
            .owner_class
            .as_deref()
            .and_then(|c| classes.get_key_value(c))
        else {
            continue;
        };
        if class.scope.interfaces.is_empty() {
            continue;
        }
        for ip in svc.load_balancer_ips.iter().filter(|ip| class.contains(ip)) {
            out.entry(*ip)
                .or_insert_with(|| (name.clone(), class.scope.interfaces.clone()));
        }
    }
    out
}

/// The nodes to announce an address from, given each Service on it with its eligible
/// nodes: those eligible for every Service that has any (the intersection), so no
/// Service's traffic reaches a node that drops it. A Service with no eligible node (no
/// ready endpoint at all) is served nowhere and does not narrow the choice. When no node
/// is eligible for all of them (the controller refuses such sharing; a race or a status
/// written by hand can still bring it about) the nodes eligible for the most Services are
/// chosen, and the Services missed on some of them are returned to warn about. Pure.
pub fn serving_nodes(claims: &[(String, BTreeSet<String>)]) -> (BTreeSet<String>, Vec<String>) {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for node in claims.iter().flat_map(|(_, eligible)| eligible) {
        *count.entry(node.as_str()).or_default() += 1;
    }
    let best = count.values().copied().max().unwrap_or(0);
    let serving: BTreeSet<String> = count
        .into_iter()
        .filter(|(_, c)| *c == best)
        .map(|(n, _)| n.to_string())
        .collect();
    let missed = claims
        .iter()
        .filter(|(_, eligible)| !eligible.is_empty() && !serving.is_subset(eligible))
        .map(|(svc, _)| svc.clone())
        .collect();
    (serving, missed)
}

/// A node's stable score for an address; lower ranks first.
fn score(addr: &IpAddr, node: &str) -> [u8; 8] {
    let digest = Sha256::digest(format!("{addr}/{node}").as_bytes());
    let mut s = [0u8; 8];
    s.copy_from_slice(&digest[..8]);
    s
}

/// The eligible nodes of an address, best first, without `skip`. Only nodes whose agent
/// is alive are eligible ([`super::heartbeat`]): a dead one ranked first would make every
/// live one wait a step. Pure.
pub fn ranking<'a>(
    addr: &IpAddr,
    eligible: &'a BTreeSet<String>,
    skip: Option<&str>,
) -> Vec<&'a str> {
    let mut nodes: Vec<&str> = eligible
        .iter()
        .map(String::as_str)
        .filter(|n| Some(*n) != skip)
        .collect();
    nodes.sort_by_key(|n| (score(addr, n), *n));
    nodes
}

/// `me`'s place in [`ranking`] (0 = first); after everyone when not eligible.
pub fn rank(addr: &IpAddr, me: &str, eligible: &BTreeSet<String>, skip: Option<&str>) -> usize {
    let r = ranking(addr, eligible, skip);
    r.iter().position(|n| *n == me).unwrap_or(r.len())
}

/// The part of an observed Lease the decisions read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    /// When the holder's claim runs out unless this node sees the Lease change before:
    /// when it last saw it change, plus its duration.
    pub expires_at: Instant,
    pub released_by: Option<String>,
}

impl LeaseView {
    pub fn of(seen: &Observed) -> Self {
        Self {
            holder: seen.holder().map(str::to_string),
            expires_at: seen.expires_at(),
            released_by: seen
                .lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RELEASED_BY))
                .cloned(),
        }
    }

    pub fn expired(&self, now: Instant) -> bool {
        now >= self.expires_at
    }

    /// The claim of a holder that peer probes find dead ends now, not a duration after
    /// its last renewal: the next node may take the Lease at once.
    pub fn unless_holder_dead(mut self, dead: &BTreeSet<String>, now: Instant) -> Self {
        if self.holder.as_ref().is_some_and(|h| dead.contains(h)) {
            self.expires_at = self.expires_at.min(now);
        }
        self
    }
}

/// Whether `me` may write itself into the Lease: absent, released, expired or its own.
pub fn takeable(lease: Option<&LeaseView>, me: &str, now: Instant) -> bool {
    match lease {
        None => true,
        Some(l) => match l.holder.as_deref() {
            None => true,
            Some(h) if h == me => true,
            Some(_) => l.expired(now),
        },
    }
}

/// The node that last held a takeable Lease: nobody waits for it to come back.
fn previous_holder(lease: Option<&LeaseView>) -> Option<&str> {
    let l = lease?;
    l.holder.as_deref().or(l.released_by.as_deref())
}

/// Lease timing, all derived from the lease duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub duration: Duration,
    /// A holder renews this long after its last renewal.
    pub renew: Duration,
    /// Each rank waits this much longer before taking a free Lease.
    pub step: Duration,
    /// How often the announcer looks at its addresses.
    pub tick: Duration,
    /// A Lease read or write gives up after this long, so that one slow call does not
    /// hold up the other addresses' renewals.
    pub attempt: Duration,
}

impl Timing {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            renew: duration / 3,
            step: duration / 3,
            tick: (duration / 12).clamp(Duration::from_millis(100), Duration::from_secs(1)),
            attempt: duration / 6,
        }
    }
}

/// What the announcer should do with one address now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Write this node into the Lease, then add the address and announce it.
    Acquire,
    /// Renew the Lease and refresh the address's lifetime.
    Renew,
    /// Give the Lease up (this node is no longer eligible) and remove the address.
    Release,
    /// Another node holds the Lease, or ours ran out: remove the address, write nothing.
    Lost,
}

/// Everything [`decide`] looks at for one address.
#[derive(Clone, Copy, Debug)]
pub struct AddrState<'a> {
    pub me: &'a str,
    pub addr: IpAddr,
    /// Eligible nodes; `None` when nobody should announce the address.
    pub eligible: Option<&'a BTreeSet<String>>,
    pub lease: Option<&'a LeaseView>,
    /// When this node holds the address: the start of its last successful renewal.
    pub held_since_renewal: Option<Instant>,
    /// Since when this node has seen the Lease takeable.
    pub takeable_since: Option<Instant>,
    pub now: Instant,
    pub timing: Timing,
}

/// The decision for one address. Pure.
pub fn decide(s: &AddrState) -> Action {
    let me_eligible = s.eligible.is_some_and(|e| e.contains(s.me));
    if let Some(renewed) = s.held_since_renewal {
        if !me_eligible {
            return Action::Release;
        }
        // A holder other than this node, seen writing within a lease duration.
        let taken_by_other = s
            .lease
            .is_some_and(|l| l.holder.as_deref().is_some_and(|h| h != s.me) && !l.expired(s.now));
        if taken_by_other || s.now >= renewed + s.timing.duration {
            return Action::Lost;
        }
        if s.now >= renewed + s.timing.renew {
            return Action::Renew;
        }
        return Action::Nothing;
    }
    let Some(eligible) = s.eligible.filter(|_| me_eligible) else {
        return Action::Nothing;
    };
    if !takeable(s.lease, s.me, s.now) {
        return Action::Nothing;
    }
    let ours = s.lease.and_then(|l| l.holder.as_deref()) == Some(s.me);
    let delay = if ours {
        Duration::ZERO
    } else {
        let r = rank(&s.addr, s.me, eligible, previous_holder(s.lease));
        s.timing
            .step
            .saturating_mul(u32::try_from(r).unwrap_or(u32::MAX))
    };
    let since = s.takeable_since.unwrap_or(s.now);
    if s.now.saturating_duration_since(since) >= delay {
        Action::Acquire
    } else {
        Action::Nothing
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;
    use crate::proxy::model::fixtures::ip;
    use crate::proxy::model::{Endpoint, NodeFacts, Service, Slice};

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn class(entries: &[&str], l2: bool) -> PoolClass {
        PoolClass {
            l2,
            addresses: AddressPool::parse(entries).expect("pool"),
            bgp: None,
            scope: Scope::default(),
        }
    }

    fn lb(name: &str, class: &str, lb_ip: &str) -> Service {
        let mut s = Service::test("ns", name, "10.96.0.9");
        s.owner_class = Some(class.into());
        s.load_balancer_ips = vec![ip(lb_ip)];
        s
    }

    const TIMING_S: u64 = 3;

    fn timing() -> Timing {
        Timing::new(Duration::from_secs(TIMING_S))
    }

    #[test]
    fn lease_names_are_dns_labels() {
        assert_eq!(lease_name(&ip("198.19.8.5")), "berth-l2-198-19-8-5");
        assert_eq!(lease_name(&ip("fd00::5")), "berth-l2-fd00--5");
        assert_eq!(lease_name(&ip("fd00::")), "berth-l2-fd00--0");
    }

    #[test]
    fn pool_classes_take_cidrs_ranges_and_single_addresses() {
        let spec: LoadBalancerClassSpec = serde_json::from_value(serde_json::json!({
            "pool": {"addresses": ["198.19.8.0/30", "198.19.8.10 - 198.19.8.11", "198.19.0.77", "fd00::/127"]}
        }))
        .expect("spec");
        let mut w = Vec::new();
        let c = pool_class(&spec, &mut w).expect("pool");
        assert!(w.is_empty(), "{w:?}");
        for inside in [
            "198.19.8.1",
            "198.19.8.2",
            "198.19.8.11",
            "198.19.0.77",
            "fd00::1",
        ] {
            assert!(c.contains(&ip(inside)), "{inside}");
        }
        for outside in ["198.19.8.0", "198.19.8.3", "198.19.8.12", "198.19.0.78"] {
            assert!(!c.contains(&ip(outside)), "{outside}");
        }
    }

    #[test]
    fn a_single_address_entry_is_announced() {
        let classes = BTreeMap::from([("one".to_string(), class(&["198.19.0.77"], true))]);
        let all = nodes(&["n1", "n2"]);
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10")).with_service(lb(
            "web",
            "one",
            "198.19.0.77",
        ));
        let mut w = Vec::new();
        assert_eq!(
            wanted(&model, &classes, &all, &NodeLabels::new(), &mut w),
            BTreeMap::from([(ip("198.19.0.77"), all.clone())])
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn pool_classes_default_to_l2_and_skip_bad_ranges() {
        let spec: LoadBalancerClassSpec = serde_json::from_value(serde_json::json!({
            "pool": {"addresses": ["198.19.8.0/24", "nonsense"]}
        }))
        .expect("spec");
        let mut w = Vec::new();
        let c = pool_class(&spec, &mut w).expect("pool");
        assert!(c.l2);
        assert_eq!(c.addresses.ranges().len(), 1);
        assert_eq!(w.len(), 1, "{w:?}");
        let off: LoadBalancerClassSpec = serde_json::from_value(serde_json::json!({
            "pool": {"addresses": ["198.19.8.0/24"], "l2": false}
        }))
        .expect("spec");
        assert!(!pool_class(&off, &mut w).expect("pool").l2);
        let aws: LoadBalancerClassSpec =
            serde_json::from_value(serde_json::json!({"aws": {}})).expect("spec");
        assert!(pool_class(&aws, &mut w).is_none());
    }

    #[test]
    fn wanted_addresses_follow_class_l2_range_and_traffic_policy() {
        let classes = BTreeMap::from([
            ("lan".to_string(), class(&["198.19.8.0/24"], true)),
            ("quiet".to_string(), class(&["198.19.8.0/24"], false)),
        ]);
        let all = nodes(&["n1", "n2", "n3"]);
        let mut local = lb("local", "lan", "198.19.8.3");
        local.external_local = true;
        let mut no_class = lb("none", "lan", "198.19.8.6");
        no_class.owner_class = None;
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10"))
            .with_service(lb("web", "lan", "198.19.8.1"))
            .with_service(lb("off", "quiet", "198.19.8.2"))
            .with_service(lb("outside", "lan", "198.19.7.1"))
            .with_service(lb("unknown", "other", "198.19.8.5"))
            .with_service(no_class)
            .with_service(local.clone())
            .with_slice(
                "local-1",
                Slice::test(&local)
                    .with(Endpoint::test("10.244.2.5", "n2"))
                    .with(Endpoint::test("10.244.3.5", "n3").terminating())
                    .with(Endpoint::test("10.244.4.5", "excluded")),
            );
        let mut w = Vec::new();
        let got = wanted(&model, &classes, &all, &NodeLabels::new(), &mut w);
        assert_eq!(
            got,
            BTreeMap::from([
                (ip("198.19.8.1"), all.clone()),
                (ip("198.19.8.3"), nodes(&["n2"]))
            ])
        );
        assert_eq!(w.len(), 1, "only the out-of-range address warns: {w:?}");
        assert!(w[0].contains("198.19.7.1"), "{w:?}");
    }

    #[test]
    fn a_scoped_class_is_announced_by_its_nodes_on_its_interfaces() {
        let spec: LoadBalancerClassSpec = serde_json::from_value(serde_json::json!({
            "pool": {"addresses": ["198.19.8.0/24"], "announce": {
                "nodeSelector": {"matchLabels": {"edge": "yes"}}, "interfaces": ["ens5", "eth1"]}}
        }))
        .expect("spec");
        let mut w = Vec::new();
        let scoped = pool_class(&spec, &mut w).expect("pool");
        assert!(w.is_empty(), "{w:?}");
        let classes = BTreeMap::from([
            ("edge".to_string(), scoped),
            ("lan".to_string(), class(&["198.19.9.0/24"], true)),
        ]);
        let all = nodes(&["n1", "n2", "n3"]);
        let edge = BTreeMap::from([("edge".to_string(), "yes".to_string())]);
        let labels = NodeLabels::from([("n2".to_string(), edge.clone()), ("n3".into(), edge)]);
        let mut local = lb("local", "edge", "198.19.8.3");
        local.external_local = true;
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10"))
            .with_service(lb("web", "edge", "198.19.8.1"))
            .with_service(lb("lan", "lan", "198.19.9.1"))
            .with_service(local.clone())
            .with_slice(
                "local-1",
                Slice::test(&local)
                    .with(Endpoint::test("10.244.1.5", "n1"))
                    .with(Endpoint::test("10.244.2.5", "n2")),
            );
        let got = wanted(&model, &classes, &all, &labels, &mut w);
        assert_eq!(
            got,
            BTreeMap::from([
                (ip("198.19.8.1"), nodes(&["n2", "n3"])),
                (ip("198.19.8.3"), nodes(&["n2"])),
                (ip("198.19.9.1"), all.clone()),
            ])
        );
        let ifaces = interfaces(&model, &classes);
        let want = (
            "edge".to_string(),
            vec!["ens5".to_string(), "eth1".to_string()],
        );
        assert_eq!(
            ifaces,
            BTreeMap::from([(ip("198.19.8.1"), want.clone()), (ip("198.19.8.3"), want)])
        );
        let bad: LoadBalancerClassSpec = serde_json::from_value(serde_json::json!({
            "pool": {"addresses": ["198.19.8.0/24"], "announce": {
                "nodeSelector": {"matchExpressions": [{"key": "edge", "operator": "Near"}]}}}
        }))
        .expect("spec");
        let invalid = pool_class(&bad, &mut w).expect("pool");
        assert_eq!(invalid.scope.nodes, ScopeNodes::Invalid);
        assert!(!invalid.scope.selects(&BTreeMap::new()));
        assert!(
            w.iter().any(|w| w.contains("announce.nodeSelector")),
            "{w:?}"
        );
    }

    /// Services with their eligible nodes.
    type Claims<'a> = &'a [(&'a str, &'a [&'a str])];

    fn claims(list: Claims) -> Vec<(String, BTreeSet<String>)> {
        list.iter()
            .map(|(s, n)| (s.to_string(), nodes(n)))
            .collect()
    }

    #[test]
    fn a_shared_address_is_served_from_nodes_eligible_for_every_service() {
        let all: &[&str] = &["n1", "n2", "n3"];
        let cases: &[(Claims, &[&str], &[&str])] = &[
            (&[("cluster", all)], all, &[]),
            (&[("cluster", all), ("local", &["n2"])], &["n2"], &[]),
            (&[("a", &["n1", "n2"]), ("b", &["n2", "n3"])], &["n2"], &[]),
            // A Local Service without endpoints is served nowhere: it narrows nothing.
            (&[("cluster", all), ("empty", &[])], all, &[]),
            (&[("empty", &[])], &[], &[]),
            // Disjoint: the nodes serving the most, and a warning for the missed.
            (
                &[("a", &["n1"]), ("b", &["n3"])],
                &["n1", "n3"],
                &["a", "b"],
            ),
            (
                &[("a", &["n1"]), ("b", &["n3"]), ("c", all)],
                &["n1", "n3"],
                &["a", "b"],
            ),
            (
                &[("a", &["n1"]), ("b", &["n1"]), ("c", &["n3"])],
                &["n1"],
                &["c"],
            ),
        ];
        for (list, serving, missed) in cases {
            let (got, warn) = serving_nodes(&claims(list));
            assert_eq!(got, nodes(serving), "{list:?}");
            assert_eq!(warn, missed.to_vec(), "{list:?}");
        }
    }

    #[test]
    fn wanted_intersects_the_services_sharing_an_address() {
        let classes = BTreeMap::from([("lan".to_string(), class(&["198.19.8.0/24"], true))]);
        let all = nodes(&["n1", "n2", "n3"]);
        let mut a = lb("a", "lan", "198.19.8.7");
        a.external_local = true;
        let mut b = lb("b", "lan", "198.19.8.7");
        b.external_local = true;
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10"))
            .with_service(lb("cluster", "lan", "198.19.8.7"))
            .with_service(a.clone())
            .with_service(b.clone())
            .with_slice(
                "a-1",
                Slice::test(&a).with(Endpoint::test("10.244.2.5", "n2")),
            )
            .with_slice(
                "b-1",
                Slice::test(&b).with(Endpoint::test("10.244.3.5", "n3")),
            );
        let mut w = Vec::new();
        let got = wanted(&model, &classes, &all, &NodeLabels::new(), &mut w);
        assert_eq!(got[&ip("198.19.8.7")], nodes(&["n2", "n3"]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("ns/a") && w[0].contains("ns/b"), "{w:?}");
        let model = model.with_slice(
            "b-1",
            Slice::test(&b).with(Endpoint::test("10.244.2.6", "n2")),
        );
        let mut w = Vec::new();
        let got = wanted(&model, &classes, &all, &NodeLabels::new(), &mut w);
        assert_eq!(got[&ip("198.19.8.7")], nodes(&["n2"]));
        assert!(w.is_empty(), "{w:?}");
    }

    /// The e2e suites compute the ranking themselves (sha256 of `<addr>/<node>`, the
    /// first 8 bytes, lowest first) to know which node an address prefers.
    #[test]
    fn the_ranking_is_the_documented_hash_order() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        for i in 0..16 {
            let addr = ip(&format!("198.19.41.{i}"));
            let mut by_hash: Vec<&str> = all.iter().map(String::as_str).collect();
            by_hash.sort_by_key(|n| {
                let d = Sha256::digest(format!("{addr}/{n}").as_bytes());
                (d[..8].to_vec(), n.to_string())
            });
            assert_eq!(ranking(&addr, &all, None), by_hash, "{addr}");
        }
    }

    #[test]
    fn ranking_is_stable_and_spreads_addresses() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let firsts: BTreeSet<&str> = (20..26)
            .map(|i| ranking(&ip(&format!("198.19.8.{i}")), &all, None)[0])
            .collect();
        assert!(
            firsts.len() >= 2,
            "6 addresses all ranked first on {firsts:?}"
        );
        let a = ip("198.19.8.30");
        let r = ranking(&a, &all, None);
        assert_eq!(r, ranking(&a, &all, None));
        assert_eq!(r.len(), 3);
        assert_eq!(rank(&a, r[1], &all, None), 1);
        assert_eq!(
            rank(&a, r[1], &all, Some(r[0])),
            0,
            "skipping the first moves up"
        );
        assert_eq!(rank(&a, "elsewhere", &all, None), 3);
    }

    /// The e2e spreading case relies on these six addresses not all ranking one node first.
    #[test]
    fn e2e_spread_addresses_rank_at_least_two_nodes_first() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let firsts: BTreeSet<&str> = (30..36)
            .map(|i| ranking(&ip(&format!("198.19.8.{i}")), &all, None)[0])
            .collect();
        assert!(firsts.len() >= 2, "{firsts:?}");
    }

    static T0: LazyLock<Instant> = LazyLock::new(Instant::now);

    /// `ms` milliseconds into a test.
    fn at(ms: u64) -> Instant {
        *T0 + Duration::from_millis(ms)
    }

    /// A Lease this node saw change at `seen_ms`.
    fn view(holder: Option<&str>, seen_ms: u64) -> LeaseView {
        LeaseView {
            holder: holder.map(str::to_string),
            expires_at: at(seen_ms + TIMING_S * 1000),
            released_by: None,
        }
    }

    fn state<'a>(
        me: &'a str,
        eligible: Option<&'a BTreeSet<String>>,
        lease: Option<&'a LeaseView>,
        now_ms: u64,
    ) -> AddrState<'a> {
        AddrState {
            me,
            addr: ip("198.19.8.30"),
            eligible,
            lease,
            held_since_renewal: None,
            takeable_since: None,
            now: at(now_ms),
            timing: timing(),
        }
    }

    #[test]
    fn a_dead_holders_lease_is_takeable_at_once_and_the_next_node_takes_it() {
        let held = view(Some("a"), 1_000);
        assert!(!takeable(Some(&held), "b", at(1_500)));
        let dead = nodes(&["a"]);
        let seen_dead = held.clone().unless_holder_dead(&dead, at(1_500));
        assert!(takeable(Some(&seen_dead), "b", at(1_500)));
        assert_eq!(
            held.clone().unless_holder_dead(&nodes(&["c"]), at(1_500)),
            held,
            "another node's death changes nothing"
        );
        // The dead holder is out of the eligible nodes (not alive): of b and c, the first
        // in the ranking without a takes it without waiting a step.
        let alive = nodes(&["b", "c"]);
        let first = ranking(&ip("198.19.8.30"), &alive, Some("a"))[0];
        let mut s = state(first, Some(&alive), Some(&seen_dead), 1_500);
        s.takeable_since = Some(at(1_500));
        assert_eq!(decide(&s), Action::Acquire);
    }

    #[test]
    fn takeable_when_absent_released_expired_or_own() {
        assert!(takeable(None, "a", at(0)));
        assert!(takeable(Some(&view(None, 0)), "a", at(0)));
        assert!(takeable(Some(&view(Some("a"), 0)), "a", at(0)));
        assert!(!takeable(Some(&view(Some("b"), 10_000)), "a", at(12_999)));
        assert!(takeable(Some(&view(Some("b"), 10_000)), "a", at(13_000)));
    }

    #[test]
    fn the_first_ranked_node_takes_a_free_lease_at_once_the_others_later() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let order = ranking(&ip("198.19.8.30"), &all, None);
        let now = 100_000;
        assert_eq!(
            decide(&state(order[0], Some(&all), None, now)),
            Action::Acquire
        );
        let mut second = state(order[1], Some(&all), None, now);
        second.takeable_since = Some(at(now - 999));
        assert_eq!(decide(&second), Action::Nothing, "waits one step (1 s)");
        second.takeable_since = Some(at(now - 1000));
        assert_eq!(decide(&second), Action::Acquire);
        let mut third = state(order[2], Some(&all), None, now);
        third.takeable_since = Some(at(now - 1500));
        assert_eq!(decide(&third), Action::Nothing, "waits two steps");
    }

    #[test]
    fn an_expired_holder_is_skipped_so_the_next_node_takes_over_at_once() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let order = ranking(&ip("198.19.8.30"), &all, None);
        let dead = view(Some(order[0]), 10_000);
        assert_eq!(
            decide(&state(order[1], Some(&all), Some(&dead), 12_999)),
            Action::Nothing,
            "not expired yet"
        );
        assert_eq!(
            decide(&state(order[1], Some(&all), Some(&dead), 13_000)),
            Action::Acquire
        );
        assert_eq!(
            decide(&state(order[2], Some(&all), Some(&dead), 13_000)),
            Action::Nothing
        );
        let mut released = view(None, 10_000);
        released.released_by = Some(order[0].to_string());
        assert_eq!(
            decide(&state(order[1], Some(&all), Some(&released), 10_001)),
            Action::Acquire
        );
    }

    #[test]
    fn a_node_restarting_takes_its_own_lease_back_at_once() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let order = ranking(&ip("198.19.8.30"), &all, None);
        let own = view(Some(order[2]), 10_000);
        assert_eq!(
            decide(&state(order[2], Some(&all), Some(&own), 11_000)),
            Action::Acquire
        );
        assert_eq!(
            decide(&state(order[0], Some(&all), Some(&own), 11_000)),
            Action::Nothing
        );
    }

    #[test]
    fn ineligible_nodes_never_acquire_and_holders_release() {
        let only_n2 = nodes(&["n2"]);
        assert_eq!(
            decide(&state("n1", Some(&only_n2), None, 0)),
            Action::Nothing
        );
        assert_eq!(decide(&state("n1", None, None, 0)), Action::Nothing);
        let lease = view(Some("n1"), 10_000);
        let mut held = state("n1", Some(&only_n2), Some(&lease), 10_500);
        held.held_since_renewal = Some(at(10_000));
        assert_eq!(decide(&held), Action::Release, "lost its local endpoints");
        held.eligible = None;
        assert_eq!(decide(&held), Action::Release, "address no longer wanted");
    }

    #[test]
    fn holders_renew_every_third_and_notice_losing_the_lease() {
        let all = nodes(&["n1", "n2"]);
        let lease = view(Some("n1"), 10_000);
        let mut s = state("n1", Some(&all), Some(&lease), 10_999);
        s.held_since_renewal = Some(at(10_000));
        assert_eq!(decide(&s), Action::Nothing);
        s.now = at(11_000);
        assert_eq!(decide(&s), Action::Renew);
        s.now = at(13_000);
        assert_eq!(
            decide(&s),
            Action::Lost,
            "no renewal for a whole lease duration"
        );
        let other = view(Some("n2"), 12_000);
        let mut t = state("n1", Some(&all), Some(&other), 12_100);
        t.held_since_renewal = Some(at(12_000));
        assert_eq!(decide(&t), Action::Lost);
        let stale_view = view(Some("n2"), 1_000);
        t.lease = Some(&stale_view);
        assert_eq!(
            decide(&t),
            Action::Nothing,
            "an expired older holder in the cache"
        );
    }

    /// The Lease of a holder whose clock runs 30 s ahead or behind this node's: only
    /// when this node saw it change counts, so it is taken one duration after that.
    #[test]
    fn a_skewed_holders_lease_expires_one_duration_after_it_was_seen_to_change() {
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let order = ranking(&ip("198.19.8.30"), &all, None);
        for skew_s in [30, -30] {
            let mut lease = k8s_openapi::api::coordination::v1::Lease::default();
            lease.metadata.resource_version = Some("5".into());
            lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(order[0].into()),
                lease_duration_seconds: Some(TIMING_S as i32),
                renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    k8s_openapi::jiff::Timestamp::now()
                        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(skew_s))
                        .expect("timestamp"),
                )),
                ..Default::default()
            });
            let seen = Observed::new(None, lease, at(10_000));
            let v = LeaseView::of(&seen);
            assert_eq!(
                decide(&state(order[1], Some(&all), Some(&v), 12_999)),
                Action::Nothing,
                "skew {skew_s}s: alive"
            );
            assert_eq!(
                decide(&state(order[1], Some(&all), Some(&v), 13_000)),
                Action::Acquire,
                "skew {skew_s}s: expired"
            );
        }
    }
}
