//! berth-nodeproxy on the simulated cluster: every case sends real traffic through the
//! nftables rules the agents program in the node namespaces. Needs root and the running
//! local cluster with its node agents (`make test`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_e2e::env::NodeInfo;
use berth_e2e::nodeagent::{self, HoldAgent};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, curl_in, exec_in, wait_for};
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const SHORT: Duration = Duration::from_secs(3);

// ---------- fixtures ----------

/// A Deployment of `replicas` pods labelled `app=<name>` serving HTTP (pod name) on each
/// TCP port and echoing on each UDP port.
async fn deploy(env: &TestEnv, ns: &str, name: &str, replicas: i32, ports: serde_json::Value) {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "echo", "image": "berth/echo", "ports": ports}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap_or_else(|e| panic!("create deployment {name}: {e}"));
}

/// What a timed-out wait shows: every node agent's log.
fn agents(env: &TestEnv) -> Diagnostics {
    Diagnostics::new(env).node_agents(&env.info)
}

fn http_ports() -> serde_json::Value {
    json!([{"containerPort": 8080}])
}

fn cluster_ip(svc: &Service) -> String {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("clusterIP")
}

fn node_port(svc: &Service, i: usize) -> i32 {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.get(i))
        .and_then(|p| p.node_port)
        .expect("nodePort")
}

/// Running pods of `app` with their IPs, once there are exactly `n`.
async fn pods(env: &TestEnv, ns: &str, app: &str, n: usize) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let running = |l: &[Pod]| -> Vec<Pod> {
        l.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                let st = p.status.as_ref();
                st.and_then(|s| s.phase.as_deref()) == Some("Running")
                    && st.and_then(|s| s.pod_ip.as_deref()).is_some()
            })
            .cloned()
            .collect()
    };
    wait_true(
        &format!("{n} running pods of {app}"),
        Duration::from_secs(90),
        &agents(env),
        async || {
            api.list(&lp)
                .await
                .map(|l| running(&l.items).len() == n && l.items.len() == n)
                .unwrap_or(false)
        },
    )
    .await;
    running(&api.list(&lp).await.expect("list pods").items)
}

fn pod_names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP")
}

fn pod_node(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("node name")
}

/// Waits until the Service's EndpointSlices list exactly `ips` as ready.
async fn wait_endpoints(env: &TestEnv, ns: &str, svc: &str, ips: &BTreeSet<String>) {
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    wait_true(
        &format!("EndpointSlices of {svc} = {ips:?}"),
        Duration::from_secs(60),
        &agents(env),
        async || {
            let Ok(l) = slices.list(&lp).await else {
                return false;
            };
            let ready: BTreeSet<String> = l
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .flat_map(|e| e.addresses.first().cloned())
                .collect();
            &ready == ips
        },
    )
    .await;
}

fn ips(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter().map(pod_ip).collect()
}

fn nodes(env: &TestEnv) -> &[NodeInfo] {
    &env.info.nodes
}

fn node_named<'a>(env: &'a TestEnv, name: &str) -> &'a NodeInfo {
    env.info
        .nodes
        .iter()
        .find(|n| n.plan.name == name)
        .unwrap_or_else(|| panic!("node {name}"))
}

fn get(netns: &str, url: &str) -> Result<String, String> {
    curl_in(netns, url, SHORT)
        .map(|b| b.trim().to_string())
        .map_err(|e| e.to_string())
}

/// `n` sequential requests, each on a new connection, from inside `netns`: the answers
/// ("OK <body>" or "FAIL <curl exit code>").
fn requests(netns: &str, url: &str, n: usize) -> Vec<String> {
    let script = format!(
        "for i in $(seq {n}); do b=$(curl -s --fail --max-time 2 --noproxy '*' '{url}'); \
         rc=$?; if [ $rc = 0 ]; then echo \"OK $b\"; else echo \"FAIL $rc\"; fi; done"
    );
    let out = exec_in(netns, &["sh", "-c", &script]).expect("request loop");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

fn tally(answers: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a.clone()).or_default() += 1;
    }
    t
}

