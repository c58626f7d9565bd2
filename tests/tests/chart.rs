//! Chart suite: the Helm chart renders for the default, an AWS and a pool configuration,
//! the real apiserver accepts every rendered object (server-side dry-run), and the values
//! schema rejects bad values with a message naming the bad key. Needs root and the running
//! local cluster (`make test`).

use berth_e2e::helm::{
    Release, chart, helm, running_pods, testdata_values as values, write_values,
};
use berth_e2e::paths;
use berth_e2e::testing::TestEnv;

/// The chart as `helm install` would render it against an apiserver serving
/// MutatingAdmissionPolicy (as the environment's does).
fn render(release: &str, namespace: &str, values_file: Option<&str>) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    args.extend([
        "--api-versions",
        "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy",
    ]);
    if let Some(v) = values_file {
        args.extend(["--values", v]);
    }
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template {values_file:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_apiserver() {
    let env = TestEnv::connect().await;
    let ns = env.namespace("chart").await;
    // The chart's CRDs first, as `helm install` does; LoadBalancerClass objects need them.
    let crds = chart().join("crds").display().to_string();
    env.kubectl(&["apply", "--server-side", "-f", &crds]);
    // The agents' Lease namespace is one of the chart's objects: a server-side dry run
    // creates nothing, so it is created for real for the Role and RoleBinding in it.
    let release = format!("berth-{}", ns.name);
    let l2 = format!("{release}-l2");
    env.kubectl(&["create", "namespace", &l2]);
    env.kubectl(&["label", "namespace", &l2, "berth.dev/e2e=true"]);
    let configs = [
        None,
        Some(values("aws.yaml")),
        Some(values("pool.yaml")),
        Some(values("pool-default.yaml")),
    ];
    for file in configs {
        let manifest = render(&release, &ns.name, file.as_deref());
        let path = std::env::temp_dir().join(format!(
            "{}chart-{:08x}.yaml",
            paths::SCRATCH_PREFIX,
            rand::random::<u32>()
        ));
        std::fs::write(&path, &manifest).expect("write rendered chart");
        let out = env
            // Every rendered object names its namespace (the release's or the agents').
            .kubectl_output(&[
                "apply",
                "--dry-run=server",
                "-f",
                path.to_str().expect("utf-8 temp path"),
            ])
            .expect("run kubectl");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "apiserver rejected the chart rendered with {file:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let applied = String::from_utf8_lossy(&out.stdout);
        for kind in ["deployment.apps/", "daemonset.apps/", "clusterrole.rbac"] {
            assert!(applied.contains(kind), "{kind} missing from: {applied}");
        }
        if file.is_some() {
            assert!(
                applied.contains("loadbalancerclass.berth.dev/chart-"),
                "class missing from: {applied}"
            );
        }
        let policy = "mutatingadmissionpolicy.admissionregistration.k8s.io/";
        let named = |suffix: &str| {
            applied
                .lines()
                .any(|l| l.contains(policy) && l.contains(suffix))
        };
        assert!(
            named("-readiness-gate "),
            "the readiness-gate policy is on by default: {applied}"
        );
        assert_eq!(
            named("-default-class "),
            file.as_deref()
                .is_some_and(|f| f.ends_with("pool-default.yaml")),
            "the default-class policy goes with a default class only: {applied}"
        );
    }
    env.kubectl(&["delete", "namespace", &l2, "--wait=false"]);
}

#[test]
fn values_schema_rejects_bad_values_naming_the_key() {
    let chart = chart().display().to_string();
    for (file, expect) in [
        ("bad-two-providers.yaml", "/loadBalancerClasses/0"),
        ("bad-replicas.yaml", "/controller/replicas"),
        ("bad-unknown-key.yaml", "privileged"),
        ("bad-cidr.yaml", "/nodeproxy/serviceCIDR"),
        ("bad-lease-duration.yaml", "/nodeproxy/l2/leaseDuration"),
    ] {
        let v = values(file);
        let out = helm(&["template", "berth", &chart, "--values", &v]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            stderr.contains(expect),
            "{file}: message lacks {expect}: {stderr}"
        );
    }
}

#[test]
fn helm_lint_passes_for_every_configuration() {
    let chart = chart().display().to_string();
    let configs = [
        None,
        Some(values("aws.yaml")),
        Some(values("pool.yaml")),
        Some(values("pool-default.yaml")),
    ];
    for file in configs {
        let mut args = vec!["lint", "--strict", &chart];
        if let Some(v) = file.as_deref() {
            args.extend(["--values", v]);
        }
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm lint {file:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `helm install` of the chart runs berth's controller as pods of the simulated cluster
/// (berth's own binaries, the chart's args, env and ServiceAccount token, so the apiserver
/// enforces the chart's RBAC); the seed's nginx behind a LoadBalancer Service of the
/// chart's class gets an NLB in LocalStack and answers through it; `helm upgrade` rolls
/// the pods and a Service created afterwards is still provisioned; `helm uninstall`
/// removes berth's objects. The node agents of the environment stand in for the chart's
/// DaemonSet (disabled here): two agents on one node would program the same table.
#[tokio::test]
async fn helm_install_runs_the_controller_and_serves_the_seed_nginx() {
    use std::time::Duration;

    use berth_e2e::controller::served_listeners;
    use berth_e2e::testing::{curl_in, wait_for};

    let env = TestEnv::connect().await;
    let system = env.namespace("chart-system").await;
    let web = env.namespace("chart-web").await;
    env.kubectl(&[
        "-n",
        &system.name,
        "create",
        "secret",
        "generic",
        "aws-creds",
        "--from-literal=AWS_ACCESS_KEY_ID=test",
        "--from-literal=AWS_SECRET_ACCESS_KEY=test",
    ]);
    let id = format!("{:08x}", rand::random::<u32>());
    let class = format!("chart-{id}");
    let values = write_values(&format!(
        "clusterName: {cluster}\ncontroller:\n  aws: {{region: {region}, endpointURL: \"{ls}\", \
         credentialsSecret: aws-creds}}\n  extraArgs: [\"--class={class}\"]\n\
         nodeproxy:\n  enabled: false\nloadBalancerClasses:\n  - name: {class}\n    \
         aws: {{scheme: internet-facing, targetType: instance}}\n",
        cluster = env.info.cluster_name,
        region = env.info.region,
        ls = env.info.localstack_endpoint,
    ));
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));
    let selector = "app.kubernetes.io/name=berth-controller";
    assert_eq!(running_pods(&env, &system.name, selector).len(), 2);

    env.apply_example(&web.name, "seed/nginx-deployment.yaml");
    let service = |name: &str| {
        let path = write_values(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: LoadBalancer\n  \
             loadBalancerClass: berth.dev/{class}\n  selector:\n    app: nginx\n  ports:\n  \
             - protocol: TCP\n    port: 80\n    targetPort: 80\n"
        ));
        env.kubectl(&["apply", "-n", &web.name, "-f", &path]);
        let _ = std::fs::remove_file(path);
    };
    let hostname = |name: &str| {
        env.kubectl(&[
            "get",
            "service",
            name,
            "-n",
            &web.name,
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].hostname}",
        ])
    };
    let reach = |name: String| {
        let env = &env;
        let hostname = &hostname;
        async move {
            let host = hostname(&name);
            if host.is_empty() {
                return false;
            }
            let Ok(listeners) = served_listeners(&env.info).await else {
                return false;
            };
            let Some(l) = listeners
                .iter()
                .find(|l| l.dns_name == host && l.port == 80)
            else {
                return false;
            };
            curl_in(
                &env.info.client_netns,
                &format!("http://{}/", l.address),
                Duration::from_secs(3),
            )
            .is_ok_and(|body| body.contains("Welcome to nginx!"))
        }
    };
    service("nginx-service");
    wait_for(
        "nginx through the chart-provisioned NLB",
        Duration::from_secs(90),
        || reach("nginx-service".to_string()),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            env.kubectl(&["describe", "service", "-n", &web.name])
        )
    });

    // A changed value rolls the controller pods; service continues and new Services are
    // still provisioned by the new pods.
    let before = running_pods(&env, &system.name, selector);
    let bump = write_values("controller:\n  podAnnotations: {berth.dev/e2e-rollout: \"2\"}\n");
    release.upgrade(&[values.clone(), bump.clone()]);
    wait_for(
        "the controller pods replaced",
        Duration::from_secs(60),
        || async {
            let now = running_pods(&env, &system.name, selector);
            now.len() == 2 && now.iter().all(|p| !before.contains(p))
        },
    )
    .await
    .expect("rollout");
    assert!(
        reach("nginx-service".to_string()).await,
        "service lost by the upgrade"
    );
    service("after-upgrade");
    wait_for(
        "a Service created after the upgrade",
        Duration::from_secs(90),
        || reach("after-upgrade".to_string()),
    )
    .await
    .expect("provisioned by the upgraded controller");

    // Services are deleted while the controller runs: their NLBs go with them.
    env.kubectl(&[
        "delete",
        "service",
        "--all",
        "-n",
        &web.name,
        "--wait",
        "--timeout=60s",
    ]);
    let services = env.kubectl(&["get", "services", "-n", &web.name, "-o", "name"]);
    assert!(
        services.trim().is_empty(),
        "services still there: {services}"
    );

    // A Service that still carries berth's finalizer when berth is uninstalled stays
    // Terminating until the finalizer is removed by hand; its NLB is left for a later
    // install's orphan sweep (README, "Install with Helm").
    service("left-behind");
    wait_for(
        "the left-behind Service provisioned",
        Duration::from_secs(90),
        || reach("left-behind".to_string()),
    )
    .await
    .expect("provisioned");
    let uid = env.kubectl(&[
        "get",
        "service",
        "left-behind",
        "-n",
        &web.name,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);

    release.uninstall();
    let left = env.kubectl(&[
        "get",
        "deployments,serviceaccounts,roles,rolebindings",
        "-n",
        &system.name,
        "-l",
        "app.kubernetes.io/part-of=berth",
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "left after uninstall: {left}");
    let cluster_left = env.kubectl(&[
        "get",
        "clusterroles,clusterrolebindings,loadbalancerclasses",
        "-o",
        "name",
    ]);
    assert!(
        !cluster_left.contains(&release.name) && !cluster_left.contains(&class),
        "cluster objects left after uninstall: {cluster_left}"
    );
    env.kubectl(&[
        "delete",
        "service",
        "left-behind",
        "-n",
        &web.name,
        "--wait=false",
    ]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = env.kubectl(&[
        "get",
        "service",
        "left-behind",
        "-n",
        &web.name,
        "-o",
        "jsonpath={.metadata.deletionTimestamp} {.metadata.finalizers}",
    ]);
    assert!(
        state.contains("berth.dev/load-balancer") && !state.starts_with(' '),
        "expected a Terminating Service held by berth's finalizer, got {state:?}"
    );
    env.kubectl(&[
        "patch",
        "service",
        "left-behind",
        "-n",
        &web.name,
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let gone = env.kubectl(&["get", "services", "-n", &web.name, "-o", "name"]);
    assert!(gone.trim().is_empty(), "service not gone: {gone}");
    let sdk = env.aws().await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let view = berth_e2e::controller::aws_view(&elb, &uid)
        .await
        .expect("LocalStack view");
    assert_eq!(
        view.load_balancers.len(),
        1,
        "the NLB is left behind: {view:?}"
    );
    for (arn, ..) in &view.load_balancers {
        elb.delete_load_balancer()
            .load_balancer_arn(arn)
            .send()
            .await
            .expect("remove the left NLB");
    }
    for arn in view.target_groups.keys() {
        elb.delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
            .expect("remove the left target group");
    }
    for f in [values, bump] {
        let _ = std::fs::remove_file(f);
    }
}
