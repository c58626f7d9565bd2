//! The desired load balancer for one Service: a pure function of the Service, its class,
//! the nodes, the EndpointSlices and the subnets found for it.

use std::collections::{BTreeMap, BTreeSet};

use crate::provider::aws::security_groups::{self, Security};
use crate::provider::aws::settings::{HealthCheck, HealthPort, ProxyProtocol, Settings, SslPorts};
use berth_crds::annotations as keys;
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
    /// One per subnet, in subnet order, when any static address is asked for; else empty
    /// (AWS assigns the addresses).
    pub mappings: Vec<SubnetMapping>,
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

/// A subnet of the load balancer with its static addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubnetMapping {
    pub subnet: String,
    pub allocation_id: Option<String>,
    pub private_ipv4: Option<String>,
    pub ipv6: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredListener {
    pub port: i32,
    /// `TCP`, `UDP`, `TCP_UDP` or `TLS`.
    pub protocol: String,
    /// TLS only: the certificate ARN and the security policy.
    pub certificate: Option<String>,
    pub ssl_policy: Option<String>,
    /// TLS only: certificates besides the default one (served by SNI).
    pub extra_certificates: Vec<String>,
    /// TLS only: the ALPN policy, when set.
    pub alpn_policy: Option<String>,
    /// Listener attributes to set (others are left as they are).
    pub attributes: BTreeMap<String, String>,
    /// Name of the target group in [`DesiredLoadBalancer::target_groups`].
    pub target_group: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTargetGroup {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    pub target_type: TargetType,
    /// An IPv6 target group (dualstack load balancer, ip targets, an IPv6 Service).
    pub ipv6: bool,
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
    /// Annotations that do not fit the Service or its subnets, every one named.
    #[error("{}", .0.join("; "))]
    InvalidAnnotation(Vec<String>),
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
    /// The CIDRs of the subnets, known when static private or IPv6 addresses need them.
    pub subnet_cidrs: &'a BTreeMap<String, Vec<ipnet::IpNet>>,
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

/// Endpoints of the slices of `family` (`IPv4`, `IPv6`), with the slice they are in.
fn endpoints<'s>(
    slices: &'s [std::sync::Arc<EndpointSlice>],
    family: &'s str,
) -> impl Iterator<Item = (&'s EndpointSlice, &'s Endpoint)> {
    slices
        .iter()
        .filter(move |s| s.address_type == family)
        .flat_map(|s| s.endpoints.iter().flatten().map(move |ep| (s.as_ref(), ep)))
}

/// Whether an endpoint is ready (one without a ready condition counts as ready, as the
/// EndpointSlice API says).
fn is_ready(ep: &Endpoint) -> bool {
    ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

/// Ready endpoints of the slices of `family`, with the slice they are in.
fn ready_endpoints<'s>(
    slices: &'s [std::sync::Arc<EndpointSlice>],
    family: &'s str,
) -> impl Iterator<Item = (&'s EndpointSlice, &'s Endpoint)> {
    endpoints(slices, family).filter(|(_, ep)| is_ready(ep))
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

/// Endpoint addresses of `family` of the Service port named `port_name` with `protocol`, with the
/// port each endpoint listens on: the targets (ready endpoints, and pods only waiting for
/// berth's readiness gate) and the terminating endpoints still serving. Endpoints that
/// are not Pods only when `allow_non_pod`.
pub fn ip_targets(
    slices: &[std::sync::Arc<EndpointSlice>],
    family: &str,
    port_name: &str,
    protocol: &str,
    allow_non_pod: bool,
    gated_ready: &BTreeSet<String>,
) -> (BTreeSet<Target>, BTreeSet<Target>) {
    let (mut targets, mut serving) = (BTreeSet::new(), BTreeSet::new());
    for (slice, ep) in endpoints(slices, family) {
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
    ready_endpoints(slices, "IPv4")
        .chain(ready_endpoints(slices, "IPv6"))
        .filter(|(_, ep)| !is_pod(ep))
        .flat_map(|(_, ep)| ep.addresses.iter().cloned())
        .collect()
}

fn listener_protocol(protocols: &BTreeSet<&str>, tcp_udp: bool) -> Result<&'static str, String> {
    match (
        protocols.contains("TCP"),
        protocols.contains("UDP"),
        protocols.len(),
    ) {
        (true, true, 2) if tcp_udp => Ok("TCP_UDP"),
        (true, true, 2) => Err(format!(
            "{} is false, but a port with TCP and UDP needs one TCP_UDP listener (a Network Load Balancer has one listener per port)",
            keys::ENABLE_TCP_UDP_LISTENER
        )),
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
    /// Target groups are IPv6 (see [`DesiredTargetGroup::ipv6`]).
    ipv6: bool,
    /// The Service's ports, for health-check ports given by name.
    ports: Vec<ServicePort>,
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
    if hc.port == HealthPort::Port(0) {
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
                let family = if self.ipv6 { "IPv6" } else { "IPv4" };
                let gated = self.world.gated_ready;
                ip_targets(self.world.slices, family, &pname, &pproto, allow, gated)
            }
        }
    }

    /// The health check of the target group of `group`: a port given by name becomes
    /// that Service port's nodePort (instance targets) or numeric targetPort (ip targets).
    fn health_check_for(&self) -> Result<HealthCheck, String> {
        let mut hc = self.health_check.clone();
        let HealthPort::Named(name) = &hc.port else {
            return Ok(hc);
        };
        let Some(port) = self.ports.iter().find(|p| p.name.as_deref() == Some(name)) else {
            return Err(format!(
                "{}: the Service has no port named `{name}`",
                keys::HC_PORT
            ));
        };
        let number = match self.settings.target_type {
            TargetType::Instance => port.node_port,
            TargetType::Ip => match &port.target_port {
                Some(IntOrString::Int(n)) => Some(*n),
                None => Some(port.port),
                Some(IntOrString::String(_)) => {
                    return Err(format!(
                        "{}: port `{name}` has a named targetPort; ip targets need a number",
                        keys::HC_PORT
                    ));
                }
            },
        };
        let Some(number) = number else {
            return Err(format!(
                "{}: port `{name}` has no nodePort yet",
                keys::HC_PORT
            ));
        };
        hc.port = HealthPort::Port(number);
        Ok(hc)
    }

    /// The target group attributes of Service port `port`: the global ones, the port's
    /// own over them (an empty value keeps the global one), then proxy protocol.
    fn tg_attributes(&self, port: i32) -> BTreeMap<String, String> {
        let settings = self.settings;
        let mut attrs = settings.tg_attributes.clone();
        for (k, v) in settings
            .tg_attributes_by_port
            .get(&port)
            .into_iter()
            .flatten()
        {
            if !v.is_empty() {
                attrs.insert(k.clone(), v.clone());
            }
        }
        let key = "proxy_protocol_v2.enabled".to_string();
        match &settings.proxy_protocol {
            ProxyProtocol::Unset => {}
            ProxyProtocol::All => {
                attrs.insert(key, "true".into());
            }
            ProxyProtocol::Ports(ports) => {
                attrs.insert(key, ports.contains(&port).to_string());
            }
        }
        attrs
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
        let protocol = listener_protocol(&protocols, settings.tcp_udp).map_err(|e| {
            if protocols.len() == 2 && !settings.tcp_udp {
                BuildError::InvalidAnnotation(vec![e])
            } else {
                BuildError::InvalidSpec(e)
            }
        })?;
        let tg_port = target_group_port(group, settings.target_type, port)
            .map_err(BuildError::InvalidSpec)?;
        let target_type = match settings.target_type {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        };
        let tls = tls_for(settings, port, group, protocol);
        let tg_protocol = match tls {
            Some(ssl) if ssl.backend_tls => "TLS",
            _ => protocol,
        };
        // Protocol and address type are fixed at creation: a change makes a new target
        // group (the name of an unchanged one stays as it was).
        let mut hash_input = format!(
            "{}/{}/{port}/{protocol}/{tg_port}/{target_type}/{}",
            world.cluster, self.uid, world.vpc_id
        );
        if tg_protocol != protocol {
            hash_input.push_str("/tls");
        }
        if self.ipv6 {
            hash_input.push_str("/ipv6");
        }
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
            protocol: tg_protocol.to_string(),
            port: tg_port,
            target_type: settings.target_type,
            ipv6: self.ipv6,
            vpc_id: world.vpc_id.to_string(),
            health_check: self
                .health_check_for()
                .map_err(|e| BuildError::InvalidAnnotation(vec![e]))?,
            attributes: self.tg_attributes(port),
            tags,
            targets,
            serving,
        };
        let listener_protocol = if tls.is_some() { "TLS" } else { protocol };
        let attributes = settings
            .listener_attributes
            .get(&(listener_protocol.to_string(), port))
            .cloned()
            .unwrap_or_default();
        let listener = DesiredListener {
            port,
            protocol: listener_protocol.into(),
            certificate: tls.map(|ssl| ssl.certificate.clone()),
            ssl_policy: tls.map(|ssl| ssl.policy.clone()),
            extra_certificates: tls
                .map(|ssl| ssl.extra_certificates.clone())
                .unwrap_or_default(),
            alpn_policy: tls.and_then(|ssl| ssl.alpn_policy.clone()),
            attributes,
            target_group: tg_name,
        };
        Ok((listener, target_group))
    }
}

