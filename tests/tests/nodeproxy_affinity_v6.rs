//! `sessionAffinity: ClientIP` over IPv6 through berth-nodeproxy: the simulated cluster is
//! IPv4-only, so this case adds the few IPv6 addresses it needs (client, one node, its
//! pod bridge and three pods on it; removed again on drop) and gives a Service an IPv6
//! externalIP with a hand-written IPv6 EndpointSlice naming those pods. Repeated requests
//! from the client namespace must all reach one pod; a second Service on the same pods
//! without affinity must spread them.
//! Needs root and the running local cluster with its node agents (`make test`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use berth_e2e::net;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, exec_in};
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

/// `ip` inside `netns`; panics with its error output.
fn ip_in(netns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl_in(netns: &str, setting: &str) {
    let out = exec_in(netns, &["sysctl", "-q", "-w", setting]).expect("sysctl");
    assert!(out.status.success(), "sysctl {setting} in {netns}");
}

/// IPv6 addresses and routes this case added; removed on drop (also on failure).
#[derive(Default)]
struct V6 {
    /// (netns, address with prefix, device)
    addrs: Vec<(String, String, String)>,
    /// (netns, route prefix)
    routes: Vec<(String, String)>,
    forwarding: Option<String>,
}

impl V6 {
    fn addr(&mut self, netns: &str, cidr: &str, dev: &str) {
        ip_in(netns, &["-6", "addr", "replace", cidr, "dev", dev, "nodad"]);
        self.addrs.push((netns.into(), cidr.into(), dev.into()));
    }

    fn route(&mut self, netns: &str, prefix: &str, via: &str) {
        ip_in(netns, &["-6", "route", "replace", prefix, "via", via]);
        self.routes.push((netns.into(), prefix.into()));
    }
}

impl Drop for V6 {
    fn drop(&mut self) {
        for (ns, prefix) in &self.routes {
            let _ = Command::new("ip")
                .args(["-n", ns, "-6", "route", "del", prefix])
                .output();
        }
        for (ns, cidr, dev) in &self.addrs {
            let _ = Command::new("ip")
                .args(["-n", ns, "-6", "addr", "del", cidr, "dev", dev])
                .output();
        }
        if let Some(ns) = &self.forwarding {
            let _ = exec_in(
                ns,
                &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"],
            );
        }
    }
}

/// Running pods of `app` once there are `n`.
async fn running(env: &TestEnv, ns: &str, app: &str, n: usize, diag: &Diagnostics) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app={app}"));
    let ready = async || -> Vec<Pod> {
        api.list(&lp)
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_true(
        &format!("{n} running pods of {app}"),
        Duration::from_secs(90),
        diag,
        async || ready().await.len() == n,
    )
    .await;
    ready().await
}

/// How often each answer came to `n` requests from the client, each on a new connection.
fn requests(netns: &str, url: &str, n: usize) -> BTreeMap<String, usize> {
    let script = format!(
        "for i in $(seq {n}); do b=$(curl -g -s --fail --max-time 2 --noproxy '*' '{url}'); \
         rc=$?; if [ $rc = 0 ]; then echo \"OK $b\"; else echo \"FAIL $rc\"; fi; done"
    );
    let out = exec_in(netns, &["sh", "-c", &script]).expect("request loop");
    let mut t = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        *t.entry(l.trim().to_string()).or_default() += 1;
    }
    t
}

