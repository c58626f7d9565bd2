//! Security groups of a Service's NLB, as the AWS Load Balancer Controller (v2.6+) makes
//! them: a managed frontend group per NLB whose inbound rules are the listener ports from
//! the source ranges (`spec.loadBalancerSourceRanges`, the `load-balancer-source-ranges`
//! annotation, prefix lists), and backend rules on the targets' groups letting traffic and
//! health checks in from the frontend group.
//!
//! The frontend group is berth's (tagged like its other resources): every rule in it is
//! berth's. The backend groups are not: berth's rules there carry a description naming
//! this cluster's identity and the Service's UID ([`marker`]), and only such rules are
//! ever revoked. The pure parts ([`build`], [`rule_changes`], [`backend_group`]) decide;
//! the rest reads and writes through [`AwsApi`].

use std::collections::{BTreeMap, BTreeSet};

use berth_crds::tags;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::provider::aws::api::{AwsApi, AwsError, LbInfo};
use crate::provider::aws::deploy::ApplyError;
use crate::provider::aws::identity::Owner;
use crate::provider::aws::model::{
    DesiredListener, DesiredTargetGroup, IpAddressType, Scheme, TargetType, instance_id,
};
use crate::provider::aws::settings::{FrontendChoice, HealthPort, Settings};

type Tags = BTreeMap<String, String>;

/// The value of [`tags::RESOURCE`] on a managed frontend group.
pub const RESOURCE: &str = "securitygroup";
/// Event and condition-message reason: source ranges the NLB cannot enforce.
pub const SOURCE_RANGES_NOT_ENFORCED: &str = "SourceRangesNotEnforced";
/// Event reason: a target's security group cannot be chosen.
pub const BACKEND_GROUP_UNKNOWN: &str = "BackendSecurityGroupUnknown";
/// AWS's limit on a rule description.
const MAX_DESCRIPTION: usize = 255;

/// Where a rule lets traffic in from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// An IPv4 or IPv6 CIDR.
    Cidr(String),
    PrefixList(String),
    /// Another security group (`sg-…`).
    Group(String),
}

/// One inbound permission: protocol (`tcp`, `udp`, `-1`, ...), a port range, a source.
/// AWS identifies a rule by exactly these; its description is an attribute.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub protocol: String,
    pub from_port: i32,
    pub to_port: i32,
    pub source: Source,
}

impl Rule {
    fn port(protocol: &str, port: i32, source: Source) -> Self {
        Self {
            protocol: protocol.to_string(),
            from_port: port,
            to_port: port,
            source,
        }
    }
}

/// A rule as a group holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressRule {
    pub rule: Rule,
    pub description: Option<String>,
}

/// A security group as [`AwsApi::security_groups`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SgInfo {
    pub id: String,
    pub name: String,
    pub vpc: String,
    pub tags: Tags,
    pub ingress: Vec<IngressRule>,
}

/// A `DescribeSecurityGroups` request: IDs and/or EC2 filters (name, values).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgQuery {
    pub ids: Option<Vec<String>>,
    pub filters: Vec<(String, Vec<String>)>,
}

/// The managed frontend group the Service's NLB should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedGroup {
    pub name: String,
    pub description: String,
    pub vpc_id: String,
    pub tags: Tags,
    pub rules: BTreeSet<Rule>,
    /// The Service restricts who reaches it (source ranges or prefix lists): an NLB made
    /// without security groups (they cannot be added later) must then be replaced.
    pub restricted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frontend {
    Managed(ManagedGroup),
    /// The user's groups (annotation or class): berth manages none of their rules.
    Given(Vec<String>),
    /// `disable-nlb-sg`: the NLB has no security group.
    Disabled,
}

/// Rules on the targets' groups letting the frontend groups in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The instances whose groups get the rules (the targets, or for `ip` targets the
    /// nodes running the pods).
    pub instances: BTreeSet<String>,
    /// (protocol, port): traffic ports and health-check ports.
    pub ports: BTreeSet<(String, i32)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Security {
    pub frontend: Frontend,
    /// `None`: berth does not manage backend rules (and removes those it made).
    pub backend: Option<Backend>,
    /// Every node's instance: their groups are where berth's backend rules may be.
    pub nodes: BTreeSet<String>,
    /// The groups of `nodes`, found by the provider ([`node_groups`]; cached, as the
    /// nodes' VPC is, so a new Service does not describe the instances again).
    pub node_groups: NodeGroups,
}

/// What is known of the rules on the nodes' groups when the backend rules are synced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeRules {
    /// To be described.
    Unknown,
    /// The only frontend group was created in this apply: no rule refers to it yet.
    NoneYet,
    /// Described together with the frontend group, in one call.
    Read(Vec<SgInfo>),
}

/// The security groups of the nodes' instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeGroups {
    /// Every group of every node instance: where berth's backend rules may be.
    pub all: BTreeSet<String>,
    /// Per instance: the group for backend rules ([`backend_group`]), or why none.
    pub chosen: BTreeMap<String, Result<String, String>>,
}

impl Security {
    /// Whether the NLB must have security groups: AWS adds none to an NLB made without.
    pub fn requires_groups(&self) -> bool {
        match &self.frontend {
            Frontend::Managed(m) => m.restricted,
            Frontend::Given(_) => true,
            Frontend::Disabled => false,
        }
    }

    /// Whether the NLB must have none (AWS removes no last group).
    pub fn forbids_groups(&self) -> bool {
        self.frontend == Frontend::Disabled
    }
}

