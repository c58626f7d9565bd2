//! Kubernetes objects → the agent's model. Bad fields are dropped with a warning (the
//! caller logs them); nothing here panics on cluster input.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;

use crate::proxy::claims::Age;
use crate::proxy::index::NodeInfo;
use crate::proxy::model::{
    Cidr, Endpoint, EndpointPort, Hints, Protocol, Service, ServiceId, ServicePort, Slice,
};

/// Label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The Node label topology hints name zones by.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

fn port_u16(value: i32, what: &str, warnings: &mut Vec<String>) -> Option<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            warnings.push(format!("{what} {value} out of range"));
            None
        }
    }
}

fn parse_ip(value: &str, what: &str, warnings: &mut Vec<String>) -> Option<IpAddr> {
    match value.trim().parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            warnings.push(format!("{what} {value:?} is not an IP address"));
            None
        }
    }
}

/// The proxied form of a Service; `None` for ExternalName, headless or spec-less ones.
pub fn service(svc: &core::Service, warnings: &mut Vec<String>) -> Option<Service> {
    let namespace = svc.metadata.namespace.as_deref()?;
    let name = svc.metadata.name.as_deref()?;
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let cluster_ips = cluster_ips(spec, warnings)?;
    let ports = ports(spec, warnings);
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| parse_ip(ip, "externalIP", warnings))
        .collect();
    let load_balancer_ips = load_balancer_ips(svc, warnings);
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(10800)
    });
    let source_ranges = source_ranges(spec, warnings);
    let health_check_node_port = spec
        .health_check_node_port
        .and_then(|p| port_u16(p, "healthCheckNodePort", warnings));
    let owner_class = (spec.type_.as_deref() == Some("LoadBalancer"))
        .then(|| {
            svc.metadata
                .annotations
                .as_ref()?
                .get(berth_crds::ANNOTATION_OWNER_CLASS)
                .cloned()
        })
        .flatten();
    Some(Service {
        id: ServiceId::new(namespace, name),
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout,
        source_ranges,
        health_check_node_port,
        owner_class,
    })
}

/// The Service's ClusterIPs; `None` when headless or none parses.
fn cluster_ips(spec: &core::ServiceSpec, warnings: &mut Vec<String>) -> Option<Vec<IpAddr>> {
    let mut raw_ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raw_ips.is_empty() {
        raw_ips.extend(spec.cluster_ip.as_deref());
    }
    if raw_ips.is_empty() || raw_ips.iter().any(|ip| *ip == "None" || ip.is_empty()) {
        return None;
    }
    let ips: Vec<IpAddr> = raw_ips
        .iter()
        .filter_map(|ip| parse_ip(ip, "clusterIP", warnings))
        .collect();
    (!ips.is_empty()).then_some(ips)
}

/// The ports that parse; each one that does not is a warning.
fn ports(spec: &core::ServiceSpec, warnings: &mut Vec<String>) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol = match Protocol::parse(p.protocol.as_deref()) {
            Ok(pr) => pr,
            Err(e) => {
                warnings.push(format!("port {}: {e}", p.port));
                continue;
            }
        };
        let Some(port) = port_u16(p.port, "port", warnings) else {
            continue;
        };
        let node_port = p
            .node_port
            .and_then(|np| port_u16(np, "nodePort", warnings));
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
            node_port,
        });
    }
    ports
}

/// Load-balancer ingress IPs the node proxies (not those with `ipMode: Proxy`).
fn load_balancer_ips(svc: &core::Service, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_deref())
        .filter_map(|ip| parse_ip(ip, "load-balancer ingress IP", warnings))
        .collect()
}

fn source_ranges(spec: &core::ServiceSpec, warnings: &mut Vec<String>) -> Vec<Cidr> {
    spec.load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| match r.parse::<Cidr>() {
            Ok(c) => Some(c),
            Err(e) => {
                warnings.push(format!("loadBalancerSourceRanges: {e}"));
                None
            }
        })
        .collect()
}

