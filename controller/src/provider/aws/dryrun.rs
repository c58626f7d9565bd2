//! A client that reads AWS and writes nothing: every mutating call is recorded as a
//! [`Step`] and answered as if it had succeeded. Running the provider's own apply
//! ([`crate::provider::aws::deploy::ensure`]) through it yields what the controller would
//! create, modify or delete (`kubectl berth plan`), with no second copy of the logic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use crate::provider::aws::annotations::HealthCheck;
use crate::provider::aws::api::{
    AwsApi, AwsError, Candidate, LbInfo, ListenerInfo, SubnetQuery, TagsByArn, TargetState, TgInfo,
};
use crate::provider::aws::model::{
    DesiredListener, DesiredLoadBalancer, DesiredTargetGroup, IpAddressType, SubnetMapping, Target,
};
use crate::provider::aws::security_groups::{
    IngressRule, ManagedGroup, Rule, SgInfo, SgQuery, Source,
};

/// ARNs of resources that would be created start with this: AWS knows nothing of them.
const PLANNED: &str = "planned:";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Create,
    Modify,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Modify => "modify",
            Action::Delete => "delete",
        }
    }
}

/// One write the controller would make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// `load balancer NAME`, `listener 80 of NAME`, `target group NAME`, ...
    pub resource: String,
    /// The ELBv2 operation and what it changes.
    pub detail: String,
}

/// Reads through `inner`, records writes.
pub struct DryRun<'a, A> {
    inner: &'a A,
    steps: Mutex<Vec<Step>>,
    /// Names of the resources seen, by ARN, so steps name what they touch.
    names: Mutex<HashMap<String, String>>,
    /// Load balancers the plan deletes: no longer found by later reads, as in AWS.
    deleted: Mutex<BTreeSet<String>>,
}

type Res<T> = Result<T, AwsError>;

fn planned(arn: &str) -> bool {
    arn.starts_with(PLANNED)
}

impl<'a, A: AwsApi> DryRun<'a, A> {
    pub fn new(inner: &'a A) -> Self {
        Self {
            inner,
            steps: Mutex::default(),
            names: Mutex::default(),
            deleted: Mutex::default(),
        }
    }

    /// The writes recorded so far, in order.
    pub fn steps(&self) -> Vec<Step> {
        self.steps.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn learn(&self, arn: &str, name: String) {
        if let Ok(mut names) = self.names.lock() {
            names.insert(arn.to_string(), name);
        }
    }

    fn name(&self, arn: &str) -> String {
        self.names
            .lock()
            .ok()
            .and_then(|n| n.get(arn).cloned())
            .unwrap_or_else(|| arn.to_string())
    }

    fn record(&self, action: Action, resource: String, detail: String) {
        if let Ok(mut steps) = self.steps.lock() {
            steps.push(Step {
                action,
                resource,
                detail,
            });
        }
    }

    fn gone(&self, arn: &str) -> bool {
        self.deleted.lock().is_ok_and(|d| d.contains(arn))
    }

    fn lb_info(&self, lb: LbInfo) -> LbInfo {
        self.learn(&lb.arn, format!("load balancer {}", lb.name));
        lb
    }

    fn tg_info(&self, tg: TgInfo) -> TgInfo {
        self.learn(&tg.arn, format!("target group {}", tg.name));
        tg
    }
}

fn pairs(m: &BTreeMap<String, String>) -> String {
    let v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(", ")
}

fn targets(t: &[Target]) -> String {
    let v: Vec<String> = t.iter().map(|t| format!("{}:{}", t.id, t.port)).collect();
    v.join(", ")
}

/// A health check in words.
pub fn health_check(hc: &HealthCheck) -> String {
    format!(
        "{} port {:?} path {} interval {}s timeout {}s thresholds {}/{}",
        hc.protocol,
        hc.port,
        hc.path.as_deref().unwrap_or("-"),
        hc.interval_seconds,
        hc.timeout_seconds,
        hc.healthy_threshold,
        hc.unhealthy_threshold
    )
}

/// Static addresses in words (` with subnet-a eipalloc-1, …`), or nothing.
fn mappings(m: &[SubnetMapping]) -> String {
    if m.is_empty() {
        return String::new();
    }
    let each: Vec<String> = m
        .iter()
        .map(|m| {
            let addrs = [&m.allocation_id, &m.private_ipv4, &m.ipv6];
            let addrs: Vec<&str> = addrs.iter().filter_map(|a| a.as_deref()).collect();
            format!("{} {}", m.subnet, addrs.join(" "))
        })
        .collect();
    format!(" with {}", each.join(", "))
}

fn listener(l: &DesiredListener) -> String {
    let mut tls = l
        .certificate
        .as_deref()
        .map(|c| format!(" certificate {c}"))
        .unwrap_or_default();
    if let Some(alpn) = &l.alpn_policy {
        tls.push_str(&format!(" alpn {alpn}"));
    }
    format!("{} {}{tls} -> {}", l.protocol, l.port, l.target_group)
}

impl<A: AwsApi> AwsApi for DryRun<'_, A> {
    async fn find_load_balancer(&self, name: &str) -> Res<Option<LbInfo>> {
        let lb = self.inner.find_load_balancer(name).await?;
        Ok(lb.filter(|l| !self.gone(&l.arn)).map(|l| self.lb_info(l)))
    }

