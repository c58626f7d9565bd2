//! The kernel edge of L2 announcement: pool addresses on the node's interface with a
//! finite lifetime (over rtnetlink, many in one exchange), gratuitous ARP through an
//! `AF_PACKET` socket and unsolicited neighbour advertisements through a raw ICMPv6
//! socket. Every address berth adds carries `IFA_PROTO` [`BERTH_PROTO`], so
//! a restarted agent still finds its own leftovers and never touches anyone else's.
//!
//! An address lives as long as one lease duration after its last renewal: if the agent
//! is killed, the kernel removes it by itself about when another node may take the
//! Lease, so two nodes never answer ARP for long. IPv6 addresses are added without
//! duplicate address detection (`IFA_F_NODAD`: the Lease already makes the holder unique,
//! and DAD would keep the address tentative for a second) and advertised with unsolicited
//! neighbour advertisements, so neighbours switch to the new holder at once.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use crate::error::Error;

mod netlink;

pub use netlink::BERTH_PROTO;

/// The interface pool addresses are announced on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: i32,
    pub mac: [u8; 6],
}

#[derive(Debug, Deserialize)]
struct IpLink {
    ifindex: i32,
    ifname: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    local: Option<String>,
    #[serde(default)]
    prefixlen: Option<u8>,
}

async fn ip(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(Error::io("spawn ip"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

async fn links(dev: Option<&str>) -> Result<Vec<IpLink>, Error> {
    let mut args = vec!["-j", "addr", "show"];
    if let Some(d) = dev {
        args.extend(["dev", d]);
    }
    let text = ip(&args).await?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidInput(format!("ip -j addr: {e}")))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn interface(l: &IpLink) -> Result<Interface, Error> {
    let mac =
        l.address.as_deref().and_then(parse_mac).ok_or_else(|| {
            Error::InvalidInput(format!("interface {} has no MAC address", l.ifname))
        })?;
    Ok(Interface {
        name: l.ifname.clone(),
        index: l.ifindex,
        mac,
    })
}

fn addrs_of(l: &IpLink) -> Vec<(IpAddr, u8)> {
    l.addr_info
        .iter()
        .filter_map(|a| Some((a.local.as_deref()?.parse().ok()?, a.prefixlen?)))
        .collect()
}

/// The interface named `name`.
pub async fn interface_named(name: &str) -> Result<Interface, Error> {
    let all = links(Some(name)).await?;
    let l = all
        .first()
        .ok_or_else(|| Error::InvalidInput(format!("no interface {name}")))?;
    interface(l)
}

/// The interface carrying one of `addresses` (the node's InternalIPs).
pub async fn interface_with(addresses: &[IpAddr]) -> Result<Interface, Error> {
    let all = links(None).await?;
    let l = all
        .iter()
        .find(|l| addrs_of(l).iter().any(|(a, _)| addresses.contains(a)))
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "no interface carries a node address ({addresses:?}); set --l2-interface"
            ))
        })?;
    interface(l)
}

/// One address on an interface, as a netlink dump reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkAddr {
    pub addr: IpAddr,
    pub prefix: u8,
    /// `IFA_PROTO`: who added it; [`BERTH_PROTO`] for berth's own.
    pub proto: Option<u8>,
}

/// Addresses berth's agents left on the interface that this node does not hold now:
/// those stamped with [`BERTH_PROTO`]. Nobody else's address is ever touched (another
/// tool's VIP in a pool range, a pool with `l2: false`). Pure.
pub fn stale(on: &[LinkAddr], held: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
    on.iter()
        .filter(|a| a.proto == Some(BERTH_PROTO) && !held.contains(&a.addr))
        .map(|a| a.addr)
        .collect()
}

/// The addresses on `iface`, with who added them (one netlink dump).
pub async fn addresses(iface: &Interface) -> Result<Vec<LinkAddr>, Error> {
    let index = iface.index;
    blocking(move || netlink::dump_addresses(index)).await
}

