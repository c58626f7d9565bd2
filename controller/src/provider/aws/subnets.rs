//! Which subnets a load balancer goes into: explicit IDs or names, class tags, or
//! discovery by role tag (`kubernetes.io/role/elb` / `internal-elb`) and cluster tag.

use std::collections::BTreeMap;

use crate::provider::aws::annotations::SubnetChoice;
use crate::provider::aws::api::{AwsApi, AwsError, Candidate, SubnetFilter, SubnetQuery};
use crate::provider::aws::model::Scheme;

/// The `DescribeSubnets` request for a choice. Pure.
pub fn query(choice: &SubnetChoice, scheme: Scheme, vpc_id: Option<&str>) -> SubnetQuery {
    let mut q = SubnetQuery::default();
    if let Some(vpc) = vpc_id {
        q.filters.push(SubnetFilter::Vpc(vpc.to_string()));
    }
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
    q
}

/// The VPC and one subnet per zone for a load balancer.
pub async fn resolve<A: AwsApi + ?Sized>(
    aws: &A,
    choice: &SubnetChoice,
    scheme: Scheme,
    vpc_id: Option<&str>,
    cluster: &str,
) -> Result<(Option<String>, Vec<String>), AwsError> {
    let candidates = aws.describe_subnets(&query(choice, scheme, vpc_id)).await?;
    let cluster_tag = format!("kubernetes.io/cluster/{cluster}");
    let explicit = !matches!(choice, SubnetChoice::Discover);
    Ok(pick_subnets(&candidates, &cluster_tag, explicit))
}

/// One subnet per zone, in one VPC. Discovered subnets must carry this cluster's tag or no
/// cluster tag at all (AWS LBC's rule); the lowest ID wins within a zone. Pure.
pub fn pick_subnets(
    candidates: &[Candidate],
    cluster_tag: &str,
    explicit: bool,
) -> (Option<String>, Vec<String>) {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            explicit || c.cluster_tags.is_empty() || c.cluster_tags.iter().any(|t| t == cluster_tag)
        })
        .collect();
    eligible.sort_by(|a, b| (&a.vpc, &a.zone, &a.id).cmp(&(&b.vpc, &b.zone, &b.id)));
    let Some(vpc) = eligible.first().map(|c| c.vpc.clone()) else {
        return (None, Vec::new());
    };
    let mut zones = BTreeMap::new();
    for c in eligible.iter().filter(|c| c.vpc == vpc) {
        zones.entry(c.zone.clone()).or_insert_with(|| c.id.clone());
    }
    let mut ids: Vec<String> = zones.into_values().collect();
    ids.sort();
    (Some(vpc), ids)
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
            pick_subnets(&list, mine, false),
            (
                Some("vpc-1".into()),
                vec!["subnet-a".to_string(), "subnet-c".to_string()]
            )
        );
        assert_eq!(pick_subnets(&list, mine, true).1.len(), 3);
        assert_eq!(pick_subnets(&[], mine, false), (None, vec![]));
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
        let found = |choice, scheme| {
            let aws = &aws;
            async move { resolve(aws, &choice, scheme, None, "c1").await.map(|r| r.1) }
        };
        let public = found(SubnetChoice::Discover, Scheme::InternetFacing).await;
        assert_eq!(public.ok(), Some(vec!["subnet-pub".to_string()]));
        let internal = found(SubnetChoice::Discover, Scheme::Internal).await;
        assert_eq!(internal.ok(), Some(vec!["subnet-int".to_string()]));
        let named = found(SubnetChoice::Names(vec!["edge".into()]), Scheme::Internal).await;
        assert_eq!(named.ok(), Some(vec!["subnet-named".to_string()]));
        let unknown = found(SubnetChoice::Ids(vec!["subnet-x".into()]), Scheme::Internal).await;
        assert_eq!(unknown.ok(), Some(vec![]));
    }
}
