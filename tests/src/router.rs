//! Real BGP routers for the BGP suites: FRR (zebra + bgpd) or GoBGP (gobgpd) from
//! Debian, each in a router namespace with one leg on the node bridge and, for traffic
//! tests, one leg towards a client namespace of its own. The router forwards with ECMP
//! over the next hops the node agents announce (FRR installs them in the kernel with a
//! layer-4 multipath hash, so connections spread). Every namespace, daemon, route and
//! directory is removed on drop, also after a failed case; names start with `berth-` so
//! the environment's sweep finds leftovers.
//!
//! The simulated cluster is IPv4-only: for IPv6 neighbors, [`Ipv6Nodes`] gives every
//! node an address in [`BRIDGE6`], and the router takes one there too (and its client
//! one of its own), so sessions, routes and traffic can run over IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use crate::error::{Error, Result};
use crate::net::{BRIDGE, BRIDGE_PREFIX, NodePlan, delete_netns};
use crate::proc::{Supervised, run, run_quiet};

/// The routers' AS; the nodes use [`NODE_ASN`].
pub const ROUTER_ASN: u32 = 64512;
pub const NODE_ASN: u32 = 64513;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Frr,
    GoBgp,
}

/// The IPv6 prefix the IPv6 cases add on the node bridge (/64).
pub const BRIDGE6: &str = "fd00:1846::";

/// Node `index`'s IPv6 address on the bridge (given by [`Ipv6Nodes`]).
pub fn node_ipv6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x1846, 0, 0, 0, 0, u16::from(index), 0x10)
}

/// Every node's [`node_ipv6`] on its eth0, with IPv6 forwarding on (the nodes forward
/// a load-balancer address's traffic to endpoints elsewhere); undone on drop.
pub struct Ipv6Nodes {
    nodes: Vec<NodePlan>,
}

impl Ipv6Nodes {
    pub fn add(nodes: &[NodePlan]) -> Result<Self> {
        let guard = Self {
            nodes: nodes.to_vec(),
        };
        for n in nodes {
            let cidr = format!("{}/64", node_ipv6(n.index));
            ip_in(
                &n.netns,
                &["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"],
            )?;
            sysctl(&n.netns, "net.ipv6.conf.all.forwarding=1")?;
        }
        Ok(guard)
    }
}

impl Drop for Ipv6Nodes {
    fn drop(&mut self) {
        for n in &self.nodes {
            let cidr = format!("{}/64", node_ipv6(n.index));
            run_quiet(
                "ip",
                &["-n", &n.netns, "-6", "addr", "del", &cidr, "dev", "eth0"],
            );
            run_quiet(
                "ip",
                &[
                    "netns",
                    "exec",
                    &n.netns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.all.forwarding=0",
                ],
            );
        }
    }
}

/// What a router is told about each node it peers with.
#[derive(Clone, Debug)]
pub struct Neighbor {
    pub ip: IpAddr,
    pub asn: u32,
    pub password: Option<String>,
}

pub struct Router {
    pub kind: Kind,
    pub netns: String,
    /// The router's address on the node bridge (the BGPPeer's address).
    pub ip: Ipv4Addr,
    /// The router's IPv6 address on the node bridge, when it has IPv6 neighbors.
    pub ip6: Option<Ipv6Addr>,
    /// The client namespace behind the router and its address, for traffic cases.
    pub client: Option<(String, Ipv4Addr)>,
    /// The client's IPv6 address, when the router has IPv6 neighbors.
    pub client6: Option<Ipv6Addr>,
    client_cidr: String,
    host_link: String,
    nodes: Vec<NodePlan>,
    dir: PathBuf,
    daemons: Vec<Supervised>,
    api_port: u16,
}

fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", setting]).map(drop)
}

