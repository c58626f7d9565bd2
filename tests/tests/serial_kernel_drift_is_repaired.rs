//! Kernel drift: another tool deletes berth's table on one node (`nft delete table ip
//! berth`), with no API change afterwards. Traffic through that node is back within 5 s
//! and its `/healthz` answered 503 while the table was gone. Serial: the node drops
//! Service traffic meanwhile. Needs root and the running local cluster with its node
//! agents (`make test`).

use std::time::{Duration, Instant};

use berth_e2e::agentstate::{healthz, log_lines, sh_in};
use berth_e2e::net::NodePlan;
use berth_e2e::nodeagent::METRICS_PORT;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;

/// The bound issue 11 sets for the repair.
const REPAIR: Duration = Duration::from_secs(5);

async fn node_port(env: &TestEnv, ns: &str, name: &str) -> i32 {
    let svc = Api::<Service>::namespaced(env.client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("get {name}: {e}"));
    svc.spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().and_then(|p| p.node_port))
        .expect("nodePort")
}

/// The agent's count of drift repairs in a metrics page.
fn drift_repairs(metrics: &str, node: &NodePlan) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("berth_nodeproxy_drift_repairs_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drift repair count on {}: {metrics}", node.name))
}

#[tokio::test]
async fn deleting_berths_table_on_a_node_is_repaired_within_5s_and_healthz_is_503_meanwhile() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("drift").await;
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    ServiceBuilder::new("nginx")
        .type_("NodePort")
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    let port = node_port(&env, &ns.name, "nginx").await;
    let node = &env.info.nodes[0].plan;
    let url = format!("http://{}:{port}/", node.ip);
    let dump = Diagnostics::new(&env).node_agents(&env.info);
    let nginx = || -> Result<(), String> {
        match curl_in(&env.info.client_netns, &url, Duration::from_millis(500)) {
            Ok(b) if b.contains("Welcome to nginx!") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    };
    wait_until(
        "nginx through the node",
        Duration::from_secs(60),
        &dump,
        async || nginx(),
    )
    .await;
    let restored_before = log_lines(&env.info, &node.name, "changed by another process");

    // Delete the table and ask healthz at once, from inside the node; the agent's
    // metrics right before and right after.
    let metrics = format!(
        "curl -s --max-time 2 http://{}:{METRICS_PORT}/metrics",
        node.ip
    );
    let (ok, before) = sh_in(&node.netns, &metrics);
    assert!(ok, "metrics of {}: {before}", node.name);
    let repairs_before = drift_repairs(&before, node);
    let deleted = Instant::now();
    let (ok, out) = sh_in(
        &node.netns,
        &format!(
            "nft delete table ip berth && \
             curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 2 \
             http://127.0.0.1:10256/healthz && {metrics}"
        ),
    );
    assert!(ok, "nft delete table / healthz / metrics: {out}");
    let (first, after) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    let mut statuses = vec![first.trim().to_string()];
    let mut back = None;
    while deleted.elapsed() < REPAIR * 3 {
        statuses.push(healthz(node).0.to_string());
        if back.is_none() && nginx().is_ok() {
            back = Some(deleted.elapsed());
        }
        if back.is_some() && statuses.last().map(String::as_str) == Some("200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = back.unwrap_or_else(|| panic!("traffic never came back; healthz {statuses:?}"));
    assert!(
        back <= REPAIR,
        "traffic through {} back only after {back:.1?}",
        node.name
    );
    // 503 until the repair commits; the agent also checks after each of its own
    // commits, so a repair can land (tens of ms) before the first answer: then the
    // repair must already be counted.
    let first = statuses.first().map(String::as_str);
    let repaired_first = first == Some("200") && drift_repairs(after, node) > repairs_before;
    assert!(
        first == Some("503") || repaired_first,
        "healthz right after the deletion, before any repair; all answers {statuses:?}"
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("200"),
        "healthz after the repair; all answers {statuses:?}"
    );
    let (listed, table) = sh_in(&node.netns, "nft list table ip berth | head -3");
    assert!(listed, "table restored: {table}");
    assert!(
        log_lines(&env.info, &node.name, "changed by another process") > restored_before,
        "the agent logs the repair"
    );
}
