//! The controller's Prometheus metrics (through `berth_runtime::metrics`), and the admin
//! routes that expose them with health and readiness.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use berth_runtime::admin::Reply;
use berth_runtime::metrics::prometheus_client::metrics::counter::{ConstCounter, Counter};
use berth_runtime::metrics::prometheus_client::metrics::family::Family;
use berth_runtime::metrics::prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use berth_runtime::metrics::prometheus_client::metrics::histogram::Histogram;
use berth_runtime::metrics::prometheus_client::registry::Registry;
use berth_runtime::metrics::{self, Collect};

const SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

type Labels<const N: usize> = [(&'static str, String); N];

pub struct Metrics {
    reconciles: Family<Labels<2>, Counter>,
    aws_calls: Family<Labels<3>, Counter>,
    /// All AWS calls, and the mutating ones (for [`Metrics::aws_totals`]).
    aws_total: AtomicU64,
    aws_mutating: AtomicU64,
    pool_allocated: Family<Labels<1>, Gauge>,
    pool_available: Family<Labels<1>, Gauge>,
    /// Kubernetes writes made, by what they wrote.
    kube_writes: Family<Labels<1>, Counter>,
    /// Writes the leader fence refused, by target (`kubernetes`, `aws`).
    fenced_writes: Family<Labels<1>, Counter>,
    kube_writes_total: AtomicU64,
    fenced_writes_total: AtomicU64,
    pub reconcile_seconds: Histogram,
    pub aws_call_seconds: Histogram,
    pub ready_seconds: Histogram,
    pub gc_deleted: AtomicU64,
    pub leader: AtomicBool,
    pub ready: AtomicBool,
    /// Since when each owned Service has not been ready (Unix seconds), for alerts.
    not_ready_since: Family<Labels<3>, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            aws_calls: Family::default(),
            aws_total: AtomicU64::new(0),
            aws_mutating: AtomicU64::new(0),
            pool_allocated: Family::default(),
            pool_available: Family::default(),
            kube_writes: Family::default(),
            fenced_writes: Family::default(),
            kube_writes_total: AtomicU64::new(0),
            fenced_writes_total: AtomicU64::new(0),
            reconcile_seconds: metrics::histogram(SECONDS),
            aws_call_seconds: metrics::histogram(SECONDS),
            ready_seconds: metrics::histogram(SECONDS),
            gc_deleted: AtomicU64::new(0),
            leader: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            not_ready_since: Family::default(),
        }
    }
}

/// Operations that change something in AWS (everything but Describe*).
pub fn is_mutating(operation: &str) -> bool {
    !operation.starts_with("Describe")
}

impl Metrics {
    pub fn reconcile(&self, outcome: &str, reason: &str) {
        self.reconciles
            .get_or_create(&[("outcome", outcome.into()), ("reason", reason.into())])
            .inc();
    }

