//! The agent's Prometheus metrics (through `berth_runtime::metrics`) and the health state
//! `/healthz` reads.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_runtime::metrics::prometheus_client::metrics::counter::Counter;
use berth_runtime::metrics::prometheus_client::metrics::family::Family;
use berth_runtime::metrics::prometheus_client::metrics::gauge::Gauge;
use berth_runtime::metrics::prometheus_client::metrics::histogram::{
    Histogram, exponential_buckets,
};
use berth_runtime::metrics::prometheus_client::registry::Registry;
use berth_runtime::metrics::{self, Collect};

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type Label = [(&'static str, &'static str); 1];

/// Metrics and health, updated by the sync loop and the announcer, read by `/metrics` and
/// `/healthz`.
#[derive(Debug)]
pub struct Metrics {
    full_sync: Histogram,
    partial_sync: Histogram,
    programming_latency: Histogram,
    failures: Family<Label, Counter>,
    elements: Gauge,
    lb_chains: Gauge,
    services: Gauge,
    l2_held: Gauge,
    l2_transitions: Family<Label, Counter>,
    garps: Counter,
    peer_probes: Counter,
    peers_dead: Gauge,
    neighbour_adverts: Counter,
    last_ok: Mutex<Option<Instant>>,
    l2_renewal_lateness: Histogram,
    refused: Family<Label, Gauge>,
    kube_proxy: KubeProxy,
    /// Unix time of the last successful sync (the start until the first), for alerts.
    last_ok_unix: Gauge<f64, AtomicU64>,
    drift_repairs: Counter,
    transactions: Family<Label, Counter>,
    conntrack_deleted: Counter,
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            full_sync: metrics::histogram(SECONDS_BUCKETS),
            partial_sync: metrics::histogram(SECONDS_BUCKETS),
            programming_latency: metrics::histogram(SECONDS_BUCKETS),
            failures: Family::default(),
            elements: Gauge::default(),
            lb_chains: Gauge::default(),
            services: Gauge::default(),
            l2_held: Gauge::default(),
            l2_transitions: Family::default(),
            garps: Counter::default(),
            peer_probes: Counter::default(),
            peers_dead: Gauge::default(),
            neighbour_adverts: Counter::default(),
            last_ok: Mutex::new(None),
            l2_renewal_lateness: metrics::histogram(SECONDS_BUCKETS),
            refused: Family::default(),
            kube_proxy: KubeProxy::default(),
            last_ok_unix: Gauge::default(),
            drift_repairs: Counter::default(),
            transactions: Family::default(),
            conntrack_deleted: Counter::default(),
        };
        m.last_ok_unix.set(unix_now());
        for path in ["netlink", "nft"] {
            m.transactions.get_or_create(&[("path", path)]).inc_by(0);
        }
        // Series that exist from the start, so rates and alerts see them at 0.
        m.failures.get_or_create(&[("reason", "nft")]).inc_by(0);
        for event in ["acquired", "released", "lost"] {
            m.l2_transitions
                .get_or_create(&[("event", event)])
                .inc_by(0);
        }
        m
    }
}

impl Metrics {
    /// A sync committed (or had nothing to do).
    pub fn sync_ok(
        &self,
        full: Option<bool>,
        took: Duration,
        elements: usize,
        lb_chains: usize,
        services: usize,
    ) {
        match full {
            Some(true) => self.full_sync.observe(took.as_secs_f64()),
            Some(false) => self.partial_sync.observe(took.as_secs_f64()),
            None => {}
        }
        self.kube_proxy.synced(full, took);
        self.elements.set(count(elements));
        self.lb_chains.set(count(lb_chains));
        self.services.set(count(services));
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.last_ok_unix.set(unix_now());
    }

    pub fn sync_failed(&self, reason: &'static str) {
        self.failures.get_or_create(&[("reason", reason)]).inc();
        self.kube_proxy.sync_failures.inc();
    }

    /// Time from an EndpointSlice change arriving to its rules being programmed.
    pub fn programming_latency(&self, d: Duration) {
        self.programming_latency.observe(d.as_secs_f64());
        self.kube_proxy.network_programming.observe(d.as_secs_f64());
    }

    /// Pool addresses this node announces now.
    pub fn l2_held(&self, n: usize) {
        self.l2_held.set(count(n));
    }

    /// A Lease of a pool address changed hands on this node: `acquired`, `released`, `lost`.
    pub fn l2_transition(&self, event: &'static str) {
        self.l2_transitions.get_or_create(&[("event", event)]).inc();
    }

    pub fn garp_sent(&self) {
        self.garps.inc();
    }

    pub fn peer_probe_sent(&self) {
        self.peer_probes.inc();
    }

