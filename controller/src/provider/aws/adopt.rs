//! Taking over, in place, the NLBs the AWS Load Balancer Controller (LBC) made. A
//! Service's `spec.loadBalancerClass` is immutable, so an LBC user could otherwise move a
//! Service to berth only by recreating it, losing the NLB's DNS name. A class that opts in
//! (`spec.aws.adoptFrom: [aws-load-balancer-controller]`, one class at most) serves the
//! Services LBC would serve ([`lbc_serves`]); for each, berth finds the NLB and target
//! groups LBC tagged for it ([`find`]), adds its own tags ([`take_over`]) and from then
//! on treats them as the Service's own, under the names LBC gave them ([`take_names`]):
//! the ordinary diff modifies what differs in place, and a replacement still needs the
//! acknowledgement of [`crate::provider::aws::replacement`].
//!
//! LBC's tags stay on what berth adopts: turning the opt-in off while the Service lives
//! hands the resources back ([`hand_back`] removes berth's tags, deletes nothing), so LBC
//! finds them unchanged when it runs again. Only resources whose LBC cluster tag is this
//! cluster's name and whose stack tag is this very Service are ever touched, and none
//! already carrying another cluster's identity or another Service's UID.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use berth_crds::{AdoptSource, LoadBalancerClass, annotations, tags};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::provider::aws::api::{AwsApi, AwsError, LbInfo, TgInfo};
use crate::provider::aws::deploy::Inventory;
use crate::provider::aws::identity::{Claim, Owner};
use crate::provider::aws::model::{DesiredLoadBalancer, TargetType};

/// The class LBC serves.
pub const LBC_CLASS: &str = "service.k8s.aws/nlb";
/// LBC's finalizer on the Services it provisioned for.
pub const LBC_FINALIZER: &str = "service.k8s.aws/resources";
/// Value of [`tags::ADOPTED_FROM`] for LBC's resources.
pub const FROM_LBC: &str = "aws-load-balancer-controller";

/// The tags LBC puts on what it makes for a Service (its tracking provider): the cluster
/// name, the stack (`namespace/name` of the Service) and the resource in the stack
/// (`LoadBalancer`, or `namespace/name:port` for a target group).
pub mod lbc_tags {
    pub const CLUSTER: &str = "elbv2.k8s.aws/cluster";
    pub const STACK: &str = "service.k8s.aws/stack";
    pub const RESOURCE: &str = "service.k8s.aws/resource";
    pub const LOAD_BALANCER: &str = "LoadBalancer";
}

/// Condition reason: LBC may still be managing the Service; berth touches nothing.
pub const ADOPTION_BLOCKED: &str = "AdoptionBlocked";
/// Class condition reason: more than one class adopts LBC's load balancers.
pub const ADOPT_CONFLICT: &str = "AdoptFromConflict";

/// berth's tags, removed again when a resource is handed back.
const BERTH_TAGS: [&str; 6] = [
    tags::CLUSTER,
    tags::CLUSTER_ID,
    tags::SERVICE,
    tags::SERVICE_UID,
    tags::RESOURCE,
    tags::ADOPTED_FROM,
];

type Tags = BTreeMap<String, String>;

/// Whether LBC would serve the Service: a LoadBalancer of class [`LBC_CLASS`], or without
/// a class and annotated `aws-load-balancer-type: nlb-ip`, or `external` with an
/// `nlb-target-type` of `ip` or `instance`. Pure.
pub fn lbc_serves(svc: &Service) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(class) => class == LBC_CLASS,
        None => {
            let ann = svc.annotations();
            let target = ann.get(annotations::NLB_TARGET_TYPE).map(String::as_str);
            match ann.get(annotations::LB_TYPE).map(String::as_str) {
                Some("nlb-ip") => true,
                Some("external") => matches!(target, Some("ip" | "instance")),
                _ => false,
            }
        }
    }
}

/// Which class adopts LBC's Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adopter {
    None,
    One(String),
    /// Several classes opt in: none adopts (each class's status says so).
    Conflict(Vec<String>),
}

