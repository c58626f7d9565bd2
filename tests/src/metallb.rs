//! MetalLB (the opponent of `make bench-metallb`) on the local environment: its CRDs,
//! an address pool with an L2 advertisement, its controller on the host and a speaker in
//! every node's namespace, built by `hack/build-binaries.sh metallb`.
//!
//! Both binaries exit unless their own Pod object exists, and the speakers find their
//! memberlist peers by Pod labels and podIP: so each process gets a Pod object (the
//! speakers' hostNetwork, on their node, without container ports, so the test kubelet runs
//! nothing for them) and runs as a process of the harness beside it. MetalLB does no NAT:
//! the environment's berth-nodeproxy agents proxy the addresses it announces (berth's own
//! announcement covers only Services of berth's pool classes, which these are not).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::error::{Error, Result};
use crate::net::NodePlan;
use crate::paths;
use crate::proc::{Supervised, wait_for};
use crate::testing::TestEnv;

/// The namespace of MetalLB's configuration and Pods.
pub const NAMESPACE: &str = "metallb-system";

/// Labels of the speakers' Pods: memberlist finds its peers by them.
const SPEAKER_LABELS: &str = "app=metallb,component=speaker";

/// Where `hack/build-binaries.sh metallb` put the controller, speaker and CRDs.
pub fn dir() -> PathBuf {
    let version = paths::read_version("METALLB_VERSION").unwrap_or_default();
    paths::cache_dir()
        .join("bin")
        .join(format!("metallb-v{version}"))
}

/// MetalLB running for Services of `class`; stopped (processes, Pods, pool) on drop.
pub struct MetalLb {
    kubeconfig: PathBuf,
    log_dir: PathBuf,
    class: String,
    nodes: Vec<NodePlan>,
    controller: Option<Supervised>,
    speakers: BTreeMap<String, Supervised>,
    /// Processes started, by name: a restarted one logs to a file of its own.
    starts: BTreeMap<String, u32>,
}

