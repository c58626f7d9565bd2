//! Which routes this node announces to which peer, the pure part: pool addresses of
//! Services whose class advertises over BGP, from every eligible node
//! (`externalTrafficPolicy: Cluster`) or only from nodes with a ready local endpoint
//! (`Local`), each as a host route with this node as next hop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use berth_crds::bgp::{BgpAdvertisement, parse_community};

use crate::l2::announce::PoolClass;
use crate::proxy::model::Model;

/// A class's `spec.pool.bgp`, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertisement {
    /// Peer names; `None`: every peer.
    pub peers: Option<BTreeSet<String>>,
    pub communities: BTreeSet<u32>,
    pub local_pref: Option<u32>,
}

impl Advertisement {
    /// `None` when the block turns BGP off. A malformed community is left out with a
    /// warning (the schema refuses them; this guards objects written before it).
    pub fn of(b: &BgpAdvertisement, warnings: &mut Vec<String>) -> Option<Self> {
        if b.enabled == Some(false) {
            return None;
        }
        let communities = b
            .communities
            .iter()
            .flatten()
            .filter_map(|c| {
                parse_community(c)
                    .map_err(|e| warnings.push(format!("bgp: {e}")))
                    .ok()
            })
            .collect();
        Some(Self {
            peers: b.peers.as_ref().map(|p| p.iter().cloned().collect()),
            communities,
            local_pref: b.local_pref,
        })
    }
}

/// Path attributes of one announced prefix that depend on its class.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attrs {
    pub communities: BTreeSet<u32>,
    pub local_pref: Option<u32>,
}

/// Host routes (`/32`, `/128`) with their attributes.
pub type Routes = BTreeMap<IpAddr, Attrs>;

