//! `kubectl berth` on the real local cluster and LocalStack: `why` explains an exhausted
//! pool with the Services holding it and an invalid annotation; `status` names the node
//! announcing a pool address and shows an NLB's listeners with target health; `plan`
//! says a scheme change replaces the NLB and a health-check change modifies it, and
//! writes nothing; the controller keeps the NLB until the replacement is acknowledged.
//! Pool addresses 198.19.0.80 and 198.19.0.81 are used by no other suite.

use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    AwsView, ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of,
};
use berth_e2e::l2::lease_holder;
use berth_e2e::paths;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, lb_condition, lb_hostname, lb_ips, wait_for};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};

const LONG: Duration = Duration::from_secs(90);
const SCHEME: &str = "service.beta.kubernetes.io/aws-load-balancer-scheme";
const HC_INTERVAL: &str = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval";
const ACKNOWLEDGE: &str = "berth.dev/acknowledge-replacement";

/// Runs `kubectl-berth` against the environment; panics with its stderr on failure.
fn berth(env: &TestEnv, args: &[&str]) -> String {
    let info = &env.info;
    let out = Command::new(paths::sibling_bin("kubectl-berth"))
        .args(["--cluster-name", &info.cluster_name])
        .args(["--region", &info.region])
        .args(["--aws-endpoint", &info.localstack_endpoint])
        .args(args)
        .env("KUBECONFIG", &info.kubeconfig)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap_or_else(|e| panic!("run kubectl-berth: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "kubectl-berth {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

struct Case {
    controllers: Vec<ControllerProc>,
    env: TestEnv,
    ns: TestNamespace,
    class: ClassGuard,
}

impl Case {
    async fn new(prefix: &str, spec: serde_json::Value) -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace(prefix).await;
        let class = ClassGuard::with_spec(&env, &ns.name, spec);
        let opts = ControllerOpts::new(&class.name, &ns.name);
        let controller = ControllerProc::spawn(&env.info, &ns.name, &opts)
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        Self {
            controllers: vec![controller],
            env,
            ns,
            class,
        }
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    fn berth(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns.name.as_str()];
        all.extend_from_slice(args);
        berth(&self.env, &all)
    }

    async fn create(&self, name: &str, annotations: serde_json::Value) -> Service {
        ServiceBuilder::load_balancer(name)
            .class(&self.class.lb_class())
            .app("nginx")
            .named_port("http", "TCP", 80, Some(80))
            .annotations(&annotations)
            .create_with(&self.services())
            .await
    }

    /// The Service once `done` holds for it.
    async fn wait(&self, name: &str, what: &str, done: impl Fn(&Service) -> bool) -> Service {
        let api = self.services();
        let res = wait_for(&format!("service {name}: {what}"), LONG, || async {
            api.get(name).await.is_ok_and(|s| done(&s))
        })
        .await;
        let svc = api.get(name).await.ok();
        if let Err(e) = res {
            panic!(
                "{e}; status: {:?}\n{}",
                svc.and_then(|s| s.status),
                logs_of(&self.controllers)
            );
        }
        svc.expect("service")
    }

    async fn wait_reason(&self, name: &str, reason: &str) -> Service {
        self.wait(name, reason, |s| {
            lb_condition(s).is_some_and(|(_, r, _)| r == reason)
        })
        .await
    }

    async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        self.services()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate {name}: {e}"));
    }
}

fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().unwrap_or_default()
}

/// A pool of two addresses held by two Services: `why` names both holders for the third;
/// `status` names the node holding the first one's Lease, and the table lists all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_names_the_holders_of_an_exhausted_pool_and_status_the_announcer() {
    let case = Case::new(
        "kb-pool",
        serde_json::json!({"pool": {"addresses": ["198.19.0.80", "198.19.0.81"]}}),
    )
    .await;
    case.env.wait_agents_healthy().await;
    let ready = |s: &Service| {
        lb_condition(s).is_some_and(|(st, _, _)| st == "True") && !lb_ips(s).is_empty()
    };
    case.create("a", serde_json::json!({})).await;
    let a = case.wait("a", "ready", ready).await;
    case.create("b", serde_json::json!({})).await;
    let b = case.wait("b", "ready", ready).await;
    case.create("c", serde_json::json!({})).await;
    case.wait_reason("c", "PoolExhausted").await;

    let why = case.berth(&["why", "c"]);
    let ns = &case.ns.name;
    assert!(why.contains("is not ready"), "{why}");
    assert!(why.contains("exhausted"), "{why}");
    for (name, svc) in [("a", &a), ("b", &b)] {
        let held = format!("{ns}/{name} ({})", lb_ips(svc).join(", "));
        assert!(why.contains(&held), "{held} not in:\n{why}");
    }
    assert!(why.contains("What to change:"), "{why}");

    let ip = lb_ips(&a)[0].clone();
    let holder = wait_for("the address's Lease has a holder", LONG, || async {
        lease_holder(&case.env, &ip).await.is_some()
    })
    .await;
    holder.unwrap_or_else(|e| panic!("{e}"));
    let holder = lease_holder(&case.env, &ip).await.expect("holder");
    let status = case.berth(&["status", "a"]);
    assert!(
        status.contains(&format!("{ip}: announced by node {holder}")),
        "{status}"
    );
    assert!(status.contains("provider pool"), "{status}");

    let table = case.berth(&["status"]);
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with(ns.as_str()))
        .collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows.iter()
            .any(|r| r.contains(" c ") && r.contains("PoolExhausted")),
        "{table}"
    );
    for n in ["a", "b", "c"] {
        let _ = case.services().delete(n, &DeleteParams::default()).await;
    }
}