impl MetalLb {
    /// Installs the CRDs, the pool `addresses` (one CIDR) with an L2 advertisement, the
    /// Pod objects, and starts the controller and a speaker per node with memberlist on.
    pub async fn start(env: &TestEnv, class: &str, addresses: &str) -> Result<Self> {
        let bin = dir();
        if !bin.join("speaker").exists() {
            return Err(Error::Setup(format!(
                "{} missing: run hack/build-binaries.sh metallb",
                bin.display()
            )));
        }
        env.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            &bin.join("crd").display().to_string(),
        ]);
        env.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/ipaddresspools.metallb.io",
            "crd/l2advertisements.metallb.io",
        ]);
        let _ = env.kubectl_output(&["create", "namespace", NAMESPACE]);
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), NAMESPACE);
        let mut objects = vec![pod_object("controller", "controller", None)];
        for n in &env.info.nodes {
            objects.push(pod_object(
                &speaker_pod(&n.plan.name),
                "speaker",
                Some(&n.plan.name),
            ));
        }
        for p in &objects {
            pods.create(&PostParams::default(), p)
                .await
                .map_err(Error::kube("create MetalLB pod"))?;
        }
        // The speakers' memberlist joins the podIPs of the labelled Pods.
        wait_for(
            "MetalLB's speaker Pods running with their node's address",
            Duration::from_secs(60),
            || async {
                let list = pods
                    .list(&ListParams::default().labels(SPEAKER_LABELS))
                    .await;
                list.is_ok_and(|l| {
                    l.items.len() == env.info.nodes.len()
                        && l.items
                            .iter()
                            .all(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
                })
            },
        )
        .await?;
        let pool = json!({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                 "metadata": {"name": "bench", "namespace": NAMESPACE},
                 // Leaves out .0 and .255, as berth's pools leave out network and
                 // broadcast addresses.
                 "spec": {"addresses": [addresses], "avoidBuggyIPs": true}},
                {"apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
                 "metadata": {"name": "bench", "namespace": NAMESPACE},
                 "spec": {"ipAddressPools": ["bench"]}}
            ]
        });
        let path = std::env::temp_dir().join(format!("{}metallb-pool.json", paths::SCRATCH_PREFIX));
        std::fs::write(&path, pool.to_string()).map_err(Error::io("write", &path))?;
        env.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);

        let mut m = Self {
            kubeconfig: env.info.kubeconfig.clone(),
            log_dir: env.info.log_dir.clone(),
            class: class.to_string(),
            nodes: env.info.nodes.iter().map(|n| n.plan.clone()).collect(),
            controller: None,
            speakers: BTreeMap::new(),
            starts: BTreeMap::new(),
        };
        m.start_controller()?;
        for n in m.nodes.clone() {
            m.start_speaker(&n.name)?;
        }
        Ok(m)
    }

    fn log(&mut self, name: &str) -> PathBuf {
        let n = self.starts.entry(name.to_string()).or_default();
        let suffix = if *n == 0 {
            String::new()
        } else {
            format!(".{n}")
        };
        *n += 1;
        self.log_dir.join(format!("metallb-{name}{suffix}.log"))
    }

    fn start_controller(&mut self) -> Result<()> {
        let mut cmd = Command::new(dir().join("controller"));
        cmd.args([
            "--webhook-mode=disabled",
            "--disable-cert-rotation",
            &format!("--lb-class={}", self.class),
            &format!("--namespace={NAMESPACE}"),
            "--pod-name=controller",
            // The host's network: keep clear of other listeners there.
            "--port=0",
            "--health-probe-port=0",
        ])
        .env("KUBECONFIG", &self.kubeconfig);
        let log = self.log("controller");
        self.controller = Some(Supervised::spawn("metallb controller", cmd, &log)?);
        Ok(())
    }

    /// Every speaker peers with the router at `router` (hold 9 s, as the harness's FRR)
    /// and announces the pool over BGP as well.
    pub fn peer_with(&self, env: &TestEnv, router: &str, my_asn: u32, peer_asn: u32) {
        let objects = json!({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "metallb.io/v1beta2", "kind": "BGPPeer",
                 "metadata": {"name": "bench", "namespace": NAMESPACE},
                 "spec": {"myASN": my_asn, "peerASN": peer_asn, "peerAddress": router,
                          // Native mode refuses keepaliveTime: it keeps alive every
                          // third of the hold time (3 s), as FRR does here.
                          "holdTime": "9s"}},
                {"apiVersion": "metallb.io/v1beta1", "kind": "BGPAdvertisement",
                 "metadata": {"name": "bench", "namespace": NAMESPACE},
                 "spec": {"ipAddressPools": ["bench"]}}
            ]
        });
        let path = std::env::temp_dir().join(format!("{}metallb-bgp.json", paths::SCRATCH_PREFIX));
        std::fs::write(&path, objects.to_string())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        env.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
    }

    /// Starts (again) the speaker of `node`.
    pub fn start_speaker(&mut self, node: &str) -> Result<()> {
        let plan = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .ok_or_else(|| Error::Setup(format!("no node {node}")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &plan.netns])
            .arg(dir().join("speaker"))
            .args([
                &format!("--lb-class={}", self.class),
                &format!("--ml-bindaddr={}", plan.ip),
                &format!("--ml-labels={SPEAKER_LABELS}"),
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("METALLB_NODE_NAME", node)
            .env("METALLB_NAMESPACE", NAMESPACE)
            .env("METALLB_POD_NAME", speaker_pod(node));
        let log = self.log(&format!("speaker-{node}"));
        let p = Supervised::spawn(&format!("metallb speaker {node}"), cmd, &log)?;
        self.speakers.insert(node.to_string(), p);
        Ok(())
    }

    /// SIGKILL to the speaker of `node` (a crash: no memberlist leave, no cleanup).
    pub fn kill_speaker(&mut self, node: &str) {
        if let Some(p) = self.speakers.remove(node) {
            // SAFETY: kill(2) of our own child's process group.
            unsafe { libc::kill(-(p.pid() as i32), libc::SIGKILL) };
        }
    }

    /// SIGKILL to the controller and a new one in its place.
    pub fn restart_controller(&mut self) -> Result<()> {
        if let Some(p) = self.controller.take() {
            // SAFETY: kill(2) of our own child's process group.
            unsafe { libc::kill(-(p.pid() as i32), libc::SIGKILL) };
        }
        self.start_controller()
    }

    /// Processes that exited (MetalLB exits on bad set-up: no Pod, no CRD).
    pub fn dead(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = self.controller.as_mut().and_then(Supervised::exited) {
            out.push(format!("controller {s}"));
        }
        for (n, p) in &mut self.speakers {
            if let Some(s) = p.exited() {
                out.push(format!("speaker {n} {s}"));
            }
        }
        out
    }
}

impl Drop for MetalLb {
    fn drop(&mut self) {
        self.controller.take();
        self.speakers.clear();
        let _ = Command::new(paths::bin("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "namespace", NAMESPACE, "--wait=false"])
            .output();
    }
}

fn speaker_pod(node: &str) -> String {
    format!("speaker-{node}")
}

/// A Pod object standing for a MetalLB process: the speakers' on their node in its
/// network (their podIP is then the node's address, memberlist's bind address).
fn pod_object(name: &str, component: &str, node: Option<&str>) -> Pod {
    let mut spec = json!({
        "containers": [{"name": component,
                        "image": format!("quay.io/metallb/{component}:v{}",
                                         paths::read_version("METALLB_VERSION").unwrap_or_default())}]
    });
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
        spec["hostNetwork"] = json!(true);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"app": "metallb", "component": component}},
        "spec": spec
    }))
    .expect("pod object")
}
