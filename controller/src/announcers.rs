//! Who announces each pool Service's addresses, on the Service itself: the
//! `berth.dev/Announced` condition (`True`/`L2` naming the node that holds each
//! address's L2 Lease; for classes advertising over BGP the peers with the nodes
//! advertising to each, reason `BGP` or `L2AndBGP`, see [`bgp`]; `False`/`NotAnnounced`
//! while an address has no current holder or no node advertises it, `NoEligibleNode`
//! when the class's `announce.nodeSelector` selects no node) and an `AnnouncerChanged`
//! Event whenever the holders or advertisers change. Lease renewals change nothing, so
//! they cause no write.
//!
//! The decision is the pure [`announced`] (Service, holders and advertisers → condition
//! and Event); [`run`] feeds it from watches of the agents' Leases and the BGPPeers and
//! the stores, and writes under a field manager of its own, so the reconciler's status
//! writes and these never remove each other's condition.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_crds::l2::{LEASE_LABEL, lease_name};
use berth_crds::{
    ANNOTATION_OWNER_CLASS, CLASS_PREFIX, CONDITION_ANNOUNCED, LABEL_EXCLUDE_FROM_LB,
    LoadBalancerClass,
};
use berth_runtime::lease::Observations;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::core::SelectorExt;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;

pub mod bgp;

use berth_crds::bgp::BGPPeer;

use crate::config::Config;
use crate::provider::pool::allocation::status_ips;
use crate::service::Context;
use crate::writes::Write;

/// Field manager of the condition (not the reconciler's: see the module doc).
pub const FIELD_MANAGER: &str = "berth-controller-announcers";
pub const REASON_L2: &str = "L2";
pub const REASON_BGP: &str = "BGP";
pub const REASON_L2_AND_BGP: &str = "L2AndBGP";
pub const REASON_NOT_ANNOUNCED: &str = "NotAnnounced";
/// The class's `announce.nodeSelector` selects no node: nobody may announce.
pub const REASON_NO_ELIGIBLE_NODE: &str = "NoEligibleNode";
pub const EVENT_REASON: &str = "AnnouncerChanged";

/// How often holders are re-judged without a Lease event: a dead holder's Lease just
/// stops changing.
const RECHECK: Duration = Duration::from_secs(1);

/// What to write on a Service: nothing, or its new condition (`None`: remove ours) with
/// the Event note of the change, if any.
#[derive(Clone, Debug, PartialEq)]
pub enum Announced {
    Unchanged,
    Write {
        condition: Option<Condition>,
        event: Option<String>,
    },
}

/// The pool addresses berth announces over L2 for `svc`: its status addresses when its
/// owner class is a pool class with L2 on; none otherwise. Pure.
pub fn l2_addresses(svc: &Service, classes: &Store<LoadBalancerClass>) -> Vec<IpAddr> {
    let Some(owner) = svc.annotations().get(ANNOTATION_OWNER_CLASS) else {
        return Vec::new();
    };
    let l2 = classes
        .state()
        .iter()
        .find(|c| c.name_any() == *owner)
        .and_then(|c| c.spec.pool.as_ref().map(|p| p.l2 != Some(false)))
        .unwrap_or(false);
    if l2 { status_ips(svc) } else { Vec::new() }
}

/// Why no node may announce `svc`'s addresses: its owner class's `announce.nodeSelector`
/// selects none of `nodes` that may carry load-balancer traffic. Pure.
pub fn no_eligible_node(
    svc: &Service,
    classes: &Store<LoadBalancerClass>,
    nodes: &[Arc<Node>],
) -> Option<String> {
    let owner = svc.annotations().get(ANNOTATION_OWNER_CLASS)?;
    let class = classes
        .state()
        .into_iter()
        .find(|c| c.name_any() == *owner)?;
    let selector = class.spec.pool.as_ref()?.announce_nodes().ok()??;
    let any = nodes
        .iter()
        .any(|n| !n.labels().contains_key(LABEL_EXCLUDE_FROM_LB) && selector.matches(n.labels()));
    (!any).then(|| {
        format!(
            "no node may announce class {owner}: its announce.nodeSelector `{selector}` matches no node"
        )
    })
}

/// The pool block of `svc`'s owner class.
fn owner_pool(
    svc: &Service,
    classes: &Store<LoadBalancerClass>,
) -> Option<berth_crds::PoolProvider> {
    let owner = svc.annotations().get(ANNOTATION_OWNER_CLASS)?;
    classes
        .state()
        .iter()
        .find(|c| c.name_any() == *owner)
        .and_then(|c| c.spec.pool.clone())
}

