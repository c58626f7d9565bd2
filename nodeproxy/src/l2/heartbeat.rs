//! Agent heartbeats: which nodes run a live agent, so L2 ranking skips the others.
//!
//! Every agent holds one `coordination.k8s.io/v1` Lease of its own, `berth-agent-<node>`
//! in the Lease namespace, renewed every third of the L2 lease duration and released on a
//! graceful stop. Every agent watches all of them: a node is alive while its Lease names
//! it as holder and this agent has seen the Lease change within one duration (expiry by
//! observation, [`berth_runtime::lease::Observed`]; the holder's clock never counts). A
//! Node without an agent (excluded by the DaemonSet's node selector) never writes one, a
//! killed agent stops renewing, a stopped one releases: none of them is ranked, so the
//! first live node takes a free address at once instead of waiting a step per dead node
//! ranked before it.
//!
//! The heartbeat Lease also says where the agent listens for peer probes
//! ([`super::probe`]); a node the probes find dead is not alive either, well before its
//! heartbeat would expire.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_runtime::lease::{self, LeaseClient, Observations, Write};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::ResourceExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};

use crate::l2::announce::Timing;
use crate::l2::probe::{self, Probes};

/// Label on every heartbeat Lease; its value is the node's name (the watch selects on it).
pub const LABEL: &str = "berth.dev/agent-heartbeat";

/// Longest Lease name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The heartbeat Lease of `node`: `berth-agent-<node>`. A node name too long for the
/// prefix is cut and given a hash of the whole name, so names stay distinct.
pub fn lease_name(node: &str) -> String {
    let name = format!("berth-agent-{node}");
    if name.len() <= MAX_NAME {
        return name;
    }
    let digest = Sha256::digest(node.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut cut = MAX_NAME - hash.len() - 1;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hash}", name[..cut].trim_end_matches(['-', '.']))
}

/// The nodes of `nodes` whose agent is alive at `now`: `me`, and every node whose
/// heartbeat Lease names it as holder and has not stood still for a duration. Pure.
pub fn live(
    nodes: &BTreeSet<String>,
    me: &str,
    heartbeats: &Observations,
    now: Instant,
) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| {
            n.as_str() == me
                || heartbeats
                    .get(&lease_name(n))
                    .is_some_and(|seen| seen.held_by(n) && !seen.expired(now))
        })
        .cloned()
        .collect()
}

/// The nodes whose heartbeat says they are leaving. Pure.
pub fn leaving(heartbeats: &Observations) -> BTreeSet<String> {
    heartbeats
        .iter()
        .filter_map(|(name, seen)| {
            let node = seen.holder()?;
            let says = seen
                .lease
                .metadata
                .annotations
                .as_ref()?
                .contains_key(LEAVING);
            (says && *name == lease_name(node)).then(|| node.to_string())
        })
        .collect()
}

/// The nodes to rank among the `alive`: those not `leaving`, unless every one is (an
/// address announced from a leaving node beats one announced from none).
pub fn staying(alive: BTreeSet<String>, leaving: &BTreeSet<String>) -> BTreeSet<String> {
    let staying: BTreeSet<String> = alive.difference(leaving).cloned().collect();
    if staying.is_empty() { alive } else { staying }
}

/// Annotation on an agent's heartbeat Lease while its node is leaving: why.
pub const LEAVING: &str = "berth.dev/leaving";

/// Whether this node is leaving (cordoned, tainted for removal by the cluster autoscaler,
/// being deleted): no node ranks it for an address, and it hands its addresses over to
/// other nodes first (make-before-break).
#[derive(Debug, Default)]
pub struct Leaving {
    reason: Mutex<Option<String>>,
    changed: Notify,
}

impl Leaving {
    pub fn set(&self, why: Option<String>) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if *reason == why {
            return;
        }
        match &why {
            Some(w) => tracing::info!("node leaving ({w}): its pool addresses move to other nodes"),
            None => tracing::info!("node no longer leaving: it announces pool addresses again"),
        }
        *reason = why;
        self.changed.notify_one();
    }

    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Every other agent's probe address, from the heartbeat Leases that name their node as