impl Router {
    /// Router number `index` (1..=50): `berth-rtr-<index>` at 198.18.0.(200+index), with
    /// a client namespace `berth-rclient-<index>` in 198.51.100.(4·index)/30 when
    /// `with_client`. With an IPv6 neighbor the router also takes fd00:1846::ff:<index>
    /// (the nodes need [`Ipv6Nodes`] first) and its client fd00:5146:<index>::2/64.
    pub fn start(
        kind: Kind,
        index: u8,
        nodes: &[NodePlan],
        neighbors: &[Neighbor],
        with_client: bool,
        log_dir: &std::path::Path,
    ) -> Result<Self> {
        let netns = format!("berth-rtr-{index}");
        let base = 4 * index;
        let v6 = neighbors.iter().any(|n| n.ip.is_ipv6());
        let mut router = Self {
            kind,
            netns: netns.clone(),
            ip: Ipv4Addr::new(198, 18, 0, 200 + index),
            ip6: v6.then(|| Ipv6Addr::new(0xfd00, 0x1846, 0, 0, 0, 0, 0xff, u16::from(index))),
            client6: (v6 && with_client)
                .then(|| Ipv6Addr::new(0xfd00, 0x5146, u16::from(index), 0, 0, 0, 0, 2)),
            client: with_client.then(|| {
                (
                    format!("berth-rclient-{index}"),
                    Ipv4Addr::new(198, 51, 100, base + 2),
                )
            }),
            client_cidr: format!("198.51.100.{base}/30"),
            host_link: format!("bh-r{index}"),
            nodes: nodes.to_vec(),
            dir: std::env::temp_dir().join(format!("berth-rtr-{index}")),
            daemons: Vec::new(),
            api_port: 50051,
        };
        // A leftover of an earlier run with the same index.
        router.cleanup();
        router.network()?;
        std::fs::create_dir_all(&router.dir).map_err(Error::io("create", &router.dir))?;
        match kind {
            Kind::Frr => router.start_frr(neighbors, log_dir)?,
            Kind::GoBgp => router.start_gobgp(neighbors, log_dir)?,
        }
        Ok(router)
    }

    fn network(&self) -> Result<()> {
        let ns = self.netns.as_str();
        run("ip", &["netns", "add", ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &self.host_link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &self.host_link, "master", BRIDGE, "up"],
        )?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
        let addr = format!("{}/{BRIDGE_PREFIX}", self.ip);
        ip_in(ns, &["addr", "add", &addr, "dev", "eth0"])?;
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        sysctl(ns, "net.ipv4.ip_forward=1")?;
        // Layer-4 hash: each new connection (a new source port) may take another path.
        sysctl(ns, "net.ipv4.fib_multipath_hash_policy=1")?;
        for key in ["all", "eth0"] {
            sysctl(ns, &format!("net.ipv4.conf.{key}.send_redirects=0"))?;
        }
        if let Some(ip6) = self.ip6 {
            let addr = format!("{ip6}/64");
            ip_in(ns, &["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])?;
            sysctl(ns, "net.ipv6.conf.all.forwarding=1")?;
            sysctl(ns, "net.ipv6.fib_multipath_hash_policy=1")?;
        }
        let Some((client, client_ip)) = &self.client else {
            return Ok(());
        };
        run("ip", &["netns", "add", client])?;
        ip_in(
            ns,
            &[
                "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", client,
            ],
        )?;
        let gw = self.gateway();
        ip_in(ns, &["addr", "add", &format!("{gw}/30"), "dev", "eth1"])?;
        ip_in(ns, &["link", "set", "eth1", "up"])?;
        ip_in(client, &["link", "set", "lo", "up"])?;
        ip_in(
            client,
            &["addr", "add", &format!("{client_ip}/30"), "dev", "eth0"],
        )?;
        ip_in(client, &["link", "set", "eth0", "up"])?;
        ip_in(client, &["route", "add", "default", "via", &gw.to_string()])?;
        // Answers from the nodes to the client go back through the router.
        for n in &self.nodes {
            ip_in(
                &n.netns,
                &[
                    "route",
                    "replace",
                    &self.client_cidr,
                    "via",
                    &self.ip.to_string(),
                ],
            )?;
        }
        if let (Some(ip6), Some(client6)) = (self.ip6, self.client6) {
            let gw6 = self.gateway6();
            let net = format!("{}/64", self.client6_net());
            ip_in(
                ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{gw6}/64"),
                    "dev",
                    "eth1",
                    "nodad",
                ],
            )?;
            ip_in(
                client,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{client6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            ip_in(
                client,
                &["-6", "route", "add", "default", "via", &gw6.to_string()],
            )?;
            for n in &self.nodes {
                ip_in(
                    &n.netns,
                    &["-6", "route", "replace", &net, "via", &ip6.to_string()],
                )?;
            }
        }
        Ok(())
    }

    /// The client's IPv6 /64 (its address with the host part cleared).
    fn client6_net(&self) -> Ipv6Addr {
        let mut s = self.client6.map_or([0; 8], |a| a.segments());
        s[4..].fill(0);
        s.into()
    }

    /// The router's IPv6 address towards its client.
    fn gateway6(&self) -> Ipv6Addr {
        let mut s = self.client6_net().segments();
        s[7] = 1;
        s.into()
    }

    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.client.as_ref().map_or([0; 4], |(_, ip)| ip.octets());
        Ipv4Addr::new(a, b, c, d - 1)
    }

    fn spawn(&mut self, name: &str, argv: &[&str], log_dir: &std::path::Path) -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).args(argv);
        let log = log_dir.join(format!("{}-{name}.log", self.netns));
        self.daemons.push(Supervised::spawn(
            &format!("{name} in {}", self.netns),
            cmd,
            &log,
        )?);
        Ok(())
    }