/// What LocalStack holds for the Service, in enough detail to see any change: load
/// balancers (ARN, DNS name, scheme), their attributes and listeners, target groups with
/// health checks and attributes.
async fn fingerprint(client: &elb::Client, uid: &str) -> String {
    let view = aws_view(client, uid).await.expect("view");
    let mut out = format!("{view:?}\n");
    for (arn, ..) in &view.load_balancers {
        let attrs = client
            .describe_load_balancer_attributes()
            .load_balancer_arn(arn)
            .send()
            .await
            .expect("attributes");
        out.push_str(&format!("{:?}\n", attrs.attributes()));
        let listeners = client
            .describe_listeners()
            .load_balancer_arn(arn)
            .send()
            .await
            .expect("listeners");
        out.push_str(&format!("{:?}\n", listeners.listeners()));
    }
    for arn in view.target_groups.keys() {
        let tg = client
            .describe_target_groups()
            .target_group_arns(arn)
            .send()
            .await
            .expect("target group");
        out.push_str(&format!("{:?}\n", tg.target_groups()));
        let attrs = client
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .expect("tg attributes");
        out.push_str(&format!("{:?}\n", attrs.attributes()));
    }
    out
}

/// The live Service with `annotations` changed, as a manifest file.
fn manifest(
    svc: &Service,
    dir: &std::path::Path,
    name: &str,
    annotations: &[(&str, &str)],
) -> String {
    let mut changed = svc.clone();
    let a = changed.metadata.annotations.get_or_insert_default();
    for (k, v) in annotations {
        a.insert(k.to_string(), v.to_string());
    }
    changed.status = None;
    let path = dir.join(name);
    let yaml = serde_yaml::to_string(&changed).expect("yaml");
    std::fs::write(&path, yaml).expect("write manifest");
    path.display().to_string()
}

