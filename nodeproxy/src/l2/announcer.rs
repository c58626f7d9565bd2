//! The L2 announcer's I/O: watches LoadBalancerClasses, Nodes and its Leases, applies
//! [`announce::decide`] to every address each tick, writes Leases through
//! [`berth_runtime::lease`] (always guarded by their resourceVersion, so two nodes never
//! both win one; each call with a deadline) and puts addresses on the interface through
//! [`link`]. A Lease's observation time is the arrival of the watch event that last
//! changed it, so another node's Lease expires by this node's clock alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_crds::LoadBalancerClass;
use berth_runtime::lease::{self, LeaseClient, Observations, Observed, Write};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::PartialObjectMeta;
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

/// An address this node holds.
struct Held {
    /// The Lease as this node last wrote it: the next write's resourceVersion.
    lease: Lease,
    /// When the last successful write of it started; the claim lasts a duration from there.
    renewed_at: Instant,
}

type SharedObservations = Arc<Mutex<Observations>>;

fn lock(o: &SharedObservations) -> MutexGuard<'_, Observations> {
    o.lock().unwrap_or_else(|p| p.into_inner())
}

struct Watched {
    classes: Store<LoadBalancerClass>,
    nodes: Store<PartialObjectMeta<Node>>,
    leases: SharedObservations,
    listed: [Arc<AtomicBool>; 3],
}