    /// FRR's pathspace directory (vty sockets, zserv.api, pid files) of this router.
    fn frr_run_dir(&self) -> PathBuf {
        PathBuf::from("/var/run/frr").join(&self.netns)
    }

    fn start_frr(&mut self, neighbors: &[Neighbor], log_dir: &std::path::Path) -> Result<()> {
        let mut conf = format!(
            "frr defaults traditional\nhostname {ns}\nlog stdout debugging\nrouter bgp {ROUTER_ASN}\n bgp router-id {ip}\n no bgp ebgp-requires-policy\n no bgp network import-check\n timers bgp 3 9\n",
            ns = self.netns,
            ip = self.ip
        );
        for n in neighbors {
            conf += &format!(
                " neighbor {} remote-as {}\n neighbor {} passive\n neighbor {} timers connect 1\n",
                n.ip, n.asn, n.ip, n.ip
            );
            if let Some(pw) = &n.password {
                conf += &format!(" neighbor {} password {pw}\n", n.ip);
            }
        }
        conf += " address-family ipv4 unicast\n  maximum-paths 16\n exit-address-family\n";
        // IPv6 unicast is not on by default: activate it for the IPv6 neighbors.
        if neighbors.iter().any(|n| n.ip.is_ipv6()) {
            conf += " address-family ipv6 unicast\n  maximum-paths 16\n";
            for n in neighbors.iter().filter(|n| n.ip.is_ipv6()) {
                conf += &format!("  neighbor {} activate\n", n.ip);
            }
            conf += " exit-address-family\n";
        }
        let path = self.dir.join("frr.conf");
        std::fs::write(&path, conf).map_err(Error::io("write", &path))?;
        // FRR drops to user frr: it must read its config and own its run directory.
        run("chmod", &["755", &self.dir.display().to_string()])?;
        run("chmod", &["644", &path.display().to_string()])?;
        let run_dir = self.frr_run_dir();
        std::fs::create_dir_all(&run_dir).map_err(Error::io("create", &run_dir))?;
        run("chown", &["frr:frr", &run_dir.display().to_string()])?;
        let conf = path.display().to_string();
        let ns = self.netns.clone();
        for daemon in ["zebra", "bgpd"] {
            let bin = format!("/usr/lib/frr/{daemon}");
            let pid = run_dir.join(format!("{daemon}.pid")).display().to_string();
            self.spawn(
                daemon,
                &[&bin, "-N", &ns, "-f", &conf, "-i", &pid, "--log", "stdout"],
                log_dir,
            )?;
            // bgpd connects to zebra's socket: start it once zebra listens.
            let sock = run_dir.join(if daemon == "zebra" {
                "zserv.api"
            } else {
                "bgpd.vty"
            });
            wait_path(&sock)?;
        }
        Ok(())
    }