/// Waits until `n` consecutive requests are answered only by `expected` pods.
async fn wait_served_by(netns: &str, url: &str, expected: &BTreeSet<String>, n: usize, what: &str) {
    let want: BTreeSet<String> = expected.iter().map(|p| format!("OK {p}")).collect();
    let mut last = Vec::new();
    let ok = wait_for(what, Duration::from_secs(30), || {
        last = requests(netns, url, n);
        let got: BTreeSet<String> = last.iter().cloned().collect();
        let good = got.is_subset(&want) && (n < 4 * expected.len() || got == want);
        async move { good }
    })
    .await;
    if let Err(e) = ok {
        panic!("{e}; last answers: {:?}", tally(&last));
    }
}

/// A host route in the client namespace, removed on drop (also when the test fails).
struct ClientRoute {
    netns: String,
    prefix: String,
}

impl ClientRoute {
    fn add(env: &TestEnv, ip: &str, via: &NodeInfo) -> Self {
        let prefix = format!("{ip}/32");
        let out = Command::new("ip")
            .args([
                "-n",
                &env.info.client_netns,
                "route",
                "replace",
                &prefix,
                "via",
            ])
            .arg(via.plan.ip.to_string())
            .output()
            .expect("ip route");
        assert!(
            out.status.success(),
            "route {prefix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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

/// An address for this test run in 198.19.9.0/24, this suite's range (the L2 suite
/// announces 198.19.8.0/24 and the controller's pool suite 198.19.1.0-198.19.7.255).
fn pool_ip() -> String {
    format!("198.19.9.{}", rand::random_range(10..250u8))
}

fn http_status(netns: &str, url: &str) -> (String, String) {
    let out = exec_in(
        netns,
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            "--noproxy",
            "*",
            "-w",
            "\n%{http_code}",
            url,
        ],
    )
    .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().to_string(), body.to_string())
}

/// Cases that need every agent up hold this shared; the restart case holds it exclusively,
/// so stopping an agent never disturbs another case running at the same time.
static AGENTS_UP: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

type AgentsUp = tokio::sync::RwLockReadGuard<'static, ()>;

async fn setup(prefix: &str) -> (TestEnv, TestNamespace, AgentsUp) {
    let up = AGENTS_UP.read().await;
    let (env, ns) = connect(prefix).await;
    (env, ns, up)
}

async fn connect(prefix: &str) -> (TestEnv, TestNamespace) {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace(prefix).await;
    (env, ns)
}

// ---------- cases ----------

/// The seed's nginx Deployment and `nginx-service`: its ClusterIP answers from every node
/// and from a pod, and the apiserver's service proxy reaches it through `kubectl proxy`.
#[tokio::test]
async fn seed_nginx_service_answers_at_its_cluster_ip_from_nodes_pods_and_kubectl_proxy() {
    let (env, ns, _up) = setup("np-seed").await;
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    env.apply_example(&ns.name, "seed/nginx-service.yaml");
    let pods = pods(&env, &ns.name, "nginx", 3).await;
    wait_endpoints(&env, &ns.name, "nginx-service", &ips(&pods)).await;
    let svc = Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .get("nginx-service")
        .await
        .expect("service");
    let url = format!("http://{}/", cluster_ip(&svc));
    for n in nodes(&env) {
        wait_for(
            &format!("nginx at {url} from {}", n.plan.name),
            Duration::from_secs(20),
            || async { get(&n.plan.netns, &url).is_ok_and(|b| b.contains("Welcome to nginx!")) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", get(&n.plan.netns, &url)));
    }
    let uid = pods[0].metadata.uid.clone().expect("pod uid");
    let (pod_netns, _) = berth_e2e::net::pod_names(&uid);
    let body = get(&pod_netns, &url).unwrap_or_else(|e| panic!("from pod: {e}"));
    assert!(body.contains("Welcome to nginx!"), "{body}");

    let mut proxy = KubectlProxy::start(&env);
    let path = format!(
        "/api/v1/namespaces/{}/services/nginx-service/proxy/",
        ns.name
    );
    let body = Command::new("curl")
        .args(["-sf", "--max-time", "10", "--noproxy", "*"])
        .arg(format!("http://127.0.0.1:{}{path}", proxy.port))
        .output()
        .expect("curl kubectl proxy");
    proxy.stop();
    let body = String::from_utf8_lossy(&body.stdout);
    assert!(
        body.contains("Welcome to nginx!"),
        "kubectl proxy answer: {body}"
    );
}

/// `kubectl proxy` on a free local port, killed on drop.
struct KubectlProxy {
    child: Child,
    port: u16,
}

impl KubectlProxy {
    fn start(env: &TestEnv) -> Self {
        let mut child = Command::new(berth_e2e::paths::bin("kubectl"))
            .arg("--kubeconfig")
            .arg(&env.info.kubeconfig)
            .args(["proxy", "--port=0", "--address=127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl proxy");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("kubectl proxy said {line:?}"));
        Self { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KubectlProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A NodePort answers from the outside world on every node's address.
#[tokio::test]
async fn node_port_answers_from_the_client_on_every_node() {
    let (env, ns, _up) = setup("np-nodeport").await;
    deploy(&env, &ns.name, "web", 2, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .type_("NodePort")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 2).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let np = node_port(&svc, 0);
    let names = pod_names(&pods);
    for n in nodes(&env) {
        let url = format!("http://{}:{np}/", n.plan.ip);
        wait_for(
            &format!("{url} from the client"),
            Duration::from_secs(20),
            || async { get(&env.info.client_netns, &url).is_ok_and(|b| names.contains(&b)) },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", get(&env.info.client_netns, &url)));
    }
}

/// 300 new connections to a ClusterIP spread fairly over its 3 pods.
#[tokio::test]
async fn three_hundred_requests_spread_fairly_over_three_pods() {
    let (env, ns, _up) = setup("np-spread").await;
    deploy(&env, &ns.name, "web", 3, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 3).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let url = format!("http://{}/", cluster_ip(&svc));
    let node = &nodes(&env)[0].plan.netns;
    wait_served_by(node, &url, &pod_names(&pods), 30, "all 3 pods answering").await;
    let answers = requests(node, &url, 300);
    let t = tally(&answers);
    assert_eq!(answers.len(), 300);
    assert_eq!(t.len(), 3, "answers: {t:?}");
    for p in pod_names(&pods) {
        let n = t.get(&format!("OK {p}")).copied().unwrap_or(0);
        // Fair share is 100; 60..=140 is about ±5 standard deviations of a fair split.
        assert!((60..=140).contains(&n), "{p} got {n} of 300: {t:?}");
    }
}

/// Scaling 3 → 5 → 1 is followed: traffic reaches exactly the current pods.
#[tokio::test]
async fn scaling_three_to_five_to_one_is_followed() {
    let (env, ns, _up) = setup("np-scale").await;
    deploy(&env, &ns.name, "web", 3, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let url = format!("http://{}/", cluster_ip(&svc));
    let node = nodes(&env)[1].plan.netns.clone();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns.name);
    for replicas in [3usize, 5, 1] {
        deployments
            .patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("scale");
        let pods = pods(&env, &ns.name, "web", replicas).await;
        wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
        wait_served_by(
            &node,
            &url,
            &pod_names(&pods),
            8 * replicas,
            &format!("{replicas} pods serving"),
        )
        .await;
        let answers = requests(&node, &url, 20);
        assert!(
            answers
                .iter()
                .all(|a| pod_names(&pods).contains(a.trim_start_matches("OK "))),
            "at {replicas} replicas: {:?}",
            tally(&answers)
        );
    }
}

/// `sessionAffinity: ClientIP` keeps one client on one pod.
#[tokio::test]
async fn client_ip_affinity_keeps_a_client_on_one_pod() {
    let (env, ns, _up) = setup("np-affinity").await;
    deploy(&env, &ns.name, "web", 3, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .app("web")
        .set("sessionAffinity", "ClientIP")
        .set(
            "sessionAffinityConfig",
            json!({"clientIP": {"timeoutSeconds": 300}}),
        )
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 3).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let url = format!("http://{}/", cluster_ip(&svc));
    for n in nodes(&env) {
        wait_true(
            "service answering",
            Duration::from_secs(20),
            &agents(&env),
            async || get(&n.plan.netns, &url).is_ok(),
        )
        .await;
        let t = tally(&requests(&n.plan.netns, &url, 40));
        assert_eq!(t.len(), 1, "client on {} saw {t:?}", n.plan.name);
        let only = t.keys().next().expect("one answer");
        assert!(
            pod_names(&pods).contains(only.trim_start_matches("OK ")),
            "{only}"
        );
    }
}

/// `externalTrafficPolicy: Local`: the pod sees the client's own address, nodes without a
/// local endpoint drop outside traffic (but not their own or their pods'), and the
/// health-check NodePort says who has endpoints.
#[tokio::test]
async fn external_traffic_policy_local_preserves_client_ip_and_reports_health() {
    let (env, ns, _up) = setup("np-etp").await;
    deploy(&env, &ns.name, "web", 1, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .type_("LoadBalancer")
        .external_local(true)
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 1).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let np = node_port(&svc, 0);
    let hc = svc
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .expect("healthCheckNodePort");
    let home = node_named(&env, &pod_node(&pods[0]));
    let client = env.info.client_netns.clone();
    let url = format!("http://{}:{np}/clientip", home.plan.ip);
    wait_for(
        "NodePort on the pod's node",
        Duration::from_secs(20),
        || async { get(&client, &url).is_ok() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", get(&client, &url)));
    assert_eq!(
        get(&client, &url).as_deref(),
        Ok(env.info.client_ip.as_str())
    );
    let hc_url = format!("http://{}:{hc}/", home.plan.ip);
    wait_for(
        "health check 200 on the pod's node",
        Duration::from_secs(20),
        || async { http_status(&client, &hc_url).0 == "200" },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", http_status(&client, &hc_url)));
    let (_, body) = http_status(&client, &hc_url);
    let v: serde_json::Value = serde_json::from_str(&body).expect("health check JSON");
    assert_eq!(v["localEndpoints"], 1, "{body}");
    for other in nodes(&env).iter().filter(|n| n.plan.name != home.plan.name) {
        let url = format!("http://{}:{np}/clientip", other.plan.ip);
        let r = get(&client, &url);
        assert!(
            r.is_err(),
            "{} has no local endpoint but answered {r:?}",
            other.plan.name
        );
        let (code, body) = http_status(&client, &format!("http://{}:{hc}/", other.plan.ip));
        assert_eq!(code, "503", "health check on {}: {body}", other.plan.name);
        // The node itself is not outside traffic: it reaches the remote endpoint.
        let own = get(
            &other.plan.netns,
            &format!("http://{}:{np}/", other.plan.ip),
        );
        assert_eq!(
            own.as_deref(),
            Ok(pods[0].metadata.name.as_deref().unwrap_or_default())
        );
    }
    // Nor are pods: one on a node without the endpoint reaches it through its node's port.
    deploy(&env, &ns.name, "probe", 3, http_ports()).await;
    let probes = self::pods(&env, &ns.name, "probe", 3).await;
    let probe = probes
        .iter()
        .find(|p| pod_node(p) != home.plan.name)
        .expect("a probe pod on a node without the endpoint");
    let probe_node = node_named(&env, &pod_node(probe));
    let (probe_netns, _) = berth_e2e::net::pod_names(&probe.metadata.uid.clone().expect("uid"));
    let r = get(
        &probe_netns,
        &format!("http://{}:{np}/", probe_node.plan.ip),
    );
    assert_eq!(
        r.as_deref(),
        Ok(pods[0].metadata.name.as_deref().unwrap_or_default())
    );
}

/// `internalTrafficPolicy: Local`: a node's ClusterIP traffic stays on that node's pods.
#[tokio::test]
async fn internal_traffic_policy_local_keeps_traffic_on_the_node() {
    let (env, ns, _up) = setup("np-itp").await;
    deploy(&env, &ns.name, "web", 3, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .app("web")
        .set("internalTrafficPolicy", "Local")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 3).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let url = format!("http://{}/", cluster_ip(&svc));
    let mut by_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &pods {
        by_node
            .entry(pod_node(p))
            .or_default()
            .extend(p.metadata.name.clone());
    }
    let mut checked = 0;
    for n in nodes(&env) {
        match by_node.get(&n.plan.name) {
            Some(local) => {
                wait_served_by(
                    &n.plan.netns,
                    &url,
                    local,
                    10,
                    &format!("local pods of {}", n.plan.name),
                )
                .await;
                checked += 1;
            }
            None => {
                let r = get(&n.plan.netns, &url);
                assert!(r.is_err(), "{} has no local pod but got {r:?}", n.plan.name);
            }
        }
    }
    assert!(checked > 0);
}

/// The seed's MySQL example written the real way: a selector-less Service and a
/// hand-written EndpointSlice (label `kubernetes.io/service-name`) listing real pod IPs.
#[tokio::test]
async fn selector_less_service_with_hand_written_endpointslice() {
    let (env, ns, _up) = setup("np-mysql").await;
    deploy(&env, &ns.name, "mysql", 3, json!([{"containerPort": 3306}])).await;
    let pods = pods(&env, &ns.name, "mysql", 3).await;
    env.apply_example(&ns.name, "seed/mysql-service.yaml");
    let endpoints: Vec<_> = pods
        .iter()
        .map(|p| json!({"addresses": [pod_ip(p)]}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "mysql-endpointslice",
                     "labels": {"kubernetes.io/service-name": "mysql-service"}},
        "addressType": "IPv4",
        "ports": [{"name": "mysql", "protocol": "TCP", "port": 3306}],
        "endpoints": endpoints,
    }))
    .expect("slice object");
    Api::<EndpointSlice>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &slice)
        .await
        .expect("create EndpointSlice");
    let svc = Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .get("mysql-service")
        .await
        .expect("service");
    let url = format!("http://{}:3306/", cluster_ip(&svc));
    wait_served_by(
        &nodes(&env)[2].plan.netns,
        &url,
        &pod_names(&pods),
        30,
        "all 3 hand-listed pods",
    )
    .await;
}

/// A Service without endpoints refuses connections at once (a reset, not a timeout).
#[tokio::test]
async fn service_without_endpoints_refuses_immediately() {
    let (env, ns, _up) = setup("np-noep").await;
    let svc = ServiceBuilder::new("empty")
        .app("nothing-here")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let url = format!("http://{}/", cluster_ip(&svc));
    let node = &nodes(&env)[0].plan.netns;
    // curl exit 7 = connection refused; 28 would be a timeout (dropped packets).
    wait_for("connection refused", Duration::from_secs(20), || async {
        requests(node, &url, 1) == vec!["FAIL 7".to_string()]
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", requests(node, &url, 1)));
    let all = requests(node, &url, 5);
    assert!(all.iter().all(|a| a == "FAIL 7"), "{all:?}");
}

/// One UDP "connection" (fixed source port) keeps working when the Service's only pod is
/// replaced: the stale conntrack entry to the old pod is deleted, not left to expire.
#[tokio::test]
async fn udp_service_keeps_working_when_its_only_endpoint_is_replaced() {
    let (env, ns, _up) = setup("np-udp").await;
    deploy(
        &env,
        &ns.name,
        "dns",
        1,
        json!([{"containerPort": 5353, "protocol": "UDP"}]),
    )
    .await;
    let svc = ServiceBuilder::new("dns")
        .app("dns")
        .udp(53, 5353)
        .create(&env, &ns.name)
        .await;
    let first = pods(&env, &ns.name, "dns", 1).await;
    wait_endpoints(&env, &ns.name, "dns", &ips(&first)).await;
    let target = format!("{}:53", cluster_ip(&svc));
    let node = nodes(&env)[0].plan.netns.clone();
    let old = first[0].metadata.name.clone().expect("name");
    let send = || udp_from_port(&node, &target, 40053);
    wait_for(
        "UDP answer from the first pod",
        Duration::from_secs(20),
        || async { send().is_some_and(|r| r.starts_with(&old)) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", send()));
    Api::<Pod>::namespaced(env.client.clone(), &ns.name)
        .delete(&old, &DeleteParams::default())
        .await
        .expect("delete pod");
    // Keep the flow alive meanwhile, as a real client would: without the conntrack
    // cleanup the entry to the dead pod would never expire.
    let mut answers = Vec::new();
    let switched = wait_for(
        "UDP answer from the replacement pod",
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
    if let Err(e) = switched {
        panic!("{e}; answers: {answers:?}");
    }
}

/// One datagram "ping" from a fixed source port; the answer, if any.
fn udp_from_port(netns: &str, target: &str, sport: u16) -> Option<String> {
    let cmd = format!("printf ping | socat -T 1 - UDP:{target},sourceport={sport},reuseaddr");
    let out = exec_in(netns, &["sh", "-c", &cmd]).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// A load-balancer ingress IP and an external IP, routed by the outside world to a node,
/// reach the pods.
#[tokio::test]
async fn load_balancer_and_external_ips_routed_to_a_node_reach_pods() {
    let (env, ns, _up) = setup("np-lbip").await;
    deploy(&env, &ns.name, "web", 2, http_ports()).await;
    let lb_ip = pool_ip();
    let ext_ip = loop {
        let ip = pool_ip();
        if ip != lb_ip {
            break ip;
        }
    };
    ServiceBuilder::new("web")
        .type_("LoadBalancer")
        .app("web")
        .set("externalIPs", json!([ext_ip]))
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": lb_ip, "ipMode": "VIP"}]}}}),
            ),
        )
        .await
        .expect("set load-balancer ingress");
    let pods = pods(&env, &ns.name, "web", 2).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let via = &nodes(&env)[1];
    let _lb_route = ClientRoute::add(&env, &lb_ip, via);
    let _ext_route = ClientRoute::add(&env, &ext_ip, via);
    for ip in [&lb_ip, &ext_ip] {
        let url = format!("http://{ip}/");
        wait_served_by(
            &env.info.client_netns,
            &url,
            &pod_names(&pods),
            16,
            &format!("{ip} from the client"),
        )
        .await;
    }
}

/// `loadBalancerSourceRanges` admits listed sources and drops the others.
#[tokio::test]
async fn load_balancer_source_ranges_are_enforced() {
    let (env, ns, _up) = setup("np-ranges").await;
    deploy(&env, &ns.name, "web", 1, http_ports()).await;
    let allowed_ip = pool_ip();
    let denied_ip = loop {
        let ip = pool_ip();
        if ip != allowed_ip {
            break ip;
        }
    };
    let client_range = format!("{}/32", env.info.client_ip);
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    for (name, range, ip) in [
        ("allowed", client_range.as_str(), &allowed_ip),
        ("denied", "203.0.113.0/24", &denied_ip),
    ] {
        ServiceBuilder::new(name)
            .type_("LoadBalancer")
            .app("web")
            .source_ranges(&[range])
            .tcp(80, 8080)
            .create(&env, &ns.name)
            .await;
        services
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})),
            )
            .await
            .expect("set load-balancer ingress");
    }
    let pods = pods(&env, &ns.name, "web", 1).await;
    wait_endpoints(&env, &ns.name, "allowed", &ips(&pods)).await;
    wait_endpoints(&env, &ns.name, "denied", &ips(&pods)).await;
    let via = &nodes(&env)[0];
    let _r1 = ClientRoute::add(&env, &allowed_ip, via);
    let _r2 = ClientRoute::add(&env, &denied_ip, via);
    let client = env.info.client_netns.clone();
    wait_served_by(
        &client,
        &format!("http://{allowed_ip}/"),
        &pod_names(&pods),
        4,
        "allowed source",
    )
    .await;
    // The same pod, the same node, but the client is outside the denied Service's range.
    let denied = requests(&client, &format!("http://{denied_ip}/"), 3);
    assert!(denied.iter().all(|a| a.starts_with("FAIL")), "{denied:?}");
    // The node itself (198.18.x.10) is outside both ranges too: its ClusterIP still works.
    let svc = services.get("denied").await.expect("service");
    let r = get(&via.plan.netns, &format!("http://{}/", cluster_ip(&svc)));
    assert!(r.is_ok(), "ClusterIP of a range-restricted Service: {r:?}");
}

/// A pod reaching itself through its own Service (hairpin) is answered.
#[tokio::test]
async fn pod_reaches_itself_through_its_service() {
    let (env, ns, _up) = setup("np-hairpin").await;
    deploy(&env, &ns.name, "web", 1, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 1).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let (pod_netns, _) = berth_e2e::net::pod_names(&pods[0].metadata.uid.clone().expect("uid"));
    let url = format!("http://{}/clientip", cluster_ip(&svc));
    wait_for("hairpin answer", Duration::from_secs(20), || async {
        get(&pod_netns, &url).is_ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", get(&pod_netns, &url)));
    // Masqueraded to the node's pod gateway, or the reply would never leave the pod.
    let seen = get(&pod_netns, &url).expect("hairpin");
    assert_ne!(
        seen,
        pod_ip(&pods[0]),
        "hairpin traffic must be masqueraded"
    );
}

/// Killing a node's agent (twice, SIGKILL then SIGTERM) under a steady request loop loses
/// no request and keeps an established connection: rules stay in place while it is down
/// and the restart replaces them atomically. While an agent is held down, a new Service is not programmed on its node;
/// once it is back, it converges.
#[tokio::test]
async fn agent_restart_under_steady_load_loses_no_request() {
    let _exclusive = AGENTS_UP.write().await;
    let (env, ns) = connect("np-restart").await;
    deploy(&env, &ns.name, "web", 3, http_ports()).await;
    let svc = ServiceBuilder::new("web")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    let pods = pods(&env, &ns.name, "web", 3).await;
    wait_endpoints(&env, &ns.name, "web", &ips(&pods)).await;
    let node = nodes(&env)[2].clone();
    let url = format!("http://{}/", cluster_ip(&svc));
    wait_served_by(&node.plan.netns, &url, &pod_names(&pods), 24, "all pods").await;

    let script = format!(
        "for i in $(seq 400); do curl -s --fail --max-time 2 --noproxy '*' '{url}' >/dev/null \
         && echo OK || echo FAIL; sleep 0.01; done"
    );
    let vip: std::net::IpAddr = cluster_ip(&svc).parse().expect("clusterIP");
    let held = HeldConnection::open(&node.plan.netns, std::net::SocketAddr::new(vip, 80));
    let first = held
        .request()
        .unwrap_or_else(|e| panic!("held connection: {e}"));
    let load = Command::new("ip")
        .args(["netns", "exec", &node.plan.netns, "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("request loop");
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let pid = nodeagent::agent_pid(&node.plan.name).expect("agent pid");
        // SAFETY: kill(2) of the agent the harness started, found by its pid file.
        unsafe { libc::kill(pid, signal) };
        wait_true(
            "agent restarted",
            Duration::from_secs(30),
            &agents(&env),
            async || nodeagent::agent_pid(&node.plan.name).is_some_and(|p| p != pid),
        )
        .await;
        nodeagent::wait_healthy(&node.plan, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = load.wait_with_output().expect("request loop output");
    let t = tally(
        &String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>(),
    );
    assert_eq!(t.get("OK").copied(), Some(400), "{t:?}");
    // The connection opened before the restarts still works, still to the same pod.
    assert_eq!(
        held.request(),
        Ok(first),
        "established connection across restarts"
    );

    // Held down: changes wait; released: the restarted agent converges.
    let hold = HoldAgent::new(&node.plan.name);
    let pid = nodeagent::agent_pid(&node.plan.name).expect("agent pid");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_true(
        "agent stopped",
        Duration::from_secs(30),
        &agents(&env),
        async || nodeagent::agent_pid(&node.plan.name).is_none(),
    )
    .await;
    let late = ServiceBuilder::new("late")
        .app("web")
        .tcp(80, 8080)
        .create(&env, &ns.name)
        .await;
    wait_endpoints(&env, &ns.name, "late", &ips(&pods)).await;
    let late_url = format!("http://{}/", cluster_ip(&late));
    let other = &nodes(&env)[0].plan.netns;
    wait_served_by(
        other,
        &late_url,
        &pod_names(&pods),
        24,
        "new Service on a running agent's node",
    )
    .await;
    assert!(
        get(&node.plan.netns, &late_url).is_err(),
        "programmed without an agent?"
    );
    // The old Service still works while the agent is down.
    assert!(
        requests(&node.plan.netns, &url, 10)
            .iter()
            .all(|a| a.starts_with("OK"))
    );
    drop(hold);
    wait_served_by(
        &node.plan.netns,
        &late_url,
        &pod_names(&pods),
        24,
        "new Service after the restart",
    )
    .await;
}

/// A keep-alive HTTP connection opened from inside a node's namespace (a thread that
/// joined it with setns), used for several requests over time.
struct HeldConnection {
    requests: std::sync::mpsc::Sender<()>,
    answers: std::sync::mpsc::Receiver<Result<String, String>>,
}

impl HeldConnection {
    fn open(netns: &str, addr: std::net::SocketAddr) -> Self {
        let (req_tx, req_rx) = std::sync::mpsc::channel::<()>();
        let (ans_tx, ans_rx) = std::sync::mpsc::channel();
        let path = format!("/var/run/netns/{netns}");
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            use std::os::fd::AsRawFd;
            let joined = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    // SAFETY: setns(2) of this thread only, into a namespace file we opened.
                    match unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error().to_string()),
                    }
                });
            let mut stream = match joined.and_then(|()| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    .map_err(|e| e.to_string())
            }) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ans_tx.send(Err(e));
                    return;
                }
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
            while req_rx.recv().is_ok() {
                let answer = stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: berth\r\n\r\n")
                    .and_then(|()| {
                        let mut buf = vec![0u8; 4096];
                        let n = stream.read(&mut buf)?;
                        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
                    })
                    .map_err(|e| e.to_string());
                if ans_tx.send(answer).is_err() {
                    return;
                }
            }
        });
        Self {
            requests: req_tx,
            answers: ans_rx,
        }
    }

    /// One request on the held connection: the pod that answered.
    fn request(&self) -> Result<String, String> {
        self.requests.send(()).map_err(|e| e.to_string())?;
        let raw = self
            .answers
            .recv_timeout(Duration::from_secs(5))
            .map_err(|e| e.to_string())??;
        raw.lines()
            .find_map(|l| l.strip_prefix("X-Berth-Pod: "))
            .map(|p| p.trim().to_string())
            .ok_or_else(|| format!("no pod header in {raw:?}"))
    }
}

/// Each agent serves `/healthz`, and Prometheus `/metrics` with its sync figures on its
/// metrics port only.
#[tokio::test]
async fn agents_report_health_and_metrics() {
    let (env, _ns, _up) = setup("np-metrics").await;
    for n in nodes(&env) {
        let base = format!("http://{}:{}", n.plan.ip, nodeagent::ADMIN_PORT);
        let (code, body) = http_status(&env.info.client_netns, &format!("{base}/healthz"));
        assert_eq!(code, "200", "{body}");
        let (code, _) = http_status(&env.info.client_netns, &format!("{base}/metrics"));
        assert_eq!(
            code, "404",
            "/metrics on the healthz port of {}",
            n.plan.name
        );
        let metrics_url = format!("http://{}:{}/metrics", n.plan.ip, nodeagent::METRICS_PORT);
        let (code, metrics) = http_status(&env.info.client_netns, &metrics_url);
        assert_eq!(code, "200");
        for family in [
            "berth_nodeproxy_full_sync_duration_seconds_count",
            "berth_nodeproxy_partial_sync_duration_seconds_count",
            "berth_nodeproxy_endpointslice_programming_latency_seconds_count",
            "berth_nodeproxy_sync_failures_total",
            "berth_nodeproxy_elements_programmed",
        ] {
            assert!(
                metrics.contains(family),
                "{family} missing on {}",
                n.plan.name
            );
        }
        let elements: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("berth_nodeproxy_elements_programmed "))
            .and_then(|v| v.trim().parse().ok())
            .expect("elements gauge");
        assert!(elements > 0.0, "no elements programmed on {}", n.plan.name);
    }
}
