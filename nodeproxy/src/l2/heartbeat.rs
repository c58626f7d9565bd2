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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_runtime::lease::{self, LeaseClient, Observations, Write};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::l2::announce::Timing;

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

/// Every agent's heartbeat as this agent observes it (cheap to clone).
#[derive(Clone)]
pub struct Liveness {
    me: String,
    heartbeats: Arc<Mutex<Observations>>,
    listed: Arc<AtomicBool>,
}

impl Liveness {
    fn lock(&self) -> MutexGuard<'_, Observations> {
        self.heartbeats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the heartbeat Leases of `api`'s namespace.
    pub fn watch(api: Api<Lease>, me: &str) -> Self {
        let liveness = Self {
            me: me.into(),
            heartbeats: Arc::default(),
            listed: Arc::default(),
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
                    self.lock().apply(ev, Instant::now());
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
        Some(live(nodes, &self.me, &self.lock(), Instant::now()))
    }

    /// This agent's own heartbeat Lease as last observed.
    fn own(&self) -> Option<Lease> {
        self.lock()
            .get(&lease_name(&self.me))
            .map(|seen| seen.lease.clone())
    }
}

/// This agent's side of its heartbeat: the Lease as last written, when it holds it.
pub struct Beat {
    leases: LeaseClient,
    held: Option<Lease>,
}

impl Beat {
    /// `leases` writes as this node, with the L2 lease duration.
    pub fn new(leases: LeaseClient) -> Self {
        Self { leases, held: None }
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
            Some(held) => {
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
                let current = observed.unwrap_or_else(|| lease::absent(&name, labels));
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
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
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
        let mut beat = Beat::new(LeaseClient::new(api, "n1", Duration::from_secs(3)));
        let soon = || Instant::now() + Duration::from_secs(5);
        beat.once(None, soon()).await;
        let name = lease_name("n1");
        let created = server.get(&name).expect("created");
        assert_eq!(lease::Record::of(&created).holder.as_deref(), Some("n1"));
        assert_eq!(
            created.metadata.labels.as_ref().and_then(|l| l.get(LABEL)),
            Some(&"n1".to_string())
        );
        beat.once(None, soon()).await;
        let renewed = server.get(&name).expect("renewed");
        assert_ne!(
            renewed.metadata.resource_version,
            created.metadata.resource_version
        );
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
        };
        assert_eq!(l.live(&nodes(&["me"])), None);
        l.listed.store(true, Ordering::Relaxed);
        assert_eq!(l.live(&nodes(&["me", "x"])), Some(nodes(&["me"])));
    }
}
