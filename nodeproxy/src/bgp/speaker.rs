//! The speaker's I/O: watches the BGPPeers and this node, keeps one [`session`] per
//! peer that selects the node, feeds each the routes [`routes::per_peer`] computes, and
//! writes each session's state into the peer's `status.nodes` entry for this node
//! (server-side apply under a field manager per node, so agents never overwrite each
//! other's entries).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_crds::bgp::{
    BGPPeer, BGPPeerSpec, BGPSessionStatus, DEFAULT_HOLD_SECONDS, DEFAULT_PORT,
    STATUS_MANAGER_PREFIX, SecretKeyRef,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;

use super::routes::Routes;
use super::session::{self, PeerConfig, Report, State};

/// How often the wanted routes are recomputed from the agent's model (O(Services) each;
/// the model changes at most a few times a second) and the peers reconciled.
const STEP: Duration = Duration::from_millis(200);
/// Deadline of each status write: a slow apiserver never holds the sessions back.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a password read from its Secret is used before it is read again.
const PASSWORD_REFRESH: Duration = Duration::from_secs(30);

/// The routes this node should announce to each peer (by name), given whether it may
/// carry load-balancer traffic and the peers it has sessions with; `None` until the
/// agent's model has listed.
pub type RoutesView =
    Arc<dyn Fn(bool, &BTreeSet<String>) -> Option<BTreeMap<String, Routes>> + Send + Sync>;

/// Why a peer cannot be used: the status reason and the words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unusable {
    pub reason: &'static str,
    pub message: String,
}

impl Unusable {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            reason: "InvalidConfig",
            message: message.into(),
        }
    }

    /// `passwordSecretRef` names a Secret or key that does not exist.
    fn secret_missing(message: String) -> Self {
        Self {
            reason: "SecretNotFound",
            message,
        }
    }
}

/// A password as last read: the Secret reference, when, and the outcome.
type CachedPassword = (
    Option<SecretKeyRef>,
    Instant,
    Result<Option<String>, Unusable>,
);

struct Running {
    cfg: PeerConfig,
    routes: watch::Sender<Routes>,
    stop: watch::Sender<bool>,
    report: watch::Receiver<Report>,
    task: tokio::task::JoinHandle<()>,
}

/// What this node's status entry of a peer says; written when it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    state: String,
    reason: String,
    message: String,
    announced: u32,
}

impl Entry {
    fn of(r: &Report) -> Self {
        Self {
            state: r.state.as_str().into(),
            reason: r.reason.clone(),
            message: r.message.clone(),
            announced: r.announced as u32,
        }
    }

    fn unusable(u: &Unusable) -> Self {
        Self {
            state: State::Idle.as_str().into(),
            reason: u.reason.into(),
            message: u.message.clone(),
            announced: 0,
        }
    }
}

pub struct Speaker {
    client: Client,
    node: String,
    peers: Store<BGPPeer>,
    me: Store<Node>,
    listed: [Arc<AtomicBool>; 2],
    sessions: BTreeMap<String, Running>,
    /// Entries as last written (or failed to write: retried next step).
    written: BTreeMap<String, (Entry, String)>,
    /// Each peer's password as last read: (the Secret reference, when, the outcome).
    passwords: BTreeMap<String, CachedPassword>,
    warned: BTreeSet<String>,
    /// Warning Events on BGPPeers this node cannot use.
    recorder: Recorder,
}

fn reflect<K>(api: Api<K>, config: watcher::Config, listed: Arc<AtomicBool>) -> Store<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K: Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = stream.boxed();
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    failing = false;
                    listed.store(true, Ordering::Relaxed);
                }
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("BGP speaker watch: {e}");
                }
                Err(e) => tracing::debug!("BGP speaker watch: {e}"),
            }
        }
    });
    store
}

/// Whether `peer` selects a node with `labels`.
pub fn selects(spec: &BGPPeerSpec, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let Some(sel) = &spec.node_selector else {
        return Ok(true);
    };
    let sel = Selector::try_from(sel.clone()).map_err(|e| format!("nodeSelector: {e}"))?;
    Ok(sel.matches(labels))
}

