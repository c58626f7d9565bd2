//! `berth-bench-metallb`: berth's pool addresses against MetalLB (memberlist on) on the
//! running local environment, one after the other, on the same Services (500 by default,
//! `BENCH_METALLB_SERVICES`), with the environment's berth-nodeproxy agents proxying the
//! traffic for both. For each side:
//! - the time from the first create until every Service has its address in status and
//!   the address answers HTTP from the client namespace, and each Service's own time
//!   (p50, p99), from rounds that ask every waiting address at once;
//! - the addresses changed and Services written across a controller SIGKILL and restart;
//! - the longest gap of a request loop (one request per 50 ms) when the announcing node's
//!   agent (berth-nodeproxy / MetalLB's speaker) is SIGKILLed, and when the node's link
//!   is cut, with the time until the client's neighbour entry moved to another node;
//! - the time until FRR (in its router namespace, hold 9 s and keepalive 3 s on both
//!   sides) drops a node's next hop for an address every node announces over BGP, once
//!   that node's link is cut.
//!
//! Merges `bare.*` (berth), `compare.metallb.*` (MetalLB, and berth / MetalLB ratios) into
//! `target/bench/results.json` and prints the README's table.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::l2::{LinkDown, client_neighbour, mac_of, set_ingress};
use berth_e2e::lbcompare::{self, Figures};
use berth_e2e::metallb::MetalLb;
use berth_e2e::net::NodePlan;
use berth_e2e::nodeagent::{self, HoldAgent};
use berth_e2e::proxybench::{merge_file, percentile};
use berth_e2e::requests::{RequestLoop, answering, gap};
use berth_e2e::router::{Kind, NODE_ASN, Neighbor, ROUTER_ASN, Router};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, lb_ips};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;

const BERTH_POOL: &str = "198.19.80.0/23";
const METALLB_POOL: &str = "198.19.82.0/23";
const METALLB_CLASS: &str = "bench.berth.dev/metallb";
/// berth's BGP class (L2 off) and the address its one Service gets.
const BERTH_BGP_POOL: &str = "198.19.84.0/24";
const BERTH_BGP_ADDRESS: &str = "198.19.84.10";
/// FRR's router number (`berth-rtr-<n>`), used by no suite.
const ROUTER_INDEX: u8 = 7;
const NGINX: &str = "Welcome to nginx!";
/// API calls in flight while creating the Services.
const IN_FLIGHT: usize = 16;
/// Threads asking addresses at once in a round.
const PROBERS: usize = 32;
/// Longest wait for every address, for a take-over; past it the figure is a miss.
const ANNOUNCE_LIMIT: Duration = Duration::from_secs(300);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// After a controller restart: time for a new controller to resync before the Services
/// are compared (the same for both).
const RESTART_SETTLE: Duration = Duration::from_secs(20);

