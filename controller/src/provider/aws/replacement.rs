//! The gate on changes that replace a Service's load balancer. A replacement gives the
//! Service a new DNS name, so every client and DNS record pointing at the old one breaks:
//! berth makes it only when the Service carries [`ACKNOWLEDGE`] naming that very change
//! (its [`Replacement::token`]); until then the old load balancer stays as it is and the
//! condition says what is waiting and how to acknowledge it.

use std::collections::BTreeMap;

use crate::provider::aws::api::{AwsApi, LbInfo};
use crate::provider::aws::deploy::{self, ApplyError, Inventory};
use crate::provider::aws::identity::Owner;
use crate::provider::aws::model::{DesiredLoadBalancer, SubnetMapping};

/// Annotation acknowledging a replacement: its value is the token the condition (and
/// `kubectl berth plan`) names.
pub const ACKNOWLEDGE: &str = "berth.dev/acknowledge-replacement";
/// Condition reason and Event reason while a replacement waits for its acknowledgement.
pub const REPLACEMENT_PENDING: &str = "ReplacementPending";

/// One property that cannot change in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub property: &'static str,
    pub from: String,
    pub to: String,
}

/// A replacement the desired load balancer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// The load balancer that would be deleted.
    pub name: String,
    pub dns_name: String,
    pub changes: Vec<Change>,
    /// What [`ACKNOWLEDGE`] must say: the changes and the load balancer they replace, so
    /// an acknowledgement left on the Service never covers a later, different change.
    pub token: String,
}

/// The static addresses of mappings in words: `subnet-a/eipalloc-1+subnet-b/…`, or
/// `assigned-by-aws`. Pure.
fn addresses(mappings: &[SubnetMapping]) -> String {
    let each: Vec<String> = mappings
        .iter()
        .filter_map(|m| {
            let addrs = [&m.allocation_id, &m.private_ipv4, &m.ipv6];
            let addrs: Vec<&str> = addrs.iter().filter_map(|a| a.as_deref()).collect();
            (!addrs.is_empty()).then(|| format!("{}/{}", m.subnet, addrs.join("/")))
        })
        .collect();
    if each.is_empty() {
        "assigned-by-aws".into()
    } else {
        each.join("+")
    }
}

/// Whether the addresses of a subnet the load balancer already has differ from the ones
/// wanted: an Elastic IP added, removed or changed, or a private IPv4 or IPv6 address
/// asked for that it does not have (an address AWS assigned is kept when none is asked
/// for). AWS changes an existing subnet's addresses only by replacing the NLB. Pure.
fn addresses_change(existing: &[SubnetMapping], desired: &[SubnetMapping]) -> bool {
    existing.iter().any(|have| {
        let want = desired.iter().find(|d| d.subnet == have.subnet);
        let want_eip = want.and_then(|w| w.allocation_id.as_ref());
        let asked =
            |w: Option<&String>, h: &Option<String>| w.is_some_and(|w| Some(w) != h.as_ref());
        want_eip != have.allocation_id.as_ref()
            || asked(
                want.and_then(|w| w.private_ipv4.as_ref()),
                &have.private_ipv4,
            )
            || asked(want.and_then(|w| w.ipv6.as_ref()), &have.ipv6)
    })
}

/// The properties of `existing` that `desired` changes and AWS cannot modify in place
/// (an NLB's scheme and the static addresses of its subnets are fixed at creation;
/// security groups cannot be added to an NLB made without, nor all removed from one made
/// with them). Pure.
pub fn changes(existing: &LbInfo, desired: &DesiredLoadBalancer) -> Vec<Change> {
    let mut out = Vec::new();
    let has = !existing.security_groups.is_empty();
    if !has && desired.security.requires_groups() {
        out.push(Change {
            property: "securityGroups",
            from: "none".into(),
            to: "some".into(),
        });
    }
    if has && desired.security.forbids_groups() {
        out.push(Change {
            property: "securityGroups",
            from: "some".into(),
            to: "none".into(),
        });
    }
    if existing.scheme != desired.scheme.as_str() {
        out.push(Change {
            property: "scheme",
            from: existing.scheme.clone(),
            to: desired.scheme.as_str().to_string(),
        });
    }
    if addresses_change(&existing.mappings, &desired.mappings) {
        out.push(Change {
            property: "subnet-mappings",
            from: addresses(&existing.mappings),
            to: addresses(&desired.mappings),
        });
    }
    out
}

