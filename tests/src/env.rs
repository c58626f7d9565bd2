//! The whole local environment: network, control plane, LocalStack, simulated nodes.
//! `Env::start` builds it, `Env` tears it down on drop (also when a panic unwinds), and
//! `EnvInfo` (written to `env.json`) tells tests and users how to reach it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde::{Deserialize, Serialize};

use crate::awsinfra::{self, AwsInfra};
use crate::controlplane::ControlPlane;
use crate::error::{Error, Result};
use crate::kubelet::{self, Kubelet};
use crate::localstack::{self, LocalStack};
use crate::net::{self, NodePlan};
use crate::paths;
use crate::proc::wait_for;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    #[serde(flatten)]
    pub plan: NodePlan,
    pub instance_id: String,
    pub subnet_id: String,
    pub provider_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnvInfo {
    pub kubeconfig: PathBuf,
    pub apiserver_url: String,
    pub localstack_endpoint: String,
    pub region: String,
    pub cluster_name: String,
    pub service_cidr: String,
    pub node_port_range: String,
    pub bridge: String,
    pub host_ip: String,
    pub client_netns: String,
    pub client_ip: String,
    pub nodes: Vec<NodeInfo>,
    pub aws: AwsInfra,
    pub log_dir: PathBuf,
    pub supervisor_pid: u32,
    /// Whether the environment runs berth-nodeproxy on every node (`BERTH_E2E_NODEPROXY`).
    #[serde(default)]
    pub node_agents: bool,
}

impl EnvInfo {
    pub fn path() -> PathBuf {
        paths::state_dir().join("env.json")
    }

