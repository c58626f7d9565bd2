//! Wiring: command-line configuration, the watches feeding the index, the debounced sync
//! loop applying transactions (wait, compute, apply, record), and the admin listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_runtime::admin::{self, Reply, Server};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;

use crate::bgp;
use crate::error::Error;
use crate::events;
use crate::healthcheck::{self, AgentHealth, HealthChecks};
use crate::l2::announce;
use crate::l2::announce::{PoolClass, Timing};
use crate::l2::announcer::{self, Announcer, ModelView, Snapshot};
use crate::l2::heartbeat::{self, Beat, Leaving, Liveness};
use crate::l2::probe::{ProbeConfig, Probes};
use crate::metrics::Metrics;
use crate::proxy::drift::Drift;
use crate::proxy::index::{Index, Kind, NodeConfig, Work};
use crate::proxy::model::{Cidr, ServiceId};
use crate::proxy::ruleset;
use crate::proxy::sync::{self, Changes, Programmed};
use crate::proxy::{claims, convert, nft};
use berth_crds::LoadBalancerClass;

/// `100ms`, `2s`, `1m`: a duration flag.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?} (ms, s, m)")),
    }
}

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "berth-nodeproxy",
    about = "berth's node agent: Service traffic to pods with nftables"
)]
pub struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig file; without it, in-cluster configuration (or the usual defaults).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Addresses NodePorts are served on (comma-separated); default: the Node's InternalIPs.
    #[arg(long, value_delimiter = ',')]
    pub node_addresses: Vec<IpAddr>,
    /// Pod network ranges: ClusterIP traffic from elsewhere is masqueraded.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<Cidr>,
    /// Service ranges: traffic to unallocated addresses in them is dropped.
    #[arg(long, value_delimiter = ',')]
    pub service_cidr: Vec<Cidr>,
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind: SocketAddr,
    /// Address the ETP=Local health-check NodePorts listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub health_check_bind: IpAddr,
    /// Changes arriving faster than this are batched into one sync.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub min_sync_interval: Duration,
    /// A sync runs at least this often.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub max_sync_interval: Duration,
    /// `/healthz` fails when the last successful sync is older than this.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub healthz_max_age: Duration,
    /// JSON logs.
    #[arg(long)]
    pub log_json: bool,
    /// Namespace of the Leases that pick one announcing node per pool address.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    /// Lease duration of pool addresses: a stopped holder is replaced within it, and an
    /// address outlives its last renewal by this long (whole seconds).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub l2_lease_duration: Duration,
    /// Interface pool addresses are announced on; default: the one with the node's address.
    #[arg(long)]
    pub l2_interface: Option<String>,
    /// UDP port the agents probe each other on over the node network, so that a dead
    /// node's pool addresses move within about a second instead of a Lease duration; 0
    /// turns the probes off (Leases alone then).
    #[arg(long, default_value_t = 7947)]
    pub l2_peer_probe_port: u16,
    /// A peer agent not heard on the probe port for this long, and reported silent by
    /// another peer too, is dead: its pool addresses are taken over at once.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub l2_peer_dead_after: Duration,
    /// externalIPs are honoured only inside these CIDRs (comma-separated, e.g.
    /// `0.0.0.0/0,::/0` for all); unset, every externalIP is refused.
    #[arg(long, value_delimiter = ',')]
    pub external_ip_cidrs: Vec<Cidr>,
    /// A Service needing more map elements than this (ports x endpoints x frontends) on a
    /// node is not programmed.
    #[arg(long, default_value_t = claims::DEFAULT_MAX_RULES_PER_SERVICE)]
    pub max_rules_per_service: usize,
    /// How often the agent checks that its nftables tables are as it left them (one
    /// netlink round trip; the tables are read only when another process committed).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub drift_check_interval: Duration,
}

pub async fn client(args: &Args) -> Result<Client, Error> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

struct Shared {
    index: Mutex<Index>,
    notify: Notify,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    health: Arc<AgentHealth>,
    drift: Arc<Drift>,
    pools: Mutex<Pools>,
    leaving: Arc<Leaving>,
    /// This node's labels: a pool class's scope selects on them (BGP).
    labels: Mutex<BTreeMap<String, String>>,
}