/// The classes (all of them, whichever controller handles them) that opt in. Pure.
pub fn adopter(classes: &[Arc<LoadBalancerClass>]) -> Adopter {
    let mut names: Vec<String> = classes
        .iter()
        .filter(|c| {
            c.spec
                .aws
                .as_ref()
                .is_some_and(|a| a.adopts(AdoptSource::AwsLoadBalancerController))
        })
        .map(|c| c.name_any())
        .collect();
    names.sort();
    match names.len() {
        0 => Adopter::None,
        1 => Adopter::One(names.remove(0)),
        _ => Adopter::Conflict(names),
    }
}

/// Why berth must not adopt yet, for the condition: LBC's finalizer on the Service means
/// LBC ran for it and may still run, and two controllers would fight over the NLB. Pure.
pub fn blocked(svc: &Service) -> Option<String> {
    if !svc.finalizers().iter().any(|f| f == LBC_FINALIZER) {
        return None;
    }
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    Some(format!(
        "the AWS Load Balancer Controller's finalizer {LBC_FINALIZER} is still on the Service, so that controller may still manage its NLB: nothing is adopted or changed. Stop it (or scope it away from this Service), then remove its finalizer: kubectl -n {ns} patch service {name} --type json -p '[{{\"op\":\"remove\",\"path\":\"/metadata/finalizers/{}\"}}]'",
        svc.finalizers()
            .iter()
            .position(|f| f == LBC_FINALIZER)
            .unwrap_or_default()
    ))
}

/// What a resource is in LBC's stack for a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    LoadBalancer,
    /// A target group, by Service port.
    TargetGroup(i32),
}

/// The resource's role when LBC made it for the Service `stack` (`namespace/name`) of the
/// cluster named `cluster`. Pure.
pub fn lbc_role(t: &Tags, cluster: &str, stack: &str) -> Option<Role> {
    if t.get(lbc_tags::CLUSTER).map(String::as_str) != Some(cluster)
        || t.get(lbc_tags::STACK).map(String::as_str) != Some(stack)
    {
        return None;
    }
    let resource = t.get(lbc_tags::RESOURCE)?;
    if resource == lbc_tags::LOAD_BALANCER {
        return Some(Role::LoadBalancer);
    }
    let port = resource.strip_prefix(stack)?.strip_prefix(':')?;
    port.parse().ok().map(Role::TargetGroup)
}

/// [`lbc_role`] for a resource berth may adopt for `owner`: not already carrying another
/// cluster's identity or another Service's UID. Pure.
pub fn adoptable(t: &Tags, cluster: &str, stack: &str, owner: Owner<'_>) -> Option<Role> {
    let role = lbc_role(t, cluster, stack)?;
    if t.contains_key(tags::CLUSTER_ID) && owner.identity.claim(t) != Claim::Ours {
        return None;
    }
    if t.get(tags::SERVICE_UID).is_some_and(|u| u != owner.uid) {
        return None;
    }
    Some(role)
}

/// An NLB LBC made for the Service (or one berth made in its place), with the target
/// groups attached to it that LBC made (by Service port) or that are the Service's.
#[derive(Clone, Debug)]
pub struct Adoption {
    pub lb: LbInfo,
    pub lb_tags: Tags,
    /// Target group, its tags, and the Service port when LBC made it.
    pub target_groups: Vec<(TgInfo, Tags, Option<i32>)>,
}

impl Adoption {
    /// Whether berth's tags are on everything already (adopted earlier).
    fn taken(&self, owner: Owner<'_>) -> bool {
        owner.owns(&self.lb_tags) && self.target_groups.iter().all(|(_, t, _)| owner.owns(t))
    }
}

/// Renames the desired load balancer and target groups to what LBC named them, so the
/// ordinary apply keeps them (and the DNS name). A target group whose protocol, port or
/// target type differs from the desired one cannot be changed in place: it keeps berth's
/// name, so berth creates its own, repoints the listener and deletes LBC's. Pure.
pub fn take_names(desired: &mut DesiredLoadBalancer, adoption: &Adoption) {
    desired.name = adoption.lb.name.clone();
    desired
        .tags
        .insert(tags::ADOPTED_FROM.into(), FROM_LBC.into());
    for listener in &mut desired.listeners {
        let Some(d) = desired
            .target_groups
            .iter_mut()
            .find(|t| t.name == listener.target_group)
        else {
            continue;
        };
        let target_type = match d.target_type {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        };
        let lbc = adoption.target_groups.iter().find(|(tg, _, port)| {
            *port == Some(listener.port)
                && tg.protocol == d.protocol
                && tg.port == d.port
                && tg.target_type == target_type
        });
        if let Some((tg, _, _)) = lbc {
            d.name = tg.name.clone();
            listener.target_group = tg.name.clone();
        }
    }
}

