//! The test network: a bridge in the host namespace, one namespace per simulated node and
//! pod, and a client namespace playing the outside world. Every name starts with `berth-`
//! (links `bh-`/`vp`), so a sweep can find and remove leftovers of earlier runs.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::proc::{run, run_quiet};

pub const BRIDGE: &str = "berth-br0";
/// The host's address on the bridge; the apiserver and LocalStack listen here.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BRIDGE_PREFIX: u8 = 16;
pub const CLIENT_NETNS: &str = "berth-client";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Load-balancer pool addresses: on-link for the client, so it finds them by ARP (the
/// L2 announcement); tests that route one through a given node add a more specific route.
pub const POOL_RANGE: &str = "198.19.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NETNS_PREFIX: &str = "berth-";
pub const REGION: &str = "us-east-1";

/// Addresses and names of simulated node `index` (1-based).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodePlan {
    pub index: u8,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub pod_gateway: Ipv4Addr,
    pub subnet_cidr: String,
    pub zone: String,
}

impl NodePlan {
    pub fn new(index: u8) -> Self {
        let zone_letter = (b'a' + (index - 1) % 3) as char;
        Self {
            index,
            name: format!("berth-node-{index}"),
            netns: format!("berth-node-{index}"),
            ip: Ipv4Addr::new(198, 18, index, 10),
            pod_cidr: format!("10.244.{index}.0/24"),
            pod_gateway: Ipv4Addr::new(10, 244, index, 1),
            subnet_cidr: format!("198.18.{index}.0/24"),
            zone: format!("{REGION}{zone_letter}"),
        }
    }

    /// Host-side name of the veth joining this node to the bridge.
    pub fn host_link(&self) -> String {
        format!("bh-n{}", self.index)
    }