/// The session settings of a peer for this node. Pure.
pub fn peer_config(
    name: &str,
    spec: &BGPPeerSpec,
    node_ip: Option<Ipv4Addr>,
    password: Option<String>,
) -> Result<PeerConfig, String> {
    let addr: IpAddr = spec
        .address
        .parse()
        .map_err(|_| format!("address {:?} is not an IP address", spec.address))?;
    let source = spec
        .source_address
        .as_deref()
        .map(|s| s.parse::<IpAddr>())
        .transpose()
        .map_err(|_| "sourceAddress is not an IP address".to_string())?;
    let node_ip = node_ip.ok_or("the node has no IPv4 address for router id and next hop")?;
    let hold = match spec.hold_time {
        None => DEFAULT_HOLD_SECONDS,
        Some(h) => u16::try_from(h).map_err(|_| "holdTime above 65535".to_string())?,
    };
    if hold == 1 || hold == 2 {
        return Err("holdTime must be 0 or at least 3".into());
    }
    let keepalive = match spec.keepalive_time {
        None => None,
        Some(k) => Some(u16::try_from(k).map_err(|_| "keepaliveTime above 65535".to_string())?),
    };
    Ok(PeerConfig {
        name: name.into(),
        address: SocketAddr::new(addr, spec.port.unwrap_or(DEFAULT_PORT)),
        peer_asn: spec.peer_asn,
        my_asn: spec.my_asn,
        hold_time: hold,
        keepalive,
        source,
        password,
        node_ip,
    })
}

