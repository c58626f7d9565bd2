//! L2 announcement of pool addresses by berth-nodeproxy: one node per address takes its
//! Lease, puts the address on its `eth0` and answers ARP for it, so the client namespace
//! on the bridge reaches it directly (its route to 198.19.0.0/16 is on-link). No
//! controller runs here: each case creates a `pool` LoadBalancerClass and writes the
//! Service's owner annotation and load-balancer status itself. Addresses come from
//! 198.19.8.0/24 only, a fixed block per case. Needs root and the running local cluster
//! with its node agents (`make test`).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::env::NodeInfo;
use berth_e2e::l2::{client_neighbour, lease_holder, mac_of, nginx_on, set_ingress};
use berth_e2e::l2scale::{BERTH_PROTO, HostAddress};
use berth_e2e::nodeagent::{self, HoldAgent, L2_LEASE_SECONDS};
use berth_e2e::requests::{RequestLoop, gap};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

/// The pool every case's class draws from: the lower half of the suite's block, so
/// 198.19.8.128/25 belongs to no class (see the stray-address case).
const POOL: &str = "198.19.8.0/25";
const OWNER_ANNOTATION: &str = "berth.dev/load-balancer-class";

/// Cases that need every agent up hold this shared; the failover case, which stops
/// agents, holds it exclusively.
static AGENTS_UP: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn lease() -> Duration {
    Duration::from_secs(L2_LEASE_SECONDS)
}

/// Generous bound for anything that happens "within a lease duration": never a timed
/// assertion, only how long a wait may take before the case fails.
fn settle() -> Duration {
    lease() * 4 + Duration::from_secs(30)
}

async fn connect(prefix: &str) -> (TestEnv, TestNamespace) {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace(prefix).await;
    (env, ns)
}

fn pool_class(env: &TestEnv, name: &str, l2: Option<bool>) -> ClassGuard {
    let mut pool = json!({"addresses": [POOL]});
    if let Some(l2) = l2 {
        pool["l2"] = json!(l2);
    }
    ClassGuard::with_spec(env, name, json!({"pool": pool}))
}

/// A unique class name per case and run (classes are cluster-scoped).
fn class_name(ns: &TestNamespace, what: &str) -> String {
    format!("{}-{what}", ns.name)
}

/// A LoadBalancer Service owned by `class` whose status carries `ips`, as the
/// controller's pool allocator would write it.
async fn lb_service(
    env: &TestEnv,
    ns: &str,
    name: &str,
    class: &str,
    app: &str,
    local: bool,
    ips: &[&str],
) {
    ServiceBuilder::load_balancer(name)
        .owner_class(class)
        .app(app)
        .external_local(local)
        .tcp(80, 80)
        .create(env, ns)
        .await;
    set_ingress(env, ns, name, ips).await;
}

async fn delete_service(env: &TestEnv, ns: &str, name: &str) {
    Api::<Service>::namespaced(env.client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete service {name}: {e}"));
}

/// The seed's nginx Deployment (3 pods answering with the nginx welcome page).
fn seed_nginx(env: &TestEnv, ns: &str) {
    env.apply_example(ns, "seed/nginx-deployment.yaml");
}

/// Nodes whose `eth0` carries `ip` (as a host address).
fn nodes_with(env: &TestEnv, ip: &str) -> BTreeSet<String> {
    env.nodes_with_address(ip).into_iter().collect()
}

fn node<'a>(env: &'a TestEnv, name: &str) -> &'a NodeInfo {
    env.info
        .nodes
        .iter()
        .find(|n| n.plan.name == name)
        .unwrap_or_else(|| panic!("node {name}"))
}

/// Polls `probe` until it answers `Ok`; panics with its last `Err` (the state seen) and
/// the node agents' logs after `timeout`.
async fn until<T>(
    env: &TestEnv,
    what: &str,
    timeout: Duration,
    probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let dump = Diagnostics::new(env).node_agents(&env.info);
    wait_until(what, timeout, &dump, probe).await
}