    fn start_gobgp(&mut self, neighbors: &[Neighbor], log_dir: &std::path::Path) -> Result<()> {
        let mut conf = format!(
            "[global.config]\n  as = {ROUTER_ASN}\n  router-id = \"{ip}\"\n  port = 179\n[global.use-multiple-paths.config]\n  enabled = true\n",
            ip = self.ip
        );
        for n in neighbors {
            conf += &format!(
                "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}\n",
                n.ip, n.asn
            );
            if let Some(pw) = &n.password {
                conf += &format!("    auth-password = \"{pw}\"\n");
            }
            conf += "  [neighbors.transport.config]\n    passive-mode = true\n  [neighbors.timers.config]\n    hold-time = 9\n    keepalive-interval = 3\n";
            // An IPv6 neighbor carries IPv6 unicast only: the IPv4 family offered by the
            // node is refused.
            if n.ip.is_ipv6() {
                conf += "  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv6-unicast\"\n";
            }
        }
        let path = self.dir.join("gobgpd.toml");
        std::fs::write(&path, conf).map_err(Error::io("write", &path))?;
        let api = format!("127.0.0.1:{}", self.api_port);
        let conf = path.display().to_string();
        self.spawn(
            "gobgpd",
            &[
                "gobgpd",
                "-f",
                &conf,
                "-t",
                "toml",
                "--api-hosts",
                &api,
                "--pprof-disable",
            ],
            log_dir,
        )?;
        Ok(())
    }

