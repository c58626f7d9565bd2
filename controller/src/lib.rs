//! berth's controller: provisions an AWS Network Load Balancer, or addresses from a pool,
//! for each LoadBalancer Service it owns and reports it in the Service's status.
//!
//! `run` only wires: watches feed the [`stores`] and queue Services; once this replica
//! leads, the [`service`] reconciler asks the [`provider`] registry for each Service, the
//! [`class`] writer keeps class status, [`announcers`] names who announces each pool
//! Service, providers do their housekeeping (the orphan sweep),
//! and every write goes through the leader fence ([`writes`], `provider::aws::fenced`).

pub mod announcers;
pub mod class;
pub mod config;
pub mod leader;
pub mod metrics;
pub mod provider;
pub mod reason;
pub mod service;
pub mod stores;
pub mod writes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use berth_crds::{LABEL_SERVICE_NAME, LoadBalancerClass};
use berth_runtime::Fence;
use berth_runtime::watch::{self, Change, Fingerprints};
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;

pub use config::Config;
use provider::aws::readiness::{self, Gates};
use provider::aws::{AwsProvider, client::Aws};
use provider::pool::PoolProvider;
use provider::{Provider, Registry};
use stores::{Stores, Trigger};

/// A fatal error of the controller process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("admin server on {0}: {1}")]
    Admin(String, #[source] std::io::Error),
    #[error("lost leadership")]
    LostLeadership,
}

/// What about a node matters to load balancers; a change re-syncs targets. Pure.
pub fn node_fingerprint(node: &Node) -> String {
    let labels: BTreeMap<String, String> = node.labels().clone();
    let taints: Vec<String> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|t| {
            t.iter()
                .map(|t| format!("{}={}", t.key, t.effect))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}|{:?}|{:?}|{}|{:?}",
        node.name_any(),
        node.spec.as_ref().and_then(|s| s.provider_id.clone()),
        labels,
        node.metadata.deletion_timestamp.is_some(),
        taints
    )
}

/// What about a Service matters to class status: its class, ownership record, readiness
/// and addresses. Pure.
pub fn service_fingerprint(svc: &Service) -> String {
    let spec = svc.spec.as_ref();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        spec.and_then(|s| s.type_.as_deref()),
        spec.and_then(|s| s.load_balancer_class.as_deref()),
        svc.annotations().get(berth_crds::ANNOTATION_OWNER_CLASS),
        service::status::current_condition(svc).map(|c| &c.status),
        provider::pool::allocation::status_ips(svc),
    )
}

fn trigger_all(services: &Store<Service>, tx: &Trigger) {
    for svc in services.state() {
        if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
            let _ = tx.unbounded_send(ObjectRef::from_obj(svc.as_ref()));
        }
    }
}

/// The AWS SDK configuration of `config` (region, endpoint; berth retries itself).
pub async fn aws_sdk(config: &Config) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone()))
        // berth retries itself, with its own limiter and metrics.
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
    if let Some(endpoint) = &config.aws_endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

fn identity(config: &Config) -> String {
    config.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            "{}-{}-{:04x}",
            host.trim(),
            std::process::id(),
            rand::random::<u16>()
        )
    })
}

/// The Service watch, the controller's own input: feeds the store, says when the first
/// list is in, and wakes the class writer when a Service's class-relevant state changes.
fn service_events(
    client: &Client,
    writer: reflector::store::Writer<Service>,
    synced: tokio::sync::watch::Sender<bool>,
    class_wake: Arc<Notify>,
) -> impl Stream<Item = Result<Service, watcher::Error>> + Send + 'static {
    let mut prints = Fingerprints::default();
    watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .inspect_ok(move |ev| {
        let change = watch::change_of(ev);
        if matches!(change, Change::Relisted) {
            let _ = synced.send(true);
        }
        if prints.observe(&change, service_fingerprint).is_some() {
            class_wake.notify_one();
        }
    })
    .applied_objects()
}

/// Spawns the watches of nodes, EndpointSlices, classes and namespaces; each change that
/// matters queues the Services it affects (and, for classes, wakes the class writer).
fn spawn_watches(
    client: &Client,
    services: &Store<Service>,
    tx: &Trigger,
    class_wake: &Arc<Notify>,
) -> (
    Store<Node>,
    Store<EndpointSlice>,
    Store<LoadBalancerClass>,
    Store<Namespace>,
) {
    (
        watch_nodes(client, services, tx, class_wake),
        watch_slices(client, tx),
        watch_classes(client, services, tx, class_wake),
        watch_namespaces(client, services, tx),
    )
}

