//! Makes AWS match a desired load balancer, and deletes load balancers. Every step finds
//! what exists first (by deterministic name, by attachment to the load balancer, and by the
//! tag inventory), so a crash between any two calls leaves nothing the next run cannot
//! adopt or delete. [`teardown`] is the one delete path: Service deletion ([`remove`]),
//! replacement, and the orphan sweep all go through it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_crds::tags;

use crate::provider::aws::annotations::HealthCheck;
use crate::provider::aws::api::{
    AwsApi, AwsError, LbInfo, ListenerInfo, TagsByArn, TargetState, TgInfo,
};
use crate::provider::aws::identity::{Claim, Owner};
use crate::provider::aws::model::{DesiredListener, DesiredLoadBalancer, Target, TargetType};
use crate::provider::aws::replacement;
use crate::provider::aws::security_groups;

pub use crate::provider::aws::inventory::{Inventory, InventoryData};

const DELETION_PROTECTION: &str = "deletion_protection.enabled";
/// Value of [`tags::PROTECTION`] on a load balancer berth protected.
const PROTECTED_BY_BERTH: &str = "berth";

type Tags = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("name {0} is taken by a resource that is not this Service's")]
    NameConflict(String),
    /// The load balancer would have to be deleted (Service deleted, renamed, scheme
    /// changed) but deletion protection is on; `by_berth` when berth turned it on.
    #[error("{}", protected_message(.name, *.by_berth))]
    DeletionProtected { name: String, by_berth: bool },
    /// The change replaces the load balancer and the gate did not let it: nothing changed.
    #[error("{}", replacement::message(.0))]
    ReplacementPending(Box<replacement::Replacement>),
}

/// Whether a replacement may be made (the Service acknowledged it).
pub type Gate<'a> = &'a (dyn Fn(&replacement::Replacement) -> bool + Send + Sync);

fn protected_message(name: &str, by_berth: bool) -> String {
    if by_berth {
        format!(
            "deletion protection is enabled on load balancer {name}: remove deletion_protection.enabled=true from the attributes annotation to delete or replace it"
        )
    } else {
        format!(
            "deletion protection on load balancer {name} was turned on outside berth, and berth never turns it off: the load balancer, its listeners and target groups are kept until it is turned off in AWS"
        )
    }
}

/// Attributes whose desired value differs from the actual one. Pure.
pub fn attribute_changes(
    desired: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    desired
        .iter()
        .filter(|(k, v)| actual.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What to do with one target group's targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPlan {
    pub register: Vec<Target>,
    pub deregister: Vec<Target>,
    /// Registered, no longer wanted, but kept until the wanted targets are healthy.
    pub held: Vec<Target>,
}

/// Targets to register, to deregister and to keep for now. New targets are registered at
/// once; a registered target that is no longer wanted but whose endpoint still serves
/// (terminating, in `serving`) is deregistered only once every wanted target is healthy
/// (and there is one), so the group never trades healthy targets for ones still being
/// registered; the reconcile looks again meanwhile. A target whose endpoint is gone or no
/// longer serves goes at once: nothing is served by keeping it. Draining or unused targets
/// count as absent. Pure.
pub fn target_plan(
    desired: &BTreeSet<Target>,
    serving: &BTreeSet<Target>,
    actual: &[TargetState],
) -> TargetPlan {
    let present: BTreeMap<&Target, &str> = actual
        .iter()
        .filter(|t| !matches!(t.state.as_str(), "draining" | "unused"))
        .map(|t| (&t.target, t.state.as_str()))
        .collect();
    let register: Vec<Target> = desired
        .iter()
        .filter(|t| !present.contains_key(t))
        .cloned()
        .collect();
    // Without a listener (unused) nothing is served, so there is nothing to protect.
    let unused = actual.iter().any(|t| t.state == "unused");
    let replaced = unused
        || (!desired.is_empty()
            && desired
                .iter()
                .all(|t| present.get(t).is_some_and(|s| *s == "healthy")));
    let mut plan = TargetPlan {
        register,
        ..TargetPlan::default()
    };
    for t in present.into_keys().filter(|t| !desired.contains(*t)) {
        if serving.contains(t) && !replaced {
            plan.held.push(t.clone());
        } else {
            plan.deregister.push(t.clone());
        }
    }
    plan
}

/// Whether a target group is still changing in a way the reconcile must watch: a wanted
/// target not registered yet or still in its initial health checks, or a target held for
/// its replacement. Pure.
pub fn settling(desired: &BTreeSet<Target>, actual: &[TargetState], plan: &TargetPlan) -> bool {
    let initial = desired.iter().any(|d| {
        !actual
            .iter()
            .any(|a| a.target == *d && !matches!(a.state.as_str(), "initial" | "draining"))
    });
    !plan.held.is_empty() || initial
}

/// Whether the health check must be modified. An answer without success codes says
/// nothing about them (moto omits the matcher after a TCP→HTTP change). Pure.
pub fn health_check_differs(desired: &HealthCheck, actual: &HealthCheck) -> bool {
    let mut actual = actual.clone();
    if actual.success_codes.is_none() {
        actual.success_codes = desired.success_codes.clone();
    }
    *desired != actual
}

/// Tags to add or overwrite. Pure.
pub fn tag_changes(
    desired: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    attribute_changes(desired, actual)
}

#[derive(Debug, PartialEq, Eq)]
pub enum ListenerStep {
    Create,
    Modify(String),
    Keep,
}

/// What to do for one desired listener given the listeners that exist. Pure.
pub fn listener_step(
    desired: &DesiredListener,
    tg_arn: &str,
    actual: &[ListenerInfo],
) -> ListenerStep {
    match actual.iter().find(|l| l.port == desired.port) {
        None => ListenerStep::Create,
        Some(l)
            if l.protocol == desired.protocol
                && l.target_group_arn.as_deref() == Some(tg_arn)
                && l.certificate == desired.certificate
                && l.ssl_policy == desired.ssl_policy
                && l.alpn_policy == desired.alpn_policy =>
        {
            ListenerStep::Keep
        }
        Some(l) => ListenerStep::Modify(l.arn.clone()),
    }
}

/// What the Service's load balancer looks like after [`ensure`].
#[derive(Clone, Debug)]
pub struct Applied {
    pub lb: LbInfo,
    /// Per target group name: (healthy, total) targets.
    pub health: BTreeMap<String, (usize, usize)>,
    /// Per target group name: the targets' states, read before this pass changed them.
    pub targets: BTreeMap<String, Vec<TargetState>>,
    /// A target is being registered or held for its replacement: look again soon.
    pub settling: bool,
    /// Targets whose security group for the backend rules cannot be chosen.
    pub backend_problems: Vec<String>,
}

/// Finds the load balancer named `name` with its tags; one that is not this Service's
/// (another Service, another cluster, not berth's) is a conflict.
pub async fn find_own_lb<A: AwsApi>(
    aws: &A,
    name: &str,
    owner: Owner<'_>,
) -> Result<Option<(LbInfo, Tags)>, ApplyError> {
    let Some(lb) = aws.find_load_balancer(name).await? else {
        return Ok(None);
    };
    let tags = aws
        .tags(std::slice::from_ref(&lb.arn))
        .await?
        .remove(&lb.arn)
        .unwrap_or_default();
    if !owner.owns(&tags) {
        return Err(ApplyError::NameConflict(name.into()));
    }
    Ok(Some((lb, tags)))
}

/// Finds the target group named `name` with its tags; one that is not this Service's is a
/// conflict.
async fn find_own_tg<A: AwsApi>(
    aws: &A,
    name: &str,
    owner: Owner<'_>,
) -> Result<Option<(TgInfo, Tags)>, ApplyError> {
    let Some(tg) = aws.find_target_group(name).await? else {
        return Ok(None);
    };
    let tags = aws
        .tags(std::slice::from_ref(&tg.arn))
        .await?
        .remove(&tg.arn)
        .unwrap_or_default();
    if !owner.owns(&tags) {
        return Err(ApplyError::NameConflict(name.into()));
    }
    Ok(Some((tg, tags)))
}

/// What to do about a load balancer with deletion protection on. Protection berth did
/// not turn on is always respected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Delete nothing and answer [`ApplyError::DeletionProtected`]: the owner still wants
    /// protection, or there is no owner left to say it does not (an orphan).
    Respect,
    /// The owner no longer asks for protection: if berth turned it on (its
    /// [`tags::PROTECTION`] tag), turn it off, then delete.
    LiftOwn,
}

