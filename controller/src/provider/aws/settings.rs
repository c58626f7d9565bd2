//! A Service's load-balancer settings and their starting point, the class's `aws` block.
//! [`crate::provider::aws::annotations`] lays each annotation over a [`Draft`] of them.

use std::collections::{BTreeMap, BTreeSet};

use berth_crds::annotations as keys;
use berth_crds::{AwsProvider, IpAddressType, Scheme, TargetType};

use crate::provider::aws::naming::resource_name;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthPort {
    TrafficPort,
    Port(i32),
    /// A Service port's name: its nodePort (instance targets) or numeric targetPort (ip
    /// targets), resolved by the model builder.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `TCP`, `HTTP` or `HTTPS`.
    pub protocol: String,
    pub port: HealthPort,
    pub path: Option<String>,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
    pub success_codes: Option<String>,
}

impl HealthCheck {
    /// The AWS Load Balancer Controller's NLB default: TCP on the traffic port.
    pub fn default_tcp() -> Self {
        Self {
            protocol: "TCP".into(),
            port: HealthPort::TrafficPort,
            path: None,
            interval_seconds: 10,
            timeout_seconds: 10,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            success_codes: None,
        }
    }

    /// `externalTrafficPolicy: Local`: the node answers `/healthz` on the
    /// healthCheckNodePort with 200 only when it has a local endpoint.
    pub fn etp_local(node_port: i32) -> Self {
        Self {
            protocol: "HTTP".into(),
            port: HealthPort::Port(node_port),
            path: Some("/healthz".into()),
            interval_seconds: 10,
            timeout_seconds: 6,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            success_codes: Some("200-399".into()),
        }
    }

    pub fn port_string(&self) -> String {
        match &self.port {
            HealthPort::TrafficPort => "traffic-port".into(),
            HealthPort::Port(p) => p.to_string(),
            HealthPort::Named(name) => name.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SslPorts {
    All,
    /// Port numbers or names.
    Some(BTreeSet<String>),
}

/// TLS listeners: `ssl-cert`, `ssl-ports`, `ssl-negotiation-policy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ssl {
    /// The listener's default certificate (the first of `ssl-cert`).
    pub certificate: String,
    /// The rest of `ssl-cert`: added to each TLS listener's certificate list (SNI).
    pub extra_certificates: Vec<String>,
    /// `alpn-policy`, when set.
    pub alpn_policy: Option<String>,
    /// `backend-protocol: ssl`: the target groups of TLS listeners speak TLS too.
    pub backend_tls: bool,
    pub ports: SslPorts,
    pub policy: String,
}

/// The AWS Load Balancer Controller's default security policy for TLS listeners.
pub const DEFAULT_SSL_POLICY: &str = "ELBSecurityPolicy-2016-08";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubnetChoice {
    Discover,
    /// Subnet IDs (`subnet-…`).
    Ids(Vec<String>),
    /// Subnets named (tag `Name`) like these.
    Names(Vec<String>),
    Tags(BTreeMap<String, String>),
}

/// The NLB's frontend security groups: one berth manages (default), the user's (the
/// `security-groups` annotation or the class's `securityGroups`), or none
/// (`disable-nlb-sg`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendChoice {
    Managed,
    Given(Vec<String>),
    Disabled,
}

/// Static addresses of the load balancer's subnet mappings, each list in subnet order
/// (Elastic IPs) or matched to the subnet whose CIDR holds it (private IPv4, IPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticAddresses {
    pub eip_allocations: Vec<String>,
    pub private_ipv4: Vec<std::net::Ipv4Addr>,
    pub ipv6: Vec<std::net::Ipv6Addr>,
}

impl StaticAddresses {
    pub fn is_empty(&self) -> bool {
        self.eip_allocations.is_empty() && self.private_ipv4.is_empty() && self.ipv6.is_empty()
    }
}