/// A node change that matters to targets re-syncs every LoadBalancer Service; a change
/// of node addresses also re-checks the classes (a pool may not contain one).
fn watch_nodes(
    client: &Client,
    services: &Store<Service>,
    tx: &Trigger,
    class_wake: &Arc<Notify>,
) -> Store<Node> {
    let (nodes, writer) = reflector::store::<Node>();
    let (s, t, mut prints) = (services.clone(), tx.clone(), Fingerprints::default());
    let (wake, mut addresses) = (class_wake.clone(), Fingerprints::default());
    tokio::spawn(watch::feed(
        Api::all(client.clone()),
        watcher::Config::default(),
        writer,
        move |c| {
            let moved = addresses.observe(&c, node_address_fingerprint).is_some();
            if prints.observe(&c, node_fingerprint).is_some() || moved {
                trigger_all(&s, &t);
            }
            if moved {
                wake.notify_one();
            }
        },
    ));
    nodes
}

/// A node's addresses, as pool classes are checked against them. Pure.
pub fn node_address_fingerprint(node: &Node) -> Vec<String> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .map(|a| format!("{}={}", a.type_, a.address))
        .collect()
}

/// An EndpointSlice change queues its Service (ip targets follow the pods).
fn watch_slices(client: &Client, tx: &Trigger) -> Store<EndpointSlice> {
    let (slices, writer) = reflector::store::<EndpointSlice>();
    let t = tx.clone();
    tokio::spawn(watch::feed(
        Api::all(client.clone()),
        watcher::Config::default(),
        writer,
        move |c| {
            if let Change::Applied(slice) | Change::Deleted(slice) = c
                && let (Some(ns), Some(name)) =
                    (slice.namespace(), slice.labels().get(LABEL_SERVICE_NAME))
            {
                let _ = t.unbounded_send(ObjectRef::new(name).within(&ns));
            }
        },
    ));
    slices
}

/// What about a gated pod matters to its Services and its gate: labels, address,
/// readiness of its containers and of berth's gate, termination. Pure.
pub fn pod_fingerprint(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let conditions: Vec<String> = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.type_ == "ContainersReady" || c.type_ == berth_crds::CONDITION_TARGET_HEALTH)
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    format!(
        "{:?}|{:?}|{:?}|{}",
        pod.labels(),
        status.and_then(|s| s.pod_ip.as_deref()),
        conditions,
        pod.metadata.deletion_timestamp.is_some()
    )
}

/// A change of a pod with berth's readiness gate queues the LoadBalancer Services
/// selecting it (a pod only waiting for the gate is registered although its endpoint is
/// not ready) and wakes the gate writer.
fn watch_pods(
    client: &Client,
    services: &Store<Service>,
    tx: &Trigger,
    gates: &Arc<Gates>,
) -> Store<Pod> {
    let (pods, writer) = reflector::store::<Pod>();
    let (s, t, g, mut prints) = (
        services.clone(),
        tx.clone(),
        gates.clone(),
        Fingerprints::default(),
    );
    tokio::spawn(watch::feed(
        Api::all(client.clone()),
        watcher::Config::default(),
        writer,
        move |c| {
            // Pods without the gate are tracked through their EndpointSlices already.
            let print = |p: &Pod| {
                if readiness::has_gate(p) {
                    pod_fingerprint(p)
                } else {
                    String::new()
                }
            };
            let delta = prints.observe(&c, print);
            let (Change::Applied(pod) | Change::Deleted(pod)) = c else {
                return;
            };
            if delta.is_none() || !readiness::has_gate(pod) {
                return;
            }
            for svc in s.state().iter().filter(|svc| readiness::selects(svc, pod)) {
                let _ = t.unbounded_send(ObjectRef::from_obj(svc.as_ref()));
            }
            g.wake();
        },
    ));
    pods
}

/// A class spec change re-checks every Service and the class status; the class status
/// berth writes itself must not re-trigger, so only the generation counts.
fn watch_classes(
    client: &Client,
    services: &Store<Service>,
    tx: &Trigger,
    class_wake: &Arc<Notify>,
) -> Store<LoadBalancerClass> {
    let (classes, writer) = reflector::store::<LoadBalancerClass>();
    let (s, t, wake) = (services.clone(), tx.clone(), class_wake.clone());
    let mut prints = Fingerprints::default();
    tokio::spawn(watch::feed(
        Api::all(client.clone()),
        watcher::Config::default(),
        writer,
        move |c| {
            if prints
                .observe(&c, |k: &LoadBalancerClass| k.metadata.generation)
                .is_some()
            {
                trigger_all(&s, &t);
                wake.notify_one();
            }
        },
    ));
    classes
}