/// Exactly one node holds the Lease and it alone has the address; that node.
async fn one_holder(env: &TestEnv, ip: &str, what: &str) -> String {
    until(env, what, settle(), async || {
        let holder = lease_holder(env, ip).await;
        let on = nodes_with(env, ip);
        match holder {
            Some(h) if on.len() == 1 && on.contains(&h) => Ok(h),
            _ => Err(format!("Lease holder {holder:?}, {ip} on {on:?}")),
        }
    })
    .await
}

/// No node has the address and its Lease has no holder.
async fn nobody(env: &TestEnv, ip: &str, what: &str) {
    until(env, what, settle(), async || {
        let holder = lease_holder(env, ip).await;
        let on = nodes_with(env, ip);
        if holder.is_none() && on.is_empty() {
            Ok(())
        } else {
            Err(format!("Lease holder {holder:?}, {ip} on {on:?}"))
        }
    })
    .await
}

async fn nginx_answers(env: &TestEnv, ip: &str) {
    let url = format!("http://{ip}/");
    until(
        env,
        &format!("nginx at {url} from the client"),
        settle(),
        async || match curl_in(&env.info.client_netns, &url, Duration::from_secs(2)) {
            Ok(b) if b.contains("Welcome to nginx!") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await
}

/// Watches for `window` that `holder` alone holds the address and its Lease.
async fn stays_with(env: &TestEnv, ip: &str, holder: &str, window: Duration) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        let on = nodes_with(env, ip);
        let lease = lease_holder(env, ip).await;
        assert!(
            lease.as_deref() == Some(holder) && on.len() == 1 && on.contains(holder),
            "{ip} should stay with {holder}: Lease holder {lease:?}, address on {on:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn metrics_of(env: &TestEnv, name: &str) -> String {
    let url = format!(
        "http://{}:{}/metrics",
        node(env, name).plan.ip,
        nodeagent::METRICS_PORT
    );
    curl_in(&env.info.client_netns, &url, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e}"))
}

fn garps_sent(env: &TestEnv, name: &str) -> f64 {
    metrics_of(env, name)
        .lines()
        .find_map(|l| l.strip_prefix("berth_nodeproxy_l2_gratuitous_arps_sent_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A host address added to a node's eth0 by hand; removed on drop if still there.
struct StrayAddress {
    netns: String,
    prefix: String,
}

impl StrayAddress {
    fn add(netns: &str, ip: &str) -> Self {
        let prefix = format!("{ip}/32");
        let out = Command::new("ip")
            .args(["-n", netns, "addr", "add", &prefix, "dev", "eth0"])
            .output()
            .expect("ip addr add");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            netns: netns.to_string(),
            prefix,
        }
    }
}

impl Drop for StrayAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "-n",
                &self.netns,
                "addr",
                "del",
                &self.prefix,
                "dev",
                "eth0",
            ])
            .output();
    }
}

/// An nftables table in a node's namespace dropping every packet to one address before
/// anything else sees it; deleted on drop.
struct BlackHole {
    netns: String,
}

const BLACK_HOLE_TABLE: &str = "l2-test-blackhole";

impl BlackHole {
    fn add(netns: &str, ip: &str) -> Self {
        let rules = format!(
            "table ip {BLACK_HOLE_TABLE} {{ chain blackhole {{ type filter hook prerouting \
             priority -400; ip daddr {ip} drop; }}; }}"
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
        Self {
            netns: netns.to_string(),
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "nft",
                "delete",
                "table",
                "ip",
                BLACK_HOLE_TABLE,
            ])
            .output();
    }
}

