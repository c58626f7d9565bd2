//! The orphan sweep: lists berth's resources of this cluster by tag, refreshes the
//! inventory, and deletes load balancers and target groups whose Service UID no longer
//! exists (also what a controller killed mid-provision left behind).

use std::collections::{BTreeMap, BTreeSet};

use berth_crds::tags;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

use crate::provider::aws::client::AwsError;
use crate::provider::aws::deploy::InventoryData;
use crate::service::Context;

/// A tagged resource: ARN, Service UID, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tagged {
    pub arn: String,
    pub uid: String,
    pub service: String,
}

/// This cluster's resources among `tags` (arn → tags). Pure.
pub fn ours(
    tags: &BTreeMap<String, BTreeMap<String, String>>,
    arns: &[String],
    cluster: &str,
) -> Vec<Tagged> {
    arns.iter()
        .filter_map(|arn| {
            let t = tags.get(arn)?;
            if t.get(tags::CLUSTER).map(String::as_str) != Some(cluster) {
                return None;
            }
            Some(Tagged {
                arn: arn.clone(),
                uid: t.get(tags::SERVICE_UID)?.clone(),
                service: t.get(tags::SERVICE).cloned().unwrap_or_default(),
            })
        })
        .collect()
}

/// Resources whose Service UID is not among `live`. Pure.
pub fn orphans<'a>(resources: &'a [Tagged], live: &BTreeSet<String>) -> Vec<&'a Tagged> {
    resources
        .iter()
        .filter(|r| !live.contains(&r.uid))
        .collect()
}

/// Whether the Service `ns/name` with `uid` still exists, asked of the apiserver (the
/// store may lag behind a Service created a moment ago).
async fn still_exists(ctx: &Context, r: &Tagged) -> bool {
    let Some((ns, name)) = r.service.split_once('/') else {
        return false;
    };
    match Api::<Service>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(svc)) => svc.metadata.uid.as_deref() == Some(r.uid.as_str()),
        Ok(None) => false,
        // Unknown: keep it this round.
        Err(_) => true,
    }
}

/// One sweep. With `delete` false it only refreshes the inventory.
pub async fn sweep(ctx: &Context, delete: bool) -> Result<usize, AwsError> {
    let lbs = ctx.aws.all_load_balancers().await?;
    let tgs = ctx.aws.all_target_groups().await?;
    let lb_arns: Vec<String> = lbs.iter().map(|l| l.arn.clone()).collect();
    let tg_arns: Vec<String> = tgs.iter().map(|t| t.arn.clone()).collect();
    let all: Vec<String> = lb_arns.iter().chain(tg_arns.iter()).cloned().collect();
    let tags = ctx.aws.tags(&all).await?;
    let cluster = &ctx.config.cluster_name;
    let my_lbs = ours(&tags, &lb_arns, cluster);
    let my_tgs = ours(&tags, &tg_arns, cluster);
    let mut data = InventoryData::default();
    for r in &my_lbs {
        data.load_balancers
            .entry(r.uid.clone())
            .or_default()
            .insert(r.arn.clone());
    }
    for r in &my_tgs {
        data.target_groups
            .entry(r.uid.clone())
            .or_default()
            .insert(r.arn.clone());
    }
    ctx.inventory.replace(data);
    if !delete {
        return Ok(0);
    }
    let live: BTreeSet<String> = ctx
        .services
        .state()
        .iter()
        .filter_map(|s| s.metadata.uid.clone())
        .collect();
    let mut deleted = 0;
    for r in orphans(&my_lbs, &live) {
        if still_exists(ctx, r).await {
            continue;
        }
        tracing::info!(arn = %r.arn, service = %r.service, "deleting orphaned load balancer");
        for l in ctx.aws.listeners(&r.arn).await.unwrap_or_default() {
            ctx.aws.delete_listener(&l.arn).await?;
        }
        ctx.aws.delete_load_balancer(&r.arn).await?;
        ctx.inventory.remove(&r.arn);
        deleted += 1;
    }
    for r in orphans(&my_tgs, &live) {
        if still_exists(ctx, r).await {
            continue;
        }
        tracing::info!(arn = %r.arn, service = %r.service, "deleting orphaned target group");
        match ctx.aws.delete_target_group(&r.arn).await {
            Ok(()) => {
                ctx.inventory.remove(&r.arn);
                deleted += 1;
            }
            // Still attached to a listener being deleted: next sweep.
            Err(e) if e.is("ResourceInUse") => {}
            Err(e) => return Err(e),
        }
    }
    ctx.metrics
        .gc_deleted
        .fetch_add(deleted as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_clusters_resources_of_gone_services_are_orphans() {
        let t = |cluster: &str, uid: &str| {
            BTreeMap::from([
                (tags::CLUSTER.to_string(), cluster.to_string()),
                (tags::SERVICE_UID.to_string(), uid.to_string()),
                (tags::SERVICE.to_string(), "ns/s".to_string()),
            ])
        };
        let tags = BTreeMap::from([
            ("a".to_string(), t("c1", "u1")),
            ("b".to_string(), t("c1", "u2")),
            ("c".to_string(), t("c2", "u3")),
            ("d".to_string(), BTreeMap::new()),
        ]);
        let arns: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mine = ours(&tags, &arns, "c1");
        assert_eq!(mine.len(), 2);
        let live = BTreeSet::from(["u1".to_string()]);
        let o = orphans(&mine, &live);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].arn, "b");
    }
}
