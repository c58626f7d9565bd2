//! Two clusters with one cluster name in one account: two controllers with the same
//! `--cluster-name` but their own `--cluster-id` (and class) against one LocalStack. A
//! Service of the other cluster is one this cluster's apiserver does not have: the
//! second controller's Service is deleted behind its back while the controllers are
//! stopped. The first controller, started again, deletes its own orphan but, over three
//! more sweep intervals, never touches the other's load balancers and target groups, nor
//! a target group attached by hand to one of its own NLBs; the second controller, started
//! again, deletes its orphan.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    AwsView, ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of,
};
use berth_e2e::identity::{self, attach_by_hand, clean_up, fresh_id, listeners_of};
use berth_e2e::testing::{TestEnv, TestNamespace, wait_for};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;

const SWEEP: &str = "2s";
const THREE_SWEEPS: Duration = Duration::from_secs(7);
const LONG: Duration = Duration::from_secs(90);

struct Cluster {
    id: String,
    class: ClassGuard,
    controller: Option<ControllerProc>,
}

struct Case {
    env: TestEnv,
    ns: TestNamespace,
    elb: elb::Client,
    a: Cluster,
    b: Cluster,
}

impl Case {
    async fn new() -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace("identity").await;
        let elb = elb::Client::new(&env.aws().await);
        let cluster = |side: &str| {
            let aws = serde_json::json!({"scheme": "internet-facing", "targetType": "ip"});
            Cluster {
                id: fresh_id(&format!("e2e-{side}")),
                class: ClassGuard::create(&env, &format!("{}-{side}", ns.name), aws),
                controller: None,
            }
        };
        let (a, b) = (cluster("a"), cluster("b"));
        Self { env, ns, elb, a, b }
    }

    /// Starts a cluster's controller: the environment's cluster name, its own identity.
    fn start(env: &TestEnv, ns: &str, cluster: &mut Cluster, name: &str) {
        let mut opts = ControllerOpts::new(&cluster.class.name, ns);
        opts.gc_interval = SWEEP;
        opts.extra_args = vec!["--cluster-id".into(), cluster.id.clone()];
        let c = ControllerProc::spawn(&env.info, name, &opts)
            .unwrap_or_else(|e| panic!("start controller {name}: {e}"));
        cluster.controller = Some(c);
    }

    fn logs(&self) -> String {
        let running: Vec<&ControllerProc> = [&self.a, &self.b]
            .iter()
            .filter_map(|c| c.controller.as_ref())
            .collect();
        running
            .iter()
            .map(|c| logs_of(std::slice::from_ref(*c)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn create_service(&self, name: &str, class: &ClassGuard) -> String {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": class.lb_class(),
                "selector": {"app": name},
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]
            },
        }))
        .expect("service object");
        Api::<Service>::namespaced(self.env.client.clone(), &self.ns.name)
            .create(&PostParams::default(), &svc)
            .await
            .unwrap_or_else(|e| panic!("create service {name}: {e}"))
            .metadata
            .uid
            .expect("uid")
    }

    /// The Service's NLB once it has its target group and listener.
    async fn provisioned(&self, uid: &str) -> AwsView {
        identity::provisioned(&self.elb, uid, LONG, || self.logs()).await
    }

    /// Deletes the Service without any controller seeing it go (finalizer removed).
    fn delete_behind_the_back(&self, name: &str) {
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

    async fn gone(&self, uid: &str, what: &str) {
        let res = wait_for(what, LONG, || async {
            aws_view(&self.elb, uid)
                .await
                .is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
        })
        .await;
        if let Err(e) = res {
            panic!("{e}\n{}", self.logs());
        }
    }
}

fn arns(v: &AwsView) -> Vec<String> {
    v.load_balancers
        .iter()
        .map(|l| l.0.clone())
        .chain(v.target_groups.keys().cloned())
        .collect()
}

/// The view's resources LocalStack no longer has.
async fn missing(elb: &elb::Client, v: &AwsView) -> Vec<String> {
    let all = berth_e2e::identity::all_tagged(elb).await;
    arns(v)
        .into_iter()
        .filter(|a| !all.contains_key(a))
        .collect()
}