    /// Peer agents this one's probes find dead now.
    pub fn peers_dead(&self, n: usize) {
        self.peers_dead.set(count(n));
    }

    pub fn neighbour_advert_sent(&self) {
        self.neighbour_adverts.inc();
    }

    /// How long after its due time a pool address's Lease renewal started.
    pub fn l2_renewal_lateness(&self, late: Duration) {
        self.l2_renewal_lateness.observe(late.as_secs_f64());
    }

    /// Refused or losing claims (Services, addresses, NodePorts) in effect, by reason.
    pub fn refused_claims(&self, reason: &'static str, n: usize) {
        self.refused
            .get_or_create(&[("reason", reason)])
            .set(count(n));
    }

    /// Healthy when a sync succeeded within `max_age`.
    pub fn healthy(&self, max_age: Duration) -> (bool, Option<Duration>) {
        let age = self
            .last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed());
        (age.is_some_and(|a| a <= max_age), age)
    }

    /// A transaction committed: `netlink` (an element batch) or `nft` (an `nft -f` run).
    pub fn transaction(&self, path: &'static str) {
        self.transactions.get_or_create(&[("path", path)]).inc();
    }

    /// Stale UDP conntrack entries deleted over netlink.
    pub fn conntrack_deleted(&self, n: usize) {
        self.conntrack_deleted.inc_by(n as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        metrics::encode(self)
    }
}

impl Collect for Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "berth_nodeproxy_full_sync_duration_seconds",
            "Duration of full syncs (build, render, nft commit)",
            self.full_sync.clone(),
        );
        r.register(
            "berth_nodeproxy_partial_sync_duration_seconds",
            "Duration of incremental syncs",
            self.partial_sync.clone(),
        );
        r.register(
            "berth_nodeproxy_endpointslice_programming_latency_seconds",
            "Time from an EndpointSlice change reaching the agent to its rules being programmed",
            self.programming_latency.clone(),
        );
        r.register(
            "berth_nodeproxy_sync_failures",
            "Failed syncs by reason",
            self.failures.clone(),
        );
        for (name, help, gauge) in [
            (
                "berth_nodeproxy_elements_programmed",
                "Map and set elements programmed",
                &self.elements,
            ),
            (
                "berth_nodeproxy_lb_chains_programmed",
                "Shared ep-N chains programmed",
                &self.lb_chains,
            ),
            (
                "berth_nodeproxy_services",
                "Proxied Services known",
                &self.services,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        self.register_l2(r);
        r.register(
            "berth_nodeproxy_refused_claims",
            "Refused or losing Service claims left out of the rules, by reason",
            self.refused.clone(),
        );
        r.register(
            "berth_nodeproxy_last_sync_success_timestamp_seconds",
            "Unix time of the last successful sync (the agent's start until the first)",
            self.last_ok_unix.clone(),
        );
        r.register(
            "berth_nodeproxy_drift_repairs",
            "Times another process changed berth's tables and a full sync restored them",
            self.drift_repairs.clone(),
        );
        r.register(
            "berth_nodeproxy_kernel_transactions",
            "Committed kernel transactions by path: netlink element batches or nft runs",
            self.transactions.clone(),
        );
        r.register(
            "berth_nodeproxy_conntrack_deleted",
            "Stale UDP conntrack entries deleted over netlink",
            self.conntrack_deleted.clone(),
        );
        self.kube_proxy.register(r);
    }
}

impl Metrics {
    /// The L2 announcement's metrics.
    fn register_l2(&self, r: &mut Registry) {
        r.register(
            "berth_nodeproxy_l2_addresses_held",
            "Pool addresses this node announces",
            self.l2_held.clone(),
        );
        r.register(
            "berth_nodeproxy_l2_peers_dead",
            "Peer agents silent to this agent's probes and to a witness's",
            self.peers_dead.clone(),
        );
        r.register(
            "berth_nodeproxy_l2_lease_transitions",
            "Pool address Leases acquired, released or lost by this node",
            self.l2_transitions.clone(),
        );
        r.register(
            "berth_nodeproxy_l2_gratuitous_arps_sent",
            "Gratuitous ARPs sent for pool addresses",
            self.garps.clone(),
        );
        r.register(
            "berth_nodeproxy_l2_peer_probes_sent",
            "Probes sent to peer agents on the node network",
            self.peer_probes.clone(),
        );
        r.register(
            "berth_nodeproxy_l2_neighbour_advertisements_sent",
            "Unsolicited IPv6 neighbour advertisements sent for pool addresses",
            self.neighbour_adverts.clone(),
        );
        r.register(
            "berth_nodeproxy_l2_renewal_lateness_seconds",
            "How long after its due time each pool address Lease renewal started",
            self.l2_renewal_lateness.clone(),
        );
    }
}

