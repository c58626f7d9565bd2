//! The controller against the real local cluster and LocalStack: each case runs its own
//! `berth-controller` process(es) for its own LoadBalancerClass and namespace.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    AwsView, ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, listener_address,
    logs_of, metric_sum, targets,
};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{
    TestEnv, TestNamespace, curl_in, exec_in, lb_condition, lb_hostname, udp_in, wait_for,
};
use berth_e2e::wait::{Diagnostics, wait_true};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};

/// Cases that add, label or remove nodes take this for writing; cases that compare target
/// sets with the nodes take it for reading.
static NODES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const LONG: Duration = Duration::from_secs(90);

struct Case {
    env: TestEnv,
    ns: TestNamespace,
    class: ClassGuard,
    controllers: Vec<ControllerProc>,
    elb: elb::Client,
    ec2: aws_sdk_ec2::Client,
}

impl Case {
    async fn new(prefix: &str, aws: serde_json::Value) -> Self {
        Self::with_replicas(prefix, aws, 1).await
    }

    async fn with_replicas(prefix: &str, aws: serde_json::Value, replicas: usize) -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace(prefix).await;
        let class = ClassGuard::create(&env, &ns.name, aws);
        let sdk = env.aws().await;
        let mut case = Self {
            elb: elb::Client::new(&sdk),
            ec2: aws_sdk_ec2::Client::new(&sdk),
            env,
            ns,
            class,
            controllers: Vec::new(),
        };
        for i in 0..replicas {
            case.start_controller(&format!("{}-{i}", case.ns.name));
        }
        case
    }

    fn opts(&self) -> ControllerOpts {
        ControllerOpts::new(&self.class.name, &self.ns.name)
    }

    fn start_controller(&mut self, name: &str) {
        let c = ControllerProc::spawn(&self.env.info, name, &self.opts())
            .unwrap_or_else(|e| panic!("start controller {name}: {e}"));
        self.controllers.push(c);
    }

    fn logs(&self) -> String {
        logs_of(&self.controllers)
    }

    /// What a timed-out wait shows: the controllers' logs.
    fn dump(&self) -> Diagnostics {
        Diagnostics::new(&self.env).controllers(&self.controllers)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    async fn create_service(
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

    /// A Deployment of `replicas` pods labelled app=`name` with the given container ports.
    fn deploy(&self, name: &str, image: &str, replicas: i32, ports: serde_json::Value) {
        let obj = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "c", "image": image, "ports": ports}]}
                }
            }
        });
        let path = std::env::temp_dir().join(format!("berth-e2e-{}-{name}.json", self.ns.name));
        std::fs::write(&path, obj.to_string()).expect("write manifest");
        self.env
            .kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
    }

    async fn running_pods(&self, app: &str, n: usize) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.ns.name);
        let lp = ListParams::default().labels(&format!("app={app}"));
        wait_for(&format!("{n} running {app} pods"), LONG, || async {
            pods.list(&lp).await.is_ok_and(|l| {
                l.items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                            && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
                    })
                    .count()
                    == n
            })
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        pods.list(&lp).await.expect("list pods").items
    }

    /// Waits until the Service's condition is True with a hostname in the status.
    async fn wait_ready(&self, name: &str) -> Service {
        let api = self.services();
        let res = wait_for(&format!("service {name} ready"), LONG, || async {
            api.get(name).await.is_ok_and(|s| {
                lb_condition(&s).is_some_and(|(st, _, _)| st == "True") && lb_hostname(&s).is_some()
            })
        })
        .await;
        if let Err(e) = res {
            let s = api.get(name).await.ok();
            panic!(
                "{e}; status: {:?}\n{}",
                s.and_then(|s| s.status),
                self.logs()
            );
        }
        api.get(name).await.expect("get service")
    }

    async fn wait_condition(&self, name: &str, reason: &str) -> (String, String, String) {
        let api = self.services();
        let res = wait_for(
            &format!("service {name} condition {reason}"),
            LONG,
            || async {
                api.get(name)
                    .await
                    .is_ok_and(|s| lb_condition(&s).is_some_and(|(_, r, _)| r == reason))
            },
        )
        .await;
        if let Err(e) = res {
            panic!(
                "{e}; status: {:?}\n{}",
                api.get(name).await.ok().and_then(|s| s.status),
                self.logs()
            );
        }
        lb_condition(&api.get(name).await.expect("get")).expect("condition")
    }

    /// The single load balancer LocalStack holds for `uid`, once it has `tgs` target groups.
    async fn one_lb(&self, uid: &str, tgs: usize) -> AwsView {
        let last = RefCell::new(AwsView::default());
        let res = wait_for(
            &format!("one load balancer with {tgs} target groups"),
            LONG,
            || async {
                match aws_view(&self.elb, uid).await {
                    Ok(v) => {
                        let ok = v.load_balancers.len() == 1 && v.target_groups.len() == tgs;
                        *last.borrow_mut() = v;
                        ok
                    }
                    Err(_) => false,
                }
            },
        )
        .await;
        if let Err(e) = res {
            panic!("{e}: {:?}\n{}", last.borrow(), self.logs());
        }
        last.into_inner()
    }

    async fn listeners(&self, lb_arn: &str) -> Vec<(i32, String, String)> {
        let out = self
            .elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .expect("DescribeListeners");
        let mut v: Vec<(i32, String, String)> = out
            .listeners()
            .iter()
            .map(|l| {
                (
                    l.port().unwrap_or_default(),
                    l.protocol()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                    l.default_actions()
                        .iter()
                        .find_map(|a| a.target_group_arn().map(str::to_string))
                        .unwrap_or_default(),
                )
            })
            .collect();
        v.sort();
        v
    }

    async fn events(&self, name: &str) -> Vec<(String, String, String)> {
        self.env.events(&self.ns.name, name).await
    }

    fn instance_ids(&self) -> BTreeSet<String> {
        self.env
            .info
            .nodes
            .iter()
            .map(|n| n.instance_id.clone())
            .collect()
    }
}

fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().expect("uid")
}

fn node_port(svc: &Service, port: i32) -> i32 {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.port == port))
        .and_then(|p| p.node_port)
        .expect("nodePort")
}

/// The request reaches a pod through the load balancer's listener.
async fn get_through_listener(case: &Case, lb_arn: &str, port: i32, expect: &str) -> String {
    let last = RefCell::new(String::new());
    let res = wait_for("a response through the NLB listener", LONG, || async {
        let Some(addr) = listener_address(&case.env.info, lb_arn, port).await else {
            *last.borrow_mut() = "listener not served by LocalStack".into();
            return false;
        };
        match curl_in(
            &case.env.info.client_netns,
            &format!("http://{addr}/"),
            Duration::from_secs(3),
        ) {
            Ok(body) if body.contains(expect) => {
                *last.borrow_mut() = body;
                true
            }
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
    if let Err(e) = res {
        panic!("{e}: last attempt: {}", last.borrow());
    }
    last.into_inner()
}

fn nginx_service_spec() -> serde_json::Value {
    serde_json::json!({
        "selector": {"app": "nginx"},
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]
    })
}

/// The seed's nginx Deployment behind a LoadBalancer Service: an NLB with one TCP listener
/// on port 80 and one target group holding every node's instance on the NodePort; the
/// hostname in the status is the NLB's DNS name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_nginx_gets_an_nlb_with_every_node_on_the_node_port() {
    let _nodes = NODES.read().await;
    let case = Case::new("ctl-seed", serde_json::json!({"scheme": "internet-facing"})).await;
    case.env
        .apply_example(&case.ns.name, "seed/nginx-deployment.yaml");
    case.create_service("nginx-service", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("nginx-service").await;
    let view = case.one_lb(&uid(&svc), 1).await;
    let (lb_arn, _, dns, scheme) = view.load_balancers[0].clone();
    assert_eq!(lb_hostname(&svc), Some(dns));
    assert_eq!(scheme, "internet-facing");
    let ports = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .and_then(|i| i[0].ports.clone())
        .expect("ingress ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, 80);
    let listeners = case.listeners(&lb_arn).await;
    let tg_arn = view
        .target_groups
        .keys()
        .next()
        .expect("target group")
        .clone();
    assert_eq!(listeners, vec![(80, "TCP".into(), tg_arn.clone())]);
    let np = node_port(&svc, 80);
    let registered: BTreeSet<(String, i32)> = targets(&case.elb, &tg_arn)
        .await
        .expect("targets")
        .into_iter()
        .map(|(id, p, _)| (id, p))
        .collect();
    let want: BTreeSet<(String, i32)> =
        case.instance_ids().into_iter().map(|id| (id, np)).collect();
    assert_eq!(registered, want);
    let finalizers = svc.metadata.finalizers.clone().unwrap_or_default();
    assert!(
        finalizers.iter().any(|f| f == "berth.dev/load-balancer"),
        "{finalizers:?}"
    );
    let events = case.events("nginx-service").await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Normal" && r == "Provisioned"),
        "{events:?}"
    );
}

/// Instance targets: a request to the NLB listener goes to a node's NodePort, which the
/// node agent (berth-nodeproxy) forwards to an nginx pod. Needs nodeproxy on the nodes:
/// without it the NodePort answers nothing and this case fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_through_instance_targets_reaches_nginx_via_node_port() {
    let _nodes = NODES.read().await;
    let case = Case::new(
        "ctl-inst-path",
        serde_json::json!({"scheme": "internet-facing"}),
    )
    .await;
    case.deploy(
        "nginx",
        "nginx:latest",
        2,
        serde_json::json!([{"containerPort": 80}]),
    );
    case.running_pods("nginx", 2).await;
    case.create_service("web", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("web").await;
    let view = case.one_lb(&uid(&svc), 1).await;
    let np = node_port(&svc, 80);
    // Fails clearly when no node agent serves the NodePort.
    let direct = curl_in(
        &case.env.info.client_netns,
        &format!("http://{}:{np}/", case.env.info.nodes[0].plan.ip),
        Duration::from_secs(3),
    );
    assert!(
        direct.is_ok(),
        "NodePort {np} on {} does not answer: instance targets need berth-nodeproxy on the nodes: {direct:?}",
        case.env.info.nodes[0].plan.ip
    );
    let body =
        get_through_listener(&case, &view.load_balancers[0].0, 80, "Welcome to nginx!").await;
    assert!(body.contains("Welcome to nginx!"));
}

/// ip targets: the target group holds the ready pod IPs on the container port, health
/// checks pass, and a request to the NLB listener reaches nginx without any NodePort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_targets_follow_pods_and_serve_requests() {
    let case = Case::new(
        "ctl-ip",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.deploy(
        "nginx",
        "nginx:latest",
        2,
        serde_json::json!([{"containerPort": 80}]),
    );
    let pods = case.running_pods("nginx", 2).await;
    case.create_service("web", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("web").await;
    let view = case.one_lb(&uid(&svc), 1).await;
    let tg = view.target_groups.keys().next().expect("tg").clone();
    let want: BTreeSet<(String, i32)> = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .map(|ip| (ip, 80))
        .collect();
    wait_for("ip targets are the pods, all healthy", LONG, || async {
        targets(&case.elb, &tg).await.is_ok_and(|t| {
            t.iter()
                .map(|(id, p, _)| (id.clone(), *p))
                .collect::<BTreeSet<_>>()
                == want
                && t.iter().all(|(_, _, s)| s == "healthy")
        })
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            futures_block(targets(&case.elb, &tg)),
            case.logs()
        )
    });
    let body =
        get_through_listener(&case, &view.load_balancers[0].0, 80, "Welcome to nginx!").await;
    assert!(body.contains("Welcome to nginx!"));

    // Scale to 3: the new pod becomes a target.
    case.env.kubectl(&[
        "scale",
        "-n",
        &case.ns.name,
        "deployment/nginx",
        "--replicas=3",
    ]);
    let pods = case.running_pods("nginx", 3).await;
    let want: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    wait_true("3 ip targets", LONG, &case.dump(), async || {
        targets(&case.elb, &tg).await.is_ok_and(|t| {
            t.iter()
                .map(|(id, _, _)| id.clone())
                .collect::<BTreeSet<_>>()
                == want
        })
    })
    .await;
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// externalTrafficPolicy Local: the target group checks HTTP /healthz on the
/// healthCheckNodePort; nodes without a pod turn unhealthy, the pod's node is healthy
/// (the latter needs the node agent answering the health check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etp_local_targets_are_unhealthy_on_nodes_without_pods() {
    let _nodes = NODES.read().await;
    let case = Case::new("ctl-etp", serde_json::json!({"scheme": "internet-facing"})).await;
    case.deploy(
        "nginx",
        "nginx:latest",
        1,
        serde_json::json!([{"containerPort": 80}]),
    );
    let pods = case.running_pods("nginx", 1).await;
    let pod_node = pods[0]
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("node");
    let mut spec = nginx_service_spec();
    spec["externalTrafficPolicy"] = "Local".into();
    case.create_service("web", serde_json::json!({}), spec)
        .await;
    let svc = case.wait_ready("web").await;
    let hc_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.health_check_node_port)
        .expect("healthCheckNodePort");
    let view = case.one_lb(&uid(&svc), 1).await;
    let tg = view.target_groups.keys().next().expect("tg").clone();
    let described = case
        .elb
        .describe_target_groups()
        .target_group_arns(&tg)
        .send()
        .await
        .expect("DescribeTargetGroups");
    let g = &described.target_groups()[0];
    assert_eq!(g.health_check_protocol().map(|p| p.as_str()), Some("HTTP"));
    assert_eq!(g.health_check_port(), Some(hc_port.to_string().as_str()));
    assert_eq!(g.health_check_path(), Some("/healthz"));
    let pod_instance = case
        .env
        .info
        .nodes
        .iter()
        .find(|n| n.plan.name == pod_node)
        .map(|n| n.instance_id.clone())
        .expect("pod node instance");
    let last = RefCell::new(BTreeSet::new());
    let res = wait_for(
        "nodes without pods unhealthy, the pod's node healthy",
        LONG,
        || async {
            let Ok(t) = targets(&case.elb, &tg).await else {
                return false;
            };
            *last.borrow_mut() = t.clone();
            t.len() == 3
                && t.iter().all(|(id, _, state)| {
                    if *id == pod_instance {
                        state == "healthy"
                    } else {
                        state == "unhealthy"
                    }
                })
        },
    )
    .await;
    if let Err(e) = res {
        panic!(
            "{e}: targets {:?} (pod on {pod_instance}; the healthy side needs berth-nodeproxy)",
            last.borrow()
        );
    }
}

/// A Service with a TCP port and a UDP port (ip targets, so no node agent is needed): two
/// listeners and two target groups; TCP and UDP both reach the pod through the NLB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_ports_get_one_listener_each_and_carry_traffic() {
    let case = Case::new(
        "ctl-udp",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.deploy(
        "echo",
        "berth/podserver",
        1,
        serde_json::json!([
            {"containerPort": 8080, "protocol": "TCP"},
            {"containerPort": 5353, "protocol": "UDP"},
            {"containerPort": 5353, "protocol": "TCP"}
        ]),
    );
    let pods = case.running_pods("echo", 1).await;
    let pod_name = pods[0].metadata.name.clone().expect("pod name");
    case.create_service(
        "echo",
        serde_json::json!({}),
        serde_json::json!({
            "selector": {"app": "echo"},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}
            ]
        }),
    )
    .await;
    let svc = case.wait_ready("echo").await;
    let view = case.one_lb(&uid(&svc), 2).await;
    let lb = view.load_balancers[0].0.clone();
    let listeners = case.listeners(&lb).await;
    assert_eq!(
        listeners
            .iter()
            .map(|(p, proto, _)| (*p, proto.clone()))
            .collect::<Vec<_>>(),
        vec![(53, "UDP".to_string()), (80, "TCP".to_string())]
    );
    assert_ne!(listeners[0].2, listeners[1].2, "one target group per port");
    let body = get_through_listener(&case, &lb, 80, &pod_name).await;
    assert!(body.contains(&pod_name));
    let last = RefCell::new(String::new());
    let res = wait_for("a UDP answer through the NLB listener", LONG, || async {
        let Some(addr) = listener_address(&case.env.info, &lb, 53).await else {
            return false;
        };
        match udp_in(
            &case.env.info.client_netns,
            &addr,
            "ping",
            Duration::from_secs(3),
        ) {
            Ok(answer) => {
                *last.borrow_mut() = answer.clone();
                answer.contains(&format!("{pod_name} ping"))
            }
            Err(e) => {
                *last.borrow_mut() = e.to_string();
                false
            }
        }
    })
    .await;
    if let Err(e) = res {
        panic!("{e}: {}", last.borrow());
    }
}

