//! The AWS provider: annotations as a table ([`annotations`]) over class settings
//! ([`settings`]), naming ([`naming`]), the pure desired model ([`model`]), diff and apply
//! ([`deploy`]) over a client trait ([`api`], the SDK in [`client`]) that the leader
//! reaches only through the fence ([`fenced`]), subnets ([`subnets`]), the inventory
//! ([`inventory`]), the orphan sweep ([`gc`]) and taking over the AWS Load Balancer
//! Controller's NLBs ([`adopt`]).

pub mod adopt;
pub mod annotations;
pub mod api;
pub mod client;
pub mod deploy;
pub mod dryrun;
#[cfg(test)]
pub mod fake;
pub mod fenced;
pub mod gc;
pub mod identity;
pub mod inventory;
pub mod limits;
pub mod model;
pub mod naming;
pub mod readiness;
pub mod replacement;
pub mod security_groups;
pub mod settings;
pub mod subnets;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use berth_crds::{AwsProvider as AwsClass, LABEL_SERVICE_NAME, LoadBalancerClass};
use berth_runtime::Fence;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::provider::{
    FENCED, Ingress, Next, Note, Outcome, Provider, ProviderError, Readiness, Report, Verdict,
    hostname_ingress,
};
use crate::reason;
use crate::stores::Stores;
use annotations::{SubnetChoice, annotations as keys};
use api::{AwsApi, AwsError};
use deploy::{ApplyError, Inventory};
use fenced::{FENCED_CODE, FencedAws};
use identity::{Identity, Owner};
use model::{BuildError, DesiredLoadBalancer, Scheme, TargetType, World};
use settings::{FrontendChoice, Settings};
use subnets::SubnetError;

/// What the controller would do in AWS for one Service ([`AwsProvider::plan`]).
#[derive(Clone, Debug)]
pub struct Plan {
    pub desired: DesiredLoadBalancer,
    /// The replacement of the existing load balancer the change needs, if any.
    pub replacement: Option<replacement::Replacement>,
    /// Whether the Service already acknowledges it (else the controller waits).
    pub acknowledged: bool,
    /// The writes, in the order the controller makes them.
    pub steps: Vec<dryrun::Step>,
}

/// When a subnet lookup was made and the subnets it found.
type SubnetLookup = (Instant, Vec<String>);

/// Event reason: endpoints of an `ip`-target Service that are not Pods were left out.
pub const EVENT_NON_POD_ENDPOINT: &str = "NonPodEndpointSkipped";
/// Event reason: annotations berth does not implement.
pub const EVENT_UNSUPPORTED_ANNOTATION: &str = "UnsupportedAnnotation";

/// Subnet lookups are reused this long.
const SUBNET_CACHE: Duration = Duration::from_secs(60);

/// An apply that left the load balancer active stands this long for the same desired
/// state: the events a new Service brings right after its apply (its finalizer, its
/// EndpointSlice, its status) then cost no AWS call. Drift is still found by the next
/// change or resync.
const RECENT_APPLY: Duration = Duration::from_secs(5);

/// The last apply that left a Service's load balancer active: what was desired, when, and
/// what it found.
type RecentApply = (DesiredLoadBalancer, Instant, deploy::Applied);

/// Node instances asked for their VPC (one DescribeInstances filter's worth).
const MAX_INSTANCE_LOOKUP: usize = 200;

pub struct AwsProvider<A = client::Aws> {
    aws: FencedAws<A>,
    inventory: Inventory,
    /// Subnet lookups by (choice, scheme, vpc).
    subnets: Mutex<HashMap<String, SubnetLookup>>,
    /// The VPC of the nodes' instances, when no class or flag names one, and when found.
    node_vpc: Mutex<Option<(Instant, String)>>,
    /// Per Service UID.
    recent: Mutex<HashMap<String, RecentApply>>,
    /// CIDRs by VPC (what an internal NLB admits by default).
    vpc_cidrs: Mutex<HashMap<String, SubnetLookup>>,
    /// The nodes' security groups, for the node instances they were found for.
    node_groups: Mutex<Option<(Instant, BTreeSet<String>, security_groups::NodeGroups)>>,
    /// Warnings published per Service UID (`reason/message`): each becomes an Event once,
    /// not once per reconcile.
    warned: Mutex<HashMap<String, BTreeSet<String>>>,
    stores: Stores,
    config: Config,
    client: kube::Client,
    metrics: Arc<Metrics>,
    /// Resolved on first use: a controller without AWS classes never needs it.
    identity: OnceLock<Identity>,
    /// Each `ip`-target Service's view of its pods' targets, for their readiness gates.
    gates: Arc<readiness::Gates>,
}

/// Requeue while targets are being registered or held for their replacements: their
/// health is only learnt by looking.
const SETTLING: Duration = Duration::from_secs(2);

fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().unwrap_or_default()
}

/// The reason and provider error for a failed apply. Pure.
fn failure(e: &ApplyError) -> (&'static str, ProviderError) {
    let (reason, label) = match e {
        ApplyError::Aws(a) if a.is(FENCED_CODE) => (reason::AWS_ERROR, FENCED),
        ApplyError::Aws(_) => (reason::AWS_ERROR, "aws"),
        ApplyError::NameConflict(_) => (reason::NAME_CONFLICT, "name_conflict"),
        ApplyError::DeletionProtected { .. } => (reason::DELETION_PROTECTED, "deletion_protected"),
        ApplyError::ReplacementPending(_) => {
            (replacement::REPLACEMENT_PENDING, "replacement_pending")
        }
    };
    let error = ProviderError {
        label,
        message: e.to_string(),
    };
    (reason, error)
}

/// Whether a port of the Service lacks a NodePort (instance targets need them).
fn lacks_node_ports(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ps| ps.iter().any(|p| p.node_port.is_none()))
}

