//! What the L2 announcer leaves behind (issues #17 and #11): no Lease of a pool address
//! that is allocated no more, and no change to addresses berth did not add. The harness's
//! agents run with a 4 s lease (a tick every 333 ms). Addresses from 198.19.12.0/24 only.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, install_crds};
use berth_e2e::l2scale::{BERTH_PROTO, HostAddress};
use berth_e2e::nodeagent::{L2_LEASE_NAMESPACE, L2_LEASE_SECONDS};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn lease() -> Duration {
    Duration::from_secs(L2_LEASE_SECONDS)
}

async fn connect(prefix: &str) -> (TestEnv, TestNamespace) {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace(prefix).await;
    (env, ns)
}

fn lease_name(ip: &str) -> String {
    format!("berth-l2-{}", ip.replace('.', "-"))
}

fn leases(env: &TestEnv) -> Api<Lease> {
    Api::namespaced(env.client.clone(), L2_LEASE_NAMESPACE)
}

/// The Leases of `ips` that exist, with their holders.
async fn existing(env: &TestEnv, ips: &[&str]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for ip in ips {
        if let Some(l) = leases(env)
            .get_opt(&lease_name(ip))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        {
            out.push((ip.to_string(), l.spec.and_then(|s| s.holder_identity)));
        }
    }
    out
}

async fn lb_service(env: &TestEnv, ns: &str, name: &str, class: &str, ip: &str) {
    ServiceBuilder::load_balancer(name)
        .owner_class(class)
        .app("nginx")
        .tcp(80, 80)
        .create(env, ns)
        .await;
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}});
    Api::<Service>::namespaced(env.client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap_or_else(|e| panic!("status of {name}: {e}"));
}

/// Deletes a hand-made Lease on drop (if the case failed before the agents did).
struct LeaseGuard(Api<Lease>, String);

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let (api, name) = (self.0.clone(), self.1.clone());
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move { api.delete(&name, &DeleteParams::default()).await });
        }
    }
}

/// Every pool Service deleted: each address's holder deletes the Lease on release, within
/// a lease duration. A Lease of an unallocated address whose holder is gone (here: made
/// by hand for a node that does not exist) is deleted by the agents once it has stood
/// still for a duration.
#[tokio::test]
async fn no_l2_lease_outlives_its_pool_address_by_a_lease_duration() {
    let (env, ns) = connect("l2-leases").await;
    let class = format!("{}-pool", ns.name);
    let _class = ClassGuard::with_spec(
        &env,
        &class,
        json!({"pool": {"addresses": ["198.19.12.0/26"]}}),
    );
    let dump = Diagnostics::new(&env).node_agents(&env.info);
    let ips = [
        "198.19.12.1",
        "198.19.12.2",
        "198.19.12.3",
        "198.19.12.4",
        "198.19.12.5",
    ];
    for (i, ip) in ips.iter().enumerate() {
        lb_service(&env, &ns.name, &format!("svc-{i}"), &class, ip).await;
    }
    wait_until("every address held", lease() * 10, &dump, async || {
        let held = existing(&env, &ips).await;
        let n = held.iter().filter(|(_, h)| h.is_some()).count();
        if n == ips.len() {
            Ok(())
        } else {
            Err(format!("held: {held:?}"))
        }
    })
    .await;
    let orphan_ip = "198.19.12.40";
    let orphan: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": lease_name(orphan_ip), "labels": {"berth.dev/l2-announcement": "true"}},
        "spec": {"holderIdentity": "a-node-that-is-gone", "leaseDurationSeconds": L2_LEASE_SECONDS}
    }))
    .expect("lease object");
    leases(&env)
        .create(&PostParams::default(), &orphan)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _orphan = LeaseGuard(leases(&env), lease_name(orphan_ip));
    let made = Instant::now();

    let deleted = Instant::now();
    for i in 0..ips.len() {
        Api::<Service>::namespaced(env.client.clone(), &ns.name)
            .delete(&format!("svc-{i}"), &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // One lease duration, and a margin for the watches and the agents' next step.
    let bound = lease() + Duration::from_secs(3);
    wait_until(
        "no Lease of a deleted Service's address",
        bound,
        &dump,
        async || {
            let left = existing(&env, &ips).await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("left: {left:?}"))
            }
        },
    )
    .await;
    eprintln!(
        "Leases of the deleted Services gone {:.1}s after the deletes",
        deleted.elapsed().as_secs_f64()
    );
    // Seen standing still for a duration after it was made, then the next step deletes
    // it (the holder's own delete path does not apply: it has no live holder).
    let bound = (lease() * 2 + Duration::from_secs(3)).saturating_sub(made.elapsed());
    wait_until("the orphaned Lease deleted", bound, &dump, async || {
        let left = existing(&env, &[orphan_ip]).await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left: {left:?}"))
        }
    })
    .await;
}

/// Host addresses berth did not add survive a minute of announcer steps: one in the
/// range of a pool with `l2: false`, one in an `l2: true` pool's range (as keepalived or
/// kube-vip would hold). A stale address stamped as berth's in the same range is removed
/// meanwhile, so the removal did run.
#[tokio::test]
async fn addresses_berth_did_not_add_survive_a_minute_in_pool_ranges() {
    let (env, ns) = connect("l2-foreign").await;
    let off = format!("{}-off", ns.name);
    let on = format!("{}-on", ns.name);
    let _off = ClassGuard::with_spec(
        &env,
        &off,
        json!({"pool": {"addresses": ["198.19.12.64/26"], "l2": false}}),
    );
    let _on = ClassGuard::with_spec(
        &env,
        &on,
        json!({"pool": {"addresses": ["198.19.12.128/26"]}}),
    );
    // Announcer work in both classes while the minute runs.
    lb_service(&env, &ns.name, "off", &off, "198.19.12.65").await;
    lb_service(&env, &ns.name, "on", &on, "198.19.12.129").await;
    let node = env.info.nodes[1].plan.clone();
    let (foreign_off, foreign_on, berths) = ("198.19.12.70", "198.19.12.140", "198.19.12.141");
    let _a = HostAddress::foreign(&node.netns, foreign_off);
    let _b = HostAddress::foreign(&node.netns, foreign_on);
    let _c = HostAddress::with_proto(&node.netns, berths, BERTH_PROTO, Duration::from_secs(600));
    let dump = Diagnostics::new(&env).node_agents(&env.info);
    let end = Instant::now() + Duration::from_secs(60);
    let mut berths_removed = false;
    while Instant::now() < end {
        let here: BTreeSet<String> = [foreign_off, foreign_on, berths]
            .into_iter()
            .filter(|ip| env.nodes_with_address(ip).contains(&node.name))
            .map(String::from)
            .collect();
        assert!(
            here.contains(foreign_off),
            "{foreign_off} (l2: false pool) removed\n{}",
            dump.report().await
        );
        assert!(
            here.contains(foreign_on),
            "{foreign_on} (not added by berth) removed\n{}",
            dump.report().await
        );
        berths_removed |= !here.contains(berths);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        berths_removed,
        "the stale address stamped as berth's was never removed"
    );
}
