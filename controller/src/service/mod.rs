//! One Service's reconcile, knowing no provider: ownership → finalizer → the class's
//! provider ensures (or the recorded one releases) → status, conditions and events from
//! its [`Outcome`]. NodePorts are allocated here when a provider asks for them.

pub mod nodeport;
pub mod status;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_crds::{ANNOTATION_OWNER_CLASS, FINALIZER, LoadBalancerClass, class_name};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider::aws::adopt::{self, Adopter};
use crate::provider::{Ingress, Next, Note, Outcome, ProviderError, Readiness, Registry, Report};
use crate::reason;
use crate::stores::Stores;
use crate::writes::{Write, WriteError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("stopped: leadership was lost")]
    Stopped,
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Write(WriteError::Kube(..)) => "kube",
            Error::Write(WriteError::Fenced(..)) | Error::Stopped => crate::provider::FENCED,
            Error::Provider(e) => e.label,
        }
    }

    fn fenced(&self) -> bool {
        self.metric_label() == crate::provider::FENCED
    }
}

/// What the reconciler needs: the fenced writer, stores, the providers.
pub struct Context {
    pub writer: Writer,
    pub config: Config,
    pub stores: Stores,
    pub providers: Registry,
    pub metrics: Arc<Metrics>,
    /// Services already counted in the creation→ready metric.
    ready_seen: Mutex<HashSet<String>>,
}

impl Context {
    pub fn new(
        writer: Writer,
        config: Config,
        stores: Stores,
        providers: Registry,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            writer,
            config,
            stores,
            providers,
            metrics,
            ready_seen: Mutex::default(),
        }
    }
}

/// Whose Service this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// berth's, under the named class.
    Class(String),
    NotOurs,
}

/// A LoadBalancer Service with `berth.dev/<class>` (one this controller handles), or
/// without a class while a handled class is `default: true`. A Service the AWS Load
/// Balancer Controller would serve belongs to the one class adopting its NLBs (none while
/// several claim it) whenever a class opts in, default or not. Pure.
pub fn ownership(svc: &Service, classes: &[Arc<LoadBalancerClass>], config: &Config) -> Ownership {
    let Some(spec) = svc.spec.as_ref() else {
        return Ownership::NotOurs;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Ownership::NotOurs;
    }
    if adopt::lbc_serves(svc) {
        match adopt::adopter(classes) {
            Adopter::One(name) if config.handles_class(&name) => return Ownership::Class(name),
            Adopter::One(_) | Adopter::Conflict(_) => return Ownership::NotOurs,
            Adopter::None => {}
        }
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) => match class_name(c) {
            Some(name) if config.handles_class(name) => Ownership::Class(name.to_string()),
            _ => Ownership::NotOurs,
        },
        None => {
            let mut defaults: Vec<String> = classes
                .iter()
                .filter(|c| c.spec.default && config.handles_class(&c.name_any()))
                .map(|c| c.name_any())
                .collect();
            defaults.sort();
            defaults
                .into_iter()
                .next()
                .map(Ownership::Class)
                .unwrap_or(Ownership::NotOurs)
        }
    }
}

/// Whether this controller cleans up a Service that is not (or no longer) its own but
/// carries berth's finalizer: when the class that provisioned it is one it handles. Pure.
pub fn cleans_up(svc: &Service, config: &Config) -> bool {
    match svc.annotations().get(ANNOTATION_OWNER_CLASS) {
        Some(class) => config.handles_class(class),
        None => config.classes.is_empty(),
    }
}

fn svc_uid(svc: &Service) -> String {
    svc.metadata.uid.clone().unwrap_or_default()
}

/// Reconciles one Service; stops at once when leadership is lost (work that is ready
/// goes first, so it meets the fence and counts as refused instead of vanishing).
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let token = ctx.writer.fence().token();
    let result = tokio::select! {
        biased;
        r = reconcile_inner(&svc, &ctx) => r,
        () = token.cancelled() => Err(Error::Stopped),
    };
    let result = match result {
        // A write guarded by the resourceVersion met a newer Service (changed meanwhile, or
        // the store had not caught up with our own last write): that version comes back.
        Err(Error::Write(WriteError::Kube(what, kube::Error::Api(s)))) if s.code == 409 => {
            tracing::debug!(
                write = what.as_str(),
                "the Service changed meanwhile; retrying"
            );
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        other => other,
    };
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => ctx.metrics.reconcile("success", ""),
        Err(e) => ctx.metrics.reconcile("error", e.metric_label()),
    }
    result
}

