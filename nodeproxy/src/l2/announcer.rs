//! The L2 announcer's I/O: watches LoadBalancerClasses, Nodes and its Leases, applies
//! [`announce::decide`] to every address each step (every tick, and whenever a renewal
//! falls due), writes Leases through [`berth_runtime::lease`] (always guarded by their
//! resourceVersion, so two nodes never both win one; each call with a deadline; many at
//! once, see [`crate::l2::schedule`]), deletes the Leases of addresses allocated no more,
//! and puts addresses on the interface through [`link`], all of a step in one netlink
//! exchange. A Lease's observation time is the arrival of the watch event that last
//! changed it, so another node's Lease expires by this node's clock alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_crds::LoadBalancerClass;
use berth_runtime::lease::{self, LeaseClient, Observations, Observed};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, watch};

use crate::error::Error;
use crate::l2::announce::{self, Action, AddrState, LeaseView, NodeLabels, PoolClass, Timing};
use crate::l2::link::{self, Interface};
use crate::l2::schedule::{self, InFlight, Job, Outcome, Worker};
use crate::metrics::Metrics;

/// What the announcer reads from the agent's model: the addresses to announce with their
/// eligible nodes, and the node's own addresses (to find the interface).
pub struct Snapshot {
    pub wanted: BTreeMap<IpAddr, BTreeSet<String>>,
    /// Addresses whose class names its interfaces: (class, interface names).
    pub interfaces: BTreeMap<IpAddr, (String, Vec<String>)>,
    pub node_addresses: Vec<IpAddr>,
    pub warnings: Vec<String>,
    /// Nodes peer probes find dead: their Leases are takeable at once.
    pub dead: BTreeSet<String>,
}

/// Computes a [`Snapshot`] from the classes and the nodes (with their labels); `None`
/// until the model's watches have listed.
pub type ModelView =
    Arc<dyn Fn(&BTreeMap<String, PoolClass>, &NodeLabels) -> Option<Snapshot> + Send + Sync>;

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

/// An address handed over: kept on the interface after its Lease was released.
#[derive(Clone, Copy, Debug)]
struct Handover {
    /// Withdrawn at the latest then, taken or not.
    until: Instant,
    /// When this node first saw another node holding the Lease.
    taken_at: Option<Instant>,
}

/// How long a handed-over address stays after another node took its Lease: the new
/// holder adds it and sends its first gratuitous ARP right after its write.
const HANDOVER_GRACE: Duration = Duration::from_millis(500);

/// How long a stopping agent waits for other nodes to take its addresses over (within
/// the agent's 5 s bound for stopping).
const STOP_HANDOVER: Duration = Duration::from_secs(3);

/// One step's work: Lease writes, and addresses to take off the interface before them.
#[derive(Default)]
struct Plan {
    jobs: Vec<(IpAddr, Job)>,
    withdraw: Vec<IpAddr>,
    /// Held addresses whose Lease another node has (or ours ran out).
    lost: Vec<IpAddr>,
}