/// Namespace labels feed pool classes' namespaceSelector: a change re-checks the
/// namespace's Services.
fn watch_namespaces(client: &Client, services: &Store<Service>, tx: &Trigger) -> Store<Namespace> {
    let (namespaces, writer) = reflector::store::<Namespace>();
    let (s, t, mut prints) = (services.clone(), tx.clone(), Fingerprints::default());
    tokio::spawn(watch::feed(
        Api::all(client.clone()),
        watcher::Config::default(),
        writer,
        move |c| {
            let labels = |n: &Namespace| n.labels().clone();
            if let (Some(watch::Delta::Changed(_)), Change::Applied(ns)) =
                (prints.observe(&c, labels), &c)
            {
                let name = ns.name_any();
                for svc in s
                    .state()
                    .iter()
                    .filter(|svc| svc.namespace().as_deref() == Some(name.as_str()))
                {
                    let _ = t.unbounded_send(ObjectRef::from_obj(svc.as_ref()));
                }
            }
        },
    ));
    namespaces
}

/// The reconcile context: the fenced writer and the providers.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a distinct piece made by run(); a struct would only rename them"
)]
async fn context(
    client: &Client,
    config: &Config,
    identity: &str,
    stores: Stores,
    fence: Fence,
    tx: Trigger,
    metrics: Arc<metrics::Metrics>,
    gates: Arc<Gates>,
) -> Arc<service::Context> {
    let reporter = Reporter {
        controller: berth_crds::CONTROLLER_MANAGER.into(),
        instance: Some(identity.to_string()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let writer = writes::Writer::new(client.clone(), recorder, fence.clone(), metrics.clone());
    let sdk = aws_sdk(config).await;
    let aws = Aws::new(
        &sdk,
        (config.aws_qps, config.aws_burst),
        config.aws_api_limits,
        metrics.clone(),
    );
    let aws = AwsProvider::new(
        aws,
        fence,
        stores.clone(),
        config.clone(),
        client.clone(),
        metrics.clone(),
    )
    .with_gates(gates);
    let pool = PoolProvider::new(stores.clone(), tx);
    let providers: Vec<Arc<dyn Provider>> = vec![Arc::new(pool), Arc::new(aws)];
    let registry = Registry::new(providers);
    Arc::new(service::Context::new(
        writer,
        config.clone(),
        stores,
        registry,
        metrics,
    ))
}

/// Resolves true when leadership is lost, false on a shutdown signal.
fn stop_signal(
    elector: Arc<leader::LeaderElector>,
    elect: bool,
) -> futures::channel::oneshot::Receiver<bool> {
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<bool>();
    tokio::spawn(async move {
        let lost = tokio::select! {
            _ = elector.hold(), if elect => true,
            _ = shutdown_signal() => false,
        };
        let _ = stop_tx.send(lost);
    });
    stop_rx
}

/// Work besides the reconciler while leading; all of it stops when leadership is lost.
fn spawn_leader_work(
    ctx: &Arc<service::Context>,
    class_wake: Arc<Notify>,
    gates: Arc<Gates>,
    leases: announcers::Leases,
) {
    let token = ctx.writer.fence().token();
    let c = ctx.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = token.cancelled() => {}
            () = c.providers.maintain() => {}
        }
    });
    class_wake.notify_one();
    tokio::spawn(class::run(ctx.clone(), class_wake));
    let (c, token) = (ctx.clone(), ctx.writer.fence().token());
    tokio::spawn(async move {
        tokio::select! {
            () = token.cancelled() => {}
            () = readiness::run(c, gates) => {}
        }
    });
    tokio::spawn(announcers::run(ctx.clone(), leases));
}

/// Serves `/healthz`, `/readyz` and `/metrics` on the admin address.
async fn serve_admin(config: &Config, metrics: &Arc<metrics::Metrics>) -> Result<(), RunError> {
    let listener = berth_runtime::admin::bind(&config.admin_addr)
        .await
        .map_err(|e| RunError::Admin(config.admin_addr.clone(), e))?;
    tokio::spawn(
        berth_runtime::admin::Server::default()
            .serve(listener, metrics::admin_routes(metrics.clone())),
    );
    Ok(())
}

/// The ServiceAccount named by `--lease-owner-service-account` as an owner reference;
/// `None` (a warning) when it cannot be read: the Lease is then only deleted on shutdown.
async fn lease_owner(client: &Client, config: &Config) -> Option<OwnerReference> {
    let name = config.lease_owner_service_account.as_deref()?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &config.lease_namespace);
    match api.get(name).await {
        Ok(sa) => sa.controller_owner_ref(&()).map(|mut r| {
            // An owner, not a controller: nothing else is implied by it.
            r.controller = None;
            r
        }),
        Err(e) => {
            tracing::warn!(error = %e, service_account = name, "reading the leader Lease's owner");
            None
        }
    }
}