/// holder. Pure.
pub fn probe_peers(heartbeats: &Observations) -> BTreeMap<String, SocketAddr> {
    heartbeats
        .iter()
        .filter_map(|(_, seen)| {
            let node = seen.holder()?;
            let value = seen
                .lease
                .metadata
                .annotations
                .as_ref()?
                .get(probe::ANNOTATION)?;
            (lease_name(node) == seen.lease.name_any())
                .then(|| probe::advertised(value))
                .flatten()
                .map(|a| (node.to_string(), a))
        })
        .collect()
}

/// Every agent's heartbeat as this agent observes it (cheap to clone).
#[derive(Clone)]
pub struct Liveness {
    me: String,
    heartbeats: Arc<Mutex<Observations>>,
    listed: Arc<AtomicBool>,
    probes: Option<Arc<Probes>>,
    leaving: Arc<Leaving>,
}

impl Liveness {
    fn lock(&self) -> MutexGuard<'_, Observations> {
        self.heartbeats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the heartbeat Leases of `api`'s namespace; tells `probes` whom to probe.
    /// This node counts as alive unless `leaving`.
    pub fn watch(
        api: Api<Lease>,
        me: &str,
        probes: Option<Arc<Probes>>,
        leaving: Arc<Leaving>,
    ) -> Self {
        let liveness = Self {
            me: me.into(),
            heartbeats: Arc::default(),
            listed: Arc::default(),
            probes,
            leaving,
        };
        tokio::spawn(liveness.clone().follow(api));
        liveness
    }

    async fn follow(self, api: Api<Lease>) {
        let cfg = watcher::Config::default().labels(LABEL);
        let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut failing = false;
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    failing = false;
                    if matches!(ev, Event::InitDone) {
                        self.listed.store(true, Ordering::Relaxed);
                    }
                    // Stamped on arrival: the only clock that judges another agent.
                    let mut seen = self.lock();
                    seen.apply(ev, Instant::now());
                    if let Some(p) = &self.probes {
                        p.set_peers(probe_peers(&seen));
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("heartbeat Lease watch (other agents look dead meanwhile): {e}");
                }
                Err(e) => tracing::debug!("heartbeat Lease watch: {e}"),
            }
        }
    }

    /// The live nodes among `nodes`; `None` until the heartbeats have been listed once
    /// (before that every other agent would look dead).
    pub fn live(&self, nodes: &BTreeSet<String>) -> Option<BTreeSet<String>> {
        if !self.listed.load(Ordering::Relaxed) {
            return None;
        }
        let seen = self.lock();
        let mut alive = live(nodes, &self.me, &seen, Instant::now());
        for dead in self.dead() {
            alive.remove(&dead);
        }
        let mut going = leaving(&seen);
        going.remove(&self.me);
        if self.leaving.reason().is_some() {
            going.insert(self.me.clone());
        }
        Some(staying(alive, &going))
    }

    /// Whether this node announces its addresses: not leaving, or leaving while no other
    /// live node stays (an address announced from a leaving node beats one announced
    /// from none).
    pub fn announces(&self) -> bool {
        if self.leaving.reason().is_none() {
            return true;
        }
        let seen = self.lock();
        let now = Instant::now();
        let going = leaving(&seen);
        let dead = self.dead();
        !seen.iter().any(|(name, o)| {
            o.holder().is_some_and(|n| {
                n != self.me
                    && *name == lease_name(n)
                    && !o.expired(now)
                    && !going.contains(n)
                    && !dead.contains(n)
            })
        })
    }

    /// The peers the probes find dead now (none without probes).
    pub fn dead(&self) -> BTreeSet<String> {
        self.probes.as_ref().map(|p| p.dead()).unwrap_or_default()
    }

    /// This agent's own heartbeat Lease as last observed.
    fn own(&self) -> Option<Lease> {
        self.lock()
            .get(&lease_name(&self.me))
            .map(|seen| seen.lease.clone())
    }
}