/// What [`teardown`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub load_balancers: usize,
    pub target_groups: usize,
    pub security_groups: usize,
}

/// Whether berth turned on the protection of a load balancer with these tags. Pure.
pub fn protected_by_berth(tags: &Tags) -> bool {
    tags.get(tags::PROTECTION).map(String::as_str) == Some(PROTECTED_BY_BERTH)
}

/// `None` when deletion protection is off, else whether berth turned it on.
async fn protection_of<A: AwsApi>(aws: &A, lb: &LbInfo) -> Result<Option<bool>, AwsError> {
    let on = match aws.load_balancer_attributes(&lb.arn).await {
        Ok(attrs) => attrs.get(DELETION_PROTECTION).map(String::as_str) == Some("true"),
        // Gone meanwhile: nothing protects it.
        Err(e) if e.is("LoadBalancerNotFound") => false,
        Err(e) => return Err(e),
    };
    if !on {
        return Ok(None);
    }
    let tags = aws.tags(std::slice::from_ref(&lb.arn)).await?;
    Ok(Some(tags.get(&lb.arn).is_some_and(protected_by_berth)))
}

/// Checks that every load balancer may be deleted under `protection`; answers those whose
/// protection berth turns off first.
async fn check_protection<A: AwsApi>(
    aws: &A,
    lbs: &[LbInfo],
    protection: Protection,
) -> Result<Vec<String>, ApplyError> {
    let mut lift = Vec::new();
    for lb in lbs {
        match protection_of(aws, lb).await? {
            None => {}
            Some(true) if protection == Protection::LiftOwn => lift.push(lb.arn.clone()),
            Some(by_berth) => {
                return Err(ApplyError::DeletionProtected {
                    name: lb.name.clone(),
                    by_berth,
                });
            }
        }
    }
    Ok(lift)
}

/// Deletes load balancers with their listeners, and answers the target groups they
/// forwarded to. Deletion protection is checked on all of them before anything is
/// deleted, so a protected load balancer keeps its listeners.
async fn delete_load_balancers<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    lbs: &[LbInfo],
    protection: Protection,
) -> Result<BTreeSet<String>, ApplyError> {
    let protected = check_protection(aws, lbs, protection).await?;
    let mut target_groups = BTreeSet::new();
    for lb in lbs {
        target_groups.extend(
            aws.target_groups_of(&lb.arn)
                .await?
                .into_iter()
                .map(|t| t.arn),
        );
        if protected.contains(&lb.arn) {
            let off = BTreeMap::from([(DELETION_PROTECTION.to_string(), "false".to_string())]);
            aws.modify_load_balancer_attributes(&lb.arn, &off).await?;
        }
        // Explicitly, so the target groups are free even where deleting the load balancer
        // leaves its listeners behind for a while.
        for l in aws.listeners(&lb.arn).await.or_else(not_found)? {
            aws.delete_listener(&l.arn).await?;
        }
        aws.delete_load_balancer(&lb.arn).await?;
        inventory.remove(&lb.arn);
        tracing::info!(lb = %lb.name, arn = %lb.arn, "deleted load balancer");
    }
    Ok(target_groups)
}

/// A listing of something already deleted is empty.
fn not_found<T: Default>(e: AwsError) -> Result<T, AwsError> {
    if e.is("LoadBalancerNotFound") || e.is("TargetGroupNotFound") {
        Ok(T::default())
    } else {
        Err(e)
    }
}

/// Deletes those of the target groups `arns` that are the owner's: one attached to its
/// load balancer by hand, or another cluster's, is never deleted. Answers how many went.
async fn delete_target_groups<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    owner: Owner<'_>,
    arns: &BTreeSet<String>,
) -> Result<usize, ApplyError> {
    if arns.is_empty() {
        return Ok(0);
    }
    let tags = aws.tags(&arns.iter().cloned().collect::<Vec<_>>()).await?;
    let mut deleted = 0;
    for arn in arns {
        if !tags.get(arn).is_some_and(|t| owner.owns(t)) {
            tracing::info!(arn = %arn, "target group is not this Service's: kept");
            continue;
        }
        aws.delete_target_group(arn).await?;
        inventory.remove(arn);
        deleted += 1;
        tracing::info!(arn = %arn, "deleted target group");
    }
    Ok(deleted)
}

/// The one delete path: the load balancers `lbs` (listeners first), then those of the
/// target groups they forwarded to and `target_groups` that are the owner's, then the
/// owner's backend rules and managed security groups. With
/// [`Protection::Respect`], or protection berth did not turn on, a protected load
/// balancer stops it before anything is deleted, keeping listeners and target groups.
pub async fn teardown<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    owner: Owner<'_>,
    lbs: &[LbInfo],
    target_groups: BTreeSet<String>,
    protection: Protection,
) -> Result<Removed, ApplyError> {
    let mut tgs = delete_load_balancers(aws, inventory, lbs, protection).await?;
    tgs.extend(target_groups);
    let target_groups = delete_target_groups(aws, inventory, owner, &tgs).await?;
    // Last: a group is in use while a load balancer or another group's rule refers to it.
    let frontend: Vec<String> = lbs
        .iter()
        .flat_map(|l| l.security_groups.iter().cloned())
        .collect();
    let security_groups = security_groups::release(aws, owner, &frontend).await?;
    Ok(Removed {
        load_balancers: lbs.len(),
        target_groups,
        security_groups,
    })
}

/// Whether `desired` itself asks for deletion protection.
fn wants_protection(desired: &DesiredLoadBalancer) -> Protection {
    match desired
        .attributes
        .get(DELETION_PROTECTION)
        .map(String::as_str)
    {
        Some("true") => Protection::Respect,
        _ => Protection::LiftOwn,
    }
}

/// The Service's load balancer as [`ensure_load_balancer`] found or made it.
struct Found {
    lb: LbInfo,
    tags: Tags,
    /// Created just now.
    fresh: bool,
    /// The frontend security groups it should have (the managed one exists).
    groups: Vec<String>,
    /// The Service had no load balancer before.
    new: bool,
    /// What [`security_groups::frontend_groups`] learnt of the nodes' groups' rules.
    node_rules: security_groups::NodeRules,
}