    /// Pod address number `n` (2..=254) in this node's podCIDR.
    pub fn pod_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, n)
    }
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Creates the bridge with the host's address on it.
pub fn create_bridge() -> Result<()> {
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    let addr = format!("{HOST_IP}/{BRIDGE_PREFIX}");
    ip(&["addr", "add", &addr, "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Joins a new namespace to the bridge through a veth whose inner end is `eth0`.
fn attach_to_bridge(ns: &str, host_link: &str, addr: Ipv4Addr) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&[
        "link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["link", "set", host_link, "master", BRIDGE, "up"])?;
    in_ns(ns, &["link", "set", "lo", "up"])?;
    let cidr = format!("{addr}/{BRIDGE_PREFIX}");
    in_ns(ns, &["addr", "add", &cidr, "dev", "eth0"])?;
    in_ns(ns, &["link", "set", "eth0", "up"])?;
    // A default route: DNAT in the output hook needs a route to the virtual IP first.
    in_ns(
        ns,
        &["route", "add", "default", "via", &HOST_IP.to_string()],
    )?;
    // No ICMP redirects on the bridge: a node that forwards a probe for an address it does
    // not serve yet back out of eth0 would redirect the client to the host, and the client
    // would keep that route exception for minutes, past the moment the address is served.
    for key in [
        "all.send_redirects",
        "eth0.send_redirects",
        "all.accept_redirects",
        "default.accept_redirects",
        "eth0.accept_redirects",
    ] {
        let setting = format!("net.ipv4.conf.{key}=0");
        run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", &setting])?;
    }
    Ok(())
}

/// The client namespace: on the bridge, no route to pods (it is the outside world), pool
/// addresses on-link.
pub fn create_client() -> Result<()> {
    attach_to_bridge(CLIENT_NETNS, "bh-client", CLIENT_IP)?;
    in_ns(CLIENT_NETNS, &["route", "add", POOL_RANGE, "dev", "eth0"])?;
    Ok(())
}

/// A node namespace with a pod bridge `cbr0` and routes to every other node's pods.
pub fn create_node(node: &NodePlan, all: &[NodePlan]) -> Result<()> {
    attach_to_bridge(&node.netns, &node.host_link(), node.ip)?;
    let ns = node.netns.as_str();
    in_ns(ns, &["link", "add", "cbr0", "type", "bridge"])?;
    let gw = format!("{}/24", node.pod_gateway);
    in_ns(ns, &["addr", "add", &gw, "dev", "cbr0"])?;
    in_ns(ns, &["link", "set", "cbr0", "up"])?;
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    for other in all.iter().filter(|o| o.index != node.index) {
        in_ns(
            ns,
            &[
                "route",
                "add",
                &other.pod_cidr,
                "via",
                &other.ip.to_string(),
            ],
        )?;
    }
    // The control plane (apiserver service proxy, LocalStack health checks) reaches pods.
    ip(&[
        "route",
        "add",
        &node.pod_cidr,
        "via",
        &node.ip.to_string(),
        "dev",
        BRIDGE,
    ])?;
    Ok(())
}

/// Names of a pod's namespace and of its veth's node-side end, from the pod UID.
pub fn pod_names(pod_uid: &str) -> (String, String) {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(pod_uid.as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    (format!("berth-pod-{hex}"), format!("vp{hex}"))
}

/// A pod namespace on `node`'s pod bridge with address `addr`.
pub fn create_pod(node: &NodePlan, pod_uid: &str, addr: Ipv4Addr) -> Result<String> {
    let (ns, link) = pod_names(pod_uid);
    ip(&["netns", "add", &ns])?;
    in_ns(
        &node.netns,
        &[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    )?;
    in_ns(&node.netns, &["link", "set", &link, "master", "cbr0", "up"])?;
    // Hairpin mode, as the bridge CNI sets it: with br_netfilter on, a pod reaching itself
    // through a Service is bridged back out of the port it came in on.
    in_ns(
        &node.netns,
        &[
            "link",
            "set",
            &link,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ],
    )?;
    in_ns(&ns, &["link", "set", "lo", "up"])?;
    // The MAC follows from the IP: when a pod IP is reused, the node's neighbour entry
    // for it is still right (a stale MAC would black-hole traffic until ARP re-resolves).
    in_ns(&ns, &["link", "set", "eth0", "address", &pod_mac(addr)])?;
    in_ns(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    in_ns(&ns, &["link", "set", "eth0", "up"])?;
    in_ns(
        &ns,
        &[
            "route",
            "add",
            "default",
            "via",
            &node.pod_gateway.to_string(),
        ],
    )?;
    Ok(ns)
}

/// A locally administered unicast MAC derived from a pod's IPv4 address.
pub fn pod_mac(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("0a:58:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Kills every process in a namespace, then deletes it (its veths go with it).
pub fn delete_netns(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) of a process found inside berth's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    run_quiet("ip", &["netns", "del", ns]);
}

/// berth's namespaces that exist now.
pub fn berth_namespaces() -> BTreeSet<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .map(str::to_string)
        .collect()
}

/// Removes every namespace, link and route an earlier run may have left.
pub fn sweep() {
    for ns in berth_namespaces() {
        delete_netns(&ns);
    }
    run_quiet("ip", &["link", "del", BRIDGE]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_plan_addresses_follow_the_index() {
        let n = NodePlan::new(2);
        assert_eq!(n.name, "berth-node-2");
        assert_eq!(n.ip, Ipv4Addr::new(198, 18, 2, 10));
        assert_eq!(n.pod_cidr, "10.244.2.0/24");
        assert_eq!(n.pod_gateway, Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(n.subnet_cidr, "198.18.2.0/24");
        assert_eq!(n.zone, "us-east-1b");
        assert_eq!(n.pod_ip(7), Ipv4Addr::new(10, 244, 2, 7));
        assert_eq!(
            NodePlan::new(4).zone,
            "us-east-1a",
            "zones cycle over a, b, c"
        );
    }

    #[test]
    fn pod_mac_is_a_function_of_the_ip() {
        assert_eq!(pod_mac(Ipv4Addr::new(10, 244, 1, 3)), "0a:58:0a:f4:01:03");
        assert_ne!(
            pod_mac(Ipv4Addr::new(10, 244, 1, 3)),
            pod_mac(Ipv4Addr::new(10, 244, 2, 3))
        );
    }

    #[test]
    fn pod_names_are_stable_short_and_distinct() {
        let (ns, link) = pod_names("8c0e7f4e-1111-2222-3333-444455556666");
        assert_eq!(
            (ns.clone(), link.clone()),
            pod_names("8c0e7f4e-1111-2222-3333-444455556666")
        );
        assert!(ns.starts_with(NETNS_PREFIX), "{ns} must be swept");
        assert!(link.len() <= 15, "{link} exceeds IFNAMSIZ");
        assert_ne!(pod_names("a").0, pod_names("b").0);
    }
}