async fn agent_back(env: &TestEnv, name: &str) {
    nodeagent::wait_healthy(&node(env, name).plan, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Stops the holder's agent with `signal` (held down), waits until the address has moved
/// and the client is answered again through the new holder, and reports the gap.
/// With `node_down`, the old holder also drops every packet to the address from the
/// moment its agent stops, as a failed node would; otherwise its rules keep forwarding
/// what still reaches it.
async fn fail_over(
    env: &TestEnv,
    ip: &str,
    holder: &str,
    signal: i32,
    node_down: bool,
    what: &str,
) -> String {
    let url = format!("http://{ip}/");
    let load = RequestLoop::start(
        &env.info.client_netns,
        &url,
        "Welcome to nginx!",
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped_at = Instant::now();
    let hold = HoldAgent::stop(holder, signal);
    let _down = node_down.then(|| BlackHole::add(&node(env, holder).plan.netns, ip));
    let next = until(
        env,
        &format!("{ip} taken over after {what}"),
        settle(),
        async || {
            let h = lease_holder(env, ip).await;
            let on = nodes_with(env, ip);
            match h {
                Some(h) if h != holder && on.len() == 1 && on.contains(&h) => Ok(h),
                _ => Err(format!("Lease holder {h:?}, {ip} on {on:?}")),
            }
        },
    )
    .await;
    let moved_after = stopped_at.elapsed();
    // The old holder's address is gone: removed on SIGTERM, run out of lifetime on SIGKILL.
    assert!(!nodes_with(env, ip).contains(holder));
    // Gratuitous ARP re-pointed the client's neighbour entry at the new holder.
    let new_mac = mac_of(&node(env, &next).plan.netns);
    until(
        env,
        "client neighbour entry re-pointed",
        settle(),
        async || match client_neighbour(env, ip) {
            Some(mac) if mac == new_mac => Ok(()),
            other => Err(format!("{other:?}, new holder's MAC {new_mac}")),
        },
    )
    .await;
    let repointed_after = stopped_at.elapsed();
    assert!(
        garps_sent(env, &next) > 0.0,
        "{next} took the address without a gratuitous ARP"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = load.finish();
    let (sent, failed, longest) = gap(&samples, stopped_at);
    let tail: Vec<bool> = samples.iter().rev().take(10).map(|s| s.1).collect();
    assert!(
        tail.iter().all(|ok| *ok),
        "requests after the take-over must succeed (newest first): {tail:?}"
    );
    eprintln!(
        "L2 failover, {what}, from {holder} (lease {L2_LEASE_SECONDS}s): {ip} moved to \
         {next} after {:.2}s, the client's neighbour entry pointed at it after {:.2}s; {failed} \
         of {sent} requests (one per 100 ms) failed; longest gap between two answered requests \
         {} ms",
        moved_after.as_secs_f64(),
        repointed_after.as_secs_f64(),
        longest.as_millis()
    );
    drop(hold);
    agent_back(env, holder).await;
    next
}

// ---------- cases ----------

/// One node takes the Lease and puts the address on its eth0, the others stay silent;
/// the client resolves the address to that node's MAC and gets the nginx page.
#[tokio::test]
async fn one_node_announces_a_pool_address_and_the_client_reaches_nginx() {
    let _up = AGENTS_UP.read().await;
    let (env, ns) = connect("l2-basic").await;
    let class = pool_class(&env, &class_name(&ns, "lan"), None);
    let ip = "198.19.8.10";
    seed_nginx(&env, &ns.name);
    lb_service(&env, &ns.name, "nginx", &class.name, "nginx", false, &[ip]).await;
    let holder = one_holder(&env, ip, "one announcing node").await;
    nginx_answers(&env, ip).await;
    assert_eq!(
        client_neighbour(&env, ip),
        Some(mac_of(&node(&env, &holder).plan.netns)),
        "the client's neighbour entry points at the holder {holder}"
    );
    stays_with(&env, ip, &holder, lease() * 2).await;
    delete_service(&env, &ns.name, "nginx").await;
    nobody(&env, ip, "address withdrawn with its Service").await;
}

/// SIGKILL of the holder's agent: its address runs out of lifetime and another node
/// takes the Lease; SIGTERM: the holder releases at once; SIGKILL while the node also
/// stops forwarding (a failed node). Each time the client is answered again through the
/// new holder, and the restarted agent neither takes the address back nor leaves a
/// second copy.
#[tokio::test]
async fn the_address_moves_when_the_holders_agent_is_killed_or_stopped() {
    let _exclusive = AGENTS_UP.write().await;
    let (env, ns) = connect("l2-failover").await;
    let class = pool_class(&env, &class_name(&ns, "lan"), None);
    let ip = "198.19.8.20";
    seed_nginx(&env, &ns.name);
    lb_service(&env, &ns.name, "nginx", &class.name, "nginx", false, &[ip]).await;
    let first = one_holder(&env, ip, "one announcing node").await;
    nginx_answers(&env, ip).await;

    let second = fail_over(
        &env,
        ip,
        &first,
        libc::SIGKILL,
        false,
        "SIGKILL of the agent",
    )
    .await;
    stays_with(&env, ip, &second, lease() * 2).await;

    let third = fail_over(
        &env,
        ip,
        &second,
        libc::SIGTERM,
        false,
        "SIGTERM of the agent",
    )
    .await;
    stays_with(&env, ip, &third, lease() * 2).await;

    let fourth = fail_over(
        &env,
        ip,
        &third,
        libc::SIGKILL,
        true,
        "SIGKILL + old node dropping the address's traffic",
    )
    .await;
    stays_with(&env, ip, &fourth, lease() * 2).await;

    delete_service(&env, &ns.name, "nginx").await;
    nobody(&env, ip, "address withdrawn with its Service").await;
}

/// Six addresses of one Service land on at least two different nodes.
#[tokio::test]
async fn addresses_spread_over_the_nodes() {
    let _up = AGENTS_UP.read().await;
    let (env, ns) = connect("l2-spread").await;
    let class = pool_class(&env, &class_name(&ns, "lan"), None);
    let ips = [
        "198.19.8.30",
        "198.19.8.31",
        "198.19.8.32",
        "198.19.8.33",
        "198.19.8.34",
        "198.19.8.35",
    ];
    seed_nginx(&env, &ns.name);
    lb_service(&env, &ns.name, "nginx", &class.name, "nginx", false, &ips).await;
    let mut holders = Vec::new();
    for ip in ips {
        holders.push(one_holder(&env, ip, &format!("one node announcing {ip}")).await);
    }
    let distinct: BTreeSet<&String> = holders.iter().collect();
    eprintln!("L2 spread of {ips:?}: {holders:?}");
    assert!(distinct.len() >= 2, "every address on {distinct:?}");
    nginx_answers(&env, ips[5]).await;
    delete_service(&env, &ns.name, "nginx").await;
    for ip in ips {
        nobody(&env, ip, "addresses withdrawn with their Service").await;
    }
}

/// With `externalTrafficPolicy: Local` only the node with the pod announces, and the
/// announcement follows the pod to another node.
#[tokio::test]
async fn local_traffic_policy_announces_from_the_pods_node_and_follows_it() {
    let _up = AGENTS_UP.read().await;
    let (env, ns) = connect("l2-local").await;
    let class = pool_class(&env, &class_name(&ns, "lan"), None);
    let ip = "198.19.8.40";
    let (a, b) = (
        env.info.nodes[0].plan.name.clone(),
        env.info.nodes[2].plan.name.clone(),
    );
    nginx_on(&env, &ns.name, "web", &a).await;
    lb_service(&env, &ns.name, "web", &class.name, "web", true, &[ip]).await;
    let holder = one_holder(&env, ip, "the pod's node announcing").await;
    assert_eq!(
        holder, a,
        "only the node with the local endpoint may announce"
    );
    nginx_answers(&env, ip).await;

    Api::<Deployment>::namespaced(env.client.clone(), &ns.name)
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {
                "nodeSelector": {"kubernetes.io/hostname": b}}}}})),
        )
        .await
        .expect("move the pod");
    until(
        &env,
        "the announcement follows the pod",
        settle(),
        async || {
            let h = lease_holder(&env, ip).await;
            let on = nodes_with(&env, ip);
            if h.as_deref() == Some(b.as_str()) && on == BTreeSet::from([b.clone()]) {
                Ok(())
            } else {
                Err(format!("Lease holder {h:?}, {ip} on {on:?}"))
            }
        },
    )
    .await;
    nginx_answers(&env, ip).await;
    delete_service(&env, &ns.name, "web").await;
    nobody(&env, ip, "address withdrawn with its Service").await;
}