/// Step 1: the load balancer, adopted by name, replaced when an immutable property
/// changed, else created. A new one replaces the Service's earlier load balancers
/// (renamed): not while one of them is protected and may not be deleted.
async fn ensure_load_balancer<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
    gate: Gate<'_>,
) -> Result<Found, ApplyError> {
    let mut lb = find_own_lb(aws, &desired.name, owner).await?;
    if let Some((existing, _)) = &lb
        && let Some(r) = replacement::replacement(existing, desired)
    {
        if !gate(&r) {
            return Err(ApplyError::ReplacementPending(Box::new(r)));
        }
        tracing::info!(lb = %existing.name, token = %r.token, "replacing the load balancer");
        // Its target groups stay: the new load balancer adopts them by name.
        let protection = wants_protection(desired);
        delete_load_balancers(aws, inventory, std::slice::from_ref(existing), protection).await?;
        lb = None;
    }
    if let Some((lb, tags)) = lb {
        let security = &desired.security;
        let (groups, node_rules) =
            security_groups::frontend_groups(aws, security, owner, Some(&lb), false).await?;
        return Ok(Found {
            lb,
            tags,
            fresh: false,
            groups,
            new: false,
            node_rules,
        });
    }
    let previous: Vec<String> = inventory.of(owner.uid).0.into_iter().collect();
    if !previous.is_empty() {
        let previous = aws.describe_load_balancers(&previous).await?;
        if let Some(old) = previous.first() {
            let r = replacement::renamed(old, desired);
            if !gate(&r) {
                return Err(ApplyError::ReplacementPending(Box::new(r)));
            }
        }
        check_protection(aws, &previous, Protection::LiftOwn).await?;
    }
    // An NLB gets security groups only at creation: the managed one is made first.
    let new = previous.is_empty();
    let (groups, node_rules) =
        security_groups::frontend_groups(aws, &desired.security, owner, None, new).await?;
    let with_groups = DesiredLoadBalancer {
        security_groups: groups.clone(),
        ..desired.clone()
    };
    let created = match aws.create_load_balancer(&with_groups).await {
        Ok(lb) => lb,
        // Created by an earlier attempt whose answer was lost.
        Err(e) if e.is("DuplicateLoadBalancerName") => {
            find_own_lb(aws, &desired.name, owner)
                .await?
                .ok_or_else(|| ApplyError::NameConflict(desired.name.clone()))?
                .0
        }
        Err(e) => return Err(e.into()),
    };
    inventory.add_lb(owner.uid, &created.arn);
    tracing::info!(lb = %created.name, arn = %created.arn, "created load balancer");
    Ok(Found {
        lb: created,
        tags: desired.tags.clone(),
        fresh: true,
        groups,
        new,
        node_rules,
    })
}

/// Keeps the record of who turned deletion protection on, before any attribute changes:
/// berth tags the load balancer before turning protection on, and drops a change that
/// would turn off protection it did not turn on. A load balancer of an earlier berth
/// (`legacy`) that the annotation protects was protected by berth. Answers whether berth
/// turns protection off now (its record goes afterwards).
async fn record_protection<A: AwsApi>(
    aws: &A,
    lb: &Found,
    legacy: bool,
    desired: &DesiredLoadBalancer,
    actual: &Tags,
    changes: &mut Tags,
) -> Result<bool, AwsError> {
    let wants = desired
        .attributes
        .get(DELETION_PROTECTION)
        .map(String::as_str);
    let on = actual.get(DELETION_PROTECTION).map(String::as_str) == Some("true");
    let recorded = protected_by_berth(&lb.tags);
    match wants {
        Some("true") if !recorded && (!on || legacy) => {
            let record = BTreeMap::from([(tags::PROTECTION.into(), PROTECTED_BY_BERTH.into())]);
            aws.add_tags(&lb.lb.arn, &record).await?;
            Ok(false)
        }
        Some("false") if on && !recorded => {
            tracing::warn!(lb = %lb.lb.name, "deletion protection was turned on outside berth: not turning it off");
            changes.remove(DELETION_PROTECTION);
            Ok(false)
        }
        Some("false") => Ok(on),
        _ => Ok(false),
    }
}

/// The load balancer's mutable properties: address type, subnets, attributes.
async fn update_load_balancer<A: AwsApi>(
    aws: &A,
    found: &Found,
    legacy: bool,
    desired: &DesiredLoadBalancer,
) -> Result<(), ApplyError> {
    let lb = &found.lb;
    if lb.ip_address_type != desired.ip_address_type.as_str() {
        aws.set_ip_address_type(&lb.arn, desired.ip_address_type)
            .await?;
    }
    let want_subnets: BTreeSet<&String> = desired.subnets.iter().collect();
    let have_subnets: BTreeSet<&String> = lb.subnets.iter().collect();
    if want_subnets != have_subnets {
        aws.set_subnets(&lb.arn, &desired.subnets, &desired.mappings)
            .await?;
    }
    if !desired.attributes.is_empty() {
        let actual = aws.load_balancer_attributes(&lb.arn).await?;
        let mut changes = attribute_changes(&desired.attributes, &actual);
        let lifted = record_protection(aws, found, legacy, desired, &actual, &mut changes).await?;
        if !changes.is_empty() {
            aws.modify_load_balancer_attributes(&lb.arn, &changes)
                .await?;
        }
        if lifted {
            aws.remove_tags(&lb.arn, &[tags::PROTECTION.to_string()])
                .await?;
        }
    }
    Ok(())
}

/// The target groups attached to the load balancer, each read once with its tags.
#[derive(Default)]
struct Attached {
    /// The owner's.
    own: Vec<TgInfo>,
    /// The ARNs of the others (attached by hand: never reused, repointed from or deleted).
    foreign: BTreeSet<String>,
    /// Tags of the owner's, by ARN.
    tags: TagsByArn,
}

async fn attached_groups<A: AwsApi>(
    aws: &A,
    lb: &LbInfo,
    owner: Owner<'_>,
) -> Result<Attached, AwsError> {
    let all = aws.target_groups_of(&lb.arn).await?;
    if all.is_empty() {
        return Ok(Attached::default());
    }
    let arns: Vec<String> = all.iter().map(|t| t.arn.clone()).collect();
    let mut tags = aws.tags(&arns).await?;
    let (own, foreign): (Vec<TgInfo>, Vec<TgInfo>) = all
        .into_iter()
        .partition(|t| tags.get(&t.arn).is_some_and(|t| owner.owns(t)));
    tags.retain(|arn, _| own.iter().any(|t| &t.arn == arn));
    Ok(Attached {
        own,
        foreign: foreign.into_iter().map(|t| t.arn).collect(),
        tags,
    })
}

/// The Service's target groups by desired name, the ARNs of those created just now, and
/// the tags each has (read with it, or given at creation): no second read for tags.
struct TargetGroups {
    by_name: HashMap<String, TgInfo>,
    fresh: BTreeSet<String>,
    tags: TagsByArn,
}

/// Step 2: target groups: attached ones, then unattached ones by name (left by a crash),
/// else created. A load balancer created just now has nothing attached: no lookups.
async fn ensure_target_groups<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
    attached: &Attached,
    fresh_lb: bool,
) -> Result<TargetGroups, ApplyError> {
    let mut out = TargetGroups {
        by_name: attached
            .own
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect(),
        fresh: BTreeSet::new(),
        tags: attached.tags.clone(),
    };
    for d in &desired.target_groups {
        if out.by_name.contains_key(&d.name) {
            continue;
        }
        let existing = if fresh_lb {
            None
        } else {
            find_own_tg(aws, &d.name, owner).await?
        };
        let (tg, tags) = match existing {
            Some(found) => found,
            None => match aws.create_target_group(d).await {
                Ok(tg) => {
                    tracing::info!(tg = %tg.name, "created target group");
                    out.fresh.insert(tg.arn.clone());
                    (tg, d.tags.clone())
                }
                // Left by an earlier load balancer of this Service: adopt it.
                Err(e) if e.is("DuplicateTargetGroupName") => find_own_tg(aws, &d.name, owner)
                    .await?
                    .ok_or(ApplyError::Aws(e))?,
                Err(e) => return Err(e.into()),
            },
        };
        out.tags.insert(tg.arn.clone(), tags);
        inventory.add_tg(owner.uid, &tg.arn);
        out.by_name.insert(d.name.clone(), tg);
    }
    Ok(out)
}

