//! Which subnets a load balancer goes into: explicit IDs or names, class tags, or
//! discovery by role tag (`kubernetes.io/role/elb` / `internal-elb`) and cluster tag —
//! always inside one VPC, the class's (see [`crate::provider::aws`] for how it is found).
//! Named, tagged and discovered subnets are looked up in that VPC only; subnets given by
//! ID are looked up anywhere so that one of another VPC is refused by name rather than
//! silently dropped.

use std::collections::BTreeMap;

use crate::provider::aws::annotations::SubnetChoice;
use crate::provider::aws::api::{AwsApi, AwsError, Candidate, SubnetFilter, SubnetQuery};
use crate::provider::aws::model::Scheme;

/// Why no subnets can be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// Explicit subnets of another VPC, as (subnet, its VPC).
    #[error("{}", outside_message(.vpc, .outside))]
    OutsideVpc {
        vpc: String,
        outside: Vec<(String, String)>,
    },
}

fn outside_message(vpc: &str, outside: &[(String, String)]) -> String {
    let list: Vec<String> = outside
        .iter()
        .map(|(id, other)| format!("{id} is in {other}"))
        .collect();
    format!(
        "subnets must be in the class's VPC {vpc}: {}",
        list.join(", ")
    )
}

/// The `DescribeSubnets` request for a choice in `vpc`. Pure.
pub fn query(choice: &SubnetChoice, scheme: Scheme, vpc: &str) -> SubnetQuery {
    let mut q = SubnetQuery::default();
    match choice {
        SubnetChoice::Ids(list) => q.ids = Some(list.clone()),
        SubnetChoice::Names(names) => q
            .filters
            .push(SubnetFilter::Tag("Name".into(), names.clone())),
        SubnetChoice::Tags(tags) => {
            for (k, v) in tags {
                q.filters.push(if v.is_empty() {
                    SubnetFilter::TagKey(k.clone())
                } else {
                    SubnetFilter::Tag(k.clone(), vec![v.clone()])
                });
            }
        }
        SubnetChoice::Discover => {
            let role = match scheme {
                Scheme::Internal => "kubernetes.io/role/internal-elb",
                Scheme::InternetFacing => "kubernetes.io/role/elb",
            };
            q.filters.push(SubnetFilter::TagKey(role.into()));
        }
    }
    if !matches!(choice, SubnetChoice::Ids(_)) {
        q.filters.push(SubnetFilter::Vpc(vpc.to_string()));
    }
    q
}

/// One subnet per zone in `vpc` for a load balancer.
pub async fn resolve<A: AwsApi + ?Sized>(
    aws: &A,
    choice: &SubnetChoice,
    scheme: Scheme,
    vpc: &str,
    cluster: &str,
) -> Result<Vec<String>, SubnetError> {
    let candidates = aws.describe_subnets(&query(choice, scheme, vpc)).await?;
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let explicit = !matches!(choice, SubnetChoice::Discover);
    pick_subnets(&candidates, &cluster_tag, explicit, vpc)
}

