//! The seam between the Service reconciler and the load-balancer providers, in the spirit
//! of cloud-provider's `EnsureLoadBalancer` / `EnsureLoadBalancerDeleted`: a provider
//! makes what a Service of its class needs ([`Provider::ensure`]) or lets go of it
//! ([`Provider::release`]) and answers with an [`Outcome`]; the reconciler alone turns
//! that into status, events and requeues. The [`Registry`] picks the provider from the
//! class. Providers: [`aws`] (NLBs through ELBv2) and [`pool`] (addresses from a pool).

pub mod aws;
pub mod pool;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_crds::LoadBalancerClass;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, PortStatus, Service};
use kube::ResourceExt;

use crate::reason;

/// The `berth.dev/LoadBalancerReady` condition a provider asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

impl Readiness {
    pub fn ready(message: impl Into<String>) -> Self {
        Self {
            ready: true,
            reason: reason::PROVISIONED.into(),
            message: message.into(),
        }
    }

    pub fn not_ready(reason: &str, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// `status.loadBalancer.ingress` as a provider wants it.
#[derive(Clone, Debug, PartialEq)]
pub enum Ingress {
    /// Keep the entries that carry a hostname (a provider's own); pool addresses are not
    /// carried over.
    Keep,
    /// Exactly these (none when empty).
    Set(Vec<LoadBalancerIngress>),
}

/// What to write into the Service's status.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// Leave it as it is.
    Keep,
    Set {
        readiness: Readiness,
        ingress: Ingress,
    },
    /// Remove what berth wrote (its condition and ingress): the provider holds nothing.
    Clear,
}

/// What the reconciler does after the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Finished: look again at the periodic resync (or, releasing, go on).
    Done,
    Requeue(Duration),
    /// The Service needs NodePorts first (instance targets): the reconciler allocates them.
    NodePorts,
}

/// An Event to publish about the Service once its status is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason,
            message: message.into(),
        }
    }
}

/// The error label of a write the leader fence refused.
pub const FENCED: &str = "fenced";

/// A provider's failure, reported to the controller for backoff and metrics.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    /// Low-cardinality metric label (`aws`, `name_conflict`, `fenced`, ...).
    pub label: &'static str,
    pub message: String,
}

impl ProviderError {
    pub fn is_fenced(&self) -> bool {
        self.label == FENCED
    }
}

/// Runs once the reconciler knows whether the outcome's status write landed (true) or
/// not; a provider settles its in-memory bookkeeping there (pool reservations).
pub type Settle = Box<dyn FnOnce(bool) + Send>;

/// A provider's answer for one Service.
pub struct Outcome {
    pub report: Report,
    pub events: Vec<Note>,
    pub next: Next,
    pub error: Option<ProviderError>,
    pub settle: Option<Settle>,
}

impl Outcome {
    /// Nothing to write; finished.
    pub fn done() -> Self {
        Self {
            report: Report::Keep,
            events: Vec::new(),
            next: Next::Done,
            error: None,
            settle: None,
        }
    }

    /// Nothing to write; look again after `after`.
    pub fn requeue(after: Duration) -> Self {
        Self::done().then(Next::Requeue(after))
    }

    /// Write this condition and ingress; finished.
    pub fn report(readiness: Readiness, ingress: Ingress) -> Self {
        Self {
            report: Report::Set { readiness, ingress },
            ..Self::done()
        }
    }

    /// A problem the user has to fix: the condition says so, no retry until something
    /// changes (the periodic resync still looks again).
    pub fn invalid(reason: &str, message: impl Into<String>) -> Self {
        Self::report(Readiness::not_ready(reason, message), Ingress::Keep)
    }

    /// A failure: the condition says so and the reconcile fails (backoff).
    pub fn failed(reason: &str, error: ProviderError) -> Self {
        Self {
            error: Some(error.clone()),
            ..Self::invalid(reason, error.message)
        }
    }

    pub fn then(mut self, next: Next) -> Self {
        self.next = next;
        self
    }

    pub fn with_events(mut self, events: Vec<Note>) -> Self {
        self.events = events;
        self
    }

    pub fn with_settle(mut self, settle: Settle) -> Self {
        self.settle = Some(settle);
        self
    }
}

/// What a provider says about a class it serves, for the class status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
    /// Pool classes: (allocated, available) addresses.
    pub addresses: Option<(u64, u64)>,
}

/// One load-balancer provider.
pub trait Provider: Send + Sync {
    /// Stable name; two classes with the same provider hand a Service over in place.
    fn name(&self) -> &'static str;
    /// Whether this provider serves `class`.
    fn serves(&self, class: &LoadBalancerClass) -> bool;
    /// Makes what `svc` of `class` needs.
    fn ensure<'a>(
        &'a self,
        svc: &'a Service,
        class: &'a LoadBalancerClass,
    ) -> BoxFuture<'a, Outcome>;
    /// Lets go of what the provider holds for `svc` (it is being deleted, or no longer
    /// this provider's). [`Next::Done`] means everything is gone.
    fn release<'a>(&'a self, svc: &'a Service, deleting: bool) -> BoxFuture<'a, Outcome>;
    /// The class status's Accepted condition and counts.
    fn verdict(&self, class: &LoadBalancerClass) -> Verdict;
    /// Runs once before the first reconcile (learn what exists).
    fn prepare(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Housekeeping while leading (the orphan sweep); never returns.
    fn maintain(&self) -> BoxFuture<'_, ()> {
        Box::pin(futures::future::pending())
    }
}

/// The providers, asked in order.
#[derive(Clone)]
pub struct Registry {
    providers: Vec<Arc<dyn Provider>>,
}

