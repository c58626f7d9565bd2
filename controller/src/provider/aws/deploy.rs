//! Makes AWS match a desired load balancer, and removes a Service's resources. Every
//! step finds what exists first (by deterministic name, by attachment to the load
//! balancer, and by the tag inventory), so a crash between any two calls leaves nothing the
//! next run cannot adopt or delete.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use berth_crds::tags;

use crate::provider::aws::annotations::HealthCheck;
use crate::provider::aws::client::{Aws, AwsError, LbInfo, ListenerInfo, TargetState};
use crate::provider::aws::model::{DesiredListener, DesiredLoadBalancer, Target};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("load balancer name {0} is taken by a resource that is not this Service's")]
    NameConflict(String),
    #[error(
        "deletion protection is enabled on load balancer {0}: remove deletion_protection.enabled=true from the attributes annotation to delete it"
    )]
    DeletionProtected(String),
}

/// berth's resources in AWS by Service UID, from the last tag sweep plus what this process
/// created since.
#[derive(Default)]
pub struct Inventory {
    inner: Mutex<InventoryData>,
}

#[derive(Default, Clone, Debug)]
pub struct InventoryData {
    /// uid → load balancer ARNs.
    pub load_balancers: HashMap<String, BTreeSet<String>>,
    /// uid → target group ARNs.
    pub target_groups: HashMap<String, BTreeSet<String>>,
}

impl Inventory {
    pub fn replace(&self, data: InventoryData) {
        if let Ok(mut g) = self.inner.lock() {
            *g = data;
        }
    }

