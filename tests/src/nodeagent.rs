//! berth's node agent on every simulated node: `berth-nodeproxy` runs inside the node's
//! namespace (as the DaemonSet's hostNetwork pod would), with the environment's
//! kubeconfig, under a supervisor that restarts it when it dies.
//!
//! Tests stop an agent by signalling the pid in [`pid_file`]; while [`hold_file`] exists
//! the supervisor does not restart it. `BERTH_E2E_NODEPROXY=0` starts the environment
//! without agents (a later suite installs them through Helm).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::env::EnvInfo;
use crate::error::{Error, Result};
use crate::net::{CLUSTER_CIDR, NodePlan, SERVICE_CIDR};
use crate::paths;
use crate::proc::{Supervised, wait_for};

/// Port of each agent's `/healthz` on its node address.
pub const ADMIN_PORT: u16 = 10256;

/// Port of each agent's `/metrics` on its node address (the healthz port does not serve
/// it).
pub const METRICS_PORT: u16 = 10249;

/// `--l2-lease-duration` of the harness's agents: short, so failover tests are quick
/// (the default is 15 s). Not shorter: at 500 addresses a 4 s Lease meant 375 renewals a
/// second from debug-built agents against one apiserver on two cores, and a loaded CI
/// machine then missed a renewal by more than the 2.7 s of slack.
pub const L2_LEASE_SECONDS: u64 = 6;

/// UDP port the harness's agents probe each other on (the agent's default).
pub const PEER_PROBE_PORT: u16 = 7947;

/// Namespace of the agents' pool-address Leases.
pub const L2_LEASE_NAMESPACE: &str = "kube-system";

/// Whether the environment runs node agents (`BERTH_E2E_NODEPROXY`, default on).
pub fn enabled() -> bool {
    std::env::var("BERTH_E2E_NODEPROXY").map_or(true, |v| v != "0")
}

/// The running agent's pid on `node`.
pub fn pid_file(node: &str) -> PathBuf {
    paths::state_dir().join(format!("nodeproxy-{node}.pid"))
}

/// While this file exists the supervisor leaves a dead agent dead.
pub fn hold_file(node: &str) -> PathBuf {
    paths::state_dir().join(format!("nodeproxy-{node}.hold"))
}

/// The agent's pid on `node`, from its pid file.
pub fn agent_pid(node: &str) -> Option<i32> {
    std::fs::read_to_string(pid_file(node))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sends `signal` to `node`'s agent (found by its pid file, checked to be an agent).
pub fn signal_agent(node: &str, signal: i32) {
    let pid = agent_pid(node)
        .filter(|p| is_agent(*p))
        .unwrap_or_else(|| panic!("no agent on {node}"));
    // SAFETY: kill(2) of the agent the harness started, found by its pid file.
    unsafe { libc::kill(pid, signal) };
}

/// Keeps a node's agent from being restarted while alive (the supervisor leaves it dead
/// while its [`hold_file`] exists); it is restarted after the drop.
pub struct HoldAgent(PathBuf);

impl HoldAgent {
    pub fn new(node: &str) -> Self {
        let path = hold_file(node);
        std::fs::write(&path, b"held by a test\n").expect("hold file");
        Self(path)
    }

    /// Holds `node`'s agent and sends it `signal`.
    pub fn stop(node: &str, signal: i32) -> Self {
        let hold = Self::new(node);
        signal_agent(node, signal);
        hold
    }
}

impl Drop for HoldAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn command(plan: &NodePlan, kubeconfig: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &plan.netns])
        .arg(paths::sibling_bin("berth-nodeproxy"))
        .args(["--node-name", &plan.name])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--service-cidr",
            SERVICE_CIDR,
        ])
        .args(["--healthz-bind", &format!("0.0.0.0:{ADMIN_PORT}")])
        .args(["--metrics-bind", &format!("0.0.0.0:{METRICS_PORT}")])
        .args(["--l2-lease-duration", &format!("{L2_LEASE_SECONDS}s")])
        .args(["--lease-namespace", L2_LEASE_NAMESPACE])
        .args(["--l2-peer-probe-port", &PEER_PROBE_PORT.to_string()])
        // Every externalIP allowed: the suites test the agent's other claim rules.
        .args(["--external-ip-cidrs", "0.0.0.0/0,::/0"])
        .env("RUST_LOG", "info,berth_nodeproxy=debug,kube=warn");
    cmd
}

/// Runs and restarts one node's agent until aborted (dropping it stops the agent).
async fn supervise(plan: NodePlan, kubeconfig: PathBuf, log_dir: PathBuf) {
    let mut generation = 0u32;
    loop {
        if hold_file(&plan.name).exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let log = log_dir.join(if generation == 0 {
            format!("nodeproxy-{}.log", plan.name)
        } else {
            format!("nodeproxy-{}.{generation}.log", plan.name)
        });
        let mut agent = match Supervised::spawn(
            &format!("nodeproxy {}", plan.name),
            command(&plan, &kubeconfig),
            &log,
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(node = %plan.name, "cannot start berth-nodeproxy: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let _ = std::fs::write(pid_file(&plan.name), agent.pid().to_string());
        while agent.exited().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(status) = agent.exited() {
            tracing::warn!(node = %plan.name, "berth-nodeproxy exited ({status}); restarting");
        }
        let _ = std::fs::remove_file(pid_file(&plan.name));
        generation += 1;
    }
}

/// The agents of every node.
pub struct NodeAgents {
    nodes: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeAgents {
    /// Starts an agent per node and waits until each reports a successful sync.
    pub async fn start(info: &EnvInfo) -> Result<Self> {
        let bin = paths::sibling_bin("berth-nodeproxy");
        if !bin.exists() {
            return Err(Error::Setup(format!(
                "{} not built (cargo build --workspace --bins)",
                bin.display()
            )));
        }
        let mut tasks = Vec::new();
        for n in &info.nodes {
            let _ = std::fs::remove_file(hold_file(&n.plan.name));
            tasks.push(tokio::spawn(supervise(
                n.plan.clone(),
                info.kubeconfig.clone(),
                info.log_dir.clone(),
            )));
        }
        let agents = Self {
            nodes: info.nodes.iter().map(|n| n.plan.name.clone()).collect(),
            tasks,
        };
        for n in &info.nodes {
            wait_healthy(&n.plan, Duration::from_secs(60)).await?;
        }
        Ok(agents)
    }
}

impl Drop for NodeAgents {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for name in &self.nodes {
            if let Some(pid) = agent_pid(name).filter(|p| is_agent(*p)) {
                // SAFETY: kill(2) of the agent recorded in berth's own pid file.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = std::fs::remove_file(pid_file(name));
            let _ = std::fs::remove_file(hold_file(name));
        }
    }
}

/// Whether `pid` is a berth-nodeproxy process (pid files can outlive their process).
pub fn is_agent(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("berth-nodeproxy"))
        .unwrap_or(false)
}

/// `/healthz` of a node's agent answers 200.
pub fn healthy(plan: &NodePlan) -> bool {
    let url = format!("http://{}:{ADMIN_PORT}/healthz", plan.ip);
    Command::new("curl")
        .args(["-sf", "--max-time", "2", "--noproxy", "*", &url])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub async fn wait_healthy(plan: &NodePlan, timeout: Duration) -> Result<()> {
    wait_for(
        &format!("berth-nodeproxy healthy on {}", plan.name),
        timeout,
        || async { healthy(plan) },
    )
    .await
}
