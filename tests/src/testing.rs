//! Helpers for the end-to-end suites: connect to the running environment, isolate a case
//! in its own Kubernetes namespace, and send traffic from the simulated hosts.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use crate::env::EnvInfo;
use crate::error::{Error, Result};
use crate::paths;

pub use crate::proc::wait_for;

/// The running environment as a test sees it. Fails (never skips) when none is running.
pub struct TestEnv {
    pub info: EnvInfo,
    pub client: Client,
}

impl TestEnv {
    pub async fn connect() -> Self {
        let info = EnvInfo::load().unwrap_or_else(|e| panic!("{e}"));
        let client = crate::client_from_kubeconfig(&info.kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self { info, client }
    }

    /// Waits until every node's harness agent reports healthy (a case that needs Service
    /// traffic or announcement from all nodes starts from there).
    pub async fn wait_agents_healthy(&self) {
        for n in &self.info.nodes {
            crate::nodeagent::wait_healthy(&n.plan, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// A fresh namespace named `<prefix>-<random>`, deleted when the guard drops.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"berth.dev/e2e": "true"}}
        }))
        .expect("static namespace object");
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TestNamespace {
            name,
            kubeconfig: self.info.kubeconfig.display().to_string(),
        }
    }

    /// Runs kubectl against the environment; panics with its stderr on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self
            .kubectl_output(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")));
        if !out.status.success() {
            panic!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -n <namespace> -f examples/<path>`.
    pub fn apply_example(&self, namespace: &str, path: &str) -> String {
        self.kubectl(&["apply", "-n", namespace, "-f", &example(path)])
    }

    pub fn kubectl_output(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new(paths::bin("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.info.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Names of the nodes whose `eth0` carries `ip` as a host address (an announced pool
    /// address), in node order.
    pub fn nodes_with_address(&self, ip: &str) -> Vec<String> {
        let host = format!(" {ip}/32 ");
        self.info
            .nodes
            .iter()
            .filter(|n| {
                Command::new("ip")
                    .args(["-n", &n.plan.netns, "-o", "addr", "show", "dev", "eth0"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&host))
            })
            .map(|n| n.plan.name.clone())
            .collect()
    }

    /// Events about the object `name` in `namespace`, as (type, reason, message).
    pub async fn events(&self, namespace: &str, name: &str) -> Vec<(String, String, String)> {
        events_in(&self.client, namespace, name).await
    }

    /// AWS SDK configuration for the environment's LocalStack.
    pub async fn aws(&self) -> aws_config::SdkConfig {
        crate::localstack::sdk_config(&self.info.localstack_endpoint).await
    }
}

/// Events about the object `name` in `namespace`, as (type, reason, message); none when
/// they cannot be listed.
pub async fn events_in(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .map(|e| {
                    (
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A Kubernetes namespace for one test case; deleted (without waiting) on drop.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: String,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new(paths::bin("kubectl"))
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "delete",
                "namespace",
                &self.name,
            ])
            .arg("--wait=false")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `argv` inside network namespace `netns`.
pub fn exec_in(netns: &str, argv: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("ip netns exec", netns))
}

/// HTTP GET from inside `netns`; the body on a 2xx answer, an error otherwise.
pub fn curl_in(netns: &str, url: &str, timeout: Duration) -> Result<String> {
    let secs = format!("{:.1}", timeout.as_secs_f64());
    let out = exec_in(
        netns,
        &[
            "curl",
            // No URL globbing: the brackets of an IPv6 literal are part of the address.
            "-g",
            "-sS",
            "--fail",
            "--max-time",
            &secs,
            "--noproxy",
            "*",
            url,
        ],
    )?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("curl {url} in {netns}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The harness's pod server run straight in a namespace (no Pod), answering `name` on a
/// TCP port; it listens on `::`, so on the namespace's IPv4 and IPv6 addresses. Stopped
/// on drop.
pub struct PodServer(std::process::Child);

impl PodServer {
    pub fn start(netns: &str, name: &str, port: u16) -> Self {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(crate::paths::sibling_bin("berth-podserver"))
            .args(["--name", name, "--tcp", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn berth-podserver");
        Self(child)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one UDP datagram from inside `netns` to `addr` (`ip:port`) and returns the first
/// answer, trimmed; an error when none arrives within `timeout`.
pub fn udp_in(netns: &str, addr: &str, payload: &str, timeout: Duration) -> Result<String> {
    use std::io::Write;
    let secs = format!("{:.1}", timeout.as_secs_f64());
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "socat", "-T", &secs, "-"])
        .arg(format!("UDP:{addr}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("spawn socat", netns))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(payload.as_bytes())
            .map_err(Error::io("write to socat", netns))?;
    }
    let out = child
        .wait_with_output()
        .map_err(Error::io("wait for socat", netns))?;
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if reply.is_empty() {
        return Err(Error::Command {
            command: format!("udp {addr} from {netns}"),
            status: out.status.to_string(),
            stderr: format!("no answer; {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(reply)
}

/// Repository-relative path of an example manifest.
pub fn example(path: &str) -> String {
    paths::repo_root()
        .join("examples")
        .join(path)
        .display()
        .to_string()
}

/// The Service's `berth.dev/LoadBalancerReady` condition as (status, reason, message).
pub fn lb_condition(svc: &Service) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == berth_crds::CONDITION_LB_READY)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The hostname in the Service's `status.loadBalancer.ingress`, if any.
pub fn lb_hostname(svc: &Service) -> Option<String> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.hostname.clone())
}

/// The IPs in the Service's `status.loadBalancer.ingress`.
pub fn lb_ips(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|v| v.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
}

/// A node cordoned (`kubectl cordon`) while alive; uncordoned on drop, also after a
/// failure.
pub struct Cordon<'a> {
    env: &'a TestEnv,
    node: String,
}

impl<'a> Cordon<'a> {
    pub fn new(env: &'a TestEnv, node: &str) -> Self {
        env.kubectl(&["cordon", node]);
        Self {
            env,
            node: node.to_string(),
        }
    }
}

impl Drop for Cordon<'_> {
    fn drop(&mut self) {
        let _ = self.env.kubectl_output(&["uncordon", &self.node]);
    }
}

/// A label `key=yes` on a node (`kubectl label`); removed on drop, also after a failure.
pub struct NodeLabel<'a> {
    env: &'a TestEnv,
    node: String,
    key: String,
}

impl<'a> NodeLabel<'a> {
    pub fn new(env: &'a TestEnv, node: &str, key: &str) -> Self {
        env.kubectl(&["label", "node", node, &format!("{key}=yes"), "--overwrite"]);
        Self {
            env,
            node: node.to_string(),
            key: key.to_string(),
        }
    }
}

impl Drop for NodeLabel<'_> {
    fn drop(&mut self) {
        let _ = self
            .env
            .kubectl_output(&["label", "node", &self.node, &format!("{}-", self.key)]);
    }
}