pub struct Announcer {
    cfg: Config,
    worker: Worker,
    /// Lease writes of earlier steps still running.
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    watched: Watched,
    held: BTreeMap<IpAddr, Held>,
    /// Addresses on the interface now; a gratuitous ARP burst stops when its address leaves.
    announcing: Arc<Mutex<BTreeSet<IpAddr>>>,
    takeable_since: BTreeMap<IpAddr, Instant>,
    /// Nodes peer probes found dead at the last step.
    dead: BTreeSet<String>,
    /// Addresses whose Lease this node gave up while they are still wanted: they stay on
    /// the interface until another node has taken the Lease and announced them
    /// (make-before-break), or the hand-over's bound passes.
    handing_over: BTreeMap<IpAddr, Handover>,
    /// Brings the next step forward: peer probes found a node dead (or alive again), or a
    /// Lease was released.
    wake: Arc<Notify>,
    /// The agent's interface: addresses of classes naming none go there.
    iface: Option<Interface>,
    /// Interfaces named by classes, as found on this node (looked up again at each
    /// sweep: one may be recreated).
    named: BTreeMap<String, Interface>,
    /// Where each wanted address of a class naming interfaces goes, this step.
    targets: BTreeMap<IpAddr, Interface>,
    /// Which interface each address this node put on one is on (absent: the agent's).
    placed: BTreeMap<IpAddr, Interface>,
    last_interface_sync: Option<Instant>,
    warned: BTreeSet<String>,
    recorder: Recorder,
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
    pub fn new(client: Client, cfg: Config, metrics: Arc<Metrics>, wake: Arc<Notify>) -> Self {
        let listed: [Arc<AtomicBool>; 3] = Default::default();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "berth-nodeproxy".into(),
                instance: Some(cfg.node.clone()),
            },
        );
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
        let released = wake.clone();
        tokio::spawn(follow(
            "Lease",
            watcher::watcher(
                api.clone(),
                watcher::Config::default().labels(announce::LEASE_LABEL),
            ),
            listed[2].clone(),
            // Stamped on arrival: the only clock that judges another node's Lease. A
            // released Lease is decided at once: it may be handed over to this node.
            move |ev| {
                let freed = matches!(&ev, watcher::Event::Apply(l) if lease::Record::of(l).holder.is_none());
                lock(&observations).apply(ev, Instant::now());
                if freed {
                    released.notify_one();
                }
            },
        ));
        Self {
            worker: Worker {
                leases: LeaseClient::new(api, &cfg.node, cfg.timing.duration),
                node: cfg.node.clone(),
                timing: cfg.timing,
            },
            in_flight: InFlight::default(),
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
            dead: BTreeSet::new(),
            handing_over: BTreeMap::new(),
            wake,
            iface: None,
            named: BTreeMap::new(),
            targets: BTreeMap::new(),
            placed: BTreeMap::new(),
            last_interface_sync: None,
            warned: BTreeSet::new(),
            recorder,
        }
    }

    /// Announces until `shutdown` turns true, then gives every address up. A step runs
    /// every tick, and earlier when a renewal falls due or a write finishes: each address
    /// is renewed at its own time, not at the next tick. Writes finish in the background
    /// and are settled as they come; a wake brings the next step forward.
    pub async fn run(mut self, model: ModelView, mut shutdown: watch::Receiver<bool>) {
        let wake = self.wake.clone();
        let mut next = Instant::now();
        let mut last_step = next;
        loop {
            let finished = tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => Vec::new(),
                done = self.in_flight.finished() => done,
                _ = wake.notified() => {
                    next = next.min(last_step + self.cfg.timing.tick / 8);
                    Vec::new()
                }
                _ = shutdown.changed() => break,
            };
            if *shutdown.borrow() {
                break;
            }
            if !finished.is_empty() {
                self.finish(finished).await;
                // Decide the finished addresses soon, without spinning.
                next = next.min(last_step + self.cfg.timing.tick / 8);
            }
            if Instant::now() >= next {
                last_step = Instant::now();
                self.step(&model).await;
                next = self.next_step(last_step);
            }
        }
        let settled = self
            .in_flight
            .drain(Instant::now() + self.cfg.timing.attempt)
            .await;
        self.finish(settled).await;
        self.release_all().await;
    }

    /// Settles finished writes; a change of the interface triggers a sweep of stale
    /// addresses.
    async fn finish(&mut self, outcomes: Vec<(IpAddr, Outcome)>) {
        if self.iface.is_none() || outcomes.is_empty() {
            return;
        }
        if self.settle(outcomes).await {
            self.remove_stale().await;
        }
        self.metrics.l2_held(self.held.len());
    }

    /// When the next step runs: at the next tick or the earliest renewal due (of those not
    /// in flight already), whichever comes first, but not sooner than an eighth of a tick
    /// after this one started (a renewal that keeps failing stays due; it must not spin
    /// the loop).
    fn next_step(&self, started: Instant) -> Instant {
        let timing = self.cfg.timing;
        let due = self
            .held
            .iter()
            .filter(|(a, _)| !self.in_flight.busy(a))
            .map(|(_, h)| h.renewed_at + timing.renew)
            .min();
        let handover = self
            .handing_over
            .values()
            .map(|h| {
                h.taken_at
                    .map_or(h.until, |t| (t + HANDOVER_GRACE).min(h.until))
            })
            .min();
        let due = due.into_iter().chain(handover).min();
        let at = due.map_or(started + timing.tick, |d| d.min(started + timing.tick));
        at.max(started + timing.tick / 8)
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
        let Some((_, snap)) = self.inputs(model) else {
            return;
        };
        if !self.find_interface(&snap.node_addresses).await {
            return;
        }
        self.dead = snap.dead.clone();
        let mut wanted = snap.wanted;
        self.place(&snap.interfaces, &mut wanted).await;
        let handed = self.handed_over(&wanted);
        let mut plan = self.plan(&wanted);
        plan.withdraw.extend(handed);
        self.takeable_since.retain(|a, _| wanted.contains_key(a));
        let changed = !plan.withdraw.is_empty();
        // Addresses leave the interface before their Leases are given up: two nodes
        // never answer for one address.
        self.withdraw(plan.withdraw).await;
        for addr in plan.lost {
            tracing::info!(address = %addr, "stopped announcing pool address (lost the Lease)");
            self.metrics.l2_transition("lost");
        }
        self.in_flight.start(&self.worker, plan.jobs);
        let due = self
            .last_interface_sync
            .is_none_or(|t| t.elapsed() >= self.cfg.timing.renew);
        if changed || due {
            self.remove_stale().await;
        }
        self.metrics.l2_held(self.held.len());
    }

    /// Decides every address and sorts the decisions into Lease writes and addresses to
    /// take off the interface first; adds the deletion of Leases nobody needs any more.
    fn plan(&mut self, wanted: &BTreeMap<IpAddr, BTreeSet<String>>) -> Plan {
        // An address with a write in flight is decided once its outcome is settled.
        let addrs: BTreeSet<IpAddr> = wanted
            .keys()
            .chain(self.held.keys())
            .filter(|a| !self.in_flight.busy(a))
            .copied()
            .collect();
        let mut plan = Plan::default();
        let timing = self.cfg.timing;
        // Takes and releases beyond this wait for the next step (decided afresh then), so
        // that a burst of them does not keep the renewals falling due meanwhile waiting.
        let mut others = 0;
        for addr in addrs {
            let (action, seen) = self.decide(addr, wanted.get(&addr));
            let busy = others >= schedule::OTHERS_PER_STEP;
            match action {
                Action::Nothing => {}
                Action::Acquire | Action::Release if busy => {}
                Action::Acquire => {
                    others += 1;
                    self.handing_over.remove(&addr);
                    plan.jobs.push((addr, Job::Acquire { seen }));
                }
                Action::Renew => {
                    if let Some(h) = self.held.get(&addr) {
                        let job = Job::Renew {
                            held: h.lease.clone(),
                            due: h.renewed_at + timing.renew,
                            claim_end: h.renewed_at + timing.duration,
                        };
                        plan.jobs.push((addr, job));
                    }
                }
                Action::Release => {
                    if let Some(h) = self.held.remove(&addr) {
                        others += 1;
                        // Allocated no more: the Lease goes with the address. Still
                        // wanted: another node takes it over before it leaves here.
                        let delete = !wanted.contains_key(&addr);
                        if delete {
                            plan.withdraw.push(addr);
                        } else {
                            self.hand_over(addr);
                        }
                        plan.jobs.push((
                            addr,
                            Job::Release {
                                held: h.lease,
                                delete,
                            },
                        ));
                    }
                }
                Action::Lost => {
                    if self.held.remove(&addr).is_some() {
                        plan.withdraw.push(addr);
                        plan.lost.push(addr);
                    }
                }
            }
        }
        let room = schedule::OTHERS_PER_STEP.saturating_sub(others);
        plan.jobs.extend(self.sweeps(wanted).into_iter().take(room));
        plan
    }

    /// Keeps `addr` on the interface after its Lease is released, for a Lease duration at
    /// most, and stops its gratuitous ARPs.
    fn hand_over(&mut self, addr: IpAddr) {
        self.set_announcing(addr, false);
        let until = Instant::now() + self.cfg.timing.duration;
        self.handing_over.insert(
            addr,
            Handover {
                until,
                taken_at: None,
            },
        );
    }

    /// The handed-over addresses to take off the interface now: another node has held
    /// the Lease for [`HANDOVER_GRACE`], the bound passed, or the address is no longer
    /// wanted.
    fn handed_over(&mut self, wanted: &BTreeMap<IpAddr, BTreeSet<String>>) -> Vec<IpAddr> {
        let now = Instant::now();
        let leases = lock(&self.watched.leases);
        let mut done = Vec::new();
        for (addr, h) in self.handing_over.iter_mut() {
            let taken = leases
                .get(&announce::lease_name(addr))
                .and_then(|o| o.holder())
                .is_some_and(|holder| holder != self.cfg.node);
            if taken && h.taken_at.is_none() {
                h.taken_at = Some(now);
            }
            let grace_over = h.taken_at.is_some_and(|t| now >= t + HANDOVER_GRACE);
            if grace_over || now >= h.until || !wanted.contains_key(addr) {
                done.push(*addr);
            }
        }
        drop(leases);
        for addr in &done {
            if let Some(h) = self.handing_over.remove(addr) {
                tracing::info!(address = %addr, taken = h.taken_at.is_some(), "handed-over pool address withdrawn");
            }
        }
        done
    }

    /// Leases of addresses allocated no more that have stood still for a whole duration:
    /// their holder died or released them without deleting. Any agent deletes them (at
    /// the resourceVersion seen, so a Lease taken meanwhile stays).
    fn sweeps(&self, wanted: &BTreeMap<IpAddr, BTreeSet<String>>) -> Vec<(IpAddr, Job)> {
        let names: BTreeMap<String, IpAddr> = wanted
            .keys()
            .chain(self.held.keys())
            .map(|a| (announce::lease_name(a), *a))
            .collect();
        let now = Instant::now();
        lock(&self.watched.leases)
            .iter()
            .filter(|(name, o)| !names.contains_key(*name) && o.expired(now))
            .filter_map(|(name, o)| {
                // The address is only for logs; a Lease not named by berth is left alone.
                let addr = address_of(name)?;
                Some((
                    addr,
                    Job::Sweep {
                        lease: o.lease.clone(),
                    },
                ))
            })
            .collect()
    }

    /// Applies the Lease writes' outcomes; refreshes or adds the addresses of renewed and
    /// taken Leases in one netlink exchange. True when the interface changed.
    async fn settle(&mut self, outcomes: Vec<(IpAddr, Outcome)>) -> bool {
        let mut taken = Vec::new();
        let mut refresh = Vec::new();
        for (addr, outcome) in outcomes {
            match outcome {
                Outcome::Acquired {
                    lease,
                    started,
                    previous,
                } => {
                    self.held.insert(
                        addr,
                        Held {
                            lease,
                            renewed_at: started,
                        },
                    );
                    taken.push((addr, previous));
                }
                Outcome::Renewed {
                    lease,
                    started,
                    late,
                } => {
                    self.renewed(addr, late);
                    self.held.insert(
                        addr,
                        Held {
                            lease,
                            renewed_at: started,
                        },
                    );
                    refresh.push(addr);
                }
                Outcome::StillOurs(fresh) => {
                    if let Some(h) = self.held.get_mut(&addr) {
                        h.lease = fresh;
                    }
                }
                Outcome::Lost => {
                    if self.held.remove(&addr).is_some() {
                        self.withdraw(vec![addr]).await;
                        tracing::info!(address = %addr, "stopped announcing pool address (lost the Lease)");
                        self.metrics.l2_transition("lost");
                    }
                }
                Outcome::Released { deleted } => {
                    tracing::info!(address = %addr, lease_deleted = deleted, "stopped announcing pool address (released the Lease)");
                    self.metrics.l2_transition("released");
                }
                Outcome::Swept => {
                    tracing::info!(address = %addr, "deleted the expired Lease of an address no longer allocated");
                }
                Outcome::Unchanged => {}
            }
        }
        let hold = taken.iter().map(|t| t.0).chain(refresh).collect();
        let failed = self.hold(hold).await;
        let mut not_added = Vec::new();
        for (addr, e) in failed {
            if taken.iter().any(|t| t.0 == addr) {
                tracing::warn!(address = %addr, "cannot add the address; giving the Lease up: {e}");
                not_added.push(addr);
            } else {
                tracing::warn!(address = %addr, "refreshing the address: {e}");
            }
        }
        let changed = !taken.is_empty();
        for (addr, previous) in taken {
            if !not_added.contains(&addr) {
                self.announced(addr, previous);
            }
        }
        self.release_some(not_added).await;
        changed
    }

    /// A renewal started `late` after its due time. Worth a warning from a sixth of the
    /// lease duration on: half the slack between the renewal and the claim's end is gone.
    fn renewed(&self, addr: IpAddr, late: Duration) {
        self.metrics.l2_renewal_lateness(late);
        if late >= self.cfg.timing.attempt {
            tracing::warn!(
                address = %addr,
                late_ms = u64::try_from(late.as_millis()).unwrap_or(u64::MAX),
                "renewed the Lease late"
            );
        }
    }

    /// Puts (or keeps) addresses on their interfaces, each on its class's when it names
    /// one, else the agent's; an address whose interface changed leaves the old one.
    /// Returns the failures.
    async fn hold(&mut self, addrs: Vec<IpAddr>) -> Vec<(IpAddr, Error)> {
        let Some(default) = self.iface.clone() else {
            return Vec::new();
        };
        let lifetime = link::lifetime(self.cfg.timing.duration);
        let mut by_iface: BTreeMap<i32, (Interface, Vec<IpAddr>, Vec<IpAddr>)> = BTreeMap::new();
        for addr in addrs {
            let to = self.targets.get(&addr).cloned().unwrap_or(default.clone());
            let from = self
                .placed
                .insert(addr, to.clone())
                .unwrap_or(default.clone());
            if from.index != to.index {
                let e = by_iface.entry(from.index).or_insert((from, vec![], vec![]));
                e.2.push(addr);
            }
            let e = by_iface.entry(to.index).or_insert((to, vec![], vec![]));
            e.1.push(addr);
        }
        let mut failed = Vec::new();
        for (iface, hold, remove) in by_iface.into_values() {
            failed.extend(link::apply(&iface, hold, remove, lifetime).await);
        }
        failed
    }

    /// The interface of each address of a class naming interfaces: the first of them
    /// this node has. Where it has none, this node is taken out of the address's
    /// eligible nodes (it does not take the Lease; it hands it over if it holds it), and
    /// says so once in a Warning Event on the class.
    async fn place(
        &mut self,
        interfaces: &BTreeMap<IpAddr, (String, Vec<String>)>,
        wanted: &mut BTreeMap<IpAddr, BTreeSet<String>>,
    ) {
        self.targets.clear();
        let mut missing: BTreeSet<String> = BTreeSet::new();
        let mut unplaced: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (addr, (class, names)) in interfaces {
            let Some(eligible) = wanted.get_mut(addr) else {
                continue;
            };
            let mut found = None;
            for name in names {
                if missing.contains(name) {
                    continue;
                }
                if let Some(i) = self.named.get(name) {
                    found = Some(i.clone());
                    break;
                }
                match link::interface_named(name).await {
                    Ok(i) => {
                        self.named.insert(name.clone(), i.clone());
                        found = Some(i);
                        break;
                    }
                    Err(_) => drop(missing.insert(name.clone())),
                }
            }
            match found {
                Some(i) => drop(self.targets.insert(*addr, i)),
                None => {
                    eligible.remove(&self.cfg.node);
                    unplaced.insert(class.clone(), names.clone());
                }
            }
        }
        for (class, names) in unplaced {
            let note = format!(
                "node {} has none of the interfaces {names:?} of LoadBalancerClass {class}: \
                 it does not announce the class's addresses over L2",
                self.cfg.node
            );
            if !self.warned.insert(note.clone()) {
                continue;
            }
            tracing::warn!("L2 announcement: {note}");
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "InterfaceNotFound".into(),
                note: Some(note),
                action: "Announce".into(),
                secondary: None,
            };
            let uid = self
                .watched
                .classes
                .state()
                .iter()
                .find(|c| c.name_any() == class)
                .and_then(|c| c.uid());
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("berth.dev/v1alpha1".into()),
                kind: Some("LoadBalancerClass".into()),
                name: Some(class),
                uid,
                ..Default::default()
            };
            if let Err(e) = self.recorder.publish(&event, &reference).await {
                tracing::debug!("cannot record event: {e}");
            }
        }
    }

    /// A taken address is on its interface: announce it.
    fn announced(&self, addr: IpAddr, previous: Option<String>) {
        let Some(iface) = self.placed.get(&addr).or(self.iface.as_ref()).cloned() else {
            return;
        };
        tracing::info!(
            address = %addr,
            interface = %iface.name,
            previous_holder = previous.as_deref().unwrap_or("none"),
            "announcing pool address (took the Lease)"
        );
        self.metrics.l2_transition("acquired");
        self.set_announcing(addr, true);
        self.send_garps(iface, addr);
    }

    /// The pool classes and the model's addresses with their eligible nodes; `None` until
    /// the model has listed.
    fn inputs(&mut self, model: &ModelView) -> Option<(BTreeMap<String, PoolClass>, Snapshot)> {
        let mut warnings = Vec::new();
        let classes = pool_classes(&self.watched.classes, &mut warnings);
        // As for other load balancers, excluded nodes do not announce.
        let nodes: NodeLabels = self
            .watched
            .nodes
            .state()
            .iter()
            .filter(|n| !n.labels().contains_key(berth_crds::LABEL_EXCLUDE_FROM_LB))
            .map(|n| (n.name_any(), n.labels().clone()))
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
        let now = Instant::now();
        let view = seen
            .as_ref()
            .map(|s| LeaseView::of(s).unless_holder_dead(&self.dead, now));
        let held = self.held.get(&addr).map(|h| h.renewed_at);
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

    fn set_announcing(&self, addr: IpAddr, on: bool) {
        let mut a = self.announcing.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            a.insert(addr);
        } else {
            a.remove(&addr);
        }
    }

    /// Several gratuitous ARPs (IPv4) or unsolicited neighbour advertisements (IPv6),
    /// spread over a second: a neighbour ignores ARP updates for an entry changed less
    /// than its locktime ago, and any single frame may be lost. Stops when the address
    /// leaves.
    fn send_garps(&self, iface: Interface, addr: IpAddr) {
        let announcing = self.announcing.clone();
        let metrics = self.metrics.clone();
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
                let sent = match addr {
                    IpAddr::V4(v4) => link::send_garp(&iface, v4).map(|()| metrics.garp_sent()),
                    IpAddr::V6(v6) => link::send_unsolicited_na(&iface, v6)
                        .map(|()| metrics.neighbour_advert_sent()),
                };
                if let Err(e) = sent {
                    tracing::warn!(address = %addr, "announcing the address: {e}");
                }
            }
        });
    }

    /// Takes addresses off their interfaces and stops their gratuitous ARPs.
    async fn withdraw(&mut self, addrs: Vec<IpAddr>) {
        let Some(default) = self.iface.clone() else {
            return;
        };
        let mut by_iface: BTreeMap<i32, (Interface, Vec<IpAddr>)> = BTreeMap::new();
        for a in addrs {
            self.set_announcing(a, false);
            let iface = self.placed.remove(&a).unwrap_or(default.clone());
            by_iface
                .entry(iface.index)
                .or_insert((iface, vec![]))
                .1
                .push(a);
        }
        let lifetime = link::lifetime(self.cfg.timing.duration);
        for (iface, addrs) in by_iface.into_values() {
            for (addr, e) in link::apply(&iface, Vec::new(), addrs, lifetime).await {
                tracing::warn!(address = %addr, "removing the address: {e}");
            }
        }
    }

    /// Removes these held addresses, then frees their Leases so other nodes take them at
    /// once.
    async fn release_some(&mut self, addrs: Vec<IpAddr>) {
        if self.iface.is_none() {
            return;
        }
        let jobs: Vec<(IpAddr, Job)> = addrs
            .into_iter()
            .filter_map(|a| {
                let h = self.held.remove(&a)?;
                Some((
                    a,
                    Job::Release {
                        held: h.lease,
                        delete: false,
                    },
                ))
            })
            .collect();
        self.withdraw(jobs.iter().map(|j| j.0).collect()).await;
        for (addr, outcome) in self.worker.run(jobs).await {
            if let Outcome::Released { .. } = outcome {
                tracing::info!(address = %addr, "stopped announcing pool address (released the Lease)");
                self.metrics.l2_transition("released");
            }
        }
    }

    /// The agent stops: every Lease is freed first, and each address leaves the
    /// interface once another node holds its Lease (make-before-break), or after
    /// [`STOP_HANDOVER`] for those nobody took; handed-over addresses go the same way.
    async fn release_all(&mut self) {
        if self.iface.is_none() {
            return;
        }
        let jobs: Vec<(IpAddr, Job)> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|(a, h)| {
                let job = Job::Release {
                    held: h.lease,
                    delete: false,
                };
                (a, job)
            })
            .collect();
        for (addr, _) in &jobs {
            self.hand_over(*addr);
        }
        for (addr, outcome) in self.worker.run(jobs).await {
            if let Outcome::Released { .. } = outcome {
                tracing::info!(address = %addr, "released the Lease of a pool address on stop");
                self.metrics.l2_transition("released");
            }
        }
        let until = Instant::now() + STOP_HANDOVER;
        let wanted: BTreeMap<IpAddr, BTreeSet<String>> = self
            .handing_over
            .keys()
            .map(|a| (*a, BTreeSet::new()))
            .collect();
        loop {
            let done = self.handed_over(&wanted);
            self.withdraw(done).await;
            if self.handing_over.is_empty() || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rest: Vec<IpAddr> = std::mem::take(&mut self.handing_over).into_keys().collect();
        self.withdraw(rest).await;
    }

    /// Removes the addresses berth put on the interface that this node does not hold:
    /// left by an agent killed earlier (on this node, before a restart) or released
    /// while a removal failed. Only addresses stamped as berth's are touched.
    async fn remove_stale(&mut self) {
        let Some(default) = self.iface.clone() else {
            return;
        };
        self.last_interface_sync = Some(Instant::now());
        // Every interface berth may have put an address on: the agent's, and those the
        // classes name (their cache refreshed here: one may have been recreated).
        let mut ifaces: BTreeMap<i32, Interface> =
            BTreeMap::from([(default.index, default.clone())]);
        ifaces.extend(self.placed.values().map(|i| (i.index, i.clone())));
        ifaces.extend(self.named.values().map(|i| (i.index, i.clone())));
        self.named.clear();
        let mine: Vec<IpAddr> = self
            .held
            .keys()
            .chain(self.handing_over.keys())
            .copied()
            .collect();
        let lifetime = link::lifetime(self.cfg.timing.duration);
        for iface in ifaces.into_values() {
            let on = match link::addresses(&iface).await {
                Ok(a) => a,
                // Gone since: its addresses went with it.
                Err(e) => {
                    tracing::debug!("listing addresses of {}: {e}", iface.name);
                    continue;
                }
            };
            let here: BTreeSet<IpAddr> = mine
                .iter()
                .filter(|a| self.placed.get(a).unwrap_or(&default).index == iface.index)
                .copied()
                .collect();
            let stale = link::stale(&on, &here);
            let failed = link::apply(&iface, Vec::new(), stale.clone(), lifetime).await;
            for addr in stale {
                match failed.iter().find(|f| f.0 == addr) {
                    None => {
                        tracing::info!(address = %addr, interface = %iface.name, "removed a pool address this node does not hold")
                    }
                    Some((_, e)) => {
                        tracing::warn!(address = %addr, "removing a stale address: {e}")
                    }
                }
            }
        }
    }
}

/// The address a `berth-l2-…` Lease is named after (the inverse of
/// [`announce::lease_name`]); `None` for another name.
fn address_of(name: &str) -> Option<IpAddr> {
    let rest = name.strip_prefix("berth-l2-")?;
    let v4 = rest.replace('-', ".");
    if let Ok(a) = v4.parse::<std::net::Ipv4Addr>() {
        return Some(IpAddr::V4(a));
    }
    // `fd00::` is named `fd00--0`, which reads back as `fd00::0`, the same address.
    rest.replace('-', ":")
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_read_back_as_their_addresses() {
        for a in ["198.19.8.5", "fd00::5", "fd00::", "::1"] {
            let addr: IpAddr = a.parse().expect("ip");
            assert_eq!(address_of(&announce::lease_name(&addr)), Some(addr), "{a}");
        }
        assert_eq!(address_of("berth-controller-leader"), None);
        assert_eq!(address_of("berth-l2-not-an-address"), None);
    }
}
