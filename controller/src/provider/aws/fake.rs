//! An in-memory ELBv2/EC2 for unit tests. It keeps the rules deploy and the sweep depend
//! on: unique names, a load balancer with deletion protection cannot be deleted, a target
//! group a listener forwards to cannot be deleted, deleting a load balancer deletes its
//! listeners. Every mutating call is logged so tests can check order and idempotence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use crate::provider::aws::annotations::HealthCheck;
use crate::provider::aws::api::{
    AwsApi, AwsError, Candidate, LbInfo, ListenerInfo, SubnetFilter, SubnetQuery, TagsByArn,
    TargetState, TgInfo,
};
use crate::provider::aws::model::{
    DesiredListener, DesiredLoadBalancer, DesiredTargetGroup, IpAddressType, SubnetMapping, Target,
    TargetType,
};
use crate::provider::aws::security_groups::{IngressRule, ManagedGroup, SgInfo, SgQuery, Source};

type Tags = BTreeMap<String, String>;

#[derive(Clone, Debug)]
pub struct FakeLb {
    pub info: LbInfo,
    pub attributes: Tags,
    pub tags: Tags,
}

#[derive(Clone, Debug)]
pub struct FakeTg {
    pub info: TgInfo,
    pub attributes: Tags,
    pub tags: Tags,
    pub targets: BTreeSet<Target>,
}

#[derive(Clone, Debug)]
pub struct FakeListener {
    pub lb_arn: String,
    pub info: ListenerInfo,
    /// Certificates besides the default one.
    pub extra_certificates: Vec<String>,
    pub attributes: Tags,
}

#[derive(Clone, Debug)]
struct FakeSubnet {
    id: String,
    vpc: String,
    zone: String,
    tags: Tags,
}

#[derive(Default)]
pub struct State {
    next: u64,
    pub lbs: BTreeMap<String, FakeLb>,
    pub tgs: BTreeMap<String, FakeTg>,
    pub listeners: BTreeMap<String, FakeListener>,
    subnets: Vec<FakeSubnet>,
    /// Instance ID → its VPC.
    instances: BTreeMap<String, String>,
    /// Instance ID → its security groups.
    pub instance_groups: BTreeMap<String, Vec<String>>,
    /// Security groups by ID.
    pub sgs: BTreeMap<String, SgInfo>,
    /// Mutating calls made, as `Operation target`.
    pub calls: Vec<String>,
    /// Calls (`Operation target`) to fail, with the error code.
    failures: BTreeMap<String, String>,
    /// Requests made by operation, reads included.
    operations: BTreeMap<&'static str, usize>,
}

impl State {
    fn arn(&mut self, kind: &str, name: &str) -> String {
        self.next += 1;
        format!("arn:fake:{kind}/{name}/{}", self.next)
    }