/// Changing annotations updates the same load balancer and target group in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_changes_update_resources_in_place() {
    let case = Case::new(
        "ctl-annot",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.create_service("web", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("web").await;
    let before = case.one_lb(&uid(&svc), 1).await;
    let patch = serde_json::json!({"metadata": {"annotations": {
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "5",
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold": "2",
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes": "deregistration_delay.timeout_seconds=15",
        "service.beta.kubernetes.io/aws-load-balancer-attributes": "load_balancing.cross_zone.enabled=true",
        "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags": "team=edge,env=e2e"
    }}});
    case.services()
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch annotations");
    let tg = before.target_groups.keys().next().expect("tg").clone();
    let lb = before.load_balancers[0].0.clone();
    let res = wait_for(
        "health check, attributes and tags updated",
        LONG,
        || async {
            let Ok(g) = case
                .elb
                .describe_target_groups()
                .target_group_arns(&tg)
                .send()
                .await
            else {
                return false;
            };
            let Some(g) = g.target_groups().first() else {
                return false;
            };
            let Ok(a) = case
                .elb
                .describe_target_group_attributes()
                .target_group_arn(&tg)
                .send()
                .await
            else {
                return false;
            };
            let Ok(la) = case
                .elb
                .describe_load_balancer_attributes()
                .load_balancer_arn(&lb)
                .send()
                .await
            else {
                return false;
            };
            let tags = berth_e2e::controller::tags_of(&case.elb, std::slice::from_ref(&lb)).await;
            g.health_check_interval_seconds() == Some(5)
                && g.healthy_threshold_count() == Some(2)
                && a.attributes().iter().any(|x| {
                    x.key() == Some("deregistration_delay.timeout_seconds")
                        && x.value() == Some("15")
                })
                && la.attributes().iter().any(|x| {
                    x.key() == Some("load_balancing.cross_zone.enabled")
                        && x.value() == Some("true")
                })
                && tags
                    .get(&lb)
                    .is_some_and(|t| t.get("team").map(String::as_str) == Some("edge"))
        },
    )
    .await;
    if let Err(e) = res {
        panic!("{e}\n{}", case.logs());
    }
    let after = case.one_lb(&uid(&svc), 1).await;
    assert_eq!(
        after.load_balancers[0].0, before.load_balancers[0].0,
        "same load balancer"
    );
    assert_eq!(
        after.target_groups, before.target_groups,
        "same target group"
    );
}

/// A node added joins every instance target group; labelling it
/// `node.kubernetes.io/exclude-from-external-load-balancers` takes it out; deleting it too.
/// The load balancer itself is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_follow_nodes_added_excluded_and_removed() {
    let _nodes = NODES.write().await;
    let case = Case::new(
        "ctl-nodes",
        serde_json::json!({"scheme": "internet-facing"}),
    )
    .await;
    case.create_service("web", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("web").await;
    let view = case.one_lb(&uid(&svc), 1).await;
    let tg = view.target_groups.keys().next().expect("tg").clone();
    let np = node_port(&svc, 80);

    // A fourth instance and its Node (no kubelet: only the API object matters here).
    let run = case
        .ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .min_count(1)
        .max_count(1)
        .subnet_id(&case.env.info.aws.subnet_ids[0])
        .send()
        .await
        .expect("RunInstances");
    let instance = run.instances()[0]
        .instance_id()
        .expect("instance id")
        .to_string();
    let node_name = format!("berth-extra-{}", &case.ns.name);
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node_name},
        "spec": {"providerID": format!("aws:///us-east-1a/{instance}")}
    }))
    .expect("node");
    let nodes: Api<Node> = Api::all(case.env.client.clone());
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let ids = |extra: bool| -> BTreeSet<String> {
        let mut s = case.instance_ids();
        if extra {
            s.insert(instance.clone());
        }
        s
    };
    async fn wait_targets(
        elb: &elb::Client,
        tg: &str,
        np: i32,
        want: BTreeSet<String>,
        what: &str,
    ) {
        let res = wait_for(what, LONG, || async {
            targets(elb, tg).await.is_ok_and(|t| {
                t.iter()
                    .filter(|(_, p, s)| s != "draining" && *p == np)
                    .map(|(id, _, _)| id.clone())
                    .collect::<BTreeSet<_>>()
                    == want
            })
        })
        .await;
        if let Err(e) = res {
            panic!("{e}: {:?}", targets(elb, tg).await);
        }
    }
    wait_targets(
        &case.elb,
        &tg,
        np,
        ids(true),
        "the added node's instance registered",
    )
    .await;
    let label = serde_json::json!({"metadata": {"labels": {"node.kubernetes.io/exclude-from-external-load-balancers": "true"}}});
    nodes
        .patch(&node_name, &PatchParams::default(), &Patch::Merge(label))
        .await
        .expect("label node");
    wait_targets(
        &case.elb,
        &tg,
        np,
        ids(false),
        "the excluded node deregistered",
    )
    .await;
    let unlabel = serde_json::json!({"metadata": {"labels": {"node.kubernetes.io/exclude-from-external-load-balancers": null}}});
    nodes
        .patch(&node_name, &PatchParams::default(), &Patch::Merge(unlabel))
        .await
        .expect("unlabel node");
    wait_targets(&case.elb, &tg, np, ids(true), "the node registered again").await;
    nodes
        .delete(&node_name, &DeleteParams::default())
        .await
        .expect("delete node");
    wait_targets(
        &case.elb,
        &tg,
        np,
        ids(false),
        "the deleted node deregistered",
    )
    .await;
    let after = case.one_lb(&uid(&svc), 1).await;
    assert_eq!(
        after.load_balancers, view.load_balancers,
        "the load balancer was not rebuilt"
    );
    let _ = case
        .ec2
        .terminate_instances()
        .instance_ids(&instance)
        .send()
        .await;
}