/// kube-proxy's bucket layout for sync durations: 1 ms doubling 15 times (~16 s).
fn kube_proxy_sync_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).collect()
}

/// kube-proxy's bucket layout for network programming latency: 0.25 s and 0.5 s, every
/// second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
fn kube_proxy_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// kube-proxy's own metric names (its `pkg/proxy/metrics`, nftables mode), fed by the
/// same events as berth's, so dashboards and alerts written for kube-proxy keep working.
/// The README lists which names are served and why the others are not.
#[derive(Debug)]
struct KubeProxy {
    sync: Histogram,
    full_sync: Histogram,
    partial_sync: Histogram,
    network_programming: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    endpoint_changes: Counter,
    service_changes: Counter,
    sync_failures: Counter,
    cleanup_failures: Counter,
    probes: Family<[(&'static str, String); 1], Counter>,
    livez: Family<[(&'static str, String); 1], Counter>,
}

impl Default for KubeProxy {
    fn default() -> Self {
        Self {
            sync: metrics::histogram(&kube_proxy_sync_buckets()),
            full_sync: metrics::histogram(&kube_proxy_sync_buckets()),
            partial_sync: metrics::histogram(&kube_proxy_sync_buckets()),
            network_programming: metrics::histogram(&kube_proxy_programming_buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            sync_failures: Counter::default(),
            cleanup_failures: Counter::default(),
            probes: Family::default(),
            livez: Family::default(),
        }
    }
}

impl KubeProxy {
    /// A sync committed; kube-proxy also stamps its timestamp when nothing changed.
    fn synced(&self, full: Option<bool>, took: Duration) {
        if let Some(full) = full {
            let secs = took.as_secs_f64();
            self.sync.observe(secs);
            if full {
                self.full_sync.observe(secs);
            } else {
                self.partial_sync.observe(secs);
            }
        }
        self.last_sync.set(unix_now());
    }

    fn register(&self, r: &mut Registry) {
        for (name, help, h) in [
            (
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                &self.sync,
            ),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                &self.full_sync,
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                &self.partial_sync,
            ),
            (
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                &self.network_programming,
            ),
        ] {
            r.register(name, help, h.clone());
        }
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_sync.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued.clone(),
        );
        // prometheus-client appends `_total` to counters.
        for (name, help, c) in [
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                &self.endpoint_changes,
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                &self.service_changes,
            ),
            (
                "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                &self.sync_failures,
            ),
            (
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                "Cumulative proxy nftables cleanup failures",
                &self.cleanup_failures,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.probes.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
        );
    }
}

impl Metrics {
    /// An EndpointSlice was added, changed or deleted: a sync is queued.
    pub fn endpoint_changed(&self) {
        self.kube_proxy.endpoint_changes.inc();
        self.kube_proxy.last_queued.set(unix_now());
    }

    /// A Service was added, changed or deleted: a sync is queued.
    pub fn service_changed(&self) {
        self.kube_proxy.service_changes.inc();
        self.kube_proxy.last_queued.set(unix_now());
    }

    /// `/healthz` (`livez` false) or `/livez` answered with HTTP status `code`.
    pub fn probe_answered(&self, livez: bool, code: u16) {
        let family = if livez {
            &self.kube_proxy.livez
        } else {
            &self.kube_proxy.probes
        };
        family.get_or_create(&[("code", code.to_string())]).inc();
    }
}

impl Metrics {
    /// Another process changed berth's tables; the next sync restores them.
    pub fn drift_repair(&self) {
        self.drift_repairs.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_family_and_counts() {
        let m = Metrics::default();
        m.sync_ok(Some(true), Duration::from_millis(20), 7, 2, 3);
        m.sync_ok(Some(false), Duration::from_millis(1), 8, 2, 3);
        m.sync_failed("nft");
        m.programming_latency(Duration::from_millis(30));
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_full_sync_duration_seconds_count 1"));
        assert!(t.contains("berth_nodeproxy_full_sync_duration_seconds_bucket{le=\"0.025\"} 1"));
        assert!(t.contains("berth_nodeproxy_full_sync_duration_seconds_bucket{le=\"0.01\"} 0"));
        assert!(t.contains("berth_nodeproxy_partial_sync_duration_seconds_count 1"));
        assert!(t.contains("berth_nodeproxy_sync_failures_total{reason=\"nft\"} 1"));
        assert!(
            t.contains("\nberth_nodeproxy_elements_programmed 8\n"),
            "{t}"
        );
        assert!(t.contains("\nberth_nodeproxy_lb_chains_programmed 2\n"));
        assert!(t.contains("\nberth_nodeproxy_services 3\n"));
        assert!(t.contains("berth_nodeproxy_endpointslice_programming_latency_seconds_count 1"));
        assert!(t.contains("berth_nodeproxy_kernel_transactions_total{path=\"netlink\"} 0"));
        m.transaction("netlink");
        m.conntrack_deleted(2);
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_kernel_transactions_total{path=\"netlink\"} 1"));
        assert!(t.contains("berth_nodeproxy_kernel_transactions_total{path=\"nft\"} 0"));
        assert!(t.contains("\nberth_nodeproxy_conntrack_deleted_total 2\n"));
    }

    #[test]
    fn l2_metrics_render() {
        let m = Metrics::default();
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_l2_addresses_held 0"));
        assert!(t.contains("berth_nodeproxy_l2_lease_transitions_total{event=\"lost\"} 0"));
        assert!(t.contains("berth_nodeproxy_sync_failures_total{reason=\"nft\"} 0"));
        m.l2_held(2);
        m.l2_transition("acquired");
        m.l2_transition("acquired");
        m.garp_sent();
        m.neighbour_advert_sent();
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_l2_addresses_held 2"));
        assert!(t.contains("berth_nodeproxy_l2_lease_transitions_total{event=\"acquired\"} 2"));
        assert!(t.contains("\nberth_nodeproxy_l2_gratuitous_arps_sent_total 1\n"));
        assert!(t.contains("\nberth_nodeproxy_l2_neighbour_advertisements_sent_total 1\n"));
        m.l2_renewal_lateness(Duration::from_millis(3));
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_l2_renewal_lateness_seconds_bucket{le=\"0.005\"} 1"));
    }

    #[test]
    fn alert_inputs_render() {
        let m = Metrics::default();
        let started = unix_now();
        let t = m.render();
        assert!(
            t.contains("\nberth_nodeproxy_drift_repairs_total 0\n"),
            "{t}"
        );
        let stamp = |t: &str| -> f64 {
            t.lines()
                .find_map(|l| {
                    l.strip_prefix("berth_nodeproxy_last_sync_success_timestamp_seconds ")
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or_default()
        };
        assert!(stamp(&t) > 1.0e9 && stamp(&t) <= started, "{t}");
        std::thread::sleep(Duration::from_millis(20));
        m.sync_ok(None, Duration::ZERO, 0, 0, 0);
        m.drift_repair();
        let t = m.render();
        assert!(stamp(&t) > started, "{t}");
        assert!(
            t.contains("\nberth_nodeproxy_drift_repairs_total 1\n"),
            "{t}"
        );
    }

    #[test]
    fn health_needs_a_recent_sync() {
        let m = Metrics::default();
        assert!(!m.healthy(Duration::from_secs(60)).0);
        m.sync_ok(None, Duration::ZERO, 0, 0, 0);
        assert!(m.healthy(Duration::from_secs(60)).0);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!m.healthy(Duration::from_millis(1)).0);
    }

    #[test]
    fn kube_proxy_names_follow_the_same_events() {
        let m = Metrics::default();
        let t = m.render();
        assert!(t.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 0"));
        assert!(t.contains("\nkubeproxy_sync_proxy_rules_endpoint_changes_total 0\n"));
        assert!(t.contains("\nkubeproxy_sync_proxy_rules_last_timestamp_seconds 0"));
        m.endpoint_changed();
        m.endpoint_changed();
        m.service_changed();
        m.sync_ok(Some(false), Duration::from_millis(3), 1, 1, 1);
        m.sync_ok(Some(true), Duration::from_millis(300), 1, 1, 1);
        m.sync_failed("nft");
        m.programming_latency(Duration::from_millis(700));
        m.probe_answered(false, 200);
        m.probe_answered(true, 503);
        let t = m.render();
        assert!(t.contains("\nkubeproxy_sync_proxy_rules_endpoint_changes_total 2\n"));
        assert!(t.contains("\nkubeproxy_sync_proxy_rules_service_changes_total 1\n"));
        assert!(t.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"));
        assert!(t.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1"
        ));
        assert!(
            t.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.256\"} 0")
        );
        assert!(
            t.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.512\"} 1")
        );
        assert!(t.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 2"));
        assert!(t.contains("\nkubeproxy_sync_proxy_rules_nftables_sync_failures_total 1\n"));
        assert!(t.contains("\nkubeproxy_sync_proxy_rules_nftables_cleanup_failures_total 0\n"));
        assert!(t.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 0"));
        assert!(t.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 1"));
        assert!(t.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"300\"} 1"));
        assert!(t.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1"));
        assert!(t.contains("kubeproxy_proxy_livez_total{code=\"503\"} 1"));
        let stamp = |name: &str| -> f64 {
            t.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {t}"))
        };
        assert!(stamp("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.0e9);
        assert!(stamp("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1.0e9);
    }
}