pub fn error_policy(svc: Arc<Service>, err: &Error, _ctx: Arc<Context>) -> Action {
    let service = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
    if err.fenced() {
        // Not leading: the new leader has it.
        tracing::info!(%service, error = %err, "reconcile stopped");
        return Action::await_change();
    }
    tracing::warn!(%service, error = %err, "reconcile failed");
    Action::requeue(crate::provider::aws::client::backoff(4) + Duration::from_secs(2))
}

async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let classes = ctx.stores.classes.state();
    let owner = ownership(svc, &classes, &ctx.config);
    let has_finalizer = svc.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = svc.metadata.deletion_timestamp.is_some();
    match owner {
        Ownership::Class(class) if !deleting => {
            let recorded = svc.annotations().get(ANNOTATION_OWNER_CLASS);
            if !has_finalizer || recorded != Some(&class) {
                if let Some(wait) =
                    hand_over(svc, ctx, recorded.map(String::as_str), &class, &classes).await?
                {
                    return Ok(wait);
                }
                // Before the provider makes anything; the update triggers the next reconcile.
                claim(svc, ctx, &class).await?;
                return Ok(Action::await_change());
            }
            provision(svc, ctx, &class, &classes).await
        }
        _ if has_finalizer && cleans_up(svc, &ctx.config) => {
            cleanup(svc, ctx, deleting, &classes).await
        }
        _ => Ok(Action::await_change()),
    }
}

async fn provision(
    svc: &Service,
    ctx: &Context,
    class_name: &str,
    classes: &[Arc<LoadBalancerClass>],
) -> Result<Action, Error> {
    let Some(class) = classes.iter().find(|c| c.name_any() == class_name) else {
        let message = format!("LoadBalancerClass {class_name} does not exist");
        return finish(svc, ctx, Outcome::invalid(reason::CLASS_NOT_FOUND, message)).await;
    };
    let Some(provider) = ctx.providers.for_class(class) else {
        let message = format!("LoadBalancerClass {class_name} has no provider block");
        return finish(
            svc,
            ctx,
            Outcome::invalid(reason::UNSUPPORTED_PROVIDER, message),
        )
        .await;
    };
    let outcome = provider.ensure(svc, class).await;
    if outcome.next == Next::NodePorts {
        return allocate_node_ports(svc, ctx).await;
    }
    finish(svc, ctx, outcome).await
}

/// Turns a provider's outcome into status, events and the next reconcile.
async fn finish(svc: &Service, ctx: &Context, mut outcome: Outcome) -> Result<Action, Error> {
    let settle = outcome.settle.take();
    if let Some(e) = outcome.error.as_ref().filter(|e| e.is_fenced()) {
        if let Some(settle) = settle {
            settle(false);
        }
        return Err(e.clone().into());
    }
    let written = write_report(svc, ctx, &outcome.report).await;
    if let Some(settle) = settle {
        settle(written.is_ok());
    }
    written?;
    publish_all(svc, ctx, &outcome.events).await;
    if let Some(e) = outcome.error {
        return Err(e.into());
    }
    Ok(match outcome.next {
        Next::Requeue(after) => Action::requeue(after),
        Next::Done | Next::NodePorts => Action::requeue(ctx.config.resync),
    })
}

/// Writes what the report asks for; the Service as written when it wrote anything.
async fn write_report(
    svc: &Service,
    ctx: &Context,
    report: &Report,
) -> Result<Option<Service>, Error> {
    match report {
        Report::Keep => Ok(None),
        Report::Clear => clear_status(svc, ctx).await.map(Some),
        Report::Set { readiness, ingress } => {
            let ingress = match ingress {
                Ingress::Keep => status::kept_ingress(svc),
                Ingress::Set(v) => Some(v.clone()).filter(|v| !v.is_empty()),
            };
            set_status(svc, ctx, readiness, ingress).await
        }
    }
}

