//! A pool (L2) address on a node's interface answers only on the Service ports it was
//! allocated for: sshd's port, the agent's metrics and healthz ports, the Service's own
//! NodePort and a test listener on the node's 0.0.0.0 are refused or dropped on it, and
//! still answer on the node address. No controller runs: the case creates a `pool`
//! LoadBalancerClass and writes the Service's owner annotation and status itself, as in
//! the l2 suite. Addresses come from 198.19.41.0/28, this suite's block. Needs root and the
//! running local cluster with its node agents (`make test`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_e2e::agentstate::sh_in;
use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::nodeagent::{ADMIN_PORT, METRICS_PORT};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const POOL: &str = "198.19.41.0/28";
const LISTENER_PORT: u16 = 18741;

/// A TCP listener on 0.0.0.0 of a node's namespace answering `host-listener`; stopped on
/// drop.
struct HostListener(Child);

impl HostListener {
    fn start(netns: &str) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "socat"])
            .arg(format!("TCP-LISTEN:{LISTENER_PORT},fork,reuseaddr"))
            .arg("SYSTEM:echo host-listener")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start socat in {netns}: {e}"));
        Self(child)
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a TCP connection from the client to `ip:port` is accepted, and what the peer
/// sent before closing (2 s to connect).
fn connect_from_client(env: &TestEnv, ip: &str, port: u16) -> Result<String, String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &env.info.client_netns,
            "socat",
            "-T",
            "2",
            "-",
        ])
        .arg(format!("TCP:{ip}:{port},connect-timeout=2"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

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
        .unwrap_or_else(|e| panic!("set load-balancer status of {name}: {e}"));
}

/// The Service's first NodePort.
async fn node_port(env: &TestEnv, ns: &str, name: &str) -> u16 {
    let svc = Api::<Service>::namespaced(env.client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("get {name}: {e}"));
    svc.spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().and_then(|p| p.node_port))
        .and_then(|p| u16::try_from(p).ok())
        .expect("nodePort")
}

#[tokio::test]
async fn pool_address_answers_only_its_service_port_and_host_listeners_stay_on_the_node_address() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("pool-fw").await;
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-lan", ns.name),
        json!({"pool": {"addresses": [POOL]}}),
    );
    let ip = "198.19.41.5";
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    ServiceBuilder::load_balancer("nginx")
        .owner_class(&class.name)
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    set_ingress(&env, &ns.name, "nginx", ip).await;
    let dump = Diagnostics::new(&env).node_agents(&env.info);
    let settle = Duration::from_secs(60);

    let holder = wait_until(
        "one node holds the address",
        settle,
        &dump,
        async || match env.nodes_with_address(ip).as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{ip} on {other:?}")),
        },
    )
    .await;
    let plan = &env
        .info
        .nodes
        .iter()
        .find(|n| n.plan.name == holder)
        .expect("holder node")
        .plan;
    let node_ip = plan.ip.to_string();
    let _listener = HostListener::start(&plan.netns);
    wait_until(
        "nginx on the pool address",
        settle,
        &dump,
        async || match curl_in(
            &env.info.client_netns,
            &format!("http://{ip}/"),
            Duration::from_secs(2),
        ) {
            Ok(b) if b.contains("Welcome to nginx!") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    wait_until(
        "the test listener on the node address",
        settle,
        &dump,
        async || {
            connect_from_client(&env, &node_ip, LISTENER_PORT)
                .and_then(|s| if s == "host-listener" { Ok(()) } else { Err(s) })
        },
    )
    .await;

    let nodeport = node_port(&env, &ns.name, "nginx").await;
    for port in [22, METRICS_PORT, ADMIN_PORT, LISTENER_PORT, nodeport] {
        let answer = connect_from_client(&env, ip, port);
        assert!(
            answer.is_err(),
            "{ip}:{port} on {holder} accepted a connection from the client: {answer:?}"
        );
    }
    // Host listeners and NodePorts stay reachable on the node address.
    assert_eq!(
        connect_from_client(&env, &node_ip, LISTENER_PORT).as_deref(),
        Ok("host-listener")
    );
    for port in [ADMIN_PORT, nodeport] {
        assert!(
            connect_from_client(&env, &node_ip, port).is_ok(),
            "{node_ip}:{port} refused"
        );
    }
    // Every node, not only the holder, drops host traffic to the address: it may move to
    // any of them at any moment.
    for n in &env.info.nodes {
        let netns = n.plan.netns.clone();
        wait_until(
            &format!("{ip} in lb-addresses on {}", n.plan.name),
            settle,
            &dump,
            async || match sh_in(&netns, "nft list set ip berth lb-addresses") {
                (true, out) if out.contains(ip) => Ok(()),
                (_, out) => Err(out),
            },
        )
        .await;
    }
    let page = curl_in(
        &env.info.client_netns,
        &format!("http://{ip}/"),
        Duration::from_secs(2),
    );
    assert!(
        page.as_deref()
            .is_ok_and(|b| b.contains("Welcome to nginx!")),
        "the Service port still answers: {page:?}"
    );
}
