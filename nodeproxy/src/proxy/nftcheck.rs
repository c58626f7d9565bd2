//! Property test against the real nft: random models, with hostile Service, port and
//! namespace names, always render to transactions nft accepts, and incremental
//! transactions apply on top of full ones, both through `nft -f` and as the agent's
//! netlink element batch, leaving the same ruleset in the kernel. Runs in throwaway
//! network namespaces (`unshare -n`, gone when nft exits; a thread's own for the
//! netlink path); needs root like the rest of `make test`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::proxy::model::{
    Cidr, Endpoint, EndpointPort, Model, NodeFacts, Protocol, Service, ServiceId, ServicePort,
    Slice,
};
use crate::proxy::nlnft::{ElementChange, NftSocket};
use crate::proxy::ruleset::{all_rules, protect, service_rules};
use crate::proxy::sync::{Changes, Plan, Programmed};

const HOSTILE: &[&str] = &[
    "web",
    "a; flush ruleset",
    "} table ip x { chain y { drop; } }",
    "\"quoted\"",
    "$var @set",
    "name\nwith\nnewlines",
    "ünïcødé",
    "#comment",
    "",
];

fn pick<'a>(r: &mut StdRng, v: &'a [&'a str]) -> &'a str {
    v[r.random_range(0..v.len())]
}

fn addr(r: &mut StdRng, v6: bool, base: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            u16::from(base),
            0,
            0,
            0,
            0,
            r.random(),
            r.random_range(1..=u16::MAX),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, base, r.random(), r.random_range(1..=254)))
    }
}

fn proto(r: &mut StdRng) -> Protocol {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][r.random_range(0..3)]
}

fn random_model(r: &mut StdRng) -> Model {
    let node = NodeFacts {
        name: pick(r, HOSTILE).into(),
        addresses: vec![
            "198.18.1.10".parse().expect("ip"),
            "fd00:18::10".parse().expect("ip"),
        ],
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:244::/48".parse().expect("cidr"),
        ],
        service_cidrs: vec!["10.96.0.0/16".parse().expect("cidr")],
        zone: None,
    };
    let mut m = Model::test(node);
    for i in 0..r.random_range(0..25) {
        let v6 = r.random_bool(0.2);
        let id = ServiceId::new(pick(r, HOSTILE), &format!("{}{i}", pick(r, HOSTILE)));
        let ports: Vec<ServicePort> = (0..r.random_range(0..4))
            .map(|_| ServicePort {
                name: pick(r, HOSTILE).into(),
                protocol: proto(r),
                port: r.random_range(1..=u16::MAX),
                node_port: r.random_bool(0.5).then(|| r.random_range(30000..=32767)),
            })
            .collect();
        let svc = Service {
            id: id.clone(),
            cluster_ips: vec![addr(r, v6, 96)],
            ports: ports.clone(),
            external_ips: (0..r.random_range(0..2)).map(|_| addr(r, v6, 97)).collect(),
            load_balancer_ips: (0..r.random_range(0..2)).map(|_| addr(r, v6, 98)).collect(),
            external_local: r.random_bool(0.3),
            internal_local: r.random_bool(0.2),
            affinity_timeout: r.random_bool(0.3).then(|| r.random_range(1..100_000)),
            source_ranges: (0..r.random_range(0..3))
                .map(|_| {
                    let same_family = v6 && r.random_bool(0.8);
                    let a = addr(r, same_family, 18);
                    Cidr::new(a, r.random_range(8..=32)).expect("cidr")
                })
                .collect(),
            health_check_node_port: r.random_bool(0.3).then(|| r.random_range(30000..=32767)),
            owner_class: None,
        };
        for s in 0..r.random_range(0..3) {
            let slice = Slice {
                service: id.clone(),
                ports: ports
                    .iter()
                    .filter_map(|p| {
                        if !r.random_bool(0.9) {
                            return None;
                        }
                        Some(EndpointPort {
                            name: p.name.clone(),
                            protocol: p.protocol,
                            port: r.random_range(1..=u16::MAX),
                        })
                    })
                    .collect(),
                endpoints: (0..r.random_range(0..12))
                    .map(|_| Endpoint {
                        addr: addr(r, v6, 244),
                        node: r.random_bool(0.9).then(|| {
                            if r.random_bool(0.5) {
                                m.node.name.clone()
                            } else {
                                pick(r, HOSTILE).into()
                            }
                        }),
                        ready: r.random_bool(0.7),
                        serving: r.random_bool(0.8),
                        terminating: r.random_bool(0.3),
                        hints: Default::default(),
                    })
                    .collect(),
            };
            let ns = id.namespace.clone();
            m.insert_slice(&ns, &format!("{}-{s}", id.name), slice);
        }
        m.services.insert(id, svc);
    }
    m
}

/// Runs the transactions in order in a fresh network namespace and returns the ruleset
/// they leave; nft's error otherwise.
fn nft_in_throwaway_netns(transactions: &[String]) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!(
        "berth-nftcheck-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut script = String::from("set -e\n");
    for (i, t) in transactions.iter().enumerate() {
        let f = dir.join(format!("{i}.nft"));
        std::fs::File::create(&f)
            .and_then(|mut fh| fh.write_all(t.as_bytes()))
            .map_err(|e| e.to_string())?;
        script.push_str(&format!("nft -f {}\n", f.display()));
    }
    script.push_str("nft list ruleset\n");
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("unshare: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn nft_stdin(input: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("nft stdin")?
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `full` through nft, then `incremental` as one netlink batch, in a network namespace
/// of a thread of its own; returns the ruleset left.
fn netlink_in_throwaway_netns(full: String, incremental: ElementChange) -> Result<String, String> {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) of this thread only; the thread ends here.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        nft_stdin(&full, &["-f", "-"])?;
        let mut sock = NftSocket::open().map_err(|e| e.to_string())?;
        sock.commit(&incremental).map_err(|e| e.to_string())?;
        // The socket stays usable: an empty batch and a repeat of nothing are no-ops.
        sock.commit(&ElementChange::default())
            .map_err(|e| e.to_string())?;
        nft_stdin("", &["list", "ruleset"])
    })
    .join()
    .map_err(|_| "netns thread panicked".to_string())?
}