impl Shared {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pool classes: their Services' load-balancer addresses are protected on every node
/// (any node may be handed one at any moment).
#[derive(Default)]
struct Pools {
    classes: BTreeMap<String, PoolClass>,
    /// Listed once, or the class API is unavailable (no CRD: no pool addresses).
    listed: bool,
    /// Classes changed since the last sync: every Service's protection is recomputed.
    changed: bool,
}

impl Pools {
    fn set(&mut self, classes: BTreeMap<String, PoolClass>) {
        if classes != self.classes {
            self.classes = classes;
            self.changed = true;
        }
    }
}

/// The Warning event telling a user which fields of their object the agent ignores.
pub fn invalid_input_event(warnings: &[String]) -> Option<KubeEvent> {
    if warnings.is_empty() {
        return None;
    }
    let mut note = format!("berth-nodeproxy ignores: {}", warnings.join("; "));
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Some(KubeEvent {
        type_: EventType::Warning,
        reason: "InvalidField".into(),
        note: Some(note),
        action: "Program".into(),
        secondary: None,
    })
}

/// Logs what was ignored and, off the watch loop, records a Warning event on the object.
fn warn_all(
    shared: &Arc<Shared>,
    kind: &str,
    key: &str,
    reference: ObjectReference,
    warnings: Vec<String>,
) {
    for w in &warnings {
        tracing::warn!(kind, object = key, "ignoring invalid field: {w}");
    }
    if let Some(event) = invalid_input_event(&warnings) {
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = shared
                .recorder
                .publish(&berth_runtime::events::distinct(&event), &reference)
                .await
            {
                tracing::debug!("cannot record event: {e}");
            }
        });
    }
}

async fn watch_services(api: Api<Service>, shared: Arc<Shared>) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        {
            let mut idx = shared.index();
            match ev {
                Ok(Event::Init) => idx.begin_relist(Kind::Services),
                Ok(Event::InitDone) => idx.end_relist(Kind::Services),
                Ok(Event::Apply(s) | Event::InitApply(s)) => {
                    let id = ServiceId::new(&s.namespace().unwrap_or_default(), &s.name_any());
                    let mut w = Vec::new();
                    let model = convert::service(&s, &mut w);
                    warn_all(&shared, "Service", &id.to_string(), s.object_ref(&()), w);
                    idx.apply_service_aged(id, model, convert::age(&s.metadata));
                    shared.metrics.service_changed();
                }
                Ok(Event::Delete(s)) => {
                    idx.delete_service(&ServiceId::new(
                        &s.namespace().unwrap_or_default(),
                        &s.name_any(),
                    ));
                    shared.metrics.service_changed();
                }
                Err(e) => tracing::warn!("Service watch: {e}"),
            }
        }
        shared.notify.notify_one();
    }
}

async fn watch_slices(api: Api<EndpointSlice>, shared: Arc<Shared>) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        {
            let mut idx = shared.index();
            match ev {
                Ok(Event::Init) => idx.begin_relist(Kind::Slices),
                Ok(Event::InitDone) => idx.end_relist(Kind::Slices),
                Ok(Event::Apply(s) | Event::InitApply(s)) => {
                    let ns = s.namespace().unwrap_or_default();
                    let name = s.name_any();
                    let mut w = Vec::new();
                    let model = convert::slice(&s, &mut w);
                    warn_all(
                        &shared,
                        "EndpointSlice",
                        &format!("{ns}/{name}"),
                        s.object_ref(&()),
                        w,
                    );
                    idx.apply_slice(&ns, &name, model);
                    shared.metrics.endpoint_changed();
                }
                Ok(Event::Delete(s)) => {
                    idx.delete_slice(&s.namespace().unwrap_or_default(), &s.name_any());
                    shared.metrics.endpoint_changed();
                }
                Err(e) => tracing::warn!("EndpointSlice watch: {e}"),
            }
        }
        shared.notify.notify_one();
    }
}

/// Mirrors the pool classes (the announcer watches them for itself).
async fn watch_classes(api: Api<LoadBalancerClass>, shared: Arc<Shared>) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let pool_of = |c: &LoadBalancerClass| announce::pool_class(&c.spec, &mut Vec::new());
    let mut listing = BTreeMap::new();
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        {
            let mut pools = shared.pools();
            let mut next = pools.classes.clone();
            match ev {
                Ok(Event::Init) => listing.clear(),
                Ok(Event::InitApply(c)) => {
                    if let Some(p) = pool_of(&c) {
                        listing.insert(c.name_any(), p);
                    }
                }
                Ok(Event::InitDone) => {
                    failing = false;
                    next = std::mem::take(&mut listing);
                    pools.listed = true;
                }
                Ok(Event::Apply(c)) => match pool_of(&c) {
                    Some(p) => drop(next.insert(c.name_any(), p)),
                    None => drop(next.remove(&c.name_any())),
                },
                Ok(Event::Delete(c)) => drop(next.remove(&c.name_any())),
                Err(e) => {
                    if !failing {
                        tracing::warn!("LoadBalancerClass watch (pool addresses): {e}");
                    }
                    failing = true;
                    // Without the class API there are no pool addresses: do not hold
                    // Service programming back for it.
                    pools.listed = true;
                }
            }
            // The claims (externalIPs inside a pool range are refused) see the same classes.
            let ranges = next
                .iter()
                .map(|(name, class)| (name.clone(), class.addresses.clone()))
                .collect();
            pools.set(next);
            drop(pools);
            shared.index().set_pools(ranges);
        }
        shared.notify.notify_one();
    }
}