/// Deleting the Service removes its NLB and target groups, then the finalizer; changing a
/// Service's type away from LoadBalancer does the same and clears its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_type_change_leave_nothing_in_localstack() {
    let case = Case::new(
        "ctl-delete",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.create_service("gone", serde_json::json!({}), nginx_service_spec())
        .await;
    case.create_service("retyped", serde_json::json!({}), nginx_service_spec())
        .await;
    let gone = case.wait_ready("gone").await;
    let retyped = case.wait_ready("retyped").await;
    case.one_lb(&uid(&gone), 1).await;
    case.one_lb(&uid(&retyped), 1).await;

    case.services()
        .delete("gone", &DeleteParams::default())
        .await
        .expect("delete");
    wait_true(
        "the Service gone (finalizer removed)",
        LONG,
        &case.dump(),
        async || {
            case.services()
                .get_opt("gone")
                .await
                .is_ok_and(|s| s.is_none())
        },
    )
    .await;
    let view = aws_view(&case.elb, &uid(&gone)).await.expect("view");
    assert!(
        view.load_balancers.is_empty() && view.target_groups.is_empty(),
        "{view:?}"
    );

    let patch = serde_json::json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}});
    case.services()
        .patch("retyped", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("retype");
    wait_true(
        "retyped Service cleaned up",
        LONG,
        &case.dump(),
        async || {
            case.services().get("retyped").await.is_ok_and(|s| {
                s.metadata.finalizers.clone().unwrap_or_default().is_empty()
                    && lb_condition(&s).is_none()
                    && lb_hostname(&s).is_none()
            })
        },
    )
    .await;
    let view = aws_view(&case.elb, &uid(&retyped)).await.expect("view");
    assert!(
        view.load_balancers.is_empty() && view.target_groups.is_empty(),
        "{view:?}"
    );
}