    /// The running environment's description, or an error saying how to start one.
    pub fn load() -> Result<Self> {
        let path = Self::path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Setup(format!(
                "no running local environment ({}: {e}); end-to-end tests need root and the \
                 local cluster: run them with `make test` (or start one with `make up`)",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Setup(format!("{}: {e}", path.display())))
    }
}

pub struct Env {
    pub info: EnvInfo,
    scratch: PathBuf,
    plans: Vec<NodePlan>,
    localstack_restarts: u32,
    kubelets: Vec<(Arc<Kubelet>, tokio::task::JoinHandle<()>)>,
    localstack: Option<LocalStack>,
    control_plane: Option<ControlPlane>,
    node_agents: Option<crate::nodeagent::NodeAgents>,
}

/// Removes what an earlier run left: its supervisor, namespaces, links, scratch dirs.
pub fn sweep() {
    let pid = std::fs::read_to_string(paths::state_dir().join("supervisor.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    if let Some(pid) = pid.filter(|p| *p as u32 != std::process::id()) {
        stop_pid(pid, Duration::from_secs(60));
    }
    // The network's names are the machine's, not the checkout's: a supervisor another
    // checkout left behind (its script killed; the e2e lock, now free, is held by
    // whoever sweeps) would keep them and fail this start with "File exists".
    for pid in other_supervisors() {
        tracing::warn!(
            pid,
            "stopping a local environment another checkout left running"
        );
        stop_pid(pid, Duration::from_secs(60));
    }
    crate::oci::delete_all();
    net::sweep();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(paths::SCRATCH_PREFIX)
            {
                // Scratch dirs, and the values and manifest files tests write.
                let path = e.path();
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
    let _ = std::fs::remove_file(paths::state_dir().join("supervisor.pid"));
    let _ = std::fs::remove_file(EnvInfo::path());
    let _ = std::fs::remove_file(restart_count_file());
    let _ = std::fs::remove_file(restart_error_file());
}

/// Files in the state dir through which the supervisor reports LocalStack restarts.
fn restart_count_file() -> PathBuf {
    paths::state_dir().join("localstack-restarts")
}

fn restart_error_file() -> PathBuf {
    paths::state_dir().join("localstack-restart.error")
}

/// Records the outcome of the supervisor's `n`-th LocalStack restart for
/// [`restart_localstack`].
pub fn record_localstack_restart(n: u32, outcome: &Result<()>) {
    match outcome {
        Ok(()) => {
            let _ = std::fs::write(restart_count_file(), n.to_string());
        }
        Err(e) => {
            let _ = std::fs::write(restart_error_file(), e.to_string());
        }
    }
}

fn restarts_done() -> u32 {
    std::fs::read_to_string(restart_count_file())
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Asks the running environment's supervisor to restart LocalStack (SIGUSR1) and waits
/// until it has, with the VPC, subnets and instances back. Disrupts everything that uses
/// LocalStack meanwhile: only for serial tests.
pub async fn restart_localstack(info: &EnvInfo) -> Result<()> {
    let before = restarts_done();
    let _ = std::fs::remove_file(restart_error_file());
    let pid = info.supervisor_pid as i32;
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !cmdline.contains("berth-env") {
        return Err(Error::Setup(format!(
            "no berth-env supervisor at pid {pid}"
        )));
    }
    // SAFETY: kill(2) of the supervisor named in env.json (checked just above).
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        return Err(Error::Setup(format!(
            "signal the supervisor {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut failed = None;
    let res = wait_for(
        "the supervisor restarting LocalStack",
        Duration::from_secs(240),
        || {
            if let Ok(e) = std::fs::read_to_string(restart_error_file()) {
                failed = Some(e);
            }
            let done = failed.is_some() || restarts_done() > before;
            async move { done }
        },
    )
    .await;
    match failed {
        Some(e) => Err(Error::Setup(format!("LocalStack restart failed: {e}"))),
        None => res,
    }
}

/// SIGTERM, then SIGKILL after `grace`, to a berth-env supervisor found by its pid file.
/// Every `berth-env serve` on this machine but this process.
fn other_supervisors() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid as u32 != std::process::id())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            is_supervisor(&cmdline)
        })
        .collect()
}

/// A NUL-separated command line of `berth-env serve …`.
fn is_supervisor(cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let exe = args.next().unwrap_or_default();
    exe.rsplit(|b| *b == b'/').next() == Some(b"berth-env".as_slice())
        && args.next() == Some(b"serve".as_slice())
}

pub fn stop_pid(pid: i32, grace: Duration) {
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !cmdline.contains("berth-env") {
        return;
    }
    // SAFETY: kill(2) of the supervisor recorded in berth's own pid file.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

impl Env {
    /// Starts everything with `node_count` simulated nodes.
    pub async fn start(node_count: u8) -> Result<Self> {
        sweep();
        let state = paths::state_dir();
        let log_dir = paths::log_dir();
        let _ = std::fs::remove_dir_all(&log_dir);
        for d in [&state, &log_dir] {
            std::fs::create_dir_all(d).map_err(Error::io("create dir", d))?;
        }
        let scratch =
            std::env::temp_dir().join(format!("{}{}", paths::SCRATCH_PREFIX, std::process::id()));
        std::fs::create_dir_all(&scratch).map_err(Error::io("create scratch dir", &scratch))?;
        let mut env = Env {
            info: EnvInfo {
                kubeconfig: state.join("kubeconfig"),
                apiserver_url: String::new(),
                localstack_endpoint: String::new(),
                region: net::REGION.into(),
                cluster_name: awsinfra::CLUSTER_NAME.into(),
                service_cidr: net::SERVICE_CIDR.into(),
                node_port_range: crate::controlplane::NODE_PORT_RANGE.into(),
                bridge: net::BRIDGE.into(),
                host_ip: net::HOST_IP.to_string(),
                client_netns: net::CLIENT_NETNS.into(),
                client_ip: net::CLIENT_IP.to_string(),
                nodes: Vec::new(),
                aws: AwsInfra {
                    vpc_id: String::new(),
                    subnet_ids: Vec::new(),
                    instance_ids: Vec::new(),
                    node_security_group: String::new(),
                    extra_security_group: String::new(),
                },
                log_dir: log_dir.clone(),
                supervisor_pid: std::process::id(),
                node_agents: crate::nodeagent::enabled(),
            },
            scratch: scratch.clone(),
            plans: Vec::new(),
            localstack_restarts: 0,
            kubelets: Vec::new(),
            localstack: None,
            control_plane: None,
            node_agents: None,
        };

        let plans: Vec<NodePlan> = (1..=node_count).map(NodePlan::new).collect();
        env.plans = plans.clone();
        tracing::info!("creating the test network");
        net::create_bridge()?;
        net::create_client()?;
        for plan in &plans {
            net::create_node(plan, &plans)?;
        }

        tracing::info!("starting the control plane and LocalStack");
        let ls_volume = scratch.join("localstack");
        let (cp, ls) = tokio::join!(
            ControlPlane::start(&scratch, &log_dir, &env.info.kubeconfig),
            LocalStack::start(&ls_volume, &log_dir),
        );
        let cp = cp?;
        env.info.apiserver_url = cp.apiserver_url.clone();
        let ca_cert = cp.ca_cert.clone();
        env.control_plane = Some(cp);
        let ls = ls?;
        env.info.localstack_endpoint = ls.endpoint.clone();
        env.localstack = Some(ls);

        tracing::info!("creating the VPC, subnets and instances in LocalStack");
        let sdk = localstack::sdk_config(&env.info.localstack_endpoint).await;
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        env.info.aws = awsinfra::create(&ec2, &plans).await?;

        tracing::info!("registering {} nodes", plans.len());
        let client = crate::client_from_kubeconfig(&env.info.kubeconfig).await?;
        for (i, plan) in plans.iter().enumerate() {
            let instance_id = env.info.aws.instance_ids[i].clone();
            kubelet::register_node(&client, plan, &instance_id).await?;
            let dirs = kubelet::KubeletDirs {
                log_dir: log_dir.clone(),
                scratch: scratch.clone(),
                ca_cert: ca_cert.clone(),
            };
            let kubelet = Kubelet::new(client.clone(), plan.clone(), dirs);
            let task = tokio::spawn(kubelet.clone().run());
            env.kubelets.push((kubelet, task));
            env.info.nodes.push(NodeInfo {
                plan: plan.clone(),
                provider_id: format!("aws:///{}/{}", plan.zone, instance_id),
                instance_id,
                subnet_id: env.info.aws.subnet_ids[i].clone(),
            });
        }
        let nodes: Api<Node> = Api::all(client.clone());
        wait_for(
            "every node Ready and untainted",
            Duration::from_secs(60),
            || async {
                let Ok(list) = nodes.list(&Default::default()).await else {
                    return false;
                };
                list.items.len() == plans.len()
                    && list.items.iter().all(|n| {
                        let untainted = n
                            .spec
                            .as_ref()
                            .and_then(|s| s.taints.as_ref())
                            .is_none_or(|t| t.is_empty());
                        let ready = n
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            });
                        untainted && ready
                    })
            },
        )
        .await?;

        if crate::nodeagent::enabled() {
            tracing::info!("starting berth-nodeproxy on every node");
            env.node_agents = Some(crate::nodeagent::NodeAgents::start(&env.info).await?);
        }

        let json = serde_json::to_string_pretty(&env.info)
            .map_err(|e| Error::Setup(format!("serialise env.json: {e}")))?;
        std::fs::write(EnvInfo::path(), json)
            .map_err(Error::io("write env.json", EnvInfo::path()))?;
        tracing::info!("local environment ready");
        Ok(env)
    }

    /// Processes of the environment that died.
    pub fn dead(&mut self) -> Vec<String> {
        let mut dead = self
            .control_plane
            .as_mut()
            .map(ControlPlane::dead)
            .unwrap_or_default();
        if let Some(status) = self.localstack.as_mut().and_then(LocalStack::exited) {
            dead.push(format!("localstack exited: {status}"));
        }
        dead
    }

    /// Replaces LocalStack by a fresh one at the same endpoint (all AWS state is lost, as
    /// in a crash) and recreates the VPC, subnets and instances with their old IDs, so
    /// env.json and the Nodes' providerIDs stay true. Load balancers are not recreated:
    /// that is the controller's job.
    pub async fn restart_localstack(&mut self) -> Result<()> {
        let old = self
            .localstack
            .take()
            .ok_or_else(|| Error::Setup("LocalStack is not running".into()))?;
        self.localstack_restarts += 1;
        let log = self.info.log_dir.join(format!(
            "localstack-restart-{}.log",
            self.localstack_restarts
        ));
        tracing::info!("restarting LocalStack (log {})", log.display());
        let ls = old.restart(&self.scratch.join("localstack"), &log).await?;
        if ls.endpoint != self.info.localstack_endpoint {
            return Err(Error::Setup(format!(
                "LocalStack came back at {} instead of {}",
                ls.endpoint, self.info.localstack_endpoint
            )));
        }
        self.localstack = Some(ls);
        let sdk = localstack::sdk_config(&self.info.localstack_endpoint).await;
        let infra = awsinfra::create(&aws_sdk_ec2::Client::new(&sdk), &self.plans).await?;
        if infra.vpc_id != self.info.aws.vpc_id
            || infra.subnet_ids != self.info.aws.subnet_ids
            || infra.instance_ids != self.info.aws.instance_ids
        {
            return Err(Error::Setup(format!(
                "recreated AWS resources differ: {infra:?} instead of {:?}",
                self.info.aws
            )));
        }
        tracing::info!("LocalStack restarted; VPC, subnets and instances recreated");
        Ok(())
    }

    /// How many LocalStack restarts were attempted.
    pub fn localstack_restarts(&self) -> u32 {
        self.localstack_restarts
    }

    /// Orderly teardown: pods, kubelets, LocalStack, control plane, network, scratch.
    pub async fn stop(mut self) {
        self.node_agents.take();
        for (kubelet, task) in std::mem::take(&mut self.kubelets) {
            task.abort();
            kubelet.stop_all().await;
        }
        // Drop does the rest.
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.node_agents.take();
        for (_, task) in self.kubelets.drain(..) {
            task.abort();
        }
        self.localstack.take();
        self.control_plane.take();
        crate::oci::delete_all();
        net::sweep();
        let _ = std::fs::remove_dir_all(&self.scratch);
        let _ = std::fs::remove_file(EnvInfo::path());
        let _ = std::fs::remove_file(&self.info.kubeconfig);
    }
}

#[cfg(test)]
mod tests {
    use super::is_supervisor;

    #[test]
    fn only_berth_env_serve_is_a_supervisor() {
        assert!(is_supervisor(
            b"/x/target/debug/berth-env\0serve\0--nodes\x003\0"
        ));
        assert!(is_supervisor(b"berth-env\0serve\0"));
        assert!(!is_supervisor(b"/x/target/debug/berth-env\0up\0"));
        assert!(!is_supervisor(b"/x/target/debug/berth-env-old\0serve\0"));
        assert!(!is_supervisor(b"vim\0berth-env\0serve\0"));
        assert!(!is_supervisor(b""));
    }
}
