//! berth's API: the `LoadBalancerClass` resource and the names (annotations, labels,
//! finalizer, tags) shared by the controller, the node agent and the chart.

pub mod addresses;
pub mod bgp;

/// The node agents' L2 announcement Leases, as the agents write them and the controller
/// and `kubectl berth` read them.
pub mod l2 {
    use std::net::IpAddr;

    /// Label on every address Lease the agents create (their watches select on it).
    pub const LEASE_LABEL: &str = "berth.dev/l2-announcement";

    /// Lease name of an address: `berth-l2-198-19-8-5`, `berth-l2-fd00--5`.
    pub fn lease_name(addr: &IpAddr) -> String {
        let mut name = format!("berth-l2-{addr}").replace(['.', ':'], "-");
        // A name must end alphanumeric (`fd00::` would end in `-`).
        if name.ends_with('-') {
            name.push('0');
        }
        name
    }
}

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of berth's own resources and prefix of its annotations.
pub const GROUP: &str = "berth.dev";
/// Finalizer the controller puts on every Service it provisions for.
pub const FINALIZER: &str = "berth.dev/load-balancer";
/// Field manager for berth's server-side apply writes.
pub const CONTROLLER_MANAGER: &str = "berth-controller";
/// Prefix of `spec.loadBalancerClass` values berth owns: `berth.dev/<class name>`.
pub const CLASS_PREFIX: &str = "berth.dev/";
/// Service annotation recording the class that provisioned it: after a type or class
/// change, only the controller handling that class cleans up.
pub const ANNOTATION_OWNER_CLASS: &str = "berth.dev/load-balancer-class";
/// Service condition type written by the controller.
pub const CONDITION_LB_READY: &str = "berth.dev/LoadBalancerReady";
/// LoadBalancerClass condition type.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Service condition naming who announces its pool addresses (written by the controller
/// from the node agents' L2 Leases).
pub const CONDITION_ANNOUNCED: &str = "berth.dev/Announced";

/// Node label that keeps a node out of every load balancer's targets.
pub const LABEL_EXCLUDE_FROM_LB: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// Taint the cluster autoscaler puts on nodes it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Pod condition (and readiness gate) berth sets True once the pod's target is healthy in
/// every target group of each berth `ip`-target Service selecting it.
pub const CONDITION_TARGET_HEALTH: &str = "target-health.berth.dev/load-balancer";
/// Namespace label (`enabled`) under which the chart's MutatingAdmissionPolicy gives new
/// pods the [`CONDITION_TARGET_HEALTH`] readiness gate.
pub const LABEL_READINESS_GATE_INJECT: &str = "berth.dev/readiness-gate-inject";

/// Tags berth puts on every AWS resource it creates.
pub mod tags {
    /// The controller's cluster name; the orphan sweep only looks at its own cluster.
    pub const CLUSTER: &str = "berth.dev/cluster";
    /// `<namespace>/<name>` of the Service.
    pub const SERVICE: &str = "berth.dev/service";
    /// UID of the Service: resources whose UID no longer exists are orphans.
    pub const SERVICE_UID: &str = "berth.dev/service-uid";
    /// What the resource is for the Service: `loadbalancer` or `targetgroup/<port>/<proto>`.
    pub const RESOURCE: &str = "berth.dev/resource";
    /// The cluster's identity (the `kube-system` Namespace UID unless set explicitly): the
    /// sweep, adoption and target-group reuse act only on resources carrying this
    /// cluster's value, so two clusters with one name never touch each other's.
    pub const CLUSTER_ID: &str = "berth.dev/cluster-id";
    /// On a load balancer whose deletion protection berth itself turned on (value
    /// `berth`): only then may berth turn it off again.
    pub const PROTECTION: &str = "berth.dev/deletion-protection";
    /// On a load balancer berth adopted from another controller (value: that controller,
    /// `aws-load-balancer-controller`): handed back, not deleted, when the Service stops
    /// being berth's without being deleted.
    pub const ADOPTED_FROM: &str = "berth.dev/adopted-from";
}