impl<A: AwsApi> AwsProvider<A> {
    pub fn new(
        aws: A,
        fence: Fence,
        stores: Stores,
        config: Config,
        client: kube::Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            aws: FencedAws::new(aws, fence, metrics.clone()),
            inventory: Inventory::default(),
            subnets: Mutex::default(),
            node_vpc: Mutex::default(),
            recent: Mutex::default(),
            vpc_cidrs: Mutex::default(),
            node_groups: Mutex::default(),
            warned: Mutex::default(),
            stores,
            config,
            client,
            metrics,
            identity: OnceLock::new(),
            gates: Arc::default(),
        }
    }

    /// Shares the readiness-gate views with the gate writer.
    pub fn with_gates(mut self, gates: Arc<readiness::Gates>) -> Self {
        self.gates = gates;
        self
    }

    /// The pods of the Service's namespace that wait only for berth's readiness gate.
    fn gated_ready(&self, svc: &Service) -> BTreeSet<String> {
        let ns = svc.namespace().unwrap_or_default();
        self.stores
            .pods
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
            .filter(|p| readiness::gated_ready(p))
            .map(|p| format!("{ns}/{}", p.name_any()))
            .collect()
    }

    /// This cluster's identity: `--cluster-id`, else the `kube-system` Namespace's UID.
    async fn identity(&self) -> Result<Identity, AwsError> {
        if let Some(i) = self.identity.get() {
            return Ok(i.clone());
        }
        let id = identity::resolve(&self.client, self.config.cluster_id.as_deref())
            .await
            .map_err(|e| AwsError::other("ClusterIdentity", e.to_string()))?;
        let resolved = Identity::new(id, self.config.cluster_name.clone());
        tracing::info!(cluster_id = %resolved.id, "cluster identity");
        Ok(self.identity.get_or_init(|| resolved).clone())
    }

    /// Whether a class this controller handles uses AWS. Without one the controller makes
    /// no AWS call at all (a bare-metal install has no credentials): the one place that
    /// decides it.
    pub fn in_use(&self) -> bool {
        self.stores
            .classes
            .state()
            .iter()
            .any(|c| c.spec.aws.is_some() && self.config.handles_class(&c.name_any()))
    }

    async fn resolve_subnets(
        &self,
        choice: &SubnetChoice,
        scheme: Scheme,
        vpc: &str,
    ) -> Result<Vec<String>, SubnetError> {
        let key = format!("{choice:?}/{scheme:?}/{vpc}");
        if let Ok(cache) = self.subnets.lock()
            && let Some((at, s)) = cache.get(&key)
            && at.elapsed() < SUBNET_CACHE
            && !s.is_empty()
        {
            return Ok(s.clone());
        }
        let cluster = &self.config.cluster_name;
        let found = subnets::resolve(&self.aws, choice, scheme, vpc, cluster).await?;
        if let Ok(mut cache) = self.subnets.lock() {
            cache.insert(key, (Instant::now(), found.clone()));
        }
        Ok(found)
    }

    /// The class's VPC: its `vpcID`, else `--vpc-id`, else the one VPC of the nodes'
    /// instances. Subnets are only ever looked up inside it, so discovery never spans the
    /// account's other VPCs; nodes in several VPCs need an explicit one.
    async fn vpc(&self, class: &AwsClass) -> Result<String, Outcome> {
        if let Some(vpc) = class.vpc_id.clone().or_else(|| self.config.vpc_id.clone()) {
            return Ok(vpc);
        }
        if let Ok(cached) = self.node_vpc.lock()
            && let Some((at, vpc)) = cached.as_ref()
            && at.elapsed() < SUBNET_CACHE
        {
            return Ok(vpc.clone());
        }
        let nodes = self.stores.nodes.state();
        let ids: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| n.spec.as_ref()?.provider_id.as_deref())
            .filter_map(model::instance_id)
            .map(str::to_string)
            .collect();
        let ids: Vec<String> = ids.into_iter().take(MAX_INSTANCE_LOOKUP).collect();
        let unknown = |why: String| {
            let message = format!("{why}: set the class's vpcID or the controller's --vpc-id");
            Outcome::invalid(reason::VPC_UNKNOWN, message)
        };
        if ids.is_empty() {
            return Err(unknown("no node has an AWS providerID".into()));
        }
        let vpcs = self
            .aws
            .instance_vpcs(&ids)
            .await
            .map_err(|e| failed(&e.into()))?;
        let mut vpcs = vpcs.into_iter();
        match (vpcs.next(), vpcs.next()) {
            (Some(vpc), None) => {
                if let Ok(mut cached) = self.node_vpc.lock() {
                    *cached = Some((Instant::now(), vpc.clone()));
                }
                Ok(vpc)
            }
            (None, _) => Err(unknown("the nodes' instances were not found".into())),
            (Some(a), Some(b)) => Err(unknown(format!(
                "the nodes are in several VPCs ({a}, {b}, ...)"
            ))),
        }
    }

    /// The VPC's CIDRs, when the Service's managed group admits them by default (an
    /// internal NLB naming no sources); else none, without asking AWS.
    async fn default_sources(
        &self,
        settings: &Settings,
        vpc: &str,
    ) -> Result<Vec<String>, Outcome> {
        let needed = settings.scheme == Scheme::Internal
            && settings.frontend == FrontendChoice::Managed
            && settings.source_ranges.is_none()
            && settings.prefix_lists.is_empty();
        if !needed {
            return Ok(Vec::new());
        }
        if let Ok(cache) = self.vpc_cidrs.lock()
            && let Some((at, c)) = cache.get(vpc)
            && at.elapsed() < SUBNET_CACHE
        {
            return Ok(c.clone());
        }
        let cidrs = self
            .aws
            .vpc_cidrs(vpc)
            .await
            .map_err(|e| failed(&e.into()))?;
        if cidrs.is_empty() {
            let message =
                format!("VPC {vpc} has no CIDR to admit by default: set loadBalancerSourceRanges");
            return Err(Outcome::invalid(reason::INVALID_SPEC, message));
        }
        if let Ok(mut cache) = self.vpc_cidrs.lock() {
            cache.insert(vpc.to_string(), (Instant::now(), cidrs.clone()));
        }
        Ok(cidrs)
    }

    /// The groups of the node instances `ids`, cached like their VPC: instances rarely
    /// change groups, and every new Service would otherwise describe them again.
    async fn node_groups(
        &self,
        ids: &BTreeSet<String>,
    ) -> Result<security_groups::NodeGroups, Outcome> {
        if let Ok(cached) = self.node_groups.lock()
            && let Some((at, for_ids, groups)) = cached.as_ref()
            && at.elapsed() < SUBNET_CACHE
            && for_ids == ids
        {
            return Ok(groups.clone());
        }
        let cluster = &self.config.cluster_name;
        let groups = security_groups::node_groups(&self.aws, ids, cluster)
            .await
            .map_err(|e| failed(&e.into()))?;
        if let Ok(mut cached) = self.node_groups.lock() {
            *cached = Some((Instant::now(), ids.clone(), groups.clone()));
        }
        Ok(groups)
    }

    /// Only Pods as `ip` targets: the addresses left out, as warnings.
    fn skipped_endpoints(&self, settings: &Settings, slices: &[Arc<EndpointSlice>]) -> Vec<Note> {
        if settings.target_type != TargetType::Ip || settings.allow_non_pod_targets {
            return Vec::new();
        }
        let skipped = model::non_pod_addresses(slices);
        if skipped.is_empty() {
            return Vec::new();
        }
        let list: Vec<String> = skipped.into_iter().collect();
        vec![warning(
            EVENT_NON_POD_ENDPOINT,
            format!(
                "not registering endpoints that are not Pods (ip targets take only Pods unless the class sets allowNonPodTargets): {}",
                list.join(", ")
            ),
        )]
    }

    /// The notes not published yet for `svc`; remembers the current ones (a warning whose
    /// cause went away and came back is published again).
    fn unwarned(&self, svc: &Service, notes: Vec<Note>) -> Vec<Note> {
        let Ok(mut warned) = self.warned.lock() else {
            return notes;
        };
        let current: BTreeSet<String> = notes
            .iter()
            .map(|n| format!("{}/{}", n.reason, n.message))
            .collect();
        let before = warned.insert(uid(svc), current).unwrap_or_default();
        notes
            .into_iter()
            .filter(|n| !before.contains(&format!("{}/{}", n.reason, n.message)))
            .collect()
    }

    /// The Service's outcome with what berth ignores said: the unimplemented annotations
    /// in the condition message and, with the skipped endpoints, as Warning Events once.
    fn with_warnings(&self, svc: &Service, mut out: Outcome, mut notes: Vec<Note>) -> Outcome {
        let ignored = annotations::unimplemented(svc);
        if !ignored.is_empty() {
            let list = ignored.join(", ");
            if let Report::Set { readiness, .. } = &mut out.report {
                readiness.message = format!(
                    "{}; ignored annotations berth does not implement: {list}",
                    readiness.message
                );
            }
            notes.push(warning(
                EVENT_UNSUPPORTED_ANNOTATION,
                format!("berth does not implement these annotations and ignores them: {list}"),
            ));
        }
        if out.error.as_ref().is_some_and(|e| e.is_fenced()) {
            // Nothing is published for a fenced outcome: keep the warnings for later.
            return out;
        }
        let fresh = self.unwarned(svc, notes);
        out.events.extend(fresh);
        out
    }

    /// Names the Service's load balancer may have: the generated one under every class's
    /// prefix, and the annotation's.
    fn candidate_names(&self, svc: &Service) -> Vec<String> {
        let prefixes: Vec<String> = self
            .stores
            .classes
            .state()
            .iter()
            .filter_map(|c| c.spec.aws.as_ref()?.name_prefix.clone())
            .chain(std::iter::once("k8s".to_string()))
            .collect();
        let hash_input = format!("{}/{}", self.config.cluster_name, uid(svc));
        let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        let mut names: Vec<String> = prefixes
            .iter()
            .map(|p| naming::resource_name(p, &ns, &name, &hash_input))
            .collect();
        if let Some(n) = svc.annotations().get(keys::NAME)
            && naming::valid_lb_name(n)
        {
            names.push(n.clone());
        }
        names.sort();
        names.dedup();
        names
    }

    fn slices_of(&self, svc: &Service) -> Vec<Arc<EndpointSlice>> {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        self.stores.slices.state_filter(|s| {
            s.namespace().as_deref() == Some(ns.as_str())
                && s.labels().get(LABEL_SERVICE_NAME).map(String::as_str) == Some(name.as_str())
        })
    }

    /// Everything the apply needs, from the Service, its class, the stores and reads of
    /// AWS: the desired load balancer with this cluster's identity, and the warnings about
    /// endpoints left out. An `Err` is the outcome to report instead.
    async fn desire(
        &self,
        svc: &Service,
        class: &LoadBalancerClass,
    ) -> Result<(DesiredLoadBalancer, Identity, Vec<Note>), Outcome> {
        let Some(aws_class) = class.spec.aws.as_ref() else {
            return Err(Outcome::invalid(
                reason::UNSUPPORTED_PROVIDER,
                "no aws block",
            ));
        };
        if let Some(refused) = refusal(svc, class, aws_class) {
            return Err(refused);
        }
        let settings = annotations::settings(svc, aws_class, &self.config.cluster_name)
            .map_err(|errors| Outcome::invalid(reason::INVALID_ANNOTATION, errors.join("; ")))?;
        if settings.target_type == TargetType::Instance && lacks_node_ports(svc) {
            return Err(Outcome::done().then(Next::NodePorts));
        }
        let vpc = self.vpc(aws_class).await?;
        let subnets = match self
            .resolve_subnets(&settings.subnets, settings.scheme, &vpc)
            .await
        {
            Ok(v) => v,
            Err(SubnetError::Aws(e)) => return Err(failed(&e.into())),
            Err(e @ SubnetError::OutsideVpc { .. }) => {
                let annotated = svc.annotations().contains_key(keys::SUBNETS);
                let reason = if annotated {
                    reason::OVERRIDE_REFUSED
                } else {
                    reason::INVALID_SPEC
                };
                return Err(Outcome::invalid(reason, e.to_string()));
            }
        };
        let vpc_cidrs = self.default_sources(&settings, &vpc).await?;
        let subnet_cidrs = self.subnet_cidrs(&settings, &subnets).await?;
        let (slices, nodes) = (self.slices_of(svc), self.stores.nodes.state());
        let gated_ready = match settings.target_type {
            TargetType::Ip => self.gated_ready(svc),
            TargetType::Instance => BTreeSet::new(),
        };
        let world = World {
            cluster: &self.config.cluster_name,
            vpc_id: &vpc,
            vpc_cidrs: &vpc_cidrs,
            subnets: &subnets,
            subnet_cidrs: &subnet_cidrs,
            nodes: &nodes,
            slices: &slices,
            gated_ready: &gated_ready,
        };
        let mut desired = model::build(svc, &settings, &world).map_err(|e| match e {
            BuildError::NoSubnets => Outcome::invalid(reason::NO_SUBNETS, e.to_string()),
            BuildError::InvalidSpec(_) => Outcome::invalid(reason::INVALID_SPEC, e.to_string()),
            BuildError::InvalidAnnotation(_) => {
                Outcome::invalid(reason::INVALID_ANNOTATION, e.to_string())
            }
        })?;
        let mut skipped = self.skipped_endpoints(&settings, &slices);
        skipped.extend(
            security_groups::warnings(&settings)
                .into_iter()
                .map(|m| warning(security_groups::SOURCE_RANGES_NOT_ENFORCED, m)),
        );
        desired.security.node_groups = self.node_groups(&desired.security.nodes).await?;
        let identity = self.identity().await.map_err(|e| failed(&e.into()))?;
        identity.stamp(&mut desired);
        Ok((desired, identity, skipped))
    }

    /// The CIDRs of the subnets, read only when static private or IPv6 addresses must be
    /// matched to them.
    async fn subnet_cidrs(
        &self,
        settings: &Settings,
        subnets: &[String],
    ) -> Result<std::collections::BTreeMap<String, Vec<ipnet::IpNet>>, Outcome> {
        let a = &settings.addresses;
        if (a.private_ipv4.is_empty() && a.ipv6.is_empty()) || subnets.is_empty() {
            return Ok(Default::default());
        }
        let query = api::SubnetQuery {
            ids: Some(subnets.to_vec()),
            filters: Vec::new(),
        };
        let found = self
            .aws
            .describe_subnets(&query)
            .await
            .map_err(|e| failed(&e.into()))?;
        Ok(found.into_iter().map(|c| (c.id, c.cidrs)).collect())
    }

    async fn ensure_now(&self, svc: &Service, class: &LoadBalancerClass) -> Outcome {
        let adopting = adopts(svc, class);
        if adopting && let Some(why) = adopt::blocked(svc) {
            return Outcome::invalid(adopt::ADOPTION_BLOCKED, why);
        }
        let (desired, identity, skipped) = match self.desire(svc, class).await {
            Ok(d) => d,
            Err(out) => return out,
        };
        let uid = uid(svc);
        let mut out = match self.recently_applied(&uid, &desired) {
            Some(applied) => applied_outcome(svc, &applied),
            None => self.apply(svc, desired, &identity, &uid, adopting).await,
        };
        // What the NLB does not enforce is said in the condition too, never only once
        // (also when the outcome is the recent apply's).
        let unenforced: Vec<&str> = skipped
            .iter()
            .filter(|n| n.reason == security_groups::SOURCE_RANGES_NOT_ENFORCED)
            .map(|n| n.message.as_str())
            .collect();
        if let Report::Set { readiness, .. } = &mut out.report
            && !unenforced.is_empty()
        {
            readiness.message = format!("{}; {}", readiness.message, unenforced.join("; "));
        }
        out.events.extend(skipped);
        out
    }

    /// Makes AWS match `desired` (adopting LBC's resources first when the class does),
    /// remembering an apply that left the NLB active.
    async fn apply(
        &self,
        svc: &Service,
        mut desired: DesiredLoadBalancer,
        identity: &Identity,
        uid: &str,
        adopting: bool,
    ) -> Outcome {
        let owner = Owner { identity, uid };
        if adopting && let Err(e) = self.adopt(svc, &mut desired, owner).await {
            return failed(&e.into());
        }
        let annotations = svc.annotations();
        let gate = |r: &replacement::Replacement| replacement::acknowledged(annotations, r);
        let applied = deploy::ensure_gated(&self.aws, &self.inventory, &desired, owner, &gate);
        let result = applied.await;
        self.remember(uid, &desired, result.as_ref().ok());
        match result {
            Ok(applied) => {
                let ip = desired
                    .target_groups
                    .iter()
                    .any(|t| t.target_type == TargetType::Ip);
                if ip {
                    let view = readiness::verdicts(&desired, &applied.targets);
                    self.gates.record(uid, view);
                } else {
                    self.gates.forget(uid);
                }
                applied_outcome(svc, &applied)
            }
            // The old load balancer stays as it is: the condition says what waits and how
            // to acknowledge it, once as an Event.
            Err(e @ ApplyError::ReplacementPending(_)) => {
                let note = warning(replacement::REPLACEMENT_PENDING, e.to_string());
                Outcome::invalid(replacement::REPLACEMENT_PENDING, e.to_string())
                    .with_events(vec![note])
            }
            Err(e) => failed(&e),
        }
    }

    /// The apply of `desired` for the Service made within [`RECENT_APPLY`] that left its
    /// load balancer active.
    fn recently_applied(
        &self,
        uid: &str,
        desired: &DesiredLoadBalancer,
    ) -> Option<deploy::Applied> {
        let recent = self.recent.lock().ok()?;
        let (was, at, applied) = recent.get(uid)?;
        (was == desired && at.elapsed() < RECENT_APPLY).then(|| applied.clone())
    }

    /// Keeps an apply that left the load balancer active and its targets settled; forgets
    /// the Service otherwise (a settling apply must look at target health again).
    fn remember(
        &self,
        uid: &str,
        desired: &DesiredLoadBalancer,
        applied: Option<&deploy::Applied>,
    ) {
        let Ok(mut recent) = self.recent.lock() else {
            return;
        };
        recent.retain(|_, (_, at, _)| at.elapsed() < RECENT_APPLY);
        match applied.filter(|a| a.lb.state == "active" && !a.settling) {
            Some(a) => {
                recent.insert(uid.into(), (desired.clone(), Instant::now(), a.clone()));
            }
            None => {
                recent.remove(uid);
            }
        }
    }

    /// Takes over the NLB the AWS Load Balancer Controller made for the Service, if any:
    /// `desired` gets its names, and it gets berth's tags.
    async fn adopt(
        &self,
        svc: &Service,
        desired: &mut DesiredLoadBalancer,
        owner: Owner<'_>,
    ) -> Result<(), AwsError> {
        let stack = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let cluster = &self.config.cluster_name;
        let Some(found) = adopt::find(&self.aws, &self.inventory, owner, cluster, &stack).await?
        else {
            return Ok(());
        };
        adopt::take_names(desired, &found);
        adopt::take_over(&self.aws, &self.inventory, &found, desired, owner).await
    }

    /// What [`Provider::ensure`] would write to AWS for the Service, computed by the same
    /// code against what exists, with every write recorded instead of made. Learns the
    /// Service's earlier resources first (as a starting controller does). An `Err` is the
    /// outcome the controller would report instead of applying anything.
    pub async fn plan(&self, svc: &Service, class: &LoadBalancerClass) -> Result<Plan, Outcome> {
        let (desired, identity, _) = self.desire(svc, class).await?;
        gc::refresh(&self.aws, &self.inventory, &identity)
            .await
            .map_err(|e| failed(&e.into()))?;
        let uid = uid(svc);
        let owner = Owner {
            identity: &identity,
            uid: &uid,
        };
        let replacement = replacement::pending(&self.aws, &self.inventory, &desired, owner)
            .await
            .map_err(|e| failed(&e))?;
        let acknowledged = replacement
            .as_ref()
            .is_some_and(|r| replacement::acknowledged(svc.annotations(), r));
        let dry = dryrun::DryRun::new(&self.aws);
        deploy::ensure(&dry, &self.inventory, &desired, owner)
            .await
            .map_err(|e| failed(&e))?;
        Ok(Plan {
            desired,
            replacement,
            acknowledged,
            steps: dry.steps(),
        })
    }

    async fn release_now(&self, svc: &Service, deleting: bool) -> Outcome {
        if deleting && let Ok(mut warned) = self.warned.lock() {
            warned.remove(&uid(svc));
        }
        if let Ok(mut recent) = self.recent.lock() {
            recent.remove(&uid(svc));
        }
        self.gates.forget(&uid(svc));
        if !self.in_use() {
            return Outcome::done();
        }
        let keep_protection = svc
            .annotations()
            .get(keys::ATTRIBUTES)
            .and_then(|v| annotations::parse_map(v, false).ok())
            .and_then(|m| m.get("deletion_protection.enabled").cloned())
            .is_some_and(|v| v == "true");
        let names = self.candidate_names(svc);
        let removed = match self.identity().await {
            Ok(identity) => {
                let uid = uid(svc);
                let owner = Owner {
                    identity: &identity,
                    uid: &uid,
                };
                // Still alive but no longer berth's: what was adopted goes back as it was.
                let handed = if deleting {
                    Ok(0)
                } else {
                    adopt::hand_back(&self.aws, &self.inventory, owner).await
                };
                match handed {
                    Ok(_) => {
                        deploy::remove(&self.aws, &self.inventory, owner, &names, keep_protection)
                            .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        };
        match removed {
            Ok(0) => Outcome::done(),
            Ok(_) => Outcome::done().with_events(vec![Note::normal(
                "Deleted",
                "deleted the load balancer, its target groups and security groups",
            )]),
            // The finalizer stays until protection is off: the Service (Terminating when
            // deleted) keeps saying why its load balancer is still there.
            Err(e @ ApplyError::DeletionProtected { .. }) => {
                let note = Note {
                    warning: true,
                    reason: reason::DELETION_PROTECTED,
                    message: e.to_string(),
                };
                Outcome::invalid(reason::DELETION_PROTECTED, e.to_string())
                    .with_events(vec![note])
                    .then(Next::Requeue(Duration::from_secs(30)))
            }
            Err(e) => {
                let (reason, error) = failure(&e);
                if deleting || error.is_fenced() {
                    Outcome {
                        error: Some(error),
                        ..Outcome::done()
                    }
                } else {
                    Outcome::failed(reason, error)
                }
            }
        }
    }

    /// One orphan sweep: refreshes the inventory and deletes what gone Services left.
    async fn sweep(&self) {
        let live: gc::Live = self
            .stores
            .services
            .state()
            .iter()
            .filter_map(|s| {
                let ns = s.namespace().unwrap_or_default();
                Some((s.metadata.uid.clone()?, format!("{ns}/{}", s.name_any())))
            })
            .collect();
        let identity = match self.identity().await {
            Ok(i) => i,
            Err(e) => return tracing::warn!(error = %e, "orphan sweep skipped"),
        };
        let client = &self.client;
        let exists = |r: gc::Tagged| async move { gc::service_exists(client, &r).await };
        match gc::sweep(&self.aws, &self.inventory, &identity, &live, exists).await {
            Ok(report) => {
                self.metrics
                    .gc_deleted
                    .fetch_add(report.deleted as u64, Ordering::Relaxed);
                if report != gc::SweepReport::default() {
                    tracing::info!(?report, "orphan sweep");
                }
            }
            Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
        }
    }
}

/// Whether the Service is one the AWS Load Balancer Controller would serve and its class
/// opts in to adopting that controller's NLBs. Pure.
fn adopts(svc: &Service, class: &LoadBalancerClass) -> bool {
    adopt::lbc_serves(svc)
        && class
            .spec
            .aws
            .as_ref()
            .is_some_and(|a| a.adopts(berth_crds::AdoptSource::AwsLoadBalancerController))
}

/// The class's policy over the Service's annotations: an `allowedOverrides` entry naming
/// nothing (the class is wrong), or annotations it does not allow. Refused Services get
/// nothing new: no load balancer is created or changed (an existing one stays as it was)
/// until the annotations go or the class allows them. Pure.
fn refusal(svc: &Service, class: &LoadBalancerClass, aws: &AwsClass) -> Option<Outcome> {
    let unknown = annotations::unknown_overrides(aws);
    if !unknown.is_empty() {
        let groups: Vec<&str> = annotations::Group::ALL.iter().map(|g| g.name()).collect();
        let message = format!(
            "LoadBalancerClass {}: allowedOverrides entries {unknown:?} name no annotation berth implements nor a group ({})",
            class.name_any(),
            groups.join(", ")
        );
        return Some(Outcome::invalid(reason::INVALID_SPEC, message));
    }
    let refused = annotations::refused_overrides(svc, aws);
    if refused.is_empty() {
        return None;
    }
    let message = format!(
        "LoadBalancerClass {} does not allow these overrides, so nothing was created or changed: {}",
        class.name_any(),
        refused.join("; ")
    );
    Some(Outcome::invalid(reason::OVERRIDE_REFUSED, message))
}

fn warning(reason: &'static str, message: String) -> Note {
    Note {
        warning: true,
        reason,
        message,
    }
}

fn failed(e: &ApplyError) -> Outcome {
    let (reason, error) = failure(e);
    Outcome::failed(reason, error)
}

/// Ready once the load balancer is active; until then the condition says Provisioning.
fn applied_outcome(svc: &Service, applied: &deploy::Applied) -> Outcome {
    let out = ready_or_provisioning(svc, applied);
    if applied.backend_problems.is_empty() {
        return out;
    }
    let message = format!(
        "backend security group rules missing (the targets' traffic may be blocked): {}",
        applied.backend_problems.join("; ")
    );
    out.with_events(vec![warning(
        security_groups::BACKEND_GROUP_UNKNOWN,
        message,
    )])
}

fn ready_or_provisioning(svc: &Service, applied: &deploy::Applied) -> Outcome {
    let ingress = Ingress::Set(hostname_ingress(svc, &applied.lb.dns_name));
    if applied.lb.state == "active" {
        let targets: Vec<String> = applied
            .health
            .values()
            .map(|(h, t)| format!("{h}/{t}"))
            .collect();
        let message = format!(
            "load balancer {} ({}) is active; healthy targets per port: {}",
            applied.lb.name,
            applied.lb.dns_name,
            targets.join(", ")
        );
        let out = Outcome::report(Readiness::ready(message), ingress);
        if applied.settling {
            out.then(Next::Requeue(SETTLING))
        } else {
            out
        }
    } else {
        let message = format!("load balancer {} is {}", applied.lb.name, applied.lb.state);
        Outcome::report(Readiness::not_ready(reason::PROVISIONING, message), ingress)
            .then(Next::Requeue(Duration::from_secs(3)))
    }
}

impl<A: AwsApi + 'static> Provider for AwsProvider<A> {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn serves(&self, class: &LoadBalancerClass) -> bool {
        class.spec.aws.is_some()
    }

    fn ensure<'a>(
        &'a self,
        svc: &'a Service,
        class: &'a LoadBalancerClass,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let mut out = self.ensure_now(svc, class).await;
            // Every warning of this provider is published once, not once per reconcile.
            let notes = std::mem::take(&mut out.events);
            let (own, others): (Vec<Note>, Vec<Note>) = notes.into_iter().partition(|n| n.warning);
            out.events = others;
            self.with_warnings(svc, out, own)
        })
    }

    fn release<'a>(&'a self, svc: &'a Service, deleting: bool) -> BoxFuture<'a, Outcome> {
        Box::pin(self.release_now(svc, deleting))
    }

    fn verdict(&self, class: &LoadBalancerClass) -> Verdict {
        let unknown = class
            .spec
            .aws
            .as_ref()
            .map(annotations::unknown_overrides)
            .unwrap_or_default();
        if !unknown.is_empty() {
            return Verdict {
                accepted: false,
                reason: reason::INVALID_SPEC,
                message: format!("allowedOverrides entries {unknown:?} name nothing"),
                addresses: None,
            };
        }
        let lbc = berth_crds::AdoptSource::AwsLoadBalancerController;
        if class.spec.aws.as_ref().is_some_and(|a| a.adopts(lbc)) {
            return match adopt::adopter(&self.stores.classes.state()) {
                adopt::Adopter::Conflict(names) => Verdict {
                    accepted: false,
                    reason: adopt::ADOPT_CONFLICT,
                    message: format!(
                        "adoptFrom [{}] is set on classes {}: none of them adopts until only one does (their berth.dev/ Services are still served)",
                        adopt::FROM_LBC,
                        names.join(", ")
                    ),
                    addresses: None,
                },
                _ => Verdict {
                    accepted: true,
                    reason: "Accepted",
                    message: format!(
                        "aws provider; serves {} Services and adopts the NLBs the AWS Load Balancer Controller made for them",
                        adopt::LBC_CLASS
                    ),
                    addresses: None,
                },
            };
        }
        Verdict {
            accepted: true,
            reason: "Accepted",
            message: "aws provider".into(),
            addresses: None,
        }
    }

    /// Learns what exists before the first reconcile (a predecessor may have died
    /// mid-way).
    fn prepare(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !self.in_use() {
                return;
            }
            let refreshed = match self.identity().await {
                Ok(identity) => gc::refresh(&self.aws, &self.inventory, &identity).await,
                Err(e) => Err(e),
            };
            if let Err(e) = refreshed {
                tracing::warn!(error = %e, "initial inventory sweep failed");
            }
        })
    }

    fn maintain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // The Service store must hold the first full list: sweeping before would take
            // every Service for gone.
            let mut synced = self.stores.services_synced.clone();
            if synced.wait_for(|s| *s).await.is_err() {
                return futures::future::pending().await;
            }
            loop {
                tokio::time::sleep(self.config.gc_interval).await;
                if self.in_use() {
                    self.sweep().await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use clap::Parser;

    use super::*;
    use crate::provider::Report;
    use crate::provider::aws::annotations::tests::{node, service};
    use crate::provider::aws::fake::FakeAws;
    use crate::stores::testing::stores;

    fn class() -> LoadBalancerClass {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": "lab"},
            "spec": {"aws": {"scheme": "internet-facing", "targetType": "instance"}}
        }))
        .expect("class")
    }

    fn provider(fence: Fence) -> AwsProvider<FakeAws> {
        let fake = FakeAws::default();
        for (id, zone) in [("subnet-a", "us-east-1a"), ("subnet-b", "us-east-1b")] {
            fake.add_subnet(id, "vpc-1", zone, &[("kubernetes.io/role/elb", "1")]);
        }
        fake.add_subnet(
            "subnet-z",
            "vpc-2",
            "us-east-1a",
            &[("kubernetes.io/role/elb", "1")],
        );
        fake.add_instance("i-1", "vpc-1");
        fake.add_instance("i-2", "vpc-1");
        // As in the e2e environment: a cluster-tagged group and another one.
        let cluster = [("kubernetes.io/cluster/c1", "owned")];
        fake.add_group("sg-nodes", "vpc-1", &cluster, &["i-1", "i-2"]);
        fake.add_group("sg-other", "vpc-1", &[], &["i-1", "i-2"]);
        let nodes = vec![node("n1", "i-1", &[]), node("n2", "i-2", &[])];
        let args = ["x", "--cluster-name", "c1", "--cluster-id", "id-1"];
        let config = Config::try_parse_from(args).expect("config");
        let url = "http://127.0.0.1:9".parse().expect("url");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
        let stores = stores(vec![class()], Vec::new(), nodes);
        let metrics = Arc::new(Metrics::default());
        AwsProvider::new(fake, fence, stores, config, client, metrics)
    }

    #[tokio::test]
    async fn ensure_builds_the_load_balancer_and_reports_its_hostname() {
        let p = provider(Fence::unfenced());
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        svc.metadata.uid = Some("u1".into());
        let out = p.ensure(&svc, &class()).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let Report::Set { readiness, ingress } = &out.report else {
            panic!("no status: {:?}", out.report);
        };
        assert!(
            readiness.ready || readiness.reason == reason::PROVISIONING,
            "{readiness:?}"
        );
        let Ingress::Set(entries) = ingress else {
            panic!("no ingress");
        };
        assert!(entries[0].hostname.is_some());
        let (lbs, listeners) = {
            let state = p.aws.inner().state();
            (state.lbs.len(), state.listeners.len())
        };
        assert_eq!((lbs, listeners), (1, 1));
        // Again: nothing left to change.
        p.aws.inner().take_calls();
        let again = p.ensure(&svc, &class()).await;
        assert!(again.error.is_none());
        assert!(
            p.aws.inner().take_calls().is_empty(),
            "a second ensure mutated AWS"
        );
    }

    /// Every AWS request a new one-port Service costs, by operation: tags go with each
    /// create, nothing is described that was created just now, one RegisterTargets per
    /// target group. An added call fails this test (budget: 10 in all; LocalStack's
    /// provisioning state adds one DescribeLoadBalancers, checked end to end by
    /// tests/tests/serial_aws_throttling.rs). A reconcile right after costs nothing; a later
    /// one of the unchanged Service reads only, its tags coming with the resources it
    /// reads, not from another DescribeTags.
    #[tokio::test]
    async fn a_new_one_port_service_costs_few_aws_calls() {
        let p = provider(Fence::unfenced());
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        svc.metadata.uid = Some("u1".into());
        assert!(p.ensure(&svc, &class()).await.error.is_none());
        let calls = p.aws.inner().take_operations();
        // The first Service also pays for what the provider caches for a minute: the
        // nodes' VPC and groups (DescribeInstances twice, the groups' tags since the
        // nodes have two) and the subnets.
        let expected = BTreeMap::from([
            ("DescribeInstances", 2),
            ("DescribeSecurityGroups", 1),
            ("DescribeSubnets", 1),
            ("DescribeLoadBalancers", 1),
            ("CreateSecurityGroup", 1),
            // The managed group's rule, then the backend rule on the nodes' group.
            ("AuthorizeSecurityGroupIngress", 2),
            ("CreateLoadBalancer", 1),
            ("CreateTargetGroup", 1),
            ("RegisterTargets", 1),
            ("CreateListener", 1),
        ]);
        assert_eq!(calls, expected);

        // Every further new Service: nothing is read but the adoption check by name.
        let mut other = service(&[("http", 80, "TCP", Some(30081))], &[]);
        other.metadata.name = Some("other".into());
        other.metadata.uid = Some("u2".into());
        assert!(p.ensure(&other, &class()).await.error.is_none());
        let calls = p.aws.inner().take_operations();
        let expected = BTreeMap::from([
            ("DescribeLoadBalancers", 1),
            ("CreateSecurityGroup", 1),
            ("AuthorizeSecurityGroupIngress", 2),
            ("CreateLoadBalancer", 1),
            ("CreateTargetGroup", 1),
            ("RegisterTargets", 1),
            ("CreateListener", 1),
        ]);
        assert_eq!(calls, expected);
        assert!(calls.values().sum::<usize>() <= 10);

        assert!(p.ensure(&svc, &class()).await.error.is_none());
        assert_eq!(
            p.aws.inner().take_operations(),
            BTreeMap::new(),
            "the events right after an apply cost nothing"
        );
        p.recent.lock().expect("lock").clear();
        assert!(p.ensure(&svc, &class()).await.error.is_none());
        let again = p.aws.inner().take_operations();
        let expected = BTreeMap::from([
            ("DescribeLoadBalancers", 1),
            ("DescribeTags", 2),
            ("DescribeTargetGroups", 1),
            ("DescribeTargetHealth", 1),
            ("DescribeListeners", 1),
            // The managed group's rules and the nodes' groups' rules, to compare.
            ("DescribeSecurityGroups", 1),
        ]);
        assert_eq!(again, expected, "an unchanged Service only reads");
    }

    #[tokio::test]
    async fn unenforced_source_ranges_stay_in_the_condition_after_the_apply() {
        let p = provider(Fence::unfenced());
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        svc.metadata.uid = Some("u1".into());
        let a = svc.metadata.annotations.get_or_insert_default();
        a.insert(keys::DISABLE_NLB_SG.into(), "true".into());
        let spec = svc.spec.get_or_insert_default();
        spec.load_balancer_source_ranges = Some(vec!["192.0.2.0/24".into()]);
        // The apply, then an event right after it, answered from the recent apply.
        for _ in 0..2 {
            let out = p.ensure(&svc, &class()).await;
            let Report::Set { readiness, .. } = &out.report else {
                panic!("no condition: {:?}", out.error)
            };
            assert!(readiness.message.contains("NOT enforced"), "{readiness:?}");
        }
    }

    /// A one-port Service with its NLB provisioned, an internal subnet to move it to, and
    /// the calls so far forgotten.
    async fn provisioned_with_an_internal_subnet() -> (AwsProvider<FakeAws>, Service) {
        let p = provider(Fence::unfenced());
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        svc.metadata.uid = Some("u1".into());
        assert!(p.ensure(&svc, &class()).await.error.is_none());
        let internal = [("kubernetes.io/role/internal-elb", "1")];
        p.aws
            .inner()
            .add_subnet("subnet-i", "vpc-1", "us-east-1a", &internal);
        p.aws.inner().take_calls();
        (p, svc)
    }

    #[tokio::test]
    async fn plan_records_a_replacement_and_a_modification_and_writes_nothing() {
        use dryrun::Action;
        let (p, svc) = provisioned_with_an_internal_subnet().await;
        let plan = p.plan(&svc, &class()).await.map_err(|_| ()).expect("plan");
        assert!(
            plan.steps.is_empty() && plan.replacement.is_none(),
            "{plan:?}"
        );

        let mut internal = svc.clone();
        let a = internal.metadata.annotations.get_or_insert_default();
        a.insert(keys::SCHEME.into(), "internal".into());
        let plan = p
            .plan(&internal, &class())
            .await
            .map_err(|_| ())
            .expect("plan");
        let r = plan.replacement.as_ref().expect("a replacement");
        assert_eq!(r.changes[0].to, "internal");
        assert!(!plan.acknowledged);
        let lb_steps: Vec<Action> = plan
            .steps
            .iter()
            .filter(|s| s.resource.starts_with("load balancer"))
            .map(|s| s.action)
            .collect();
        assert_eq!(lb_steps, vec![Action::Delete, Action::Create], "{plan:?}");
        // The target groups are adopted by the new load balancer, not created again.
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| s.resource.starts_with("target group") && s.action == Action::Create),
            "{plan:?}"
        );

        let mut slower = svc.clone();
        let a = slower.metadata.annotations.get_or_insert_default();
        a.insert(keys::HC_INTERVAL.into(), "30".into());
        let plan = p
            .plan(&slower, &class())
            .await
            .map_err(|_| ())
            .expect("plan");
        assert!(plan.replacement.is_none());
        assert_eq!(plan.steps.len(), 1, "{plan:?}");
        assert_eq!(plan.steps[0].action, Action::Modify);
        assert!(plan.steps[0].detail.contains("interval 30s"), "{plan:?}");
        assert!(p.aws.inner().take_calls().is_empty(), "plan wrote to AWS");
    }

    #[tokio::test]
    async fn an_unacknowledged_scheme_change_keeps_the_load_balancer_and_says_how() {
        let (p, mut svc) = provisioned_with_an_internal_subnet().await;
        let a = svc.metadata.annotations.get_or_insert_default();
        a.insert(keys::SCHEME.into(), "internal".into());
        let out = p.ensure(&svc, &class()).await;
        let Report::Set { readiness, ingress } = &out.report else {
            panic!("no status: {:?}", out.report);
        };
        assert_eq!(readiness.reason, replacement::REPLACEMENT_PENDING);
        assert!(
            readiness.message.contains(replacement::ACKNOWLEDGE),
            "{readiness:?}"
        );
        assert_eq!(*ingress, Ingress::Keep);
        assert!(
            out.events
                .iter()
                .any(|n| n.warning && n.reason == replacement::REPLACEMENT_PENDING)
        );
        assert!(p.aws.inner().take_calls().is_empty());
        let prefix = format!("{}=", replacement::ACKNOWLEDGE);
        let token = readiness
            .message
            .split_once(&prefix)
            .map(|(_, t)| t.to_string())
            .unwrap_or_default();
        let a = svc.metadata.annotations.get_or_insert_default();
        a.insert(replacement::ACKNOWLEDGE.into(), token);
        let out = p.ensure(&svc, &class()).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let calls = p.aws.inner().take_calls();
        assert!(
            calls.iter().any(|c| c.starts_with("DeleteLoadBalancer")),
            "{calls:?}"
        );
        assert!(
            calls.iter().any(|c| c.starts_with("CreateLoadBalancer")),
            "{calls:?}"
        );
    }

    /// Makes, in the fake, the NLB + target group + listener the AWS Load Balancer
    /// Controller makes for `shop/web` of cluster `cluster`, named with `suffix`.
    async fn lbc_made(p: &AwsProvider<FakeAws>, cluster: &str, suffix: &str) -> (String, String) {
        use adopt::lbc_tags;
        let lbc = |resource: &str| {
            BTreeMap::from([
                (lbc_tags::CLUSTER.to_string(), cluster.to_string()),
                (lbc_tags::STACK.to_string(), "shop/web".to_string()),
                (lbc_tags::RESOURCE.to_string(), resource.to_string()),
            ])
        };
        let tg = model::DesiredTargetGroup {
            name: format!("k8s-shop-web-tg{suffix}"),
            protocol: "TCP".into(),
            port: 30080,
            target_type: TargetType::Instance,
            ipv6: false,
            vpc_id: "vpc-1".into(),
            health_check: annotations::HealthCheck::default_tcp(),
            attributes: BTreeMap::new(),
            tags: lbc("shop/web:80"),
            targets: Default::default(),
            serving: Default::default(),
        };
        let listener = model::DesiredListener {
            port: 80,
            protocol: "TCP".into(),
            certificate: None,
            ssl_policy: None,
            extra_certificates: Vec::new(),
            alpn_policy: None,
            attributes: BTreeMap::new(),
            target_group: tg.name.clone(),
        };
        let lb = DesiredLoadBalancer {
            name: format!("k8s-shop-web-lb{suffix}"),
            scheme: Scheme::InternetFacing,
            ip_address_type: model::IpAddressType::Ipv4,
            subnets: vec!["subnet-a".into(), "subnet-b".into()],
            mappings: Vec::new(),
            security_groups: Vec::new(),
            // LBC's fixture: how it makes its own groups is not what is tested here.
            security: security_groups::Security {
                frontend: security_groups::Frontend::Disabled,
                backend: None,
                nodes: Default::default(),
                node_groups: Default::default(),
            },
            tags: lbc(adopt::lbc_tags::LOAD_BALANCER),
            attributes: BTreeMap::new(),
            listeners: vec![listener.clone()],
            target_groups: vec![tg.clone()],
        };
        let aws = p.aws.inner();
        let lb = aws.create_load_balancer(&lb).await.expect("lb");
        let tg = aws.create_target_group(&tg).await.expect("tg");
        aws.create_listener(&lb.arn, &listener, &tg.arn)
            .await
            .expect("listener");
        aws.take_calls();
        (lb.arn, tg.arn)
    }

    fn lbc_service(finalizers: &[&str]) -> Service {
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        svc.metadata.uid = Some("u1".into());
        svc.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        if let Some(spec) = svc.spec.as_mut() {
            spec.load_balancer_class = Some(adopt::LBC_CLASS.into());
        }
        svc
    }

    #[tokio::test]
    async fn an_lbc_nlb_is_adopted_kept_handed_back_and_deleted() {
        let p = provider(Fence::unfenced());
        let adopting = class_with(serde_json::json!({
            "scheme": "internet-facing", "adoptFrom": ["aws-load-balancer-controller"]
        }));
        let (lb, tg) = lbc_made(&p, "c1", "").await;
        let (other_lb, other_tg) = lbc_made(&p, "another-cluster", "x").await;
        let theirs = |p: &AwsProvider<FakeAws>| {
            let s = p.aws.inner().state();
            (s.lbs[&other_lb].tags.clone(), s.tgs[&other_tg].tags.clone())
        };
        let before = theirs(&p);

        // LBC's finalizer still there: nothing is read or written.
        let blocked = p
            .ensure(&lbc_service(&[adopt::LBC_FINALIZER]), &adopting)
            .await;
        assert!(
            matches!(&blocked.report, Report::Set { readiness, .. } if readiness.reason == adopt::ADOPTION_BLOCKED),
            "{:?}",
            blocked.report
        );
        assert!(p.aws.inner().take_calls().is_empty());

        // Adopted: the same NLB and target group, berth's tags added, LBC's kept.
        let svc = lbc_service(&[]);
        let out = p.ensure(&svc, &adopting).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let Report::Set { ingress, .. } = &out.report else {
            panic!("no status: {:?}", out.report);
        };
        assert_eq!(
            *ingress,
            Ingress::Set(hostname_ingress(&svc, "k8s-shop-web-lb.elb.fake"))
        );
        let calls = p.aws.inner().take_calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("Create") || c.starts_with("Delete")),
            "{calls:?}"
        );
        {
            let s = p.aws.inner().state();
            assert_eq!((s.lbs.len(), s.tgs.len()), (2, 2), "nothing new");
            let t = &s.lbs[&lb].tags;
            assert_eq!(t[berth_crds::tags::SERVICE_UID], "u1");
            assert_eq!(t[berth_crds::tags::CLUSTER_ID], "id-1");
            assert_eq!(t[berth_crds::tags::ADOPTED_FROM], adopt::FROM_LBC);
            assert_eq!(t[adopt::lbc_tags::STACK], "shop/web");
            assert_eq!(s.tgs[&tg].tags[berth_crds::tags::SERVICE_UID], "u1");
            let ids: Vec<&str> = s.tgs[&tg].targets.iter().map(|t| t.id.as_str()).collect();
            assert_eq!(ids, vec!["i-1", "i-2"], "the nodes registered");
        }
        assert_eq!(theirs(&p), before, "another cluster's NLB was touched");
        let again = p.ensure(&svc, &adopting).await;
        assert!(again.error.is_none(), "{:?}", again.error);
        assert_eq!(p.aws.inner().take_calls(), Vec::<String>::new());

        // No longer berth's (opt-in removed): handed back, nothing deleted.
        let released = p.release(&svc, false).await;
        assert!(released.error.is_none(), "{:?}", released.error);
        {
            let s = p.aws.inner().state();
            assert_eq!(s.lbs.len(), 2);
            assert!(!s.lbs[&lb].tags.contains_key(berth_crds::tags::SERVICE_UID));
            assert!(!s.tgs[&tg].tags.contains_key(berth_crds::tags::CLUSTER_ID));
            assert_eq!(s.lbs[&lb].tags[adopt::lbc_tags::STACK], "shop/web");
        }

        // Adopted again, then the Service deleted: the NLB and target group go.
        assert!(p.ensure(&svc, &adopting).await.error.is_none());
        let deleted = p.release(&svc, true).await;
        assert!(deleted.error.is_none(), "{:?}", deleted.error);
        let s = p.aws.inner().state();
        assert!(!s.lbs.contains_key(&lb) && !s.tgs.contains_key(&tg));
        assert!(s.lbs.contains_key(&other_lb) && s.tgs.contains_key(&other_tg));
    }

    #[tokio::test]
    async fn without_the_opt_in_an_lbc_service_of_a_class_adopts_nothing() {
        let p = provider(Fence::unfenced());
        let (lb, _) = lbc_made(&p, "c1", "").await;
        let out = p.ensure(&lbc_service(&[]), &class()).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let s = p.aws.inner().state();
        assert!(!s.lbs[&lb].tags.contains_key(berth_crds::tags::SERVICE_UID));
        assert_eq!(s.lbs.len(), 2, "a new NLB of berth's own");
    }

    #[tokio::test]
    async fn two_adopting_classes_are_a_conflict_in_both_statuses() {
        let p = provider(Fence::unfenced());
        let adopting = |name: &str| {
            let mut c =
                class_with(serde_json::json!({"adoptFrom": ["aws-load-balancer-controller"]}));
            c.metadata.name = Some(name.into());
            c
        };
        assert!(p.verdict(&adopting("a")).accepted);
        let mut stores = p.stores.clone();
        stores.classes = crate::stores::testing::filled(vec![adopting("a"), adopting("b")]);
        let p = AwsProvider { stores, ..p };
        let v = p.verdict(&adopting("a"));
        assert!(!v.accepted);
        assert_eq!(v.reason, adopt::ADOPT_CONFLICT);
        assert!(v.message.contains("a, b"), "{}", v.message);
        assert!(
            p.verdict(&class()).accepted,
            "a class without adoptFrom is fine"
        );
    }

    #[tokio::test]
    async fn instance_targets_without_node_ports_ask_for_them() {
        let p = provider(Fence::unfenced());
        let svc = service(&[("http", 80, "TCP", None)], &[]);
        assert_eq!(p.ensure(&svc, &class()).await.next, Next::NodePorts);
        assert!(p.aws.inner().take_calls().is_empty());
    }

    #[tokio::test]
    async fn a_fenced_provider_changes_nothing_and_says_so() {
        let fence = Fence::new();
        fence.hold_until(Instant::now());
        let p = provider(fence);
        let mut svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        svc.metadata.uid = Some("u1".into());
        let out = p.ensure(&svc, &class()).await;
        assert!(
            out.error.as_ref().is_some_and(|e| e.is_fenced()),
            "{:?}",
            out.error
        );
        assert!(p.aws.inner().take_calls().is_empty());
        assert!(p.aws.inner().state().lbs.is_empty());
        let released = p.release(&svc, true).await;
        assert!(
            released.error.is_none(),
            "nothing to delete: no AWS call needed"
        );
    }

    fn class_with(aws: serde_json::Value) -> LoadBalancerClass {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": "lab"}, "spec": {"aws": aws}
        }))
        .expect("class")
    }

    #[tokio::test]
    async fn refused_overrides_provision_nothing_and_name_each_annotation() {
        let p = provider(Fence::unfenced());
        let class = class_with(serde_json::json!({"allowedOverrides": ["healthCheck"]}));
        let mut svc = service(
            &[("http", 80, "TCP", Some(30080))],
            &[
                (keys::SCHEME, "internet-facing"),
                (keys::SUBNETS, "subnet-z"),
                (keys::HC_PATH, "/ready"),
            ],
        );
        svc.metadata.uid = Some("u1".into());
        let out = p.ensure(&svc, &class).await;
        let Report::Set { readiness, .. } = &out.report else {
            panic!("no status: {:?}", out.report);
        };
        assert_eq!(readiness.reason, reason::OVERRIDE_REFUSED);
        assert!(readiness.message.contains(keys::SCHEME), "{readiness:?}");
        assert!(readiness.message.contains(keys::SUBNETS), "{readiness:?}");
        assert!(!readiness.message.contains(keys::HC_PATH), "{readiness:?}");
        assert!(p.aws.inner().take_calls().is_empty());
        assert!(p.aws.inner().state().lbs.is_empty());
        let typo = class_with(serde_json::json!({"allowedOverrides": ["healthchecks"]}));
        assert!(!p.verdict(&typo).accepted);
        let out = p.ensure(&svc, &typo).await;
        assert!(
            matches!(&out.report, Report::Set { readiness, .. } if readiness.reason == reason::INVALID_SPEC)
        );
    }

    #[tokio::test]
    async fn explicit_subnets_of_another_vpc_are_refused() {
        let p = provider(Fence::unfenced());
        let mut svc = service(
            &[("http", 80, "TCP", Some(30080))],
            &[(keys::SUBNETS, "subnet-a, subnet-z")],
        );
        svc.metadata.uid = Some("u1".into());
        let out = p.ensure(&svc, &class()).await;
        let Report::Set { readiness, .. } = &out.report else {
            panic!("no status: {:?}", out.report);
        };
        assert_eq!(readiness.reason, reason::OVERRIDE_REFUSED, "{readiness:?}");
        assert!(
            readiness.message.contains("subnet-z is in vpc-2"),
            "{readiness:?}"
        );
        assert!(p.aws.inner().state().lbs.is_empty());
        // The class's VPC came from the nodes' instances: discovery stays inside it.
        let plain = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let out = p.ensure(&plain, &class()).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let subnets: Vec<Vec<String>> = p
            .aws
            .inner()
            .state()
            .lbs
            .values()
            .map(|l| l.info.subnets.clone())
            .collect();
        assert_eq!(
            subnets,
            vec![vec!["subnet-a".to_string(), "subnet-b".to_string()]]
        );
    }

    #[tokio::test]
    async fn nodes_without_instances_need_a_vpc() {
        let p = provider(Fence::unfenced());
        let mut stores = p.stores.clone();
        stores.nodes = crate::stores::testing::filled(Vec::new());
        let p = AwsProvider { stores, ..p };
        let svc = service(&[("http", 80, "TCP", Some(30080))], &[]);
        let out = p.ensure(&svc, &class()).await;
        assert!(
            matches!(&out.report, Report::Set { readiness, .. } if readiness.reason == reason::VPC_UNKNOWN),
            "{:?}",
            out.report
        );
        let pinned = class_with(serde_json::json!({"vpcID": "vpc-1", "scheme": "internet-facing"}));
        let out = p.ensure(&svc, &pinned).await;
        assert!(out.error.is_none(), "{:?}", out.error);
    }

    #[tokio::test]
    async fn ip_targets_skip_non_pod_endpoints_with_one_warning() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-x", "namespace": "shop", "labels": {LABEL_SERVICE_NAME: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "targetRef": {"kind": "Pod", "name": "a"}},
                {"addresses": ["10.0.9.9"]}
            ]
        }))
        .expect("slice");
        let p = provider(Fence::unfenced());
        let mut stores = p.stores.clone();
        stores.slices = crate::stores::testing::filled(vec![slice]);
        let p = AwsProvider { stores, ..p };
        let mut svc = service(
            &[("http", 80, "TCP", None)],
            &[(keys::NLB_TARGET_TYPE, "ip")],
        );
        svc.metadata.uid = Some("u1".into());
        let out = p.ensure(&svc, &class()).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let warned: Vec<&Note> = out.events.iter().filter(|n| n.warning).collect();
        assert_eq!(warned.len(), 1, "{:?}", out.events);
        assert!(warned[0].message.contains("10.0.9.9"), "{warned:?}");
        let targets: Vec<String> = p
            .aws
            .inner()
            .state()
            .tgs
            .values()
            .flat_map(|t| t.targets.iter().map(|t| t.id.clone()))
            .collect();
        assert_eq!(targets, vec!["10.244.1.2".to_string()]);
        let again = p.ensure(&svc, &class()).await;
        assert!(
            again.events.iter().all(|n| !n.warning),
            "{:?}",
            again.events
        );
    }

    #[tokio::test]
    async fn unimplemented_annotations_are_named_in_the_condition_and_warned_once() {
        let p = provider(Fence::unfenced());
        let capacity =
            "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity";
        let mut svc = service(
            &[("http", 80, "TCP", Some(30080))],
            &[(capacity, "CapacityUnits=100")],
        );
        svc.metadata.uid = Some("u1".into());
        let out = p.ensure(&svc, &class()).await;
        let Report::Set { readiness, .. } = &out.report else {
            panic!("no status: {:?}", out.report);
        };
        assert!(readiness.message.contains(capacity), "{readiness:?}");
        let warned: Vec<&Note> = out.events.iter().filter(|n| n.warning).collect();
        assert_eq!(warned.len(), 1, "{:?}", out.events);
        assert_eq!(warned[0].reason, EVENT_UNSUPPORTED_ANNOTATION);
        assert!(warned[0].message.contains(capacity));
        let again = p.ensure(&svc, &class()).await;
        assert!(
            again.events.iter().all(|n| !n.warning),
            "{:?}",
            again.events
        );
    }
}