/// A listing with whitespace collapsed and the elements of each set sorted: a hash set
/// lists its elements in an order that depends on its per-table hash seed.
fn normalized(listing: &str) -> String {
    let flat = listing.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    let mut rest = flat.as_str();
    while let Some(at) = rest.find("elements = { ") {
        let (head, tail) = rest.split_at(at + "elements = { ".len());
        out.push_str(head);
        let end = tail.find(" }").unwrap_or(tail.len());
        let mut items: Vec<&str> = tail[..end].split(", ").collect();
        items.sort_unstable();
        out.push_str(&items.join(", "));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn normalized_listings_ignore_element_order_and_layout() {
    let a = "set s {\n\telements = { 10.0.0.2, 10.0.0.1,\n\t\t10.0.0.3 }\n}\n";
    let b = "set s { elements = { 10.0.0.1, 10.0.0.3, 10.0.0.2 } }";
    assert_eq!(normalized(a), normalized(b));
    assert_ne!(
        normalized(a),
        normalized("set s { elements = { 10.0.0.1 } }")
    );
}

/// The full transaction of a random model with hostile names (no user string reaches nft
/// syntax), and the programmed state it leaves.
fn hostile_full(m: &Model) -> (Plan, Programmed) {
    // Every load-balancer address is a pool address here.
    let mut rules = all_rules(m);
    for (id, r) in rules.iter_mut() {
        protect(r, m.services[id].load_balancer_ips.clone(), &m.node);
    }
    let (full, programmed) = Programmed::full(&m.node, rules, None);
    for name in HOSTILE.iter().filter(|n| n.len() > 3) {
        assert!(
            !full.transaction.contains(name),
            "user string {name:?} reached nft syntax"
        );
    }
    (full, programmed)
}

/// An incremental step on `m`: remove every other Service, change or add five of `next`.
fn random_changes(m: &Model, next: &Model) -> Changes {
    let mut changes: Changes = BTreeMap::new();
    for (i, id) in m.services.keys().enumerate() {
        if i % 2 == 0 {
            changes.insert(id.clone(), None);
        }
    }
    for (id, svc) in next.services.iter().take(5) {
        let mut svc = svc.clone();
        svc.id = id.clone();
        let mut rules = service_rules(&svc, next.slices_of(id), &m.node);
        protect(&mut rules, svc.load_balancer_ips.clone(), &m.node);
        changes.insert(id.clone(), Some(rules));
    }
    changes
}

/// Applies `full` then the step `incr` with nft, and, when the step is an element batch,
/// the same batch over netlink in another namespace; both must leave the same ruleset.
/// True when the two paths were compared.
fn nft_and_netlink_agree(round: usize, full: &Plan, incr: Plan, next: &str) -> bool {
    let by_nft = nft_in_throwaway_netns(&[
        full.transaction.clone(),
        full.transaction.clone(),
        next.to_string(),
    ])
    .unwrap_or_else(|e| {
        panic!(
            "round {round}: nft refused:\n{e}\n--- full ---\n{}\n--- incremental ---\n{next}",
            full.transaction
        )
    });
    if incr.needs_full {
        return false;
    }
    // A new affinity timeout adds a set and a rule: that change goes through nft only.
    let Some(elements) = incr.elements else {
        assert!(incr.transaction.contains("add set"), "round {round}");
        return false;
    };
    let by_netlink = netlink_in_throwaway_netns(full.transaction.clone(), elements)
        .unwrap_or_else(|e| panic!("round {round}: the netlink batch was refused: {e}"));
    assert_eq!(
        normalized(&by_netlink),
        normalized(&by_nft),
        "round {round}: netlink and nft -f left different rulesets\n--- incremental ---\n{}",
        incr.transaction
    );
    true
}

#[test]
fn random_models_with_hostile_names_render_to_transactions_nft_accepts() {
    let mut r = StdRng::seed_from_u64(0xbe57);
    let mut batches = 0;
    // At least 40 rounds, and more until 20 netlink batches were compared: rounds that
    // touch IPv6 affinity go through full syncs and compare nothing.
    for round in 0..200 {
        if round >= 40 && batches >= 20 {
            break;
        }
        let m = random_model(&mut r);
        let (full, mut programmed) = hostile_full(&m);
        let changes = random_changes(&m, &random_model(&mut r));
        let incr = programmed.plan_incremental(&changes);
        let affinity6 = full.transaction.contains(" affsvc-")
            || changes
                .values()
                .flatten()
                .any(|r| !r.affinity6.chains.is_empty());
        assert!(
            !incr.needs_full || affinity6,
            "endpoint counts stay below the precreated chains"
        );
        programmed.commit(changes);
        let again = programmed.plan_incremental(&Changes::new());
        assert_eq!(again.transaction, "");
        // IPv6 affinity sets and chains come and go with full syncs.
        let next = if incr.needs_full {
            Programmed::full(&m.node, programmed.rules(), None)
                .0
                .transaction
        } else {
            incr.transaction.clone()
        };
        if nft_and_netlink_agree(round, &full, incr, &next) {
            batches += 1;
        }
    }
    assert!(
        batches >= 20,
        "only {batches} rounds compared the two paths"
    );
}
