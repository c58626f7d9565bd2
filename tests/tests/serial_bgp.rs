//! BGP announcement when a node's agent stops or the node fails, against FRR in a router
//! namespace ([`berth_e2e::router`]): SIGTERM withdraws the node's routes before the
//! session closes, so a request loop through the router sees no failure; a node that
//! stops answering (its traffic dropped, its agent killed) loses its route when FRR's
//! hold timer (9 s here) expires, and requests resume. Serial: it stops agents the other
//! suites rely on. Addresses 198.19.21.0/24, router index 4. Also: a restarted agent
//! removes its stale entry from a peer that stopped selecting its node.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::net::NodePlan;
use berth_e2e::nodeagent::{self, HoldAgent};
use berth_e2e::requests::RequestLoop;
use berth_e2e::router::{Kind, NODE_ASN, Neighbor, ROUTER_ASN, Router};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{Cordon, TestEnv, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn dump(env: &TestEnv, router: &Router) -> Diagnostics {
    let log = |d: &str| env.info.log_dir.join(format!("{}-{d}.log", router.netns));
    Diagnostics::new(env)
        .node_agents(&env.info)
        .log("bgpd", log("bgpd"))
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

/// An nftables table in a node's namespace dropping everything to and from the router,
/// as a failed node would; deleted on drop.
struct Unplugged(String);

const UNPLUG_TABLE: &str = "bgp-test-unplugged";

impl Unplugged {
    fn new(netns: &str, router: Ipv4Addr, addr: Ipv4Addr) -> Self {
        let rules = format!(
            "table ip {UNPLUG_TABLE} {{ chain pre {{ type filter hook prerouting priority -400; \
             ip saddr {router} drop; ip daddr {addr} drop; }}; chain out {{ type filter hook output \
             priority -400; ip daddr {router} drop; }}; }}"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "nft", &rules])
            .output()
            .expect("nft");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(netns.to_string())
    }
}

impl Drop for Unplugged {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.0,
                "nft",
                "delete",
                "table",
                "ip",
                UNPLUG_TABLE,
            ])
            .output();
    }
}