/// Before a Service changes class to one of another provider, the previous provider lets
/// go first: pool addresses leave the status before the new class claims the Service (so
/// an address is free exactly when no status lists it); AWS resources are deleted before
/// a pool class writes its address. Within one provider the provider carries it over.
/// `Some(action)` when the hand-over cannot finish now.
async fn hand_over(
    svc: &Service,
    ctx: &Context,
    recorded: Option<&str>,
    class: &str,
    classes: &[Arc<LoadBalancerClass>],
) -> Result<Option<Action>, Error> {
    let Some(previous) = recorded.filter(|r| *r != class) else {
        return Ok(None);
    };
    let next = classes
        .iter()
        .find(|c| c.name_any() == class)
        .and_then(|c| ctx.providers.for_class(c))
        .map(|p| p.name());
    for provider in ctx.providers.holding(classes, Some(previous)) {
        if Some(provider.name()) == next {
            continue;
        }
        let mut outcome = provider.release(svc, false).await;
        if outcome.report == Report::Clear {
            let settle = outcome.settle.take();
            let cleared = clear_status(svc, ctx).await;
            if let Some(settle) = settle {
                settle(cleared.is_ok());
            }
            cleared?;
            // The status write changed the resourceVersion the claim is guarded by; its
            // event brings the Service back.
            return Ok(Some(Action::await_change()));
        }
        if outcome.next != Next::Done || outcome.error.is_some() {
            return finish(svc, ctx, outcome).await.map(Some);
        }
        if let Some(settle) = outcome.settle.take() {
            settle(true);
        }
        publish_all(svc, ctx, &outcome.events).await;
    }
    Ok(None)
}

/// Lets go of what the Service's recorded class provisioned, then clears its status and
/// the finalizer.
async fn cleanup(
    svc: &Service,
    ctx: &Context,
    deleting: bool,
    classes: &[Arc<LoadBalancerClass>],
) -> Result<Action, Error> {
    let recorded = svc.annotations().get(ANNOTATION_OWNER_CLASS);
    let mut settles = Vec::new();
    for provider in ctx.providers.holding(classes, recorded.map(String::as_str)) {
        let mut outcome = provider.release(svc, deleting).await;
        if outcome.next != Next::Done || outcome.error.is_some() {
            return finish(svc, ctx, outcome).await;
        }
        settles.extend(outcome.settle.take());
        publish_all(svc, ctx, &outcome.events).await;
    }
    let done = if deleting {
        remove_finalizer(svc, ctx).await
    } else {
        // No longer ours (type or class changed): drop what berth wrote in the status,
        // then the finalizer, guarded by the version the status write produced.
        match clear_status(svc, ctx).await {
            Ok(updated) => remove_finalizer(&updated, ctx).await,
            Err(e) => Err(e),
        }
    };
    for settle in settles {
        settle(done.is_ok());
    }
    done?;
    Ok(Action::await_change())
}

fn services_api(ctx: &Context, svc: &Service) -> Api<Service> {
    Api::namespaced(
        ctx.writer.client().clone(),
        &svc.namespace().unwrap_or_default(),
    )
}

/// Removes berth's status fields. Returns the Service as written (its new
/// resourceVersion guards later writes).
async fn clear_status(svc: &Service, ctx: &Context) -> Result<Service, Error> {
    let body = status::status_patch(svc, None, &None);
    let api = services_api(ctx, svc);
    let written = ctx
        .writer
        .apply_status(&api, &svc.name_any(), body, Write::ServiceStatus)
        .await?;
    Ok(written)
}

/// Adds the finalizer and records the class, in one write guarded by the resourceVersion.
async fn claim(svc: &Service, ctx: &Context, class: &str) -> Result<(), Error> {
    let mut finalizers = svc.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.into());
    }
    let metadata = serde_json::json!({
        "finalizers": finalizers,
        "annotations": {ANNOTATION_OWNER_CLASS: class},
    });
    patch_metadata_guarded(svc, ctx, metadata).await
}

async fn remove_finalizer(svc: &Service, ctx: &Context) -> Result<(), Error> {
    let finalizers: Vec<String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let metadata = serde_json::json!({"finalizers": finalizers});
    match patch_metadata_guarded(svc, ctx, metadata).await {
        Err(Error::Write(WriteError::Kube(_, kube::Error::Api(s)))) if s.code == 404 => Ok(()),
        other => other,
    }
}

/// Merge-patches `metadata` of the Service together with the resourceVersion it was read
/// at: a concurrent change makes the write fail (409) instead of being overwritten.
async fn patch_metadata_guarded(
    svc: &Service,
    ctx: &Context,
    mut metadata: serde_json::Value,
) -> Result<(), Error> {
    metadata["resourceVersion"] = serde_json::json!(svc.metadata.resource_version);
    let body = serde_json::json!({ "metadata": metadata });
    let api = services_api(ctx, svc);
    ctx.writer
        .merge(&api, &svc.name_any(), body, Write::ServiceMetadata)
        .await?;
    Ok(())
}

async fn publish(ctx: &Context, svc: &Service, warning: bool, reason: &str, message: &str) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.writer.publish(&ev, &svc.object_ref(&())).await;
}