enum Side {
    Berth {
        controller: ControllerProc,
        opts: ControllerOpts,
        class: ClassGuard,
    },
    MetalLb(MetalLb),
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Berth { .. } => "berth",
            Side::MetalLb(_) => "metallb",
        }
    }

    fn lb_class(&self) -> String {
        match self {
            Side::Berth { class, .. } => class.lb_class(),
            Side::MetalLb(_) => METALLB_CLASS.to_string(),
        }
    }

    /// SIGKILL to the controller and a new one in its place (berth's: once it leads).
    async fn restart_controller(&mut self, env: &TestEnv) {
        match self {
            Side::Berth {
                controller, opts, ..
            } => {
                controller.kill();
                *controller = ControllerProc::spawn(&env.info, "bench-berth-1", opts)
                    .unwrap_or_else(|e| panic!("restart berth-controller: {e}"));
                let deadline = Instant::now() + Duration::from_secs(60);
                while !controller.is_leader().await {
                    assert!(
                        Instant::now() < deadline && controller.exited().is_none(),
                        "the restarted berth-controller does not lead:\n{}",
                        controller.log_tail()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Side::MetalLb(m) => m
                .restart_controller()
                .unwrap_or_else(|e| panic!("restart MetalLB's controller: {e}")),
        }
    }

    /// SIGKILL to `node`'s announcing agent; it stays dead until [`Self::revive`].
    fn kill_agent(&mut self, node: &str) -> Option<HoldAgent> {
        match self {
            Side::Berth { .. } => Some(HoldAgent::stop(node, libc::SIGKILL)),
            Side::MetalLb(m) => {
                m.kill_speaker(node);
                None
            }
        }
    }

    async fn revive(&mut self, plan: &NodePlan, hold: Option<HoldAgent>) {
        drop(hold);
        match self {
            Side::Berth { .. } => nodeagent::wait_healthy(plan, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
            Side::MetalLb(m) => m
                .start_speaker(&plan.name)
                .unwrap_or_else(|e| panic!("restart speaker: {e}")),
        }
    }
}

fn services_wanted() -> usize {
    std::env::var("BENCH_METALLB_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

fn first_ip(s: &Service) -> Option<IpAddr> {
    lb_ips(s).first().and_then(|ip| ip.parse().ok())
}

fn index_of(name: &str) -> Option<usize> {
    name.strip_prefix("svc-")?.parse().ok()
}

/// (address, resourceVersion, annotations and status) of every `svc-<i>`, by name.
async fn snapshot(api: &Api<Service>) -> BTreeMap<String, (Option<IpAddr>, String, String)> {
    api.list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("list Services: {e}"))
        .items
        .into_iter()
        .filter_map(|s| {
            let name = s.metadata.name.clone()?;
            index_of(&name)?;
            let rv = s.metadata.resource_version.clone().unwrap_or_default();
            let seen = json!({"annotations": s.metadata.annotations, "status": s.status});
            Some((name, (first_ip(&s), rv, seen.to_string())))
        })
        .collect()
}

fn secs(d: Duration) -> Option<f64> {
    Some(d.as_secs_f64())
}

/// Creates `n` Services and waits until each has an address that answers: figures
/// `announce_<n>_s`, `status_<n>_s`, `per_service_p50_s`, `per_service_p99_s`,
/// `answered_<n>` (a miss when not all did within the limit).
async fn allocate_and_announce(
    env: &TestEnv,
    api: &Api<Service>,
    class: &str,
    n: usize,
    figures: &mut Figures,
) {
    let started = Instant::now();
    let create = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                ServiceBuilder::load_balancer(&format!("svc-{i}"))
                    .class(class)
                    .app("nginx")
                    .tcp(80, 80)
                    .set("allocateLoadBalancerNodePorts", false)
                    .create_with(&api)
                    .await;
                (i, Instant::now())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<(usize, Instant)>>();
    let netns = env.info.client_netns.clone();
    let watch = async {
        let mut answered: Vec<Option<Instant>> = vec![None; n];
        let mut status_all = None;
        while answered.iter().any(Option::is_none) && started.elapsed() < ANNOUNCE_LIMIT {
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            let with_ip: Vec<(usize, IpAddr)> = list
                .items
                .iter()
                .filter_map(|s| Some((index_of(s.metadata.name.as_deref()?)?, first_ip(s)?)))
                .filter(|(i, _)| *i < n)
                .collect();
            if status_all.is_none() && with_ip.len() == n {
                status_all = Some(started.elapsed());
            }
            let waiting: Vec<(usize, IpAddr)> = with_ip
                .into_iter()
                .filter(|(i, _)| answered[*i].is_none())
                .collect();
            if waiting.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let ips: Vec<IpAddr> = waiting.iter().map(|w| w.1).collect();
            let ns = netns.clone();
            let ok = tokio::task::spawn_blocking(move || {
                answering(&ns, &ips, NGINX, Duration::from_millis(500), PROBERS)
            })
            .await
            .unwrap_or_default();
            let now = Instant::now();
            for ((i, _), ok) in waiting.iter().zip(ok) {
                if ok {
                    answered[*i] = Some(now);
                }
            }
        }
        (answered, status_all)
    };
    let (created, (answered, status_all)) = tokio::join!(create, watch);
    let mut created_at = vec![started; n];
    for (i, t) in created {
        created_at[i] = t;
    }
    let per: Vec<f64> = answered
        .iter()
        .zip(&created_at)
        .filter_map(|(a, c)| a.map(|a| a.duration_since(*c).as_secs_f64()))
        .collect();
    let all = answered.iter().all(Option::is_some);
    let last = answered.iter().flatten().max().copied();
    figures.insert(
        format!("announce_{n}_s"),
        last.filter(|_| all)
            .and_then(|l| secs(l.duration_since(started))),
    );
    figures.insert(format!("status_{n}_s"), status_all.map(|d| d.as_secs_f64()));
    figures.insert(format!("answered_{n}"), Some(per.len() as f64));
    figures.insert("per_service_p50_s".into(), percentile(&per, 50.0));
    figures.insert("per_service_p99_s".into(), percentile(&per, 99.0));
}

/// SIGKILL and restart of the controller: `restart_addresses_changed` and
/// `restart_services_written` (resourceVersion moved) after [`RESTART_SETTLE`].
async fn controller_restart(
    env: &TestEnv,
    api: &Api<Service>,
    side: &mut Side,
    figures: &mut Figures,
) {
    // Settled first: the node agents' condition writes after the announcement are no
    // part of the restart. Snapshot once nothing changed for 3 s (at most a minute).
    let mut before = snapshot(api).await;
    let (mut still_since, limit) = (Instant::now(), Instant::now() + Duration::from_secs(60));
    while still_since.elapsed() < Duration::from_secs(3) && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshot(api).await;
        if now != before {
            (before, still_since) = (now, Instant::now());
        }
    }
    side.restart_controller(env).await;
    tokio::time::sleep(RESTART_SETTLE).await;
    let after = snapshot(api).await;
    let changed = before
        .iter()
        .filter(|(k, (ip, _, _))| after.get(*k).map(|a| a.0) != Some(*ip))
        .count();
    let written: Vec<&String> = before
        .iter()
        .filter(|(k, (_, rv, _))| after.get(*k).map(|a| &a.1) != Some(rv))
        .map(|(k, _)| k)
        .collect();
    // What a write changed, for the report (one example).
    if let Some(k) = written.first() {
        eprintln!(
            "{}: {k} written across the restart:\n  before {}\n  after  {}",
            side.name(),
            before[*k].2,
            after.get(*k).map_or("gone", |a| a.2.as_str())
        );
    }
    let written = written.len();
    figures.insert("restart_addresses_changed".into(), Some(changed as f64));
    figures.insert("restart_services_written".into(), Some(written as f64));
}

/// One nginx pod labelled `app: failover`, pinned to `node`.
async fn backend_on(env: &TestEnv, ns: &str, node: &str) {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": format!("failover-{node}")},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "failover", "node": node}},
                 "template": {"metadata": {"labels": {"app": "failover", "node": node}},
                              "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                                       "containers": [{"name": "nginx", "image": "nginx:latest",
                                                       "ports": [{"containerPort": 80}]}]}}}
    }))
    .expect("deployment object");
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    if api
        .get_opt(&format!("failover-{node}"))
        .await
        .ok()
        .flatten()
        .is_none()
    {
        api.create(&PostParams::default(), &d)
            .await
            .unwrap_or_else(|e| panic!("create backend on {node}: {e}"));
    }
}

