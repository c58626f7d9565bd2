//! Migrating in place from the AWS Load Balancer Controller (LBC). The test makes, with
//! LBC's names and tags, the NLB + target group + listener LBC would have made for a
//! `service.k8s.aws/nlb` Service (still carrying LBC's finalizer) and for a legacy
//! `aws-load-balancer-type: nlb-ip` Service, plus two it must never touch: one tagged for
//! another cluster and one for a Service berth does not serve. Without the class opt-in
//! berth touches nothing; with it, the Service that still has LBC's finalizer is blocked
//! (`AdoptionBlocked`, nothing changed) until the finalizer goes; then both NLBs are
//! adopted: same ARN and DNS name in the status, the pods registered, while a request loop
//! through the emulated NLB never fails. Deleting the Service deletes the adopted NLB.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, listener_address, tags_of,
    targets,
};
use berth_e2e::identity::{clean_up, fresh_id};
use berth_e2e::testing::{TestEnv, TestNamespace, curl_in, lb_condition, lb_hostname};
use berth_e2e::wait::{Diagnostics, wait_true, wait_until};
use elb::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
    TargetDescription, TargetTypeEnum,
};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

const LONG: Duration = Duration::from_secs(90);
const LBC_CLASS: &str = "service.k8s.aws/nlb";
const LBC_FINALIZER: &str = "service.k8s.aws/resources";
const ANN: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// An NLB, its target group and listener as LBC leaves them.
#[derive(Clone, Debug)]
struct LbcStack {
    lb_arn: String,
    dns_name: String,
    tg_arn: String,
}

struct Case {
    env: TestEnv,
    ns: TestNamespace,
    class: ClassGuard,
    elb: elb::Client,
    id: String,
    controller: Option<ControllerProc>,
    /// Everything the test made in LocalStack, deleted at the end.
    made: std::sync::Mutex<Vec<LbcStack>>,
}

