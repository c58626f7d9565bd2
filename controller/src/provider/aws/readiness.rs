//! Pod readiness gates for `ip` targets, so a rollout waits for the load balancer.
//!
//! The chart's MutatingAdmissionPolicy gives pods in namespaces labelled
//! `berth.dev/readiness-gate-inject=enabled` the readiness gate
//! [`CONDITION_TARGET_HEALTH`] (no webhook server). A policy cannot look Services up, so
//! there is one condition for every Service: it is True once the pod's target is healthy
//! in every target group of each berth `ip`-target Service selecting the pod (True at once
//! when none does, so pods of other workloads are not held back), False until then. Once
//! True it stays True.
//!
//! A pod that is not Ready only because of this gate is still registered
//! (`model::World::gated_ready`): the AWS provider records each Service's view of its
//! targets ([`Gates::record`]) after every apply, and [`run`] turns those views into the
//! pods' conditions through the leader's fenced writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_crds::CONDITION_TARGET_HEALTH;
use k8s_openapi::api::core::v1::{Pod, PodCondition, Service};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use crate::provider::aws::api::TargetState;
use crate::provider::aws::model::{DesiredLoadBalancer, TargetType};
use crate::service::{Context, Ownership, ownership};
use crate::writes::Write;

/// Reasons of the condition.
pub const REASON_HEALTHY: &str = "TargetHealthy";
pub const REASON_NOT_HEALTHY: &str = "TargetNotHealthy";
pub const REASON_PENDING: &str = "TargetPending";
pub const REASON_NO_TARGET_GROUP: &str = "NoTargetGroup";

/// How often the conditions are recomputed without a wake (a missed one is made up).
const RESYNC: Duration = Duration::from_secs(30);

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a PodCondition> {
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

/// Whether the pod carries berth's readiness gate. Pure.
pub fn has_gate(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| {
            g.iter()
                .any(|g| g.condition_type == CONDITION_TARGET_HEALTH)
        })
}

fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.pod_ip.as_deref()
}

/// A gated pod that is Ready, or would be but for berth's gate: its containers are ready,
/// every other readiness gate is True, it is not terminating and has an address. Such a
/// pod is a target whatever its endpoint says: before the gate is True its endpoint is not
/// ready, and just after it may not be ready yet (the EndpointSlice lags the pod), which
/// must not deregister the target that has just been found healthy. Pure.
pub fn gated_ready(pod: &Pod) -> bool {
    let others_true = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
        .filter(|g| g.condition_type != CONDITION_TARGET_HEALTH)
        .all(|g| is_true(pod, &g.condition_type));
    has_gate(pod)
        && pod.metadata.deletion_timestamp.is_none()
        && pod_ip(pod).is_some()
        && is_true(pod, "ContainersReady")
        && others_true
}