/// The node whose MAC the client resolves `ip` to (after a request).
fn announcer(env: &TestEnv, ip: &str) -> Option<NodePlan> {
    let _ = curl_in(
        &env.info.client_netns,
        &format!("http://{ip}/"),
        Duration::from_secs(1),
    );
    let mac = client_neighbour(env, ip)?;
    env.info
        .nodes
        .iter()
        .find(|n| mac_of(&n.plan.netns) == mac)
        .map(|n| n.plan.clone())
}

/// Backends on every node but the announcing one; that node.
async fn backends_away_from_announcer(env: &TestEnv, ns: &str, ip: &str) -> NodePlan {
    let deadline = Instant::now() + ANNOUNCE_LIMIT;
    let holder = loop {
        if let Some(h) = announcer(env, ip) {
            break h;
        }
        assert!(Instant::now() < deadline, "nobody announces {ip}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for n in &env.info.nodes {
        if n.plan.name != holder.name {
            backend_on(env, ns, &n.plan.name).await;
        }
    }
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    let _ = api
        .delete(
            &format!("failover-{}", holder.name),
            &DeleteParams::default(),
        )
        .await;
    // Until 20 requests in a row answered (the old backend's endpoint gone everywhere).
    let url = format!("http://{ip}/");
    let mut streak = 0;
    while streak < 20 {
        assert!(Instant::now() < deadline, "{ip} does not answer steadily");
        let ok = curl_in(&env.info.client_netns, &url, Duration::from_secs(1))
            .is_ok_and(|b| b.contains(NGINX));
        streak = if ok { streak + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder
}

enum Failure {
    AgentKilled,
    LinkCut,
}

/// `<prefix>_gap_ms`, `<prefix>_failed_requests`, `<prefix>_takeover_s` for one failure
/// of `ip`'s announcing node.
async fn failover(
    env: &TestEnv,
    ns: &str,
    ip: &str,
    side: &mut Side,
    failure: Failure,
    figures: &mut Figures,
) {
    let holder = backends_away_from_announcer(env, ns, ip).await;
    let old_mac = mac_of(&holder.netns);
    let prefix = match failure {
        Failure::AgentKilled => "agent_kill",
        Failure::LinkCut => "node_failure",
    };
    let load = RequestLoop::with_timeout(
        &env.info.client_netns,
        &format!("http://{ip}/"),
        NGINX,
        Duration::from_millis(50),
        Duration::from_millis(300),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at = Instant::now();
    let (hold, cut) = match failure {
        Failure::AgentKilled => (side.kill_agent(&holder.name), None),
        Failure::LinkCut => (None, Some(LinkDown::cut(&holder))),
    };
    let mut takeover = None;
    while at.elapsed() < TAKEOVER_LIMIT {
        if client_neighbour(env, ip).is_some_and(|m| m != old_mac) {
            takeover = Some(at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = load.finish();
    let (sent, failed, longest) = gap(&samples, at);
    eprintln!(
        "{}: {prefix} on {}: take-over {takeover:?}, {failed} of {sent} requests failed, \
         longest gap {} ms",
        side.name(),
        holder.name,
        longest.as_millis()
    );
    figures.insert(
        format!("{prefix}_takeover_s"),
        takeover.map(|d| d.as_secs_f64()),
    );
    figures.insert(format!("{prefix}_failed_requests"), Some(failed as f64));
    figures.insert(
        format!("{prefix}_gap_ms"),
        Some(longest.as_secs_f64() * 1000.0),
    );
    drop(cut);
    if matches!(failure, Failure::AgentKilled) {
        side.revive(&holder, hold).await;
    }
    // Memberlist rejoins, the agent takes part again.
    tokio::time::sleep(Duration::from_secs(10)).await;
}

/// `bgp_node_failure_withdrawn_s`: once every node is a next hop of `addr` at the
/// router, the first node's link is cut; the time until the router drops it.
async fn bgp_convergence(env: &TestEnv, router: &Router, addr: Ipv4Addr, figures: &mut Figures) {
    let nodes: Vec<NodePlan> = env.info.nodes.iter().map(|n| n.plan.clone()).collect();
    let mut all: Vec<Ipv4Addr> = nodes.iter().map(|n| n.ip).collect();
    all.sort();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let hops = router.next_hops(addr);
        if hops.as_ref().is_ok_and(|h| *h == all) {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("BGP: {addr} never had every node as next hop: {hops:?}");
            figures.insert("bgp_node_failure_withdrawn_s".into(), None);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed = &nodes[0];
    let cut = LinkDown::cut(failed);
    let at = Instant::now();
    let mut gone = None;
    while at.elapsed() < TAKEOVER_LIMIT {
        if router
            .next_hops(addr)
            .is_ok_and(|h| !h.contains(&failed.ip))
        {
            gone = Some(at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(cut);
    eprintln!("BGP: {} withdrawn from {addr} after {gone:?}", failed.name);
    figures.insert(
        "bgp_node_failure_withdrawn_s".into(),
        gone.map(|d| d.as_secs_f64()),
    );
}

/// berth's BGP set-up: a BGPPeer for the router and a class with L2 off announcing to
/// it, its one Service's address written as the allocator would; the address.
async fn berth_bgp(env: &TestEnv, ns: &str, router: &Router) -> (ClassGuard, Ipv4Addr) {
    let peer = json!({"apiVersion": "berth.dev/v1alpha1", "kind": "BGPPeer",
                      "metadata": {"name": "bench-router"},
                      "spec": {"address": router.ip.to_string(), "peerASN": ROUTER_ASN,
                               "myASN": NODE_ASN, "holdTime": 9, "keepaliveTime": 3}});
    let path = std::env::temp_dir().join("berth-e2e-bench-bgppeer.json");
    std::fs::write(&path, peer.to_string()).expect("write BGPPeer");
    env.kubectl(&["apply", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    let class = ClassGuard::with_spec(
        env,
        "bench-berth-bgp",
        json!({"pool": {"addresses": [BERTH_BGP_POOL], "l2": false,
                        "bgp": {"peers": ["bench-router"]}}}),
    );
    ServiceBuilder::load_balancer("bgp")
        .owner_class(&class.name)
        .app("nginx")
        .tcp(80, 80)
        .create(env, ns)
        .await;
    set_ingress(env, ns, "bgp", &[BERTH_BGP_ADDRESS]).await;
    (class, BERTH_BGP_ADDRESS.parse().expect("address"))
}

async fn run(env: &TestEnv, side: &mut Side, router: &Router, n: usize) -> Figures {
    let mut figures = Figures::new();
    let ns = env.namespace(&format!("bench-{}", side.name())).await;
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    env.kubectl(&[
        "-n",
        &ns.name,
        "rollout",
        "status",
        "deployment/nginx-deployment",
        "--timeout=120s",
    ]);
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let class = side.lb_class();
    allocate_and_announce(env, &api, &class, n, &mut figures).await;
    eprintln!("{}: {figures:?}", side.name());
    controller_restart(env, &api, side, &mut figures).await;
    eprintln!("{}: {figures:?}", side.name());

    ServiceBuilder::load_balancer("failover")
        .class(&class)
        .app("failover")
        .tcp(80, 80)
        .set("allocateLoadBalancerNodePorts", false)
        .create_with(&api)
        .await;
    let deadline = Instant::now() + ANNOUNCE_LIMIT;
    let ip = loop {
        let s = api.get("failover").await.ok();
        if let Some(ip) = s.as_ref().and_then(first_ip) {
            break ip.to_string();
        }
        if Instant::now() > deadline {
            eprintln!("{}: the failover Service got no address", side.name());
            for f in ["agent_kill", "node_failure"] {
                for k in ["takeover_s", "failed_requests", "gap_ms"] {
                    figures.insert(format!("{f}_{k}"), None);
                }
            }
            figures.insert("bgp_node_failure_withdrawn_s".into(), None);
            return figures;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for n in &env.info.nodes {
        backend_on(env, &ns.name, &n.plan.name).await;
    }
    failover(env, &ns.name, &ip, side, Failure::AgentKilled, &mut figures).await;
    failover(env, &ns.name, &ip, side, Failure::LinkCut, &mut figures).await;
    eprintln!("{}: {figures:?}", side.name());

    match side {
        Side::Berth { .. } => {
            let (_class, addr) = berth_bgp(env, &ns.name, router).await;
            bgp_convergence(env, router, addr, &mut figures).await;
            env.kubectl(&[
                "delete",
                "bgppeers.berth.dev",
                "bench-router",
                "--wait=false",
            ]);
        }
        Side::MetalLb(m) => {
            m.peer_with(env, &router.ip.to_string(), NODE_ASN, ROUTER_ASN);
            let addr = ip.parse().expect("IPv4 address");
            bgp_convergence(env, router, addr, &mut figures).await;
        }
    }
    let _ = api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    figures
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let n = services_wanted();
    let plans: Vec<NodePlan> = env.info.nodes.iter().map(|n| n.plan.clone()).collect();
    let neighbors: Vec<Neighbor> = plans
        .iter()
        .map(|n| Neighbor {
            ip: n.ip.into(),
            asn: NODE_ASN,
            password: None,
        })
        .collect();
    let router = Router::start(
        Kind::Frr,
        ROUTER_INDEX,
        &plans,
        &neighbors,
        false,
        &env.info.log_dir,
    )
    .unwrap_or_else(|e| panic!("start FRR: {e}"));

    let class = ClassGuard::with_spec(
        &env,
        "bench-berth",
        json!({"pool": {"addresses": [BERTH_POOL]}}),
    );
    let mut opts = ControllerOpts::new(&class.name, "kube-system");
    opts.aws = false;
    // The controller's defaults, not the harness's short ones: at 500 Services a 4 s
    // leader Lease was lost under the apiserver's load (the replica then exits).
    opts.lease_duration = "15s";
    opts.resync = "5m";
    opts.gc_interval = "5m";
    let controller = ControllerProc::spawn(&env.info, "bench-berth-0", &opts)
        .unwrap_or_else(|e| panic!("start berth-controller: {e}"));
    let mut berth = Side::Berth {
        controller,
        opts,
        class,
    };
    let b = run(&env, &mut berth, &router, n).await;
    drop(berth);

    let mut metallb = Side::MetalLb(
        MetalLb::start(&env, METALLB_CLASS, METALLB_POOL)
            .await
            .unwrap_or_else(|e| panic!("start MetalLB: {e}")),
    );
    let m = run(&env, &mut metallb, &router, n).await;
    if let Side::MetalLb(mlb) = &mut metallb {
        let dead = mlb.dead();
        if !dead.is_empty() {
            eprintln!("MetalLB processes that exited: {dead:?}");
        }
    }
    drop(metallb);

    let results = lbcompare::result_keys(&b, &m);
    println!(
        "{}",
        serde_json::to_string_pretty(&results).unwrap_or_default()
    );
    println!("{}", lbcompare::table(&b, &m));
    let dir = berth_e2e::paths::repo_root().join("target/bench");
    let path = dir.join("results.json");
    match std::fs::create_dir_all(&dir).and_then(|()| merge_file(&path, &results)) {
        Ok(()) => {
            eprintln!("merged into {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("writing results: {e}");
            ExitCode::FAILURE
        }
    }
}
