//! The in-memory index fed by watch events: the model, which Services changed since the
//! last sync, and whether every watch has delivered its first list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Instant;

use berth_crds::addresses::AddressPool;

use crate::proxy::claims::{self, Age, Claimant, Context, Policy, Refusal, Verdict};
use crate::proxy::model::{Cidr, Model, NodeFacts, Service, ServiceId, Slice};

/// Static configuration of the node facts.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    pub name: String,
    /// `--node-addresses`; empty means the Node's InternalIPs.
    pub addresses: Vec<IpAddr>,
    pub cluster_cidrs: Vec<Cidr>,
    pub service_cidrs: Vec<Cidr>,
}

/// A resource kind whose first list must arrive before the first sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Services,
    Slices,
    Node,
    /// Every Node's addresses (externalIPs equal to one are refused).
    Nodes,
}

/// What the index knows of another Node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// InternalIPs and ExternalIPs.
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
}

/// The refused claims of one Service, for its Warning Events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub uid: String,
    pub refusals: BTreeSet<Refusal>,
}

#[derive(Debug)]
pub struct Index {
    /// The programmable view: Services as [`claims::resolve`] left them.
    pub model: Model,
    config: NodeConfig,
    /// Services as the API holds them, with their age.
    raw: BTreeMap<ServiceId, (Service, Age)>,
    policy: Policy,
    nodes: BTreeMap<String, NodeInfo>,
    pools: BTreeMap<String, AddressPool>,
    /// [`claims::rule_estimate`] of each Service, refreshed for those in `estimate_stale`.
    estimates: HashMap<ServiceId, usize>,
    estimate_stale: BTreeSet<ServiceId>,
    /// Something claims depend on changed: resolve again before the next sync.
    claims_dirty: bool,
    findings: BTreeMap<ServiceId, Findings>,
    findings_generation: u64,
    relisting_nodes: Option<BTreeSet<String>>,
    node_ips: Vec<IpAddr>,
    /// This Node's `topology.kubernetes.io/zone` label.
    zone: Option<String>,
    dirty: BTreeSet<ServiceId>,
    node_changed: bool,
    /// When the oldest EndpointSlice change not yet programmed arrived.
    pending_since: Option<Instant>,
    listed: BTreeSet<Kind>,
    relisting_services: Option<BTreeSet<ServiceId>>,
    relisting_slices: Option<BTreeSet<(String, String)>>,
}

/// What a sync must do, taken from the index.
#[derive(Debug, PartialEq, Eq)]
pub enum Work {
    Nothing,
    Full,
    Services(BTreeSet<ServiceId>),
}

impl Index {
    pub fn new(config: NodeConfig) -> Self {
        let mut idx = Self {
            model: Model::default(),
            config,
            raw: BTreeMap::new(),
            policy: Policy::default(),
            nodes: BTreeMap::new(),
            pools: BTreeMap::new(),
            estimates: HashMap::new(),
            estimate_stale: BTreeSet::new(),
            claims_dirty: false,
            findings: BTreeMap::new(),
            findings_generation: 0,
            relisting_nodes: None,
            node_ips: Vec::new(),
            zone: None,
            dirty: BTreeSet::new(),
            node_changed: true,
            pending_since: None,
            listed: BTreeSet::new(),
            relisting_services: None,
            relisting_slices: None,
        };
        idx.model.node = idx.node_facts();
        idx
    }

    fn node_facts(&self) -> NodeFacts {
        let addresses = if self.config.addresses.is_empty() {
            self.node_ips.clone()
        } else {
            self.config.addresses.clone()
        };
        NodeFacts {
            name: self.config.name.clone(),
            addresses,
            cluster_cidrs: self.config.cluster_cidrs.clone(),
            service_cidrs: self.config.service_cidrs.clone(),
            zone: self.zone.clone(),
        }
    }

    /// Every watch has listed once: syncing now cannot wipe rules of unseen Services.
    pub fn ready(&self) -> bool {
        self.listed.len() == 4
    }

