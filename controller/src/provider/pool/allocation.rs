//! The pool provider's address allocation, pure: parsing a class's addresses and
//! selectors, reading what a Service asks for, and choosing its addresses given what every
//! other Service holds.
//!
//! There is no allocation table: what a Service holds is what its
//! `status.loadBalancer.ingress[].ip` says, for Services whose recorded class
//! (`berth.dev/load-balancer-class`) is a pool class. `Reservations` covers this process's
//! own status writes that the Service store has not shown yet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use berth_crds::{ANNOTATION_OWNER_CLASS, LoadBalancerClass, PoolProvider, annotations};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

/// Reasons of the Service condition that only the pool provider gives.
pub mod reason {
    pub const POOL_EXHAUSTED: &str = "PoolExhausted";
    pub const ADDRESS_UNAVAILABLE: &str = "AddressUnavailable";
    pub const PORT_CONFLICT: &str = "PortConflict";
    pub const AUTO_ASSIGN_DISABLED: &str = "AutoAssignDisabled";
    pub const NOT_SELECTED: &str = "NotSelected";
    /// Two Services with `externalTrafficPolicy: Local` may share an address only when
    /// one node can serve both: they select the same pods.
    pub const TRAFFIC_POLICY_CONFLICT: &str = "TrafficPolicyConflict";
    /// The class's addresses contain a node's address: nothing is allocated from it.
    pub const NODE_ADDRESS_IN_POOL: &str = "NodeAddressInPool";
}

/// The families and the pool come from the one parser of pool addresses, which the node
/// agents also use to decide what to announce.
pub use berth_crds::addresses::{AddressPool as Pool, IpFamily as Family};

/// A pool class, parsed.
#[derive(Clone, Debug)]
pub struct PoolClass {
    pub name: String,
    pub pool: Pool,
    pub auto_assign: bool,
    service_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
}

impl PoolClass {
    /// Every problem of the class's pool block, at once.
    pub fn parse(name: &str, spec: &PoolProvider) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let pool = Pool::parse(&spec.addresses)
            .map_err(|e| errors.extend(e.iter().map(ToString::to_string)))
            .ok();
        let mut selector = |what: &str, s: &Option<_>| -> Option<Selector> {
            let s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector = s.as_ref()?;
            match Selector::try_from(s.clone()) {
                Ok(sel) => Some(sel),
                Err(e) => {
                    errors.push(format!("{what}: {e}"));
                    None
                }
            }
        };
        let service_selector = selector("serviceSelector", &spec.service_selector);
        let namespace_selector = selector("namespaceSelector", &spec.namespace_selector);
        // Parsed here only to refuse the class: the agents apply it.
        if let Err(e) = spec.announce_nodes() {
            errors.push(e);
        }
        match pool {
            Some(pool) if errors.is_empty() => Ok(Self {
                name: name.to_string(),
                pool,
                auto_assign: spec.auto_assign.unwrap_or(true),
                service_selector,
                namespace_selector,
            }),
            _ => Err(errors),
        }
    }

    /// Whether the class serves a Service with these labels in a namespace with these.
    pub fn selects(
        &self,
        service_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        if let Some(s) = &self.service_selector
            && !s.matches(service_labels)
        {
            return Err(format!(
                "the Service's labels do not match serviceSelector `{s}` of LoadBalancerClass {}",
                self.name
            ));
        }
        if let Some(s) = &self.namespace_selector
            && !s.matches(namespace_labels)
        {
            return Err(format!(
                "the namespace's labels do not match namespaceSelector `{s}` of LoadBalancerClass {}",
                self.name
            ));
        }
        Ok(())
    }
}

/// The parsed pool classes among `classes`, by name (classes with errors left out).
pub fn pool_classes(classes: &[std::sync::Arc<LoadBalancerClass>]) -> HashMap<String, PoolClass> {
    classes
        .iter()
        .filter_map(|c| {
            let name = c.name_any();
            let pc = PoolClass::parse(&name, c.spec.pool.as_ref()?).ok()?;
            Some((name, pc))
        })
        .collect()
}

/// A port of a Service as sharing compares them: (protocol, port).
pub type PortKey = (String, i32);