    async fn describe_load_balancers(&self, arns: &[String]) -> Res<Vec<LbInfo>> {
        let real: Vec<String> = arns.iter().filter(|a| !planned(a)).cloned().collect();
        if real.is_empty() {
            return Ok(Vec::new());
        }
        let lbs = self.inner.describe_load_balancers(&real).await?;
        Ok(lbs
            .into_iter()
            .filter(|l| !self.gone(&l.arn))
            .map(|l| self.lb_info(l))
            .collect())
    }

    async fn all_load_balancers(&self) -> Res<Vec<LbInfo>> {
        self.inner.all_load_balancers().await
    }

    async fn all_target_groups(&self) -> Res<Vec<TgInfo>> {
        self.inner.all_target_groups().await
    }

    async fn tags(&self, arns: &[String]) -> Res<TagsByArn> {
        let real: Vec<String> = arns.iter().filter(|a| !planned(a)).cloned().collect();
        if real.is_empty() {
            return Ok(TagsByArn::new());
        }
        self.inner.tags(&real).await
    }

    async fn add_tags(&self, arn: &str, tags: &BTreeMap<String, String>) -> Res<()> {
        if !planned(arn) {
            self.record(
                Action::Modify,
                self.name(arn),
                format!("AddTags {}", pairs(tags)),
            );
        }
        Ok(())
    }

