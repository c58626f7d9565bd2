//! The simulated nodes: a Node object per node namespace, kept Ready by heartbeats, and a
//! small kubelet that realises the pods bound to it as network namespaces running
//! `berth-podserver` on their container ports, and berth's own containers from their
//! images with crun.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::net::{self, NodePlan};
use crate::oci;
use crate::paths;
use crate::podrun;
use crate::proc::Supervised;

pub const KUBELET_VERSION: &str = "v1.36.3";

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Registers the Node object for `plan` with the EC2 instance behind it.
pub async fn register_node(client: &Client, plan: &NodePlan, instance_id: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": plan.name,
            "labels": {
                "kubernetes.io/hostname": plan.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/region": net::REGION,
                "topology.kubernetes.io/zone": plan.zone,
                "node.kubernetes.io/instance-type": "t3.medium",
            }
        },
        "spec": {
            "podCIDR": plan.pod_cidr,
            "podCIDRs": [plan.pod_cidr],
            "providerID": format!("aws:///{}/{}", plan.zone, instance_id),
        }
    }))
    .map_err(|e| Error::Setup(format!("node object: {e}")))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .map_err(Error::kube(format!("create Node {}", plan.name)))?;
    heartbeat(client, plan).await
}

/// Marks the node Ready and renews its Lease, as a kubelet does every few seconds.
pub async fn heartbeat(client: &Client, plan: &NodePlan) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let t = now();
    let cond = |kind: &str, status: &str, reason: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": reason,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let status = json!({"status": {
        "addresses": [
            {"type": "InternalIP", "address": plan.ip.to_string()},
            {"type": "Hostname", "address": plan.name},
        ],
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"},
        "conditions": [
            cond("Ready", "True", "KubeletReady"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID"),
        ],
        "nodeInfo": {
            "machineID": plan.name, "systemUUID": plan.name, "bootID": plan.name,
            "kernelVersion": "berth-sim", "osImage": "berth simulated node",
            "containerRuntimeVersion": "berth-sim://1", "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
    }});
    nodes
        .patch_status(&plan.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(Error::kube(format!("heartbeat Node {}", plan.name)))?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": plan.name},
        "spec": {"holderIdentity": plan.name, "leaseDurationSeconds": 40,
                 "renewTime": k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    });
    leases
        .patch(
            &plan.name,
            &PatchParams::apply("berth-e2e-kubelet").force(),
            &Patch::Apply(&lease),
        )
        .await
        .map_err(Error::kube(format!("renew Lease {}", plan.name)))?;
    Ok(())
}

/// A pod this kubelet runs: its namespace (none for hostNetwork), its processes, its
/// crun containers and the image each container runs.
struct RunningPod {
    netns: Option<String>,
    ip_slot: Option<u8>,
    processes: Vec<Supervised>,
    containers: Vec<String>,
    image_ids: BTreeMap<String, String>,
    files: Option<PathBuf>,
}

/// Where a kubelet keeps its pods' logs and files, and the CA it hands to pods.
pub struct KubeletDirs {
    pub log_dir: PathBuf,
    pub scratch: PathBuf,
    pub ca_cert: PathBuf,
}

pub struct Kubelet {
    plan: NodePlan,
    client: Client,
    pods: Mutex<BTreeMap<String, RunningPod>>,
    /// Pods (by UID) in their preStop hook: still running until it ends.
    stopping: Mutex<BTreeSet<String>>,
    /// The last pod address slot handed out: slots go round, so an address freed by a
    /// deleted pod is reused as late as possible (as IPAM plugins do).
    last_slot: Mutex<u8>,
    dirs: KubeletDirs,
}

impl Kubelet {
    pub fn new(client: Client, plan: NodePlan, dirs: KubeletDirs) -> Arc<Self> {
        Arc::new(Self {
            plan,
            client,
            pods: Mutex::new(BTreeMap::new()),
            stopping: Mutex::new(BTreeSet::new()),
            last_slot: Mutex::new(1),
            dirs,
        })
    }