/// Per-port annotations naming a port or listener the Service does not have. Pure.
fn unmatched_ports(settings: &Settings, listeners: &[DesiredListener]) -> Vec<String> {
    let ports: BTreeSet<i32> = listeners.iter().map(|l| l.port).collect();
    let mut errors = Vec::new();
    for port in settings.tg_attributes_by_port.keys() {
        if !ports.contains(port) {
            errors.push(format!(
                "{}{port}: the Service has no port {port}",
                keys::TARGET_GROUP_ATTRIBUTES_PORT
            ));
        }
    }
    if let ProxyProtocol::Ports(wanted) = &settings.proxy_protocol {
        for port in wanted.difference(&ports) {
            errors.push(format!(
                "{}: the Service has no port {port}",
                keys::PROXY_PROTOCOL_PER_TARGET_GROUP
            ));
        }
    }
    for (protocol, port) in settings.listener_attributes.keys() {
        if !listeners
            .iter()
            .any(|l| l.port == *port && l.protocol == *protocol)
        {
            let have: Vec<String> = listeners
                .iter()
                .map(|l| format!("{}-{}", l.protocol, l.port))
                .collect();
            errors.push(format!(
                "{}{protocol}-{port}: the load balancer has no such listener (it has {})",
                keys::LISTENER_ATTRIBUTES,
                have.join(", ")
            ));
        }
    }
    errors
}

