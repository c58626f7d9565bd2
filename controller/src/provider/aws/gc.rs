//! The orphan sweep: lists berth's resources of this cluster by tag, refreshes the
//! inventory, and deletes load balancers, target groups and managed security groups
//! (with the backend rules referring to them) whose Service UID no longer
//! exists (also what a controller killed mid-provision left behind), through the same
//! delete path as Service deletion: a protected orphan is kept whole and counted.
//!
//! Only resources carrying this cluster's identity are ever orphans. Resources of an
//! earlier berth, tagged with the cluster name only, are migrated (the identity tag is
//! added) when a live Service of this cluster has the UID and `namespace/name` they name;
//! another cluster of the same name has no Service with that UID, so it never migrates,
//! adopts or deletes them. The others are left alone and counted as unclaimed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use berth_crds::tags;
use k8s_openapi::api::core::v1::Service;
use kube::Api;

use crate::provider::aws::api::{AwsApi, AwsError, LbInfo};
use crate::provider::aws::deploy::{self, ApplyError, Inventory, InventoryData, Protection};
use crate::provider::aws::identity::{Claim, Identity, Owner};
use crate::provider::aws::security_groups::SgQuery;

/// A tagged resource: ARN, Service UID, `namespace/name`, and whether it carries only the
/// cluster name (an earlier berth's, not yet migrated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tagged {
    pub arn: String,
    pub uid: String,
    pub service: String,
    pub legacy: bool,
}

/// Live Services of this cluster: UID → `namespace/name`.
pub type Live = BTreeMap<String, String>;

/// This cluster's resources among `tags` (arn → tags), legacy ones included. Pure.
pub fn ours(
    tags: &BTreeMap<String, BTreeMap<String, String>>,
    arns: &[String],
    identity: &Identity,
) -> Vec<Tagged> {
    arns.iter()
        .filter_map(|arn| {
            let t = tags.get(arn)?;
            let legacy = match identity.claim(t) {
                Claim::Ours => false,
                Claim::Legacy => true,
                Claim::Foreign => return None,
            };
            Some(Tagged {
                arn: arn.clone(),
                uid: t.get(tags::SERVICE_UID)?.clone(),
                service: t.get(tags::SERVICE).cloned().unwrap_or_default(),
                legacy,
            })
        })
        .collect()
}

/// Resources with this cluster's identity whose Service UID is not among `live`. Pure.
pub fn orphans<'a>(resources: &'a [Tagged], live: &Live) -> Vec<&'a Tagged> {
    resources
        .iter()
        .filter(|r| !r.legacy && !live.contains_key(&r.uid))
        .collect()
}

/// Legacy resources to migrate: a live Service of this cluster has the UID and the
/// `namespace/name` they name. Pure.
pub fn to_migrate<'a>(resources: &'a [Tagged], live: &Live) -> Vec<&'a Tagged> {
    resources
        .iter()
        .filter(|r| r.legacy && live.get(&r.uid) == Some(&r.service))
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
    /// Tagged load balancers, target groups and managed security groups.
    pub lb_tags: Vec<Tagged>,
    pub tg_tags: Vec<Tagged>,
    pub sg_tags: Vec<Tagged>,
}

