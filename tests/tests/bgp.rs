//! BGP announcement of pool addresses by berth-nodeproxy to real routers from Debian:
//! FRR (zebra + bgpd) and GoBGP, each in a router namespace on the node bridge
//! ([`berth_e2e::router`]). Every node's agent opens a session to each `BGPPeer` and
//! announces the addresses of the Services it serves with itself as next hop; FRR
//! installs the multipath route and spreads a client's connections over the nodes. As in
//! the L2 suite no controller runs: each case writes its Services' owner annotation and
//! load-balancer status itself, except the who-advertises case, whose controller
//! allocates from 198.19.22.0/29 and writes the `berth.dev/Announced` condition.
//! Addresses come from 198.19.20.0/24 and fd00:1946::/120, routers use indexes 1–3, 5–6,
//! 8 and 9 (none shared between cases), so the cases run in
//! parallel. Needs root and the running local cluster with its node agents (`make test`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::net::NodePlan;
use berth_e2e::paths;
use berth_e2e::router::{Ipv6Nodes, Kind, NODE_ASN, Neighbor, ROUTER_ASN, Router, node_ipv6};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{NodeLabel, PodServer, TestEnv, TestNamespace, curl_in, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const POOL: &str = "198.19.20.0/24";
const WAIT: Duration = Duration::from_secs(60);

async fn connect(prefix: &str) -> (TestEnv, TestNamespace) {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/bgppeers.berth.dev",
    ]);
    env.wait_agents_healthy().await;
    let ns = env.namespace(prefix).await;
    (env, ns)
}

fn nodes(env: &TestEnv) -> Vec<NodePlan> {
    env.info.nodes.iter().map(|n| n.plan.clone()).collect()
}

fn neighbors(nodes: &[NodePlan], password: Option<&str>) -> Vec<Neighbor> {
    nodes
        .iter()
        .map(|n| Neighbor {
            ip: n.ip.into(),
            asn: NODE_ASN,
            password: password.map(str::to_string),
        })
        .collect()
}

/// A cluster-scoped BGPPeer, deleted on drop.
struct PeerGuard {
    name: String,
    kubeconfig: String,
}

impl PeerGuard {
    fn create(env: &TestEnv, name: &str, spec: serde_json::Value) -> Self {
        let obj = json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "BGPPeer",
            "metadata": {"name": name}, "spec": spec
        });
        let path = std::env::temp_dir().join(format!("berth-e2e-bgppeer-{name}.json"));
        std::fs::write(&path, obj.to_string()).expect("write peer");
        env.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        Self {
            name: name.into(),
            kubeconfig: env.info.kubeconfig.display().to_string(),
        }
    }

    /// `status.nodes` as (node, reason, message).
    fn sessions(&self, env: &TestEnv) -> Vec<(String, String, String)> {
        let out = env.kubectl(&["get", "bgppeer", &self.name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["status"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("node"), s("reason"), s("message"))
            })
            .collect()
    }
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let _ = Command::new(paths::bin("kubectl"))
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "delete",
                "bgppeer",
                &self.name,
            ])
            .arg("--wait=false")
            .output();
    }
}

fn peer_spec(router: &Router, peer_asn: u32) -> serde_json::Value {
    json!({
        "address": router.ip.to_string(), "peerASN": peer_asn, "myASN": NODE_ASN,
        "holdTime": 9, "keepaliveTime": 3,
    })
}

/// A pool class announcing over BGP to `peer` only, without L2: only the router can
/// bring traffic to the addresses.
fn bgp_class(env: &TestEnv, ns: &TestNamespace, peer: &str) -> ClassGuard {
    ClassGuard::with_spec(
        env,
        &format!("{}-bgp", ns.name),
        json!({"pool": {"addresses": [POOL], "l2": false,
                        "bgp": {"peers": [peer], "communities": ["64512:20"]}}}),
    )
}

/// A LoadBalancer Service owned by `class` whose status carries `ip`, as the
/// controller's pool allocator would write it.
async fn lb_service(
    env: &TestEnv,
    ns: &str,
    name: &str,
    class: &str,
    app: &str,
    local: bool,
    ip: Ipv4Addr,
) {
    ServiceBuilder::load_balancer(name)
        .owner_class(class)
        .app(app)
        .external_local(local)
        .tcp(80, 80)
        .create(env, ns)
        .await;
    Api::<Service>::namespaced(env.client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("set load-balancer status of {name}: {e}"));
}

