//! Who advertises a pool Service's addresses over BGP, as the controller can tell: the
//! peers the class advertises to, and for each the nodes whose session with it is
//! `Established` (each agent reports its own in `BGPPeer.status.nodes`) and that serve
//! the Service by the rules the agents apply (not excluded from load balancers, not being
//! deleted, selected by the class's `announce.nodeSelector`, not leaving while a staying
//! node has a session, and for `externalTrafficPolicy: Local` a ready local endpoint).
//! Derived, not observed route by route: the agents do not report each prefix (a BGPPeer
//! status listing every node's every route would outgrow an object), and the condition
//! message says so.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use berth_crds::bgp::BGPPeer;
use berth_crds::{LABEL_EXCLUDE_FROM_LB, LABEL_SERVICE_NAME, PoolProvider, TAINT_TO_BE_DELETED};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::SelectorExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

/// Nodes advertising a Service, by peer name.
pub type Advertisers = BTreeMap<String, BTreeSet<String>>;

/// Watches the BGPPeers (their status carries the sessions). Without the CRD the store
/// stays empty and the watch retries quietly: BGP Services then show no advertiser.
pub fn watch_peers(client: &Client) -> Store<BGPPeer> {
    let (store, writer) = reflector::store();
    let api: Api<BGPPeer> = Api::all(client.clone());
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "watching BGPPeers; retrying");
                }
                Err(e) => tracing::debug!(error = %e, "watching BGPPeers"),
            }
        }
    });
    store
}

/// A node cordoned, tainted for removal by the cluster autoscaler or being deleted: its
/// agent withdraws its routes while another node stays.
fn leaving(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    node.metadata.deletion_timestamp.is_some()
        || spec.and_then(|s| s.unschedulable) == Some(true)
        || spec
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED))
}

