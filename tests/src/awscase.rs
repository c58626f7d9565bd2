//! One AWS-provider test case: a namespace, a class of its own, a controller serving only
//! that class, and SDK clients for LocalStack; with the waits the AWS suites share.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use futures::FutureExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};

use crate::controller::{
    ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of,
};
use crate::service::ServiceBuilder;
use crate::testing::{TestEnv, TestNamespace, lb_condition, lb_hostname, wait_for};

pub const LONG: Duration = Duration::from_secs(90);

pub struct AwsCase {
    pub env: TestEnv,
    pub ns: TestNamespace,
    pub class: ClassGuard,
    pub controllers: Vec<ControllerProc>,
    pub elb: elb::Client,
    pub ec2: aws_sdk_ec2::Client,
}

impl AwsCase {
    /// A case whose class has the `aws` block `aws`.
    pub async fn new(prefix: &str, aws: serde_json::Value) -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace(prefix).await;
        let class = ClassGuard::create(&env, &ns.name, aws);
        let sdk = env.aws().await;
        let opts = ControllerOpts::new(&class.name, &ns.name);
        let controller = ControllerProc::spawn(&env.info, &ns.name, &opts)
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        Self {
            elb: elb::Client::new(&sdk),
            ec2: aws_sdk_ec2::Client::new(&sdk),
            env,
            ns,
            class,
            controllers: vec![controller],
        }
    }

    pub fn logs(&self) -> String {
        logs_of(&self.controllers)
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    /// A LoadBalancer Service of the case's class with `spec` merged in.
    pub async fn create_service(
        &self,
        name: &str,
        annotations: serde_json::Value,
        spec: serde_json::Value,
    ) -> Service {
        ServiceBuilder::load_balancer(name)
            .merge_spec(&spec)
            .type_("LoadBalancer")
            .class(&self.class.lb_class())
            .annotations(&annotations)
            .create_with(&self.services())
            .await
    }

    /// Merges `annotations` (a `null` value removes one) into the Service's.
    pub async fn annotate(&self, name: &str, annotations: serde_json::Value) {
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        self.services()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate {name}: {e}"));
    }

    /// The Service's condition (status, reason, message) once `done` holds for it.
    pub async fn wait_condition(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&Service) -> bool,
    ) -> (String, String, String) {
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
                self.logs()
            );
        }
        svc.as_ref().and_then(lb_condition).expect("condition")
    }

    pub async fn wait_reason(&self, name: &str, reason: &str) -> (String, String, String) {
        self.wait_condition(name, reason, |s| {
            lb_condition(s).is_some_and(|(_, r, _)| r == reason)
        })
        .await
    }

    /// The ready Service's condition message.
    pub async fn wait_ready(&self, name: &str) -> String {
        let (_, _, message) = self
            .wait_condition(name, "ready", |s| {
                lb_condition(s).is_some_and(|(st, _, _)| st == "True") && lb_hostname(s).is_some()
            })
            .await;
        message
    }

    /// Waits for a Warning Event of `reason` about `name` whose message has every `parts`.
    pub async fn wait_warning(&self, name: &str, reason: &str, parts: &[&str]) {
        let found = |events: &[(String, String, String)]| {
            events.iter().any(|(t, r, m)| {
                t == "Warning" && r == reason && parts.iter().all(|p| m.contains(p))
            })
        };
        let res = wait_for(
            &format!("a {reason} Warning naming {parts:?}"),
            LONG,
            || async { found(&self.env.events(&self.ns.name, name).await) },
        )
        .await;
        if let Err(e) = res {
            panic!(
                "{e}: {:?}\n{}",
                self.env.events(&self.ns.name, name).await,
                self.logs()
            );
        }
    }

    /// The ARN of the one load balancer LocalStack holds for the Service `uid`, once it
    /// holds `tgs` target groups for it.
    pub async fn one_lb(&self, uid: &str, tgs: usize) -> String {
        let arn = std::cell::RefCell::new(None);
        let res = wait_for(
            &format!("one load balancer with {tgs} target groups"),
            LONG,
            || async {
                let view = aws_view(&self.elb, uid).await;
                let ok = view
                    .as_ref()
                    .is_ok_and(|v| v.load_balancers.len() == 1 && v.target_groups.len() == tgs);
                if ok && let Ok(v) = view {
                    *arn.borrow_mut() = Some(v.load_balancers[0].0.clone());
                }
                ok
            },
        )
        .await;
        if let Err(e) = res {
            panic!("{e}: {:?}\n{}", aws_view(&self.elb, uid).await, self.logs());
        }
        arn.into_inner().expect("arn")
    }

    /// Asserts LocalStack holds nothing for the Service `uid`.
    pub async fn assert_nothing_for(&self, uid: &str) {
        let view = aws_view(&self.elb, uid).await.expect("LocalStack view");
        assert!(
            view.load_balancers.is_empty() && view.target_groups.is_empty(),
            "{view:?}"
        );
    }

    /// Deletes the Service and waits until LocalStack holds nothing for it.
    pub async fn delete_service(&self, name: &str, uid: &str) {
        let _ = self.services().delete(name, &DeleteParams::default()).await;
        wait_for("the Service's NLB deleted", LONG, || async {
            aws_view(&self.elb, uid)
                .await
                .is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }
}

pub fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().expect("uid")
}

/// Runs `body`, then `cleanup`, and re-raises a panic of the body.
pub async fn with_cleanup<F, C>(body: F, cleanup: C)
where
    F: std::future::Future<Output = ()>,
    C: std::future::Future<Output = ()>,
{
    let result = AssertUnwindSafe(body).catch_unwind().await;
    cleanup.await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
