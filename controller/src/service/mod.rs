//! One Service's reconcile: ownership → finalizer → apply or cleanup → status.

pub mod nodeport;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_crds::{
    ANNOTATION_OWNER_CLASS, AwsProvider, FINALIZER, LABEL_SERVICE_NAME, LoadBalancerClass,
    class_name,
};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider::aws::annotations::{self as settings, SubnetChoice};
use crate::provider::aws::client::Aws;
use crate::provider::aws::deploy::{self as apply, ApplyError, Inventory};
use crate::provider::aws::model::{self, BuildError, TargetType, World};
use crate::provider::pool::allocation::{self as pool, Outcome, PoolClass};
use status::{Readiness, reason};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Kube(&'static str, #[source] kube::Error),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(..) => "kube",
            Error::Apply(ApplyError::Aws(_)) => "aws",
            Error::Apply(ApplyError::NameConflict(_)) => "name_conflict",
            Error::Apply(ApplyError::DeletionProtected(_)) => "deletion_protected",
        }
    }
}

/// When a subnet lookup was made, the VPC and the subnets it found.
type SubnetLookup = (Instant, Option<String>, Vec<String>);

pub type Trigger = futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>;

/// The stores a reconcile reads, for `Context::new`.
pub struct Stores {
    pub services: Store<Service>,
    /// True once the Service store holds the first full list.
    pub services_synced: tokio::sync::watch::Receiver<bool>,
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub classes: Store<LoadBalancerClass>,
    pub namespaces: Store<Namespace>,
}

/// What the reconciler needs: clients, stores, shared state.
pub struct Context {
    pub client: Client,
    pub aws: Aws,
    pub recorder: Recorder,
    pub config: Config,
    pub services: Store<Service>,
    pub services_synced: tokio::sync::watch::Receiver<bool>,
    pub nodes: Store<Node>,
    pub slices: Store<EndpointSlice>,
    pub classes: Store<LoadBalancerClass>,
    pub namespaces: Store<Namespace>,
    pub inventory: Inventory,
    pub metrics: Arc<Metrics>,
    /// Queues Services for a reconcile.
    pub trigger: Trigger,
    /// Pool addresses written by this process and not yet in the Service store; the lock
    /// is held for every allocation, so concurrent reconciles never hand out one address
    /// twice.
    pub reservations: Mutex<pool::Reservations>,
    /// Pool Services waiting for an address to free up.
    pending: Mutex<HashSet<ObjectRef<Service>>>,
    /// Subnet lookups by (choice, scheme, vpc), cached briefly.
    subnets: Mutex<HashMap<String, SubnetLookup>>,
    /// Services already counted in the creation→ready metric.
    ready_seen: Mutex<std::collections::HashSet<String>>,
}

impl Context {
    pub fn new(
        client: Client,
        aws: Aws,
        recorder: Recorder,
        config: Config,
        stores: Stores,
        metrics: Arc<Metrics>,
        trigger: Trigger,
    ) -> Self {
        Self {
            client,
            aws,
            recorder,
            config,
            services: stores.services,
            services_synced: stores.services_synced,
            nodes: stores.nodes,
            slices: stores.slices,
            classes: stores.classes,
            namespaces: stores.namespaces,
            inventory: Inventory::default(),
            metrics,
            trigger,
            reservations: Mutex::default(),
            pending: Mutex::default(),
            subnets: Mutex::default(),
            ready_seen: Mutex::default(),
        }
    }

    /// Whether a class this controller handles uses AWS; without one it never calls AWS
    /// (a bare-metal install has no credentials).
    pub fn uses_aws(&self) -> bool {
        self.classes
            .state()
            .iter()
            .any(|c| c.spec.aws.is_some() && self.config.handles_class(&c.name_any()))
    }

