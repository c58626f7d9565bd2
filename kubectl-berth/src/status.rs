//! `status`: a table of berth's Services, or one Service in detail: class and provider,
//! address, condition, the node announcing a pool address (the holder of its L2 Lease),
//! and for an NLB each listener with its targets' health per zone, read from AWS through
//! the controller's own client.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use berth_controller::metrics::Metrics;
use berth_controller::provider::aws::api::AwsApi;
use berth_controller::provider::aws::client::Aws;
use berth_controller::provider::aws::model::instance_id;
use berth_controller::provider::pool::allocation::status_ips;
use berth_controller::service::status::current_condition;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Client, ResourceExt};

use crate::cluster::{self, Snapshot};
use crate::{AwsOpts, Error};

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The Service's address: hostnames and IPs of its ingress. Pure.
pub fn address(svc: &Service) -> String {
    let entries: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.hostname.clone().or_else(|| i.ip.clone()))
        .collect();
    if entries.is_empty() {
        "<pending>".into()
    } else {
        entries.join(",")
    }
}

/// `True`/`False`/`Unknown` and the reason of berth's condition. Pure.
fn condition(svc: &Service) -> (String, String, String) {
    match current_condition(svc) {
        Some(c) => (c.status.clone(), c.reason.clone(), c.message.clone()),
        None => (
            "Unknown".into(),
            "-".into(),
            "the controller has not reported".into(),
        ),
    }
}

/// Aligned columns. Pure.
pub fn columns(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One row per berth Service. Pure.
pub fn table_rows(snap: &Snapshot, namespace: Option<&str>) -> Vec<Vec<String>> {
    let header = [
        "NAMESPACE",
        "NAME",
        "CLASS",
        "PROVIDER",
        "ADDRESS",
        "READY",
        "REASON",
    ];
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut services: Vec<&Service> = snap
        .services
        .iter()
        .filter(|s| namespace.is_none_or(|n| s.namespace().as_deref() == Some(n)))
        .filter(|s| cluster::asks_for_berth(s))
        .collect();
    services.sort_by_key(|s| (s.namespace(), s.name_any()));
    for svc in services {
        let class = snap.class_of(svc);
        let provider = class
            .as_deref()
            .and_then(|c| snap.class(c))
            .map(cluster::provider_of)
            .unwrap_or("-");
        let (status, reason, _) = condition(svc);
        rows.push(vec![
            svc.namespace().unwrap_or_default(),
            svc.name_any(),
            class.unwrap_or_else(|| "<none>".into()),
            provider.into(),
            address(svc),
            status,
            reason,
        ]);
    }
    rows
}

pub async fn table(client: &Client, namespace: Option<&str>) -> Result<String, Error> {
    let snap = Snapshot::load(client).await?;
    Ok(columns(&table_rows(&snap, namespace)))
}

/// Who announces an address, from its Lease. Pure.
pub fn announcer(addr: &str, lease: Option<&Lease>) -> String {
    let Some(lease) = lease else {
        return format!("{addr}: no node announces it (no announcement Lease)");
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let place = format!(
        "Lease {}/{}",
        lease.namespace().unwrap_or_default(),
        lease.name_any()
    );
    let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else {
        return format!("{addr}: no node announces it ({place} has no holder)");
    };
    let since = spec
        .acquire_time
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| "unknown".into());
    let transitions = spec.lease_transitions.unwrap_or(0);
    let failover = if transitions > 0 {
        format!("last failover {since} ({transitions} holder changes)")
    } else {
        "no failover since it was first taken".into()
    };
    format!("{addr}: announced by node {holder} since {since}, {failover} ({place})")
}

/// One listener of the load balancer with its targets' health per zone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListenerView {
    pub port: i32,
    pub protocol: String,
    pub target_group: String,
    /// Zone → (healthy, total).
    pub zones: BTreeMap<String, (usize, usize)>,
    /// Targets not healthy: `id:port state`.
    pub unhealthy: Vec<String>,
}

/// The Service's NLB as AWS reports it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NlbView {
    pub name: String,
    pub arn: String,
    pub state: String,
    pub scheme: String,
    pub listeners: Vec<ListenerView>,
}