/// How long an address lives after a renewal: the lease duration plus a margin, whole
/// seconds. The margin keeps the kernel from dropping the address of a healthy holder
/// whose refresh runs a little after its Lease write; the announcer itself removes the
/// address once its claim has run out, so the kernel's expiry only matters when the agent
/// is gone.
pub fn lifetime(lease: Duration) -> u32 {
    let margin = (lease / 4).max(Duration::from_secs(1));
    let total = lease + margin;
    let secs = total.as_secs() + u64::from(total.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Adds or refreshes every address of `hold` (for `lifetime` seconds, stamped as
/// berth's) and removes every address of `remove`, in one netlink exchange. An address
/// to remove that is already gone is no error. The failures, per address.
pub async fn apply(
    iface: &Interface,
    hold: Vec<IpAddr>,
    remove: Vec<IpAddr>,
    lifetime: u32,
) -> Vec<(IpAddr, Error)> {
    if hold.is_empty() && remove.is_empty() {
        return Vec::new();
    }
    let index = iface.index;
    let ops: Vec<netlink::Op> = remove
        .into_iter()
        .map(netlink::Op::Remove)
        .chain(hold.into_iter().map(|a| netlink::Op::Hold(a, lifetime)))
        .collect();
    let addrs: Vec<IpAddr> = ops.iter().map(netlink::Op::addr).collect();
    match blocking(move || netlink::apply(index, &ops)).await {
        Ok(failed) => failed,
        Err(e) => {
            let msg = e.to_string();
            addrs
                .into_iter()
                .map(|a| (a, Error::InvalidInput(msg.clone())))
                .collect()
        }
    }
}

/// Netlink calls block (briefly): off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::InvalidInput(format!("netlink task: {e}")))?
}

/// A gratuitous ARP request: `ip` announces itself at `mac`, to everyone. The request
/// form (rather than a reply) is the one every stack accepts for updating a neighbour.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address stays zero; target protocol address is the sender's.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends one gratuitous ARP for `ip` out of `iface` (needs `CAP_NET_RAW`).
pub fn send_garp(iface: &Interface, ip: Ipv4Addr) -> Result<(), Error> {
    let frame = garp_frame(iface.mac, ip);
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(Error::Io {
            what: "open AF_PACKET socket".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = iface.index;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: frame and sll outlive the call; the lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is the socket opened above.
    unsafe { libc::close(fd) };
    if sent < 0 {
        return Err(Error::Io {
            what: format!("send gratuitous ARP for {ip} on {}", iface.name),
            source: err,
        });
    }
    Ok(())
}

/// An unsolicited neighbour advertisement (RFC 4861 §4.4, §7.2.6) for `target` at `mac`,
/// from the ICMPv6 type on: Override set (replace whatever link-layer address a neighbour
/// has), Solicited and Router clear, with the target link-layer address option. The
/// checksum stays zero: the kernel fills it in on raw ICMPv6 sockets (RFC 3542 §3.1).
/// Written by hand because the 32 bytes are fixed: the packet crates at hand either
/// leave NDP options out (etherparse) or bring a code-generation framework for them
/// (pnet), and neither sends.
pub fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = 136; // Neighbor Advertisement; code 0
    m[4] = 0x20; // Override
    m[8..24].copy_from_slice(&target.octets());
    m[24] = 2; // Target Link-Layer Address option
    m[25] = 1; // its length in units of 8 bytes
    m[26..32].copy_from_slice(&mac);
    m
}

/// Sends one unsolicited neighbour advertisement for `ip` out of `iface` to all nodes
/// (`ff02::1`), hop limit 255 as receivers require (needs `CAP_NET_RAW`).
pub fn send_unsolicited_na(iface: &Interface, ip: Ipv6Addr) -> Result<(), Error> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let io = |what: &str| {
        let what = format!(
            "{what} (neighbour advertisement for {ip} on {})",
            iface.name
        );
        move |source| Error::Io { what, source }
    };
    let index = u32::try_from(iface.index)
        .map_err(|_| Error::InvalidInput(format!("interface index {}", iface.index)))?;
    let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .map_err(io("open raw ICMPv6 socket"))?;
    sock.set_multicast_if_v6(index)
        .map_err(io("set the multicast interface"))?;
    sock.set_multicast_hops_v6(255)
        .map_err(io("set the hop limit"))?;
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, index);
    sock.send_to(&unsolicited_na(iface.mac, ip), &SockAddr::from(all_nodes))
        .map_err(io("send"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsolicited_na_bytes() {
        let mac = [0x0a, 0x58, 0xc6, 0x12, 0x01, 0x0a];
        let m = unsolicited_na(mac, "fd00:198:19::5".parse().expect("ip"));
        let expected: [u8; 32] = [
            136, 0, 0, 0, // type, code, checksum (the kernel's)
            0x20, 0, 0, 0, // Override only
            0xfd, 0x00, 0x01, 0x98, 0x00, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, // target
            2, 1, 0x0a, 0x58, 0xc6, 0x12, 0x01, 0x0a, // target link-layer address
        ];
        assert_eq!(m, expected);
    }

    #[test]
    fn garp_frame_bytes() {
        let mac = [0x0a, 0x58, 0xc6, 0x12, 0x01, 0x0a];
        let f = garp_frame(mac, Ipv4Addr::new(198, 19, 8, 5));
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x0a, 0x58, 0xc6, 0x12, 0x01, 0x0a, // source
            0x08, 0x06, // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4, // Ethernet / IPv4, address sizes
            0x00, 0x01, // request
            0x0a, 0x58, 0xc6, 0x12, 0x01, 0x0a, 198, 19, 8, 5, // sender
            0, 0, 0, 0, 0, 0, 198, 19, 8, 5, // target
        ];
        assert_eq!(f, expected);
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("0a:58:C6:12:01:0a"),
            Some([0x0a, 0x58, 0xc6, 0x12, 0x01, 0x0a])
        );
        assert_eq!(parse_mac("0a:58:c6:12:01"), None);
        assert_eq!(parse_mac("0a:58:c6:12:01:0a:00"), None);
        assert_eq!(parse_mac("zz:58:c6:12:01:0a"), None);
    }

    #[test]
    fn an_address_outlives_its_lease_by_a_margin() {
        assert_eq!(lifetime(Duration::from_secs(4)), 5);
        assert_eq!(lifetime(Duration::from_secs(15)), 19);
        assert_eq!(lifetime(Duration::from_millis(1500)), 3);
    }

    #[test]
    fn only_berths_own_addresses_are_stale() {
        let a = |s: &str, proto| LinkAddr {
            addr: s.parse().expect("ip"),
            prefix: 32,
            proto,
        };
        let on = [
            a("198.19.8.5", Some(BERTH_PROTO)),
            a("198.19.8.6", Some(BERTH_PROTO)),
            a("198.19.8.7", None),
            a("198.19.8.8", Some(4)),
        ];
        let held = BTreeSet::from(["198.19.8.6".parse().expect("ip")]);
        assert_eq!(
            stale(&on, &held),
            vec!["198.19.8.5".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn ip_json_links_give_interfaces_and_addresses() {
        let text = r#"[{"ifindex":2,"ifname":"eth0","address":"0a:58:c6:12:01:0a",
            "addr_info":[{"family":"inet","local":"198.18.1.10","prefixlen":16},
                         {"family":"inet","local":"198.19.8.5","prefixlen":32,"valid_life_time":3}]}]"#;
        let l: Vec<IpLink> = serde_json::from_str(text).expect("json");
        let i = interface(&l[0]).expect("interface");
        assert_eq!((i.name.as_str(), i.index), ("eth0", 2));
        assert_eq!(
            addrs_of(&l[0]),
            vec![
                ("198.18.1.10".parse().expect("ip"), 16),
                ("198.19.8.5".parse().expect("ip"), 32)
            ]
        );
    }
}