/// Marks a pool Service's load-balancer addresses (those inside its class's ranges, as
/// the announcer puts them on interfaces) as protected.
fn protect_pool(
    model: &crate::proxy::model::Model,
    id: &ServiceId,
    rules: &mut ruleset::ServiceRules,
    pools: &BTreeMap<String, PoolClass>,
) {
    let Some(svc) = model.services.get(id) else {
        return;
    };
    if let Some(class) = svc.owner_class.as_deref().and_then(|c| pools.get(c)) {
        let addrs = svc.load_balancer_ips.iter().copied();
        ruleset::protect(rules, addrs.filter(|a| class.contains(a)), &model.node);
    }
}

/// Takes the index's pending work and computes the rules it needs (under the lock: the
/// model is not copied).
fn compute(shared: &Shared, force_full: bool) -> Option<(Work, Computed)> {
    let mut idx = shared.index();
    if !idx.ready() {
        return None;
    }
    let mut pools = shared.pools();
    if !pools.listed {
        return None;
    }
    let force_full = force_full || std::mem::take(&mut pools.changed);
    let work = idx.take_work(force_full);
    let model = &idx.model;
    let computed = match &work {
        Work::Nothing => Computed::Nothing,
        Work::Full => {
            let mut rules = ruleset::all_rules(model);
            for (id, r) in rules.iter_mut() {
                protect_pool(model, id, r, &pools.classes);
            }
            Computed::Full(model.node.clone(), rules)
        }
        Work::Services(ids) => Computed::Changes(
            ids.iter()
                .map(|id| {
                    let rules = model.services.get(id).map(|s| {
                        let mut r = ruleset::service_rules(s, model.slices_of(id), &model.node);
                        protect_pool(model, id, &mut r, &pools.classes);
                        r
                    });
                    (id.clone(), rules)
                })
                .collect(),
        ),
    };
    Some((work, computed))
}

enum Computed {
    Nothing,
    Full(
        crate::proxy::model::NodeFacts,
        std::collections::BTreeMap<ServiceId, ruleset::ServiceRules>,
    ),
    Changes(Changes),
}

/// What the sync loop carries from one sync to the next.
struct SyncState {
    programmed: Option<Programmed>,
    /// The next sync rewrites the whole table (first sync, after a failure, or when an
    /// incremental one cannot express a change).
    force_full: bool,
    last: Instant,
    /// After a failed transaction: when to try again (changes wait for it too).
    retry_at: Option<Instant>,
    /// The longest wait between retries.
    retry_cap: Duration,
    /// Netlink sockets kept open for incremental batches and conntrack deletes.
    sockets: nft::Sockets,
}

/// The result of applying one sync's rules.
struct Applied {
    result: Result<(), Error>,
    /// `Some(true)` full, `Some(false)` partial, `None` nothing was applied.
    full: Option<bool>,
    stale_udp: Vec<(crate::proxy::ruleset::Frontend, IpAddr)>,
    /// How a transaction went to the kernel: `netlink` or `nft` (none when nothing did).
    path: Option<&'static str>,
}

impl Applied {
    fn nothing() -> Self {
        Self {
            result: Ok(()),
            full: None,
            stale_udp: Vec::new(),
            path: None,
        }
    }
}

async fn sync_loop(shared: Arc<Shared>, health: HealthChecks, args: Args) {
    let mut state = SyncState {
        programmed: None,
        force_full: true,
        last: Instant::now() - args.min_sync_interval,
        retry_at: None,
        retry_cap: args.max_sync_interval,
        sockets: nft::Sockets::default(),
    };
    loop {
        wait_for_work(&shared, &mut state, &args).await;
        sync_once(&shared, &health, &mut state).await;
    }
}

/// Whether another process changed berth's tables; if so the next sync is a full one.
fn drifted(shared: &Shared, state: &mut SyncState) -> bool {
    if state.programmed.is_none() || state.force_full {
        return false;
    }
    match shared.drift.check() {
        Some(why) => {
            tracing::warn!("nftables tables changed by another process, restoring: {why}");
            shared.metrics.drift_repair();
            state.force_full = true;
            true
        }
        None => false,
    }
}

