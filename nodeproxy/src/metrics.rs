//! Prometheus text metrics and the health state shared with the admin HTTP server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; SECONDS_BUCKETS.len()];
        }
        for (i, b) in SECONDS_BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in SECONDS_BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    full_sync: Histogram,
    partial_sync: Histogram,
    programming_latency: Histogram,
    failures: BTreeMap<&'static str, u64>,
    elements: usize,
    lb_chains: usize,
    services: usize,
    last_ok: Option<Instant>,
    l2_held: usize,
    l2_transitions: BTreeMap<&'static str, u64>,
    garps: u64,
}

/// Metrics and health, updated by the sync loop, read by `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A sync committed (or had nothing to do).
    pub fn sync_ok(
        &self,
        full: Option<bool>,
        took: Duration,
        elements: usize,
        lb_chains: usize,
        services: usize,
    ) {
        self.with(|m| {
            match full {
                Some(true) => m.full_sync.observe(took.as_secs_f64()),
                Some(false) => m.partial_sync.observe(took.as_secs_f64()),
                None => {}
            }
            m.elements = elements;
            m.lb_chains = lb_chains;
            m.services = services;
            m.last_ok = Some(Instant::now());
        });
    }

    pub fn sync_failed(&self, reason: &'static str) {
        self.with(|m| *m.failures.entry(reason).or_default() += 1);
    }

    /// Time from an EndpointSlice change arriving to its rules being programmed.
    pub fn programming_latency(&self, d: Duration) {
        self.with(|m| m.programming_latency.observe(d.as_secs_f64()));
    }

    /// Pool addresses this node announces now.
    pub fn l2_held(&self, n: usize) {
        self.with(|m| m.l2_held = n);
    }

    /// A Lease of a pool address changed hands on this node: `acquired`, `released`, `lost`.
    pub fn l2_transition(&self, event: &'static str) {
        self.with(|m| *m.l2_transitions.entry(event).or_default() += 1);
    }

    pub fn garp_sent(&self) {
        self.with(|m| m.garps += 1);
    }

    /// Healthy when a sync succeeded within `max_age`.
    pub fn healthy(&self, max_age: Duration) -> (bool, Option<Duration>) {
        self.with(|m| {
            let age = m.last_ok.map(|t| t.elapsed());
            (age.is_some_and(|a| a <= max_age), age)
        })
    }

    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            m.full_sync.render(
                &mut out,
                "berth_nodeproxy_full_sync_duration_seconds",
                "Duration of full syncs (build, render, nft commit).",
            );
            m.partial_sync.render(
                &mut out,
                "berth_nodeproxy_partial_sync_duration_seconds",
                "Duration of incremental syncs.",
            );
            m.programming_latency.render(
                &mut out,
                "berth_nodeproxy_endpointslice_programming_latency_seconds",
                "Time from an EndpointSlice change reaching the agent to its rules being programmed.",
            );
            let _ = writeln!(
                out,
                "# HELP berth_nodeproxy_sync_failures_total Failed syncs by reason.\n# TYPE berth_nodeproxy_sync_failures_total counter"
            );
            if m.failures.is_empty() {
                let _ = writeln!(out, "berth_nodeproxy_sync_failures_total{{reason=\"nft\"}} 0");
            }
            for (r, n) in &m.failures {
                let _ = writeln!(out, "berth_nodeproxy_sync_failures_total{{reason=\"{r}\"}} {n}");
            }
            for (name, help, v) in [
                ("berth_nodeproxy_elements_programmed", "Map and set elements programmed.", m.elements),
                ("berth_nodeproxy_lb_chains_programmed", "Shared ep-N chains programmed.", m.lb_chains),
                ("berth_nodeproxy_services", "Proxied Services known.", m.services),
                ("berth_nodeproxy_l2_addresses_held", "Pool addresses this node announces.", m.l2_held),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
            let _ = writeln!(
                out,
                "# HELP berth_nodeproxy_l2_lease_transitions_total Pool address Leases acquired, released or lost by this node.\n# TYPE berth_nodeproxy_l2_lease_transitions_total counter"
            );
            for event in ["acquired", "released", "lost"] {
                let n = m.l2_transitions.get(event).copied().unwrap_or(0);
                let _ = writeln!(out, "berth_nodeproxy_l2_lease_transitions_total{{event=\"{event}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP berth_nodeproxy_l2_gratuitous_arps_sent_total Gratuitous ARPs sent for pool addresses.\n# TYPE berth_nodeproxy_l2_gratuitous_arps_sent_total counter\nberth_nodeproxy_l2_gratuitous_arps_sent_total {}",
                m.garps
            );
            out
        })
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
        assert!(t.contains("berth_nodeproxy_elements_programmed 8"));
        assert!(t.contains("berth_nodeproxy_endpointslice_programming_latency_seconds_count 1"));
    }

    #[test]
    fn l2_metrics_render() {
        let m = Metrics::default();
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_l2_addresses_held 0"));
        assert!(t.contains("berth_nodeproxy_l2_lease_transitions_total{event=\"lost\"} 0"));
        m.l2_held(2);
        m.l2_transition("acquired");
        m.l2_transition("acquired");
        m.garp_sent();
        let t = m.render();
        assert!(t.contains("berth_nodeproxy_l2_addresses_held 2"));
        assert!(t.contains("berth_nodeproxy_l2_lease_transitions_total{event=\"acquired\"} 2"));
        assert!(t.contains("berth_nodeproxy_l2_gratuitous_arps_sent_total 1"));
    }

    #[test]
    fn health_needs_a_recent_sync() {
        let m = Metrics::default();
        assert!(!m.healthy(Duration::from_secs(60)).0);
        m.sync_ok(None, Duration::ZERO, 0, 0, 0);
        assert!(m.healthy(Duration::from_secs(60)).0);
        assert!(
            !m.healthy(Duration::ZERO).0 || m.healthy(Duration::ZERO).1 == Some(Duration::ZERO)
        );
    }
}
