//! The pool provider: addresses from a class's ranges, allocated from Service status
//! ([`allocation`]). It owns this process's reservations (its status writes the Service
//! store has not shown yet) and the Services waiting for an address to free up.

pub mod allocation;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_crds::LoadBalancerClass;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::provider::{
    Ingress, Note, Outcome, Provider, Readiness, Report, Settle, Verdict, ip_ingress,
};
use crate::reason;
use crate::stores::{Stores, Trigger};
use allocation::{Holder, Outcome as Allocation, Pool, PoolClass, Reservations};

/// What the provider remembers between reconciles.
struct State {
    /// The lock is held for every allocation, so concurrent reconciles never hand out one
    /// address twice.
    reservations: Mutex<Reservations>,
    /// Pool Services waiting for an address to free up.
    pending: Mutex<HashSet<ObjectRef<Service>>>,
    trigger: Trigger,
}

impl State {
    /// Queues every pool Service waiting for an address (one was just released).
    fn retrigger_pending(&self) {
        let waiting: Vec<ObjectRef<Service>> = self
            .pending
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        for r in waiting {
            let _ = self.trigger.unbounded_send(r);
        }
    }

    fn set_pending(&self, r: ObjectRef<Service>, waiting: bool) {
        if let Ok(mut p) = self.pending.lock() {
            if waiting {
                p.insert(r);
            } else {
                p.remove(&r);
            }
        }
    }

    /// The Service `uid` holds `ips` now (its status says so, or it is gone: none).
    fn hold(&self, uid: &str, ips: Vec<IpAddr>) {
        if let Ok(mut r) = self.reservations.lock() {
            r.set(uid, ips);
        }
    }
}

pub struct PoolProvider {
    stores: Stores,
    state: Arc<State>,
}

fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().unwrap_or_default()
}

/// Whether `name` is a pool class (it exists and has a pool block).
pub fn is_pool_class(classes: &[Arc<LoadBalancerClass>], name: &str) -> bool {
    classes
        .iter()
        .any(|c| c.name_any() == name && c.spec.pool.is_some())
}

/// Every Service holding pool addresses, with this process's unsettled writes applied.
/// Call with the reservations locked.
pub fn pool_holders(
    services: &[Arc<Service>],
    classes: &[Arc<LoadBalancerClass>],
    reservations: &mut Reservations,
) -> Vec<Holder> {
    let by_uid: HashMap<&str, &Service> = services
        .iter()
        .filter_map(|s| Some((s.metadata.uid.as_deref()?, s.as_ref())))
        .collect();
    reservations.prune(|uid| by_uid.get(uid).map(|s| allocation::status_ips(s)));
    let held = allocation::holders(services.iter().map(|s| s.as_ref()), |c| {
        is_pool_class(classes, c)
    });
    reservations.apply(held, |uid| by_uid.get(uid).map(|s| Holder::of(s)))
}

/// The addresses a Service that no pool class served yet brings along: its status
/// addresses, written by the implementation that served it before (e.g. MetalLB or
/// Cilium), so taking it over keeps its address. Like any held address, one is kept only
/// when it is in the class's pool and free; otherwise the Service gets another and an
/// `AddressMoved` Event says why. Pure.
fn taken_over(svc: &Service, classes: &[Arc<LoadBalancerClass>]) -> Vec<IpAddr> {
    let served = svc
        .annotations()
        .get(berth_crds::ANNOTATION_OWNER_CLASS)
        .is_some_and(|c| is_pool_class(classes, c));
    if served {
        return Vec::new();
    }
    allocation::status_ips(svc)
}

/// The condition, addresses and moves an allocation gives. Pure.
fn readiness_of(
    allocation: &Allocation,
    class: &str,
) -> (Readiness, Vec<IpAddr>, Vec<(IpAddr, IpAddr, String)>) {
    match allocation {
        Allocation::Assigned { ips, moved } => {
            let list: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            let noun = if ips.len() == 1 {
                "address"
            } else {
                "addresses"
            };
            let message = format!("{noun} {} from pool {class}", list.join(", "));
            (Readiness::ready(message), ips.clone(), moved.clone())
        }
        Allocation::Unassigned { reason, message } => (
            Readiness::not_ready(reason, message.clone()),
            Vec::new(),
            Vec::new(),
        ),
    }
}

