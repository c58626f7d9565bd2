//! AWS's per-API request rates as client-side token buckets: a call waits for a token of
//! its API's bucket instead of being refused by AWS and retried after a backoff, which at
//! hundreds of Services would cost more time than the limits themselves. The rates are
//! those of the LocalStack extension's table (`localstack/.../ratelimit.py`, which cites
//! AWS's pages); a test keeps the two equal.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::provider::aws::client::RateLimiter;

/// One row of the table: the operations it covers (`*` ends a prefix), its bucket size and
/// refill rate per second, and whether its operations share one bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub service: &'static str,
    pub operations: &'static str,
    pub burst: f64,
    pub per_second: f64,
    pub shared: bool,
}

const fn rate(
    service: &'static str,
    operations: &'static str,
    burst: f64,
    per_second: f64,
    shared: bool,
) -> Rate {
    Rate {
        service,
        operations,
        burst,
        per_second,
        shared,
    }
}

/// The first matching row counts (as in the extension).
pub const RATES: [Rate; 6] = [
    rate("elbv2", "Describe*", 40.0, 10.0, true),
    rate(
        "elbv2",
        "RegisterTargets DeregisterTargets",
        20.0,
        4.0,
        true,
    ),
    rate("elbv2", "Modify*", 20.0, 3.0, true),
    rate("elbv2", "*", 20.0, 3.0, false),
    rate("ec2", "Describe*", 100.0, 20.0, false),
    rate("ec2", "*", 50.0, 5.0, false),
];

/// The EC2 operations berth calls; every other one is ELBv2's. A unit test in `client`
/// checks every call the EC2 client makes is listed (the security-group calls once drew
/// from ELBv2's buckets, 3 a second instead of 5).
pub const EC2_OPERATIONS: [&str; 8] = [
    "AuthorizeSecurityGroupIngress",
    "CreateSecurityGroup",
    "DeleteSecurityGroup",
    "DescribeInstances",
    "DescribeSecurityGroups",
    "DescribeSubnets",
    "DescribeVpcs",
    "RevokeSecurityGroupIngress",
];

pub fn service_of(operation: &str) -> &'static str {
    if EC2_OPERATIONS.contains(&operation) {
        "ec2"
    } else {
        "elbv2"
    }
}

fn matches(pattern: &str, operation: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => operation.starts_with(prefix),
        None => pattern == operation,
    }
}

/// The row of `operation` and the name of its bucket. Pure.
pub fn bucket_of(operation: &str) -> Option<(Rate, String)> {
    let service = service_of(operation);
    let row = RATES
        .iter()
        .find(|r| r.service == service && r.operations.split(' ').any(|p| matches(p, operation)))?;
    let name = if row.shared {
        row.operations
    } else {
        operation
    };
    Some((*row, format!("{service}:{name}")))
}

/// A bucket per API (or per shared row), created on first use.
#[derive(Default)]
pub struct ApiLimits {
    buckets: Mutex<HashMap<String, std::sync::Arc<RateLimiter>>>,
}

impl ApiLimits {
    /// Waits for a token of `operation`'s bucket.
    pub async fn acquire(&self, operation: &str) {
        let Some((row, name)) = bucket_of(operation) else {
            return;
        };
        let bucket = match self.buckets.lock() {
            Ok(mut buckets) => buckets
                .entry(name)
                .or_insert_with(|| {
                    std::sync::Arc::new(RateLimiter::new(row.per_second, row.burst as u32))
                })
                .clone(),
            Err(_) => return,
        };
        bucket.acquire().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_find_their_buckets() {
        let (row, name) = bucket_of("DescribeTags").expect("row");
        assert_eq!((row.burst, name.as_str()), (40.0, "elbv2:Describe*"));
        assert_eq!(
            bucket_of("DeregisterTargets").map(|b| b.1),
            Some("elbv2:RegisterTargets DeregisterTargets".into())
        );
        assert_eq!(
            bucket_of("CreateLoadBalancer").map(|b| b.1),
            Some("elbv2:CreateLoadBalancer".into())
        );
        assert_eq!(
            bucket_of("DescribeSubnets").map(|b| (b.0.per_second, b.1)),
            Some((20.0, "ec2:DescribeSubnets".into()))
        );
    }

    /// The rows of the extension's table, as `Rate("svc", "ops", burst, rate, Shared,`.
    fn extension_rates() -> Vec<Rate> {
        let source = include_str!(
            "../../../../localstack/berth_localstack_ext/berth_localstack_ext/ratelimit.py"
        );
        let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
        source
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Rate(\""))
            .map(|l| {
                let fields: Vec<&str> = l.splitn(6, ',').map(str::trim).collect();
                let text = |i: usize| fields[i].trim_matches('"');
                rate(
                    leak(text(0)),
                    leak(text(1)),
                    text(2).parse().expect("burst"),
                    text(3).parse().expect("rate"),
                    text(4) == "True",
                )
            })
            .collect()
    }

    #[test]
    fn the_table_is_the_localstack_extensions() {
        assert_eq!(extension_rates(), RATES.to_vec());
    }

    #[tokio::test]
    async fn calls_of_one_api_wait_for_its_refill_and_others_do_not() {
        let limits = ApiLimits::default();
        let start = std::time::Instant::now();
        for _ in 0..20 {
            limits.acquire("CreateListener").await;
        }
        // Another API's bucket is full.
        limits.acquire("CreateTargetGroup").await;
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
        limits.acquire("CreateListener").await;
        assert!(start.elapsed() >= std::time::Duration::from_millis(250));
    }
}
