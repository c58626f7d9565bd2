//! The desired load balancer for one Service: a pure function of the Service, its class,
//! the nodes, the EndpointSlices and the subnets found for it.

use std::collections::{BTreeMap, BTreeSet};

use crate::provider::aws::security_groups::{self, Security};
use crate::provider::aws::settings::{HealthCheck, HealthPort, Settings, SslPorts};
use berth_crds::{LABEL_EXCLUDE_FROM_LB, TAINT_TO_BE_DELETED, tags};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use crate::provider::aws::naming::{MAX_NAME, resource_name};

pub use berth_crds::{IpAddressType, Scheme, TargetType};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredLoadBalancer {
    pub name: String,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub subnets: Vec<String>,
    /// The frontend groups the NLB is created with: filled in by the apply, once the
    /// managed one exists ([`security_groups::frontend_groups`]).
    pub security_groups: Vec<String>,
    pub security: Security,
    pub tags: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    /// Sorted by port.
    pub listeners: Vec<DesiredListener>,
    pub target_groups: Vec<DesiredTargetGroup>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredListener {
    pub port: i32,
    /// `TCP`, `UDP`, `TCP_UDP` or `TLS`.
    pub protocol: String,
    /// TLS only: the certificate ARN and the security policy.
    pub certificate: Option<String>,
    pub ssl_policy: Option<String>,
    /// Name of the target group in [`DesiredLoadBalancer::target_groups`].
    pub target_group: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTargetGroup {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    pub target_type: TargetType,
    pub vpc_id: String,
    pub health_check: HealthCheck,
    pub attributes: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub targets: BTreeSet<Target>,
    /// Targets of terminating endpoints that still serve: kept registered while the
    /// targets replacing them are not healthy yet (`ip` targets; see
    /// `deploy::target_plan`).
    pub serving: BTreeSet<Target>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub id: String,
    pub port: i32,
}

/// Why a Service's load balancer cannot be built; each maps to a condition reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("no subnets found for the load balancer")]
    NoSubnets,
}

/// What the builder needs besides the Service and its settings.
pub struct World<'a> {
    pub cluster: &'a str,
    pub vpc_id: &'a str,
    /// The VPC's CIDRs: what an internal NLB admits when the Service names no sources.
    pub vpc_cidrs: &'a [String],
    pub subnets: &'a [String],
    pub nodes: &'a [std::sync::Arc<Node>],
    pub slices: &'a [std::sync::Arc<EndpointSlice>],
    /// Pods (`namespace/name`) with berth's readiness gate whose containers are ready
    /// (`readiness::gated_ready`): targets even while their endpoint is not ready, so
    /// the gate can turn True once they are healthy.
    pub gated_ready: &'a BTreeSet<String>,
}

/// The instance ID in an AWS providerID (`aws:///us-east-1a/i-0abc`).
pub fn instance_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-")
        && id.len() > 2
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    .then_some(id)
}

/// A node may carry load-balancer traffic: not excluded by label, not being deleted, not
/// tainted for deletion by the autoscaler, and matching `target-node-labels`.
pub fn node_eligible(node: &Node, required_labels: &BTreeMap<String, String>) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if labels.contains_key(LABEL_EXCLUDE_FROM_LB) || node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    if tainted {
        return false;
    }
    required_labels
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| v.is_empty() || have == v))
}

/// Instance IDs of the eligible nodes.
pub fn instance_targets(
    nodes: &[std::sync::Arc<Node>],
    required: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| node_eligible(n, required))
        .filter_map(|n| {
            n.spec
                .as_ref()?
                .provider_id
                .as_deref()
                .and_then(instance_id)
        })
        .map(str::to_string)
        .collect()
}

/// Whether an endpoint stands for a Pod (its `targetRef`). A hand-written EndpointSlice
/// can name any address; only a Pod's is known to be one of the cluster's workloads.
fn is_pod(ep: &Endpoint) -> bool {
    ep.target_ref
        .as_ref()
        .is_some_and(|r| r.kind.as_deref() == Some("Pod"))
}

