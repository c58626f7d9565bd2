//! An IPv6 pool address fails over like an IPv4 one. The client namespace reaches the
//! address on-link (neighbour discovery resolves it to the holder's MAC); the holder's
//! agent is killed; another node takes the Lease and sends unsolicited neighbour
//! advertisements, so the client's neighbour entry shows the new node's MAC right after
//! the takeover, before the client sends anything, and requests resume through it.
//!
//! The simulated cluster is IPv4-only, so the case adds the IPv6 addresses it needs
//! (removed again on drop, also after a failure): the bridge prefix fd00:1845::/64 on
//! the client and every node, the pool fd00:1945::/120 on-link for the client. The
//! Service has no selector; its IPv6 EndpointSlice names a listener in the client
//! namespace, which each node reaches with the masquerade ETP=Cluster traffic gets.
//! No controller runs: the case writes the owner annotation and the status itself.
//! Serial: it kills an agent.

use std::process::Command;
use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::l2::{lease_holder, mac_of};
use berth_e2e::nodeagent::{self, HoldAgent, L2_LEASE_SECONDS};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{PodServer, TestEnv, curl_in, exec_in};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

const POOL: &str = "fd00:1945::/120";
const VIP: &str = "fd00:1945::10";
const CLIENT_V6: &str = "fd00:1845::100";
const BACKEND_PORT: u16 = 18745;

fn lease() -> Duration {
    Duration::from_secs(L2_LEASE_SECONDS)
}

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

/// The IPv6 setup this case made, undone on drop in reverse order.
#[derive(Default)]
struct V6Setup {
    undo: Vec<Vec<String>>,
}

impl V6Setup {
    fn ip(&mut self, netns: &str, add: &[&str], del: &[&str]) {
        ip_in(netns, add);
        let mut u = vec!["ip".to_string(), "-n".into(), netns.into()];
        u.extend(del.iter().map(|s| s.to_string()));
        self.undo.push(u);
    }

    fn forwarding(&mut self, netns: &str) {
        let out = exec_in(
            netns,
            &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"],
        )
        .expect("sysctl");
        assert!(out.status.success(), "IPv6 forwarding in {netns}");
        self.undo.push(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.forwarding=0",
            ]
            .map(String::from)
            .to_vec(),
        );
    }
}

impl Drop for V6Setup {
    fn drop(&mut self) {
        for u in self.undo.iter().rev() {
            let _ = Command::new(&u[0]).args(&u[1..]).output();
        }
    }
}

/// One HTTP GET from `netns`, its body trimmed.
fn get(netns: &str, url: &str) -> Result<String, String> {
    curl_in(netns, url, Duration::from_secs(2))
        .map(|b| b.trim().to_string())
        .map_err(|e| e.to_string())
}

/// The client's neighbour entry for [`VIP`]: (MAC, state), if any.
fn client_neighbour(netns: &str) -> Option<(String, String)> {
    let out = Command::new("ip")
        .args(["-n", netns, "-6", "neigh", "show", "to", VIP, "dev", "eth0"])
        .output()
        .expect("ip neigh");
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let mac = words.iter().position(|w| *w == "lladdr")?;
    Some((words.get(mac + 1)?.to_string(), words.last()?.to_string()))
}

/// Nodes whose eth0 carries [`VIP`].
fn nodes_with_vip(env: &TestEnv) -> Vec<String> {
    let host = format!(" {VIP}/128 ");
    env.info
        .nodes
        .iter()
        .filter(|n| {
            Command::new("ip")
                .args([
                    "-n",
                    &n.plan.netns,
                    "-o",
                    "-6",
                    "addr",
                    "show",
                    "dev",
                    "eth0",
                ])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&host))
        })
        .map(|n| n.plan.name.clone())
        .collect()
}