/// Whether this controller speaks for `svc`: its owner class, or before it has one its
/// requested class, is one of this controller's. Others' Services are never written.
fn handled(svc: &Service, config: &Config) -> bool {
    let requested = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.as_deref())
        .and_then(|c| c.strip_prefix(CLASS_PREFIX));
    svc.annotations()
        .get(ANNOTATION_OWNER_CLASS)
        .map(String::as_str)
        .or(requested)
        .is_some_and(|c| config.handles_class(c))
}

/// The Service's current announcer condition, if any.
pub fn current(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_ANNOUNCED)
}

fn describe(addr: &IpAddr, holder: Option<&str>) -> String {
    match holder {
        Some(h) => format!("{addr} announced by {h}"),
        None => format!("{addr} not announced"),
    }
}

/// The holders a condition message names, by address (the inverse of [`describe`]).
fn holders_in(message: &str) -> BTreeMap<String, String> {
    message
        .split("; ")
        .filter_map(|part| {
            let (addr, node) = part.split_once(" announced by ")?;
            Some((addr.to_string(), node.to_string()))
        })
        .collect()
}

/// How the BGP part of a condition message starts (it is the message's last part).
pub const BGP_PREFIX: &str =
    "over BGP (derived from the BGPPeers' Established sessions and the endpoints): ";

