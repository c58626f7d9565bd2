//! berth on bare metal, installed the way a user would: the Helm chart with a default
//! `pool` class, no AWS configuration at all, and the chart's node agents (the phase of
//! `hack/e2e.sh` that starts the environment with `BERTH_E2E_NODEPROXY=0`). Needs root.
//!
//! The seed's nginx-service becomes a LoadBalancer without naming a class; the default
//! pool class gives it an address, one node announces it on L2, and the client (outside
//! the cluster) reaches the nginx page at `http://<address>/`. Restarting the controller
//! keeps the address; replacing the announcing node's agent moves the announcement to
//! another node (the gap is measured and printed); deleting the Service releases it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_e2e::helm::{Release, bare_node_agent_values, running_pods, write_values};
use berth_e2e::testing::{TestEnv, curl_in, wait_for};

/// The range reserved for the integration suite and the demo.
const POOL: &str = "198.19.0.224/28";

fn nginx_answers(netns: &str, url: &str) -> bool {
    curl_in(netns, url, Duration::from_millis(800)).is_ok_and(|b| b.contains("Welcome to nginx!"))
}

fn in_pool(ip: &str) -> bool {
    ip.strip_prefix("198.19.0.")
        .and_then(|last| last.parse::<u8>().ok())
        .is_some_and(|n| (225..=238).contains(&n))
}

#[tokio::test]
async fn seed_nginx_on_a_default_pool_class_installed_with_helm() {
    let env = TestEnv::connect().await;
    let agents = bare_node_agent_values(&env);
    let system = env.namespace("pool-system").await;
    let web = env.namespace("pool-web").await;
    let id = format!("{:08x}", rand::random::<u32>());
    let class = format!("lan-{id}");
    // No controller.aws at all: a bare-metal install has no cloud.
    let values = write_values(&format!(
        "clusterName: lab\ncontroller:\n  replicas: 2\n{agents}\
         loadBalancerClasses:\n  - name: {class}\n    default: true\n    \
         pool: {{addresses: [\"{POOL}\"], autoAssign: true, l2: true}}\n"
    ));
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));
    let controllers = "app.kubernetes.io/name=berth-controller";
    assert_eq!(running_pods(&env, &system.name, controllers).len(), 2);

    env.apply_example(&web.name, "seed/nginx-deployment.yaml");
    env.apply_example(&web.name, "seed/nginx-service.yaml");
    env.kubectl(&[
        "patch",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "-p",
        r#"{"spec":{"type":"LoadBalancer"}}"#,
    ]);
    let get = |path: &str| {
        env.kubectl(&[
            "get",
            "service",
            "nginx-service",
            "-n",
            &web.name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    wait_for(
        "a pool address in status",
        Duration::from_secs(60),
        || async { !get("{.status.loadBalancer.ingress[0].ip}").is_empty() },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            env.kubectl(&["describe", "service", "-n", &web.name])
        )
    });
    let ip = get("{.status.loadBalancer.ingress[0].ip}");
    assert!(in_pool(&ip), "{ip} is not a usable address of {POOL}");
    assert_eq!(get("{.status.loadBalancer.ingress[0].ipMode}"), "VIP");
    assert_eq!(get("{.status.loadBalancer.ingress[0].ports[0].port}"), "80");
    assert_eq!(
        get("{.status.conditions[?(@.type==\"berth.dev/LoadBalancerReady\")].status}"),
        "True"
    );
    assert_eq!(
        get("{.metadata.annotations.berth\\.dev/load-balancer-class}"),
        class
    );

    let url = format!("http://{ip}/");
    let client = env.info.client_netns.clone();
    wait_for(
        "the nginx page at the pool address from the client",
        Duration::from_secs(60),
        || async { nginx_answers(&client, &url) },
    )
    .await
    .expect("pool address reachable over L2");
    let holders = env.nodes_with_address(&ip);
    assert_eq!(
        holders.len(),
        1,
        "exactly one node announces {ip}: {holders:?}"
    );

    // A controller restart (both replicas replaced) changes nothing: same address, no
    // status write.
    let version = get("{.metadata.resourceVersion}");
    let before = running_pods(&env, &system.name, controllers);
    env.kubectl(&["delete", "pods", "-n", &system.name, "-l", controllers]);
    wait_for("new controller pods", Duration::from_secs(90), || async {
        let now = running_pods(&env, &system.name, controllers);
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    })
    .await
    .expect("controller pods replaced");
    let ready = env.kubectl(&[
        "rollout",
        "status",
        "deployment",
        "-n",
        &system.name,
        "--timeout=90s",
    ]);
    assert!(ready.contains("successfully rolled out"), "{ready}");
    // Longer than the controller's first resync after it wins the lease.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(get("{.status.loadBalancer.ingress[0].ip}"), ip);
    assert_eq!(
        get("{.metadata.resourceVersion}"),
        version,
        "the restarted controller rewrote the Service"
    );

    // Replace the announcing node's agent while a request loop runs: the agent releases
    // its Lease on the way out and another node takes the address over.
    let holder = holders[0].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gap = Arc::new(std::sync::Mutex::new((None::<Instant>, Duration::ZERO)));
    let looper = {
        let (stop, ok, failed, gap) = (stop.clone(), ok.clone(), failed.clone(), gap.clone());
        let (client, url) = (client.clone(), url.clone());
        std::thread::spawn(move || {
            let mut last_ok = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if nginx_answers(&client, &url) {
                    let now = Instant::now();
                    let mut g = gap.lock().expect("gap");
                    if now - last_ok > g.1 {
                        *g = (Some(last_ok), now - last_ok);
                    }
                    last_ok = now;
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent = env.kubectl(&[
        "get",
        "pods",
        "-n",
        &system.name,
        "-l",
        "app.kubernetes.io/name=berth-nodeproxy",
        "--field-selector",
        &format!("spec.nodeName={holder}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    assert!(!agent.is_empty(), "no agent pod on {holder}");
    env.kubectl(&["delete", "pod", "-n", &system.name, &agent, "--wait=false"]);
    wait_for(
        "another node announces the address",
        Duration::from_secs(60),
        || async {
            let now = env.nodes_with_address(&ip);
            now.len() == 1 && now[0] != holder
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: announcers now {:?}", env.nodes_with_address(&ip)));
    wait_for(
        "the agent pod replaced",
        Duration::from_secs(60),
        || async {
            running_pods(&env, &system.name, "app.kubernetes.io/name=berth-nodeproxy").len()
                == env.info.nodes.len()
        },
    )
    .await
    .expect("DaemonSet restores the agent");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    looper.join().expect("request loop");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let longest = gap.lock().expect("gap").1;
    println!(
        "failover of {ip} away from {holder} (agent pod deleted): longest gap between \
         successful requests {} ms; {failed} of {} requests failed",
        longest.as_millis(),
        ok + failed
    );
    assert!(ok > 10, "too few successful requests: {ok}");
    assert!(nginx_answers(&client, &url), "nginx after the failover");
    assert_eq!(
        env.nodes_with_address(&ip).len(),
        1,
        "one announcer after the restart"
    );

    // Deleting the Service releases the address: no node keeps it, the Lease goes.
    env.kubectl(&["delete", "service", "nginx-service", "-n", &web.name]);
    wait_for("address withdrawn", Duration::from_secs(60), || async {
        env.nodes_with_address(&ip).is_empty()
    })
    .await
    .expect("address removed from every node");

    release.uninstall();
    let _ = std::fs::remove_file(values);
}