/// Whether the Service waits for an address someone else may free.
fn waits_for_address(allocation: &Allocation) -> bool {
    use allocation::reason::{
        ADDRESS_UNAVAILABLE, POOL_EXHAUSTED, PORT_CONFLICT, TRAFFIC_POLICY_CONFLICT,
    };
    matches!(
        allocation,
        Allocation::Unassigned { reason, .. }
            if [POOL_EXHAUSTED, PORT_CONFLICT, ADDRESS_UNAVAILABLE, TRAFFIC_POLICY_CONFLICT]
                .contains(reason)
    )
}

/// A node's address: (node, address).
pub type NodeAddress = (String, IpAddr);

/// Every node's InternalIP and ExternalIP addresses. Pure.
pub fn node_addresses(nodes: &[Arc<Node>]) -> Vec<NodeAddress> {
    nodes
        .iter()
        .flat_map(|n| {
            let name = n.name_any();
            n.status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(move |a| Some((name.clone(), a.address.trim().parse().ok()?)))
        })
        .collect()
}

/// Why nothing may be allocated from `pool`: it contains node addresses (an allocated
/// one would take over that node's traffic, and announcing it would fight the node over
/// its own address). `None` when it contains none. Pure.
pub fn node_address_conflict(pool: &Pool, nodes: &[NodeAddress]) -> Option<String> {
    let mut hits: Vec<String> = nodes
        .iter()
        .filter(|(_, ip)| pool.contains(ip))
        .map(|(node, ip)| format!("{ip} of Node {node}"))
        .collect();
    if hits.is_empty() {
        return None;
    }
    hits.sort();
    let more = hits.len().saturating_sub(3);
    hits.truncate(3);
    let mut list = hits.join(", ");
    if more > 0 {
        list.push_str(&format!(" and {more} more"));
    }
    Some(format!(
        "the pool contains node address {list}; no address is allocated from it until its ranges leave every node address out"
    ))
}

impl PoolProvider {
    pub fn new(stores: Stores, trigger: Trigger) -> Self {
        Self {
            stores,
            state: Arc::new(State {
                reservations: Mutex::default(),
                pending: Mutex::default(),
                trigger,
            }),
        }
    }

    /// Every Service holding pool addresses now (for the class status).
    pub fn holders(&self) -> Vec<Holder> {
        let classes = self.stores.classes.state();
        let services = self.stores.services.state();
        match self.state.reservations.lock() {
            Ok(mut r) => pool_holders(&services, &classes, &mut r),
            Err(_) => Vec::new(),
        }
    }

    /// Chooses the Service's addresses under the allocation lock and reserves them (old
    /// and new: until the status write lands it holds both). Returns the allocation and
    /// the addresses it held before.
    fn allocate(&self, svc: &Service, class: &PoolClass) -> Option<(Allocation, Vec<IpAddr>)> {
        let ns = svc.namespace().unwrap_or_default();
        let ns_labels = self
            .stores
            .namespaces
            .get(&ObjectRef::new(&ns))
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        let uid = uid(svc);
        let classes = self.stores.classes.state();
        let mut reservations = self.state.reservations.lock().ok()?;
        let services = self.stores.services.state();
        let holders = pool_holders(&services, &classes, &mut reservations);
        let mut me = Holder::of(svc);
        me.ips = match holders.iter().find(|h| h.uid == uid) {
            Some(h) => h.ips.clone(),
            None => taken_over(svc, &classes),
        };
        let foreign = allocation::foreign_holders(services.iter().map(|s| s.as_ref()), |c| {
            is_pool_class(&classes, c)
        });
        let others: Vec<Holder> = holders
            .into_iter()
            .chain(foreign)
            .filter(|h| h.uid != uid)
            .collect();
        let allocation = allocation::decide(svc, class, &ns_labels, &me, &others);
        let mut during: Vec<IpAddr> = me.ips.clone();
        if let Allocation::Assigned { ips, .. } = &allocation {
            during.extend(ips.iter().filter(|ip| !me.ips.contains(ip)));
        }
        reservations.set(&uid, during);
        Some((allocation, me.ips))
    }