/// Service annotations berth reads: the AWS Load Balancer Controller's names, so existing
/// manifests keep working.
pub mod annotations {
    pub const AWS_PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";
    pub const SCHEME: &str = "service.beta.kubernetes.io/aws-load-balancer-scheme";
    pub const NLB_TARGET_TYPE: &str =
        "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type";
    /// The AWS Load Balancer Controller's marker on Services without a class: `external`
    /// (with `nlb-target-type`) or `nlb-ip` (ip targets).
    pub const LB_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-type";
    pub const NAME: &str = "service.beta.kubernetes.io/aws-load-balancer-name";
    pub const IP_ADDRESS_TYPE: &str =
        "service.beta.kubernetes.io/aws-load-balancer-ip-address-type";
    pub const SUBNETS: &str = "service.beta.kubernetes.io/aws-load-balancer-subnets";
    pub const ADDITIONAL_RESOURCE_TAGS: &str =
        "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags";
    pub const ATTRIBUTES: &str = "service.beta.kubernetes.io/aws-load-balancer-attributes";
    pub const TARGET_GROUP_ATTRIBUTES: &str =
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes";
    pub const TARGET_NODE_LABELS: &str =
        "service.beta.kubernetes.io/aws-load-balancer-target-node-labels";
    pub const PROXY_PROTOCOL: &str = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol";
    pub const SSL_CERT: &str = "service.beta.kubernetes.io/aws-load-balancer-ssl-cert";
    pub const SSL_PORTS: &str = "service.beta.kubernetes.io/aws-load-balancer-ssl-ports";
    pub const SSL_NEGOTIATION_POLICY: &str =
        "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy";
    pub const HC_PROTOCOL: &str =
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol";
    pub const HC_PORT: &str = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port";
    pub const HC_PATH: &str = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path";
    pub const HC_INTERVAL: &str =
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval";
    pub const HC_TIMEOUT: &str = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-timeout";
    pub const HC_HEALTHY_THRESHOLD: &str =
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold";
    pub const HC_UNHEALTHY_THRESHOLD: &str =
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-unhealthy-threshold";
    pub const HC_SUCCESS_CODES: &str =
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-success-codes";
    /// NLB subnet mappings: one Elastic IP allocation per subnet (internet-facing only).
    pub const EIP_ALLOCATIONS: &str =
        "service.beta.kubernetes.io/aws-load-balancer-eip-allocations";
    /// NLB subnet mappings: one private IPv4 address per subnet (internal only).
    pub const PRIVATE_IPV4_ADDRESSES: &str =
        "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses";
    /// NLB subnet mappings: one IPv6 address per subnet (dualstack only).
    pub const IPV6_ADDRESSES: &str = "service.beta.kubernetes.io/aws-load-balancer-ipv6-addresses";
    pub const ALPN_POLICY: &str = "service.beta.kubernetes.io/aws-load-balancer-alpn-policy";
    pub const BACKEND_PROTOCOL: &str =
        "service.beta.kubernetes.io/aws-load-balancer-backend-protocol";
    /// A family: `listener-attributes.<Protocol>-<Port>`, one key per listener.
    pub const LISTENER_ATTRIBUTES: &str =
        "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.";
    /// A family: `target-group-attributes.<Port>`, over [`TARGET_GROUP_ATTRIBUTES`] for
    /// the target group of that Service port.
    pub const TARGET_GROUP_ATTRIBUTES_PORT: &str =
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.";
    pub const PROXY_PROTOCOL_PER_TARGET_GROUP: &str =
        "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol-per-target-group";
    pub const ENABLE_TCP_UDP_LISTENER: &str =
        "service.beta.kubernetes.io/aws-load-balancer-enable-tcp-udp-listener";
    /// berth's own (pool provider): pin the Service's addresses, comma-separated, at most
    /// one per address family (`198.19.0.10` or `198.19.0.10,2001:db8::10`).
    pub const LOAD_BALANCER_IPS: &str = "berth.dev/load-balancer-ips";
    /// berth's own (pool provider): Services in one namespace with the same value share one
    /// address when their ports (port and protocol) do not overlap.
    pub const ALLOW_SHARED_IP: &str = "berth.dev/allow-shared-ip";
    /// Address pins written for MetalLB (current and pre-0.13 key) and Cilium LB-IPAM
    /// (current and legacy key), honoured like `LOAD_BALANCER_IPS` so a Service moved onto
    /// a berth pool class keeps its address. berth's own key wins when both are set.
    pub const PEER_LOAD_BALANCER_IPS: [&str; 4] = [
        "metallb.io/loadBalancerIPs",
        "metallb.universe.tf/loadBalancerIPs",
        "lbipam.cilium.io/ips",
        "io.cilium/lb-ipam-ips",
    ];
    /// The in-tree cloud provider's source ranges (comma-separated CIDRs), read when
    /// `spec.loadBalancerSourceRanges` is empty: the NLB's managed security group admits
    /// only them.
    pub const SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
    /// Security group IDs for the NLB instead of the one berth manages.
    pub const SECURITY_GROUPS: &str =
        "service.beta.kubernetes.io/aws-load-balancer-security-groups";
    /// Managed prefix list IDs the NLB's managed security group admits.
    pub const SECURITY_GROUP_PREFIX_LISTS: &str =
        "service.beta.kubernetes.io/aws-load-balancer-security-group-prefix-lists";
    /// `true|false`: rules on the targets' security groups for the NLB's traffic.
    pub const MANAGE_BACKEND_SG_RULES: &str =
        "service.beta.kubernetes.io/aws-load-balancer-manage-backend-security-group-rules";
    /// `true`: the NLB gets no security group (source ranges are then not enforced).
    pub const DISABLE_NLB_SG: &str = "service.beta.kubernetes.io/aws-load-balancer-disable-nlb-sg";
}