/// The subnet mappings for the static addresses: Elastic IPs in subnet order, private
/// IPv4 and IPv6 addresses each in the subnet whose CIDR holds it; the counts must match
/// the subnets (as the AWS Load Balancer Controller requires). Pure.
fn subnet_mappings(
    settings: &Settings,
    subnets: &[String],
    cidrs: &BTreeMap<String, Vec<ipnet::IpNet>>,
) -> Result<Vec<SubnetMapping>, Vec<String>> {
    let a = &settings.addresses;
    if a.is_empty() {
        return Ok(Vec::new());
    }
    let mut errors = Vec::new();
    let mut mappings: Vec<SubnetMapping> = subnets
        .iter()
        .map(|s| SubnetMapping {
            subnet: s.clone(),
            ..Default::default()
        })
        .collect();
    let count = |key: &str, n: usize, errors: &mut Vec<String>| {
        if n != 0 && n != subnets.len() {
            errors.push(format!(
                "{key}: {n} given for {} subnets ({}); one per subnet",
                subnets.len(),
                subnets.join(", ")
            ));
            return false;
        }
        n != 0
    };
    if count(keys::EIP_ALLOCATIONS, a.eip_allocations.len(), &mut errors) {
        for (m, id) in mappings.iter_mut().zip(&a.eip_allocations) {
            m.allocation_id = Some(id.clone());
        }
    }
    let v4: Vec<std::net::IpAddr> = a.private_ipv4.iter().map(|ip| (*ip).into()).collect();
    let v6: Vec<std::net::IpAddr> = a.ipv6.iter().map(|ip| (*ip).into()).collect();
    for (key, list, is_v6) in [
        (keys::PRIVATE_IPV4_ADDRESSES, v4, false),
        (keys::IPV6_ADDRESSES, v6, true),
    ] {
        if !count(key, list.len(), &mut errors) {
            continue;
        }
        for m in mappings.iter_mut() {
            let nets = cidrs.get(&m.subnet).map(Vec::as_slice).unwrap_or_default();
            let inside: Vec<&std::net::IpAddr> = list
                .iter()
                .filter(|ip| nets.iter().any(|n| n.contains(*ip)))
                .collect();
            match inside.as_slice() {
                [one] if is_v6 => m.ipv6 = Some(one.to_string()),
                [one] => m.private_ipv4 = Some(one.to_string()),
                _ => {
                    let ranges: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
                    errors.push(format!(
                        "{key}: subnet {} ({}) needs exactly one of the addresses inside it, got {}",
                        m.subnet,
                        if ranges.is_empty() { "no CIDR of this family".into() } else { ranges.join(", ") },
                        inside.len()
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(mappings)
    } else {
        Err(errors)
    }
}

/// Whether the Service has an IPv6 family: with a dualstack load balancer and ip targets
/// its target groups are IPv6 (as the AWS Load Balancer Controller makes them).
fn ipv6_targets(settings: &Settings, spec: &ServiceSpec) -> bool {
    settings.target_type == TargetType::Ip
        && settings.ip_address_type == IpAddressType::Dualstack
        && spec.ip_families.iter().flatten().any(|f| f == "IPv6")
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
        ipv6: ipv6_targets(settings, &spec),
        ports: ports.clone(),
    };
    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    let mut errors = Vec::new();
    for (port, group) in port_groups(&ports) {
        match b.port(port, &group) {
            Ok((listener, target_group)) => {
                listeners.push(listener);
                target_groups.push(target_group);
            }
            Err(BuildError::InvalidAnnotation(e)) => errors.extend(e),
            Err(e) => return Err(e),
        }
    }
    errors.dedup();
    if errors.is_empty() {
        errors.extend(unmatched_ports(settings, &listeners));
    }
    let mappings = match subnet_mappings(settings, world.subnets, world.subnet_cidrs) {
        Ok(m) => m,
        Err(e) => {
            errors.extend(e);
            Vec::new()
        }
    };
    if !errors.is_empty() {
        return Err(BuildError::InvalidAnnotation(errors));
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
        mappings,
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
    static NO_CIDRS: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();

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
            subnet_cidrs: &NO_CIDRS,
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
        let (targets, serving) = ip_targets(&slices, "IPv4", "http", "TCP", false, &awaiting);
        let ids = |s: &BTreeSet<Target>| s.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&targets), vec!["10.244.1.1", "10.244.1.2"]);
        assert_eq!(ids(&serving), vec!["10.244.1.4", "10.244.1.6"]);
        let (targets, _) = ip_targets(&slices, "IPv4", "http", "TCP", false, &NO_PODS);
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

    fn ip_service(ports: &[(&str, i32, &str, Option<i32>)], ann: &[(&str, &str)]) -> Service {
        let mut all = ann.to_vec();
        all.push((keys::NLB_TARGET_TYPE, "ip"));
        service(ports, &all)
    }

    #[test]
    fn static_addresses_become_subnet_mappings_by_order_and_cidr() {
        let subnets = vec!["subnet-a".to_string(), "subnet-b".to_string()];
        let cidrs: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::from([
            (
                "subnet-a".into(),
                vec!["10.0.1.0/24".parse().expect("cidr")],
            ),
            (
                "subnet-b".into(),
                vec!["10.0.2.0/24".parse().expect("cidr")],
            ),
        ]);
        let svc = ip_service(
            &[("http", 80, "TCP", None)],
            &[(keys::PRIVATE_IPV4_ADDRESSES, "10.0.2.7, 10.0.1.7")],
        );
        let w = World {
            subnet_cidrs: &cidrs,
            ..world(&[], &[], &subnets)
        };
        let lb = build(&svc, &settings_for(&svc), &w).expect("build");
        let got: Vec<(&str, Option<&str>)> = lb
            .mappings
            .iter()
            .map(|m| (m.subnet.as_str(), m.private_ipv4.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("subnet-a", Some("10.0.1.7")),
                ("subnet-b", Some("10.0.2.7"))
            ]
        );
        let outside = ip_service(
            &[("http", 80, "TCP", None)],
            &[(keys::PRIVATE_IPV4_ADDRESSES, "10.0.1.7, 10.0.9.7")],
        );
        let Err(BuildError::InvalidAnnotation(errors)) =
            build(&outside, &settings_for(&outside), &w)
        else {
            panic!("an address outside every subnet is an error");
        };
        assert!(errors[0].contains("subnet-b"), "{errors:?}");
        let eips = ip_service(
            &[("http", 80, "TCP", None)],
            &[
                (keys::SCHEME, "internet-facing"),
                (keys::EIP_ALLOCATIONS, "eipalloc-1"),
            ],
        );
        let Err(BuildError::InvalidAnnotation(errors)) = build(&eips, &settings_for(&eips), &w)
        else {
            panic!("one allocation for two subnets is an error");
        };
        assert!(errors[0].contains("1 given for 2 subnets"), "{errors:?}");
        let plain = ip_service(&[("http", 80, "TCP", None)], &[]);
        let lb = build(&plain, &settings_for(&plain), &w).expect("build");
        assert!(lb.mappings.is_empty(), "AWS assigns the addresses");
    }

    #[test]
    fn per_port_attributes_proxy_protocol_and_listener_attributes() {
        let svc = ip_service(
            &[("http", 80, "TCP", None), ("https", 443, "TCP", None)],
            &[
                (keys::TARGET_GROUP_ATTRIBUTES, "d=30, s=on"),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.443",
                    "d=5, s=",
                ),
                (keys::PROXY_PROTOCOL_PER_TARGET_GROUP, "443"),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80",
                    "tcp.idle_timeout.seconds=400",
                ),
            ],
        );
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&[], &[], &subnets)).expect("build");
        let (http, https) = (
            &lb.target_groups[0].attributes,
            &lb.target_groups[1].attributes,
        );
        assert_eq!(http["d"], "30");
        assert_eq!(https["d"], "5");
        assert_eq!(https["s"], "on", "an empty value keeps the global one");
        assert_eq!(http["proxy_protocol_v2.enabled"], "false");
        assert_eq!(https["proxy_protocol_v2.enabled"], "true");
        assert_eq!(
            lb.listeners[0].attributes["tcp.idle_timeout.seconds"],
            "400"
        );
        assert!(lb.listeners[1].attributes.is_empty());
        let missing = ip_service(
            &[("http", 80, "TCP", None)],
            &[
                (
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.443",
                    "d=5",
                ),
                (keys::PROXY_PROTOCOL_PER_TARGET_GROUP, "8080"),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.UDP-80",
                    "x=1",
                ),
            ],
        );
        let Err(BuildError::InvalidAnnotation(errors)) = build(
            &missing,
            &settings_for(&missing),
            &world(&[], &[], &subnets),
        ) else {
            panic!("ports the Service lacks are errors");
        };
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn a_named_health_check_port_is_the_node_port_or_the_target_port() {
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let svc = service(
            &[
                ("http", 80, "TCP", Some(30080)),
                ("admin", 81, "TCP", Some(30081)),
            ],
            &[(keys::HC_PORT, "admin")],
        );
        let lb = build(&svc, &settings_for(&svc), &world(&nodes, &[], &subnets)).expect("build");
        for tg in &lb.target_groups {
            assert_eq!(tg.health_check.port, HealthPort::Port(30081));
        }
        let mut ip = ip_service(&[("http", 80, "TCP", None)], &[(keys::HC_PORT, "http")]);
        ip.spec
            .get_or_insert_default()
            .ports
            .get_or_insert_default()[0]
            .target_port = Some(IntOrString::Int(8080));
        let lb = build(&ip, &settings_for(&ip), &world(&[], &[], &subnets)).expect("build");
        assert_eq!(
            lb.target_groups[0].health_check.port,
            HealthPort::Port(8080)
        );
        let unknown = ip_service(&[("http", 80, "TCP", None)], &[(keys::HC_PORT, "metrics")]);
        assert!(matches!(
            build(
                &unknown,
                &settings_for(&unknown),
                &world(&[], &[], &subnets)
            ),
            Err(BuildError::InvalidAnnotation(_))
        ));
    }

    #[test]
    fn tcp_udp_off_is_an_error_for_a_shared_port() {
        let svc = service(
            &[
                ("dns-tcp", 53, "TCP", Some(30053)),
                ("dns-udp", 53, "UDP", Some(30053)),
            ],
            &[(keys::ENABLE_TCP_UDP_LISTENER, "false")],
        );
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let Err(BuildError::InvalidAnnotation(errors)) =
            build(&svc, &settings_for(&svc), &world(&nodes, &[], &subnets))
        else {
            panic!("TCP and UDP on one port need TCP_UDP");
        };
        assert!(
            errors[0].contains(keys::ENABLE_TCP_UDP_LISTENER),
            "{errors:?}"
        );
    }

    #[test]
    fn tls_listeners_carry_extra_certificates_alpn_and_tls_target_groups() {
        let svc = ip_service(
            &[("https", 443, "TCP", None)],
            &[
                (
                    keys::SSL_CERT,
                    "arn:aws:acm:r:1:certificate/a,arn:aws:acm:r:1:certificate/b",
                ),
                (keys::ALPN_POLICY, "HTTP2Only"),
                (keys::BACKEND_PROTOCOL, "ssl"),
            ],
        );
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&[], &[], &subnets)).expect("build");
        let l = &lb.listeners[0];
        assert_eq!(
            l.certificate.as_deref(),
            Some("arn:aws:acm:r:1:certificate/a")
        );
        assert_eq!(
            l.extra_certificates,
            vec!["arn:aws:acm:r:1:certificate/b".to_string()]
        );
        assert_eq!(l.alpn_policy.as_deref(), Some("HTTP2Only"));
        assert_eq!(lb.target_groups[0].protocol, "TLS");
        let plain = ip_service(
            &[("https", 443, "TCP", None)],
            &[(keys::SSL_CERT, "arn:aws:acm:r:1:certificate/a")],
        );
        let tcp = build(&plain, &settings_for(&plain), &world(&[], &[], &subnets)).expect("build");
        assert_ne!(
            tcp.target_groups[0].name, lb.target_groups[0].name,
            "a TLS target group is a new one (the protocol is fixed at creation)"
        );
    }

    #[test]
    fn dualstack_ip_targets_of_an_ipv6_service_go_to_an_ipv6_target_group() {
        let pod = serde_json::json!({"kind": "Pod", "namespace": "ns", "name": "a"});
        let slice = |family: &str, addr: &str| -> Arc<EndpointSlice> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("s-{family}"), "namespace": "ns"},
                    "addressType": family,
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [addr], "targetRef": pod}]
                }))
                .expect("slice"),
            )
        };
        let slices = vec![slice("IPv4", "10.244.1.2"), slice("IPv6", "fd00:10:244::2")];
        let mut svc = ip_service(
            &[("http", 80, "TCP", None)],
            &[(keys::IP_ADDRESS_TYPE, "dualstack")],
        );
        svc.spec.get_or_insert_default().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        let subnets = vec!["subnet-a".to_string()];
        let lb = build(&svc, &settings_for(&svc), &world(&[], &slices, &subnets)).expect("build");
        let tg = &lb.target_groups[0];
        assert!(tg.ipv6);
        let ids: Vec<&str> = tg.targets.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["fd00:10:244::2"]);
        let v4 = ip_service(
            &[("http", 80, "TCP", None)],
            &[(keys::IP_ADDRESS_TYPE, "dualstack")],
        );
        let lb4 = build(&v4, &settings_for(&v4), &world(&[], &slices, &subnets)).expect("build");
        assert!(!lb4.target_groups[0].ipv6);
        assert_ne!(lb4.target_groups[0].name, tg.name);
        let ids: Vec<&str> = lb4.target_groups[0]
            .targets
            .iter()
            .map(|t| t.id.as_str())
            .collect();
        assert_eq!(ids, vec!["10.244.1.2"]);
    }
}
