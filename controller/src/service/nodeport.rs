//! NodePorts for owned instance-target Services that have none
//! (`allocateLoadBalancerNodePorts: false`). Ports are chosen from the configured range
//! among the ones no Service uses; the apiserver's own allocator has the last word (a 422
//! "already allocated" means pick again). Existing NodePorts are never changed.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::Service;

/// Every NodePort and health-check NodePort in use by `services`.
pub fn used_ports<'a>(services: impl Iterator<Item = &'a Service>) -> BTreeSet<i32> {
    let mut used = BTreeSet::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        used.extend(spec.ports.iter().flatten().filter_map(|p| p.node_port));
        used.extend(spec.health_check_node_port);
    }
    used
}

/// Indexes of the ports that need a NodePort. A TCP and a UDP entry on the same port
/// number share one (one TCP_UDP listener forwards to one NodePort).
pub fn missing(svc: &Service) -> Vec<usize> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ps| {
            ps.iter()
                .enumerate()
                .filter(|(_, p)| p.node_port.is_none())
                .map(|(i, _)| i)
                .collect()
        })
        .unwrap_or_default()
}

/// Chooses ports for the entries at `indexes`, starting at a random point in `range` and
/// skipping `used`; entries with the same port number get the same NodePort (reusing one
/// the Service already has for that number). Pure apart from the random start.
pub fn choose(
    svc: &Service,
    indexes: &[usize],
    used: &BTreeSet<i32>,
    range: &RangeInclusive<i32>,
    start: i32,
) -> Option<Vec<(usize, i32)>> {
    let ports = svc.spec.as_ref()?.ports.clone().unwrap_or_default();
    let size = range.end() - range.start() + 1;
    if size <= 0 {
        return None;
    }
    let mut taken = used.clone();
    let mut out: Vec<(usize, i32)> = Vec::new();
    let mut offset = (start - range.start()).rem_euclid(size);
    for &i in indexes {
        let number = ports.get(i)?.port;
        let sibling = ports
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != i && p.port == number)
            .find_map(|(j, p)| {
                p.node_port
                    .or_else(|| out.iter().find(|(k, _)| *k == j).map(|(_, np)| *np))
            });
        if let Some(np) = sibling {
            out.push((i, np));
            continue;
        }
        let mut found = None;
        for _ in 0..size {
            let candidate = range.start() + offset;
            offset = (offset + 1) % size;
            if !taken.contains(&candidate) {
                found = Some(candidate);
                break;
            }
        }
        let np = found?;
        taken.insert(np);
        out.push((i, np));
    }
    Some(out)
}

/// A merge patch setting the chosen NodePorts (the whole port list, as merge patches
/// replace lists), guarded by the resourceVersion so a concurrent change makes it fail
/// instead of clobbering.
pub fn patch(svc: &Service, chosen: &[(usize, i32)]) -> serde_json::Value {
    let mut ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    for (i, np) in chosen {
        if let Some(p) = ports.get_mut(*i) {
            p.node_port = Some(*np);
        }
    }
    serde_json::json!({
        "metadata": {"resourceVersion": svc.metadata.resource_version},
        "spec": {"ports": ports},
    })
}

/// Parses `30000-32767`.
pub fn parse_range(s: &str) -> Option<RangeInclusive<i32>> {
    let (a, b) = s.split_once('-')?;
    let (a, b): (i32, i32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (0 < a && a <= b && b <= 65535).then_some(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::annotations::tests::service;

    #[test]
    fn picks_free_ports_and_shares_one_per_port_number() {
        let svc = service(
            &[
                ("a", 80, "TCP", None),
                ("b", 53, "TCP", None),
                ("c", 53, "UDP", None),
                ("d", 90, "TCP", Some(30005)),
            ],
            &[],
        );
        let idx = missing(&svc);
        assert_eq!(idx, vec![0, 1, 2]);
        let used = BTreeSet::from([30000, 30001, 30005]);
        let chosen = choose(&svc, &idx, &used, &(30000..=30010), 30000).expect("ports");
        assert_eq!(chosen, vec![(0, 30002), (1, 30003), (2, 30003)]);
    }

    #[test]
    fn reuses_the_node_port_of_the_other_protocol_and_wraps_around() {
        let svc = service(
            &[("t", 53, "TCP", Some(30007)), ("u", 53, "UDP", None)],
            &[],
        );
        assert_eq!(
            choose(&svc, &[1], &BTreeSet::new(), &(30000..=30010), 30009),
            Some(vec![(1, 30007)])
        );
        let one = service(&[("t", 80, "TCP", None)], &[]);
        assert_eq!(
            choose(
                &one,
                &[0],
                &BTreeSet::from([30010]),
                &(30000..=30010),
                30010
            ),
            Some(vec![(0, 30000)])
        );
        let full: BTreeSet<i32> = (30000..=30010).collect();
        assert_eq!(choose(&one, &[0], &full, &(30000..=30010), 30000), None);
    }

    #[test]
    fn used_ports_include_health_check_node_ports() {
        let mut svc = service(&[("t", 80, "TCP", Some(30001))], &[]);
        svc.spec.get_or_insert_default().health_check_node_port = Some(30002);
        assert_eq!(
            used_ports([&svc].into_iter()),
            BTreeSet::from([30001, 30002])
        );
    }

    #[test]
    fn patch_is_guarded_by_resource_version() {
        let mut svc = service(&[("t", 80, "TCP", None)], &[]);
        svc.metadata.resource_version = Some("42".into());
        let p = patch(&svc, &[(0, 30001)]);
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert_eq!(p["spec"]["ports"][0]["nodePort"], 30001);
        assert_eq!(p["spec"]["ports"][0]["port"], 80);
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("30000-32767"), Some(30000..=32767));
        assert_eq!(parse_range("5-1"), None);
        assert_eq!(parse_range("x"), None);
    }
}