/// The last part of an ARN (`.../net/name/50dc6c495c0c9188` → `50dc6c495c0c9188`).
fn arn_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// The replacement `desired` needs of `existing`, if any. Pure.
pub fn replacement(existing: &LbInfo, desired: &DesiredLoadBalancer) -> Option<Replacement> {
    let changes = changes(existing, desired);
    if changes.is_empty() {
        return None;
    }
    let what: Vec<String> = changes
        .iter()
        .map(|c| format!("{}={}", c.property, c.to))
        .collect();
    let token = format!("{}@{}", what.join(","), arn_id(&existing.arn));
    Some(Replacement {
        name: existing.name.clone(),
        dns_name: existing.dns_name.clone(),
        changes,
        token,
    })
}

/// Whether the Service's annotations acknowledge `r`: the annotation's value, or one of
/// its whitespace-separated words, is the token. Pure.
pub fn acknowledged(annotations: &BTreeMap<String, String>, r: &Replacement) -> bool {
    annotations
        .get(ACKNOWLEDGE)
        .is_some_and(|v| v.split_whitespace().any(|w| w == r.token))
}

/// What is waiting and how to acknowledge it, for the condition and the Event. Pure.
pub fn message(r: &Replacement) -> String {
    let what: Vec<String> = r
        .changes
        .iter()
        .map(|c| format!("{} from {} to {}", c.property, c.from, c.to))
        .collect();
    format!(
        "changing {} replaces load balancer {} (DNS name {} goes away, the new one gets another): kept unchanged until the Service is annotated {}={}",
        what.join(" and "),
        r.name,
        r.dns_name,
        ACKNOWLEDGE,
        r.token
    )
}

/// A new name: the Service's earlier load balancer `old` goes when `desired` is made. Pure.
pub fn renamed(old: &LbInfo, desired: &DesiredLoadBalancer) -> Replacement {
    let change = Change {
        property: "name",
        from: old.name.clone(),
        to: desired.name.clone(),
    };
    Replacement {
        name: old.name.clone(),
        dns_name: old.dns_name.clone(),
        token: format!("name={}@{}", desired.name, arn_id(&old.arn)),
        changes: vec![change],
    }
}

