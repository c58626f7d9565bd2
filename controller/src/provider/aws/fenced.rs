//! The AWS client as the leader uses it: reads pass through, every mutating call asks the
//! leader [`Fence`] right before it is sent and is dropped if the fence lapses while it
//! waits (for the rate limiter, say). A refused call fails with [`FENCED_CODE`], is
//! counted in `berth_fenced_writes_total{target="aws"}` and logged.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use berth_runtime::Fence;

use crate::metrics::Metrics;
use crate::provider::aws::annotations::HealthCheck;
use crate::provider::aws::api::{
    AwsApi, AwsError, Candidate, LbInfo, ListenerInfo, SubnetQuery, TagsByArn, TargetState, TgInfo,
};
use crate::provider::aws::model::{
    DesiredListener, DesiredLoadBalancer, DesiredTargetGroup, IpAddressType, SubnetMapping, Target,
};
use crate::provider::aws::security_groups::{IngressRule, ManagedGroup, SgInfo, SgQuery};

/// The error code of a call the fence refused.
pub const FENCED_CODE: &str = "BerthNotLeading";

type Res<T> = Result<T, AwsError>;

pub struct FencedAws<A> {
    inner: A,
    fence: Fence,
    metrics: Arc<Metrics>,
}

/// Completes once the fence no longer allows writes (its deadline passed without a
/// renewal, or leadership was lost).
async fn lapsed(fence: &Fence) {
    loop {
        let left = fence.remaining();
        if left.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(left) => {}
            () = fence.lost() => return,
        }
    }
}

impl<A: AwsApi> FencedAws<A> {
    pub fn new(inner: A, fence: Fence, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            fence,
            metrics,
        }
    }

    /// The client behind the fence (reads; tests).
    pub fn inner(&self) -> &A {
        &self.inner
    }

    fn refuse(&self, operation: &'static str) -> AwsError {
        self.metrics.fenced_write("aws");
        tracing::warn!(operation, "AWS call refused: not leading");
        AwsError::coded(
            operation,
            FENCED_CODE,
            "not leading: the Lease is not (or no longer known to be) held",
        )
    }

    async fn guard<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Res<T>>,
    ) -> Res<T> {
        if self.fence.check().is_err() {
            return Err(self.refuse(operation));
        }
        tokio::select! {
            // A call still waiting when the fence lapses must not go out afterwards.
            biased;
            () = lapsed(&self.fence) => Err(self.refuse(operation)),
            r = call => r,
        }
    }
}

/// A read: passed through.
macro_rules! read {
    ($name:ident($($arg:ident: $ty:ty),*) -> $out:ty) => {
        async fn $name(&self, $($arg: $ty),*) -> Res<$out> {
            self.inner.$name($($arg),*).await
        }
    };
}

/// A mutating call: behind the fence.
macro_rules! write {
    ($name:ident, $op:literal ($($arg:ident: $ty:ty),*) -> $out:ty) => {
        async fn $name(&self, $($arg: $ty),*) -> Res<$out> {
            self.guard($op, self.inner.$name($($arg),*)).await
        }
    };
}