/// Lists this cluster's load balancers and target groups by tag and replaces the
/// inventory with them. Legacy ones are in it too: the inventory is asked by Service UID,
/// and only this cluster has a Service with their UID.
pub async fn refresh<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    identity: &Identity,
) -> Result<Found, AwsError> {
    let lbs = aws.all_load_balancers().await?;
    let tgs = aws.all_target_groups().await?;
    let lb_arns: Vec<String> = lbs.iter().map(|l| l.arn.clone()).collect();
    let tg_arns: Vec<String> = tgs.iter().map(|t| t.arn.clone()).collect();
    let all: Vec<String> = lb_arns.iter().chain(tg_arns.iter()).cloned().collect();
    let tags = aws.tags(&all).await?;
    // Only groups with this cluster's identity: managed groups came after identities.
    let query = SgQuery {
        ids: None,
        filters: vec![(
            format!("tag:{}", tags::CLUSTER_ID),
            vec![identity.id.clone()],
        )],
    };
    let groups = aws.security_groups(&query).await?;
    let sg_ids: Vec<String> = groups.iter().map(|g| g.id.clone()).collect();
    let sg_tags: BTreeMap<String, BTreeMap<String, String>> =
        groups.into_iter().map(|g| (g.id, g.tags)).collect();
    let found = Found {
        lb_tags: ours(&tags, &lb_arns, identity),
        tg_tags: ours(&tags, &tg_arns, identity),
        sg_tags: ours(&sg_tags, &sg_ids, identity),
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
fn orphans_by_uid(found: &Found, live: &Live) -> BTreeMap<String, Orphan> {
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
    // A managed group left alone: the teardown finds it by the Service's tags.
    for r in orphans(&found.sg_tags, live) {
        out.entry(r.uid.clone())
            .or_default()
            .tagged
            .get_or_insert_with(|| r.clone());
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
    /// Legacy resources given this cluster's identity.
    pub migrated: usize,
    /// Legacy resources no live Service of this cluster claims: left alone (another
    /// cluster of the same name may own them).
    pub unclaimed: usize,
}

/// Adds the identity to the legacy resources live Services claim; counts them and the
/// unclaimed ones. A failure is logged and retried next sweep.
async fn migrate<A: AwsApi>(
    aws: &A,
    identity: &Identity,
    found: &Found,
    live: &Live,
    report: &mut SweepReport,
) {
    let legacy = || {
        found
            .lb_tags
            .iter()
            .chain(&found.tg_tags)
            .filter(|r| r.legacy)
    };
    let all: Vec<Tagged> = legacy().cloned().collect();
    let claimed = to_migrate(&all, live);
    report.unclaimed = all.len() - claimed.len();
    for r in claimed {
        match aws.add_tags(&r.arn, &identity.tag()).await {
            Ok(()) => {
                tracing::info!(arn = %r.arn, service = %r.service, "gave a resource of an earlier berth this cluster's identity");
                report.migrated += 1;
            }
            Err(e) => {
                tracing::warn!(arn = %r.arn, error = %e, "migrating a resource failed; next sweep retries")
            }
        }
    }
}

/// One sweep: refreshes the inventory, migrates legacy resources of live Services, then
/// deletes the resources of Services not in `live` for which `still_exists` also says no,
/// through [`deploy::teardown`] respecting deletion protection. Only listing AWS can fail
/// the sweep as a whole.
pub async fn sweep<A, F, Fut>(
    aws: &A,
    inventory: &Inventory,
    identity: &Identity,
    live: &Live,
    still_exists: F,
) -> Result<SweepReport, AwsError>
where
    A: AwsApi,
    F: Fn(Tagged) -> Fut,
    Fut: Future<Output = bool>,
{
    let found = refresh(aws, inventory, identity).await?;
    let mut report = SweepReport::default();
    migrate(aws, identity, &found, live, &mut report).await;
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
        let owner = Owner {
            identity,
            uid: &uid,
        };
        let tgs = orphan.target_groups;
        match deploy::teardown(aws, inventory, owner, lbs, tgs, Protection::Respect).await {
            Ok(removed) => {
                report.deleted +=
                    removed.load_balancers + removed.target_groups + removed.security_groups
            }
            Err(ApplyError::DeletionProtected { name: lb, .. }) => {
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
        let t = |cluster: &str, id: Option<&str>, uid: &str| {
            let mut m = BTreeMap::from([
                (tags::CLUSTER.to_string(), cluster.to_string()),
                (tags::SERVICE_UID.to_string(), uid.to_string()),
                (tags::SERVICE.to_string(), format!("ns/{uid}")),
            ]);
            if let Some(id) = id {
                m.insert(tags::CLUSTER_ID.to_string(), id.to_string());
            }
            m
        };
        let tags = BTreeMap::from([
            ("a".to_string(), t("c1", Some("id-1"), "u1")),
            ("b".to_string(), t("c1", Some("id-1"), "u2")),
            ("c".to_string(), t("c2", Some("id-1"), "u3")),
            ("d".to_string(), BTreeMap::new()),
            ("f".to_string(), t("c1", Some("id-2"), "u5")),
            ("g".to_string(), t("c1", None, "u1")),
            ("h".to_string(), t("c1", None, "u6")),
            ("i".to_string(), t("c2", None, "u1")),
        ]);
        let arns: Vec<String> = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mine = ours(&tags, &arns, &Identity::new("id-1", "c1"));
        let found: Vec<(&str, bool)> = mine.iter().map(|r| (r.arn.as_str(), r.legacy)).collect();
        assert_eq!(
            found,
            vec![
                ("a", false),
                ("b", false),
                ("c", false),
                ("g", true),
                ("h", true)
            ]
        );
        let live = Live::from([
            ("u1".to_string(), "ns/u1".to_string()),
            ("u3".to_string(), "ns/u3".to_string()),
        ]);
        let o: Vec<&str> = orphans(&mine, &live)
            .iter()
            .map(|r| r.arn.as_str())
            .collect();
        assert_eq!(o, vec!["b"], "legacy and foreign ones are never orphans");
        let m: Vec<&str> = to_migrate(&mine, &live)
            .iter()
            .map(|r| r.arn.as_str())
            .collect();
        assert_eq!(m, vec!["g"]);
        let renamed = Live::from([("u1".to_string(), "ns/other".to_string())]);
        assert!(
            to_migrate(&mine, &renamed).is_empty(),
            "the Service's name must match too"
        );
    }

    mod sweeping {
        use std::sync::{Arc, LazyLock};

        use super::super::*;
        use crate::provider::aws::annotations::tests::{node, service};
        use crate::provider::aws::annotations::{annotations as keys, settings};
        use crate::provider::aws::deploy::ensure;
        use crate::provider::aws::fake::FakeAws;
        use crate::provider::aws::model::{DesiredTargetGroup, World, build};

        static ME: LazyLock<Identity> = LazyLock::new(|| Identity::new("id-1", "c1"));

        fn live(uids: &[&str]) -> Live {
            uids.iter()
                .map(|u| (u.to_string(), format!("shop/{u}")))
                .collect()
        }

        /// Provisions a Service named `name` with `uid` through deploy.
        async fn provision(aws: &FakeAws, name: &str, uid: &str, annotations: &[(&str, &str)]) {
            provision_as(aws, &ME, name, uid, annotations).await;
        }

        async fn provision_as(
            aws: &FakeAws,
            me: &Identity,
            name: &str,
            uid: &str,
            annotations: &[(&str, &str)],
        ) {
            let mut svc = service(&[("http", 80, "TCP", Some(30080))], annotations);
            svc.metadata.name = Some(name.into());
            svc.metadata.uid = Some(uid.into());
            let subnets = vec!["subnet-a".to_string()];
            let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
            let world = World {
                cluster: "c1",
                vpc_id: "vpc-1",
                vpc_cidrs: &[],
                subnets: &subnets,
                subnet_cidrs: &BTreeMap::new(),
                nodes: &nodes,
                slices: &[],
                gated_ready: &BTreeSet::new(),
            };
            let s = settings(&svc, &Default::default(), "c1").expect("settings");
            let mut d = build(&svc, &s, &world).expect("build");
            me.stamp(&mut d);
            let owner = Owner { identity: me, uid };
            ensure(aws, &Inventory::default(), &d, owner)
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
            let report = sweep(&aws, &inv, &ME, &live(&["u-live"]), gone)
                .await
                .expect("sweep");
            assert_eq!(
                report,
                SweepReport {
                    deleted: 3,
                    protected: 1,
                    ..SweepReport::default()
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
            let report = sweep(&aws, &inv, &ME, &Live::new(), gone)
                .await
                .expect("sweep");
            assert_eq!(report.failed, 1);
            assert_eq!(
                report.deleted, 3,
                "the other's NLB, target group and security group"
            );
            assert_eq!(uids_left(&aws), BTreeSet::from(["u-bad".to_string()]));
        }

        #[tokio::test]
        async fn a_service_the_apiserver_still_has_is_spared() {
            let aws = FakeAws::default();
            provision(&aws, "new", "u-new", &[]).await;
            let inv = Inventory::default();
            let exists = |r: Tagged| async move { r.uid == "u-new" };
            let report = sweep(&aws, &inv, &ME, &Live::new(), exists)
                .await
                .expect("sweep");
            assert_eq!(report, SweepReport::default());
            assert_eq!(aws.state().lbs.len(), 1);
        }

        #[tokio::test]
        async fn another_cluster_of_the_same_name_is_never_touched() {
            let aws = FakeAws::default();
            let other = Identity::new("id-2", "c1");
            provision_as(&aws, &other, "theirs", "u-theirs", &[]).await;
            provision(&aws, "mine", "u-mine", &[]).await;
            aws.take_calls();
            let inv = Inventory::default();
            for _ in 0..3 {
                let report = sweep(&aws, &inv, &ME, &live(&["u-mine"]), gone)
                    .await
                    .expect("sweep");
                assert_eq!(report, SweepReport::default());
            }
            assert_eq!(aws.take_calls(), Vec::<String>::new(), "nothing changed");
            assert!(inv.of("u-theirs").0.is_empty(), "not in our inventory");
            assert_eq!(aws.state().lbs.len(), 2);
        }

        /// Drops the identity tag, as an earlier berth wrote its resources.
        fn make_legacy(aws: &FakeAws) {
            let mut s = aws.state();
            for l in s.lbs.values_mut() {
                l.tags.remove(tags::CLUSTER_ID);
            }
            for t in s.tgs.values_mut() {
                t.tags.remove(tags::CLUSTER_ID);
            }
            // An earlier berth made no security groups.
            for l in s.lbs.values_mut() {
                l.info.security_groups.clear();
            }
            s.sgs.clear();
        }

        #[tokio::test]
        async fn legacy_resources_of_live_services_are_migrated_and_others_left_alone() {
            let aws = FakeAws::default();
            provision(&aws, "u-live", "u-live", &[]).await;
            provision(&aws, "u-elsewhere", "u-elsewhere", &[]).await;
            make_legacy(&aws);
            aws.take_calls();
            let inv = Inventory::default();
            let report = sweep(&aws, &inv, &ME, &live(&["u-live"]), gone)
                .await
                .expect("sweep");
            assert_eq!(
                report,
                SweepReport {
                    migrated: 2,
                    unclaimed: 2,
                    ..SweepReport::default()
                }
            );
            let s = aws.state();
            assert_eq!(s.lbs.len(), 2, "nothing deleted");
            assert_eq!(s.tgs.len(), 2);
            for l in s.lbs.values() {
                let id = l.tags.get(tags::CLUSTER_ID).map(String::as_str);
                let mine = l.tags.get(tags::SERVICE_UID).map(String::as_str) == Some("u-live");
                assert_eq!(id, mine.then_some("id-1"), "{}", l.info.name);
            }
            assert!(
                s.calls.iter().all(|c| c.starts_with("AddTags ")),
                "{:?}",
                s.calls
            );
        }

        #[tokio::test]
        async fn a_target_group_attached_by_hand_survives_its_load_balancers_deletion() {
            let aws = FakeAws::default();
            provision(&aws, "gone", "u-gone", &[]).await;
            let lb = aws.state().lbs.keys().next().cloned().expect("lb");
            let hand = DesiredTargetGroup {
                name: "by-hand".into(),
                tags: BTreeMap::from([("team".to_string(), "web".to_string())]),
                ..aws.state().tgs.values().next().map(fake_tg).expect("tg")
            };
            let tg = aws.create_target_group(&hand).await.expect("tg");
            let listener = crate::provider::aws::model::DesiredListener {
                port: 8443,
                protocol: "TCP".into(),
                certificate: None,
                ssl_policy: None,
                extra_certificates: Vec::new(),
                alpn_policy: None,
                attributes: BTreeMap::new(),
                target_group: "by-hand".into(),
            };
            aws.create_listener(&lb, &listener, &tg.arn)
                .await
                .expect("listener");
            let inv = Inventory::default();
            let report = sweep(&aws, &inv, &ME, &Live::new(), gone)
                .await
                .expect("sweep");
            assert_eq!(
                report.deleted, 3,
                "the load balancer, its own target group and its security group"
            );
            let s = aws.state();
            assert!(s.lbs.is_empty());
            let left: Vec<&str> = s.tgs.values().map(|t| t.info.name.as_str()).collect();
            assert_eq!(left, vec!["by-hand"]);
        }

        /// A target group like `tg`, for creating another one.
        fn fake_tg(tg: &crate::provider::aws::fake::FakeTg) -> DesiredTargetGroup {
            DesiredTargetGroup {
                name: tg.info.name.clone(),
                protocol: tg.info.protocol.clone(),
                port: tg.info.port,
                target_type: crate::provider::aws::model::TargetType::Instance,
                ipv6: false,
                vpc_id: "vpc-1".into(),
                health_check: tg.info.health_check.clone(),
                attributes: BTreeMap::new(),
                tags: BTreeMap::new(),
                targets: BTreeSet::new(),
                serving: BTreeSet::new(),
            }
        }
    }
}