/// Waits for a change, the periodic sync, drift of the tables or the retry after a
/// failure, then for the rest of the minimum interval since the last sync, so bursts of
/// changes become one sync.
async fn wait_for_work(shared: &Shared, state: &mut SyncState, args: &Args) {
    if let Some(at) = state.retry_at.take() {
        tokio::time::sleep_until(at.into()).await;
        return;
    }
    let deadline = tokio::time::sleep(args.max_sync_interval);
    tokio::pin!(deadline);
    let every = args.drift_check_interval.max(Duration::from_millis(100));
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.notify.notified() => break,
            _ = &mut deadline => break,
            _ = checks.tick() => if drifted(shared, state) { break },
        }
    }
    let since = state.last.elapsed();
    if since < args.min_sync_interval {
        tokio::time::sleep(args.min_sync_interval - since).await;
    }
}

/// Computes the pending rules, applies them and records the outcome.
async fn sync_once(shared: &Shared, health: &HealthChecks, state: &mut SyncState) {
    let pending = shared.index().pending_since();
    let start = Instant::now();
    // An incremental transaction must not build on tables someone else changed.
    drifted(shared, state);
    let full_wanted = state.force_full || state.programmed.is_none();
    let Some((_, computed)) = compute(shared, full_wanted) else {
        return;
    };
    state.last = Instant::now();
    let services = shared.index().model.services.len();
    let applied = match computed {
        Computed::Nothing => Applied::nothing(),
        Computed::Full(node, rules) => {
            apply_full(state, &shared.drift, &node, rules, start, services).await
        }
        Computed::Changes(changes) => {
            match apply_changes(state, &shared.drift, changes, start).await {
                Some(applied) => applied,
                None => {
                    // An endpoint count beyond the precreated chains: only a full sync can
                    // add its chain. Not a failure; go again at once.
                    tracing::info!("new endpoint count needs a new chain; syncing fully");
                    state.force_full = true;
                    shared.notify.notify_one();
                    return;
                }
            }
        }
    };
    record(shared, health, state, applied, pending, start, services).await;
}

/// One transaction, with the drift check told to expect it and, after a commit, to take
/// the kernel's new state as its baseline.
async fn apply_watched(drift: &Drift, transaction: &str, mode: &'static str) -> Result<(), Error> {
    drift.begin();
    let result = nft::apply(transaction, mode).await;
    drift.end(result.is_ok(), mode == "full");
    result
}

async fn apply_full(
    state: &mut SyncState,
    drift: &Drift,
    node: &crate::proxy::model::NodeFacts,
    rules: std::collections::BTreeMap<ServiceId, ruleset::ServiceRules>,
    start: Instant,
    services: usize,
) -> Applied {
    let (plan, next) = Programmed::full(node, rules, state.programmed.as_ref());
    let result = apply_watched(drift, &plan.transaction, "full").await;
    if result.is_ok() {
        tracing::info!(
            services,
            elements = next.element_count(),
            took_ms = start.elapsed().as_millis() as u64,
            "full sync"
        );
        state.programmed = Some(next);
    }
    Applied {
        result,
        full: Some(true),
        stale_udp: plan.stale_udp,
        path: Some("nft"),
    }
}

/// Applies an incremental change; `None` when it needs a full sync instead.
async fn apply_changes(
    state: &mut SyncState,
    drift: &Drift,
    changes: Changes,
    start: Instant,
) -> Option<Applied> {
    let Some(programmed) = state.programmed.as_mut() else {
        return Some(Applied::nothing());
    };
    let plan = programmed.plan_incremental(&changes);
    if plan.needs_full {
        return None;
    }
    // Element changes go as one batch over the kept-open netlink socket; the rare change
    // that also adds a set and its rule (a new affinity timeout) goes through nft.
    let (result, path) = match &plan.elements {
        _ if plan.transaction.is_empty() => (Ok(()), None),
        Some(elements) => {
            drift.begin();
            let result = state.sockets.apply_elements(elements);
            drift.end_elements(result.is_ok());
            (result, Some("netlink"))
        }
        None => (
            apply_watched(drift, &plan.transaction, "partial").await,
            Some("nft"),
        ),
    };
    if result.is_ok() {
        tracing::debug!(
            changed = changes.len(),
            elements = plan.elements_changed,
            took_ms = start.elapsed().as_millis() as u64,
            "partial sync"
        );
        programmed.commit(changes);
    }
    Some(Applied {
        result,
        full: Some(false),
        stale_udp: plan.stale_udp,
        path,
    })
}