/// The ELBv2 listener protocol as EC2 rule protocols. Pure.
fn rule_protocols(protocol: &str) -> &'static [&'static str] {
    match protocol {
        "UDP" => &["udp"],
        "TCP_UDP" => &["tcp", "udp"],
        _ => &["tcp"],
    }
}

/// The CIDRs the frontend group admits: the Service's ranges, else (no prefix lists
/// either) everyone for internet-facing NLBs and the VPC for internal ones, as LBC. Pure.
fn sources(settings: &Settings, vpc_cidrs: &[String]) -> Vec<Source> {
    let mut out: Vec<Source> = settings
        .prefix_lists
        .iter()
        .cloned()
        .map(Source::PrefixList)
        .collect();
    let cidrs: Vec<String> = match &settings.source_ranges {
        Some(r) => r.clone(),
        None if !settings.prefix_lists.is_empty() => Vec::new(),
        None => match settings.scheme {
            Scheme::InternetFacing => {
                let mut all = vec!["0.0.0.0/0".to_string()];
                if settings.ip_address_type == IpAddressType::Dualstack {
                    all.push("::/0".into());
                }
                all
            }
            Scheme::Internal => vpc_cidrs.to_vec(),
        },
    };
    out.extend(cidrs.into_iter().map(Source::Cidr));
    out
}

/// Instance IDs of the nodes running the ready endpoints among `targets` (`ip` targets:
/// their pods' addresses are the nodes' secondary addresses, with the nodes' groups).
fn nodes_of_endpoints(
    targets: &BTreeSet<String>,
    slices: &[std::sync::Arc<EndpointSlice>],
    nodes: &[std::sync::Arc<Node>],
) -> BTreeSet<String> {
    let node_names: BTreeSet<&str> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|ep| ep.addresses.iter().any(|a| targets.contains(a)))
        .filter_map(|ep| ep.node_name.as_deref())
        .collect();
    nodes
        .iter()
        .filter(|n| {
            n.metadata
                .name
                .as_deref()
                .is_some_and(|m| node_names.contains(m))
        })
        .filter_map(|n| n.spec.as_ref()?.provider_id.as_deref())
        .filter_map(instance_id)
        .map(str::to_string)
        .collect()
}

/// What the builder needs to decide the security groups.
pub struct Inputs<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub vpc_id: &'a str,
    /// The VPC's CIDRs (the default source of an internal NLB).
    pub vpc_cidrs: &'a [String],
    pub base_tags: &'a Tags,
    pub nodes: &'a [std::sync::Arc<Node>],
    pub slices: &'a [std::sync::Arc<EndpointSlice>],
}

/// The Service's security groups. Pure.
pub fn build(
    settings: &Settings,
    listeners: &[DesiredListener],
    target_groups: &[DesiredTargetGroup],
    inputs: &Inputs,
) -> Security {
    let frontend = match &settings.frontend {
        FrontendChoice::Disabled => Frontend::Disabled,
        FrontendChoice::Given(ids) => Frontend::Given(ids.clone()),
        FrontendChoice::Managed => {
            let sources = sources(settings, inputs.vpc_cidrs);
            let rules = listeners
                .iter()
                .flat_map(|l| {
                    let sources = &sources;
                    rule_protocols(&l.protocol).iter().flat_map(move |p| {
                        sources
                            .iter()
                            .map(move |s| Rule::port(p, l.port, s.clone()))
                    })
                })
                .collect();
            let mut tags = inputs.base_tags.clone();
            tags.insert(tags::RESOURCE.into(), RESOURCE.into());
            Frontend::Managed(ManagedGroup {
                name: format!("{}-sg", settings.name),
                description: format!(
                    "berth: frontend of the NLB of Service {}/{}",
                    inputs.namespace, inputs.name
                ),
                vpc_id: inputs.vpc_id.to_string(),
                tags,
                rules,
                restricted: settings.source_ranges.is_some() || !settings.prefix_lists.is_empty(),
            })
        }
    };
    let manage = match (&frontend, settings.manage_backend_rules) {
        (Frontend::Disabled, _) => false,
        (_, Some(explicit)) => explicit,
        (Frontend::Managed(_), None) => true,
        // LBC's default too: rules for groups berth does not manage only when asked.
        (Frontend::Given(_), None) => false,
    };
    let backend = manage.then(|| backend(settings, target_groups, inputs));
    let nodes = inputs
        .nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.provider_id.as_deref())
        .filter_map(instance_id)
        .map(str::to_string)
        .collect();
    Security {
        frontend,
        backend,
        nodes,
        node_groups: NodeGroups::default(),
    }
}

fn backend(settings: &Settings, target_groups: &[DesiredTargetGroup], inputs: &Inputs) -> Backend {
    let mut ports = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for tg in target_groups {
        let traffic: BTreeSet<i32> = match settings.target_type {
            TargetType::Instance => BTreeSet::from([tg.port]),
            TargetType::Ip => tg.targets.iter().map(|t| t.port).collect(),
        };
        for port in &traffic {
            for p in rule_protocols(&tg.protocol) {
                ports.insert((p.to_string(), *port));
            }
        }
        // Health checks are TCP, HTTP or HTTPS: TCP, also for UDP target groups.
        match tg.health_check.port {
            HealthPort::TrafficPort => ports.extend(traffic.iter().map(|p| ("tcp".into(), *p))),
            HealthPort::Port(p) => {
                ports.insert(("tcp".into(), p));
            }
            // The model builder resolves a port name to its number before this runs.
            HealthPort::Named(_) => {}
        }
        targets.extend(tg.targets.iter().map(|t| t.id.clone()));
    }
    let instances = match settings.target_type {
        TargetType::Instance => targets,
        TargetType::Ip => nodes_of_endpoints(&targets, inputs.slices, inputs.nodes),
    };
    Backend { instances, ports }
}