/// Whether `svc`'s selector selects `pod`: same namespace, a selector, all its labels. Pure.
pub fn selects(svc: &Service, pod: &Pod) -> bool {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let labels = pod.labels();
    svc.namespace() == pod.namespace()
        && !selector.is_empty()
        && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One Service's word on one pod address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Per pod address: healthy when its target is healthy in every target group of the
/// Service that wants it; else why not (the first group that is not). `targets` are the
/// states read by the apply (a target registered by it is not listed yet). Pure.
pub fn verdicts(
    desired: &DesiredLoadBalancer,
    targets: &BTreeMap<String, Vec<TargetState>>,
) -> BTreeMap<String, Verdict> {
    let mut out: BTreeMap<String, Verdict> = BTreeMap::new();
    for tg in &desired.target_groups {
        let states = targets.get(&tg.name).map(Vec::as_slice).unwrap_or_default();
        for t in &tg.targets {
            let state = states
                .iter()
                .find(|s| s.target == *t)
                .map(|s| s.state.as_str())
                .unwrap_or("registering");
            let verdict = if state == "healthy" {
                Verdict {
                    healthy: true,
                    reason: REASON_HEALTHY,
                    message: format!("target {}:{} is healthy", t.id, t.port),
                }
            } else {
                let reason = if matches!(state, "registering" | "initial") {
                    REASON_PENDING
                } else {
                    REASON_NOT_HEALTHY
                };
                Verdict {
                    healthy: false,
                    reason,
                    message: format!(
                        "target {}:{} is {state} in target group {}",
                        t.id, t.port, tg.name
                    ),
                }
            };
            match out.get(&t.id) {
                Some(v) if !v.healthy => {}
                _ => {
                    out.insert(t.id.clone(), verdict);
                }
            }
        }
    }
    out
}

/// What the pod's condition should say, from the views of the Services selecting it
/// (`None`: that Service has not been applied yet). Pure.
pub fn desired_condition(
    pod_ip: &str,
    services: &[(String, Option<&BTreeMap<String, Verdict>>)],
) -> Verdict {
    if services.is_empty() {
        return Verdict {
            healthy: true,
            reason: REASON_NO_TARGET_GROUP,
            message: "no ip-target load balancer of berth selects this pod".into(),
        };
    }
    for (name, view) in services {
        match view.and_then(|v| v.get(pod_ip)) {
            Some(v) if v.healthy => {}
            Some(v) => {
                return Verdict {
                    message: format!("Service {name}: {}", v.message),
                    ..v.clone()
                };
            }
            None => {
                return Verdict {
                    healthy: false,
                    reason: REASON_PENDING,
                    message: format!("Service {name}: the target is not registered yet"),
                };
            }
        }
    }
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    Verdict {
        healthy: true,
        reason: REASON_HEALTHY,
        message: format!("healthy in every target group of {}", names.join(", ")),
    }
}

/// The status patch that makes the pod's condition say `want`, or `None` when it does
/// already. The transition time moves only when the status does. Pure.
pub fn condition_patch(pod: &Pod, want: &Verdict, now: &str) -> Option<serde_json::Value> {
    let status = if want.healthy { "True" } else { "False" };
    let current = condition(pod, CONDITION_TARGET_HEALTH);
    if current.is_some_and(|c| {
        c.status == status
            && c.reason.as_deref() == Some(want.reason)
            && c.message.as_deref() == Some(want.message.as_str())
    }) {
        return None;
    }
    let since = match current {
        Some(c) if c.status == status => c
            .last_transition_time
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| now.to_string()),
        _ => now.to_string(),
    };
    Some(serde_json::json!({"status": {"conditions": [{
        "type": CONDITION_TARGET_HEALTH,
        "status": status,
        "reason": want.reason,
        "message": want.message,
        "lastTransitionTime": since,
    }]}}))
}

/// Each `ip`-target Service's view of its pods' targets, by Service UID, and the wake of
/// [`run`].
#[derive(Default)]
pub struct Gates {
    views: Mutex<HashMap<String, BTreeMap<String, Verdict>>>,
    wake: Notify,
}

impl Gates {
    /// Records the Service's view after an apply; wakes [`run`] when it changed.
    pub fn record(&self, uid: &str, view: BTreeMap<String, Verdict>) {
        let Ok(mut views) = self.views.lock() else {
            return;
        };
        if views.get(uid) != Some(&view) {
            views.insert(uid.to_string(), view);
            self.wake.notify_one();
        }
    }

    /// The Service no longer has `ip` targets (or is gone).
    pub fn forget(&self, uid: &str) {
        if let Ok(mut views) = self.views.lock()
            && views.remove(uid).is_some()
        {
            self.wake.notify_one();
        }
    }