    /// The operator's claim rules (flags); [`Policy::default`] until set.
    pub fn set_policy(&mut self, policy: Policy) {
        if policy != self.policy {
            self.policy = policy;
            self.claims_dirty = true;
        }
    }

    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    pub fn set_node_ips(&mut self, ips: Vec<IpAddr>) {
        if ips != self.node_ips {
            self.node_ips = ips;
            let facts = self.node_facts();
            if facts != self.model.node {
                self.model.node = facts;
                self.node_changed = true;
                // NodePort counts and frontends depend on the node's addresses.
                self.estimate_stale.extend(self.raw.keys().cloned());
                self.claims_dirty = true;
            }
        }
    }

    /// This Node's zone changed: every Service with zone hints may pick other endpoints.
    pub fn set_node_zone(&mut self, zone: Option<String>) {
        if zone != self.zone {
            self.zone = zone;
            self.model.node = self.node_facts();
            self.node_changed = true;
        }
    }

    pub fn begin_relist(&mut self, kind: Kind) {
        match kind {
            Kind::Services => self.relisting_services = Some(BTreeSet::new()),
            Kind::Slices => self.relisting_slices = Some(BTreeSet::new()),
            Kind::Nodes => self.relisting_nodes = Some(BTreeSet::new()),
            Kind::Node => {}
        }
    }