    /// The class contains node addresses: the Service keeps what it holds, except node
    /// addresses themselves, and is not ready; nothing new is allocated.
    fn refused(&self, svc: &Service, class: &str, nodes: &[NodeAddress], why: String) -> Outcome {
        let held = allocation::status_ips(svc);
        let keep: Vec<IpAddr> = held
            .iter()
            .filter(|ip| !nodes.iter().any(|(_, n)| n == *ip))
            .copied()
            .collect();
        let message = format!("LoadBalancerClass {class} is refused: {why}");
        let (state, uid) = (self.state.clone(), uid(svc));
        let kept = keep.clone();
        let settle: Settle = Box::new(move |written| {
            if written && kept.len() < held.len() {
                state.hold(&uid, kept);
            }
        });
        Outcome::report(
            Readiness::not_ready(allocation::reason::NODE_ADDRESS_IN_POOL, message),
            Ingress::Set(ip_ingress(svc, &keep)),
        )
        .with_settle(settle)
    }

    fn ensure_now(&self, svc: &Service, class: &LoadBalancerClass) -> Outcome {
        if !self.stores.synced() {
            return Outcome::requeue(Duration::from_secs(1));
        }
        let name = class.name_any();
        let Some(spec) = class.spec.pool.as_ref() else {
            return Outcome::invalid(reason::UNSUPPORTED_PROVIDER, "no pool block");
        };
        let pool_class = match PoolClass::parse(&name, spec) {
            Ok(c) => c,
            Err(errors) => {
                // A broken class spec must not take every Service's address away: keep them.
                let keep = allocation::status_ips(svc);
                let message = format!(
                    "LoadBalancerClass {name} is not valid: {}",
                    errors.join("; ")
                );
                return Outcome::report(
                    Readiness::not_ready(reason::INVALID_SPEC, message),
                    Ingress::Set(ip_ingress(svc, &keep)),
                );
            }
        };
        let nodes = node_addresses(&self.stores.nodes.state());
        if let Some(why) = node_address_conflict(&pool_class.pool, &nodes) {
            return self.refused(svc, &name, &nodes, why);
        }
        let Some((allocation, before)) = self.allocate(svc, &pool_class) else {
            return Outcome::requeue(Duration::from_secs(1));
        };
        let (readiness, ips, moved) = readiness_of(&allocation, &name);
        let events = moved
            .into_iter()
            .map(|(old, new, why)| {
                Note::normal("AddressMoved", format!("moved from {old} to {new}: {why}"))
            })
            .collect();
        let waiting = waits_for_address(&allocation);
        let (state, uid, me) = (self.state.clone(), uid(svc), ObjectRef::from_obj(svc));
        let kept = ips.clone();
        let settle: Settle = Box::new(move |written| {
            state.hold(
                &uid,
                if written {
                    kept.clone()
                } else {
                    before.clone()
                },
            );
            if written {
                state.set_pending(me, waiting);
                if before.iter().any(|ip| !kept.contains(ip)) {
                    state.retrigger_pending();
                }
            }
        });
        Outcome::report(readiness, Ingress::Set(ip_ingress(svc, &ips)))
            .with_events(events)
            .with_settle(settle)
    }
}