/// A kind of load balancer and its settings. Services select it with
/// `spec.loadBalancerClass: berth.dev/<name>`; the one with `default: true` also takes
/// Services without a class.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "LoadBalancerClass",
    status = "LoadBalancerClassStatus",
    shortname = "lbclass",
    printcolumn = r#"{"name":"Default","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"Scheme","type":"string","jsonPath":".spec.aws.scheme"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.aws.targetType"}"#,
    printcolumn = r#"{"name":"Services","type":"integer","jsonPath":".status.services"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyServices"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.allocated"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("(has(self.aws) ? 1 : 0) + (has(self.pool) ? 1 : 0) == 1")
    .message("exactly one provider block (aws or pool) must be set"))]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerClassSpec {
    /// Take Services that set no `spec.loadBalancerClass`.
    #[serde(default)]
    pub default: bool,
    /// AWS ELBv2 Network Load Balancers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsProvider>,
    /// Addresses from a pool, announced by the node agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolProvider>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Scheme {
    #[serde(rename = "internal")]
    Internal,
    #[serde(rename = "internet-facing")]
    InternetFacing,
}

impl Scheme {
    /// The name in the schema, which is also ELBv2's.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Internal => "internal",
            Scheme::InternetFacing => "internet-facing",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    Instance,
    Ip,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpAddressType {
    Ipv4,
    Dualstack,
}

impl IpAddressType {
    /// The name in the schema, which is also ELBv2's.
    pub fn as_str(self) -> &'static str {
        match self {
            IpAddressType::Ipv4 => "ipv4",
            IpAddressType::Dualstack => "dualstack",
        }
    }
}