/// `deletion_protection.enabled=true` keeps the NLB (and the Service, by its finalizer)
/// with a DeletionProtected condition until the annotation allows deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_protection_blocks_deletion_until_lifted() {
    let case = Case::new(
        "ctl-protect",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let ann = serde_json::json!({"service.beta.kubernetes.io/aws-load-balancer-attributes": "deletion_protection.enabled=true"});
    case.create_service("web", ann, nginx_service_spec()).await;
    let svc = case.wait_ready("web").await;
    case.one_lb(&uid(&svc), 1).await;
    case.services()
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    let (status, _, message) = case.wait_condition("web", "DeletionProtected").await;
    assert_eq!(status, "False");
    assert!(message.contains("deletion protection"), "{message}");
    case.one_lb(&uid(&svc), 1).await;
    let lift = serde_json::json!({"metadata": {"annotations": {"service.beta.kubernetes.io/aws-load-balancer-attributes": "deletion_protection.enabled=false"}}});
    case.services()
        .patch("web", &PatchParams::default(), &Patch::Merge(lift))
        .await
        .expect("lift");
    wait_true(
        "the Service and its NLB gone",
        LONG,
        &case.dump(),
        async || {
            case.services()
                .get_opt("web")
                .await
                .is_ok_and(|s| s.is_none())
        },
    )
    .await;
    let view = aws_view(&case.elb, &uid(&svc)).await.expect("view");
    assert!(
        view.load_balancers.is_empty() && view.target_groups.is_empty(),
        "{view:?}"
    );
}

