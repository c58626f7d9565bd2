//! berth's controller: provisions an AWS Network Load Balancer for each LoadBalancer
//! Service it owns and reports it in the Service's status.
//!
//! `run` wires the watches (reflector stores for Services, Nodes, EndpointSlices and
//! LoadBalancerClasses), the admin server, leader election, the orphan sweep and the
//! reconciler. The logic lives in the modules: `settings` and `model` (pure desired
//! state), `apply` (diff against AWS), `nodeport`, `status`, `reconcile`, `gc`.

pub mod admin;
pub mod apply;
pub mod aws;
pub mod config;
pub mod gc;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod nodeport;
pub mod reconcile;
pub mod settings;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use berth_crds::{LABEL_SERVICE_NAME, LoadBalancerClass};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
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

type Trigger = futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>;

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
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let services = controller.store();

    let (nodes, nodes_writer) = reflector::store::<Node>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (classes, classes_writer) = reflector::store::<LoadBalancerClass>();
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
    let _ = futures::join!(
        nodes.wait_until_ready(),
        slices.wait_until_ready(),
        classes.wait_until_ready()
    );
    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "watches synced; waiting for leadership");

    let elector = Arc::new(leader::LeaderElector::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &identity,
        config.lease_duration,
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
        services.clone(),
        nodes,
        slices,
        classes,
        metrics.clone(),
    ));
    // Learn what exists before the first reconcile (a predecessor may have died mid-way).
    if let Err(e) = gc::sweep(&ctx, false).await {
        tracing::warn!(error = %e, "initial inventory sweep failed");
    }
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // The Service store may not report readiness; every deletion is confirmed
            // against the apiserver anyway (gc::still_exists).
            let _ = tokio::time::timeout(Duration::from_secs(10), ctx.services.wait_until_ready())
                .await;
            loop {
                tokio::time::sleep(ctx.config.gc_interval).await;
                match gc::sweep(&ctx, true).await {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "orphan sweep"),
                    Ok(_) => {}
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

/// Keeps each handled class's status current: Accepted, Services, Ready.
async fn class_status_loop(ctx: Arc<reconcile::Context>) {
    use berth_crds::{CONDITION_ACCEPTED, CONDITION_LB_READY};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::api::{Patch, PatchParams};
    let api: Api<LoadBalancerClass> = Api::all(ctx.client.clone());
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let classes = ctx.classes.state();
        let services = ctx.services.state();
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
            let (ok, reason, message) = if class.spec.aws.is_some() {
                (true, "Accepted", "aws provider")
            } else {
                (
                    false,
                    "UnsupportedProvider",
                    "the pool provider is not implemented yet",
                )
            };
            let status = class.status.clone().unwrap_or_default();
            let old = status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_ACCEPTED);
            let unchanged = status.services == Some(mine.len() as i32)
                && status.ready_services == Some(ready)
                && old.is_some_and(|c| {
                    c.reason == reason && c.observed_generation == class.metadata.generation
                });
            if unchanged {
                continue;
            }
            let cond = Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: old
                    .filter(|c| c.reason == reason)
                    .map(|c| c.last_transition_time.clone())
                    .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now())),
                observed_generation: class.metadata.generation,
            };
            let patch = serde_json::json!({
                "status": {"conditions": [cond], "services": mine.len(), "readyServices": ready}
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
    }
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
}