/// The `aws` provider: one NLB per Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.region)").message(AWS_REGION_REFUSED))]
#[serde(rename_all = "camelCase")]
pub struct AwsProvider {
    /// Not supported, and refused by the API server: every class of a controller
    /// provisions in the controller's region (`--region`). Kept in the schema only so a
    /// class that sets it is rejected with that message instead of silently pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// VPC of the target groups (default: the controller's `--vpc-id`, else the VPC of a
    /// node's instance).
    #[serde(default, rename = "vpcID", skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    /// `internal` (default, as the AWS Load Balancer Controller) or `internet-facing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    /// `instance` (default: nodes on the NodePort) or `ip` (pod IPs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_type: Option<TargetType>,
    /// `ipv4` (default) or `dualstack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address_type: Option<IpAddressType>,
    /// Subnets by id or by tags (default: discovered by the `kubernetes.io/role/elb` or
    /// `kubernetes.io/role/internal-elb` tag and the cluster tag, one per zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnets: Option<SubnetSelector>,
    /// Security group IDs every NLB of the class gets instead of the one berth manages
    /// per NLB (the `security-groups` annotation overrides them): berth manages none of
    /// their rules, so source ranges are not applied, and adds backend rules only when a
    /// Service asks (`manage-backend-security-group-rules: "true"`). Changes apply in
    /// place (SetSecurityGroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<Vec<String>>,
    /// Extra tags on every resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Load balancer attributes (`key: value`), e.g. `load_balancing.cross_zone.enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_attributes: Option<BTreeMap<String, String>>,
    /// Target group attributes, e.g. `deregistration_delay.timeout_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group_attributes: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckDefaults>,
    /// Prefix of generated load balancer and target group names (default `k8s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8), regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"))]
    pub name_prefix: Option<String>,
    /// Which Service annotations may override this class (default: every one berth
    /// implements, as the AWS Load Balancer Controller; `[]`: none). Each entry is a group
    /// (`loadBalancer`, `targetGroup`, `healthCheck`, `tls`) or one annotation, by its
    /// full key or the part after `service.beta.kubernetes.io/aws-load-balancer-`
    /// (`scheme`, `subnets`, `healthcheck-path`, ...). A Service setting any other one
    /// gets no load balancer change at all and the reason `OverrideRefused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 128)))]
    pub allowed_overrides: Option<Vec<String>>,
    /// `ip` targets: also register EndpointSlice endpoints that are not Pods (a
    /// hand-written EndpointSlice's addresses). Default false: only endpoints whose
    /// `targetRef` is a Pod; the others are skipped with a Warning Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_non_pod_targets: Option<bool>,
    /// Other controllers whose load balancers this class takes over in place (opt-in; at
    /// most one class may name a controller). `aws-load-balancer-controller`: berth serves
    /// Services of `spec.loadBalancerClass: service.k8s.aws/nlb` and those without a class
    /// annotated `aws-load-balancer-type: external` (with `nlb-target-type`) or `nlb-ip`,
    /// and adopts the NLB, listeners and target groups that controller made for each,
    /// keeping the DNS name. Stop or scope that controller first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1))]
    pub adopt_from: Option<Vec<AdoptSource>>,
}

/// A controller whose load balancers a class may adopt.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AdoptSource {
    #[serde(rename = "aws-load-balancer-controller")]
    AwsLoadBalancerController,
}

impl AwsProvider {
    /// Whether the class opts in to adopting `source`'s load balancers.
    pub fn adopts(&self, source: AdoptSource) -> bool {
        self.adopt_from.iter().flatten().any(|s| *s == source)
    }
}

/// Why the API server refuses `spec.aws.region`.
pub const AWS_REGION_REFUSED: &str = "spec.aws.region is not supported: a controller provisions in its own region (--region); run one controller per region, each with its own classes";

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubnetSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// Subnets carrying all of these tags (an empty value matches any value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckDefaults {
    /// `TCP`, `HTTP` or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `traffic-port` or a port number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_codes: Option<String>,
}

/// The `pool` provider: each Service gets addresses from `addresses`, written into its
/// `status.loadBalancer.ingress`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolProvider {
    /// IPv4 and IPv6 CIDRs (`198.19.0.0/24`: an IPv4 CIDR up to /30 leaves out its network
    /// and broadcast addresses), ranges (`198.19.0.10-198.19.0.20`) and single addresses
    /// (`198.19.0.77`).
    #[schemars(
        length(min = 1, max = 128),
        inner(length(max = 100), regex(pattern = addresses::SCHEMA_PATTERN))
    )]
    #[x_kube(
        validation = Rule::new(addresses::SCHEMA_RULES[0].0).message(addresses::SCHEMA_RULES[0].1),
        validation = Rule::new(addresses::SCHEMA_RULES[1].0).message(addresses::SCHEMA_RULES[1].1),
        validation = Rule::new(addresses::SCHEMA_RULES[2].0).message(addresses::SCHEMA_RULES[2].1),
    )]
    pub addresses: Vec<String>,
    /// Give addresses to every Service of the class (default true); with false only
    /// Services that pin an address get one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Only Services with matching labels get addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// Only Services in namespaces with matching labels get addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Announce the addresses on the node network with ARP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<bool>,
    /// Announce the addresses to the `BGPPeer` routers from every node that serves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<bgp::BgpAdvertisement>,
    /// Which nodes announce the addresses (L2 and BGP alike), and on which interface L2
    /// puts them (default: every node, on the agent's interface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceScope>,
}