/// A controller killed while provisioning, then started again: exactly one NLB, complete,
/// and no leftover target groups; a target group orphaned by a Service that no longer
/// exists is swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_provisioning_leaves_one_lb_and_no_leftovers() {
    let mut case = Case::new(
        "ctl-crash",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    // An orphan: a target group tagged for this cluster (its identity: the controllers
    // here use the default, the kube-system Namespace UID) and a Service UID that is gone.
    let cluster_id = case.env.kubectl(&[
        "get",
        "namespace",
        "kube-system",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let orphan = case
        .elb
        .create_target_group()
        .name(format!(
            "orphan-{}",
            &case.ns.name[case.ns.name.len() - 8..]
        ))
        .protocol(elb::types::ProtocolEnum::Tcp)
        .port(80)
        .vpc_id(&case.env.info.aws.vpc_id)
        .target_type(elb::types::TargetTypeEnum::Ip)
        .tags(
            elb::types::Tag::builder()
                .key("berth.dev/cluster")
                .value(&case.env.info.cluster_name)
                .build(),
        )
        .tags(
            elb::types::Tag::builder()
                .key("berth.dev/cluster-id")
                .value(&cluster_id)
                .build(),
        )
        .tags(
            elb::types::Tag::builder()
                .key("berth.dev/service-uid")
                .value("00000000-gone")
                .build(),
        )
        .tags(
            elb::types::Tag::builder()
                .key("berth.dev/service")
                .value(format!("{}/gone", case.ns.name))
                .build(),
        )
        .send()
        .await
        .expect("CreateTargetGroup")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_string();

    let svc = case
        .create_service(
            "web",
            serde_json::json!({}),
            serde_json::json!({
                "selector": {"app": "web"},
                "ports": [
                    {"name": "a", "protocol": "TCP", "port": 80},
                    {"name": "b", "protocol": "TCP", "port": 81},
                    {"name": "c", "protocol": "TCP", "port": 82}
                ]
            }),
        )
        .await;
    let id = uid(&svc);
    // Kill as soon as the load balancer exists: listeners and target groups are not done.
    wait_true(
        "the load balancer being created",
        LONG,
        &case.dump(),
        async || {
            aws_view(&case.elb, &id)
                .await
                .is_ok_and(|v| !v.load_balancers.is_empty())
        },
    )
    .await;
    case.controllers[0].kill();
    let partial = aws_view(&case.elb, &id).await.expect("view");
    let name = format!("{}-again", case.ns.name);
    case.start_controller(&name);
    let svc = case.wait_ready("web").await;
    let view = case.one_lb(&id, 3).await;
    assert_eq!(
        view.load_balancers[0].0, partial.load_balancers[0].0,
        "the first NLB was adopted"
    );
    let listeners = case.listeners(&view.load_balancers[0].0).await;
    assert_eq!(listeners.len(), 3);
    let attached: BTreeSet<String> = listeners.iter().map(|l| l.2.clone()).collect();
    assert_eq!(
        attached,
        view.target_groups.keys().cloned().collect::<BTreeSet<_>>(),
        "no unattached target groups"
    );
    assert_eq!(lb_hostname(&svc), Some(view.load_balancers[0].2.clone()));
    wait_true(
        "the orphaned target group swept",
        LONG,
        &case.dump(),
        async || {
            case.elb
                .describe_target_groups()
                .target_group_arns(&orphan)
                .send()
                .await
                .is_err()
        },
    )
    .await;
}

/// Two replicas: one leads; killing it lets the other take the lease and provision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_other_replica_continues() {
    let mut case = Case::with_replicas(
        "ctl-leader",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
        2,
    )
    .await;
    case.create_service("first", serde_json::json!({}), nginx_service_spec())
        .await;
    case.wait_ready("first").await;
    let mut leaders = Vec::new();
    for (i, c) in case.controllers.iter().enumerate() {
        if c.is_leader().await {
            leaders.push(i);
        }
    }
    assert_eq!(leaders.len(), 1, "exactly one leader\n{}", case.logs());
    let leader = leaders[0];
    let other = 1 - leader;
    let follower_metrics = case.controllers[other].metrics().await.expect("metrics");
    assert_eq!(
        metric_sum(&follower_metrics, "berth_aws_calls_total", &[]),
        0.0,
        "the follower called AWS"
    );
    case.controllers[leader].kill();
    case.create_service("second", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("second").await;
    case.one_lb(&uid(&svc), 1).await;
    assert!(case.controllers[other].is_leader().await);
}

/// The NLB deleted behind the controller's back (as when LocalStack loses its state) is
/// recreated by the periodic resync, and the status follows the new DNS name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_lost_in_aws_is_recreated() {
    let case = Case::new(
        "ctl-drift",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.create_service("web", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("web").await;
    let view = case.one_lb(&uid(&svc), 1).await;
    let (arn, ..) = view.load_balancers[0].clone();
    case.elb
        .delete_load_balancer()
        .load_balancer_arn(&arn)
        .send()
        .await
        .expect("DeleteLoadBalancer");
    let res = wait_for("a new load balancer", LONG, || async {
        aws_view(&case.elb, &uid(&svc))
            .await
            .is_ok_and(|v| v.load_balancers.len() == 1 && v.load_balancers[0].0 != arn)
    })
    .await;
    if let Err(e) = res {
        panic!("{e}\n{}", case.logs());
    }
    let view = case.one_lb(&uid(&svc), 1).await;
    assert_eq!(case.listeners(&view.load_balancers[0].0).await.len(), 1);
}

/// Malformed annotations: a False condition and a Warning Event naming the problem; the
/// other Service of the same class is provisioned as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_annotations_give_condition_and_event_and_spare_others() {
    let case = Case::new(
        "ctl-bad",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let bad = serde_json::json!({
        "service.beta.kubernetes.io/aws-load-balancer-scheme": "public",
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "often"
    });
    case.create_service("bad", bad, nginx_service_spec()).await;
    case.create_service("good", serde_json::json!({}), nginx_service_spec())
        .await;
    let (status, _, message) = case.wait_condition("bad", "InvalidAnnotation").await;
    assert_eq!(status, "False");
    assert!(
        message.contains("public") && message.contains("often"),
        "{message}"
    );
    wait_for("a Warning event for the bad Service", LONG, || async {
        case.events("bad")
            .await
            .iter()
            .any(|(t, r, m)| t == "Warning" && r == "InvalidAnnotation" && m.contains("public"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", futures_block(case.events("bad"))));
    let good = case.wait_ready("good").await;
    case.one_lb(&uid(&good), 1).await;
    let bad_svc = case.services().get("bad").await.expect("get");
    let view = aws_view(&case.elb, &uid(&bad_svc)).await.expect("view");
    assert!(
        view.load_balancers.is_empty(),
        "nothing was created for the bad Service"
    );

    // Fixing the annotation provisions it.
    let fix = serde_json::json!({"metadata": {"annotations": {
        "service.beta.kubernetes.io/aws-load-balancer-scheme": "internal",
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "10"
    }}});
    case.services()
        .patch("bad", &PatchParams::default(), &Patch::Merge(fix))
        .await
        .expect("fix");
    let fixed = case.wait_ready("bad").await;
    let view = case.one_lb(&uid(&fixed), 1).await;
    assert_eq!(view.load_balancers[0].3, "internal");
}

/// `allocateLoadBalancerNodePorts: false` with instance targets: berth allocates the
/// NodePort itself and registers the nodes on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_are_allocated_when_the_apiserver_did_not() {
    let _nodes = NODES.read().await;
    let case = Case::new("ctl-np", serde_json::json!({"scheme": "internet-facing"})).await;
    let mut spec = nginx_service_spec();
    spec["allocateLoadBalancerNodePorts"] = false.into();
    let created = case
        .create_service("web", serde_json::json!({}), spec)
        .await;
    assert!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .is_some_and(|p| p[0].node_port.is_none()),
        "the apiserver allocated a NodePort itself"
    );
    let svc = case.wait_ready("web").await;
    let np = node_port(&svc, 80);
    assert!((30000..=32767).contains(&np));
    let view = case.one_lb(&uid(&svc), 1).await;
    let tg = view.target_groups.keys().next().expect("tg").clone();
    let registered: BTreeSet<i32> = targets(&case.elb, &tg)
        .await
        .expect("targets")
        .into_iter()
        .map(|t| t.1)
        .collect();
    assert_eq!(registered, BTreeSet::from([np]));
}

/// In steady state the controller makes no mutating AWS call (resync every 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_makes_no_mutating_aws_calls() {
    let case = Case::new(
        "ctl-steady",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.create_service("web", serde_json::json!({}), nginx_service_spec())
        .await;
    let svc = case.wait_ready("web").await;
    case.one_lb(&uid(&svc), 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = case.controllers[0].metrics().await.expect("metrics");
    // Two resync periods.
    tokio::time::sleep(Duration::from_secs(22)).await;
    let after = case.controllers[0].metrics().await.expect("metrics");
    let mutating = |m: &str| metric_sum(m, "berth_aws_calls_total", &[("mutating", "true")]);
    let all = |m: &str| metric_sum(m, "berth_aws_calls_total", &[]);
    assert!(all(&after) > all(&before), "the resync looked at AWS");
    assert_eq!(
        mutating(&after),
        mutating(&before),
        "mutating calls in steady state"
    );
}

/// One port number with TCP and UDP (ip targets): ONE listener and ONE target group, both
/// TCP_UDP, and through that single listener a TCP request and a UDP datagram each reach
/// the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_on_one_port_share_a_tcp_udp_listener() {
    let case = Case::new(
        "ctl-tcpudp",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.deploy(
        "dns",
        "berth/podserver",
        1,
        serde_json::json!([
            {"containerPort": 5353, "protocol": "TCP"},
            {"containerPort": 5353, "protocol": "UDP"}
        ]),
    );
    let pods = case.running_pods("dns", 1).await;
    let pod_name = pods[0].metadata.name.clone().expect("pod name");
    case.create_service(
        "dns",
        serde_json::json!({}),
        serde_json::json!({
            "selector": {"app": "dns"},
            "ports": [
                {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 5353},
                {"name": "dns-udp", "protocol": "UDP", "port": 53, "targetPort": 5353}
            ]
        }),
    )
    .await;
    let svc = case.wait_ready("dns").await;
    let view = case.one_lb(&uid(&svc), 1).await;
    let lb = view.load_balancers[0].0.clone();
    let tg = view.target_groups.keys().next().expect("tg").clone();
    assert_eq!(
        case.listeners(&lb).await,
        vec![(53, "TCP_UDP".to_string(), tg.clone())]
    );
    let described = case
        .elb
        .describe_target_groups()
        .target_group_arns(&tg)
        .send()
        .await
        .expect("DescribeTargetGroups");
    assert_eq!(
        described.target_groups()[0].protocol().map(|p| p.as_str()),
        Some("TCP_UDP")
    );
    let body = get_through_listener(&case, &lb, 53, &pod_name).await;
    assert!(body.contains(&pod_name));
    let last = RefCell::new(String::new());
    let res = wait_for(
        "a UDP answer through the TCP_UDP listener",
        LONG,
        || async {
            let Some(addr) = listener_address(&case.env.info, &lb, 53).await else {
                return false;
            };
            match udp_in(
                &case.env.info.client_netns,
                &addr,
                "ping",
                Duration::from_secs(3),
            ) {
                Ok(answer) => {
                    *last.borrow_mut() = answer.clone();
                    answer.contains(&format!("{pod_name} ping"))
                }
                Err(e) => {
                    *last.borrow_mut() = e.to_string();
                    false
                }
            }
        },
    )
    .await;
    if let Err(e) = res {
        panic!("{e}: {}", last.borrow());
    }
}

/// A listener as DescribeListeners shows it: (port, protocol, certificate, SslPolicy, arn).
type TlsListener = (i32, String, Option<String>, Option<String>, String);

async fn tls_view(case: &Case, lb: &str) -> Vec<TlsListener> {
    let out = case
        .elb
        .describe_listeners()
        .load_balancer_arn(lb)
        .send()
        .await
        .expect("DescribeListeners");
    let mut v: Vec<_> = out
        .listeners()
        .iter()
        .map(|l| {
            (
                l.port().unwrap_or_default(),
                l.protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                l.certificates()
                    .first()
                    .and_then(|c| c.certificate_arn().map(str::to_string)),
                l.ssl_policy().map(str::to_string),
                l.listener_arn().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// An HTTPS request through the listener serving `port`, verifying the certificate
/// against `ca` for `host`.
async fn https_through_listener(case: &Case, lb: &str, port: i32, ca: &str, host: &str) -> String {
    let last = RefCell::new(String::new());
    let res = wait_for("an HTTPS answer through the TLS listener", LONG, || async {
        let Some(addr) = listener_address(&case.env.info, lb, port).await else {
            *last.borrow_mut() = "listener not served".into();
            return false;
        };
        let (ip, lport) = addr.rsplit_once(':').expect("host:port");
        let resolve = format!("{host}:{lport}:{ip}");
        let url = format!("https://{host}:{lport}/");
        match exec_in(
            &case.env.info.client_netns,
            &[
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "3",
                "--noproxy",
                "*",
                "--cacert",
                ca,
                "--resolve",
                &resolve,
                &url,
            ],
        ) {
            Ok(out) if out.status.success() => {
                *last.borrow_mut() = String::from_utf8_lossy(&out.stdout).into_owned();
                true
            }
            Ok(out) => {
                *last.borrow_mut() = String::from_utf8_lossy(&out.stderr).into_owned();
                false
            }
            Err(e) => {
                *last.borrow_mut() = e.to_string();
                false
            }
        }
    })
    .await;
    if let Err(e) = res {
        panic!("{e}: {}", last.borrow());
    }
    last.into_inner()
}

/// `ssl-cert` (an IAM server certificate uploaded here), `ssl-ports` and
/// `ssl-negotiation-policy`: the named port's listener is TLS with that certificate and
/// policy, the other stays TCP without either; the TLS listener presents the certificate
/// (curl verifies it) and relays to the pod. Changing `ssl-ports` switches both listeners
/// in place (same listener ARNs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_annotations_make_tls_listeners_and_ssl_ports_changes_apply_in_place() {
    let case = Case::new(
        "ctl-tls",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let host = "web.berth.test";
    let dir = std::env::temp_dir().join(format!("berth-e2e-{}-tls", case.ns.name));
    std::fs::create_dir_all(&dir).expect("tls dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    berth_e2e::proc::run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={host}"),
            "-addext",
            &format!("subjectAltName=DNS:{host}"),
            "-keyout",
            key.to_str().expect("path"),
            "-out",
            cert.to_str().expect("path"),
        ],
    )
    .expect("openssl req");
    let iam = aws_sdk_iam::Client::new(&case.env.aws().await);
    let uploaded = iam
        .upload_server_certificate()
        .server_certificate_name(&case.ns.name)
        .certificate_body(std::fs::read_to_string(&cert).expect("cert"))
        .private_key(std::fs::read_to_string(&key).expect("key"))
        .send()
        .await
        .expect("UploadServerCertificate");
    let cert_arn = uploaded
        .server_certificate_metadata()
        .map(|m| m.arn().to_string())
        .expect("certificate ARN");

    case.deploy(
        "web",
        "berth/podserver",
        1,
        serde_json::json!([{"containerPort": 8080}]),
    );
    let pods = case.running_pods("web", 1).await;
    let pod_name = pods[0].metadata.name.clone().expect("pod name");
    let policy = "ELBSecurityPolicy-TLS13-1-2-2021-06";
    case.create_service(
        "web",
        serde_json::json!({
            "service.beta.kubernetes.io/aws-load-balancer-ssl-cert": cert_arn,
            "service.beta.kubernetes.io/aws-load-balancer-ssl-ports": "https",
            "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy": policy,
        }),
        serde_json::json!({
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8080}
            ]
        }),
    )
    .await;
    let svc = case.wait_ready("web").await;
    let view = case.one_lb(&uid(&svc), 2).await;
    let lb = view.load_balancers[0].0.clone();
    let before = tls_view(&case, &lb).await;
    let shape = |v: &[TlsListener]| {
        v.iter()
            .map(|(p, proto, c, s, _)| (*p, proto.clone(), c.clone(), s.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        shape(&before),
        vec![
            (80, "TCP".to_string(), None, None),
            (
                443,
                "TLS".to_string(),
                Some(cert_arn.clone()),
                Some(policy.to_string())
            ),
        ]
    );
    let ca = cert.to_str().expect("path");
    let body = https_through_listener(&case, &lb, 443, ca, host).await;
    assert!(body.contains(&pod_name), "{body}");

    // TLS moves to port 80 (by number); the default policy applies without the annotation.
    let patch = serde_json::json!({"metadata": {"annotations": {
        "service.beta.kubernetes.io/aws-load-balancer-ssl-ports": "80",
        "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy": null
    }}});
    case.services()
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch ssl-ports");
    let want = vec![
        (
            80,
            "TLS".to_string(),
            Some(cert_arn.clone()),
            Some("ELBSecurityPolicy-2016-08".to_string()),
        ),
        (443, "TCP".to_string(), None, None),
    ];
    let last = RefCell::new(Vec::new());
    let res = wait_for("TLS on port 80, TCP on 443", LONG, || async {
        let v = tls_view(&case, &lb).await;
        let ok = shape(&v) == want;
        *last.borrow_mut() = v;
        ok
    })
    .await;
    if let Err(e) = res {
        panic!("{e}: {:?}\n{}", last.borrow(), case.logs());
    }
    let arns = |v: &[TlsListener]| v.iter().map(|l| l.4.clone()).collect::<Vec<_>>();
    assert_eq!(
        arns(&last.borrow()),
        arns(&before),
        "listeners modified in place"
    );
    let body = https_through_listener(&case, &lb, 80, ca, host).await;
    assert!(body.contains(&pod_name), "{body}");
    let body = get_through_listener(&case, &lb, 443, &pod_name).await;
    assert!(body.contains(&pod_name));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = iam
        .delete_server_certificate()
        .server_certificate_name(&case.ns.name)
        .send()
        .await;
}

/// A port removed from a live Service takes its listener and target group with it, and a
/// target group tagged for the Service that its desired state does not name (as a
/// controller that crashed mid-change leaves) is deleted too; the Service's load balancer,
/// remaining listener and target group stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_and_removed_target_groups_of_a_live_service_are_deleted() {
    let case = Case::new(
        "ctl-stray",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let svc = case
        .create_service(
            "web",
            serde_json::json!({}),
            serde_json::json!({
                "selector": {"app": "web"},
                "ports": [
                    {"name": "a", "protocol": "TCP", "port": 80},
                    {"name": "b", "protocol": "TCP", "port": 81}
                ]
            }),
        )
        .await;
    let id = uid(&svc);
    case.wait_ready("web").await;
    let before = case.one_lb(&id, 2).await;
    let lb = before.load_balancers[0].0.clone();
    let listeners = case.listeners(&lb).await;
    assert_eq!(listeners.len(), 2);
    let kept_tg = listeners[0].2.clone();
    let tag = |k: &str, v: &str| elb::types::Tag::builder().key(k).value(v).build();
    // Tagged as this controller tags (its identity is the kube-system Namespace UID), so
    // no sweep of another case's controller migrates it meanwhile.
    let cluster_id = case.env.kubectl(&[
        "get",
        "namespace",
        "kube-system",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let stray = case
        .elb
        .create_target_group()
        .name(format!("stray-{}", &case.ns.name[case.ns.name.len() - 8..]))
        .protocol(elb::types::ProtocolEnum::Tcp)
        .port(8080)
        .vpc_id(&case.env.info.aws.vpc_id)
        .target_type(elb::types::TargetTypeEnum::Ip)
        .tags(tag("berth.dev/cluster", &case.env.info.cluster_name))
        .tags(tag("berth.dev/cluster-id", &cluster_id))
        .tags(tag("berth.dev/service-uid", &id))
        .tags(tag("berth.dev/service", &format!("{}/web", case.ns.name)))
        .tags(tag("berth.dev/resource", "targetgroup/8080/TCP"))
        .send()
        .await
        .expect("CreateTargetGroup")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_string();
    let patch =
        serde_json::json!({"spec": {"ports": [{"name": "a", "protocol": "TCP", "port": 80}]}});
    case.services()
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("remove port 81");
    let view = case.one_lb(&id, 1).await;
    assert_eq!(view.load_balancers[0].0, lb, "same load balancer");
    assert_eq!(
        view.target_groups.keys().cloned().collect::<Vec<_>>(),
        vec![kept_tg.clone()],
        "the stray and the removed port's target groups are gone, port 80's stays"
    );
    assert!(!view.target_groups.contains_key(&stray));
    assert_eq!(
        case.listeners(&lb).await,
        vec![(80, "TCP".to_string(), kept_tg)]
    );
    let svc = case.services().get("web").await.expect("get");
    assert_eq!(lb_condition(&svc).map(|c| c.0), Some("True".to_string()));
}