/// After applying: conntrack cleanup, health-check ports, metrics, and the index told
/// its pending changes are programmed (or a full sync scheduled after a failure).
async fn record(
    shared: &Shared,
    health: &HealthChecks,
    state: &mut SyncState,
    applied: Applied,
    pending: Option<Instant>,
    start: Instant,
    services: usize,
) {
    if let Err(e) = applied.result {
        let failures = shared.health.sync_failed(&e.to_string());
        shared.metrics.sync_failed(e.metric_label());
        state.force_full = true;
        state.retry_at = Some(Instant::now() + sync::retry_delay(failures, state.retry_cap));
        return;
    }
    if applied.full.is_some() {
        shared.health.sync_succeeded();
    }
    state.retry_at = None;
    state.force_full = false;
    if let Some(path) = applied.path {
        shared.metrics.transaction(path);
    }
    let cleared = state.sockets.clear_udp(&applied.stale_udp);
    shared.metrics.conntrack_deleted(cleared);
    if let Some(p) = &state.programmed {
        health.update(p.health_checks());
        shared.metrics.sync_ok(
            applied.full,
            start.elapsed(),
            p.element_count(),
            p.lb_chain_count(),
            services,
        );
    }
    if let Some(t) = pending {
        // Only a sync that ran measures latency; an empty one still ends it.
        if applied.full.is_some() {
            shared.metrics.programming_latency(t.elapsed());
        }
        shared.index().synced();
    }
}

/// What `/healthz` reads.
#[derive(Clone)]
struct HealthInputs {
    metrics: Arc<Metrics>,
    health: Arc<AgentHealth>,
    drift: Arc<Drift>,
    max_age: Duration,
}

/// `/healthz`: 200 while a sync succeeded within `max_age`, syncs are not failing
/// repeatedly, berth's tables are as it left them and the node is not draining. `/livez`
/// (`draining` false) is the same without the node's draining, as kube-proxy's: a
/// liveness probe must not restart the agent of a node being drained.
fn health_reply(h: &HealthInputs, draining: bool) -> Reply {
    let (fresh, age) = h.metrics.healthy(h.max_age);
    let mut problems = h.health.problems(draining);
    if let Some(why) = h.drift.check() {
        problems.push(format!("nftables tables changed by another process: {why}"));
    }
    let ok = fresh && problems.is_empty();
    let code = if ok { 200 } else { 503 };
    h.metrics.probe_answered(!draining, code);
    Reply::json(
        code,
        &serde_json::json!({
            "lastSuccessfulSyncAgeSeconds": age.map(|a| a.as_secs_f64()),
            "healthy": ok,
            "problems": problems,
        }),
    )
}

/// The routes of one admin listener: health on the healthz listener, `/metrics` only on
/// the metrics listener (both when they share an address).
fn admin_routes(
    inputs: HealthInputs,
    health: bool,
    exports: bool,
) -> impl Fn(&str) -> Reply + Send + Sync + 'static {
    move |path| match path {
        "/healthz" if health => health_reply(&inputs, true),
        "/livez" if health => health_reply(&inputs, false),
        "/metrics" if exports => Reply::metrics(inputs.metrics.render()),
        _ => Reply::not_found(),
    }
}

/// Binds the healthz and metrics listeners and serves them; one listener with both
/// routes when they share an address.
async fn serve_admin(
    args: &Args,
    admin: &Server,
    inputs: HealthInputs,
) -> Result<Vec<tokio::task::JoinHandle<()>>, Error> {
    let shared_address = args.metrics_bind == args.healthz_bind;
    let healthz = bind(args.healthz_bind).await?;
    let routes = admin_routes(inputs.clone(), true, shared_address);
    let mut tasks = vec![tokio::spawn(admin.clone().serve(healthz, routes))];
    if !shared_address {
        let listener = bind(args.metrics_bind).await?;
        let routes = admin_routes(inputs, false, true);
        tasks.push(tokio::spawn(admin.clone().serve(listener, routes)));
    }
    Ok(tasks)
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    admin::bind(addr)
        .await
        .map_err(Error::io(format!("bind {addr}")))
}

/// The watches claims depend on beside Services and classes (every Node's addresses) and
/// the Warning Events and metrics of refused claims.
fn claim_tasks(
    client: &Client,
    shared: &Arc<Shared>,
    node: &str,
) -> [tokio::task::JoinHandle<()>; 2] {
    [
        tokio::spawn(watch_nodes(
            Api::all(client.clone()),
            node.to_string(),
            shared.clone(),
        )),
        tokio::spawn(report_refusals(shared.clone(), node.to_string())),
    ]
}