impl Speaker {
    /// Starts the watches; [`Speaker::run`] does the work.
    pub fn new(client: Client, node: &str) -> Self {
        let listed: [Arc<AtomicBool>; 2] = Default::default();
        let peers = reflect(
            Api::all(client.clone()),
            watcher::Config::default(),
            listed[0].clone(),
        );
        let me = reflect(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            listed[1].clone(),
        );
        Self {
            client: client.clone(),
            node: node.into(),
            peers,
            me,
            listed,
            sessions: BTreeMap::new(),
            written: BTreeMap::new(),
            passwords: BTreeMap::new(),
            warned: BTreeSet::new(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "berth-nodeproxy".into(),
                    instance: Some(node.into()),
                },
            ),
        }
    }

    /// Runs until `stopped` turns true, then stops every session gracefully (each
    /// withdraws its routes, waits [`session::WITHDRAW_GRACE`] and sends Cease).
    pub async fn run(mut self, view: RoutesView, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => break,
            }
            if *stopped.borrow() {
                break;
            }
            if self.listed.iter().all(|l| l.load(Ordering::Relaxed)) {
                self.step(&view).await;
            }
        }
        let tasks: Vec<_> = std::mem::take(&mut self.sessions)
            .into_values()
            .map(|r| {
                let _ = r.stop.send(true);
                r.task
            })
            .collect();
        futures::future::join_all(tasks).await;
    }

    async fn password(&self, spec: &BGPPeerSpec) -> Result<Option<String>, Unusable> {
        let Some(r) = &spec.password_secret_ref else {
            return Ok(None);
        };
        let key = r.key.as_deref().unwrap_or("password");
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        let secret = tokio::time::timeout(WRITE_TIMEOUT, api.get(&r.name))
            .await
            .map_err(|_| {
                Unusable::invalid(format!(
                    "reading Secret {}/{} timed out",
                    r.namespace, r.name
                ))
            })?
            .map_err(|e| match e {
                kube::Error::Api(a) if a.code == 404 => Unusable::secret_missing(format!(
                    "passwordSecretRef: Secret {}/{} not found",
                    r.namespace, r.name
                )),
                e => Unusable::invalid(format!("Secret {}/{}: {e}", r.namespace, r.name)),
            })?;
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| {
                Unusable::secret_missing(format!(
                    "passwordSecretRef: Secret {}/{} has no key {key:?}",
                    r.namespace, r.name
                ))
            })?;
        String::from_utf8(value.0.clone()).map(Some).map_err(|_| {
            Unusable::invalid(format!(
                "Secret {}/{} key {key:?} is not UTF-8",
                r.namespace, r.name
            ))
        })
    }

    /// The peer's password, read again when its reference changes and every
    /// [`PASSWORD_REFRESH`] (a rotated Secret reaches new sessions within that), not at
    /// every step.
    async fn cached_password(
        &mut self,
        peer: &str,
        spec: &BGPPeerSpec,
    ) -> Result<Option<String>, Unusable> {
        let reference = spec.password_secret_ref.clone();
        if let Some((r, at, outcome)) = self.passwords.get(peer)
            && *r == reference
            && at.elapsed() < PASSWORD_REFRESH
        {
            return outcome.clone();
        }
        let outcome = self.password(spec).await;
        self.passwords.insert(
            peer.to_string(),
            (reference, Instant::now(), outcome.clone()),
        );
        outcome
    }

    async fn step(&mut self, view: &RoutesView) {
        let node = self.me.state().into_iter().next();
        let labels = node
            .as_ref()
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        let eligible = node.as_ref().is_some_and(|n| {
            !n.labels().contains_key(berth_crds::LABEL_EXCLUDE_FROM_LB)
                && n.metadata.deletion_timestamp.is_none()
        });
        let node_ip = node.as_deref().and_then(node_ipv4);
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut wanted: BTreeMap<String, PeerConfig> = BTreeMap::new();
        // Peers that no longer select this node but still carry its entry: written by
        // this node's agent before it restarted, so not in `written`.
        let mut leftover: BTreeSet<String> = BTreeSet::new();
        for peer in self.peers.state() {
            let name = peer.name_any();
            match selects(&peer.spec, &labels) {
                Ok(false) => {
                    if has_entry(&peer, &self.node) {
                        leftover.insert(name);
                    }
                    continue;
                }
                Ok(true) => {}
                Err(e) => {
                    entries.insert(name, Entry::unusable(&Unusable::invalid(e)));
                    continue;
                }
            }
            let cfg = match self.cached_password(&name, &peer.spec).await {
                Ok(pw) => peer_config(&name, &peer.spec, node_ip, pw).map_err(Unusable::invalid),
                Err(e) => Err(e),
            };
            match cfg {
                Ok(cfg) => drop(wanted.insert(name, cfg)),
                Err(e) => {
                    if self.warned.insert(format!("{name}: {}", e.message)) {
                        tracing::warn!(peer = %name, "BGP peer not usable: {}", e.message);
                        self.warn_event(&peer, &e);
                    }
                    entries.insert(name, Entry::unusable(&e));
                }
            }
        }
        self.passwords
            .retain(|p, _| wanted.contains_key(p) || entries.contains_key(p));
        // Stop sessions of peers gone, deselected or changed.
        let stale: Vec<String> = self
            .sessions
            .iter()
            .filter(|(name, r)| wanted.get(*name) != Some(&r.cfg))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.sessions.remove(&name) {
                let _ = r.stop.send(true);
            }
        }
        for (name, cfg) in wanted {
            self.sessions.entry(name).or_insert_with(|| start(cfg));
        }
        let names: BTreeSet<String> = self.sessions.keys().cloned().collect();
        if let Some(mut per_peer) = view(eligible, &names) {
            for (name, r) in &self.sessions {
                let routes = per_peer.remove(name).unwrap_or_default();
                r.routes.send_if_modified(|old| {
                    let changed = *old != routes;
                    *old = routes;
                    changed
                });
            }
        }
        for (name, r) in &self.sessions {
            entries.insert(name.clone(), Entry::of(&r.report.borrow()));
        }
        self.write_status(entries, leftover).await;
    }

    /// A Warning Event on the peer, off the loop (a slow apiserver never holds the
    /// sessions back).
    fn warn_event(&self, peer: &BGPPeer, e: &Unusable) {
        let event = Event {
            type_: EventType::Warning,
            reason: e.reason.into(),
            note: Some(format!("node {}: {}", self.node, e.message)),
            action: "Peer".into(),
            secondary: None,
        };
        let reference = peer.object_ref(&());
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(err) = recorder.publish(&event, &reference).await {
                tracing::debug!("cannot record event: {err}");
            }
        });
    }

    /// Writes the entries that changed, and removes this node's entry from peers it no
    /// longer reports on.
    async fn write_status(&mut self, entries: BTreeMap<String, Entry>, leftover: BTreeSet<String>) {
        let gone: BTreeSet<String> = self
            .written
            .keys()
            .filter(|n| !entries.contains_key(*n))
            .cloned()
            .chain(leftover)
            .collect();
        for name in gone {
            if self.apply(&name, None).await {
                self.written.remove(&name);
            }
        }
        for (name, entry) in entries {
            if self.written.get(&name).map(|(e, _)| e) == Some(&entry) {
                continue;
            }
            let since = match self.written.get(&name) {
                Some((old, since)) if old.state == entry.state => since.clone(),
                _ => now(),
            };
            let status = BGPSessionStatus {
                node: self.node.clone(),
                state: entry.state.clone(),
                reason: entry.reason.clone(),
                message: entry.message.clone(),
                announced: entry.announced,
                last_transition_time: Some(since.clone()),
            };
            if self.apply(&name, Some(status)).await {
                self.written.insert(name, (entry, since));
            }
        }
    }

    /// Applies this node's entry (or, with `None`, its absence) to a peer's status.
    async fn apply(&self, peer: &str, status: Option<BGPSessionStatus>) -> bool {
        let api: Api<BGPPeer> = Api::all(self.client.clone());
        let body = serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "BGPPeer",
            "metadata": { "name": peer },
            "status": { "nodes": status.into_iter().collect::<Vec<_>>() },
        });
        let params = PatchParams::apply(&format!("{STATUS_MANAGER_PREFIX}{}", self.node)).force();
        match tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(peer, &params, &Patch::Apply(body)),
        )
        .await
        {
            Ok(Ok(_)) => true,
            // The peer is gone: nothing to report on.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => true,
            Ok(Err(e)) => {
                tracing::debug!(peer, "BGPPeer status: {e}");
                false
            }
            Err(_) => false,
        }
    }
}