/// Endpoints of the IPv4 slices, with the slice they are in.
fn endpoints(
    slices: &[std::sync::Arc<EndpointSlice>],
) -> impl Iterator<Item = (&EndpointSlice, &Endpoint)> {
    slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .flat_map(|s| s.endpoints.iter().flatten().map(move |ep| (s.as_ref(), ep)))
}

/// Whether an endpoint is ready (one without a ready condition counts as ready, as the
/// EndpointSlice API says).
fn is_ready(ep: &Endpoint) -> bool {
    ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

/// Ready endpoints of the IPv4 slices, with the slice they are in.
fn ready_endpoints(
    slices: &[std::sync::Arc<EndpointSlice>],
) -> impl Iterator<Item = (&EndpointSlice, &Endpoint)> {
    endpoints(slices).filter(|(_, ep)| is_ready(ep))
}

/// The `namespace/name` of the Pod behind an endpoint.
fn pod_key(slice: &EndpointSlice, ep: &Endpoint) -> Option<String> {
    let r = ep.target_ref.as_ref()?;
    let ns = r.namespace.as_ref().or(slice.metadata.namespace.as_ref())?;
    Some(format!("{ns}/{}", r.name.as_ref()?))
}

/// What an endpoint is to the target group: a target, a terminating endpoint still
/// serving, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Target,
    Serving,
    Out,
}

fn role(slice: &EndpointSlice, ep: &Endpoint, gated_ready: &BTreeSet<String>) -> Role {
    let c = ep.conditions.as_ref();
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if is_ready(ep) {
        Role::Target
    } else if terminating {
        // `serving` absent: an older producer; such an endpoint is not known to serve.
        if c.and_then(|c| c.serving).unwrap_or(false) {
            Role::Serving
        } else {
            Role::Out
        }
    } else if pod_key(slice, ep).is_some_and(|k| gated_ready.contains(&k)) {
        Role::Target
    } else {
        Role::Out
    }
}

/// Endpoint addresses of the Service port named `port_name` with `protocol`, with the
/// port each endpoint listens on: the targets (ready endpoints, and pods only waiting for
/// berth's readiness gate) and the terminating endpoints still serving. Endpoints that
/// are not Pods only when `allow_non_pod`.
pub fn ip_targets(
    slices: &[std::sync::Arc<EndpointSlice>],
    port_name: &str,
    protocol: &str,
    allow_non_pod: bool,
    gated_ready: &BTreeSet<String>,
) -> (BTreeSet<Target>, BTreeSet<Target>) {
    let (mut targets, mut serving) = (BTreeSet::new(), BTreeSet::new());
    for (slice, ep) in endpoints(slices) {
        if !allow_non_pod && !is_pod(ep) {
            continue;
        }
        let out = match role(slice, ep, gated_ready) {
            Role::Target => &mut targets,
            Role::Serving => &mut serving,
            Role::Out => continue,
        };
        let number = slice.ports.iter().flatten().find_map(|p| {
            let matches = p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol;
            p.port.filter(|_| matches)
        });
        let Some(number) = number else { continue };
        for addr in &ep.addresses {
            out.insert(Target {
                id: addr.clone(),
                port: number,
            });
        }
    }
    // An address both ready and terminating (two slices mid-update) is a target.
    serving.retain(|t| !targets.contains(t));
    (targets, serving)
}

/// Addresses of ready endpoints that are not Pods: what [`ip_targets`] leaves out unless
/// the class allows them. Pure.
pub fn non_pod_addresses(slices: &[std::sync::Arc<EndpointSlice>]) -> BTreeSet<String> {
    ready_endpoints(slices)
        .filter(|(_, ep)| !is_pod(ep))
        .flat_map(|(_, ep)| ep.addresses.iter().cloned())
        .collect()
}

fn listener_protocol(protocols: &BTreeSet<&str>) -> Result<&'static str, String> {
    match (
        protocols.contains("TCP"),
        protocols.contains("UDP"),
        protocols.len(),
    ) {
        (true, true, 2) => Ok("TCP_UDP"),
        (true, false, 1) => Ok("TCP"),
        (false, true, 1) => Ok("UDP"),
        _ => Err(format!(
            "protocols {:?} are not supported by a Network Load Balancer (TCP, UDP)",
            protocols
        )),
    }
}