impl Provider for PoolProvider {
    fn name(&self) -> &'static str {
        "pool"
    }

    fn serves(&self, class: &LoadBalancerClass) -> bool {
        class.spec.pool.is_some()
    }

    fn ensure<'a>(
        &'a self,
        svc: &'a Service,
        class: &'a LoadBalancerClass,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move { self.ensure_now(svc, class) })
    }

    /// The addresses are free once no status lists them: the status is cleared (when it
    /// lists any), then the reservation goes and waiting Services look again.
    fn release<'a>(&'a self, svc: &'a Service, _deleting: bool) -> BoxFuture<'a, Outcome> {
        let (state, uid, me) = (self.state.clone(), uid(svc), ObjectRef::from_obj(svc));
        let holds = !allocation::status_ips(svc).is_empty();
        Box::pin(async move {
            let settle: Settle = Box::new(move |written| {
                if written {
                    state.hold(&uid, Vec::new());
                    state.set_pending(me, false);
                    state.retrigger_pending();
                }
            });
            let outcome = Outcome::done().with_settle(settle);
            if holds {
                Outcome {
                    report: Report::Clear,
                    ..outcome
                }
            } else {
                outcome
            }
        })
    }

    fn verdict(&self, class: &LoadBalancerClass) -> Verdict {
        let Some(spec) = class.spec.pool.as_ref() else {
            return Verdict {
                accepted: false,
                reason: reason::UNSUPPORTED_PROVIDER,
                message: "no pool block".into(),
                addresses: None,
            };
        };
        let nodes = node_addresses(&self.stores.nodes.state());
        verdict(&class.name_any(), spec, &self.holders(), &nodes)
    }
}