/// Where this agent's probes arrive (`ip:port`), once the node's address is known.
pub type ProbeAddress = Box<dyn Fn() -> Option<SocketAddr> + Send>;

/// This agent's side of its heartbeat: the Lease as last written, when it holds it.
pub struct Beat {
    leases: LeaseClient,
    held: Option<Lease>,
    probe_address: Option<ProbeAddress>,
    leaving: Arc<Leaving>,
}

impl Beat {
    /// `leases` writes as this node, with the L2 lease duration; the Lease's annotations
    /// say where probes arrive (`probe_address`, when probes are on) and whether the node
    /// is `leaving`.
    pub fn new(
        leases: LeaseClient,
        probe_address: Option<ProbeAddress>,
        leaving: Arc<Leaving>,
    ) -> Self {
        Self {
            leases,
            held: None,
            probe_address,
            leaving,
        }
    }

    /// Writes the annotations into `lease` (removing stale ones).
    fn annotate(&self, lease: &mut Lease) {
        let probe = self
            .probe_address
            .as_ref()
            .and_then(|f| f())
            .map(|a| a.to_string());
        let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
        for (key, value) in [(probe::ANNOTATION, probe), (LEAVING, self.leaving.reason())] {
            match value {
                Some(v) => {
                    annotations.insert(key.to_string(), v);
                }
                None => {
                    annotations.remove(key);
                }
            }
        }
    }

    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// One heartbeat: renews the Lease held, or takes `observed` (the Lease as the watch
    /// last showed it; `None`: create it). A conflict drops what is held, so the next
    /// beat starts from the watch's fresher copy.
    pub async fn once(&mut self, observed: Option<Lease>, deadline: Instant) {
        let name = lease_name(self.leases.identity());
        let written = match self.held.take() {
            Some(mut held) => {
                self.annotate(&mut held);
                let renewed = self.leases.renew(held.clone(), Timestamp::now(), deadline);
                match renewed.await {
                    // The write may have landed: a later renewal conflicts then.
                    Err(e) => {
                        tracing::warn!("renewing the agent heartbeat: {e}");
                        Ok(Write::Done(Box::new(held)))
                    }
                    other => other,
                }
            }
            None => {
                let labels =
                    BTreeMap::from([(LABEL.to_string(), label_value(self.leases.identity()))]);
                let mut current = observed.unwrap_or_else(|| lease::absent(&name, labels));
                self.annotate(&mut current);
                self.leases
                    .acquire(current, Timestamp::now(), deadline)
                    .await
            }
        };
        match written {
            Ok(Write::Done(l)) => self.held = Some(*l),
            Ok(Write::Conflict) => {
                tracing::debug!("agent heartbeat changed meanwhile; retaking it")
            }
            Err(e) => tracing::warn!("taking the agent heartbeat: {e}"),
        }
    }

    /// Frees the Lease at once: the other agents stop ranking this node.
    pub async fn release(&mut self, deadline: Instant) {
        let Some(held) = self.held.take() else {
            return;
        };
        match self.leases.release(held, deadline).await {
            Ok(Write::Done(_)) => tracing::info!("released the agent heartbeat"),
            Ok(Write::Conflict) => {
                tracing::debug!("the agent heartbeat changed before its release")
            }
            Err(e) => tracing::warn!("releasing the agent heartbeat: {e}"),
        }
    }
}