/// The NLB as text. Pure.
pub fn render_nlb(v: &NlbView) -> String {
    let mut out = format!(
        "  Load balancer: {} ({}, {})\n    ARN: {}\n",
        v.name, v.state, v.scheme, v.arn
    );
    for l in &v.listeners {
        let zones: Vec<String> = l
            .zones
            .iter()
            .map(|(z, (h, t))| format!("{z} {h}/{t} healthy"))
            .collect();
        let zones = if zones.is_empty() {
            "no targets".to_string()
        } else {
            zones.join(", ")
        };
        out.push_str(&format!(
            "  Port {}/{}: listener -> target group {}: {zones}\n",
            l.port, l.protocol, l.target_group
        ));
        for u in &l.unhealthy {
            out.push_str(&format!("      not healthy: {u}\n"));
        }
    }
    out
}

/// The zone of each target: instances by their node, addresses by their endpoint. Pure.
pub fn target_zones(nodes: &[Node], slices: &[EndpointSlice]) -> HashMap<String, String> {
    let mut zones = HashMap::new();
    for n in nodes {
        let provider = n.spec.as_ref().and_then(|s| s.provider_id.as_deref());
        let (Some(provider), Some(zone)) = (provider, node_zone(n)) else {
            continue;
        };
        if let Some(id) = instance_id(provider) {
            zones.insert(id.to_string(), zone);
        }
    }
    for ep in slices.iter().flat_map(|s| s.endpoints.iter().flatten()) {
        if let Some(zone) = ep.zone.clone() {
            for a in &ep.addresses {
                zones.insert(a.clone(), zone.clone());
            }
        }
    }
    zones
}

/// A node's zone: its label, else the zone in its AWS providerID. Pure.
fn node_zone(n: &Node) -> Option<String> {
    n.labels().get(ZONE_LABEL).cloned().or_else(|| {
        let provider = n.spec.as_ref()?.provider_id.as_deref()?;
        let rest = provider.strip_prefix("aws:///")?;
        rest.split('/').next().map(str::to_string)
    })
}

/// Reads the NLB whose DNS name is `hostname`, with listeners and target health.
async fn nlb<A: AwsApi>(
    aws: &A,
    hostname: &str,
    zones: &HashMap<String, String>,
) -> Result<Option<NlbView>, Error> {
    let err = |e: berth_controller::provider::aws::api::AwsError| Error::Aws(e.to_string());
    let lbs = aws.all_load_balancers().await.map_err(err)?;
    let Some(lb) = lbs.into_iter().find(|l| l.dns_name == hostname) else {
        return Ok(None);
    };
    let tgs = aws.target_groups_of(&lb.arn).await.map_err(err)?;
    let mut listeners = aws.listeners(&lb.arn).await.map_err(err)?;
    listeners.sort_by_key(|l| l.port);
    let mut view = NlbView {
        name: lb.name.clone(),
        arn: lb.arn.clone(),
        state: lb.state.clone(),
        scheme: lb.scheme.clone(),
        listeners: Vec::new(),
    };
    for l in listeners {
        let tg = tgs
            .iter()
            .find(|t| Some(&t.arn) == l.target_group_arn.as_ref());
        let mut lv = ListenerView {
            port: l.port,
            protocol: l.protocol.clone(),
            target_group: tg.map(|t| t.name.clone()).unwrap_or_else(|| "-".into()),
            ..ListenerView::default()
        };
        if let Some(tg) = tg {
            for t in aws.target_health(&tg.arn).await.map_err(err)? {
                let zone = zones
                    .get(&t.target.id)
                    .cloned()
                    .unwrap_or_else(|| "?".into());
                let entry = lv.zones.entry(zone).or_default();
                entry.1 += 1;
                if t.state == "healthy" {
                    entry.0 += 1;
                } else {
                    lv.unhealthy
                        .push(format!("{}:{} {}", t.target.id, t.target.port, t.state));
                }
            }
        }
        view.listeners.push(lv);
    }
    Ok(Some(view))
}

/// The controller's AWS client with these settings.
pub async fn aws_client(opts: &AwsOpts) -> Result<Aws, Error> {
    let config = opts.controller_config()?;
    let sdk = berth_controller::aws_sdk(&config).await;
    Ok(Aws::new(
        &sdk,
        (config.aws_qps, config.aws_burst),
        config.aws_api_limits,
        Arc::new(Metrics::default()),
    ))
}

/// The AWS part of the detail: the NLB behind each hostname.
async fn aws_detail(opts: &AwsOpts, snap: &Snapshot, svc: &Service) -> Result<String, Error> {
    let hostnames: Vec<String> = address(svc)
        .split(',')
        .filter(|a| a.parse::<std::net::IpAddr>().is_err() && *a != "<pending>")
        .map(str::to_string)
        .collect();
    if hostnames.is_empty() {
        return Ok("  Load balancer: none yet\n".into());
    }
    let aws = aws_client(opts).await?;
    let zones = target_zones(&snap.nodes, &snap.slices);
    let mut out = String::new();
    for h in hostnames {
        match nlb(&aws, &h, &zones).await? {
            Some(v) => out.push_str(&render_nlb(&v)),
            None => out.push_str(&format!("  Load balancer: none in AWS has DNS name {h}\n")),
        }
    }
    Ok(out)
}