/// Step 3: the tags of the load balancer and every target group, against the tags read
/// with them (or given at their creation): no call unless a tag is missing or differs.
async fn sync_tags<A: AwsApi>(
    aws: &A,
    lb: &Found,
    desired: &DesiredLoadBalancer,
    tgs: &TargetGroups,
) -> Result<(), ApplyError> {
    let empty = BTreeMap::new();
    let mut wanted = vec![(&lb.lb.arn, &desired.tags, &lb.tags)];
    wanted.extend(desired.target_groups.iter().filter_map(|d| {
        let arn = &tgs.by_name.get(&d.name)?.arn;
        Some((arn, &d.tags, tgs.tags.get(arn).unwrap_or(&empty)))
    }));
    for (arn, tags, actual) in wanted {
        let changes = tag_changes(tags, actual);
        if !changes.is_empty() {
            aws.add_tags(arn, &changes).await?;
        }
    }
    Ok(())
}

/// What [`sync_target_groups`] found.
#[derive(Default)]
struct TargetHealth {
    health: BTreeMap<String, (usize, usize)>,
    targets: BTreeMap<String, Vec<TargetState>>,
    settling: bool,
}

/// Step 4: each target group's health check, attributes and targets (registered before
/// others are deregistered: [`target_plan`]).
async fn sync_target_groups<A: AwsApi>(
    aws: &A,
    desired: &DesiredLoadBalancer,
    tgs: &TargetGroups,
) -> Result<TargetHealth, ApplyError> {
    let mut out = TargetHealth::default();
    for d in &desired.target_groups {
        let Some(tg) = tgs.by_name.get(&d.name) else {
            continue;
        };
        if health_check_differs(&d.health_check, &tg.health_check) {
            aws.modify_health_check(&tg.arn, &d.health_check).await?;
        }
        if !d.attributes.is_empty() {
            let actual = aws.target_group_attributes(&tg.arn).await?;
            let changes = attribute_changes(&d.attributes, &actual);
            if !changes.is_empty() {
                aws.modify_target_group_attributes(&tg.arn, &changes)
                    .await?;
            }
        }
        let actual = if tgs.fresh.contains(&tg.arn) {
            Vec::new()
        } else {
            aws.target_health(&tg.arn).await?
        };
        let plan = target_plan(&d.targets, &d.serving, &actual);
        if !plan.register.is_empty() {
            aws.register_targets(&tg.arn, &plan.register).await?;
        }
        if !plan.deregister.is_empty() {
            aws.deregister_targets(&tg.arn, &plan.deregister).await?;
        }
        if !plan.held.is_empty() {
            tracing::debug!(tg = %tg.name, held = ?plan.held, "terminating targets kept until their replacements are healthy");
        }
        // Instance targets hold nothing back (no readiness gate, no terminating endpoint
        // kept): their registration needs no second look.
        out.settling |= d.target_type == TargetType::Ip && settling(&d.targets, &actual, &plan);
        let healthy = actual
            .iter()
            .filter(|t| t.state == "healthy" && d.targets.contains(&t.target))
            .count();
        out.health
            .insert(d.name.clone(), (healthy, d.targets.len()));
        out.targets.insert(d.name.clone(), actual);
    }
    Ok(out)
}

/// A listener's certificate list (besides the default) and its attributes. Only the
/// attributes the Service names are set; the others are left as they are. A listener
/// created just now has no extra certificates: nothing to read.
async fn sync_listener_extras<A: AwsApi>(
    aws: &A,
    arn: &str,
    l: &DesiredListener,
    fresh: bool,
) -> Result<(), ApplyError> {
    let tls = l.protocol == "TLS";
    if tls && !(fresh && l.extra_certificates.is_empty()) {
        let have = if fresh {
            Vec::new()
        } else {
            aws.listener_certificates(arn).await?
        };
        let (add, remove) = certificate_changes(&l.extra_certificates, &have);
        if !add.is_empty() {
            aws.add_listener_certificates(arn, &add).await?;
        }
        if !remove.is_empty() {
            aws.remove_listener_certificates(arn, &remove).await?;
        }
    }
    if !l.attributes.is_empty() {
        let actual = if fresh {
            BTreeMap::new()
        } else {
            aws.listener_attributes(arn).await?
        };
        let changes = attribute_changes(&l.attributes, &actual);
        if !changes.is_empty() {
            aws.modify_listener_attributes(arn, &changes).await?;
        }
    }
    Ok(())
}

/// Extra certificates to add and to remove. Pure.
pub fn certificate_changes(desired: &[String], actual: &[String]) -> (Vec<String>, Vec<String>) {
    let add = desired
        .iter()
        .filter(|c| !actual.contains(c))
        .cloned()
        .collect();
    let remove = actual
        .iter()
        .filter(|c| !desired.contains(c))
        .cloned()
        .collect();
    (add, remove)
}

/// Step 5: listeners: create or repoint, then delete the ones no port wants, except
/// those forwarding to a target group that is not the Service's (added by hand).
async fn sync_listeners<A: AwsApi>(
    aws: &A,
    lb: &LbInfo,
    desired: &DesiredLoadBalancer,
    tgs: &TargetGroups,
    foreign: &BTreeSet<String>,
    fresh_lb: bool,
) -> Result<(), ApplyError> {
    let listeners = if fresh_lb {
        Vec::new()
    } else {
        aws.listeners(&lb.arn).await?
    };
    for l in &desired.listeners {
        let Some(tg) = tgs.by_name.get(&l.target_group) else {
            continue;
        };
        let (arn, fresh) = match listener_step(l, &tg.arn, &listeners) {
            ListenerStep::Create => (aws.create_listener(&lb.arn, l, &tg.arn).await?, true),
            ListenerStep::Modify(arn) => {
                aws.modify_listener(&arn, l, &tg.arn).await?;
                (arn, false)
            }
            ListenerStep::Keep => {
                let arn = listeners.iter().find(|x| x.port == l.port);
                (arn.map(|x| x.arn.clone()).unwrap_or_default(), false)
            }
        };
        sync_listener_extras(aws, &arn, l, fresh).await?;
    }
    let wanted_ports: BTreeSet<i32> = desired.listeners.iter().map(|l| l.port).collect();
    let theirs = |l: &ListenerInfo| {
        l.target_group_arn
            .as_ref()
            .is_some_and(|t| foreign.contains(t))
    };
    for l in listeners
        .iter()
        .filter(|l| !wanted_ports.contains(&l.port) && !theirs(l))
    {
        aws.delete_listener(&l.arn).await?;
    }
    Ok(())
}

/// Step 6: target groups and load balancers of this Service that are no longer wanted.
async fn delete_stale<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    lb: &LbInfo,
    desired: &DesiredLoadBalancer,
    attached: &[TgInfo],
    tgs: &TargetGroups,
    owner: Owner<'_>,
) -> Result<(), ApplyError> {
    let wanted: BTreeSet<&String> = desired
        .target_groups
        .iter()
        .filter_map(|d| tgs.by_name.get(&d.name).map(|t| &t.arn))
        .collect();
    let (other_lbs, inventory_tgs) = inventory.of(owner.uid);
    let stale_tgs: BTreeSet<String> = attached
        .iter()
        .map(|t| t.arn.clone())
        .chain(inventory_tgs)
        .filter(|arn| !wanted.contains(arn))
        .collect();
    let stale_lbs: Vec<String> = other_lbs.into_iter().filter(|arn| *arn != lb.arn).collect();
    let old = aws.describe_load_balancers(&stale_lbs).await?;
    for lb in &old {
        tracing::info!(lb = %lb.name, "deleting the Service's previous load balancer");
    }
    // Target groups the wanted load balancer still uses are never stale.
    let attached_old = delete_load_balancers(aws, inventory, &old, Protection::LiftOwn).await?;
    let stale: BTreeSet<String> = stale_tgs
        .into_iter()
        .chain(attached_old)
        .filter(|arn| !wanted.contains(arn))
        .collect();
    delete_target_groups(aws, inventory, owner, &stale).await?;
    Ok(())
}