/// The BGP part of a condition message: each peer with the nodes advertising to it.
fn describe_bgp(advertisers: &bgp::Advertisers) -> String {
    if advertisers.is_empty() {
        return format!("{BGP_PREFIX}no BGPPeer");
    }
    let peers: Vec<String> = advertisers
        .iter()
        .map(|(peer, nodes)| match nodes.is_empty() {
            true => format!("{peer} via no node"),
            false => format!(
                "{peer} via {}",
                nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
        .collect();
    format!("{BGP_PREFIX}{}", peers.join("; "))
}

/// What to write on `svc`, announcing `addrs` over L2 given each address's current
/// holder, its addresses over BGP by `advertisers` (when its class advertises them), and
/// why no node may announce them, if so. Only a change of holders or advertisers (or of
/// the address set, or of that reason) writes; the Event names each address whose holder
/// changed, with the previous one, and the BGP advertisers before and after. Pure.
pub fn announced(
    svc: &Service,
    addrs: &[IpAddr],
    holder: impl Fn(&IpAddr) -> Option<String>,
    advertisers: Option<&bgp::Advertisers>,
    nobody: Option<&str>,
    now: Time,
) -> Announced {
    let previous = current(svc);
    if addrs.is_empty() && advertisers.is_none() {
        return if previous.is_some() {
            Announced::Write {
                condition: None,
                event: None,
            }
        } else {
            Announced::Unchanged
        };
    }
    let holders: Vec<(IpAddr, Option<String>)> = addrs.iter().map(|a| (*a, holder(a))).collect();
    let l2_held = holders.iter().all(|(_, h)| h.is_some());
    let bgp_up = advertisers.is_none_or(|a| a.values().any(|n| !n.is_empty()));
    let all = l2_held && bgp_up;
    let (status, reason) = match (all, nobody) {
        (true, _) => (
            "True",
            match (addrs.is_empty(), advertisers.is_some()) {
                (false, true) => REASON_L2_AND_BGP,
                (true, _) => REASON_BGP,
                (false, false) => REASON_L2,
            },
        ),
        (false, None) => ("False", REASON_NOT_ANNOUNCED),
        (false, Some(_)) => ("False", REASON_NO_ELIGIBLE_NODE),
    };
    let mut parts: Vec<String> = holders
        .iter()
        .map(|(a, h)| describe(a, h.as_deref()))
        .collect();
    if let (false, Some(why)) = (all, nobody) {
        parts.push(why.to_string());
    }
    let bgp_part = advertisers.map(describe_bgp);
    parts.extend(bgp_part.clone());
    let message = parts.join("; ");
    if previous.is_some_and(|c| c.status == status && c.reason == reason && c.message == message) {
        return Announced::Unchanged;
    }
    let was = previous.map(|c| holders_in(&c.message)).unwrap_or_default();
    let was_bgp = previous.and_then(|c| {
        c.message
            .find(BGP_PREFIX)
            .map(|i| &c.message[i + BGP_PREFIX.len()..])
    });
    let now_bgp = bgp_part.as_deref().map(|p| &p[BGP_PREFIX.len()..]);
    let bgp_change = (was_bgp != now_bgp).then(|| match now_bgp {
        Some(n) => format!("over BGP now {n} (was {})", was_bgp.unwrap_or("none")),
        None => format!("no longer over BGP (was {})", was_bgp.unwrap_or("none")),
    });
    let changes: Vec<String> = holders
        .iter()
        .filter(|(a, h)| was.get(&a.to_string()) != h.as_ref())
        .map(|(a, h)| {
            let before = was.get(&a.to_string()).map_or("none", String::as_str);
            match h {
                Some(h) => format!("{a} now announced by {h} (was {before})"),
                None => format!("{a} no longer announced (was {before})"),
            }
        })
        .chain(bgp_change)
        .collect();
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    Announced::Write {
        condition: Some(Condition {
            type_: CONDITION_ANNOUNCED.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time,
            observed_generation: svc.metadata.generation,
        }),
        event: (!changes.is_empty()).then(|| changes.join("; ")),
    }
}

/// The current holder of `addr`'s Lease: named in it, and the Lease not standing still
/// for two durations (the agents take over after one, so a live successor shows up
/// first; a Lease nobody renews at all means nobody announces).
pub fn holder(leases: &Observations, addr: &IpAddr, now: Instant) -> Option<String> {
    let seen = leases.get(&lease_name(addr))?;
    let stale = now >= seen.seen_at + seen.record.duration * 2;
    seen.holder().filter(|_| !stale).map(str::to_string)
}

/// The agents' address Leases as this process observes them, and the wake-up of
/// [`run`] on every change of a holder (renewals only refresh observation times).
#[derive(Clone)]
pub struct Leases {
    seen: Arc<Mutex<Observations>>,
    wake: Arc<Notify>,
    /// The BGPPeers, whose status says which nodes' sessions are up ([`bgp`]).
    peers: Store<BGPPeer>,
}

impl Leases {
    /// Watches the address Leases in `namespace` (from now on, leading or not: a new
    /// leader starts from a full view).
    pub fn watch(client: &Client, namespace: &str) -> Self {
        let leases = Self {
            seen: Arc::default(),
            wake: Arc::new(Notify::new()),
            peers: bgp::watch_peers(client),
        };
        let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
        let config = watcher::Config::default().labels(LEASE_LABEL);
        let l = leases.clone();
        tokio::spawn(async move {
            let stream = watcher(api, config).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        let mut seen = l.seen.lock().unwrap_or_else(|p| p.into_inner());
                        let before = holders_of(&seen);
                        seen.apply(ev, Instant::now());
                        if holders_of(&seen) != before {
                            l.wake.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching L2 Leases; retrying"),
                }
            }
        });
        leases
    }
}

fn holders_of(leases: &Observations) -> Vec<(String, Option<String>)> {
    leases
        .iter()
        .map(|(n, o)| (n.clone(), o.holder().map(str::to_string)))
        .collect()
}

/// While leading: re-judges every Service on each holder change and every [`RECHECK`],
/// and writes the changes.
pub async fn run(ctx: Arc<Context>, leases: Leases) {
    let token = ctx.writer.fence().token();
    loop {
        let (peers, nodes) = (leases.peers.state(), ctx.stores.nodes.state());
        let slices = ctx.stores.slices.state();
        for svc in ctx.stores.services.state() {
            if !handled(&svc, &ctx.config) {
                continue;
            }
            let addrs = l2_addresses(&svc, &ctx.stores.classes);
            let advertisers = owner_pool(&svc, &ctx.stores.classes)
                .filter(|_| !status_ips(&svc).is_empty())
                .and_then(|pool| bgp::advertisers(&svc, &pool, &peers, &nodes, &slices));
            let nobody = no_eligible_node(&svc, &ctx.stores.classes, &ctx.stores.nodes.state());
            let decision = {
                let seen = leases.seen.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                announced(
                    &svc,
                    &addrs,
                    |a| holder(&seen, a, now),
                    advertisers.as_ref(),
                    nobody.as_deref(),
                    Time(k8s_openapi::jiff::Timestamp::now()),
                )
            };
            if let Announced::Write { condition, event } = decision {
                write(&ctx, &svc, condition.as_ref(), event.as_deref()).await;
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = leases.wake.notified() => {}
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

async fn write(ctx: &Context, svc: &Service, condition: Option<&Condition>, event: Option<&str>) {
    let (Some(ns), name) = (svc.namespace(), svc.name_any()) else {
        return;
    };
    let mut status = serde_json::json!({});
    if let Some(c) = condition {
        status["conditions"] = serde_json::json!([c]);
    }
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "status": status,
    });
    if ctx.writer.allow(Write::ServiceStatus).is_err() {
        return;
    }
    let api: Api<Service> = Api::namespaced(ctx.writer.client().clone(), &ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if let Err(e) = api.patch_status(&name, &params, &Patch::Apply(body)).await {
        // Retried on the next round: nothing was written, so the change is still due.
        tracing::warn!(service = %format!("{ns}/{name}"), error = %e, "writing the Announced condition");
        return;
    }
    if let Some(note) = event {
        let ev = Event {
            type_: EventType::Normal,
            reason: EVENT_REASON.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Announce".into(),
            secondary: None,
        };
        ctx.writer.publish(&ev, &svc.object_ref(&())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(condition: Option<(&str, &str, &str)>) -> Service {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "app"},
            "spec": {"type": "LoadBalancer"},
        }))
        .expect("service");
        if let Some((status, reason, message)) = condition {
            s.status = serde_json::from_value(serde_json::json!({"conditions": [{
                "type": CONDITION_ANNOUNCED, "status": status, "reason": reason,
                "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]}))
            .expect("status");
        }
        s
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn by(map: &[(&str, &str)]) -> impl Fn(&IpAddr) -> Option<String> {
        let m: BTreeMap<IpAddr, String> = map.iter().map(|(a, n)| (ip(a), n.to_string())).collect();
        move |a| m.get(a).cloned()
    }

    #[test]
    fn a_new_holder_writes_the_condition_and_an_event() {
        let s = svc(None);
        let a = announced(
            &s,
            &[ip("198.19.0.5")],
            by(&[("198.19.0.5", "node-a")]),
            None,
            None,
            now(),
        );
        let Announced::Write {
            condition: Some(c),
            event,
        } = a
        else {
            panic!("{a:?}")
        };
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_L2));
        assert_eq!(c.message, "198.19.0.5 announced by node-a");
        assert_eq!(
            event.as_deref(),
            Some("198.19.0.5 now announced by node-a (was none)")
        );
    }

    #[test]
    fn the_same_holder_writes_nothing() {
        let s = svc(Some(("True", REASON_L2, "198.19.0.5 announced by node-a")));
        let a = announced(
            &s,
            &[ip("198.19.0.5")],
            by(&[("198.19.0.5", "node-a")]),
            None,
            None,
            now(),
        );
        assert_eq!(a, Announced::Unchanged);
    }

    #[test]
    fn a_failover_names_the_previous_holder() {
        let s = svc(Some((
            "True",
            REASON_L2,
            "198.19.0.5 announced by node-a; fd00::5 announced by node-c",
        )));
        let a = announced(
            &s,
            &[ip("198.19.0.5"), ip("fd00::5")],
            by(&[("198.19.0.5", "node-b"), ("fd00::5", "node-c")]),
            None,
            None,
            now(),
        );
        let Announced::Write {
            condition: Some(c),
            event,
        } = a
        else {
            panic!("{a:?}")
        };
        assert_eq!(
            c.message,
            "198.19.0.5 announced by node-b; fd00::5 announced by node-c"
        );
        assert_eq!(
            c.last_transition_time.0,
            "2026-01-01T00:00:00Z".parse().expect("time"),
            "still True"
        );
        assert_eq!(
            event.as_deref(),
            Some("198.19.0.5 now announced by node-b (was node-a)")
        );
    }

    #[test]
    fn no_holder_is_false_and_no_address_removes_the_condition() {
        let s = svc(Some(("True", REASON_L2, "198.19.0.5 announced by node-a")));
        let Announced::Write {
            condition: Some(c),
            event,
        } = announced(&s, &[ip("198.19.0.5")], by(&[]), None, None, now())
        else {
            panic!("a write")
        };
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", REASON_NOT_ANNOUNCED)
        );
        assert_eq!(c.message, "198.19.0.5 not announced");
        assert_eq!(
            event.as_deref(),
            Some("198.19.0.5 no longer announced (was node-a)")
        );
        assert_eq!(
            announced(&s, &[], by(&[]), None, None, now()),
            Announced::Write {
                condition: None,
                event: None
            }
        );
        assert_eq!(
            announced(&svc(None), &[], by(&[]), None, None, now()),
            Announced::Unchanged
        );
    }

    #[test]
    fn a_class_selecting_no_node_says_so() {
        let s = svc(None);
        let why =
            "no node may announce class edge: its announce.nodeSelector `rack=z` matches no node";
        let Announced::Write {
            condition: Some(c), ..
        } = announced(&s, &[ip("198.19.0.5")], by(&[]), None, Some(why), now())
        else {
            panic!("a write")
        };
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", REASON_NO_ELIGIBLE_NODE)
        );
        assert_eq!(c.message, format!("198.19.0.5 not announced; {why}"));
        let node = |name: &str, rack: &str| -> Arc<Node> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": {"rack": rack}}
                }))
                .expect("node"),
            )
        };
        let class: LoadBalancerClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": "edge"},
            "spec": {"pool": {"addresses": ["198.19.0.0/24"],
                              "announce": {"nodeSelector": {"matchLabels": {"rack": "z"}}}}}
        }))
        .expect("class");
        let classes = crate::stores::filled(vec![class]);
        let mut owned = svc(None);
        owned
            .annotations_mut()
            .insert(ANNOTATION_OWNER_CLASS.into(), "edge".into());
        let nodes = [node("a", "x")];
        let note = no_eligible_node(&owned, &classes, &nodes).expect("no node");
        assert!(note.contains("rack=z"), "{note}");
        assert_eq!(no_eligible_node(&owned, &classes, &[node("b", "z")]), None);
        assert_eq!(
            no_eligible_node(&s, &classes, &nodes),
            None,
            "not the class's"
        );
    }

    #[test]
    fn a_lease_counts_until_it_stood_still_for_two_durations() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "berth-l2-198-19-0-5", "resourceVersion": "1"},
            "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 4}
        }))
        .expect("lease");
        let mut seen = Observations::default();
        let t0 = Instant::now();
        seen.observe(lease, t0);
        let a = ip("198.19.0.5");
        assert_eq!(
            holder(&seen, &a, t0 + Duration::from_secs(7)).as_deref(),
            Some("node-a")
        );
        assert_eq!(holder(&seen, &a, t0 + Duration::from_secs(8)), None);
        assert_eq!(holder(&seen, &ip("198.19.0.6"), t0), None);
    }
}

