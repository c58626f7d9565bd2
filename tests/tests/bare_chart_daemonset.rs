//! The chart's node agent DaemonSet on nodes without any other node agent: the phase of
//! `hack/e2e.sh` that starts the environment with `BERTH_E2E_NODEPROXY=0`. Needs root.
//!
//! `helm install` runs berth-nodeproxy on every node as DaemonSet pods (host network,
//! berth's own binary, the chart's args, env and ServiceAccount token, so the chart's RBAC
//! is what the apiserver enforces); the seed's nginx-service answers at its ClusterIP on
//! every node and as a NodePort from the client; `helm upgrade` rolls the agents without
//! losing a request; a pool address of an L2 class is announced by one agent (its Lease in
//! the agents' Lease namespace) and reaches nginx from the client, also after the rollout;
//! `helm uninstall` withdraws it and removes the DaemonSet and its RBAC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use berth_e2e::controller::ClassGuard;
use berth_e2e::helm::{Release, bare_node_agent_values, running_pods, write_values};
use berth_e2e::testing::{TestEnv, curl_in, wait_for};

fn nginx_answers(netns: &str, url: &str) -> bool {
    curl_in(netns, url, Duration::from_secs(2)).is_ok_and(|b| b.contains("Welcome to nginx!"))
}

#[tokio::test]
async fn helm_installs_the_node_agent_on_every_node_and_service_traffic_flows() {
    let env = TestEnv::connect().await;
    let agents = bare_node_agent_values(&env);
    let system = env.namespace("bare-system").await;
    let web = env.namespace("bare-web").await;
    let values = write_values(&format!("controller:\n  enabled: false\n{agents}"));
    let id = format!("{:08x}", rand::random::<u32>());
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));
    let selector = "app.kubernetes.io/name=berth-nodeproxy";
    let pods = running_pods(&env, &system.name, selector);
    assert_eq!(
        pods.len(),
        env.info.nodes.len(),
        "one agent per node: {pods:?}"
    );
    let ips = env.kubectl(&[
        "get",
        "pods",
        "-n",
        &system.name,
        "-l",
        selector,
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    for n in &env.info.nodes {
        assert!(
            ips.split_whitespace().any(|ip| ip == n.plan.ip.to_string()),
            "no host-network agent on {}: {ips}",
            n.plan.name
        );
    }

    env.apply_example(&web.name, "seed/nginx-deployment.yaml");
    env.apply_example(&web.name, "seed/nginx-service.yaml");
    let vip = env.kubectl(&[
        "get",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    for n in &env.info.nodes {
        let url = format!("http://{vip}/");
        wait_for(
            &format!("ClusterIP {vip} from {}", n.plan.name),
            Duration::from_secs(60),
            || async { nginx_answers(&n.plan.netns, &url) },
        )
        .await
        .expect("ClusterIP served by the chart's agent");
    }
    env.kubectl(&[
        "patch",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ]);
    let node_port = env.kubectl(&[
        "get",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    for n in &env.info.nodes {
        let url = format!("http://{}:{node_port}/", n.plan.ip);
        wait_for(
            &format!("NodePort on {} from the client", n.plan.name),
            Duration::from_secs(30),
            || async { nginx_answers(&env.info.client_netns, &url) },
        )
        .await
        .expect("NodePort served by the chart's agent");
    }

    // A pool address of an L2 class: one chart agent takes its Lease in the agents'
    // namespace (the chart's Role) and announces it to the client.
    let class = ClassGuard::with_spec(
        &env,
        &format!("bare-l2-{id}"),
        serde_json::json!({"pool": {"addresses": ["198.19.8.64/26"]}}),
    );
    let pool_ip = "198.19.8.90";
    env.kubectl(&[
        "patch",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "-p",
        &serde_json::json!({"metadata": {"annotations": {"berth.dev/load-balancer-class": class.name}},
                            "spec": {"type": "LoadBalancer"}})
        .to_string(),
    ]);
    env.kubectl(&[
        "patch",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": pool_ip, "ipMode": "VIP"}]}}})
        .to_string(),
    ]);
    let lease = format!("berth-l2-{}", pool_ip.replace('.', "-"));
    let holder = || {
        env.kubectl_output(&[
            "get",
            "lease",
            &lease,
            "-n",
            &release.l2_namespace(),
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
    };
    // One agent holds the address's Lease and is the only node with the address.
    let one_announcer = |what: &'static str| {
        let (holder, env) = (&holder, &env);
        async move {
            wait_for(
                &format!("{pool_ip} announced {what}"),
                Duration::from_secs(60),
                || {
                    let h = holder();
                    let on = env.nodes_with_address(pool_ip);
                    async move { !h.is_empty() && on == vec![h] }
                },
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: holder {:?}, on {:?}",
                    holder(),
                    env.nodes_with_address(pool_ip)
                )
            });
        }
    };
    one_announcer("by one chart agent").await;
    let url = format!("http://{pool_ip}/");
    wait_for(
        &format!("{url} from the client"),
        Duration::from_secs(30),
        || async { nginx_answers(&env.info.client_netns, &url) },
    )
    .await
    .expect("pool address announced by the chart's agent");

    // Roll the agents with a changed value while a request loop runs: the rules stay
    // programmed while an agent restarts, so no request is lost.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let netns = env.info.nodes[0].plan.netns.clone();
    let url = format!("http://{vip}/");
    let looper = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let counter = if nginx_answers(&netns, &url) {
                    &ok
                } else {
                    &failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let bump = write_values("nodeproxy:\n  podAnnotations: {berth.dev/e2e-rollout: \"2\"}\n");
    release.upgrade(&[values.clone(), bump.clone()]);
    wait_for(
        "every agent pod replaced",
        Duration::from_secs(90),
        || async {
            let now = running_pods(&env, &system.name, selector);
            now.len() == env.info.nodes.len() && now.iter().all(|p| !pods.contains(p))
        },
    )
    .await
    .expect("rollout");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    looper.join().expect("request loop");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 10, "too few requests during the rollout: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the rollout",
        ok + failed
    );

    // After the rollout some agent announces the address again.
    one_announcer("after the rollout").await;

    release.uninstall();
    // Stopped agents release their addresses (or the addresses run out of lifetime).
    wait_for(
        &format!("{pool_ip} withdrawn after uninstall"),
        Duration::from_secs(60),
        || {
            let on = env.nodes_with_address(pool_ip);
            async move { on.is_empty() }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: on {:?}", env.nodes_with_address(pool_ip)));
    drop(class);
    let left = env.kubectl(&[
        "get",
        "daemonsets,serviceaccounts,roles,rolebindings",
        "-n",
        &system.name,
        "-l",
        "app.kubernetes.io/part-of=berth",
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "left after uninstall: {left}");
    let cluster_left = env.kubectl(&["get", "clusterroles,clusterrolebindings", "-o", "name"]);
    assert!(
        !cluster_left.contains(&release.name),
        "cluster objects left: {cluster_left}"
    );
    for f in [values, bump] {
        let _ = std::fs::remove_file(f);
    }
}
