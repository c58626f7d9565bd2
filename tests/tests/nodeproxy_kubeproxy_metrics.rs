//! berth-nodeproxy serves kube-proxy's metric names beside its own, so dashboards and
//! alerts written for kube-proxy keep working: scraped from an agent's `/metrics` from
//! the client namespace, they exist and move when a Service and its endpoints change.
//! Needs root and the running local cluster with its node agents (`make test`).

use std::collections::BTreeMap;
use std::time::Duration;

use berth_e2e::env::NodeInfo;
use berth_e2e::nodeagent;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// Every unlabelled sample of the agent's exposition (`name value`), plus the sum over
/// labels of each labelled one, by name.
fn scrape(env: &TestEnv, node: &NodeInfo) -> Result<BTreeMap<String, f64>, String> {
    let url = format!(
        "http://{}:{}/metrics",
        node.plan.ip,
        nodeagent::METRICS_PORT
    );
    let text =
        curl_in(&env.info.client_netns, &url, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).to_string();
        if series.contains("_bucket{") {
            continue;
        }
        *out.entry(name).or_default() += v;
    }
    Ok(out)
}

const SERVED: &[&str] = &[
    "kubeproxy_sync_proxy_rules_duration_seconds_count",
    "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
    "kubeproxy_network_programming_duration_seconds_count",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
];

/// The kube-proxy names exist on every agent and, after a Service and a pod behind it are
/// created, the change counters, the sync histograms, the programming latency and both
/// timestamps have moved on the node the pod runs on.
#[tokio::test]
async fn kube_proxy_metric_names_are_served_and_follow_changes() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("np-kpmetrics").await;
    let diag = Diagnostics::new(&env).node_agents(&env.info);
    let node = &env.info.nodes[0];
    let mut before = BTreeMap::new();
    for n in &env.info.nodes {
        let m = scrape(&env, n).unwrap_or_else(|e| panic!("scrape {}: {e}", n.plan.name));
        for name in SERVED {
            assert!(m.contains_key(*name), "{name} missing on {}", n.plan.name);
        }
        assert!(
            m["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > 1.0e9,
            "an agent that synced has a sync timestamp"
        );
        if n.plan.name == node.plan.name {
            before = m;
        }
    }
    ServiceBuilder::new("web")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"nodeSelector": {"kubernetes.io/hostname": node.plan.name},
                                       "containers": [{"name": "echo", "image": "berth/echo",
                                                       "ports": [{"containerPort": 8080}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &d)
        .await
        .expect("create deployment");
    let moved = [
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    ];
    wait_until(
        "kube-proxy metrics moving after a Service and endpoint change",
        Duration::from_secs(60),
        &diag,
        async || {
            let now = scrape(&env, node)?;
            let still: Vec<_> = moved
                .iter()
                .filter(|n| now.get(**n).unwrap_or(&0.0) <= before.get(**n).unwrap_or(&0.0))
                .collect();
            if still.is_empty() {
                Ok(())
            } else {
                Err(format!("not moved yet: {still:?}"))
            }
        },
    )
    .await;
    let now = scrape(&env, node).expect("scrape");
    assert_eq!(
        now["kubeproxy_sync_proxy_rules_nftables_sync_failures_total"],
        before["kubeproxy_sync_proxy_rules_nftables_sync_failures_total"],
        "no sync failed meanwhile"
    );
}