    pub fn add_lb(&self, uid: &str, arn: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.load_balancers
                .entry(uid.into())
                .or_default()
                .insert(arn.into());
        }
    }

    pub fn add_tg(&self, uid: &str, arn: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.target_groups
                .entry(uid.into())
                .or_default()
                .insert(arn.into());
        }
    }

    pub fn remove(&self, arn: &str) {
        if let Ok(mut g) = self.inner.lock() {
            let InventoryData {
                load_balancers,
                target_groups,
            } = &mut *g;
            for set in load_balancers
                .values_mut()
                .chain(target_groups.values_mut())
            {
                set.remove(arn);
            }
        }
    }

    pub fn of(&self, uid: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        self.inner
            .lock()
            .map(|g| {
                (
                    g.load_balancers.get(uid).cloned().unwrap_or_default(),
                    g.target_groups.get(uid).cloned().unwrap_or_default(),
                )
            })
            .unwrap_or_default()
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

/// Targets to register and to deregister. Draining or unused targets count as absent. Pure.
pub fn target_changes(
    desired: &BTreeSet<Target>,
    actual: &[TargetState],
) -> (Vec<Target>, Vec<Target>) {
    let present: BTreeSet<&Target> = actual
        .iter()
        .filter(|t| !matches!(t.state.as_str(), "draining" | "unused"))
        .map(|t| &t.target)
        .collect();
    let register = desired
        .iter()
        .filter(|t| !present.contains(t))
        .cloned()
        .collect();
    let deregister = present
        .into_iter()
        .filter(|t| !desired.contains(*t))
        .cloned()
        .collect();
    (register, deregister)
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
                && l.ssl_policy == desired.ssl_policy =>
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
}

/// Finds the load balancer named `name`; one tagged for another Service is a conflict.
async fn find_own_lb(aws: &Aws, name: &str, uid: &str) -> Result<Option<LbInfo>, ApplyError> {
    let Some(lb) = aws.find_load_balancer(name).await? else {
        return Ok(None);
    };
    let tags = aws.tags(std::slice::from_ref(&lb.arn)).await?;
    let owner = tags.get(&lb.arn).and_then(|t| t.get(tags::SERVICE_UID));
    if owner.map(String::as_str) != Some(uid) {
        return Err(ApplyError::NameConflict(name.into()));
    }
    Ok(Some(lb))
}

/// Deletes a load balancer (its listeners go with it) unless deletion protection is on
/// and still wanted.
async fn delete_lb(
    aws: &Aws,
    inventory: &Inventory,
    lb: &LbInfo,
    keep_protection: bool,
) -> Result<(), ApplyError> {
    let attrs = aws.load_balancer_attributes(&lb.arn).await?;
    if attrs.get("deletion_protection.enabled").map(String::as_str) == Some("true") {
        if keep_protection {
            return Err(ApplyError::DeletionProtected(lb.name.clone()));
        }
        let off = BTreeMap::from([(
            "deletion_protection.enabled".to_string(),
            "false".to_string(),
        )]);
        aws.modify_load_balancer_attributes(&lb.arn, &off).await?;
    }
    for l in aws.listeners(&lb.arn).await? {
        aws.delete_listener(&l.arn).await?;
    }
    aws.delete_load_balancer(&lb.arn).await?;
    inventory.remove(&lb.arn);
    Ok(())
}

/// Makes AWS match `desired` for the Service `uid`.
pub async fn ensure(
    aws: &Aws,
    inventory: &Inventory,
    desired: &DesiredLoadBalancer,
    uid: &str,
) -> Result<Applied, ApplyError> {
    // 1. The load balancer: adopt by name, replace when an immutable property changed.
    let mut lb = find_own_lb(aws, &desired.name, uid).await?;
    if let Some(existing) = &lb
        && existing.scheme != desired.scheme.as_str()
    {
        tracing::info!(lb = %existing.name, "scheme changed: replacing the load balancer");
        let keep = desired
            .attributes
            .get("deletion_protection.enabled")
            .map(String::as_str)
            == Some("true");
        delete_lb(aws, inventory, existing, keep).await?;
        lb = None;
    }
    let fresh = lb.is_none();
    let lb = match lb {
        Some(lb) => lb,
        None => {
            let created = match aws.create_load_balancer(desired).await {
                Ok(lb) => lb,
                // Created by an earlier attempt whose answer was lost.
                Err(e) if e.is("DuplicateLoadBalancerName") => find_own_lb(aws, &desired.name, uid)
                    .await?
                    .ok_or_else(|| ApplyError::NameConflict(desired.name.clone()))?,
                Err(e) => return Err(e.into()),
            };
            inventory.add_lb(uid, &created.arn);
            tracing::info!(lb = %created.name, arn = %created.arn, "created load balancer");
            created
        }
    };
    if lb.ip_address_type != desired.ip_address_type.as_str() {
        aws.set_ip_address_type(&lb.arn, desired.ip_address_type)
            .await?;
    }
    let want_subnets: BTreeSet<&String> = desired.subnets.iter().collect();
    let have_subnets: BTreeSet<&String> = lb.subnets.iter().collect();
    if want_subnets != have_subnets {
        aws.set_subnets(&lb.arn, &desired.subnets).await?;
    }
    if !desired.attributes.is_empty() {
        let actual = aws.load_balancer_attributes(&lb.arn).await?;
        let changes = attribute_changes(&desired.attributes, &actual);
        if !changes.is_empty() {
            aws.modify_load_balancer_attributes(&lb.arn, &changes)
                .await?;
        }
    }

    // 2. Target groups: attached ones, then unattached ones by name (left by a crash).
    // A load balancer created just now has nothing attached: skip the lookups.
    let attached = if fresh {
        Vec::new()
    } else {
        aws.target_groups_of(&lb.arn).await?
    };
    let mut fresh_tgs = BTreeSet::new();
    let mut by_name: HashMap<String, crate::provider::aws::client::TgInfo> = attached
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    for d in &desired.target_groups {
        if by_name.contains_key(&d.name) {
            continue;
        }
        let existing = if fresh {
            None
        } else {
            aws.find_target_group(&d.name).await?
        };
        let tg = match existing {
            Some(tg) => tg,
            None => match aws.create_target_group(d).await {
                Ok(tg) => {
                    tracing::info!(tg = %tg.name, "created target group");
                    fresh_tgs.insert(tg.arn.clone());
                    tg
                }
                // Left by an earlier load balancer of this Service: adopt it.
                Err(e) if e.is("DuplicateTargetGroupName") => aws
                    .find_target_group(&d.name)
                    .await?
                    .ok_or(ApplyError::Aws(e))?,
                Err(e) => return Err(e.into()),
            },
        };
        inventory.add_tg(uid, &tg.arn);
        by_name.insert(d.name.clone(), tg);
    }

    // 3. Tags of everything in one call.
    let mut arns = vec![lb.arn.clone()];
    arns.extend(
        desired
            .target_groups
            .iter()
            .filter_map(|d| by_name.get(&d.name).map(|t| t.arn.clone())),
    );
    let actual_tags = aws.tags(&arns).await?;
    let empty = BTreeMap::new();
    let lb_tag_changes = tag_changes(&desired.tags, actual_tags.get(&lb.arn).unwrap_or(&empty));
    if !lb_tag_changes.is_empty() {
        aws.add_tags(&lb.arn, &lb_tag_changes).await?;
    }

    // 4. Each target group's settings and targets.
    let mut health = BTreeMap::new();
    for d in &desired.target_groups {
        let Some(tg) = by_name.get(&d.name) else {
            continue;
        };
        let changes = tag_changes(&d.tags, actual_tags.get(&tg.arn).unwrap_or(&empty));
        if !changes.is_empty() {
            aws.add_tags(&tg.arn, &changes).await?;
        }
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
        let actual = if fresh_tgs.contains(&tg.arn) {
            Vec::new()
        } else {
            aws.target_health(&tg.arn).await?
        };
        let (register, deregister) = target_changes(&d.targets, &actual);
        if !register.is_empty() {
            aws.register_targets(&tg.arn, &register).await?;
        }
        if !deregister.is_empty() {
            aws.deregister_targets(&tg.arn, &deregister).await?;
        }
        let healthy = actual
            .iter()
            .filter(|t| t.state == "healthy" && d.targets.contains(&t.target))
            .count();
        health.insert(d.name.clone(), (healthy, d.targets.len()));
    }

    // 5. Listeners: create or repoint, then delete the ones no port wants.
    let listeners = if fresh {
        Vec::new()
    } else {
        aws.listeners(&lb.arn).await?
    };
    for l in &desired.listeners {
        let Some(tg) = by_name.get(&l.target_group) else {
            continue;
        };
        match listener_step(l, &tg.arn, &listeners) {
            ListenerStep::Create => aws.create_listener(&lb.arn, l, &tg.arn).await?,
            ListenerStep::Modify(arn) => aws.modify_listener(&arn, l, &tg.arn).await?,
            ListenerStep::Keep => {}
        }
    }
    let wanted_ports: BTreeSet<i32> = desired.listeners.iter().map(|l| l.port).collect();
    for l in listeners.iter().filter(|l| !wanted_ports.contains(&l.port)) {
        aws.delete_listener(&l.arn).await?;
    }

    // 6. Target groups and load balancers of this Service that are no longer wanted.
    let wanted_tgs: BTreeSet<&String> = desired
        .target_groups
        .iter()
        .filter_map(|d| by_name.get(&d.name).map(|t| &t.arn))
        .collect();
    let (other_lbs, inventory_tgs) = inventory.of(uid);
    let stale_tgs: BTreeSet<String> = attached
        .iter()
        .map(|t| t.arn.clone())
        .chain(inventory_tgs)
        .filter(|arn| !wanted_tgs.contains(arn))
        .collect();
    let stale_lbs: Vec<String> = other_lbs.into_iter().filter(|arn| *arn != lb.arn).collect();
    for old in aws.describe_load_balancers(&stale_lbs).await? {
        tracing::info!(lb = %old.name, "deleting the Service's previous load balancer");
        delete_lb(aws, inventory, &old, false).await?;
    }
    for arn in stale_tgs {
        aws.delete_target_group(&arn).await?;
        inventory.remove(&arn);
    }
    // Describe again only while provisioning, to learn when it turns active.
    let lb = if lb.state == "active" {
        lb
    } else {
        aws.find_load_balancer(&desired.name).await?.unwrap_or(lb)
    };
    Ok(Applied { lb, health })
}

/// Deletes every resource of the Service `uid`: load balancers named `names` (if they are
/// its own) or found in the inventory, and their target groups. Returns how many load
/// balancers were deleted.
pub async fn remove(
    aws: &Aws,
    inventory: &Inventory,
    uid: &str,
    names: &[String],
    keep_protection: bool,
) -> Result<usize, ApplyError> {
    let (lb_arns, tg_arns) = inventory.of(uid);
    let mut lbs: Vec<LbInfo> = aws
        .describe_load_balancers(&lb_arns.into_iter().collect::<Vec<_>>())
        .await?;
    for name in names {
        if lbs.iter().any(|l| &l.name == name) {
            continue;
        }
        match find_own_lb(aws, name, uid).await {
            Ok(Some(lb)) => lbs.push(lb),
            Ok(None) | Err(ApplyError::NameConflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let mut tgs: BTreeSet<String> = tg_arns;
    for lb in &lbs {
        tgs.extend(
            aws.target_groups_of(&lb.arn)
                .await?
                .into_iter()
                .map(|t| t.arn),
        );
    }
    for lb in &lbs {
        delete_lb(aws, inventory, lb, keep_protection).await?;
        tracing::info!(lb = %lb.name, "deleted load balancer");
    }
    for arn in tgs {
        aws.delete_target_group(&arn).await?;
        inventory.remove(&arn);
    }
    Ok(lbs.len())
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
        let (reg, dereg) = target_changes(&desired, &actual);
        assert_eq!(reg, vec![t("i-1", 30080)]);
        assert_eq!(dereg, vec![t("i-3", 30080)]);
        let steady = vec![ts("i-1", 30080, "initial"), ts("i-2", 30080, "healthy")];
        assert_eq!(target_changes(&desired, &steady), (vec![], vec![]));
    }

    #[test]
    fn listeners_are_kept_modified_or_created() {
        let d = DesiredListener {
            port: 80,
            protocol: "TCP".into(),
            certificate: None,
            ssl_policy: None,
            target_group: "tg".into(),
        };
        let existing = vec![ListenerInfo {
            arn: "l1".into(),
            port: 80,
            protocol: "TCP".into(),
            target_group_arn: Some("arn-tg".into()),
            certificate: None,
            ssl_policy: None,
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
    }

    #[test]
    fn inventory_tracks_and_forgets_resources() {
        let inv = Inventory::default();
        inv.add_lb("u1", "lb-1");
        inv.add_tg("u1", "tg-1");
        assert_eq!(inv.of("u1").0.len(), 1);
        inv.remove("tg-1");
        assert!(inv.of("u1").1.is_empty());
        assert!(inv.of("u2").0.is_empty());
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
}
