//! The orphan sweep against LocalStack: Services deleted while no controller ran leave
//! their NLBs behind; the next controller's sweep deletes them, except one with deletion
//! protection, which keeps its listeners and target groups while the sweep goes on.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    AwsView, ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of,
};
use berth_e2e::testing::{TestEnv, TestNamespace, wait_for};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;

const LONG: Duration = Duration::from_secs(90);

struct Case {
    env: TestEnv,
    ns: TestNamespace,
    class: ClassGuard,
    elb: elb::Client,
    controllers: Vec<ControllerProc>,
}

impl Case {
    async fn new(prefix: &str) -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace(prefix).await;
        let aws = serde_json::json!({"scheme": "internet-facing", "targetType": "ip"});
        let class = ClassGuard::create(&env, &ns.name, aws);
        let elb = elb::Client::new(&env.aws().await);
        Self {
            env,
            ns,
            class,
            elb,
            controllers: Vec::new(),
        }
    }

    fn start_controller(&mut self, name: &str, gc_interval: &'static str) {
        let mut opts = ControllerOpts::new(&self.class.name, &self.ns.name);
        opts.gc_interval = gc_interval;
        let c = ControllerProc::spawn(&self.env.info, name, &opts)
            .unwrap_or_else(|e| panic!("start controller {name}: {e}"));
        self.controllers.push(c);
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
        let created = self
            .services()
            .create(&PostParams::default(), &svc)
            .await
            .unwrap_or_else(|e| panic!("create service {name}: {e}"));
        created.metadata.uid.expect("uid")
    }

    async fn listener_count(&self, lb_arn: &str) -> usize {
        self.elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map(|o| o.listeners().len())
            .unwrap_or(0)
    }

    /// The Service's NLB once it has its target group and listener.
    async fn provisioned(&self, uid: &str) -> AwsView {
        let found = RefCell::new(AwsView::default());
        let res = wait_for(
            "an NLB with its target group and listener",
            LONG,
            || async {
                let Ok(v) = aws_view(&self.elb, uid).await else {
                    return false;
                };
                let ready = match v.load_balancers.as_slice() {
                    [lb] => v.target_groups.len() == 1 && self.listener_count(&lb.0).await == 1,
                    _ => false,
                };
                *found.borrow_mut() = v;
                ready
            },
        )
        .await;
        if let Err(e) = res {
            panic!("{e}: {:?}\n{}", found.borrow(), logs_of(&self.controllers));
        }
        found.into_inner()
    }

    /// Deletes the Service as if the controller had never seen it go: its finalizer is
    /// removed by hand.
    fn delete_behind_the_controllers_back(&self, name: &str) {
        let ns = self.ns.name.as_str();
        self.env
            .kubectl(&["-n", ns, "delete", "service", name, "--wait=false"]);
        let patch = r#"{"metadata":{"finalizers":null}}"#;
        self.env.kubectl(&[
            "-n",
            ns,
            "patch",
            "service",
            name,
            "--type=merge",
            "-p",
            patch,
        ]);
    }

    /// Turns protection off and deletes what the test left in LocalStack.
    async fn clean_up(&self, lb_arn: &str, tg_arns: &[String]) {
        let _ = self
            .elb
            .modify_load_balancer_attributes()
            .load_balancer_arn(lb_arn)
            .attributes(protection(false))
            .send()
            .await;
        let _ = self
            .elb
            .delete_load_balancer()
            .load_balancer_arn(lb_arn)
            .send()
            .await;
        for arn in tg_arns {
            let _ = self
                .elb
                .delete_target_group()
                .target_group_arn(arn)
                .send()
                .await;
        }
    }
}

fn protection(on: bool) -> elb::types::LoadBalancerAttribute {
    elb::types::LoadBalancerAttribute::builder()
        .key("deletion_protection.enabled")
        .value(on.to_string())
        .build()
}

/// Two orphans in one sweep: the protected one keeps its NLB, listener and target group;
/// the unprotected one's NLB and target group are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_orphan_keeps_its_listeners_and_the_other_orphan_is_deleted() {
    let mut case = Case::new("orphans").await;
    let first = format!("{}-first", case.ns.name);
    // Sweeping only matters once the Services are gone: keep it out of the way until then.
    case.start_controller(&first, "1h");
    let kept_uid = case.create_service("kept").await;
    let gone_uid = case.create_service("gone").await;
    let kept = case.provisioned(&kept_uid).await;
    case.provisioned(&gone_uid).await;
    let kept_lb = kept.load_balancers[0].0.clone();
    let kept_tgs: Vec<String> = kept.target_groups.keys().cloned().collect();
    let outcome = AssertUnwindSafe(sweep_two_orphans(&mut case, &kept_lb, &kept_uid, &gone_uid))
        .catch_unwind()
        .await;
    case.clean_up(&kept_lb, &kept_tgs).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn sweep_two_orphans(case: &mut Case, kept_lb: &str, kept_uid: &str, gone_uid: &str) {
    case.elb
        .modify_load_balancer_attributes()
        .load_balancer_arn(kept_lb)
        .attributes(protection(true))
        .send()
        .await
        .expect("enable deletion protection");
    case.controllers[0].kill();
    case.delete_behind_the_controllers_back("kept");
    case.delete_behind_the_controllers_back("gone");
    wait_for("both Services gone", LONG, || async {
        let list = case.services().list(&Default::default()).await;
        list.is_ok_and(|l| l.items.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let second = format!("{}-second", case.ns.name);
    case.start_controller(&second, "1s");
    wait_for(
        "the unprotected orphan's NLB and target group deleted",
        LONG,
        || async {
            aws_view(&case.elb, gone_uid)
                .await
                .is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&case.controllers)));
    // The sweep that deleted the other orphan also went past this one; give it a few more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let view = aws_view(&case.elb, kept_uid).await.expect("view");
    assert_eq!(
        (view.load_balancers.len(), view.target_groups.len()),
        (1, 1),
        "{view:?}\n{}",
        logs_of(&case.controllers)
    );
    assert_eq!(
        case.listener_count(kept_lb).await,
        1,
        "the protected orphan keeps its listener\n{}",
        logs_of(&case.controllers)
    );
    assert!(
        case.controllers[1].exited().is_none(),
        "{}",
        logs_of(&case.controllers)
    );
}