async fn publish_all(svc: &Service, ctx: &Context, notes: &[Note]) {
    for n in notes {
        publish(ctx, svc, n.warning, n.reason, &n.message).await;
    }
}

/// Writes the condition and the ingress (None: none), with an Event whenever the
/// condition changes; counts the first time a Service turns ready. The Service as written
/// when anything changed.
async fn set_status(
    svc: &Service,
    ctx: &Context,
    r: &Readiness,
    ingress: Option<Vec<k8s_openapi::api::core::v1::LoadBalancerIngress>>,
) -> Result<Option<Service>, Error> {
    let cond = status::condition(svc, r, Time(k8s_openapi::jiff::Timestamp::now()));
    if !status::status_changes(svc, &cond, &ingress) {
        return Ok(None);
    }
    let previous = status::current_condition(svc);
    if previous.map(|c| (&c.reason, &c.message)) != Some((&cond.reason, &cond.message)) {
        let warning = !(r.ready || r.reason == reason::PROVISIONING);
        publish(ctx, svc, warning, &r.reason, &r.message).await;
    }
    let was_ready = previous.is_some_and(|c| c.status == "True");
    let body = status::status_patch(svc, Some(&cond), &ingress);
    let api = services_api(ctx, svc);
    let written = ctx
        .writer
        .apply_status(&api, &svc.name_any(), body, Write::ServiceStatus)
        .await?;
    if r.ready && !was_ready {
        observe_ready(svc, ctx);
    }
    Ok(Some(written))
}

/// Counts the time from creation to ready, once per Service and process.
fn observe_ready(svc: &Service, ctx: &Context) {
    let first = ctx
        .ready_seen
        .lock()
        .map(|mut s| s.insert(svc_uid(svc)))
        .unwrap_or(false);
    if first && let Some(created) = svc.metadata.creation_timestamp.as_ref() {
        let ms = k8s_openapi::jiff::Timestamp::now().as_millisecond() - created.0.as_millisecond();
        ctx.metrics.ready_seconds.observe(ms.max(0) as f64 / 1000.0);
    }
}

