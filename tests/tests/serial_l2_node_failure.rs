//! Node failure and planned moves of an announced pool address.
//! - A whole node fails: its link to the node network is cut, so its agent reaches
//!   neither the apiserver nor the other agents. The other agents' peer probes find it
//!   silent (each of them, so each is the other's witness), and the next node takes the
//!   address's Lease at once instead of after the Lease runs out; the client's requests
//!   resume through it. The gap the client saw is printed. With the link back, the old
//!   holder does not announce the address again.
//! - The announcing node is cordoned and drained: it hands the address over first (make
//!   before break): at every moment some node carries the address, and no request fails.
//!   The same when the cluster autoscaler taints it `ToBeDeletedByClusterAutoscaler`.
//!
//! Serial: it cuts a node off the network. Addresses 198.19.42.0/24, used by no other
//! suite. No controller runs: the case writes the Service's owner annotation and status
//! itself, as the pool allocator would.

use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::l2::{LinkDown, client_neighbour, lease_holder, mac_of, nginx_on, set_ingress};
use berth_e2e::net::NodePlan;
use berth_e2e::nodeagent::{self, L2_LEASE_NAMESPACE, L2_LEASE_SECONDS, PEER_PROBE_PORT};
use berth_e2e::requests::{RequestLoop, gap, resumed};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{Cordon, TestEnv, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;

const POOL: &str = "198.19.42.0/24";
const ADDRESS: &str = "198.19.42.10";
const DRAINED_ADDRESS: &str = "198.19.42.20";
const SCALED_DOWN_ADDRESS: &str = "198.19.42.30";

fn lease() -> Duration {
    Duration::from_secs(L2_LEASE_SECONDS)
}

/// How long a wait may take before the case fails (never a measurement).
fn settle() -> Duration {
    lease() * 4 + Duration::from_secs(30)
}

fn plan<'a>(env: &'a TestEnv, name: &str) -> &'a NodePlan {
    &env.info
        .nodes
        .iter()
        .find(|n| n.plan.name == name)
        .unwrap_or_else(|| panic!("node {name}"))
        .plan
}

