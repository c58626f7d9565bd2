//! Zero-downtime rollouts behind an `ip`-target NLB (issue #15, item 5): rolling updates
//! of a 3-replica Deployment (maxSurge 1, maxUnavailable 0, a preStop sleep), with
//! requests sent through the emulated NLB from the client namespace all along.
//!
//! In a namespace opted in to berth's readiness gate, the chart's MutatingAdmissionPolicy
//! gives each new pod the gate; the controller registers the pod while only the gate holds
//! it back and sets the gate True once LocalStack's health checks pass. Checked: no request
//! fails, no new pod's gate was True while LocalStack still reported its target
//! unregistered or `initial`, each gate's transition is not older than the last such
//! observation, the kubelet made each pod Ready only after its gate, and the Deployment
//! removed its old pods only as the gates turned True.
//!
//! Without the gate the Deployment outruns the health checks (the test kubelet makes a pod
//! Ready at once), so every old pod is terminating while its replacement is still
//! `initial`: the controller keeps a terminating endpoint that still serves registered
//! until its replacements are healthy, then deregisters it (it drains). Checked: no
//! request fails, and LocalStack was seen with an old pod terminating, its target still
//! healthy, while a new target was not healthy yet. Deregistering at once (the order
//! before) fails both: LocalStack sends no connection to a target still `initial`.
//! Needs root and the running local cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_crds::{CONDITION_TARGET_HEALTH, LABEL_READINESS_GATE_INJECT};
use berth_e2e::controller::{
    ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, listener_address, targets,
};
use berth_e2e::helm::{chart, helm};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, lb_condition};
use berth_e2e::wait::{Diagnostics, wait_true, wait_until};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::ListParams;

const LONG: Duration = Duration::from_secs(90);
const REPLICAS: usize = 3;

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The chart's readiness-gate policy, rendered for this case's namespace only and
/// applied; deleted on drop.
struct Policy {
    file: std::path::PathBuf,
    kubeconfig: String,
}

