//! The Service status berth writes: `status.loadBalancer` and the
//! `berth.dev/LoadBalancerReady` condition. Pure builders; the reconciler applies them.
//! What a provider asks for ([`Readiness`], ingress entries) is in [`crate::provider`].

use berth_crds::CONDITION_LB_READY;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::provider::Readiness;

/// The Service's current berth condition, if any.
pub fn current_condition(svc: &Service) -> Option<&Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_LB_READY)
}

/// The Service's current ingress entries that carry a hostname (a provider's own; pool
/// addresses are not carried over to another provider).
pub fn kept_ingress(svc: &Service) -> Option<Vec<LoadBalancerIngress>> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .map(|v| {
            v.into_iter()
                .filter(|i| i.hostname.is_some())
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
}

/// The condition to write: keeps the transition time when the status does not change.
pub fn condition(svc: &Service, r: &Readiness, now: Time) -> Condition {
    let status = if r.ready { "True" } else { "False" };
    let previous = current_condition(svc);
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    Condition {
        type_: CONDITION_LB_READY.into(),
        status: status.into(),
        reason: r.reason.clone(),
        message: r.message.chars().take(32_000).collect(),
        last_transition_time,
        observed_generation: svc.metadata.generation,
    }
}

/// Whether writing `cond` and `ingress` would change the Service's status.
pub fn status_changes(
    svc: &Service,
    cond: &Condition,
    ingress: &Option<Vec<LoadBalancerIngress>>,
) -> bool {
    let current_ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .filter(|v| !v.is_empty());
    let cond_same = current_condition(svc).is_some_and(|c| {
        c.status == cond.status
            && c.reason == cond.reason
            && c.message == cond.message
            && c.observed_generation == cond.observed_generation
    });
    !cond_same || current_ingress != *ingress
}

/// Server-side apply body for the status subresource: berth's condition and, when known,
/// the ingress. Fields berth wrote before and omits now are removed by the apiserver.
pub fn status_patch(
    svc: &Service,
    cond: Option<&Condition>,
    ingress: &Option<Vec<LoadBalancerIngress>>,
) -> serde_json::Value {
    let mut status = serde_json::json!({});
    if let Some(ingress) = ingress {
        status["loadBalancer"] = serde_json::json!({ "ingress": ingress });
    }
    if let Some(c) = cond {
        status["conditions"] = serde_json::json!([c]);
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": svc.metadata.name,
            "namespace": svc.metadata.namespace,
        },
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::annotations::tests::service;
    use crate::provider::{hostname_ingress as ingress, ip_ingress};
    use crate::reason;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn only_hostname_entries_carry_over() {
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        assert_eq!(kept_ingress(&svc), None);
        let mut entries = ip_ingress(&svc, &["198.19.1.1".parse().expect("ip")]);
        svc.status.get_or_insert_default().load_balancer =
            Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
                ingress: Some(entries.clone()),
            });
        assert_eq!(kept_ingress(&svc), None);
        entries.extend(ingress(&svc, "h"));
        svc.status.get_or_insert_default().load_balancer =
            Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
                ingress: Some(entries),
            });
        assert_eq!(kept_ingress(&svc).map(|v| v.len()), Some(1));
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(100).unwrap_or_default());
        let c1 = condition(
            &svc,
            &Readiness::not_ready(reason::PROVISIONING, "wait"),
            now(),
        );
        svc.status.get_or_insert_default().conditions = Some(vec![c1.clone()]);
        let c2 = condition(
            &svc,
            &Readiness::not_ready(reason::AWS_ERROR, "boom"),
            later.clone(),
        );
        assert_eq!(c2.last_transition_time, c1.last_transition_time);
        let c3 = condition(&svc, &Readiness::ready("ok"), later.clone());
        assert_eq!(c3.last_transition_time, later);
        assert_eq!(c3.status, "True");
    }

    #[test]
    fn unchanged_status_is_not_rewritten() {
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let ing = Some(ingress(&svc, "h"));
        let c = condition(&svc, &Readiness::ready("ok"), now());
        assert!(status_changes(&svc, &c, &ing));
        let st = svc.status.get_or_insert_default();
        st.conditions = Some(vec![c.clone()]);
        st.load_balancer = Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
            ingress: ing.clone(),
        });
        assert!(!status_changes(&svc, &c, &ing));
        assert!(status_changes(&svc, &c, &None));
    }

    #[test]
    fn patch_names_the_service_and_carries_the_condition() {
        let svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let c = condition(&svc, &Readiness::ready("ok"), now());
        let p = status_patch(&svc, Some(&c), &Some(ingress(&svc, "h")));
        assert_eq!(p["metadata"]["name"], "web");
        assert_eq!(p["status"]["conditions"][0]["type"], CONDITION_LB_READY);
        assert_eq!(p["status"]["loadBalancer"]["ingress"][0]["hostname"], "h");
        let cleared = status_patch(&svc, None, &None);
        assert_eq!(cleared["status"], serde_json::json!({}));
    }
}
