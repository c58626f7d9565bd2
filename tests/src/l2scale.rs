//! L2 announcement helpers: host addresses as berth or another tool adds them
//! ([`HostAddress`]), and a scale scenario shared by the e2e case (`serial_l2_scale`) and
//! `make bench` (`berth-bench-l2`): many pool Services created at once, most of them deleted at once,
//! while a probe loop from the client namespace requests the kept addresses. What the
//! agents did is read from their `/metrics` (before and after), what the client saw from
//! the probes. No controller runs: the Services' owner annotation and load-balancer status
//! are written here, as the pool allocator would.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::controller::{ClassGuard, install_crds};
use crate::nodeagent::{self, L2_LEASE_NAMESPACE, L2_LEASE_SECONDS};
use crate::service::ServiceBuilder;
use crate::testing::{TestEnv, curl_in};
use crate::wait::{Diagnostics, wait_until};

/// API calls in flight while creating or deleting the Services.
const API_IN_FLIGHT: usize = 16;

/// One run's shape.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Namespace prefix and class name stem.
    pub name: String,
    /// The class's pool (a CIDR): holds at least `services` addresses besides its network
    /// and broadcast addresses; used from the one after the network address.
    pub first: Ipv4Addr,
    pub prefix_len: u8,
    pub services: usize,
    /// Services kept (and probed) when the others are deleted.
    pub kept: usize,
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// From the first create until every address was on exactly one node.
    pub announce_all: Duration,
    /// `lost` Lease transitions on all agents during the run (every node is healthy).
    pub lost: f64,
    pub probes: usize,
    pub failed_probes: usize,
    /// Renewal lateness over the run, from the agents' histograms (bucket upper bounds).
    pub lateness_p50: f64,
    pub lateness_p99: f64,
    pub renewals: f64,
    /// From the deletion of the others until none of their Leases was left.
    pub leases_gone: Duration,
}

fn addresses(s: &Scenario) -> Vec<String> {
    (0..s.services)
        .map(|i| {
            // The pool skips its network address: start after it.
            let offset = u32::try_from(i + 1).unwrap_or(u32::MAX);
            Ipv4Addr::from(u32::from(s.first).saturating_add(offset)).to_string()
        })
        .collect()
}

/// Every node agent's metrics text, by node.
pub fn agents_metrics(env: &TestEnv) -> BTreeMap<String, String> {
    env.info
        .nodes
        .iter()
        .map(|n| {
            let url = format!("http://{}:{}/metrics", n.plan.ip, nodeagent::METRICS_PORT);
            let text = curl_in(&env.info.client_netns, &url, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("metrics of {}: {e}", n.plan.name));
            (n.plan.name.clone(), text)
        })
        .collect()
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `lost` transitions summed over the agents.
pub fn lost(metrics: &BTreeMap<String, String>) -> f64 {
    metrics
        .values()
        .map(|t| {
            sample(
                t,
                "berth_nodeproxy_l2_lease_transitions_total{event=\"lost\"}",
            )
        })
        .sum()
}

const LATENESS: &str = "berth_nodeproxy_l2_renewal_lateness_seconds";

/// The lateness histogram summed over the agents: (upper bound, cumulative count).
pub fn lateness(metrics: &BTreeMap<String, String>) -> Vec<(f64, f64)> {
    let mut by_bound: BTreeMap<String, f64> = BTreeMap::new();
    for text in metrics.values() {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&format!("{LATENESS}_bucket{{le=\"")) else {
                continue;
            };
            let Some((bound, count)) = rest.split_once("\"} ") else {
                continue;
            };
            *by_bound.entry(bound.to_string()).or_default() += count.trim().parse().unwrap_or(0.0);
        }
    }
    let mut out: Vec<(f64, f64)> = by_bound
        .into_iter()
        .map(|(b, c)| (b.parse().unwrap_or(f64::INFINITY), c))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile (0–1) of the observations between two histogram snapshots: the upper
/// bound of the bucket it falls in. `None` without observations.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(b, c)| {
            let was = before.iter().find(|x| x.0 == *b).map_or(0.0, |x| x.1);
            (*b, c - was)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta.iter().find(|(_, c)| *c >= q * total).map(|x| x.0)
}

/// Host addresses on every node's `eth0`, by address, with the nodes carrying each.
fn announced(env: &TestEnv) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &env.info.nodes {
        let o = Command::new("ip")
            .args([
                "-n",
                &n.plan.netns,
                "-o",
                "-4",
                "addr",
                "show",
                "dev",
                "eth0",
            ])
            .output()
            .unwrap_or_else(|e| panic!("ip addr on {}: {e}", n.plan.name));
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let mut words = line.split_whitespace();
            if words.any(|w| w == "inet")
                && let Some(a) = words.next().and_then(|a| a.strip_suffix("/32"))
            {
                out.entry(a.to_string())
                    .or_default()
                    .push(n.plan.name.clone());
            }
        }
    }
    out
}