/// The Service's ports grouped by port number, sorted.
fn port_groups(ports: &[ServicePort]) -> BTreeMap<i32, Vec<&ServicePort>> {
    let mut groups: BTreeMap<i32, Vec<&ServicePort>> = BTreeMap::new();
    for p in ports {
        groups.entry(p.port).or_default().push(p);
    }
    groups
}

/// The target group port for one group of Service ports.
fn target_group_port(
    group: &[&ServicePort],
    target_type: TargetType,
    svc_port: i32,
) -> Result<i32, String> {
    match target_type {
        TargetType::Instance => {
            let node_ports: BTreeSet<i32> = group.iter().filter_map(|p| p.node_port).collect();
            if group.iter().any(|p| p.node_port.is_none()) {
                return Err(format!("port {svc_port} has no nodePort yet"));
            }
            match node_ports.len() {
                1 => Ok(node_ports.into_iter().next().unwrap_or_default()),
                _ => Err(format!(
                    "port {svc_port} uses nodePorts {node_ports:?} for TCP and UDP; one listener needs one"
                )),
            }
        }
        TargetType::Ip => Ok(match group.first().and_then(|p| p.target_port.as_ref()) {
            Some(IntOrString::Int(n)) => *n,
            _ => svc_port,
        }),
    }
}

/// What every port of one Service shares while building.
struct Build<'a> {
    settings: &'a Settings,
    world: &'a World<'a>,
    namespace: String,
    name: String,
    uid: String,
    /// The health check of every target group.
    health_check: HealthCheck,
    base_tags: BTreeMap<String, String>,
    /// Instance targets (instance mode).
    nodes: BTreeSet<String>,
}

/// Whether TLS applies to the listener of `port` (TCP only).
fn tls_for<'s>(
    settings: &'s Settings,
    port: i32,
    group: &[&ServicePort],
    protocol: &str,
) -> Option<&'s crate::provider::aws::settings::Ssl> {
    settings.ssl.as_ref().filter(|ssl| {
        protocol == "TCP"
            && match &ssl.ports {
                SslPorts::All => true,
                SslPorts::Some(set) => {
                    set.contains(&port.to_string())
                        || group
                            .iter()
                            .any(|p| p.name.as_ref().is_some_and(|n| set.contains(n)))
                }
            }
    })
}

/// The health check: `externalTrafficPolicy: Local` in instance mode checks the
/// healthCheckNodePort, unless a health-check annotation says otherwise.
fn health_check(settings: &Settings, spec: &ServiceSpec) -> Result<HealthCheck, BuildError> {
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut hc = settings.health_check.clone();
    if etp_local
        && settings.target_type == TargetType::Instance
        && !settings.health_check_overridden
    {
        hc = HealthCheck::etp_local(spec.health_check_node_port.unwrap_or_default());
    }
    if let HealthPort::Port(0) = hc.port {
        return Err(BuildError::InvalidSpec(
            "externalTrafficPolicy Local but no healthCheckNodePort yet".into(),
        ));
    }
    Ok(hc)
}

