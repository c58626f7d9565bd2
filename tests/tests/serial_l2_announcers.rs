//! Who announces a pool Service, on the Service: the controller reads the node agents'
//! L2 Leases and writes the `berth.dev/Announced` condition naming the node that holds
//! the address's Lease, with an `AnnouncerChanged` Event on each change. The case
//! allocates an address, checks the condition names the Lease holder (and `kubectl
//! describe service` shows the Event), kills the holder's agent, checks the condition
//! and a new Event name the node that took over (and the one before), then turns L2
//! off on the class and checks that no stale condition stays on the Service.
//! Serial: it kills an agent. Addresses from 198.19.46.0/29, used by no other suite.

use std::time::Duration;

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::l2::lease_holder;
use berth_e2e::nodeagent::{self, HoldAgent, L2_LEASE_NAMESPACE, L2_LEASE_SECONDS};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use serde_json::json;

const POOL: &str = "198.19.46.0/29";

fn lease() -> Duration {
    Duration::from_secs(L2_LEASE_SECONDS)
}

/// The Service's `berth.dev/Announced` condition as (status, reason, message).
fn announced(svc: &Service) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == berth_crds::CONDITION_ANNOUNCED)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the condition says `ip` is announced by the Lease's holder, other than
/// `not`; that holder.
async fn announced_by_holder(
    env: &TestEnv,
    api: &Api<Service>,
    ip: &str,
    not: Option<&str>,
    diag: &Diagnostics,
) -> String {
    wait_until(
        "the Announced condition naming the Lease holder",
        lease() * 5,
        diag,
        async || {
            let holder = lease_holder(env, ip).await;
            let svc = api.get("web").await.map_err(|e| e.to_string())?;
            let cond = announced(&svc);
            match (&holder, &cond) {
                (Some(h), Some((s, r, m)))
                    if Some(h.as_str()) != not
                        && s == "True"
                        && r == "L2"
                        && *m == format!("{ip} announced by {h}") =>
                {
                    Ok(h.clone())
                }
                _ => Err(format!("holder {holder:?}, condition {cond:?}")),
            }
        },
    )
    .await
}

#[tokio::test]
async fn the_announced_condition_follows_the_lease_holder() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-announcers").await;
    let class = ClassGuard::with_spec(
        &env,
        &format!("{}-lan", ns.name),
        json!({"pool": {"addresses": [POOL]}}),
    );
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    opts.aws = false;
    opts.extra_args = vec!["--l2-lease-namespace".into(), L2_LEASE_NAMESPACE.into()];
    let controller =
        ControllerProc::spawn(&env.info, "announcers", &opts).unwrap_or_else(|e| panic!("{e}"));
    let diag = Diagnostics::new(&env)
        .controllers(std::slice::from_ref(&controller))
        .node_agents(&env.info)
        .events(&ns.name, "web");

    ServiceBuilder::load_balancer("web")
        .class(&class.lb_class())
        .app("nothing")
        .tcp(80, 80)
        .create(&env, &ns.name)
        .await;
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let ip = wait_until("an address", Duration::from_secs(30), &diag, async || {
        let svc = api.get("web").await.map_err(|e| e.to_string())?;
        lb_ips(&svc).first().cloned().ok_or("no address yet".into())
    })
    .await;

    let first = announced_by_holder(&env, &api, &ip, None, &diag).await;
    let describe = env.kubectl(&["describe", "service", "-n", &ns.name, "web"]);
    assert!(
        describe.contains("AnnouncerChanged")
            && describe.contains(&format!("{ip} now announced by {first} (was none)")),
        "kubectl describe service:\n{describe}"
    );

    let down = HoldAgent::stop(&first, libc::SIGKILL);
    let second = announced_by_holder(&env, &api, &ip, Some(&first), &diag).await;
    let want = format!("{ip} now announced by {second} (was {first})");
    wait_until("the AnnouncerChanged Event", lease(), &diag, async || {
        let events = env.events(&ns.name, "web").await;
        if events
            .iter()
            .any(|(t, r, m)| t == "Normal" && r == "AnnouncerChanged" && m.contains(&want))
        {
            Ok(())
        } else {
            Err(format!("events {events:?}"))
        }
    })
    .await;

    // L2 off: the address is released and nothing stale stays on the Service.
    class.set_spec(&env, json!({"pool": {"addresses": [POOL], "l2": false}}));
    wait_until(
        "no Announced condition with L2 off",
        lease() * 3,
        &diag,
        async || {
            let svc = api.get("web").await.map_err(|e| e.to_string())?;
            match announced(&svc) {
                None => Ok(()),
                Some(c) => Err(format!("condition {c:?}")),
            }
        },
    )
    .await;

    drop(down);
    let plan = &env
        .info
        .nodes
        .iter()
        .find(|n| n.plan.name == first)
        .expect("node")
        .plan;
    nodeagent::wait_healthy(plan, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
