//! The chart's RBAC separates the node agents from the controller: the agents' Leases live
//! in a namespace of their own (`<release>-l2`), so the agents' ServiceAccount token is
//! refused (Forbidden) when it tries to update or delete the controller's leader Lease in
//! the release namespace, while the agents still announce a pool address through their
//! own Leases. Runs on nodes without harness agents (`BERTH_E2E_NODEPROXY=0`); needs root.

use std::time::Duration;

use berth_e2e::helm::{
    Release, bare_node_agent_values, kubectl_with, service_account_token, token_kubeconfig,
    write_values,
};
use berth_e2e::testing::{TestEnv, curl_in, wait_for};

/// Addresses of this suite only.
const POOL: &str = "198.19.41.0/28";

fn nginx_answers(netns: &str, url: &str) -> bool {
    curl_in(netns, url, Duration::from_secs(2)).is_ok_and(|b| b.contains("Welcome to nginx!"))
}

#[tokio::test]
async fn the_agents_token_cannot_touch_the_leader_lease_and_agents_still_announce() {
    let env = TestEnv::connect().await;
    let agents = bare_node_agent_values(&env);
    let system = env.namespace("rbac-system").await;
    let web = env.namespace("rbac-web").await;
    let id = format!("{:08x}", rand::random::<u32>());
    let class = format!("rbac-{id}");
    let values = write_values(&format!(
        "controller:\n  replicas: 1\n  extraArgs: [\"--class={class}\"]\n{agents}\
         loadBalancerClasses:\n  - name: {class}\n    \
         pool: {{addresses: [\"{POOL}\"], autoAssign: true, l2: true}}\n"
    ));
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));

    // The leader Lease exists once the controller leads.
    let leader = || {
        env.kubectl_output(&[
            "get",
            "lease",
            "berth-controller",
            "-n",
            &system.name,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
    };
    wait_for("the controller leads", Duration::from_secs(60), || {
        let h = leader();
        async move { !h.is_empty() }
    })
    .await
    .expect("leader Lease");

    // The agents' own identity, as their pods get it.
    let token = service_account_token(
        &env,
        &system.name,
        &format!("{}-nodeproxy", release.fullname()),
    );
    let as_agent = token_kubeconfig(&env, &token);
    let lease = env.kubectl(&[
        "get",
        "lease",
        "berth-controller",
        "-n",
        &system.name,
        "-o",
        "json",
    ]);
    let mut taken: serde_json::Value = serde_json::from_str(&lease).expect("lease json");
    taken["spec"]["holderIdentity"] = serde_json::json!("an-agent");
    let taken_file = write_values(&taken.to_string());
    for (what, args) in [
        ("update", vec!["replace", "-f", taken_file.as_str()]),
        ("delete", vec!["delete", "lease", "berth-controller"]),
    ] {
        let mut args = args;
        args.extend(["-n", system.name.as_str()]);
        let out = kubectl_with(&as_agent, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("Forbidden"),
            "the agents' token may {what} the leader Lease: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_ne!(leader(), "an-agent");
    // The token itself works: the agents' own Leases are readable with it.
    let own = kubectl_with(&as_agent, &["get", "leases", "-n", &release.l2_namespace()]);
    assert!(
        own.status.success(),
        "the agents' token cannot read their own Leases: {}",
        String::from_utf8_lossy(&own.stderr)
    );

    // The agents still announce: a pool Service's address answers from the client.
    env.apply_example(&web.name, "seed/nginx-deployment.yaml");
    env.apply_example(&web.name, "seed/nginx-service.yaml");
    env.kubectl(&[
        "patch",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "-p",
        &serde_json::json!({"spec": {"type": "LoadBalancer",
                                     "loadBalancerClass": format!("berth.dev/{class}")}})
        .to_string(),
    ]);
    let ip = || {
        env.kubectl(&[
            "get",
            "service",
            "nginx-service",
            "-n",
            &web.name,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
    };
    wait_for("a pool address in status", Duration::from_secs(60), || {
        let ip = ip();
        async move { !ip.is_empty() }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            env.kubectl(&["describe", "service", "-n", &web.name])
        )
    });
    let ip = ip();
    assert!(ip.starts_with("198.19.41."), "{ip} is not from {POOL}");
    let url = format!("http://{ip}/");
    wait_for(
        "the pool address answers from the client",
        Duration::from_secs(60),
        || async { nginx_answers(&env.info.client_netns, &url) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: announced by {:?}", env.nodes_with_address(&ip)));
    let holder = env.kubectl(&[
        "get",
        "lease",
        &format!("berth-l2-{}", ip.replace('.', "-")),
        "-n",
        &release.l2_namespace(),
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(
        env.nodes_with_address(&ip),
        vec![holder],
        "the Lease's holder announces"
    );

    env.kubectl(&[
        "delete",
        "service",
        "nginx-service",
        "-n",
        &web.name,
        "--wait",
        "--timeout=60s",
    ]);
    release.uninstall();
    for f in [values, as_agent, taken_file] {
        let _ = std::fs::remove_file(f);
    }
}