    /// Whether every store has delivered its first full list: allocating from a partial
    /// view of the Services could hand out an address that is already taken.
    pub fn synced(&self) -> bool {
        // Only for stores `run` awaited before reconciling: a store's readiness keeps one
        // waker, so polling one that is not ready yet would steal its waiter's.
        fn ready<K>(s: &Store<K>) -> bool
        where
            K: kube::Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            s.wait_until_ready()
                .now_or_never()
                .is_some_and(|r| r.is_ok())
        }
        *self.services_synced.borrow()
            && ready(&self.nodes)
            && ready(&self.slices)
            && ready(&self.classes)
            && ready(&self.namespaces)
    }

    /// Queues every pool Service waiting for an address (one was just released).
    fn retrigger_pending(&self) {
        let waiting: Vec<ObjectRef<Service>> = self
            .pending
            .lock()
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default();
        for r in waiting {
            let _ = self.trigger.unbounded_send(r);
        }
    }

    fn set_pending(&self, svc: &Service, waiting: bool) {
        if let Ok(mut p) = self.pending.lock() {
            let r = ObjectRef::from_obj(svc);
            if waiting {
                p.insert(r);
            } else {
                p.remove(&r);
            }
        }
    }
}

/// Whether `name` is a pool class (it exists and has a pool block).
pub fn is_pool_class(classes: &[Arc<LoadBalancerClass>], name: &str) -> bool {
    classes
        .iter()
        .any(|c| c.name_any() == name && c.spec.pool.is_some())
}

/// Every Service holding pool addresses, with this process's unsettled writes applied.
/// Call with the reservations locked.
pub fn pool_holders(
    services: &[Arc<Service>],
    classes: &[Arc<LoadBalancerClass>],
    reservations: &mut pool::Reservations,
) -> Vec<pool::Holder> {
    let by_uid: HashMap<&str, &Service> = services
        .iter()
        .filter_map(|s| Some((s.metadata.uid.as_deref()?, s.as_ref())))
        .collect();
    reservations.prune(|uid| by_uid.get(uid).map(|s| pool::status_ips(s)));
    let held = pool::holders(services.iter().map(|s| s.as_ref()), |c| {
        is_pool_class(classes, c)
    });
    reservations.apply(held, |uid| by_uid.get(uid).map(|s| pool::Holder::of(s)))
}

/// Whose Service this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// berth's, under the named class.
    Class(String),
    NotOurs,
}