pub struct Announcer {
    cfg: Config,
    leases: LeaseClient,
    metrics: Arc<Metrics>,
    watched: Watched,
    held: BTreeMap<IpAddr, Held>,
    /// Addresses on the interface now; a gratuitous ARP burst stops when its address leaves.
    announcing: Arc<Mutex<BTreeSet<IpAddr>>>,
    takeable_since: BTreeMap<IpAddr, Instant>,
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

/// Hands every event of one watch to `sink`; `listed` turns true after the first full list.
async fn follow<K>(
    what: &'static str,
    stream: impl futures::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    listed: Arc<AtomicBool>,
    mut sink: impl FnMut(Event<K>) + Send,
) where
    K: Send + 'static,
{
    let mut s = stream.backoff(RetryOften::default()).boxed();
    let mut failing = false;
    while let Some(ev) = s.next().await {
        match ev {
            // A retry starts with `Init` whether or not the list then works.
            Ok(ev @ Event::Init) => sink(ev),
            Ok(ev) => {
                failing = false;
                if matches!(ev, Event::InitDone) {
                    listed.store(true, Ordering::Relaxed);
                }
                sink(ev);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("{what} watch (L2 announcement waits for it): {e}");
            }
            Err(e) => tracing::debug!("{what} watch: {e}"),
        }
    }
}

/// Mirrors one watch into a store.
fn reflect<K>(
    what: &'static str,
    api: Api<K>,
    config: watcher::Config,
    listed: Arc<AtomicBool>,
) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K: Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let (store, mut writer) = reflector::store();
    tokio::spawn(follow(
        what,
        watcher::watcher(api, config),
        listed,
        move |ev| writer.apply_watcher_event(&ev),
    ));
    store
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
        let listed: [Arc<AtomicBool>; 3] = Default::default();
        let classes = reflect(
            "LoadBalancerClass",
            Api::all(client.clone()),
            watcher::Config::default(),
            listed[0].clone(),
        );
        let nodes = reflect(
            "Node",
            Api::all(client.clone()),
            watcher::Config::default(),
            listed[1].clone(),
        );
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let leases = SharedObservations::default();
        let observations = leases.clone();
        tokio::spawn(follow(
            "Lease",
            watcher::watcher(
                api.clone(),
                watcher::Config::default().labels(announce::LEASE_LABEL),
            ),
            listed[2].clone(),
            // Stamped on arrival: the only clock that judges another node's Lease.
            move |ev| lock(&observations).apply(ev, Instant::now()),
        ));
        Self {
            leases: LeaseClient::new(api, &cfg.node, cfg.timing.duration),
            cfg,
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
        let listed = self
            .watched
            .listed
            .iter()
            .all(|l| l.load(Ordering::Relaxed));
        if !listed {
            return;
        }
        let Some((classes, snap)) = self.inputs(model) else {
            return;
        };
        if !self.find_interface(&snap.node_addresses).await {
            return;
        }
        let addrs: BTreeSet<IpAddr> = snap
            .wanted
            .keys()
            .chain(self.held.keys())
            .copied()
            .collect();
        let mut changed = false;
        for addr in addrs {
            let (action, seen) = self.decide(addr, snap.wanted.get(&addr));
            changed |= self.act(addr, action, seen).await;
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

    /// The pool classes and the model's addresses with their eligible nodes; `None` until
    /// the model has listed.
    fn inputs(&mut self, model: &ModelView) -> Option<(BTreeMap<String, PoolClass>, Snapshot)> {
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
        let snap = model(&classes, &nodes)?;
        for w in warnings.into_iter().chain(snap.warnings.iter().cloned()) {
            self.warn_once(w);
        }
        Some((classes, snap))
    }

    /// Finds the interface once; false while there is none (then no Lease may be taken).
    async fn find_interface(&mut self, node_addresses: &[IpAddr]) -> bool {
        if self.iface.is_some() {
            return true;
        }
        let found = match &self.cfg.interface {
            Some(name) => link::interface_named(name).await,
            None => link::interface_with(node_addresses).await,
        };
        match found {
            Ok(i) => {
                tracing::info!(interface = %i.name, "L2 announcement interface");
                self.iface = Some(i);
                true
            }
            Err(e) => {
                self.warn_once(e.to_string());
                false
            }
        }
    }

    /// What to do with `addr` now, with its Lease as last observed.
    fn decide(
        &mut self,
        addr: IpAddr,
        eligible: Option<&BTreeSet<String>>,
    ) -> (Action, Option<Observed>) {
        let seen = lock(&self.watched.leases)
            .get(&announce::lease_name(&addr))
            .cloned();
        let view = seen.as_ref().map(LeaseView::of);
        let held = self.held.get(&addr).map(|h| h.renewed_at);
        let now = Instant::now();
        if held.is_none() && announce::takeable(view.as_ref(), &self.cfg.node, now) {
            self.takeable_since.entry(addr).or_insert(now);
        } else {
            self.takeable_since.remove(&addr);
        }
        let action = announce::decide(&AddrState {
            me: &self.cfg.node,
            addr,
            eligible,
            lease: view.as_ref(),
            held_since_renewal: held,
            takeable_since: self.takeable_since.get(&addr).copied(),
            now,
            timing: self.cfg.timing,
        });
        (action, seen)
    }

    /// Carries `action` out; true when the addresses on the interface changed.
    async fn act(&mut self, addr: IpAddr, action: Action, seen: Option<Observed>) -> bool {
        match action {
            Action::Nothing => false,
            Action::Acquire => self.acquire(addr, seen).await,
            Action::Renew => {
                self.renew(addr).await;
                false
            }
            Action::Release => {
                self.release(addr, "no longer eligible").await;
                true
            }
            Action::Lost => {
                self.lost(addr).await;
                true
            }
        }
    }

    fn set_announcing(&self, addr: IpAddr, on: bool) {
        let mut a = self.announcing.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            a.insert(addr);
        } else {
            a.remove(&addr);
        }
    }

    /// Writes this node into the Lease, adds the address and announces it; true when it
    /// now holds the address.
    async fn acquire(&mut self, addr: IpAddr, seen: Option<Observed>) -> bool {
        let Some(iface) = self.iface.clone() else {
            return false;
        };
        let started = Instant::now();
        let Some(written) = self.take_lease(addr, seen.as_ref(), started).await else {
            return false;
        };
        self.held.insert(
            addr,
            Held {
                lease: written,
                renewed_at: started,
            },
        );
        if let Err(e) = link::hold(&iface, &addr, self.cfg.timing.duration).await {
            tracing::warn!(address = %addr, "cannot add the address; giving the Lease up: {e}");
            self.release(addr, "address could not be added").await;
            return false;
        }
        let previous = seen.as_ref().map(LeaseView::of);
        let previous = previous.and_then(|v| v.holder.or(v.released_by));
        tracing::info!(
            address = %addr,
            interface = %iface.name,
            previous_holder = previous.as_deref().unwrap_or("none"),
            "announcing pool address (took the Lease)"
        );
        self.metrics.l2_transition("acquired");
        self.set_announcing(addr, true);
        if let IpAddr::V4(v4) = addr {
            self.send_garps(iface, v4);
        }
        true
    }

    /// The Lease write of [`Self::acquire`]: creates the Lease, or takes the one observed
    /// (at the resourceVersion observed). The Lease as written, or `None` when another
    /// node came first or the write failed.
    async fn take_lease(
        &self,
        addr: IpAddr,
        seen: Option<&Observed>,
        started: Instant,
    ) -> Option<Lease> {
        let name = announce::lease_name(&addr);
        let current = match seen {
            None => lease::absent(
                &name,
                [(announce::LEASE_LABEL.to_string(), "true".to_string())].into(),
            ),
            Some(s) => {
                let mut l = s.lease.clone();
                if let Some(a) = l.metadata.annotations.as_mut() {
                    a.remove(announce::RELEASED_BY);
                }
                l
            }
        };
        let deadline = started + self.cfg.timing.attempt;
        match self
            .leases
            .acquire(current, Timestamp::now(), deadline)
            .await
        {
            Ok(Write::Done(l)) => Some(*l),
            Ok(Write::Conflict) => {
                tracing::debug!(address = %addr, "another node took the Lease first");
                None
            }
            Err(e) => {
                tracing::warn!(address = %addr, "taking the Lease: {e}");
                None
            }
        }
    }

    /// Several gratuitous ARPs, spread over a second: a neighbour ignores updates for an
    /// entry changed less than its locktime ago. Stops when the address leaves.
    fn send_garps(&self, iface: Interface, v4: std::net::Ipv4Addr) {
        let announcing = self.announcing.clone();
        let metrics = self.metrics.clone();
        let addr = IpAddr::V4(v4);
        tokio::spawn(async move {
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

    async fn renew(&mut self, addr: IpAddr) {
        let Some(iface) = self.iface.clone() else {
            return;
        };
        let Some(h) = self.held.get(&addr) else {
            return;
        };
        let started = Instant::now();
        let timing = self.cfg.timing;
        // Past the claim's end the address is lost anyway.
        let deadline = (started + timing.attempt).min(h.renewed_at + timing.duration);
        let renewed = self
            .leases
            .renew(h.lease.clone(), Timestamp::now(), deadline)
            .await;
        match renewed {
            Ok(Write::Done(w)) => {
                self.held.insert(
                    addr,
                    Held {
                        lease: *w,
                        renewed_at: started,
                    },
                );
                // Only a renewed Lease extends the address's life.
                if let Err(e) = link::hold(&iface, &addr, timing.duration).await {
                    tracing::warn!(address = %addr, "refreshing the address: {e}");
                }
            }
            Ok(Write::Conflict) => self.reread(addr).await,
            Err(e) => tracing::warn!(address = %addr, "renewing the Lease: {e}"),
        }
    }

    /// A renewal conflicted: if the Lease is still this node's (written by someone else
    /// meanwhile), renew from the fresh copy on the next tick; otherwise it is lost.
    async fn reread(&mut self, addr: IpAddr) {
        let name = announce::lease_name(&addr);
        let deadline = Instant::now() + self.cfg.timing.attempt;
        match self.leases.get(&name, deadline).await {
            Ok(Some(fresh))
                if lease::Record::of(&fresh).holder.as_deref() == Some(&self.cfg.node) =>
            {
                if let Some(h) = self.held.get_mut(&addr) {
                    h.lease = fresh;
                }
            }
            Ok(_) => self.lost(addr).await,
            Err(e) => tracing::warn!(address = %addr, "reading the Lease: {e}"),
        }
    }

    /// Removes the address from the interface and stops its gratuitous ARPs.
    async fn withdraw(&self, addr: IpAddr) {
        self.set_announcing(addr, false);
        if let Some(iface) = &self.iface
            && let Err(e) = link::remove(iface, &addr).await
        {
            tracing::warn!(address = %addr, "removing the address: {e}");
        }
    }

    /// Removes the address, then frees the Lease so another node takes it at once.
    async fn release(&mut self, addr: IpAddr, why: &str) {
        let Some(h) = self.held.remove(&addr) else {
            return;
        };
        self.withdraw(addr).await;
        let mut l = h.lease;
        l.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(announce::RELEASED_BY.into(), self.cfg.node.clone());
        let deadline = Instant::now() + self.cfg.timing.attempt;
        match self.leases.release(l, deadline).await {
            Ok(Write::Done(_)) => {}
            // Another node may have taken it already; otherwise it expires.
            Ok(Write::Conflict) => {
                tracing::debug!(address = %addr, "the Lease changed before its release")
            }
            Err(e) => tracing::debug!(address = %addr, "releasing the Lease: {e}"),
        }
        tracing::info!(address = %addr, reason = why, "stopped announcing pool address (released the Lease)");
        self.metrics.l2_transition("released");
    }

    /// Another node holds the Lease (or ours ran out): remove the address, write nothing.
    async fn lost(&mut self, addr: IpAddr) {
        if self.held.remove(&addr).is_none() {
            return;
        }
        self.withdraw(addr).await;
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
