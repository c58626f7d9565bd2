//! What is programmed in the kernel, and the transactions that move it to the desired
//! state: a full one replacing both tables atomically, or an incremental one touching only
//! the map elements of the Services that changed. The record of what is programmed lives
//! here in memory; the kernel is never listed on the hot path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::model::{Family, NodeFacts, ServiceId};
use crate::proxy::nlnft::ElementChange;
use crate::proxy::ruleset::{self, ElemKey, Frontend, HealthCheck, MapName, ServiceRules};

/// How long to wait before retrying after `failures` consecutive failed transactions:
/// 1 s, doubling, at most `cap` (never less than 1 s). Changes arriving meanwhile wait
/// too: a transaction nft refuses must not be retried in a hot loop.
pub fn retry_delay(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_secs(1);
    let doubled = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(cap.max(base))
}

/// A change to apply: new rules of a Service, or `None` when it is gone.
pub type Changes = BTreeMap<ServiceId, Option<ServiceRules>>;

/// Element statements: a key and its value (None for a set element).
type ElementOps<'a> = Vec<(&'a ElemKey, Option<&'a String>)>;

/// A computed transaction and its side effects.
#[derive(Debug, Default)]
pub struct Plan {
    pub transaction: String,
    /// The change needs a chain only a full sync can add.
    pub needs_full: bool,
    /// (frontend, endpoint) pairs whose UDP conntrack entries must go after the commit.
    pub stale_udp: Vec<(Frontend, IpAddr)>,
    /// Map elements deleted + added.
    pub elements_changed: usize,
    /// An incremental transaction as element changes for the netlink path, or `None` when
    /// it also adds sets and rules (a new affinity timeout): then only `nft -f` of
    /// `transaction` applies it.
    pub elements: Option<ElementChange>,
}

/// The in-memory copy of what the kernel holds.
#[derive(Debug, Default)]
pub struct Programmed {
    /// Element → the Services contributing it and their values, sorted by Service; the
    /// first one wins. (A short Vec: almost every element has exactly one owner.)
    owners: HashMap<ElemKey, Vec<Owner>>,
    by_service: HashMap<ServiceId, ServiceRules>,
    chains: BTreeSet<(Family, usize)>,
    internal_chains: BTreeSet<(Family, usize)>,
    timeouts: BTreeSet<(Family, u32)>,
    node: NodeFacts,
}

type Owner = (Arc<ServiceId>, Option<String>);

fn effective(owners: Option<&Vec<Owner>>) -> Option<&Option<String>> {
    owners.and_then(|o| o.first()).map(|(_, v)| v)
}

fn backend_values(r: &ServiceRules) -> BTreeSet<&String> {
    r.elements
        .iter()
        .filter(|(k, _)| k.map == MapName::Backends)
        .filter_map(|(_, v)| v.as_ref())
        .collect()
}

fn stale_udp(old: &ServiceRules, new: Option<&ServiceRules>, out: &mut Vec<(Frontend, IpAddr)>) {
    for (fe, eps) in &old.udp_endpoints {
        let kept = new.and_then(|n| n.udp_endpoints.get(fe));
        for ep in eps {
            if !kept.is_some_and(|k| k.contains(ep)) {
                out.push((*fe, *ep));
            }
        }
    }
}

impl Programmed {
    /// The transaction replacing everything, and the record it leaves once committed.
    /// `previous` (the record before, if any) yields the stale UDP flows to clear.
    pub fn full(
        node: &NodeFacts,
        rules: BTreeMap<ServiceId, ServiceRules>,
        previous: Option<&Programmed>,
    ) -> (Plan, Programmed) {
        let transaction = ruleset::full_transaction(node, &rules);
        let mut stale = Vec::new();
        if let Some(prev) = previous {
            for (id, old) in &prev.by_service {
                stale_udp(old, rules.get(id), &mut stale);
            }
        }
        let mut p = Programmed {
            node: node.clone(),
            ..Default::default()
        };
        let mut count = 0;
        for (id, r) in rules {
            count += r.elements.len();
            p.insert(id, r);
        }
        (
            Plan {
                transaction,
                needs_full: false,
                stale_udp: stale,
                elements_changed: count,
                elements: None,
            },
            p,
        )
    }