/// Makes AWS match `desired` for the Service `owner`. Resources of an earlier berth
/// (tagged with the cluster name only) get the identity tag on the way.
pub async fn ensure<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
) -> Result<Applied, ApplyError> {
    ensure_gated(aws, inventory, desired, owner, &|_| true).await
}

/// [`ensure`], making a replacement of the load balancer only when `gate` lets it;
/// otherwise nothing is changed and the answer is [`ApplyError::ReplacementPending`].
pub async fn ensure_gated<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
    gate: Gate<'_>,
) -> Result<Applied, ApplyError> {
    let mut found = ensure_load_balancer(aws, inventory, desired, owner, gate).await?;
    let legacy = owner.identity.claim(&found.tags) == Claim::Legacy;
    if legacy {
        // First: the IAM policy lets berth change only resources carrying the identity.
        let identity = owner.identity.tag();
        aws.add_tags(&found.lb.arn, &identity).await?;
        found.tags.extend(identity);
        tracing::info!(lb = %found.lb.name, "gave a load balancer of an earlier berth this cluster's identity");
    }
    update_load_balancer(aws, &found, legacy, desired).await?;
    let backend_problems = sync_security(aws, &found, desired, owner).await?;
    let fresh = found.fresh;
    let attached = if fresh {
        Attached::default()
    } else {
        attached_groups(aws, &found.lb, owner).await?
    };
    let tgs = ensure_target_groups(aws, inventory, desired, owner, &attached, fresh).await?;
    sync_tags(aws, &found, desired, &tgs).await?;
    let lb = found.lb;
    let health = sync_target_groups(aws, desired, &tgs).await?;
    sync_listeners(aws, &lb, desired, &tgs, &attached.foreign, fresh).await?;
    delete_stale(aws, inventory, &lb, desired, &attached.own, &tgs, owner).await?;
    // Describe again only while provisioning, to learn when it turns active.
    let lb = if lb.state == "active" {
        lb
    } else {
        aws.find_load_balancer(&desired.name).await?.unwrap_or(lb)
    };
    Ok(Applied {
        lb,
        health: health.health,
        targets: health.targets,
        settling: health.settling,
        backend_problems,
    })
}

/// The load balancer's security groups swapped in place when they changed, the backend
/// rules made to match, and a managed group no longer used deleted. Answers the targets
/// whose group cannot be chosen.
async fn sync_security<A: AwsApi>(
    aws: &A,
    found: &Found,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
) -> Result<Vec<String>, ApplyError> {
    let lb = &found.lb;
    let want: BTreeSet<&String> = found.groups.iter().collect();
    let have: BTreeSet<&String> = lb.security_groups.iter().collect();
    if !found.fresh && !want.is_empty() && want != have {
        aws.set_security_groups(&lb.arn, &found.groups).await?;
        tracing::info!(lb = %lb.name, groups = ?found.groups, "set security groups");
    }
    let service = desired.tags.get(tags::SERVICE).cloned().unwrap_or_default();
    let security = &desired.security;
    let problems = security_groups::sync_backend(
        aws,
        security,
        &found.groups,
        owner,
        &service,
        found.node_rules.clone(),
    )
    .await?;
    let managed_in_use = matches!(security.frontend, security_groups::Frontend::Managed(_))
        && !found.groups.is_empty();
    // A Service that had no load balancer has no managed group left to delete.
    if !managed_in_use && !found.new {
        security_groups::delete_managed(aws, owner, &found.groups).await?;
    }
    Ok(problems)
}