/// NodePorts for the ports that lack one, chosen among the free ones; the apiserver's
/// allocator has the last word.
async fn allocate_node_ports(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let invalid = |message: String| Outcome::invalid(reason::NODE_PORT_ALLOCATION, message);
    let Some(range) = nodeport::parse_range(&ctx.config.node_port_range) else {
        let message = format!("bad --node-port-range {}", ctx.config.node_port_range);
        return finish(svc, ctx, invalid(message)).await;
    };
    let services = ctx.stores.services.state();
    let mut used = nodeport::used_ports(services.iter().map(|s| s.as_ref()));
    let indexes = nodeport::missing(svc);
    let api = services_api(ctx, svc);
    for _ in 0..8 {
        let start = rand::random_range(*range.start()..=*range.end());
        let Some(chosen) = nodeport::choose(svc, &indexes, &used, &range, start) else {
            return finish(svc, ctx, invalid("no free NodePort in the range".into())).await;
        };
        let patch = nodeport::patch(svc, &chosen);
        match ctx
            .writer
            .merge(&api, &svc.name_any(), patch, Write::NodePorts)
            .await
        {
            Ok(_) => {
                tracing::info!(ports = ?chosen, "allocated NodePorts");
                return Ok(Action::await_change());
            }
            // Taken by the apiserver's allocator meanwhile: mark and pick again.
            Err(WriteError::Kube(_, kube::Error::Api(s)))
                if s.code == 422 && s.message.contains("allocated") =>
            {
                used.extend(chosen.iter().map(|(_, p)| *p));
            }
            // The Service changed (failed test op or conflict): the next event retries.
            Err(WriteError::Kube(_, kube::Error::Api(s))) if s.code == 409 || s.code == 422 => {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let message = "NodePorts kept colliding; retrying later".to_string();
    finish(svc, ctx, invalid(message)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn class(name: &str, default: bool) -> Arc<LoadBalancerClass> {
        let mut c = LoadBalancerClass::new(
            name,
            berth_crds::LoadBalancerClassSpec {
                default,
                aws: Some(berth_crds::AwsProvider::default()),
                pool: None,
            },
        );
        c.metadata.name = Some(name.into());
        Arc::new(c)
    }

    fn svc(type_: &str, class: Option<&str>) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n"},
            "spec": {"type": type_, "loadBalancerClass": class, "ports": [{"port": 80}]}
        }))
        .expect("service")
    }

    #[test]
    fn ownership_by_class_or_default() {
        let all = Config::try_parse_from(["x"]).expect("config");
        let only_b = Config::try_parse_from(["x", "--class", "b"]).expect("config");
        let classes = vec![class("a", true), class("b", false)];
        assert_eq!(
            ownership(&svc("LoadBalancer", Some("berth.dev/b")), &classes, &all),
            Ownership::Class("b".into())
        );
        assert_eq!(
            ownership(&svc("LoadBalancer", None), &classes, &all),
            Ownership::Class("a".into())
        );
        assert_eq!(
            ownership(&svc("LoadBalancer", None), &classes, &only_b),
            Ownership::NotOurs
        );
        assert_eq!(
            ownership(
                &svc("LoadBalancer", Some("service.k8s.aws/nlb")),
                &classes,
                &all
            ),
            Ownership::NotOurs
        );
        assert_eq!(
            ownership(&svc("NodePort", Some("berth.dev/b")), &classes, &all),
            Ownership::NotOurs
        );
        assert_eq!(
            ownership(&svc("LoadBalancer", Some("berth.dev/a")), &classes, &only_b),
            Ownership::NotOurs
        );
        let no_default = vec![class("b", false)];
        assert_eq!(
            ownership(&svc("LoadBalancer", None), &no_default, &all),
            Ownership::NotOurs
        );
        // A class that does not exist (yet) still marks the Service as berth's: it gets a
        // ClassNotFound condition instead of silence.
        assert_eq!(
            ownership(
                &svc("LoadBalancer", Some("berth.dev/zz")),
                &no_default,
                &all
            ),
            Ownership::Class("zz".into())
        );
    }

    #[test]
    fn the_adopting_class_owns_what_the_aws_load_balancer_controller_would_serve() {
        let all = Config::try_parse_from(["x"]).expect("config");
        let only_b = Config::try_parse_from(["x", "--class", "b"]).expect("config");
        let mut adopting = (*class("m", false)).clone();
        if let Some(aws) = adopting.spec.aws.as_mut() {
            aws.adopt_from = Some(vec![berth_crds::AdoptSource::AwsLoadBalancerController]);
        }
        let adopting = Arc::new(adopting);
        let lbc = svc("LoadBalancer", Some(adopt::LBC_CLASS));
        let mut legacy = svc("LoadBalancer", None);
        legacy.metadata.annotations = Some(
            [(
                berth_crds::annotations::LB_TYPE.to_string(),
                "nlb-ip".to_string(),
            )]
            .into(),
        );
        let without = vec![class("a", true), class("b", false)];
        assert_eq!(ownership(&lbc, &without, &all), Ownership::NotOurs);
        assert_eq!(
            ownership(&legacy, &without, &all),
            Ownership::Class("a".into()),
            "no opt-in: the default class, as before"
        );
        let with = vec![class("a", true), adopting.clone()];
        assert_eq!(ownership(&lbc, &with, &all), Ownership::Class("m".into()));
        assert_eq!(
            ownership(&legacy, &with, &all),
            Ownership::Class("m".into())
        );
        assert_eq!(ownership(&lbc, &with, &only_b), Ownership::NotOurs);
        assert_eq!(
            ownership(&legacy, &with, &only_b),
            Ownership::NotOurs,
            "another controller's class adopts it"
        );
        let mut second = (*adopting).clone();
        second.metadata.name = Some("n".into());
        let conflict = vec![class("a", true), adopting, Arc::new(second)];
        assert_eq!(ownership(&lbc, &conflict, &all), Ownership::NotOurs);
        assert_eq!(ownership(&legacy, &conflict, &all), Ownership::NotOurs);
    }

    #[test]
    fn only_the_provisioning_class_cleans_up() {
        let all = Config::try_parse_from(["x"]).expect("config");
        let only_b = Config::try_parse_from(["x", "--class", "b"]).expect("config");
        let mut s = svc("ClusterIP", None);
        assert!(cleans_up(&s, &all));
        assert!(
            !cleans_up(&s, &only_b),
            "unknown owner: a restricted controller keeps out"
        );
        let ann = s.metadata.annotations.get_or_insert_default();
        ann.insert(ANNOTATION_OWNER_CLASS.into(), "b".into());
        assert!(cleans_up(&s, &only_b));
        let ann = s.metadata.annotations.get_or_insert_default();
        ann.insert(ANNOTATION_OWNER_CLASS.into(), "a".into());
        assert!(!cleans_up(&s, &only_b));
        assert!(cleans_up(&s, &all));
    }
}
