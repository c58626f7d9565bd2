//! The AWS edge: [`AwsApi`] over the ELBv2 and EC2 SDK clients, every call through a
//! client-side rate limiter, with retries and jitter on throttling and transient errors,
//! counted by operation and outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elb;
use elb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use elb::types::{
    Action, ActionTypeEnum, Certificate, IpAddressType as AwsIpType, LoadBalancerAttribute,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher, ProtocolEnum, Tag, TargetDescription,
    TargetGroupAttribute, TargetTypeEnum,
};

use crate::metrics::Metrics;
use crate::provider::aws::annotations::{HealthCheck, HealthPort, SubnetChoice};
use crate::provider::aws::limits::ApiLimits;
use crate::provider::aws::model::{
    DesiredListener, DesiredLoadBalancer, DesiredTargetGroup, IpAddressType, Scheme, SubnetMapping,
    Target, TargetType,
};
use crate::provider::aws::security_groups::{
    IngressRule, ManagedGroup, Rule, SgInfo, SgQuery, Source,
};
use crate::provider::aws::subnets;

pub use crate::provider::aws::api::{
    AwsApi, AwsError, Candidate, LbInfo, ListenerInfo, SubnetFilter, SubnetQuery, TagsByArn,
    TargetState, TgInfo,
};
pub use crate::provider::aws::subnets::pick_subnets;

const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestThrottled",
    "ServiceUnavailable",
    "InternalFailure",
];

/// A token bucket shared by every AWS call of the process.
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            qps: qps.max(0.1),
            burst: f64::from(burst.max(1)),
            state: tokio::sync::Mutex::new((f64::from(burst.max(1)), Instant::now())),
        }
    }

    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.qps).min(self.burst);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                (1.0 - s.0) / self.qps
            };
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// Exponential backoff with full jitter: attempt 0 → up to 200 ms, doubling, capped at 5 s.
pub fn backoff(attempt: u32) -> Duration {
    let cap = (200u64 << attempt.min(5)).min(5_000);
    Duration::from_millis(rand::random_range(cap / 2..=cap))
}

pub struct Aws {
    pub elb: elb::Client,
    pub ec2: ec2::Client,
    limiter: RateLimiter,
    /// AWS's per-API buckets, when on.
    api_limits: Option<ApiLimits>,
    metrics: Arc<Metrics>,
    max_attempts: u32,
}

fn health_from(tg: &elb::types::TargetGroup) -> HealthCheck {
    let port = match tg.health_check_port() {
        None | Some("traffic-port") => HealthPort::TrafficPort,
        Some(p) => p
            .parse()
            .map(HealthPort::Port)
            .unwrap_or(HealthPort::TrafficPort),
    };
    let protocol = tg
        .health_check_protocol()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let http = protocol != "TCP";
    HealthCheck {
        protocol,
        port,
        path: tg.health_check_path().filter(|_| http).map(str::to_string),
        interval_seconds: tg.health_check_interval_seconds().unwrap_or_default(),
        timeout_seconds: tg.health_check_timeout_seconds().unwrap_or_default(),
        healthy_threshold: tg.healthy_threshold_count().unwrap_or_default(),
        unhealthy_threshold: tg.unhealthy_threshold_count().unwrap_or_default(),
        success_codes: tg
            .matcher()
            .and_then(|m| m.http_code())
            .filter(|_| http)
            .map(str::to_string),
    }
}

fn tg_info(tg: &elb::types::TargetGroup) -> TgInfo {
    TgInfo {
        arn: tg.target_group_arn().unwrap_or_default().to_string(),
        name: tg.target_group_name().unwrap_or_default().to_string(),
        protocol: tg
            .protocol()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        port: tg.port().unwrap_or_default(),
        target_type: tg
            .target_type()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        health_check: health_from(tg),
        load_balancer_arns: tg.load_balancer_arns().to_vec(),
    }
}

fn lb_info(lb: &elb::types::LoadBalancer) -> LbInfo {
    LbInfo {
        arn: lb.load_balancer_arn().unwrap_or_default().to_string(),
        name: lb.load_balancer_name().unwrap_or_default().to_string(),
        dns_name: lb.dns_name().unwrap_or_default().to_string(),
        state: lb
            .state()
            .and_then(|s| s.code())
            .map(|c| c.as_str().to_string())
            .unwrap_or_default(),
        scheme: lb
            .scheme()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        ip_address_type: lb
            .ip_address_type()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        subnets: lb
            .availability_zones()
            .iter()
            .filter_map(|z| z.subnet_id().map(str::to_string))
            .collect(),
        security_groups: lb.security_groups().to_vec(),
        mappings: lb
            .availability_zones()
            .iter()
            .map(|z| {
                let addrs = z.load_balancer_addresses();
                let first = |f: fn(&elb::types::LoadBalancerAddress) -> Option<&str>| {
                    addrs.iter().find_map(|a| f(a).map(str::to_string))
                };
                SubnetMapping {
                    subnet: z.subnet_id().unwrap_or_default().to_string(),
                    allocation_id: first(|a| a.allocation_id()),
                    private_ipv4: first(|a| a.private_ipv4_address()),
                    ipv6: first(|a| a.ipv6_address()),
                }
            })
            .collect(),
    }
}