/// The nodes with a ready endpoint of `svc` in `slices`.
fn local_nodes(svc: &Service, slices: &[Arc<EndpointSlice>]) -> BTreeSet<String> {
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    slices
        .iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(ns.as_str())
                && s.labels().get(LABEL_SERVICE_NAME) == Some(&name)
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// The peers `pool` advertises `svc` to, each with the nodes advertising it; `None` when
/// the class does not advertise over BGP. Pure.
pub fn advertisers(
    svc: &Service,
    pool: &PoolProvider,
    peers: &[Arc<BGPPeer>],
    nodes: &[Arc<Node>],
    slices: &[Arc<EndpointSlice>],
) -> Option<Advertisers> {
    let adv = pool.bgp.as_ref().filter(|b| b.enabled != Some(false))?;
    // An unparsable selector refuses the class; no node announces it.
    let scope = pool.announce_nodes();
    let by_name: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), &**n)).collect();
    let sessions: BTreeMap<String, BTreeSet<String>> = peers
        .iter()
        .filter(|p| {
            adv.peers
                .as_ref()
                .is_none_or(|names| names.contains(&p.name_any()))
        })
        .map(|p| {
            let up = p
                .status
                .iter()
                .flat_map(|s| &s.nodes)
                .filter(|n| n.state == "Established")
                .map(|n| n.node.clone())
                .collect();
            (p.name_any(), up)
        })
        .collect();
    let staying = sessions
        .values()
        .flatten()
        .any(|n| by_name.get(n).is_some_and(|n| !leaving(n)));
    let local = svc
        .spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
        .filter(|p| *p == "Local")
        .map(|_| local_nodes(svc, slices));
    let serves = |name: &String| {
        let Some(node) = by_name.get(name) else {
            return false;
        };
        let selected = match &scope {
            Ok(None) => true,
            Ok(Some(s)) => s.matches(node.labels()),
            Err(_) => false,
        };
        selected
            && !node.labels().contains_key(LABEL_EXCLUDE_FROM_LB)
            && node.metadata.deletion_timestamp.is_none()
            && (!leaving(node) || !staying)
            && local.as_ref().is_none_or(|l| l.contains(name))
    };
    Some(
        sessions
            .into_iter()
            .map(|(peer, up)| (peer, up.into_iter().filter(|n| serves(n)).collect()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, sessions: &[(&str, &str)]) -> Arc<BGPPeer> {
        let nodes: Vec<serde_json::Value> = sessions
            .iter()
            .map(|(n, s)| serde_json::json!({"node": n, "state": s, "reason": s}))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "berth.dev/v1alpha1", "kind": "BGPPeer",
                "metadata": {"name": name},
                "spec": {"address": "198.18.0.201", "peerASN": 64512, "myASN": 64513},
                "status": {"nodes": nodes}
            }))
            .expect("peer"),
        )
    }

    fn node(name: &str, labels: serde_json::Value, cordoned: bool) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"unschedulable": cordoned}
            }))
            .expect("node"),
        )
    }

    fn svc(local: bool) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "app"},
            "spec": {"type": "LoadBalancer",
                     "externalTrafficPolicy": if local { "Local" } else { "Cluster" }}
        }))
        .expect("service")
    }

    fn pool(bgp: serde_json::Value) -> PoolProvider {
        serde_json::from_value(serde_json::json!({"addresses": ["198.19.0.0/24"], "bgp": bgp}))
            .expect("pool")
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn established_serving_nodes_of_the_class_peers() {
        let peers = [
            peer(
                "r1",
                &[("a", "Established"), ("b", "Established"), ("c", "Connect")],
            ),
            peer("r2", &[("a", "Established")]),
            peer("other", &[("a", "Established")]),
        ];
        let nodes = [
            node("a", serde_json::json!({}), false),
            node("b", serde_json::json!({}), false),
            node("c", serde_json::json!({}), false),
        ];
        let p = pool(serde_json::json!({"peers": ["r1", "r2"]}));
        let got = advertisers(&svc(false), &p, &peers, &nodes, &[]).expect("bgp");
        assert_eq!(
            got,
            Advertisers::from([
                ("r1".into(), names(&["a", "b"])),
                ("r2".into(), names(&["a"]))
            ])
        );
        let off = pool(serde_json::json!({"enabled": false}));
        assert_eq!(advertisers(&svc(false), &off, &peers, &nodes, &[]), None);
        let mut l2 = p.clone();
        l2.bgp = None;
        assert_eq!(advertisers(&svc(false), &l2, &peers, &nodes, &[]), None);
    }

    #[test]
    fn local_services_follow_ready_endpoints_and_cordoned_nodes_drop_out() {
        let peers = [peer("r1", &[("a", "Established"), ("b", "Established")])];
        let nodes = [
            node("a", serde_json::json!({}), false),
            node("b", serde_json::json!({}), true),
        ];
        let p = pool(serde_json::json!({}));
        let got = advertisers(&svc(false), &p, &peers, &nodes, &[]).expect("bgp");
        assert_eq!(got["r1"], names(&["a"]), "b is cordoned while a stays");
        let slice: Arc<EndpointSlice> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "namespace": "app",
                             "labels": {LABEL_SERVICE_NAME: "web"}},
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": ["10.244.2.5"], "nodeName": "b", "conditions": {"ready": true}},
                    {"addresses": ["10.244.1.5"], "nodeName": "a", "conditions": {"ready": false}}
                ]
            }))
            .expect("slice"),
        );
        let nodes = [
            node("a", serde_json::json!({}), false),
            node("b", serde_json::json!({}), false),
        ];
        let got = advertisers(&svc(true), &p, &peers, &nodes, &[slice]).expect("bgp");
        assert_eq!(
            got["r1"],
            names(&["b"]),
            "only the node with a ready endpoint"
        );
        let mut scoped = p.clone();
        scoped.announce = serde_json::from_value(
            serde_json::json!({"nodeSelector": {"matchLabels": {"edge": "yes"}}}),
        )
        .expect("scope");
        let got = advertisers(&svc(false), &scoped, &peers, &nodes, &[]).expect("bgp");
        assert!(got["r1"].is_empty(), "no node selected");
    }
}
