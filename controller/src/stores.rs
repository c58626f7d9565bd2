//! The watched state every part of the controller reads: reflector stores fed by the
//! watches `run` wires, and the queue that asks for a Service reconcile.

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{ObjectRef, Store};

use berth_crds::LoadBalancerClass;

/// Queues Services for a reconcile.
pub type Trigger = futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>;

/// Reflector stores (cheap to clone).
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    /// True once the Service store holds the first full list.
    pub services_synced: tokio::sync::watch::Receiver<bool>,
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub classes: Store<LoadBalancerClass>,
    pub namespaces: Store<Namespace>,
    /// Pods, for readiness gates (`provider::aws::readiness`); not awaited before
    /// reconciling: a pod not seen yet is only registered a little later.
    pub pods: Store<Pod>,
}

impl Stores {
    /// Whether every store has delivered its first full list: allocating from a partial
    /// view of the Services could hand out an address that is already taken.
    pub fn synced(&self) -> bool {
        // Only for stores `run` awaited before reconciling: a store's readiness keeps one
        // waker, so polling one that is not ready yet would steal its waiter's.
        fn ready<K>(s: &Store<K>) -> bool
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            s.wait_until_ready()
                .now_or_never()
                .is_some_and(|r| r.is_ok())
        }
        *self.services_synced.borrow()
            && ready(&self.nodes)
            && ready(&self.slices)
            && ready(&self.classes)
            && ready(&self.namespaces)
    }
}

/// A synced store holding `objects`: a snapshot instead of a watch.
pub fn filled<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    use kube::runtime::watcher::Event;
    let (store, mut writer) = kube::runtime::reflector::store::<K>();
    writer.apply_watcher_event(&Event::Init);
    for o in objects {
        writer.apply_watcher_event(&Event::InitApply(o));
    }
    writer.apply_watcher_event(&Event::InitDone);
    store
}

impl Stores {
    /// Synced stores holding one list of each kind: for a tool that runs the controller's
    /// code once against the cluster as it is (`kubectl berth plan`).
    pub fn snapshot(
        classes: Vec<LoadBalancerClass>,
        services: Vec<Service>,
        nodes: Vec<Node>,
        slices: Vec<EndpointSlice>,
        namespaces: Vec<Namespace>,
    ) -> Self {
        let (_, synced) = tokio::sync::watch::channel(true);
        Stores {
            services: filled(services),
            services_synced: synced,
            nodes: filled(nodes),
            slices: filled(slices),
            classes: filled(classes),
            namespaces: filled(namespaces),
            pods: filled(Vec::new()),
        }
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;

    pub use super::filled;

    /// Synced stores holding these objects (no slices, no namespaces).
    pub fn stores(
        classes: Vec<LoadBalancerClass>,
        services: Vec<Service>,
        nodes: Vec<Node>,
    ) -> Stores {
        Stores::snapshot(classes, services, nodes, Vec::new(), Vec::new())
    }
}