/// A Service as the allocator sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub uid: String,
    /// `namespace/name`, for messages.
    pub name: String,
    pub namespace: String,
    /// Older Services win when two hold one address they may not share.
    pub created: i64,
    pub sharing_key: Option<String>,
    pub ports: BTreeSet<PortKey>,
    pub ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local`: only nodes with one of its pods may announce.
    pub external_local: bool,
    /// `spec.selector`; `None` when it has none (its endpoints are written by hand).
    pub selector: Option<BTreeMap<String, String>>,
    /// A LoadBalancer Service that no berth pool class serves but whose status lists
    /// addresses (another implementation, e.g. MetalLB, still announces them): nothing new
    /// is allocated on its addresses, but it never takes one from a berth holder.
    pub foreign: bool,
}

impl Holder {
    pub fn of(svc: &Service) -> Self {
        Self {
            uid: svc.metadata.uid.clone().unwrap_or_default(),
            name: format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()),
            namespace: svc.namespace().unwrap_or_default(),
            created: svc
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(i64::MAX),
            sharing_key: svc
                .annotations()
                .get(annotations::ALLOW_SHARED_IP)
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty()),
            ports: svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .map(|ps| {
                    ps.iter()
                        .map(|p| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
                        .collect()
                })
                .unwrap_or_default(),
            ips: status_ips(svc),
            external_local: svc
                .spec
                .as_ref()
                .and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local"),
            selector: svc
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .filter(|s| !s.is_empty()),
            foreign: false,
        }
    }

    fn precedes(&self, other: &Holder) -> bool {
        (self.created, &self.name) < (other.created, &other.name)
    }
}

/// The addresses in the Service's `status.loadBalancer.ingress[].ip`.
pub fn status_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| {
            ing.iter()
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every Service holding pool addresses: its recorded class is one of `pool_class_names`
/// and its status lists addresses. Services being deleted still hold theirs until berth
/// lets them go.
pub fn holders<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    is_pool_class: impl Fn(&str) -> bool,
) -> Vec<Holder> {
    services
        .into_iter()
        .filter(|s| {
            s.annotations()
                .get(ANNOTATION_OWNER_CLASS)
                .is_some_and(|c| is_pool_class(c))
        })
        .map(Holder::of)
        .filter(|h| !h.ips.is_empty())
        .collect()
}

/// LoadBalancer Services with status addresses that no pool class serves (see
/// `Holder::foreign`).
pub fn foreign_holders<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    is_pool_class: impl Fn(&str) -> bool,
) -> Vec<Holder> {
    services
        .into_iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .filter(|s| {
            !s.annotations()
                .get(ANNOTATION_OWNER_CLASS)
                .is_some_and(|c| is_pool_class(c))
        })
        .map(|s| Holder {
            foreign: true,
            ..Holder::of(s)
        })
        .filter(|h| !h.ips.is_empty())
        .collect()
}

/// Addresses the Service pins: berth's annotation, else a peer's (MetalLB, Cilium; all
/// of those set must agree), comma-separated, at most one per family, or
/// `spec.loadBalancerIP`; an annotation and the spec field both set must agree.
pub fn pinned(svc: &Service) -> Result<Vec<IpAddr>, String> {
    let spec_ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let spec_ip = match spec_ip {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| format!("spec.loadBalancerIP `{s}` is not an IP address"))?,
        ),
        None => None,
    };
    let Some((key, value, ips)) = annotated_pins(svc)? else {
        return Ok(spec_ip.into_iter().collect());
    };
    if let Some(s) = spec_ip
        && !ips.contains(&s)
    {
        return Err(format!(
            "spec.loadBalancerIP {s} is not among annotation {key} `{value}`"
        ));
    }
    Ok(ips)
}

/// A pinning annotation: its key, its value and its addresses.
type Pins = (&'static str, String, Vec<IpAddr>);

/// The pinning annotation in force (berth's, else the peers' ones, which must agree).
fn annotated_pins(svc: &Service) -> Result<Option<Pins>, String> {
    let annotations = svc.annotations();
    if let Some(value) = annotations.get(annotations::LOAD_BALANCER_IPS) {
        let ips = parse_pins(annotations::LOAD_BALANCER_IPS, value)?;
        return Ok(Some((annotations::LOAD_BALANCER_IPS, value.clone(), ips)));
    }
    let mut found: Option<Pins> = None;
    for key in annotations::PEER_LOAD_BALANCER_IPS {
        let Some(value) = annotations.get(key) else {
            continue;
        };
        let mut ips = parse_pins(key, value)?;
        ips.sort();
        match &found {
            Some((first, first_value, first_ips)) if *first_ips != ips => {
                return Err(format!(
                    "annotations {first} `{first_value}` and {key} `{value}` pin different addresses"
                ));
            }
            Some(_) => {}
            None => found = Some((key, value.clone(), ips)),
        }
    }
    Ok(found)
}

/// One pinning annotation's value: addresses, comma-separated, at most one per family.
fn parse_pins(key: &str, value: &str) -> Result<Vec<IpAddr>, String> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: IpAddr = part
            .parse()
            .map_err(|_| format!("annotation {key}: `{part}` is not an IP address"))?;
        if ips.iter().any(|i| Family::of(i) == Family::of(&ip)) {
            return Err(format!(
                "annotation {key}: more than one {} address",
                Family::of(&ip).name()
            ));
        }
        ips.push(ip);
    }
    if ips.is_empty() {
        return Err(format!("annotation {key} is empty"));
    }
    Ok(ips)
}

/// The families to allocate: the Service's first family for SingleStack (IPv4 when
/// unset); both families of the pool, the Service's first first, for PreferDualStack and
/// RequireDualStack (which fails when the pool lacks one).
pub fn families(svc: &Service, pool: &Pool, class: &str) -> Result<Vec<Family>, String> {
    let spec = svc.spec.as_ref();
    let listed: Vec<Family> = spec
        .and_then(|s| s.ip_families.as_ref())
        .map(|f| f.iter().filter_map(|f| Family::from_name(f)).collect())
        .unwrap_or_default();
    let primary = listed.first().copied().unwrap_or(Family::V4);
    let other = match primary {
        Family::V4 => Family::V6,
        Family::V6 => Family::V4,
    };
    let policy = spec
        .and_then(|s| s.ip_family_policy.as_deref())
        .unwrap_or("SingleStack");
    match policy {
        "PreferDualStack" => {
            let got: Vec<Family> = [primary, other]
                .into_iter()
                .filter(|f| pool.has_family(*f))
                .collect();
            if got.is_empty() {
                Err(format!("LoadBalancerClass {class} has no addresses"))
            } else {
                Ok(got)
            }
        }
        "RequireDualStack" => match [primary, other].iter().find(|f| !pool.has_family(**f)) {
            Some(f) => Err(format!(
                "the Service requires dual-stack but LoadBalancerClass {class} has no {} addresses",
                f.name()
            )),
            None => Ok(vec![primary, other]),
        },
        _ if pool.has_family(primary) => Ok(vec![primary]),
        _ => Err(format!(
            "LoadBalancerClass {class} has no {} addresses for this {} Service",
            primary.name(),
            primary.name()
        )),
    }
}

/// What the Service asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// These exact addresses.
    Pinned(Vec<IpAddr>),
    /// One address of each family, chosen by the allocator.
    Auto(Vec<Family>),
}

/// The allocator's answer for one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Service's addresses; `moved` lists (old, new, why) for addresses it had to give
    /// up.
    Assigned {
        ips: Vec<IpAddr>,
        moved: Vec<(IpAddr, IpAddr, String)>,
    },
    /// No addresses: the condition's reason and message.
    Unassigned {
        reason: &'static str,
        message: String,
    },
}

fn describe_ports(ports: &BTreeSet<PortKey>) -> String {
    ports
        .iter()
        .map(|(proto, port)| format!("{port}/{proto}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a Service may not use an address next to another one.
struct Conflict {
    /// Their traffic policies cannot be served from one node (else: no sharing key in
    /// common, or a port in common).
    policy: bool,
    message: String,
}

impl Conflict {
    fn other(message: String) -> Self {
        Self {
            policy: false,
            message,
        }
    }

    /// The condition reason: `otherwise` unless the traffic policies conflict.
    fn reason(&self, otherwise: &'static str) -> &'static str {
        if self.policy {
            reason::TRAFFIC_POLICY_CONFLICT
        } else {
            otherwise
        }
    }
}

/// Why `me` may not use `ip` next to `other`, or None when they may share it.
fn sharing_conflict(me: &Holder, other: &Holder, ip: &IpAddr) -> Option<Conflict> {
    let same_key = me.sharing_key.is_some()
        && me.sharing_key == other.sharing_key
        && me.namespace == other.namespace;
    if !same_key {
        return Some(Conflict::other(format!(
            "{ip} is in use by Service {} and not shared with it (sharing needs the same {} value in the same namespace)",
            other.name,
            annotations::ALLOW_SHARED_IP
        )));
    }
    let key = me.sharing_key.as_deref().unwrap_or_default();
    let overlap: BTreeSet<PortKey> = me.ports.intersection(&other.ports).cloned().collect();
    if !overlap.is_empty() {
        return Some(Conflict::other(format!(
            "{ip} is shared under key `{key}` with Service {}, which already uses port(s) {}",
            other.name,
            describe_ports(&overlap)
        )));
    }
    if !one_node_serves_both(me, other) {
        return Some(Conflict {
            policy: true,
            message: format!(
                "{ip} is shared under key `{key}` with Service {}; both have externalTrafficPolicy: Local \
                 but do not select the same pods, so one announcing node could not serve both \
                 (an address is shared only by Local Services with equal selectors and any Cluster ones)",
                other.name
            ),
        });
    }
    None
}

/// Whether one node can always serve both Services' traffic on a shared address. A
/// Cluster Service is served from any node, a Local one only from nodes with its pods:
/// two Local ones only when they select the same pods (the same non-empty selector; same
/// namespace, as sharing requires), since their pods could otherwise sit on different
/// nodes. Static, so the answer does not change as pods move. Pure.
fn one_node_serves_both(a: &Holder, b: &Holder) -> bool {
    if !(a.external_local && b.external_local) {
        return true;
    }
    a.selector.is_some() && a.selector == b.selector
}

/// Why `me` may not (keep) use `ip`: the first other holder it conflicts with. When `me`
/// holds `ip` already, only an older conflicting holder wins it away.
fn blocked(me: &Holder, ip: &IpAddr, others: &[Holder]) -> Option<Conflict> {
    let held = me.ips.contains(ip);
    others
        .iter()
        .filter(|o| o.uid != me.uid && o.ips.contains(ip))
        .filter(|o| !held || (!o.foreign && o.precedes(me)))
        .find_map(|o| {
            if o.foreign {
                return Some(Conflict::other(format!(
                    "{ip} is in use by Service {}, which no berth pool class serves",
                    o.name
                )));
            }
            sharing_conflict(me, o, ip)
        })
}

/// Chooses the Service's addresses from `class`'s pool. `me.ips` are those it holds now;
/// `others` every other Service holding addresses (of any pool class: classes may
/// overlap). A held address that is still in the pool and not claimed by an older
/// Service is kept, so recomputing after a restart changes nothing.
pub fn allocate(class: &PoolClass, me: &Holder, want: &Want, others: &[Holder]) -> Outcome {
    match want {
        Want::Pinned(ips) => allocate_pinned(class, me, ips, others),
        Want::Auto(families) => allocate_auto(class, me, families, others),
    }
}

fn unassigned(reason: &'static str, message: String) -> Outcome {
    Outcome::Unassigned { reason, message }
}

/// Pinned addresses: each must be in the pool and free (or shareable) for this Service.
fn allocate_pinned(class: &PoolClass, me: &Holder, ips: &[IpAddr], others: &[Holder]) -> Outcome {
    for ip in ips {
        if !class.pool.contains(ip) {
            let message = format!("pinned address {ip} is not in pool {}", class.name);
            return unassigned(reason::ADDRESS_UNAVAILABLE, message);
        }
        if let Some(c) = blocked(me, ip, others) {
            let reason = c.reason(reason::ADDRESS_UNAVAILABLE);
            return unassigned(reason, format!("pinned address {}", c.message));
        }
    }
    Outcome::Assigned {
        ips: ips.to_vec(),
        moved: Vec::new(),
    }
}

/// One address per family: the held one while it stays valid, else the sharing key's,
/// else the first free one; a held address that became invalid is reported as moved.
fn allocate_auto(
    class: &PoolClass,
    me: &Holder,
    families: &[Family],
    others: &[Holder],
) -> Outcome {
    let mut used: BTreeSet<IpAddr> = others
        .iter()
        .filter(|o| o.uid != me.uid)
        .flat_map(|o| o.ips.iter().copied())
        .collect();
    let (mut chosen, mut moved) = (Vec::new(), Vec::new());
    for family in families {
        let lost = match held_address(class, me, *family, others) {
            Held::Keep(ip) => {
                chosen.push(ip);
                continue;
            }
            Held::Lost(ip, why) => Some((ip, why)),
            Held::None => None,
        };
        let shared = match shared_address(class, me, *family, others) {
            Ok(ip) => ip,
            Err(outcome) => return outcome,
        };
        let ip = match shared {
            Some(ip) => ip,
            None => {
                let mut taken = used.clone();
                taken.extend(lost.as_ref().map(|(l, _)| *l));
                match class.pool.first_free(*family, &taken) {
                    Some(ip) => ip,
                    None => return exhausted(class, *family),
                }
            }
        };
        used.insert(ip);
        if let Some((old, why)) = lost {
            moved.push((old, ip, why));
        }
        chosen.push(ip);
    }
    Outcome::Assigned { ips: chosen, moved }
}

fn exhausted(class: &PoolClass, family: Family) -> Outcome {
    let message = format!(
        "no free {} address in pool {} ({} addresses, all in use)",
        family.name(),
        class.name,
        class.pool.size()
    );
    unassigned(reason::POOL_EXHAUSTED, message)
}

/// What becomes of the address of `family` the Service holds now.
enum Held {
    Keep(IpAddr),
    /// It must go: the address and why.
    Lost(IpAddr, String),
    None,
}

fn held_address(class: &PoolClass, me: &Holder, family: Family, others: &[Holder]) -> Held {
    match me.ips.iter().find(|ip| Family::of(ip) == family) {
        Some(ip) if !class.pool.contains(ip) => {
            Held::Lost(*ip, format!("{ip} is no longer in pool {}", class.name))
        }
        Some(ip) => match blocked(me, ip, others) {
            None => Held::Keep(*ip),
            Some(c) => Held::Lost(*ip, c.message),
        },
        None => Held::None,
    }
}

/// With a sharing key, the address its Services in this namespace already use (the key
/// names one address); `Err` when each such address conflicts with this Service's ports
/// or traffic policy.
fn shared_address(
    class: &PoolClass,
    me: &Holder,
    family: Family,
    others: &[Holder],
) -> Result<Option<IpAddr>, Outcome> {
    let Some(key) = &me.sharing_key else {
        return Ok(None);
    };
    let mut keyed: Vec<IpAddr> = others
        .iter()
        .filter(|o| {
            !o.foreign
                && o.uid != me.uid
                && o.namespace == me.namespace
                && o.sharing_key.as_ref() == Some(key)
        })
        .flat_map(|o| o.ips.iter().copied())
        .filter(|ip| Family::of(ip) == family && class.pool.contains(ip))
        .collect();
    keyed.sort();
    keyed.dedup();
    let mut conflict: Option<Conflict> = None;
    for ip in keyed {
        match blocked(me, &ip, others) {
            None => return Ok(Some(ip)),
            Some(why) => conflict = conflict.or(Some(why)),
        }
    }
    match conflict {
        Some(c) => Err(unassigned(c.reason(reason::PORT_CONFLICT), c.message)),
        None => Ok(None),
    }
}

/// What the Service asks of `class`, or why it gets nothing (reason, message). `holds`
/// are its current addresses: with `autoAssign: false` it keeps those still in the pool.
pub fn want(
    svc: &Service,
    class: &PoolClass,
    holds: &[IpAddr],
) -> Result<Want, (&'static str, String)> {
    let pins = pinned(svc).map_err(|e| (crate::reason::INVALID_ANNOTATION, e))?;
    if !pins.is_empty() {
        return Ok(Want::Pinned(pins));
    }
    let families =
        families(svc, &class.pool, &class.name).map_err(|e| (crate::reason::INVALID_SPEC, e))?;
    if class.auto_assign {
        return Ok(Want::Auto(families));
    }
    let kept: Vec<IpAddr> = holds
        .iter()
        .filter(|ip| class.pool.contains(ip))
        .copied()
        .collect();
    if kept.is_empty() {
        return Err((
            reason::AUTO_ASSIGN_DISABLED,
            format!(
                "LoadBalancerClass {} has autoAssign: false; pin an address with annotation {} or spec.loadBalancerIP",
                class.name,
                annotations::LOAD_BALANCER_IPS
            ),
        ));
    }
    Ok(Want::Pinned(kept))
}

/// The whole decision for one Service of `class`: selectors, its request, allocation.
/// `me` carries its current addresses, `others` every other holder.
pub fn decide(
    svc: &Service,
    class: &PoolClass,
    namespace_labels: &BTreeMap<String, String>,
    me: &Holder,
    others: &[Holder],
) -> Outcome {
    if let Err(message) = class.selects(svc.labels(), namespace_labels) {
        return Outcome::Unassigned {
            reason: reason::NOT_SELECTED,
            message,
        };
    }
    match want(svc, class, &me.ips) {
        Ok(w) => allocate(class, me, &w, others),
        Err((reason, message)) => Outcome::Unassigned { reason, message },
    }
}

/// Addresses of `pool` held by any of `holders` (distinct).
pub fn allocated(pool: &Pool, holders: &[Holder]) -> u64 {
    holders
        .iter()
        .flat_map(|h| h.ips.iter())
        .filter(|ip| pool.contains(ip))
        .collect::<BTreeSet<_>>()
        .len() as u64
}

/// This process's status writes the Service store may not show yet, by Service UID: the
/// addresses the Service holds now (empty after a release). They override the store's
/// view of that Service until the store agrees.
#[derive(Default)]
pub struct Reservations {
    by_uid: HashMap<String, (Vec<IpAddr>, Instant)>,
}

/// A reservation outlives a lagging store at most this long.
const RESERVATION_TTL: Duration = Duration::from_secs(60);

impl Reservations {
    pub fn set(&mut self, uid: &str, ips: Vec<IpAddr>) {
        self.by_uid.insert(uid.to_string(), (ips, Instant::now()));
    }

    pub fn forget(&mut self, uid: &str) {
        self.by_uid.remove(uid);
    }

    /// Drops reservations the store now agrees with. `in_store` gives a Service's status
    /// addresses by UID, None when the store has no such Service.
    pub fn prune(&mut self, in_store: impl Fn(&str) -> Option<Vec<IpAddr>>) {
        self.by_uid.retain(|uid, (ips, at)| {
            if at.elapsed() > RESERVATION_TTL {
                return false;
            }
            match in_store(uid) {
                Some(mut stored) => {
                    stored.sort();
                    let mut want = ips.clone();
                    want.sort();
                    stored != want
                }
                None => !ips.is_empty(),
            }
        });
    }

    /// `holders` with this process's newer knowledge applied: reserved Services hold
    /// exactly their reservation. `template` builds a holder for a reserved UID the store
    /// does not list as a holder (a Service that just got its first address).
    pub fn apply(
        &self,
        mut holders: Vec<Holder>,
        template: impl Fn(&str) -> Option<Holder>,
    ) -> Vec<Holder> {
        for h in holders.iter_mut() {
            if let Some((ips, _)) = self.by_uid.get(&h.uid) {
                h.ips = ips.clone();
            }
        }
        for (uid, (ips, _)) in &self.by_uid {
            if !ips.is_empty() && !holders.iter().any(|h| &h.uid == uid) {
                let mut h = template(uid).unwrap_or_else(|| Holder {
                    uid: uid.clone(),
                    name: uid.clone(),
                    created: i64::MIN,
                    ..Holder::default()
                });
                h.ips = ips.clone();
                holders.push(h);
            }
        }
        holders.retain(|h| !h.ips.is_empty());
        holders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn pool(entries: &[&str]) -> Pool {
        Pool::parse(entries).expect("pool")
    }

    fn class(entries: &[&str]) -> PoolClass {
        PoolClass::parse(
            "lab",
            &PoolProvider {
                addresses: entries.iter().map(|s| s.to_string()).collect(),
                ..PoolProvider::default()
            },
        )
        .expect("class")
    }

    fn holder(name: &str, created: i64, ips: &[&str]) -> Holder {
        Holder {
            uid: format!("uid-{name}"),
            name: format!("ns/{name}"),
            namespace: "ns".into(),
            created,
            sharing_key: None,
            ports: BTreeSet::from([("TCP".to_string(), 80)]),
            ips: ips.iter().map(|s| ip(s)).collect(),
            external_local: false,
            selector: None,
            foreign: false,
        }
    }

    /// A holder sharing under key `k` with its own port, `Local` with `app: <app>` as
    /// its selector when `app` is given.
    fn sharer(name: &str, created: i64, port: i32, local: Option<&str>, ips: &[&str]) -> Holder {
        let mut h = holder(name, created, ips);
        h.sharing_key = Some("k".into());
        h.ports = BTreeSet::from([("TCP".to_string(), port)]);
        h.external_local = local.is_some();
        h.selector = Some(BTreeMap::from([(
            "app".to_string(),
            local.unwrap_or(name).to_string(),
        )]));
        h
    }

    fn assigned(o: &Outcome) -> Vec<IpAddr> {
        match o {
            Outcome::Assigned { ips, .. } => ips.clone(),
            Outcome::Unassigned { reason, message } => panic!("{reason}: {message}"),
        }
    }

    fn unassigned(o: &Outcome) -> (&'static str, String) {
        match o {
            Outcome::Unassigned { reason, message } => (reason, message.clone()),
            Outcome::Assigned { ips, .. } => panic!("assigned {ips:?}"),
        }
    }

    #[test]
    fn a_single_address_entry_is_allocated_once() {
        let c = class(&["198.19.0.77"]);
        let want = Want::Auto(vec![Family::V4]);
        let first = holder("a", 1, &[]);
        assert_eq!(
            assigned(&allocate(&c, &first, &want, &[])),
            vec![ip("198.19.0.77")]
        );
        let held = vec![holder("a", 1, &["198.19.0.77"])];
        let (r, _) = unassigned(&allocate(&c, &holder("b", 2, &[]), &want, &held));
        assert_eq!(r, reason::POOL_EXHAUSTED);
    }

    #[test]
    fn allocation_is_lowest_free_and_never_gives_an_address_twice() {
        let c = class(&["198.19.1.0/29"]);
        let others = vec![
            holder("a", 1, &["198.19.1.1"]),
            holder("b", 2, &["198.19.1.3"]),
        ];
        let me = holder("me", 3, &[]);
        let got = assigned(&allocate(&c, &me, &Want::Auto(vec![Family::V4]), &others));
        assert_eq!(got, vec![ip("198.19.1.2")]);
    }

    #[test]
    fn recovery_from_status_keeps_every_address() {
        let c = class(&["198.19.1.0/24"]);
        // Holders as a restarted controller reads them from the Service statuses, in an
        // order unrelated to their addresses.
        let hs: Vec<Holder> = (0..100)
            .map(|i| holder(&format!("s{i}"), i, &[&format!("198.19.1.{}", 200 - i)]))
            .collect();
        for h in &hs {
            let got = assigned(&allocate(&c, h, &Want::Auto(vec![Family::V4]), &hs));
            assert_eq!(got, h.ips, "{}", h.name);
        }
    }

    #[test]
    fn two_holders_of_one_address_the_older_keeps_it() {
        let c = class(&["198.19.1.0/29"]);
        let old = holder("old", 1, &["198.19.1.1"]);
        let new = holder("new", 2, &["198.19.1.1"]);
        let hs = vec![old.clone(), new.clone()];
        let want = Want::Auto(vec![Family::V4]);
        assert_eq!(assigned(&allocate(&c, &old, &want, &hs)), old.ips);
        match allocate(&c, &new, &want, &hs) {
            Outcome::Assigned { ips, moved } => {
                assert_eq!(ips, vec![ip("198.19.1.2")]);
                assert_eq!(moved[0].0, ip("198.19.1.1"));
                assert!(moved[0].2.contains("ns/old"), "{}", moved[0].2);
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn exhaustion_then_a_release_frees_an_address() {
        let c = class(&["198.19.1.1-198.19.1.2"]);
        let mut hs = vec![
            holder("a", 1, &["198.19.1.1"]),
            holder("b", 2, &["198.19.1.2"]),
        ];
        let me = holder("c", 3, &[]);
        let want = Want::Auto(vec![Family::V4]);
        let (reason, msg) = unassigned(&allocate(&c, &me, &want, &hs));
        assert_eq!(reason, reason::POOL_EXHAUSTED);
        assert!(msg.contains("2 addresses"), "{msg}");
        hs.remove(0);
        assert_eq!(
            assigned(&allocate(&c, &me, &want, &hs)),
            vec![ip("198.19.1.1")]
        );
    }

    #[test]
    fn shrinking_moves_the_service_with_a_reason() {
        let c = class(&["198.19.1.8-198.19.1.9"]);
        let me = holder("a", 1, &["198.19.1.3"]);
        match allocate(
            &c,
            &me,
            &Want::Auto(vec![Family::V4]),
            std::slice::from_ref(&me),
        ) {
            Outcome::Assigned { ips, moved } => {
                assert_eq!(ips, vec![ip("198.19.1.8")]);
                assert_eq!(moved.len(), 1);
                assert_eq!(
                    (moved[0].0, moved[0].1),
                    (ip("198.19.1.3"), ip("198.19.1.8"))
                );
                assert!(moved[0].2.contains("no longer in pool lab"));
            }
            o => panic!("{o:?}"),
        }
        let full = vec![
            me.clone(),
            holder("b", 2, &["198.19.1.8"]),
            holder("c", 3, &["198.19.1.9"]),
        ];
        let (reason, _) = unassigned(&allocate(&c, &me, &Want::Auto(vec![Family::V4]), &full));
        assert_eq!(reason, reason::POOL_EXHAUSTED);
    }

    #[test]
    fn pinning_needs_an_address_in_the_pool_and_free() {
        let c = class(&["198.19.1.0/29"]);
        let others = vec![holder("a", 1, &["198.19.1.2"])];
        let me = holder("me", 2, &[]);
        let pin = |s: &str| Want::Pinned(vec![ip(s)]);
        assert_eq!(
            assigned(&allocate(&c, &me, &pin("198.19.1.5"), &others)),
            vec![ip("198.19.1.5")]
        );
        let (r, m) = unassigned(&allocate(&c, &me, &pin("198.19.2.5"), &others));
        assert_eq!(r, reason::ADDRESS_UNAVAILABLE);
        assert!(m.contains("not in pool lab"), "{m}");
        let (r, m) = unassigned(&allocate(&c, &me, &pin("198.19.1.2"), &others));
        assert_eq!(r, reason::ADDRESS_UNAVAILABLE);
        assert!(m.contains("ns/a") && m.contains("allow-shared-ip"), "{m}");
        // A network address is not in the pool either.
        assert_eq!(
            unassigned(&allocate(&c, &me, &pin("198.19.1.0"), &others)).0,
            reason::ADDRESS_UNAVAILABLE
        );
    }

    #[test]
    fn sharing_needs_key_namespace_and_disjoint_ports() {
        let c = class(&["198.19.1.0/29"]);
        let mut a = holder("a", 1, &["198.19.1.4"]);
        a.sharing_key = Some("k".into());
        let others = vec![holder("x", 0, &["198.19.1.1"]), a.clone()];
        let mut me = holder("me", 2, &[]);
        me.sharing_key = Some("k".into());
        me.ports = BTreeSet::from([("TCP".to_string(), 443), ("UDP".to_string(), 80)]);
        let want = Want::Auto(vec![Family::V4]);
        assert_eq!(
            assigned(&allocate(&c, &me, &want, &others)),
            vec![ip("198.19.1.4")]
        );
        // Pinning the shared address works too.
        assert_eq!(
            assigned(&allocate(
                &c,
                &me,
                &Want::Pinned(vec![ip("198.19.1.4")]),
                &others
            )),
            vec![ip("198.19.1.4")]
        );
        let mut clash = me.clone();
        clash.ports.insert(("TCP".to_string(), 80));
        let (r, m) = unassigned(&allocate(&c, &clash, &want, &others));
        assert_eq!(r, reason::PORT_CONFLICT);
        assert!(m.contains("80/TCP") && m.contains("ns/a"), "{m}");
        let mut elsewhere = me.clone();
        elsewhere.namespace = "other".into();
        assert_eq!(
            assigned(&allocate(&c, &elsewhere, &want, &others)),
            vec![ip("198.19.1.2")]
        );
        let mut other_key = me.clone();
        other_key.sharing_key = Some("j".into());
        assert_eq!(
            assigned(&allocate(&c, &other_key, &want, &others)),
            vec![ip("198.19.1.2")]
        );
    }

    #[test]
    fn local_services_share_an_address_only_when_they_select_the_same_pods() {
        let c = class(&["198.19.1.0/29"]);
        let a = sharer("a", 1, 80, Some("web"), &["198.19.1.4"]);
        let auto = Want::Auto(vec![Family::V4]);
        let pin = Want::Pinned(vec![ip("198.19.1.4")]);
        let others = vec![a.clone()];
        // Cluster next to Local, and Local with the same selector: shared.
        for me in [
            sharer("cluster", 2, 81, None, &[]),
            sharer("same", 2, 82, Some("web"), &[]),
        ] {
            for want in [&auto, &pin] {
                assert_eq!(
                    assigned(&allocate(&c, &me, want, &others)),
                    vec![ip("198.19.1.4")],
                    "{}",
                    me.name
                );
            }
        }
        // Local with other pods: refused, auto or pinned, with the reason.
        let other = sharer("other", 2, 83, Some("api"), &[]);
        for want in [&auto, &pin] {
            let (r, m) = unassigned(&allocate(&c, &other, want, &others));
            assert_eq!(r, reason::TRAFFIC_POLICY_CONFLICT);
            assert!(
                m.contains("ns/a") && m.contains("externalTrafficPolicy: Local"),
                "{m}"
            );
        }
        // No selector (endpoints by hand): never shared between Local Services.
        let mut manual = sharer("manual", 2, 84, Some("web"), &[]);
        manual.selector = None;
        assert_eq!(
            unassigned(&allocate(&c, &manual, &auto, &others)).0,
            reason::TRAFFIC_POLICY_CONFLICT
        );
        // Of two holders that conflict, the older keeps the address: the newer loses it.
        let held = sharer("other", 2, 83, Some("api"), &["198.19.1.4"]);
        let both = vec![a.clone(), held.clone()];
        assert_eq!(assigned(&allocate(&c, &a, &auto, &both)), a.ips);
        assert_eq!(
            unassigned(&allocate(&c, &held, &auto, &both)).0,
            reason::TRAFFIC_POLICY_CONFLICT
        );
    }

    #[test]
    fn holders_read_traffic_policy_and_selector() {
        let s = svc(serde_json::json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"externalTrafficPolicy": "Local", "selector": {"app": "web"}}
        }));
        let h = Holder::of(&s);
        assert!(h.external_local);
        assert_eq!(
            h.selector,
            Some(BTreeMap::from([("app".to_string(), "web".to_string())]))
        );
        let plain = Holder::of(&svc(serde_json::json!({"spec": {"selector": {}}})));
        assert!(!plain.external_local && plain.selector.is_none());
    }

    #[test]
    fn a_sharer_whose_ports_now_clash_gives_way_to_the_older() {
        let c = class(&["198.19.1.0/29"]);
        let mut a = holder("a", 1, &["198.19.1.1"]);
        a.sharing_key = Some("k".into());
        let mut b = a.clone();
        b.uid = "uid-b".into();
        b.name = "ns/b".into();
        b.created = 2;
        let hs = vec![a.clone(), b.clone()];
        let want = Want::Auto(vec![Family::V4]);
        assert_eq!(assigned(&allocate(&c, &a, &want, &hs)), a.ips);
        let (r, _) = unassigned(&allocate(&c, &b, &want, &hs));
        assert_eq!(r, reason::PORT_CONFLICT);
    }

    #[test]
    fn dual_stack_gets_one_address_per_family() {
        let c = class(&["198.19.1.0/30", "2001:db8::/127"]);
        let me = holder("me", 1, &[]);
        let got = assigned(&allocate(
            &c,
            &me,
            &Want::Auto(vec![Family::V6, Family::V4]),
            &[],
        ));
        assert_eq!(got, vec![ip("2001:db8::"), ip("198.19.1.1")]);
    }

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    #[test]
    fn families_follow_the_policy_and_the_pool() {
        let both = pool(&["198.19.1.0/30", "2001:db8::/127"]);
        let v4 = pool(&["198.19.1.0/30"]);
        let s = |policy: &str, fams: &[&str]| {
            svc(serde_json::json!({"spec": {"ipFamilyPolicy": policy, "ipFamilies": fams}}))
        };
        assert_eq!(
            families(&svc(serde_json::json!({})), &v4, "c"),
            Ok(vec![Family::V4])
        );
        assert_eq!(
            families(&s("SingleStack", &["IPv6"]), &both, "c"),
            Ok(vec![Family::V6])
        );
        assert!(families(&s("SingleStack", &["IPv6"]), &v4, "c").is_err());
        assert_eq!(
            families(&s("PreferDualStack", &["IPv4"]), &both, "c"),
            Ok(vec![Family::V4, Family::V6])
        );
        assert_eq!(
            families(&s("PreferDualStack", &["IPv6", "IPv4"]), &v4, "c"),
            Ok(vec![Family::V4])
        );
        let e = families(&s("RequireDualStack", &["IPv4", "IPv6"]), &v4, "c").expect_err("v6");
        assert!(e.contains("IPv6"), "{e}");
        assert_eq!(
            families(&s("RequireDualStack", &["IPv6", "IPv4"]), &both, "c"),
            Ok(vec![Family::V6, Family::V4])
        );
    }

    #[test]
    fn peers_pins_are_honoured_and_berths_own_wins() {
        let s = |pairs: &[(&str, &str)]| {
            let mut v = serde_json::json!({"metadata": {"annotations": {}}, "spec": {}});
            for (k, val) in pairs {
                v["metadata"]["annotations"][*k] = (*val).into();
            }
            svc(v)
        };
        for key in annotations::PEER_LOAD_BALANCER_IPS {
            assert_eq!(
                pinned(&s(&[(key, "198.19.1.7")])),
                Ok(vec![ip("198.19.1.7")]),
                "{key}"
            );
        }
        assert_eq!(
            pinned(&s(&[
                ("metallb.io/loadBalancerIPs", "198.19.1.7"),
                (annotations::LOAD_BALANCER_IPS, "198.19.1.8")
            ])),
            Ok(vec![ip("198.19.1.8")])
        );
        assert_eq!(
            pinned(&s(&[
                ("metallb.io/loadBalancerIPs", "198.19.1.7,2001:db8::7"),
                ("lbipam.cilium.io/ips", "2001:db8::7, 198.19.1.7")
            ])),
            Ok(vec![ip("198.19.1.7"), ip("2001:db8::7")])
        );
        let clash = pinned(&s(&[
            ("metallb.io/loadBalancerIPs", "198.19.1.7"),
            ("lbipam.cilium.io/ips", "198.19.1.9"),
        ]))
        .expect_err("disagreeing peers");
        assert!(
            clash.contains("metallb.io/loadBalancerIPs") && clash.contains("lbipam.cilium.io/ips")
        );
        let bad = pinned(&s(&[("io.cilium/lb-ipam-ips", "banana")])).expect_err("bad");
        assert!(bad.contains("io.cilium/lb-ipam-ips") && bad.contains("banana"));
    }

    #[test]
    fn foreign_addresses_are_never_given_out_and_never_taken_from_berth() {
        let c = class(&["198.19.1.0/29"]);
        let foreign = Holder {
            foreign: true,
            ..holder("metallb-served", 1, &["198.19.1.1"])
        };
        let me = holder("me", 5, &[]);
        assert_eq!(
            assigned(&allocate(
                &c,
                &me,
                &Want::Auto(vec![Family::V4]),
                std::slice::from_ref(&foreign)
            )),
            vec![ip("198.19.1.2")]
        );
        let (r, m) = unassigned(&allocate(
            &c,
            &me,
            &Want::Pinned(vec![ip("198.19.1.1")]),
            std::slice::from_ref(&foreign),
        ));
        assert_eq!(r, reason::ADDRESS_UNAVAILABLE);
        assert!(m.contains("ns/metallb-served") && m.contains("no berth pool class"));
        // A berth holder keeps its address, even against an older foreign Service.
        let holding = holder("holding", 9, &["198.19.1.1"]);
        assert_eq!(
            assigned(&allocate(
                &c,
                &holding,
                &Want::Auto(vec![Family::V4]),
                &[foreign]
            )),
            vec![ip("198.19.1.1")]
        );
    }

    #[test]
    fn foreign_holders_are_unserved_load_balancers_with_addresses() {
        let mk = |name: &str, type_: &str, owner: Option<&str>, ip: Option<&str>| {
            let mut v = serde_json::json!({
                "metadata": {"name": name, "namespace": "ns", "uid": name, "annotations": {}},
                "spec": {"type": type_},
            });
            if let Some(o) = owner {
                v["metadata"]["annotations"][ANNOTATION_OWNER_CLASS] = o.into();
            }
            if let Some(i) = ip {
                v["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": i}]}});
            }
            svc(v)
        };
        let services = [
            mk("metallb", "LoadBalancer", None, Some("198.19.1.2")),
            mk("berth", "LoadBalancer", Some("lab"), Some("198.19.1.3")),
            mk("aws", "LoadBalancer", Some("nlb"), None),
            mk("pending", "LoadBalancer", None, None),
            mk("stale", "ClusterIP", None, Some("198.19.1.4")),
        ];
        let foreign = foreign_holders(services.iter(), |c| c == "lab");
        let names: Vec<&str> = foreign.iter().map(|h| h.uid.as_str()).collect();
        assert_eq!(names, vec!["metallb"]);
        assert!(foreign[0].foreign);
    }

    #[test]
    fn pins_come_from_the_annotation_or_the_spec() {
        let s = |ann: Option<&str>, spec_ip: Option<&str>| {
            let mut v = serde_json::json!({"metadata": {"annotations": {}}, "spec": {}});
            if let Some(a) = ann {
                v["metadata"]["annotations"][annotations::LOAD_BALANCER_IPS] = a.into();
            }
            if let Some(i) = spec_ip {
                v["spec"]["loadBalancerIP"] = i.into();
            }
            svc(v)
        };
        assert_eq!(pinned(&s(None, None)), Ok(vec![]));
        assert_eq!(
            pinned(&s(None, Some("198.19.1.5"))),
            Ok(vec![ip("198.19.1.5")])
        );
        assert_eq!(
            pinned(&s(Some("198.19.1.5, 2001:db8::5"), None)),
            Ok(vec![ip("198.19.1.5"), ip("2001:db8::5")])
        );
        assert_eq!(
            pinned(&s(Some("198.19.1.5"), Some("198.19.1.5"))),
            Ok(vec![ip("198.19.1.5")])
        );
        assert!(pinned(&s(Some("198.19.1.5"), Some("198.19.1.6"))).is_err());
        assert!(
            pinned(&s(Some("198.19.1.5,198.19.1.6"), None))
                .expect_err("two")
                .contains("more than one IPv4")
        );
        assert!(
            pinned(&s(Some("banana"), None))
                .expect_err("bad")
                .contains("banana")
        );
        assert!(pinned(&s(Some(" "), None)).is_err());
        assert!(pinned(&s(None, Some("x"))).is_err());
    }

    #[test]
    fn selectors_restrict_services_and_namespaces() {
        let spec: PoolProvider = serde_json::from_value(serde_json::json!({
            "addresses": ["198.19.1.0/29"],
            "serviceSelector": {"matchLabels": {"tier": "edge"}},
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]}
        }))
        .expect("spec");
        let c = PoolClass::parse("lab", &spec).expect("class");
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(
            c.selects(&labels(&[("tier", "edge")]), &labels(&[("team", "a")]))
                .is_ok()
        );
        let e = c
            .selects(&labels(&[("tier", "core")]), &labels(&[("team", "a")]))
            .expect_err("svc");
        assert!(e.contains("serviceSelector"), "{e}");
        let e = c
            .selects(&labels(&[("tier", "edge")]), &labels(&[]))
            .expect_err("ns");
        assert!(e.contains("namespaceSelector"), "{e}");
        let bad: PoolProvider = serde_json::from_value(serde_json::json!({
            "addresses": ["x"],
            "serviceSelector": {"matchExpressions": [{"key": "k", "operator": "Near"}]}
        }))
        .expect("spec");
        let errs = PoolClass::parse("lab", &bad).expect_err("bad");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(class(&["198.19.1.0/29"]).auto_assign);
    }

    #[test]
    fn auto_assign_off_serves_only_pins_and_current_holders() {
        let spec = PoolProvider {
            addresses: vec!["198.19.1.0/29".into()],
            auto_assign: Some(false),
            ..PoolProvider::default()
        };
        let c = PoolClass::parse("lab", &spec).expect("class");
        let plain = svc(serde_json::json!({"metadata": {"name": "s"}}));
        let (r, m) = want(&plain, &c, &[]).expect_err("no pin");
        assert_eq!(r, reason::AUTO_ASSIGN_DISABLED);
        assert!(m.contains(annotations::LOAD_BALANCER_IPS), "{m}");
        assert_eq!(
            want(&plain, &c, &[ip("198.19.1.3")]),
            Ok(Want::Pinned(vec![ip("198.19.1.3")]))
        );
        assert!(want(&plain, &c, &[ip("198.19.9.3")]).is_err());
        let pinned_svc = svc(serde_json::json!({"spec": {"loadBalancerIP": "198.19.1.4"}}));
        assert_eq!(
            want(&pinned_svc, &c, &[]),
            Ok(Want::Pinned(vec![ip("198.19.1.4")]))
        );
        let bad = svc(
            serde_json::json!({"metadata": {"annotations": {annotations::LOAD_BALANCER_IPS: "x"}}}),
        );
        assert_eq!(
            want(&bad, &c, &[]).expect_err("bad").0,
            crate::reason::INVALID_ANNOTATION
        );
    }

    #[test]
    fn decide_checks_selectors_first() {
        let spec: PoolProvider = serde_json::from_value(serde_json::json!({
            "addresses": ["198.19.1.0/29"],
            "serviceSelector": {"matchLabels": {"tier": "edge"}}
        }))
        .expect("spec");
        let c = PoolClass::parse("lab", &spec).expect("class");
        let s = svc(serde_json::json!({"metadata": {"name": "s", "labels": {"tier": "core"}}}));
        let me = Holder::of(&s);
        let (r, _) = unassigned(&decide(&s, &c, &BTreeMap::new(), &me, &[]));
        assert_eq!(r, reason::NOT_SELECTED);
        let s = svc(serde_json::json!({"metadata": {"name": "s", "labels": {"tier": "edge"}}}));
        assert_eq!(
            assigned(&decide(&s, &c, &BTreeMap::new(), &me, &[])),
            vec![ip("198.19.1.1")]
        );
    }

    #[test]
    fn holders_are_pool_services_with_status_addresses() {
        let mk = |name: &str, class: &str, ips: &[&str]| {
            svc(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns", "uid": name,
                    "annotations": {ANNOTATION_OWNER_CLASS: class, annotations::ALLOW_SHARED_IP: " k "}},
                "spec": {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 80}]},
                "status": {"loadBalancer": {"ingress": ips.iter().map(|i| serde_json::json!({"ip": i})).collect::<Vec<_>>()}}
            }))
        };
        let svcs = [
            mk("a", "pool", &["198.19.1.1"]),
            mk("b", "aws", &["198.19.1.2"]),
            mk("c", "pool", &[]),
        ];
        let hs = holders(svcs.iter(), |c| c == "pool");
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].ips, vec![ip("198.19.1.1")]);
        assert_eq!(hs[0].sharing_key.as_deref(), Some("k"));
        assert_eq!(
            hs[0].ports,
            BTreeSet::from([("TCP".to_string(), 80), ("UDP".to_string(), 53)])
        );
    }

    #[test]
    fn reservations_override_the_store_until_it_agrees() {
        let mut r = Reservations::default();
        let store = vec![holder("a", 1, &["198.19.1.1"])];
        r.set("uid-a", vec![]);
        r.set("uid-b", vec![ip("198.19.1.2")]);
        let view = r.apply(store.clone(), |uid| {
            Some(holder(uid.trim_start_matches("uid-"), 2, &[]))
        });
        assert_eq!(view.len(), 1, "a released, b reserved: {view:?}");
        assert_eq!(view[0].uid, "uid-b");
        assert_eq!(view[0].ips, vec![ip("198.19.1.2")]);
        // The store still shows a's address and not yet b's: both stay.
        r.prune(|uid| match uid {
            "uid-a" => Some(vec![ip("198.19.1.1")]),
            _ => Some(vec![]),
        });
        assert_eq!(r.by_uid.len(), 2);
        // The store caught up (a is gone, b shows its address).
        r.prune(|uid| match uid {
            "uid-b" => Some(vec![ip("198.19.1.2")]),
            _ => None,
        });
        assert!(r.by_uid.is_empty());
    }

    #[test]
    fn allocated_counts_distinct_addresses_in_the_pool() {
        let p = pool(&["198.19.1.0/29"]);
        let hs = vec![
            holder("a", 1, &["198.19.1.1"]),
            holder("b", 2, &["198.19.1.1"]),
            holder("c", 3, &["198.19.2.1"]),
        ];
        assert_eq!(allocated(&p, &hs), 1);
    }
}