/// The Service's NLB from LBC, if any: first among those berth adopted already (the
/// inventory, no listing), else by LBC's tags among all load balancers. An NLB berth made
/// itself for the Service means there is nothing to adopt.
pub async fn find<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    owner: Owner<'_>,
    cluster: &str,
    stack: &str,
) -> Result<Option<Adoption>, AwsError> {
    let known: Vec<String> = inventory.of(owner.uid).0.into_iter().collect();
    let lbs = aws.describe_load_balancers(&known).await?;
    let mut lb_tags = tag_all(aws, lbs.iter().map(|l| &l.arn)).await?;
    let owned: Vec<LbInfo> = lbs
        .into_iter()
        .filter(|l| lb_tags.get(&l.arn).is_some_and(|t| owner.owns(t)))
        .collect();
    let adopted_from_lbc = |l: &LbInfo| {
        lb_tags
            .get(&l.arn)
            .and_then(|t| t.get(tags::ADOPTED_FROM))
            .is_some_and(|v| v == FROM_LBC)
    };
    let earlier = owned.iter().find(|l| adopted_from_lbc(l)).cloned();
    let chosen = match earlier {
        Some(lb) => Some(lb),
        None if !owned.is_empty() => return Ok(None),
        None => {
            let mut all = aws.all_load_balancers().await?;
            all.sort_by(|a, b| a.name.cmp(&b.name));
            lb_tags = tag_all(aws, all.iter().map(|l| &l.arn)).await?;
            all.into_iter().find(|l| {
                lb_tags
                    .get(&l.arn)
                    .and_then(|t| adoptable(t, cluster, stack, owner))
                    == Some(Role::LoadBalancer)
            })
        }
    };
    let Some(lb) = chosen else {
        return Ok(None);
    };
    let attached = aws.target_groups_of(&lb.arn).await?;
    let mut tg_tags = tag_all(aws, attached.iter().map(|t| &t.arn)).await?;
    let target_groups = attached
        .into_iter()
        .filter_map(|tg| {
            let t = tg_tags.remove(&tg.arn).unwrap_or_default();
            match adoptable(&t, cluster, stack, owner) {
                Some(Role::TargetGroup(port)) => Some((tg, t, Some(port))),
                _ if owner.owns(&t) => Some((tg, t, None)),
                // Attached by hand, or another's: the apply keeps its hands off it.
                _ => None,
            }
        })
        .collect();
    let lb_tags = lb_tags.remove(&lb.arn).unwrap_or_default();
    Ok(Some(Adoption {
        lb,
        lb_tags,
        target_groups,
    }))
}

async fn tag_all<'a, A: AwsApi>(
    aws: &A,
    arns: impl Iterator<Item = &'a String>,
) -> Result<BTreeMap<String, Tags>, AwsError> {
    let arns: Vec<String> = arns.cloned().collect();
    if arns.is_empty() {
        return Ok(BTreeMap::new());
    }
    aws.tags(&arns).await
}

/// Puts berth's tags (the desired ones, after [`take_names`]) on the adopted NLB and its
/// target groups, the identity in the first call, so the IAM policy's adoption rule
/// applies; target groups no port wants get the Service's tags without a resource, so the
/// apply deletes them as stale. Records them in the inventory.
pub async fn take_over<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    adoption: &Adoption,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
) -> Result<(), AwsError> {
    if adoption.taken(owner) {
        return Ok(());
    }
    if !owner.owns(&adoption.lb_tags) {
        aws.add_tags(&adoption.lb.arn, &desired.tags).await?;
        tracing::info!(lb = %adoption.lb.name, arn = %adoption.lb.arn, "adopted the AWS Load Balancer Controller's load balancer");
    }
    inventory.add_lb(owner.uid, &adoption.lb.arn);
    let service_tags: Tags = desired
        .tags
        .iter()
        .filter(|(k, _)| *k != tags::RESOURCE && *k != tags::ADOPTED_FROM)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (tg, t, _) in &adoption.target_groups {
        if !owner.owns(t) {
            let wanted = desired
                .target_groups
                .iter()
                .find(|d| d.name == tg.name)
                .map(|d| &d.tags)
                .unwrap_or(&service_tags);
            aws.add_tags(&tg.arn, wanted).await?;
            tracing::info!(tg = %tg.name, "adopted the AWS Load Balancer Controller's target group");
        }
        inventory.add_tg(owner.uid, &tg.arn);
    }
    Ok(())
}