#[tokio::test]
async fn an_ipv6_pool_address_moves_with_unsolicited_neighbour_advertisements() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-ipv6").await;
    let diag = Diagnostics::new(&env).node_agents(&env.info);
    let client = env.info.client_netns.clone();

    let mut v6 = V6Setup::default();
    let client_cidr = format!("{CLIENT_V6}/64");
    v6.ip(
        &client,
        &["-6", "addr", "add", &client_cidr, "dev", "eth0", "nodad"],
        &["-6", "addr", "del", &client_cidr, "dev", "eth0"],
    );
    v6.ip(
        &client,
        &["-6", "route", "add", "fd00:1945::/64", "dev", "eth0"],
        &["-6", "route", "del", "fd00:1945::/64", "dev", "eth0"],
    );
    for n in &env.info.nodes {
        let cidr = format!("fd00:1845::{}:10/64", n.plan.index);
        v6.ip(
            &n.plan.netns,
            &["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"],
            &["-6", "addr", "del", &cidr, "dev", "eth0"],
        );
        v6.forwarding(&n.plan.netns);
    }
    let _backend = PodServer::start(&client, "v6-backend", BACKEND_PORT);

    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-lan6", ns.name),
        json!({"pool": {"addresses": [POOL]}}),
    );
    ServiceBuilder::load_balancer("web6")
        .owner_class(&class.name)
        .tcp(80, i32::from(BACKEND_PORT))
        .create(&env, &ns.name)
        .await;
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web6-v6", "labels": {"kubernetes.io/service-name": "web6"}},
        "addressType": "IPv6",
        "ports": [{"name": "", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [CLIENT_V6], "conditions": {"ready": true}}],
    }))
    .expect("slice object");
    Api::<EndpointSlice>::namespaced(env.client.clone(), &ns.name)
        .create(&PostParams::default(), &slice)
        .await
        .expect("create EndpointSlice");
    Api::<Service>::namespaced(env.client.clone(), &ns.name)
        .patch_status(
            "web6",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": VIP, "ipMode": "VIP"}]}}}),
            ),
        )
        .await
        .expect("set the Service's status");

    let url = format!("http://[{VIP}]/");
    let first = wait_until(
        "the IPv6 pool address answering",
        lease() * 4,
        &diag,
        async || {
            let on = nodes_with_vip(&env);
            let [holder] = on.as_slice() else {
                return Err(format!("{VIP} on {on:?}"));
            };
            let body = get(&client, &url)?;
            if body == "v6-backend" {
                Ok(holder.clone())
            } else {
                Err(format!("answer {body:?}"))
            }
        },
    )
    .await;
    let netns_of = |name: &str| {
        env.info
            .nodes
            .iter()
            .find(|n| n.plan.name == name)
            .expect("node")
            .plan
            .netns
            .clone()
    };
    let old_mac = mac_of(&netns_of(&first));
    let (mac, state) = client_neighbour(&client).expect("the client resolved the address");
    assert_eq!(
        mac, old_mac,
        "the client reached {VIP} at {first} ({state})"
    );

    let down = HoldAgent::stop(&first, libc::SIGKILL);
    let (second, taken) = wait_until(
        "another node taking the address",
        lease() * 4,
        &diag,
        async || match lease_holder(&env, VIP).await {
            Some(h) if h != first && nodes_with_vip(&env).contains(&h) => Ok((h, Instant::now())),
            h => Err(format!("holder {h:?}, on {:?}", nodes_with_vip(&env))),
        },
    )
    .await;
    let new_mac = mac_of(&netns_of(&second));
    // No request from the client until its entry changed: only an unsolicited
    // advertisement can change it (its entry is fresh, it has no reason to probe).
    let updated = loop {
        let entry = client_neighbour(&client);
        if entry.as_ref().is_some_and(|(m, _)| *m == new_mac) || taken.elapsed() > lease() {
            break entry;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "{VIP}: {first} ({old_mac}) → {second} ({new_mac}); client entry {updated:?} {} ms after the takeover was seen",
        taken.elapsed().as_millis()
    );
    assert_eq!(
        updated.as_ref().map(|(m, _)| m.as_str()),
        Some(new_mac.as_str()),
        "the client's neighbour entry for {VIP} after {second} took it from {first}\n{}",
        diag.report().await
    );
    let body = get(&client, &url).unwrap_or_else(|e| panic!("request after the takeover: {e}"));
    assert_eq!(body, "v6-backend");

    drop(down);
    let plan = &env
        .info
        .nodes
        .iter()
        .find(|n| n.plan.name == first)
        .expect("node")
        .plan;
    nodeagent::wait_healthy(plan, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
