//! LocalStack restarted under a running controller. A restart loses every AWS resource of
//! every test, so this suite runs alone, after the parallel ones (hack/e2e.sh runs
//! `serial_*` suites one at a time with one test thread).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, listener_address, targets,
};
use berth_e2e::env::restart_localstack;
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, lb_condition, lb_hostname, wait_for};
use k8s_openapi::api::core::v1::Service;
use kube::Api;

const LONG: Duration = Duration::from_secs(120);

/// (condition status, hostname) of the Service.
fn readiness(svc: &Service) -> (Option<String>, Option<String>) {
    (lb_condition(svc).map(|c| c.0), lb_hostname(svc))
}

/// nginx's welcome page through the listener serving `port` of `lb_arn`.
async fn nginx_through(env: &TestEnv, lb_arn: &str, port: i32) -> Result<(), String> {
    let last = RefCell::new(String::new());
    let res = wait_for("nginx through the NLB listener", LONG, || async {
        let Some(addr) = listener_address(&env.info, lb_arn, port).await else {
            *last.borrow_mut() = "listener not served".into();
            return false;
        };
        match curl_in(
            &env.info.client_netns,
            &format!("http://{addr}/"),
            Duration::from_secs(3),
        ) {
            Ok(body) if body.contains("Welcome to nginx!") => true,
            Ok(body) => {
                *last.borrow_mut() = format!("unexpected body: {body}");
                false
            }
            Err(e) => {
                *last.borrow_mut() = e.to_string();
                false
            }
        }
    })
    .await;
    res.map_err(|e| format!("{e}: last attempt: {}", last.borrow()))
}

/// Waits until the Service is ready with a hostname that `wanted` accepts.
async fn ready_with(services: &Api<Service>, wanted: impl Fn(&str) -> bool) -> Result<(), String> {
    wait_for("the Service ready", LONG, || async {
        services.get("nginx-service").await.is_ok_and(|s| {
            let (ready, host) = readiness(&s);
            ready.as_deref() == Some("True") && host.as_deref().is_some_and(&wanted)
        })
    })
    .await
    .map_err(|e| e.to_string())
}

/// After LocalStack lost all its state and came back (same endpoint; the environment
/// recreates the VPC, subnets and instances with their old IDs), the controller's next
/// resync notices that its NLB, target group and listener are gone and recreates them:
/// a new load balancer, the status hostname updated to its DNS name, every node's instance
/// registered again, and nginx answering through the new listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localstack_restarted_resources_are_recreated() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("serial-restart").await;
    let class = ClassGuard::create(
        &env,
        &ns.name,
        serde_json::json!({"scheme": "internet-facing"}),
    );
    let mut controller = ControllerProc::spawn(
        &env.info,
        &ns.name,
        &ControllerOpts::new(&class.name, &ns.name),
    )
    .unwrap_or_else(|e| panic!("start controller: {e}"));
    let logs = |c: &ControllerProc| format!("--- controller ---\n{}", c.log_tail());
    let elb = elb::Client::new(&env.aws().await);
    let ec2 = aws_sdk_ec2::Client::new(&env.aws().await);

    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let svc = ServiceBuilder::load_balancer("nginx-service")
        .class(&class.lb_class())
        .app("nginx")
        .named_port("http", "TCP", 80, Some(80))
        .create_with(&services)
        .await;
    let uid = svc.metadata.uid.clone().expect("uid");
    ready_with(&services, |_| true)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&controller)));
    let before = aws_view(&elb, &uid).await.expect("view");
    assert_eq!(before.load_balancers.len(), 1, "{before:?}");
    let (old_arn, _, old_dns, _) = before.load_balancers[0].clone();
    nginx_through(&env, &old_arn, 80)
        .await
        .unwrap_or_else(|e| panic!("before the restart: {e}"));

    restart_localstack(&env.info)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The environment's part: the instances are back under their old IDs.
    let instances: BTreeSet<String> = ec2
        .describe_instances()
        .send()
        .await
        .expect("DescribeInstances")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    let node_instances: BTreeSet<String> = env
        .info
        .nodes
        .iter()
        .map(|n| n.instance_id.clone())
        .collect();
    assert!(
        node_instances.is_subset(&instances),
        "{node_instances:?} not in {instances:?}"
    );

    // The controller's part.
    ready_with(&services, |h| h != old_dns)
        .await
        .unwrap_or_else(|e| panic!("no new hostname: {e}\n{}", logs(&controller)));
    let after = aws_view(&elb, &uid).await.expect("view");
    assert_eq!(after.load_balancers.len(), 1, "{after:?}");
    assert_eq!(after.target_groups.len(), 1, "{after:?}");
    let (new_arn, _, new_dns, _) = after.load_balancers[0].clone();
    assert_ne!(new_arn, old_arn);
    let svc = services.get("nginx-service").await.expect("get");
    assert_eq!(readiness(&svc).1, Some(new_dns));
    let tg = after.target_groups.keys().next().expect("tg").clone();
    let node_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p[0].node_port)
        .expect("nodePort");
    let registered: BTreeSet<(String, i32)> = targets(&elb, &tg)
        .await
        .expect("targets")
        .into_iter()
        .map(|(id, port, _)| (id, port))
        .collect();
    let want: BTreeSet<(String, i32)> = node_instances
        .into_iter()
        .map(|id| (id, node_port))
        .collect();
    assert_eq!(registered, want);
    nginx_through(&env, &new_arn, 80)
        .await
        .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", logs(&controller)));
    assert!(controller.exited().is_none(), "{}", logs(&controller));
}