    /// The first (or a new) list of `kind` is complete: drop what it no longer holds.
    pub fn end_relist(&mut self, kind: Kind) {
        match kind {
            Kind::Services => {
                if let Some(seen) = self.relisting_services.take() {
                    let gone: Vec<ServiceId> = self
                        .raw
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for id in gone {
                        self.delete_service(&id);
                    }
                }
            }
            Kind::Slices => {
                if let Some(seen) = self.relisting_slices.take() {
                    let gone: Vec<(String, String)> = self
                        .model
                        .slice_keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.delete_slice(&key.0, &key.1);
                    }
                }
            }
            Kind::Nodes => {
                if let Some(seen) = self.relisting_nodes.take() {
                    let gone: Vec<String> = self
                        .nodes
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for name in gone {
                        self.apply_cluster_node(&name, None);
                    }
                }
            }
            Kind::Node => {}
        }
        self.listed.insert(kind);
    }

    /// A Service was added or changed; `None` when it is not proxied (e.g. ExternalName).
    /// Without a known age it counts as the newest Service.
    pub fn apply_service(&mut self, id: ServiceId, svc: Option<Service>) {
        self.apply_service_aged(id, svc, Age::default());
    }

    /// A Service was added or changed, with its creationTimestamp and uid.
    pub fn apply_service_aged(&mut self, id: ServiceId, svc: Option<Service>, age: Age) {
        if let Some(seen) = self.relisting_services.as_mut() {
            seen.insert(id.clone());
        }
        match svc {
            Some(s) => {
                let entry = (s, age);
                if self.raw.get(&id) != Some(&entry) {
                    self.raw.insert(id.clone(), entry);
                    self.estimate_stale.insert(id);
                    self.claims_dirty = true;
                }
            }
            None => self.delete_service(&id),
        }
    }

    pub fn delete_service(&mut self, id: &ServiceId) {
        if self.raw.remove(id).is_some() {
            self.estimates.remove(id);
            self.claims_dirty = true;
        }
        if self.model.services.remove(id).is_some() {
            self.dirty.insert(id.clone());
        }
    }

    /// Another Node (or this one) appeared, changed (`Some`) or went away (`None`).
    pub fn apply_cluster_node(&mut self, name: &str, info: Option<NodeInfo>) {
        if let Some(seen) = self.relisting_nodes.as_mut() {
            seen.insert(name.to_string());
        }
        let changed = match info {
            Some(i) => self.nodes.insert(name.to_string(), i.clone()) != Some(i),
            None => self.nodes.remove(name).is_some(),
        };
        self.claims_dirty |= changed;
    }

    /// Names of the Ready Nodes (every known Node when none is Ready).
    pub fn ready_nodes(&self) -> Vec<String> {
        let ready: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, i)| i.ready)
            .map(|(n, _)| n.clone())
            .collect();
        if ready.is_empty() {
            self.nodes.keys().cloned().collect()
        } else {
            ready
        }
    }

    /// The pool LoadBalancerClasses' addresses, by class name (all of them, replacing).
    pub fn set_pools(&mut self, pools: BTreeMap<String, AddressPool>) {
        if self.pools != pools {
            self.pools = pools;
            self.claims_dirty = true;
        }
    }

    /// The refused claims of each Service, and a number that changes when they do.
    pub fn findings(&self) -> (u64, &BTreeMap<ServiceId, Findings>) {
        (self.findings_generation, &self.findings)
    }

    /// A slice was added or changed; `None` when it belongs to no Service.
    pub fn apply_slice(&mut self, namespace: &str, name: &str, slice: Option<Slice>) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(seen) = self.relisting_slices.as_mut() {
            seen.insert(key.clone());
        }
        let old = match slice {
            Some(s) => {
                if self.model.slice(namespace, name) == Some(&s) {
                    return;
                }
                self.dirty.insert(s.service.clone());
                self.estimate_stale.insert(s.service.clone());
                self.model.insert_slice(namespace, name, s)
            }
            None => self.model.remove_slice(namespace, name),
        };
        if let Some(old) = old {
            self.estimate_stale.insert(old.service.clone());
            self.dirty.insert(old.service);
        }
        self.pending_since.get_or_insert_with(Instant::now);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.model.remove_slice(namespace, name) {
            self.estimate_stale.insert(old.service.clone());
            self.dirty.insert(old.service);
            self.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// Decides every claim again and brings the model's Services in line: those whose
    /// programmable form changed become dirty.
    fn resolve_claims(&mut self) {
        // Endpoint churn only resizes Services: claims are decided again (a pass over
        // every Service) only when one crosses the budget.
        let node_count = self.model.node.addresses.len();
        let max = self.policy.max_rules_per_service;
        for id in std::mem::take(&mut self.estimate_stale) {
            if let Some((svc, _)) = self.raw.get(&id) {
                let n = claims::rule_estimate(svc, self.model.slices_of(&id), node_count);
                if self.estimates.insert(id, n).map(|old| old > max) != Some(n > max) {
                    self.claims_dirty = true;
                }
            }
        }
        if !self.claims_dirty {
            return;
        }
        self.claims_dirty = false;
        let node_addresses: BTreeSet<IpAddr> = self
            .nodes
            .values()
            .flat_map(|i| i.addresses.iter().copied())
            .collect();
        let ctx = Context {
            node: &self.model.node,
            node_addresses: &node_addresses,
            pools: &self.pools,
            policy: &self.policy,
        };
        let claimants = self.raw.iter().map(|(id, (svc, age))| Claimant {
            svc,
            age,
            rules: self.estimates.get(id).copied().unwrap_or(0),
        });
        let resolution = claims::resolve(claimants, &ctx);
        for (id, (svc, _)) in &self.raw {
            let want = match resolution.verdicts.get(id) {
                None => Some(svc),
                Some(Verdict::Skip) => None,
                Some(Verdict::Trim(s)) => Some(&**s),
            };
            if self.model.services.get(id) != want {
                match want {
                    Some(s) => self.model.services.insert(id.clone(), s.clone()),
                    None => self.model.services.remove(id),
                };
                self.dirty.insert(id.clone());
            }
        }
        let findings: BTreeMap<ServiceId, Findings> = resolution
            .refusals
            .into_iter()
            .map(|(id, refusals)| {
                let uid = self
                    .raw
                    .get(&id)
                    .map(|(_, a)| a.uid.clone())
                    .unwrap_or_default();
                (id, Findings { uid, refusals })
            })
            .collect();
        if findings != self.findings {
            self.findings = findings;
            self.findings_generation += 1;
        }
    }

    /// Takes the pending work; `force_full` after a failure or at start.
    pub fn take_work(&mut self, force_full: bool) -> Work {
        self.resolve_claims();
        if force_full || self.node_changed {
            self.node_changed = false;
            self.dirty.clear();
            return Work::Full;
        }
        if self.dirty.is_empty() {
            return Work::Nothing;
        }
        Work::Services(std::mem::take(&mut self.dirty))
    }

    /// The changes are programmed: the latency clock stops.
    pub fn synced(&mut self) -> Option<Instant> {
        self.pending_since.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::Protocol;

    fn idx() -> Index {
        Index::new(NodeConfig {
            name: "n1".into(),
            ..Default::default()
        })
    }

    fn web() -> Service {
        Service::test("ns", "web", "10.96.0.1").with_port("", Protocol::Tcp, 80)
    }

    #[test]
    fn not_ready_until_every_watch_listed() {
        let mut i = idx();
        i.end_relist(Kind::Services);
        i.end_relist(Kind::Slices);
        i.end_relist(Kind::Node);
        assert!(!i.ready());
        i.end_relist(Kind::Nodes);
        assert!(i.ready());
    }

    #[test]
    fn first_work_is_full_then_only_changed_services() {
        let mut i = idx();
        assert_eq!(i.take_work(false), Work::Full);
        assert_eq!(i.take_work(false), Work::Nothing);
        let s = web();
        i.apply_service(s.id.clone(), Some(s.clone()));
        i.apply_service(s.id.clone(), Some(s.clone()));
        assert_eq!(
            i.take_work(false),
            Work::Services(BTreeSet::from([s.id.clone()]))
        );
        i.apply_service(s.id.clone(), Some(s.clone()));
        assert_eq!(
            i.take_work(false),
            Work::Nothing,
            "unchanged object is no work"
        );
        assert_eq!(i.take_work(true), Work::Full);
    }

    #[test]
    fn slice_changes_dirty_their_service_and_start_the_latency_clock() {
        let mut i = idx();
        i.take_work(false);
        let s = web();
        i.apply_slice("ns", "web-1", Some(Slice::test(&s)));
        assert!(i.pending_since().is_some());
        assert_eq!(
            i.take_work(false),
            Work::Services(BTreeSet::from([s.id.clone()]))
        );
        assert!(i.synced().is_some());
        i.delete_slice("ns", "web-1");
        assert_eq!(
            i.take_work(false),
            Work::Services(BTreeSet::from([s.id.clone()]))
        );
    }

    #[test]
    fn relist_drops_objects_that_disappeared() {
        let mut i = idx();
        let s = web();
        i.apply_service(s.id.clone(), Some(s.clone()));
        i.apply_slice("ns", "web-1", Some(Slice::test(&s)));
        i.take_work(false);
        assert_eq!(i.model.services.len(), 1);
        i.begin_relist(Kind::Services);
        i.begin_relist(Kind::Slices);
        i.end_relist(Kind::Services);
        i.end_relist(Kind::Slices);
        assert!(i.model.services.is_empty());
        assert_eq!(i.model.slice_count(), 0);
        assert_eq!(i.take_work(false), Work::Services(BTreeSet::from([s.id])));
    }

    #[test]
    fn node_address_change_forces_a_full_sync_unless_overridden() {
        let mut i = idx();
        i.take_work(false);
        i.set_node_ips(vec!["198.18.1.10".parse().expect("ip")]);
        assert_eq!(i.model.node.addresses.len(), 1);
        assert_eq!(i.take_work(false), Work::Full);
        let mut fixed = Index::new(NodeConfig {
            name: "n1".into(),
            addresses: vec!["198.18.9.9".parse().expect("ip")],
            ..Default::default()
        });
        fixed.take_work(false);
        fixed.set_node_ips(vec!["198.18.1.10".parse().expect("ip")]);
        assert_eq!(fixed.take_work(false), Work::Nothing);
        assert_eq!(
            fixed.model.node.addresses,
            vec!["198.18.9.9".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn node_zone_change_forces_a_full_sync_once() {
        let mut i = idx();
        i.take_work(false);
        i.set_node_zone(Some("us-east-1a".into()));
        assert_eq!(i.model.node.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(i.take_work(false), Work::Full);
        i.set_node_zone(Some("us-east-1a".into()));
        assert_eq!(i.take_work(false), Work::Nothing);
        // The zone survives a change of the node's addresses.
        i.set_node_ips(vec!["198.18.1.10".parse().expect("ip")]);
        assert_eq!(i.model.node.zone.as_deref(), Some("us-east-1a"));
        i.set_node_zone(None);
        assert_eq!(i.take_work(false), Work::Full);
        assert_eq!(i.model.node.zone, None);
    }

    fn aged(ns: &str, name: &str, created: i64) -> (Service, Age) {
        let mut s =
            Service::test(ns, name, &format!("10.96.0.{created}")).with_port("", Protocol::Tcp, 80);
        s.load_balancer_ips = vec!["198.19.0.7".parse().expect("ip")];
        let age = Age {
            created: Some(created),
            uid: name.into(),
        };
        (s, age)
    }

    #[test]
    fn the_loser_of_a_claim_gets_the_address_back_when_the_winner_goes() {
        let mut i = idx();
        i.take_work(false);
        let (old, old_age) = aged("zzz", "old", 1);
        let (new, new_age) = aged("aaa", "new", 2);
        i.apply_service_aged(new.id.clone(), Some(new.clone()), new_age);
        i.apply_service_aged(old.id.clone(), Some(old.clone()), old_age);
        assert_eq!(
            i.take_work(false),
            Work::Services(BTreeSet::from([old.id.clone(), new.id.clone()]))
        );
        assert!(i.model.services[&new.id].load_balancer_ips.is_empty());
        assert_eq!(i.model.services[&old.id], old);
        let (generation, findings) = i.findings();
        assert_eq!(findings.keys().collect::<Vec<_>>(), vec![&new.id]);
        assert_eq!(findings[&new.id].uid, "new");
        i.delete_service(&old.id);
        assert_eq!(
            i.take_work(false),
            Work::Services(BTreeSet::from([old.id.clone(), new.id.clone()]))
        );
        assert_eq!(i.model.services[&new.id], new);
        let (later, findings) = i.findings();
        assert!(findings.is_empty() && later != generation);
    }

    #[test]
    fn a_service_grown_over_budget_by_its_slices_is_dropped_from_the_model() {
        let mut i = idx();
        i.set_policy(Policy {
            max_rules_per_service: 10,
            ..Policy::default()
        });
        let s = web();
        i.apply_service(s.id.clone(), Some(s.clone()));
        i.take_work(false);
        assert!(i.model.services.contains_key(&s.id));
        let mut slice = Slice::test(&s).with_port("", Protocol::Tcp, 8080);
        for n in 0..10 {
            slice = slice.with(crate::proxy::model::Endpoint::test(
                &format!("10.244.1.{n}"),
                "n1",
            ));
        }
        i.apply_slice("ns", "web-1", Some(slice));
        assert_eq!(
            i.take_work(false),
            Work::Services(BTreeSet::from([s.id.clone()]))
        );
        assert!(!i.model.services.contains_key(&s.id));
        assert_eq!(
            i.findings().1[&s.id]
                .refusals
                .iter()
                .map(|r| r.reason)
                .collect::<Vec<_>>(),
            vec![claims::Reason::OverBudget]
        );
        i.delete_slice("ns", "web-1");
        i.take_work(false);
        assert!(i.model.services.contains_key(&s.id));
    }

    #[test]
    fn a_node_address_learned_later_refuses_an_external_ip() {
        let mut i = idx();
        i.set_policy(Policy {
            external_ip_cidrs: vec!["0.0.0.0/0".parse().expect("cidr")],
            ..Policy::default()
        });
        let mut s = web();
        s.external_ips = vec!["198.18.1.12".parse().expect("ip")];
        i.apply_service(s.id.clone(), Some(s.clone()));
        i.take_work(false);
        assert_eq!(i.model.services[&s.id].external_ips.len(), 1);
        i.apply_cluster_node(
            "n2",
            Some(NodeInfo {
                addresses: vec!["198.18.1.12".parse().expect("ip")],
                ready: true,
            }),
        );
        i.take_work(false);
        assert!(i.model.services[&s.id].external_ips.is_empty());
        assert_eq!(i.ready_nodes(), vec!["n2".to_string()]);
    }
}
