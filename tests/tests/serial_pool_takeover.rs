//! Taking Services over from MetalLB or Cilium without a new address (#14): a berth pool
//! class keeps the address a Service's status already shows (written by the
//! implementation that served it before) and the addresses pinned with MetalLB's or
//! Cilium's annotations; an address another implementation still serves is never given
//! out by berth. MetalLB itself does not run here: its result (the status address of a
//! classless Service, or of one with its class) is written through the status subresource
//! exactly as it writes it.
//!
//! Serial: the class is `default: true`, so it takes classless LoadBalancer Services
//! (its namespaceSelector limits it to this case's namespace). Addresses 198.19.50.0/29,
//! used by no other suite. Needs root and the running local cluster.

use std::time::Duration;

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, lb_condition, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};

const POOL: &str = "198.19.50.0/29";
/// Where "MetalLB" put the classless Service.
const FROM_STATUS: &str = "198.19.50.5";
/// What the moved Service pins with MetalLB's annotation.
const FROM_METALLB_ANNOTATION: &str = "198.19.50.4";
/// What the moved Service pins with Cilium's annotation.
const FROM_CILIUM_ANNOTATION: &str = "198.19.50.3";
/// Still served by "MetalLB" (its own class): berth must leave it alone.
const STILL_FOREIGN: &str = "198.19.50.1";
const LONG: Duration = Duration::from_secs(90);

/// Writes `ip` into the Service's status as a MetalLB controller does.
async fn write_status_ip(api: &Api<Service>, name: &str, ip: &str) {
    let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("write status of {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_class_taking_services_over_keeps_their_addresses() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("takeover").await;
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");

    // Before berth: a classless Service MetalLB served, and one of MetalLB's own class.
    ServiceBuilder::load_balancer("served-before")
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    write_status_ip(&api, "served-before", FROM_STATUS).await;
    ServiceBuilder::load_balancer("still-metallb")
        .class("example.com/metallb")
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    write_status_ip(&api, "still-metallb", STILL_FOREIGN).await;

    let class = ClassGuard::with_spec(
        &env,
        &ns.name,
        serde_json::json!({
            "default": true,
            "pool": {
                "addresses": [POOL],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
            }
        }),
    );
    // Manifests moved from MetalLB and Cilium, recreated with berth's class.
    ServiceBuilder::load_balancer("metallb-pinned")
        .class(&class.lb_class())
        .annotation("metallb.io/loadBalancerIPs", FROM_METALLB_ANNOTATION)
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    ServiceBuilder::load_balancer("cilium-pinned")
        .class(&class.lb_class())
        .annotation("lbipam.cilium.io/ips", FROM_CILIUM_ANNOTATION)
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    // Asking for the address MetalLB still serves, and for any address.
    ServiceBuilder::load_balancer("wants-foreign")
        .class(&class.lb_class())
        .annotation("metallb.io/loadBalancerIPs", STILL_FOREIGN)
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    ServiceBuilder::load_balancer("any")
        .class(&class.lb_class())
        .app("nginx")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;

    let controller = ControllerProc::spawn(
        &env.info,
        &format!("{}-0", ns.name),
        &ControllerOpts::new(&class.name, &ns.name),
    )
    .unwrap_or_else(|e| panic!("start controller: {e}"));
    let controllers = [controller];
    let dump = Diagnostics::new(&env)
        .controllers(&controllers)
        .node_agents(&env.info)
        .events(&ns.name, "served-before")
        .events(&ns.name, "wants-foreign");

    let ready_with = async |name: &str| -> Vec<String> {
        wait_until(&format!("{name} ready"), LONG, &dump, async || {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            match lb_condition(&s) {
                Some((st, _, _)) if st == "True" => Ok(lb_ips(&s)),
                c => Err(format!("condition {c:?}, ips {:?}", lb_ips(&s))),
            }
        })
        .await
    };
    assert_eq!(ready_with("served-before").await, [FROM_STATUS]);
    assert_eq!(
        ready_with("metallb-pinned").await,
        [FROM_METALLB_ANNOTATION]
    );
    assert_eq!(ready_with("cilium-pinned").await, [FROM_CILIUM_ANNOTATION]);
    let any = ready_with("any").await;
    assert_eq!(any.len(), 1);
    assert_ne!(
        any[0], STILL_FOREIGN,
        "berth gave out MetalLB's live address"
    );

    let refused = wait_until("wants-foreign refused", LONG, &dump, async || {
        let s = api.get("wants-foreign").await.map_err(|e| e.to_string())?;
        match lb_condition(&s) {
            Some((st, reason, message)) if st == "False" => Ok((reason, message, lb_ips(&s))),
            c => Err(format!("condition {c:?}")),
        }
    })
    .await;
    assert_eq!(refused.0, "AddressUnavailable", "{refused:?}");
    assert!(
        refused.1.contains(STILL_FOREIGN) && refused.1.contains("still-metallb"),
        "{refused:?}"
    );
    assert!(refused.2.is_empty(), "{refused:?}");
    let theirs = api.get("still-metallb").await.expect("still-metallb");
    assert_eq!(lb_ips(&theirs), [STILL_FOREIGN], "berth touched its status");
    assert!(
        !theirs
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f.starts_with("berth.dev")),
        "berth put a finalizer on a Service it does not serve"
    );

    // The kept address is announced and carries the traffic.
    let url = format!("http://{FROM_STATUS}/");
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
}