/// A label value for `node`: at most 63 characters, alphanumeric at both ends (a longer
/// node name is cut; the Lease name still tells nodes apart).
fn label_value(node: &str) -> String {
    let cut: String = node.chars().take(63).collect();
    cut.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// How long to wait before the next beat: a third of the duration while held, quickly
/// while not (at start, or after a conflict or failure).
fn next_beat(holds: bool, timing: &Timing) -> Duration {
    if holds { timing.renew } else { timing.tick }
}

/// Keeps this agent's heartbeat until `shutdown` turns true, then releases it.
pub async fn run(
    mut beat: Beat,
    liveness: Liveness,
    timing: Timing,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = Duration::ZERO;
    loop {
        let leaving = beat.leaving.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // Other nodes stop ranking a leaving node as soon as its heartbeat says so.
            _ = leaving.changed.notified() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        // The first write waits for the list: it is guarded by what the watch saw.
        if liveness.listed.load(Ordering::Relaxed) {
            let observed = if beat.holds() { None } else { liveness.own() };
            beat.once(observed, Instant::now() + timing.attempt).await;
        }
        wait = next_beat(beat.holds(), &timing);
    }
    beat.release(Instant::now() + timing.attempt).await;
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use berth_runtime::lease::fake::FakeApiserver;

    use super::*;

    static T0: LazyLock<Instant> = LazyLock::new(Instant::now);

    fn at(ms: u64) -> Instant {
        *T0 + Duration::from_millis(ms)
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// A heartbeat Lease of `node` held by `holder` (`None`: released), renewed at
    /// second `renewed`.
    fn heartbeat(node: &str, holder: Option<&str>, renewed: i64) -> Lease {
        let mut l = lease::absent(&lease_name(node), BTreeMap::new());
        l.metadata.resource_version = Some(renewed.to_string());
        l.spec = Some(lease::held_spec(
            holder.unwrap_or(node),
            Duration::from_secs(3),
            None,
            Timestamp::from_second(renewed).unwrap_or_default(),
        ));
        if holder.is_none()
            && let Some(s) = l.spec.as_mut()
        {
            *s = lease::released_spec(s);
        }
        l
    }

    #[test]
    fn lease_names_are_per_node_and_bounded() {
        assert_eq!(lease_name("berth-node-1"), "berth-agent-berth-node-1");
        let long = format!("{}.example.com", "a".repeat(250));
        let other = format!("{}.example.org", "a".repeat(250));
        assert!(lease_name(&long).len() <= MAX_NAME);
        assert_ne!(lease_name(&long), lease_name(&other));
        assert!(lease_name(&long).starts_with("berth-agent-aaa"));
        assert_eq!(label_value(&"b".repeat(70)).len(), 63);
        assert_eq!(label_value("n1"), "n1");
    }

    #[test]
    fn alive_means_holding_a_heartbeat_seen_changing_within_a_duration() {
        let all = nodes(&["me", "fresh", "stale", "released", "none", "stolen"]);
        let mut seen = Observations::default();
        seen.observe(heartbeat("fresh", Some("fresh"), 100), at(10_000));
        seen.observe(heartbeat("stale", Some("stale"), 100), at(5_000));
        seen.observe(heartbeat("released", None, 100), at(10_000));
        seen.observe(heartbeat("stolen", Some("fresh"), 100), at(10_000));
        let now = at(10_500);
        assert_eq!(
            live(&all, "me", &seen, now),
            nodes(&["me", "fresh"]),
            "me is alive without a heartbeat of its own yet"
        );
        // The same record seen again keeps its first observation time: still dead.
        seen.observe(heartbeat("stale", Some("stale"), 100), at(10_400));
        assert!(!live(&all, "me", &seen, now).contains("stale"));
        // A renewal brings it back; a duration without one kills it.
        seen.observe(heartbeat("stale", Some("stale"), 101), at(10_400));
        assert!(live(&all, "me", &seen, now).contains("stale"));
        assert_eq!(live(&all, "me", &seen, at(13_400)), nodes(&["me"]));
        assert!(
            !live(&nodes(&["fresh"]), "me", &seen, now).contains("me"),
            "only nodes asked about (an excluded me stays out)"
        );
    }

    /// The address's best-ranked node has no live agent: the next one takes the free
    /// Lease at once instead of a step later.
    #[test]
    fn a_dead_best_ranked_node_does_not_delay_the_next() {
        use crate::l2::announce::{self, Action, AddrState};
        let all = nodes(&["berth-node-1", "berth-node-2", "berth-node-3"]);
        let addr: std::net::IpAddr = "198.19.41.7".parse().expect("ip");
        let order = announce::ranking(&addr, &all, None);
        let (dead, next) = (order[0], order[1]);
        let mut seen = Observations::default();
        for n in &order[1..] {
            seen.observe(heartbeat(n, Some(n), 100), at(10_000));
        }
        seen.observe(heartbeat(dead, Some(dead), 90), at(5_000));
        let state = |eligible| AddrState {
            me: next,
            addr,
            eligible: Some(eligible),
            lease: None,
            held_since_renewal: None,
            takeable_since: Some(at(10_500)),
            now: at(10_500),
            timing: Timing::new(Duration::from_secs(3)),
        };
        assert_eq!(announce::decide(&state(&all)), Action::Nothing);
        let alive = live(&all, next, &seen, at(10_500));
        assert!(!alive.contains(dead));
        assert_eq!(announce::decide(&state(&alive)), Action::Acquire);
    }

    #[tokio::test]
    async fn the_beat_creates_renews_retakes_and_releases_its_lease() {
        let server = FakeApiserver::new("kube-system");
        let api: Api<Lease> = Api::namespaced(server.client(), "kube-system");
        let probe: SocketAddr = "198.18.1.10:7947".parse().expect("addr");
        let leaving = Arc::new(Leaving::default());
        let mut beat = Beat::new(
            LeaseClient::new(api, "n1", Duration::from_secs(3)),
            Some(Box::new(move || Some(probe))),
            leaving.clone(),
        );
        let soon = || Instant::now() + Duration::from_secs(5);
        beat.once(None, soon()).await;
        let name = lease_name("n1");
        let created = server.get(&name).expect("created");
        assert_eq!(lease::Record::of(&created).holder.as_deref(), Some("n1"));
        let mut seen = Observations::default();
        seen.observe(created.clone(), Instant::now());
        assert_eq!(
            probe_peers(&seen),
            BTreeMap::from([("n1".to_string(), probe)]),
            "the probe address is advertised"
        );
        assert_eq!(
            created.metadata.labels.as_ref().and_then(|l| l.get(LABEL)),
            Some(&"n1".to_string())
        );
        // Cordoned: the next beat says so, and other agents stop ranking the node.
        leaving.set(Some("node is cordoned".into()));
        beat.once(None, soon()).await;
        let renewed = server.get(&name).expect("renewed");
        assert_ne!(
            renewed.metadata.resource_version,
            created.metadata.resource_version
        );
        let leaving_says = renewed
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEAVING));
        assert_eq!(leaving_says.map(String::as_str), Some("node is cordoned"));
        let mut seen = Observations::default();
        seen.observe(renewed.clone(), Instant::now());
        assert_eq!(
            leaving_nodes_of(&seen),
            nodes(&["n1"]),
            "others see it leaving"
        );
        let l = Liveness {
            me: "n1".into(),
            heartbeats: Arc::default(),
            listed: Arc::new(AtomicBool::new(true)),
            probes: None,
            leaving: leaving.clone(),
        };
        assert_eq!(
            l.live(&nodes(&["n1"])),
            Some(nodes(&["n1"])),
            "alone, a leaving node still announces"
        );
        leaving.set(None);
        assert_eq!(l.live(&nodes(&["n1"])), Some(nodes(&["n1"])));
        // Someone else wrote it (an earlier instance of this agent, say): the renewal
        // conflicts, and the next beat takes it back from the observed copy.
        let foreign = server.put(renewed.clone());
        beat.once(None, soon()).await;
        assert!(!beat.holds());
        beat.once(Some(foreign), soon()).await;
        assert!(beat.holds());
        beat.release(soon()).await;
        let released = server.get(&name).expect("released");
        assert_eq!(lease::Record::of(&released).holder, None);
        assert!(!beat.holds());
    }

    fn leaving_nodes_of(seen: &Observations) -> BTreeSet<String> {
        leaving(seen)
    }

    #[test]
    fn leaving_nodes_are_not_ranked_unless_all_are() {
        let alive = nodes(&["a", "b", "c"]);
        assert_eq!(staying(alive.clone(), &nodes(&["a"])), nodes(&["b", "c"]));
        assert_eq!(
            staying(alive.clone(), &alive),
            alive,
            "everyone leaving: keep all"
        );
        let mut seen = Observations::default();
        let mut a = heartbeat("a", Some("a"), 1);
        a.metadata.annotations = Some(BTreeMap::from([(
            LEAVING.to_string(),
            "node is cordoned".to_string(),
        )]));
        seen.observe(a, at(0));
        seen.observe(heartbeat("b", Some("b"), 1), at(0));
        // c's Lease held by b cannot say that b leaves.
        let mut c = heartbeat("c", Some("b"), 1);
        c.metadata.annotations = Some(BTreeMap::from([(LEAVING.to_string(), "x".to_string())]));
        seen.observe(c, at(0));
        assert_eq!(leaving(&seen), nodes(&["a"]));

        // a itself: it stops announcing (BGP) while b stays, not once b leaves too.
        let me = Liveness {
            me: "a".into(),
            heartbeats: Arc::default(),
            listed: Arc::new(AtomicBool::new(true)),
            probes: None,
            leaving: Arc::default(),
        };
        me.lock()
            .observe(heartbeat("b", Some("b"), 1), Instant::now());
        assert!(me.announces(), "not leaving");
        me.leaving.set(Some("node is cordoned".into()));
        assert!(!me.announces(), "leaving while b stays");
        let mut b = heartbeat("b", Some("b"), 2);
        b.metadata.annotations = Some(BTreeMap::from([(LEAVING.to_string(), "x".to_string())]));
        me.lock().observe(b, Instant::now());
        assert!(me.announces(), "everyone leaving");
    }

    #[test]
    fn probe_peers_come_from_heartbeats_held_by_their_own_node() {
        let with = |mut l: Lease, v: &str| {
            l.metadata.annotations = Some(BTreeMap::from([(
                probe::ANNOTATION.to_string(),
                v.to_string(),
            )]));
            l
        };
        let mut seen = Observations::default();
        seen.observe(
            with(heartbeat("a", Some("a"), 1), "198.18.1.10:7947"),
            at(0),
        );
        // b's heartbeat Lease with a as holder cannot speak for a.
        seen.observe(with(heartbeat("b", Some("a"), 1), "198.18.9.9:7947"), at(0));
        seen.observe(with(heartbeat("c", Some("c"), 1), "not an address"), at(0));
        seen.observe(heartbeat("d", Some("d"), 1), at(0));
        assert_eq!(
            probe_peers(&seen),
            BTreeMap::from([("a".to_string(), "198.18.1.10:7947".parse().expect("addr"))])
        );
    }

    #[test]
    fn beats_come_every_third_while_held_and_quickly_otherwise() {
        let t = Timing::new(Duration::from_secs(15));
        assert_eq!(next_beat(true, &t), Duration::from_secs(5));
        assert_eq!(next_beat(false, &t), Duration::from_secs(1));
    }

    #[test]
    fn nothing_is_live_before_the_first_list() {
        let l = Liveness {
            me: "me".into(),
            heartbeats: Arc::default(),
            listed: Arc::default(),
            probes: None,
            leaving: Arc::default(),
        };
        assert_eq!(l.live(&nodes(&["me"])), None);
        l.listed.store(true, Ordering::Relaxed);
        assert_eq!(l.live(&nodes(&["me", "x"])), Some(nodes(&["me"])));
    }
}