    async fn remove_tags(&self, arn: &str, keys: &[String]) -> Res<()> {
        let detail = format!("RemoveTags {}", keys.join(", "));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn create_load_balancer(&self, d: &DesiredLoadBalancer) -> Res<LbInfo> {
        let detail = format!(
            "CreateLoadBalancer {} {} in subnets {}{}",
            d.scheme.as_str(),
            d.ip_address_type.as_str(),
            d.subnets.join(", "),
            mappings(&d.mappings)
        );
        self.record(Action::Create, format!("load balancer {}", d.name), detail);
        let lb = LbInfo {
            arn: format!("{PLANNED}loadbalancer/{}", d.name),
            name: d.name.clone(),
            dns_name: "(a new DNS name)".into(),
            state: "provisioning".into(),
            scheme: d.scheme.as_str().into(),
            ip_address_type: d.ip_address_type.as_str().into(),
            subnets: d.subnets.clone(),
            security_groups: d.security_groups.clone(),
            mappings: d.mappings.clone(),
        };
        Ok(self.lb_info(lb))
    }

    async fn set_subnets(&self, arn: &str, subnets: &[String], m: &[SubnetMapping]) -> Res<()> {
        let detail = format!("SetSubnets {}{}", subnets.join(", "), mappings(m));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn set_ip_address_type(&self, arn: &str, t: IpAddressType) -> Res<()> {
        let detail = format!("SetIpAddressType {}", t.as_str());
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn load_balancer_attributes(&self, arn: &str) -> Res<BTreeMap<String, String>> {
        if planned(arn) {
            return Ok(BTreeMap::new());
        }
        self.inner.load_balancer_attributes(arn).await
    }

    async fn modify_load_balancer_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Res<()> {
        let detail = format!("ModifyLoadBalancerAttributes {}", pairs(attrs));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn delete_load_balancer(&self, arn: &str) -> Res<()> {
        let detail = format!("DeleteLoadBalancer {arn}");
        self.record(Action::Delete, self.name(arn), detail);
        if let Ok(mut deleted) = self.deleted.lock() {
            deleted.insert(arn.to_string());
        }
        Ok(())
    }

    async fn listeners(&self, lb_arn: &str) -> Res<Vec<ListenerInfo>> {
        if planned(lb_arn) {
            return Ok(Vec::new());
        }
        let listeners = self.inner.listeners(lb_arn).await?;
        let lb = self.name(lb_arn);
        for l in &listeners {
            self.learn(&l.arn, format!("listener {} of {lb}", l.port));
        }
        Ok(listeners)
    }

    async fn create_listener(&self, lb_arn: &str, l: &DesiredListener, _tg: &str) -> Res<String> {
        let resource = format!("listener {} of {}", l.port, self.name(lb_arn));
        let detail = format!("CreateListener {}", listener(l));
        let arn = format!("{PLANNED}listener/{}", l.port);
        self.learn(&arn, resource.clone());
        self.record(Action::Create, resource, detail);
        Ok(arn)
    }

    async fn modify_listener(&self, arn: &str, l: &DesiredListener, _tg: &str) -> Res<()> {
        let detail = format!("ModifyListener {}", listener(l));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn listener_certificates(&self, arn: &str) -> Res<Vec<String>> {
        if planned(arn) {
            return Ok(Vec::new());
        }
        self.inner.listener_certificates(arn).await
    }

    async fn add_listener_certificates(&self, arn: &str, certs: &[String]) -> Res<()> {
        let detail = format!("AddListenerCertificates {}", certs.join(", "));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn remove_listener_certificates(&self, arn: &str, certs: &[String]) -> Res<()> {
        let detail = format!("RemoveListenerCertificates {}", certs.join(", "));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn listener_attributes(&self, arn: &str) -> Res<BTreeMap<String, String>> {
        if planned(arn) {
            return Ok(BTreeMap::new());
        }
        self.inner.listener_attributes(arn).await
    }

    async fn modify_listener_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Res<()> {
        let detail = format!("ModifyListenerAttributes {}", pairs(attrs));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn delete_listener(&self, arn: &str) -> Res<()> {
        let detail = format!("DeleteListener {arn}");
        self.record(Action::Delete, self.name(arn), detail);
        Ok(())
    }

    async fn target_groups_of(&self, lb_arn: &str) -> Res<Vec<TgInfo>> {
        if planned(lb_arn) {
            return Ok(Vec::new());
        }
        let tgs = self.inner.target_groups_of(lb_arn).await?;
        Ok(tgs.into_iter().map(|t| self.tg_info(t)).collect())
    }

    async fn find_target_group(&self, name: &str) -> Res<Option<TgInfo>> {
        let tg = self.inner.find_target_group(name).await?;
        Ok(tg.map(|t| self.tg_info(t)))
    }

    async fn create_target_group(&self, d: &DesiredTargetGroup) -> Res<TgInfo> {
        // AWS refuses a second target group of the name, and the apply adopts the first.
        if self.inner.find_target_group(&d.name).await?.is_some() {
            let message = format!("target group {} exists", d.name);
            return Err(AwsError::coded(
                "CreateTargetGroup",
                "DuplicateTargetGroupName",
                message,
            ));
        }
        let detail = format!(
            "CreateTargetGroup {} port {} health check {}",
            d.protocol,
            d.port,
            health_check(&d.health_check)
        );
        self.record(Action::Create, format!("target group {}", d.name), detail);
        let tg = TgInfo {
            arn: format!("{PLANNED}targetgroup/{}", d.name),
            name: d.name.clone(),
            protocol: d.protocol.clone(),
            port: d.port,
            target_type: match d.target_type {
                crate::provider::aws::model::TargetType::Instance => "instance".into(),
                crate::provider::aws::model::TargetType::Ip => "ip".into(),
            },
            health_check: d.health_check.clone(),
            load_balancer_arns: Vec::new(),
        };
        Ok(self.tg_info(tg))
    }

    async fn modify_health_check(&self, arn: &str, hc: &HealthCheck) -> Res<()> {
        let detail = format!("ModifyTargetGroup health check {}", health_check(hc));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn target_group_attributes(&self, arn: &str) -> Res<BTreeMap<String, String>> {
        if planned(arn) {
            return Ok(BTreeMap::new());
        }
        self.inner.target_group_attributes(arn).await
    }

    async fn modify_target_group_attributes(
        &self,
        arn: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Res<()> {
        let detail = format!("ModifyTargetGroupAttributes {}", pairs(attrs));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn delete_target_group(&self, arn: &str) -> Res<()> {
        let detail = format!("DeleteTargetGroup {arn}");
        self.record(Action::Delete, self.name(arn), detail);
        Ok(())
    }

    async fn target_health(&self, tg_arn: &str) -> Res<Vec<TargetState>> {
        if planned(tg_arn) {
            return Ok(Vec::new());
        }
        self.inner.target_health(tg_arn).await
    }

    async fn register_targets(&self, tg_arn: &str, t: &[Target]) -> Res<()> {
        let detail = format!("RegisterTargets {}", targets(t));
        self.record(Action::Modify, self.name(tg_arn), detail);
        Ok(())
    }

    async fn deregister_targets(&self, tg_arn: &str, t: &[Target]) -> Res<()> {
        let detail = format!("DeregisterTargets {}", targets(t));
        self.record(Action::Modify, self.name(tg_arn), detail);
        Ok(())
    }

    async fn describe_subnets(&self, query: &SubnetQuery) -> Res<Vec<Candidate>> {
        self.inner.describe_subnets(query).await
    }

    async fn instance_vpcs(&self, ids: &[String]) -> Res<BTreeSet<String>> {
        self.inner.instance_vpcs(ids).await
    }

    async fn set_security_groups(&self, arn: &str, groups: &[String]) -> Res<()> {
        let detail = format!("SetSecurityGroups {}", groups.join(", "));
        self.record(Action::Modify, self.name(arn), detail);
        Ok(())
    }

    async fn security_groups(&self, query: &SgQuery) -> Res<Vec<SgInfo>> {
        let mut query = query.clone();
        if let Some(ids) = query.ids.as_mut() {
            ids.retain(|i| !planned(i));
            if ids.is_empty() {
                return Ok(Vec::new());
            }
        }
        let found = self.inner.security_groups(&query).await?;
        for g in &found {
            self.learn(&g.id, format!("security group {} ({})", g.name, g.id));
        }
        Ok(found)
    }

    async fn create_security_group(&self, g: &ManagedGroup) -> Res<SgInfo> {
        let detail = format!("CreateSecurityGroup in {}", g.vpc_id);
        self.record(Action::Create, format!("security group {}", g.name), detail);
        let id = format!("{PLANNED}securitygroup/{}", g.name);
        self.learn(&id, format!("security group {}", g.name));
        Ok(SgInfo {
            id,
            name: g.name.clone(),
            vpc: g.vpc_id.clone(),
            tags: g.tags.clone(),
            ingress: Vec::new(),
        })
    }

    async fn authorize_ingress(&self, group: &str, rules: &[IngressRule]) -> Res<()> {
        let list: Vec<Rule> = rules.iter().map(|r| r.rule.clone()).collect();
        let detail = format!("AuthorizeSecurityGroupIngress {}", rule_list(&list));
        self.record(Action::Modify, self.name(group), detail);
        Ok(())
    }

    async fn revoke_ingress(&self, group: &str, rules: &[IngressRule]) -> Res<()> {
        let list: Vec<Rule> = rules.iter().map(|r| r.rule.clone()).collect();
        let detail = format!("RevokeSecurityGroupIngress {}", rule_list(&list));
        self.record(Action::Modify, self.name(group), detail);
        Ok(())
    }

    async fn delete_security_group(&self, id: &str) -> Res<()> {
        self.record(
            Action::Delete,
            self.name(id),
            format!("DeleteSecurityGroup {id}"),
        );
        Ok(())
    }

    async fn instance_groups(&self, ids: &[String]) -> Res<BTreeMap<String, Vec<String>>> {
        self.inner.instance_groups(ids).await
    }

    async fn vpc_cidrs(&self, vpc: &str) -> Res<Vec<String>> {
        self.inner.vpc_cidrs(vpc).await
    }
}

/// Rules in words: `tcp 80 from 10.0.0.0/8`.
fn rule_list(rules: &[Rule]) -> String {
    let v: Vec<String> = rules
        .iter()
        .map(|r| {
            let from = match &r.source {
                Source::Cidr(c) | Source::PrefixList(c) | Source::Group(c) => c,
            };
            format!("{} {} from {}", r.protocol, r.from_port, from)
        })
        .collect();
    v.join(", ")
}
