//! `helm uninstall` leaves nothing of berth but the CRDs: after a release with the
//! controller (two replicas, leader election), the node agents announcing a pool address
//! (L2 Leases) and a default class (so the default-class admission policy, cluster-wide:
//! no other suite runs meanwhile) is uninstalled, no object of any
//! listable kind, namespaced or cluster-scoped, belongs to it: no leader Lease, no L2
//! Lease, no workload, RBAC, admission policy, class or namespace. Runs on nodes without
//! harness agents (`BERTH_E2E_NODEPROXY=0`); needs root.

use std::time::Duration;

use berth_e2e::helm::{Release, bare_node_agent_values, objects_left, write_values};
use berth_e2e::testing::{TestEnv, wait_for};

/// Addresses of this suite only.
const POOL: &str = "198.19.42.0/28";

#[tokio::test]
async fn helm_uninstall_leaves_only_the_crds() {
    let env = TestEnv::connect().await;
    let agents = bare_node_agent_values(&env);
    let system = env.namespace("unin-system").await;
    let web = env.namespace("unin-web").await;
    let id = format!("{:08x}", rand::random::<u32>());
    let class = format!("unin-{id}");
    let values = write_values(&format!(
        "controller:\n  replicas: 2\n  extraArgs: [\"--class={class}\"]\n{agents}\
         loadBalancerClasses:\n  - name: {class}\n    default: true\n    \
         pool: {{addresses: [\"{POOL}\"], autoAssign: true, l2: true}}\n"
    ));
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));

    // Everything uninstall must remove exists first: the leader Lease, an address's
    // Lease held by the announcing node, the admission policy.
    env.apply_example(&web.name, "seed/nginx-deployment.yaml");
    env.kubectl(&[
        "create",
        "service",
        "loadbalancer",
        "web",
        "--tcp=80:80",
        "-n",
        &web.name,
    ]);
    let ip = || {
        env.kubectl(&[
            "get",
            "service",
            "web",
            "-n",
            &web.name,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
    };
    wait_for("a pool address in status", Duration::from_secs(60), || {
        let ip = ip();
        async move { !ip.is_empty() }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            env.kubectl(&["describe", "service", "-n", &web.name])
        )
    });
    let ip = ip();
    wait_for("the address announced", Duration::from_secs(60), || {
        let on = env.nodes_with_address(&ip);
        async move { on.len() == 1 }
    })
    .await
    .expect("one node announces the address");
    let leases = env.kubectl(&["get", "leases", "-A", "-o", "name"]);
    assert!(
        leases.contains(&format!("berth-l2-{}", ip.replace('.', "-"))),
        "no L2 Lease: {leases}"
    );
    let leader = env.kubectl(&["get", "leases", "-n", &system.name, "-o", "name"]);
    assert!(
        leader.contains("berth-controller"),
        "no leader Lease: {leader}"
    );
    let before = objects_left(&env, &release);
    for kind in [
        "MutatingAdmissionPolicy/",
        "Namespace/",
        "DaemonSet/",
        "LoadBalancerClass/",
    ] {
        assert!(
            before.iter().any(|o| o.starts_with(kind)),
            "no {kind} in {before:?}"
        );
    }

    // LoadBalancer Services go first, while the controller runs (README).
    env.kubectl(&[
        "delete",
        "service",
        "web",
        "-n",
        &web.name,
        "--wait",
        "--timeout=60s",
    ]);
    release.uninstall();
    // Pods and namespaces terminate after helm returns.
    let left = || objects_left(&env, &release);
    wait_for(
        "nothing of the release left",
        Duration::from_secs(90),
        || {
            let left = left();
            async move { left.is_empty() }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", left()));
    let crds = env.kubectl(&["get", "crd", "-o", "name"]);
    assert!(
        crds.contains("loadbalancerclasses.berth.dev"),
        "the CRDs stay: {crds}"
    );
    assert!(
        env.nodes_with_address(&ip).is_empty(),
        "{ip} still announced"
    );
    let _ = std::fs::remove_file(values);
}