/// Lease names of `ips` that still exist.
async fn leases_left(env: &TestEnv, ips: &BTreeSet<String>) -> BTreeSet<String> {
    let wanted: BTreeSet<String> = ips
        .iter()
        .map(|ip| format!("berth-l2-{}", ip.replace('.', "-")))
        .collect();
    Api::<Lease>::namespaced(env.client.clone(), L2_LEASE_NAMESPACE)
        .list(&ListParams::default().labels("berth.dev/l2-announcement"))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter_map(|l| l.metadata.name)
                .filter(|n| wanted.contains(n))
                .collect()
        })
        .unwrap_or_else(|e| panic!("list Leases: {e}"))
}

/// Requests every kept address in turn from the client until stopped: (requests, failed
/// ones with their address).
struct Probes {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Probes {
    fn start(netns: &str, ips: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, flag) = (netns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut sent, mut failed) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                for ip in &ips {
                    sent += 1;
                    let url = format!("http://{ip}/");
                    let ok = curl_in(&netns, &url, Duration::from_secs(2))
                        .is_ok_and(|b| b.contains("Welcome to nginx!"));
                    if !ok {
                        failed.push(ip.clone());
                    }
                }
            }
            (sent, failed)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn create(env: &TestEnv, ns: &str, class: &str, ips: &[String]) {
    let api: Api<Service> = Api::namespaced(env.client.clone(), ns);
    futures::stream::iter(ips.iter().enumerate())
        .for_each_concurrent(API_IN_FLIGHT, |(i, ip)| {
            let api = api.clone();
            async move {
                let name = format!("svc-{i}");
                ServiceBuilder::load_balancer(&name)
                    .owner_class(class)
                    .app("nginx")
                    .tcp(80, 80)
                    .set("allocateLoadBalancerNodePorts", false)
                    .create_with(&api)
                    .await;
                let status =
                    json!({"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .unwrap_or_else(|e| panic!("status of {name}: {e}"));
            }
        })
        .await;
}

async fn delete(env: &TestEnv, ns: &str, indexes: impl Iterator<Item = usize>) {
    let api: Api<Service> = Api::namespaced(env.client.clone(), ns);
    futures::stream::iter(indexes)
        .for_each_concurrent(API_IN_FLIGHT, |i| {
            let api = api.clone();
            async move {
                let name = format!("svc-{i}");
                api.delete(&name, &DeleteParams::default())
                    .await
                    .unwrap_or_else(|e| panic!("delete {name}: {e}"));
            }
        })
        .await;
}

/// Runs `s` on the environment; cleans up what it created (also on failure).
pub async fn run(env: &TestEnv, s: &Scenario) -> Report {
    install_crds(env);
    env.wait_agents_healthy().await;
    let ns = env.namespace(&s.name).await;
    let class = format!("{}-pool", ns.name);
    let _class = ClassGuard::with_spec(
        env,
        &class,
        json!({"pool": {"addresses": [format!("{}/{}", s.first, s.prefix_len)]}}),
    );
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    let lease = Duration::from_secs(L2_LEASE_SECONDS);
    let long = Duration::from_secs(300);
    let dump = Diagnostics::new(env).node_agents(&env.info);
    let ips = addresses(s);
    let before = agents_metrics(env);

    let started = Instant::now();
    create(env, &ns.name, &class, &ips).await;
    let all: BTreeSet<String> = ips.iter().cloned().collect();
    wait_until(
        "every address on exactly one node",
        long,
        &dump,
        async || {
            let on = announced(env);
            let missing = all
                .iter()
                .filter(|a| on.get(*a).is_none_or(|n| n.len() != 1))
                .count();
            if missing == 0 {
                Ok(())
            } else {
                Err(format!("{missing} addresses not on exactly one node"))
            }
        },
    )
    .await;
    let announce_all = started.elapsed();

    let kept: Vec<String> = ips[..s.kept].to_vec();
    let probes = Probes::start(&env.info.client_netns, kept.clone());
    wait_until("the kept addresses answer", long, &dump, async || {
        kept.iter()
            .try_for_each(|ip| {
                curl_in(
                    &env.info.client_netns,
                    &format!("http://{ip}/"),
                    Duration::from_secs(2),
                )
                .map(|_| ())
            })
            .map_err(|e| e.to_string())
    })
    .await;
    tokio::time::sleep(lease * 2).await;

    let deleted_at = Instant::now();
    delete(env, &ns.name, s.kept..s.services).await;
    let gone: BTreeSet<String> = ips[s.kept..].iter().cloned().collect();
    wait_until(
        "the deleted addresses' Leases gone",
        long,
        &dump,
        async || {
            let left = leases_left(env, &gone).await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} Leases left", left.len()))
            }
        },
    )
    .await;
    let leases_gone = deleted_at.elapsed();
    // Keep probing through several renewal rounds after the burst.
    tokio::time::sleep(lease * 3).await;
    let (sent, failed) = probes.finish();
    let after = agents_metrics(env);
    delete(env, &ns.name, 0..s.kept).await;

    let (lb, la) = (lateness(&before), lateness(&after));
    if !failed.is_empty() {
        eprintln!("failed probes: {failed:?}");
    }
    Report {
        announce_all,
        lost: lost(&after) - lost(&before),
        probes: sent,
        failed_probes: failed.len(),
        lateness_p50: quantile(&lb, &la, 0.5).unwrap_or(f64::NAN),
        lateness_p99: quantile(&lb, &la, 0.99).unwrap_or(f64::NAN),
        renewals: la.last().map_or(0.0, |x| x.1) - lb.last().map_or(0.0, |x| x.1),
        leases_gone,
    }
}

/// Adds `ip`/32 to `eth0` in `netns` over rtnetlink with `IFA_PROTO` `proto` and a
/// lifetime (`ip` 6.1 cannot set the protocol of an address; Python's socket module can
/// speak netlink). With berth's protocol it looks like an address an agent added.
const ADD_WITH_PROTO: &str = r#"
import socket, struct, sys
ip, secs, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def attr(kind, data):
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * ((4 - n % 4) % 4)
a = socket.inet_aton(ip)
body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, socket.if_nametoindex("eth0"))
body += attr(2, a) + attr(1, a) + attr(6, struct.pack("=IIII", secs, secs, 0, 0))
body += attr(11, bytes([proto]))
msg = struct.pack("=IHHII", 16 + len(body), 20, 0x1 | 0x4 | 0x400, 1, 0) + body
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
s.sendto(msg, (0, 0))
err = struct.unpack("=i", s.recv(4096)[16:20])[0]
sys.exit(0 if err == 0 else 1)
"#;