/// Deletes every resource of the Service `owner`: load balancers named `names` (if they
/// are its own) or found in the inventory, and their target groups. Returns how many load
/// balancers were deleted. With `keep_protection`, or protection berth did not turn on, a
/// protected load balancer stops it before anything is deleted
/// ([`ApplyError::DeletionProtected`]).
pub async fn remove<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    owner: Owner<'_>,
    names: &[String],
    keep_protection: bool,
) -> Result<usize, ApplyError> {
    let (lb_arns, tg_arns) = inventory.of(owner.uid);
    let mut lbs: Vec<LbInfo> = aws
        .describe_load_balancers(&lb_arns.into_iter().collect::<Vec<_>>())
        .await?;
    for name in names {
        if lbs.iter().any(|l| &l.name == name) {
            continue;
        }
        match find_own_lb(aws, name, owner).await {
            Ok(Some((lb, _))) => lbs.push(lb),
            Ok(None) | Err(ApplyError::NameConflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let protection = if keep_protection {
        Protection::Respect
    } else {
        Protection::LiftOwn
    };
    let removed = teardown(aws, inventory, owner, &lbs, tg_arns, protection).await?;
    Ok(removed.load_balancers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, port: i32) -> Target {
        Target {
            id: id.into(),
            port,
        }
    }

    fn ts(id: &str, port: i32, state: &str) -> TargetState {
        TargetState {
            target: t(id, port),
            state: state.into(),
        }
    }

    #[test]
    fn only_differing_attributes_are_changed() {
        let desired = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]);
        let actual = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "3".to_string()),
            ("c".to_string(), "x".to_string()),
        ]);
        assert_eq!(
            attribute_changes(&desired, &actual),
            BTreeMap::from([("b".to_string(), "2".to_string())])
        );
        assert!(attribute_changes(&desired, &desired).is_empty());
    }

    #[test]
    fn targets_are_registered_and_deregistered_by_difference() {
        let desired = BTreeSet::from([t("i-1", 30080), t("i-2", 30080)]);
        let actual = vec![
            ts("i-2", 30080, "healthy"),
            ts("i-3", 30080, "unhealthy"),
            ts("i-1", 30080, "draining"),
        ];
        let plan = target_plan(&desired, &BTreeSet::new(), &actual);
        assert_eq!(plan.register, vec![t("i-1", 30080)]);
        assert_eq!(plan.deregister, vec![t("i-3", 30080)]);
        assert!(plan.held.is_empty());
        let steady = vec![ts("i-1", 30080, "initial"), ts("i-2", 30080, "healthy")];
        assert_eq!(
            target_plan(&desired, &BTreeSet::new(), &steady),
            TargetPlan::default()
        );
    }

    #[test]
    fn a_serving_target_leaves_only_after_every_replacement_is_healthy() {
        let (old, new) = (t("10.0.0.1", 80), t("10.0.0.2", 80));
        let desired = BTreeSet::from([new.clone()]);
        let serving = BTreeSet::from([old.clone()]);
        // The replacement is not even registered yet: register it, keep the old one.
        let before = vec![ts("10.0.0.1", 80, "healthy")];
        let plan = target_plan(&desired, &serving, &before);
        assert_eq!(plan.register, vec![new.clone()]);
        assert!(plan.deregister.is_empty());
        assert_eq!(plan.held, vec![old.clone()]);
        assert!(settling(&desired, &before, &plan));
        // Registered, still in its initial checks: nothing changes.
        let initial = vec![ts("10.0.0.1", 80, "healthy"), ts("10.0.0.2", 80, "initial")];
        let plan = target_plan(&desired, &serving, &initial);
        assert!(plan.register.is_empty() && plan.deregister.is_empty());
        assert_eq!(plan.held, vec![old.clone()]);
        // Healthy: now the old one goes (and drains).
        let healthy = vec![ts("10.0.0.1", 80, "healthy"), ts("10.0.0.2", 80, "healthy")];
        let plan = target_plan(&desired, &serving, &healthy);
        assert_eq!(plan.deregister, vec![old.clone()]);
        assert!(plan.held.is_empty());
        assert!(!settling(&desired, &healthy, &plan));
        // Draining counts as gone: it is not deregistered again.
        let drained = vec![
            ts("10.0.0.1", 80, "draining"),
            ts("10.0.0.2", 80, "healthy"),
        ];
        assert_eq!(
            target_plan(&desired, &serving, &drained),
            TargetPlan::default()
        );
    }

    #[test]
    fn a_target_that_no_longer_serves_goes_at_once() {
        let (old, new) = (t("10.0.0.1", 80), t("10.0.0.2", 80));
        let desired = BTreeSet::from([new.clone()]);
        let initial = vec![ts("10.0.0.1", 80, "healthy"), ts("10.0.0.2", 80, "initial")];
        // Its endpoint is gone (or not serving): holding it would only send traffic to
        // nothing.
        let plan = target_plan(&desired, &BTreeSet::new(), &initial);
        assert_eq!(plan.deregister, vec![old.clone()]);
        assert!(plan.held.is_empty());
        assert!(
            settling(&desired, &initial, &plan),
            "the new one is initial"
        );
        // Every endpoint terminating (no wanted target): the serving ones stay.
        let none = BTreeSet::new();
        let serving = BTreeSet::from([old.clone()]);
        let plan = target_plan(&none, &serving, &[ts("10.0.0.1", 80, "healthy")]);
        assert_eq!(plan.held, vec![old.clone()]);
    }

    #[test]
    fn listeners_are_kept_modified_or_created() {
        let d = DesiredListener {
            port: 80,
            protocol: "TCP".into(),
            certificate: None,
            ssl_policy: None,
            extra_certificates: Vec::new(),
            alpn_policy: None,
            attributes: BTreeMap::new(),
            target_group: "tg".into(),
        };
        let existing = vec![ListenerInfo {
            arn: "l1".into(),
            port: 80,
            protocol: "TCP".into(),
            target_group_arn: Some("arn-tg".into()),
            certificate: None,
            ssl_policy: None,
            alpn_policy: None,
        }];
        assert_eq!(listener_step(&d, "arn-tg", &existing), ListenerStep::Keep);
        assert_eq!(
            listener_step(&d, "arn-new", &existing),
            ListenerStep::Modify("l1".into())
        );
        let udp = DesiredListener {
            protocol: "TCP_UDP".into(),
            ..d.clone()
        };
        assert_eq!(
            listener_step(&udp, "arn-tg", &existing),
            ListenerStep::Modify("l1".into())
        );
        assert_eq!(listener_step(&d, "arn-tg", &[]), ListenerStep::Create);
        let tls = DesiredListener {
            protocol: "TLS".into(),
            certificate: Some("arn:cert".into()),
            ssl_policy: Some("ELBSecurityPolicy-2016-08".into()),
            ..d.clone()
        };
        let tls_now = vec![ListenerInfo {
            protocol: "TLS".into(),
            certificate: Some("arn:cert".into()),
            ssl_policy: Some("ELBSecurityPolicy-2016-08".into()),
            ..existing[0].clone()
        }];
        assert_eq!(listener_step(&tls, "arn-tg", &tls_now), ListenerStep::Keep);
        let other_policy = DesiredListener {
            ssl_policy: Some("ELBSecurityPolicy-TLS13-1-2-2021-06".into()),
            ..tls.clone()
        };
        assert_eq!(
            listener_step(&other_policy, "arn-tg", &tls_now),
            ListenerStep::Modify("l1".into())
        );
        assert_eq!(
            listener_step(&d, "arn-tg", &tls_now),
            ListenerStep::Modify("l1".into()),
            "TLS back to TCP"
        );
        let alpn = DesiredListener {
            alpn_policy: Some("HTTP2Preferred".into()),
            ..tls.clone()
        };
        assert_eq!(
            listener_step(&alpn, "arn-tg", &tls_now),
            ListenerStep::Modify("l1".into())
        );
    }

    #[test]
    fn extra_certificates_are_added_and_removed_by_difference() {
        let want = vec!["arn:b".to_string(), "arn:c".to_string()];
        let have = vec!["arn:a".to_string(), "arn:b".to_string()];
        assert_eq!(
            certificate_changes(&want, &have),
            (vec!["arn:c".to_string()], vec!["arn:a".to_string()])
        );
        assert_eq!(certificate_changes(&want, &want), (vec![], vec![]));
    }

    #[test]
    fn health_check_comparison_is_exact() {
        let a = HealthCheck::default_tcp();
        let mut b = a.clone();
        assert!(!health_check_differs(&a, &b));
        b.interval_seconds = 30;
        assert!(health_check_differs(&a, &b));
        let http = HealthCheck::etp_local(31000);
        let mut unknown_codes = http.clone();
        unknown_codes.success_codes = None;
        assert!(!health_check_differs(&http, &unknown_codes));
    }

    mod against_the_fake {
        use std::sync::{Arc, LazyLock};

        use berth_crds::tags;
        use k8s_openapi::api::core::v1::{Node, Service};

        use super::super::*;
        use crate::provider::aws::annotations::tests::{node, service};
        use crate::provider::aws::annotations::{annotations as keys, settings};
        use crate::provider::aws::fake::FakeAws;
        use crate::provider::aws::identity::Identity;
        use crate::provider::aws::model::{World, build};

        const UID: &str = "uid-1";

        static ME: LazyLock<Identity> = LazyLock::new(|| Identity::new("id-1", "c1"));

        fn me() -> Owner<'static> {
            Owner {
                identity: &ME,
                uid: UID,
            }
        }

        fn web(annotations: &[(&str, &str)]) -> Service {
            service(
                &[
                    ("http", 80, "TCP", Some(30080)),
                    ("dns", 53, "UDP", Some(30053)),
                ],
                annotations,
            )
        }

        fn nodes(ids: &[&str]) -> Vec<Arc<Node>> {
            ids.iter().map(|id| Arc::new(node(id, id, &[]))).collect()
        }

        fn desired(svc: &Service, nodes: &[Arc<Node>]) -> DesiredLoadBalancer {
            let subnets = vec!["subnet-a".to_string(), "subnet-b".to_string()];
            let world = World {
                cluster: "c1",
                vpc_id: "vpc-1",
                vpc_cidrs: &[],
                subnets: &subnets,
                subnet_cidrs: &BTreeMap::new(),
                nodes,
                slices: &[],
                gated_ready: &BTreeSet::new(),
            };
            let settings = settings(svc, &Default::default(), "c1").expect("settings");
            let mut d = build(svc, &settings, &world).expect("build");
            ME.stamp(&mut d);
            d
        }

        fn mutations(aws: &FakeAws) -> Vec<String> {
            aws.take_calls()
        }

        fn count(calls: &[String], op: &str) -> usize {
            calls
                .iter()
                .filter(|c| c.starts_with(&format!("{op} ")))
                .count()
        }

        #[tokio::test]
        async fn creates_everything_from_nothing_then_changes_nothing() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1", "i-2"]));
            let applied = ensure(&aws, &inv, &d, me()).await.expect("ensure");
            assert_eq!(applied.lb.name, d.name);
            {
                let s = aws.state();
                assert_eq!((s.lbs.len(), s.tgs.len(), s.listeners.len()), (1, 2, 2));
                for tg in s.tgs.values() {
                    assert_eq!(tg.targets.len(), 2, "{}", tg.info.name);
                    assert_eq!(
                        tg.tags.get(tags::SERVICE_UID).map(String::as_str),
                        Some(UID)
                    );
                }
                let ports: BTreeSet<i32> = s.listeners.values().map(|l| l.info.port).collect();
                assert_eq!(ports, BTreeSet::from([53, 80]));
            }
            assert_eq!(inv.of(UID).0.len(), 1);
            assert_eq!(inv.of(UID).1.len(), 2);
            mutations(&aws);
            ensure(&aws, &inv, &d, me()).await.expect("ensure again");
            assert_eq!(
                mutations(&aws),
                Vec::<String>::new(),
                "a second ensure changes nothing"
            );
        }

        #[tokio::test]
        async fn adopts_what_a_crashed_run_left() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            // A run that died after creating the load balancer and one target group, and
            // whose inventory died with it.
            aws.create_load_balancer(&d).await.expect("lb");
            aws.create_target_group(&d.target_groups[0])
                .await
                .expect("tg");
            mutations(&aws);
            ensure(&aws, &inv, &d, me()).await.expect("ensure");
            let calls = mutations(&aws);
            assert_eq!(count(&calls, "CreateLoadBalancer"), 0, "{calls:?}");
            assert_eq!(count(&calls, "CreateTargetGroup"), 1, "{calls:?}");
            assert_eq!(count(&calls, "CreateListener"), 2, "{calls:?}");
            let s = aws.state();
            assert_eq!((s.lbs.len(), s.tgs.len(), s.listeners.len()), (1, 2, 2));
            assert!(s.tgs.values().all(|t| t.targets.len() == 1));
        }

        #[tokio::test]
        async fn updates_attributes_health_check_targets_and_listeners_in_place() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let first = desired(&web(&[]), &nodes(&["i-1", "i-2"]));
            let lb = ensure(&aws, &inv, &first, me()).await.expect("ensure").lb;
            let changed = service(
                &[
                    ("http", 80, "TCP", Some(30080)),
                    ("https", 443, "TCP", Some(30443)),
                ],
                &[
                    (keys::ATTRIBUTES, "load_balancing.cross_zone.enabled=true"),
                    (keys::HC_INTERVAL, "30"),
                    (
                        keys::TARGET_GROUP_ATTRIBUTES,
                        "deregistration_delay.timeout_seconds=5",
                    ),
                    (keys::SSL_CERT, "arn:aws:acm:us-east-1:1:certificate/x"),
                    (keys::SSL_PORTS, "443"),
                ],
            );
            let d = desired(&changed, &nodes(&["i-2", "i-3"]));
            mutations(&aws);
            let applied = ensure(&aws, &inv, &d, me()).await.expect("update");
            assert_eq!(applied.lb.arn, lb.arn, "the same load balancer");
            let calls = mutations(&aws);
            assert_eq!(count(&calls, "CreateLoadBalancer"), 0, "{calls:?}");
            let s = aws.state();
            let attrs = &s.lbs[&lb.arn].attributes;
            assert_eq!(attrs["load_balancing.cross_zone.enabled"], "true");
            let tg_of = |name: &str| s.tgs.values().find(|t| t.info.name == name).expect(name);
            for dtg in &d.target_groups {
                let tg = tg_of(&dtg.name);
                assert_eq!(tg.info.health_check.interval_seconds, 30);
                assert_eq!(tg.attributes["deregistration_delay.timeout_seconds"], "5");
                let ids: Vec<&str> = tg.targets.iter().map(|t| t.id.as_str()).collect();
                assert_eq!(ids, vec!["i-2", "i-3"]);
            }
            let mut listeners: Vec<(i32, String)> = s
                .listeners
                .values()
                .map(|l| (l.info.port, l.info.protocol.clone()))
                .collect();
            listeners.sort();
            assert_eq!(listeners, vec![(80, "TCP".into()), (443, "TLS".into())]);
            // The UDP port's target group went with its listener.
            assert_eq!(s.tgs.len(), 2);
            assert!(s.tgs.values().all(|t| t.info.protocol == "TCP"));
        }

        #[tokio::test]
        async fn remove_deletes_listeners_then_load_balancer_then_target_groups() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            ensure(&aws, &inv, &d, me()).await.expect("ensure");
            mutations(&aws);
            // Only by name: the inventory is gone (a restarted controller before a sweep).
            let n = remove(
                &aws,
                &Inventory::default(),
                me(),
                std::slice::from_ref(&d.name),
                false,
            )
            .await
            .expect("remove");
            assert_eq!(n, 1);
            let calls = mutations(&aws);
            let ops: Vec<&str> = calls.iter().filter_map(|c| c.split(' ').next()).collect();
            assert_eq!(
                ops,
                vec![
                    "DeleteListener",
                    "DeleteListener",
                    "DeleteLoadBalancer",
                    "DeleteTargetGroup",
                    "DeleteTargetGroup",
                    "DeleteSecurityGroup"
                ]
            );
            let s = aws.state();
            assert!(s.lbs.is_empty() && s.tgs.is_empty() && s.listeners.is_empty());
        }

        #[tokio::test]
        async fn a_protected_load_balancer_keeps_everything_unless_protection_is_dropped() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let svc = web(&[(keys::ATTRIBUTES, "deletion_protection.enabled=true")]);
            let d = desired(&svc, &nodes(&["i-1"]));
            ensure(&aws, &inv, &d, me()).await.expect("ensure");
            mutations(&aws);
            let err = remove(&aws, &inv, me(), std::slice::from_ref(&d.name), true).await;
            assert!(
                matches!(err, Err(ApplyError::DeletionProtected { ref name, by_berth: true }) if *name == d.name),
                "{err:?}"
            );
            assert_eq!(mutations(&aws), Vec::<String>::new(), "nothing touched");
            assert_eq!(aws.state().listeners.len(), 2);
            // The annotation no longer asks for protection: lifted, then deleted.
            remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false)
                .await
                .expect("remove");
            let calls = mutations(&aws);
            assert!(
                calls[0].starts_with("ModifyLoadBalancerAttributes"),
                "{calls:?}"
            );
            assert!(aws.state().lbs.is_empty() && aws.state().tgs.is_empty());
        }

        #[tokio::test]
        async fn a_name_taken_by_another_service_is_a_conflict_and_never_deleted() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            let mut other = d.clone();
            other
                .tags
                .insert(tags::SERVICE_UID.into(), "uid-other".into());
            aws.create_load_balancer(&other).await.expect("other");
            let err = ensure(&aws, &inv, &d, me()).await;
            assert!(matches!(err, Err(ApplyError::NameConflict(_))), "{err:?}");
            let n = remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false)
                .await
                .expect("remove");
            assert_eq!(n, 0);
            assert_eq!(aws.state().lbs.len(), 1);
        }

        #[tokio::test]
        async fn a_scheme_change_replaces_the_load_balancer_and_keeps_target_groups() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            let old = ensure(&aws, &inv, &d, me()).await.expect("ensure").lb;
            let tgs: BTreeSet<String> = aws.state().tgs.keys().cloned().collect();
            let public = desired(&web(&[(keys::SCHEME, "internet-facing")]), &nodes(&["i-1"]));
            let new = ensure(&aws, &inv, &public, me()).await.expect("replace").lb;
            assert_ne!(new.arn, old.arn);
            assert_eq!(new.scheme, "internet-facing");
            let s = aws.state();
            assert_eq!(s.lbs.len(), 1);
            assert_eq!(s.tgs.keys().cloned().collect::<BTreeSet<_>>(), tgs);
            assert!(s.listeners.values().all(|l| l.lb_arn == new.arn));
        }

        #[tokio::test]
        async fn an_unacknowledged_replacement_changes_nothing() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            let old = ensure(&aws, &inv, &d, me()).await.expect("ensure").lb;
            mutations(&aws);
            let public = desired(&web(&[(keys::SCHEME, "internet-facing")]), &nodes(&["i-1"]));
            let err = ensure_gated(&aws, &inv, &public, me(), &|_| false).await;
            let Err(ApplyError::ReplacementPending(r)) = err else {
                panic!("not pending: {err:?}");
            };
            assert_eq!(
                (r.name.as_str(), r.dns_name.as_str()),
                (old.name.as_str(), old.dns_name.as_str())
            );
            assert_eq!(mutations(&aws), Vec::<String>::new(), "nothing touched");
            let token = r.token.clone();
            let new = ensure_gated(&aws, &inv, &public, me(), &|r| r.token == token)
                .await
                .expect("acknowledged")
                .lb;
            assert_ne!(new.arn, old.arn);
            // A new name replaces too: the earlier load balancer is in the inventory.
            let renamed = desired(
                &web(&[(keys::SCHEME, "internet-facing"), (keys::NAME, "renamed")]),
                &nodes(&["i-1"]),
            );
            mutations(&aws);
            let err = ensure_gated(&aws, &inv, &renamed, me(), &|_| false).await;
            assert!(
                matches!(&err, Err(ApplyError::ReplacementPending(r)) if r.changes[0].property == "name"),
                "{err:?}"
            );
            assert_eq!(mutations(&aws), Vec::<String>::new(), "nothing touched");
        }

        /// Turns deletion protection on behind berth's back (the AWS API, not berth).
        fn protect_outside(aws: &FakeAws) {
            let mut s = aws.state();
            for l in s.lbs.values_mut() {
                l.attributes
                    .insert(DELETION_PROTECTION.into(), "true".into());
            }
        }

        fn only_tags(calls: &[String]) -> bool {
            calls.iter().all(|c| c.starts_with("AddTags "))
        }

        #[tokio::test]
        async fn protection_set_outside_berth_survives_deletion_rename_and_scheme_change() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            let lb = ensure(&aws, &inv, &d, me()).await.expect("ensure").lb;
            protect_outside(&aws);
            mutations(&aws);
            let whole = |aws: &FakeAws| {
                let s = aws.state();
                (s.lbs.len(), s.listeners.len(), s.tgs.len())
            };
            // Deleted, with no annotation asking for protection.
            let err = remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false).await;
            assert!(
                matches!(
                    err,
                    Err(ApplyError::DeletionProtected {
                        by_berth: false,
                        ..
                    })
                ),
                "{err:?}"
            );
            assert_eq!(mutations(&aws), Vec::<String>::new());
            // Renamed: no new load balancer while the old one cannot go.
            let renamed = desired(&web(&[(keys::NAME, "renamed")]), &nodes(&["i-1"]));
            let err = ensure(&aws, &inv, &renamed, me()).await;
            assert!(
                matches!(err, Err(ApplyError::DeletionProtected { .. })),
                "{err:?}"
            );
            assert_eq!(mutations(&aws), Vec::<String>::new());
            // Scheme changed.
            let public = desired(&web(&[(keys::SCHEME, "internet-facing")]), &nodes(&["i-1"]));
            let err = ensure(&aws, &inv, &public, me()).await;
            assert!(
                matches!(err, Err(ApplyError::DeletionProtected { .. })),
                "{err:?}"
            );
            assert_eq!(mutations(&aws), Vec::<String>::new());
            // An annotation asking for it off does not turn it off either.
            let off = web(&[(keys::ATTRIBUTES, "deletion_protection.enabled=false")]);
            ensure(&aws, &inv, &desired(&off, &nodes(&["i-1"])), me())
                .await
                .expect("ensure");
            assert!(only_tags(&mutations(&aws)));
            let s = aws.state();
            assert_eq!(s.lbs[&lb.arn].attributes[DELETION_PROTECTION], "true");
            drop(s);
            assert_eq!(whole(&aws), (1, 2, 2));
        }

        #[tokio::test]
        async fn protection_berth_turned_on_is_recorded_and_lifted_when_the_annotation_goes() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let on = web(&[(keys::ATTRIBUTES, "deletion_protection.enabled=true")]);
            let d = desired(&on, &nodes(&["i-1"]));
            let lb = ensure(&aws, &inv, &d, me()).await.expect("ensure").lb;
            {
                let s = aws.state();
                assert!(protected_by_berth(&s.lbs[&lb.arn].tags));
            }
            let n = remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false)
                .await
                .expect("remove");
            assert_eq!(n, 1);
            assert!(aws.state().lbs.is_empty());
        }

        #[tokio::test]
        async fn an_earlier_berths_resources_are_adopted_and_given_the_identity() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let on = web(&[(keys::ATTRIBUTES, "deletion_protection.enabled=true")]);
            let d = desired(&on, &nodes(&["i-1"]));
            let lb = ensure(&aws, &inv, &d, me()).await.expect("ensure").lb;
            {
                // As an earlier berth left it: no identity, no protection record.
                let mut s = aws.state();
                let l = s.lbs.get_mut(&lb.arn).expect("lb");
                l.tags.remove(tags::CLUSTER_ID);
                l.tags.remove(tags::PROTECTION);
                for t in s.tgs.values_mut() {
                    t.tags.remove(tags::CLUSTER_ID);
                }
            }
            let again = ensure(&aws, &Inventory::default(), &d, me())
                .await
                .expect("adopt");
            assert_eq!(again.lb.arn, lb.arn, "kept, not recreated");
            let s = aws.state();
            let tags = &s.lbs[&lb.arn].tags;
            assert_eq!(tags.get(tags::CLUSTER_ID).map(String::as_str), Some("id-1"));
            assert!(protected_by_berth(tags), "the annotation protected it");
            assert!(
                s.tgs
                    .values()
                    .all(|t| t.tags.get(tags::CLUSTER_ID).map(String::as_str) == Some("id-1"))
            );
        }

        #[tokio::test]
        async fn another_clusters_load_balancer_of_the_same_name_is_a_conflict() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            let mut theirs = d.clone();
            theirs
                .tags
                .insert(tags::CLUSTER_ID.into(), "id-other".into());
            aws.create_load_balancer(&theirs).await.expect("theirs");
            let err = ensure(&aws, &inv, &d, me()).await;
            assert!(matches!(err, Err(ApplyError::NameConflict(_))), "{err:?}");
            remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false)
                .await
                .expect("remove");
            assert_eq!(aws.state().lbs.len(), 1, "never deleted");
        }

        #[tokio::test]
        async fn a_listener_and_target_group_added_by_hand_are_kept() {
            let (aws, inv) = (FakeAws::default(), Inventory::default());
            let d = desired(&web(&[]), &nodes(&["i-1"]));
            let lb = ensure(&aws, &inv, &d, me()).await.expect("ensure").lb;
            let mut hand = d.target_groups[0].clone();
            hand.name = "by-hand".into();
            hand.tags = BTreeMap::from([("team".to_string(), "web".to_string())]);
            let tg = aws.create_target_group(&hand).await.expect("tg");
            let mut l = d.listeners[0].clone();
            l.port = 8443;
            aws.create_listener(&lb.arn, &l, &tg.arn)
                .await
                .expect("listener");
            mutations(&aws);
            ensure(&aws, &inv, &d, me()).await.expect("ensure again");
            assert_eq!(mutations(&aws), Vec::<String>::new());
            remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false)
                .await
                .expect("remove");
            let s = aws.state();
            let left: Vec<&str> = s.tgs.values().map(|t| t.info.name.as_str()).collect();
            assert_eq!(left, vec!["by-hand"]);
        }
    }
}
