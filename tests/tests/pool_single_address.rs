//! A pool entry that is a single address, end to end: the controller allocates it, one
//! node agent announces it, the client reaches nginx through it. And the API server's
//! schema for pool addresses against berth's one parser of them. The address is
//! 198.19.0.77, used by no other suite.

use std::collections::BTreeSet;
use std::time::Duration;

use berth_crds::LoadBalancerClass;
use berth_crds::addresses::{AddressError, AddressRange, SAMPLES};
use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::nodeagent::L2_LEASE_NAMESPACE;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, lb_condition, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, PostParams};

const ADDRESS: &str = "198.19.0.77";
const LONG: Duration = Duration::from_secs(90);

/// The Lease holder of the address, when it has one.
async fn lease_holder(env: &TestEnv) -> Option<String> {
    let name = format!("berth-l2-{}", ADDRESS.replace('.', "-"));
    Api::<Lease>::namespaced(env.client.clone(), L2_LEASE_NAMESPACE)
        .get_opt(&name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// A class whose only entry is one address: the Service gets exactly that address, the
/// Lease holder alone puts it on its eth0, and the client gets nginx's page through it.
/// Once the Service is gone, no node keeps the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_address_entry_is_allocated_announced_and_reached() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("pool-single").await;
    let class = ClassGuard::with_spec(
        &env,
        &ns.name,
        serde_json::json!({"pool": {"addresses": [ADDRESS]}}),
    );
    let controller = ControllerProc::spawn(
        &env.info,
        &format!("{}-0", ns.name),
        &ControllerOpts::new(&class.name, &ns.name),
    )
    .unwrap_or_else(|e| panic!("start controller: {e}"));
    let controllers = [controller];
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    ServiceBuilder::load_balancer("web")
        .class(&class.lb_class())
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    let dump = Diagnostics::new(&env)
        .controllers(&controllers)
        .node_agents(&env.info)
        .events(&ns.name, "web");
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);

    let ips = wait_until("web ready with an address", LONG, &dump, async || {
        let s = api.get("web").await.map_err(|e| e.to_string())?;
        match lb_condition(&s) {
            Some((st, _, _)) if st == "True" && !lb_ips(&s).is_empty() => Ok(lb_ips(&s)),
            c => Err(format!("condition {c:?}, ips {:?}", lb_ips(&s))),
        }
    })
    .await;
    assert_eq!(ips, vec![ADDRESS.to_string()]);

    let holder = wait_until(
        &format!("one node announcing {ADDRESS}"),
        LONG,
        &dump,
        async || {
            let holder = lease_holder(&env).await;
            let on: BTreeSet<String> = env.nodes_with_address(ADDRESS).into_iter().collect();
            match holder {
                Some(h) if on.len() == 1 && on.contains(&h) => Ok(h),
                _ => Err(format!("Lease holder {holder:?}, {ADDRESS} on {on:?}")),
            }
        },
    )
    .await;
    assert_eq!(env.nodes_with_address(ADDRESS), vec![holder]);

    let url = format!("http://{ADDRESS}/");
    wait_until(
        &format!("nginx at {url}"),
        LONG,
        &dump,
        async || match curl_in(&env.info.client_netns, &url, Duration::from_secs(2)) {
            Ok(body) if body.contains("Welcome to nginx!") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;

    api.delete("web", &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete web: {e}"));
    wait_until(
        "web gone and its address on no node",
        LONG,
        &dump,
        async || {
            let gone = api
                .get_opt("web")
                .await
                .map_err(|e| e.to_string())?
                .is_none();
            let on = env.nodes_with_address(ADDRESS);
            if gone && on.is_empty() {
                Ok(())
            } else {
                Err(format!("service gone: {gone}, {ADDRESS} on {on:?}"))
            }
        },
    )
    .await;
}

/// Every sample entry against the real API server (a dry-run create of a class with that
/// one entry): what berth's parser takes, the schema takes; what the parser rejects, the
/// schema rejects, except a range that ends before it starts, which CEL cannot see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_accepts_exactly_what_the_parser_accepts() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let api: Api<LoadBalancerClass> = Api::all(env.client.clone());
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let mut disagreements = Vec::new();
    for (i, (entry, _)) in SAMPLES.iter().enumerate() {
        let class: LoadBalancerClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": format!("schema-sample-{i}")},
            "spec": {"pool": {"addresses": [entry]}}
        }))
        .expect("class object");
        let schema = api.create(&dry_run, &class).await;
        let parser = AddressRange::parse(entry);
        let schema_should_accept = matches!(parser, Ok(_) | Err(AddressError::Reversed { .. }));
        if schema.is_ok() != schema_should_accept {
            disagreements.push(format!(
                "{entry:?}: parser {parser:?}, API server {:?}",
                schema.map(|_| "accepted").map_err(|e| e.to_string())
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "schema and parser disagree:\n{}",
        disagreements.join("\n")
    );
}