/// `name`'s value of a metric without labels, from its agent's `/metrics`.
fn metric(env: &TestEnv, node: &str, name: &str) -> Option<f64> {
    let url = format!(
        "http://{}:{}/metrics",
        plan(env, node).ip,
        nodeagent::METRICS_PORT
    );
    let text = curl_in(&env.info.client_netns, &url, Duration::from_secs(3)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A node other than `not` holds `ip`'s Lease and carries it; with `alone`, no other
/// node carries it.
async fn holder_with_address(
    env: &TestEnv,
    dump: &Diagnostics,
    ip: &str,
    not: Option<&str>,
    alone: bool,
    what: &str,
) -> String {
    wait_until(what, settle(), dump, async || {
        let holder = lease_holder(env, ip).await;
        let on = env.nodes_with_address(ip);
        match holder {
            Some(h) if Some(h.as_str()) != not && on.contains(&h) && (!alone || on.len() == 1) => {
                Ok(h)
            }
            _ => Err(format!("Lease holder {holder:?}, {ip} on {on:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_nodes_address_moves_before_its_lease_runs_out() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-node-failure").await;
    let dump = Diagnostics::new(&env).node_agents(&env.info);

    // Every agent says on its heartbeat Lease where it listens for probes.
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), L2_LEASE_NAMESPACE);
    for n in &env.info.nodes {
        let want = format!("{}:{PEER_PROBE_PORT}", n.plan.ip);
        let name = format!("berth-agent-{}", n.plan.name);
        wait_until(
            &format!("{name} advertises {want}"),
            settle(),
            &dump,
            async || {
                let l = leases.get_opt(&name).await.map_err(|e| e.to_string())?;
                let got = l
                    .and_then(|l| l.metadata.annotations)
                    .and_then(|a| a.get("berth.dev/peer-probe").cloned());
                if got.as_deref() == Some(want.as_str()) {
                    Ok(())
                } else {
                    Err(format!("annotation {got:?}"))
                }
            },
        )
        .await;
    }

    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-lan", ns.name),
        json!({"pool": {"addresses": [POOL]}}),
    );
    let holder = served_elsewhere(&env, &dump, &ns.name, &class.name, "web", ADDRESS).await;
    let url = format!("http://{ADDRESS}/");
    // A request caught by the cut gives up after 300 ms, so the next one goes out soon.
    let load = RequestLoop::with_timeout(
        &env.info.client_netns,
        &url,
        "Welcome to nginx!",
        Duration::from_millis(50),
        Duration::from_millis(300),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed_at = Instant::now();
    let cut = LinkDown::cut(plan(&env, &holder));
    // The cut-off node keeps its copy until its claim runs out; nobody reaches it.
    let next = holder_with_address(
        &env,
        &dump,
        ADDRESS,
        Some(&holder),
        false,
        "the address taken over",
    )
    .await;
    let moved_after = failed_at.elapsed();
    let new_mac = mac_of(&plan(&env, &next).netns);
    wait_until(
        "client neighbour entry re-pointed",
        settle(),
        &dump,
        async || match client_neighbour(&env, ADDRESS) {
            Some(mac) if mac == new_mac => Ok(()),
            other => Err(format!("{other:?}, new holder's MAC {new_mac}")),
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = load.finish();
    let (sent, failed, longest) = gap(&samples, failed_at);
    let back = resumed(&samples, failed_at);
    let dead_seen = metric(&env, &next, "berth_nodeproxy_l2_peers_dead");
    eprintln!(
        "L2 node failure (link cut), lease {L2_LEASE_SECONDS}s, probes every 100 ms, dead \
         after 500 ms: {ADDRESS} moved from {holder} to {next} after {:.2}s; {failed} of \
         {sent} requests (one per 50 ms, 300 ms each) failed; longest gap between two \
         answered requests {} ms; first answered request sent {:?} ms after the cut",
        moved_after.as_secs_f64(),
        longest.as_millis(),
        back.map(|d| d.as_millis())
    );
    let tail: Vec<bool> = samples.iter().rev().take(10).map(|s| s.1).collect();
    assert!(
        tail.iter().all(|ok| *ok),
        "requests after the take-over (newest first): {tail:?}"
    );
    // Through the Lease alone the move takes at least a duration (expiry by observation):
    // sooner means the probes found the node dead.
    assert!(
        moved_after < lease(),
        "{ADDRESS} moved after {moved_after:?}, not before the {L2_LEASE_SECONDS}s Lease ran out"
    );
    assert_eq!(dead_seen, Some(1.0), "{next} counts one dead peer");

    // The node comes back: it finds the Lease taken and does not announce again; the
    // others hear it again.
    drop(cut);
    wait_until(
        "the old holder heard again",
        settle(),
        &dump,
        async || match metric(&env, &next, "berth_nodeproxy_l2_peers_dead") {
            Some(0.0) => Ok(()),
            other => Err(format!("peers dead {other:?}")),
        },
    )
    .await;
    let alone = holder_with_address(
        &env,
        &dump,
        ADDRESS,
        Some(&holder),
        true,
        "the old copy gone",
    )
    .await;
    assert_eq!(alone, next);
    let deadline = Instant::now() + lease() * 2;
    while Instant::now() < deadline {
        let holder_now = lease_holder(&env, ADDRESS).await;
        let on = env.nodes_with_address(ADDRESS);
        assert!(
            holder_now.as_deref() == Some(next.as_str()) && on == [next.clone()],
            "{ADDRESS} should stay with {next}: Lease holder {holder_now:?}, on {on:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `app`'s Service of `class` on `ip`, with one nginx pod on a node other than the
/// address's holder; the holder.
async fn served_elsewhere(
    env: &TestEnv,
    dump: &Diagnostics,
    ns: &str,
    class: &str,
    app: &str,
    ip: &str,
) -> String {
    ServiceBuilder::load_balancer(app)
        .owner_class(class)
        .app(app)
        .tcp(80, 80)
        .create(env, ns)
        .await;
    set_ingress(env, ns, app, &[ip]).await;
    let holder = holder_with_address(env, dump, ip, None, true, "one announcing node").await;
    let backend = env
        .info
        .nodes
        .iter()
        .map(|n| n.plan.name.clone())
        .find(|n| *n != holder)
        .expect("another node");
    nginx_on(env, ns, app, &backend).await;
    let url = format!("http://{ip}/");
    wait_until(
        "nginx answers through the address",
        settle(),
        dump,
        async || {
            curl_in(&env.info.client_netns, &url, Duration::from_secs(2))
                .map_err(|e| e.to_string())
                .and_then(|b| b.contains("Welcome to nginx!").then_some(()).ok_or(b))
        },
    )
    .await;
    holder
}

/// Serves `app` on `ip` from a node other than its holder, runs `leave` on the holder
/// under a request loop, and checks the hand-over: at every moment (sampled each 20 ms)
/// some node carries `ip`, it ends on another node alone, and no request fails.
async fn hands_over_when_leaving(
    env: &TestEnv,
    ns: &str,
    app: &str,
    ip: &str,
    how: &str,
    leave: impl FnOnce(&str),
) {
    let dump = Diagnostics::new(env).node_agents(&env.info);
    let class = ClassGuard::with_spec(
        env,
        &format!("{ns}-lan"),
        json!({"pool": {"addresses": [POOL]}}),
    );
    let holder = served_elsewhere(env, &dump, ns, &class.name, app, ip).await;
    let url = format!("http://{ip}/");
    let load = RequestLoop::start(
        &env.info.client_netns,
        &url,
        "Welcome to nginx!",
        Duration::from_millis(50),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    leave(&holder);
    let mut bare_moments = Vec::new();
    let next = loop {
        let on = env.nodes_with_address(ip);
        if on.is_empty() {
            bare_moments.push(started.elapsed());
        }
        let h = lease_holder(env, ip).await;
        if let Some(h) = h.filter(|h| *h != holder && on == [h.clone()]) {
            break h;
        }
        assert!(
            started.elapsed() < settle(),
            "{ip} not moved off {holder} ({how}): Lease holder {:?}, on {on:?}",
            lease_holder(env, ip).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let moved_after = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = load.finish();
    let (sent, failed, longest) = gap(&samples, started);
    eprintln!(
        "L2 {how} of {holder}: {ip} handed over to {next} after {:.2}s; {failed} of {sent} \
         requests (one per 50 ms) failed; longest gap between two answered requests {} ms",
        moved_after.as_secs_f64(),
        longest.as_millis()
    );
    assert!(
        bare_moments.is_empty(),
        "{ip} was on no node at {bare_moments:?} (break before make)"
    );
    assert_eq!(failed, 0, "requests failed during the hand-over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_and_drained_node_hands_its_address_over_first() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-drain").await;
    let mut cordon = None;
    hands_over_when_leaving(
        &env,
        &ns.name,
        "drained",
        DRAINED_ADDRESS,
        "cordon + drain",
        |holder| {
            cordon = Some(Cordon::new(&env, holder));
            env.kubectl(&[
                "drain",
                holder,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--force",
                "--timeout=120s",
            ]);
        },
    )
    .await;
}

/// The cluster autoscaler's taint on the node it is about to remove, taken off on drop.
struct AutoscalerTaint<'a> {
    env: &'a TestEnv,
    node: String,
}

const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

impl<'a> AutoscalerTaint<'a> {
    fn new(env: &'a TestEnv, node: &str) -> Self {
        // The autoscaler's value is the time it chose the node; the effect NoSchedule.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        env.kubectl(&[
            "taint",
            "node",
            node,
            &format!("{AUTOSCALER_TAINT}={since}:NoSchedule"),
        ]);
        Self {
            env,
            node: node.to_string(),
        }
    }
}

impl Drop for AutoscalerTaint<'_> {
    fn drop(&mut self) {
        let _ = self.env.kubectl_output(&[
            "taint",
            "node",
            &self.node,
            &format!("{AUTOSCALER_TAINT}-"),
        ]);
    }
}

/// The cluster autoscaler chose the announcing node for removal (its taint, without a
/// cordon): the node hands its address over first, as when cordoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_autoscaler_removes_hands_its_address_over_first() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-scaledown").await;
    let mut taint = None;
    hands_over_when_leaving(
        &env,
        &ns.name,
        "scaledown",
        SCALED_DOWN_ADDRESS,
        "autoscaler taint",
        |holder| taint = Some(AutoscalerTaint::new(&env, holder)),
    )
    .await;
}
