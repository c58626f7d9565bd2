//! The orphan sweep: lists berth's resources of this cluster by tag, refreshes the
//! inventory, and deletes load balancers and target groups whose Service UID no longer
//! exists (also what a controller killed mid-provision left behind), through the same
//! delete path as Service deletion: a protected orphan is kept whole and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use berth_crds::tags;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

use crate::provider::aws::api::{AwsApi, AwsError, LbInfo};
use crate::provider::aws::deploy::{self, ApplyError, Inventory, InventoryData, Protection};

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
/// store may lag behind a Service created a moment ago). For [`sweep`]'s `still_exists`.
pub async fn service_exists(client: &kube::Client, r: &Tagged) -> bool {
    let Some((ns, name)) = r.service.split_once('/') else {
        return false;
    };
    match Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(svc)) => svc.metadata.uid.as_deref() == Some(r.uid.as_str()),
        Ok(None) => false,
        // Unknown: keep it this round.
        Err(_) => true,
    }
}

/// This cluster's resources found by [`refresh`].
#[derive(Clone, Debug, Default)]
pub struct Found {
    pub load_balancers: Vec<LbInfo>,
    /// Tagged load balancers and target groups.
    pub lb_tags: Vec<Tagged>,
    pub tg_tags: Vec<Tagged>,
}

/// Lists this cluster's load balancers and target groups by tag and replaces the
/// inventory with them.
pub async fn refresh<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    cluster: &str,
) -> Result<Found, AwsError> {
    let lbs = aws.all_load_balancers().await?;
    let tgs = aws.all_target_groups().await?;
    let lb_arns: Vec<String> = lbs.iter().map(|l| l.arn.clone()).collect();
    let tg_arns: Vec<String> = tgs.iter().map(|t| t.arn.clone()).collect();
    let all: Vec<String> = lb_arns.iter().chain(tg_arns.iter()).cloned().collect();
    let tags = aws.tags(&all).await?;
    let found = Found {
        lb_tags: ours(&tags, &lb_arns, cluster),
        tg_tags: ours(&tags, &tg_arns, cluster),
        load_balancers: lbs,
    };
    let mut data = InventoryData::default();
    for r in &found.lb_tags {
        data.load_balancers
            .entry(r.uid.clone())
            .or_default()
            .insert(r.arn.clone());
    }
    for r in &found.tg_tags {
        data.target_groups
            .entry(r.uid.clone())
            .or_default()
            .insert(r.arn.clone());
    }
    inventory.replace(data);
    Ok(found)
}

/// The resources of one gone Service.
#[derive(Clone, Debug, Default)]
struct Orphan {
    tagged: Option<Tagged>,
    load_balancers: Vec<LbInfo>,
    target_groups: BTreeSet<String>,
}

/// Orphaned resources grouped by Service UID, so a Service's load balancer and target
/// groups are deleted (or kept) together. Pure.
fn orphans_by_uid(found: &Found, live: &BTreeSet<String>) -> BTreeMap<String, Orphan> {
    let mut out: BTreeMap<String, Orphan> = BTreeMap::new();
    for r in orphans(&found.lb_tags, live) {
        let o = out.entry(r.uid.clone()).or_default();
        o.tagged.get_or_insert_with(|| r.clone());
        o.load_balancers.extend(
            found
                .load_balancers
                .iter()
                .filter(|l| l.arn == r.arn)
                .cloned(),
        );
    }
    for r in orphans(&found.tg_tags, live) {
        let o = out.entry(r.uid.clone()).or_default();
        o.tagged.get_or_insert_with(|| r.clone());
        o.target_groups.insert(r.arn.clone());
    }
    out
}

/// What one sweep did. Every orphan is tried: one orphan's failure is counted, never
/// stops the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Load balancers and target groups deleted.
    pub deleted: usize,
    /// Orphaned load balancers kept because deletion protection is on.
    pub protected: usize,
    /// Orphans whose deletion failed (tried again next sweep).
    pub failed: usize,
}

