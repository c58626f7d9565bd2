//! The node agent's incremental data path on the local cluster: an endpoint change goes to
//! the kernel as a netlink element batch (the agent's transaction counter by path moves
//! for `netlink`, not for `nft`, so no `nft` process ran and berth's own batch was not
//! taken for foreign drift, which would have forced a full `nft -f` sync), traffic reaches
//! the new endpoint, and the stale UDP conntrack entry to the removed endpoint is deleted
//! over the conntrack netlink socket so a flow with a fixed source port moves over.
//! Serial: another suite's Services could make nft transactions meanwhile.

use std::time::Duration;

use berth_e2e::env::NodeInfo;
use berth_e2e::nodeagent;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, exec_in, wait_for};
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;

/// Running pods of `app` (names), once there are exactly `n` and none is terminating.
async fn running(env: &TestEnv, ns: &str, app: &str, n: usize) -> Vec<String> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let names = async || -> Option<Vec<String>> {
        let l = api.list(&lp).await.ok()?;
        let ok = l.items.iter().all(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        });
        (ok && l.items.len() == n).then(|| {
            l.items
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect()
        })
    };
    wait_true(
        &format!("{n} running pods of {app}"),
        Duration::from_secs(90),
        &Diagnostics::new(env).node_agents(&env.info),
        async || names().await.is_some(),
    )
    .await;
    names().await.unwrap_or_default()
}

/// A counter or gauge of the agent of `node`, by its full series name.
fn metric(env: &TestEnv, node: &NodeInfo, series: &str) -> f64 {
    let url = format!(
        "http://{}:{}/metrics",
        node.plan.ip,
        nodeagent::METRICS_PORT
    );
    let body = curl_in(&env.info.client_netns, &url, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("metrics of {}: {e}", node.plan.name));
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing on {}", node.plan.name))
}

const NETLINK: &str = "berth_nodeproxy_kernel_transactions_total{path=\"netlink\"}";
const NFT: &str = "berth_nodeproxy_kernel_transactions_total{path=\"nft\"}";
const CONNTRACK: &str = "berth_nodeproxy_conntrack_deleted_total";

/// One datagram "ping" from a fixed source port; the answer, if any.
fn udp_from_port(netns: &str, target: &str, sport: u16) -> Option<String> {
    let cmd = format!("printf ping | socat -T 1 - UDP:{target},sourceport={sport},reuseaddr");
    let out = exec_in(netns, &["sh", "-c", &cmd]).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[tokio::test]
async fn endpoint_changes_go_over_netlink_and_stale_udp_flows_are_deleted_there() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("np-netlink").await;
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}},
                 "template": {"metadata": {"labels": {"app": "echo"}},
                              "spec": {"containers": [{"name": "echo", "image": "berth/echo",
                                  "ports": [{"containerPort": 8080},
                                            {"containerPort": 5353, "protocol": "UDP"}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &d)
        .await
        .expect("create deployment");
    let svc = ServiceBuilder::new("echo")
        .app("echo")
        .named_port("http", "TCP", 80, Some(8080))
        .named_port("dns", "UDP", 53, Some(5353))
        .create(&env, &ns.name)
        .await;
    let ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("clusterIP");
    let old = running(&env, &ns.name, "echo", 1).await.remove(0);
    let node = &env.info.nodes[0];
    let netns = node.plan.netns.clone();
    let (udp, http) = (format!("{ip}:53"), format!("http://{ip}/"));
    let send = || udp_from_port(&netns, &udp, 40054);
    wait_for(
        "UDP answer from the first pod",
        Duration::from_secs(30),
        || async { send().is_some_and(|r| r.starts_with(&old)) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", send()));
    let (batches, nft_runs, deleted) = (
        metric(&env, node, NETLINK),
        metric(&env, node, NFT),
        metric(&env, node, CONNTRACK),
    );

    Api::<Pod>::namespaced(env.client.clone(), &ns.name)
        .delete(&old, &DeleteParams::default())
        .await
        .expect("delete pod");
    // The flow stays alive meanwhile, as a real client's would: its conntrack entry to
    // the dead pod never expires unless the agent deletes it.
    let mut answers = Vec::new();
    let moved = wait_for(
        "UDP answer from the new pod",
        Duration::from_secs(45),
        || {
            let r = send();
            let ok = r
                .as_ref()
                .is_some_and(|r| !r.starts_with(&old) && r.ends_with("ping"));
            answers.push(r);
            async move { ok }
        },
    )
    .await;
    if let Err(e) = moved {
        panic!("{e}; answers: {answers:?}");
    }
    let new = running(&env, &ns.name, "echo", 1).await.remove(0);
    wait_for(
        "HTTP answer from the new pod",
        Duration::from_secs(20),
        || async {
            curl_in(&netns, &http, Duration::from_secs(2)).is_ok_and(|b| b.starts_with(&new))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let now = (
        metric(&env, node, NETLINK),
        metric(&env, node, NFT),
        metric(&env, node, CONNTRACK),
    );
    assert!(
        now.0 > batches,
        "no netlink batch for the endpoint change ({batches} -> {})",
        now.0
    );
    assert_eq!(
        now.1, nft_runs,
        "nft ran for an incremental change (or a full sync followed drift)"
    );
    assert!(
        now.2 > deleted,
        "no conntrack entry deleted over netlink ({deleted} -> {})",
        now.2
    );
}
