//! LoadBalancerClass status as its own small reconciler: woken by the class and Service
//! watches (never a poll), it computes each handled class's status from the stores and
//! its provider's [`Verdict`], and writes the classes whose status changed with
//! server-side apply under berth's field manager, behind the leader fence. Pool classes'
//! allocated and available addresses are also the `berth_pool_addresses_*` gauges.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_crds::{
    CONDITION_ACCEPTED, CONDITION_LB_READY, LoadBalancerClass, LoadBalancerClassStatus,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use crate::metrics::NotReady;
use crate::provider::Verdict;
use crate::service::{self, Context, Ownership};
use crate::writes::Write;

/// The class status for `verdict` and the counts; keeps the condition's transition time
/// while its reason stays. Pure.
pub fn desired(
    class: &LoadBalancerClass,
    verdict: &Verdict,
    services: i32,
    ready: i32,
    now: Time,
) -> LoadBalancerClassStatus {
    let old = class
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED));
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let condition = Condition {
        type_: CONDITION_ACCEPTED.into(),
        status: if verdict.accepted { "True" } else { "False" }.into(),
        reason: verdict.reason.into(),
        message: verdict.message.clone(),
        last_transition_time: old
            .filter(|c| c.reason == verdict.reason)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(now),
        observed_generation: class.metadata.generation,
    };
    LoadBalancerClassStatus {
        conditions: vec![condition],
        services: Some(services),
        ready_services: Some(ready),
        allocated: verdict.addresses.map(|(a, _)| as_i64(a)),
        available: verdict.addresses.map(|(_, v)| as_i64(v)),
    }
}

/// Whether writing `want` would change the class's status (the transition time aside).
/// Pure.
pub fn changes(class: &LoadBalancerClass, want: &LoadBalancerClassStatus) -> bool {
    let Some(have) = class.status.as_ref() else {
        return true;
    };
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let conditions_same = have
        .conditions
        .iter()
        .map(key)
        .eq(want.conditions.iter().map(key));
    !(conditions_same
        && have.services == want.services
        && have.ready_services == want.ready_services
        && have.allocated == want.allocated
        && have.available == want.available)
}

/// (Services of the class, of which ready).
fn counts(ctx: &Context, class: &str, classes: &[Arc<LoadBalancerClass>]) -> (i32, i32) {
    let services = ctx.stores.services.state();
    let mine: Vec<_> = services
        .iter()
        .filter(|s| {
            service::ownership(s, classes, &ctx.config) == Ownership::Class(class.to_string())
        })
        .collect();
    let ready = mine
        .iter()
        .filter(|s| {
            service::status::current_condition(s)
                .is_some_and(|c| c.type_ == CONDITION_LB_READY && c.status == "True")
        })
        .count();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    (count(mine.len()), count(ready))
}

/// The provider's verdict on `class`, or why no provider serves it.
fn verdict_of(ctx: &Context, class: &LoadBalancerClass) -> Verdict {
    match ctx.providers.for_class(class) {
        Some(p) => p.verdict(class),
        None => Verdict {
            accepted: false,
            reason: crate::reason::UNSUPPORTED_PROVIDER,
            message: "no provider block".into(),
            addresses: None,
        },
    }
}

/// One pass over every handled class.
async fn write_all(ctx: &Context) {
    let api: Api<LoadBalancerClass> = Api::all(ctx.writer.client().clone());
    let classes = ctx.stores.classes.state();
    let mut gauges = BTreeMap::new();
    for class in classes
        .iter()
        .filter(|c| ctx.config.handles_class(&c.name_any()))
    {
        let name = class.name_any();
        let verdict = verdict_of(ctx, class);
        if let Some(a) = verdict.addresses {
            gauges.insert(name.clone(), a);
        }
        let (services, ready) = counts(ctx, &name, &classes);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let want = desired(class, &verdict, services, ready, now);
        if !changes(class, &want) {
            continue;
        }
        let body = serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "LoadBalancerClass",
            "metadata": {"name": name},
            "status": want,
        });
        if let Err(e) = ctx
            .writer
            .apply_status(&api, &name, body, Write::ClassStatus)
            .await
        {
            tracing::warn!(class = %name, error = %e, "class status");
        }
    }
    ctx.metrics.set_pool_addresses(gauges);
    ctx.metrics.set_not_ready(not_ready_services(ctx, &classes));
}

