//! The L2 announcer's I/O: watches LoadBalancerClasses, Nodes and its Leases, applies
//! [`announce::decide`] to every address each tick, writes Leases (always guarded by
//! their resourceVersion, so two nodes never both win one) and puts addresses on the
//! interface through [`link`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_crds::LoadBalancerClass;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PartialObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::error::Error;
use crate::l2::announce::{self, Action, AddrState, LeaseView, PoolClass, Timing};
use crate::l2::link::{self, Interface};
use crate::metrics::Metrics;

/// What the announcer reads from the agent's model: the addresses to announce with their
/// eligible nodes, and the node's own addresses (to find the interface).
pub struct Snapshot {
    pub wanted: BTreeMap<IpAddr, BTreeSet<String>>,
    pub node_addresses: Vec<IpAddr>,
    pub warnings: Vec<String>,
}

/// Computes a [`Snapshot`] from the classes and node names; `None` until the model's
/// watches have listed.
pub type ModelView =
    Arc<dyn Fn(&BTreeMap<String, PoolClass>, &BTreeSet<String>) -> Option<Snapshot> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub namespace: String,
    pub interface: Option<String>,
    pub timing: Timing,
}

struct Held {
    lease: Lease,
    renewed_ms: i64,
}

struct Watched {
    classes: Store<LoadBalancerClass>,
    nodes: Store<PartialObjectMeta<Node>>,
    leases: Store<Lease>,
    listed: [Arc<AtomicBool>; 3],
}

pub struct Announcer {
    cfg: Config,
    api: Api<Lease>,
    metrics: Arc<Metrics>,
    watched: Watched,
    held: BTreeMap<IpAddr, Held>,
    /// Addresses on the interface now; a gratuitous ARP burst stops when its address leaves.
    announcing: Arc<Mutex<BTreeSet<IpAddr>>>,
    takeable_since: BTreeMap<IpAddr, i64>,
    iface: Option<Interface>,
    last_interface_sync: Option<Instant>,
    warned: BTreeSet<String>,
}

/// Watch retries doubling from 0.5 s up to 5 s: the CRD may be installed after the agent
/// starts, and announcing should begin soon after.
#[derive(Default)]
struct RetryOften(u32);

impl Iterator for RetryOften {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = Duration::from_millis(500) * 2u32.pow(self.0.min(4));
        self.0 = self.0.saturating_add(1);
        Some(d.min(Duration::from_secs(5)))
    }
}

