//! What the L2 suites read and set up around a pool address: its Lease and holder, the
//! nodes' and the client's view of it on the wire, a pinned nginx and the status the
//! pool allocator would write, and a node cut off the network ([`LinkDown`]).

use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::net::NodePlan;
use crate::nodeagent::L2_LEASE_NAMESPACE;
use crate::testing::TestEnv;

/// The Lease that picks the node announcing `ip` (the agent's naming, restated).
pub fn lease_name(ip: &str) -> String {
    format!("berth-l2-{}", ip.replace(['.', ':'], "-"))
}

/// The holder of `ip`'s Lease, when it has one.
pub async fn lease_holder(env: &TestEnv, ip: &str) -> Option<String> {
    Api::<Lease>::namespaced(env.client.clone(), L2_LEASE_NAMESPACE)
        .get_opt(&lease_name(ip))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// The MAC of `eth0` in `netns`.
pub fn mac_of(netns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", "dev", "eth0"])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
    links[0]["address"]
        .as_str()
        .expect("eth0 MAC")
        .to_lowercase()
}

/// The client's neighbour entry for `ip`: its MAC, when it has one.
pub fn client_neighbour(env: &TestEnv, ip: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", &env.info.client_netns, "neigh", "show", ip])
        .output()
        .expect("ip neigh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_lowercase)
}

/// One nginx pod labelled `app: <name>`, pinned to `node` by its hostname label.
pub async fn nginx_on(env: &TestEnv, ns: &str, name: &str, node: &str) {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                                       "containers": [{"name": "nginx", "image": "nginx:latest",
                                                       "ports": [{"containerPort": 80}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap_or_else(|e| panic!("create deployment {name}: {e}"));
}

/// Writes `ips` into the Service's load-balancer status, as the pool allocator would.
pub async fn set_ingress(env: &TestEnv, ns: &str, name: &str, ips: &[&str]) {
    let ingress: Vec<serde_json::Value> = ips
        .iter()
        .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    Api::<Service>::namespaced(env.client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": ingress}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("set load-balancer status of {name}: {e}"));
}

/// A node's veth on the bridge, down while alive: the node is off the network.
pub struct LinkDown(String);

impl LinkDown {
    pub fn cut(plan: &NodePlan) -> Self {
        let link = plan.host_link();
        let out = Command::new("ip")
            .args(["link", "set", &link, "down"])
            .output()
            .expect("ip link");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(link)
    }
}

impl Drop for LinkDown {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.0, "up"])
            .output();
    }
}
