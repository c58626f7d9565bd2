//! Whose AWS resources are whose. A cluster's identity is a value no other cluster has
//! (the UID of its `kube-system` Namespace unless set explicitly), tagged on every
//! resource as `berth.dev/cluster-id`: the sweep, adoption and target-group reuse only
//! touch resources carrying it. Resources of an earlier berth carry only the cluster
//! name; they count as this cluster's only for a Service of this cluster whose UID they
//! name (a Service UID is never shared between clusters), and get the identity added.

use std::collections::BTreeMap;

use berth_crds::tags;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;

use crate::provider::aws::model::DesiredLoadBalancer;
use crate::provider::aws::security_groups::Frontend;

/// This cluster: the name (subnet tags, the old tag) and the identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub name: String,
}

/// How a resource's tags relate to this cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Carries this cluster's identity.
    Ours,
    /// Written by a berth without identities under this cluster's name: this cluster's
    /// only for a live Service of this cluster whose UID it carries.
    Legacy,
    /// Another cluster's, or not berth's.
    Foreign,
}

/// The Service a resource is for: this cluster and the Service's UID.
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    pub identity: &'a Identity,
    pub uid: &'a str,
}

impl Owner<'_> {
    /// Whether a resource with `tags` is this Service's: its UID, and this cluster's
    /// identity or (legacy) only this cluster's name. Pure.
    pub fn owns(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(tags::SERVICE_UID).map(String::as_str) == Some(self.uid)
            && self.identity.claim(tags) != Claim::Foreign
    }
}

impl Identity {
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
        }
    }

    /// Pure.
    pub fn claim(&self, tags: &BTreeMap<String, String>) -> Claim {
        match tags.get(tags::CLUSTER_ID) {
            Some(id) if *id == self.id => Claim::Ours,
            Some(_) => Claim::Foreign,
            None if tags.get(tags::CLUSTER) == Some(&self.name) => Claim::Legacy,
            None => Claim::Foreign,
        }
    }

    /// The tag carrying the identity.
    pub fn tag(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(tags::CLUSTER_ID.to_string(), self.id.clone())])
    }

    /// Adds the identity to the tags of the load balancer, its target groups and its
    /// managed security group.
    pub fn stamp(&self, desired: &mut DesiredLoadBalancer) {
        desired.tags.extend(self.tag());
        for tg in &mut desired.target_groups {
            tg.tags.extend(self.tag());
        }
        if let Frontend::Managed(m) = &mut desired.security.frontend {
            m.tags.extend(self.tag());
        }
    }
}

/// Why the identity cannot be known.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the kube-system Namespace for the cluster identity: {0}")]
    Kube(#[from] kube::Error),
    #[error("the kube-system Namespace has no UID; set --cluster-id")]
    NoUid,
}

/// The explicit identity, else the UID of the `kube-system` Namespace (fixed for the
/// cluster's life, unique across clusters).
pub async fn resolve(
    client: &kube::Client,
    explicit: Option<&str>,
) -> Result<String, IdentityError> {
    if let Some(id) = explicit.filter(|s| !s.is_empty()) {
        return Ok(id.to_string());
    }
    let ns = Api::<Namespace>::all(client.clone())
        .get("kube-system")
        .await?;
    ns.metadata.uid.ok_or(IdentityError::NoUid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_the_identity_or_an_old_tag_under_our_name_is_ours() {
        let me = Identity::new("id-a", "berth");
        let ours = t(&[(tags::CLUSTER, "berth"), (tags::CLUSTER_ID, "id-a")]);
        let theirs = t(&[(tags::CLUSTER, "berth"), (tags::CLUSTER_ID, "id-b")]);
        let legacy = t(&[(tags::CLUSTER, "berth")]);
        let other_name = t(&[(tags::CLUSTER, "other")]);
        assert_eq!(me.claim(&ours), Claim::Ours);
        assert_eq!(me.claim(&theirs), Claim::Foreign);
        assert_eq!(me.claim(&legacy), Claim::Legacy);
        assert_eq!(me.claim(&other_name), Claim::Foreign);
        assert_eq!(me.claim(&BTreeMap::new()), Claim::Foreign);
    }

    #[test]
    fn a_service_owns_only_resources_naming_its_uid_in_this_cluster() {
        let me = Identity::new("id-a", "berth");
        let owner = Owner {
            identity: &me,
            uid: "u1",
        };
        let with = |id: Option<&str>, uid: &str| {
            let mut m = t(&[(tags::CLUSTER, "berth"), (tags::SERVICE_UID, uid)]);
            if let Some(id) = id {
                m.insert(tags::CLUSTER_ID.into(), id.into());
            }
            m
        };
        assert!(owner.owns(&with(Some("id-a"), "u1")));
        assert!(owner.owns(&with(None, "u1")), "legacy, same Service");
        assert!(!owner.owns(&with(Some("id-b"), "u1")), "another cluster");
        assert!(!owner.owns(&with(Some("id-a"), "u2")), "another Service");
        assert!(!owner.owns(&BTreeMap::new()), "not berth's");
    }
}