/// Every Node: their addresses for the claims (an externalIP equal to a node address is
/// refused) and, for this node, its NodePort addresses and whether it is draining. One
/// watch serves both.
async fn watch_nodes(api: Api<Node>, me: String, shared: Arc<Shared>) {
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        {
            let mut idx = shared.index();
            match ev {
                Ok(Event::Init) => idx.begin_relist(Kind::Nodes),
                Ok(Event::InitDone) => {
                    idx.end_relist(Kind::Nodes);
                    idx.end_relist(Kind::Node);
                }
                Ok(Event::Apply(n) | Event::InitApply(n)) => {
                    let mut w = Vec::new();
                    let info = convert::node_info(&n, &mut w);
                    idx.apply_cluster_node(&n.name_any(), Some(info));
                    if n.name_any() == me {
                        let mut w = Vec::new();
                        let ips = convert::node_internal_ips(&n, &mut w);
                        warn_all(&shared, "Node", &me, n.object_ref(&()), w);
                        idx.set_node_ips(ips);
                        idx.set_node_zone(convert::node_zone(&n));
                        shared.health.set_draining(healthcheck::draining(&n));
                        shared.leaving.set(healthcheck::leaving(&n));
                        *shared.labels.lock().unwrap_or_else(|p| p.into_inner()) =
                            n.labels().clone();
                    }
                }
                Ok(Event::Delete(n)) => {
                    idx.apply_cluster_node(&n.name_any(), None);
                    if n.name_any() == me {
                        let deleted = Some("node object deleted".to_string());
                        shared.health.set_draining(deleted.clone());
                        shared.leaving.set(deleted);
                    }
                }
                Err(e) => tracing::warn!("Node watch: {e}"),
            }
        }
        shared.notify.notify_one();
    }
}

/// Publishes the Warning Events of refused claims this node reports (see [`events`])
/// and sets the refused-claims metric, once a second when something changed.
async fn report_refusals(shared: Arc<Shared>, node: String) {
    let mut reporter = events::Reporter::new(&node);
    let mut last: Option<(u64, Vec<String>)> = None;
    let mut last_pass = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (generation, findings, nodes) = {
            let idx = shared.index();
            let (generation, findings) = idx.findings();
            let nodes = idx.ready_nodes();
            // Unchanged: a pass a minute is enough to repeat lasting refusals in time.
            let unchanged = last.as_ref() == Some(&(generation, nodes.clone()));
            if unchanged && last_pass.elapsed() < Duration::from_secs(60) {
                continue;
            }
            (generation, findings.clone(), nodes)
        };
        for reason in claims::Reason::ALL {
            let n = findings
                .values()
                .flat_map(|f| &f.refusals)
                .filter(|r| r.reason == reason)
                .count();
            shared.metrics.refused_claims(reason.label(), n);
        }
        for report in reporter.update(&findings, &nodes, Instant::now()) {
            tracing::warn!(service = %report.service, reason = report.refusal.reason.as_str(), "{}", report.refusal.message);
            if let Err(e) = shared
                .recorder
                .publish(
                    &berth_runtime::events::distinct(&report.event()),
                    &report.reference(),
                )
                .await
            {
                tracing::debug!("cannot record event: {e}");
            }
        }
        last = Some((generation, nodes));
        last_pass = Instant::now();
    }
}

/// The announcer's view of the model: pool addresses with their eligible nodes, among the
/// nodes whose agent is alive.
fn model_view(shared: Arc<Shared>, liveness: Liveness) -> ModelView {
    Arc::new(move |classes, labels| {
        let names = labels.keys().cloned().collect();
        let nodes = liveness.live(&names)?;
        let dead = liveness.dead();
        let idx = shared.index();
        if !idx.ready() {
            return None;
        }
        let mut warnings = Vec::new();
        let wanted = announce::wanted(&idx.model, classes, &nodes, labels, &mut warnings);
        Some(Snapshot {
            wanted,
            interfaces: announce::interfaces(&idx.model, classes),
            node_addresses: idx.model.node.addresses.clone(),
            warnings,
            dead,
        })
    })
}

/// The peer probes, unless turned off or their port cannot be bound (then Leases alone
/// decide, and the agent says so).
fn start_probes(args: &Args, wake: Arc<Notify>, metrics: Arc<Metrics>) -> Option<Arc<Probes>> {
    if args.l2_peer_probe_port == 0 {
        tracing::info!("L2 peer probes off: a dead node's addresses move after a Lease duration");
        return None;
    }
    let cfg = ProbeConfig {
        dead_after: args.l2_peer_dead_after,
        ..ProbeConfig::default()
    };
    match Probes::start(&args.node_name, args.l2_peer_probe_port, cfg, wake, metrics) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                port = args.l2_peer_probe_port,
                "L2 peer probes off, their port cannot be bound ({e}): a dead node's addresses move after a Lease duration"
            );
            None
        }
    }
}

/// Where this agent's probes arrive: the node's first address of the model (its
/// InternalIP unless given), once known.
fn probe_address(shared: Arc<Shared>, port: u16) -> heartbeat::ProbeAddress {
    Box::new(move || {
        let idx = shared.index();
        let ip = idx.model.node.addresses.first().copied()?;
        Some(SocketAddr::new(ip, port))
    })
}