/// One subnet per zone of `vpc`; the lowest ID wins within a zone. Discovered subnets must
/// carry this cluster's tag or no cluster tag at all (AWS LBC's rule); an explicit subnet
/// of another VPC is an error. Pure.
pub fn pick_subnets(
    candidates: &[Candidate],
    cluster_tag: &str,
    explicit: bool,
    vpc: &str,
) -> Result<Vec<String>, SubnetError> {
    let mut outside: Vec<(String, String)> = candidates
        .iter()
        .filter(|c| c.vpc != vpc)
        .map(|c| (c.id.clone(), c.vpc.clone()))
        .collect();
    if !outside.is_empty() {
        outside.sort();
        return Err(SubnetError::OutsideVpc {
            vpc: vpc.to_string(),
            outside,
        });
    }
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            explicit || c.cluster_tags.is_empty() || c.cluster_tags.iter().any(|t| t == cluster_tag)
        })
        .collect();
    eligible.sort_by(|a, b| (&a.zone, &a.id).cmp(&(&b.zone, &b.id)));
    let mut zones = BTreeMap::new();
    for c in eligible {
        zones.entry(c.zone.clone()).or_insert_with(|| c.id.clone());
    }
    let mut ids: Vec<String> = zones.into_values().collect();
    ids.sort();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::fake::FakeAws;

    fn cand(id: &str, vpc: &str, zone: &str, tags: &[&str]) -> Candidate {
        Candidate {
            id: id.into(),
            vpc: vpc.into(),
            zone: zone.into(),
            cluster_tags: tags.iter().map(|s| s.to_string()).collect(),
            cidrs: Vec::new(),
        }
    }

    #[test]
    fn one_subnet_per_zone_tagged_for_this_cluster_or_untagged() {
        let mine = "kubernetes.io/cluster/c1";
        let list = vec![
            cand("subnet-b", "vpc-1", "z1", &[mine]),
            cand("subnet-a", "vpc-1", "z1", &[mine]),
            cand("subnet-c", "vpc-1", "z2", &[]),
            cand("subnet-d", "vpc-1", "z3", &["kubernetes.io/cluster/other"]),
        ];
        assert_eq!(
            pick_subnets(&list, mine, false, "vpc-1").ok(),
            Some(vec!["subnet-a".to_string(), "subnet-c".to_string()])
        );
        assert_eq!(
            pick_subnets(&list, mine, true, "vpc-1")
                .map(|s| s.len())
                .ok(),
            Some(3)
        );
        assert_eq!(pick_subnets(&[], mine, false, "vpc-1").ok(), Some(vec![]));
    }

    #[test]
    fn subnets_of_another_vpc_are_refused_by_name() {
        let list = vec![
            cand("subnet-a", "vpc-1", "z1", &[]),
            cand("subnet-x", "vpc-2", "z1", &[]),
        ];
        let err = pick_subnets(&list, "kubernetes.io/cluster/c1", true, "vpc-1")
            .expect_err("outside the VPC");
        let message = err.to_string();
        assert!(message.contains("subnet-x is in vpc-2"), "{message}");
        assert!(message.contains("VPC vpc-1"), "{message}");
    }

    #[test]
    fn only_subnet_ids_are_looked_up_outside_the_vpc() {
        let vpc_filter = SubnetFilter::Vpc("vpc-1".into());
        let ids = query(
            &SubnetChoice::Ids(vec!["subnet-1".into()]),
            Scheme::Internal,
            "vpc-1",
        );
        assert!(!ids.filters.contains(&vpc_filter));
        for choice in [
            SubnetChoice::Discover,
            SubnetChoice::Names(vec!["edge".into()]),
            SubnetChoice::Tags(BTreeMap::from([("tier".into(), String::new())])),
        ] {
            let q = query(&choice, Scheme::InternetFacing, "vpc-1");
            assert!(q.filters.contains(&vpc_filter), "{choice:?}: {q:?}");
        }
    }

    #[tokio::test]
    async fn discovery_uses_the_role_tag_of_the_scheme() {
        let aws = FakeAws::default();
        let role = |r: &'static str| [(r, "1")];
        aws.add_subnet("subnet-pub", "vpc-1", "z1", &role("kubernetes.io/role/elb"));
        aws.add_subnet(
            "subnet-int",
            "vpc-1",
            "z1",
            &role("kubernetes.io/role/internal-elb"),
        );
        aws.add_subnet("subnet-named", "vpc-1", "z2", &[("Name", "edge")]);
        let other_vpc = [("kubernetes.io/role/elb", "1"), ("Name", "edge")];
        aws.add_subnet("subnet-other", "vpc-2", "z3", &other_vpc);
        let found = |choice, scheme| {
            let aws = &aws;
            async move { resolve(aws, &choice, scheme, "vpc-1", "c1").await }
        };
        let public = found(SubnetChoice::Discover, Scheme::InternetFacing).await;
        assert_eq!(public.ok(), Some(vec!["subnet-pub".to_string()]));
        let internal = found(SubnetChoice::Discover, Scheme::Internal).await;
        assert_eq!(internal.ok(), Some(vec!["subnet-int".to_string()]));
        let named = found(SubnetChoice::Names(vec!["edge".into()]), Scheme::Internal).await;
        assert_eq!(named.ok(), Some(vec!["subnet-named".to_string()]));
        let unknown = found(SubnetChoice::Ids(vec!["subnet-x".into()]), Scheme::Internal).await;
        assert_eq!(unknown.ok(), Some(vec![]));
        let elsewhere = SubnetChoice::Ids(vec!["subnet-other".into()]);
        let refused = found(elsewhere, Scheme::Internal).await;
        assert!(matches!(refused, Err(SubnetError::OutsideVpc { .. })));
    }
}
