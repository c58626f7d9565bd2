//! berth's controller: provisions an AWS Network Load Balancer, or addresses from a pool,
//! for each LoadBalancer Service it owns and reports it in the Service's status.
//!
//! `run` wires the watches (reflector stores for Services, Nodes, EndpointSlices,
//! LoadBalancerClasses and Namespaces), the admin server, leader election, the orphan sweep
//! and the reconciler. The logic lives in the modules: [`service`] (one Service's
//! reconcile: ownership, finalizer, NodePorts, status) and [`provider`] (AWS and pools).

pub mod admin;
pub mod config;
pub mod leader;
pub mod metrics;
pub mod provider;
pub mod service;

use provider::aws::{client as aws, gc};
use provider::pool::allocation as pool;
use service as reconcile;
use service::status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use berth_crds::{LABEL_SERVICE_NAME, LoadBalancerClass};
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

pub use config::Config;

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

use reconcile::Trigger;

fn trigger_all(services: &Store<Service>, tx: &Trigger) {
    for svc in services.state() {
        if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
            let _ = tx.unbounded_send(ObjectRef::from_obj(svc.as_ref()));
        }
    }
}

async fn aws_sdk(config: &Config) -> aws_config::SdkConfig {
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

pub async fn run(config: Config) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let listener = tokio::net::TcpListener::bind(&config.admin_addr)
        .await
        .map_err(|e| RunError::Admin(config.admin_addr.clone(), e))?;
    tokio::spawn(admin::serve(listener, metrics.clone()));

    let identity = config.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            "{}-{}-{:04x}",
            host.trim(),
            std::process::id(),
            rand::random::<u16>()
        )
    });
    let sdk = aws_sdk(&config).await;
    let aws = aws::Aws::new(&sdk, config.aws_qps, config.aws_burst, metrics.clone());

    let (tx, rx) = futures::channel::mpsc::unbounded::<ObjectRef<Service>>();
    // The Service store's own readiness wakes only one waiter (the controller's runner);
    // everyone else learns it from this flag, set once the first full list is in the store.
    let (services, services_writer) = reflector::store::<Service>();
    let (synced_tx, services_synced) = tokio::sync::watch::channel(false);
    let service_events = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(services_writer)
    .inspect_ok(move |ev| {
        if matches!(ev, watcher::Event::InitDone) {
            let _ = synced_tx.send(true);
        }
    })
    .applied_objects();
    let controller = Controller::for_stream(service_events, services.clone());

    let (nodes, nodes_writer) = reflector::store::<Node>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (classes, classes_writer) = reflector::store::<LoadBalancerClass>();
    let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
    {
        let (services, tx, nodes_r) = (services.clone(), tx.clone(), nodes.clone());
        let stream = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(nodes_writer)
            .touched_objects();
        tokio::spawn(async move {
            let mut last = String::new();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if item.is_err() {
                    continue;
                }
                let mut prints: Vec<String> = nodes_r
                    .state()
                    .iter()
                    .map(|n| node_fingerprint(n))
                    .collect();
                prints.sort();
                let now = prints.join("\n");
                if now != last {
                    last = now;
                    trigger_all(&services, &tx);
                }
            }
        });
    }
    {
        let tx = tx.clone();
        let stream = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(slices_writer)
        .touched_objects();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let Ok(slice) = item else { continue };
                if let (Some(ns), Some(name)) =
                    (slice.namespace(), slice.labels().get(LABEL_SERVICE_NAME))
                {
                    let _ = tx.unbounded_send(ObjectRef::new(name).within(&ns));
                }
            }
        });
    }
    {
        let (services, tx, classes_r) = (services.clone(), tx.clone(), classes.clone());
        let stream = watcher(
            Api::<LoadBalancerClass>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(classes_writer)
        .touched_objects();
        tokio::spawn(async move {
            // Spec changes only: the class status berth writes itself must not re-trigger.
            let mut last = Vec::new();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if item.is_err() {
                    continue;
                }
                let mut now: Vec<(String, Option<i64>)> = classes_r
                    .state()
                    .iter()
                    .map(|c| (c.name_any(), c.metadata.generation))
                    .collect();
                now.sort();
                if now != last {
                    last = now;
                    trigger_all(&services, &tx);
                }
            }
        });
    }
    {
        // Namespace labels feed pool classes' namespaceSelector: a change re-checks the
        // namespace's Services.
        let (services, tx) = (services.clone(), tx.clone());
        let stream = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(namespaces_writer)
        .touched_objects();
        tokio::spawn(async move {
            let mut seen: std::collections::HashMap<String, BTreeMap<String, String>> =
                Default::default();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let Ok(ns) = item else { continue };
                let (name, labels) = (ns.name_any(), ns.labels().clone());
                if seen.get(&name) == Some(&labels) {
                    continue;
                }
                let known = seen.insert(name.clone(), labels).is_some();
                if known {
                    for svc in services.state() {
                        if svc.namespace().as_deref() == Some(name.as_str()) {
                            let _ = tx.unbounded_send(ObjectRef::from_obj(svc.as_ref()));
                        }
                    }
                }
            }
        });
    }
    let _ = futures::join!(
        nodes.wait_until_ready(),
        slices.wait_until_ready(),
        classes.wait_until_ready(),
        namespaces.wait_until_ready()
    );
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "watches synced; waiting for leadership");

    let fence = if config.leader_elect {
        berth_runtime::Fence::new()
    } else {
        berth_runtime::Fence::unfenced()
    };
    let elector = Arc::new(leader::LeaderElector::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        config.lease_duration,
        fence.clone(),
    ));
    if config.leader_elect {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
    }
    metrics.leader.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "leading");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: berth_crds::CONTROLLER_MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(reconcile::Context::new(
        client.clone(),
        aws,
        recorder,
        config.clone(),
        reconcile::Stores {
            services: services.clone(),
            services_synced,
            nodes,
            slices,
            classes,
            namespaces,
        },
        metrics.clone(),
        tx.clone(),
    ));
    // Learn what exists before the first reconcile (a predecessor may have died mid-way).
    // Without an AWS class (bare metal) berth never calls AWS.
    if ctx.uses_aws()
        && let Err(e) = gc::refresh(&ctx.aws, &ctx.inventory, &ctx.config.cluster_name).await
    {
        tracing::warn!(error = %e, "initial inventory sweep failed");
    }
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // The Service store fills once the controller below runs; sweeping before
            // would take every Service for gone.
            let mut synced = ctx.services_synced.clone();
            if synced.wait_for(|s| *s).await.is_err() {
                return;
            }
            loop {
                tokio::time::sleep(ctx.config.gc_interval).await;
                if !ctx.uses_aws() {
                    continue;
                }
                let live: std::collections::BTreeSet<String> = ctx
                    .services
                    .state()
                    .iter()
                    .filter_map(|s| s.metadata.uid.clone())
                    .collect();
                let client = &ctx.client;
                let cluster = &ctx.config.cluster_name;
                let exists = |r: gc::Tagged| async move { gc::service_exists(client, &r).await };
                match gc::sweep(&ctx.aws, &ctx.inventory, cluster, &live, exists).await {
                    Ok(report) => {
                        ctx.metrics
                            .gc_deleted
                            .fetch_add(report.deleted as u64, std::sync::atomic::Ordering::Relaxed);
                        if report != gc::SweepReport::default() {
                            tracing::info!(?report, "orphan sweep");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
                }
            }
        });
    }
    tokio::spawn(class_status_loop(ctx.clone()));

    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<bool>();
    {
        let elector = elector.clone();
        let elect = config.leader_elect;
        tokio::spawn(async move {
            let lost = tokio::select! {
                _ = elector.hold(), if elect => true,
                _ = shutdown_signal() => false,
            };
            let _ = stop_tx.send(lost);
        });
    }
    let (lost_tx, lost_rx) = futures::channel::oneshot::channel::<bool>();
    let shutdown = stop_rx.map(move |r| {
        let _ = lost_tx.send(r.unwrap_or(false));
    });
    controller
        .with_config(ControllerConfig::default().concurrency(config.concurrency))
        .reconcile_on(rx)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
    metrics.leader.store(false, Ordering::Relaxed);
    if lost_rx.await.unwrap_or(false) {
        tracing::error!("lost leadership; exiting");
        return Err(RunError::LostLeadership);
    }
    if config.leader_elect {
        elector.release().await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => futures::future::pending::<()>().await,
    }
}

