//! An address shared by Services with `externalTrafficPolicy: Local`: the controller
//! lets a Local Service share only with Cluster Services and with Local ones selecting the
//! same pods, and refuses the others with a reason on their condition and a Warning
//! Event; the agents announce a shared address only from a node eligible for every
//! Service on it, so each sharer answers. Never one silently dropped.
//!
//! Runs its own controller for its own pool class; the environment's agents announce.
//! Addresses from 198.19.42.0/28, used by no other suite.

use std::collections::BTreeSet;
use std::time::Duration;

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::l2::{lease_holder, nginx_on};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, lb_condition, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_true, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use sha2::{Digest, Sha256};

const POOL: &str = "198.19.42.0/28";
const ADDRESS: &str = "198.19.42.5";
const LONG: Duration = Duration::from_secs(90);

/// `nodes` in the order the agents rank them for `addr` (the agent's rule, restated; its
/// unit tests check the two agree).
fn ranking(addr: &str, nodes: &[String]) -> Vec<String> {
    let mut order = nodes.to_vec();
    order.sort_by_key(|n| {
        let digest = Sha256::digest(format!("{addr}/{n}").as_bytes());
        (digest[..8].to_vec(), n.clone())
    });
    order
}

/// A Service of the class sharing [`ADDRESS`] under one key, pods `app`, port `port`.
async fn sharer(
    env: &TestEnv,
    ns: &str,
    class: &str,
    name: &str,
    app: &str,
    port: i32,
    local: bool,
) {
    ServiceBuilder::load_balancer(name)
        .class(class)
        .annotation("berth.dev/allow-shared-ip", "front")
        .annotation("berth.dev/load-balancer-ips", ADDRESS)
        .app(app)
        .external_local(local)
        .tcp(port, 80)
        .create(env, ns)
        .await;
}

/// Waits until the Service's condition has `reason`; (status, message, addresses).
async fn condition(
    api: &Api<Service>,
    dump: &Diagnostics,
    name: &str,
    reason: &str,
) -> (String, String, Vec<String>) {
    wait_until(
        &format!("{name} condition {reason}"),
        LONG,
        dump,
        async || {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            match lb_condition(&s) {
                Some((st, r, m)) if r == reason => Ok((st, m, lb_ips(&s))),
                c => Err(format!("condition {c:?}, addresses {:?}", lb_ips(&s))),
            }
        },
    )
    .await
}

/// The pods of `web-local` sit on the node an address-wide ranking puts last, so only
/// the intersection of eligible nodes (not their union) announces from there. A Cluster
/// Service shares the address with it and both answer through that node; a Local Service
/// whose pods are on another node is refused with `TrafficPolicyConflict` and a Warning
/// Event instead of being announced from a node that drops one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_services_share_an_address_only_when_one_node_serves_all() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-share-local").await;
    let class = ClassGuard::with_spec(&env, &ns.name, json!({"pool": {"addresses": [POOL]}}));
    let controller = ControllerProc::spawn(
        &env.info,
        &format!("{}-0", ns.name),
        &ControllerOpts::new(&class.name, &ns.name),
    )
    .unwrap_or_else(|e| panic!("start controller: {e}"));
    let controllers = [controller];
    let names: Vec<String> = env.info.nodes.iter().map(|n| n.plan.name.clone()).collect();
    let order = ranking(ADDRESS, &names);
    let (web_node, api_node) = (order[2].clone(), order[0].clone());
    nginx_on(&env, &ns.name, "web", &web_node).await;
    nginx_on(&env, &ns.name, "api", &api_node).await;
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let lb = class.lb_class();
    let dump = |svc: &str| {
        Diagnostics::new(&env)
            .controllers(&controllers)
            .node_agents(&env.info)
            .events(&ns.name, svc)
    };

    sharer(&env, &ns.name, &lb, "web-local", "web", 80, true).await;
    let (st, _, ips) = condition(&api, &dump("web-local"), "web-local", "Provisioned").await;
    assert_eq!((st.as_str(), ips), ("True", vec![ADDRESS.to_string()]));
    sharer(&env, &ns.name, &lb, "web-cluster", "web", 8080, false).await;
    sharer(&env, &ns.name, &lb, "api-local", "api", 8081, true).await;
    let (st, _, ips) = condition(&api, &dump("web-cluster"), "web-cluster", "Provisioned").await;
    assert_eq!((st.as_str(), ips), ("True", vec![ADDRESS.to_string()]));

    let (st, message, ips) = condition(
        &api,
        &dump("api-local"),
        "api-local",
        "TrafficPolicyConflict",
    )
    .await;
    assert_eq!(st, "False");
    assert!(ips.is_empty(), "refused but holds {ips:?}");
    assert!(
        message.contains("web-local") && message.contains("externalTrafficPolicy: Local"),
        "{message}"
    );
    wait_true(
        "a Warning Event on api-local",
        LONG,
        &dump("api-local"),
        async || {
            env.events(&ns.name, "api-local")
                .await
                .iter()
                .any(|(t, r, m)| {
                    t == "Warning" && r == "TrafficPolicyConflict" && m.contains("web-local")
                })
        },
    )
    .await;

    // Announced from the pods' node only, and both sharers answer through it.
    wait_until(
        &format!("{ADDRESS} announced from {web_node}"),
        LONG,
        &dump("web-local"),
        async || {
            let holder = lease_holder(&env, ADDRESS).await;
            let on: BTreeSet<String> = env.nodes_with_address(ADDRESS).into_iter().collect();
            if holder.as_deref() == Some(web_node.as_str())
                && on == BTreeSet::from([web_node.clone()])
            {
                Ok(())
            } else {
                Err(format!("Lease holder {holder:?}, {ADDRESS} on {on:?}"))
            }
        },
    )
    .await;
    for port in [80, 8080] {
        let url = format!("http://{ADDRESS}:{port}/");
        wait_until(
            &format!("nginx at {url}"),
            LONG,
            &dump("web-local"),
            async || match curl_in(&env.info.client_netns, &url, Duration::from_secs(2)) {
                Ok(b) if b.contains("Welcome to nginx!") => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .await;
    }

    for name in ["api-local", "web-cluster", "web-local"] {
        api.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }
    wait_until(
        "Services gone, address withdrawn",
        LONG,
        &dump("web-local"),
        async || {
            let left = api
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let on = env.nodes_with_address(ADDRESS);
            if left.items.is_empty() && on.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} Services left, {ADDRESS} on {on:?}",
                    left.items.len()
                ))
            }
        },
    )
    .await;
}
