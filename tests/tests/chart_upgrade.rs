//! The chart's upgrade path keeps existing NLBs: the chart as it was released before
//! cluster identities (`tests/fixtures/berth-chart-before-cluster-identity.tgz`) is
//! installed, an AWS-class Service gets its NLB, then `helm upgrade` to the repository's
//! chart. The NLB keeps its ARN and DNS name (no recreate) and it and its target groups
//! get this cluster's identity tag.
//!
//! The pods of both releases run the binaries of this tree (the test kubelet runs berth's
//! images as the built binaries), so the earlier berth's tagging is recreated by hand
//! before the upgrade: the identity tag is removed from the NLB and target groups, leaving
//! the cluster name tag an earlier berth wrote. The old release runs with a long resync
//! and sweep interval so nothing re-tags them before the upgrade.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{AwsView, aws_view};
use berth_e2e::helm::{Release, expect_success, helm, running_pods, write_values};
use berth_e2e::identity::{CLUSTER_ID, all_tagged};
use berth_e2e::paths;
use berth_e2e::testing::{TestEnv, lb_hostname, wait_for};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

const LONG: Duration = Duration::from_secs(90);
const SELECTOR: &str = "app.kubernetes.io/name=berth-controller";

/// The chart as released before cluster identities (main at 3dc0150, packaged with
/// `helm package`): a fixture rather than `git archive`, so a shallow CI clone has it too.
fn previous_chart() -> PathBuf {
    let chart = paths::repo_root().join("tests/fixtures/berth-chart-before-cluster-identity.tgz");
    assert!(chart.exists(), "missing fixture {}", chart.display());
    chart
}

struct Upgrade {
    env: TestEnv,
    elb: elb::Client,
    release: Release,
    ns: String,
    web: String,
    files: Vec<String>,
}

impl Upgrade {
    fn hostname(&self, svc: &Service) -> String {
        lb_hostname(svc).unwrap_or_default()
    }

    async fn service(&self) -> Option<Service> {
        Api::<Service>::namespaced(self.env.client.clone(), &self.web)
            .get_opt("web")
            .await
            .ok()
            .flatten()
    }

    /// The Service's single NLB and target groups, once it has a hostname.
    async fn provisioned(&self, uid: &str) -> (AwsView, String) {
        let last = std::sync::Mutex::new((AwsView::default(), String::new()));
        let res = wait_for("the Service's NLB", LONG, || async {
            let Ok(v) = aws_view(&self.elb, uid).await else {
                return false;
            };
            let host = self.service().await.map(|s| self.hostname(&s));
            let host = host.unwrap_or_default();
            let ready =
                v.load_balancers.len() == 1 && !v.target_groups.is_empty() && !host.is_empty();
            if let Ok(mut l) = last.lock() {
                *l = (v, host);
            }
            ready
        })
        .await;
        let last = last.into_inner().unwrap_or_default();
        if let Err(e) = res {
            let describe = self
                .env
                .kubectl(&["-n", &self.web, "describe", "service", "web"]);
            panic!("{e}: {:?}\n{describe}", last.0);
        }
        last
    }

    /// Removes the identity tag, leaving what an earlier berth wrote.
    async fn as_an_earlier_berth_tagged(&self, view: &AwsView) {
        let arns = view
            .load_balancers
            .iter()
            .map(|l| l.0.clone())
            .chain(view.target_groups.keys().cloned());
        for arn in arns {
            self.elb
                .remove_tags()
                .resource_arns(&arn)
                .tag_keys(CLUSTER_ID)
                .send()
                .await
                .unwrap_or_else(|e| panic!("remove the identity tag of {arn}: {e:?}"));
        }
    }

    /// The identity tag of each of the view's resources.
    async fn identities(&self, view: &AwsView) -> Vec<Option<String>> {
        let tags = all_tagged(&self.elb).await;
        view.load_balancers
            .iter()
            .map(|l| &l.0)
            .chain(view.target_groups.keys())
            .map(|arn| tags.get(arn).and_then(|t| t.get(CLUSTER_ID)).cloned())
            .collect()
    }
}

