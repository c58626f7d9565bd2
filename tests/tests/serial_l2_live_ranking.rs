//! L2 ranking counts only nodes whose agent is alive. Each address prefers its nodes in
//! a fixed order (sha256 of `<address>/<node>`, lowest first); a node ranked n-th waits
//! n steps (a third of the Lease each) before taking a free address. When the agent of
//! an address's best-ranked node is dead (killed) or stopped, the next node must not wait
//! for it: the address is on its interface within 1 s of the Service's status naming it.
//!
//! Serial: it stops agents, and the 1 s bound is measured without other suites' load.
//! No controller runs: the case writes the Service's owner annotation and status itself
//! (as the pool allocator would), so the measurement starts at that write. Addresses from
//! 198.19.41.0/24, used by no other suite.

use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::l2::lease_holder;
use berth_e2e::nodeagent::{self, HoldAgent, L2_LEASE_SECONDS};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::TestEnv;
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use sha2::{Digest, Sha256};

const POOL: &str = "198.19.41.0/24";
/// The bound the issue sets for announcing after allocation with a dead best node.
const BOUND: Duration = Duration::from_secs(1);

fn lease() -> Duration {
    Duration::from_secs(L2_LEASE_SECONDS)
}

/// `nodes` in the order the agents rank them for `addr` (the agent's own rule, restated;
/// the agent's unit tests check the two agree).
fn ranking(addr: &str, nodes: &[String]) -> Vec<String> {
    let mut order = nodes.to_vec();
    order.sort_by_key(|n| {
        let digest = Sha256::digest(format!("{addr}/{n}").as_bytes());
        (digest[..8].to_vec(), n.clone())
    });
    order
}

/// Stops the agent of `addr`'s best-ranked node with `signal`, gives the others time to
/// see it dead, then writes `addr` into a new Service's status and measures until some
/// node carries it: the next-ranked node, within [`BOUND`].
async fn announced_without_waiting_for_the_dead(
    env: &TestEnv,
    ns: &str,
    class: &str,
    addr: &str,
    signal: i32,
    what: &str,
) {
    let names: Vec<String> = env.info.nodes.iter().map(|n| n.plan.name.clone()).collect();
    let order = ranking(addr, &names);
    let (dead, next) = (&order[0], &order[1]);
    let dump = Diagnostics::new(env).node_agents(&env.info);
    let down = HoldAgent::stop(dead, signal);
    // Dead by observation: one lease duration without a heartbeat; twice, to be sure
    // every other agent has seen it so.
    tokio::time::sleep(lease() * 2).await;
    let name = format!("svc-{}", addr.replace('.', "-"));
    ServiceBuilder::load_balancer(&name)
        .owner_class(class)
        .app("nothing")
        .tcp(80, 80)
        .create(env, ns)
        .await;
    let api: Api<Service> = Api::namespaced(env.client.clone(), ns);
    let written = Instant::now();
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"loadBalancer": {"ingress": [{"ip": addr, "ipMode": "VIP"}]}}}),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("set the status of {name}: {e}"));
    let on = loop {
        let on = env.nodes_with_address(addr);
        if !on.is_empty() || written.elapsed() > lease() * 4 {
            break on;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = written.elapsed();
    eprintln!(
        "{what}: {addr} (ranked {order:?}, {dead} down) on {on:?} {} ms after the status write",
        took.as_millis()
    );
    assert_eq!(
        on,
        vec![next.clone()],
        "{what}: the best live node announces"
    );
    assert!(
        took < BOUND,
        "{what}: {addr} announced {} ms after allocation; {next} waited for dead {dead}\n{}",
        took.as_millis(),
        dump.report().await
    );
    assert_eq!(
        lease_holder(env, addr).await.as_deref(),
        Some(next.as_str())
    );
    api.delete(&name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    wait_until(
        &format!("{addr} withdrawn"),
        lease() * 4,
        &dump,
        async || {
            let on = env.nodes_with_address(addr);
            if on.is_empty() {
                Ok(())
            } else {
                Err(format!("{addr} on {on:?}"))
            }
        },
    )
    .await;
    drop(down);
    let plan = &env
        .info
        .nodes
        .iter()
        .find(|n| &n.plan.name == dead)
        .expect("node")
        .plan;
    nodeagent::wait_healthy(plan, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A killed agent (no release: its heartbeat just stops) and a stopped one (SIGTERM: it
/// releases its heartbeat) on the best-ranked node of an address: the next node takes
/// the address at once.
#[tokio::test]
async fn a_dead_best_ranked_node_does_not_delay_the_announcement() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-live-rank").await;
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-lan", ns.name),
        json!({"pool": {"addresses": [POOL]}}),
    );
    announced_without_waiting_for_the_dead(
        &env,
        &ns.name,
        &class.name,
        "198.19.41.10",
        libc::SIGKILL,
        "best node's agent killed",
    )
    .await;
    announced_without_waiting_for_the_dead(
        &env,
        &ns.name,
        &class.name,
        "198.19.41.11",
        libc::SIGTERM,
        "best node's agent stopped",
    )
    .await;
}