/// Where a pool class's addresses are announced from (`spec.pool.announce`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnnounceScope {
    /// Only nodes with matching labels announce: they alone take the addresses' L2 Leases
    /// and advertise their BGP routes (default: every node). A selector the API cannot
    /// parse refuses the class (`Accepted` False); one that matches no node leaves the
    /// Services' `berth.dev/Announced` condition False, saying so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// L2: the addresses are put on and announced from the first of these interfaces the
    /// node has (names differ between kinds of machine: `[ens5, eth1]`). A node with none
    /// of them takes none of the class's Leases and says so in a Warning Event on the
    /// class. Default: the agent's interface (`--l2-interface`, or the one carrying the
    /// node's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 8),
        inner(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$"))
    )]
    pub interfaces: Option<Vec<String>>,
}

impl PoolProvider {
    /// `announce.nodeSelector`, parsed (the one parser of it, for the controller and the
    /// agents): `Ok(None)` lets every node announce.
    pub fn announce_nodes(&self) -> Result<Option<kube::core::Selector>, String> {
        let Some(sel) = self.announce.as_ref().and_then(|a| a.node_selector.clone()) else {
            return Ok(None);
        };
        kube::core::Selector::try_from(sel)
            .map(Some)
            .map_err(|e| format!("announce.nodeSelector: {e}"))
    }