    /// Heartbeats and pod sync until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        let beat = {
            let this = self.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    if let Err(e) = heartbeat(&this.client, &this.plan).await {
                        tracing::warn!(node = %this.plan.name, "heartbeat failed: {e}");
                    }
                }
            }
        };
        let pods: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.plan.name));
        let sync = watcher(pods, cfg).for_each(|event| {
            let this = self.clone();
            async move {
                match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        this.sync_pod(pod).await
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(uid) = pod.metadata.uid.as_deref() {
                            this.teardown(uid).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(node = %this.plan.name, "pod watch: {e}"),
                }
            }
        });
        tokio::join!(beat, sync);
    }

    async fn sync_pod(self: Arc<Self>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            let hook = pre_stop_sleep(&pod);
            if !hook.is_zero() && self.pods.lock().await.contains_key(&uid) {
                // As a kubelet runs a preStop sleep hook: the pod goes on serving (and
                // stays Ready, so its endpoint is terminating but serving) until it ends.
                if self.stopping.lock().await.insert(uid.clone()) {
                    let this = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(hook).await;
                        this.stop_and_delete(&uid, &ns, &name).await;
                        this.stopping.lock().await.remove(&uid);
                    });
                }
                return;
            }
            self.stop_and_delete(&uid, &ns, &name).await;
            return;
        }
        if self.pods.lock().await.contains_key(&uid) {
            self.sync_readiness(&pod).await;
            return;
        }
        match self.start_pod(&pod, &uid).await {
            Ok((ip, image_ids)) => {
                if let Err(e) = self.report_running(&pod, ip, &image_ids).await {
                    tracing::warn!(pod = %name, "status update failed: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(node = %self.plan.name, pod = %name, "cannot start pod: {e}");
                self.report_failed(&pod, &e.to_string()).await;
            }
        }
    }

    /// Stops a pod's processes and removes the Pod object, as a kubelet does once its
    /// containers have exited.
    async fn stop_and_delete(&self, uid: &str, ns: &str, name: &str) {
        {
            let uid = uid.to_string();
            self.teardown(&uid).await;
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            if let Err(e) = api.delete(name, &dp).await {
                tracing::debug!(pod = %name, "final delete: {e}");
            }
        }
    }

    /// Keeps a running pod's Ready condition as a kubelet does: True only while every
    /// readiness gate's condition is True.
    async fn sync_readiness(&self, pod: &Pod) {
        let want = if gates_pass(pod) { "True" } else { "False" };
        if condition_status(pod, "Ready").as_deref() == Some(want) {
            return;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let status = json!({"status": {"conditions": [
            {"type": "Ready", "status": want, "lastTransitionTime": now(),
             "reason": if want == "True" { "" } else { "ReadinessGatesNotReady" }}
        ]}});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&status))
            .await
        {
            tracing::warn!(pod = %name, "readiness update failed: {e}");
        }
    }

    /// Leaves the pod Pending with the reason in its container statuses, as a kubelet
    /// does when a container cannot start.
    async fn report_failed(&self, pod: &Pod, message: &str) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let containers: Vec<_> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                json!({"name": c.name, "image": c.image.clone().unwrap_or_default(),
                       "imageID": "", "ready": false, "restartCount": 0,
                       "state": {"waiting": {"reason": "CreateContainerError", "message": message}}})
            })
            .collect();
        let status = json!({"status": {"phase": "Pending", "containerStatuses": containers}});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            tracing::warn!(pod = %name, "status update failed: {e}");
        }
    }

    async fn start_pod(
        &self,
        pod: &Pod,
        uid: &str,
    ) -> Result<(Ipv4Addr, BTreeMap<String, String>)> {
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| Error::Setup("pod without spec".into()))?;
        let host_network = spec.host_network.unwrap_or(false);
        let mut pods = self.pods.lock().await;
        let (netns, ip_slot, ip) = if host_network {
            (None, None, self.plan.ip)
        } else {
            let used: BTreeSet<u8> = pods.values().filter_map(|p| p.ip_slot).collect();
            let mut last = self.last_slot.lock().await;
            let slot = next_free_slot(*last, &used)
                .ok_or_else(|| Error::Setup(format!("podCIDR of {} is full", self.plan.name)))?;
            *last = slot;
            let ip = self.plan.pod_ip(slot);
            let netns = net::create_pod(&self.plan, uid, ip)?;
            (Some(netns), Some(slot), ip)
        };
        let run_ns = netns.clone().unwrap_or_else(|| self.plan.netns.clone());
        let mut running = RunningPod {
            netns,
            ip_slot,
            processes: Vec::new(),
            containers: Vec::new(),
            image_ids: BTreeMap::new(),
            files: None,
        };
        // Record the pod first: a failure below still tears down what was made.
        let result = self
            .start_processes(pod, uid, &run_ns, ip, &mut running)
            .await;
        let image_ids = running.image_ids.clone();
        pods.insert(uid.to_string(), running);
        result.map(|()| (ip, image_ids))
    }

    async fn start_processes(
        &self,
        pod: &Pod,
        uid: &str,
        run_ns: &str,
        ip: Ipv4Addr,
        running: &mut RunningPod,
    ) -> Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let log = |suffix: &str| {
            self.dirs
                .log_dir
                .join(format!("pod-{ns}-{name}{suffix}.log"))
        };
        let facts = podrun::PodFacts {
            pod,
            pod_ip: ip.to_string(),
            host_ip: self.plan.ip.to_string(),
            node_name: self.plan.name.clone(),
        };
        let spec = pod.spec.as_ref();
        let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        let mount_token = spec
            .and_then(|s| s.automount_service_account_token)
            .unwrap_or(true);
        let pod_dir = self.dirs.scratch.join("pods").join(uid);
        running.files = Some(pod_dir.clone());
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let hostname = if host_network { &self.plan.name } else { &name };
        for c in containers.iter().filter(|c| podrun::is_berth_container(c)) {
            let token_dir = if mount_token {
                let dir = pod_dir.join("serviceaccount");
                podrun::write_service_account(&self.client, pod, &self.dirs.ca_cert, &dir).await?;
                Some(dir)
            } else {
                None
            };
            let placement = podrun::Placement {
                pod_dir: &pod_dir,
                netns: run_ns,
                hostname,
                token_dir: token_dir.as_deref(),
            };
            let prepared =
                podrun::prepare_berth_container(&self.client, &facts, c, &placement).await?;
            // Recorded before it starts: a failure from here on still deletes it.
            running.containers.push(prepared.id.clone());
            running
                .image_ids
                .insert(c.name.clone(), prepared.image_id.clone());
            let label = format!("pod {ns}/{name} container {}", c.name);
            let log_file = log(&format!("-{}", c.name));
            running
                .processes
                .push(Supervised::spawn(&label, prepared.command, &log_file)?);
            oci::wait_running(&prepared.id, &log_file, Duration::from_secs(20)).await?;
        }
        if let Some(cmd) = podserver_command(pod, run_ns) {
            running
                .processes
                .push(Supervised::spawn(&format!("pod {name}"), cmd, &log(""))?);
        }
        Ok(())
    }

    async fn teardown(&self, uid: &str) {
        let running = self.pods.lock().await.remove(uid);
        if let Some(pod) = running {
            // SIGTERM to each container (berth's agents clean up on it), then whatever is
            // left is killed and crun forgets it; only then its supervisor goes.
            let ids = pod.containers.clone();
            let stopped = tokio::task::spawn_blocking(move || {
                for id in ids {
                    oci::stop(&id, Duration::from_secs(10));
                }
            })
            .await;
            if let Err(e) = stopped {
                tracing::warn!(node = %self.plan.name, "stopping containers: {e}");
            }
            drop(pod.processes);
            if let Some(ns) = pod.netns {
                net::delete_netns(&ns);
            }
            if let Some(dir) = pod.files {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    async fn report_running(
        &self,
        pod: &Pod,
        ip: Ipv4Addr,
        image_ids: &BTreeMap<String, String>,
    ) -> Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let t = now();
        let containers: Vec<_> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                let image_id = image_ids.get(&c.name).cloned().unwrap_or_default();
                json!({"name": c.name, "image": c.image.clone().unwrap_or_default(),
                       "imageID": image_id, "ready": true, "started": true, "restartCount": 0,
                       "state": {"running": {"startedAt": t}}})
            })
            .collect();
        let cond = |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": t});
        let ready = if gates_pass(pod) {
            cond("Ready")
        } else {
            json!({"type": "Ready", "status": "False", "lastTransitionTime": t,
                   "reason": "ReadinessGatesNotReady"})
        };
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": self.plan.ip.to_string(),
            "hostIPs": [{"ip": self.plan.ip.to_string()}],
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "startTime": t,
            "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), ready],
            "containerStatuses": containers,
        }});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        // Strategic: merged by condition type, so a gate condition set meanwhile stays.
        api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&status))
            .await
            .map_err(Error::kube(format!("status of pod {ns}/{name}")))?;
        Ok(())
    }

    /// Stops every pod this kubelet runs.
    pub async fn stop_all(&self) {
        let uids: Vec<String> = self.pods.lock().await.keys().cloned().collect();
        for uid in uids {
            self.teardown(&uid).await;
        }
    }
}