impl Registry {
    pub fn new(providers: Vec<Arc<dyn Provider>>) -> Self {
        Self { providers }
    }

    /// The provider of `class`, if any serves it.
    pub fn for_class(&self, class: &LoadBalancerClass) -> Option<&dyn Provider> {
        self.providers
            .iter()
            .find(|p| p.serves(class))
            .map(|p| p.as_ref())
    }

    /// The providers that may hold something for a Service provisioned under the class
    /// named `recorded`: that class's provider, or every provider when the class is gone
    /// or unknown (each lets go of nothing if it holds nothing).
    pub fn holding(
        &self,
        classes: &[Arc<LoadBalancerClass>],
        recorded: Option<&str>,
    ) -> Vec<&dyn Provider> {
        let own = recorded
            .and_then(|name| classes.iter().find(|c| c.name_any() == name))
            .and_then(|c| self.for_class(c));
        match own {
            Some(p) => vec![p],
            None => self.providers.iter().map(|p| p.as_ref()).collect(),
        }
    }

    /// Every provider's [`Provider::prepare`].
    pub async fn prepare(&self) {
        futures::future::join_all(self.providers.iter().map(|p| p.prepare())).await;
    }

    /// Every provider's [`Provider::maintain`]; never returns.
    pub async fn maintain(&self) {
        futures::future::join_all(self.providers.iter().map(|p| p.maintain())).await;
    }
}

fn port_status(svc: &Service) -> Option<Vec<PortStatus>> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ps| {
            ps.iter()
                .map(|p| PortStatus {
                    port: p.port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    error: None,
                })
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
}

/// The ingress entry for a load balancer DNS name and the Service's ports.
pub fn hostname_ingress(svc: &Service, hostname: &str) -> Vec<LoadBalancerIngress> {
    vec![LoadBalancerIngress {
        hostname: Some(hostname.to_string()),
        ports: port_status(svc),
        ..Default::default()
    }]
}

/// One ingress entry per pool address: the node agents deliver traffic to it themselves
/// (`ipMode: VIP`).
pub fn ip_ingress(svc: &Service, ips: &[IpAddr]) -> Vec<LoadBalancerIngress> {
    let ports = port_status(svc);
    ips.iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some(ip.to_string()),
            ip_mode: Some("VIP".into()),
            ports: ports.clone(),
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::annotations::tests::service;

    #[test]
    fn ingress_lists_hostname_and_ports() {
        let svc = service(
            &[
                ("http", 80, "TCP", Some(30080)),
                ("dns", 53, "UDP", Some(30053)),
            ],
            &[],
        );
        let ing = hostname_ingress(&svc, "lb-1.elb.example");
        assert_eq!(ing[0].hostname.as_deref(), Some("lb-1.elb.example"));
        let ports = ing[0].ports.clone().unwrap_or_default();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[1].protocol, "UDP");
    }

    #[test]
    fn ip_ingress_has_one_vip_entry_per_address() {
        let svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let ips: Vec<IpAddr> = vec![
            "198.19.1.1".parse().expect("ip"),
            "2001:db8::1".parse().expect("ip"),
        ];
        let ing = ip_ingress(&svc, &ips);
        assert_eq!(ing.len(), 2);
        assert_eq!(ing[1].ip.as_deref(), Some("2001:db8::1"));
        assert_eq!(ing[0].ip_mode.as_deref(), Some("VIP"));
        assert_eq!(ing[0].ports.as_ref().map(|p| p[0].port), Some(80));
        assert!(ing[0].hostname.is_none());
    }

    struct Named(&'static str, bool);

    impl Provider for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn serves(&self, class: &LoadBalancerClass) -> bool {
            if self.1 {
                class.spec.pool.is_some()
            } else {
                class.spec.aws.is_some()
            }
        }
        fn ensure<'a>(
            &'a self,
            _: &'a Service,
            _: &'a LoadBalancerClass,
        ) -> BoxFuture<'a, Outcome> {
            Box::pin(async { Outcome::done() })
        }
        fn release<'a>(&'a self, _: &'a Service, _: bool) -> BoxFuture<'a, Outcome> {
            Box::pin(async { Outcome::done() })
        }
        fn verdict(&self, _: &LoadBalancerClass) -> Verdict {
            Verdict {
                accepted: true,
                reason: "Accepted",
                message: String::new(),
                addresses: None,
            }
        }
    }

    #[test]
    fn the_registry_picks_by_class_and_releases_everything_for_a_gone_class() {
        let class = |name: &str, spec: serde_json::Value| -> Arc<LoadBalancerClass> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
                    "metadata": {"name": name}, "spec": spec
                }))
                .expect("class"),
            )
        };
        let r = Registry::new(vec![
            Arc::new(Named("pool", true)),
            Arc::new(Named("aws", false)),
        ]);
        let classes = vec![
            class(
                "p",
                serde_json::json!({"pool": {"addresses": ["198.19.0.0/30"]}}),
            ),
            class("a", serde_json::json!({"aws": {}})),
            class("none", serde_json::json!({})),
        ];
        assert_eq!(r.for_class(&classes[0]).map(|p| p.name()), Some("pool"));
        assert_eq!(r.for_class(&classes[1]).map(|p| p.name()), Some("aws"));
        assert!(r.for_class(&classes[2]).is_none());
        let names = |v: Vec<&dyn Provider>| v.iter().map(|p| p.name()).collect::<Vec<_>>();
        assert_eq!(names(r.holding(&classes, Some("a"))), ["aws"]);
        assert_eq!(names(r.holding(&classes, Some("gone"))), ["pool", "aws"]);
        assert_eq!(names(r.holding(&classes, None)), ["pool", "aws"]);
    }
}