/// One EC2 permission per rule (a permission's lists would group them; one each keeps a
/// rule's description its own).
fn permission(r: &IngressRule) -> ec2::types::IpPermission {
    use ec2::types::{IpPermission, IpRange, Ipv6Range, PrefixListId, UserIdGroupPair};
    let d = r.description.clone();
    let p = IpPermission::builder()
        .ip_protocol(&r.rule.protocol)
        .from_port(r.rule.from_port)
        .to_port(r.rule.to_port);
    match &r.rule.source {
        Source::Cidr(c) if c.contains(':') => {
            p.ipv6_ranges(Ipv6Range::builder().cidr_ipv6(c).set_description(d).build())
        }
        Source::Cidr(c) => p.ip_ranges(IpRange::builder().cidr_ip(c).set_description(d).build()),
        Source::PrefixList(id) => p.prefix_list_ids(
            PrefixListId::builder()
                .prefix_list_id(id)
                .set_description(d)
                .build(),
        ),
        Source::Group(id) => p.user_id_group_pairs(
            UserIdGroupPair::builder()
                .group_id(id)
                .set_description(d)
                .build(),
        ),
    }
    .build()
}

/// The rules in an EC2 permission, each with its description.
fn rules_of(p: &ec2::types::IpPermission) -> Vec<IngressRule> {
    let protocol = p.ip_protocol().unwrap_or("-1").to_ascii_lowercase();
    let protocol = match protocol.as_str() {
        "6" => "tcp".to_string(),
        "17" => "udp".to_string(),
        _ => protocol,
    };
    let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
    let one = |source: Source, description: Option<&str>| IngressRule {
        rule: Rule {
            protocol: protocol.clone(),
            from_port: from,
            to_port: to,
            source,
        },
        description: description.map(str::to_string),
    };
    let mut out = Vec::new();
    for r in p.ip_ranges() {
        if let Some(c) = r.cidr_ip() {
            out.push(one(Source::Cidr(c.to_string()), r.description()));
        }
    }
    for r in p.ipv6_ranges() {
        if let Some(c) = r.cidr_ipv6() {
            out.push(one(Source::Cidr(c.to_string()), r.description()));
        }
    }
    for r in p.prefix_list_ids() {
        if let Some(id) = r.prefix_list_id() {
            out.push(one(Source::PrefixList(id.to_string()), r.description()));
        }
    }
    for r in p.user_id_group_pairs() {
        if let Some(id) = r.group_id() {
            out.push(one(Source::Group(id.to_string()), r.description()));
        }
    }
    out
}

fn sg_info(g: &ec2::types::SecurityGroup) -> SgInfo {
    SgInfo {
        id: g.group_id().unwrap_or_default().to_string(),
        name: g.group_name().unwrap_or_default().to_string(),
        vpc: g.vpc_id().unwrap_or_default().to_string(),
        tags: g
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_string(),
                    t.value().unwrap_or_default().to_string(),
                ))
            })
            .collect(),
        ingress: g.ip_permissions().iter().flat_map(rules_of).collect(),
    }
}

/// The SDK's subnet mappings, or `None` when no static address is asked for.
fn sdk_mappings(mappings: &[SubnetMapping]) -> Option<Vec<elb::types::SubnetMapping>> {
    (!mappings.is_empty()).then(|| {
        mappings
            .iter()
            .map(|m| {
                elb::types::SubnetMapping::builder()
                    .subnet_id(&m.subnet)
                    .set_allocation_id(m.allocation_id.clone())
                    .set_private_ipv4_address(m.private_ipv4.clone())
                    .set_ipv6_address(m.ipv6.clone())
                    .build()
            })
            .collect()
    })
}

fn tags_of(map: &BTreeMap<String, String>) -> Vec<Tag> {
    map.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn certificate_list(arns: &[String]) -> Vec<Certificate> {
    arns.iter()
        .map(|c| Certificate::builder().certificate_arn(c).build())
        .collect()
}

fn forward(tg_arn: &str) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}

fn descriptions(targets: &[Target]) -> Vec<TargetDescription> {
    targets
        .iter()
        .map(|t| TargetDescription::builder().id(&t.id).port(t.port).build())
        .collect()
}

impl Aws {
    /// A client whose calls wait for the process-wide bucket (`qps`, `burst`) and, with
    /// `api_limits`, for their API's bucket of AWS's table ([`ApiLimits`]).
    pub fn new(
        sdk: &aws_config::SdkConfig,
        (qps, burst): (f64, u32),
        api_limits: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            elb: elb::Client::new(sdk),
            ec2: ec2::Client::new(sdk),
            limiter: RateLimiter::new(qps, burst),
            api_limits: api_limits.then(ApiLimits::default),
            metrics,
            max_attempts: 5,
        }
    }

    /// One AWS operation through the limiter; throttling and transient failures are retried
    /// with jittered backoff. Every attempt is counted.
    async fn call<T, E, R, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, AwsError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let mut attempt = 0;
        loop {
            if let Some(limits) = &self.api_limits {
                limits.acquire(operation).await;
            }
            self.limiter.acquire().await;
            let started = Instant::now();
            let result = f().await;
            self.metrics
                .aws_call_seconds
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(v) => {
                    self.metrics.aws_call(operation, "success");
                    return Ok(v);
                }
                Err(err) => {
                    let code = err.code().map(str::to_string);
                    let transient = matches!(
                        err,
                        SdkError::DispatchFailure(_)
                            | SdkError::TimeoutError(_)
                            | SdkError::ResponseError(_)
                    ) || code.as_deref().is_some_and(|c| THROTTLING.contains(&c));
                    let outcome = if code
                        .as_deref()
                        .is_some_and(|c| c.contains("hrottl") || c.contains("LimitExceeded"))
                    {
                        "throttled"
                    } else {
                        "error"
                    };
                    self.metrics.aws_call(operation, outcome);
                    attempt += 1;
                    if transient && attempt < self.max_attempts {
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    let message = err
                        .message()
                        .map(str::to_string)
                        .unwrap_or_else(|| DisplayErrorContext(&err).to_string());
                    return Err(AwsError {
                        operation,
                        code,
                        message,
                    });
                }
            }
        }
    }
}