/// The BGP speaker's view of the model: the routes of this node for each peer. A leaving
/// node advertises nothing while another node stays (its routes go first, make-before-
/// break: it keeps forwarding what still reaches it).
fn bgp_view(shared: Arc<Shared>, liveness: Liveness) -> bgp::speaker::RoutesView {
    let warned = Mutex::new(std::collections::BTreeSet::new());
    Arc::new(move |eligible, peers| {
        let eligible = eligible && liveness.announces();
        let idx = shared.index();
        let pools = shared.pools();
        if !idx.ready() || !pools.listed {
            return None;
        }
        let labels = shared
            .labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut warnings = Vec::new();
        let routes = bgp::routes::per_peer(
            &idx.model,
            &pools.classes,
            eligible,
            &labels,
            peers,
            &mut warnings,
        );
        // Each once: the view runs several times a second.
        let mut warned = warned.lock().unwrap_or_else(|p| p.into_inner());
        for w in warnings {
            if warned.insert(w.clone()) {
                tracing::warn!("BGP: {w}");
            }
        }
        Some(routes)
    })
}

/// Runs the agent until `shutdown` completes (or a task ends). Stopping leaves the rules
/// in place: the next start replaces them atomically, so established connections keep
/// flowing. Pool addresses are given up on the way out, so another node takes them over
/// at once.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    announcer::check_duration(args.l2_lease_duration)?;
    let client = client(&args).await?;
    let shared = Arc::new(Shared {
        index: Mutex::new(Index::new(NodeConfig {
            name: args.node_name.clone(),
            addresses: args.node_addresses.clone(),
            cluster_cidrs: args.cluster_cidr.clone(),
            service_cidrs: args.service_cidr.clone(),
        })),
        notify: Notify::new(),
        metrics: Arc::new(Metrics::default()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "berth-nodeproxy".into(),
                instance: Some(args.node_name.clone()),
            },
        ),
        health: Arc::default(),
        drift: Arc::default(),
        pools: Mutex::default(),
        leaving: Arc::default(),
        labels: Mutex::default(),
    });
    shared.index().set_policy(claims::Policy {
        external_ip_cidrs: args.external_ip_cidrs.clone(),
        max_rules_per_service: args.max_rules_per_service,
    });
    tracing::info!(node = %args.node_name, healthz = %args.healthz_bind, metrics = %args.metrics_bind, "starting");
    // One admin server for every listener: one connection cap for the whole agent.
    let admin = Server::default();
    let inputs = HealthInputs {
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        drift: shared.drift.clone(),
        max_age: args.healthz_max_age,
    };
    let mut tasks = serve_admin(&args, &admin, inputs).await?;
    let health = HealthChecks::new(args.health_check_bind, admin);
    tasks.extend([
        tokio::spawn(watch_services(Api::all(client.clone()), shared.clone())),
        tokio::spawn(watch_slices(Api::all(client.clone()), shared.clone())),
        tokio::spawn(watch_classes(Api::all(client.clone()), shared.clone())),
        tokio::spawn(sync_loop(shared.clone(), health, args.clone())),
    ]);
    tasks.extend(claim_tasks(&client, &shared, &args.node_name));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let leases = Api::namespaced(client.clone(), &args.lease_namespace);
    let wake = Arc::new(Notify::new());
    let probes = start_probes(&args, wake.clone(), shared.metrics.clone());
    let liveness = Liveness::watch(
        leases.clone(),
        &args.node_name,
        probes.clone(),
        shared.leaving.clone(),
    );
    let beat = Beat::new(
        berth_runtime::lease::LeaseClient::new(leases, &args.node_name, args.l2_lease_duration),
        probes.map(|p| probe_address(shared.clone(), p.port())),
        shared.leaving.clone(),
    );
    let beating = tokio::spawn(heartbeat::run(
        beat,
        liveness.clone(),
        Timing::new(args.l2_lease_duration),
        stopped.clone(),
    ));
    let announcer = Announcer::new(
        client.clone(),
        announcer::Config {
            node: args.node_name.clone(),
            namespace: args.lease_namespace.clone(),
            interface: args.l2_interface.clone(),
            timing: Timing::new(args.l2_lease_duration),
        },
        shared.metrics.clone(),
        wake,
    );
    let speaker = bgp::speaker::Speaker::new(client.clone(), &args.node_name);
    let speaking =
        tokio::spawn(speaker.run(bgp_view(shared.clone(), liveness.clone()), stopped.clone()));
    let view = model_view(shared.clone(), liveness);
    let mut announcing = tokio::spawn(announcer.run(view, stopped));
    tokio::select! {
        _ = futures::future::join_all(tasks) => {}
        _ = &mut announcing => {}
        _ = shutdown => {
            let _ = stop.send(true);
            // Bounded: a stuck apiserver must not keep the agent from exiting; Leases
            // not released expire, addresses not removed run out of lifetime.
            let released = futures::future::join3(announcing, beating, speaking);
            if tokio::time::timeout(Duration::from_secs(5), released).await.is_err() {
                tracing::warn!("pool addresses not all released within 5s");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn invalid_input_becomes_one_bounded_warning_event() {
        assert!(invalid_input_event(&[]).is_none());
        let e = invalid_input_event(&["nodePort 70000 out of range".into(), "x".into()])
            .expect("event");
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(
            e.note.as_deref(),
            Some("berth-nodeproxy ignores: nodePort 70000 out of range; x")
        );
        let long = invalid_input_event(&["é".repeat(2000)]).expect("event");
        assert!(long.note.is_some_and(|n| n.len() <= 1000));
    }

    #[test]
    fn metrics_only_on_the_metrics_listener() {
        let metrics = Arc::new(Metrics::default());
        let inputs = HealthInputs {
            metrics: metrics.clone(),
            health: Arc::default(),
            drift: Arc::default(),
            max_age: Duration::from_secs(90),
        };
        let healthz = admin_routes(inputs.clone(), true, false);
        assert_eq!(healthz("/healthz").status, 503, "no sync yet");
        assert_eq!(healthz("/metrics").status, 404);
        metrics.sync_ok(None, Duration::ZERO, 0, 0, 0);
        let ok = healthz("/livez");
        assert_eq!(ok.status, 200);
        let body: serde_json::Value = serde_json::from_str(&ok.body).expect("json");
        assert_eq!(body["healthy"], true);
        let exports = admin_routes(inputs.clone(), false, true);
        assert_eq!(exports("/healthz").status, 404);
        let scraped = exports("/metrics");
        assert_eq!(scraped.status, 200);
        assert!(scraped.body.contains("berth_nodeproxy_services 0"));
        let both = admin_routes(inputs.clone(), true, true);
        assert_eq!(both("/metrics").status, 200);
        assert_eq!(both("/healthz").status, 200);
        inputs
            .health
            .set_draining(Some("node is being deleted".into()));
        let draining = healthz("/healthz");
        assert_eq!(draining.status, 503);
        assert!(draining.body.contains("node is being deleted"));
        assert_eq!(healthz("/livez").status, 200, "a draining agent is alive");
        inputs.health.set_draining(None);
        assert_eq!(healthz("/healthz").status, 200);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "berth-nodeproxy",
            "--node-name",
            "n1",
            "--node-addresses",
            "198.18.1.10,fd00::1",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--min-sync-interval",
            "50ms",
        ])
        .expect("flags");
        assert_eq!(a.node_addresses.len(), 2);
        assert_eq!(a.cluster_cidr[0].to_string(), "10.244.0.0/16");
        assert_eq!(a.min_sync_interval, Duration::from_millis(50));
        assert_eq!(a.l2_lease_duration, Duration::from_secs(15));
        assert_eq!(a.l2_interface, None);
        assert_eq!(a.drift_check_interval, Duration::from_secs(1));
        let l2 = Args::try_parse_from([
            "berth-nodeproxy",
            "--node-name",
            "n1",
            "--l2-lease-duration",
            "4s",
            "--l2-interface",
            "eth0",
            "--lease-namespace",
            "berth",
        ])
        .expect("flags");
        assert_eq!(l2.l2_lease_duration, Duration::from_secs(4));
        assert_eq!(l2.l2_interface.as_deref(), Some("eth0"));
        assert_eq!(l2.lease_namespace, "berth");
        assert!(announcer::check_duration(l2.l2_lease_duration).is_ok());
        assert!(announcer::check_duration(Duration::from_millis(1500)).is_err());
        assert!(announcer::check_duration(Duration::from_millis(500)).is_err());
        assert!(
            Args::try_parse_from(["berth-nodeproxy", "--node-name", "n", "--cluster-cidr", "x"])
                .is_err()
        );
    }

    #[test]
    fn claim_flags_default_safe_and_parse() {
        let d = Args::try_parse_from(["berth-nodeproxy", "--node-name", "n1"]).expect("flags");
        assert!(d.external_ip_cidrs.is_empty(), "externalIPs off by default");
        assert_eq!(d.max_rules_per_service, 50_000);
        let a = Args::try_parse_from([
            "berth-nodeproxy",
            "--node-name",
            "n1",
            "--external-ip-cidrs",
            "0.0.0.0/0,::/0",
            "--max-rules-per-service",
            "1000",
        ])
        .expect("flags");
        assert_eq!(a.external_ip_cidrs.len(), 2);
        assert_eq!(a.max_rules_per_service, 1000);
    }
}