    pub fn aws_call(&self, operation: &str, outcome: &str) {
        let mutating = is_mutating(operation);
        self.aws_calls
            .get_or_create(&[
                ("operation", operation.into()),
                ("outcome", outcome.into()),
                ("mutating", mutating.to_string()),
            ])
            .inc();
        self.aws_total.fetch_add(1, Ordering::Relaxed);
        if mutating {
            self.aws_mutating.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn kube_write(&self, what: &str) {
        self.kube_writes
            .get_or_create(&[("write", what.into())])
            .inc();
        self.kube_writes_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fenced_write(&self, target: &str) {
        self.fenced_writes
            .get_or_create(&[("target", target.into())])
            .inc();
        self.fenced_writes_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Kubernetes writes made, and writes the fence refused, so far.
    pub fn write_totals(&self) -> (u64, u64) {
        (
            self.kube_writes_total.load(Ordering::Relaxed),
            self.fenced_writes_total.load(Ordering::Relaxed),
        )
    }

    /// Replaces the pool gauges (classes gone since the last call disappear).
    pub fn set_pool_addresses(&self, by_class: BTreeMap<String, (u64, u64)>) {
        self.pool_allocated.clear();
        self.pool_available.clear();
        for (class, (allocated, available)) in by_class {
            let labels = [("class", class)];
            self.pool_allocated
                .get_or_create(&labels)
                .set(i64::try_from(allocated).unwrap_or(i64::MAX));
            self.pool_available
                .get_or_create(&labels)
                .set(i64::try_from(available).unwrap_or(i64::MAX));
        }
    }

    /// Total AWS calls so far, and how many of them were mutating.
    pub fn aws_totals(&self) -> (u64, u64) {
        (
            self.aws_total.load(Ordering::Relaxed),
            self.aws_mutating.load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        metrics::encode(self)
    }
}

impl Collect for Metrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "berth_reconciles",
            "Service reconciles by outcome and reason",
            self.reconciles.clone(),
        );
        r.register(
            "berth_aws_calls",
            "AWS API calls by operation, outcome and whether they change anything",
            self.aws_calls.clone(),
        );
        r.register(
            "berth_reconcile_duration_seconds",
            "Time per Service reconcile",
            self.reconcile_seconds.clone(),
        );
        r.register(
            "berth_aws_call_duration_seconds",
            "Time per AWS call attempt",
            self.aws_call_seconds.clone(),
        );
        r.register(
            "berth_service_ready_seconds",
            "Time from Service creation to its load balancer being ready",
            self.ready_seconds.clone(),
        );
        r.register(
            "berth_gc_deleted",
            "AWS resources deleted by the orphan sweep",
            ConstCounter::new(self.gc_deleted.load(Ordering::Relaxed)),
        );
        r.register(
            "berth_pool_addresses_allocated",
            "Pool addresses held by Services, per class",
            self.pool_allocated.clone(),
        );
        r.register(
            "berth_pool_addresses_available",
            "Pool addresses still free, per class",
            self.pool_available.clone(),
        );
        r.register(
            "berth_kube_writes",
            "Kubernetes writes made, by what they wrote",
            self.kube_writes.clone(),
        );
        r.register(
            "berth_fenced_writes",
            "Writes the leader fence refused, by target",
            self.fenced_writes.clone(),
        );
        r.register(
            "berth_leader",
            "1 while this replica leads",
            ConstGauge::new(i64::from(self.leader.load(Ordering::Relaxed))),
        );
        r.register(
            "berth_service_not_ready_since_timestamp_seconds",
            "Unix time since which a Service of a handled class has not been ready (the leader's view)",
            self.not_ready_since.clone(),
        );
    }
}

/// A Service of a handled class that is not ready, and since when.
#[derive(Clone, Debug, PartialEq)]
pub struct NotReady {
    pub namespace: String,
    pub name: String,
    pub class: String,
    /// Unix seconds.
    pub since: f64,
}

impl Metrics {
    /// Replaces the not-ready gauges (Services ready or gone since the last call disappear).
    /// The labels avoid `namespace` and `service`, which scrape configs set to the target's.
    pub fn set_not_ready(&self, services: Vec<NotReady>) {
        self.not_ready_since.clear();
        for s in services {
            self.not_ready_since
                .get_or_create(&[
                    ("service_namespace", s.namespace),
                    ("service_name", s.name),
                    ("class", s.class),
                ])
                .set(s.since);
        }
    }
}

/// The admin routes: `/healthz` (the process runs), `/readyz` (every watch delivered its
/// first list), `/metrics`.
pub fn admin_routes(metrics: Arc<Metrics>) -> impl Fn(&str) -> Reply + Send + Sync + 'static {
    move |path| match path {
        "/healthz" | "/livez" => Reply::text(200, "ok\n"),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => Reply::text(200, "ready\n"),
        "/readyz" => Reply::text(503, "waiting for the first list of every watch\n"),
        "/metrics" => Reply::metrics(metrics.render()),
        _ => Reply::not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.aws_call("DescribeTags", "success");
        m.aws_call("CreateListener", "success");
        m.aws_call("CreateListener", "error");
        m.reconcile("success", "Provisioned");
        m.ready_seconds.observe(0.3);
        m.gc_deleted.fetch_add(2, Ordering::Relaxed);
        assert_eq!(m.aws_totals(), (3, 2));
        let text = m.render();
        assert!(text.contains(
            r#"berth_aws_calls_total{operation="CreateListener",outcome="error",mutating="true"} 1"#
        ));
        assert!(text.contains(r#"berth_service_ready_seconds_bucket{le="0.5"} 1"#));
        assert!(text.contains(r#"berth_service_ready_seconds_bucket{le="0.25"} 0"#));
        assert!(text.contains("berth_service_ready_seconds_count 1\n"));
        assert!(
            text.contains("berth_reconciles_total{outcome=\"success\",reason=\"Provisioned\"} 1")
        );
        assert!(text.contains("\nberth_gc_deleted_total 2\n"), "{text}");
        assert!(text.contains("\nberth_reconcile_duration_seconds_count 0\n"));
        assert!(text.contains("\nberth_aws_call_duration_seconds_count 0\n"));
        m.set_pool_addresses(BTreeMap::from([("lab".to_string(), (3, 251))]));
        let text = m.render();
        assert!(text.contains("berth_pool_addresses_allocated{class=\"lab\"} 3"));
        assert!(text.contains("berth_pool_addresses_available{class=\"lab\"} 251"));
        m.set_pool_addresses(BTreeMap::from([("other".to_string(), (0, 1))]));
        let text = m.render();
        assert!(!text.contains("class=\"lab\""), "{text}");
        assert!(text.contains("berth_pool_addresses_available{class=\"other\"} 1"));
    }

    #[test]
    fn leader_gauge_is_a_plain_line() {
        let m = Metrics::default();
        assert!(m.render().lines().any(|l| l == "berth_leader 0"));
        m.leader.store(true, Ordering::Relaxed);
        assert!(m.render().lines().any(|l| l == "berth_leader 1"));
    }

    #[test]
    fn not_ready_gauges_are_replaced() {
        let m = Metrics::default();
        let svc = |name: &str, since| NotReady {
            namespace: "ns".into(),
            name: name.into(),
            class: "lab".into(),
            since,
        };
        m.set_not_ready(vec![svc("a", 1_700_000_000.5), svc("b", 1.0)]);
        let text = m.render();
        assert!(text.contains(
            "berth_service_not_ready_since_timestamp_seconds{service_namespace=\"ns\",service_name=\"a\",class=\"lab\"} 1700000000.5"
        ), "{text}");
        m.set_not_ready(vec![svc("b", 1.0)]);
        let text = m.render();
        assert!(!text.contains("service_name=\"a\""), "{text}");
        assert!(text.contains("service_name=\"b\""), "{text}");
    }

    #[test]
    fn routes() {
        let m = Arc::new(Metrics::default());
        let routes = admin_routes(m.clone());
        assert_eq!(routes("/healthz").status, 200);
        assert_eq!(routes("/readyz").status, 503);
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(routes("/readyz").status, 200);
        let metrics = routes("/metrics");
        assert_eq!(metrics.content_type, berth_runtime::metrics::CONTENT_TYPE);
        assert!(metrics.body.contains("berth_leader 0"));
        assert_eq!(routes("/nope").status, 404);
    }
}