/// The handled classes' Services that are not ready, for the not-ready alert.
fn not_ready_services(ctx: &Context, classes: &[Arc<LoadBalancerClass>]) -> Vec<NotReady> {
    ctx.stores
        .services
        .state()
        .iter()
        .filter_map(|s| match service::ownership(s, classes, &ctx.config) {
            Ownership::Class(class) => not_ready(s, class),
            Ownership::NotOurs => None,
        })
        .collect()
}

/// Since when `svc` has not been ready: its Ready condition's last transition, or its
/// creation while it has no condition yet; `None` when ready. Pure.
pub fn not_ready(svc: &Service, class: String) -> Option<NotReady> {
    let since = match service::status::current_condition(svc) {
        Some(c) if c.status == "True" => return None,
        Some(c) => &c.last_transition_time,
        None => svc.metadata.creation_timestamp.as_ref()?,
    };
    Some(NotReady {
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
        class,
        since: since.0.as_millisecond() as f64 / 1000.0,
    })
}

/// Changes arriving this soon after a wake-up are taken in by the same pass: a burst of
/// Service events makes one class write, not one per event.
const COALESCE: Duration = Duration::from_millis(300);

/// Writes class status whenever `wake` is notified, until leadership is lost.
pub async fn run(ctx: Arc<Context>, wake: Arc<Notify>) {
    let token = ctx.writer.fence().token();
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = wake.notified() => {}
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = async {
                tokio::time::sleep(COALESCE).await;
                write_all(&ctx).await;
            } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class() -> LoadBalancerClass {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": "lab", "generation": 2},
            "spec": {"pool": {"addresses": ["198.19.1.0/29"]}}
        }))
        .expect("class")
    }

    fn at(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap_or_default())
    }

    #[test]
    fn not_ready_since_the_condition_or_the_creation() {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "berth.dev/lab"},
        }))
        .expect("service");
        let created = not_ready(&s, "lab".into()).expect("not ready");
        assert_eq!(
            (created.namespace.as_str(), created.name.as_str()),
            ("n", "s")
        );
        assert_eq!(created.since, 1_767_225_600.0);
        let condition = |status: &str| {
            serde_json::from_value(serde_json::json!({"conditions": [{
                "type": berth_crds::CONDITION_LB_READY, "status": status,
                "reason": "PoolExhausted", "message": "",
                "lastTransitionTime": "2026-01-01T00:01:00Z"
            }]}))
            .expect("status")
        };
        s.status = condition("False");
        assert_eq!(
            not_ready(&s, "lab".into()).map(|n| n.since),
            Some(1_767_225_660.0)
        );
        s.status = condition("True");
        assert_eq!(not_ready(&s, "lab".into()), None);
    }

    fn accepted(addresses: Option<(u64, u64)>) -> Verdict {
        Verdict {
            accepted: true,
            reason: "Accepted",
            message: "some provider".into(),
            addresses,
        }
    }

    #[test]
    fn status_is_rewritten_only_when_it_changes() {
        let verdict = accepted(Some((1, 5)));
        let mut c = class();
        let want = desired(&c, &verdict, 2, 1, at(10));
        assert!(changes(&c, &want), "no status yet");
        assert_eq!((want.allocated, want.available), (Some(1), Some(5)));
        assert_eq!(want.conditions[0].observed_generation, Some(2));
        c.status = Some(want.clone());
        let again = desired(&c, &verdict, 2, 1, at(20));
        assert!(!changes(&c, &again));
        assert_eq!(again.conditions[0].last_transition_time, at(10));
        assert!(changes(&c, &desired(&c, &verdict, 2, 2, at(20))));
        let broken = Verdict {
            accepted: false,
            reason: "InvalidSpec",
            message: "bad".into(),
            addresses: None,
        };
        let b = desired(&c, &broken, 2, 1, at(30));
        assert!(changes(&c, &b));
        assert_eq!(b.conditions[0].last_transition_time, at(30));
        assert_eq!(b.conditions[0].status, "False");
        assert_eq!(b.allocated, None);
    }

    #[test]
    fn the_apply_body_omits_counts_a_class_does_not_have() {
        let body =
            serde_json::to_value(desired(&class(), &accepted(None), 0, 0, at(1))).expect("json");
        assert!(body.get("allocated").is_none() && body.get("available").is_none());
        assert_eq!(body["readyServices"], 0);
    }
}
