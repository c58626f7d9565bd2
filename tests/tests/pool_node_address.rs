//! A pool class whose range contains a node's address is refused: its `Accepted`
//! condition turns False naming the node and the address, its Services get no address
//! (their condition says why, with a Warning Event), and allocation resumes once the
//! range leaves node addresses out.
//!
//! Runs its own controller for its own class. The class has `l2: false`, so even a
//! controller that allocated from it would never have an address announced; the range
//! is a /29 around the first node's InternalIP (198.18.1.8/29), the fixed one
//! 198.19.43.0/30, used by no other suite.

use std::net::Ipv4Addr;
use std::time::Duration;

use berth_crds::LoadBalancerClass;
use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, lb_condition, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_true, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);
const FIXED: &str = "198.19.43.0/30";

/// The class's `Accepted` condition as (status, reason, message).
async fn accepted(api: &Api<LoadBalancerClass>, name: &str) -> Option<(String, String, String)> {
    let class = api.get(name).await.ok()?;
    class
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .map(|c| (c.status, c.reason, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_containing_a_node_address_is_refused_and_allocates_nothing() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("pool-node-addr").await;
    let node = env.info.nodes[0].plan.clone();
    let network = Ipv4Addr::from(u32::from(node.ip) & !7);
    let range = format!("{network}/29");
    let class = ClassGuard::with_spec(
        &env,
        &ns.name,
        json!({"pool": {"addresses": [range], "l2": false}}),
    );
    let controller = ControllerProc::spawn(
        &env.info,
        &format!("{}-0", ns.name),
        &ControllerOpts::new(&class.name, &ns.name),
    )
    .unwrap_or_else(|e| panic!("start controller: {e}"));
    let controllers = [controller];
    let dump = Diagnostics::new(&env)
        .controllers(&controllers)
        .events(&ns.name, "web");
    let classes: Api<LoadBalancerClass> = Api::all(env.client.clone());
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);

    let (status, message) =
        wait_until("the class refused", LONG, &dump, async || {
            match accepted(&classes, &class.name).await {
                Some((s, r, m)) if r == "NodeAddressInPool" => Ok((s, m)),
                other => Err(format!("Accepted {other:?}")),
            }
        })
        .await;
    assert_eq!(status, "False");
    let named = format!("{} of Node {}", node.ip, node.name);
    assert!(message.contains(&named), "{message}");

    ServiceBuilder::load_balancer("web")
        .class(&class.lb_class())
        .app("web")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    let message = wait_until("web refused with the reason", LONG, &dump, async || {
        let s = services.get("web").await.map_err(|e| e.to_string())?;
        match lb_condition(&s) {
            Some((st, r, m)) if st == "False" && r == "NodeAddressInPool" => {
                if lb_ips(&s).is_empty() {
                    Ok(m)
                } else {
                    Err(format!("refused but holds {:?}", lb_ips(&s)))
                }
            }
            c => Err(format!("condition {c:?}, addresses {:?}", lb_ips(&s))),
        }
    })
    .await;
    assert!(message.contains(&named), "{message}");
    wait_true("a Warning Event on web", LONG, &dump, async || {
        env.events(&ns.name, "web")
            .await
            .iter()
            .any(|(t, r, m)| t == "Warning" && r == "NodeAddressInPool" && m.contains(&named))
    })
    .await;
    // Still nothing after the controller's resync looked again.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let s = services.get("web").await.expect("web");
    assert!(lb_ips(&s).is_empty(), "allocated {:?}", lb_ips(&s));

    // Without node addresses in it, the class is accepted and allocates again.
    class.set_spec(&env, json!({"pool": {"addresses": [FIXED], "l2": false}}));
    wait_until(
        "the class accepted again",
        LONG,
        &dump,
        async || match accepted(&classes, &class.name).await {
            Some((s, _, _)) if s == "True" => Ok(()),
            other => Err(format!("Accepted {other:?}")),
        },
    )
    .await;
    wait_until("web gets an address", LONG, &dump, async || {
        let s = services.get("web").await.map_err(|e| e.to_string())?;
        match (lb_condition(&s), lb_ips(&s)) {
            (Some((st, _, _)), ips) if st == "True" && ips == ["198.19.43.1"] => Ok(()),
            (c, ips) => Err(format!("condition {c:?}, addresses {ips:?}")),
        }
    })
    .await;
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    wait_until("web gone", LONG, &dump, async || {
        match services.get_opt("web").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}