    fn insert(&mut self, id: ServiceId, r: ServiceRules) {
        let shared = Arc::new(id.clone());
        for (k, v) in &r.elements {
            let owners = self.owners.entry(k.clone()).or_default();
            let at = owners.partition_point(|(o, _)| **o < id);
            owners.insert(at, (shared.clone(), v.clone()));
        }
        self.chains.extend(r.lb_chains.iter().copied());
        self.internal_chains
            .extend(r.internal_chains.iter().copied());
        self.timeouts.extend(r.timeouts.iter().copied());
        self.by_service.insert(id, r);
    }

    fn remove(&mut self, id: &ServiceId) {
        if let Some(old) = self.by_service.remove(id) {
            for k in old.elements.keys() {
                if let Some(o) = self.owners.get_mut(k) {
                    o.retain(|(owner, _)| **owner != *id);
                    if o.is_empty() {
                        self.owners.remove(k);
                    }
                }
            }
        }
    }

    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// Elements programmed now.
    pub fn element_count(&self) -> usize {
        self.owners.len()
    }

    /// Chains programmed now (the fixed ones plus `ep-N` and affinity timeout rules).
    pub fn lb_chain_count(&self) -> usize {
        self.chains.len() + self.internal_chains.len()
    }

    /// Health checks of ETP=Local Services, by port.
    pub fn health_checks(&self) -> BTreeMap<u16, (ServiceId, usize)> {
        let mut out = BTreeMap::new();
        for (id, r) in &self.by_service {
            if let Some(HealthCheck {
                port,
                local_endpoints,
            }) = &r.health_check
            {
                out.entry(*port).or_insert((id.clone(), *local_endpoints));
            }
        }
        out
    }