    /// Runs a command inside the router namespace; its stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.netns];
        all.extend_from_slice(argv);
        run("ip", &all)
    }

    fn vtysh(&self, command: &str) -> Result<serde_json::Value> {
        let out = self.exec(&["vtysh", "-N", &self.netns, "-c", command])?;
        serde_json::from_str(&out).map_err(|e| Error::Setup(format!("vtysh {command}: {e}: {out}")))
    }

    fn gobgp(&self, args: &[&str]) -> Result<serde_json::Value> {
        let port = self.api_port.to_string();
        let mut argv = vec!["gobgp", "-u", "127.0.0.1", "-p", &port];
        argv.extend_from_slice(args);
        argv.push("-j");
        let out = self.exec(&argv)?;
        serde_json::from_str(&out).map_err(|e| Error::Setup(format!("gobgp {args:?}: {e}: {out}")))
    }

    /// The BGP state of the session with `neighbor` (`Established`, `Active`, ...).
    pub fn session_state(&self, neighbor: impl Into<IpAddr>) -> Result<String> {
        let neighbor = neighbor.into();
        match self.kind {
            Kind::Frr => {
                let v = self.vtysh(&format!("show bgp neighbors {neighbor} json"))?;
                Ok(v[neighbor.to_string()]["bgpState"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string())
            }
            Kind::GoBgp => {
                let v = self.gobgp(&["neighbor", &neighbor.to_string()])?;
                // GoBGP's API enum: 1 idle .. 6 established.
                let names = [
                    "unknown",
                    "idle",
                    "connect",
                    "active",
                    "opensent",
                    "openconfirm",
                    "established",
                ];
                let n = v["state"]["session_state"].as_u64().unwrap_or(0) as usize;
                Ok(names.get(n).unwrap_or(&"unknown").to_string())
            }
        }
    }

    /// The next hops the router has for host route `addr`: FRR's kernel-installed
    /// (`show ip route`) multipath entry, GoBGP's RIB paths.
    pub fn next_hops(&self, addr: Ipv4Addr) -> Result<Vec<Ipv4Addr>> {
        Ok(self
            .hops(addr.into())?
            .into_iter()
            .filter_map(|h| h.parse().ok())
            .collect())
    }

    /// [`Router::next_hops`] of an IPv6 host route (`show ipv6 route`, GoBGP's IPv6 RIB).
    pub fn next_hops6(&self, addr: Ipv6Addr) -> Result<Vec<Ipv6Addr>> {
        Ok(self
            .hops(addr.into())?
            .into_iter()
            .filter_map(|h| h.parse().ok())
            .collect())
    }

    fn hops(&self, addr: IpAddr) -> Result<Vec<String>> {
        let prefix = format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 });
        let mut hops: Vec<String> = match self.kind {
            Kind::Frr => {
                let family = if addr.is_ipv4() { "ip" } else { "ipv6" };
                let v = self.vtysh(&format!("show {family} route {prefix} json"))?;
                v[&prefix]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["selected"].as_bool() == Some(true))
                    .flat_map(|r| r["nexthops"].as_array().cloned().unwrap_or_default())
                    .filter(|h| h["active"].as_bool() == Some(true))
                    .filter_map(|h| Some(h["ip"].as_str()?.to_string()))
                    .collect()
            }
            Kind::GoBgp => {
                let family = if addr.is_ipv4() { "ipv4" } else { "ipv6" };
                let v = self.gobgp(&["global", "rib", "-a", family, &prefix])?;
                // The next hop is NEXT_HOP's (type 3) for IPv4, MP_REACH_NLRI's (14) for IPv6.
                v[&prefix]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        p["attrs"].as_array()?.iter().find_map(|a| {
                            matches!(a["type"].as_u64(), Some(3 | 14))
                                .then(|| Some(a["nexthop"].as_str()?.to_string()))
                                .flatten()
                        })
                    })
                    .collect()
            }
        };
        hops.sort();
        hops.dedup();
        Ok(hops)
    }

    /// Counts, per node, the client's packets to `addr` the router forwards to that node
    /// (an nftables table in the router's own namespace; `rt ip nexthop` is the hop the
    /// multipath route chose).
    pub fn count_by_next_hop(&self, addr: Ipv4Addr) -> Result<()> {
        let mut rules = String::new();
        for n in &self.nodes {
            rules += &format!(
                "    ip daddr {addr} tcp flags & (syn | ack) == syn rt ip nexthop {} counter comment \"{}\"\n",
                n.ip, n.name
            );
        }
        let table = format!(
            "table ip berth-count\ndelete table ip berth-count\ntable ip berth-count {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        let path = self.dir.join("count.nft");
        std::fs::write(&path, table).map_err(Error::io("write", &path))?;
        self.exec(&["nft", "-f", &path.display().to_string()])
            .map(drop)
    }

    /// Connections counted per node name since [`Router::count_by_next_hop`].
    pub fn counted(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let out = self.exec(&["nft", "-j", "list", "table", "ip", "berth-count"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| Error::Setup(format!("nft -j: {e}")))?;
        let mut counts = std::collections::BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let Some(name) = rule["comment"].as_str() else {
                continue;
            };
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e["counter"]["packets"].as_u64())
                .unwrap_or(0);
            counts.insert(name.to_string(), packets);
        }
        Ok(counts)
    }

    fn cleanup(&mut self) {
        for mut d in self.daemons.drain(..) {
            d.stop(std::time::Duration::from_secs(2));
        }
        if let Some((client, _)) = &self.client {
            delete_netns(client);
        }
        delete_netns(&self.netns);
        run_quiet("ip", &["link", "del", &self.host_link]);
        for n in &self.nodes {
            run_quiet("ip", &["-n", &n.netns, "route", "del", &self.client_cidr]);
            if self.client6.is_some() {
                let net = format!("{}/64", self.client6_net());
                run_quiet("ip", &["-n", &n.netns, "-6", "route", "del", &net]);
            }
        }
        let _ = std::fs::remove_dir_all(self.frr_run_dir());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn wait_path(path: &std::path::Path) -> Result<()> {
    for _ in 0..100 {
        if path.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(Error::Setup(format!(
        "{} did not appear within 10s",
        path.display()
    )))
}
