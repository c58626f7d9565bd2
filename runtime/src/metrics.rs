//! Prometheus metrics through `prometheus-client`, exposed in the text format (0.0.4)
//! every scraper reads.
//!
//! Each binary keeps its metrics in a struct of `prometheus-client` handles (and plain
//! atomics for values other modules set directly) and implements [`Collect`], which
//! registers them, under their exposed names, in a registry built per scrape.
//! `prometheus-client` appends `_total` to counters itself, and a full stop to help texts:
//! both are registered without.

pub use prometheus_client;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Metrics that can be registered for one scrape.
pub trait Collect: Send + Sync + 'static {
    fn register(&self, registry: &mut Registry);
}

/// The text exposition of `metrics`.
pub fn encode(metrics: &dyn Collect) -> String {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        // Writing to a String cannot fail; a metric's own encoder could.
        tracing::warn!("cannot encode metrics: {e}");
    }
    out
}

/// A histogram with fixed bucket bounds (seconds).
pub fn histogram(buckets: &[f64]) -> Histogram {
    Histogram::new(buckets.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::{ConstCounter, Counter};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::ConstGauge;

    struct Sample {
        requests: Family<[(&'static str, &'static str); 1], Counter>,
        seconds: Histogram,
    }

    impl Collect for Sample {
        fn register(&self, r: &mut Registry) {
            r.register("demo_requests", "Requests", self.requests.clone());
            r.register("demo_seconds", "Durations", self.seconds.clone());
            r.register("demo_flag", "A flag", ConstGauge::new(1));
            r.register("demo_done", "Done", ConstCounter::new(3u64));
        }
    }

    #[test]
    fn names_stay_as_registered_plus_total_for_counters() {
        let s = Sample {
            requests: Family::default(),
            seconds: histogram(&[0.1, 1.0]),
        };
        s.requests.get_or_create(&[("code", "200")]).inc();
        s.seconds.observe(0.5);
        let text = encode(&s);
        assert!(
            text.contains("demo_requests_total{code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("demo_seconds_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(
            text.contains("demo_seconds_bucket{le=\"0.1\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("demo_seconds_count 1\n"), "{text}");
        assert!(
            text.contains("# HELP demo_requests_total Requests.\n"),
            "{text}"
        );
        assert!(text.contains("\ndemo_flag 1\n"), "{text}");
        assert!(text.contains("\ndemo_done_total 3\n"), "{text}");
        assert!(
            !text.contains("# EOF"),
            "Prometheus text, not OpenMetrics: {text}"
        );
    }
}
