//! The AWS Load Balancer Controller annotations berth reads, as a table: each key with the
//! values it takes and what it sets. [`settings`] lays them over the class's settings;
//! every malformed value is reported at once, none panics. The table is the one list of
//! what berth implements: a class's `allowedOverrides` names its groups or keys
//! ([`refused_overrides`]), and every other `aws-load-balancer-*` key on a Service is
//! reported as not implemented ([`unimplemented`]).

use std::collections::{BTreeMap, BTreeSet};

use berth_crds::{AwsProvider, IpAddressType, Scheme, TargetType};
use k8s_openapi::api::core::v1::Service;

pub use berth_crds::annotations;

pub use crate::provider::aws::naming::valid_lb_name;
pub use crate::provider::aws::settings::{
    DEFAULT_SSL_POLICY, Draft, FrontendChoice, HealthCheck, HealthPort, ProxyProtocol, Settings,
    Ssl, SslPorts, StaticAddresses, SubnetChoice,
};

use crate::provider::aws::naming::MAX_NAME;
use crate::provider::aws::settings::class_health_check;

/// What an annotation configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    LoadBalancer,
    TargetGroup,
    /// Any of these set: `externalTrafficPolicy: Local` no longer replaces the check.
    HealthCheck,
    Tls,
}

impl Group {
    pub const ALL: [Group; 4] = [
        Group::LoadBalancer,
        Group::TargetGroup,
        Group::HealthCheck,
        Group::Tls,
    ];

    /// Its name in a class's `allowedOverrides`.
    pub fn name(self) -> &'static str {
        match self {
            Group::LoadBalancer => "loadBalancer",
            Group::TargetGroup => "targetGroup",
            Group::HealthCheck => "healthCheck",
            Group::Tls => "tls",
        }
    }
}

/// How a value changes the draft, or what is wrong with it.
#[derive(Clone, Copy)]
pub enum Apply {
    /// The key is the whole annotation name.
    Value(fn(&mut Draft, &str) -> Result<(), String>),
    /// The key is a prefix: each annotation starting with it is one entry of the family,
    /// named by what follows (`listener-attributes.TCP-80`); gets (suffix, value).
    Family(fn(&mut Draft, &str, &str) -> Result<(), String>),
}

/// One annotation: its key, the values it takes, and how a value changes the settings.
pub struct Annotation {
    pub key: &'static str,
    pub group: Group,
    /// The values it takes, as the README documents them.
    pub values: &'static str,
    pub apply: Apply,
}

impl Annotation {
    /// Whether the Service annotation `key` is this one (or one of its family).
    fn names(&self, key: &str) -> bool {
        match self.apply {
            Apply::Value(_) => key == self.key,
            Apply::Family(_) => key.strip_prefix(self.key).is_some_and(|s| !s.is_empty()),
        }
    }
}

