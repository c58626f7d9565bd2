//! A Service's load-balancer settings: its class's `aws` block overlaid with the AWS Load
//! Balancer Controller annotations. Pure; every malformed value is reported, none panics.

use std::collections::{BTreeMap, BTreeSet};

use berth_crds::{AwsProvider, IpAddressType, Scheme, TargetType};
use k8s_openapi::api::core::v1::Service;

pub use berth_crds::annotations;

use crate::provider::aws::model::{MAX_NAME, resource_name};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthPort {
    TrafficPort,
    Port(i32),
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
        match self.port {
            HealthPort::TrafficPort => "traffic-port".into(),
            HealthPort::Port(p) => p.to_string(),
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
    pub certificate: String,
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub name: String,
    pub name_prefix: String,
    pub scheme: Scheme,
    pub target_type: TargetType,
    pub ip_address_type: IpAddressType,
    pub vpc_id: Option<String>,
    pub subnets: SubnetChoice,
    pub security_groups: Vec<String>,
    /// Class tags and `additional-resource-tags` (berth's own tags are added by the builder).
    pub tags: BTreeMap<String, String>,
    pub lb_attributes: BTreeMap<String, String>,
    pub tg_attributes: BTreeMap<String, String>,
    pub health_check: HealthCheck,
    /// Any `healthcheck-*` annotation set: then ETP=Local does not replace the check.
    pub health_check_overridden: bool,
    pub target_node_labels: BTreeMap<String, String>,
    pub ssl: Option<Ssl>,
}

/// `k1=v1, k2=v2` (AWS LBC's map annotations). A key without `=` has an empty value when
/// `allow_bare` (label selectors), and is an error otherwise.
pub fn parse_map(value: &str, allow_bare: bool) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                out.insert(k.trim().to_string(), v.trim().to_string());
            }
            None if allow_bare => {
                out.insert(item.to_string(), String::new());
            }
            _ => return Err(format!("`{item}` is not key=value")),
        }
    }
    Ok(out)
}

fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse_int(key: &str, value: &str, range: std::ops::RangeInclusive<i32>) -> Result<i32, String> {
    match value.trim().parse::<i32>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{key}: `{value}` is not a number in {}..={}",
            range.start(),
            range.end()
        )),
    }
}

/// A load balancer name ELBv2 accepts.
pub fn valid_lb_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.starts_with("internal-")
}