impl Policy {
    fn install(env: &TestEnv, ns: &str) -> Self {
        let selector = serde_json::json!({"matchLabels": {
            LABEL_READINESS_GATE_INJECT: "enabled",
            "kubernetes.io/metadata.name": ns,
        }});
        let out = helm(&[
            "template",
            &format!("rollout-{ns}"),
            &chart().display().to_string(),
            "--show-only",
            "templates/readiness-gate-policy.yaml",
            "--api-versions",
            "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy",
            "--set-json",
            &format!("podReadinessGate.namespaceSelector={selector}"),
        ]);
        assert!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = std::env::temp_dir().join(format!("berth-e2e-rollout-{ns}.yaml"));
        std::fs::write(&file, &out.stdout).expect("write policy");
        let policy = Self {
            file,
            kubeconfig: env.info.kubeconfig.display().to_string(),
        };
        env.kubectl(&["apply", "-f", &policy.file.display().to_string()]);
        policy
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new(berth_e2e::paths::bin("kubectl"))
            .args(["--kubeconfig", &self.kubeconfig, "delete", "--wait=false"])
            .args(["--ignore-not-found", "-f"])
            .arg(&self.file)
            .output();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

fn is_true(pod: &Pod, kind: &str) -> bool {
    condition(pod, kind).is_some_and(|c| c.status == "True")
}

/// A condition's lastTransitionTime in seconds since the epoch (whole seconds, as the API
/// stores it).
fn transition(pod: &Pod, kind: &str) -> Option<i64> {
    condition(pod, kind)?
        .last_transition_time
        .as_ref()
        .map(|t| t.0.as_second())
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// What the observer saw during the rollout.
#[derive(Default, Debug)]
struct Seen {
    /// Per target address: when LocalStack last reported it unregistered or `initial`
    /// while its pod existed.
    last_not_healthy: BTreeMap<String, f64>,
    /// Per target address: when LocalStack first reported it healthy.
    first_healthy: BTreeMap<String, f64>,
    /// Per pod name: when it was first seen terminating.
    terminating: BTreeMap<String, f64>,
    /// Gates seen True before LocalStack (asked right after) still called the target
    /// unregistered or `initial`.
    violations: Vec<String>,
    rounds: usize,
}

/// One observation: the pods (gates) first, then LocalStack's target health, so a gate
/// True followed by a target not healthy yet proves the gate was early.
async fn observe(
    pods: &Api<Pod>,
    elb: &elb::Client,
    tg: &str,
    old: &BTreeSet<String>,
    seen: &Mutex<Seen>,
) {
    let Ok(list) = pods.list(&ListParams::default().labels("app=web")).await else {
        return;
    };
    let t_pods = now_secs();
    let Ok(health) = targets(elb, tg).await else {
        return;
    };
    let t = now_secs();
    let states: BTreeMap<String, String> = health.into_iter().map(|(id, _, s)| (id, s)).collect();
    let mut seen = seen.lock().expect("seen");
    seen.rounds += 1;
    for pod in &list.items {
        let n = name(pod);
        if pod.metadata.deletion_timestamp.is_some() {
            seen.terminating.entry(n.clone()).or_insert(t_pods);
        }
        let Some(ip) = pod_ip(pod) else { continue };
        if old.contains(&n) {
            continue;
        }
        let state = states
            .get(&ip)
            .map(String::as_str)
            .unwrap_or("unregistered");
        match state {
            "healthy" => {
                seen.first_healthy.entry(ip.clone()).or_insert(t);
            }
            "unregistered" | "initial" => {
                seen.last_not_healthy.insert(ip.clone(), t);
                if is_true(pod, CONDITION_TARGET_HEALTH) {
                    seen.violations.push(format!(
                        "{n} ({ip}): gate True at {t_pods:.3}, target {state} at {t:.3}"
                    ));
                }
            }
            _ => {}
        }
    }
}

/// One rolling update's setup: an `ip`-target class and a controller for it, the Service
/// `web` (deregistration delay 4 s) and the 3-replica Deployment `web` behind it, its
/// pods Ready and its targets healthy.
struct Web {
    _class: ClassGuard,
    controller: ControllerProc,
    dump: Diagnostics,
    pods: Api<Pod>,
    elb: elb::Client,
    tg: String,
    url: String,
    /// The pods before the update.
    old: BTreeSet<String>,
}

fn web_pods() -> ListParams {
    ListParams::default().labels("app=web")
}

impl Web {
    async fn start(env: &TestEnv, ns: &str, pre_stop: u32, gated: bool) -> Self {
        let class = ClassGuard::create(
            env,
            ns,
            serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
        );
        let controller = ControllerProc::spawn(
            &env.info,
            &format!("{ns}-0"),
            &ControllerOpts::new(&class.name, ns),
        )
        .unwrap_or_else(|e| panic!("start controller: {e}"));
        let dump = Diagnostics::new(env)
            .controllers(std::slice::from_ref(&controller))
            .events(ns, "web");
        let services: Api<Service> = Api::namespaced(env.client.clone(), ns);
        ServiceBuilder::load_balancer("web")
            .class(&class.lb_class())
            .app("web")
            .tcp(80, 8080)
            .annotations(&serde_json::json!({
                "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes":
                    "deregistration_delay.timeout_seconds=4",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold": "2",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-unhealthy-threshold": "2",
            }))
            .create_with(&services)
            .await;
        let deployment = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {
                "replicas": REPLICAS,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": "web"}, "annotations": {"rev": "1"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{
                            "name": "c", "image": "berth/echo",
                            "ports": [{"containerPort": 8080}],
                            "lifecycle": {"preStop": {"sleep": {"seconds": pre_stop}}}
                        }]
                    }
                }
            }
        });
        let file = std::env::temp_dir().join(format!("berth-e2e-{ns}-web.json"));
        std::fs::write(&file, deployment.to_string()).expect("write deployment");
        env.kubectl(&["apply", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);

        let svc = wait_until("Service web ready", LONG, &dump, async || {
            let s = services.get("web").await.map_err(|e| e.to_string())?;
            match lb_condition(&s) {
                Some((st, _, _)) if st == "True" => Ok(s),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let sdk = env.aws().await;
        let elb = elb::Client::new(&sdk);
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let (lb_arn, tg) = wait_until(
            "the load balancer and its target group",
            LONG,
            &dump,
            async || {
                let v = aws_view(&elb, &uid).await.map_err(|e| e.to_string())?;
                match (v.load_balancers.first(), v.target_groups.keys().next()) {
                    (Some(lb), Some(tg)) => Ok((lb.0.clone(), tg.clone())),
                    _ => Err(format!("{v:?}")),
                }
            },
        )
        .await;

        // The Service came first, so gated pods go through the gate from the start: Ready
        // once their targets are healthy.
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
        let first = wait_until("3 pods Ready, 3 healthy targets", LONG, &dump, async || {
            let list = pods
                .list(&web_pods())
                .await
                .map_err(|e| e.to_string())?
                .items;
            let ready = list
                .iter()
                .filter(|p| is_true(p, "Ready"))
                .filter(|p| !gated || is_true(p, CONDITION_TARGET_HEALTH))
                .count();
            let health = targets(&elb, &tg).await.map_err(|e| e.to_string())?;
            let healthy = health.iter().filter(|(_, _, s)| s == "healthy").count();
            if ready == REPLICAS && healthy == REPLICAS && list.len() == REPLICAS {
                Ok(list)
            } else {
                Err(format!("{ready} ready, targets {health:?}"))
            }
        })
        .await;
        let addr = wait_until("the listener is served", LONG, &dump, async || {
            listener_address(&env.info, &lb_arn, 80)
                .await
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
        Self {
            _class: class,
            controller,
            dump,
            pods,
            elb,
            tg,
            url: format!("http://{addr}/"),
            old: first.iter().map(name).collect(),
        }
    }

    /// Changes the pod template and waits until the Deployment has 3 new pods Ready and
    /// the old ones are gone, then past the last deregistration delay.
    async fn roll(&self, env: &TestEnv, ns: &str) {
        env.kubectl(&[
            "patch",
            "deployment",
            "web",
            "-n",
            ns,
            "-p",
            r#"{"spec":{"template":{"metadata":{"annotations":{"rev":"2"}}}}}"#,
        ]);
        let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
        wait_true(
            "the rollout completes and the old pods are gone",
            LONG,
            &self.dump,
            async || {
                let Ok(d) = deployments.get("web").await else {
                    return false;
                };
                let st = d.status.clone().unwrap_or_default();
                let done = d.metadata.generation <= st.observed_generation
                    && st.updated_replicas == Some(REPLICAS as i32)
                    && st.ready_replicas == Some(REPLICAS as i32)
                    && st.replicas == Some(REPLICAS as i32);
                let left = self
                    .pods
                    .list(&web_pods())
                    .await
                    .map(|l| l.items.iter().any(|p| self.old.contains(&name(p))));
                done && left.is_ok_and(|l| !l)
            },
        )
        .await;
        // Past the last deregistration delay: requests keep being answered by the new pods.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    /// At the end the target group is the new pods, all healthy.
    async fn assert_only_new_targets(&self) -> Vec<Pod> {
        let new_pods = self.pods.list(&web_pods()).await.expect("pods").items;
        assert!(
            new_pods.iter().all(|p| !self.old.contains(&name(p))),
            "old pods left: {new_pods:?}"
        );
        let want: BTreeSet<String> = new_pods.iter().filter_map(pod_ip).collect();
        let health = targets(&self.elb, &self.tg).await.expect("targets");
        let healthy: BTreeSet<String> = health
            .iter()
            .filter(|(_, _, s)| s == "healthy")
            .map(|(id, _, _)| id.clone())
            .collect();
        assert_eq!(healthy, want, "{health:?}");
        new_pods
    }
}

/// Requests through the emulated NLB from the client namespace, one after another, until
/// stopped.
struct Requests {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    answered: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Requests {
    fn start(env: &TestEnv, url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let answered = Arc::new(Mutex::new(BTreeSet::<String>::new()));
        let task = {
            let (stop, ok) = (stop.clone(), ok.clone());
            let (failures, answered) = (failures.clone(), answered.clone());
            let netns = env.info.client_netns.clone();
            let url = url.to_string();
            tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    match curl_in(&netns, &url, Duration::from_secs(3)) {
                        Ok(body) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let body = body.trim().to_string();
                            answered.lock().expect("answered").insert(body);
                        }
                        Err(e) => {
                            let at = now_secs();
                            failures
                                .lock()
                                .expect("failures")
                                .push(format!("{at:.3}: {e}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            stop,
            ok,
            failures,
            answered,
            task,
        }
    }

    /// Stops the loop; asserts no request failed and enough were made.
    async fn finish(self, label: &str, web: &Web) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("request loop");
        let ok = self.ok.load(Ordering::Relaxed);
        let failures = self.failures.lock().expect("failures").clone();
        println!(
            "{label}: {ok} requests answered, {} failed; answered by {:?}",
            failures.len(),
            self.answered.lock().expect("answered")
        );
        assert!(
            failures.is_empty(),
            "{label}: {} requests failed during the rollout: {failures:?}\n{}",
            failures.len(),
            web.dump.report().await
        );
        assert!(
            ok >= 50,
            "{label}: only {ok} requests were made: the loop did not run through the rollout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_behind_an_ip_target_nlb_drops_no_request() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("rollout").await;
    env.kubectl(&[
        "label",
        "namespace",
        &ns.name,
        &format!("{LABEL_READINESS_GATE_INJECT}=enabled"),
    ]);
    let _policy = Policy::install(&env, &ns.name);
    // The apiserver picks the policy up within a few seconds: a pod created now (a
    // server-side dry run) gets the gate.
    wait_until(
        "the policy gives new pods the gate",
        LONG,
        &Diagnostics::new(&env),
        async || {
            let o = env
                .kubectl_output(&[
                    "run",
                    "probe",
                    "-n",
                    &ns.name,
                    "--image=berth/echo",
                    "--dry-run=server",
                    "-o",
                    "jsonpath={.spec.readinessGates[*].conditionType}",
                ])
                .map_err(|e| e.to_string())?;
            let out = String::from_utf8_lossy(&o.stdout);
            if out.contains(CONDITION_TARGET_HEALTH) {
                Ok(())
            } else {
                Err(format!(
                    "gates {out:?}; {}",
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
        },
    )
    .await;
    // Long enough for the deregistration to reach the NLB and the requests it already
    // forwarded to finish.
    let web = Web::start(&env, &ns.name, 6, true).await;
    let requests = Requests::start(&env, &web.url);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let observer = {
        let (stop, seen, pods, elb, tg, old) = (
            stop.clone(),
            seen.clone(),
            web.pods.clone(),
            web.elb.clone(),
            web.tg.clone(),
            web.old.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                observe(&pods, &elb, &tg, &old, &seen).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    web.roll(&env, &ns.name).await;
    stop.store(true, Ordering::Relaxed);
    observer.await.expect("observer");
    requests.finish("gated rollout", &web).await;

    let new_pods = web.assert_only_new_targets().await;
    let seen = seen.lock().expect("seen");
    println!("{} observations", seen.rounds);
    assert!(
        seen.violations.is_empty(),
        "gates True before the target was healthy: {:?}",
        seen.violations
    );
    let mut gate_times = Vec::new();
    for pod in &new_pods {
        let (n, ip) = (name(pod), pod_ip(pod).unwrap_or_default());
        let gate = transition(pod, CONDITION_TARGET_HEALTH)
            .filter(|_| is_true(pod, CONDITION_TARGET_HEALTH))
            .unwrap_or_else(|| panic!("{n}: gate not True: {:?}", pod.status));
        let ready = transition(pod, "Ready")
            .filter(|_| is_true(pod, "Ready"))
            .unwrap_or_else(|| panic!("{n}: not Ready"));
        let before = *seen
            .last_not_healthy
            .get(&ip)
            .unwrap_or_else(|| panic!("{n} ({ip}) was never seen registering: {seen:?}"));
        let healthy = seen.first_healthy.get(&ip).copied().unwrap_or(f64::NAN);
        println!(
            "{n} ({ip}): last seen not healthy {before:.3}, first seen healthy {healthy:.3}, gate True at {gate}, Ready at {ready}"
        );
        assert!(
            gate >= before.floor() as i64,
            "{n}: the gate turned True at {gate}, before LocalStack last reported the target not healthy ({before:.3})"
        );
        assert!(
            ready >= gate,
            "{n}: Ready at {ready} before its gate ({gate})"
        );
        gate_times.push(gate);
    }
    assert_eq!(gate_times.len(), REPLICAS, "{new_pods:?}");
    // maxUnavailable 0: the i-th old pod may go only once i new pods passed their gates.
    gate_times.sort();
    let mut gone: Vec<f64> = seen
        .terminating
        .iter()
        .filter(|(n, _)| web.old.contains(*n))
        .map(|(_, t)| *t)
        .collect();
    gone.sort_by(f64::total_cmp);
    assert_eq!(
        gone.len(),
        REPLICAS,
        "old pods seen terminating: {:?}",
        seen.terminating
    );
    for (i, (g, t)) in gate_times.iter().zip(&gone).enumerate() {
        assert!(
            *t >= *g as f64,
            "old pod #{i} was terminating at {t:.3}, before the {i}th gate turned True ({g})"
        );
    }
    drop(web.controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_gates_terminating_targets_serve_until_their_replacements_are_healthy() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("rollout-ungated").await;
    // Longer than a new target's initial health checks (2 passes, a round a second) and
    // the controller's look at them: the old pods serve all that time.
    let web = Web::start(&env, &ns.name, 10, false).await;
    let requests = Requests::start(&env, &web.url);
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let observer = {
        let (stop, held) = (stop.clone(), held.clone());
        let (pods, elb, tg, old) = (
            web.pods.clone(),
            web.elb.clone(),
            web.tg.clone(),
            web.old.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // The pods first, then LocalStack: an old pod already terminating whose
                // target is still healthy while a new one is not.
                if let Ok(list) = pods.list(&web_pods()).await
                    && let Ok(health) = targets(&elb, &tg).await
                {
                    let states: BTreeMap<String, String> =
                        health.into_iter().map(|(id, _, s)| (id, s)).collect();
                    let state = |p: &Pod| {
                        pod_ip(p)
                            .and_then(|ip| states.get(&ip).cloned())
                            .unwrap_or_else(|| "unregistered".into())
                    };
                    let kept = list.iter().any(|p| {
                        old.contains(&name(p))
                            && p.metadata.deletion_timestamp.is_some()
                            && state(p) == "healthy"
                    });
                    let waiting = list
                        .iter()
                        .any(|p| !old.contains(&name(p)) && state(p) != "healthy");
                    if kept && waiting {
                        held.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    web.roll(&env, &ns.name).await;
    stop.store(true, Ordering::Relaxed);
    observer.await.expect("observer");
    requests.finish("ungated rollout", &web).await;
    let held = held.load(Ordering::Relaxed);
    println!("{held} observations of a terminating target kept for its replacement");
    assert!(
        held > 0,
        "no terminating old target was ever seen kept while a new one was not healthy: the rollout did not exercise the order"
    );
    web.assert_only_new_targets().await;
    drop(web.controller);
}
