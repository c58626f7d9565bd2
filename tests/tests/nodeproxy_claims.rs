//! The node agents' claim rules on the simulated cluster, with real traffic: no tenant
//! takes another Service's frontend (a ClusterIP always wins, externalIPs on node
//! addresses are refused, the oldest of equal claims wins), and a conflicting pair of
//! Services never stops the agents from programming the others. Needs root and the
//! running local cluster with its node agents (`make test`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_e2e::paths;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, udp_in};
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const SHORT: Duration = Duration::from_secs(2);

/// HTTP GET from inside `netns`: the trimmed body (the answering pod's name).
fn get(netns: &str, url: &str, timeout: Duration) -> Result<String, String> {
    berth_e2e::testing::curl_in(netns, url, timeout)
        .map(|b| b.trim().to_string())
        .map_err(|e| e.to_string())
}

fn dump(env: &TestEnv) -> Diagnostics {
    Diagnostics::new(env).node_agents(&env.info)
}

/// Deletes objects in another namespace than the test's own on drop (also on failure).
struct Cleanup {
    kubeconfig: String,
    namespace: String,
    objects: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for o in &self.objects {
            let _ = Command::new(paths::bin("kubectl"))
                .args(["--kubeconfig", &self.kubeconfig, "-n", &self.namespace])
                .args(["delete", o, "--wait=false", "--ignore-not-found"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A Deployment of `app` whose pods answer HTTP with their name on each TCP port and
/// echo on each UDP port.
async fn deploy(env: &TestEnv, ns: &str, app: &str, ports: serde_json::Value) {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                 "template": {"metadata": {"labels": {"app": app}},
                              "spec": {"containers": [{"name": "echo", "image": "berth/echo", "ports": ports}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap_or_else(|e| panic!("create deployment {app}: {e}"));
}

/// The names and IPs of the running pods of `app`, once there is one.
async fn running(env: &TestEnv, ns: &str, app: &str) -> Vec<(String, String)> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let list = async || -> Vec<(String, String)> {
        api.list(&lp)
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter_map(|p| {
                        let st = p.status.as_ref()?;
                        (st.phase.as_deref() == Some("Running")).then_some(())?;
                        Some((p.metadata.name.clone()?, st.pod_ip.clone()?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_true(
        &format!("a running pod of {app}"),
        Duration::from_secs(90),
        &dump(env),
        async || !list().await.is_empty(),
    )
    .await;
    list().await
}

fn cluster_ip(svc: &Service) -> String {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("clusterIP")
}

/// Waits for a Warning Event with `reason` on Service `name`; its message.
async fn warning(env: &TestEnv, ns: &str, name: &str, reason: &str) -> String {
    warning_saying(env, ns, name, reason, "").await
}

/// Waits for a Warning Event with `reason` on Service `name` whose message contains
/// `text`; its message.
async fn warning_saying(env: &TestEnv, ns: &str, name: &str, reason: &str, text: &str) -> String {
    let mut found = String::new();
    wait_true(
        &format!("Warning {reason} saying {text:?} on Service {ns}/{name}"),
        Duration::from_secs(30),
        &dump(env).events(ns, name),
        async || {
            let events = env.events(ns, name).await;
            match events
                .into_iter()
                .find(|(t, r, m)| t == "Warning" && r == reason && m.contains(text))
            {
                Some((_, _, m)) => {
                    found = m;
                    true
                }
                None => false,
            }
        },
    )
    .await;
    found
}

fn node_netns(env: &TestEnv) -> Vec<String> {
    env.info
        .nodes
        .iter()
        .map(|n| n.plan.netns.clone())
        .collect()
}

/// A host route in the client namespace to `ip` via the first node, removed on drop.
struct ClientRoute {
    netns: String,
    prefix: String,
}

impl ClientRoute {
    fn add(env: &TestEnv, ip: &str) -> Self {
        let prefix = format!("{ip}/32");
        let via = env.info.nodes[0].plan.ip.to_string();
        let out = Command::new("ip")
            .args(["-n", &env.info.client_netns, "route", "replace", &prefix])
            .args(["via", &via])
            .output()
            .expect("ip route");
        assert!(out.status.success(), "route {prefix}");
        Self {
            netns: env.info.client_netns.clone(),
            prefix,
        }
    }
}

impl Drop for ClientRoute {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.netns, "route", "del", &self.prefix])
            .output();
    }
}

/// An address in 198.19.10.0/24, this suite's range (no pool class covers it).
fn free_ip() -> String {
    format!("198.19.10.{}", rand::random_range(10..250u8))
}

/// A Service in `kube-system` stands for kube-dns (TCP and UDP 53). A tenant's Service in
/// `aaa-…` (sorting before `kube-system`) claims its ClusterIP as an externalIP: refused
/// with a Warning Event, and every node still sends both protocols to the original.
#[tokio::test]
async fn external_ip_on_a_kube_dns_cluster_ip_is_refused_and_dns_still_answers() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("aaa").await;
    let dns = format!("dns-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let _cleanup = Cleanup {
        kubeconfig: env.info.kubeconfig.display().to_string(),
        namespace: "kube-system".into(),
        objects: vec![format!("service/{dns}"), format!("deployment/{dns}")],
    };
    let ports = json!([{"containerPort": 8053}, {"containerPort": 5353, "protocol": "UDP"}]);
    deploy(&env, "kube-system", &dns, ports).await;
    let dns_svc = ServiceBuilder::new(&dns)
        .app(&dns)
        .named_port("dns-tcp", "TCP", 53, Some(8053))
        .named_port("dns", "UDP", 53, Some(5353))
        .create(&env, "kube-system")
        .await;
    let vip = cluster_ip(&dns_svc);
    let original: Vec<String> = running(&env, "kube-system", &dns)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let url = format!("http://{vip}:53/");
    for netns in node_netns(&env) {
        wait_true(
            &format!("{url} from {netns}"),
            Duration::from_secs(30),
            &dump(&env),
            async || get(&netns, &url, SHORT).is_ok_and(|b| original.contains(&b)),
        )
        .await;
    }
    // The attacker's pods answer HTTP but never UDP: a hijacked UDP 53 gets no echo.
    deploy(&env, &ns.name, "evil", json!([{"containerPort": 8053}])).await;
    ServiceBuilder::new("evil")
        .app("evil")
        .set("externalIPs", json!([vip]))
        .named_port("dns-tcp", "TCP", 53, Some(8053))
        .named_port("dns", "UDP", 53, Some(5353))
        .create(&env, &ns.name)
        .await;
    let evil = running(&env, &ns.name, "evil").await;
    let message = warning(&env, &ns.name, "evil", "ExternalIPRefused").await;
    assert!(message.contains(&vip), "{message}");
    // Give every agent time to program the attacker's endpoints, then check each node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for netns in node_netns(&env) {
        for _ in 0..5 {
            let body = get(&netns, &url, SHORT).unwrap_or_else(|e| panic!("{netns}: {e}"));
            assert!(
                original.contains(&body),
                "{netns}: {url} answered by {body}, not {original:?} (attacker {evil:?})"
            );
            let echo = udp_in(&netns, &format!("{vip}:53"), "ping", SHORT)
                .unwrap_or_else(|e| panic!("UDP {vip}:53 from {netns}: {e}"));
            // The echo names the pod that answered.
            assert!(
                original.iter().any(|p| echo == format!("{p} ping")),
                "{netns}: UDP {vip}:53 answered {echo:?}, not by {original:?}"
            );
        }
    }
}

/// An externalIP equal to a node's address is refused: the node's own port stays the
/// node's, nothing is forwarded to the tenant's pods.
#[tokio::test]
async fn external_ip_equal_to_a_node_address_is_refused() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("aaa").await;
    let node_ip = env.info.nodes[1].plan.ip.to_string();
    deploy(&env, &ns.name, "evil", json!([{"containerPort": 8080}])).await;
    ServiceBuilder::new("evil")
        .app("evil")
        .set("externalIPs", json!([node_ip]))
        .tcp(8081, 8080)
        .create(&env, &ns.name)
        .await;
    running(&env, &ns.name, "evil").await;
    let message = warning(&env, &ns.name, "evil", "ExternalIPRefused").await;
    assert!(message.contains("node address"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let url = format!("http://{node_ip}:8081/");
    for _ in 0..5 {
        let got = get(&env.info.client_netns, &url, SHORT);
        assert!(got.is_err(), "{url} from the client answered {got:?}");
    }
    // Another node's address minutes later is another refusal, and its Event says so:
    // the recorder's series would otherwise keep naming the first address.
    let other_ip = env.info.nodes[2].plan.ip.to_string();
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    api.patch(
        "evil",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"externalIPs": [other_ip]}})),
    )
    .await
    .expect("patch externalIPs");
    let message = warning_saying(&env, &ns.name, "evil", "ExternalIPRefused", &other_ip).await;
    assert!(message.contains("node address"), "{message}");
}

/// Two Services claim one externalIP and port: the older one keeps it although its name
/// sorts after the newer one's; the newer one gets a Warning Event.
#[tokio::test]
async fn equal_external_ip_claims_go_to_the_oldest_service_not_the_first_name() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("claims").await;
    let ip = free_ip();
    let _route = ClientRoute::add(&env, &ip);
    for app in ["zzz-old", "aaa-new"] {
        deploy(&env, &ns.name, app, json!([{"containerPort": 8080}])).await;
    }
    let old = running(&env, &ns.name, "zzz-old").await;
    running(&env, &ns.name, "aaa-new").await;
    let url = format!("http://{ip}/");
    ServiceBuilder::new("zzz-old")
        .app("zzz-old")
        .set("externalIPs", json!([ip]))
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    wait_true(
        &format!("{url} answered by zzz-old"),
        Duration::from_secs(30),
        &dump(&env),
        async || get(&env.info.client_netns, &url, SHORT).is_ok_and(|b| b == old[0].0),
    )
    .await;
    // creationTimestamp has one-second resolution: the newer one is a second younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ServiceBuilder::new("aaa-new")
        .app("aaa-new")
        .set("externalIPs", json!([ip]))
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let message = warning(&env, &ns.name, "aaa-new", "FrontendConflict").await;
    assert!(message.contains("zzz-old"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..10 {
        let body = get(&env.info.client_netns, &url, SHORT).expect("answer");
        assert_eq!(body, old[0].0, "the older Service keeps the address");
    }
}

/// Sets `status.loadBalancer.ingress` of a Service (no controller owns these Services).
async fn set_ingress(env: &TestEnv, ns: &str, name: &str, ip: &str) {
    Api::<Service>::namespaced(env.client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("ingress of {name}: {e}"));
}

/// Two Services on one load-balancer address and port with nested source ranges (which
/// nft cannot hold in one interval set): the newer one's frontend is left out with a
/// Warning Event, the older one still serves, and a Service created afterwards answers
/// from every node within 2 s.
#[tokio::test]
async fn nested_source_ranges_on_one_address_never_stop_other_services() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("nested").await;
    let ip = free_ip();
    let _route = ClientRoute::add(&env, &ip);
    for app in ["wide", "narrow", "third"] {
        deploy(&env, &ns.name, app, json!([{"containerPort": 8080}])).await;
    }
    let wide = running(&env, &ns.name, "wide").await;
    let client = format!("{}/32", env.info.client_ip);
    for (name, range) in [("wide", "198.18.0.0/16"), ("narrow", client.as_str())] {
        ServiceBuilder::load_balancer(name)
            .app(name)
            .source_ranges(&[range])
            .tcp(80, 8080)
            .create(&env, &ns.name)
            .await;
        set_ingress(&env, &ns.name, name, &ip).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let message = warning(&env, &ns.name, "narrow", "FrontendConflict").await;
    assert!(message.contains("wide"), "{message}");
    let url = format!("http://{ip}/");
    wait_true(
        &format!("{url} answered by wide"),
        Duration::from_secs(10),
        &dump(&env),
        async || get(&env.info.client_netns, &url, SHORT).is_ok_and(|b| b == wide[0].0),
    )
    .await;
    // The third Service: selector-less, with its EndpointSlice written at once, so the
    // 2 s measure only the agents' programming.
    let third = running(&env, &ns.name, "third").await;
    let svc = ServiceBuilder::new("third")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "third-1", "labels": {"kubernetes.io/service-name": "third"}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
        "endpoints": [{"addresses": [third[0].1], "conditions": {"ready": true}}],
    }))
    .expect("slice object");
    Api::<EndpointSlice>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &slice)
        .await
        .expect("create slice");
    let created = Instant::now();
    let url = format!("http://{}/", cluster_ip(&svc));
    let mut pending = node_netns(&env);
    while !pending.is_empty() && created.elapsed() < Duration::from_secs(2) {
        pending.retain(|netns| {
            get(netns, &url, Duration::from_millis(300)).map_or(true, |b| b != third[0].0)
        });
    }
    assert!(
        pending.is_empty(),
        "{url} not answered within 2 s from {pending:?}\n{}",
        dump(&env).report().await
    );
}