    /// Something about gated pods changed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn snapshot(&self) -> HashMap<String, BTreeMap<String, Verdict>> {
        self.views.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Whether berth gives `svc` a load balancer with `ip` targets (its class, its
/// annotations; an annotation error falls back to the class's target type).
fn is_ip_service(svc: &Service, ctx: &Context) -> bool {
    let classes = ctx.stores.classes.state();
    let Ownership::Class(name) = ownership(svc, &classes, &ctx.config) else {
        return false;
    };
    let Some(aws) = classes
        .iter()
        .find(|c| c.name_any() == name)
        .and_then(|c| c.spec.aws.clone())
    else {
        return false;
    };
    let cluster = &ctx.config.cluster_name;
    let target_type = crate::provider::aws::annotations::settings(svc, &aws, cluster)
        .map(|s| s.target_type)
        .unwrap_or(aws.target_type.unwrap_or(TargetType::Instance));
    target_type == TargetType::Ip
}

/// Whether `svc` is a LoadBalancer Service of a berth class another controller handles
/// (`--classes`): a pod it selects is left to that controller. Pure.
pub fn of_another_controller(svc: &Service, config: &crate::config::Config) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .and_then(berth_crds::class_name)
            .is_some_and(|name| !config.handles_class(name))
}

/// Makes every gated pod's condition match the Services' views, once.
async fn sync(ctx: &Context, gates: &Gates) {
    let views = gates.snapshot();
    let services: Vec<Arc<Service>> = ctx
        .stores
        .services
        .state()
        .into_iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none() && is_ip_service(s, ctx))
        .collect();
    let others: Vec<Arc<Service>> = ctx
        .stores
        .services
        .state()
        .into_iter()
        .filter(|s| of_another_controller(s, &ctx.config))
        .collect();
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    for pod in ctx.stores.pods.state() {
        let Some(ip) = pod_ip(&pod) else { continue };
        // True stays True: the gate holds a new pod back until the load balancer sends it
        // traffic. Later (a Service created afterwards, a failing health check) the load
        // balancer stops using the target by itself; pulling the pod out of every other
        // Service's endpoints as well would only widen the damage.
        if !has_gate(&pod)
            || pod.metadata.deletion_timestamp.is_some()
            || is_true(&pod, CONDITION_TARGET_HEALTH)
        {
            continue;
        }
        // Pods of another controller's Services are its to gate: one that sees none of its
        // own Services selecting the pod must not call it free of load balancers.
        let mine = services.iter().any(|s| selects(s, &pod));
        if !mine && others.iter().any(|s| selects(s, &pod)) {
            continue;
        }
        let selecting: Vec<(String, Option<&BTreeMap<String, Verdict>>)> = services
            .iter()
            .filter(|s| selects(s, &pod))
            .map(|s| {
                let uid = s.metadata.uid.clone().unwrap_or_default();
                (s.name_any(), views.get(&uid))
            })
            .collect();
        let want = desired_condition(ip, &selecting);
        let Some(patch) = condition_patch(&pod, &want, &now) else {
            continue;
        };
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.writer.client().clone(), &ns);
        match ctx
            .writer
            .strategic_status(&api, &pod.name_any(), patch, Write::PodCondition)
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %format!("{ns}/{}", pod.name_any()), healthy = want.healthy, reason = want.reason, "readiness gate")
            }
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{}", pod.name_any()), error = %e, "readiness gate not written")
            }
        }
    }
}

