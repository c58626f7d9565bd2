//! The node agents' per-Service budget on the simulated cluster: a Service with 1,000
//! ports and 500 endpoints (500,000 backends on every node) is skipped with a Warning
//! Event and a metric, the agents stay below the chart's memory limit, and a Service
//! created afterwards is programmed. Serial: it loads every agent at once. Needs root and
//! the running local cluster with its node agents (`make test`).

use std::time::Duration;

use berth_e2e::nodeagent::{self, METRICS_PORT};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::TestEnv;
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

/// The chart's memory limit of the agent (`nodeproxy.resources.limits.memory`).
const AGENT_LIMIT_KIB: u64 = 512 * 1024;
const PORTS: usize = 1000;
const ENDPOINTS: usize = 500;
/// An EndpointSlice holds at most 100 ports.
const PORTS_PER_SLICE: usize = 100;

/// HTTP GET from inside `netns`: the trimmed body (the answering pod's name).
fn get(netns: &str, url: &str, timeout: Duration) -> Result<String, String> {
    berth_e2e::testing::curl_in(netns, url, timeout)
        .map(|b| b.trim().to_string())
        .map_err(|e| e.to_string())
}

fn dump(env: &TestEnv) -> Diagnostics {
    Diagnostics::new(env).node_agents(&env.info)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("VmRSS of agent {pid}"))
}

/// Endpoint addresses in the pod range no node uses (nothing is sent to them).
fn endpoint_ip(i: usize) -> String {
    format!("10.244.{}.{}", 200 + i / 250, 1 + i % 250)
}

async fn create_huge(env: &TestEnv, ns: &str) {
    let ports: Vec<serde_json::Value> = (0..PORTS)
        .map(|p| json!({"name": format!("p{p}"), "port": 10000 + p, "targetPort": 10000 + p}))
        .collect();
    ServiceBuilder::new("huge")
        .set("ports", serde_json::Value::Array(ports))
        .create(env, ns)
        .await;
    let endpoints: Vec<serde_json::Value> = (0..ENDPOINTS)
        .map(|i| json!({"addresses": [endpoint_ip(i)], "conditions": {"ready": true}}))
        .collect();
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), ns);
    for chunk in 0..PORTS / PORTS_PER_SLICE {
        let ports: Vec<serde_json::Value> = (chunk * PORTS_PER_SLICE
            ..(chunk + 1) * PORTS_PER_SLICE)
            .map(|p| json!({"name": format!("p{p}"), "port": 10000 + p, "protocol": "TCP"}))
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("huge-{chunk}"),
                         "labels": {"kubernetes.io/service-name": "huge"}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        }))
        .expect("slice object");
        slices
            .create(&PostParams::default(), &slice)
            .await
            .unwrap_or_else(|e| panic!("create slice {chunk}: {e}"));
    }
}

async fn pod_name(env: &TestEnv, ns: &str, app: &str) -> String {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let mut name = String::new();
    wait_true(
        "a running pod",
        Duration::from_secs(90),
        &dump(env),
        async || {
            let Ok(l) = api.list(&lp).await else {
                return false;
            };
            match l
                .items
                .iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            {
                Some(p) => {
                    name = p.metadata.name.clone().unwrap_or_default();
                    true
                }
                None => false,
            }
        },
    )
    .await;
    name
}

#[tokio::test]
async fn a_service_over_the_budget_is_skipped_and_the_rest_keeps_programming() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("budget").await;
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "small"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "small"}},
                 "template": {"metadata": {"labels": {"app": "small"}},
                              "spec": {"containers": [{"name": "echo", "image": "berth/echo",
                                                       "ports": [{"containerPort": 8080}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &d)
        .await
        .expect("create deployment");
    let pod = pod_name(&env, &ns.name, "small").await;
    create_huge(&env, &ns.name).await;
    wait_true(
        "Warning OverBudget on huge",
        Duration::from_secs(60),
        &dump(&env).events(&ns.name, "huge"),
        async || {
            env.events(&ns.name, "huge")
                .await
                .iter()
                .any(|(t, r, _)| t == "Warning" && r == "OverBudget")
        },
    )
    .await;
    // Created after the huge one: programmed on every node.
    let small: Service = ServiceBuilder::new("small")
        .app("small")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let vip = small
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("clusterIP");
    let url = format!("http://{vip}/");
    for n in &env.info.nodes {
        let netns = n.plan.netns.clone();
        wait_true(
            &format!("{url} from {netns}"),
            Duration::from_secs(30),
            &dump(&env),
            async || get(&netns, &url, Duration::from_secs(2)).is_ok_and(|b| b == pod),
        )
        .await;
        // Each agent reads Services and EndpointSlices on separate watches, so it may
        // program `small` before it has all of huge's slices: wait for its verdict.
        let metrics_url = format!("http://{}:{METRICS_PORT}/metrics", n.plan.ip);
        wait_true(
            &format!("{} counting huge as over budget", n.plan.name),
            Duration::from_secs(60),
            &dump(&env),
            async || {
                get(&env.info.client_netns, &metrics_url, Duration::from_secs(2)).is_ok_and(|m| {
                    m.contains("berth_nodeproxy_refused_claims{reason=\"over_budget\"} 1")
                })
            },
        )
        .await;
        let pid = nodeagent::agent_pid(&n.plan.name).expect("agent pid");
        let rss = rss_kib(pid);
        assert!(
            rss < AGENT_LIMIT_KIB,
            "agent on {} uses {rss} KiB",
            n.plan.name
        );
    }
}