async fn body(case: &mut Case, hand_tg: &mut Option<String>) {
    let ns = case.ns.name.clone();
    Case::start(&case.env, &ns, &mut case.a, "identity-a");
    Case::start(&case.env, &ns, &mut case.b, "identity-b");
    let a_live = case.create_service("a-live", &case.a.class).await;
    let a_gone = case.create_service("a-gone", &case.a.class).await;
    let b_live = case.create_service("b-live", &case.b.class).await;
    let b_gone = case.create_service("b-gone", &case.b.class).await;
    let a_live_view = case.provisioned(&a_live).await;
    case.provisioned(&a_gone).await;
    let b_live_view = case.provisioned(&b_live).await;
    let b_gone_view = case.provisioned(&b_gone).await;

    // A target group attached by hand to cluster A's NLB, on a port of its own.
    let lb = a_live_view.load_balancers[0].0.clone();
    let own_tg = a_live_view.target_groups.keys().next().expect("tg").clone();
    let name = format!("hand-{:08x}", rand::random::<u32>());
    *hand_tg = Some(attach_by_hand(&case.elb, &lb, &own_tg, &name, 8443).await);

    // Both controllers stop; each cluster's Service is deleted where only its own
    // apiserver would know (finalizer removed). A comes back first: its sweep deletes its
    // own orphan (proof that it sweeps) and must leave B's alone.
    for c in [&mut case.a, &mut case.b] {
        if let Some(mut p) = c.controller.take() {
            p.kill();
        }
    }
    case.delete_behind_the_back("b-gone");
    case.delete_behind_the_back("a-gone");
    Case::start(&case.env, &ns, &mut case.a, "identity-a2");
    case.gone(&a_gone, "cluster A's own orphan deleted by A's sweep")
        .await;
    tokio::time::sleep(THREE_SWEEPS).await;

    for (what, view) in [
        ("cluster B's orphan", &b_gone_view),
        ("cluster B's live Service", &b_live_view),
        ("cluster A's live Service", &a_live_view),
    ] {
        let missing = missing(&case.elb, view).await;
        assert!(
            missing.is_empty(),
            "{what}: {missing:?} deleted by the other cluster\n{}",
            case.logs()
        );
    }
    let listeners = listeners_of(&case.elb, &lb).await;
    assert_eq!(
        listeners.get(&8443),
        hand_tg.as_ref(),
        "the hand-made listener and its target group: {listeners:?}\n{}",
        case.logs()
    );

    // B again, same identity: its orphan is its own to delete; its live Service stays.
    Case::start(&case.env, &ns, &mut case.b, "identity-b2");
    case.gone(&b_gone, "cluster B's orphan deleted by B's sweep")
        .await;
    let missing = missing(&case.elb, &b_live_view).await;
    assert!(missing.is_empty(), "B's live Service lost {missing:?}");
}

/// Drops berth's finalizer from the namespace's Services (no controller is left to),
/// so the namespace can go.
fn release_services(env: &TestEnv, ns: &str) {
    let names = env.kubectl(&["-n", ns, "get", "services", "-o", "name"]);
    for name in names.split_whitespace() {
        let patch = r#"{"metadata":{"finalizers":null}}"#;
        let _ = env.kubectl_output(&["-n", ns, "patch", name, "--type=merge", "-p", patch]);
        let _ = env.kubectl_output(&["-n", ns, "delete", name, "--wait=false"]);
    }
}

#[tokio::test]
async fn two_clusters_of_one_name_never_delete_each_others_load_balancers() {
    let mut case = Case::new().await;
    let mut hand_tg = None;
    let result = AssertUnwindSafe(body(&mut case, &mut hand_tg))
        .catch_unwind()
        .await;
    for c in [&mut case.a, &mut case.b] {
        if let Some(mut p) = c.controller.take() {
            p.kill();
        }
    }
    release_services(&case.env, &case.ns.name);
    let ids = [case.a.id.as_str(), case.b.id.as_str()];
    let extra: Vec<String> = hand_tg.into_iter().collect();
    clean_up(&case.elb, &ids, &extra).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