async fn aws_body(case: &Case, client: &elb::Client, uids: &mut Vec<String>) {
    case.env
        .apply_example(&case.ns.name, "seed/nginx-deployment.yaml");
    case.create("web", serde_json::json!({})).await;
    let ready = |s: &Service| {
        lb_condition(s).is_some_and(|(st, _, _)| st == "True") && lb_hostname(s).is_some()
    };
    let web = case.wait("web", "ready", ready).await;
    uids.push(uid(&web));
    let before = fingerprint(client, &uid(&web)).await;
    let old: AwsView = aws_view(client, &uid(&web)).await.expect("view");
    let (old_arn, _, old_dns, old_scheme) = old.load_balancers[0].clone();
    assert_eq!(old_scheme, "internal");

    // plan: a scheme change replaces, a health-check change modifies; nothing is written.
    let dir = std::env::temp_dir().join(format!("kb-{}", case.ns.name));
    std::fs::create_dir_all(&dir).expect("dir");
    let public = manifest(&web, &dir, "public.yaml", &[(SCHEME, "internet-facing")]);
    let plan = case.berth(&["plan", "-f", &public]);
    assert!(plan.contains("!!! REPLACES THE LOAD BALANCER"), "{plan}");
    assert!(
        plan.contains(&format!("its DNS name {old_dns} goes away")),
        "{plan}"
    );
    assert!(plan.contains("Summary: REPLACEMENT"), "{plan}");
    let id = old_arn.rsplit('/').next().unwrap_or_default();
    let token = format!("scheme=internet-facing@{id}");
    assert!(plan.contains(&format!("{ACKNOWLEDGE}={token}")), "{plan}");
    let slower = manifest(&web, &dir, "hc.yaml", &[(HC_INTERVAL, "30")]);
    let plan = case.berth(&["plan", "web", "-f", &slower]);
    assert!(plan.contains("Summary: modify-only"), "{plan}");
    assert!(plan.contains("interval 30s"), "{plan}");
    assert!(!plan.contains("!!!"), "{plan}");
    // The live Service unchanged: nothing to do, once the controller has registered the
    // pods that became ready meanwhile.
    let settled = wait_for("plan of the live Service: no changes", LONG, || async {
        case.berth(&["plan", "web"]).contains("Summary: no changes")
    })
    .await;
    settled.unwrap_or_else(|e| panic!("{e}:\n{}", case.berth(&["plan", "web"])));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        fingerprint(client, &uid(&web)).await,
        before,
        "plan wrote to AWS"
    );

    // status: the listener and its targets' health per zone.
    let registered = wait_for("status shows the pods' health", LONG, || async {
        case.berth(&["status", "web"]).contains(" healthy")
    })
    .await;
    let status = case.berth(&["status", "web"]);
    registered.unwrap_or_else(|e| panic!("{e}:\n{status}"));
    assert!(status.contains(&format!("ARN: {old_arn}")), "{status}");
    assert!(
        status.contains("Port 80/TCP: listener -> target group"),
        "{status}"
    );

    // The gate: the scheme change waits for its acknowledgement, the NLB is kept.
    case.annotate("web", SCHEME, "internet-facing").await;
    let waiting = case.wait_reason("web", "ReplacementPending").await;
    let (_, _, message) = lb_condition(&waiting).expect("condition");
    assert!(message.contains(&token), "{message}");
    assert_eq!(lb_hostname(&waiting).as_deref(), Some(old_dns.as_str()));
    let why = case.berth(&["why", "web"]);
    assert!(why.contains("waits for an acknowledgement"), "{why}");
    let view = aws_view(client, &uid(&web)).await.expect("view");
    assert_eq!(
        view.load_balancers, old.load_balancers,
        "replaced unacknowledged"
    );
    let warned = wait_for("a ReplacementPending Warning", LONG, || async {
        let events = case.env.events(&case.ns.name, "web").await;
        events
            .iter()
            .any(|(t, r, m)| t == "Warning" && r == "ReplacementPending" && m.contains(&token))
    })
    .await;
    if let Err(e) = warned {
        panic!("{e}: {:?}", case.env.events(&case.ns.name, "web").await);
    }
    let view = aws_view(client, &uid(&web)).await.expect("view");
    assert_eq!(
        view.load_balancers, old.load_balancers,
        "replaced unacknowledged"
    );

    case.annotate("web", ACKNOWLEDGE, &token).await;
    let replaced = case
        .wait("web", "replaced", |s| {
            ready(s) && lb_hostname(s).is_some_and(|h| h != old_dns)
        })
        .await;
    let view = aws_view(client, &uid(&replaced)).await.expect("view");
    assert_eq!(view.load_balancers.len(), 1, "{view:?}");
    assert_ne!(view.load_balancers[0].0, old_arn);
    assert_eq!(view.load_balancers[0].3, "internet-facing");

    // An invalid annotation, explained.
    case.create("bad", serde_json::json!({HC_INTERVAL: "often"}))
        .await;
    let bad = case.wait_reason("bad", "InvalidAnnotation").await;
    uids.push(uid(&bad));
    let why = case.berth(&["why", "bad"]);
    assert!(why.contains(&format!("annotation {HC_INTERVAL}")), "{why}");
    assert!(why.contains("often"), "{why}");
    assert!(why.contains("correct or remove"), "{why}");
}

/// `plan`, `status` and `why` on an AWS class, and the controller's replacement gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_writes_nothing_and_a_replacement_waits_for_its_acknowledgement() {
    let case = Case::new(
        "kb-aws",
        serde_json::json!({"aws": {"scheme": "internal", "targetType": "ip"}}),
    )
    .await;
    let client = elb::Client::new(&case.env.aws().await);
    let mut uids = Vec::new();
    let result = AssertUnwindSafe(aws_body(&case, &client, &mut uids))
        .catch_unwind()
        .await;
    for n in ["web", "bad"] {
        let _ = case.services().delete(n, &DeleteParams::default()).await;
    }
    for u in &uids {
        let gone = wait_for("the Service's resources deleted", LONG, || async {
            aws_view(&client, u)
                .await
                .is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
        })
        .await;
        if gone.is_err() && result.is_ok() {
            panic!(
                "resources of {u} left in LocalStack\n{}",
                logs_of(&case.controllers)
            );
        }
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