/// A LoadBalancer Service with `berth.dev/<class>` (one this controller handles), or
/// without a class while a handled class is `default: true`. Pure.
pub fn ownership(svc: &Service, classes: &[Arc<LoadBalancerClass>], config: &Config) -> Ownership {
    let Some(spec) = svc.spec.as_ref() else {
        return Ownership::NotOurs;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Ownership::NotOurs;
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

fn svc_uid(svc: &Service) -> String {
    svc.metadata.uid.clone().unwrap_or_default()
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match reconcile_inner(&svc, &ctx).await {
        // A write guarded by the resourceVersion met a newer Service (changed meanwhile, or
        // the store had not caught up with our own last write): that version comes back.
        Err(Error::Kube(what, kube::Error::Api(s))) if s.code == 409 => {
            tracing::debug!(what, "the Service changed meanwhile; retrying");
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
    tracing::warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), error = %err, "reconcile failed");
    Action::requeue(crate::provider::aws::client::backoff(4) + Duration::from_secs(2))
}

/// Whether this controller cleans up a Service that is not (or no longer) its own but
/// carries berth's finalizer: when the class that provisioned it is one it handles. Pure.
pub fn cleans_up(svc: &Service, config: &Config) -> bool {
    match svc.annotations().get(ANNOTATION_OWNER_CLASS) {
        Some(class) => config.handles_class(class),
        None => config.classes.is_empty(),
    }
}

async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let classes = ctx.classes.state();
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
                // Before anything exists in AWS; the update triggers the next reconcile.
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

/// Before a Service changes class: what the previous provider holds is let go first. Pool
/// addresses leave the status before a non-pool class claims the Service (so the address
/// is free exactly when no status lists it); AWS resources are deleted before a pool class
/// writes its address. Between two pool classes the address stays if the new pool has it.
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
    let to_pool = is_pool_class(classes, class);
    if !to_pool && !pool::status_ips(svc).is_empty() {
        release_status(svc, ctx).await?;
        // The status write changed the resourceVersion the claim is guarded by; its event
        // brings the Service back.
        return Ok(Some(Action::await_change()));
    }
    if to_pool && !is_pool_class(classes, previous) && ctx.uses_aws() {
        return remove_aws(svc, ctx, false).await;
    }
    Ok(None)
}

/// Removes berth's status fields, then counts the Service's pool addresses as free.
/// Returns the Service as written (its new resourceVersion guards later writes).
async fn release_status(svc: &Service, ctx: &Context) -> Result<Service, Error> {
    let updated = services_api(ctx, svc)
        .patch_status(
            &svc.name_any(),
            &PatchParams::apply(berth_crds::CONTROLLER_MANAGER).force(),
            &Patch::Apply(status::status_patch(svc, None, &None)),
        )
        .await
        .map_err(|e| Error::Kube("clear status", e))?;
    released(svc, ctx);
    Ok(updated)
}

/// The Service no longer holds pool addresses (its status says so, or it is gone).
fn released(svc: &Service, ctx: &Context) {
    if let Ok(mut r) = ctx.reservations.lock() {
        r.set(&svc_uid(svc), Vec::new());
    }
    ctx.set_pending(svc, false);
    ctx.retrigger_pending();
}

fn services_api(ctx: &Context, svc: &Service) -> Api<Service> {
    Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default())
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
    patch_metadata_guarded(svc, ctx, metadata, "claim the Service").await
}

async fn remove_finalizer(svc: &Service, ctx: &Context) -> Result<(), Error> {
    let finalizers: Vec<String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let metadata = serde_json::json!({"finalizers": finalizers});
    match patch_metadata_guarded(svc, ctx, metadata, "update finalizers").await {
        Err(Error::Kube(_, kube::Error::Api(s))) if s.code == 404 => Ok(()),
        other => other,
    }
}

/// Merge-patches `metadata` of the Service together with the resourceVersion it was read
/// at: a concurrent change makes the write fail (409) instead of being overwritten.
async fn patch_metadata_guarded(
    svc: &Service,
    ctx: &Context,
    mut metadata: serde_json::Value,
    what: &'static str,
) -> Result<(), Error> {
    metadata["resourceVersion"] = serde_json::json!(svc.metadata.resource_version);
    services_api(ctx, svc)
        .patch(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": metadata })),
        )
        .await
        .map_err(|e| Error::Kube(what, e))?;
    Ok(())
}

async fn publish(ctx: &Context, svc: &Service, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &svc.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing event failed");
    }
}

