//! Who announces a pool Service, on the Service: the controller reads the node agents'
//! L2 Leases and writes the `berth.dev/Announced` condition naming the node that holds
//! the address's Lease, with an `AnnouncerChanged` Event on each change. The case
//! allocates an address, checks the condition names the Lease holder (and `kubectl
//! describe service` shows the Event), kills the holder's agent, checks the condition
//! and a new Event name the node that took over (and the one before), then turns L2
//! off on the class and checks that no stale condition stays on the Service. A second
//! case scopes classes (`spec.pool.announce`): by node label (only the labelled node
//! takes the Lease, and the Lease follows the label), by interface (the address lands
//! on that interface of the one node that has it), and by a selector matching no node
//! (the condition says no node may announce it).
//! Serial: it kills an agent. Addresses from 198.19.46.0/29 and 198.19.47.0/27, used by
//! no other suite.

use std::time::Duration;

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::l2::lease_holder;
use berth_e2e::nodeagent::{self, HoldAgent, L2_LEASE_NAMESPACE, L2_LEASE_SECONDS};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{NodeLabel, TestEnv, lb_ips};
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
    announced_by_holder_of(env, api, "web", ip, not, diag).await
}

async fn announced_by_holder_of(
    env: &TestEnv,
    api: &Api<Service>,
    svc: &str,
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
            let svc = api.get(svc).await.map_err(|e| e.to_string())?;
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

/// A veth pair inside a node's namespace (a second interface of that node only);
/// deleted on drop, also after a failure.
struct Veth {
    netns: String,
    name: String,
}

impl Veth {
    fn new(netns: &str, name: &str, peer: &str) -> Self {
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(["-n", netns])
                .args(args)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let veth = Self {
            netns: netns.into(),
            name: name.into(),
        };
        ip(&["link", "add", name, "type", "veth", "peer", "name", peer]);
        ip(&["link", "set", name, "up"]);
        ip(&["link", "set", peer, "up"]);
        veth
    }

    fn has(&self, addr: &str) -> bool {
        std::process::Command::new("ip")
            .args(["-n", &self.netns, "-o", "addr", "show", "dev", &self.name])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr}/32 ")))
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.netns, "link", "del", &self.name])
            .output();
    }
}

/// `spec.pool.announce`: a class limited by node label is announced by the labelled
/// node alone, and moves when the label does; a class naming an interface only one node
/// has is announced by that node, with the address on that interface; a class whose
/// selector matches no node leaves its Service's condition False, saying why.
#[tokio::test]
async fn a_scoped_class_is_announced_by_its_nodes_on_its_interface() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    env.wait_agents_healthy().await;
    let ns = env.namespace("l2-scope").await;
    let nodes: Vec<String> = env.info.nodes.iter().map(|n| n.plan.name.clone()).collect();
    assert!(nodes.len() >= 2, "needs two nodes: {nodes:?}");
    let key = format!("berth-e2e.dev/{}", ns.name);
    let label = NodeLabel::new(&env, &nodes[0], &key);
    let veth = Veth::new(&env.info.nodes[1].plan.netns, "berthsc0", "berthsc1");
    let spec = |addresses: &str, announce: serde_json::Value| json!({"pool": {"addresses": [addresses], "announce": announce}});
    let by_label = ClassGuard::with_spec(
        &env,
        &format!("{}-label", ns.name),
        spec(
            "198.19.47.0/29",
            json!({"nodeSelector": {"matchLabels": {key.clone(): "yes"}}}),
        ),
    );
    let by_iface = ClassGuard::with_spec(
        &env,
        &format!("{}-iface", ns.name),
        spec("198.19.47.8/29", json!({"interfaces": ["berthsc0"]})),
    );
    let nowhere = ClassGuard::with_spec(
        &env,
        &format!("{}-nowhere", ns.name),
        spec(
            "198.19.47.16/29",
            json!({"nodeSelector": {"matchLabels": {key.clone(): "nobody"}}}),
        ),
    );
    let mut opts = ControllerOpts::new(&by_label.name, &ns.name);
    opts.classes = vec![
        by_label.name.clone(),
        by_iface.name.clone(),
        nowhere.name.clone(),
    ];
    opts.aws = false;
    opts.extra_args = vec!["--l2-lease-namespace".into(), L2_LEASE_NAMESPACE.into()];
    let controller =
        ControllerProc::spawn(&env.info, "l2-scope", &opts).unwrap_or_else(|e| panic!("{e}"));
    let diag = Diagnostics::new(&env)
        .controllers(std::slice::from_ref(&controller))
        .node_agents(&env.info)
        .events(&ns.name, "labelled");
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let mut ips = Vec::new();
    for (svc, class) in [
        ("labelled", &by_label),
        ("iface", &by_iface),
        ("nowhere", &nowhere),
    ] {
        ServiceBuilder::load_balancer(svc)
            .class(&class.lb_class())
            .app("nothing")
            .tcp(80, 80)
            .create(&env, &ns.name)
            .await;
        let ip = wait_until("an address", Duration::from_secs(30), &diag, async || {
            let s = api.get(svc).await.map_err(|e| e.to_string())?;
            lb_ips(&s).first().cloned().ok_or("no address yet".into())
        })
        .await;
        ips.push(ip);
    }

    let first = announced_by_holder_of(&env, &api, "labelled", &ips[0], None, &diag).await;
    assert_eq!(first, nodes[0], "only the labelled node takes the Lease");
    drop(label);
    let _label = NodeLabel::new(&env, &nodes[1], &key);
    let second = announced_by_holder_of(&env, &api, "labelled", &ips[0], Some(&first), &diag).await;
    assert_eq!(second, nodes[1], "the Lease follows the label");

    let holder = announced_by_holder_of(&env, &api, "iface", &ips[1], None, &diag).await;
    assert_eq!(holder, nodes[1], "only the node with the interface");
    wait_until(
        "the address on the class's interface",
        lease() * 2,
        &diag,
        async || {
            if veth.has(&ips[1]) {
                Ok(())
            } else {
                Err(format!("{} not on berthsc0", ips[1]))
            }
        },
    )
    .await;
    assert!(
        !env.nodes_with_address(&ips[1]).contains(&nodes[1]),
        "not on the agent's own interface too"
    );

    wait_until(
        "the condition saying no node may announce",
        lease() * 3,
        &diag,
        async || {
            let s = api.get("nowhere").await.map_err(|e| e.to_string())?;
            match announced(&s) {
                Some((st, r, m))
                    if st == "False" && r == "NoEligibleNode" && m.contains("matches no node") =>
                {
                    Ok(())
                }
                c => Err(format!("condition {c:?}")),
            }
        },
    )
    .await;
    assert_eq!(lease_holder(&env, &ips[2]).await, None, "nobody holds it");
}