/// An EndpointSlice's endpoints; `None` when it names no Service or is not IP-addressed.
pub fn slice(slice: &discovery::EndpointSlice, warnings: &mut Vec<String>) -> Option<Slice> {
    let namespace = slice.metadata.namespace.as_deref()?;
    let service_name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        return None;
    }
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let Some(port) = p.port.and_then(|v| port_u16(v, "endpoint port", warnings)) else {
            continue;
        };
        match Protocol::parse(p.protocol.as_deref()) {
            Ok(protocol) => ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
            }),
            Err(e) => warnings.push(format!("endpoint port {port}: {e}")),
        }
    }
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|e| {
            // Every address of an endpoint is fungible; the first one is used.
            let addr = parse_ip(e.addresses.first()?, "endpoint address", warnings)?;
            let c = e.conditions.as_ref();
            // Unknown readiness means ready (EndpointSlice API semantics).
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            Some(Endpoint {
                addr,
                node: e.node_name.clone(),
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                hints: hints(e.hints.as_ref()),
            })
        })
        .collect();
    Some(Slice {
        service: ServiceId::new(namespace, service_name),
        ports,
        endpoints,
    })
}

/// An endpoint's topology hints; empty names are no hints (they could never match).
fn hints(h: Option<&discovery::EndpointHints>) -> Hints {
    fn names<'a>(v: impl Iterator<Item = &'a String>) -> Vec<String> {
        v.filter(|n| !n.is_empty()).cloned().collect()
    }
    Hints {
        zones: names(
            h.and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| &z.name),
        ),
        nodes: names(
            h.and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| &n.name),
        ),
    }
}

/// The Node's zone label, if set and not empty.
pub fn node_zone(node: &core::Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned()
}

/// The node's InternalIPs (the default NodePort addresses).
pub fn node_internal_ips(node: &core::Node, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| parse_ip(&a.address, "node InternalIP", warnings))
        .collect()
}