/// A class's Accepted condition and, for pool classes, (allocated, available). Pure.
pub fn class_summary(
    class: &LoadBalancerClass,
    holders: &[pool::Holder],
) -> (bool, &'static str, String, Option<(u64, u64)>) {
    match (&class.spec.aws, &class.spec.pool) {
        (Some(_), _) => (true, "Accepted", "aws provider".into(), None),
        (None, Some(spec)) => match pool::PoolClass::parse(&class.name_any(), spec) {
            Ok(pc) => {
                let size = pc.pool.size();
                let allocated = pool::allocated(&pc.pool, holders);
                (
                    true,
                    "Accepted",
                    format!("pool provider with {size} addresses"),
                    Some((allocated, size.saturating_sub(allocated))),
                )
            }
            Err(errors) => (false, "InvalidSpec", errors.join("; "), None),
        },
        (None, None) => (
            false,
            "UnsupportedProvider",
            "no provider block".into(),
            None,
        ),
    }
}

/// Keeps each handled class's status current: Accepted, Services, Ready and, for pool
/// classes, allocated and available addresses (also exported as metrics).
async fn class_status_loop(ctx: Arc<reconcile::Context>) {
    use berth_crds::{CONDITION_ACCEPTED, CONDITION_LB_READY};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::api::{Patch, PatchParams};
    let api: Api<LoadBalancerClass> = Api::all(ctx.client.clone());
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let classes = ctx.classes.state();
        let services = ctx.services.state();
        let holders = match ctx.reservations.lock() {
            Ok(mut r) => reconcile::pool_holders(&services, &classes, &mut r),
            Err(_) => continue,
        };
        let mut gauges = BTreeMap::new();
        for class in classes
            .iter()
            .filter(|c| ctx.config.handles_class(&c.name_any()))
        {
            let mine: Vec<_> = services
                .iter()
                .filter(|s| {
                    reconcile::ownership(s, &classes, &ctx.config)
                        == reconcile::Ownership::Class(class.name_any())
                })
                .collect();
            let ready = mine
                .iter()
                .filter(|s| {
                    status::current_condition(s)
                        .is_some_and(|c| c.type_ == CONDITION_LB_READY && c.status == "True")
                })
                .count() as i32;
            let (ok, reason, message, addresses) = class_summary(class, &holders);
            if let Some(a) = addresses {
                gauges.insert(class.name_any(), a);
            }
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let (allocated, available) = addresses
                .map(|(a, v)| (Some(as_i64(a)), Some(as_i64(v))))
                .unwrap_or((None, None));
            let status = class.status.clone().unwrap_or_default();
            let old = status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_ACCEPTED);
            let unchanged = status.services == Some(mine.len() as i32)
                && status.ready_services == Some(ready)
                && status.allocated == allocated
                && status.available == available
                && old.is_some_and(|c| {
                    c.reason == reason
                        && c.message == message
                        && c.observed_generation == class.metadata.generation
                });
            if unchanged {
                continue;
            }
            let cond = Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message,
                last_transition_time: old
                    .filter(|c| c.reason == reason)
                    .map(|c| c.last_transition_time.clone())
                    .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now())),
                observed_generation: class.metadata.generation,
            };
            let patch = serde_json::json!({
                "status": {
                    "conditions": [cond], "services": mine.len(), "readyServices": ready,
                    "allocated": allocated, "available": available,
                }
            });
            if let Err(e) = api
                .patch_status(
                    &class.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await
            {
                tracing::warn!(class = %class.name_any(), error = %e, "class status");
            }
        }
        ctx.metrics.set_pool_addresses(gauges);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_summary_counts_pool_addresses_and_reports_errors() {
        let class = |spec: serde_json::Value| -> LoadBalancerClass {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
                "metadata": {"name": "lab"}, "spec": spec
            }))
            .expect("class")
        };
        let holder = |ip: &str| pool::Holder {
            uid: ip.into(),
            ips: vec![ip.parse().expect("ip")],
            ..pool::Holder::default()
        };
        let good = class(serde_json::json!({"pool": {"addresses": ["198.19.1.0/29"]}}));
        let (ok, _, message, counts) =
            class_summary(&good, &[holder("198.19.1.1"), holder("198.19.2.1")]);
        assert!(ok);
        assert!(message.contains("6 addresses"), "{message}");
        assert_eq!(counts, Some((1, 5)));
        let bad = class(serde_json::json!({"pool": {"addresses": ["198.19.1.1/29"]}}));
        let (ok, reason, message, counts) = class_summary(&bad, &[]);
        assert!(!ok && reason == "InvalidSpec" && counts.is_none());
        assert!(message.contains("host bits"), "{message}");
        let aws = class(serde_json::json!({"aws": {}}));
        assert_eq!(class_summary(&aws, &[]).3, None);
    }

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
}
