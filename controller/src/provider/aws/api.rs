//! The ELBv2/EC2 operations the provider uses, as a trait: implemented by the SDK client
//! ([`crate::provider::aws::client::Aws`]) and by an in-memory fake for unit tests
//! ([`crate::provider::aws::fake`]). Each operation answers what berth needs to know, in
//! berth's own types; "not found" on a delete is success, as it is for the SDK client.

use std::collections::BTreeMap;
use std::future::Future;

use crate::provider::aws::annotations::HealthCheck;
use crate::provider::aws::model::{
    DesiredListener, DesiredLoadBalancer, DesiredTargetGroup, IpAddressType, SubnetMapping, Target,
};
use crate::provider::aws::security_groups::{IngressRule, ManagedGroup, SgInfo, SgQuery};

/// A failed AWS call: which operation, the AWS error code when there is one, the message.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct AwsError {
    pub operation: &'static str,
    pub code: Option<String>,
    pub message: String,
}

impl AwsError {
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    pub fn other(operation: &'static str, message: impl Into<String>) -> Self {
        Self {
            operation,
            code: None,
            message: message.into(),
        }
    }

    pub fn coded(operation: &'static str, code: &str, message: impl Into<String>) -> Self {
        Self {
            operation,
            code: Some(code.to_string()),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbInfo {
    pub arn: String,
    pub name: String,
    pub dns_name: String,
    pub state: String,
    pub scheme: String,
    pub ip_address_type: String,
    pub subnets: Vec<String>,
    /// Its security groups (none: it was made without, and can never get any).
    pub security_groups: Vec<String>,
    /// Each subnet's addresses as described (AWS-assigned ones too), in subnet order.
    pub mappings: Vec<SubnetMapping>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerInfo {
    pub arn: String,
    pub port: i32,
    pub protocol: String,
    pub target_group_arn: Option<String>,
    pub certificate: Option<String>,
    pub ssl_policy: Option<String>,
    pub alpn_policy: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TgInfo {
    pub arn: String,
    pub name: String,
    pub protocol: String,
    pub port: i32,
    pub target_type: String,
    pub health_check: HealthCheck,
    pub load_balancer_arns: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    pub target: Target,
    pub state: String,
}

/// One EC2 subnet filter (the subset berth uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubnetFilter {
    Vpc(String),
    /// The subnet carries this tag key, any value.
    TagKey(String),
    /// The subnet's tag `key` has one of the values.
    Tag(String, Vec<String>),
}

/// A `DescribeSubnets` request: explicit IDs and/or filters (all must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetQuery {
    pub ids: Option<Vec<String>>,
    pub filters: Vec<SubnetFilter>,
}

/// A subnet found by [`AwsApi::describe_subnets`], with its `kubernetes.io/cluster/*` tags.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: String,
    pub vpc: String,
    pub zone: String,
    pub cluster_tags: Vec<String>,
    /// The subnet's IPv4 and IPv6 CIDR blocks.
    pub cidrs: Vec<ipnet::IpNet>,
}

type Res<T> = Result<T, AwsError>;
/// Resource ARN → its tags.
pub type TagsByArn = BTreeMap<String, BTreeMap<String, String>>;

/// The ELBv2 and EC2 operations berth makes. Futures are `Send` so a reconcile using them
/// can run on any worker thread.
pub trait AwsApi: Send + Sync {
    /// The load balancer named `name`, if any.
    fn find_load_balancer(&self, name: &str) -> impl Future<Output = Res<Option<LbInfo>>> + Send;
    /// The load balancers among `arns` that exist.
    fn describe_load_balancers(
        &self,
        arns: &[String],
    ) -> impl Future<Output = Res<Vec<LbInfo>>> + Send;
    fn all_load_balancers(&self) -> impl Future<Output = Res<Vec<LbInfo>>> + Send;
    fn all_target_groups(&self) -> impl Future<Output = Res<Vec<TgInfo>>> + Send;
    /// Tags of the resources among `arns` that exist.
    fn tags(&self, arns: &[String]) -> impl Future<Output = Res<TagsByArn>> + Send;
    fn add_tags(
        &self,
        arn: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Res<()>> + Send;
    fn remove_tags(&self, arn: &str, keys: &[String]) -> impl Future<Output = Res<()>> + Send;
    fn create_load_balancer(
        &self,
        d: &DesiredLoadBalancer,
    ) -> impl Future<Output = Res<LbInfo>> + Send;
    /// Sets the subnets: by `mappings` (with static addresses) when there are any.
    fn set_subnets(
        &self,
        arn: &str,
        subnets: &[String],
        mappings: &[SubnetMapping],
    ) -> impl Future<Output = Res<()>> + Send;
    fn set_ip_address_type(
        &self,
        arn: &str,
        t: IpAddressType,
    ) -> impl Future<Output = Res<()>> + Send;
    fn load_balancer_attributes(
        &self,
        arn: &str,
    ) -> impl Future<Output = Res<BTreeMap<String, String>>> + Send;
    fn modify_load_balancer_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> impl Future<Output = Res<()>> + Send;
    /// Deletes the load balancer and its listeners; a missing one is success.
    fn delete_load_balancer(&self, arn: &str) -> impl Future<Output = Res<()>> + Send;
    fn listeners(&self, lb_arn: &str) -> impl Future<Output = Res<Vec<ListenerInfo>>> + Send;
    /// Creates the listener; answers its ARN.
    fn create_listener(
        &self,
        lb_arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
    ) -> impl Future<Output = Res<String>> + Send;
    fn modify_listener(
        &self,
        arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
    ) -> impl Future<Output = Res<()>> + Send;
    /// The listener's certificates besides its default one.
    fn listener_certificates(&self, arn: &str) -> impl Future<Output = Res<Vec<String>>> + Send;
    fn add_listener_certificates(
        &self,
        arn: &str,
        certificates: &[String],
    ) -> impl Future<Output = Res<()>> + Send;
    fn remove_listener_certificates(
        &self,
        arn: &str,
        certificates: &[String],
    ) -> impl Future<Output = Res<()>> + Send;
    fn listener_attributes(
        &self,
        arn: &str,
    ) -> impl Future<Output = Res<BTreeMap<String, String>>> + Send;
    fn modify_listener_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> impl Future<Output = Res<()>> + Send;
    /// A missing listener is success.
    fn delete_listener(&self, arn: &str) -> impl Future<Output = Res<()>> + Send;
    /// Target groups a listener of `lb_arn` forwards to (none for a missing load balancer).
    fn target_groups_of(&self, lb_arn: &str) -> impl Future<Output = Res<Vec<TgInfo>>> + Send;
    fn find_target_group(&self, name: &str) -> impl Future<Output = Res<Option<TgInfo>>> + Send;
    fn create_target_group(
        &self,
        d: &DesiredTargetGroup,
    ) -> impl Future<Output = Res<TgInfo>> + Send;
    fn modify_health_check(
        &self,
        arn: &str,
        hc: &HealthCheck,
    ) -> impl Future<Output = Res<()>> + Send;
    fn target_group_attributes(
        &self,
        arn: &str,
    ) -> impl Future<Output = Res<BTreeMap<String, String>>> + Send;
    fn modify_target_group_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> impl Future<Output = Res<()>> + Send;
    /// A missing target group is success.
    fn delete_target_group(&self, arn: &str) -> impl Future<Output = Res<()>> + Send;
    fn target_health(&self, tg_arn: &str) -> impl Future<Output = Res<Vec<TargetState>>> + Send;
    fn register_targets(
        &self,
        tg_arn: &str,
        targets: &[Target],
    ) -> impl Future<Output = Res<()>> + Send;
    fn deregister_targets(
        &self,
        tg_arn: &str,
        targets: &[Target],
    ) -> impl Future<Output = Res<()>> + Send;
    /// Subnets matching the query; an unknown subnet ID gives none rather than an error.
    fn describe_subnets(
        &self,
        query: &SubnetQuery,
    ) -> impl Future<Output = Res<Vec<Candidate>>> + Send;
    /// The VPCs of those instances among `ids` (at most 200) that exist.
    fn instance_vpcs(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Res<std::collections::BTreeSet<String>>> + Send;
    /// Replaces the load balancer's security groups (it must have been created with some).
    fn set_security_groups(
        &self,
        arn: &str,
        groups: &[String],
    ) -> impl Future<Output = Res<()>> + Send;
    /// Security groups matching the query, with their inbound rules.
    fn security_groups(&self, query: &SgQuery) -> impl Future<Output = Res<Vec<SgInfo>>> + Send;
    /// Creates the group, tagged at creation, without inbound rules.
    fn create_security_group(&self, g: &ManagedGroup) -> impl Future<Output = Res<SgInfo>> + Send;
    fn authorize_ingress(
        &self,
        group: &str,
        rules: &[IngressRule],
    ) -> impl Future<Output = Res<()>> + Send;
    fn revoke_ingress(
        &self,
        group: &str,
        rules: &[IngressRule],
    ) -> impl Future<Output = Res<()>> + Send;
    /// A missing group is success.
    fn delete_security_group(&self, id: &str) -> impl Future<Output = Res<()>> + Send;
    /// The security groups of those instances among `ids` that exist.
    fn instance_groups(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Res<BTreeMap<String, Vec<String>>>> + Send;
    /// The VPC's IPv4 and IPv6 CIDRs.
    fn vpc_cidrs(&self, vpc: &str) -> impl Future<Output = Res<Vec<String>>> + Send;
}