/// SIGTERM of one node's agent under a request loop: its route is withdrawn and no
/// request fails; the restarted agent announces again. Then a failed node (its traffic
/// to and from the router dropped, its agent killed): FRR drops its route when the hold
/// timer expires and requests succeed again.
#[tokio::test]
async fn sigterm_withdraws_first_and_a_failed_node_goes_with_the_hold_timer() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("bgp-serial").await;
    let nodes: Vec<NodePlan> = env.info.nodes.iter().map(|n| n.plan.clone()).collect();
    let neighbors: Vec<Neighbor> = nodes
        .iter()
        .map(|n| Neighbor {
            ip: n.ip.into(),
            asn: NODE_ASN,
            password: None,
        })
        .collect();
    let router = Router::start(Kind::Frr, 4, &nodes, &neighbors, true, &env.info.log_dir)
        .unwrap_or_else(|e| panic!("start FRR: {e}"));
    let _peer = {
        let spec = json!({"address": router.ip.to_string(), "peerASN": ROUTER_ASN, "myASN": NODE_ASN,
                          "holdTime": 9, "keepaliveTime": 3});
        let obj = json!({"apiVersion": "berth.dev/v1alpha1", "kind": "BGPPeer",
                         "metadata": {"name": ns.name}, "spec": spec});
        let path = std::env::temp_dir().join(format!("berth-e2e-bgppeer-{}.json", ns.name));
        std::fs::write(&path, obj.to_string()).expect("write peer");
        env.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        PeerDelete(env.info.kubeconfig.display().to_string(), ns.name.clone())
    };
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-bgp", ns.name),
        json!({"pool": {"addresses": ["198.19.21.0/24"], "l2": false, "bgp": {"peers": [ns.name]}}}),
    );
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    let addr = Ipv4Addr::new(198, 19, 21, 10);
    ServiceBuilder::load_balancer("web")
        .owner_class(&class.name)
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": addr.to_string(), "ipMode": "VIP"}]}}})),
        )
        .await
        .expect("status");
    let all: Vec<Ipv4Addr> = nodes.iter().map(|n| n.ip).collect();
    until_hops(&env, &router, addr, &all, "every node a next hop").await;
    let (client, _) = router.client.clone().expect("client");
    let url = format!("http://{addr}/");
    wait_until(
        "the client reaches nginx through FRR",
        WAIT,
        &dump(&env, &router),
        async || curl_in(&client, &url, Duration::from_secs(2)).map_err(|e| e.to_string()),
    )
    .await;

    // Cordoned: the node withdraws its route while it still forwards what reaches it
    // (make-before-break); uncordoned, it announces again. No request fails.
    let cordoned = &nodes[2];
    let others: Vec<Ipv4Addr> = nodes
        .iter()
        .filter(|n| n.name != cordoned.name)
        .map(|n| n.ip)
        .collect();
    let requests = RequestLoop::start(
        &client,
        &url,
        "Welcome to nginx!",
        Duration::from_millis(50),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cordon = Cordon::new(&env, &cordoned.name);
    until_hops(
        &env,
        &router,
        addr,
        &others,
        "the cordoned node's route withdrawn",
    )
    .await;
    drop(cordon);
    until_hops(&env, &router, addr, &all, "uncordoned, announced again").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = requests.finish();
    let failed = samples.iter().filter(|(_, ok)| !ok).count();
    println!(
        "cordon: {} requests through FRR, {failed} failed",
        samples.len()
    );
    assert_eq!(
        failed, 0,
        "no request fails while a cordoned node withdraws"
    );

    // SIGTERM: withdraw first, then close; no request fails.
    let stopped = &nodes[0];
    let rest: Vec<Ipv4Addr> = nodes[1..].iter().map(|n| n.ip).collect();
    let requests = RequestLoop::start(
        &client,
        &url,
        "Welcome to nginx!",
        Duration::from_millis(50),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hold = HoldAgent::stop(&stopped.name, libc::SIGTERM);
    until_hops(
        &env,
        &router,
        addr,
        &rest,
        "the stopped node's route withdrawn",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = requests.finish();
    let failed = samples.iter().filter(|(_, ok)| !ok).count();
    println!(
        "SIGTERM: {} requests through FRR, {failed} failed",
        samples.len()
    );
    assert_eq!(
        failed, 0,
        "no request fails while a node's agent stops gracefully"
    );
    drop(hold);
    nodeagent::wait_healthy(stopped, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    until_hops(
        &env,
        &router,
        addr,
        &all,
        "the restarted agent announces again",
    )
    .await;

    // A failed node: nothing reaches it or comes back, its agent dies without a word.
    let failed_node = &nodes[1];
    let unplugged = Unplugged::new(&failed_node.netns, router.ip, addr);
    let hold = HoldAgent::stop(&failed_node.name, libc::SIGKILL);
    let t = Instant::now();
    let survivors: Vec<Ipv4Addr> = nodes
        .iter()
        .filter(|n| n.name != failed_node.name)
        .map(|n| n.ip)
        .collect();
    until_hops(
        &env,
        &router,
        addr,
        &survivors,
        "the failed node's route gone with the hold timer",
    )
    .await;
    println!(
        "failed node's route removed by FRR after {:?} (hold time 9s)",
        t.elapsed()
    );
    let mut ok = 0;
    for _ in 0..30 {
        if curl_in(&client, &url, Duration::from_secs(2)).is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 30, "requests succeed again once the route is gone");
    drop(unplugged);
    drop(hold);
    nodeagent::wait_healthy(failed_node, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

struct PeerDelete(String, String);

impl Drop for PeerDelete {
    fn drop(&mut self) {
        let _ = Command::new(berth_e2e::paths::bin("kubectl"))
            .args([
                "--kubeconfig",
                &self.0,
                "delete",
                "bgppeer",
                &self.1,
                "--wait=false",
            ])
            .output();
    }
}

/// `status.nodes` of a BGPPeer as node names.
fn status_nodes(env: &TestEnv, peer: &str) -> Vec<String> {
    let out = env.kubectl(&["get", "bgppeer", peer, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["status"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e["node"].as_str()?.to_string()))
        .collect()
}

/// A peer stops selecting a node while that node's agent is down: the restarted agent
/// removes the entry its predecessor wrote in the peer's `status.nodes` (it has no
/// session to report, and nobody else owns the entry). No router is needed: every node
/// reports a session to an address nobody answers.
#[tokio::test]
async fn a_restarted_agent_removes_its_entry_from_a_peer_that_deselected_its_node() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("bgp-stale").await;
    let nodes: Vec<NodePlan> = env.info.nodes.iter().map(|n| n.plan.clone()).collect();
    let name = ns.name.clone();
    let apply = |selector: serde_json::Value| {
        let mut spec = json!({"address": "198.18.0.198", "peerASN": ROUTER_ASN, "myASN": NODE_ASN});
        if !selector.is_null() {
            spec["nodeSelector"] = selector;
        }
        let obj = json!({"apiVersion": "berth.dev/v1alpha1", "kind": "BGPPeer",
                         "metadata": {"name": name}, "spec": spec});
        let path = std::env::temp_dir().join(format!("berth-e2e-bgppeer-{name}.json"));
        std::fs::write(&path, obj.to_string()).expect("write peer");
        env.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
    };
    apply(serde_json::Value::Null);
    let _peer = PeerDelete(env.info.kubeconfig.display().to_string(), name.clone());
    let diag = Diagnostics::new(&env).node_agents(&env.info);
    let all: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    wait_until("an entry from every node", WAIT, &diag, async || {
        let s: BTreeSet<String> = status_nodes(&env, &name).into_iter().collect();
        if s == all {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;

    let gone = &nodes[2];
    let hold = HoldAgent::stop(&gone.name, libc::SIGKILL);
    apply(
        json!({"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn",
                                       "values": [gone.name]}]}),
    );
    // Down, its agent cannot remove the entry; the others keep theirs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        status_nodes(&env, &name).contains(&gone.name),
        "the stopped agent's entry is still there"
    );
    drop(hold);
    nodeagent::wait_healthy(gone, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rest: BTreeSet<String> = nodes[..2].iter().map(|n| n.name.clone()).collect();
    wait_until(
        "the restarted agent's stale entry removed, the others kept",
        WAIT,
        &diag,
        async || {
            let s: BTreeSet<String> = status_nodes(&env, &name).into_iter().collect();
            if s == rest {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
}