/// The description prefix of this Service's backend rules in this cluster. Pure.
pub fn marker(cluster_id: &str, uid: &str) -> String {
    format!("berth:{cluster_id}:{uid}")
}

/// Whether a rule's description is `marker`'s (alone or followed by a space). Pure.
pub fn is_marked(description: Option<&str>, marker: &str) -> bool {
    description
        .and_then(|d| d.strip_prefix(marker))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
}

/// The description of a backend rule: the marker and the Service, within AWS's limit. Pure.
pub fn backend_description(marker: &str, service: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || " ._-:/()#,@[]+=&;{}!$*".contains(c);
    let service: String = service.chars().filter(|c| allowed(*c)).collect();
    let mut d = format!("{marker} {service}");
    d.truncate(MAX_DESCRIPTION);
    d
}

/// Rules to authorize (desired, absent) and to revoke (present, `owned`, not desired). A
/// present rule of someone else that is also desired is left as it is: the traffic is
/// allowed, and it is not berth's to remove later. Pure.
pub fn rule_changes(
    desired: &BTreeSet<Rule>,
    actual: &[IngressRule],
    owned: impl Fn(&IngressRule) -> bool,
) -> (Vec<Rule>, Vec<Rule>) {
    let present: BTreeSet<&Rule> = actual.iter().map(|r| &r.rule).collect();
    let authorize = desired
        .iter()
        .filter(|r| !present.contains(r))
        .cloned()
        .collect();
    let revoke = actual
        .iter()
        .filter(|r| owned(r) && !desired.contains(&r.rule))
        .map(|r| r.rule.clone())
        .collect::<BTreeSet<Rule>>()
        .into_iter()
        .collect();
    (authorize, revoke)
}

/// The group of an instance that gets the backend rules, as LBC picks it: its only group,
/// else the one tagged `kubernetes.io/cluster/<cluster>`. Pure.
pub fn backend_group(
    groups: &[String],
    tagged: &BTreeMap<String, Tags>,
    cluster: &str,
) -> Result<String, String> {
    if let [only] = groups {
        return Ok(only.clone());
    }
    let key = format!("kubernetes.io/cluster/{cluster}");
    let with_tag: Vec<&String> = groups
        .iter()
        .filter(|g| tagged.get(*g).is_some_and(|t| t.contains_key(&key)))
        .collect();
    match with_tag.as_slice() {
        [one] => Ok((*one).clone()),
        [] if groups.is_empty() => Err("has no security group".into()),
        [] => Err(format!(
            "has {} security groups and none is tagged {key}",
            groups.len()
        )),
        _ => Err(format!(
            "has {} security groups tagged {key}: tag exactly one",
            with_tag.len()
        )),
    }
}

/// Warnings about source ranges the NLB does not enforce. Pure.
pub fn warnings(settings: &Settings) -> Vec<String> {
    let asked = settings.source_ranges.is_some() || !settings.prefix_lists.is_empty();
    if !asked {
        return Vec::new();
    }
    match &settings.frontend {
        FrontendChoice::Managed => Vec::new(),
        FrontendChoice::Disabled => vec![
            "the NLB has no security group (aws-load-balancer-disable-nlb-sg): its source ranges and prefix lists are NOT enforced, anyone who can route to it reaches it".into(),
        ],
        FrontendChoice::Given(ids) => vec![format!(
            "the NLB uses the given security groups {} whose rules berth does not manage: its source ranges and prefix lists are NOT applied by berth",
            ids.join(", ")
        )],
    }
}

/// The Service's managed groups (normally one), found by its tags.
async fn owned_groups<A: AwsApi>(aws: &A, owner: Owner<'_>) -> Result<Vec<SgInfo>, AwsError> {
    let query = SgQuery {
        ids: None,
        filters: vec![
            (format!("tag:{}", tags::SERVICE_UID), vec![owner.uid.into()]),
            (format!("tag:{}", tags::RESOURCE), vec![RESOURCE.into()]),
        ],
    };
    let found = aws.security_groups(&query).await?;
    Ok(found.into_iter().filter(|g| owner.owns(&g.tags)).collect())
}

/// Authorizes and revokes so the group holds exactly `desired` among the rules `owned`.
async fn sync_rules<A: AwsApi>(
    aws: &A,
    group: &SgInfo,
    desired: &BTreeSet<Rule>,
    description: &str,
    owned: impl Fn(&IngressRule) -> bool,
) -> Result<(), AwsError> {
    let (authorize, revoke) = rule_changes(desired, &group.ingress, owned);
    if !authorize.is_empty() {
        let rules: Vec<IngressRule> = authorize
            .into_iter()
            .map(|rule| IngressRule {
                rule,
                description: Some(description.to_string()),
            })
            .collect();
        match aws.authorize_ingress(&group.id, &rules).await {
            Ok(()) => {}
            // Added meanwhile (or an answer lost): the next run sees it.
            Err(e) if e.is("InvalidPermission.Duplicate") => {}
            Err(e) => return Err(e),
        }
        tracing::info!(group = %group.id, rules = rules.len(), "authorized ingress");
    }
    if !revoke.is_empty() {
        // As found, descriptions included: AWS ignores them, moto matches on them.
        let revoke: Vec<IngressRule> = group
            .ingress
            .iter()
            .filter(|r| revoke.contains(&r.rule))
            .cloned()
            .collect();
        aws.revoke_ingress(&group.id, &revoke).await?;
        tracing::info!(group = %group.id, rules = revoke.len(), "revoked ingress");
    }
    Ok(())
}