/// Keeps the gated pods' conditions while leading: after every wake, and every
/// [`RESYNC`].
pub async fn run(ctx: Arc<Context>, gates: Arc<Gates>) {
    loop {
        sync(&ctx, &gates).await;
        tokio::select! {
            () = gates.wake.notified() => {}
            () = tokio::time::sleep(RESYNC) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::model::{DesiredTargetGroup, Target};
    use std::collections::BTreeSet;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    fn gated(conditions: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "ns", "labels": {"app": "web"}},
            "spec": {"containers": [], "readinessGates": [
                {"conditionType": CONDITION_TARGET_HEALTH}
            ]},
            "status": {"podIP": "10.244.1.5", "conditions": conditions}
        }))
    }

    #[test]
    fn services_of_classes_another_controller_handles_are_left_to_it() {
        let svc = |class: Option<&str>, kind: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "ns"},
                "spec": {"type": kind, "loadBalancerClass": class, "selector": {"app": "web"}}
            }))
            .expect("service")
        };
        use clap::Parser;
        let config =
            crate::config::Config::try_parse_from(["x", "--class", "mine"]).expect("config");
        assert!(of_another_controller(
            &svc(Some("berth.dev/theirs"), "LoadBalancer"),
            &config
        ));
        assert!(!of_another_controller(
            &svc(Some("berth.dev/mine"), "LoadBalancer"),
            &config
        ));
        assert!(!of_another_controller(
            &svc(Some("example.com/lb"), "LoadBalancer"),
            &config
        ));
        assert!(!of_another_controller(&svc(None, "LoadBalancer"), &config));
        assert!(!of_another_controller(
            &svc(Some("berth.dev/theirs"), "ClusterIP"),
            &config
        ));
        let all = crate::config::Config::try_parse_from(["x"]).expect("config");
        assert!(!of_another_controller(
            &svc(Some("berth.dev/theirs"), "LoadBalancer"),
            &all
        ));
    }

    #[test]
    fn gated_pods_with_ready_containers_are_targets() {
        let ready = serde_json::json!([{"type": "ContainersReady", "status": "True"}]);
        assert!(gated_ready(&gated(ready.clone())));
        let starting = serde_json::json!([{"type": "ContainersReady", "status": "False"}]);
        assert!(!gated_ready(&gated(starting)));
        let done = serde_json::json!([
            {"type": "ContainersReady", "status": "True"},
            {"type": CONDITION_TARGET_HEALTH, "status": "True"}
        ]);
        assert!(gated_ready(&gated(done)), "the endpoint may lag the gate");
        let mut other = gated(ready.clone());
        other
            .spec
            .as_mut()
            .and_then(|s| s.readiness_gates.as_mut())
            .expect("gates")
            .push(k8s_openapi::api::core::v1::PodReadinessGate {
                condition_type: "example.com/other".into(),
            });
        assert!(!gated_ready(&other), "another gate still False");
        let mut leaving = gated(ready);
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(!gated_ready(&leaving));
        let plain = pod(serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": []}}));
        assert!(!has_gate(&plain) && !gated_ready(&plain));
    }

    #[test]
    fn a_selector_selects_pods_of_its_namespace_only() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"selector": {"app": "web"}}
        }))
        .expect("svc");
        let p = gated(serde_json::json!([]));
        assert!(selects(&svc, &p));
        let mut elsewhere = p.clone();
        elsewhere.metadata.namespace = Some("other".into());
        assert!(!selects(&svc, &elsewhere));
        let mut bare = svc.clone();
        bare.spec.as_mut().expect("spec").selector = None;
        assert!(!selects(&bare, &p), "selector-less Services select nothing");
    }

    fn desired(groups: &[(&str, &[&str])]) -> DesiredLoadBalancer {
        DesiredLoadBalancer {
            name: "lb".into(),
            scheme: crate::provider::aws::model::Scheme::Internal,
            ip_address_type: crate::provider::aws::model::IpAddressType::Ipv4,
            subnets: vec![],
            mappings: vec![],
            security_groups: vec![],
            security: crate::provider::aws::security_groups::Security {
                frontend: crate::provider::aws::security_groups::Frontend::Disabled,
                backend: None,
                nodes: Default::default(),
                node_groups: Default::default(),
            },
            tags: BTreeMap::new(),
            attributes: BTreeMap::new(),
            listeners: vec![],
            target_groups: groups
                .iter()
                .map(|(name, ips)| DesiredTargetGroup {
                    name: name.to_string(),
                    protocol: "TCP".into(),
                    port: 80,
                    target_type: TargetType::Ip,
                    ipv6: false,
                    vpc_id: "vpc-1".into(),
                    health_check: crate::provider::aws::settings::HealthCheck::default_tcp(),
                    attributes: BTreeMap::new(),
                    tags: BTreeMap::new(),
                    targets: ips
                        .iter()
                        .map(|ip| Target {
                            id: ip.to_string(),
                            port: 80,
                        })
                        .collect(),
                    serving: BTreeSet::new(),
                })
                .collect(),
        }
    }

    fn states(pairs: &[(&str, &str)]) -> Vec<TargetState> {
        pairs
            .iter()
            .map(|(ip, state)| TargetState {
                target: Target {
                    id: ip.to_string(),
                    port: 80,
                },
                state: state.to_string(),
            })
            .collect()
    }

    #[test]
    fn a_pod_is_healthy_only_when_healthy_in_every_target_group() {
        let d = desired(&[("tg-a", &["10.0.0.1", "10.0.0.2"]), ("tg-b", &["10.0.0.1"])]);
        let targets = BTreeMap::from([
            (
                "tg-a".to_string(),
                states(&[("10.0.0.1", "healthy"), ("10.0.0.2", "initial")]),
            ),
            ("tg-b".to_string(), states(&[("10.0.0.1", "unhealthy")])),
        ]);
        let v = verdicts(&d, &targets);
        assert!(!v["10.0.0.1"].healthy);
        assert_eq!(v["10.0.0.1"].reason, REASON_NOT_HEALTHY);
        assert!(v["10.0.0.1"].message.contains("tg-b"));
        assert_eq!(v["10.0.0.2"].reason, REASON_PENDING);
        let fine = BTreeMap::from([
            (
                "tg-a".to_string(),
                states(&[("10.0.0.1", "healthy"), ("10.0.0.2", "healthy")]),
            ),
            ("tg-b".to_string(), states(&[("10.0.0.1", "healthy")])),
        ]);
        assert!(verdicts(&d, &fine).values().all(|v| v.healthy));
        // Just registered (not listed yet): pending.
        let v = verdicts(&d, &BTreeMap::new());
        assert_eq!(v["10.0.0.1"].reason, REASON_PENDING);
    }

    #[test]
    fn the_condition_waits_for_every_selecting_service() {
        let ok = Verdict {
            healthy: true,
            reason: REASON_HEALTHY,
            message: "ok".into(),
        };
        let view = BTreeMap::from([("10.0.0.1".to_string(), ok)]);
        let none = desired_condition("10.0.0.1", &[]);
        assert!(none.healthy && none.reason == REASON_NO_TARGET_GROUP);
        let one = desired_condition("10.0.0.1", &[("a".into(), Some(&view))]);
        assert!(one.healthy && one.reason == REASON_HEALTHY);
        let unapplied =
            desired_condition("10.0.0.1", &[("a".into(), Some(&view)), ("b".into(), None)]);
        assert!(!unapplied.healthy && unapplied.message.starts_with("Service b"));
        let other_pod = desired_condition("10.0.0.9", &[("a".into(), Some(&view))]);
        assert!(!other_pod.healthy);
    }

    #[test]
    fn the_condition_is_written_only_when_it_changes_and_keeps_its_transition_time() {
        let want = Verdict {
            healthy: true,
            reason: REASON_HEALTHY,
            message: "ok".into(),
        };
        let p = gated(serde_json::json!([]));
        let patch = condition_patch(&p, &want, "2026-01-01T00:00:05Z").expect("a patch");
        let c = &patch["status"]["conditions"][0];
        assert_eq!(c["status"], "True");
        assert_eq!(c["lastTransitionTime"], "2026-01-01T00:00:05Z");
        let set = gated(serde_json::json!([{
            "type": CONDITION_TARGET_HEALTH, "status": "True", "reason": REASON_HEALTHY,
            "message": "ok", "lastTransitionTime": "2026-01-01T00:00:05Z"
        }]));
        assert_eq!(condition_patch(&set, &want, "2026-01-01T00:01:00Z"), None);
        let reworded = Verdict {
            message: "other".into(),
            ..want
        };
        let patch = condition_patch(&set, &reworded, "2026-01-01T00:01:00Z").expect("patch");
        assert_eq!(
            patch["status"]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:05Z",
            "same status: the transition time stays"
        );
    }
}
