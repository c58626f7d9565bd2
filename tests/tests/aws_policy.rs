//! The admin's class policy over what a Service may ask for, against the real cluster and
//! LocalStack: `allowedOverrides`, explicit subnets only in the class's VPC, `ip` targets
//! only for Pods, annotations berth does not implement reported, and `spec.aws.region`
//! refused by the API server.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use berth_e2e::awscase::AwsCase;
use berth_e2e::controller::{ClassGuard, aws_view, install_crds, logs_of, targets};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, lb_condition, lb_hostname, wait_for};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams};

const LONG: Duration = Duration::from_secs(90);
const SCHEME: &str = "service.beta.kubernetes.io/aws-load-balancer-scheme";
const SUBNETS: &str = "service.beta.kubernetes.io/aws-load-balancer-subnets";
const HC_PATH: &str = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path";
const HC_PROTOCOL: &str = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol";
const CAPACITY: &str =
    "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity";

/// The shared AWS case ([`AwsCase`]) with this suite's own steps.
struct Case(AwsCase);

impl std::ops::Deref for Case {
    type Target = AwsCase;
    fn deref(&self) -> &AwsCase {
        &self.0
    }
}

impl Case {
    async fn new(prefix: &str, aws: serde_json::Value) -> Self {
        Self(AwsCase::new(prefix, aws).await)
    }

    async fn create_service(&self, name: &str, annotations: serde_json::Value) -> Service {
        ServiceBuilder::load_balancer(name)
            .class(&self.class.lb_class())
            .app("nginx")
            .named_port("http", "TCP", 80, Some(80))
            .annotations(&annotations)
            .create_with(&self.services())
            .await
    }

    /// The Service's condition once `done` holds for it.
    async fn wait_condition(
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
                logs_of(&self.controllers)
            );
        }
        svc.as_ref().and_then(lb_condition).expect("condition")
    }

    async fn wait_reason(&self, name: &str, reason: &str) -> (String, String, String) {
        self.wait_condition(name, reason, |s| {
            lb_condition(s).is_some_and(|(_, r, _)| r == reason)
        })
        .await
    }

    async fn wait_ready(&self, name: &str) -> (String, String, String) {
        self.wait_condition(name, "ready", |s| {
            lb_condition(s).is_some_and(|(st, _, _)| st == "True") && lb_hostname(s).is_some()
        })
        .await
    }

    /// Waits for a Warning Event of `reason` about `name` whose message has every `parts`.
    async fn wait_warning(&self, name: &str, reason: &str, parts: &[&str]) {
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
                logs_of(&self.controllers)
            );
        }
    }

    /// Deletes the Service and waits until LocalStack holds nothing for it.
    async fn delete_service(&self, name: &str, uid: &str) {
        let _ = self.services().delete(name, &DeleteParams::default()).await;
        wait_for("the Service's NLB deleted", LONG, || async {
            aws_view(&self.elb, uid)
                .await
                .is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs_of(&self.controllers)));
    }

    /// A VPC that is not the cluster's, with one subnet tagged for load balancers of this
    /// cluster: (vpc, subnet).
    async fn foreign_vpc(&self) -> (String, String) {
        let tags = |kind: ResourceType, pairs: &[(&str, &str)]| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(
                    pairs
                        .iter()
                        .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                        .collect(),
                ))
                .build()
        };
        let name = format!("e2e-{}", self.ns.name);
        let vpc = self
            .ec2
            .create_vpc()
            .cidr_block("10.77.0.0/16")
            .tag_specifications(tags(ResourceType::Vpc, &[("Name", &name)]))
            .send()
            .await
            .expect("CreateVpc");
        let vpc = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("VpcId")
            .to_string();
        let cluster_tag = format!("kubernetes.io/cluster/{}", self.env.info.cluster_name);
        let subnet = self
            .ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block("10.77.1.0/24")
            .availability_zone(format!("{}a", self.env.info.region))
            .tag_specifications(tags(
                ResourceType::Subnet,
                &[
                    ("Name", &name),
                    ("kubernetes.io/role/elb", "1"),
                    (&cluster_tag, "shared"),
                ],
            ))
            .send()
            .await
            .expect("CreateSubnet");
        let subnet = subnet
            .subnet()
            .and_then(|s| s.subnet_id())
            .expect("SubnetId")
            .to_string();
        (vpc, subnet)
    }

    async fn delete_vpc(&self, vpc: &str, subnet: &str) {
        let _ = self.ec2.delete_subnet().subnet_id(subnet).send().await;
        let _ = self.ec2.delete_vpc().vpc_id(vpc).send().await;
    }

    /// Every internet-facing load balancer in LocalStack tagged with the Service's UID.
    async fn internet_facing(&self, uid: &str) -> Vec<String> {
        let view = aws_view(&self.elb, uid).await.expect("LocalStack view");
        view.load_balancers
            .into_iter()
            .filter(|(_, _, _, scheme)| scheme == "internet-facing")
            .map(|(_, name, _, _)| name)
            .collect()
    }
}

fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().expect("uid")
}

/// Runs `body`, then `cleanup`, and re-raises a panic of the body.
async fn with_cleanup<F, C>(body: F, cleanup: C)
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

/// A class that lets Services override only health checks: a Service asking for
/// `internet-facing` in a subnet of another VPC gets `OverrideRefused` naming both
/// annotations (not the allowed health-check one), a Warning Event, and no load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_only_class_refuses_scheme_and_subnets() {
    let case = Case::new(
        "pol-refuse",
        serde_json::json!({
            "scheme": "internal", "targetType": "ip", "allowedOverrides": ["healthCheck"]
        }),
    )
    .await;
    let (vpc, subnet) = case.foreign_vpc().await;
    with_cleanup(
        async {
            let svc = case
                .create_service(
                    "web",
                    serde_json::json!({
                        SCHEME: "internet-facing", SUBNETS: subnet,
                        HC_PROTOCOL: "HTTP", HC_PATH: "/healthz"
                    }),
                )
                .await;
            let (status, _, message) = case.wait_reason("web", "OverrideRefused").await;
            assert_eq!(status, "False");
            for key in [SCHEME, SUBNETS] {
                assert!(message.contains(key), "{key} not named: {message}");
            }
            assert!(!message.contains(HC_PATH), "{message}");
            case.wait_warning("web", "OverrideRefused", &[SCHEME, SUBNETS])
                .await;
            assert_eq!(case.internet_facing(&uid(&svc)).await, Vec::<String>::new());
            let view = aws_view(&case.elb, &uid(&svc)).await.expect("view");
            assert!(view.load_balancers.is_empty(), "{view:?}");
            // Resyncs (every 10 s) change nothing: still refused, still nothing in AWS.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let (_, reason, _) = case.wait_reason("web", "OverrideRefused").await;
            assert_eq!(reason, "OverrideRefused");
            assert_eq!(case.internet_facing(&uid(&svc)).await, Vec::<String>::new());
        },
        case.delete_vpc(&vpc, &subnet),
    )
    .await;
}