/// Proxy protocol v2 on the target groups: `proxy-protocol: "*"` (every one, winning over
/// everything else) or `proxy-protocol-per-target-group` (these Service ports on, the
/// others off).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyProtocol {
    #[default]
    Unset,
    All,
    Ports(BTreeSet<i32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub name: String,
    pub name_prefix: String,
    pub scheme: Scheme,
    pub target_type: TargetType,
    pub ip_address_type: IpAddressType,
    pub vpc_id: Option<String>,
    pub subnets: SubnetChoice,
    /// The NLB's frontend security groups.
    pub frontend: FrontendChoice,
    /// Who may reach the NLB (`spec.loadBalancerSourceRanges`, else the
    /// `load-balancer-source-ranges` annotation), normalised CIDRs; `None`: not given.
    pub source_ranges: Option<Vec<String>>,
    /// `security-group-prefix-lists`: managed prefix lists admitted like source ranges.
    pub prefix_lists: Vec<String>,
    /// `manage-backend-security-group-rules`; `None`: the default for the frontend.
    pub manage_backend_rules: Option<bool>,
    /// Class tags and `additional-resource-tags` (berth's own tags are added by the builder).
    pub tags: BTreeMap<String, String>,
    pub lb_attributes: BTreeMap<String, String>,
    pub tg_attributes: BTreeMap<String, String>,
    /// `target-group-attributes.<port>`: over `tg_attributes` for that Service port's
    /// target group (an empty value keeps the global one).
    pub tg_attributes_by_port: BTreeMap<i32, BTreeMap<String, String>>,
    pub proxy_protocol: ProxyProtocol,
    /// `listener-attributes.<Protocol>-<Port>`, keyed by (protocol, port).
    pub listener_attributes: BTreeMap<(String, i32), BTreeMap<String, String>>,
    /// `enable-tcp-udp-listener` (berth's default: on).
    pub tcp_udp: bool,
    pub addresses: StaticAddresses,
    pub health_check: HealthCheck,
    /// Any `healthcheck-*` annotation set: then ETP=Local does not replace the check.
    pub health_check_overridden: bool,
    pub target_node_labels: BTreeMap<String, String>,
    pub ssl: Option<Ssl>,
    /// `ip` targets: endpoints that are not Pods are registered too (class opt-in).
    pub allow_non_pod_targets: bool,
}

/// Settings being assembled: the class's, then every annotation over them. TLS is kept
/// in parts until [`Draft::finish`], as its three annotations only make sense together.
#[derive(Clone, Debug)]
pub struct Draft {
    pub settings: Settings,
    /// `ssl-cert`: the first is the default certificate.
    pub ssl_certificates: Vec<String>,
    pub alpn_policy: Option<String>,
    pub backend_tls: bool,
    pub ssl_ports: Option<SslPorts>,
    pub ssl_policy: String,
    /// `disable-nlb-sg: "true"`, applied last (it wins over the class's groups).
    pub disable_security_groups: bool,
}

/// The subnets the class chooses when no annotation does.
fn class_subnets(class: &AwsProvider) -> SubnetChoice {
    match &class.subnets {
        Some(sel) if sel.ids.as_ref().is_some_and(|i| !i.is_empty()) => {
            SubnetChoice::Ids(sel.ids.clone().unwrap_or_default())
        }
        Some(sel) if sel.tags.as_ref().is_some_and(|t| !t.is_empty()) => {
            SubnetChoice::Tags(sel.tags.clone().unwrap_or_default())
        }
        _ => SubnetChoice::Discover,
    }
}

/// The class's health-check values, as the annotation each one stands in for.
pub fn class_health_check(class: &AwsProvider) -> Vec<(&'static str, String)> {
    let hc = class.health_check.clone().unwrap_or_default();
    let num = |n: Option<i32>| n.map(|n| n.to_string());
    [
        (keys::HC_PROTOCOL, hc.protocol),
        (keys::HC_PORT, hc.port),
        (keys::HC_PATH, hc.path),
        (keys::HC_INTERVAL, num(hc.interval_seconds)),
        (keys::HC_TIMEOUT, num(hc.timeout_seconds)),
        (keys::HC_HEALTHY_THRESHOLD, num(hc.healthy_threshold)),
        (keys::HC_UNHEALTHY_THRESHOLD, num(hc.unhealthy_threshold)),
        (keys::HC_SUCCESS_CODES, hc.success_codes),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v?)))
    .collect()
}