pub async fn detail(
    client: &Client,
    opts: &AwsOpts,
    namespace: &str,
    name: &str,
) -> Result<String, Error> {
    let snap = Snapshot::load(client).await?;
    let svc = snap.service(namespace, name)?;
    let class_name = snap.class_of(svc);
    let class = class_name.as_deref().and_then(|c| snap.class(c));
    let provider = class.map(cluster::provider_of).unwrap_or("-");
    let (status, reason, message) = condition(svc);
    let mut out = format!(
        "Service {namespace}/{name}\n  Class: {} (provider {provider})\n  Address: {}\n  Ready: {status} ({reason}): {message}\n",
        class_name.as_deref().unwrap_or("<none>"),
        address(svc),
    );
    match provider {
        "pool" => {
            // What the controller wrote on the Service (the same condition `kubectl
            // describe service` shows), then each address's Lease in detail.
            if let Some(c) = berth_controller::announcers::current(svc) {
                out.push_str(&format!(
                    "  Announced: {} ({}): {}\n",
                    c.status, c.reason, c.message
                ));
            }
            // A class with L2 off has no Leases; its BGP advertisers are in the condition.
            let l2 = class
                .and_then(|c| c.spec.pool.as_ref())
                .is_some_and(|p| p.l2 != Some(false));
            for ip in status_ips(svc).into_iter().filter(|_| l2) {
                let lease = cluster::l2_lease(client, &ip).await?;
                out.push_str(&format!(
                    "  {}\n",
                    announcer(&ip.to_string(), lease.as_ref())
                ));
            }
        }
        "aws" => out.push_str(&aws_detail(opts, &snap, svc).await?),
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, transitions: i32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "berth-l2-198-19-0-5", "namespace": "berth-l2"},
            "spec": {"holderIdentity": holder, "leaseTransitions": transitions,
                     "acquireTime": "2026-01-01T00:00:00.000000Z"}
        }))
        .expect("lease")
    }

    #[test]
    fn the_announcer_is_the_lease_holder_with_its_last_failover() {
        let s = announcer("198.19.0.5", Some(&lease(Some("node-b"), 2)));
        assert!(s.contains("announced by node node-b"), "{s}");
        assert!(s.contains("last failover 2026-01-01"), "{s}");
        assert!(s.contains("berth-l2/berth-l2-198-19-0-5"), "{s}");
        let s = announcer("198.19.0.5", Some(&lease(None, 0)));
        assert!(s.contains("no node announces it"), "{s}");
        assert!(announcer("198.19.0.5", None).contains("no announcement Lease"));
    }

    #[test]
    fn the_nlb_shows_each_listener_with_health_per_zone() {
        let v = NlbView {
            name: "k8s-shop-web".into(),
            arn: "arn:x".into(),
            state: "active".into(),
            scheme: "internal".into(),
            listeners: vec![ListenerView {
                port: 80,
                protocol: "TCP".into(),
                target_group: "k8s-shop-web-tg".into(),
                zones: BTreeMap::from([
                    ("us-east-1a".into(), (1, 1)),
                    ("us-east-1b".into(), (0, 1)),
                ]),
                unhealthy: vec!["i-2:30080 unhealthy".into()],
            }],
        };
        let text = render_nlb(&v);
        assert!(text.contains("Port 80/TCP"), "{text}");
        assert!(
            text.contains("us-east-1a 1/1 healthy, us-east-1b 0/1 healthy"),
            "{text}"
        );
        assert!(text.contains("not healthy: i-2:30080 unhealthy"), "{text}");
    }

    #[test]
    fn zones_come_from_node_labels_or_provider_ids_and_endpoints() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"}, "spec": {"providerID": "aws:///us-east-1b/i-0abc"}
        }))
        .expect("node");
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"], "zone": "us-east-1a"}]
        }))
        .expect("slice");
        let z = target_zones(&[node], &[slice]);
        assert_eq!(z["i-0abc"], "us-east-1b");
        assert_eq!(z["10.0.0.7"], "us-east-1a");
    }

    #[test]
    fn columns_align() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string()],
            vec!["CCC".to_string(), "D".to_string()],
        ];
        assert_eq!(columns(&rows), "A    BB\nCCC  D\n");
    }
}
