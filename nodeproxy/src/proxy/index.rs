//! The in-memory index fed by watch events: the model, which Services changed since the
//! last sync, and whether every watch has delivered its first list.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

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
}

#[derive(Debug)]
pub struct Index {
    pub model: Model,
    config: NodeConfig,
    node_ips: Vec<IpAddr>,
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
            node_ips: Vec::new(),
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
        }
    }

    /// Every watch has listed once: syncing now cannot wipe rules of unseen Services.
    pub fn ready(&self) -> bool {
        self.listed.len() == 3
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
            }
        }
    }

    pub fn begin_relist(&mut self, kind: Kind) {
        match kind {
            Kind::Services => self.relisting_services = Some(BTreeSet::new()),
            Kind::Slices => self.relisting_slices = Some(BTreeSet::new()),
            Kind::Node => {}
        }
    }

    /// The first (or a new) list of `kind` is complete: drop what it no longer holds.
    pub fn end_relist(&mut self, kind: Kind) {
        match kind {
            Kind::Services => {
                if let Some(seen) = self.relisting_services.take() {
                    let gone: Vec<ServiceId> = self
                        .model
                        .services
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
            Kind::Node => {}
        }
        self.listed.insert(kind);
    }

    /// A Service was added or changed; `None` when it is not proxied (e.g. ExternalName).
    pub fn apply_service(&mut self, id: ServiceId, svc: Option<Service>) {
        if let Some(seen) = self.relisting_services.as_mut() {
            seen.insert(id.clone());
        }
        let changed = match svc {
            Some(s) => self.model.services.insert(id.clone(), s.clone()).as_ref() != Some(&s),
            None => self.model.services.remove(&id).is_some(),
        };
        if changed {
            self.dirty.insert(id);
        }
    }

    pub fn delete_service(&mut self, id: &ServiceId) {
        if self.model.services.remove(id).is_some() {
            self.dirty.insert(id.clone());
        }
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
                self.model.insert_slice(namespace, name, s)
            }
            None => self.model.remove_slice(namespace, name),
        };
        if let Some(old) = old {
            self.dirty.insert(old.service);
        }
        self.pending_since.get_or_insert_with(Instant::now);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.model.remove_slice(namespace, name) {
            self.dirty.insert(old.service);
            self.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// Takes the pending work; `force_full` after a failure or at start.
    pub fn take_work(&mut self, force_full: bool) -> Work {
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
        assert!(!i.ready());
        i.end_relist(Kind::Node);
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
}