#[tokio::test]
async fn ipv6_client_ip_affinity_keeps_a_client_on_one_pod() {
    let env = TestEnv::connect().await;
    env.wait_agents_healthy().await;
    let ns = env.namespace("np-aff6").await;
    let diag = Diagnostics::new(&env).node_agents(&env.info);
    let node = &env.info.nodes[0];
    let index = node.plan.index;
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web6"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web6"}},
                 "template": {"metadata": {"labels": {"app": "web6"}},
                              "spec": {"nodeSelector": {"kubernetes.io/hostname": node.plan.name},
                                       "containers": [{"name": "echo", "image": "berth/echo",
                                                       "ports": [{"containerPort": 8080}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &d)
        .await
        .expect("create deployment");
    let pods = running(&env, &ns.name, "web6", 3, &diag).await;

    // The IPv6 plan: the bridge is fd00:18::/64, node i's pods fd00:244:i::/64.
    let mut v6 = V6::default();
    let node_ip = format!("fd00:18::{index}:10");
    let gateway = format!("fd00:244:{index}::1");
    let client_ip = "fd00:18::100";
    v6.addr(&env.info.client_netns, &format!("{client_ip}/64"), "eth0");
    v6.addr(&node.plan.netns, &format!("{node_ip}/64"), "eth0");
    v6.addr(&node.plan.netns, &format!("{gateway}/64"), "cbr0");
    sysctl_in(&node.plan.netns, "net.ipv6.conf.all.forwarding=1");
    v6.forwarding = Some(node.plan.netns.clone());
    let mut endpoints = Vec::new();
    let mut names = BTreeSet::new();
    for (k, p) in pods.iter().enumerate() {
        let uid = p.metadata.uid.as_deref().expect("pod uid");
        let (pod_ns, _) = net::pod_names(uid);
        let addr = format!("fd00:244:{index}::{:x}", 0x10 + k);
        ip_in(
            &pod_ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        ip_in(&pod_ns, &["-6", "route", "add", "default", "via", &gateway]);
        let name = p.metadata.name.clone().expect("pod name");
        names.insert(name.clone());
        endpoints.push(json!({"addresses": [addr], "nodeName": node.plan.name,
                              "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": name, "namespace": ns.name}}));
    }
    let base = rand::random_range(0x10..0xff0_u16);
    let sticky = format!("fd00:96:9::{base:x}");
    let spread = format!("fd00:96:9::{:x}", base + 1);
    for external in [&sticky, &spread] {
        v6.route(&env.info.client_netns, &format!("{external}/128"), &node_ip);
    }
    v6_service(&env, &ns.name, "web6", &sticky, true, &endpoints).await;
    v6_service(&env, &ns.name, "web6-spread", &spread, false, &endpoints).await;

    let sticky_url = format!("http://[{sticky}]/");
    let spread_url = format!("http://[{spread}]/");
    for url in [&sticky_url, &spread_url] {
        wait_true(
            &format!("{url} answering"),
            Duration::from_secs(30),
            &diag,
            async || {
                requests(&env.info.client_netns, url, 1)
                    .keys()
                    .any(|a| a.starts_with("OK "))
            },
        )
        .await;
    }
    let t = requests(&env.info.client_netns, &sticky_url, 40);
    assert_eq!(t.len(), 1, "one IPv6 client saw {t:?}");
    let (only, count) = t.iter().next().expect("one answer");
    assert_eq!(*count, 40);
    assert!(
        names.contains(only.trim_start_matches("OK ")),
        "answer {only} is none of {names:?}"
    );
    // The same pods without affinity: 40 random picks among 3 land on one pod with
    // probability 3^-39.
    let t = requests(&env.info.client_netns, &spread_url, 40);
    assert!(
        t.keys()
            .all(|a| names.contains(a.trim_start_matches("OK "))),
        "answers {t:?} outside {names:?}"
    );
    assert!(t.len() >= 2, "without affinity one client saw {t:?}");
}

/// A selector-less Service `name` on IPv6 `external` (port 80 → 8080), with ClientIP
/// affinity when `sticky`, and an IPv6 EndpointSlice of `endpoints`.
async fn v6_service(
    env: &TestEnv,
    ns: &str,
    name: &str,
    external: &str,
    sticky: bool,
    endpoints: &[serde_json::Value],
) {
    let mut svc = ServiceBuilder::new(name).set("externalIPs", json!([external]));
    if sticky {
        svc = svc.set("sessionAffinity", "ClientIP").set(
            "sessionAffinityConfig",
            json!({"clientIP": {"timeoutSeconds": 300}}),
        );
    }
    svc.tcp(80, 8080).create(env, ns).await;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-v6"), "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv6",
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("slice object");
    Api::<EndpointSlice>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await
        .expect("create EndpointSlice");
}