    fn tg_info(&self, arn: &str) -> Option<TgInfo> {
        let tg = self.tgs.get(arn)?;
        let mut info = tg.info.clone();
        info.load_balancer_arns = self
            .listeners
            .values()
            .filter(|l| l.info.target_group_arn.as_deref() == Some(arn))
            .map(|l| l.lb_arn.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Some(info)
    }

    fn lb(&mut self, op: &'static str, arn: &str) -> Result<&mut FakeLb, AwsError> {
        self.lbs
            .get_mut(arn)
            .ok_or_else(|| AwsError::coded(op, "LoadBalancerNotFound", arn.to_string()))
    }

    fn tg(&mut self, op: &'static str, arn: &str) -> Result<&mut FakeTg, AwsError> {
        self.tgs
            .get_mut(arn)
            .ok_or_else(|| AwsError::coded(op, "TargetGroupNotFound", arn.to_string()))
    }

    fn listener(
        &self,
        lb_arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
        arn: String,
    ) -> FakeListener {
        FakeListener {
            lb_arn: lb_arn.to_string(),
            info: ListenerInfo {
                arn,
                port: l.port,
                protocol: l.protocol.clone(),
                target_group_arn: Some(tg_arn.to_string()),
                certificate: l.certificate.clone(),
                ssl_policy: l.ssl_policy.clone(),
                alpn_policy: l.alpn_policy.clone(),
            },
            extra_certificates: Vec::new(),
            attributes: Tags::new(),
        }
    }
}

/// The fake AWS account. Tests read and shape it through [`FakeAws::state`].
#[derive(Default)]
pub struct FakeAws {
    state: Mutex<State>,
}

impl FakeAws {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a mutating call, failing it when a test asked for that with [`FakeAws::fail`].
    fn log(&self, op: &'static str, target: &str) -> Result<MutexGuard<'_, State>, AwsError> {
        let mut s = self.state();
        let call = format!("{op} {target}");
        if let Some(code) = s.failures.get(&call).cloned() {
            return Err(AwsError::coded(op, &code, "injected failure"));
        }
        s.calls.push(call);
        *s.operations.entry(op).or_default() += 1;
        Ok(s)
    }

    /// Counts `n` requests of a read (a batched read of nothing makes none).
    fn read(&self, op: &'static str, n: usize) -> MutexGuard<'_, State> {
        let mut s = self.state();
        if n > 0 {
            *s.operations.entry(op).or_default() += n;
        }
        s
    }

    /// Forgets the requests made so far, answering how many of each operation there were,
    /// reads included, as the SDK client would make them.
    pub fn take_operations(&self) -> BTreeMap<&'static str, usize> {
        std::mem::take(&mut self.state().operations)
    }

    /// Makes the call `op` on `target` (as logged) fail with `code` from now on.
    pub fn fail(&self, op: &str, target: &str, code: &str) {
        self.state()
            .failures
            .insert(format!("{op} {target}"), code.to_string());
    }

    pub fn add_subnet(&self, id: &str, vpc: &str, zone: &str, tags: &[(&str, &str)]) {
        self.state().subnets.push(FakeSubnet {
            id: id.into(),
            vpc: vpc.into(),
            zone: zone.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
    }

    pub fn add_instance(&self, id: &str, vpc: &str) {
        self.state().instances.insert(id.into(), vpc.into());
    }

    /// A security group not made by berth (a node's), with these instances in it.
    pub fn add_group(&self, id: &str, vpc: &str, tags: &[(&str, &str)], instances: &[&str]) {
        let mut s = self.state();
        s.sgs.insert(
            id.into(),
            SgInfo {
                id: id.into(),
                name: id.into(),
                vpc: vpc.into(),
                tags: tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ingress: Vec::new(),
            },
        );
        for i in instances {
            s.instance_groups
                .entry(i.to_string())
                .or_default()
                .push(id.into());
        }
    }

    /// Forgets the mutating calls made so far.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state().calls)
    }
}

fn subnet_matches(s: &FakeSubnet, q: &SubnetQuery) -> bool {
    q.ids.as_ref().is_none_or(|ids| ids.contains(&s.id))
        && q.filters.iter().all(|f| match f {
            SubnetFilter::Vpc(v) => &s.vpc == v,
            SubnetFilter::TagKey(k) => s.tags.contains_key(k),
            SubnetFilter::Tag(k, values) => s.tags.get(k).is_some_and(|v| values.contains(v)),
        })
}

impl AwsApi for FakeAws {
    async fn find_load_balancer(&self, name: &str) -> Result<Option<LbInfo>, AwsError> {
        let s = self.read("DescribeLoadBalancers", 1);
        Ok(s.lbs
            .values()
            .find(|l| l.info.name == name)
            .map(|l| l.info.clone()))
    }

    async fn describe_load_balancers(&self, arns: &[String]) -> Result<Vec<LbInfo>, AwsError> {
        let s = self.read("DescribeLoadBalancers", arns.len().div_ceil(20));
        Ok(arns
            .iter()
            .filter_map(|a| s.lbs.get(a).map(|l| l.info.clone()))
            .collect())
    }

    async fn all_load_balancers(&self) -> Result<Vec<LbInfo>, AwsError> {
        let s = self.read("DescribeLoadBalancers", 1);
        Ok(s.lbs.values().map(|l| l.info.clone()).collect())
    }

    async fn all_target_groups(&self) -> Result<Vec<TgInfo>, AwsError> {
        let s = self.read("DescribeTargetGroups", 1);
        Ok(s.tgs.keys().filter_map(|a| s.tg_info(a)).collect())
    }

    async fn tags(&self, arns: &[String]) -> Result<TagsByArn, AwsError> {
        let s = self.read("DescribeTags", arns.len().div_ceil(20));
        Ok(arns
            .iter()
            .filter_map(|a| {
                let tags = s
                    .lbs
                    .get(a)
                    .map(|l| &l.tags)
                    .or_else(|| s.tgs.get(a).map(|t| &t.tags))?;
                Some((a.clone(), tags.clone()))
            })
            .collect())
    }

    async fn add_tags(&self, arn: &str, tags: &Tags) -> Result<(), AwsError> {
        let mut s = self.log("AddTags", arn)?;
        if let Some(l) = s.lbs.get_mut(arn) {
            l.tags.extend(tags.clone());
        } else {
            s.tg("AddTags", arn)?.tags.extend(tags.clone());
        }
        Ok(())
    }

    async fn remove_tags(&self, arn: &str, keys: &[String]) -> Result<(), AwsError> {
        let mut s = self.log("RemoveTags", arn)?;
        let tags = match s.lbs.get_mut(arn) {
            Some(l) => &mut l.tags,
            None => &mut s.tg("RemoveTags", arn)?.tags,
        };
        for k in keys {
            tags.remove(k);
        }
        Ok(())
    }

    async fn create_load_balancer(&self, d: &DesiredLoadBalancer) -> Result<LbInfo, AwsError> {
        let mut s = self.log("CreateLoadBalancer", &d.name)?;
        if s.lbs.values().any(|l| l.info.name == d.name) {
            return Err(AwsError::coded(
                "CreateLoadBalancer",
                "DuplicateLoadBalancerName",
                d.name.clone(),
            ));
        }
        let arn = s.arn("loadbalancer", &d.name);
        let info = LbInfo {
            arn: arn.clone(),
            name: d.name.clone(),
            dns_name: format!("{}.elb.fake", d.name),
            state: "active".into(),
            scheme: d.scheme.as_str().into(),
            ip_address_type: d.ip_address_type.as_str().into(),
            subnets: d.subnets.clone(),
            security_groups: d.security_groups.clone(),
            mappings: d.mappings.clone(),
        };
        let attributes = Tags::from([("deletion_protection.enabled".into(), "false".into())]);
        let lb = FakeLb {
            info: info.clone(),
            attributes,
            tags: d.tags.clone(),
        };
        s.lbs.insert(arn, lb);
        Ok(info)
    }

    async fn set_subnets(
        &self,
        arn: &str,
        subnets: &[String],
        mappings: &[SubnetMapping],
    ) -> Result<(), AwsError> {
        let mut s = self.log("SetSubnets", arn)?;
        let lb = s.lb("SetSubnets", arn)?;
        lb.info.subnets = subnets.to_vec();
        lb.info.mappings = mappings.to_vec();
        Ok(())
    }

    async fn set_ip_address_type(&self, arn: &str, t: IpAddressType) -> Result<(), AwsError> {
        let mut s = self.log("SetIpAddressType", arn)?;
        s.lb("SetIpAddressType", arn)?.info.ip_address_type = t.as_str().into();
        Ok(())
    }

    async fn load_balancer_attributes(&self, arn: &str) -> Result<Tags, AwsError> {
        let mut s = self.read("DescribeLoadBalancerAttributes", 1);
        Ok(s.lb("DescribeLoadBalancerAttributes", arn)?
            .attributes
            .clone())
    }

    async fn modify_load_balancer_attributes(&self, arn: &str, a: &Tags) -> Result<(), AwsError> {
        let mut s = self.log("ModifyLoadBalancerAttributes", arn)?;
        s.lb("ModifyLoadBalancerAttributes", arn)?
            .attributes
            .extend(a.clone());
        Ok(())
    }

    async fn delete_load_balancer(&self, arn: &str) -> Result<(), AwsError> {
        let mut s = self.log("DeleteLoadBalancer", arn)?;
        let Some(lb) = s.lbs.get(arn) else {
            return Ok(());
        };
        if lb
            .attributes
            .get("deletion_protection.enabled")
            .map(String::as_str)
            == Some("true")
        {
            return Err(AwsError::coded(
                "DeleteLoadBalancer",
                "OperationNotPermitted",
                "deletion protection is enabled",
            ));
        }
        s.lbs.remove(arn);
        s.listeners.retain(|_, l| l.lb_arn != arn);
        Ok(())
    }

    async fn listeners(&self, lb_arn: &str) -> Result<Vec<ListenerInfo>, AwsError> {
        let mut s = self.read("DescribeListeners", 1);
        s.lb("DescribeListeners", lb_arn)?;
        Ok(s.listeners
            .values()
            .filter(|l| l.lb_arn == lb_arn)
            .map(|l| l.info.clone())
            .collect())
    }

    async fn create_listener(
        &self,
        lb_arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
    ) -> Result<String, AwsError> {
        let mut s = self.log("CreateListener", &format!("{lb_arn}:{}", l.port))?;
        s.lb("CreateListener", lb_arn)?;
        s.tg("CreateListener", tg_arn)?;
        let taken = s
            .listeners
            .values()
            .any(|x| x.lb_arn == lb_arn && x.info.port == l.port);
        if taken {
            return Err(AwsError::coded(
                "CreateListener",
                "DuplicateListener",
                lb_arn.to_string(),
            ));
        }
        let arn = s.arn("listener", &l.port.to_string());
        let listener = s.listener(lb_arn, l, tg_arn, arn.clone());
        s.listeners.insert(arn.clone(), listener);
        Ok(arn)
    }

    async fn modify_listener(
        &self,
        arn: &str,
        l: &DesiredListener,
        tg_arn: &str,
    ) -> Result<(), AwsError> {
        let mut s = self.log("ModifyListener", arn)?;
        s.tg("ModifyListener", tg_arn)?;
        let Some(lb_arn) = s.listeners.get(arn).map(|x| x.lb_arn.clone()) else {
            return Err(AwsError::coded(
                "ModifyListener",
                "ListenerNotFound",
                arn.to_string(),
            ));
        };
        let mut listener = s.listener(&lb_arn, l, tg_arn, arn.to_string());
        if let Some(old) = s.listeners.get(arn) {
            // ModifyListener leaves the certificate list and the attributes alone.
            listener.extra_certificates = old.extra_certificates.clone();
            listener.attributes = old.attributes.clone();
        }
        s.listeners.insert(arn.to_string(), listener);
        Ok(())
    }

    async fn listener_certificates(&self, arn: &str) -> Result<Vec<String>, AwsError> {
        let s = self.state();
        Ok(s.listeners
            .get(arn)
            .map(|l| l.extra_certificates.clone())
            .unwrap_or_default())
    }

    async fn add_listener_certificates(
        &self,
        arn: &str,
        certificates: &[String],
    ) -> Result<(), AwsError> {
        let mut s = self.log("AddListenerCertificates", arn)?;
        if let Some(l) = s.listeners.get_mut(arn) {
            l.extra_certificates.extend(certificates.iter().cloned());
        }
        Ok(())
    }

    async fn remove_listener_certificates(
        &self,
        arn: &str,
        certificates: &[String],
    ) -> Result<(), AwsError> {
        let mut s = self.log("RemoveListenerCertificates", arn)?;
        if let Some(l) = s.listeners.get_mut(arn) {
            l.extra_certificates.retain(|c| !certificates.contains(c));
        }
        Ok(())
    }

    async fn listener_attributes(&self, arn: &str) -> Result<Tags, AwsError> {
        let s = self.state();
        Ok(s.listeners
            .get(arn)
            .map(|l| l.attributes.clone())
            .unwrap_or_default())
    }

    async fn modify_listener_attributes(&self, arn: &str, attrs: &Tags) -> Result<(), AwsError> {
        let mut s = self.log("ModifyListenerAttributes", arn)?;
        if let Some(l) = s.listeners.get_mut(arn) {
            l.attributes.extend(attrs.clone());
        }
        Ok(())
    }

    async fn delete_listener(&self, arn: &str) -> Result<(), AwsError> {
        self.log("DeleteListener", arn)?.listeners.remove(arn);
        Ok(())
    }

    async fn target_groups_of(&self, lb_arn: &str) -> Result<Vec<TgInfo>, AwsError> {
        let s = self.read("DescribeTargetGroups", 1);
        let arns: BTreeSet<&String> = s
            .listeners
            .values()
            .filter(|l| l.lb_arn == lb_arn)
            .filter_map(|l| l.info.target_group_arn.as_ref())
            .collect();
        Ok(arns.into_iter().filter_map(|a| s.tg_info(a)).collect())
    }

    async fn find_target_group(&self, name: &str) -> Result<Option<TgInfo>, AwsError> {
        let s = self.read("DescribeTargetGroups", 1);
        let arn = s
            .tgs
            .values()
            .find(|t| t.info.name == name)
            .map(|t| &t.info.arn);
        Ok(arn.and_then(|a| s.tg_info(a)))
    }

    async fn create_target_group(&self, d: &DesiredTargetGroup) -> Result<TgInfo, AwsError> {
        let mut s = self.log("CreateTargetGroup", &d.name)?;
        if s.tgs.values().any(|t| t.info.name == d.name) {
            return Err(AwsError::coded(
                "CreateTargetGroup",
                "DuplicateTargetGroupName",
                d.name.clone(),
            ));
        }
        let arn = s.arn("targetgroup", &d.name);
        let info = TgInfo {
            arn: arn.clone(),
            name: d.name.clone(),
            protocol: d.protocol.clone(),
            port: d.port,
            target_type: match d.target_type {
                TargetType::Instance => "instance".into(),
                TargetType::Ip => "ip".into(),
            },
            health_check: d.health_check.clone(),
            load_balancer_arns: Vec::new(),
        };
        let tg = FakeTg {
            info: info.clone(),
            attributes: Tags::new(),
            tags: d.tags.clone(),
            targets: BTreeSet::new(),
        };
        s.tgs.insert(arn, tg);
        Ok(info)
    }

    async fn modify_health_check(&self, arn: &str, hc: &HealthCheck) -> Result<(), AwsError> {
        let mut s = self.log("ModifyTargetGroup", arn)?;
        s.tg("ModifyTargetGroup", arn)?.info.health_check = hc.clone();
        Ok(())
    }

    async fn target_group_attributes(&self, arn: &str) -> Result<Tags, AwsError> {
        let mut s = self.read("DescribeTargetGroupAttributes", 1);
        Ok(s.tg("DescribeTargetGroupAttributes", arn)?
            .attributes
            .clone())
    }

    async fn modify_target_group_attributes(&self, arn: &str, a: &Tags) -> Result<(), AwsError> {
        let mut s = self.log("ModifyTargetGroupAttributes", arn)?;
        s.tg("ModifyTargetGroupAttributes", arn)?
            .attributes
            .extend(a.clone());
        Ok(())
    }

    async fn delete_target_group(&self, arn: &str) -> Result<(), AwsError> {
        let mut s = self.log("DeleteTargetGroup", arn)?;
        let in_use = s
            .listeners
            .values()
            .any(|l| l.info.target_group_arn.as_deref() == Some(arn));
        if in_use {
            return Err(AwsError::coded(
                "DeleteTargetGroup",
                "ResourceInUse",
                arn.to_string(),
            ));
        }
        s.tgs.remove(arn);
        Ok(())
    }

    async fn target_health(&self, tg_arn: &str) -> Result<Vec<TargetState>, AwsError> {
        let mut s = self.read("DescribeTargetHealth", 1);
        let tg = s.tg("DescribeTargetHealth", tg_arn)?;
        Ok(tg
            .targets
            .iter()
            .map(|t| TargetState {
                target: t.clone(),
                state: "healthy".into(),
            })
            .collect())
    }

    async fn register_targets(&self, tg_arn: &str, targets: &[Target]) -> Result<(), AwsError> {
        let mut s = self.log("RegisterTargets", tg_arn)?;
        s.tg("RegisterTargets", tg_arn)?
            .targets
            .extend(targets.iter().cloned());
        Ok(())
    }

    async fn deregister_targets(&self, tg_arn: &str, targets: &[Target]) -> Result<(), AwsError> {
        let mut s = self.log("DeregisterTargets", tg_arn)?;
        let tg = s.tg("DeregisterTargets", tg_arn)?;
        for t in targets {
            tg.targets.remove(t);
        }
        Ok(())
    }

    async fn describe_subnets(&self, query: &SubnetQuery) -> Result<Vec<Candidate>, AwsError> {
        let s = self.read("DescribeSubnets", 1);
        Ok(s.subnets
            .iter()
            .filter(|sub| subnet_matches(sub, query))
            .map(|sub| Candidate {
                id: sub.id.clone(),
                vpc: sub.vpc.clone(),
                zone: sub.zone.clone(),
                cluster_tags: sub
                    .tags
                    .keys()
                    .filter(|k| k.starts_with("kubernetes.io/cluster/"))
                    .cloned()
                    .collect(),
                cidrs: Vec::new(),
            })
            .collect())
    }

    async fn instance_vpcs(&self, ids: &[String]) -> Result<BTreeSet<String>, AwsError> {
        let s = self.read("DescribeInstances", 1);
        Ok(ids
            .iter()
            .filter_map(|id| s.instances.get(id).cloned())
            .collect())
    }

    async fn set_security_groups(&self, arn: &str, groups: &[String]) -> Result<(), AwsError> {
        let mut s = self.log("SetSecurityGroups", arn)?;
        let lb = s.lb("SetSecurityGroups", arn)?;
        // AWS: only an NLB made with security groups can change them, and keeps one.
        if lb.info.security_groups.is_empty() || groups.is_empty() {
            return Err(AwsError::coded(
                "SetSecurityGroups",
                "InvalidConfigurationRequest",
                "an NLB created without security groups cannot get any, nor lose its last",
            ));
        }
        lb.info.security_groups = groups.to_vec();
        Ok(())
    }

    async fn security_groups(&self, query: &SgQuery) -> Result<Vec<SgInfo>, AwsError> {
        let s = self.read("DescribeSecurityGroups", 1);
        let matches = |g: &SgInfo| {
            query.ids.as_ref().is_none_or(|ids| ids.contains(&g.id))
                && query.filters.iter().all(|(name, values)| {
                    if let Some(key) = name.strip_prefix("tag:") {
                        return g.tags.get(key).is_some_and(|v| values.contains(v));
                    }
                    match name.as_str() {
                        "ip-permission.group-id" => g.ingress.iter().any(
                            |r| matches!(&r.rule.source, Source::Group(id) if values.contains(id)),
                        ),
                        "vpc-id" => values.contains(&g.vpc),
                        _ => false,
                    }
                })
        };
        Ok(s.sgs.values().filter(|g| matches(g)).cloned().collect())
    }

    async fn create_security_group(&self, g: &ManagedGroup) -> Result<SgInfo, AwsError> {
        let mut s = self.log("CreateSecurityGroup", &g.name)?;
        if s.sgs
            .values()
            .any(|x| x.name == g.name && x.vpc == g.vpc_id)
        {
            return Err(AwsError::coded(
                "CreateSecurityGroup",
                "InvalidGroup.Duplicate",
                g.name.clone(),
            ));
        }
        s.next += 1;
        let info = SgInfo {
            id: format!("sg-fake{}", s.next),
            name: g.name.clone(),
            vpc: g.vpc_id.clone(),
            tags: g.tags.clone(),
            ingress: Vec::new(),
        };
        s.sgs.insert(info.id.clone(), info.clone());
        Ok(info)
    }

    async fn authorize_ingress(&self, group: &str, rules: &[IngressRule]) -> Result<(), AwsError> {
        let mut s = self.log("AuthorizeSecurityGroupIngress", group)?;
        let Some(g) = s.sgs.get_mut(group) else {
            return Err(AwsError::coded(
                "AuthorizeSecurityGroupIngress",
                "InvalidGroup.NotFound",
                group.to_string(),
            ));
        };
        if rules
            .iter()
            .any(|r| g.ingress.iter().any(|have| have.rule == r.rule))
        {
            return Err(AwsError::coded(
                "AuthorizeSecurityGroupIngress",
                "InvalidPermission.Duplicate",
                group.to_string(),
            ));
        }
        g.ingress.extend(rules.iter().cloned());
        Ok(())
    }

    async fn revoke_ingress(&self, group: &str, rules: &[IngressRule]) -> Result<(), AwsError> {
        let mut s = self.log("RevokeSecurityGroupIngress", group)?;
        if let Some(g) = s.sgs.get_mut(group) {
            g.ingress
                .retain(|r| !rules.iter().any(|x| x.rule == r.rule));
        }
        Ok(())
    }

    async fn delete_security_group(&self, id: &str) -> Result<(), AwsError> {
        let mut s = self.log("DeleteSecurityGroup", id)?;
        let attached = s
            .lbs
            .values()
            .any(|l| l.info.security_groups.iter().any(|g| g == id));
        let referred = s.sgs.values().any(|g| {
            g.ingress
                .iter()
                .any(|r| r.rule.source == Source::Group(id.into()))
        });
        if attached || referred {
            return Err(AwsError::coded(
                "DeleteSecurityGroup",
                "DependencyViolation",
                id.to_string(),
            ));
        }
        s.sgs.remove(id);
        Ok(())
    }

    async fn instance_groups(
        &self,
        ids: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, AwsError> {
        let s = self.read("DescribeInstances", ids.len().div_ceil(200));
        Ok(ids
            .iter()
            .filter(|id| s.instances.contains_key(*id))
            .map(|id| {
                (
                    id.clone(),
                    s.instance_groups.get(id).cloned().unwrap_or_default(),
                )
            })
            .collect())
    }

    async fn vpc_cidrs(&self, _vpc: &str) -> Result<Vec<String>, AwsError> {
        drop(self.read("DescribeVpcs", 1));
        Ok(vec!["10.0.0.0/16".into()])
    }
}