/// The managed group, with its rules made to match, and what is known of the nodes'
/// groups' rules. For a `new` Service (no load balancer, now or before) it is created first (tagged
/// at creation), so the usual case reads nothing; a group left by an earlier attempt
/// makes the name a duplicate and is then looked up. For an existing load balancer, its
/// groups and the nodes' are described in one call; the group is found by its tags
/// otherwise (the one of the wanted name first), or created.
async fn ensure_managed<A: AwsApi>(
    aws: &A,
    security: &Security,
    m: &ManagedGroup,
    owner: Owner<'_>,
    existing: Option<&LbInfo>,
    new: bool,
) -> Result<(String, NodeRules), ApplyError> {
    let mut node_rules = NodeRules::Unknown;
    let mut found = None;
    match existing {
        None if new => {
            found = create_managed(aws, m)
                .await?
                .map(|g| (g, NodeRules::NoneYet))
        }
        Some(lb) if !lb.security_groups.is_empty() => {
            let ids: BTreeSet<String> = lb
                .security_groups
                .iter()
                .chain(&security.node_groups.all)
                .cloned()
                .collect();
            let query = SgQuery {
                ids: Some(ids.into_iter().collect()),
                filters: Vec::new(),
            };
            let (mine, nodes): (Vec<SgInfo>, Vec<SgInfo>) = aws
                .security_groups(&query)
                .await?
                .into_iter()
                .partition(|g| {
                    lb.security_groups.contains(&g.id)
                        && owner.owns(&g.tags)
                        && g.tags.get(tags::RESOURCE).map(String::as_str) == Some(RESOURCE)
                });
            node_rules = NodeRules::Read(nodes);
            found = mine.into_iter().next().map(|g| (g, NodeRules::Unknown));
        }
        _ => {}
    }
    let (group, rules) = match found {
        Some(found) => found,
        None => {
            let mut found = owned_groups(aws, owner).await?;
            found.sort_by_key(|g| (g.name != m.name, g.id.clone()));
            match found.into_iter().next() {
                Some(g) => (g, NodeRules::Unknown),
                None if new => {
                    return Err(ApplyError::NameConflict(m.name.clone()));
                }
                None => match create_managed(aws, m).await? {
                    Some(g) => (g, NodeRules::NoneYet),
                    None => return Err(ApplyError::NameConflict(m.name.clone())),
                },
            }
        }
    };
    if rules == NodeRules::NoneYet {
        node_rules = rules;
    }
    // Every rule in berth's own group is berth's.
    sync_rules(aws, &group, &m.rules, &m.description, |_| true).await?;
    Ok((group.id, node_rules))
}