/// A pool class's Accepted condition and (allocated, available) addresses: refused when
/// its spec is invalid or its ranges contain a node address (then nothing is available).
/// Pure.
pub fn verdict(
    name: &str,
    spec: &berth_crds::PoolProvider,
    holders: &[Holder],
    nodes: &[NodeAddress],
) -> Verdict {
    match PoolClass::parse(name, spec) {
        Ok(pc) => {
            let size = pc.pool.size();
            let allocated = allocation::allocated(&pc.pool, holders);
            if let Some(why) = node_address_conflict(&pc.pool, nodes) {
                return Verdict {
                    accepted: false,
                    reason: allocation::reason::NODE_ADDRESS_IN_POOL,
                    message: why,
                    addresses: Some((allocated, 0)),
                };
            }
            Verdict {
                accepted: true,
                reason: "Accepted",
                message: format!("pool provider with {size} addresses"),
                addresses: Some((allocated, size.saturating_sub(allocated))),
            }
        }
        Err(errors) => Verdict {
            accepted: false,
            reason: reason::INVALID_SPEC,
            message: errors.join("; "),
            addresses: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entries: &[&str]) -> berth_crds::PoolProvider {
        serde_json::from_value(serde_json::json!({ "addresses": entries })).expect("pool spec")
    }

    fn holder(ip: &str) -> Holder {
        Holder {
            uid: ip.into(),
            ips: vec![ip.parse().expect("ip")],
            ..Holder::default()
        }
    }

    #[test]
    fn verdict_counts_pool_addresses_and_reports_errors() {
        let v = verdict(
            "lab",
            &spec(&["198.19.1.0/29"]),
            &[holder("198.19.1.1"), holder("198.19.2.1")],
            &[("n1".into(), "198.18.1.10".parse().expect("ip"))],
        );
        assert!(v.accepted);
        assert!(v.message.contains("6 addresses"), "{}", v.message);
        assert_eq!(v.addresses, Some((1, 5)));
        let bad = verdict("lab", &spec(&["198.19.1.1/29"]), &[], &[]);
        assert!(!bad.accepted && bad.reason == reason::INVALID_SPEC && bad.addresses.is_none());
        assert!(bad.message.contains("host bits"), "{}", bad.message);
        let mut scoped = spec(&["198.19.1.0/29"]);
        scoped.announce = serde_json::from_value(serde_json::json!({
            "nodeSelector": {"matchExpressions": [{"key": "rack", "operator": "Near"}]}
        }))
        .expect("scope");
        let refused = verdict("lab", &scoped, &[], &[]);
        assert!(!refused.accepted && refused.reason == reason::INVALID_SPEC);
        assert!(
            refused.message.contains("announce.nodeSelector"),
            "{}",
            refused.message
        );
    }

    fn node(name: &str, addresses: &[(&str, &str)]) -> Arc<Node> {
        let addresses: Vec<serde_json::Value> = addresses
            .iter()
            .map(|(t, a)| serde_json::json!({"type": t, "address": a}))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"addresses": addresses}
            }))
            .expect("node"),
        )
    }

    #[test]
    fn node_addresses_are_internal_and_external_ips() {
        let nodes = [
            node(
                "n1",
                &[
                    ("InternalIP", "198.18.1.10"),
                    ("Hostname", "n1"),
                    ("ExternalIP", "203.0.113.7"),
                    ("InternalIP", "garbage"),
                ],
            ),
            node("n2", &[]),
        ];
        let got: Vec<String> = node_addresses(&nodes)
            .iter()
            .map(|(n, ip)| format!("{n}={ip}"))
            .collect();
        assert_eq!(got, ["n1=198.18.1.10", "n1=203.0.113.7"]);
    }

    #[test]
    fn a_pool_containing_a_node_address_is_refused_naming_it() {
        let nodes: Vec<NodeAddress> = (1..=5)
            .map(|i| {
                (
                    format!("n{i}"),
                    format!("198.18.1.{i}").parse().expect("ip"),
                )
            })
            .collect();
        let pool = |e: &[&str]| Pool::parse(e).expect("pool");
        assert_eq!(
            node_address_conflict(&pool(&["198.19.1.0/24"]), &nodes),
            None
        );
        let one = node_address_conflict(&pool(&["198.18.1.2"]), &nodes).expect("refused");
        assert!(one.contains("198.18.1.2 of Node n2"), "{one}");
        let many = node_address_conflict(&pool(&["198.18.1.0/29"]), &nodes).expect("refused");
        assert!(
            many.contains("198.18.1.3 of Node n3") && many.contains("and 2 more"),
            "{many}"
        );
        let v = verdict(
            "lab",
            &spec(&["198.18.1.0/29"]),
            &[holder("198.18.1.6")],
            &nodes,
        );
        assert!(!v.accepted);
        assert_eq!(v.reason, allocation::reason::NODE_ADDRESS_IN_POOL);
        assert_eq!(v.addresses, Some((1, 0)), "nothing available");
    }

    fn pool_class(name: &str, entries: &[&str]) -> LoadBalancerClass {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": name},
            "spec": {"pool": {"addresses": entries}}
        }))
        .expect("class")
    }

    fn ingress_ips(out: &Outcome) -> (Readiness, Vec<String>) {
        let Report::Set {
            readiness,
            ingress: Ingress::Set(entries),
        } = &out.report
        else {
            panic!("no status: {:?}", out.report);
        };
        let ips = entries.iter().filter_map(|e| e.ip.clone()).collect();
        (readiness.clone(), ips)
    }

    #[tokio::test]
    async fn a_class_containing_a_node_address_allocates_nothing() {
        let bad = pool_class("bad", &["198.18.1.0/28"]);
        let good = pool_class("good", &["198.19.1.0/29"]);
        let nodes = [node("n1", &[("InternalIP", "198.18.1.10")])];
        let (tx, _rx) = futures::channel::mpsc::unbounded();
        let stores = crate::stores::testing::stores(
            vec![bad.clone(), good.clone()],
            Vec::new(),
            nodes.iter().map(|n| n.as_ref().clone()).collect(),
        );
        let p = PoolProvider::new(stores, tx);
        let svc = |status_ips: &[&str]| -> Service {
            let ingress: Vec<serde_json::Value> = status_ips
                .iter()
                .map(|ip| serde_json::json!({"ip": ip}))
                .collect();
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "s", "namespace": "ns", "uid": "u1"},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
                "status": {"loadBalancer": {"ingress": ingress}}
            }))
            .expect("service")
        };
        let (r, ips) = ingress_ips(&p.ensure(&svc(&[]), &bad).await);
        assert!(!r.ready && r.reason == allocation::reason::NODE_ADDRESS_IN_POOL);
        assert!(
            r.message.contains("198.18.1.10 of Node n1"),
            "{}",
            r.message
        );
        assert!(ips.is_empty(), "{ips:?}");
        // Addresses held before are kept, except a node's own.
        let held = svc(&["198.18.1.3", "198.18.1.10"]);
        let (_, ips) = ingress_ips(&p.ensure(&held, &bad).await);
        assert_eq!(ips, ["198.18.1.3"]);
        let (r, ips) = ingress_ips(&p.ensure(&svc(&[]), &good).await);
        assert!(r.ready, "{r:?}");
        assert_eq!(ips, ["198.19.1.1"]);
        assert!(!p.verdict(&bad).accepted);
        assert!(p.verdict(&good).accepted);
    }

    /// A Service that another implementation (MetalLB, Cilium) served keeps its status
    /// address when a pool class takes it; one outside the pool is replaced; a Service
    /// still served elsewhere keeps its address out of berth's hands.
    #[tokio::test]
    async fn taking_over_keeps_the_status_address_and_spares_foreign_ones() {
        let good = pool_class("good", &["198.19.1.0/29"]);
        let svc = |uid: &str, ips: &[&str]| -> Service {
            let ingress: Vec<serde_json::Value> =
                ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": uid, "namespace": "ns", "uid": uid},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
                "status": {"loadBalancer": {"ingress": ingress}}
            }))
            .expect("service")
        };
        let still_metallb = svc("metallb", &["198.19.1.1"]);
        let (tx, _rx) = futures::channel::mpsc::unbounded();
        let stores = crate::stores::testing::stores(
            vec![good.clone()],
            vec![still_metallb.clone()],
            Vec::new(),
        );
        let p = PoolProvider::new(stores, tx);
        let (r, ips) = ingress_ips(&p.ensure(&svc("moved", &["198.19.1.5"]), &good).await);
        assert!(r.ready, "{r:?}");
        assert_eq!(ips, ["198.19.1.5"]);
        let (r, ips) = ingress_ips(&p.ensure(&svc("outside", &["203.0.113.9"]), &good).await);
        assert!(r.ready, "{r:?}");
        assert_eq!(ips, ["198.19.1.2"], "198.19.1.1 is still MetalLB's");
        let out = p.ensure(&svc("outside2", &["203.0.113.9"]), &good).await;
        let notes: Vec<String> = out.events.iter().map(|n| n.message.clone()).collect();
        assert!(
            notes.iter().any(|n| n.contains("moved from 203.0.113.9")),
            "{notes:?}"
        );
        let pin: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pin", "namespace": "ns", "uid": "pin",
                         "annotations": {"metallb.io/loadBalancerIPs": "198.19.1.1"}},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
        }))
        .expect("service");
        let (r, ips) = ingress_ips(&p.ensure(&pin, &good).await);
        assert!(!r.ready && r.message.contains("ns/metallb"), "{r:?}");
        assert!(ips.is_empty(), "{ips:?}");
    }

    #[test]
    fn waiting_reasons_are_the_ones_another_release_can_cure() {
        let unassigned = |reason| Allocation::Unassigned {
            reason,
            message: String::new(),
        };
        assert!(waits_for_address(&unassigned(
            allocation::reason::POOL_EXHAUSTED
        )));
        assert!(waits_for_address(&unassigned(
            allocation::reason::PORT_CONFLICT
        )));
        assert!(!waits_for_address(&unassigned(
            allocation::reason::NOT_SELECTED
        )));
        let (r, ips, _) = readiness_of(
            &Allocation::Assigned {
                ips: vec!["198.19.1.1".parse().expect("ip")],
                moved: Vec::new(),
            },
            "lab",
        );
        assert!(r.ready && r.message == "address 198.19.1.1 from pool lab");
        assert_eq!(ips.len(), 1);
    }
}