/// A class allowing every override still keeps explicit subnets in its VPC: a subnet of
/// another VPC is refused by name; the cluster's own subnets work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_subnets_must_be_in_the_class_vpc() {
    let case = Case::new(
        "pol-vpc",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let (vpc, subnet) = case.foreign_vpc().await;
    with_cleanup(
        async {
            let svc = case
                .create_service("web", serde_json::json!({SUBNETS: subnet}))
                .await;
            let (_, _, message) = case.wait_reason("web", "OverrideRefused").await;
            assert!(
                message.contains(&format!("{subnet} is in {vpc}")),
                "{message}"
            );
            let view = aws_view(&case.elb, &uid(&svc)).await.expect("view");
            assert!(view.load_balancers.is_empty(), "{view:?}");
            // The cluster's own subnet, by ID: provisioned.
            let own = case.env.info.aws.subnet_ids[0].clone();
            let patch = serde_json::json!({"metadata": {"annotations": {SUBNETS: own}}});
            case.services()
                .patch(
                    "web",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .expect("patch");
            case.wait_ready("web").await;
            case.delete_service("web", &uid(&svc)).await;
        },
        case.delete_vpc(&vpc, &subnet),
    )
    .await;
}

/// `ip` targets take only Pods: a hand-written EndpointSlice for the Service pointing at an
/// address that is no Pod is left out with a Warning Event naming it; the Pod is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_targets_register_only_pods() {
    let case = Case::new(
        "pol-ip",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let ns = case.ns.name.clone();
    let deploy = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "nginx", "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "nginx"}},
            "template": {
                "metadata": {"labels": {"app": "nginx"}},
                "spec": {"containers": [{"name": "c", "image": "nginx:latest",
                    "ports": [{"containerPort": 80}]}]}
            }
        }
    });
    let stranger = "198.18.250.250";
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-by-hand", "namespace": ns, "labels": {
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": "e2e.berth.dev"
        }},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": [stranger], "conditions": {"ready": true}}]
    });
    for (what, obj) in [("deployment", deploy), ("slice", slice)] {
        let path = std::env::temp_dir().join(format!("berth-e2e-{ns}-{what}.json"));
        std::fs::write(&path, obj.to_string()).expect("write manifest");
        case.env
            .kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
    }
    let pods: Api<Pod> = Api::namespaced(case.env.client.clone(), &ns);
    let lp = ListParams::default().labels("app=nginx");
    let pod_ip = std::cell::RefCell::new(String::new());
    wait_for("a running nginx pod with an IP", LONG, || async {
        let ip = pods.list(&lp).await.ok().and_then(|l| {
            l.items.iter().find_map(|p| {
                let s = p.status.as_ref()?;
                (s.phase.as_deref() == Some("Running")).then(|| s.pod_ip.clone())?
            })
        });
        *pod_ip.borrow_mut() = ip.clone().unwrap_or_default();
        ip.is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let pod_ip = pod_ip.into_inner();
    let svc = case.create_service("web", serde_json::json!({})).await;
    case.wait_ready("web").await;
    case.wait_warning("web", "NonPodEndpointSkipped", &[stranger])
        .await;
    let view = aws_view(&case.elb, &uid(&svc)).await.expect("view");
    let tg = view
        .target_groups
        .keys()
        .next()
        .expect("a target group")
        .clone();
    let registered = std::cell::RefCell::new(Vec::new());
    wait_for("the Pod registered", LONG, || async {
        let ids: Vec<String> = targets(&case.elb, &tg)
            .await
            .map(|t| t.into_iter().map(|(id, _, _)| id).collect())
            .unwrap_or_default();
        *registered.borrow_mut() = ids.clone();
        ids == vec![pod_ip.clone()]
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            registered.borrow(),
            logs_of(&case.controllers)
        )
    });
    // Resyncs (every 10 s) keep it out and do not repeat the warning.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let ids: Vec<String> = targets(&case.elb, &tg)
        .await
        .expect("targets")
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(ids, vec![pod_ip.clone()]);
    let warnings: Vec<_> = case
        .env
        .events(&ns, "web")
        .await
        .into_iter()
        .filter(|(_, r, _)| r == "NonPodEndpointSkipped")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    case.delete_service("web", &uid(&svc)).await;
}

/// Annotations berth does not implement (copied from the AWS Load Balancer Controller's
/// docs) are named in the condition and in a Warning Event; the rest still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_annotations_are_reported() {
    let case = Case::new(
        "pol-unimpl",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let svc = case
        .create_service("web", serde_json::json!({CAPACITY: "CapacityUnits=100"}))
        .await;
    let (_, _, message) = case.wait_ready("web").await;
    assert!(
        message.contains(CAPACITY),
        "{CAPACITY} not named: {message}"
    );
    case.wait_warning("web", "UnsupportedAnnotation", &[CAPACITY])
        .await;
    case.delete_service("web", &uid(&svc)).await;
}

/// `spec.aws.region` is not honoured, so the API server refuses a class that sets it
/// (whatever the client's own validation), saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_region_is_refused_by_the_api_server() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let name = format!("pol-region-{:08x}", rand::random::<u32>());
    let obj = serde_json::json!({
        "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
        "metadata": {"name": name},
        "spec": {"aws": {"region": "eu-west-1", "scheme": "internal"}}
    });
    let path = std::env::temp_dir().join(format!("berth-e2e-{name}.json"));
    std::fs::write(&path, obj.to_string()).expect("write manifest");
    let out = env
        .kubectl_output(&[
            "create",
            "--validate=false",
            "-f",
            &path.display().to_string(),
        ])
        .expect("kubectl");
    let _ = std::fs::remove_file(&path);
    let _ = env.kubectl_output(&["delete", "loadbalancerclass", &name, "--ignore-not-found"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the class was accepted");
    assert!(
        stderr.contains("spec.aws.region is not supported"),
        "{stderr}"
    );
    // Without the field the same class is fine.
    let ok = ClassGuard::create(&env, &name, serde_json::json!({"scheme": "internal"}));
    drop(ok);
}
