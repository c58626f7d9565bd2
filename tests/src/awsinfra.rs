//! The AWS side of the simulated cluster in LocalStack: a VPC and one subnet per zone
//! matching the node network, and one EC2 instance per node whose private IP is the node's
//! address (so instance targets can be health-checked and reached).
//!
//! Every ID is chosen here (LocalStack's `_custom_id_` tag; berth's extension adds it for
//! instances) and derived from what it stands for, so a LocalStack that lost its state
//! gets the very same VPC, subnets and instances back: the Nodes' providerIDs stay true.

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::net::NodePlan;

pub const CLUSTER_NAME: &str = "berth-e2e";

/// The tag LocalStack (and berth's extension, for instances) takes a resource's ID from.
const CUSTOM_ID: &str = "_custom_id_";

/// `<prefix>-<17 hex digits>` derived from `what`: the shape of an AWS ID, stable across
/// runs.
pub fn chosen_id(prefix: &str, what: &str) -> String {
    let digest = Sha256::digest(format!("{CLUSTER_NAME}/{what}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{}", &hex[..17])
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AwsInfra {
    pub vpc_id: String,
    /// Subnet per node index, same order as the nodes.
    pub subnet_ids: Vec<String>,
    /// EC2 instance per node index, same order as the nodes.
    pub instance_ids: Vec<String>,
    /// Every node instance is in two groups: this one, tagged with the cluster (where
    /// backend rules belong, as the AWS Load Balancer Controller chooses), and
    /// [`AwsInfra::extra_security_group`], untagged.
    #[serde(default)]
    pub node_security_group: String,
    #[serde(default)]
    pub extra_security_group: String,
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tags(kind: ResourceType, pairs: &[(&str, &str)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(pairs.iter().map(|(k, v)| tag(k, v)).collect()))
        .build()
}

/// Creates (or, after a LocalStack restart, recreates) the VPC, subnets and instances,
/// with the same IDs every time.
pub async fn create(ec2: &aws_sdk_ec2::Client, nodes: &[NodePlan]) -> Result<AwsInfra> {
    let cluster_tag = format!("kubernetes.io/cluster/{CLUSTER_NAME}");
    let vpc = ec2
        .create_vpc()
        .cidr_block("198.18.0.0/16")
        .tag_specifications(tags(
            ResourceType::Vpc,
            &[
                ("Name", CLUSTER_NAME),
                (&cluster_tag, "owned"),
                (CUSTOM_ID, &chosen_id("vpc", "vpc")),
            ],
        ))
        .send()
        .await
        .map_err(Error::aws("CreateVpc"))?;
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .ok_or_else(|| Error::Setup("CreateVpc returned no VpcId".into()))?
        .to_string();
    let node_security_group =
        security_group(ec2, &vpc_id, "nodes", &[(&cluster_tag, "owned")]).await?;
    let extra_security_group = security_group(ec2, &vpc_id, "extra", &[]).await?;
    let mut subnet_ids = Vec::new();
    let mut instance_ids = Vec::new();
    for node in nodes {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(&node.subnet_cidr)
            .availability_zone(&node.zone)
            .tag_specifications(tags(
                ResourceType::Subnet,
                &[
                    ("Name", &format!("{CLUSTER_NAME}-{}", node.zone)),
                    (&cluster_tag, "shared"),
                    ("kubernetes.io/role/elb", "1"),
                    ("kubernetes.io/role/internal-elb", "1"),
                    (CUSTOM_ID, &chosen_id("subnet", &node.subnet_cidr)),
                ],
            ))
            .send()
            .await
            .map_err(Error::aws(format!("CreateSubnet {}", node.subnet_cidr)))?;
        let subnet_id = subnet
            .subnet()
            .and_then(|s| s.subnet_id())
            .ok_or_else(|| Error::Setup("CreateSubnet returned no SubnetId".into()))?
            .to_string();
        let run = ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Medium)
            .min_count(1)
            .max_count(1)
            .subnet_id(&subnet_id)
            .security_group_ids(&node_security_group)
            .security_group_ids(&extra_security_group)
            .private_ip_address(node.ip.to_string())
            .tag_specifications(tags(
                ResourceType::Instance,
                &[
                    ("Name", &node.name),
                    (&cluster_tag, "owned"),
                    (CUSTOM_ID, &chosen_id("i", &node.name)),
                ],
            ))
            .send()
            .await
            .map_err(Error::aws(format!("RunInstances for {}", node.name)))?;
        let instance_id = run
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| Error::Setup("RunInstances returned no instance".into()))?
            .to_string();
        subnet_ids.push(subnet_id);
        instance_ids.push(instance_id);
    }
    Ok(AwsInfra {
        vpc_id,
        subnet_ids,
        instance_ids,
        node_security_group,
        extra_security_group,
    })
}

/// A security group `berth-e2e-<what>` in the VPC, with a chosen ID.
async fn security_group(
    ec2: &aws_sdk_ec2::Client,
    vpc_id: &str,
    what: &str,
    extra_tags: &[(&str, &str)],
) -> Result<String> {
    let name = format!("{CLUSTER_NAME}-{what}");
    let id = chosen_id("sg", what);
    let mut pairs = vec![("Name", name.as_str()), (CUSTOM_ID, id.as_str())];
    pairs.extend_from_slice(extra_tags);
    let out = ec2
        .create_security_group()
        .group_name(&name)
        .description(format!("berth e2e {what}"))
        .vpc_id(vpc_id)
        .tag_specifications(tags(ResourceType::SecurityGroup, &pairs))
        .send()
        .await
        .map_err(Error::aws(format!("CreateSecurityGroup {name}")))?;
    out.group_id()
        .map(str::to_string)
        .ok_or_else(|| Error::Setup("CreateSecurityGroup returned no GroupId".into()))
}

/// The private IP LocalStack reports for an instance.
pub async fn instance_private_ip(
    ec2: &aws_sdk_ec2::Client,
    instance_id: &str,
) -> Result<Option<String>> {
    let out = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("instance-id")
                .values(instance_id)
                .build(),
        )
        .send()
        .await
        .map_err(Error::aws(format!("DescribeInstances {instance_id}")))?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find_map(|i| i.private_ip_address().map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_ids_look_like_aws_ids_and_are_stable() {
        let a = chosen_id("i", "berth-node-1");
        assert_eq!(a.len(), 2 + 17);
        assert!(a.starts_with("i-") && a[2..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, chosen_id("i", "berth-node-1"));
        assert_ne!(a, chosen_id("i", "berth-node-2"));
    }
}