impl<A: AwsApi> AwsApi for FencedAws<A> {
    read!(find_load_balancer(name: &str) -> Option<LbInfo>);
    read!(describe_load_balancers(arns: &[String]) -> Vec<LbInfo>);
    read!(all_load_balancers() -> Vec<LbInfo>);
    read!(all_target_groups() -> Vec<TgInfo>);
    read!(tags(arns: &[String]) -> TagsByArn);
    read!(load_balancer_attributes(arn: &str) -> BTreeMap<String, String>);
    read!(listeners(lb_arn: &str) -> Vec<ListenerInfo>);
    read!(target_groups_of(lb_arn: &str) -> Vec<TgInfo>);
    read!(find_target_group(name: &str) -> Option<TgInfo>);
    read!(target_group_attributes(arn: &str) -> BTreeMap<String, String>);
    read!(target_health(tg_arn: &str) -> Vec<TargetState>);
    read!(describe_subnets(query: &SubnetQuery) -> Vec<Candidate>);
    read!(instance_vpcs(ids: &[String]) -> std::collections::BTreeSet<String>);
    read!(security_groups(query: &SgQuery) -> Vec<SgInfo>);
    read!(instance_groups(ids: &[String]) -> BTreeMap<String, Vec<String>>);
    read!(vpc_cidrs(vpc: &str) -> Vec<String>);
    write!(set_security_groups, "SetSecurityGroups"(arn: &str, groups: &[String]) -> ());
    write!(create_security_group, "CreateSecurityGroup"(g: &ManagedGroup) -> SgInfo);
    write!(authorize_ingress, "AuthorizeSecurityGroupIngress"(group: &str, rules: &[IngressRule]) -> ());
    write!(revoke_ingress, "RevokeSecurityGroupIngress"(group: &str, rules: &[IngressRule]) -> ());
    write!(delete_security_group, "DeleteSecurityGroup"(id: &str) -> ());
    write!(add_tags, "AddTags"(arn: &str, tags: &BTreeMap<String, String>) -> ());
    write!(remove_tags, "RemoveTags"(arn: &str, keys: &[String]) -> ());
    write!(create_load_balancer, "CreateLoadBalancer"(d: &DesiredLoadBalancer) -> LbInfo);
    write!(set_subnets, "SetSubnets"(
        arn: &str, subnets: &[String], mappings: &[SubnetMapping]) -> ());
    write!(set_ip_address_type, "SetIpAddressType"(arn: &str, t: IpAddressType) -> ());
    write!(modify_load_balancer_attributes, "ModifyLoadBalancerAttributes"(
        arn: &str, attrs: &BTreeMap<String, String>) -> ());
    write!(delete_load_balancer, "DeleteLoadBalancer"(arn: &str) -> ());
    write!(create_listener, "CreateListener"(lb_arn: &str, l: &DesiredListener, tg_arn: &str) -> String);
    write!(modify_listener, "ModifyListener"(arn: &str, l: &DesiredListener, tg_arn: &str) -> ());
    write!(delete_listener, "DeleteListener"(arn: &str) -> ());
    read!(listener_certificates(arn: &str) -> Vec<String>);
    write!(add_listener_certificates, "AddListenerCertificates"(
        arn: &str, certificates: &[String]) -> ());
    write!(remove_listener_certificates, "RemoveListenerCertificates"(
        arn: &str, certificates: &[String]) -> ());
    read!(listener_attributes(arn: &str) -> BTreeMap<String, String>);
    write!(modify_listener_attributes, "ModifyListenerAttributes"(
        arn: &str, attrs: &BTreeMap<String, String>) -> ());
    write!(create_target_group, "CreateTargetGroup"(d: &DesiredTargetGroup) -> TgInfo);
    write!(modify_health_check, "ModifyTargetGroup"(arn: &str, hc: &HealthCheck) -> ());
    write!(modify_target_group_attributes, "ModifyTargetGroupAttributes"(
        arn: &str, attrs: &BTreeMap<String, String>) -> ());
    write!(delete_target_group, "DeleteTargetGroup"(arn: &str) -> ());
    write!(register_targets, "RegisterTargets"(tg_arn: &str, targets: &[Target]) -> ());
    write!(deregister_targets, "DeregisterTargets"(tg_arn: &str, targets: &[Target]) -> ());
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::provider::aws::fake::FakeAws;

    #[tokio::test]
    async fn mutating_calls_need_the_fence_and_reads_do_not() {
        let fence = Fence::new();
        let metrics = Arc::new(Metrics::default());
        let aws = FencedAws::new(FakeAws::default(), fence.clone(), metrics.clone());
        let tags = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let refused = aws
            .add_tags("arn:x", &tags)
            .await
            .expect_err("not leading yet");
        assert!(refused.is(FENCED_CODE), "{refused:?}");
        assert!(aws.all_load_balancers().await.is_ok(), "reads pass");
        assert!(aws.inner.take_calls().is_empty(), "nothing reached AWS");
        fence.hold_until(Instant::now() + Duration::from_secs(30));
        assert!(aws.delete_target_group("arn:gone").await.is_ok());
        assert_eq!(aws.inner.take_calls().len(), 1);
        fence.lose();
        assert!(aws.delete_target_group("arn:gone").await.is_err());
        assert!(aws.inner.take_calls().is_empty());
        assert_eq!(metrics.write_totals().1, 2);
    }

    #[tokio::test]
    async fn a_call_waiting_past_the_deadline_is_dropped() {
        let fence = Fence::new();
        fence.hold_until(Instant::now() + Duration::from_millis(200));
        let aws = FencedAws::new(
            FakeAws::default(),
            fence.clone(),
            Arc::new(Metrics::default()),
        );
        let slow = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        };
        let r = aws.guard("DeleteListener", slow).await;
        assert!(r.is_err_and(|e| e.is(FENCED_CODE)));
    }
}
