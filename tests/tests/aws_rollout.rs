//! Zero-downtime rollouts behind an `ip`-target NLB (issue #15, item 5): a rolling update
//! of a 3-replica Deployment (maxSurge 1, maxUnavailable 0, a preStop sleep) in a
//! namespace opted in to berth's readiness gate, with requests sent through the emulated
//! NLB from the client namespace all along. The chart's MutatingAdmissionPolicy gives
//! each new pod the gate; the controller registers the pod while only the gate holds it
//! back, sets the gate True once LocalStack's health checks pass, and deregisters an old
//! pod (which then drains) only once its replacement is healthy. Checked: no request
//! fails, no new pod's gate was True while LocalStack still reported its target
//! unregistered or `initial`, each gate's transition is not older than the last such
//! observation, the kubelet made each pod Ready only after its gate, and the Deployment
//! removed its old pods only as the gates turned True. Needs root and the running local
//! cluster.

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
    let class = ClassGuard::create(
        &env,
        &ns.name,
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    );
    let controller = ControllerProc::spawn(
        &env.info,
        &format!("{}-0", ns.name),
        &ControllerOpts::new(&class.name, &ns.name),
    )
    .unwrap_or_else(|e| panic!("start controller: {e}"));
    let dump = Diagnostics::new(&env)
        .controllers(std::slice::from_ref(&controller))
        .events(&ns.name, "web");

    // The apiserver picks the policy up within a few seconds: a pod created now (a
    // server-side dry run) gets the gate.
    wait_true(
        "the policy gives new pods the gate",
        LONG,
        &dump,
        async || {
            let out = env.kubectl_output(&[
                "run",
                "probe",
                "-n",
                &ns.name,
                "--image=berth/echo",
                "--dry-run=server",
                "-o",
                "jsonpath={.spec.readinessGates[*].conditionType}",
            ]);
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CONDITION_TARGET_HEALTH))
        },
    )
    .await;

    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
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
        "metadata": {"name": "web", "namespace": ns.name},
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
                        // Long enough for the deregistration to reach the NLB and the
                        // requests it already forwarded to finish.
                        "lifecycle": {"preStop": {"sleep": {"seconds": 6}}}
                    }]
                }
            }
        }
    });
    let file = std::env::temp_dir().join(format!("berth-e2e-{}-web.json", ns.name));
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

    // The Service came first, so the first pods go through the gate too: Ready once
    // their targets are healthy.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns.name);
    let lp = ListParams::default().labels("app=web");
    let first = wait_until(
        "3 pods Ready through their gates, 3 healthy targets",
        LONG,
        &dump,
        async || {
            let list = pods.list(&lp).await.map_err(|e| e.to_string())?.items;
            let ready: Vec<&Pod> = list
                .iter()
                .filter(|p| is_true(p, "Ready") && is_true(p, CONDITION_TARGET_HEALTH))
                .collect();
            let health = targets(&elb, &tg).await.map_err(|e| e.to_string())?;
            let healthy = health.iter().filter(|(_, _, s)| s == "healthy").count();
            if ready.len() == REPLICAS && healthy == REPLICAS && list.len() == REPLICAS {
                Ok(list)
            } else {
                Err(format!("{} ready, targets {health:?}", ready.len()))
            }
        },
    )
    .await;
    let old: BTreeSet<String> = first.iter().map(name).collect();
    let addr = wait_until("the listener is served", LONG, &dump, async || {
        listener_address(&env.info, &lb_arn, 80)
            .await
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    let url = format!("http://{addr}/");

    // Requests all along, from the client namespace through the emulated NLB.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let requests = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (failures, answered) = (failures.clone(), answered.clone());
        let netns = env.info.client_netns.clone();
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            while !stop.load(Ordering::Relaxed) {
                match curl_in(&netns, &url, Duration::from_secs(3)) {
                    Ok(body) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        answered
                            .lock()
                            .expect("answered")
                            .insert(body.trim().to_string());
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures
                            .lock()
                            .expect("failures")
                            .push(format!("{:.3}: {e}", now_secs()));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let observer = {
        let (stop, seen, pods, elb, tg, old) = (
            stop.clone(),
            seen.clone(),
            pods.clone(),
            elb.clone(),
            tg.clone(),
            old.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                observe(&pods, &elb, &tg, &old, &seen).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    env.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-n",
        &ns.name,
        "-p",
        r#"{"spec":{"template":{"metadata":{"annotations":{"rev":"2"}}}}}"#,
    ]);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns.name);
    wait_true(
        "the rollout completes and the old pods are gone",
        Duration::from_secs(120),
        &dump,
        async || {
            let Ok(d) = deployments.get("web").await else {
                return false;
            };
            let st = d.status.clone().unwrap_or_default();
            let done = d.metadata.generation <= st.observed_generation
                && st.updated_replicas == Some(REPLICAS as i32)
                && st.ready_replicas == Some(REPLICAS as i32)
                && st.replicas == Some(REPLICAS as i32);
            let left = pods
                .list(&lp)
                .await
                .map(|l| l.items.iter().any(|p| old.contains(&name(p))));
            done && left.is_ok_and(|l| !l)
        },
    )
    .await;
    // Past the last deregistration delay: requests keep being answered by the new pods.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    requests.await.expect("request loop");
    observer.await.expect("observer");

    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let seen = seen.lock().expect("seen");
    let new_pods = pods.list(&lp).await.expect("pods").items;
    println!(
        "rollout: {ok} requests answered, {failed} failed, {} observations; answered by {:?}",
        seen.rounds,
        answered.lock().expect("answered")
    );
    assert_eq!(
        failed,
        0,
        "requests failed during the rollout: {:?}\n{}",
        failures.lock().expect("failures"),
        dump.report().await
    );
    assert!(
        ok >= 50,
        "only {ok} requests were made: the loop did not run through the rollout"
    );
    assert!(
        seen.violations.is_empty(),
        "gates True before the target was healthy: {:?}",
        seen.violations
    );

    let mut gate_times = Vec::new();
    for pod in &new_pods {
        let (n, ip) = (name(pod), pod_ip(pod).unwrap_or_default());
        assert!(!old.contains(&n), "{n} is an old pod");
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
        .filter(|(n, _)| old.contains(*n))
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
    // At the end the target group is the new pods, all healthy.
    let want: BTreeSet<String> = new_pods.iter().filter_map(pod_ip).collect();
    let health = targets(&elb, &tg).await.expect("targets");
    let healthy: BTreeSet<String> = health
        .iter()
        .filter(|(_, _, s)| s == "healthy")
        .map(|(id, _, _)| id.clone())
        .collect();
    assert_eq!(healthy, want, "{health:?}");
    drop(controller);
}