impl Build<'_> {
    /// The targets, and the terminating ones still serving (`ip` targets).
    fn targets(
        &self,
        group: &[&ServicePort],
        tg_port: i32,
    ) -> (BTreeSet<Target>, BTreeSet<Target>) {
        match self.settings.target_type {
            TargetType::Instance => (
                self.nodes
                    .iter()
                    .map(|id| Target {
                        id: id.clone(),
                        port: tg_port,
                    })
                    .collect(),
                BTreeSet::new(),
            ),
            TargetType::Ip => {
                // For TCP_UDP both entries point at the same pods; the TCP entry names them.
                let first = group
                    .iter()
                    .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .or(group.first())
                    .copied();
                let pname = first.and_then(|p| p.name.clone()).unwrap_or_default();
                let pproto = first
                    .and_then(|p| p.protocol.clone())
                    .unwrap_or_else(|| "TCP".into());
                let allow = self.settings.allow_non_pod_targets;
                let gated = self.world.gated_ready;
                ip_targets(self.world.slices, &pname, &pproto, allow, gated)
            }
        }
    }

    /// The listener and target group of one Service port number.
    fn port(
        &self,
        port: i32,
        group: &[&ServicePort],
    ) -> Result<(DesiredListener, DesiredTargetGroup), BuildError> {
        let (settings, world) = (self.settings, self.world);
        let protocols: BTreeSet<&str> = group
            .iter()
            .map(|p| p.protocol.as_deref().unwrap_or("TCP"))
            .collect();
        let protocol = listener_protocol(&protocols).map_err(BuildError::InvalidSpec)?;
        let tg_port = target_group_port(group, settings.target_type, port)
            .map_err(BuildError::InvalidSpec)?;
        let target_type = match settings.target_type {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        };
        let hash_input = format!(
            "{}/{}/{port}/{protocol}/{tg_port}/{target_type}/{}",
            world.cluster, self.uid, world.vpc_id
        );
        let tg_name = resource_name(
            &settings.name_prefix,
            &self.namespace,
            &self.name,
            &hash_input,
        );
        let mut tags = self.base_tags.clone();
        tags.insert(
            tags::RESOURCE.into(),
            format!("targetgroup/{port}/{protocol}"),
        );
        let (targets, serving) = self.targets(group, tg_port);
        let target_group = DesiredTargetGroup {
            name: tg_name.clone(),
            protocol: protocol.to_string(),
            port: tg_port,
            target_type: settings.target_type,
            vpc_id: world.vpc_id.to_string(),
            health_check: self.health_check.clone(),
            attributes: settings.tg_attributes.clone(),
            tags,
            targets,
            serving,
        };
        let tls = tls_for(settings, port, group, protocol);
        let listener = DesiredListener {
            port,
            protocol: if tls.is_some() { "TLS" } else { protocol }.into(),
            certificate: tls.map(|ssl| ssl.certificate.clone()),
            ssl_policy: tls.map(|ssl| ssl.policy.clone()),
            target_group: tg_name,
        };
        Ok((listener, target_group))
    }
}