/// `l2: false` classes are not announced; a Service moved to such a class, or whose
/// status loses the address, is withdrawn and its Lease released.
#[tokio::test]
async fn l2_off_or_address_gone_means_no_announcement() {
    let _up = AGENTS_UP.read().await;
    let (env, ns) = connect("l2-off").await;
    let on = pool_class(&env, &class_name(&ns, "on"), None);
    let off = pool_class(&env, &class_name(&ns, "off"), Some(false));
    let (quiet, moved, dropped) = ("198.19.8.50", "198.19.8.51", "198.19.8.52");
    seed_nginx(&env, &ns.name);
    lb_service(&env, &ns.name, "quiet", &off.name, "nginx", false, &[quiet]).await;
    lb_service(&env, &ns.name, "moved", &on.name, "nginx", false, &[moved]).await;
    lb_service(
        &env,
        &ns.name,
        "dropped",
        &on.name,
        "nginx",
        false,
        &[dropped],
    )
    .await;
    // The agents have seen all three Services once the other two are announced.
    one_holder(&env, moved, "l2 class announced").await;
    one_holder(&env, dropped, "l2 class announced").await;
    assert!(nodes_with(&env, quiet).is_empty(), "l2: false announced");
    assert_eq!(
        lease_holder(&env, quiet).await,
        None,
        "l2: false took a Lease"
    );

    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .patch(
            "moved",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {OWNER_ANNOTATION: off.name}}})),
        )
        .await
        .expect("move to the l2: false class");
    nobody(&env, moved, "withdrawn after moving to an l2: false class").await;
    set_ingress(&env, &ns.name, "dropped", &[]).await;
    nobody(&env, dropped, "withdrawn after leaving the status").await;
    assert!(
        curl_in(
            &env.info.client_netns,
            &format!("http://{dropped}/"),
            Duration::from_secs(2)
        )
        .is_err(),
        "a withdrawn address still answers"
    );
    for name in ["quiet", "moved", "dropped"] {
        delete_service(&env, &ns.name, name).await;
    }
}

