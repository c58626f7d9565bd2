//! AWS's request rate limits, enforced by LocalStack's extension, against a running
//! controller. The limits are per account and Region, so they would slow down every suite
//! sharing LocalStack: this suite runs alone (hack/e2e.sh runs `serial_*` suites one at a
//! time) and turns them off again when it ends, also after a failure.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::awslimits::{self, LimitsGuard, calls_by_operation, calls_since};
use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, lb_condition, wait_for};
use elb::error::ProvideErrorMetadata;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

const LONG: Duration = Duration::from_secs(90);

fn ready(svc: &Service) -> bool {
    lb_condition(svc).is_some_and(|c| c.0 == "True")
}

/// (code, HTTP status) of each of `n` concurrent calls that failed.
async fn burst<F, Fut>(n: usize, call: F) -> Vec<(String, u16)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<(String, u16)>>,
{
    futures::future::join_all((0..n).map(|_| call()))
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A burst beyond a bucket is refused as AWS refuses it: ELBv2 with HTTP 400 `Throttling`
/// "Rate exceeded", EC2 with HTTP 503 `RequestLimitExceeded`; other APIs' buckets are
/// untouched, and the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localstack_throttles_a_burst_as_aws_does() {
    let env = TestEnv::connect().await;
    let sdk = env.aws().await;
    let elb = elb::Client::from_conf(
        elb::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    let ec2 = ec2::Client::from_conf(
        ec2::config::Builder::from(&sdk)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    // A tenth of AWS's buckets: ELBv2 Describe* holds 4 tokens, EC2 DescribeSubnets 10.
    let _limits = LimitsGuard::enable(&env.info, 0.1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let refused = burst(12, || async {
        let err = elb.describe_load_balancers().send().await.err()?;
        let status = err.raw_response().map(|r| r.status().as_u16())?;
        Some((format!("{}: {}", err.code()?, err.message()?), status))
    })
    .await;
    assert!(refused.len() >= 6, "12 calls on 4 tokens: {refused:?}");
    assert!(
        refused
            .iter()
            .all(|r| r == &("Throttling: Rate exceeded".to_string(), 400)),
        "{refused:?}"
    );
    let refused = burst(25, || async {
        let err = ec2.describe_subnets().send().await.err()?;
        let status = err.raw_response().map(|r| r.status().as_u16())?;
        Some((err.code()?.to_string(), status))
    })
    .await;
    assert!(refused.len() >= 10, "25 calls on 10 tokens: {refused:?}");
    assert!(
        refused
            .iter()
            .all(|r| r == &("RequestLimitExceeded".to_string(), 503)),
        "{refused:?}"
    );
    // EC2 buckets are per API: DescribeInstances still has its tokens.
    ec2.describe_instances()
        .send()
        .await
        .expect("another API's bucket");
    // ELBv2's Describe* refills at 1/s here.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    elb.describe_target_groups()
        .send()
        .await
        .expect("a refilled token");
    let view = awslimits::view(&env.info).await.expect("view");
    assert!(
        view["refused"]["elbv2:Describe*"].as_u64() >= Some(6),
        "{view}"
    );
}

/// With the limits on, a new one-port Service costs the controller exactly these calls,
/// none throttled (an added call fails this); then 12 Services created at once against
/// buckets a quarter of AWS's are throttled, the controller counts it, retries with
/// backoff, and every Service gets ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_converges_under_throttling_and_counts_it() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("serial-throttle").await;
    let class = ClassGuard::create(
        &env,
        &ns.name,
        serde_json::json!({"scheme": "internet-facing"}),
    );
    let limits = LimitsGuard::enable(&env.info, 1.0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    // No resync and no orphan sweep during the test: every call counted is the Services'.
    opts.resync = "10m";
    opts.gc_interval = "10m";
    let controller = ControllerProc::spawn(&env.info, &ns.name, &opts)
        .unwrap_or_else(|e| panic!("start controller: {e}"));
    let logs = || format!("--- controller ---\n{}", controller.log_tail());
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let metrics = || async { calls_by_operation(&controller.metrics().await.unwrap_or_default()) };

    // Warm: the controller has resolved its VPC and subnets (cached for a minute).
    ServiceBuilder::load_balancer("warm")
        .class(&class.lb_class())
        .app("warm")
        .port(80)
        .create_with(&services)
        .await;
    let all_ready = |names: Vec<String>| {
        let services = services.clone();
        async move {
            for name in &names {
                if !services.get(name).await.is_ok_and(|s| ready(&s)) {
                    return false;
                }
            }
            true
        }
    };
    wait_for("warm ready", LONG, || all_ready(vec!["warm".into()]))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = metrics().await;
    ServiceBuilder::load_balancer("one")
        .class(&class.lb_class())
        .app("one")
        .port(80)
        .create_with(&services)
        .await;
    wait_for("one ready", LONG, || all_ready(vec!["one".into()]))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    // Reconciles the Service's own writes or its EndpointSlice cause come within this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = calls_since(&before, &metrics().await);
    assert!(
        spent.keys().all(|(_, outcome)| outcome != "throttled"),
        "one Service at AWS's limits is never throttled: {spent:?}"
    );
    let mut by_api: BTreeMap<String, f64> = BTreeMap::new();
    for ((op, _), n) in &spent {
        *by_api.entry(op.clone()).or_insert(0.0) += n;
    }
    let expected: BTreeMap<String, f64> = [
        // The adoption check by name (LoadBalancerNotFound), then the provisioning state
        // read back until active.
        ("DescribeLoadBalancers", 2.0),
        // The managed frontend group, tagged at creation, its rule for the listener, and
        // the backend rule on the nodes' group (their groups are cached since "warm").
        ("CreateSecurityGroup", 1.0),
        ("AuthorizeSecurityGroupIngress", 2.0),
        ("CreateLoadBalancer", 1.0),
        ("CreateTargetGroup", 1.0),
        ("RegisterTargets", 1.0),
        ("CreateListener", 1.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(by_api, expected, "calls for one new one-port Service");
    assert!(by_api.values().sum::<f64>() <= 10.0);

    // Buckets a quarter of AWS's (ELBv2 creates: 5 tokens, 0.75/s), 12 Services at once.
    drop(limits);
    let _limits = LimitsGuard::enable(&env.info, 0.25)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = (0..12).map(|i| format!("burst-{i}")).collect();
    futures::future::join_all(names.iter().map(|name| {
        let svc = ServiceBuilder::load_balancer(name)
            .class(&class.lb_class())
            .app(name)
            .port(80);
        let services = services.clone();
        async move { svc.create_with(&services).await }
    }))
    .await;
    wait_for("12 Services ready under throttling", LONG, || {
        all_ready(names.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let view = awslimits::view(&env.info).await.expect("view");
    let refused: u64 = view["refused"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    assert!(refused > 0, "LocalStack refused nothing: {view}");
    let throttled: f64 = calls_since(&before, &metrics().await)
        .iter()
        .filter(|((_, outcome), _)| outcome == "throttled")
        .map(|(_, n)| n)
        .sum();
    assert!(
        throttled > 0.0,
        "the controller counted no throttled call while LocalStack refused {refused}: {view}"
    );
    drop(_limits);
    env.kubectl(&[
        "delete",
        "services",
        "--all",
        "-n",
        &ns.name,
        "--wait=true",
        "--timeout=120s",
    ]);
}
