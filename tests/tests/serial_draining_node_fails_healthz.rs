//! Draining nodes (KEP-3836): a Node given the cluster autoscaler's
//! `ToBeDeletedByClusterAutoscaler` taint makes its agent's `/healthz` answer 503 (so
//! load balancers move traffic away first) within one sync, and 200 again once the
//! taint is removed. The taint's effect here is `PreferNoSchedule` (the agent reads only
//! the key) so that no other pod is kept off the node meanwhile. Serial: other suites
//! wait for every agent to be healthy. Needs root and the running local cluster with
//! its node agents (`make test`).

use std::process::Command;
use std::time::Duration;

use berth_e2e::agentstate::healthz;
use berth_e2e::paths;
use berth_e2e::testing::TestEnv;
use berth_e2e::wait::{Diagnostics, wait_until};

const TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The taint on one node, removed on drop (also when the case fails).
struct Tainted {
    node: String,
    kubeconfig: String,
}

impl Tainted {
    fn add(env: &TestEnv, node: &str) -> Self {
        env.kubectl(&[
            "taint",
            "nodes",
            node,
            &format!("{TAINT}=1700000000:PreferNoSchedule"),
        ]);
        Self {
            node: node.to_string(),
            kubeconfig: env.info.kubeconfig.display().to_string(),
        }
    }
}

impl Drop for Tainted {
    fn drop(&mut self) {
        let _ = Command::new(paths::bin("kubectl"))
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "taint",
                "nodes",
                &self.node,
            ])
            .arg(format!("{TAINT}-"))
            .output();
    }
}

#[tokio::test]
async fn autoscaler_taint_makes_healthz_503_and_its_removal_200_again() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let node = &env.info.nodes[1].plan;
    let others: Vec<_> = env
        .info
        .nodes
        .iter()
        .filter(|n| n.plan.name != node.name)
        .collect();
    let dump = Diagnostics::new(&env).node_agents(&env.info);
    // Generous bound for "within one sync" (the Node watch delivers at once).
    let bound = Duration::from_secs(10);
    let taint = Tainted::add(&env, &node.name);
    let body = wait_until(
        "healthz 503 on the tainted node",
        bound,
        &dump,
        async || match healthz(node) {
            (503, body) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(body.contains(TAINT), "healthz says why: {body}");
    for n in &others {
        assert_eq!(healthz(&n.plan).0, 200, "{} is not draining", n.plan.name);
    }
    drop(taint);
    wait_until(
        "healthz 200 once the taint is gone",
        bound,
        &dump,
        async || match healthz(node) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}