/// Removes berth's tags from what it adopted for `owner` and LBC still recognises (its
/// tags are on it), forgetting it in the inventory: the Service stopped being berth's
/// without being deleted, so LBC takes it back as it left it. A load balancer berth made
/// in place of an adopted one (a replacement) is berth's own and is not handed back.
/// Answers how many load balancers were handed back.
pub async fn hand_back<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    owner: Owner<'_>,
) -> Result<usize, AwsError> {
    let (lb_arns, tg_arns) = inventory.of(owner.uid);
    if lb_arns.is_empty() {
        return Ok(0);
    }
    let lbs = aws
        .describe_load_balancers(&lb_arns.into_iter().collect::<Vec<_>>())
        .await?;
    let lb_tags = tag_all(aws, lbs.iter().map(|l| &l.arn)).await?;
    let lbc_made = |t: &Tags| {
        owner.owns(t)
            && t.get(tags::ADOPTED_FROM).is_some_and(|v| v == FROM_LBC)
            && t.contains_key(lbc_tags::STACK)
    };
    let mut handed = 0;
    let mut groups: BTreeSet<String> = tg_arns;
    let keys: Vec<String> = BERTH_TAGS.iter().map(|k| k.to_string()).collect();
    for lb in &lbs {
        if !lb_tags.get(&lb.arn).is_some_and(lbc_made) {
            continue;
        }
        groups.extend(
            aws.target_groups_of(&lb.arn)
                .await?
                .into_iter()
                .map(|t| t.arn),
        );
        aws.remove_tags(&lb.arn, &keys).await?;
        inventory.remove(&lb.arn);
        handed += 1;
        tracing::info!(lb = %lb.name, "handed the load balancer back to the AWS Load Balancer Controller");
    }
    if handed == 0 {
        return Ok(0);
    }
    let tg_tags = tag_all(aws, groups.iter()).await?;
    for arn in &groups {
        let Some(t) = tg_tags.get(arn) else { continue };
        if owner.owns(t) && t.contains_key(lbc_tags::STACK) {
            aws.remove_tags(arn, &keys).await?;
            inventory.remove(arn);
        }
    }
    Ok(handed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::identity::Identity;

    fn svc(class: Option<&str>, ann: &[(&str, &str)], finalizers: &[&str]) -> Service {
        let ann: BTreeMap<String, String> = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": ann,
                         "finalizers": finalizers},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": class,
                     "ports": [{"port": 80}]}
        }))
        .expect("service")
    }

    fn t(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn lbc_serves_its_class_and_the_legacy_annotations_only() {
        assert!(lbc_serves(&svc(Some(LBC_CLASS), &[], &[])));
        assert!(!lbc_serves(&svc(Some("berth.dev/x"), &[], &[])));
        assert!(!lbc_serves(&svc(None, &[], &[])));
        assert!(lbc_serves(&svc(
            None,
            &[(annotations::LB_TYPE, "nlb-ip")],
            &[]
        )));
        let external = |target: &str| {
            svc(
                None,
                &[
                    (annotations::LB_TYPE, "external"),
                    (annotations::NLB_TARGET_TYPE, target),
                ],
                &[],
            )
        };
        assert!(lbc_serves(&external("ip")));
        assert!(lbc_serves(&external("instance")));
        assert!(!lbc_serves(&external("other")));
        assert!(!lbc_serves(&svc(
            None,
            &[(annotations::LB_TYPE, "external")],
            &[]
        )));
        // The in-tree provider's NLB, and a class that merely carries the annotation.
        assert!(!lbc_serves(&svc(
            None,
            &[(annotations::LB_TYPE, "nlb")],
            &[]
        )));
        assert!(!lbc_serves(&svc(
            Some("berth.dev/x"),
            &[(annotations::LB_TYPE, "nlb-ip")],
            &[]
        )));
        let mut cluster_ip = svc(Some(LBC_CLASS), &[], &[]);
        if let Some(s) = cluster_ip.spec.as_mut() {
            s.type_ = Some("ClusterIP".into());
        }
        assert!(!lbc_serves(&cluster_ip));
    }

    fn class(name: &str, adopts: bool) -> Arc<LoadBalancerClass> {
        let aws = if adopts {
            serde_json::json!({"adoptFrom": ["aws-load-balancer-controller"]})
        } else {
            serde_json::json!({})
        };
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
                "metadata": {"name": name}, "spec": {"aws": aws}
            }))
            .expect("class"),
        )
    }

    #[test]
    fn one_class_adopts_and_two_conflict() {
        assert_eq!(adopter(&[class("a", false)]), Adopter::None);
        assert_eq!(
            adopter(&[class("a", false), class("b", true)]),
            Adopter::One("b".into())
        );
        assert_eq!(
            adopter(&[class("c", true), class("b", true)]),
            Adopter::Conflict(vec!["b".into(), "c".into()])
        );
    }

    #[test]
    fn lbc_finalizer_blocks_with_the_command_that_removes_it() {
        assert_eq!(blocked(&svc(Some(LBC_CLASS), &[], &[])), None);
        let s = svc(
            Some(LBC_CLASS),
            &[],
            &["berth.dev/load-balancer", LBC_FINALIZER],
        );
        let m = blocked(&s).expect("blocked");
        assert!(m.contains("kubectl -n shop patch service web"), "{m}");
        assert!(m.contains("/metadata/finalizers/1"), "{m}");
    }

    #[test]
    fn roles_need_this_cluster_and_this_service() {
        let lb = t(&[
            (lbc_tags::CLUSTER, "prod"),
            (lbc_tags::STACK, "shop/web"),
            (lbc_tags::RESOURCE, "LoadBalancer"),
        ]);
        assert_eq!(lbc_role(&lb, "prod", "shop/web"), Some(Role::LoadBalancer));
        assert_eq!(
            lbc_role(&lb, "staging", "shop/web"),
            None,
            "another cluster"
        );
        assert_eq!(lbc_role(&lb, "prod", "shop/api"), None, "another Service");
        let tg = t(&[
            (lbc_tags::CLUSTER, "prod"),
            (lbc_tags::STACK, "shop/web"),
            (lbc_tags::RESOURCE, "shop/web:443"),
        ]);
        assert_eq!(
            lbc_role(&tg, "prod", "shop/web"),
            Some(Role::TargetGroup(443))
        );
        let odd = t(&[
            (lbc_tags::CLUSTER, "prod"),
            (lbc_tags::STACK, "shop/web"),
            (lbc_tags::RESOURCE, "shop/webx:443"),
        ]);
        assert_eq!(lbc_role(&odd, "prod", "shop/web"), None);
        assert_eq!(lbc_role(&Tags::new(), "prod", "shop/web"), None);
    }

    #[test]
    fn resources_another_berth_or_service_took_are_not_adoptable() {
        let me = Identity::new("id-a", "prod");
        let owner = Owner {
            identity: &me,
            uid: "u1",
        };
        let base = [
            (lbc_tags::CLUSTER, "prod"),
            (lbc_tags::STACK, "shop/web"),
            (lbc_tags::RESOURCE, "LoadBalancer"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut m = t(&base);
            m.extend(t(extra));
            m
        };
        assert_eq!(
            adoptable(&with(&[]), "prod", "shop/web", owner),
            Some(Role::LoadBalancer)
        );
        let ours = with(&[(tags::CLUSTER_ID, "id-a"), (tags::SERVICE_UID, "u1")]);
        assert!(adoptable(&ours, "prod", "shop/web", owner).is_some());
        let theirs = with(&[(tags::CLUSTER_ID, "id-b")]);
        assert_eq!(adoptable(&theirs, "prod", "shop/web", owner), None);
        let other_uid = with(&[(tags::CLUSTER_ID, "id-a"), (tags::SERVICE_UID, "u2")]);
        assert_eq!(adoptable(&other_uid, "prod", "shop/web", owner), None);
    }
}
