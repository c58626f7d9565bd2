//! Next to a cloud provider: with a `default: true` class, the chart's
//! MutatingAdmissionPolicy makes the default explicit at admission. A classless
//! LoadBalancer Service (created so, or changed from ClusterIP) gets
//! `spec.loadBalancerClass: berth.dev/<default>` from the apiserver itself, so a cloud
//! provider's service controller would skip it, and berth provisions it; Services outside
//! the policy's namespaces stay classless. With `defaultClassPolicy.enabled: false` the
//! policy is gone and the old behaviour remains: classless, provisioned by berth through
//! the default. Needs root and the running local cluster.

use std::time::Duration;

use berth_e2e::helm::{Release, write_values};
use berth_e2e::testing::{TestEnv, wait_for};

/// Addresses of this suite only.
const POOL: &str = "198.19.40.0/28";

/// `spec.loadBalancerClass` the apiserver would store for a new classless LoadBalancer
/// Service in `namespace` (server-side dry run: admission runs, nothing is stored).
fn admitted_class(env: &TestEnv, namespace: &str) -> String {
    let out = env.kubectl(&[
        "create",
        "service",
        "loadbalancer",
        "probe",
        "--tcp=80:80",
        "-n",
        namespace,
        "--dry-run=server",
        "-o",
        "jsonpath={.spec.loadBalancerClass}",
    ]);
    out.trim().to_string()
}

fn field(env: &TestEnv, namespace: &str, name: &str, path: &str) -> String {
    env.kubectl(&[
        "get",
        "service",
        name,
        "-n",
        namespace,
        "-o",
        &format!("jsonpath={path}"),
    ])
}

/// Waits until berth gave Service `name` a pool address and reported it ready.
async fn provisioned(env: &TestEnv, namespace: &str, name: &str) {
    let ready = "{.status.conditions[?(@.type==\"berth.dev/LoadBalancerReady\")].status}";
    wait_for(
        &format!("{name} provisioned"),
        Duration::from_secs(60),
        || async { field(env, namespace, name, ready) == "True" },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            env.kubectl(&["describe", "service", name, "-n", namespace])
        )
    });
    let ip = field(env, namespace, name, "{.status.loadBalancer.ingress[0].ip}");
    assert!(
        ip.starts_with("198.19.40."),
        "{name}: {ip} is not from {POOL}"
    );
}

#[tokio::test]
async fn classless_load_balancers_get_the_default_class_at_admission() {
    let env = TestEnv::connect().await;
    let system = env.namespace("mapol-system").await;
    let web = env.namespace("mapol-web").await;
    let other = env.namespace("mapol-other").await;
    let id = format!("{:08x}", rand::random::<u32>());
    let class = format!("dflt-{id}");
    let lb_class = format!("berth.dev/{class}");
    // The policy is cluster-wide by default; here it is limited to this case's namespace
    // so that other cases' Services keep their classes.
    let base = format!(
        "controller:\n  replicas: 1\n  extraArgs: [\"--class={class}\"]\n\
         nodeproxy:\n  enabled: false\nloadBalancerClasses:\n  - name: {class}\n    \
         default: true\n    pool: {{addresses: [\"{POOL}\"], autoAssign: true}}\n"
    );
    let values = write_values(&format!(
        "{base}defaultClassPolicy:\n  namespaceSelector:\n    matchLabels: \
         {{kubernetes.io/metadata.name: {}}}\n",
        web.name
    ));
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));
    // The release's default-class policy and binding (the chart's readiness-gate policy
    // is another one).
    let policies = || {
        env.kubectl(&[
            "get",
            "mutatingadmissionpolicies,mutatingadmissionpolicybindings",
            "-l",
            &format!("app.kubernetes.io/instance={}", release.name),
            "-o",
            "name",
        ])
        .lines()
        .filter(|l| l.ends_with("-default-class"))
        .collect::<Vec<_>>()
        .join("\n")
    };
    assert_eq!(
        policies().lines().count(),
        2,
        "policy and binding: {}",
        policies()
    );

    // The apiserver loads a new policy asynchronously: wait until it applies.
    wait_for("the policy in effect", Duration::from_secs(30), || async {
        admitted_class(&env, &web.name) == lb_class
    })
    .await
    .expect("the default class set at admission");
    env.kubectl(&[
        "create",
        "service",
        "loadbalancer",
        "web",
        "--tcp=80:80",
        "-n",
        &web.name,
    ]);
    assert_eq!(
        field(&env, &web.name, "web", "{.spec.loadBalancerClass}"),
        lb_class
    );
    provisioned(&env, &web.name, "web").await;
    // A ClusterIP Service turned into a LoadBalancer gets it too.
    env.kubectl(&[
        "create",
        "service",
        "clusterip",
        "later",
        "--tcp=80:80",
        "-n",
        &web.name,
    ]);
    env.kubectl(&[
        "patch",
        "service",
        "later",
        "-n",
        &web.name,
        "-p",
        r#"{"spec":{"type":"LoadBalancer"}}"#,
    ]);
    assert_eq!(
        field(&env, &web.name, "later", "{.spec.loadBalancerClass}"),
        lb_class
    );
    provisioned(&env, &web.name, "later").await;
    // Outside the selected namespaces nothing changes.
    assert_eq!(admitted_class(&env, &other.name), "");

    // Disabled in values: no policy, and classless Services stay classless (a cloud
    // provider's controller would provision them too); berth still serves them through
    // its default class.
    let off = write_values(&format!("{base}defaultClassPolicy:\n  enabled: false\n"));
    release.upgrade(std::slice::from_ref(&off));
    assert_eq!(policies().trim(), "", "policy left after disabling it");
    wait_for(
        "the policy out of effect",
        Duration::from_secs(30),
        || async { admitted_class(&env, &web.name).is_empty() },
    )
    .await
    .expect("no class set at admission once the policy is gone");
    env.kubectl(&[
        "create",
        "service",
        "loadbalancer",
        "plain",
        "--tcp=80:80",
        "-n",
        &web.name,
    ]);
    assert_eq!(
        field(&env, &web.name, "plain", "{.spec.loadBalancerClass}"),
        ""
    );
    provisioned(&env, &web.name, "plain").await;
    assert_eq!(
        field(
            &env,
            &web.name,
            "plain",
            "{.metadata.annotations.berth\\.dev/load-balancer-class}"
        ),
        class
    );
    // Services that got the class keep it.
    assert_eq!(
        field(&env, &web.name, "web", "{.spec.loadBalancerClass}"),
        lb_class
    );

    env.kubectl(&[
        "delete",
        "service",
        "--all",
        "-n",
        &web.name,
        "--wait",
        "--timeout=60s",
    ]);
    release.uninstall();
    for f in [values, off] {
        let _ = std::fs::remove_file(f);
    }
}