/// A Service's age for "oldest wins" (creationTimestamp, then uid).
pub fn age(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Age {
    Age {
        created: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        uid: meta.uid.clone().unwrap_or_default(),
    }
}

/// Any Node's InternalIPs and ExternalIPs (no one may claim them as externalIPs) and
/// whether it is Ready (candidate reporter of Warning Events).
pub fn node_info(node: &core::Node, warnings: &mut Vec<String>) -> NodeInfo {
    let status = node.status.as_ref();
    let addresses = status
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| parse_ip(&a.address, "node address", warnings))
        .collect();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    NodeInfo { addresses, ready }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(spec: serde_json::Value, status: serde_json::Value) -> core::Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": spec, "status": status,
        }))
        .expect("service fixture")
    }

    #[test]
    fn cluster_ip_service_with_ports_and_policies() {
        let s = svc(
            json!({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5"],
                   "type": "LoadBalancer",
                   "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                             {"name": "dns", "port": 53, "protocol": "UDP"}],
                   "externalIPs": ["198.18.9.9", "bogus"],
                   "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                   "internalTrafficPolicy": "Local",
                   "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                   "loadBalancerSourceRanges": ["198.18.0.0/24", "nope"]}),
            json!({"loadBalancer": {"ingress": [{"ip": "198.19.0.1"},
                                                {"ip": "198.19.0.2", "ipMode": "Proxy"},
                                                {"hostname": "x.example"}]}}),
        );
        let mut w = Vec::new();
        let m = service(&s, &mut w).expect("proxied");
        assert_eq!(
            m.cluster_ips,
            vec!["10.96.0.5".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(m.ports.len(), 2);
        assert_eq!(m.ports[0].node_port, Some(30080));
        assert_eq!(m.ports[1].protocol, Protocol::Udp);
        assert_eq!(m.external_ips.len(), 1);
        assert_eq!(m.load_balancer_ips.len(), 1);
        assert!(m.external_local && m.internal_local);
        assert_eq!(m.affinity_timeout, Some(60));
        assert_eq!(m.source_ranges.len(), 1);
        assert_eq!(m.health_check_node_port, Some(32000));
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn owner_class_only_for_load_balancer_services() {
        let with = |ty: &str| -> core::Service {
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": "web",
                             "annotations": {berth_crds::ANNOTATION_OWNER_CLASS: "lan"}},
                "spec": {"clusterIP": "10.96.0.5", "type": ty},
            }))
            .expect("service fixture")
        };
        let mut w = Vec::new();
        let lb = service(&with("LoadBalancer"), &mut w).expect("proxied");
        assert_eq!(lb.owner_class.as_deref(), Some("lan"));
        let np = service(&with("NodePort"), &mut w).expect("proxied");
        assert_eq!(np.owner_class, None);
        let plain = svc(
            json!({"clusterIP": "10.96.0.5", "type": "LoadBalancer"}),
            json!({}),
        );
        assert_eq!(service(&plain, &mut w).expect("proxied").owner_class, None);
    }

    #[test]
    fn external_name_and_headless_services_are_not_proxied() {
        let mut w = Vec::new();
        let en = svc(
            json!({"type": "ExternalName", "externalName": "x.example"}),
            json!({}),
        );
        assert!(service(&en, &mut w).is_none());
        let headless = svc(
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            json!({}),
        );
        assert!(service(&headless, &mut w).is_none());
        let garbage = svc(json!({"clusterIP": "10.96.0.x"}), json!({}));
        assert!(service(&garbage, &mut w).is_none());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn bad_ports_are_skipped_with_warnings() {
        let s = svc(
            json!({"clusterIP": "10.96.0.5",
                   "ports": [{"port": 70000}, {"port": 80, "protocol": "ICMP"}, {"port": 81}]}),
            json!({}),
        );
        let mut w = Vec::new();
        let m = service(&s, &mut w).expect("proxied");
        assert_eq!(m.ports.len(), 1);
        assert_eq!(m.ports[0].port, 81);
        assert_eq!(m.affinity_timeout, None);
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn slice_conditions_default_as_the_api_says() {
        let s: discovery::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"port": null}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "nodeName": "n1"},
                {"addresses": ["10.244.1.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["not-an-ip"]},
            ]
        }))
        .expect("slice fixture");
        let mut w = Vec::new();
        let m = slice(&s, &mut w).expect("slice");
        assert_eq!(m.service, ServiceId::new("ns", "web"));
        assert_eq!(m.ports.len(), 1);
        assert_eq!(m.endpoints.len(), 2);
        assert!(m.endpoints[0].ready && m.endpoints[0].serving && !m.endpoints[0].terminating);
        assert!(!m.endpoints[1].ready && m.endpoints[1].serving && m.endpoints[1].terminating);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn slices_without_service_label_or_fqdn_are_ignored() {
        let mut w = Vec::new();
        let unlabeled: discovery::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "x"}, "addressType": "IPv4", "endpoints": []
        }))
        .expect("fixture");
        assert!(slice(&unlabeled, &mut w).is_none());
        let fqdn: discovery::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "x", "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "FQDN", "endpoints": []
        }))
        .expect("fixture");
        assert!(slice(&fqdn, &mut w).is_none());
    }

    #[test]
    fn slice_hints_and_node_zone_are_read() {
        let s: discovery::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.2"], "nodeName": "n1",
                 "hints": {"forZones": [{"name": "us-east-1a"}, {"name": ""}],
                           "forNodes": [{"name": "n1"}]}},
                {"addresses": ["10.244.1.3"]},
            ]
        }))
        .expect("slice fixture");
        let mut w = Vec::new();
        let m = slice(&s, &mut w).expect("slice");
        assert_eq!(m.endpoints[0].hints.zones, vec!["us-east-1a".to_string()]);
        assert_eq!(m.endpoints[0].hints.nodes, vec!["n1".to_string()]);
        assert_eq!(m.endpoints[1].hints, Hints::default());
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {ZONE_LABEL: "us-east-1b"}}
        }))
        .expect("fixture");
        assert_eq!(node_zone(&n).as_deref(), Some("us-east-1b"));
        let bare: core::Node =
            serde_json::from_value(json!({"metadata": {"name": "n2", "labels": {ZONE_LABEL: ""}}}))
                .expect("fixture");
        assert_eq!(node_zone(&bare), None);
    }

    #[test]
    fn node_internal_ips_only() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.10"},
                                     {"type": "Hostname", "address": "n1"}]}
        }))
        .expect("fixture");
        let mut w = Vec::new();
        assert_eq!(node_internal_ips(&n, &mut w).len(), 1);
    }

    #[test]
    fn node_info_takes_internal_and_external_ips_and_readiness() {
        let n: core::Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.10"},
                                     {"type": "ExternalIP", "address": "203.0.113.5"},
                                     {"type": "Hostname", "address": "n1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("fixture");
        let mut w = Vec::new();
        let info = node_info(&n, &mut w);
        assert_eq!(info.addresses.len(), 2);
        assert!(info.ready);
        let bare: core::Node =
            serde_json::from_value(json!({"metadata": {"name": "n2"}})).expect("fixture");
        assert_eq!(node_info(&bare, &mut w), NodeInfo::default());
    }

    #[test]
    fn age_reads_creation_timestamp_and_uid() {
        let s: core::Service = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web", "uid": "u-1",
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
        }))
        .expect("fixture");
        let a = age(&s.metadata);
        assert_eq!(a.uid, "u-1");
        assert_eq!(a.created, Some(1_767_323_045));
        assert_eq!(age(&Default::default()), Age::default());
    }
}