/// The leader elector; `None` after a shutdown signal while waiting for leadership.
async fn lead(
    client: &Client,
    config: &Config,
    identity: &str,
    fence: &Fence,
) -> Option<Arc<leader::LeaderElector>> {
    let mut elector = leader::LeaderElector::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        identity,
        config.lease_duration,
        fence.clone(),
    );
    if let Some(owner) = lease_owner(client, config).await {
        elector = elector.with_owner(owner);
    }
    let elector = Arc::new(elector);
    if config.leader_elect {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => {
                elector.release().await;
                return None;
            }
        }
    }
    Some(elector)
}

/// The last word of a replica that stepped down: what it wrote, what it was refused.
fn stepped_down(metrics: &metrics::Metrics) -> RunError {
    let (aws_calls, aws_mutating) = metrics.aws_totals();
    let (kube_writes, fenced_writes) = metrics.write_totals();
    tracing::error!(
        aws_calls,
        aws_mutating,
        kube_writes,
        fenced_writes,
        "lost leadership; exiting"
    );
    RunError::LostLeadership
}

pub async fn run(config: Config) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Arc::new(metrics::Metrics::default());
    serve_admin(&config, &metrics).await?;
    let identity = identity(&config);

    let (tx, rx) = futures::channel::mpsc::unbounded::<ObjectRef<Service>>();
    let class_wake = Arc::new(Notify::new());
    // The Service store's own readiness wakes only one waiter (the controller's runner);
    // everyone else learns it from this flag, set once the first full list is in the store.
    let (services, services_writer) = reflector::store::<Service>();
    let (synced_tx, services_synced) = tokio::sync::watch::channel(false);
    let events = service_events(&client, services_writer, synced_tx, class_wake.clone());
    let controller = Controller::for_stream(events, services.clone());
    let (nodes, slices, classes, namespaces) = spawn_watches(&client, &services, &tx, &class_wake);
    let gates = Arc::new(Gates::default());
    let pods = watch_pods(&client, &services, &tx, &gates);
    let _ = futures::join!(
        nodes.wait_until_ready(),
        slices.wait_until_ready(),
        classes.wait_until_ready(),
        namespaces.wait_until_ready()
    );
    let l2_namespace = config
        .l2_lease_namespace
        .as_deref()
        .unwrap_or(&config.lease_namespace);
    let leases = announcers::Leases::watch(&client, l2_namespace);
    let stores = Stores {
        services,
        services_synced,
        nodes,
        slices,
        classes,
        namespaces,
        pods,
    };
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "watches synced; waiting for leadership");

    let fence = if config.leader_elect {
        Fence::new()
    } else {
        Fence::unfenced()
    };
    let Some(elector) = lead(&client, &config, &identity, &fence).await else {
        return Ok(());
    };
    metrics.leader.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "leading");
    // Renew from now on: building the context and the providers' first inventory can take
    // longer than the Lease when AWS is slow or throttled.
    let stop = stop_signal(elector.clone(), config.leader_elect);

    let ctx = context(
        &client,
        &config,
        &identity,
        stores,
        fence,
        tx,
        metrics.clone(),
        gates.clone(),
    )
    .await;
    ctx.providers.prepare().await;
    spawn_leader_work(&ctx, class_wake, gates, leases);
    let (lost_tx, lost_rx) = futures::channel::oneshot::channel::<bool>();
    let shutdown = stop.map(move |r| {
        let _ = lost_tx.send(r.unwrap_or(false));
    });
    controller
        .with_config(ControllerConfig::default().concurrency(config.concurrency))
        .reconcile_on(rx)
        .graceful_shutdown_on(shutdown)
        .run(service::reconcile, service::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    metrics.leader.store(false, Ordering::Relaxed);
    if lost_rx.await.unwrap_or(false) {
        return Err(stepped_down(&metrics));
    }
    if config.leader_elect {
        elector.release().await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let signal = berth_runtime::signal::shutdown().await;
    tracing::info!(signal, "stopping");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_fingerprints_ignore_heartbeats_but_see_labels() {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"a": "1"}},
            "spec": {"providerID": "aws:///z/i-1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("node");
        let before = node_fingerprint(&n);
        n.status = None;
        assert_eq!(before, node_fingerprint(&n));
        n.metadata
            .labels
            .get_or_insert_default()
            .insert(berth_crds::LABEL_EXCLUDE_FROM_LB.into(), String::new());
        assert_ne!(before, node_fingerprint(&n));
    }

    #[test]
    fn service_fingerprints_see_readiness_but_not_resource_versions() {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "n", "resourceVersion": "1"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "berth.dev/lab"},
        }))
        .expect("service");
        let before = service_fingerprint(&s);
        s.metadata.resource_version = Some("2".into());
        assert_eq!(before, service_fingerprint(&s));
        s.status = serde_json::from_value(serde_json::json!({"conditions": [{
            "type": berth_crds::CONDITION_LB_READY, "status": "True", "reason": "Provisioned",
            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]}))
        .expect("status");
        assert_ne!(before, service_fingerprint(&s));
    }
}
