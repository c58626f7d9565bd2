//! LocalStack helpers for the cluster-identity and deletion-protection suites: each case
//! runs its controllers with its own `--cluster-id`, so what it left behind is found (and
//! removed, also after a failure) by that tag alone.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_elasticloadbalancingv2 as elb;
use elb::types::{Action, ActionTypeEnum, LoadBalancerAttribute, ProtocolEnum, TargetTypeEnum};

use crate::controller::{AwsView, aws_view, tags_of};
use crate::testing::wait_for;

/// The identity tag.
pub const CLUSTER_ID: &str = "berth.dev/cluster-id";

/// A cluster identity no other case uses.
pub fn fresh_id(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// Every load balancer and target group ARN in LocalStack with its tags.
pub async fn all_tagged(client: &elb::Client) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut arns: Vec<String> = Vec::new();
    if let Ok(l) = client.describe_load_balancers().send().await {
        arns.extend(
            l.load_balancers()
                .iter()
                .filter_map(|l| l.load_balancer_arn().map(str::to_string)),
        );
    }
    if let Ok(t) = client.describe_target_groups().send().await {
        arns.extend(
            t.target_groups()
                .iter()
                .filter_map(|t| t.target_group_arn().map(str::to_string)),
        );
    }
    tags_of(client, &arns).await
}

/// ARNs of the resources whose identity tag is one of `ids`.
pub async fn arns_of(client: &elb::Client, ids: &[&str]) -> BTreeSet<String> {
    all_tagged(client)
        .await
        .into_iter()
        .filter(|(_, t)| t.get(CLUSTER_ID).is_some_and(|v| ids.contains(&v.as_str())))
        .map(|(arn, _)| arn)
        .collect()
}

/// Turns deletion protection of a load balancer on or off through the AWS API.
pub async fn set_protection(client: &elb::Client, lb_arn: &str, on: bool) {
    let attr = LoadBalancerAttribute::builder()
        .key("deletion_protection.enabled")
        .value(on.to_string())
        .build();
    client
        .modify_load_balancer_attributes()
        .load_balancer_arn(lb_arn)
        .attributes(attr)
        .send()
        .await
        .unwrap_or_else(|e| panic!("set deletion protection of {lb_arn}: {e:?}"));
}

/// Deletes what the ids' controllers made (protection off first) and the extra target
/// groups; errors are ignored (clean-up after a failure).
pub async fn clean_up(client: &elb::Client, ids: &[&str], extra_tgs: &[String]) {
    let arns = arns_of(client, ids).await;
    for arn in arns.iter().filter(|a| a.contains(":loadbalancer/")) {
        let attr = LoadBalancerAttribute::builder()
            .key("deletion_protection.enabled")
            .value("false")
            .build();
        let _ = client
            .modify_load_balancer_attributes()
            .load_balancer_arn(arn)
            .attributes(attr)
            .send()
            .await;
        let _ = client
            .delete_load_balancer()
            .load_balancer_arn(arn)
            .send()
            .await;
    }
    let tgs = arns.iter().filter(|a| a.contains(":targetgroup/"));
    for arn in tgs.chain(extra_tgs) {
        let _ = client
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await;
    }
}

/// Creates a target group by hand (no berth tags) in the VPC of `like_tg` and forwards
/// `port` of load balancer `lb_arn` to it. Answers the target group's ARN.
pub async fn attach_by_hand(
    client: &elb::Client,
    lb_arn: &str,
    like_tg: &str,
    name: &str,
    port: i32,
) -> String {
    let like = client
        .describe_target_groups()
        .target_group_arns(like_tg)
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe {like_tg}: {e:?}"));
    let vpc = like
        .target_groups()
        .first()
        .and_then(|t| t.vpc_id())
        .expect("the target group's VPC")
        .to_string();
    let tg = client
        .create_target_group()
        .name(name)
        .protocol(ProtocolEnum::Tcp)
        .port(port)
        .vpc_id(vpc)
        .target_type(TargetTypeEnum::Ip)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create target group {name}: {e:?}"));
    let arn = tg
        .target_groups()
        .first()
        .and_then(|t| t.target_group_arn())
        .expect("created target group")
        .to_string();
    let forward = Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(&arn)
        .build();
    client
        .create_listener()
        .load_balancer_arn(lb_arn)
        .protocol(ProtocolEnum::Tcp)
        .port(port)
        .default_actions(forward)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create listener {port} on {lb_arn}: {e:?}"));
    arn
}

/// Ports of the listeners of `lb_arn` with the target group each forwards to.
pub async fn listeners_of(client: &elb::Client, lb_arn: &str) -> BTreeMap<i32, String> {
    client
        .describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .map(|o| {
            o.listeners()
                .iter()
                .filter_map(|l| {
                    let tg = l
                        .default_actions()
                        .first()
                        .and_then(|a| a.target_group_arn())
                        .unwrap_or_default();
                    Some((l.port()?, tg.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The NLB of the Service with `uid` once it has one target group and one listener,
/// within `timeout`; panics with the last view and `logs()` otherwise.
pub async fn provisioned(
    client: &elb::Client,
    uid: &str,
    timeout: std::time::Duration,
    logs: impl Fn() -> String,
) -> AwsView {
    let last = std::sync::Mutex::new(AwsView::default());
    let res = wait_for(
        "an NLB with its target group and listener",
        timeout,
        || async {
            let Ok(v) = aws_view(client, uid).await else {
                return false;
            };
            let ready = match v.load_balancers.as_slice() {
                [lb] => v.target_groups.len() == 1 && listeners_of(client, &lb.0).await.len() == 1,
                _ => false,
            };
            if let Ok(mut l) = last.lock() {
                *l = v;
            }
            ready
        },
    )
    .await;
    let last = last.into_inner().unwrap_or_default();
    if let Err(e) = res {
        panic!("{e}: {last:?}\n{}", logs());
    }
    last
}
