//! BGP announcement of pool addresses by berth-nodeproxy to real routers from Debian:
//! FRR (zebra + bgpd) and GoBGP, each in a router namespace on the node bridge
//! ([`berth_e2e::router`]). Every node's agent opens a session to each `BGPPeer` and
//! announces the addresses of the Services it serves with itself as next hop; FRR
//! installs the multipath route and spreads a client's connections over the nodes. As in
//! the L2 suite no controller runs: each case writes its Services' owner annotation and
//! load-balancer status itself. Addresses come from 198.19.20.0/24, routers use indexes
//! 1–3 (one per case), so the cases run in parallel. Needs root and the running local
//! cluster with its node agents (`make test`).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::net::NodePlan;
use berth_e2e::paths;
use berth_e2e::router::{Kind, NODE_ASN, Neighbor, ROUTER_ASN, Router};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
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
            ip: n.ip,
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
    wait_until(
        "every node's session Established at the router",
        WAIT,
        &dump(env, router),
        async || {
            let states: Vec<String> = nodes
                .iter()
                .map(|n| router.session_state(n.ip).unwrap_or_else(|e| e.to_string()))
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

/// FRR: every node's session comes up and reports Established in the BGPPeer's status;
/// the ETP=Cluster address gets every node as next hop and the client's 300 connections
/// through the router spread over all of them; ETP=Local next hops follow the pods as
/// they are scaled; deleting the Service withdraws its route.
#[tokio::test]
async fn frr_spreads_traffic_over_every_node_and_follows_the_pods() {
    let (env, ns) = connect("bgp-frr").await;
    let nodes = nodes(&env);
    let router = Router::start(
        Kind::Frr,
        1,
        &nodes,
        &neighbors(&nodes, None),
        true,
        &env.info.log_dir,
    )
    .unwrap_or_else(|e| panic!("start FRR: {e}"));
    let peer = PeerGuard::create(
        &env,
        &format!("{}-frr", ns.name),
        peer_spec(&router, ROUTER_ASN),
    );
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
/// the address is in GoBGP's RIB once per node. A second BGPPeer naming the wrong AS
/// of an FRR router: its status names the mismatch for each node, and the GoBGP sessions
/// and routes stay as they were.
#[tokio::test]
async fn gobgp_with_md5_and_a_wrong_asn_peer_beside_it() {
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
    wait_until(
        "every node reports the wrong AS",
        WAIT,
        &dump(&env, &frr),
        async || {
            let s = wrong.sessions(&env);
            let bad = s
                .iter()
                .filter(|(_, reason, msg)| {
                    reason == "BadPeerAS" && msg.contains("Bad Peer AS") && msg.contains("64512")
                })
                .count();
            if bad == nodes.len() {
                Ok(())
            } else {
                Err(format!("{s:?}"))
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