fn condition_status(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// Whether every readiness gate of the pod has its condition True (none: true).
fn gates_pass(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
        .all(|g| condition_status(pod, &g.condition_type).as_deref() == Some("True"))
}

/// The longest `preStop: {sleep: {seconds}}` hook of the pod's containers, bounded by its
/// termination grace period (as a kubelet bounds it).
fn pre_stop_sleep(pod: &Pod) -> Duration {
    let Some(spec) = pod.spec.as_ref() else {
        return Duration::ZERO;
    };
    let hook = spec
        .containers
        .iter()
        .filter_map(|c| c.lifecycle.as_ref()?.pre_stop.as_ref()?.sleep.as_ref())
        .map(|s| s.seconds)
        .max()
        .unwrap_or(0);
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    Duration::from_secs(hook.clamp(0, grace.max(0)) as u64)
}

/// The first free address slot (2..=254) after `last`, wrapping around.
fn next_free_slot(last: u8, used: &BTreeSet<u8>) -> Option<u8> {
    // Slot s in 2..=254 has index s - 2; start just after `last` (before 2 for last < 2).
    let start = i32::from(last) - 2;
    (1..=253i32)
        .map(|i| ((start + i).rem_euclid(253) + 2) as u8)
        .find(|s| !used.contains(s))
}

/// The command that plays a pod's containers that are not berth's own: one
/// `berth-podserver` serving every container port (HTTP on TCP answering with the pod name, or the nginx welcome page for
/// `nginx*` images; UDP echo). None when the pod declares no ports.
fn podserver_command(pod: &Pod, netns: &str) -> Option<Command> {
    let spec = pod.spec.as_ref()?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut args = vec!["--name".to_string(), name];
    let mut any = false;
    for c in spec
        .containers
        .iter()
        .filter(|c| !podrun::is_berth_container(c))
    {
        let nginx = c
            .image
            .as_deref()
            .map(|i| i.rsplit('/').next().unwrap_or(i).starts_with("nginx"))
            .unwrap_or(false);
        for p in c.ports.iter().flatten() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let flag = match (proto, nginx) {
                ("UDP", _) => "--udp",
                ("TCP", true) => "--nginx",
                ("TCP", false) => "--tcp",
                _ => continue,
            };
            args.push(flag.into());
            args.push(p.container_port.to_string());
            any = true;
        }
    }
    if !any {
        return None;
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(paths::sibling_bin("berth-podserver"))
        .args(args);
    Some(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(image: &str, ports: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "c", "image": image, "ports": ports}]}
        }))
        .expect("pod fixture")
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .skip(4) // netns exec <ns> <binary>
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn nginx_images_serve_the_welcome_page_on_tcp_ports() {
        let p = pod(
            "docker.io/library/nginx:1.27",
            json!([{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}]),
        );
        let cmd = podserver_command(&p, "berth-pod-x").expect("a server");
        assert_eq!(
            args(&cmd),
            ["--name", "web-1", "--nginx", "80", "--udp", "53"]
        );
    }

    #[test]
    fn other_images_answer_with_the_pod_name() {
        let p = pod(
            "berth/echo",
            json!([{"containerPort": 8080, "protocol": "TCP"}]),
        );
        let cmd = podserver_command(&p, "berth-pod-x").expect("a server");
        assert_eq!(args(&cmd), ["--name", "web-1", "--tcp", "8080"]);
        let ns: Vec<_> = cmd.get_args().take(3).collect();
        assert_eq!(ns, ["netns", "exec", "berth-pod-x"]);
    }

    #[test]
    fn address_slots_go_round_and_skip_used_ones() {
        let none = BTreeSet::new();
        assert_eq!(next_free_slot(1, &none), Some(2));
        assert_eq!(next_free_slot(2, &none), Some(3));
        assert_eq!(next_free_slot(254, &none), Some(2), "wraps after .254");
        let used: BTreeSet<u8> = [3, 4].into();
        assert_eq!(next_free_slot(2, &used), Some(5));
        let full: BTreeSet<u8> = (2..=254).collect();
        assert_eq!(next_free_slot(7, &full), None);
    }

    #[test]
    fn ready_waits_for_every_readiness_gate() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [], "readinessGates": [{"conditionType": "x/a"}, {"conditionType": "x/b"}]},
            "status": {"conditions": [{"type": "x/a", "status": "True"}]}
        }))
        .expect("pod");
        assert!(!gates_pass(&p));
        p.status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .expect("conditions")
            .push(serde_json::from_value(json!({"type": "x/b", "status": "True"})).expect("c"));
        assert!(gates_pass(&p));
        assert!(gates_pass(&pod("x", json!([]))), "no gates");
    }

    #[test]
    fn pre_stop_sleeps_are_bounded_by_the_grace_period() {
        let p = |sleep: i64, grace: Option<i64>| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web-1"},
                "spec": {"terminationGracePeriodSeconds": grace, "containers": [
                    {"name": "a", "lifecycle": {"preStop": {"sleep": {"seconds": sleep}}}},
                    {"name": "b"}
                ]}
            }))
            .expect("pod")
        };
        assert_eq!(pre_stop_sleep(&p(5, None)), Duration::from_secs(5));
        assert_eq!(pre_stop_sleep(&p(50, Some(10))), Duration::from_secs(10));
        assert_eq!(pre_stop_sleep(&pod("x", json!([]))), Duration::ZERO);
    }

    #[test]
    fn pods_without_ports_run_no_server() {
        assert!(podserver_command(&pod("busybox", json!([])), "ns").is_none());
        let sctp = pod("x", json!([{"containerPort": 9, "protocol": "SCTP"}]));
        assert!(podserver_command(&sctp, "ns").is_none());
    }
}