    /// `announce.interfaces` (empty: the agent's interface).
    pub fn announce_interfaces(&self) -> &[String] {
        self.announce
            .as_ref()
            .and_then(|a| a.interfaces.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerClassStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Services of this class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<i32>,
    /// Services of this class whose load balancer is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_services: Option<i32>,
    /// Pool classes: addresses of the pool held by Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<i64>,
    /// Pool classes: addresses of the pool still free (saturates for huge IPv6 pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
}

/// The class name in `spec.loadBalancerClass`, when it is one of berth's.
pub fn class_name(load_balancer_class: &str) -> Option<&str> {
    load_balancer_class
        .strip_prefix(CLASS_PREFIX)
        .filter(|n| !n.is_empty())
}

/// Every CRD berth defines, as (file name, YAML).
pub fn crd_files() -> Vec<(String, String)> {
    [LoadBalancerClass::crd(), bgp::BGPPeer::crd()]
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            let yaml = serde_yaml::to_string(&crd).unwrap_or_default();
            (
                name,
                format!(
                    "# Generated by `cargo run -p berth-crds --bin crdgen`; do not edit.\n{yaml}"
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::SelectorExt;

    #[test]
    fn committed_crd_yaml_matches_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/berth/crds");
        for (name, yaml) in crd_files() {
            let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            assert!(
                committed == yaml,
                "charts/berth/crds/{name} differs from the Rust types: run `cargo run -p berth-crds --bin crdgen`"
            );
        }
    }

    #[test]
    fn crd_has_one_provider_rule_and_is_cluster_scoped() {
        let crd = LoadBalancerClass::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let json = serde_json::to_string(&crd).unwrap_or_default();
        assert!(json.contains("x-kubernetes-validations"), "{json}");
        assert!(json.contains("exactly one provider block"));
    }

    #[test]
    fn pool_spec_parses_and_is_validated_in_the_schema() {
        let spec: LoadBalancerClassSpec = serde_yaml::from_str(
            "pool:\n  addresses: [198.19.0.0/24, 198.19.1.10-198.19.1.20]\n  autoAssign: false\n  serviceSelector:\n    matchLabels: {tier: edge}\n",
        )
        .unwrap_or_default();
        let pool = spec.pool.unwrap_or_default();
        assert_eq!(pool.addresses.len(), 2);
        assert_eq!(pool.auto_assign, Some(false));
        assert!(pool.service_selector.is_some());
        let crd = serde_json::to_value(LoadBalancerClass::crd()).unwrap_or_default();
        let addresses = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["pool"]["properties"]["addresses"];
        assert_eq!(addresses["minItems"], 1, "{addresses}");
        assert_eq!(addresses["items"]["pattern"], addresses::SCHEMA_PATTERN);
        let rules: Vec<(&str, &str)> = addresses["x-kubernetes-validations"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["rule"].as_str().unwrap_or_default(),
                            r["message"].as_str().unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(rules, addresses::SCHEMA_RULES.to_vec());
    }

    #[test]
    fn aws_region_is_refused_by_the_schema_and_overrides_parse() {
        let crd = serde_json::to_value(LoadBalancerClass::crd()).unwrap_or_default();
        let aws = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["aws"];
        let rules = aws["x-kubernetes-validations"].to_string();
        assert!(rules.contains("!has(self.region)"), "{aws}");
        assert!(rules.contains("not supported"), "{rules}");
        let spec: LoadBalancerClassSpec = serde_yaml::from_str(
            "aws:\n  allowedOverrides: [healthCheck, scheme]\n  allowNonPodTargets: true\n",
        )
        .unwrap_or_default();
        let aws = spec.aws.unwrap_or_default();
        assert_eq!(
            aws.allowed_overrides,
            Some(vec!["healthCheck".to_string(), "scheme".to_string()])
        );
        assert_eq!(aws.allow_non_pod_targets, Some(true));
    }

    #[test]
    fn adopt_from_names_only_the_known_controller_once() {
        let spec: LoadBalancerClassSpec =
            serde_yaml::from_str("aws:\n  adoptFrom: [aws-load-balancer-controller]\n")
                .unwrap_or_default();
        let aws = spec.aws.unwrap_or_default();
        assert!(aws.adopts(AdoptSource::AwsLoadBalancerController));
        assert!(!AwsProvider::default().adopts(AdoptSource::AwsLoadBalancerController));
        assert!(
            serde_yaml::from_str::<LoadBalancerClassSpec>("aws:\n  adoptFrom: [nginx]\n").is_err()
        );
        let crd = serde_json::to_value(LoadBalancerClass::crd()).unwrap_or_default();
        let field = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["aws"]["properties"]["adoptFrom"];
        assert_eq!(field["maxItems"], 1, "{field}");
        assert_eq!(
            field["items"]["enum"],
            serde_json::json!(["aws-load-balancer-controller"]),
            "{field}"
        );
    }

    #[test]
    fn announce_scope_parses_and_refuses_a_bad_selector() {
        let spec: LoadBalancerClassSpec = serde_yaml::from_str(
            "pool:\n  addresses: [198.19.0.0/24]\n  announce:\n    nodeSelector: {matchLabels: {rack: a}}\n    interfaces: [ens5, eth1]\n",
        )
        .unwrap_or_default();
        let pool = spec.pool.unwrap_or_default();
        let sel = pool.announce_nodes().ok().flatten().expect("a selector");
        assert!(sel.matches(&BTreeMap::from([("rack".into(), "a".into())])));
        assert!(!sel.matches(&BTreeMap::new()));
        assert_eq!(pool.announce_interfaces(), ["ens5", "eth1"]);
        assert_eq!(PoolProvider::default().announce_nodes(), Ok(None));
        assert!(PoolProvider::default().announce_interfaces().is_empty());
        let bad: PoolProvider = serde_yaml::from_str(
            "addresses: [198.19.0.0/24]\nannounce:\n  nodeSelector:\n    matchExpressions: [{key: rack, operator: In}]\n",
        )
        .unwrap_or_default();
        let err = bad.announce_nodes().expect_err("In without values");
        assert!(err.starts_with("announce.nodeSelector"), "{err}");
    }

    #[test]
    fn class_names_need_the_prefix() {
        assert_eq!(class_name("berth.dev/internet"), Some("internet"));
        assert_eq!(class_name("berth.dev/"), None);
        assert_eq!(class_name("service.k8s.aws/nlb"), None);
    }

    #[test]
    fn spec_parses_camel_case_yaml() {
        let spec: LoadBalancerClassSpec = serde_yaml::from_str(
            "default: true\naws:\n  vpcID: vpc-1\n  scheme: internet-facing\n  targetType: ip\n  subnets:\n    tags:\n      kubernetes.io/role/elb: '1'\n",
        )
        .unwrap_or_default();
        let aws = spec.aws.unwrap_or_default();
        assert!(spec.default);
        assert_eq!(aws.vpc_id.as_deref(), Some("vpc-1"));
        assert_eq!(aws.scheme, Some(Scheme::InternetFacing));
        assert_eq!(aws.target_type, Some(TargetType::Ip));
        assert!(
            aws.subnets
                .and_then(|s| s.tags)
                .is_some_and(|t| t.len() == 1)
        );
    }
}