impl Case {
    async fn new() -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace("migrate").await;
        let class = ClassGuard::create(&env, &ns.name, Self::aws(false));
        let elb = elb::Client::new(&env.aws().await);
        let id = fresh_id("e2e-migrate");
        let mut opts = ControllerOpts::new(&class.name, &ns.name);
        opts.extra_args = vec!["--cluster-id".into(), id.clone()];
        let controller = ControllerProc::spawn(&env.info, "migrate", &opts)
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        Self {
            env,
            ns,
            class,
            elb,
            id,
            controller: Some(controller),
            made: std::sync::Mutex::default(),
        }
    }

    fn aws(adopt: bool) -> serde_json::Value {
        let mut aws = serde_json::json!({"scheme": "internet-facing", "targetType": "ip"});
        if adopt {
            aws["adoptFrom"] = serde_json::json!(["aws-load-balancer-controller"]);
        }
        aws
    }

    fn dump(&self) -> Diagnostics {
        Diagnostics::new(&self.env)
            .controllers(self.controller.as_slice())
            .events(&self.ns.name, "web")
            .events(&self.ns.name, "legacy")
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    async fn create_service(
        &self,
        name: &str,
        class: Option<&str>,
        annotations: serde_json::Value,
        finalizers: &[&str],
    ) {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "annotations": annotations, "finalizers": finalizers},
            "spec": {
                "type": "LoadBalancer",
                "loadBalancerClass": class,
                "selector": {"app": "nginx"},
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]
            },
        }))
        .expect("service object");
        self.services()
            .create(&PostParams::default(), &svc)
            .await
            .unwrap_or_else(|e| panic!("create service {name}: {e}"));
    }

    fn deploy_nginx(&self) {
        let obj = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "nginx", "namespace": self.ns.name},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "nginx"}},
                "template": {
                    "metadata": {"labels": {"app": "nginx"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx:latest",
                                             "ports": [{"containerPort": 80}]}]}
                }
            }
        });
        let path = std::env::temp_dir().join(format!("berth-e2e-{}-nginx.json", self.ns.name));
        std::fs::write(&path, obj.to_string()).expect("write manifest");
        self.env
            .kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
    }

    /// The IPs of the two running nginx pods.
    async fn pod_ips(&self) -> BTreeSet<String> {
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.ns.name);
        let lp = ListParams::default().labels("app=nginx");
        wait_until("2 running nginx pods", LONG, &self.dump(), async || {
            let list = pods.list(&lp).await.map_err(|e| e.to_string())?;
            let ips: BTreeSet<String> = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .collect();
            Some(ips)
                .filter(|ips| ips.len() == 2)
                .ok_or_else(|| format!("{} running", list.items.len()))
        })
        .await
    }

    /// Makes what LBC makes for the Service `stack` (`namespace/name`) of cluster
    /// `cluster`: names `k8s-<ns>-<name>-<hash>`, its tags, one TCP listener on port 80 to
    /// an ip target group holding `targets` on port 80.
    async fn lbc_stack(&self, cluster: &str, stack: &str, targets: &BTreeSet<String>) -> LbcStack {
        let info = &self.env.info;
        let (ns, name) = stack.split_once('/').expect("namespace/name");
        let clean = |s: &str| -> String {
            s.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(8)
                .collect()
        };
        // LBC's names end in 10 hex digits of a hash; random ones do here.
        let hash = || format!("{:010x}", rand::random::<u64>() & 0xff_ffff_ffff);
        let lb_name = format!("k8s-{}-{}-{}", clean(ns), clean(name), hash());
        let tg_name = format!("k8s-{}-{}-{}", clean(ns), clean(name), hash());
        let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
        let common = [
            tag("elbv2.k8s.aws/cluster", cluster),
            tag("service.k8s.aws/stack", stack),
        ];
        let lb = self
            .elb
            .create_load_balancer()
            .name(&lb_name)
            .r#type(LoadBalancerTypeEnum::Network)
            .scheme(LoadBalancerSchemeEnum::InternetFacing)
            .set_subnets(Some(info.aws.subnet_ids.clone()))
            .set_tags(Some(common.to_vec()))
            .tags(tag("service.k8s.aws/resource", "LoadBalancer"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("create LBC-shaped NLB {lb_name}: {e:?}"));
        let lb = lb.load_balancers().first().expect("created NLB");
        let lb_arn = lb.load_balancer_arn().expect("arn").to_string();
        let dns_name = lb.dns_name().expect("dns name").to_string();
        let tg = self
            .elb
            .create_target_group()
            .name(&tg_name)
            .protocol(ProtocolEnum::Tcp)
            .port(80)
            .vpc_id(&info.aws.vpc_id)
            .target_type(TargetTypeEnum::Ip)
            .set_tags(Some(common.to_vec()))
            .tags(tag("service.k8s.aws/resource", &format!("{stack}:80")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("create LBC-shaped target group {tg_name}: {e:?}"));
        let tg_arn = tg
            .target_groups()
            .first()
            .and_then(|t| t.target_group_arn())
            .expect("created target group")
            .to_string();
        let made = LbcStack {
            lb_arn: lb_arn.clone(),
            dns_name,
            tg_arn: tg_arn.clone(),
        };
        self.made.lock().expect("made").push(made.clone());
        let forward = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(&tg_arn)
            .build();
        self.elb
            .create_listener()
            .load_balancer_arn(&lb_arn)
            .protocol(ProtocolEnum::Tcp)
            .port(80)
            .default_actions(forward)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create listener on {lb_name}: {e:?}"));
        let descriptions: Vec<TargetDescription> = targets
            .iter()
            .map(|ip| TargetDescription::builder().id(ip).port(80).build())
            .collect();
        self.elb
            .register_targets()
            .target_group_arn(&tg_arn)
            .set_targets(Some(descriptions))
            .send()
            .await
            .unwrap_or_else(|e| panic!("register targets of {tg_name}: {e:?}"));
        made
    }

    /// Tags and registered targets of the stacks, to compare before and after.
    async fn snapshot(&self, stacks: &[&LbcStack]) -> BTreeMap<String, String> {
        let arns: Vec<String> = stacks
            .iter()
            .flat_map(|s| [s.lb_arn.clone(), s.tg_arn.clone()])
            .collect();
        let mut out: BTreeMap<String, String> = tags_of(&self.elb, &arns)
            .await
            .into_iter()
            .map(|(arn, t)| (arn, format!("{t:?}")))
            .collect();
        for s in stacks {
            let t = targets(&self.elb, &s.tg_arn).await.expect("targets");
            let ids: BTreeSet<(String, i32)> = t.into_iter().map(|(id, p, _)| (id, p)).collect();
            out.insert(format!("{} targets", s.tg_arn), format!("{ids:?}"));
        }
        out
    }

    /// Waits until the Service is ready with `hostname` in its status.
    async fn ready_with(&self, name: &str, hostname: &str) -> Service {
        let api = self.services();
        wait_until(
            &format!("{name} ready on {hostname}"),
            LONG,
            &self.dump(),
            async || {
                let s = api.get(name).await.map_err(|e| e.to_string())?;
                let ready = lb_condition(&s).is_some_and(|(st, _, _)| st == "True");
                if ready && lb_hostname(&s).as_deref() == Some(hostname) {
                    Ok(s)
                } else {
                    Err(format!("status {:?}", s.status))
                }
            },
        )
        .await
    }
}

/// Requests through a listener from the client namespace until stopped: (served, failed).
struct RequestLoop {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RequestLoop {
    fn start(netns: String, url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, ok, bad, errs) = (stop.clone(), served.clone(), failed.clone(), errors.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match curl_in(&netns, &url, Duration::from_secs(3)) {
                    Ok(body) if body.contains("Welcome to nginx!") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        bad.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut e) = errs.lock() {
                            e.push(format!("{other:?}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            served,
            failed,
            errors,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        (
            self.served.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn lb_exists(elb: &elb::Client, arn: &str) -> bool {
    elb.describe_load_balancers()
        .load_balancer_arns(arn)
        .send()
        .await
        .is_ok_and(|r| !r.load_balancers().is_empty())
}

async fn body(case: &Case) {
    let ns = case.ns.name.clone();
    let cluster = case.env.info.cluster_name.clone();
    case.deploy_nginx();
    let ips = case.pod_ips().await;

    let lbc_annotations = serde_json::json!({
        format!("{ANN}nlb-target-type"): "ip",
        format!("{ANN}scheme"): "internet-facing",
    });
    case.create_service("web", Some(LBC_CLASS), lbc_annotations, &[LBC_FINALIZER])
        .await;
    case.create_service(
        "other",
        Some("example.com/other"),
        serde_json::json!({}),
        &[],
    )
    .await;
    let web = case.lbc_stack(&cluster, &format!("{ns}/web"), &ips).await;
    let legacy = case
        .lbc_stack(&cluster, &format!("{ns}/legacy"), &ips)
        .await;
    let other_cluster = case
        .lbc_stack("another-cluster", &format!("{ns}/web"), &ips)
        .await;
    let unserved = case.lbc_stack(&cluster, &format!("{ns}/other"), &ips).await;

    // The LBC-made NLB serves before berth knows it; the loop runs from here to the end.
    let dump = case.dump();
    let addr = wait_until("the LBC NLB's listener served", LONG, &dump, async || {
        let addr = listener_address(&case.env.info, &web.lb_arn, 80)
            .await
            .ok_or("not served yet")?;
        curl_in(
            &case.env.info.client_netns,
            &format!("http://{addr}/"),
            Duration::from_secs(3),
        )
        .map_err(|e| e.to_string())?;
        Ok(addr)
    })
    .await;
    let requests = RequestLoop::start(
        case.env.info.client_netns.clone(),
        format!("http://{addr}/"),
    );
    let all = [&web, &legacy, &other_cluster, &unserved];
    let before = case.snapshot(&all).await;

    // No opt-in: the class is accepted (the controller is working), the LBC Services and
    // their NLBs stay untouched through a resync.
    wait_true("the class accepted", LONG, &dump, async || {
        let out = case.env.kubectl_output(&[
            "get",
            "loadbalancerclass",
            &case.class.name,
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ]);
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "True")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let s = case.services().get("web").await.expect("get");
    assert!(
        !s.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f.starts_with("berth.dev")),
        "web was claimed without the opt-in: {:?}",
        s.metadata
    );
    assert_eq!(lb_condition(&s), None, "web got a berth condition");
    assert_eq!(
        case.snapshot(&all).await,
        before,
        "touched without the opt-in"
    );

    // Opt in: legacy is adopted; web still has LBC's finalizer and is blocked. (Without
    // a class, legacy is created only now: before the opt-in any default class of a
    // suite running alongside would take it.)
    case.class
        .set_spec(&case.env, serde_json::json!({"aws": Case::aws(true)}));
    let legacy_annotations = serde_json::json!({
        format!("{ANN}type"): "nlb-ip",
        format!("{ANN}scheme"): "internet-facing",
    });
    case.create_service("legacy", None, legacy_annotations, &[])
        .await;
    let blocked = wait_until("web AdoptionBlocked", LONG, &dump, async || {
        let s = case
            .services()
            .get("web")
            .await
            .map_err(|e| e.to_string())?;
        match lb_condition(&s) {
            Some((_, reason, message)) if reason == "AdoptionBlocked" => Ok(message),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(blocked.contains(LBC_FINALIZER), "{blocked}");
    let legacy_svc = case.ready_with("legacy", &legacy.dns_name).await;
    let snapshot = case.snapshot(&[&web]).await;
    let web_before: BTreeMap<String, String> = before
        .iter()
        .filter(|(k, _)| snapshot.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(snapshot, web_before, "web's NLB changed while blocked");

    // The user stopped LBC and removes its finalizer: berth adopts.
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    case.services()
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("remove LBC's finalizer");
    let web_svc = case.ready_with("web", &web.dns_name).await;
    for (svc, stack) in [(&web_svc, &web), (&legacy_svc, &legacy)] {
        let uid = svc.metadata.uid.clone().expect("uid");
        let view = aws_view(&case.elb, &uid).await.expect("view");
        let arns: Vec<&String> = view.load_balancers.iter().map(|l| &l.0).collect();
        assert_eq!(arns, vec![&stack.lb_arn], "the adopted NLB, and only it");
        let tgs: Vec<&String> = view.target_groups.keys().collect();
        assert_eq!(
            tgs,
            vec![&stack.tg_arn],
            "the adopted target group, and only it"
        );
        let want: BTreeSet<(String, i32)> = ips.iter().map(|ip| (ip.clone(), 80)).collect();
        wait_true("the pods registered and healthy", LONG, &dump, async || {
            targets(&case.elb, &stack.tg_arn).await.is_ok_and(|t| {
                t.iter()
                    .map(|(i, p, _)| (i.clone(), *p))
                    .collect::<BTreeSet<_>>()
                    == want
                    && t.iter().all(|(_, _, s)| s == "healthy")
            })
        })
        .await;
    }
    // A few more resyncs of the adopted Services under the request loop.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (served, failed, errors) = requests.finish();
    assert_eq!(failed, 0, "requests failed during adoption: {errors:?}");
    assert!(served >= 50, "only {served} requests served");
    println!("requests through the NLB during adoption: {served} served, {failed} failed");

    let foreign_before: BTreeMap<String, String> =
        case.snapshot(&[&other_cluster, &unserved]).await;
    let expected: BTreeMap<String, String> = before
        .iter()
        .filter(|(k, _)| foreign_before.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        foreign_before, expected,
        "another cluster's or Service's NLB changed"
    );

    // Deleting the Service deletes the adopted NLB and target group, nothing else.
    case.services()
        .delete("web", &Default::default())
        .await
        .expect("delete web");
    wait_true("web and its adopted NLB gone", LONG, &dump, async || {
        case.services()
            .get_opt("web")
            .await
            .is_ok_and(|s| s.is_none())
            && !lb_exists(&case.elb, &web.lb_arn).await
            && targets(&case.elb, &web.tg_arn).await.is_err()
    })
    .await;
    for s in [&legacy, &other_cluster, &unserved] {
        assert!(
            lb_exists(&case.elb, &s.lb_arn).await,
            "{} went too",
            s.lb_arn
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lbc_nlb_is_adopted_in_place_and_served_throughout() {
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
    let made = case.made.lock().map(|m| m.clone()).unwrap_or_default();
    for s in &made {
        let _ = case
            .elb
            .delete_load_balancer()
            .load_balancer_arn(&s.lb_arn)
            .send()
            .await;
    }
    let tgs: Vec<String> = made.iter().map(|s| s.tg_arn.clone()).collect();
    clean_up(&case.elb, &[case.id.as_str()], &tgs).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
