//! `trafficDistribution` through berth-nodeproxy on the simulated cluster: the real
//! EndpointSlice controller writes topology hints from the Nodes' zone labels (node `i`
//! is in zone `a`, `b`, `c` in turn), and traffic from the client namespace entering a
//! node reaches only the endpoints its hints allow, or every endpoint when none matches.
//! Needs root and the running local cluster with its node agents (`make test`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use berth_e2e::env::NodeInfo;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, exec_in, wait_for};
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

fn agents(env: &TestEnv) -> Diagnostics {
    Diagnostics::new(env).node_agents(&env.info)
}

/// `replicas` HTTP pods (answering with their name on 8080) pinned to `node`, labelled
/// `app=web` and `part=<name>`.
async fn deploy_on(env: &TestEnv, ns: &str, name: &str, node: &NodeInfo, replicas: i32) {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": {"app": "web", "part": name}},
                 "template": {"metadata": {"labels": {"app": "web", "part": name}},
                              "spec": {"nodeSelector": {"kubernetes.io/hostname": node.plan.name},
                                       "containers": [{"name": "echo", "image": "berth/echo",
                                                       "ports": [{"containerPort": 8080}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap_or_else(|e| panic!("create deployment {name}: {e}"));
}

/// Names of the running pods labelled `part=<part>`, once there are `n`.
async fn running(env: &TestEnv, ns: &str, part: &str, n: usize) -> BTreeSet<String> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("part={part}"));
    let names = async || -> BTreeSet<String> {
        api.list(&lp)
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|p| {
                        let st = p.status.as_ref();
                        st.and_then(|s| s.phase.as_deref()) == Some("Running")
                            && st.and_then(|s| s.pod_ip.as_deref()).is_some()
                    })
                    .filter_map(|p| p.metadata.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_true(
        &format!("{n} running pods of {part}"),
        Duration::from_secs(90),
        &agents(env),
        async || names().await.len() == n,
    )
    .await;
    names().await
}

/// Waits until the Service's slices list `n` ready endpoints, each hinted for its own
/// zone (and node, with `nodes`): the controller has applied the trafficDistribution.
async fn wait_hints(env: &TestEnv, ns: &str, svc: &str, n: usize, nodes: bool) {
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    wait_true(
        &format!("{n} hinted endpoints of {svc}"),
        Duration::from_secs(60),
        &agents(env),
        async || {
            let Ok(l) = slices.list(&lp).await else {
                return false;
            };
            let eps: Vec<_> = l
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .collect();
            eps.len() == n
                && eps.iter().all(|e| {
                    let h = e.hints.as_ref();
                    let zoned = h
                        .and_then(|h| h.for_zones.as_ref())
                        .is_some_and(|z| z.iter().any(|z| Some(&z.name) == e.zone.as_ref()));
                    let noded = h
                        .and_then(|h| h.for_nodes.as_ref())
                        .is_some_and(|f| f.iter().any(|f| Some(&f.name) == e.node_name.as_ref()));
                    zoned && (!nodes || noded)
                })
        },
    )
    .await;
}

fn node_port(svc: &Service) -> i32 {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.node_port)
        .expect("nodePort")
}

/// `n` requests from the client namespace, each on a new connection: how often each
/// answer ("OK <pod>" or "FAIL <curl exit code>") came.
fn requests(netns: &str, url: &str, n: usize) -> BTreeMap<String, usize> {
    let script = format!(
        "for i in $(seq {n}); do b=$(curl -s --fail --max-time 2 --noproxy '*' '{url}'); \
         rc=$?; if [ $rc = 0 ]; then echo \"OK $b\"; else echo \"FAIL $rc\"; fi; done"
    );
    let out = exec_in(netns, &["sh", "-c", &script]).expect("request loop");
    let mut t = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        *t.entry(l.trim().to_string()).or_default() += 1;
    }
    t
}

/// Waits until 40 requests through `node`'s NodePort are answered by exactly `expected`
/// (every one of them, and no other pod).
async fn wait_served_by(env: &TestEnv, node: &NodeInfo, np: i32, expected: &BTreeSet<String>) {
    let url = format!("http://{}:{np}/", node.plan.ip);
    let want: BTreeSet<String> = expected.iter().map(|p| format!("OK {p}")).collect();
    let mut last = BTreeMap::new();
    let what = format!("{url} (zone {}) served by {expected:?}", node.plan.zone);
    let ok = wait_for(&what, Duration::from_secs(30), || {
        last = requests(&env.info.client_netns, &url, 40);
        let good = last.keys().cloned().collect::<BTreeSet<_>>() == want;
        async move { good }
    })
    .await;
    if let Err(e) = ok {
        panic!("{e}; last answers: {last:?}");
    }
}

struct Cluster {
    env: TestEnv,
    ns: TestNamespace,
    a: BTreeSet<String>,
    b: BTreeSet<String>,
}

/// Two pods on node 1 (zone a) and two on node 2 (zone b); node 3 (zone c) has none.
async fn two_zones(prefix: &str) -> Cluster {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace(prefix).await;
    assert!(env.info.nodes.len() >= 3, "needs three nodes");
    let zones: BTreeSet<&str> = env.info.nodes[..3]
        .iter()
        .map(|n| n.plan.zone.as_str())
        .collect();
    assert_eq!(zones.len(), 3, "nodes 1-3 in three zones");
    deploy_on(&env, &ns.name, "a", &env.info.nodes[0], 2).await;
    deploy_on(&env, &ns.name, "b", &env.info.nodes[1], 2).await;
    let a = running(&env, &ns.name, "a", 2).await;
    let b = running(&env, &ns.name, "b", 2).await;
    Cluster { env, ns, a, b }
}

async fn service(c: &Cluster, name: &str, distribution: &str) -> i32 {
    let svc = ServiceBuilder::new(name)
        .app("web")
        .type_("NodePort")
        .set("trafficDistribution", distribution)
        .tcp(80, 8080)
        .create(&c.env, &c.ns.name)
        .await;
    node_port(&svc)
}

/// `trafficDistribution: PreferSameZone`: a node in zone a sends the traffic entering it
/// only to zone-a endpoints, one in zone b only to zone-b ones, and one in a zone without
/// endpoints to all of them.
#[tokio::test]
async fn prefer_same_zone_keeps_traffic_in_the_entry_nodes_zone_and_falls_back_without_one() {
    let c = two_zones("np-topo-zone").await;
    let np = service(&c, "zonal", "PreferSameZone").await;
    wait_hints(&c.env, &c.ns.name, "zonal", 4, false).await;
    let nodes = &c.env.info.nodes;
    wait_served_by(&c.env, &nodes[0], np, &c.a).await;
    wait_served_by(&c.env, &nodes[1], np, &c.b).await;
    let all: BTreeSet<String> = c.a.union(&c.b).cloned().collect();
    wait_served_by(&c.env, &nodes[2], np, &all).await;
}

/// `trafficDistribution: PreferSameNode`: traffic entering a node with endpoints stays on
/// it; a node with none (and no endpoint in its zone) uses all of them.
#[tokio::test]
async fn prefer_same_node_keeps_traffic_on_the_entry_node_and_falls_back_without_one() {
    let c = two_zones("np-topo-node").await;
    let np = service(&c, "local", "PreferSameNode").await;
    wait_hints(&c.env, &c.ns.name, "local", 4, true).await;
    let nodes = &c.env.info.nodes;
    wait_served_by(&c.env, &nodes[0], np, &c.a).await;
    wait_served_by(&c.env, &nodes[1], np, &c.b).await;
    let all: BTreeSet<String> = c.a.union(&c.b).cloned().collect();
    wait_served_by(&c.env, &nodes[2], np, &all).await;
}