impl Draft {
    /// The class's settings for the Service `namespace/name` with `uid` in `cluster`
    /// (health-check values excepted: see [`class_health_check`]).
    pub fn from_class(
        class: &AwsProvider,
        namespace: &str,
        name: &str,
        uid: &str,
        cluster: &str,
    ) -> Self {
        let name_prefix = class.name_prefix.clone().unwrap_or_else(|| "k8s".into());
        let settings = Settings {
            name: resource_name(&name_prefix, namespace, name, &format!("{cluster}/{uid}")),
            name_prefix,
            scheme: class.scheme.unwrap_or(Scheme::Internal),
            target_type: class.target_type.unwrap_or(TargetType::Instance),
            ip_address_type: class.ip_address_type.unwrap_or(IpAddressType::Ipv4),
            vpc_id: class.vpc_id.clone(),
            subnets: class_subnets(class),
            frontend: match class.security_groups.clone().unwrap_or_default() {
                ids if ids.is_empty() => FrontendChoice::Managed,
                ids => FrontendChoice::Given(ids),
            },
            source_ranges: None,
            prefix_lists: Vec::new(),
            manage_backend_rules: None,
            tags: class.tags.clone().unwrap_or_default(),
            lb_attributes: class.load_balancer_attributes.clone().unwrap_or_default(),
            tg_attributes: class.target_group_attributes.clone().unwrap_or_default(),
            tg_attributes_by_port: BTreeMap::new(),
            proxy_protocol: ProxyProtocol::Unset,
            listener_attributes: BTreeMap::new(),
            tcp_udp: true,
            addresses: StaticAddresses::default(),
            health_check: HealthCheck::default_tcp(),
            health_check_overridden: false,
            target_node_labels: BTreeMap::new(),
            ssl: None,
            allow_non_pod_targets: class.allow_non_pod_targets.unwrap_or(false),
        };
        Self {
            settings,
            ssl_certificates: Vec::new(),
            alpn_policy: None,
            backend_tls: false,
            ssl_ports: None,
            ssl_policy: DEFAULT_SSL_POLICY.to_string(),
            disable_security_groups: false,
        }
    }

    /// The finished settings: TLS assembled (ports need a certificate), the health check
    /// completed for its protocol and its timeout capped at the interval.
    pub fn finish(self, errors: &mut Vec<String>) -> Settings {
        let mut s = self.settings;
        let mut certificates = self.ssl_certificates.into_iter();
        let certificate = certificates.next();
        for (key, set) in [
            (keys::SSL_PORTS, self.ssl_ports.is_some()),
            (keys::ALPN_POLICY, self.alpn_policy.is_some()),
            (keys::BACKEND_PROTOCOL, self.backend_tls),
        ] {
            if set && certificate.is_none() {
                errors.push(format!("{key} needs {}", keys::SSL_CERT));
            }
        }
        s.ssl = certificate.map(|certificate| Ssl {
            certificate,
            extra_certificates: certificates.collect(),
            alpn_policy: self.alpn_policy,
            backend_tls: self.backend_tls,
            ports: self.ssl_ports.unwrap_or(SslPorts::All),
            policy: self.ssl_policy,
        });
        address_rules(&s, errors);
        let hc = &mut s.health_check;
        if hc.protocol != "TCP" {
            hc.path.get_or_insert_with(|| "/".into());
            hc.success_codes.get_or_insert_with(|| "200-399".into());
        } else {
            hc.path = None;
            hc.success_codes = None;
        }
        hc.timeout_seconds = hc.timeout_seconds.min(hc.interval_seconds);
        s
    }
}

/// Static addresses only where AWS takes them (as the AWS Load Balancer Controller checks):
/// Elastic IPs on internet-facing load balancers, private IPv4 addresses on internal ones,
/// IPv6 addresses on dualstack ones. Subnet counts and CIDRs are checked once the subnets
/// are known ([`crate::provider::aws::model`]).
fn address_rules(s: &Settings, errors: &mut Vec<String>) {
    let a = &s.addresses;
    if !a.eip_allocations.is_empty() && s.scheme != Scheme::InternetFacing {
        errors.push(format!(
            "{}: Elastic IPs need an internet-facing load balancer (the scheme is internal)",
            keys::EIP_ALLOCATIONS
        ));
    }
    if !a.private_ipv4.is_empty() && s.scheme != Scheme::Internal {
        errors.push(format!(
            "{}: private IPv4 addresses need an internal load balancer (the scheme is internet-facing)",
            keys::PRIVATE_IPV4_ADDRESSES
        ));
    }
    if !a.ipv6.is_empty() && s.ip_address_type != IpAddressType::Dualstack {
        errors.push(format!(
            "{}: IPv6 addresses need a dualstack load balancer (ip-address-type is ipv4)",
            keys::IPV6_ADDRESSES
        ));
    }
}