fn start(cfg: PeerConfig) -> Running {
    let (routes_tx, routes_rx) = watch::channel(Routes::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let initial = Report {
        state: State::Idle,
        reason: "Connecting".into(),
        message: String::new(),
        announced: 0,
    };
    let (report_tx, report_rx) = watch::channel(initial);
    let task = tokio::spawn(session::run(cfg.clone(), routes_rx, stop_rx, report_tx));
    Running {
        cfg,
        routes: routes_tx,
        stop: stop_tx,
        report: report_rx,
        task,
    }
}

/// Whether `peer`'s status has an entry for `node`.
fn has_entry(peer: &BGPPeer, node: &str) -> bool {
    peer.status
        .as_ref()
        .is_some_and(|s| s.nodes.iter().any(|e| e.node == node))
}

fn node_ipv4(node: &Node) -> Option<Ipv4Addr> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    ["InternalIP", "ExternalIP"].iter().find_map(|t| {
        addrs
            .iter()
            .filter(|a| a.type_ == *t)
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
    })
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> BGPPeerSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    #[test]
    fn config_defaults_and_errors() {
        let s = spec("address: 198.18.0.200\npeerASN: 64512\nmyASN: 64513\n");
        let ip = Some(Ipv4Addr::new(198, 18, 1, 10));
        let c = peer_config("r", &s, ip, None).expect("config");
        assert_eq!(c.address, "198.18.0.200:179".parse().expect("addr"));
        assert_eq!(c.hold_time, 90);
        assert!(peer_config("r", &s, None, None).is_err(), "no node IPv4");
        let bad = spec("address: nope\npeerASN: 1\nmyASN: 2\n");
        assert!(peer_config("r", &bad, ip, None).is_err());
        let hold = spec("address: 198.18.0.200\npeerASN: 1\nmyASN: 2\nholdTime: 2\n");
        assert!(peer_config("r", &hold, ip, None).is_err());
    }

    #[test]
    fn node_selector_matches_labels() {
        let s = spec(
            "address: 1.2.3.4\npeerASN: 1\nmyASN: 2\nnodeSelector: {matchLabels: {rack: a}}\n",
        );
        let a = BTreeMap::from([("rack".to_string(), "a".to_string())]);
        assert_eq!(selects(&s, &a), Ok(true));
        assert_eq!(selects(&s, &BTreeMap::new()), Ok(false));
        let all = spec("address: 1.2.3.4\npeerASN: 1\nmyASN: 2\n");
        assert_eq!(selects(&all, &BTreeMap::new()), Ok(true));
    }
}
