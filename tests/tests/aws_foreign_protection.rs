//! Deletion protection turned on outside berth (through the AWS API) is never turned off
//! by berth. Three Services get NLBs, then protection is enabled on each by hand; one
//! Service is deleted, one renamed (name annotation), one changes scheme. Each NLB keeps
//! its listener and target group, the Service says `DeletionProtected`, and no NLB under
//! the new name or scheme appears. The deleted Service keeps berth's finalizer
//! (Terminating, with the condition and a Warning Event) until protection is turned off
//! in AWS; then berth deletes the NLB and lets the Service go.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    AwsView, ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of,
};
use berth_e2e::identity::{self, clean_up, fresh_id, listeners_of, set_protection};
use berth_e2e::testing::{TestEnv, TestNamespace, lb_condition, wait_for};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

const LONG: Duration = Duration::from_secs(90);
const NAME: &str = "service.beta.kubernetes.io/aws-load-balancer-name";
const SCHEME: &str = "service.beta.kubernetes.io/aws-load-balancer-scheme";
const ACKNOWLEDGE: &str = "berth.dev/acknowledge-replacement";

struct Case {
    env: TestEnv,
    ns: TestNamespace,
    class: ClassGuard,
    elb: elb::Client,
    id: String,
    controller: Option<ControllerProc>,
}

impl Case {
    async fn new() -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace("protect").await;
        let aws = serde_json::json!({"scheme": "internet-facing", "targetType": "ip"});
        let class = ClassGuard::create(&env, &ns.name, aws);
        let elb = elb::Client::new(&env.aws().await);
        let id = fresh_id("e2e-protect");
        let mut opts = ControllerOpts::new(&class.name, &ns.name);
        opts.extra_args = vec!["--cluster-id".into(), id.clone()];
        let controller = ControllerProc::spawn(&env.info, "protect", &opts)
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        Self {
            env,
            ns,
            class,
            elb,
            id,
            controller: Some(controller),
        }
    }

    fn logs(&self) -> String {
        self.controller
            .as_ref()
            .map(|c| logs_of(std::slice::from_ref(c)))
            .unwrap_or_default()
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    async fn create_service(&self, name: &str) -> String {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": self.class.lb_class(),
                "selector": {"app": name},
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]
            },
        }))
        .expect("service object");
        self.services()
            .create(&PostParams::default(), &svc)
            .await
            .unwrap_or_else(|e| panic!("create service {name}: {e}"))
            .metadata
            .uid
            .expect("uid")
    }

    async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        self.services()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate {name}: {e}"));
    }

    /// The Service's NLB once it has its target group and listener.
    async fn provisioned(&self, uid: &str) -> AwsView {
        identity::provisioned(&self.elb, uid, LONG, || self.logs()).await
    }

    /// Waits for the Service's condition to say `DeletionProtected`.
    async fn reports_protection(&self, name: &str) {
        let res = wait_for("the DeletionProtected reason", LONG, || async {
            self.services()
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|s| lb_condition(&s))
                .is_some_and(|(_, reason, _)| reason == "DeletionProtected")
        })
        .await;
        if let Err(e) = res {
            let svc =
                self.env
                    .kubectl(&["-n", &self.ns.name, "get", "service", name, "-o", "yaml"]);
            panic!("{name}: {e}\n{svc}\n{}", self.logs());
        }
    }

    /// The NLB, its listener and target group are all still there, unchanged.
    async fn whole(&self, uid: &str, before: &AwsView, what: &str) {
        let now = aws_view(&self.elb, uid).await.expect("aws view");
        assert_eq!(
            (&now.load_balancers, &now.target_groups),
            (&before.load_balancers, &before.target_groups),
            "{what}: the load balancer or target group changed\n{}",
            self.logs()
        );
        let lb = &before.load_balancers[0].0;
        let listeners = listeners_of(&self.elb, lb).await;
        let tg = before
            .target_groups
            .keys()
            .next()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            listeners.get(&80),
            Some(&tg),
            "{what}: listener lost: {listeners:?}"
        );
    }
}

async fn body(case: &Case) {
    let names = ["deleted", "renamed", "rescheme"];
    let mut uids = Vec::new();
    for n in names {
        uids.push(case.create_service(n).await);
    }
    let mut before = Vec::new();
    for uid in &uids {
        let view = case.provisioned(uid).await;
        set_protection(&case.elb, &view.load_balancers[0].0, true).await;
        before.push(view);
    }

    let new_name = format!("renamed-{:08x}", rand::random::<u32>());
    case.env.kubectl(&[
        "-n",
        &case.ns.name,
        "delete",
        "service",
        "deleted",
        "--wait=false",
    ]);
    // Acknowledged, so what stops the replacements is the protection, not the gate.
    let id = |view: &AwsView| {
        view.load_balancers[0]
            .0
            .rsplit('/')
            .next()
            .map(str::to_string)
    };
    let ack = |what: String, view: &AwsView| format!("{what}@{}", id(view).unwrap_or_default());
    let renamed_ack = ack(format!("name={new_name}"), &before[1]);
    case.annotate("renamed", ACKNOWLEDGE, &renamed_ack).await;
    case.annotate(
        "rescheme",
        ACKNOWLEDGE,
        &ack("scheme=internal".into(), &before[2]),
    )
    .await;
    case.annotate("renamed", NAME, &new_name).await;
    case.annotate("rescheme", SCHEME, "internal").await;
    for n in names {
        case.reports_protection(n).await;
    }
    // Several reconciles (resync 10 s) later, still whole.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for ((n, uid), view) in names.iter().zip(&uids).zip(&before) {
        case.whole(uid, view, n).await;
    }
    let renamed = case
        .elb
        .describe_load_balancers()
        .names(&new_name)
        .send()
        .await;
    assert!(
        renamed.is_err() || renamed.is_ok_and(|r| r.load_balancers().is_empty()),
        "an NLB under the new name was created"
    );
    let deleted = case
        .services()
        .get_opt("deleted")
        .await
        .expect("get")
        .expect("the deleted Service is held by berth's finalizer");
    assert!(deleted.metadata.deletion_timestamp.is_some());
    let events = case.env.events(&case.ns.name, "deleted").await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "DeletionProtected"),
        "no Warning Event: {events:?}"
    );

    // Protection off in AWS: berth finishes the deletion and lets the Service go.
    set_protection(&case.elb, &before[0].load_balancers[0].0, false).await;
    let gone = wait_for("the deleted Service and its NLB gone", LONG, || async {
        let svc = case.services().get_opt("deleted").await.ok().flatten();
        let view = aws_view(&case.elb, &uids[0]).await;
        svc.is_none()
            && view.is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
    })
    .await;
    if let Err(e) = gone {
        panic!("{e}\n{}", case.logs());
    }
}

#[tokio::test]
async fn protection_set_outside_berth_survives_deletion_rename_and_scheme_change() {
    let mut case = Case::new().await;
    let result = AssertUnwindSafe(body(&case)).catch_unwind().await;
    if let Some(mut c) = case.controller.take() {
        c.kill();
    }
    let ns = case.ns.name.clone();
    let names = case
        .env
        .kubectl(&["-n", &ns, "get", "services", "-o", "name"]);
    for name in names.split_whitespace() {
        let patch = r#"{"metadata":{"finalizers":null}}"#;
        let _ = case
            .env
            .kubectl_output(&["-n", &ns, "patch", name, "--type=merge", "-p", patch]);
        let _ = case
            .env
            .kubectl_output(&["-n", &ns, "delete", name, "--wait=false"]);
    }
    clean_up(&case.elb, &[case.id.as_str()], &[]).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