impl Backoff for RetryOften {
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// Mirrors one watch into its store; `listed` turns true after the first full list.
async fn reflect<K>(
    what: &'static str,
    writer: reflector::store::Writer<K>,
    stream: impl futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    listed: Arc<AtomicBool>,
) where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let mut s = reflector::reflector(writer, stream)
        .backoff(RetryOften::default())
        .boxed();
    let mut failing = false;
    while let Some(ev) = s.next().await {
        match ev {
            // A retry starts with `Init` whether or not the list then works.
            Ok(Event::Init) => {}
            Ok(ev) => {
                failing = false;
                if matches!(ev, Event::InitDone) {
                    listed.store(true, Ordering::Relaxed);
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("{what} watch (L2 announcement waits for it): {e}");
            }
            Err(e) => tracing::debug!("{what} watch: {e}"),
        }
    }
}

fn pool_classes(
    store: &Store<LoadBalancerClass>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, PoolClass> {
    store
        .state()
        .iter()
        .filter_map(|c| {
            let mut w = Vec::new();
            let pool = announce::pool_class(&c.spec, &mut w)?;
            warnings.extend(
                w.into_iter()
                    .map(|w| format!("LoadBalancerClass {}: {w}", c.name_any())),
            );
            Some((c.name_any(), pool))
        })
        .collect()
}

impl Announcer {
    /// Starts the watches; [`Announcer::run`] then does the work.
    pub fn new(client: Client, cfg: Config, metrics: Arc<Metrics>) -> Self {
        let listed = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        let (classes, w) = reflector::store();
        tokio::spawn(reflect(
            "LoadBalancerClass",
            w,
            watcher::watcher(
                Api::<LoadBalancerClass>::all(client.clone()),
                watcher::Config::default(),
            ),
            listed[0].clone(),
        ));
        let (nodes, w) = reflector::store();
        tokio::spawn(reflect(
            "Node",
            w,
            watcher::watcher(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                watcher::Config::default(),
            ),
            listed[1].clone(),
        ));
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let (leases, w) = reflector::store();
        tokio::spawn(reflect(
            "Lease",
            w,
            watcher::watcher(
                api.clone(),
                watcher::Config::default().labels(announce::LEASE_LABEL),
            ),
            listed[2].clone(),
        ));
        Self {
            cfg,
            api,
            metrics,
            watched: Watched {
                classes,
                nodes,
                leases,
                listed,
            },
            held: BTreeMap::new(),
            announcing: Arc::new(Mutex::new(BTreeSet::new())),
            takeable_since: BTreeMap::new(),
            iface: None,
            last_interface_sync: None,
            warned: BTreeSet::new(),
        }
    }

    /// Announces until `shutdown` turns true, then gives every address up.
    pub async fn run(mut self, model: ModelView, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.cfg.timing.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            self.step(&model).await;
        }
        let addrs: Vec<IpAddr> = self.held.keys().copied().collect();
        for addr in addrs {
            self.release(addr, "agent stopping").await;
        }
    }

    fn warn_once(&mut self, msg: String) {
        if self.warned.insert(msg.clone()) {
            tracing::warn!("L2 announcement: {msg}");
        }
    }

    async fn step(&mut self, model: &ModelView) {
        if !self
            .watched
            .listed
            .iter()
            .all(|l| l.load(Ordering::Relaxed))
        {
            return;
        }
        let mut warnings = Vec::new();
        let classes = pool_classes(&self.watched.classes, &mut warnings);
        // As for other load balancers, excluded nodes do not announce.
        let nodes: BTreeSet<String> = self
            .watched
            .nodes
            .state()
            .iter()
            .filter(|n| !n.labels().contains_key(berth_crds::LABEL_EXCLUDE_FROM_LB))
            .map(|n| n.name_any())
            .collect();
        let Some(snap) = model(&classes, &nodes) else {
            return;
        };
        for w in warnings.into_iter().chain(snap.warnings) {
            self.warn_once(w);
        }
        if self.iface.is_none() {
            let found = match &self.cfg.interface {
                Some(name) => link::interface_named(name).await,
                None => link::interface_with(&snap.node_addresses).await,
            };
            match found {
                Ok(i) => {
                    tracing::info!(interface = %i.name, "L2 announcement interface");
                    self.iface = Some(i);
                }
                Err(e) => {
                    // Without an interface this node must not take any Lease.
                    self.warn_once(e.to_string());
                    return;
                }
            }
        }
        let leases: BTreeMap<String, Arc<Lease>> = self
            .watched
            .leases
            .state()
            .into_iter()
            .map(|l| (l.name_any(), l))
            .collect();
        let now_ms = Timestamp::now().as_millisecond();
        let addrs: BTreeSet<IpAddr> = snap
            .wanted
            .keys()
            .chain(self.held.keys())
            .copied()
            .collect();
        let mut changed = false;
        for addr in addrs {
            let lease = leases.get(&announce::lease_name(&addr));
            let view = lease.map(|l| LeaseView::of(l));
            let held = self.held.get(&addr).map(|h| h.renewed_ms);
            if held.is_none() && announce::takeable(view.as_ref(), &self.cfg.node, now_ms) {
                self.takeable_since.entry(addr).or_insert(now_ms);
            } else {
                self.takeable_since.remove(&addr);
            }
            let action = announce::decide(&AddrState {
                me: &self.cfg.node,
                addr,
                eligible: snap.wanted.get(&addr),
                lease: view.as_ref(),
                held_since_renewal: held,
                takeable_since: self.takeable_since.get(&addr).copied(),
                now_ms,
                timing: self.cfg.timing,
            });
            match action {
                Action::Nothing => {}
                Action::Acquire => {
                    changed |= self.acquire(addr, lease.map(|l| l.as_ref()), view).await
                }
                Action::Renew => self.renew(addr).await,
                Action::Release => {
                    self.release(addr, "no longer eligible").await;
                    changed = true;
                }
                Action::Lost => {
                    self.lost(addr).await;
                    changed = true;
                }
            }
        }
        self.takeable_since
            .retain(|a, _| snap.wanted.contains_key(a));
        let due = self
            .last_interface_sync
            .is_none_or(|t| t.elapsed() >= self.cfg.timing.renew);
        if changed || due {
            self.remove_stale(&classes).await;
        }
        self.metrics.l2_held(self.held.len());
    }

    fn set_announcing(&self, addr: IpAddr, on: bool) {
        let mut a = self.announcing.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            a.insert(addr);
        } else {
            a.remove(&addr);
        }
    }