/// What this node announces to each peer (by peer name), given the peers it has
/// sessions with. `eligible`: this node may carry load-balancer traffic at all (not
/// labelled out of load balancers, not being deleted); `labels`: the node's, which a
/// class's scope selects on. Pure.
pub fn per_peer(
    model: &Model,
    classes: &BTreeMap<String, PoolClass>,
    eligible: bool,
    labels: &BTreeMap<String, String>,
    peers: &BTreeSet<String>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Routes> {
    let mut out: BTreeMap<String, Routes> =
        peers.iter().map(|p| (p.clone(), Routes::new())).collect();
    if !eligible {
        return out;
    }
    let me = &model.node.name;
    for svc in model.services.values() {
        let Some(class_name) = svc.owner_class.as_deref() else {
            continue;
        };
        let Some((class, adv)) = classes
            .get(class_name)
            .filter(|c| c.scope.selects(labels))
            .and_then(|c| c.bgp.as_ref().map(|a| (c, a)))
        else {
            continue;
        };
        let serves = !svc.external_local
            || model
                .slices_of(&svc.id)
                .flat_map(|s| &s.endpoints)
                .any(|e| e.ready && e.node.as_deref() == Some(me.as_str()));
        if !serves {
            continue;
        }
        let attrs = Attrs {
            communities: adv.communities.clone(),
            local_pref: adv.local_pref,
        };
        for ip in &svc.load_balancer_ips {
            if !class.contains(ip) {
                warnings.push(format!(
                    "{ip} of Service {} is outside the pool of class {class_name}; not announced",
                    svc.id
                ));
                continue;
            }
            for (peer, routes) in out.iter_mut() {
                if adv.peers.as_ref().is_none_or(|p| p.contains(peer)) {
                    // Services sharing an address: the attributes of the first one win,
                    // deterministically (Services iterate in name order).
                    routes.entry(*ip).or_insert_with(|| attrs.clone());
                }
            }
        }
    }
    out
}

/// What to send to move a peer from `sent` to `wanted`: withdrawals, then
/// announcements grouped by attributes (one UPDATE each). Pure.
pub fn diff(sent: &Routes, wanted: &Routes) -> (Vec<IpAddr>, BTreeMap<Attrs, Vec<IpAddr>>) {
    let withdraw = sent
        .keys()
        .filter(|ip| !wanted.contains_key(ip))
        .copied()
        .collect();
    let mut announce: BTreeMap<Attrs, Vec<IpAddr>> = BTreeMap::new();
    for (ip, attrs) in wanted {
        if sent.get(ip) != Some(attrs) {
            announce.entry(attrs.clone()).or_default().push(*ip);
        }
    }
    (withdraw, announce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_crds::addresses::AddressPool;

    use crate::proxy::model::fixtures::ip;
    use crate::proxy::model::{Endpoint, NodeFacts, Service, Slice};

    fn class(bgp: Option<Advertisement>) -> PoolClass {
        PoolClass {
            l2: false,
            addresses: AddressPool::parse(&["198.19.0.0/24"]).expect("pool"),
            bgp,
            scope: Default::default(),
        }
    }

    fn lb(name: &str, class: &str, addr: &str, local: bool) -> Service {
        let mut s = Service::test("ns", name, "10.96.0.9");
        s.owner_class = Some(class.into());
        s.load_balancer_ips = vec![ip(addr)];
        s.external_local = local;
        s
    }

    fn peers(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn cluster_services_go_to_every_peer_local_ones_only_with_a_local_endpoint() {
        let adv = Advertisement {
            communities: [65000 << 16 | 7].into(),
            local_pref: Some(150),
            ..Default::default()
        };
        let classes = BTreeMap::from([
            ("bgp".to_string(), class(Some(adv))),
            ("l2only".to_string(), class(None)),
        ]);
        let local = lb("local", "bgp", "198.19.0.3", true);
        let remote = lb("remote", "bgp", "198.19.0.4", true);
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10"))
            .with_service(lb("cluster", "bgp", "198.19.0.2", false))
            .with_service(lb("l2", "l2only", "198.19.0.9", false))
            .with_service(lb("outside", "bgp", "203.0.113.1", false))
            .with_slice("local-a", {
                let mut s = Slice::test(&local);
                s.endpoints.push(Endpoint::test("10.244.1.2", "n1"));
                s
            })
            .with_slice("remote-a", {
                let mut s = Slice::test(&remote);
                s.endpoints.push(Endpoint::test("10.244.2.2", "n2"));
                s
            })
            .with_service(local)
            .with_service(remote);
        let mut w = Vec::new();
        let out = per_peer(
            &model,
            &classes,
            true,
            &BTreeMap::new(),
            &peers(&["r1", "r2"]),
            &mut w,
        );
        let want: BTreeSet<IpAddr> = [ip("198.19.0.2"), ip("198.19.0.3")].into();
        for p in ["r1", "r2"] {
            assert_eq!(out[p].keys().copied().collect::<BTreeSet<_>>(), want);
            assert_eq!(out[p][&ip("198.19.0.2")].local_pref, Some(150));
        }
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("203.0.113.1"));
        let none = per_peer(
            &model,
            &classes,
            false,
            &BTreeMap::new(),
            &peers(&["r1"]),
            &mut w,
        );
        assert!(none["r1"].is_empty(), "an excluded node announces nothing");
    }

    #[test]
    fn a_class_can_name_its_peers() {
        let adv = Advertisement {
            peers: Some(peers(&["r2"])),
            ..Default::default()
        };
        let classes = BTreeMap::from([("bgp".to_string(), class(Some(adv)))]);
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10")).with_service(lb(
            "a",
            "bgp",
            "198.19.0.2",
            false,
        ));
        let out = per_peer(
            &model,
            &classes,
            true,
            &BTreeMap::new(),
            &peers(&["r1", "r2"]),
            &mut Vec::new(),
        );
        assert!(out["r1"].is_empty());
        assert_eq!(out["r2"].len(), 1);
    }

    #[test]
    fn a_scoped_class_is_announced_only_from_the_nodes_it_selects() {
        let mut scoped = class(Some(Advertisement::default()));
        scoped.scope.nodes =
            crate::l2::announce::ScopeNodes::Matching([("edge", "yes")].into_iter().collect());
        let classes = BTreeMap::from([("bgp".to_string(), scoped)]);
        let model = Model::test(NodeFacts::test("n1", "198.18.1.10")).with_service(lb(
            "a",
            "bgp",
            "198.19.0.2",
            false,
        ));
        let edge = BTreeMap::from([("edge".to_string(), "yes".to_string())]);
        let mut w = Vec::new();
        let on = per_peer(&model, &classes, true, &edge, &peers(&["r1"]), &mut w);
        assert_eq!(on["r1"].len(), 1);
        let off = per_peer(
            &model,
            &classes,
            true,
            &BTreeMap::new(),
            &peers(&["r1"]),
            &mut w,
        );
        assert!(off["r1"].is_empty(), "a node the class does not select");
    }

    #[test]
    fn diff_withdraws_removed_and_reannounces_changed_attributes() {
        let a = Attrs::default();
        let b = Attrs {
            local_pref: Some(1),
            ..Default::default()
        };
        let sent = Routes::from([(ip("198.19.0.1"), a.clone()), (ip("198.19.0.2"), a.clone())]);
        let wanted = Routes::from([(ip("198.19.0.2"), b.clone()), (ip("198.19.0.3"), a.clone())]);
        let (withdraw, announce) = diff(&sent, &wanted);
        assert_eq!(withdraw, vec![ip("198.19.0.1")]);
        assert_eq!(announce[&b], vec![ip("198.19.0.2")]);
        assert_eq!(announce[&a], vec![ip("198.19.0.3")]);
        assert_eq!(diff(&wanted, &wanted), (vec![], BTreeMap::new()));
    }

    #[test]
    fn disabled_block_and_bad_communities() {
        let off = BgpAdvertisement {
            enabled: Some(false),
            ..Default::default()
        };
        assert_eq!(Advertisement::of(&off, &mut Vec::new()), None);
        let mut w = Vec::new();
        let on = BgpAdvertisement {
            communities: Some(vec!["65000:1".into(), "x".into()]),
            ..Default::default()
        };
        let adv = Advertisement::of(&on, &mut w).expect("on");
        assert_eq!(adv.communities.len(), 1);
        assert_eq!(w.len(), 1);
    }
}