/// Builds the desired load balancer. Pure.
pub fn build(
    svc: &Service,
    settings: &Settings,
    world: &World,
) -> Result<DesiredLoadBalancer, BuildError> {
    let meta = &svc.metadata;
    let field = |f: &Option<String>| f.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec.ports.clone().unwrap_or_default();
    if ports.is_empty() {
        return Err(BuildError::InvalidSpec("the Service has no ports".into()));
    }
    if world.subnets.is_empty() {
        return Err(BuildError::NoSubnets);
    }
    let (namespace, name, uid) = (field(&meta.namespace), field(&meta.name), field(&meta.uid));
    let mut base_tags = settings.tags.clone();
    base_tags.insert(tags::CLUSTER.into(), world.cluster.into());
    base_tags.insert(tags::SERVICE.into(), format!("{namespace}/{name}"));
    base_tags.insert(tags::SERVICE_UID.into(), uid.clone());
    let b = Build {
        settings,
        world,
        health_check: health_check(settings, &spec)?,
        nodes: match settings.target_type {
            TargetType::Instance => instance_targets(world.nodes, &settings.target_node_labels),
            TargetType::Ip => BTreeSet::new(),
        },
        namespace,
        name,
        uid,
        base_tags,
    };
    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    for (port, group) in port_groups(&ports) {
        let (listener, target_group) = b.port(port, &group)?;
        listeners.push(listener);
        target_groups.push(target_group);
    }
    let inputs = security_groups::Inputs {
        namespace: &b.namespace,
        name: &b.name,
        vpc_id: world.vpc_id,
        vpc_cidrs: world.vpc_cidrs,
        base_tags: &b.base_tags,
        nodes: world.nodes,
        slices: world.slices,
    };
    let security = security_groups::build(settings, &listeners, &target_groups, &inputs);
    let mut lb_tags = b.base_tags;
    lb_tags.insert(tags::RESOURCE.into(), "loadbalancer".into());
    Ok(DesiredLoadBalancer {
        name: settings.name.clone(),
        scheme: settings.scheme,
        ip_address_type: settings.ip_address_type,
        subnets: world.subnets.to_vec(),
        security_groups: Vec::new(),
        security,
        tags: lb_tags,
        attributes: settings.lb_attributes.clone(),
        listeners,
        target_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::annotations::tests::{node, service, settings_for};
    use std::sync::Arc;

    static NO_PODS: BTreeSet<String> = BTreeSet::new();

    fn world<'a>(
        nodes: &'a [Arc<Node>],
        slices: &'a [Arc<EndpointSlice>],
        subnets: &'a [String],
    ) -> World<'a> {
        World {
            cluster: "c1",
            vpc_id: "vpc-1",
            vpc_cidrs: &[],
            subnets,
            nodes,
            slices,
            gated_ready: &NO_PODS,
        }
    }

    #[test]
    fn provider_ids_give_instance_ids() {
        assert_eq!(
            instance_id("aws:///us-east-1a/i-0abc123"),
            Some("i-0abc123")
        );
        assert_eq!(instance_id("aws:////i-0abc"), Some("i-0abc"));
        assert_eq!(instance_id("gce://p/z/n"), None);
        assert_eq!(instance_id("aws:///us-east-1a/"), None);
        assert_eq!(instance_id("aws:///us-east-1a/i-"), None);
    }

    #[test]
    fn excluded_deleting_and_autoscaler_nodes_are_left_out() {
        let nodes = vec![
            Arc::new(node("n1", "i-1", &[])),
            Arc::new(node("n2", "i-2", &[(LABEL_EXCLUDE_FROM_LB, "")])),
            Arc::new({
                let mut n = node("n3", "i-3", &[]);
                n.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ));
                n
            }),
            Arc::new({
                let mut n = node("n4", "i-4", &[]);
                n.spec.get_or_insert_default().taints =
                    Some(vec![k8s_openapi::api::core::v1::Taint {
                        key: TAINT_TO_BE_DELETED.into(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    }]);
                n
            }),
            Arc::new(node("n5", "i-5", &[("pool", "edge")])),
        ];
        let all = instance_targets(&nodes, &BTreeMap::new());
        assert_eq!(all, ["i-1", "i-5"].iter().map(|s| s.to_string()).collect());
        let edge = instance_targets(
            &nodes,
            &BTreeMap::from([("pool".to_string(), "edge".to_string())]),
        );
        assert_eq!(edge, ["i-5"].iter().map(|s| s.to_string()).collect());
        let any_pool = instance_targets(
            &nodes,
            &BTreeMap::from([("pool".to_string(), String::new())]),
        );
        assert_eq!(any_pool.len(), 1);
    }

    #[test]
    fn instance_mode_builds_a_listener_and_target_group_per_port() {
        let svc = service(
            &[
                ("http", 80, "TCP", Some(30080)),
                ("dns", 53, "UDP", Some(30053)),
            ],
            &[],
        );
        let nodes = vec![
            Arc::new(node("n1", "i-1", &[])),
            Arc::new(node("n2", "i-2", &[])),
        ];
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&nodes, &[], &subnets)).expect("build");
        assert_eq!(lb.listeners.len(), 2);
        assert_eq!(lb.listeners[0].port, 53);
        assert_eq!(lb.listeners[0].protocol, "UDP");
        assert_eq!(lb.listeners[1].protocol, "TCP");
        let tg = &lb.target_groups[1];
        assert_eq!(tg.port, 30080);
        assert_eq!(
            tg.targets
                .iter()
                .map(|t| (t.id.as_str(), t.port))
                .collect::<Vec<_>>(),
            vec![("i-1", 30080), ("i-2", 30080)]
        );
        assert_eq!(lb.listeners[1].target_group, tg.name);
        assert_eq!(
            lb.tags.get(tags::SERVICE_UID).map(String::as_str),
            Some("uid-1")
        );
        assert_eq!(lb.tags.get(tags::CLUSTER).map(String::as_str), Some("c1"));
        assert_eq!(
            tg.tags.get(tags::RESOURCE).map(String::as_str),
            Some("targetgroup/80/TCP")
        );
        assert_ne!(lb.target_groups[0].name, lb.target_groups[1].name);
    }

    #[test]
    fn tcp_and_udp_on_one_port_make_tcp_udp() {
        let svc = service(
            &[
                ("dns-tcp", 53, "TCP", Some(30053)),
                ("dns-udp", 53, "UDP", Some(30053)),
            ],
            &[],
        );
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&nodes, &[], &subnets)).expect("build");
        assert_eq!(lb.listeners.len(), 1);
        assert_eq!(lb.listeners[0].protocol, "TCP_UDP");
        assert_eq!(lb.target_groups[0].protocol, "TCP_UDP");
        let split = service(
            &[("a", 53, "TCP", Some(30053)), ("b", 53, "UDP", Some(30054))],
            &[],
        );
        assert!(matches!(
            build(&split, &settings_for(&split), &world(&nodes, &[], &subnets)),
            Err(BuildError::InvalidSpec(_))
        ));
    }

    #[test]
    fn missing_node_ports_subnets_and_sctp_are_errors() {
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let no_np = service(&[("http", 80, "TCP", None)], &[]);
        assert!(build(&no_np, &settings_for(&no_np), &world(&nodes, &[], &subnets)).is_err());
        let ok = service(&[("http", 80, "TCP", Some(30080))], &[]);
        assert_eq!(
            build(&ok, &settings_for(&ok), &world(&nodes, &[], &[])),
            Err(BuildError::NoSubnets)
        );
        let sctp = service(&[("s", 80, "SCTP", Some(30080))], &[]);
        assert!(matches!(
            build(&sctp, &settings_for(&sctp), &world(&nodes, &[], &subnets)),
            Err(BuildError::InvalidSpec(_))
        ));
    }

    #[test]
    fn etp_local_checks_the_health_check_node_port() {
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let spec = svc.spec.get_or_insert_default();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(31999);
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&nodes, &[], &subnets)).expect("build");
        let hc = &lb.target_groups[0].health_check;
        assert_eq!(hc.protocol, "HTTP");
        assert_eq!(hc.port, HealthPort::Port(31999));
        assert_eq!(hc.path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn ip_mode_targets_ready_pod_ips_on_the_endpoint_port() {
        let pod = |name: &str| serde_json::json!({"kind": "Pod", "namespace": "ns", "name": name});
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[(
                crate::provider::aws::annotations::annotations::NLB_TARGET_TYPE,
                "ip",
            )],
        );
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s1", "namespace": "ns"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "conditions": {"ready": true}, "targetRef": pod("a")},
                {"addresses": ["10.244.2.2"], "conditions": {"ready": false}, "targetRef": pod("b")},
                {"addresses": ["10.244.3.2"], "targetRef": pod("c")},
                {"addresses": ["10.0.9.9"], "conditions": {"ready": true}},
                {"addresses": ["10.0.9.8"], "targetRef": {"kind": "Node", "name": "n1"}}
            ]
        }))
        .expect("slice");
        let slices = vec![Arc::new(slice)];
        let subnets = vec!["subnet-a".to_string()];
        let mut settings = settings_for(&svc);
        let lb = build(&svc, &settings, &world(&[], &slices, &subnets)).expect("build");
        let tg = &lb.target_groups[0];
        assert_eq!(tg.target_type, TargetType::Ip);
        let got: Vec<_> = tg.targets.iter().map(|t| (t.id.as_str(), t.port)).collect();
        assert_eq!(got, vec![("10.244.1.2", 8080), ("10.244.3.2", 8080)]);
        let skipped: Vec<String> = non_pod_addresses(&slices).into_iter().collect();
        assert_eq!(
            skipped,
            vec!["10.0.9.8".to_string(), "10.0.9.9".to_string()]
        );
        settings.allow_non_pod_targets = true;
        let lb = build(&svc, &settings, &world(&[], &slices, &subnets)).expect("build");
        assert_eq!(lb.target_groups[0].targets.len(), 4, "the class opted in");
    }

    #[test]
    fn pods_waiting_for_the_gate_are_targets_and_terminating_ones_serve() {
        let pod = |name: &str| serde_json::json!({"kind": "Pod", "namespace": "ns", "name": name});
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s1", "namespace": "ns"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.1"], "conditions": {"ready": true}, "targetRef": pod("ready")},
                {"addresses": ["10.244.1.2"], "conditions": {"ready": false}, "targetRef": pod("gated")},
                {"addresses": ["10.244.1.3"], "conditions": {"ready": false}, "targetRef": pod("starting")},
                {"addresses": ["10.244.1.4"],
                 "conditions": {"ready": false, "serving": true, "terminating": true},
                 "targetRef": pod("leaving")},
                {"addresses": ["10.244.1.5"],
                 "conditions": {"ready": false, "serving": false, "terminating": true},
                 "targetRef": pod("gone")},
                {"addresses": ["10.244.1.6"],
                 "conditions": {"ready": false, "serving": true, "terminating": true},
                 "targetRef": pod("gated-leaving")}
            ]
        }))
        .expect("slice");
        let slices = vec![Arc::new(slice)];
        let awaiting = BTreeSet::from(["ns/gated".to_string(), "ns/gated-leaving".to_string()]);
        let (targets, serving) = ip_targets(&slices, "http", "TCP", false, &awaiting);
        let ids = |s: &BTreeSet<Target>| s.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&targets), vec!["10.244.1.1", "10.244.1.2"]);
        assert_eq!(ids(&serving), vec!["10.244.1.4", "10.244.1.6"]);
        let (targets, _) = ip_targets(&slices, "http", "TCP", false, &NO_PODS);
        assert_eq!(
            ids(&targets),
            vec!["10.244.1.1"],
            "no gate: only ready ones"
        );
    }

    #[test]
    fn ssl_ports_make_tls_listeners() {
        let svc = service(
            &[
                ("https", 443, "TCP", Some(30443)),
                ("http", 80, "TCP", Some(30080)),
            ],
            &[
                (
                    crate::provider::aws::annotations::annotations::SSL_CERT,
                    "arn:aws:acm:us-east-1:1:certificate/x",
                ),
                (
                    crate::provider::aws::annotations::annotations::SSL_PORTS,
                    "https",
                ),
            ],
        );
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&nodes, &[], &subnets)).expect("build");
        assert_eq!(lb.listeners[0].protocol, "TCP");
        assert_eq!(lb.listeners[0].certificate, None);
        assert_eq!(lb.listeners[0].ssl_policy, None);
        assert_eq!(lb.listeners[1].protocol, "TLS");
        assert_eq!(
            lb.listeners[1].certificate.as_deref(),
            Some("arn:aws:acm:us-east-1:1:certificate/x")
        );
        assert_eq!(
            lb.listeners[1].ssl_policy.as_deref(),
            Some(crate::provider::aws::settings::DEFAULT_SSL_POLICY)
        );
        assert_eq!(lb.target_groups[1].protocol, "TCP");
        // A UDP or TCP_UDP port never turns TLS, even with ssl-ports `*`.
        let mixed = service(
            &[
                ("dns-tcp", 53, "TCP", Some(30053)),
                ("dns-udp", 53, "UDP", Some(30053)),
                ("https", 443, "TCP", Some(30443)),
            ],
            &[(
                crate::provider::aws::annotations::annotations::SSL_CERT,
                "arn:aws:acm:us-east-1:1:certificate/x",
            )],
        );
        let lb =
            build(&mixed, &settings_for(&mixed), &world(&nodes, &[], &subnets)).expect("build");
        let protocols: Vec<&str> = lb.listeners.iter().map(|l| l.protocol.as_str()).collect();
        assert_eq!(protocols, vec!["TCP_UDP", "TLS"]);
    }
}