/// Creates the managed group; `None` when its name is taken in the VPC.
async fn create_managed<A: AwsApi>(aws: &A, m: &ManagedGroup) -> Result<Option<SgInfo>, AwsError> {
    match aws.create_security_group(m).await {
        Ok(g) => {
            tracing::info!(group = %g.id, name = %m.name, "created security group");
            Ok(Some(g))
        }
        Err(e) if e.is("InvalidGroup.Duplicate") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The frontend groups the NLB should carry, the managed one made first, and what is
/// known of the nodes' groups' rules on the way. An NLB that exists without groups and
/// need not have any (nothing restricts it) keeps none. `existing`: the Service's load
/// balancer; `new`: the Service never had one.
pub async fn frontend_groups<A: AwsApi>(
    aws: &A,
    security: &Security,
    owner: Owner<'_>,
    existing: Option<&LbInfo>,
    new: bool,
) -> Result<(Vec<String>, NodeRules), ApplyError> {
    match &security.frontend {
        Frontend::Disabled => Ok((Vec::new(), NodeRules::Unknown)),
        Frontend::Given(ids) => Ok((ids.clone(), NodeRules::Unknown)),
        Frontend::Managed(_)
            if existing.is_some_and(|lb| lb.security_groups.is_empty())
                && !security.requires_groups() =>
        {
            Ok((Vec::new(), NodeRules::Unknown))
        }
        Frontend::Managed(m) => {
            let (id, rules) = ensure_managed(aws, security, m, owner, existing, new).await?;
            Ok((vec![id], rules))
        }
    }
}

/// The groups of the instances `ids` and the one of each chosen for backend rules: one
/// DescribeInstances per 200 instances, and one DescribeSecurityGroups only when an
/// instance has several groups (their tags decide).
pub async fn node_groups<A: AwsApi>(
    aws: &A,
    ids: &BTreeSet<String>,
    cluster: &str,
) -> Result<NodeGroups, AwsError> {
    if ids.is_empty() {
        return Ok(NodeGroups::default());
    }
    let ids: Vec<String> = ids.iter().cloned().collect();
    let by_instance = aws.instance_groups(&ids).await?;
    let several: BTreeSet<String> = by_instance
        .values()
        .filter(|g| g.len() > 1)
        .flatten()
        .cloned()
        .collect();
    let tagged: BTreeMap<String, Tags> = if several.is_empty() {
        BTreeMap::new()
    } else {
        let query = SgQuery {
            ids: Some(several.into_iter().collect()),
            filters: Vec::new(),
        };
        aws.security_groups(&query)
            .await?
            .into_iter()
            .map(|g| (g.id, g.tags))
            .collect()
    };
    Ok(NodeGroups {
        all: by_instance.values().flatten().cloned().collect(),
        chosen: by_instance
            .iter()
            .map(|(i, of)| (i.clone(), backend_group(of, &tagged, cluster)))
            .collect(),
    })
}

/// Makes the backend rules of the Service match: on the chosen group of each target
/// instance, from each of the `frontend` groups, for the traffic and health-check ports.
/// Its rules on the other groups of the cluster's nodes (a node no longer a target, a
/// frontend group replaced, backend rules turned off) are revoked. Answers the target
/// instances whose group cannot be chosen (warnings).
pub async fn sync_backend<A: AwsApi>(
    aws: &A,
    security: &Security,
    frontend: &[String],
    owner: Owner<'_>,
    service: &str,
    known: NodeRules,
) -> Result<Vec<String>, ApplyError> {
    let nodes = &security.node_groups;
    if nodes.all.is_empty() {
        return Ok(Vec::new());
    }
    let (targets, desired) = match &security.backend {
        Some(b) if !frontend.is_empty() => {
            let rules: BTreeSet<Rule> = frontend
                .iter()
                .flat_map(|f| {
                    b.ports
                        .iter()
                        .map(|(p, port)| Rule::port(p, *port, Source::Group(f.clone())))
                })
                .collect();
            (b.instances.clone(), rules)
        }
        _ => (BTreeSet::new(), BTreeSet::new()),
    };
    let mut chosen = BTreeSet::new();
    let mut problems = Vec::new();
    for (instance, group) in nodes.chosen.iter().filter(|(i, _)| targets.contains(*i)) {
        match group {
            Ok(g) => {
                chosen.insert(g.clone());
            }
            Err(why) => problems.push(format!("instance {instance} {why}")),
        }
    }
    let marker = marker(&owner.identity.id, owner.uid);
    let description = backend_description(&marker, service);
    let owned = |r: &IngressRule| is_marked(r.description.as_deref(), &marker);
    let groups = match known {
        // Every wanted rule is missing; the Service's rules elsewhere refer to an earlier
        // frontend group, which the next apply (reading) or the Service's deletion revokes.
        NodeRules::NoneYet => chosen
            .iter()
            .map(|id| SgInfo {
                id: id.clone(),
                name: String::new(),
                vpc: String::new(),
                tags: Tags::new(),
                ingress: Vec::new(),
            })
            .collect(),
        NodeRules::Read(groups) => groups
            .into_iter()
            .filter(|g| nodes.all.contains(&g.id))
            .collect(),
        NodeRules::Unknown => {
            let query = SgQuery {
                ids: Some(nodes.all.iter().cloned().collect()),
                filters: Vec::new(),
            };
            aws.security_groups(&query).await?
        }
    };
    let none = BTreeSet::new();
    for g in &groups {
        let want = if chosen.contains(&g.id) {
            &desired
        } else {
            &none
        };
        match sync_rules(aws, g, want, &description, owned).await {
            Ok(()) => {}
            // One rule per Service and port: many Services fill a group's quota (60 by
            // default). The NLB works; the condition says what is missing and why.
            Err(e) if e.is("RulesPerSecurityGroupLimitExceeded") => problems.push(format!(
                "group {} is full ({}): raise the account's rules-per-security-group quota or set manage-backend-security-group-rules: \"false\"",
                g.id, e.message
            )),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(problems)
}

/// Groups with a rule whose source is one of `groups`.
async fn referring<A: AwsApi>(aws: &A, groups: &[String]) -> Result<Vec<SgInfo>, AwsError> {
    let query = SgQuery {
        ids: None,
        filters: vec![("ip-permission.group-id".into(), groups.to_vec())],
    };
    aws.security_groups(&query).await
}

/// Revokes the Service's backend rules referring to `groups`.
async fn revoke_backend<A: AwsApi>(
    aws: &A,
    owner: Owner<'_>,
    groups: &[String],
) -> Result<(), AwsError> {
    if groups.is_empty() {
        return Ok(());
    }
    let marker = marker(&owner.identity.id, owner.uid);
    for g in referring(aws, groups).await? {
        let owned = |r: &IngressRule| is_marked(r.description.as_deref(), &marker);
        sync_rules(aws, &g, &BTreeSet::new(), "", owned).await?;
    }
    Ok(())
}

/// Deletes the Service's managed groups except `keep`, each after the backend rules
/// referring to it. A group still attached to a load balancer being deleted fails with
/// `DependencyViolation` on AWS for a while: the error makes the caller retry.
pub async fn delete_managed<A: AwsApi>(
    aws: &A,
    owner: Owner<'_>,
    keep: &[String],
) -> Result<usize, AwsError> {
    let mut deleted = 0;
    for g in owned_groups(aws, owner).await? {
        if keep.contains(&g.id) {
            continue;
        }
        revoke_backend(aws, owner, std::slice::from_ref(&g.id)).await?;
        aws.delete_security_group(&g.id).await?;
        tracing::info!(group = %g.id, name = %g.name, "deleted security group");
        deleted += 1;
    }
    Ok(deleted)
}

/// After the Service's load balancers are gone: its backend rules referring to their
/// groups (`frontend`, given ones included) are revoked and its managed groups deleted.
pub async fn release<A: AwsApi>(
    aws: &A,
    owner: Owner<'_>,
    frontend: &[String],
) -> Result<usize, AwsError> {
    revoke_backend(aws, owner, frontend).await?;
    delete_managed(aws, owner, &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::aws::annotations::tests::{node, service, settings_for};
    use crate::provider::aws::model::{World, build as build_lb};
    use std::sync::Arc;

    fn cidr(c: &str) -> Source {
        Source::Cidr(c.into())
    }

    fn rule(p: &str, port: i32, s: Source) -> Rule {
        Rule::port(p, port, s)
    }

    fn ingress(r: Rule, d: Option<&str>) -> IngressRule {
        IngressRule {
            rule: r,
            description: d.map(str::to_string),
        }
    }

    #[test]
    fn rule_changes_add_the_missing_and_revoke_only_owned_extras() {
        let desired = BTreeSet::from([
            rule("tcp", 80, cidr("198.18.0.0/24")),
            rule("tcp", 80, cidr("10.0.0.0/8")),
        ]);
        let mine = "berth:id:u1";
        let actual = vec![
            ingress(rule("tcp", 80, cidr("10.0.0.0/8")), Some(mine)),
            ingress(
                rule("tcp", 80, cidr("0.0.0.0/0")),
                Some("berth:id:u1 ns/web"),
            ),
            ingress(rule("tcp", 22, cidr("0.0.0.0/0")), Some("ssh for admins")),
            ingress(
                rule("tcp", 443, cidr("0.0.0.0/0")),
                Some("berth:id:u10 ns/x"),
            ),
        ];
        let owned = |r: &IngressRule| is_marked(r.description.as_deref(), mine);
        let (add, revoke) = rule_changes(&desired, &actual, owned);
        assert_eq!(add, vec![rule("tcp", 80, cidr("198.18.0.0/24"))]);
        assert_eq!(revoke, vec![rule("tcp", 80, cidr("0.0.0.0/0"))]);
        // Someone else's rule that is also wanted is neither added again nor revoked.
        let theirs = vec![ingress(rule("tcp", 80, cidr("10.0.0.0/8")), None)];
        let (add, revoke) = rule_changes(&desired, &theirs, owned);
        assert_eq!(add, vec![rule("tcp", 80, cidr("198.18.0.0/24"))]);
        assert!(revoke.is_empty());
        // Steady state: nothing to do.
        let all: Vec<IngressRule> = desired
            .iter()
            .map(|r| ingress(r.clone(), Some(mine)))
            .collect();
        assert_eq!(rule_changes(&desired, &all, owned), (vec![], vec![]));
        // Nothing desired: every owned rule goes, nobody else's.
        let (add, revoke) = rule_changes(&BTreeSet::new(), &actual, owned);
        assert!(add.is_empty());
        assert_eq!(revoke.len(), 2);
    }

    #[test]
    fn markers_match_only_their_own_service_and_cluster() {
        let m = marker("id-1", "u1");
        assert!(is_marked(Some("berth:id-1:u1"), &m));
        assert!(is_marked(Some("berth:id-1:u1 shop/web"), &m));
        assert!(!is_marked(Some("berth:id-1:u10 shop/web"), &m));
        assert!(!is_marked(Some("berth:id-2:u1 shop/web"), &m));
        assert!(!is_marked(None, &m));
        let d = backend_description(&m, &format!("ns/{}", "x".repeat(300)));
        assert_eq!(d.len(), MAX_DESCRIPTION);
        assert!(is_marked(Some(&d), &m));
    }

    #[test]
    fn the_backend_group_is_the_only_one_or_the_cluster_tagged_one() {
        let tagged = BTreeMap::from([
            (
                "sg-node".to_string(),
                Tags::from([("kubernetes.io/cluster/c1".to_string(), "owned".to_string())]),
            ),
            ("sg-extra".to_string(), Tags::new()),
        ]);
        let one = vec!["sg-x".to_string()];
        assert_eq!(backend_group(&one, &tagged, "c1"), Ok("sg-x".into()));
        let two = vec!["sg-extra".to_string(), "sg-node".to_string()];
        assert_eq!(backend_group(&two, &tagged, "c1"), Ok("sg-node".into()));
        assert!(backend_group(&two, &tagged, "c2").is_err());
        assert!(backend_group(&[], &tagged, "c1").is_err());
    }

    fn lb_with(annotations: &[(&str, &str)], spec: serde_json::Value) -> (Security, Settings) {
        let mut svc = service(
            &[
                ("http", 80, "TCP", Some(30080)),
                ("dns", 53, "UDP", Some(30053)),
            ],
            annotations,
        );
        if let Some(ranges) = spec.get("loadBalancerSourceRanges") {
            svc.spec.get_or_insert_default().load_balancer_source_ranges =
                serde_json::from_value(ranges.clone()).ok();
        }
        let settings = settings_for(&svc);
        let nodes = vec![Arc::new(node("n1", "i-1", &[]))];
        let subnets = vec!["subnet-a".to_string()];
        let cidrs = vec!["198.18.0.0/16".to_string()];
        let world = World {
            cluster: "c1",
            vpc_id: "vpc-1",
            vpc_cidrs: &cidrs,
            subnets: &subnets,
            subnet_cidrs: &Default::default(),
            nodes: &nodes,
            slices: &[],
            gated_ready: &Default::default(),
        };
        let lb = build_lb(&svc, &settings, &world).expect("build");
        (lb.security, settings)
    }

    #[test]
    fn the_managed_group_admits_the_source_ranges_on_the_listener_ports() {
        use crate::provider::aws::annotations::annotations as keys;
        let (s, _) = lb_with(
            &[],
            serde_json::json!({"loadBalancerSourceRanges": ["198.18.0.100/32", "10.1.2.3/8"]}),
        );
        let Frontend::Managed(m) = &s.frontend else {
            panic!("{s:?}")
        };
        assert!(m.restricted);
        let got: Vec<(String, i32, Source)> = m
            .rules
            .iter()
            .map(|r| (r.protocol.clone(), r.from_port, r.source.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("tcp".into(), 80, cidr("10.0.0.0/8")),
                ("tcp".into(), 80, cidr("198.18.0.100/32")),
                ("udp".into(), 53, cidr("10.0.0.0/8")),
                ("udp".into(), 53, cidr("198.18.0.100/32")),
            ]
        );
        let b = s.backend.expect("backend rules are managed by default");
        assert_eq!(b.instances, BTreeSet::from(["i-1".to_string()]));
        assert_eq!(
            b.ports,
            BTreeSet::from([
                ("tcp".into(), 30053),
                ("tcp".into(), 30080),
                ("udp".into(), 30053)
            ])
        );
        // Internal, nothing given: the VPC. The annotation is read when the spec is empty.
        let (s, _) = lb_with(
            &[(keys::SOURCE_RANGES, "192.0.2.0/24")],
            serde_json::json!({}),
        );
        let Frontend::Managed(m) = &s.frontend else {
            panic!()
        };
        assert!(m.rules.iter().all(|r| r.source == cidr("192.0.2.0/24")));
        let (s, _) = lb_with(&[], serde_json::json!({}));
        let Frontend::Managed(m) = &s.frontend else {
            panic!()
        };
        assert!(!m.restricted);
        assert!(m.rules.iter().all(|r| r.source == cidr("198.18.0.0/16")));
        let (s, _) = lb_with(
            &[
                (keys::SCHEME, "internet-facing"),
                (keys::IP_ADDRESS_TYPE, "dualstack"),
            ],
            serde_json::json!({}),
        );
        let Frontend::Managed(m) = &s.frontend else {
            panic!()
        };
        let sources: BTreeSet<&Source> = m.rules.iter().map(|r| &r.source).collect();
        assert_eq!(sources, BTreeSet::from([&cidr("0.0.0.0/0"), &cidr("::/0")]));
        // Prefix lists alone: no default CIDR.
        let (s, _) = lb_with(
            &[(keys::SECURITY_GROUP_PREFIX_LISTS, "pl-1")],
            serde_json::json!({}),
        );
        let Frontend::Managed(m) = &s.frontend else {
            panic!()
        };
        assert!(
            m.rules
                .iter()
                .all(|r| r.source == Source::PrefixList("pl-1".into()))
        );
    }

    #[test]
    fn given_and_disabled_groups_manage_no_frontend_rules_and_say_what_is_not_enforced() {
        use crate::provider::aws::annotations::annotations as keys;
        let ranges = serde_json::json!({"loadBalancerSourceRanges": ["10.0.0.0/8"]});
        let (s, settings) = lb_with(&[(keys::SECURITY_GROUPS, "sg-1, sg-2")], ranges.clone());
        assert_eq!(
            s.frontend,
            Frontend::Given(vec!["sg-1".into(), "sg-2".into()])
        );
        assert!(
            s.backend.is_none(),
            "given groups: backend rules only when asked"
        );
        assert!(warnings(&settings)[0].contains("sg-1, sg-2"));
        let (s, _) = lb_with(
            &[
                (keys::SECURITY_GROUPS, "sg-1"),
                (keys::MANAGE_BACKEND_SG_RULES, "true"),
            ],
            ranges.clone(),
        );
        assert!(s.backend.is_some());
        let (s, settings) = lb_with(&[(keys::DISABLE_NLB_SG, "true")], ranges);
        assert_eq!(s.frontend, Frontend::Disabled);
        assert!(s.forbids_groups() && s.backend.is_none());
        assert!(warnings(&settings)[0].contains("NOT enforced"));
        let (_, settings) = lb_with(&[(keys::DISABLE_NLB_SG, "true")], serde_json::json!({}));
        assert!(warnings(&settings).is_empty());
    }

    mod against_the_fake {
        use std::sync::LazyLock;

        use super::*;
        use crate::provider::aws::annotations::settings;
        use crate::provider::aws::deploy::{self, Inventory};
        use crate::provider::aws::fake::FakeAws;
        use crate::provider::aws::identity::Identity;
        use crate::provider::aws::model::DesiredLoadBalancer;

        static ME: LazyLock<Identity> = LazyLock::new(|| Identity::new("id-1", "c1"));

        fn me() -> Owner<'static> {
            Owner {
                identity: &ME,
                uid: "uid-1",
            }
        }

        /// The Service's load balancer, with the nodes' groups as the provider finds them.
        async fn desired(aws: &FakeAws, ranges: &[&str]) -> DesiredLoadBalancer {
            let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
            let ranges: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
            svc.spec.get_or_insert_default().load_balancer_source_ranges = Some(ranges);
            let nodes = vec![
                Arc::new(node("n1", "i-1", &[])),
                Arc::new(node("n2", "i-2", &[])),
            ];
            let subnets = vec!["subnet-a".to_string()];
            let world = World {
                cluster: "c1",
                vpc_id: "vpc-1",
                vpc_cidrs: &[],
                subnets: &subnets,
                subnet_cidrs: &Default::default(),
                nodes: &nodes,
                slices: &[],
                gated_ready: &Default::default(),
            };
            let s = settings(&svc, &Default::default(), "c1").expect("settings");
            let mut d = build_lb(&svc, &s, &world).expect("build");
            d.security.node_groups = node_groups(aws, &d.security.nodes, "c1")
                .await
                .expect("node groups");
            ME.stamp(&mut d);
            d
        }

        fn aws() -> FakeAws {
            let aws = FakeAws::default();
            for i in ["i-1", "i-2"] {
                aws.add_instance(i, "vpc-1");
            }
            let cluster = [("kubernetes.io/cluster/c1", "owned")];
            aws.add_group("sg-nodes", "vpc-1", &cluster, &["i-1", "i-2"]);
            aws.add_group("sg-other", "vpc-1", &[], &["i-1", "i-2"]);
            aws
        }

        fn sources(aws: &FakeAws, group: &str) -> BTreeSet<Source> {
            aws.state().sgs[group]
                .ingress
                .iter()
                .map(|r| r.rule.source.clone())
                .collect()
        }

        #[tokio::test]
        async fn ranges_change_in_place_and_everything_goes_with_the_service() {
            let (aws, inv) = (aws(), Inventory::default());
            let applied =
                deploy::ensure(&aws, &inv, &desired(&aws, &["198.18.0.100/32"]).await, me())
                    .await
                    .expect("ensure");
            let [managed] = applied.lb.security_groups.as_slice() else {
                panic!("{:?}", applied.lb)
            };
            let managed = managed.clone();
            assert_eq!(
                sources(&aws, &managed),
                BTreeSet::from([cidr("198.18.0.100/32")])
            );
            let backend = aws.state().sgs["sg-nodes"].ingress.clone();
            assert_eq!(backend.len(), 1, "{backend:?}");
            assert_eq!(
                backend[0].rule,
                rule("tcp", 30080, Source::Group(managed.clone()))
            );
            assert!(aws.state().sgs["sg-other"].ingress.is_empty());
            aws.take_calls();

            let d = desired(&aws, &["192.0.2.0/24"]).await;
            let applied = deploy::ensure(&aws, &inv, &d, me()).await.expect("ensure");
            assert_eq!(applied.lb.security_groups, vec![managed.clone()]);
            let calls = aws.take_calls();
            assert_eq!(
                calls,
                vec![
                    format!("AuthorizeSecurityGroupIngress {managed}"),
                    format!("RevokeSecurityGroupIngress {managed}"),
                ],
                "only the rules change"
            );
            assert_eq!(
                sources(&aws, &managed),
                BTreeSet::from([cidr("192.0.2.0/24")])
            );
            deploy::ensure(&aws, &inv, &d, me()).await.expect("again");
            assert!(
                aws.take_calls().is_empty(),
                "a second ensure changed something"
            );

            // Someone else's rule on the nodes' group stays.
            let theirs = IngressRule {
                rule: rule("tcp", 22, cidr("0.0.0.0/0")),
                description: Some("ssh".into()),
            };
            aws.state()
                .sgs
                .get_mut("sg-nodes")
                .expect("group")
                .ingress
                .push(theirs.clone());
            deploy::remove(&aws, &inv, me(), std::slice::from_ref(&d.name), false)
                .await
                .expect("remove");
            assert!(aws.state().lbs.is_empty());
            assert!(
                !aws.state().sgs.contains_key(&managed),
                "the managed group outlived the NLB"
            );
            assert_eq!(aws.state().sgs["sg-nodes"].ingress, vec![theirs]);
        }

        #[tokio::test]
        async fn an_nlb_made_without_groups_is_kept_unless_the_service_restricts_it() {
            let (aws, inv) = (aws(), Inventory::default());
            let mut open = desired(&aws, &[]).await;
            open.security.frontend = Frontend::Disabled;
            open.security.backend = None;
            let applied = deploy::ensure(&aws, &inv, &open, me())
                .await
                .expect("ensure");
            assert!(applied.lb.security_groups.is_empty());
            // Now the managed group is wanted, admitting everyone: the NLB stays without.
            let mut everyone = desired(&aws, &[]).await;
            if let Frontend::Managed(m) = &mut everyone.security.frontend {
                m.restricted = false;
            }
            let applied = deploy::ensure(&aws, &inv, &everyone, me())
                .await
                .expect("ensure");
            assert!(applied.lb.security_groups.is_empty());
            assert!(aws.state().sgs.len() == 2, "no managed group made");
            // Restricting needs a replacement, which waits for its acknowledgement.
            let gate = |_: &crate::provider::aws::replacement::Replacement| false;
            let err = deploy::ensure_gated(
                &aws,
                &inv,
                &desired(&aws, &["10.0.0.0/8"]).await,
                me(),
                &gate,
            )
            .await
            .expect_err("a replacement");
            assert!(err.to_string().contains("securityGroups"), "{err}");
        }
    }
}