/// A pool address berth added (stamped with its `IFA_PROTO`) on a node that holds no
/// Lease for it, as a killed agent leaves it, is removed by that node's agent.
#[tokio::test]
async fn a_pool_address_nobody_holds_is_removed_from_the_interface() {
    let _up = AGENTS_UP.read().await;
    let (env, ns) = connect("l2-stray").await;
    let _class = pool_class(&env, &class_name(&ns, "lan"), None);
    let ip = "198.19.8.60";
    let target = env.info.nodes[1].plan.clone();
    let _stray = HostAddress::with_proto(&target.netns, ip, BERTH_PROTO, Duration::from_secs(600));
    until(&env, "the stray address removed", settle(), async || {
        let on = nodes_with(&env, ip);
        if on.is_empty() {
            Ok(())
        } else {
            Err(format!("{ip} still on {on:?}"))
        }
    })
    .await;
    // Outside every pool class (no case's class covers it): not berth's, left alone.
    let foreign = "198.19.8.200";
    let _kept = StrayAddress::add(&target.netns, foreign);
    tokio::time::sleep(lease()).await;
    assert_eq!(
        nodes_with(&env, foreign),
        BTreeSet::from([target.name.clone()])
    );
}

/// Every agent reports the L2 figures on `/metrics`.
#[tokio::test]
async fn agents_report_l2_metrics() {
    let _up = AGENTS_UP.read().await;
    let env = TestEnv::connect().await;
    for n in &env.info.nodes {
        let text = metrics_of(&env, &n.plan.name);
        for family in [
            "berth_nodeproxy_l2_addresses_held ",
            "berth_nodeproxy_l2_lease_transitions_total{event=\"acquired\"} ",
            "berth_nodeproxy_l2_gratuitous_arps_sent_total ",
        ] {
            assert!(text.contains(family), "{family} missing on {}", n.plan.name);
        }
    }
}
