//! Prometheus metrics, rendered in the text exposition format by the admin server.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A histogram with fixed buckets (seconds).
pub struct Histogram {
    buckets: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            inner: Mutex::new((vec![0; buckets.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            for (i, b) in self.buckets.iter().enumerate() {
                if v <= *b {
                    g.0[i] += 1;
                }
            }
            g.1 += v;
            g.2 += 1;
        }
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let Ok(g) = self.inner.lock() else { return };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.buckets.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", g.0[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}", g.1);
        let _ = writeln!(out, "{name}_count {}", g.2);
    }
}

const SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct Metrics {
    reconciles: Mutex<BTreeMap<(String, String), u64>>,
    aws_calls: Mutex<BTreeMap<(String, String), u64>>,
    /// Kubernetes writes made, by what they wrote.
    kube_writes: Mutex<BTreeMap<String, u64>>,
    /// Writes the leader fence refused, by target (`kubernetes`, `aws`).
    fenced_writes: Mutex<BTreeMap<String, u64>>,
    /// Pool class → (allocated, available) addresses.
    pool_addresses: Mutex<BTreeMap<String, (u64, u64)>>,
    pub reconcile_seconds: Histogram,
    pub aws_call_seconds: Histogram,
    pub ready_seconds: Histogram,
    pub gc_deleted: AtomicU64,
    pub leader: AtomicBool,
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Mutex::default(),
            aws_calls: Mutex::default(),
            kube_writes: Mutex::default(),
            fenced_writes: Mutex::default(),
            pool_addresses: Mutex::default(),
            reconcile_seconds: Histogram::new(SECONDS),
            aws_call_seconds: Histogram::new(SECONDS),
            ready_seconds: Histogram::new(SECONDS),
            gc_deleted: AtomicU64::new(0),
            leader: AtomicBool::new(false),
            ready: AtomicBool::new(false),
        }
    }
}

/// Operations that change something in AWS (everything but Describe*).
pub fn is_mutating(operation: &str) -> bool {
    !operation.starts_with("Describe")
}

impl Metrics {
    pub fn reconcile(&self, outcome: &str, reason: &str) {
        if let Ok(mut m) = self.reconciles.lock() {
            *m.entry((outcome.to_string(), reason.to_string()))
                .or_default() += 1;
        }
    }

    pub fn aws_call(&self, operation: &str, outcome: &str) {
        if let Ok(mut m) = self.aws_calls.lock() {
            *m.entry((operation.to_string(), outcome.to_string()))
                .or_default() += 1;
        }
    }

    pub fn kube_write(&self, what: &str) {
        if let Ok(mut m) = self.kube_writes.lock() {
            *m.entry(what.to_string()).or_default() += 1;
        }
    }

    pub fn fenced_write(&self, target: &str) {
        if let Ok(mut m) = self.fenced_writes.lock() {
            *m.entry(target.to_string()).or_default() += 1;
        }
    }

    /// Kubernetes writes made, and writes the fence refused, so far.
    pub fn write_totals(&self) -> (u64, u64) {
        let sum =
            |m: &Mutex<BTreeMap<String, u64>>| m.lock().map(|m| m.values().sum()).unwrap_or(0);
        (sum(&self.kube_writes), sum(&self.fenced_writes))
    }

    /// Replaces the pool gauges (classes gone since the last call disappear).
    pub fn set_pool_addresses(&self, by_class: BTreeMap<String, (u64, u64)>) {
        if let Ok(mut m) = self.pool_addresses.lock() {
            *m = by_class;
        }
    }

    /// Total AWS calls so far, and how many of them were mutating.
    pub fn aws_totals(&self) -> (u64, u64) {
        let Ok(m) = self.aws_calls.lock() else {
            return (0, 0);
        };
        let total = m.values().sum();
        let mutating = m
            .iter()
            .filter(|((op, _), _)| is_mutating(op))
            .map(|(_, n)| n)
            .sum();
        (total, mutating)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP berth_reconciles_total Service reconciles by outcome and reason.\n# TYPE berth_reconciles_total counter"
        );
        if let Ok(m) = self.reconciles.lock() {
            for ((outcome, reason), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "berth_reconciles_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP berth_aws_calls_total AWS API calls by operation, outcome and whether they change anything.\n# TYPE berth_aws_calls_total counter"
        );
        if let Ok(m) = self.aws_calls.lock() {
            for ((op, outcome), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "berth_aws_calls_total{{operation=\"{op}\",outcome=\"{outcome}\",mutating=\"{}\"}} {n}",
                    is_mutating(op)
                );
            }
        }
        for (name, help, label, map) in [
            (
                "berth_kube_writes_total",
                "Kubernetes writes made, by what they wrote.",
                "write",
                &self.kube_writes,
            ),
            (
                "berth_fenced_writes_total",
                "Writes refused because this replica was not (or no longer known to be) leading.",
                "target",
                &self.fenced_writes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            if let Ok(m) = map.lock() {
                for (value, n) in m.iter() {
                    let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
                }
            }
        }
        self.reconcile_seconds.render(
            "berth_reconcile_duration_seconds",
            "Time per Service reconcile.",
            &mut out,
        );
        self.aws_call_seconds.render(
            "berth_aws_call_duration_seconds",
            "Time per AWS call attempt.",
            &mut out,
        );
        self.ready_seconds.render(
            "berth_service_ready_seconds",
            "Time from Service creation to its load balancer being ready.",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# TYPE berth_gc_deleted_total counter\nberth_gc_deleted_total {}",
            self.gc_deleted.load(Ordering::Relaxed)
        );
        if let Ok(m) = self.pool_addresses.lock() {
            for (name, help, pick) in [
                (
                    "berth_pool_addresses_allocated",
                    "Pool addresses held by Services, per class.",
                    0,
                ),
                (
                    "berth_pool_addresses_available",
                    "Pool addresses still free, per class.",
                    1,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for (class, (allocated, available)) in m.iter() {
                    let v = if pick == 0 { allocated } else { available };
                    let _ = writeln!(out, "{name}{{class=\"{class}\"}} {v}");
                }
            }
        }
        let _ = writeln!(
            out,
            "# TYPE berth_leader gauge\nberth_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        out
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
        assert_eq!(m.aws_totals(), (3, 2));
        let text = m.render();
        assert!(text.contains(
            r#"berth_aws_calls_total{operation="CreateListener",outcome="error",mutating="true"} 1"#
        ));
        assert!(text.contains(r#"berth_service_ready_seconds_bucket{le="0.5"} 1"#));
        assert!(text.contains(r#"berth_service_ready_seconds_bucket{le="0.25"} 0"#));
        assert!(
            text.contains("berth_reconciles_total{outcome=\"success\",reason=\"Provisioned\"} 1")
        );
        m.set_pool_addresses(BTreeMap::from([("lab".to_string(), (3, 251))]));
        let text = m.render();
        assert!(text.contains("berth_pool_addresses_allocated{class=\"lab\"} 3"));
        assert!(text.contains("berth_pool_addresses_available{class=\"lab\"} 251"));
    }
}