/// Writes the condition and the ingress (`None`: keep the hostnames there; empty: none),
/// with an Event whenever the condition changes.
async fn report(
    ctx: &Context,
    svc: &Service,
    r: &Readiness,
    ingress: Option<Vec<LoadBalancerIngress>>,
) -> Result<(), Error> {
    let cond = status::condition(svc, r, Time(k8s_openapi::jiff::Timestamp::now()));
    let ingress = match ingress {
        Some(v) => Some(v).filter(|v| !v.is_empty()),
        None => status::hostname_ingress(svc),
    };
    if !status::status_changes(svc, &cond, &ingress) {
        return Ok(());
    }
    let previous = status::current_condition(svc).map(|c| (c.reason.clone(), c.message.clone()));
    if previous.as_ref() != Some(&(cond.reason.clone(), cond.message.clone())) {
        let type_ = if r.ready || r.reason == reason::PROVISIONING {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, svc, type_, &r.reason, r.message.clone()).await;
    }
    let body = status::status_patch(svc, Some(&cond), &ingress);
    services_api(ctx, svc)
        .patch_status(
            &svc.name_any(),
            &PatchParams::apply(berth_crds::CONTROLLER_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|e| Error::Kube("write status", e))?;
    Ok(())
}

/// Reports a problem the user has to fix: no retry until something changes (the periodic
/// resync still looks again).
async fn invalid(
    ctx: &Context,
    svc: &Service,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    report(ctx, svc, &Readiness::not_ready(reason, message), None).await?;
    Ok(Action::requeue(ctx.config.resync))
}

async fn provision(
    svc: &Service,
    ctx: &Context,
    class_name: &str,
    classes: &[Arc<LoadBalancerClass>],
) -> Result<Action, Error> {
    let Some(class) = classes.iter().find(|c| c.name_any() == class_name) else {
        return invalid(
            ctx,
            svc,
            reason::CLASS_NOT_FOUND,
            format!("LoadBalancerClass {class_name} does not exist"),
        )
        .await;
    };
    if let Some(spec) = class.spec.pool.as_ref() {
        return provision_pool(svc, ctx, class_name, spec, classes).await;
    }
    let Some(aws_class) = class.spec.aws.as_ref() else {
        return invalid(
            ctx,
            svc,
            reason::UNSUPPORTED_PROVIDER,
            format!("LoadBalancerClass {class_name} has no provider block"),
        )
        .await;
    };
    let settings = match settings::settings(svc, aws_class, &ctx.config.cluster_name) {
        Ok(s) => s,
        Err(errors) => {
            return invalid(ctx, svc, reason::INVALID_ANNOTATION, errors.join("; ")).await;
        }
    };

    if settings.target_type == TargetType::Instance && !nodeport::missing(svc).is_empty() {
        return allocate_node_ports(svc, ctx).await;
    }

    let (vpc, subnets) =
        match resolve_subnets(ctx, &settings.subnets, settings.scheme, aws_class).await {
            Ok(v) => v,
            Err(e) => return aws_failed(ctx, svc, e.into()).await,
        };
    let Some(vpc) = vpc
        .or_else(|| aws_class.vpc_id.clone())
        .or_else(|| ctx.config.vpc_id.clone())
    else {
        return invalid(
            ctx,
            svc,
            reason::NO_SUBNETS,
            "no subnets found for the load balancer".into(),
        )
        .await;
    };
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let slices: Vec<Arc<EndpointSlice>> = ctx.slices.state_filter(|s| {
        s.namespace().as_deref() == Some(ns.as_str())
            && s.labels().get(LABEL_SERVICE_NAME).map(String::as_str) == Some(name.as_str())
    });
    let nodes = ctx.nodes.state();
    let world = World {
        cluster: &ctx.config.cluster_name,
        vpc_id: &vpc,
        subnets: &subnets,
        nodes: &nodes,
        slices: &slices,
    };
    let desired = match model::build(svc, &settings, &world) {
        Ok(d) => d,
        Err(BuildError::NoSubnets) => {
            return invalid(
                ctx,
                svc,
                reason::NO_SUBNETS,
                BuildError::NoSubnets.to_string(),
            )
            .await;
        }
        Err(e @ BuildError::InvalidSpec(_)) => {
            return invalid(ctx, svc, reason::INVALID_SPEC, e.to_string()).await;
        }
    };
    let applied = match apply::ensure(&ctx.aws, &ctx.inventory, &desired, &svc_uid(svc)).await {
        Ok(a) => a,
        Err(e) => return aws_failed(ctx, svc, e).await,
    };
    let targets: String = applied
        .health
        .values()
        .map(|(h, t)| format!("{h}/{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    if applied.lb.state == "active" {
        let message = format!(
            "load balancer {} ({}) is active; healthy targets per port: {targets}",
            applied.lb.name, applied.lb.dns_name
        );
        let first = ctx
            .ready_seen
            .lock()
            .map(|mut s| s.insert(svc_uid(svc)))
            .unwrap_or(false);
        let was_ready = status::current_condition(svc).is_some_and(|c| c.status == "True");
        report(
            ctx,
            svc,
            &Readiness::ready(message),
            Some(status::ingress(svc, &applied.lb.dns_name)),
        )
        .await?;
        if first
            && !was_ready
            && let Some(created) = svc.metadata.creation_timestamp.as_ref()
        {
            let ms =
                k8s_openapi::jiff::Timestamp::now().as_millisecond() - created.0.as_millisecond();
            ctx.metrics.ready_seconds.observe(ms.max(0) as f64 / 1000.0);
        }
        Ok(Action::requeue(ctx.config.resync))
    } else {
        let message = format!("load balancer {} is {}", applied.lb.name, applied.lb.state);
        report(
            ctx,
            svc,
            &Readiness::not_ready(reason::PROVISIONING, message),
            Some(status::ingress(svc, &applied.lb.dns_name)),
        )
        .await?;
        Ok(Action::requeue(Duration::from_secs(3)))
    }
}

/// The pool provider: choose the Service's addresses under the allocation lock, reserve
/// them, write them into the status.
async fn provision_pool(
    svc: &Service,
    ctx: &Context,
    class_name: &str,
    spec: &berth_crds::PoolProvider,
    classes: &[Arc<LoadBalancerClass>],
) -> Result<Action, Error> {
    if !ctx.synced() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let class = match PoolClass::parse(class_name, spec) {
        Ok(c) => c,
        Err(errors) => {
            // A broken class spec must not take every Service's address away: keep them.
            let keep = pool::status_ips(svc);
            report(
                ctx,
                svc,
                &Readiness::not_ready(
                    reason::INVALID_SPEC,
                    format!(
                        "LoadBalancerClass {class_name} is not valid: {}",
                        errors.join("; ")
                    ),
                ),
                Some(status::ip_ingress(svc, &keep)),
            )
            .await?;
            return Ok(Action::requeue(ctx.config.resync));
        }
    };
    let ns = svc.namespace().unwrap_or_default();
    let ns_labels = ctx
        .namespaces
        .get(&ObjectRef::new(&ns))
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    let uid = svc_uid(svc);
    let (outcome, before) = {
        let Ok(mut reservations) = ctx.reservations.lock() else {
            return Ok(Action::requeue(Duration::from_secs(1)));
        };
        let holders = pool_holders(&ctx.services.state(), classes, &mut reservations);
        let mut me = pool::Holder::of(svc);
        me.ips = holders
            .iter()
            .find(|h| h.uid == uid)
            .map(|h| h.ips.clone())
            .unwrap_or_default();
        let others: Vec<pool::Holder> = holders.into_iter().filter(|h| h.uid != uid).collect();
        let outcome = pool::decide(svc, &class, &ns_labels, &me, &others);
        // Until the write lands, the Service holds both its old and its new addresses.
        let mut during: Vec<IpAddr> = me.ips.clone();
        if let Outcome::Assigned { ips, .. } = &outcome {
            during.extend(ips.iter().filter(|ip| !me.ips.contains(ip)));
        }
        reservations.set(&uid, during);
        (outcome, me.ips)
    };
    let (readiness, ips, moved) = match &outcome {
        Outcome::Assigned { ips, moved } => {
            let list: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            let message = format!(
                "{} {} from pool {class_name}",
                if ips.len() == 1 {
                    "address"
                } else {
                    "addresses"
                },
                list.join(", ")
            );
            (Readiness::ready(message), ips.clone(), moved.clone())
        }
        Outcome::Unassigned { reason, message } => (
            Readiness::not_ready(reason, message.clone()),
            Vec::new(),
            Vec::new(),
        ),
    };
    let written = report(ctx, svc, &readiness, Some(status::ip_ingress(svc, &ips))).await;
    if let Ok(mut r) = ctx.reservations.lock() {
        r.set(
            &uid,
            if written.is_ok() {
                ips.clone()
            } else {
                before.clone()
            },
        );
    }
    written?;
    for (old, new, why) in moved {
        publish(
            ctx,
            svc,
            EventType::Normal,
            "AddressMoved",
            format!("moved from {old} to {new}: {why}"),
        )
        .await;
    }
    let waiting = matches!(
        &outcome,
        Outcome::Unassigned { reason, .. } if *reason == pool::reason::POOL_EXHAUSTED
            || *reason == pool::reason::PORT_CONFLICT
            || *reason == pool::reason::ADDRESS_UNAVAILABLE
    );
    ctx.set_pending(svc, waiting);
    if before.iter().any(|ip| !ips.contains(ip)) {
        ctx.retrigger_pending();
    }
    Ok(Action::requeue(ctx.config.resync))
}

async fn aws_failed(ctx: &Context, svc: &Service, e: ApplyError) -> Result<Action, Error> {
    let reason = match &e {
        ApplyError::NameConflict(_) => reason::NAME_CONFLICT,
        ApplyError::DeletionProtected(_) => reason::DELETION_PROTECTED,
        ApplyError::Aws(_) => reason::AWS_ERROR,
    };
    report(ctx, svc, &Readiness::not_ready(reason, e.to_string()), None).await?;
    Err(e.into())
}

async fn resolve_subnets(
    ctx: &Context,
    choice: &SubnetChoice,
    scheme: model::Scheme,
    class: &AwsProvider,
) -> Result<(Option<String>, Vec<String>), crate::provider::aws::client::AwsError> {
    let vpc = class.vpc_id.clone().or_else(|| ctx.config.vpc_id.clone());
    let key = format!("{choice:?}/{scheme:?}/{vpc:?}");
    if let Ok(cache) = ctx.subnets.lock()
        && let Some((at, v, s)) = cache.get(&key)
        && at.elapsed() < Duration::from_secs(60)
        && !s.is_empty()
    {
        return Ok((v.clone(), s.clone()));
    }
    let (found_vpc, subnets) = ctx
        .aws
        .resolve_subnets(choice, scheme, vpc.as_deref(), &ctx.config.cluster_name)
        .await?;
    if let Ok(mut cache) = ctx.subnets.lock() {
        cache.insert(key, (Instant::now(), found_vpc.clone(), subnets.clone()));
    }
    Ok((found_vpc, subnets))
}

async fn allocate_node_ports(svc: &Service, ctx: &Context) -> Result<Action, Error> {
    let Some(range) = nodeport::parse_range(&ctx.config.node_port_range) else {
        return invalid(
            ctx,
            svc,
            reason::NODE_PORT_ALLOCATION,
            format!("bad --node-port-range {}", ctx.config.node_port_range),
        )
        .await;
    };
    let services = ctx.services.state();
    let mut used = nodeport::used_ports(services.iter().map(|s| s.as_ref()));
    let indexes = nodeport::missing(svc);
    for _ in 0..8 {
        let start = rand::random_range(*range.start()..=*range.end());
        let Some(chosen) = nodeport::choose(svc, &indexes, &used, &range, start) else {
            return invalid(
                ctx,
                svc,
                reason::NODE_PORT_ALLOCATION,
                "no free NodePort in the range".into(),
            )
            .await;
        };
        let patch = nodeport::patch(svc, &chosen);
        match services_api(ctx, svc)
            .patch(
                &svc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(ports = ?chosen, "allocated NodePorts");
                return Ok(Action::await_change());
            }
            // Taken by the apiserver's allocator meanwhile: mark and pick again.
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("allocated") => {
                used.extend(chosen.iter().map(|(_, p)| *p));
            }
            // The Service changed (failed test op or conflict): the next event retries.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Err(e) => return Err(Error::Kube("allocate NodePorts", e)),
        }
    }
    invalid(
        ctx,
        svc,
        reason::NODE_PORT_ALLOCATION,
        "NodePorts kept colliding; retrying later".into(),
    )
    .await
}

/// Names the Service's load balancer may have: the generated one and the annotation's.
fn candidate_names(svc: &Service, ctx: &Context) -> Vec<String> {
    let classes = ctx.classes.state();
    let mut names = Vec::new();
    let prefixes: Vec<String> = classes
        .iter()
        .filter_map(|c| c.spec.aws.as_ref()?.name_prefix.clone())
        .chain(std::iter::once("k8s".to_string()))
        .collect();
    for prefix in prefixes {
        names.push(model::resource_name(
            &prefix,
            &svc.namespace().unwrap_or_default(),
            &svc.name_any(),
            &format!("{}/{}", ctx.config.cluster_name, svc_uid(svc)),
        ));
    }
    if let Some(n) = svc.annotations().get(settings::annotations::NAME)
        && settings::valid_lb_name(n)
    {
        names.push(n.clone());
    }
    names.sort();
    names.dedup();
    names
}

/// Lets go of what the Service's recorded class provisioned (AWS resources, or only the
/// pool addresses), then clears its status and the finalizer.
async fn cleanup(
    svc: &Service,
    ctx: &Context,
    deleting: bool,
    classes: &[Arc<LoadBalancerClass>],
) -> Result<Action, Error> {
    let recorded = svc.annotations().get(ANNOTATION_OWNER_CLASS);
    let pool_owned = recorded.is_some_and(|c| is_pool_class(classes, c));
    if !pool_owned
        && ctx.uses_aws()
        && let Some(action) = remove_aws(svc, ctx, deleting).await?
    {
        return Ok(action);
    }
    if !deleting {
        // No longer ours (type or class changed): drop what berth wrote in the status.
        let updated = release_status(svc, ctx).await?;
        // Guarded by the version the status write produced, not the one read before it.
        remove_finalizer(&updated, ctx).await?;
    } else {
        remove_finalizer(svc, ctx).await?;
        released(svc, ctx);
    }
    Ok(Action::await_change())
}

/// Deletes the Service's AWS resources. `Some(action)` when that cannot finish now
/// (deletion protection).
async fn remove_aws(svc: &Service, ctx: &Context, deleting: bool) -> Result<Option<Action>, Error> {
    let keep_protection = svc
        .annotations()
        .get(settings::annotations::ATTRIBUTES)
        .and_then(|v| settings::parse_map(v, false).ok())
        .and_then(|m| m.get("deletion_protection.enabled").cloned())
        .is_some_and(|v| v == "true");
    let names = candidate_names(svc, ctx);
    match apply::remove(
        &ctx.aws,
        &ctx.inventory,
        &svc_uid(svc),
        &names,
        keep_protection,
    )
    .await
    {
        Ok(n) => {
            if n > 0 {
                publish(
                    ctx,
                    svc,
                    EventType::Normal,
                    "Deleted",
                    "deleted the load balancer and its target groups".into(),
                )
                .await;
            }
        }
        Err(e @ ApplyError::DeletionProtected(_)) => {
            report(
                ctx,
                svc,
                &Readiness::not_ready(reason::DELETION_PROTECTED, e.to_string()),
                None,
            )
            .await?;
            return Ok(Some(Action::requeue(Duration::from_secs(30))));
        }
        Err(e) => {
            if !deleting {
                report(
                    ctx,
                    svc,
                    &Readiness::not_ready(reason::AWS_ERROR, e.to_string()),
                    None,
                )
                .await?;
            }
            return Err(e.into());
        }
    }
    Ok(None)
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
                aws: Some(AwsProvider::default()),
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