async fn body(u: &mut Upgrade) {
    let env = &u.env;
    let old_chart = previous_chart();
    let class = format!("upgrade-{:08x}", rand::random::<u32>());
    let values = |extra: &str| {
        format!(
            "clusterName: {cluster}\ncontroller:\n  aws: {{region: {region}, endpointURL: \"{ls}\", \
             credentialsSecret: aws-creds}}\n  extraArgs: [\"--class={class}\"{extra}]\n\
             nodeproxy:\n  enabled: false\nloadBalancerClasses:\n  - name: {class}\n    \
             aws: {{scheme: internet-facing, targetType: instance}}\n",
            cluster = env.info.cluster_name,
            region = env.info.region,
            ls = env.info.localstack_endpoint,
        )
    };
    let old_values = write_values(&values(", \"--resync=1h\", \"--gc-interval=1h\""));
    u.files.push(old_values.clone());
    let chart = old_chart.display().to_string();
    let kubeconfig = env.info.kubeconfig.display().to_string();
    let installed = helm(&[
        "install",
        &u.release.name,
        &chart,
        // The cluster has today's CRD (newer than the old chart's), as after a user's CRD
        // upgrade; Helm never upgrades CRDs itself.
        "--skip-crds",
        "-n",
        &u.ns,
        "--kubeconfig",
        &kubeconfig,
        "--wait",
        "--timeout",
        "90s",
        "--values",
        &old_values,
    ]);
    expect_success(&installed, "helm install of the previous chart");

    let svc = write_values(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: LoadBalancer\n  \
         loadBalancerClass: berth.dev/{class}\n  selector:\n    app: web\n  ports:\n  \
         - protocol: TCP\n    port: 80\n    targetPort: 80\n"
    ));
    u.files.push(svc.clone());
    env.kubectl(&["apply", "-n", &u.web, "-f", &svc]);
    let uid = env.kubectl(&[
        "-n",
        &u.web,
        "get",
        "service",
        "web",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let (before, host_before) = u.provisioned(&uid).await;
    // The old release's controller may still be reconciling its first moments (its own
    // status write, the Service's EndpointSlice) and would tag them again: strip the tags
    // until they stay off.
    wait_for("the identity tags stay removed", LONG, || async {
        u.as_an_earlier_berth_tagged(&before).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        u.identities(&before).await.iter().all(Option::is_none)
    })
    .await
    .expect("identity tags removed");

    let pods_before = running_pods(env, &u.ns, SELECTOR);
    let new_values = write_values(&values(", \"--gc-interval=3s\""));
    let bump = write_values("controller:\n  podAnnotations: {berth.dev/e2e-upgrade: \"1\"}\n");
    u.files.extend([new_values.clone(), bump.clone()]);
    u.release.upgrade(&[new_values, bump]);
    wait_for("the controller pods replaced", LONG, || async {
        let now = running_pods(env, &u.ns, SELECTOR);
        !now.is_empty() && now.iter().all(|p| !pods_before.contains(p))
    })
    .await
    .expect("rollout");

    let id = env.kubectl(&[
        "get",
        "namespace",
        "kube-system",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let migrated = wait_for(
        "the identity tag on the NLB and target groups",
        LONG,
        || async {
            u.identities(&before)
                .await
                .iter()
                .all(|t| t.as_deref() == Some(id.as_str()))
        },
    )
    .await;
    if let Err(e) = migrated {
        panic!("{e}: {:?}", u.identities(&before).await);
    }
    let (after, host_after) = u.provisioned(&uid).await;
    assert_eq!(
        after.load_balancers, before.load_balancers,
        "the NLB was replaced"
    );
    assert_eq!(after.target_groups, before.target_groups);
    assert_eq!(host_after, host_before, "the Service's hostname changed");
}

#[tokio::test]
async fn helm_upgrade_from_the_previous_chart_keeps_the_nlb_and_migrates_its_tags() {
    let env = TestEnv::connect().await;
    let system = env.namespace("upgrade-system").await;
    let web = env.namespace("upgrade-web").await;
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
    let name = format!("berth-{:08x}", rand::random::<u32>());
    let mut u = Upgrade {
        elb: elb::Client::new(&env.aws().await),
        release: Release::new(&env, &name, &system.name),
        ns: system.name.clone(),
        web: web.name.clone(),
        files: Vec::new(),
        env,
    };
    let result = AssertUnwindSafe(body(&mut u)).catch_unwind().await;
    // The controller deletes the NLB with the Service; whatever is left goes by hand.
    let uid = u
        .env
        .kubectl_output(&[
            "-n",
            &u.web,
            "get",
            "service",
            "web",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = u
        .env
        .kubectl_output(&["-n", &u.web, "delete", "service", "web", "--timeout=60s"]);
    if let Ok(view) = aws_view(&u.elb, &uid).await {
        for (arn, ..) in &view.load_balancers {
            let _ = u
                .elb
                .delete_load_balancer()
                .load_balancer_arn(arn)
                .send()
                .await;
        }
        for arn in view.target_groups.keys() {
            let _ = u
                .elb
                .delete_target_group()
                .target_group_arn(arn)
                .send()
                .await;
        }
    }
    let _ = u.env.kubectl_output(&[
        "-n",
        &u.web,
        "patch",
        "service",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    for f in &u.files {
        let _ = std::fs::remove_dir_all(f);
        let _ = std::fs::remove_file(f);
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
