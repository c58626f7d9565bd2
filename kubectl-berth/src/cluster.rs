//! What the plugin reads from the cluster: one list of each kind berth's controller
//! watches, the Service's Events, and the L2 announcement Leases of the node agents.

use std::net::IpAddr;
use std::sync::Arc;

use berth_controller::service::{Ownership, ownership};
use berth_crds::{ANNOTATION_OWNER_CLASS, CLASS_PREFIX, LoadBalancerClass};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::Error;

/// The cluster as the controller sees it, listed once.
pub struct Snapshot {
    pub services: Vec<Service>,
    pub classes: Vec<LoadBalancerClass>,
    pub nodes: Vec<Node>,
    pub slices: Vec<EndpointSlice>,
    pub namespaces: Vec<Namespace>,
}

impl Snapshot {
    pub async fn load(client: &Client) -> Result<Self, Error> {
        let lp = ListParams::default();
        Ok(Self {
            services: Api::<Service>::all(client.clone()).list(&lp).await?.items,
            classes: Api::<LoadBalancerClass>::all(client.clone())
                .list(&lp)
                .await?
                .items,
            nodes: Api::<Node>::all(client.clone()).list(&lp).await?.items,
            slices: Api::<EndpointSlice>::all(client.clone())
                .list(&lp)
                .await?
                .items,
            namespaces: Api::<Namespace>::all(client.clone()).list(&lp).await?.items,
        })
    }

    pub fn service(&self, namespace: &str, name: &str) -> Result<&Service, Error> {
        self.services
            .iter()
            .find(|s| s.namespace().as_deref() == Some(namespace) && s.name_any() == name)
            .ok_or_else(|| Error::NotFound(format!("{namespace}/{name}")))
    }

    pub fn class(&self, name: &str) -> Option<&LoadBalancerClass> {
        self.classes.iter().find(|c| c.name_any() == name)
    }

    /// The class the controller gives the Service, if any.
    pub fn class_of(&self, svc: &Service) -> Option<String> {
        class_of(svc, &self.classes)
    }
}

/// The class a controller handling every class gives the Service: its
/// `berth.dev/<class>`, else the default class; a Service berth provisioned keeps the
/// class it recorded. Pure.
pub fn class_of(svc: &Service, classes: &[LoadBalancerClass]) -> Option<String> {
    let arcs: Vec<Arc<LoadBalancerClass>> = classes.iter().cloned().map(Arc::new).collect();
    match ownership(svc, &arcs, &all_classes()) {
        Ownership::Class(c) => Some(c),
        Ownership::NotOurs => svc.annotations().get(ANNOTATION_OWNER_CLASS).cloned(),
    }
}

/// A controller configuration handling every class.
fn all_classes() -> berth_controller::Config {
    use clap::Parser as _;
    berth_controller::Config::try_parse_from(["berth-controller"])
        .unwrap_or_else(|e| unreachable!("the controller's defaults parse: {e}"))
}

/// Whether the Service asks for berth at all: a `berth.dev/` class, or none. Pure.
pub fn asks_for_berth(svc: &Service) -> bool {
    let spec = svc.spec.as_ref();
    spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
        && spec
            .and_then(|s| s.load_balancer_class.as_deref())
            .is_none_or(|c| c.starts_with(CLASS_PREFIX))
}

/// `aws`, `pool`, or `unknown` for a class with neither block. Pure.
pub fn provider_of(class: &LoadBalancerClass) -> &'static str {
    if class.spec.aws.is_some() {
        "aws"
    } else if class.spec.pool.is_some() {
        "pool"
    } else {
        "unknown"
    }
}

/// The Events about the Service, oldest first.
pub async fn events(client: &Client, namespace: &str, name: &str) -> Result<Vec<Event>, Error> {
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=Service,involvedObject.name={name}"
    ));
    let mut events = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&lp)
        .await?
        .items;
    events.sort_by_key(|e| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or_else(|| e.event_time.as_ref().map(|t| t.0))
    });
    Ok(events)
}

/// The node agents' announcement Lease of `addr`, wherever the agents keep them: they
/// carry the announcer's label, and the name comes from the agent's own naming.
pub async fn l2_lease(client: &Client, addr: &IpAddr) -> Result<Option<Lease>, Error> {
    use berth_crds::l2::{LEASE_LABEL, lease_name};
    let lp = ListParams::default().labels(LEASE_LABEL);
    let name = lease_name(addr);
    let leases = Api::<Lease>::all(client.clone()).list(&lp).await?.items;
    Ok(leases.into_iter().find(|l| l.name_any() == name))
}