    /// For each touched element key, the value programmed now and the one after
    /// `changes` (the first Service by id wins a shared key); the keys whose value changes
    /// become a delete of the old value and an add of the new one.
    fn element_diff<'a>(
        &'a self,
        touched: BTreeSet<&'a ElemKey>,
        changes: &'a Changes,
    ) -> (ElementOps<'a>, ElementOps<'a>) {
        let (mut deletes, mut adds) = (Vec::new(), Vec::new());
        for key in touched {
            let owners = self.owners.get(key);
            let before = effective(owners);
            let mut after: Option<(&ServiceId, &Option<String>)> = owners.and_then(|o| {
                o.iter()
                    .find(|(id, _)| !changes.contains_key(&**id))
                    .map(|(id, v)| (&**id, v))
            });
            for (id, new) in changes {
                if let Some(v) = new.as_ref().and_then(|n| n.elements.get(key))
                    && after.is_none_or(|(first, _)| id < first)
                {
                    after = Some((id, v));
                }
            }
            let after = after.map(|(_, v)| v);
            if before != after {
                if let Some(b) = before {
                    deletes.push((key, b.as_ref()));
                }
                if let Some(a) = after {
                    adds.push((key, a.as_ref()));
                }
            }
        }
        (deletes, adds)
    }

    /// The transaction moving the kernel from this record to this record + `changes`.
    pub fn plan_incremental(&self, changes: &Changes) -> Plan {
        let mut touched: BTreeSet<&ElemKey> = BTreeSet::new();
        let mut new_chains = BTreeSet::new();
        let mut new_timeouts = BTreeSet::new();
        let mut flush_affinity = false;
        let mut stale = Vec::new();
        for (id, new) in changes {
            let old = self.by_service.get(id);
            if let Some(old) = old {
                touched.extend(old.elements.keys());
                stale_udp(old, new.as_ref(), &mut stale);
                if old.affinity {
                    let kept = new.as_ref().map(backend_values).unwrap_or_default();
                    // Affinity entries may point at an endpoint that is gone.
                    flush_affinity |= !backend_values(old).is_subset(&kept);
                }
            }
            if let Some(new) = new {
                touched.extend(new.elements.keys());
                new_chains.extend(new.lb_chains.difference(&self.chains).copied());
                new_chains.extend(
                    new.internal_chains
                        .difference(&self.internal_chains)
                        .copied(),
                );
                new_timeouts.extend(new.timeouts.difference(&self.timeouts).copied());
            }
        }
        let (deletes, adds) = self.element_diff(touched, changes);
        // IPv6 affinity sets and chains are created and deleted by full syncs only.
        let none = ruleset::Affinity6::default();
        let affinity6_changed = changes.iter().any(|(id, new)| {
            let old = self.by_service.get(id).map_or(&none, |o| &o.affinity6);
            old != new.as_ref().map_or(&none, |n| &n.affinity6)
        });
        let needs_full = affinity6_changed
            || new_chains
                .iter()
                .any(|(_, n)| *n > ruleset::PRECREATED_LB_CHAINS);
        let mut tx = String::new();
        for (f, t) in &new_timeouts {
            tx.push_str(&ruleset::timeout_set(*f, *t));
        }
        if flush_affinity {
            for f in [Family::V4, Family::V6] {
                tx.push_str(&format!(
                    "flush map {} {} affinity\n",
                    ruleset::table_family(f),
                    ruleset::TABLE
                ));
            }
        }
        let elements_changed = deletes.len() + adds.len();
        let owned = |ops: &ElementOps| -> Vec<(ElemKey, Option<String>)> {
            ops.iter()
                .map(|(k, v)| ((*k).clone(), v.cloned()))
                .collect()
        };
        let elements = new_timeouts.is_empty().then(|| ElementChange {
            flush: if flush_affinity {
                vec![(Family::V4, "affinity"), (Family::V6, "affinity")]
            } else {
                Vec::new()
            },
            deletes: owned(&deletes),
            adds: owned(&adds),
        });
        tx.push_str(&ruleset::element_statements("delete", deletes));
        tx.push_str(&ruleset::element_statements("add", adds));
        Plan {
            transaction: tx,
            needs_full,
            stale_udp: stale,
            elements_changed,
            elements,
        }
    }

    /// The rules recorded, per Service.
    #[cfg(test)]
    pub fn rules(&self) -> BTreeMap<ServiceId, ServiceRules> {
        self.by_service
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    /// Records `changes` as programmed (after their transaction committed).
    pub fn commit(&mut self, changes: Changes) {
        for (id, new) in changes {
            self.remove(&id);
            if let Some(r) = new {
                self.insert(id, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{Endpoint, Model, Protocol, Service, Slice};
    use crate::proxy::ruleset::all_rules;

    fn node() -> NodeFacts {
        NodeFacts::test("n1", "198.18.1.10")
    }

    fn svc(name: &str, ip: &str) -> Service {
        Service::test("ns", name, ip).with_port("", Protocol::Udp, 53)
    }

    fn rules(s: &Service, eps: &[&str]) -> ServiceRules {
        let slice = eps
            .iter()
            .fold(Slice::test(s).with_port("", Protocol::Udp, 53), |sl, e| {
                sl.with(Endpoint::test(e, "n2"))
            });
        ruleset::service_rules(s, [slice].iter(), &node())
    }

    fn base() -> Programmed {
        let a = svc("a", "10.96.0.1");
        let m = Model::test(node()).with_service(a.clone()).with_slice(
            "a",
            Slice::test(&a)
                .with_port("", Protocol::Udp, 53)
                .with(Endpoint::test("10.244.2.2", "n2")),
        );
        Programmed::full(&node(), all_rules(&m), None).1
    }

    #[test]
    fn unchanged_service_gives_an_empty_transaction() {
        let p = base();
        let a = svc("a", "10.96.0.1");
        let changes = Changes::from([(a.id.clone(), Some(rules(&a, &["10.244.2.2"])))]);
        let plan = p.plan_incremental(&changes);
        assert_eq!(plan.transaction, "");
        assert!(plan.stale_udp.is_empty());
    }

    #[test]
    fn replaced_endpoint_updates_only_its_elements_and_clears_conntrack() {
        let p = base();
        let a = svc("a", "10.96.0.1");
        let changes = Changes::from([(a.id.clone(), Some(rules(&a, &["10.244.2.9"])))]);
        let plan = p.plan_incremental(&changes);
        assert_eq!(
            plan.transaction,
            "delete element ip berth backends { 10.96.0.1 . udp . 53 . 0 }\n\
             add element ip berth backends { 10.96.0.1 . udp . 53 . 0 : 10.244.2.9 . 53 }\n"
        );
        assert_eq!(plan.stale_udp.len(), 1);
        assert_eq!(
            plan.stale_udp[0].1,
            "10.244.2.2".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn endpoint_counts_beyond_the_precreated_chains_need_a_full_sync() {
        let p = base();
        let a = svc("a", "10.96.0.1");
        let two = Changes::from([(a.id.clone(), Some(rules(&a, &["10.244.2.2", "10.244.2.3"])))]);
        let plan = p.plan_incremental(&two);
        assert!(plan.transaction.contains("goto ep-2"));
        assert!(!plan.needs_full);
        let many: Vec<String> = (1..=70).map(|i| format!("10.244.2.{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let big = Changes::from([(a.id.clone(), Some(rules(&a, &refs)))]);
        assert!(p.plan_incremental(&big).needs_full);
    }

    #[test]
    fn deleted_service_removes_its_elements_and_shared_ones_stay() {
        let mut p = base();
        let mut b = svc("b", "10.96.0.2");
        b.cluster_ips = vec!["10.96.0.2".parse().expect("ip")];
        let added = Changes::from([(b.id.clone(), Some(rules(&b, &["10.244.2.2"])))]);
        p.commit(added);
        let before = p.element_count();
        let gone = Changes::from([(b.id.clone(), None)]);
        let plan = p.plan_incremental(&gone);
        assert!(plan.transaction.starts_with("delete element"));
        assert!(!plan.transaction.contains("add element"));
        assert!(!plan.transaction.contains("10.96.0.1"));
        p.commit(gone);
        assert!(p.element_count() < before);
        assert_eq!(p.element_count(), base().element_count());
    }

    #[test]
    fn conflicting_keys_resolve_to_the_first_service() {
        let mut p = base();
        // b claims a's ClusterIP and port: a keeps it while it exists, then b takes over.
        let b = svc("b", "10.96.0.1");
        let changes = Changes::from([(b.id.clone(), Some(rules(&b, &["10.244.2.7"])))]);
        assert_eq!(p.plan_incremental(&changes).transaction, "");
        p.commit(changes);
        let a_gone = Changes::from([(ServiceId::new("ns", "a"), None)]);
        let plan = p.plan_incremental(&a_gone);
        assert!(plan.transaction.contains(
            "add element ip berth backends { 10.96.0.1 . udp . 53 . 0 : 10.244.2.7 . 53 }"
        ));
    }

    #[test]
    fn affinity_is_flushed_only_when_an_endpoint_goes() {
        let mut a = svc("a", "10.96.0.1");
        a.affinity_timeout = Some(30);
        let mut p = Programmed::default();
        p.commit(Changes::from([(
            a.id.clone(),
            Some(rules(&a, &["10.244.2.2"])),
        )]));
        let grow = Changes::from([(a.id.clone(), Some(rules(&a, &["10.244.2.2", "10.244.2.3"])))]);
        assert!(!p.plan_incremental(&grow).transaction.contains("flush map"));
        let shrink = Changes::from([(a.id.clone(), Some(rules(&a, &["10.244.2.3"])))]);
        assert!(
            p.plan_incremental(&shrink)
                .transaction
                .contains("flush map ip berth affinity")
        );
    }

    #[test]
    fn ipv6_affinity_sets_and_chains_change_by_full_syncs() {
        let mut a = svc("a", "fd00:96::1");
        a.affinity_timeout = Some(30);
        let mut p = Programmed::default();
        let one = rules(&a, &["fd00:244::2"]);
        assert!(!one.affinity6.sets.is_empty());
        let added = Changes::from([(a.id.clone(), Some(one.clone()))]);
        assert!(p.plan_incremental(&added).needs_full);
        p.commit(added);
        let same = Changes::from([(a.id.clone(), Some(one))]);
        assert!(!p.plan_incremental(&same).needs_full);
        let grow = Changes::from([(
            a.id.clone(),
            Some(rules(&a, &["fd00:244::2", "fd00:244::3"])),
        )]);
        assert!(p.plan_incremental(&grow).needs_full);
        assert!(
            p.plan_incremental(&Changes::from([(a.id.clone(), None)]))
                .needs_full
        );
        // Without affinity IPv6 Services stay on the incremental path.
        let b = svc("b", "fd00:96::2");
        let plain = Changes::from([(b.id.clone(), Some(rules(&b, &["fd00:244::4"])))]);
        assert!(!p.plan_incremental(&plain).needs_full);
    }

    #[test]
    fn retries_back_off_up_to_the_cap() {
        let cap = Duration::from_secs(30);
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n, cap).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_delay(u32::MAX, cap), cap);
        assert_eq!(retry_delay(3, Duration::ZERO), Duration::from_secs(1));
    }

    #[test]
    fn health_checks_are_indexed_by_port() {
        let mut s = svc("a", "10.96.0.1");
        s.external_local = true;
        s.health_check_node_port = Some(31000);
        let mut p = Programmed::default();
        p.commit(Changes::from([(
            s.id.clone(),
            Some(rules(&s, &["10.244.2.2"])),
        )]));
        assert_eq!(p.health_checks().get(&31000), Some(&(s.id.clone(), 0)));
    }
}