/// The settings for `svc` under the class `aws` block, or every problem found.
pub fn settings(
    svc: &Service,
    class: &AwsProvider,
    cluster: &str,
) -> Result<Settings, Vec<String>> {
    let ann = svc.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| ann.get(k).map(String::as_str);
    let mut errors = Vec::new();
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    let uid = svc.metadata.uid.clone().unwrap_or_default();
    let name_prefix = class.name_prefix.clone().unwrap_or_else(|| "k8s".into());

    let scheme = match get(annotations::SCHEME) {
        None => class.scheme.unwrap_or(Scheme::Internal),
        Some("internal") => Scheme::Internal,
        Some("internet-facing") => Scheme::InternetFacing,
        Some(v) => {
            errors.push(format!(
                "{}: `{v}` is not internal or internet-facing",
                annotations::SCHEME
            ));
            Scheme::Internal
        }
    };
    let target_type = match get(annotations::NLB_TARGET_TYPE) {
        None => class.target_type.unwrap_or(TargetType::Instance),
        Some("instance") => TargetType::Instance,
        Some("ip") => TargetType::Ip,
        Some(v) => {
            errors.push(format!(
                "{}: `{v}` is not instance or ip",
                annotations::NLB_TARGET_TYPE
            ));
            TargetType::Instance
        }
    };
    let ip_address_type = match get(annotations::IP_ADDRESS_TYPE) {
        None => class.ip_address_type.unwrap_or(IpAddressType::Ipv4),
        Some("ipv4") => IpAddressType::Ipv4,
        Some("dualstack") => IpAddressType::Dualstack,
        Some(v) => {
            errors.push(format!(
                "{}: `{v}` is not ipv4 or dualstack",
                annotations::IP_ADDRESS_TYPE
            ));
            IpAddressType::Ipv4
        }
    };
    let name = match get(annotations::NAME) {
        Some(n) if valid_lb_name(n) => n.to_string(),
        Some(n) => {
            errors.push(format!(
                "{}: `{n}` is not a valid load balancer name (≤32 letters, digits, hyphens)",
                annotations::NAME
            ));
            String::new()
        }
        None => resource_name(&name_prefix, &ns, &svc_name, &format!("{cluster}/{uid}")),
    };
    let subnets = match get(annotations::SUBNETS).map(parse_list) {
        Some(list) if list.is_empty() => {
            errors.push(format!("{}: empty", annotations::SUBNETS));
            SubnetChoice::Discover
        }
        Some(list) if list.iter().all(|s| s.starts_with("subnet-")) => SubnetChoice::Ids(list),
        Some(list) if list.iter().any(|s| s.starts_with("subnet-")) => {
            errors.push(format!(
                "{}: mixes subnet IDs and names",
                annotations::SUBNETS
            ));
            SubnetChoice::Discover
        }
        Some(list) => SubnetChoice::Names(list),
        None => match &class.subnets {
            Some(sel) if sel.ids.as_ref().is_some_and(|i| !i.is_empty()) => {
                SubnetChoice::Ids(sel.ids.clone().unwrap_or_default())
            }
            Some(sel) if sel.tags.as_ref().is_some_and(|t| !t.is_empty()) => {
                SubnetChoice::Tags(sel.tags.clone().unwrap_or_default())
            }
            _ => SubnetChoice::Discover,
        },
    };
    let mut tags = class.tags.clone().unwrap_or_default();
    if let Some(v) = get(annotations::ADDITIONAL_RESOURCE_TAGS) {
        match parse_map(v, false) {
            Ok(m) => {
                for k in m
                    .keys()
                    .filter(|k| k.starts_with("berth.dev/") || k.starts_with("aws:"))
                {
                    errors.push(format!(
                        "{}: tag `{k}` is reserved",
                        annotations::ADDITIONAL_RESOURCE_TAGS
                    ));
                }
                tags.extend(m);
            }
            Err(e) => errors.push(format!("{}: {e}", annotations::ADDITIONAL_RESOURCE_TAGS)),
        }
    }
    let mut lb_attributes = class.load_balancer_attributes.clone().unwrap_or_default();
    if let Some(v) = get(annotations::ATTRIBUTES) {
        match parse_map(v, false) {
            Ok(m) => lb_attributes.extend(m),
            Err(e) => errors.push(format!("{}: {e}", annotations::ATTRIBUTES)),
        }
    }
    let mut tg_attributes = class.target_group_attributes.clone().unwrap_or_default();
    if let Some(v) = get(annotations::TARGET_GROUP_ATTRIBUTES) {
        match parse_map(v, false) {
            Ok(m) => tg_attributes.extend(m),
            Err(e) => errors.push(format!("{}: {e}", annotations::TARGET_GROUP_ATTRIBUTES)),
        }
    }
    match get(annotations::PROXY_PROTOCOL) {
        None => {}
        Some("*") => {
            tg_attributes.insert("proxy_protocol_v2.enabled".into(), "true".into());
        }
        Some(v) => errors.push(format!("{}: `{v}` is not `*`", annotations::PROXY_PROTOCOL)),
    }
    let target_node_labels = match get(annotations::TARGET_NODE_LABELS) {
        None => BTreeMap::new(),
        Some(v) => parse_map(v, true).unwrap_or_else(|e| {
            errors.push(format!("{}: {e}", annotations::TARGET_NODE_LABELS));
            BTreeMap::new()
        }),
    };
    let policy = match get(annotations::SSL_NEGOTIATION_POLICY).map(str::trim) {
        None => DEFAULT_SSL_POLICY.to_string(),
        Some(p)
            if !p.is_empty()
                && p.len() <= 128
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') =>
        {
            p.to_string()
        }
        Some(p) => {
            errors.push(format!(
                "{}: `{p}` is not a security policy name",
                annotations::SSL_NEGOTIATION_POLICY
            ));
            String::new()
        }
    };
    let ssl = match (get(annotations::SSL_CERT), get(annotations::SSL_PORTS)) {
        (None, None) => None,
        (None, Some(_)) => {
            errors.push(format!(
                "{} needs {}",
                annotations::SSL_PORTS,
                annotations::SSL_CERT
            ));
            None
        }
        (Some(cert), ports) => {
            let cert = cert.trim().to_string();
            if !cert.starts_with("arn:") {
                errors.push(format!(
                    "{}: `{cert}` is not a certificate ARN",
                    annotations::SSL_CERT
                ));
            }
            let ports = match ports.map(str::trim) {
                None | Some("*") => SslPorts::All,
                Some(list) => SslPorts::Some(parse_list(list).into_iter().collect()),
            };
            Some(Ssl {
                certificate: cert,
                ports,
                policy,
            })
        }
    };

    let defaults = class.health_check.clone().unwrap_or_default();
    let mut hc = HealthCheck::default_tcp();
    let mut overridden = false;
    let hc_values = [
        (annotations::HC_PROTOCOL, defaults.protocol.clone(), false),
        (annotations::HC_PORT, defaults.port.clone(), false),
        (annotations::HC_PATH, defaults.path.clone(), false),
        (
            annotations::HC_INTERVAL,
            defaults.interval_seconds.map(|n| n.to_string()),
            false,
        ),
        (
            annotations::HC_TIMEOUT,
            defaults.timeout_seconds.map(|n| n.to_string()),
            false,
        ),
        (
            annotations::HC_HEALTHY_THRESHOLD,
            defaults.healthy_threshold.map(|n| n.to_string()),
            false,
        ),
        (
            annotations::HC_UNHEALTHY_THRESHOLD,
            defaults.unhealthy_threshold.map(|n| n.to_string()),
            false,
        ),
        (
            annotations::HC_SUCCESS_CODES,
            defaults.success_codes.clone(),
            false,
        ),
    ];
    for (key, class_value, _) in hc_values {
        let value = match get(key) {
            Some(v) => {
                overridden = true;
                v.to_string()
            }
            None => match class_value {
                Some(v) => v,
                None => continue,
            },
        };
        match key {
            annotations::HC_PROTOCOL => match value.to_ascii_uppercase().as_str() {
                p @ ("TCP" | "HTTP" | "HTTPS") => hc.protocol = p.to_string(),
                _ => errors.push(format!("{key}: `{value}` is not TCP, HTTP or HTTPS")),
            },
            annotations::HC_PORT => {
                if value == "traffic-port" {
                    hc.port = HealthPort::TrafficPort;
                } else {
                    match parse_int(key, &value, 1..=65535) {
                        Ok(p) => hc.port = HealthPort::Port(p),
                        Err(e) => errors.push(e),
                    }
                }
            }
            annotations::HC_PATH => {
                if value.starts_with('/') {
                    hc.path = Some(value);
                } else {
                    errors.push(format!("{key}: `{value}` does not start with /"));
                }
            }
            annotations::HC_INTERVAL => match parse_int(key, &value, 5..=300) {
                Ok(n) => hc.interval_seconds = n,
                Err(e) => errors.push(e),
            },
            annotations::HC_TIMEOUT => match parse_int(key, &value, 2..=120) {
                Ok(n) => hc.timeout_seconds = n,
                Err(e) => errors.push(e),
            },
            annotations::HC_HEALTHY_THRESHOLD => match parse_int(key, &value, 2..=10) {
                Ok(n) => hc.healthy_threshold = n,
                Err(e) => errors.push(e),
            },
            annotations::HC_UNHEALTHY_THRESHOLD => match parse_int(key, &value, 2..=10) {
                Ok(n) => hc.unhealthy_threshold = n,
                Err(e) => errors.push(e),
            },
            _ => {
                if value.split(',').all(|c| {
                    c.split('-').all(|n| {
                        n.trim()
                            .parse::<u16>()
                            .is_ok_and(|n| (200..600).contains(&n))
                    })
                }) {
                    hc.success_codes = Some(value);
                } else {
                    errors.push(format!("{key}: `{value}` is not HTTP codes like 200-399"));
                }
            }
        }
    }
    if hc.protocol != "TCP" {
        hc.path.get_or_insert_with(|| "/".into());
        hc.success_codes.get_or_insert_with(|| "200-399".into());
    } else {
        hc.path = None;
        hc.success_codes = None;
    }
    if hc.timeout_seconds > hc.interval_seconds {
        hc.timeout_seconds = hc.interval_seconds;
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Settings {
        name,
        name_prefix,
        scheme,
        target_type,
        ip_address_type,
        vpc_id: class.vpc_id.clone(),
        subnets,
        security_groups: class.security_groups.clone().unwrap_or_default(),
        tags,
        lb_attributes,
        tg_attributes,
        health_check: hc,
        health_check_overridden: overridden,
        target_node_labels,
        ssl,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;

    /// A Service fixture: ports as (name, port, protocol, nodePort).
    pub fn service(
        ports: &[(&str, i32, &str, Option<i32>)],
        annotations: &[(&str, &str)],
    ) -> Service {
        let ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|(name, port, proto, np)| {
                let mut p = serde_json::json!({"name": name, "port": port, "protocol": proto});
                if let Some(np) = np {
                    p["nodePort"] = serde_json::json!(np);
                }
                p
            })
            .collect();
        let ann: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "uid-1", "annotations": ann},
            "spec": {"type": "LoadBalancer", "ports": ports}
        }))
        .expect("service fixture")
    }

    pub fn node(name: &str, instance: &str, labels: &[(&str, &str)]) -> Node {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"providerID": format!("aws:///us-east-1a/{instance}")}
        }))
        .expect("node fixture")
    }

    pub fn settings_for(svc: &Service) -> Settings {
        settings(svc, &AwsProvider::default(), "c1").expect("settings")
    }

    #[test]
    fn defaults_follow_the_aws_load_balancer_controller() {
        let s = settings_for(&service(&[("http", 80, "TCP", Some(30080))], &[]));
        assert_eq!(s.scheme, Scheme::Internal);
        assert_eq!(s.target_type, TargetType::Instance);
        assert_eq!(s.health_check, HealthCheck::default_tcp());
        assert_eq!(s.subnets, SubnetChoice::Discover);
        assert!(s.name.starts_with("k8s-shop-web-"), "{}", s.name);
    }

    #[test]
    fn annotations_override_the_class() {
        let class = AwsProvider {
            scheme: Some(Scheme::Internal),
            tags: Some(BTreeMap::from([("team".into(), "a".into())])),
            ..Default::default()
        };
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::SCHEME, "internet-facing"),
                (annotations::NLB_TARGET_TYPE, "ip"),
                (annotations::ADDITIONAL_RESOURCE_TAGS, "env=prod, owner=me"),
                (annotations::ATTRIBUTES, "deletion_protection.enabled=true"),
                (
                    annotations::TARGET_GROUP_ATTRIBUTES,
                    "deregistration_delay.timeout_seconds=10",
                ),
                (annotations::PROXY_PROTOCOL, "*"),
                (annotations::HC_PROTOCOL, "http"),
                (annotations::HC_PATH, "/ready"),
                (annotations::HC_INTERVAL, "5"),
                (annotations::HC_TIMEOUT, "8"),
                (annotations::SUBNETS, "subnet-1, subnet-2"),
                (annotations::NAME, "my-nlb"),
                (annotations::TARGET_NODE_LABELS, "role=edge, gpu"),
            ],
        );
        let s = settings(&svc, &class, "c1").expect("settings");
        assert_eq!(s.scheme, Scheme::InternetFacing);
        assert_eq!(s.target_type, TargetType::Ip);
        assert_eq!(s.tags.len(), 3);
        assert_eq!(
            s.lb_attributes
                .get("deletion_protection.enabled")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(s.tg_attributes.len(), 2);
        assert_eq!(s.health_check.protocol, "HTTP");
        assert_eq!(s.health_check.path.as_deref(), Some("/ready"));
        assert_eq!(
            s.health_check.timeout_seconds, 5,
            "timeout capped at the interval"
        );
        assert_eq!(s.health_check.success_codes.as_deref(), Some("200-399"));
        assert!(s.health_check_overridden);
        assert_eq!(
            s.subnets,
            SubnetChoice::Ids(vec!["subnet-1".into(), "subnet-2".into()])
        );
        assert_eq!(s.name, "my-nlb");
        assert_eq!(
            s.target_node_labels.get("gpu").map(String::as_str),
            Some("")
        );
    }

    #[test]
    fn malformed_annotations_are_all_reported() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::SCHEME, "public"),
                (annotations::NLB_TARGET_TYPE, "pod"),
                (annotations::HC_INTERVAL, "often"),
                (annotations::ADDITIONAL_RESOURCE_TAGS, "novalue"),
                (annotations::NAME, "-bad-"),
                (annotations::SSL_PORTS, "443"),
                (annotations::SSL_NEGOTIATION_POLICY, "tls 1.3"),
                (annotations::SUBNETS, "subnet-1,public"),
                (annotations::HC_SUCCESS_CODES, "ok"),
            ],
        );
        let errors = settings(&svc, &AwsProvider::default(), "c1").expect_err("invalid");
        assert_eq!(errors.len(), 9, "{errors:?}");
    }

    #[test]
    fn ssl_annotations_name_certificate_ports_and_policy() {
        let cert = "arn:aws:iam::000000000000:server-certificate/web";
        let svc = service(
            &[("https", 443, "TCP", None)],
            &[
                (annotations::SSL_CERT, cert),
                (annotations::SSL_PORTS, "https, 8443"),
                (
                    annotations::SSL_NEGOTIATION_POLICY,
                    "ELBSecurityPolicy-TLS13-1-2-2021-06",
                ),
            ],
        );
        let ssl = settings_for(&svc).ssl.expect("ssl");
        assert_eq!(ssl.certificate, cert);
        assert_eq!(
            ssl.ports,
            SslPorts::Some(BTreeSet::from(["https".into(), "8443".into()]))
        );
        assert_eq!(ssl.policy, "ELBSecurityPolicy-TLS13-1-2-2021-06");
        let all = service(
            &[("https", 443, "TCP", None)],
            &[(annotations::SSL_CERT, cert)],
        );
        let ssl = settings_for(&all).ssl.expect("ssl");
        assert_eq!(ssl.ports, SslPorts::All);
        assert_eq!(ssl.policy, DEFAULT_SSL_POLICY);
    }

    #[test]
    fn maps_and_names_parse_strictly() {
        assert_eq!(parse_map("a=1,b = 2 ,", false).map(|m| m.len()), Ok(2));
        assert!(parse_map("a", false).is_err());
        assert!(parse_map("=1", false).is_err());
        assert!(valid_lb_name("abc-1"));
        assert!(!valid_lb_name("internal-x"));
        assert!(!valid_lb_name(&"a".repeat(33)));
        assert!(!valid_lb_name("a_b"));
    }

    #[test]
    fn subnet_names_and_class_tags() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[(annotations::SUBNETS, "public-a,public-b")],
        );
        assert_eq!(
            settings_for(&svc).subnets,
            SubnetChoice::Names(vec!["public-a".into(), "public-b".into()])
        );
        let class = AwsProvider {
            subnets: Some(berth_crds::SubnetSelector {
                ids: None,
                tags: Some(BTreeMap::from([("tier".into(), "lb".into())])),
            }),
            ..Default::default()
        };
        let plain = service(&[("http", 80, "TCP", None)], &[]);
        assert!(matches!(
            settings(&plain, &class, "c").map(|s| s.subnets),
            Ok(SubnetChoice::Tags(_))
        ));
    }
}