/// The replacement of the Service's existing load balancer that `desired` needs, if any:
/// an immutable property of the one of its name, or a new name while the inventory holds
/// an earlier one. Reads only.
pub async fn pending<A: AwsApi>(
    aws: &A,
    inventory: &Inventory,
    desired: &DesiredLoadBalancer,
    owner: Owner<'_>,
) -> Result<Option<Replacement>, ApplyError> {
    if let Some((lb, _)) = deploy::find_own_lb(aws, &desired.name, owner).await? {
        return Ok(replacement(&lb, desired));
    }
    let previous: Vec<String> = inventory.of(owner.uid).0.into_iter().collect();
    if previous.is_empty() {
        return Ok(None);
    }
    let old = aws.describe_load_balancers(&previous).await?;
    Ok(old.first().map(|lb| renamed(lb, desired)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::model::Scheme;

    fn lb(scheme: &str) -> LbInfo {
        LbInfo {
            arn: "arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/net/web/50dc6c49".into(),
            name: "web".into(),
            dns_name: "web-1.elb.localhost".into(),
            state: "active".into(),
            scheme: scheme.into(),
            ip_address_type: "ipv4".into(),
            subnets: Vec::new(),
            security_groups: Vec::new(),
            mappings: Vec::new(),
        }
    }

    fn desired(scheme: Scheme) -> DesiredLoadBalancer {
        DesiredLoadBalancer {
            name: "web".into(),
            scheme,
            ip_address_type: crate::provider::aws::model::IpAddressType::Ipv4,
            subnets: Vec::new(),
            mappings: Vec::new(),
            security_groups: Vec::new(),
            security: crate::provider::aws::security_groups::Security {
                frontend: crate::provider::aws::security_groups::Frontend::Disabled,
                backend: None,
                nodes: Default::default(),
                node_groups: Default::default(),
            },
            tags: BTreeMap::new(),
            attributes: BTreeMap::new(),
            listeners: Vec::new(),
            target_groups: Vec::new(),
        }
    }

    #[test]
    fn a_scheme_change_is_a_replacement_with_a_token_naming_it_and_the_old_lb() {
        let r = replacement(&lb("internal"), &desired(Scheme::InternetFacing)).expect("r");
        assert_eq!(r.token, "scheme=internet-facing@50dc6c49");
        assert_eq!(r.changes[0].from, "internal");
        let m = message(&r);
        assert!(m.contains("web-1.elb.localhost"), "{m}");
        assert!(m.contains(&format!("{ACKNOWLEDGE}={}", r.token)), "{m}");
        assert!(replacement(&lb("internal"), &desired(Scheme::Internal)).is_none());
    }

    #[test]
    fn only_the_exact_token_acknowledges() {
        let r = replacement(&lb("internal"), &desired(Scheme::InternetFacing)).expect("r");
        let with = |v: &str| BTreeMap::from([(ACKNOWLEDGE.to_string(), v.to_string())]);
        assert!(acknowledged(&with(&r.token), &r));
        assert!(acknowledged(&with(&format!("other {}", r.token)), &r));
        assert!(!acknowledged(&with("scheme=internet-facing"), &r));
        assert!(!acknowledged(&with("scheme=internet-facing@other"), &r));
        assert!(!acknowledged(&BTreeMap::new(), &r));
    }

    fn mapping(subnet: &str, eip: Option<&str>, private: Option<&str>) -> SubnetMapping {
        SubnetMapping {
            subnet: subnet.into(),
            allocation_id: eip.map(str::to_string),
            private_ipv4: private.map(str::to_string),
            ipv6: None,
        }
    }

    #[test]
    fn changed_static_addresses_replace_and_assigned_ones_do_not() {
        let mut have = lb("internet-facing");
        have.mappings = vec![mapping("subnet-a", None, Some("10.0.0.9"))];
        let mut want = desired(Scheme::InternetFacing);
        assert!(
            replacement(&have, &want).is_none(),
            "AWS-assigned addresses stay"
        );
        want.mappings = vec![mapping("subnet-a", Some("eipalloc-1"), None)];
        let r = replacement(&have, &want).expect("an Elastic IP added");
        assert_eq!(r.token, "subnet-mappings=subnet-a/eipalloc-1@50dc6c49");
        have.mappings = want.mappings.clone();
        assert!(replacement(&have, &want).is_none());
        want.mappings = vec![mapping("subnet-a", None, None)];
        let r = replacement(&have, &want).expect("the Elastic IP removed");
        assert_eq!(r.changes[0].to, "assigned-by-aws");
        // A subnet added with its address is SetSubnets, not a replacement.
        want.mappings = vec![
            mapping("subnet-a", Some("eipalloc-1"), None),
            mapping("subnet-b", Some("eipalloc-2"), None),
        ];
        assert!(replacement(&have, &want).is_none());
        let mut internal = lb("internal");
        internal.mappings = vec![mapping("subnet-a", None, Some("10.0.0.9"))];
        let mut want = desired(Scheme::Internal);
        want.mappings = vec![mapping("subnet-a", None, Some("10.0.0.10"))];
        assert!(
            replacement(&internal, &want).is_some(),
            "another private address"
        );
    }

    #[test]
    fn a_new_name_replaces_the_earlier_load_balancer() {
        let mut d = desired(Scheme::Internal);
        d.name = "renamed".into();
        let r = renamed(&lb("internal"), &d);
        assert_eq!(r.token, "name=renamed@50dc6c49");
        assert!(
            message(&r).contains("name from web to renamed"),
            "{}",
            message(&r)
        );
    }
}