/// `IFA_PROTO` berth stamps on its addresses (`berth_nodeproxy::l2::link::BERTH_PROTO`).
pub const BERTH_PROTO: u8 = 0x62;

/// A host address on a node's `eth0`, removed on drop if still there.
pub struct HostAddress {
    netns: String,
    prefix: String,
}

impl HostAddress {
    /// Added as another tool would (`ip addr add`, no protocol, no lifetime).
    pub fn foreign(netns: &str, ip: &str) -> Self {
        let prefix = format!("{ip}/32");
        let out = Command::new("ip")
            .args(["-n", netns, "addr", "add", &prefix, "dev", "eth0"])
            .output()
            .unwrap_or_else(|e| panic!("ip addr add: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            netns: netns.into(),
            prefix,
        }
    }

    /// Added with `IFA_PROTO` `proto`, valid for `lifetime`.
    pub fn with_proto(netns: &str, ip: &str, proto: u8, lifetime: Duration) -> Self {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "/usr/bin/python3",
                "-c",
                ADD_WITH_PROTO,
                ip,
            ])
            .arg(lifetime.as_secs().to_string())
            .arg(proto.to_string())
            .output()
            .unwrap_or_else(|e| panic!("add {ip} with protocol {proto}: {e}"));
        assert!(
            out.status.success(),
            "add {ip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            netns: netns.into(),
            prefix: format!("{ip}/32"),
        }
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "-n",
                &self.netns,
                "addr",
                "del",
                &self.prefix,
                "dev",
                "eth0",
            ])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_bucket_deltas() {
        let before = vec![
            (0.01, 10.0),
            (0.1, 10.0),
            (1.0, 10.0),
            (f64::INFINITY, 10.0),
        ];
        let after = vec![
            (0.01, 108.0),
            (0.1, 109.0),
            (1.0, 110.0),
            (f64::INFINITY, 110.0),
        ];
        assert_eq!(quantile(&before, &after, 0.5), Some(0.01));
        assert_eq!(quantile(&before, &after, 0.99), Some(0.1));
        assert_eq!(quantile(&after, &after, 0.5), None);
        let text = "berth_nodeproxy_l2_renewal_lateness_seconds_bucket{le=\"0.01\"} 3\n\
                    berth_nodeproxy_l2_renewal_lateness_seconds_bucket{le=\"+Inf\"} 4\n\
                    berth_nodeproxy_l2_lease_transitions_total{event=\"lost\"} 2\n";
        let m = BTreeMap::from([
            ("a".to_string(), text.to_string()),
            ("b".to_string(), text.to_string()),
        ]);
        assert_eq!(lateness(&m), vec![(0.01, 6.0), (f64::INFINITY, 8.0)]);
        assert_eq!(lost(&m), 4.0);
    }
}
