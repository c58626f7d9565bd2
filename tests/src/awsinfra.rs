//! The AWS side of the simulated cluster in LocalStack: a VPC and one subnet per zone
//! matching the node network, and one EC2 instance per node whose private IP is the node's
//! address (so instance targets can be health-checked and reached).

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::net::NodePlan;

pub const CLUSTER_NAME: &str = "berth-e2e";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AwsInfra {
    pub vpc_id: String,
    /// Subnet per node index, same order as the nodes.
    pub subnet_ids: Vec<String>,
    /// EC2 instance per node index, same order as the nodes.
    pub instance_ids: Vec<String>,
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

/// Creates (or, after a LocalStack restart, recreates) the VPC, subnets and instances.
pub async fn create(ec2: &aws_sdk_ec2::Client, nodes: &[NodePlan]) -> Result<AwsInfra> {
    let cluster_tag = format!("kubernetes.io/cluster/{CLUSTER_NAME}");
    let vpc = ec2
        .create_vpc()
        .cidr_block("198.18.0.0/16")
        .tag_specifications(tags(
            ResourceType::Vpc,
            &[("Name", CLUSTER_NAME), (&cluster_tag, "owned")],
        ))
        .send()
        .await
        .map_err(Error::aws("CreateVpc"))?;
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .ok_or_else(|| Error::Setup("CreateVpc returned no VpcId".into()))?
        .to_string();
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
            .private_ip_address(node.ip.to_string())
            .tag_specifications(tags(
                ResourceType::Instance,
                &[("Name", &node.name), (&cluster_tag, "owned")],
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
    })
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