/// Every annotation, in the order they are applied.
pub const TABLE: &[Annotation] = &[
    Annotation {
        key: annotations::SCHEME,
        group: Group::LoadBalancer,
        values: "internal | internet-facing",
        apply: Apply::Value(|d, v| {
            let options = [
                ("internal", Scheme::Internal),
                ("internet-facing", Scheme::InternetFacing),
            ];
            d.settings.scheme = one_of(v, &options)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::LB_TYPE,
        group: Group::TargetGroup,
        values: "external | nlb-ip (ip targets) | nlb",
        apply: Apply::Value(|d, v| {
            let options = [
                ("external", None),
                ("nlb", None),
                ("nlb-ip", Some(TargetType::Ip)),
            ];
            if let Some(t) = one_of(v, &options)? {
                d.settings.target_type = t;
            }
            Ok(())
        }),
    },
    Annotation {
        key: annotations::NLB_TARGET_TYPE,
        group: Group::TargetGroup,
        values: "instance | ip",
        apply: Apply::Value(|d, v| {
            let options = [("instance", TargetType::Instance), ("ip", TargetType::Ip)];
            d.settings.target_type = one_of(v, &options)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::IP_ADDRESS_TYPE,
        group: Group::LoadBalancer,
        values: "ipv4 | dualstack",
        apply: Apply::Value(|d, v| {
            let options = [
                ("ipv4", IpAddressType::Ipv4),
                ("dualstack", IpAddressType::Dualstack),
            ];
            d.settings.ip_address_type = one_of(v, &options)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::NAME,
        group: Group::LoadBalancer,
        values: "a load balancer name",
        apply: Apply::Value(|d, v| {
            if !valid_lb_name(v) {
                return Err(format!(
                    "`{v}` is not a valid load balancer name (≤{MAX_NAME} letters, digits, hyphens)"
                ));
            }
            d.settings.name = v.to_string();
            Ok(())
        }),
    },
    Annotation {
        key: annotations::SUBNETS,
        group: Group::LoadBalancer,
        values: "subnet IDs or Name tags, comma-separated",
        apply: Apply::Value(|d, v| {
            d.settings.subnets = subnet_choice(v)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::ADDITIONAL_RESOURCE_TAGS,
        group: Group::LoadBalancer,
        values: "k1=v1, k2=v2",
        apply: Apply::Value(|d, v| {
            let tags = parse_map(v, false)?;
            let reserved: Vec<&String> = tags
                .keys()
                .filter(|k| k.starts_with("berth.dev/") || k.starts_with("aws:"))
                .collect();
            if !reserved.is_empty() {
                return Err(format!("tags {reserved:?} are reserved"));
            }
            d.settings.tags.extend(tags);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::ATTRIBUTES,
        group: Group::LoadBalancer,
        values: "k1=v1, k2=v2",
        apply: Apply::Value(|d, v| {
            d.settings.lb_attributes.extend(parse_map(v, false)?);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::SECURITY_GROUPS,
        group: Group::LoadBalancer,
        values: "security group IDs (sg-…), comma-separated, at most 5",
        apply: Apply::Value(|d, v| {
            let ids = id_list(v, "sg-", 5)?;
            d.settings.frontend = FrontendChoice::Given(ids);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::SECURITY_GROUP_PREFIX_LISTS,
        group: Group::LoadBalancer,
        values: "managed prefix list IDs (pl-…), comma-separated",
        apply: Apply::Value(|d, v| {
            d.settings.prefix_lists = id_list(v, "pl-", 60)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::MANAGE_BACKEND_SG_RULES,
        group: Group::LoadBalancer,
        values: "true | false",
        apply: Apply::Value(|d, v| {
            d.settings.manage_backend_rules = Some(one_of(v, &[("true", true), ("false", false)])?);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::DISABLE_NLB_SG,
        group: Group::LoadBalancer,
        values: "true | false",
        apply: Apply::Value(|d, v| {
            if one_of(v, &[("true", true), ("false", false)])? {
                d.disable_security_groups = true;
            }
            Ok(())
        }),
    },
    Annotation {
        key: annotations::TARGET_GROUP_ATTRIBUTES,
        group: Group::TargetGroup,
        values: "k1=v1, k2=v2",
        apply: Apply::Value(|d, v| {
            d.settings.tg_attributes.extend(parse_map(v, false)?);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::PROXY_PROTOCOL,
        group: Group::TargetGroup,
        values: "*",
        apply: Apply::Value(|d, v| {
            one_of(v, &[("*", ())])?;
            d.settings.proxy_protocol = ProxyProtocol::All;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::PROXY_PROTOCOL_PER_TARGET_GROUP,
        group: Group::TargetGroup,
        values: "Service port numbers, comma-separated",
        apply: Apply::Value(|d, v| {
            let ports = parse_list(v)
                .iter()
                .map(|p| parse_int(p, 1..=65535))
                .collect::<Result<BTreeSet<i32>, String>>()?;
            if ports.is_empty() {
                return Err("names no port".into());
            }
            // `proxy-protocol: "*"` wins whatever the order.
            if d.settings.proxy_protocol != ProxyProtocol::All {
                d.settings.proxy_protocol = ProxyProtocol::Ports(ports);
            }
            Ok(())
        }),
    },
    Annotation {
        key: annotations::TARGET_GROUP_ATTRIBUTES_PORT,
        group: Group::TargetGroup,
        values: "k1=v1, k2=v2 (key suffix: a Service port number)",
        apply: Apply::Family(|d, suffix, v| {
            let port = parse_int(suffix, 1..=65535)
                .map_err(|_| format!("`{suffix}` after the key is not a port number"))?;
            let attrs = parse_map(v, false)?;
            d.settings.tg_attributes_by_port.insert(port, attrs);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::LISTENER_ATTRIBUTES,
        group: Group::LoadBalancer,
        values: "k1=v1, k2=v2 (key suffix: <Protocol>-<Port>, e.g. TCP-80)",
        apply: Apply::Family(|d, suffix, v| {
            let parsed = suffix.split_once('-').and_then(|(proto, port)| {
                let proto = proto.to_ascii_uppercase();
                let known = ["TCP", "UDP", "TCP_UDP", "TLS"].contains(&proto.as_str());
                Some((proto, parse_int(port, 1..=65535).ok()?)).filter(|_| known)
            });
            let Some(listener) = parsed else {
                return Err(format!(
                    "`{suffix}` after the key is not <Protocol>-<Port> (TCP, UDP, TCP_UDP or TLS)"
                ));
            };
            d.settings
                .listener_attributes
                .insert(listener, parse_map(v, false)?);
            Ok(())
        }),
    },
    Annotation {
        key: annotations::ENABLE_TCP_UDP_LISTENER,
        group: Group::LoadBalancer,
        values: "true | false",
        apply: Apply::Value(|d, v| {
            d.settings.tcp_udp = one_of(v, &[("true", true), ("false", false)])?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::EIP_ALLOCATIONS,
        group: Group::LoadBalancer,
        values: "Elastic IP allocation IDs, one per subnet",
        apply: Apply::Value(|d, v| {
            let ids = parse_list(v);
            let valid = |id: &String| {
                id.strip_prefix("eipalloc-")
                    .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric()))
            };
            if let Some(bad) = ids.iter().find(|id| !valid(id)) {
                return Err(format!("`{bad}` is not an allocation ID (eipalloc-…)"));
            }
            if ids.is_empty() {
                return Err("names no allocation".into());
            }
            d.settings.addresses.eip_allocations = ids;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::PRIVATE_IPV4_ADDRESSES,
        group: Group::LoadBalancer,
        values: "IPv4 addresses, one per subnet",
        apply: Apply::Value(|d, v| {
            d.settings.addresses.private_ipv4 = parse_addresses(v)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::IPV6_ADDRESSES,
        group: Group::LoadBalancer,
        values: "IPv6 addresses, one per subnet",
        apply: Apply::Value(|d, v| {
            d.settings.addresses.ipv6 = parse_addresses(v)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::TARGET_NODE_LABELS,
        group: Group::TargetGroup,
        values: "k1=v1, k2 (a bare key: any value)",
        apply: Apply::Value(|d, v| {
            d.settings.target_node_labels = parse_map(v, true)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::SSL_CERT,
        group: Group::Tls,
        values: "certificate ARNs, comma-separated (the first is the default)",
        apply: Apply::Value(|d, v| {
            let certs = parse_list(v);
            if certs.is_empty() {
                return Err("names no certificate".into());
            }
            if let Some(bad) = certs.iter().find(|c| !c.starts_with("arn:")) {
                return Err(format!("`{bad}` is not a certificate ARN"));
            }
            d.ssl_certificates = certs;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::SSL_PORTS,
        group: Group::Tls,
        values: "* | port numbers or names, comma-separated",
        apply: Apply::Value(|d, v| {
            d.ssl_ports = Some(match v.trim() {
                "*" => SslPorts::All,
                list => SslPorts::Some(parse_list(list).into_iter().collect()),
            });
            Ok(())
        }),
    },
    Annotation {
        key: annotations::SSL_NEGOTIATION_POLICY,
        group: Group::Tls,
        values: "a security policy name",
        apply: Apply::Value(|d, v| {
            let p = v.trim();
            let valid = !p.is_empty()
                && p.len() <= 128
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid {
                return Err(format!("`{p}` is not a security policy name"));
            }
            d.ssl_policy = p.to_string();
            Ok(())
        }),
    },
    Annotation {
        key: annotations::ALPN_POLICY,
        group: Group::Tls,
        values: "HTTP1Only | HTTP2Only | HTTP2Optional | HTTP2Preferred | None",
        apply: Apply::Value(|d, v| {
            let options = [
                ("HTTP1Only", "HTTP1Only"),
                ("HTTP2Only", "HTTP2Only"),
                ("HTTP2Optional", "HTTP2Optional"),
                ("HTTP2Preferred", "HTTP2Preferred"),
                ("None", "None"),
            ];
            d.alpn_policy = Some(one_of(v.trim(), &options)?.to_string());
            Ok(())
        }),
    },
    Annotation {
        key: annotations::BACKEND_PROTOCOL,
        group: Group::Tls,
        values: "ssl | tcp",
        apply: Apply::Value(|d, v| {
            d.backend_tls = one_of(v.trim(), &[("ssl", true), ("tcp", false)])?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_PROTOCOL,
        group: Group::HealthCheck,
        values: "TCP | HTTP | HTTPS",
        apply: Apply::Value(|d, v| {
            let upper = v.to_ascii_uppercase();
            if !["TCP", "HTTP", "HTTPS"].contains(&upper.as_str()) {
                return Err(format!("`{v}` is not TCP, HTTP or HTTPS"));
            }
            d.settings.health_check.protocol = upper;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_PORT,
        group: Group::HealthCheck,
        values: "traffic-port | 1..=65535 | a Service port name",
        apply: Apply::Value(|d, v| {
            let v = v.trim();
            let name = !v.is_empty()
                && v.len() <= 15
                && v.chars().any(|c| c.is_ascii_lowercase())
                && v.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            d.settings.health_check.port = match v {
                "traffic-port" => HealthPort::TrafficPort,
                _ if name => HealthPort::Named(v.to_string()),
                _ => HealthPort::Port(parse_int(v, 1..=65535)?),
            };
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_PATH,
        group: Group::HealthCheck,
        values: "/path",
        apply: Apply::Value(|d, v| {
            if !v.starts_with('/') {
                return Err(format!("`{v}` does not start with /"));
            }
            d.settings.health_check.path = Some(v.to_string());
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_INTERVAL,
        group: Group::HealthCheck,
        values: "5..=300 seconds",
        apply: Apply::Value(|d, v| {
            d.settings.health_check.interval_seconds = parse_int(v, 5..=300)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_TIMEOUT,
        group: Group::HealthCheck,
        values: "2..=120 seconds",
        apply: Apply::Value(|d, v| {
            d.settings.health_check.timeout_seconds = parse_int(v, 2..=120)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_HEALTHY_THRESHOLD,
        group: Group::HealthCheck,
        values: "2..=10",
        apply: Apply::Value(|d, v| {
            d.settings.health_check.healthy_threshold = parse_int(v, 2..=10)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_UNHEALTHY_THRESHOLD,
        group: Group::HealthCheck,
        values: "2..=10",
        apply: Apply::Value(|d, v| {
            d.settings.health_check.unhealthy_threshold = parse_int(v, 2..=10)?;
            Ok(())
        }),
    },
    Annotation {
        key: annotations::HC_SUCCESS_CODES,
        group: Group::HealthCheck,
        values: "HTTP codes like 200-399 or 200,302",
        apply: Apply::Value(|d, v| {
            if !valid_codes(v) {
                return Err(format!("`{v}` is not HTTP codes like 200-399"));
            }
            d.settings.health_check.success_codes = Some(v.to_string());
            Ok(())
        }),
    },
];

/// The table entry for `key`.
pub fn lookup(key: &str) -> Option<&'static Annotation> {
    TABLE.iter().find(|a| a.names(key))
}

/// Whether an `allowedOverrides` entry names the annotation: its group, its full key or
/// its key without [`annotations::AWS_PREFIX`].
fn entry_names(entry: &str, a: &Annotation) -> bool {
    entry == a.group.name()
        || entry == a.key
        || a.key
            .strip_prefix(annotations::AWS_PREFIX)
            .map(|k| k.trim_end_matches('.'))
            == Some(entry)
}

/// The class's `allowedOverrides` entries that name neither a group nor an annotation.
pub fn unknown_overrides(class: &AwsProvider) -> Vec<String> {
    class
        .allowed_overrides
        .iter()
        .flatten()
        .filter(|e| !TABLE.iter().any(|a| entry_names(e, a)))
        .cloned()
        .collect()
}

/// The Service's annotations the class does not let it override, each with why. Without
/// `allowedOverrides` every annotation is allowed (the AWS Load Balancer Controller's
/// behaviour).
pub fn refused_overrides(svc: &Service, class: &AwsProvider) -> Vec<String> {
    let Some(allowed) = class.allowed_overrides.as_ref() else {
        return Vec::new();
    };
    let ann = svc.metadata.annotations.clone().unwrap_or_default();
    TABLE
        .iter()
        .flat_map(|a| ann.keys().filter(move |k| a.names(k)).map(move |k| (a, k)))
        .filter(|(a, _)| !allowed.iter().any(|e| entry_names(e, a)))
        .map(|(a, key)| {
            format!(
                "{} (group {}) is not in the class's allowedOverrides [{}]",
                key,
                a.group.name(),
                allowed.join(", ")
            )
        })
        .collect()
}

/// The Service's AWS Load Balancer Controller annotations that berth does not implement,
/// sorted.
pub fn unimplemented(svc: &Service) -> Vec<String> {
    svc.metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(annotations::AWS_PREFIX))
        .filter(|k| lookup(k).is_none())
        .cloned()
        .collect()
}

/// `value` as one of `options`, or an error naming them.
fn one_of<T: Copy>(value: &str, options: &[(&str, T)]) -> Result<T, String> {
    if let Some((_, t)) = options.iter().find(|(name, _)| *name == value) {
        return Ok(*t);
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    Err(format!("`{value}` is not {}", names.join(" or ")))
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

fn parse_int(value: &str, range: std::ops::RangeInclusive<i32>) -> Result<i32, String> {
    match value.trim().parse::<i32>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "`{value}` is not a number in {}..={}",
            range.start(),
            range.end()
        )),
    }
}

/// IDs starting with `prefix`, comma-separated, at most `max`.
fn id_list(value: &str, prefix: &str, max: usize) -> Result<Vec<String>, String> {
    let list = parse_list(value);
    let bad: Vec<&String> = list
        .iter()
        .filter(|i| {
            !i.starts_with(prefix)
                || i.len() <= prefix.len()
                || !i.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .collect();
    match list.len() {
        0 => Err("empty".into()),
        n if n > max => Err(format!("{n} IDs, at most {max}")),
        _ if !bad.is_empty() => Err(format!("{bad:?} are not {prefix}… IDs")),
        _ => Ok(list),
    }
}

/// The Service's source ranges: `spec.loadBalancerSourceRanges`, else the annotation, as
/// normalised CIDRs (host bits cleared); `None` when neither gives any.
pub fn source_ranges(svc: &Service) -> Result<Option<Vec<String>>, String> {
    let from_spec: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default();
    let (what, list) = if !from_spec.is_empty() {
        ("spec.loadBalancerSourceRanges", from_spec)
    } else {
        let ann = svc.metadata.annotations.as_ref();
        match ann.and_then(|a| a.get(annotations::SOURCE_RANGES)) {
            Some(v) => (annotations::SOURCE_RANGES, parse_list(v)),
            None => return Ok(None),
        }
    };
    let mut out = Vec::new();
    for item in &list {
        match item.trim().parse::<ipnet::IpNet>() {
            Ok(net) => out.push(net.trunc().to_string()),
            Err(_) => return Err(format!("{what}: `{item}` is not a CIDR")),
        }
    }
    out.sort();
    out.dedup();
    Ok((!out.is_empty()).then_some(out))
}

fn subnet_choice(value: &str) -> Result<SubnetChoice, String> {
    let list = parse_list(value);
    let ids = list.iter().filter(|s| s.starts_with("subnet-")).count();
    match ids {
        _ if list.is_empty() => Err("empty".into()),
        n if n == list.len() => Ok(SubnetChoice::Ids(list)),
        0 => Ok(SubnetChoice::Names(list)),
        _ => Err("mixes subnet IDs and names".into()),
    }
}

/// `200`, `200,302`, `200-399`: codes within 200..600.
fn valid_codes(value: &str) -> bool {
    value.split(',').all(|c| {
        c.split('-').all(|n| {
            n.trim()
                .parse::<u16>()
                .is_ok_and(|n| (200..600).contains(&n))
        })
    })
}

/// Addresses of one family, comma-separated (IPv4 for `Ipv4Addr`, IPv6 for `Ipv6Addr`).
fn parse_addresses<T: std::str::FromStr>(value: &str) -> Result<Vec<T>, String> {
    let list = parse_list(value);
    if list.is_empty() {
        return Err("names no address".into());
    }
    list.iter()
        .map(|a| {
            a.parse::<T>()
                .map_err(|_| format!("`{a}` is not an address of this family"))
        })
        .collect()
}

/// Applies `value` of the annotation `key` to the draft, collecting the error.
fn apply(key: &str, value: &str, draft: &mut Draft, errors: &mut Vec<String>) {
    let Some(a) = lookup(key) else { return };
    let result = match a.apply {
        Apply::Value(f) => f(draft, value),
        Apply::Family(f) => f(draft, &key[a.key.len()..], value),
    };
    if let Err(e) = result {
        errors.push(format!("{key}: {e}"));
    }
}

/// The settings for `svc` under the class `aws` block, or every problem found.
pub fn settings(
    svc: &Service,
    class: &AwsProvider,
    cluster: &str,
) -> Result<Settings, Vec<String>> {
    let ann = svc.metadata.annotations.clone().unwrap_or_default();
    let meta = &svc.metadata;
    let field = |f: &Option<String>| f.clone().unwrap_or_default();
    let (ns, name, uid) = (field(&meta.namespace), field(&meta.name), field(&meta.uid));
    let mut draft = Draft::from_class(class, &ns, &name, &uid, cluster);
    let mut errors = Vec::new();
    for (key, value) in class_health_check(class) {
        if !ann.contains_key(key) {
            apply(key, &value, &mut draft, &mut errors);
        }
    }
    for a in TABLE {
        for (key, value) in ann.iter().filter(|(k, _)| a.names(k)) {
            if a.group == Group::HealthCheck {
                draft.settings.health_check_overridden = true;
            }
            apply(key, value, &mut draft, &mut errors);
        }
    }
    match source_ranges(svc) {
        Ok(r) => draft.settings.source_ranges = r,
        Err(e) => errors.push(e),
    }
    if draft.disable_security_groups {
        if matches!(draft.settings.frontend, FrontendChoice::Given(_))
            && ann.contains_key(annotations::SECURITY_GROUPS)
        {
            errors.push(format!(
                "{} and {} contradict each other",
                annotations::SECURITY_GROUPS,
                annotations::DISABLE_NLB_SG
            ));
        }
        draft.settings.frontend = FrontendChoice::Disabled;
    }
    let settings = draft.finish(&mut errors);
    if errors.is_empty() {
        Ok(settings)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use std::collections::BTreeSet;

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
        assert_eq!(s.tg_attributes.len(), 1);
        assert_eq!(s.proxy_protocol, ProxyProtocol::All);
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
    fn certificate_lists_alpn_and_backend_tls_make_one_ssl_setting() {
        let (a, b) = (
            "arn:aws:acm:us-east-1:1:certificate/a",
            "arn:aws:acm:us-east-1:1:certificate/b",
        );
        let both = format!("{a}, {b}");
        let svc = service(
            &[("https", 443, "TCP", None)],
            &[
                (annotations::SSL_CERT, &both),
                (annotations::ALPN_POLICY, "HTTP2Preferred"),
                (annotations::BACKEND_PROTOCOL, "ssl"),
            ],
        );
        let ssl = settings_for(&svc).ssl.expect("ssl");
        assert_eq!(ssl.certificate, a);
        assert_eq!(ssl.extra_certificates, vec![b.to_string()]);
        assert_eq!(ssl.alpn_policy.as_deref(), Some("HTTP2Preferred"));
        assert!(ssl.backend_tls);
        let alone = service(
            &[("https", 443, "TCP", None)],
            &[
                (annotations::ALPN_POLICY, "None"),
                (annotations::BACKEND_PROTOCOL, "ssl"),
            ],
        );
        let errors = settings(&alone, &AwsProvider::default(), "c1").expect_err("no cert");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().all(|e| e.contains("needs")), "{errors:?}");
    }

    #[test]
    fn families_take_their_suffix_and_report_a_bad_one() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (
                    "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.tcp-80",
                    "tcp.idle_timeout.seconds=400",
                ),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.80",
                    "a=1, b=",
                ),
                (annotations::PROXY_PROTOCOL_PER_TARGET_GROUP, "80, 443"),
                (annotations::ENABLE_TCP_UDP_LISTENER, "false"),
            ],
        );
        let s = settings_for(&svc);
        let attrs = &s.listener_attributes[&("TCP".to_string(), 80)];
        assert_eq!(attrs["tcp.idle_timeout.seconds"], "400");
        assert_eq!(s.tg_attributes_by_port[&80].len(), 2);
        assert_eq!(
            s.proxy_protocol,
            ProxyProtocol::Ports(BTreeSet::from([80, 443]))
        );
        assert!(!s.tcp_udp);
        assert!(unimplemented(&svc).is_empty());
        let bad = service(
            &[("http", 80, "TCP", None)],
            &[
                (
                    "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.SCTP-80",
                    "x=1",
                ),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes.http",
                    "x=1",
                ),
                (annotations::PROXY_PROTOCOL_PER_TARGET_GROUP, "eighty"),
                (annotations::ENABLE_TCP_UDP_LISTENER, "yes"),
                (annotations::ALPN_POLICY, "HTTP3"),
                (annotations::BACKEND_PROTOCOL, "tls"),
            ],
        );
        let errors = settings(&bad, &AwsProvider::default(), "c1").expect_err("invalid");
        assert_eq!(errors.len(), 6, "{errors:?}");
        // `proxy-protocol: "*"` wins over the per-port list.
        let star = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::PROXY_PROTOCOL_PER_TARGET_GROUP, "80"),
                (annotations::PROXY_PROTOCOL, "*"),
            ],
        );
        assert_eq!(settings_for(&star).proxy_protocol, ProxyProtocol::All);
    }

    #[test]
    fn static_addresses_parse_and_fit_the_scheme_and_address_type() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::SCHEME, "internet-facing"),
                (annotations::EIP_ALLOCATIONS, "eipalloc-1, eipalloc-2"),
            ],
        );
        assert_eq!(settings_for(&svc).addresses.eip_allocations.len(), 2);
        let internal = service(
            &[("http", 80, "TCP", None)],
            &[(annotations::PRIVATE_IPV4_ADDRESSES, "10.0.1.5,10.0.2.5")],
        );
        assert_eq!(settings_for(&internal).addresses.private_ipv4.len(), 2);
        let wrong = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::EIP_ALLOCATIONS, "eipalloc-1"),
                (annotations::IPV6_ADDRESSES, "2001:db8::1"),
                (annotations::SCHEME, "internet-facing"),
                (annotations::PRIVATE_IPV4_ADDRESSES, "10.0.1.5"),
            ],
        );
        let errors = settings(&wrong, &AwsProvider::default(), "c1").expect_err("invalid");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with(annotations::PRIVATE_IPV4_ADDRESSES),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with(annotations::IPV6_ADDRESSES),
            "{errors:?}"
        );
        let malformed = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::EIP_ALLOCATIONS, "1.2.3.4"),
                (annotations::PRIVATE_IPV4_ADDRESSES, "2001:db8::1"),
                (annotations::IPV6_ADDRESSES, "10.0.0.1"),
            ],
        );
        let errors = settings(&malformed, &AwsProvider::default(), "c1").expect_err("invalid");
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn a_health_check_port_may_be_a_port_name() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[(annotations::HC_PORT, "http")],
        );
        assert_eq!(
            settings_for(&svc).health_check.port,
            HealthPort::Named("http".into())
        );
        let bad = service(&[("http", 80, "TCP", None)], &[(annotations::HC_PORT, "0")]);
        assert!(settings(&bad, &AwsProvider::default(), "c1").is_err());
    }

    #[test]
    fn maps_parse_strictly() {
        assert_eq!(parse_map("a=1,b = 2 ,", false).map(|m| m.len()), Ok(2));
        assert!(parse_map("a", false).is_err());
        assert!(parse_map("=1", false).is_err());
        assert_eq!(parse_map("gpu, a=b", true).map(|m| m.len()), Ok(2));
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

    /// The keys of the README's table of AWS annotations: the first cell of each row
    /// (`aws-load-balancer-` left out there), a family (`listener-attributes.<Protocol>-<Port>`)
    /// as its prefix.
    fn readme_keys() -> Vec<String> {
        let readme = include_str!("../../../../README.md");
        let start = readme
            .find("| annotation (`service.beta.kubernetes.io/aws-load-balancer-…`) |")
            .expect("the README has the annotation table");
        readme[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.split('`').nth(1))
            .map(|k| {
                let k = k.split_once('<').map_or(k, |(head, _)| head);
                format!("{}{k}", annotations::AWS_PREFIX)
            })
            .collect()
    }

    /// The values of the AWS annotation constants in `berth_crds::annotations`.
    fn crd_keys() -> Vec<String> {
        let source = include_str!("../../../../crds/src/lib.rs");
        let start = source.find("pub mod annotations {").expect("the module");
        let block = &source[start..];
        let block = &block[..block.find("\n}\n").expect("its end")];
        block
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with(annotations::AWS_PREFIX) && *s != annotations::AWS_PREFIX)
            .map(str::to_string)
            .collect()
    }

    /// A valid sample value per annotation, and the annotations it needs to matter.
    fn sample(key: &str) -> Option<(&'static str, Vec<(&'static str, &'static str)>)> {
        let cert = (
            annotations::SSL_CERT,
            "arn:aws:acm:us-east-1:1:certificate/x",
        );
        let http = (annotations::HC_PROTOCOL, "HTTP");
        Some(match key {
            annotations::SCHEME => ("internet-facing", vec![]),
            annotations::NLB_TARGET_TYPE => ("ip", vec![]),
            annotations::LB_TYPE => ("nlb-ip", vec![]),
            annotations::IP_ADDRESS_TYPE => ("dualstack", vec![]),
            annotations::NAME => ("my-nlb", vec![]),
            annotations::SUBNETS => ("subnet-1, subnet-2", vec![]),
            annotations::ADDITIONAL_RESOURCE_TAGS => ("env=prod", vec![]),
            annotations::ATTRIBUTES => ("deletion_protection.enabled=true", vec![]),
            annotations::TARGET_GROUP_ATTRIBUTES => {
                ("deregistration_delay.timeout_seconds=10", vec![])
            }
            annotations::PROXY_PROTOCOL => ("*", vec![]),
            annotations::TARGET_NODE_LABELS => ("role=edge", vec![]),
            annotations::SSL_CERT => ("arn:aws:acm:us-east-1:1:certificate/x", vec![]),
            annotations::SSL_PORTS => ("443", vec![cert]),
            annotations::SSL_NEGOTIATION_POLICY => {
                ("ELBSecurityPolicy-TLS13-1-2-2021-06", vec![cert])
            }
            annotations::HC_PROTOCOL => ("HTTP", vec![]),
            annotations::HC_PORT => ("8080", vec![]),
            annotations::HC_PATH => ("/ready", vec![http]),
            annotations::HC_INTERVAL => ("30", vec![]),
            annotations::HC_TIMEOUT => ("5", vec![]),
            annotations::HC_HEALTHY_THRESHOLD => ("5", vec![]),
            annotations::HC_UNHEALTHY_THRESHOLD => ("5", vec![]),
            annotations::HC_SUCCESS_CODES => ("200", vec![http]),
            annotations::SECURITY_GROUPS => ("sg-0123, sg-0456", vec![]),
            annotations::SECURITY_GROUP_PREFIX_LISTS => ("pl-0123", vec![]),
            annotations::MANAGE_BACKEND_SG_RULES => ("false", vec![]),
            annotations::DISABLE_NLB_SG => ("true", vec![]),
            annotations::ALPN_POLICY => ("HTTP2Preferred", vec![cert]),
            annotations::BACKEND_PROTOCOL => ("ssl", vec![cert]),
            annotations::LISTENER_ATTRIBUTES => ("tcp.idle_timeout.seconds=400", vec![]),
            annotations::TARGET_GROUP_ATTRIBUTES_PORT => ("stickiness.enabled=true", vec![]),
            annotations::PROXY_PROTOCOL_PER_TARGET_GROUP => ("443", vec![]),
            annotations::ENABLE_TCP_UDP_LISTENER => ("false", vec![]),
            annotations::EIP_ALLOCATIONS => {
                ("eipalloc-1", vec![(annotations::SCHEME, "internet-facing")])
            }
            annotations::PRIVATE_IPV4_ADDRESSES => ("10.0.0.9", vec![]),
            annotations::IPV6_ADDRESSES => (
                "2001:db8::9",
                vec![(annotations::IP_ADDRESS_TYPE, "dualstack")],
            ),
            _ => return None,
        })
    }

    #[test]
    fn the_table_holds_every_documented_annotation() {
        let documented = readme_keys();
        assert!(documented.len() >= 20, "{documented:?}");
        for key in documented.iter().chain(crd_keys().iter()) {
            let known = lookup(key).is_some() || TABLE.iter().any(|a| a.key == key);
            assert!(known, "{key} is not in the table");
        }
        for a in TABLE {
            assert!(
                documented.contains(&a.key.to_string()),
                "{} is not in the README",
                a.key
            );
        }
    }

    #[test]
    fn every_annotation_parses_a_sample_and_changes_the_settings() {
        let ports = [("https", 443, "TCP", Some(30443))];
        let plain = |s: Result<Settings, Vec<String>>| {
            let mut s = s.expect("valid settings");
            // Any health-check annotation sets this; the test wants the value's own effect.
            s.health_check_overridden = false;
            s
        };
        for a in TABLE {
            let (value, context) =
                sample(a.key).unwrap_or_else(|| panic!("no sample for {}", a.key));
            let key = match a.apply {
                Apply::Value(_) => a.key.to_string(),
                Apply::Family(_) if a.key == annotations::LISTENER_ATTRIBUTES => {
                    format!("{}TCP-443", a.key)
                }
                Apply::Family(_) => format!("{}443", a.key),
            };
            let base = plain(settings(
                &service(&ports, &context),
                &AwsProvider::default(),
                "c1",
            ));
            let mut with: Vec<(&str, &str)> = context.clone();
            with.push((&key, value));
            let changed = plain(settings(
                &service(&ports, &with),
                &AwsProvider::default(),
                "c1",
            ));
            assert_ne!(base, changed, "{key} = {value} changed nothing");
        }
    }

    fn health_checks_only() -> AwsProvider {
        AwsProvider {
            allowed_overrides: Some(vec!["healthCheck".into()]),
            ..Default::default()
        }
    }

    #[test]
    fn a_class_allowing_health_checks_refuses_scheme_and_subnets() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::SCHEME, "internet-facing"),
                (annotations::SUBNETS, "subnet-1"),
                (annotations::HC_PATH, "/ready"),
            ],
        );
        let refused = refused_overrides(&svc, &health_checks_only());
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with(annotations::SCHEME), "{refused:?}");
        assert!(refused[1].starts_with(annotations::SUBNETS), "{refused:?}");
        assert!(refused[0].contains("[healthCheck]"), "{refused:?}");
        assert!(refused_overrides(&svc, &AwsProvider::default()).is_empty());
    }

    #[test]
    fn overrides_are_allowed_by_group_short_key_or_full_key() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::SCHEME, "internet-facing"),
                (
                    annotations::SSL_CERT,
                    "arn:aws:acm:us-east-1:1:certificate/x",
                ),
            ],
        );
        for allowed in [
            vec!["scheme", "tls"],
            vec![annotations::SCHEME, "ssl-cert"],
            vec!["loadBalancer", "tls"],
        ] {
            let class = AwsProvider {
                allowed_overrides: Some(allowed.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            };
            assert!(refused_overrides(&svc, &class).is_empty(), "{allowed:?}");
            assert!(unknown_overrides(&class).is_empty(), "{allowed:?}");
        }
        let none = AwsProvider {
            allowed_overrides: Some(Vec::new()),
            ..Default::default()
        };
        assert_eq!(refused_overrides(&svc, &none).len(), 2);
        let typo = AwsProvider {
            allowed_overrides: Some(vec!["healthchecks".into(), "healthCheck".into()]),
            ..Default::default()
        };
        assert_eq!(unknown_overrides(&typo), vec!["healthchecks".to_string()]);
        for g in Group::ALL {
            assert!(TABLE.iter().any(|a| a.group == g), "{} is empty", g.name());
        }
    }

    #[test]
    fn keys_berth_does_not_implement_are_named() {
        let svc = service(
            &[("http", 80, "TCP", None)],
            &[
                (annotations::SCHEME, "internal"),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity",
                    "CapacityUnits=100",
                ),
                (annotations::SOURCE_RANGES, "10.0.0.0/8"),
                (annotations::LOAD_BALANCER_IPS, "198.19.0.10"),
                ("example.com/other", "x"),
            ],
        );
        assert_eq!(
            unimplemented(&svc),
            vec![
                "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity"
                    .to_string(),
            ],
            "the source ranges are implemented now"
        );
        let plain = service(
            &[("http", 80, "TCP", None)],
            &[(annotations::SCHEME, "internal")],
        );
        assert!(unimplemented(&plain).is_empty());
    }

    #[test]
    fn class_health_check_values_apply_unless_annotated() {
        let class = AwsProvider {
            health_check: Some(berth_crds::HealthCheckDefaults {
                protocol: Some("HTTP".into()),
                interval_seconds: Some(30),
                ..Default::default()
            }),
            ..Default::default()
        };
        let plain = service(&[("http", 80, "TCP", None)], &[]);
        let s = settings(&plain, &class, "c1").expect("settings");
        assert_eq!(
            (
                s.health_check.protocol.as_str(),
                s.health_check.interval_seconds
            ),
            ("HTTP", 30)
        );
        assert!(!s.health_check_overridden);
        let annotated = service(
            &[("http", 80, "TCP", None)],
            &[(annotations::HC_INTERVAL, "20")],
        );
        let s = settings(&annotated, &class, "c1").expect("settings");
        assert_eq!(s.health_check.interval_seconds, 20);
        assert!(s.health_check_overridden);
    }
}