/// `replicas` nginx pods labelled `app` pinned to `node`.
async fn nginx_on(env: &TestEnv, ns: &str, name: &str, app: &str, node: &str, replicas: i32) {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app, "deployment": name}},
                 "template": {"metadata": {"labels": {"app": app, "deployment": name}},
                              "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                                       "containers": [{"name": "nginx", "image": "nginx:latest",
                                                       "ports": [{"containerPort": 80}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap_or_else(|e| panic!("create deployment {name}: {e}"));
}

async fn scale(env: &TestEnv, ns: &str, name: &str, replicas: i32) {
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap_or_else(|e| panic!("scale {name}: {e}"));
}

fn dump(env: &TestEnv, router: &Router) -> Diagnostics {
    let log = |d: &str| env.info.log_dir.join(format!("{}-{d}.log", router.netns));
    let d = Diagnostics::new(env).node_agents(&env.info);
    match router.kind {
        Kind::Frr => d.log("bgpd", log("bgpd")).log("zebra", log("zebra")),
        Kind::GoBgp => d.log("gobgpd", log("gobgpd")),
    }
}

async fn until_established(env: &TestEnv, router: &Router, nodes: &[NodePlan]) {
    let addrs: Vec<IpAddr> = nodes.iter().map(|n| n.ip.into()).collect();
    until_established_at(env, router, &addrs).await
}

/// Every session with the nodes at `addrs` Established at the router.
async fn until_established_at(env: &TestEnv, router: &Router, addrs: &[IpAddr]) {
    wait_until(
        "every node's session Established at the router",
        WAIT,
        &dump(env, router),
        async || {
            let states: Vec<String> = addrs
                .iter()
                .map(|a| router.session_state(*a).unwrap_or_else(|e| e.to_string()))
                .collect();
            if states.iter().all(|s| s.eq_ignore_ascii_case("established")) {
                Ok(())
            } else {
                Err(format!("{states:?}"))
            }
        },
    )
    .await
}

async fn until_hops(env: &TestEnv, router: &Router, addr: Ipv4Addr, want: &[Ipv4Addr], what: &str) {
    let want: BTreeSet<Ipv4Addr> = want.iter().copied().collect();
    wait_until(what, WAIT, &dump(env, router), async || {
        match router.next_hops(addr) {
            Ok(h) if h.iter().copied().collect::<BTreeSet<_>>() == want => Ok(()),
            Ok(h) => Err(format!("next hops {h:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

fn ips(nodes: &[NodePlan], which: &[usize]) -> Vec<Ipv4Addr> {
    which.iter().map(|i| nodes[*i].ip).collect()
}

/// FRR router `number` peering with every node (with its own client namespace when
/// `with_client`), and the BGPPeer `<namespace>-<suffix>` naming it.
fn frr_with_peer(
    env: &TestEnv,
    ns: &TestNamespace,
    nodes: &[NodePlan],
    number: u8,
    with_client: bool,
    suffix: &str,
) -> (Router, PeerGuard) {
    let router = Router::start(
        Kind::Frr,
        number,
        nodes,
        &neighbors(nodes, None),
        with_client,
        &env.info.log_dir,
    )
    .unwrap_or_else(|e| panic!("start FRR: {e}"));
    let peer = PeerGuard::create(
        env,
        &format!("{}-{suffix}", ns.name),
        peer_spec(&router, ROUTER_ASN),
    );
    (router, peer)
}

/// FRR: every node's session comes up and reports Established in the BGPPeer's status;
/// the ETP=Cluster address gets every node as next hop and the client's 300 connections
/// through the router spread over all of them; ETP=Local next hops follow the pods as
/// they are scaled; deleting the Service withdraws its route.
#[tokio::test]
async fn frr_spreads_traffic_over_every_node_and_follows_the_pods() {
    let (env, ns) = connect("bgp-frr").await;
    let nodes = nodes(&env);
    let (router, peer) = frr_with_peer(&env, &ns, &nodes, 1, true, "frr");
    let class = bgp_class(&env, &ns, &peer.name);
    until_established(&env, &router, &nodes).await;
    wait_until(
        "each node reports Established in the BGPPeer status",
        WAIT,
        &dump(&env, &router),
        async || {
            let s = peer.sessions(&env);
            let up = s
                .iter()
                .filter(|(_, reason, _)| reason == "Established")
                .count();
            if up == nodes.len() {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;

    // ETP=Cluster: every node is a next hop, and connections spread over them.
    let web = Ipv4Addr::new(198, 19, 20, 10);
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    lb_service(&env, &ns.name, "web", &class.name, "nginx", false, web).await;
    let all: Vec<Ipv4Addr> = nodes.iter().map(|n| n.ip).collect();
    until_hops(
        &env,
        &router,
        web,
        &all,
        "every node a next hop of the Cluster address",
    )
    .await;
    let (client, _) = router.client.clone().expect("client namespace");
    let url = format!("http://{web}/");
    wait_until(
        "the client reaches nginx through the router",
        WAIT,
        &dump(&env, &router),
        async || curl_in(&client, &url, Duration::from_secs(2)).map_err(|e| e.to_string()),
    )
    .await;
    router.count_by_next_hop(web).expect("count");
    let mut failed = 0;
    for _ in 0..300 {
        match curl_in(&client, &url, Duration::from_secs(3)) {
            Ok(body) if body.contains("Welcome to nginx") => {}
            _ => failed += 1,
        }
    }
    let counts = router.counted().expect("counters");
    println!("300 connections through FRR per node: {counts:?}, failed {failed}");
    assert_eq!(failed, 0, "every request answered; per node {counts:?}");
    assert!(
        counts.values().sum::<u64>() >= 300,
        "every connection counted (SYN retransmits count again): {counts:?}"
    );
    for n in &nodes {
        let c = counts.get(&n.name).copied().unwrap_or(0);
        assert!(
            c >= 30,
            "node {} got {c} of 300 connections: {counts:?}",
            n.name
        );
    }

    // ETP=Local: only nodes with a ready local endpoint, following the pods.
    let local = Ipv4Addr::new(198, 19, 20, 11);
    nginx_on(&env, &ns.name, "on-first", "local", &nodes[0].name, 1).await;
    lb_service(&env, &ns.name, "local", &class.name, "local", true, local).await;
    until_hops(
        &env,
        &router,
        local,
        &ips(&nodes, &[0]),
        "the Local address from the pod's node only",
    )
    .await;
    nginx_on(&env, &ns.name, "on-third", "local", &nodes[2].name, 1).await;
    until_hops(
        &env,
        &router,
        local,
        &ips(&nodes, &[0, 2]),
        "a second node with a pod added",
    )
    .await;
    scale(&env, &ns.name, "on-first", 0).await;
    until_hops(
        &env,
        &router,
        local,
        &ips(&nodes, &[2]),
        "the first node withdrawn with its pod",
    )
    .await;
    curl_in(&client, &format!("http://{local}/"), Duration::from_secs(3))
        .expect("Local address answers");

    // Deleting the Service withdraws its route from every node.
    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    until_hops(
        &env,
        &router,
        web,
        &[],
        "the route withdrawn with its Service",
    )
    .await;
    until_hops(
        &env,
        &router,
        local,
        &ips(&nodes, &[2]),
        "the other Service's route kept",
    )
    .await;
}

/// GoBGP with TCP MD5: every node's session comes up with the password from a Secret and
/// the address is in GoBGP's RIB once per node. Three failing BGPPeers beside it, each
/// named in its status for each node: the wrong AS of an FRR router (`BadPeerAS`), the
/// same GoBGP with a wrong password (`AuthenticationFailed`: GoBGP's kernel drops the
/// badly signed segments), an address on the bridge nobody answers (`Unreachable`), and
/// a password Secret that does not exist (`SecretNotFound`, with a Warning Event from
/// each node). The GoBGP sessions and routes stay as they were.
#[tokio::test]
async fn gobgp_with_md5_and_failing_peers_beside_it() {
    let (env, ns) = connect("bgp-gobgp").await;
    let nodes = nodes(&env);
    let password = "berth-e2e-md5";
    let gobgp = Router::start(
        Kind::GoBgp,
        2,
        &nodes,
        &neighbors(&nodes, Some(password)),
        false,
        &env.info.log_dir,
    )
    .unwrap_or_else(|e| panic!("start GoBGP: {e}"));
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp-password"},
        "stringData": {"password": password}
    }))
    .expect("secret object");
    Api::<Secret>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let mut spec = peer_spec(&gobgp, ROUTER_ASN);
    spec["passwordSecretRef"] = json!({"name": "bgp-password", "namespace": ns.name});
    let good = PeerGuard::create(&env, &format!("{}-gobgp", ns.name), spec);
    let class = bgp_class(&env, &ns, &good.name);
    until_established(&env, &gobgp, &nodes).await;
    let addr = Ipv4Addr::new(198, 19, 20, 20);
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    lb_service(&env, &ns.name, "web", &class.name, "nginx", false, addr).await;
    let all: Vec<Ipv4Addr> = nodes.iter().map(|n| n.ip).collect();
    until_hops(&env, &gobgp, addr, &all, "every node a path in GoBGP's RIB").await;

    let frr = Router::start(
        Kind::Frr,
        3,
        &nodes,
        &neighbors(&nodes, None),
        false,
        &env.info.log_dir,
    )
    .unwrap_or_else(|e| panic!("start FRR: {e}"));
    let wrong = PeerGuard::create(&env, &format!("{}-wrong", ns.name), peer_spec(&frr, 64999));
    let wrong_secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp-wrong-password"},
        "stringData": {"password": "not-the-password"}
    }))
    .expect("secret object");
    Api::<Secret>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &wrong_secret)
        .await
        .expect("create secret");
    let mut spec = peer_spec(&gobgp, ROUTER_ASN);
    spec["passwordSecretRef"] = json!({"name": "bgp-wrong-password", "namespace": ns.name});
    let bad_password = PeerGuard::create(&env, &format!("{}-badpw", ns.name), spec);
    // On the node bridge, where no router is: nobody answers ARP for it.
    let mut spec = peer_spec(&gobgp, ROUTER_ASN);
    spec["address"] = json!("198.18.0.199");
    let unreachable = PeerGuard::create(&env, &format!("{}-nobody", ns.name), spec);
    let mut spec = peer_spec(&gobgp, ROUTER_ASN);
    spec["passwordSecretRef"] = json!({"name": "no-such-secret", "namespace": ns.name});
    let no_secret = PeerGuard::create(&env, &format!("{}-nosecret", ns.name), spec);
    let failing = [
        (&wrong, "BadPeerAS", "64512"),
        (&bad_password, "AuthenticationFailed", "TCP MD5"),
        (&unreachable, "Unreachable", "198.18.0.199"),
        (&no_secret, "SecretNotFound", "no-such-secret not found"),
    ];
    wait_until(
        "every node reports each failing peer's reason",
        WAIT,
        &dump(&env, &frr),
        async || {
            for (peer, want, words) in &failing {
                let s = peer.sessions(&env);
                let bad = s
                    .iter()
                    .filter(|(_, reason, msg)| reason == want && msg.contains(words))
                    .count();
                if bad != nodes.len() {
                    return Err(format!("{}: {s:?}", peer.name));
                }
            }
            Ok(())
        },
    )
    .await;
    for (peer, _, _) in &failing {
        println!("{}: {:?}", peer.name, peer.sessions(&env));
    }
    wait_until(
        "a Warning Event on the peer whose Secret is missing, from every node",
        WAIT,
        &dump(&env, &frr),
        async || {
            let out = env.kubectl(&[
                "get",
                "events",
                "-A",
                "--field-selector",
                &format!(
                    "involvedObject.name={},type=Warning,reason=SecretNotFound",
                    no_secret.name
                ),
                "-o",
                "json",
            ]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let notes: Vec<&str> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["message"].as_str().or(e["note"].as_str()))
                .filter(|m| m.contains("no-such-secret"))
                .collect();
            if notes.len() >= nodes.len() {
                Ok(())
            } else {
                Err(format!("{notes:?}"))
            }
        },
    )
    .await;
    for n in &nodes {
        let state = gobgp.session_state(n.ip).expect("GoBGP state");
        assert!(
            state.eq_ignore_ascii_case("established"),
            "{}: {state}",
            n.name
        );
    }
    assert_eq!(
        gobgp.next_hops(addr).expect("rib"),
        all,
        "GoBGP's paths unchanged"
    );
    let s = good.sessions(&env);
    assert!(
        s.iter().all(|(_, r, _)| r == "Established") && s.len() == nodes.len(),
        "{s:?}"
    );
}

const POOL6: &str = "fd00:1946::/120";
const BACKEND_PORT: u16 = 18746;

/// One HTTP GET from `netns`, its body trimmed.
fn get6(netns: &str, url: &str) -> Result<String, String> {
    curl_in(netns, url, Duration::from_secs(2))
        .map(|b| b.trim().to_string())
        .map_err(|e| e.to_string())
}

async fn until_hops6(
    env: &TestEnv,
    router: &Router,
    addr: Ipv6Addr,
    want: &[Ipv6Addr],
    what: &str,
) {
    let want: BTreeSet<Ipv6Addr> = want.iter().copied().collect();
    wait_until(what, WAIT, &dump(env, router), async || {
        match router.next_hops6(addr) {
            Ok(h) if h.iter().copied().collect::<BTreeSet<_>>() == want => Ok(()),
            Ok(h) => Err(format!("next hops {h:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// IPv6 over MP-BGP (RFC 4760): the simulated cluster is IPv4-only, so the case gives the
/// nodes and both routers IPv6 addresses on the bridge ([`Ipv6Nodes`]) and peers with FRR
/// (IPv4 and IPv6 unicast) and GoBGP (IPv6 unicast only) at their IPv6 addresses. An
/// IPv6 pool address of an ETP=Cluster Service shows up in both routers' IPv6 tables
/// with every node's IPv6 address as next hop; the FRR client's requests through the
/// router reach the backend (a listener in the client namespace, named by an IPv6
/// EndpointSlice). GoBGP refused IPv4: the class's IPv4 address is not sent to it and its
/// status says so. Deleting the Service withdraws the route from both.
#[tokio::test]
async fn an_ipv6_pool_address_through_frr_and_gobgp() {
    let (env, ns) = connect("bgp-v6").await;
    let nodes = nodes(&env);
    let _v6 = Ipv6Nodes::add(&nodes).unwrap_or_else(|e| panic!("node IPv6 addresses: {e}"));
    let node6: Vec<Ipv6Addr> = nodes.iter().map(|n| node_ipv6(n.index)).collect();
    let neighbors: Vec<Neighbor> = node6
        .iter()
        .map(|ip| Neighbor {
            ip: (*ip).into(),
            asn: NODE_ASN,
            password: None,
        })
        .collect();
    let log_dir = &env.info.log_dir;
    let frr = Router::start(Kind::Frr, 5, &nodes, &neighbors, true, log_dir)
        .unwrap_or_else(|e| panic!("start FRR: {e}"));
    let gobgp = Router::start(Kind::GoBgp, 6, &nodes, &neighbors, false, log_dir)
        .unwrap_or_else(|e| panic!("start GoBGP: {e}"));
    let peer6 = |router: &Router, suffix: &str| {
        let mut spec = peer_spec(router, ROUTER_ASN);
        spec["address"] = json!(router.ip6.expect("router IPv6").to_string());
        PeerGuard::create(&env, &format!("{}-{suffix}", ns.name), spec)
    };
    let peer_frr = peer6(&frr, "frr6");
    let peer_gobgp = peer6(&gobgp, "gobgp6");
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-bgp6", ns.name),
        json!({"pool": {"addresses": [POOL6, POOL], "l2": false,
                        "bgp": {"peers": [peer_frr.name, peer_gobgp.name]}}}),
    );
    let addrs: Vec<IpAddr> = node6.iter().map(|a| (*a).into()).collect();
    until_established_at(&env, &frr, &addrs).await;
    until_established_at(&env, &gobgp, &addrs).await;

    let (client, _) = frr.client.clone().expect("client namespace");
    let client6 = frr.client6.expect("client IPv6");
    let _backend = PodServer::start(&client, "v6-backend", BACKEND_PORT);
    let vip: Ipv6Addr = "fd00:1946::10".parse().expect("vip");
    ServiceBuilder::load_balancer("web6")
        .owner_class(&class.name)
        .tcp(80, i32::from(BACKEND_PORT))
        .create(&env, &ns.name)
        .await;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web6-v6", "labels": {"kubernetes.io/service-name": "web6"}},
        "addressType": "IPv6",
        "ports": [{"name": "", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [client6.to_string()], "conditions": {"ready": true}}],
    }))
    .expect("slice object");
    Api::<EndpointSlice>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &slice)
        .await
        .expect("create EndpointSlice");
    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .patch_status(
            "web6",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": vip.to_string(), "ipMode": "VIP"}]}}})),
        )
        .await
        .expect("set the Service's status");
    // An IPv4 address of the same class, which GoBGP's session does not carry.
    let v4 = Ipv4Addr::new(198, 19, 20, 30);
    lb_service(&env, &ns.name, "web4", &class.name, "none", false, v4).await;

    until_hops6(
        &env,
        &frr,
        vip,
        &node6,
        "every node's IPv6 address a next hop in FRR",
    )
    .await;
    until_hops6(
        &env,
        &gobgp,
        vip,
        &node6,
        "every node a path in GoBGP's IPv6 RIB",
    )
    .await;
    let url = format!("http://[{vip}]/");
    wait_until(
        "the client reaches the backend over IPv6 through FRR",
        WAIT,
        &dump(&env, &frr),
        async || match get6(&client, &url) {
            Ok(body) if body == "v6-backend" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    let mut failed = Vec::new();
    for _ in 0..30 {
        if let Err(e) = get6(&client, &url) {
            failed.push(e);
        }
    }
    assert!(failed.is_empty(), "30 requests over IPv6: {failed:?}");
    wait_until(
        "the sessions' status names the families and what GoBGP does not take",
        WAIT,
        &dump(&env, &gobgp),
        async || {
            let f = peer_frr.sessions(&env);
            let g = peer_gobgp.sessions(&env);
            let ok = f.len() == nodes.len()
                && g.len() == nodes.len()
                && f.iter().all(|(_, r, m)| {
                    r == "Established"
                        && m.contains("IPv4 and IPv6 unicast")
                        && !m.contains("not announced")
                })
                && g.iter().all(|(_, r, m)| {
                    r == "Established"
                        && m.contains("up, IPv6 unicast")
                        && m.contains(
                            "1 routes not announced: the router did not agree to IPv4 unicast",
                        )
                });
            if ok {
                Ok(())
            } else {
                Err(format!("FRR {f:?}, GoBGP {g:?}"))
            }
        },
    )
    .await;
    println!(
        "FRR: {:?}\nGoBGP: {:?}",
        peer_frr.sessions(&env),
        peer_gobgp.sessions(&env)
    );

    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .delete("web6", &DeleteParams::default())
        .await
        .expect("delete web6");
    until_hops6(&env, &frr, vip, &[], "the IPv6 route withdrawn from FRR").await;
    until_hops6(
        &env,
        &gobgp,
        vip,
        &[],
        "the IPv6 route withdrawn from GoBGP",
    )
    .await;
}

/// A class scoped by node label (`spec.pool.announce.nodeSelector`) is advertised from
/// the nodes it selects alone: only the labelled node is a next hop at FRR, and when the
/// label moves to another node, the route moves with it.
#[tokio::test]
async fn a_scoped_class_is_announced_only_from_the_nodes_it_selects() {
    let (env, ns) = connect("bgp-scope").await;
    let nodes = nodes(&env);
    let (router, peer) = frr_with_peer(&env, &ns, &nodes, 8, false, "scope");
    let key = format!("berth-e2e.dev/{}", ns.name);
    let label = NodeLabel::new(&env, &nodes[0].name, &key);
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-bgp", ns.name),
        json!({"pool": {"addresses": [POOL], "l2": false, "bgp": {"peers": [peer.name]},
                        "announce": {"nodeSelector": {"matchLabels": {key.clone(): "yes"}}}}}),
    );
    until_established(&env, &router, &nodes).await;
    let addr = Ipv4Addr::new(198, 19, 20, 40);
    lb_service(&env, &ns.name, "web", &class.name, "nginx", false, addr).await;
    until_hops(
        &env,
        &router,
        addr,
        &ips(&nodes, &[0]),
        "only the labelled node a next hop",
    )
    .await;
    drop(label);
    let _label = NodeLabel::new(&env, &nodes[1].name, &key);
    until_hops(
        &env,
        &router,
        addr,
        &ips(&nodes, &[1]),
        "the route following the label to the other node",
    )
    .await;
}

/// The Service's `berth.dev/Announced` condition as (status, reason, message).
fn announced(svc: &Service) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == berth_crds::CONDITION_ANNOUNCED)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Who advertises a BGP Service, on the Service: the controller's `berth.dev/Announced`
/// condition names the peer and the nodes advertising an ETP=Local Service (those with
/// a pod, as FRR's next hops show), follows the pods onto a second node with an
/// `AnnouncerChanged` Event, and `kubectl berth status` shows it.
#[tokio::test]
async fn the_announced_condition_names_the_bgp_advertisers() {
    let (env, ns) = connect("bgp-who").await;
    let nodes = nodes(&env);
    let (router, peer) = frr_with_peer(&env, &ns, &nodes, 9, false, "who");
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-who", ns.name),
        json!({"pool": {"addresses": ["198.19.22.0/29"], "l2": false,
                        "bgp": {"peers": [peer.name]}}}),
    );
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    opts.aws = false;
    let controller =
        ControllerProc::spawn(&env.info, "bgp-who", &opts).unwrap_or_else(|e| panic!("{e}"));
    let diag = dump(&env, &router)
        .controllers(std::slice::from_ref(&controller))
        .events(&ns.name, "web");
    until_established(&env, &router, &nodes).await;
    nginx_on(&env, &ns.name, "pods-a", "nginx", &nodes[0].name, 1).await;
    ServiceBuilder::load_balancer("web")
        .class(&class.lb_class())
        .app("nginx")
        .external_local(true)
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let ip = wait_until("an address", WAIT, &diag, async || {
        let svc = api.get("web").await.map_err(|e| e.to_string())?;
        lb_ips(&svc).first().cloned().ok_or("no address yet".into())
    })
    .await;
    let addr: Ipv4Addr = ip.parse().expect("IPv4 address");
    let until_named = async |via: &str| {
        let want = format!("{} via {via}", peer.name);
        wait_until(
            "the condition naming the advertisers",
            WAIT,
            &diag,
            async || {
                let svc = api.get("web").await.map_err(|e| e.to_string())?;
                match announced(&svc) {
                    Some((s, r, m)) if s == "True" && r == "BGP" && m.ends_with(&want) => Ok(m),
                    c => Err(format!("condition {c:?}, want ... {want}")),
                }
            },
        )
        .await
    };
    until_hops(
        &env,
        &router,
        addr,
        &ips(&nodes, &[0]),
        "the pod's node a next hop",
    )
    .await;
    let message = until_named(&nodes[0].name).await;
    assert!(message.contains("derived from"), "{message}");

    nginx_on(&env, &ns.name, "pods-b", "nginx", &nodes[1].name, 1).await;
    until_hops(
        &env,
        &router,
        addr,
        &ips(&nodes, &[0, 1]),
        "both pods' nodes next hops",
    )
    .await;
    let mut both = [nodes[0].name.clone(), nodes[1].name.clone()];
    both.sort();
    let via = both.join(", ");
    until_named(&via).await;
    let note = format!(
        "over BGP now {} via {via} (was {} via {})",
        peer.name, peer.name, nodes[0].name
    );
    wait_until("the AnnouncerChanged Event", WAIT, &diag, async || {
        let events = env.events(&ns.name, "web").await;
        if events
            .iter()
            .any(|(t, r, m)| t == "Normal" && r == "AnnouncerChanged" && m.contains(&note))
        {
            Ok(())
        } else {
            Err(format!("events {events:?}"))
        }
    })
    .await;
    let out = Command::new(paths::sibling_bin("kubectl-berth"))
        .args(["--cluster-name", &env.info.cluster_name])
        .args(["--region", &env.info.region])
        .args(["--aws-endpoint", &env.info.localstack_endpoint])
        .args(["status", "-n", &ns.name, "web"])
        .env("KUBECONFIG", &env.info.kubeconfig)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("kubectl-berth");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("Announced: True (BGP)")
            && status.contains(&format!("{} via {via}", peer.name)),
        "kubectl berth status:\n{status}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