impl AwsApi for Aws {
    async fn find_load_balancer(&self, name: &str) -> Result<Option<LbInfo>, AwsError> {
        let res = self
            .call("DescribeLoadBalancers", || {
                self.elb.describe_load_balancers().names(name).send()
            })
            .await;
        match res {
            Ok(out) => Ok(out.load_balancers().first().map(lb_info)),
            Err(e) if e.is("LoadBalancerNotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn describe_load_balancers(&self, arns: &[String]) -> Result<Vec<LbInfo>, AwsError> {
        let mut out = Vec::new();
        for chunk in arns.chunks(20) {
            let res = self
                .call("DescribeLoadBalancers", || {
                    self.elb
                        .describe_load_balancers()
                        .set_load_balancer_arns(Some(chunk.to_vec()))
                        .send()
                })
                .await;
            match res {
                Ok(r) => out.extend(r.load_balancers().iter().map(lb_info)),
                // One ARN gone (deleted, or lost with all AWS state) fails the whole call:
                // ask one by one so the others are still found.
                Err(e) if e.is("LoadBalancerNotFound") && chunk.len() > 1 => {
                    for arn in chunk {
                        match self
                            .call("DescribeLoadBalancers", || {
                                self.elb
                                    .describe_load_balancers()
                                    .load_balancer_arns(arn)
                                    .send()
                            })
                            .await
                        {
                            Ok(r) => out.extend(r.load_balancers().iter().map(lb_info)),
                            Err(e) if e.is("LoadBalancerNotFound") => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.is("LoadBalancerNotFound") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every load balancer in the region (paginated).
    async fn all_load_balancers(&self) -> Result<Vec<LbInfo>, AwsError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let m = marker.clone();
            let page = self
                .call("DescribeLoadBalancers", || {
                    self.elb
                        .describe_load_balancers()
                        .set_marker(m.clone())
                        .page_size(400)
                        .send()
                })
                .await?;
            out.extend(page.load_balancers().iter().map(lb_info));
            match page.next_marker() {
                Some(n) if !n.is_empty() && Some(n) != marker.as_deref() => {
                    marker = Some(n.to_string())
                }
                _ => return Ok(out),
            }
        }
    }

    /// Every target group in the region (paginated).
    async fn all_target_groups(&self) -> Result<Vec<TgInfo>, AwsError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let m = marker.clone();
            let page = self
                .call("DescribeTargetGroups", || {
                    self.elb
                        .describe_target_groups()
                        .set_marker(m.clone())
                        .page_size(400)
                        .send()
                })
                .await?;
            out.extend(page.target_groups().iter().map(tg_info));
            match page.next_marker() {
                Some(n) if !n.is_empty() && Some(n) != marker.as_deref() => {
                    marker = Some(n.to_string())
                }
                _ => return Ok(out),
            }
        }
    }

    /// Tags of up to any number of resources (20 per call).
    async fn tags(
        &self,
        arns: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, AwsError> {
        let mut out = BTreeMap::new();
        for chunk in arns.chunks(20) {
            let res = self
                .call("DescribeTags", || {
                    self.elb
                        .describe_tags()
                        .set_resource_arns(Some(chunk.to_vec()))
                        .send()
                })
                .await;
            let res = match res {
                Ok(r) => r,
                // A resource deleted meanwhile: ask one by one.
                Err(e)
                    if chunk.len() > 1
                        && (e.is("LoadBalancerNotFound") || e.is("TargetGroupNotFound")) =>
                {
                    for arn in chunk {
                        if let Ok(one) = self
                            .call("DescribeTags", || {
                                self.elb.describe_tags().resource_arns(arn).send()
                            })
                            .await
                        {
                            for d in one.tag_descriptions() {
                                out.insert(arn.clone(), tag_map(d.tags()));
                            }
                        }
                    }
                    continue;
                }
                Err(e) if e.is("LoadBalancerNotFound") || e.is("TargetGroupNotFound") => continue,
                Err(e) => return Err(e),
            };
            for d in res.tag_descriptions() {
                if let Some(arn) = d.resource_arn() {
                    out.insert(arn.to_string(), tag_map(d.tags()));
                }
            }
        }
        Ok(out)
    }

    async fn add_tags(&self, arn: &str, tags: &BTreeMap<String, String>) -> Result<(), AwsError> {
        self.call("AddTags", || {
            self.elb
                .add_tags()
                .resource_arns(arn)
                .set_tags(Some(tags_of(tags)))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn remove_tags(&self, arn: &str, keys: &[String]) -> Result<(), AwsError> {
        self.call("RemoveTags", || {
            self.elb
                .remove_tags()
                .resource_arns(arn)
                .set_tag_keys(Some(keys.to_vec()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn create_load_balancer(&self, d: &DesiredLoadBalancer) -> Result<LbInfo, AwsError> {
        let sgs = (!d.security_groups.is_empty()).then(|| d.security_groups.clone());
        let mappings = sdk_mappings(&d.mappings);
        let subnets = mappings.is_none().then(|| d.subnets.clone());
        let out = self
            .call("CreateLoadBalancer", || {
                self.elb
                    .create_load_balancer()
                    .name(&d.name)
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(LoadBalancerSchemeEnum::from(d.scheme.as_str()))
                    .ip_address_type(AwsIpType::from(d.ip_address_type.as_str()))
                    .set_subnets(subnets.clone())
                    .set_subnet_mappings(mappings.clone())
                    .set_security_groups(sgs.clone())
                    .set_tags(Some(tags_of(&d.tags)))
                    .send()
            })
            .await?;
        out.load_balancers()
            .first()
            .map(lb_info)
            .ok_or_else(|| AwsError::other("CreateLoadBalancer", "no load balancer in the answer"))
    }

    async fn set_subnets(
        &self,
        arn: &str,
        subnets: &[String],
        mappings: &[SubnetMapping],
    ) -> Result<(), AwsError> {
        let mappings = sdk_mappings(mappings);
        let subnets = mappings.is_none().then(|| subnets.to_vec());
        self.call("SetSubnets", || {
            self.elb
                .set_subnets()
                .load_balancer_arn(arn)
                .set_subnets(subnets.clone())
                .set_subnet_mappings(mappings.clone())
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn set_ip_address_type(&self, arn: &str, t: IpAddressType) -> Result<(), AwsError> {
        self.call("SetIpAddressType", || {
            self.elb
                .set_ip_address_type()
                .load_balancer_arn(arn)
                .ip_address_type(AwsIpType::from(t.as_str()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn load_balancer_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, AwsError> {
        let out = self
            .call("DescribeLoadBalancerAttributes", || {
                self.elb
                    .describe_load_balancer_attributes()
                    .load_balancer_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .attributes()
            .iter()
            .filter_map(|a| {
                Some((
                    a.key()?.to_string(),
                    a.value().unwrap_or_default().to_string(),
                ))
            })
            .collect())
    }

    async fn modify_load_balancer_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), AwsError> {
        let list: Vec<LoadBalancerAttribute> = attrs
            .iter()
            .map(|(k, v)| LoadBalancerAttribute::builder().key(k).value(v).build())
            .collect();
        self.call("ModifyLoadBalancerAttributes", || {
            self.elb
                .modify_load_balancer_attributes()
                .load_balancer_arn(arn)
                .set_attributes(Some(list.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn delete_load_balancer(&self, arn: &str) -> Result<(), AwsError> {
        match self
            .call("DeleteLoadBalancer", || {
                self.elb
                    .delete_load_balancer()
                    .load_balancer_arn(arn)
                    .send()
            })
            .await
        {
            Err(e) if e.is("LoadBalancerNotFound") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn listeners(&self, lb_arn: &str) -> Result<Vec<ListenerInfo>, AwsError> {
        let out = self
            .call("DescribeListeners", || {
                self.elb
                    .describe_listeners()
                    .load_balancer_arn(lb_arn)
                    .send()
            })
            .await?;
        Ok(out
            .listeners()
            .iter()
            .map(|l| ListenerInfo {
                arn: l.listener_arn().unwrap_or_default().to_string(),
                port: l.port().unwrap_or_default(),
                protocol: l
                    .protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                target_group_arn: l
                    .default_actions()
                    .iter()
                    .find_map(|a| a.target_group_arn().map(str::to_string)),
                certificate: l
                    .certificates()
                    .iter()
                    .find_map(|c| c.certificate_arn().map(str::to_string)),
                ssl_policy: l.ssl_policy().map(str::to_string),
                alpn_policy: l.alpn_policy().first().cloned(),
            })
            .collect())
    }

    async fn listener_certificates(&self, arn: &str) -> Result<Vec<String>, AwsError> {
        let out = self
            .call("DescribeListenerCertificates", || {
                self.elb
                    .describe_listener_certificates()
                    .listener_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .certificates()
            .iter()
            .filter(|c| c.is_default() != Some(true))
            .filter_map(|c| c.certificate_arn().map(str::to_string))
            .collect())
    }

    async fn add_listener_certificates(
        &self,
        arn: &str,
        certificates: &[String],
    ) -> Result<(), AwsError> {
        let certs = certificate_list(certificates);
        self.call("AddListenerCertificates", || {
            self.elb
                .add_listener_certificates()
                .listener_arn(arn)
                .set_certificates(Some(certs.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn remove_listener_certificates(
        &self,
        arn: &str,
        certificates: &[String],
    ) -> Result<(), AwsError> {
        let certs = certificate_list(certificates);
        self.call("RemoveListenerCertificates", || {
            self.elb
                .remove_listener_certificates()
                .listener_arn(arn)
                .set_certificates(Some(certs.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn listener_attributes(&self, arn: &str) -> Result<BTreeMap<String, String>, AwsError> {
        let out = self
            .call("DescribeListenerAttributes", || {
                self.elb
                    .describe_listener_attributes()
                    .listener_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .attributes()
            .iter()
            .filter_map(|a| {
                Some((
                    a.key()?.to_string(),
                    a.value().unwrap_or_default().to_string(),
                ))
            })
            .collect())
    }

    async fn modify_listener_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), AwsError> {
        let list: Vec<elb::types::ListenerAttribute> = attrs
            .iter()
            .map(|(k, v)| {
                elb::types::ListenerAttribute::builder()
                    .key(k)
                    .value(v)
                    .build()
            })
            .collect();
        self.call("ModifyListenerAttributes", || {
            self.elb
                .modify_listener_attributes()
                .listener_arn(arn)
                .set_attributes(Some(list.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn create_listener(
        &self,
        lb_arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
    ) -> Result<String, AwsError> {
        let certs = l
            .certificate
            .as_ref()
            .map(|c| vec![Certificate::builder().certificate_arn(c).build()]);
        let out = self
            .call("CreateListener", || {
                self.elb
                    .create_listener()
                    .load_balancer_arn(lb_arn)
                    .port(l.port)
                    .protocol(ProtocolEnum::from(l.protocol.as_str()))
                    .set_certificates(certs.clone())
                    .set_ssl_policy(l.ssl_policy.clone())
                    .set_alpn_policy(l.alpn_policy.clone().map(|a| vec![a]))
                    .default_actions(forward(tg_arn))
                    .send()
            })
            .await?;
        out.listeners()
            .first()
            .and_then(|l| l.listener_arn())
            .map(str::to_string)
            .ok_or_else(|| AwsError::other("CreateListener", "no listener in the answer"))
    }

    async fn modify_listener(
        &self,
        arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
    ) -> Result<(), AwsError> {
        let certs = l
            .certificate
            .as_ref()
            .map(|c| vec![Certificate::builder().certificate_arn(c).build()]);
        self.call("ModifyListener", || {
            self.elb
                .modify_listener()
                .listener_arn(arn)
                .port(l.port)
                .protocol(ProtocolEnum::from(l.protocol.as_str()))
                .set_certificates(certs.clone())
                .set_ssl_policy(l.ssl_policy.clone())
                .set_alpn_policy(l.alpn_policy.clone().map(|a| vec![a]))
                .default_actions(forward(tg_arn))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn delete_listener(&self, arn: &str) -> Result<(), AwsError> {
        match self
            .call("DeleteListener", || {
                self.elb.delete_listener().listener_arn(arn).send()
            })
            .await
        {
            Err(e) if e.is("ListenerNotFound") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn target_groups_of(&self, lb_arn: &str) -> Result<Vec<TgInfo>, AwsError> {
        match self
            .call("DescribeTargetGroups", || {
                self.elb
                    .describe_target_groups()
                    .load_balancer_arn(lb_arn)
                    .send()
            })
            .await
        {
            Ok(out) => Ok(out.target_groups().iter().map(tg_info).collect()),
            Err(e) if e.is("LoadBalancerNotFound") || e.is("TargetGroupNotFound") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    async fn find_target_group(&self, name: &str) -> Result<Option<TgInfo>, AwsError> {
        match self
            .call("DescribeTargetGroups", || {
                self.elb.describe_target_groups().names(name).send()
            })
            .await
        {
            Ok(out) => Ok(out.target_groups().first().map(tg_info)),
            Err(e) if e.is("TargetGroupNotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create_target_group(&self, d: &DesiredTargetGroup) -> Result<TgInfo, AwsError> {
        let hc = &d.health_check;
        let matcher = hc
            .success_codes
            .as_ref()
            .map(|c| Matcher::builder().http_code(c).build());
        let out = self
            .call("CreateTargetGroup", || {
                self.elb
                    .create_target_group()
                    .name(&d.name)
                    .protocol(ProtocolEnum::from(d.protocol.as_str()))
                    .port(d.port)
                    .vpc_id(&d.vpc_id)
                    .target_type(match d.target_type {
                        TargetType::Instance => TargetTypeEnum::Instance,
                        TargetType::Ip => TargetTypeEnum::Ip,
                    })
                    .set_ip_address_type(
                        d.ipv6
                            .then_some(elb::types::TargetGroupIpAddressTypeEnum::Ipv6),
                    )
                    .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
                    .health_check_port(hc.port_string())
                    .set_health_check_path(hc.path.clone())
                    .health_check_interval_seconds(hc.interval_seconds)
                    .health_check_timeout_seconds(hc.timeout_seconds)
                    .healthy_threshold_count(hc.healthy_threshold)
                    .unhealthy_threshold_count(hc.unhealthy_threshold)
                    .set_matcher(matcher.clone())
                    .set_tags(Some(tags_of(&d.tags)))
                    .send()
            })
            .await?;
        out.target_groups()
            .first()
            .map(tg_info)
            .ok_or_else(|| AwsError::other("CreateTargetGroup", "no target group in the answer"))
    }

    async fn modify_health_check(&self, arn: &str, hc: &HealthCheck) -> Result<(), AwsError> {
        let matcher = hc
            .success_codes
            .as_ref()
            .map(|c| Matcher::builder().http_code(c).build());
        self.call("ModifyTargetGroup", || {
            self.elb
                .modify_target_group()
                .target_group_arn(arn)
                .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
                .health_check_port(hc.port_string())
                .set_health_check_path(hc.path.clone())
                .health_check_interval_seconds(hc.interval_seconds)
                .health_check_timeout_seconds(hc.timeout_seconds)
                .healthy_threshold_count(hc.healthy_threshold)
                .unhealthy_threshold_count(hc.unhealthy_threshold)
                .set_matcher(matcher.clone())
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn target_group_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, AwsError> {
        let out = self
            .call("DescribeTargetGroupAttributes", || {
                self.elb
                    .describe_target_group_attributes()
                    .target_group_arn(arn)
                    .send()
            })
            .await?;
        Ok(out
            .attributes()
            .iter()
            .filter_map(|a| {
                Some((
                    a.key()?.to_string(),
                    a.value().unwrap_or_default().to_string(),
                ))
            })
            .collect())
    }

    async fn modify_target_group_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), AwsError> {
        let list: Vec<TargetGroupAttribute> = attrs
            .iter()
            .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
            .collect();
        self.call("ModifyTargetGroupAttributes", || {
            self.elb
                .modify_target_group_attributes()
                .target_group_arn(arn)
                .set_attributes(Some(list.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn delete_target_group(&self, arn: &str) -> Result<(), AwsError> {
        match self
            .call("DeleteTargetGroup", || {
                self.elb.delete_target_group().target_group_arn(arn).send()
            })
            .await
        {
            Err(e) if e.is("TargetGroupNotFound") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn target_health(&self, tg_arn: &str) -> Result<Vec<TargetState>, AwsError> {
        let out = self
            .call("DescribeTargetHealth", || {
                self.elb
                    .describe_target_health()
                    .target_group_arn(tg_arn)
                    .send()
            })
            .await?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                Some(TargetState {
                    target: Target {
                        id: t.id()?.to_string(),
                        port: t.port().unwrap_or_default(),
                    },
                    state: d
                        .target_health()
                        .and_then(|h| h.state())
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn register_targets(&self, tg_arn: &str, targets: &[Target]) -> Result<(), AwsError> {
        let list = descriptions(targets);
        self.call("RegisterTargets", || {
            self.elb
                .register_targets()
                .target_group_arn(tg_arn)
                .set_targets(Some(list.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn deregister_targets(&self, tg_arn: &str, targets: &[Target]) -> Result<(), AwsError> {
        let list = descriptions(targets);
        self.call("DeregisterTargets", || {
            self.elb
                .deregister_targets()
                .target_group_arn(tg_arn)
                .set_targets(Some(list.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }
    async fn describe_subnets(&self, query: &SubnetQuery) -> Result<Vec<Candidate>, AwsError> {
        use ec2::types::Filter;
        let filters: Vec<Filter> = query
            .filters
            .iter()
            .map(|f| match f {
                SubnetFilter::Vpc(vpc) => Filter::builder().name("vpc-id").values(vpc).build(),
                SubnetFilter::TagKey(k) => Filter::builder().name("tag-key").values(k).build(),
                SubnetFilter::Tag(k, values) => Filter::builder()
                    .name(format!("tag:{k}"))
                    .set_values(Some(values.clone()))
                    .build(),
            })
            .collect();
        let out = self
            .call("DescribeSubnets", || {
                self.ec2
                    .describe_subnets()
                    .set_subnet_ids(query.ids.clone())
                    .set_filters((!filters.is_empty()).then(|| filters.clone()))
                    .send()
            })
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e)
                if e.code
                    .as_deref()
                    .is_some_and(|c| c.starts_with("InvalidSubnet")) =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        Ok(out
            .subnets()
            .iter()
            .map(|s| Candidate {
                id: s.subnet_id().unwrap_or_default().to_string(),
                vpc: s.vpc_id().unwrap_or_default().to_string(),
                zone: s.availability_zone().unwrap_or_default().to_string(),
                cluster_tags: s
                    .tags()
                    .iter()
                    .filter_map(|t| t.key())
                    .filter(|k| k.starts_with("kubernetes.io/cluster/"))
                    .map(str::to_string)
                    .collect(),
                cidrs: s
                    .cidr_block()
                    .into_iter()
                    .chain(
                        s.ipv6_cidr_block_association_set()
                            .iter()
                            .filter_map(|a| a.ipv6_cidr_block()),
                    )
                    .filter_map(|c| c.parse().ok())
                    .collect(),
            })
            .collect())
    }

    async fn instance_vpcs(&self, ids: &[String]) -> Result<BTreeSet<String>, AwsError> {
        use ec2::types::Filter;
        // A filter, not InstanceIds: an unknown ID then gives nothing instead of an error.
        let filter = Filter::builder()
            .name("instance-id")
            .set_values(Some(ids.to_vec()))
            .build();
        let out = self
            .call("DescribeInstances", || {
                self.ec2.describe_instances().filters(filter.clone()).send()
            })
            .await?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.vpc_id().map(str::to_string))
            .collect())
    }

    async fn set_security_groups(&self, arn: &str, groups: &[String]) -> Result<(), AwsError> {
        self.call("SetSecurityGroups", || {
            self.elb
                .set_security_groups()
                .load_balancer_arn(arn)
                .set_security_groups(Some(groups.to_vec()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn security_groups(&self, query: &SgQuery) -> Result<Vec<SgInfo>, AwsError> {
        use ec2::types::Filter;
        let filters: Vec<Filter> = query
            .filters
            .iter()
            .map(|(name, values)| {
                Filter::builder()
                    .name(name)
                    .set_values(Some(values.clone()))
                    .build()
            })
            .collect();
        match self.describe_groups(query.ids.clone(), &filters).await {
            Ok(found) => Ok(found),
            // One ID gone fails the whole call: ask one by one so the others are found.
            Err(e) if e.is("InvalidGroup.NotFound") => {
                let mut out = Vec::new();
                for id in query.ids.iter().flatten() {
                    match self.describe_groups(Some(vec![id.clone()]), &filters).await {
                        Ok(found) => out.extend(found),
                        Err(e) if e.is("InvalidGroup.NotFound") => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }

    async fn create_security_group(&self, g: &ManagedGroup) -> Result<SgInfo, AwsError> {
        use ec2::types::{ResourceType, TagSpecification};
        let tags: Vec<ec2::types::Tag> = g
            .tags
            .iter()
            .map(|(k, v)| ec2::types::Tag::builder().key(k).value(v).build())
            .collect();
        let spec = TagSpecification::builder()
            .resource_type(ResourceType::SecurityGroup)
            .set_tags(Some(tags))
            .build();
        let out = self
            .call("CreateSecurityGroup", || {
                self.ec2
                    .create_security_group()
                    .group_name(&g.name)
                    .description(&g.description)
                    .vpc_id(&g.vpc_id)
                    .tag_specifications(spec.clone())
                    .send()
            })
            .await?;
        Ok(SgInfo {
            id: out.group_id().unwrap_or_default().to_string(),
            name: g.name.clone(),
            vpc: g.vpc_id.clone(),
            tags: g.tags.clone(),
            ingress: Vec::new(),
        })
    }

    async fn authorize_ingress(&self, group: &str, rules: &[IngressRule]) -> Result<(), AwsError> {
        let permissions: Vec<ec2::types::IpPermission> = rules.iter().map(permission).collect();
        self.call("AuthorizeSecurityGroupIngress", || {
            self.ec2
                .authorize_security_group_ingress()
                .group_id(group)
                .set_ip_permissions(Some(permissions.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn revoke_ingress(&self, group: &str, rules: &[IngressRule]) -> Result<(), AwsError> {
        let permissions: Vec<ec2::types::IpPermission> = rules.iter().map(permission).collect();
        self.call("RevokeSecurityGroupIngress", || {
            self.ec2
                .revoke_security_group_ingress()
                .group_id(group)
                .set_ip_permissions(Some(permissions.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn delete_security_group(&self, id: &str) -> Result<(), AwsError> {
        let res = self
            .call("DeleteSecurityGroup", || {
                self.ec2.delete_security_group().group_id(id).send()
            })
            .await;
        match res {
            Err(e) if e.is("InvalidGroup.NotFound") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    async fn instance_groups(
        &self,
        ids: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, AwsError> {
        use ec2::types::Filter;
        let mut out = BTreeMap::new();
        // A filter takes at most 200 values.
        for chunk in ids.chunks(200) {
            let filter = Filter::builder()
                .name("instance-id")
                .set_values(Some(chunk.to_vec()))
                .build();
            let page = self
                .call("DescribeInstances", || {
                    self.ec2.describe_instances().filters(filter.clone()).send()
                })
                .await?;
            out.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(|i| {
                        let groups = i
                            .security_groups()
                            .iter()
                            .filter_map(|g| g.group_id().map(str::to_string))
                            .collect();
                        Some((i.instance_id()?.to_string(), groups))
                    }),
            );
        }
        Ok(out)
    }

    async fn vpc_cidrs(&self, vpc: &str) -> Result<Vec<String>, AwsError> {
        let out = self
            .call("DescribeVpcs", || {
                self.ec2.describe_vpcs().vpc_ids(vpc).send()
            })
            .await?;
        let mut cidrs = BTreeSet::new();
        for v in out.vpcs() {
            cidrs.extend(v.cidr_block().map(str::to_string));
            for a in v.cidr_block_association_set() {
                cidrs.extend(a.cidr_block().map(str::to_string));
            }
            for a in v.ipv6_cidr_block_association_set() {
                cidrs.extend(a.ipv6_cidr_block().map(str::to_string));
            }
        }
        Ok(cidrs.into_iter().collect())
    }
}

impl Aws {
    /// One `DescribeSecurityGroups` page loop.
    async fn describe_groups(
        &self,
        ids: Option<Vec<String>>,
        filters: &[ec2::types::Filter],
    ) -> Result<Vec<SgInfo>, AwsError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let t = token.clone();
            let page = self
                .call("DescribeSecurityGroups", || {
                    self.ec2
                        .describe_security_groups()
                        .set_group_ids(ids.clone())
                        .set_filters((!filters.is_empty()).then(|| filters.to_vec()))
                        .set_next_token(t.clone())
                        .send()
                })
                .await?;
            out.extend(page.security_groups().iter().map(sg_info));
            match page.next_token() {
                Some(n) if !n.is_empty() && Some(n) != token.as_deref() => token = Some(n.into()),
                _ => return Ok(out),
            }
        }
    }
}

impl Aws {
    /// One subnet per zone in `vpc` for a load balancer (see [`subnets::resolve`]).
    pub async fn resolve_subnets(
        &self,
        choice: &SubnetChoice,
        scheme: Scheme,
        vpc: &str,
        cluster: &str,
    ) -> Result<Vec<String>, subnets::SubnetError> {
        subnets::resolve(self, choice, scheme, vpc, cluster).await
    }
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_a_cap() {
        for attempt in 0..10 {
            let d = backoff(attempt).as_millis() as u64;
            let cap = (200u64 << attempt.min(5)).min(5_000);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d}");
        }
    }

    #[tokio::test]
    async fn rate_limiter_spaces_calls_beyond_the_burst() {
        let limiter = RateLimiter::new(50.0, 2);
        let start = Instant::now();
        for _ in 0..7 {
            limiter.acquire().await;
        }
        // 2 from the burst, 5 more at 50/s: at least ~100 ms.
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
    }
}

/// The chart's IAM policy against the calls this client makes, so neither drifts.
#[cfg(test)]
mod iam_policy {
    use std::collections::BTreeSet;

    use serde_json::Value;

    /// `service:Operation` for every `call("Operation", …)` here: `ec2` when the closure
    /// uses the EC2 client, else `elasticloadbalancing`.
    fn called() -> BTreeSet<String> {
        let source = include_str!("client.rs");
        let source = &source[..source.find("#[cfg(test)]").unwrap_or(source.len())];
        let mut out = BTreeSet::new();
        for (at, _) in source.match_indices(".call(\"") {
            let rest = &source[at + 7..];
            let op = &rest[..rest.find('"').unwrap_or(0)];
            let body = &rest[..rest.find(".send()").unwrap_or(rest.len())];
            let service = if body.contains("self.ec2") {
                "ec2"
            } else {
                "elasticloadbalancing"
            };
            out.insert(format!("{service}:{op}"));
        }
        out
    }

    /// The client-side buckets take each call from its own service's table.
    #[test]
    fn every_call_draws_from_its_services_buckets() {
        for call in called() {
            let (service, op) = call.split_once(':').expect("service:Operation");
            let want = if service == "ec2" { "ec2" } else { "elbv2" };
            assert_eq!(super::super::limits::service_of(op), want, "{call}");
        }
    }

    fn policy() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/berth/iam-policy.json"
        );
        let text = std::fs::read_to_string(path).expect("charts/berth/iam-policy.json");
        serde_json::from_str(&text).expect("the policy is JSON")
    }

    fn actions(statement: &Value) -> Vec<String> {
        match &statement["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn statements() -> Vec<Value> {
        policy()["Statement"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn the_policy_allows_exactly_the_calls_the_client_makes() {
        let called = called();
        assert!(called.len() > 20, "{called:?}");
        assert!(called.contains("ec2:DescribeSubnets"));
        let mut allowed: BTreeSet<String> = statements().iter().flat_map(actions).collect();
        for implied in IMPLIED {
            allowed.remove(implied);
        }
        let missing: Vec<&String> = called.difference(&allowed).collect();
        let unused: Vec<&String> = allowed.difference(&called).collect();
        assert!(missing.is_empty(), "not in iam-policy.json: {missing:?}");
        assert!(unused.is_empty(), "never called: {unused:?}");
    }

    /// Permissions a call needs besides its own: tagging a security group at creation.
    const IMPLIED: [&str; 1] = ["ec2:CreateTags"];

    /// Rules on the targets' groups (not berth's, so not tagged with the identity): IAM
    /// cannot condition on a rule's description, which is how berth finds its own. The
    /// README says to narrow the resource to the nodes' groups.
    const BACKEND_RULES: [&str; 2] = [
        "ec2:AuthorizeSecurityGroupIngress",
        "ec2:RevokeSecurityGroupIngress",
    ];

    /// Listeners carry no tags berth could be matched by: their calls are limited to
    /// listeners of network load balancers instead.
    const UNTAGGED: [&str; 5] = [
        "elasticloadbalancing:AddListenerCertificates",
        "elasticloadbalancing:DeleteListener",
        "elasticloadbalancing:ModifyListener",
        "elasticloadbalancing:ModifyListenerAttributes",
        "elasticloadbalancing:RemoveListenerCertificates",
    ];

    #[test]
    fn every_change_is_conditioned_on_the_cluster_identity() {
        for s in statements() {
            let changes: Vec<String> = actions(&s)
                .into_iter()
                .filter(|a| !a.contains(":Describe"))
                .collect();
            if changes.is_empty() {
                continue;
            }
            let condition = s["Condition"].to_string();
            if s["Sid"] == "BackendRulesOnNodeGroups" {
                assert!(
                    changes.iter().all(|a| BACKEND_RULES.contains(&a.as_str())),
                    "{s}"
                );
                assert_eq!(s["Resource"], "arn:aws:ec2:*:*:security-group/*");
                continue;
            }
            if changes.iter().all(|a| UNTAGGED.contains(&a.as_str())) {
                assert_eq!(
                    s["Resource"],
                    "arn:aws:elasticloadbalancing:*:*:listener/net/*/*/*"
                );
                continue;
            }
            assert!(
                condition.contains(
                    "Tag/berth.dev/cluster-id\":\"${aws:PrincipalTag/berth.dev/cluster-id}"
                ),
                "{s}"
            );
            let on_existing = changes.iter().any(|a| {
                [
                    "Delete",
                    "Modify",
                    "Set",
                    "Register",
                    "Deregister",
                    "RemoveTags",
                ]
                .iter()
                .any(|verb| a.contains(&format!(":{verb}")))
            });
            if on_existing {
                assert!(
                    condition.contains("aws:ResourceTag/berth.dev/cluster-id\":\"${"),
                    "{s}"
                );
            }
        }
    }
}