#[cfg(test)]
mod bgp_tests {
    use super::*;
    use std::collections::BTreeSet;

    fn svc(message: Option<&str>) -> Service {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "app"},
            "spec": {"type": "LoadBalancer"},
        }))
        .expect("service");
        if let Some(m) = message {
            s.status = serde_json::from_value(serde_json::json!({"conditions": [{
                "type": CONDITION_ANNOUNCED, "status": "True", "reason": REASON_BGP,
                "message": m, "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]}))
            .expect("status");
        }
        s
    }

    fn adv(list: &[(&str, &[&str])]) -> bgp::Advertisers {
        list.iter()
            .map(|(p, n)| {
                (
                    p.to_string(),
                    n.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>(),
                )
            })
            .collect()
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn bgp_advertisers_are_named_and_their_change_is_an_event() {
        let first = adv(&[("r1", &["node-a"])]);
        let Announced::Write {
            condition: Some(c),
            event,
        } = announced(&svc(None), &[], |_| None, Some(&first), None, now())
        else {
            panic!("a write")
        };
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", REASON_BGP));
        assert_eq!(c.message, format!("{BGP_PREFIX}r1 via node-a"));
        assert_eq!(
            event.as_deref(),
            Some("over BGP now r1 via node-a (was none)")
        );

        let s = svc(Some(&c.message));
        assert_eq!(
            announced(&s, &[], |_| None, Some(&first), None, now()),
            Announced::Unchanged
        );
        let more = adv(&[("r1", &["node-a", "node-b"])]);
        let Announced::Write { event, .. } = announced(&s, &[], |_| None, Some(&more), None, now())
        else {
            panic!("a write")
        };
        assert_eq!(
            event.as_deref(),
            Some("over BGP now r1 via node-a, node-b (was r1 via node-a)")
        );
        let none = adv(&[("r1", &[])]);
        let Announced::Write {
            condition: Some(c), ..
        } = announced(&s, &[], |_| None, Some(&none), None, now())
        else {
            panic!("a write")
        };
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", REASON_NOT_ANNOUNCED)
        );
        assert_eq!(c.message, format!("{BGP_PREFIX}r1 via no node"));
        assert_eq!(
            announced(&s, &[], |_| None, None, None, now()),
            Announced::Write {
                condition: None,
                event: None
            }
        );
    }

    #[test]
    fn l2_and_bgp_together() {
        let a: IpAddr = "198.19.0.5".parse().expect("ip");
        let both = adv(&[("r1", &["node-a"])]);
        let Announced::Write {
            condition: Some(c), ..
        } = announced(
            &svc(None),
            &[a],
            |_| Some("node-b".into()),
            Some(&both),
            None,
            now(),
        )
        else {
            panic!("a write")
        };
        assert_eq!(c.reason, REASON_L2_AND_BGP);
        assert_eq!(
            c.message,
            format!("198.19.0.5 announced by node-b; {BGP_PREFIX}r1 via node-a")
        );
    }
}