    /// Writes this node into the Lease; true when it now holds the address.
    async fn acquire(
        &mut self,
        addr: IpAddr,
        lease: Option<&Lease>,
        view: Option<LeaseView>,
    ) -> bool {
        let Some(iface) = self.iface.clone() else {
            return false;
        };
        let name = announce::lease_name(&addr);
        let now = Timestamp::now();
        let duration = self.cfg.timing.duration;
        let written = match lease {
            None => {
                let fresh = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(
                            [(announce::LEASE_LABEL.to_string(), "true".to_string())].into(),
                        ),
                        ..Default::default()
                    },
                    spec: Some(announce::held_spec(&self.cfg.node, duration, None, now)),
                };
                self.api.create(&PostParams::default(), &fresh).await
            }
            Some(l) => {
                let mut l = l.clone();
                l.spec = Some(announce::held_spec(
                    &self.cfg.node,
                    duration,
                    l.spec.as_ref(),
                    now,
                ));
                if let Some(a) = l.metadata.annotations.as_mut() {
                    a.remove(announce::RELEASED_BY);
                }
                // The resourceVersion read with it guards the write: a concurrent taker wins.
                self.api.replace(&name, &PostParams::default(), &l).await
            }
        };
        let written = match written {
            Ok(w) => w,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::debug!(address = %addr, "another node took the Lease first");
                return false;
            }
            Err(e) => {
                tracing::warn!(address = %addr, "taking the Lease {name}: {e}");
                return false;
            }
        };
        self.held.insert(
            addr,
            Held {
                lease: written,
                renewed_ms: now.as_millisecond(),
            },
        );
        if let Err(e) = link::hold(&iface, &addr, duration).await {
            tracing::warn!(address = %addr, "cannot add the address; giving the Lease up: {e}");
            self.release(addr, "address could not be added").await;
            return false;
        }
        let previous = view.and_then(|v| v.holder.or(v.released_by));
        tracing::info!(
            address = %addr,
            interface = %iface.name,
            previous_holder = previous.as_deref().unwrap_or("none"),
            "announcing pool address (took the Lease)"
        );
        self.metrics.l2_transition("acquired");
        self.set_announcing(addr, true);
        if let IpAddr::V4(v4) = addr {
            let announcing = self.announcing.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                // Several, spread over a second: a neighbour ignores updates for an entry
                // changed less than its locktime ago.
                for i in 0..3 {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let still = announcing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&addr);
                    if !still {
                        break;
                    }
                    match link::send_garp(&iface, v4) {
                        Ok(()) => metrics.garp_sent(),
                        Err(e) => tracing::warn!(address = %addr, "gratuitous ARP: {e}"),
                    }
                }
            });
        }
        true
    }

    async fn renew(&mut self, addr: IpAddr) {
        let Some(iface) = self.iface.clone() else {
            return;
        };
        let Some(h) = self.held.get_mut(&addr) else {
            return;
        };
        let name = announce::lease_name(&addr);
        let now = Timestamp::now();
        let duration = self.cfg.timing.duration;
        let mut l = h.lease.clone();
        l.spec = Some(announce::held_spec(
            &self.cfg.node,
            duration,
            l.spec.as_ref(),
            now,
        ));
        match self.api.replace(&name, &PostParams::default(), &l).await {
            Ok(w) => {
                h.lease = w;
                h.renewed_ms = now.as_millisecond();
                // Only a renewed Lease extends the address's life.
                if let Err(e) = link::hold(&iface, &addr, duration).await {
                    tracing::warn!(address = %addr, "refreshing the address: {e}");
                }
            }
            Err(kube::Error::Api(s)) if s.code == 409 => match self.api.get_opt(&name).await {
                Ok(Some(fresh))
                    if LeaseView::of(&fresh).holder.as_deref() == Some(self.cfg.node.as_str()) =>
                {
                    // Still ours, written by someone else meanwhile: renew on the next tick.
                    h.lease = fresh;
                }
                Ok(_) => self.lost(addr).await,
                Err(e) => tracing::warn!(address = %addr, "reading the Lease {name}: {e}"),
            },
            Err(e) => tracing::warn!(address = %addr, "renewing the Lease {name}: {e}"),
        }
    }

    /// Removes the address, then frees the Lease so another node takes it at once.
    async fn release(&mut self, addr: IpAddr, why: &str) {
        let Some(h) = self.held.remove(&addr) else {
            return;
        };
        self.set_announcing(addr, false);
        if let Some(iface) = &self.iface
            && let Err(e) = link::remove(iface, &addr).await
        {
            tracing::warn!(address = %addr, "removing the address: {e}");
        }
        let mut l = h.lease;
        if let Some(spec) = l.spec.as_ref() {
            l.spec = Some(announce::released_spec(spec));
            l.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(announce::RELEASED_BY.into(), self.cfg.node.clone());
            let name = announce::lease_name(&addr);
            if let Err(e) = self.api.replace(&name, &PostParams::default(), &l).await {
                // Another node may have taken it already; otherwise it expires.
                tracing::debug!(address = %addr, "releasing the Lease {name}: {e}");
            }
        }
        tracing::info!(address = %addr, reason = why, "stopped announcing pool address (released the Lease)");
        self.metrics.l2_transition("released");
    }

    /// Another node holds the Lease (or ours ran out): remove the address, write nothing.
    async fn lost(&mut self, addr: IpAddr) {
        if self.held.remove(&addr).is_none() {
            return;
        }
        self.set_announcing(addr, false);
        if let Some(iface) = &self.iface
            && let Err(e) = link::remove(iface, &addr).await
        {
            tracing::warn!(address = %addr, "removing the address: {e}");
        }
        tracing::info!(address = %addr, "stopped announcing pool address (lost the Lease)");
        self.metrics.l2_transition("lost");
    }

    /// Removes pool addresses this node does not hold: left by an agent killed earlier,
    /// or by anyone else.
    async fn remove_stale(&mut self, classes: &BTreeMap<String, PoolClass>) {
        let Some(iface) = self.iface.clone() else {
            return;
        };
        let on = match link::addresses(&iface).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("listing addresses of {}: {e}", iface.name);
                return;
            }
        };
        self.last_interface_sync = Some(Instant::now());
        let held: BTreeSet<IpAddr> = self.held.keys().copied().collect();
        for addr in announce::stale(&on, classes, &held) {
            match link::remove(&iface, &addr).await {
                Ok(()) => {
                    tracing::info!(address = %addr, interface = %iface.name, "removed a pool address this node does not hold")
                }
                Err(e) => tracing::warn!(address = %addr, "removing a stale address: {e}"),
            }
        }
    }
}

/// The lease duration must be whole seconds, at least one (the Lease's resolution).
pub fn check_duration(d: Duration) -> Result<(), Error> {
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err(Error::InvalidInput(format!(
            "--l2-lease-duration {d:?}: must be whole seconds, at least 1s"
        )));
    }
    Ok(())
}