/// One sweep: refreshes the inventory, then deletes the resources of Services not in
/// `live` for which `still_exists` also says no, through [`deploy::teardown`] respecting
/// deletion protection. Only listing AWS can fail the sweep as a whole.
pub async fn sweep<A, F, Fut>(
    aws: &A,
    inventory: &Inventory,
    cluster: &str,
    live: &BTreeSet<String>,
    still_exists: F,
) -> Result<SweepReport, AwsError>
where
    A: AwsApi,
    F: Fn(Tagged) -> Fut,
    Fut: Future<Output = bool>,
{
    let found = refresh(aws, inventory, cluster).await?;
    let mut report = SweepReport::default();
    for (uid, orphan) in orphans_by_uid(&found, live) {
        let Some(tagged) = orphan.tagged else {
            continue;
        };
        if still_exists(tagged.clone()).await {
            continue;
        }
        let service = tagged.service;
        tracing::info!(%uid, %service, "deleting an orphaned load balancer and target groups");
        let lbs = &orphan.load_balancers;
        match deploy::teardown(
            aws,
            inventory,
            lbs,
            orphan.target_groups,
            Protection::Respect,
        )
        .await
        {
            Ok(removed) => report.deleted += removed.load_balancers + removed.target_groups,
            Err(ApplyError::DeletionProtected(lb)) => {
                tracing::warn!(%lb, %service, "orphaned load balancer has deletion protection on: kept with its listeners and target groups");
                report.protected += 1;
            }
            Err(e) => {
                tracing::warn!(%uid, %service, error = %e, "deleting an orphan failed; next sweep retries");
                report.failed += 1;
            }
        }
    }
    Ok(report)
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

    mod sweeping {
        use std::sync::Arc;

        use super::super::*;
        use crate::provider::aws::annotations::tests::{node, service};
        use crate::provider::aws::annotations::{annotations as keys, settings};
        use crate::provider::aws::deploy::ensure;
        use crate::provider::aws::fake::FakeAws;
        use crate::provider::aws::model::{World, build};

        /// Provisions a Service named `name` with `uid` through deploy.
        async fn provision(aws: &FakeAws, name: &str, uid: &str, annotations: &[(&str, &str)]) {
            let mut svc = service(&[("http", 80, "TCP", Some(30080))], annotations);
            svc.metadata.name = Some(name.into());
            svc.metadata.uid = Some(uid.into());
            let subnets = vec!["subnet-a".to_string()];
            let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
            let world = World {
                cluster: "c1",
                vpc_id: "vpc-1",
                subnets: &subnets,
                nodes: &nodes,
                slices: &[],
            };
            let s = settings(&svc, &Default::default(), "c1").expect("settings");
            let d = build(&svc, &s, &world).expect("build");
            ensure(aws, &Inventory::default(), &d, uid)
                .await
                .expect("ensure");
        }

        fn uids_left(aws: &FakeAws) -> BTreeSet<String> {
            let s = aws.state();
            s.lbs
                .values()
                .filter_map(|l| l.tags.get(tags::SERVICE_UID).cloned())
                .collect()
        }

        async fn gone(_: Tagged) -> bool {
            false
        }

        #[tokio::test]
        async fn a_protected_orphan_is_kept_whole_and_the_others_are_deleted() {
            let aws = FakeAws::default();
            let protect = [(keys::ATTRIBUTES, "deletion_protection.enabled=true")];
            provision(&aws, "kept", "u-protected", &protect).await;
            provision(&aws, "gone", "u-orphan", &[]).await;
            provision(&aws, "live", "u-live", &[]).await;
            aws.take_calls();
            let inv = Inventory::default();
            let live = BTreeSet::from(["u-live".to_string()]);
            let report = sweep(&aws, &inv, "c1", &live, gone).await.expect("sweep");
            assert_eq!(
                report,
                SweepReport {
                    deleted: 2,
                    protected: 1,
                    failed: 0
                }
            );
            assert_eq!(
                uids_left(&aws),
                BTreeSet::from(["u-live".to_string(), "u-protected".to_string()])
            );
            let s = aws.state();
            assert_eq!(s.listeners.len(), 2, "the protected one keeps its listener");
            assert_eq!(s.tgs.len(), 2, "and its target group");
            let calls = &s.calls;
            assert!(!calls.iter().any(|c| c.contains("kept")), "{calls:?}");
            assert_eq!(inv.of("u-live").0.len(), 1, "the inventory is refreshed");
        }

        #[tokio::test]
        async fn one_failing_orphan_does_not_stop_the_sweep() {
            let aws = FakeAws::default();
            provision(&aws, "bad", "u-bad", &[]).await;
            provision(&aws, "ok", "u-ok", &[]).await;
            let bad = aws
                .state()
                .lbs
                .values()
                .find(|l| l.tags.get(tags::SERVICE_UID).map(String::as_str) == Some("u-bad"))
                .map(|l| l.info.arn.clone())
                .expect("bad lb");
            aws.fail("DeleteLoadBalancer", &bad, "InternalFailure");
            let inv = Inventory::default();
            let report = sweep(&aws, &inv, "c1", &BTreeSet::new(), gone)
                .await
                .expect("sweep");
            assert_eq!(report.failed, 1);
            assert_eq!(report.deleted, 2);
            assert_eq!(uids_left(&aws), BTreeSet::from(["u-bad".to_string()]));
        }

        #[tokio::test]
        async fn a_service_the_apiserver_still_has_is_spared() {
            let aws = FakeAws::default();
            provision(&aws, "new", "u-new", &[]).await;
            let inv = Inventory::default();
            let exists = |r: Tagged| async move { r.uid == "u-new" };
            let report = sweep(&aws, &inv, "c1", &BTreeSet::new(), exists)
                .await
                .expect("sweep");
            assert_eq!(report, SweepReport::default());
            assert_eq!(aws.state().lbs.len(), 1);
        }
    }
}
