//! Command-line flags (each also read from an environment variable).

use std::time::Duration;

#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "berth-controller",
    about = "Provisions AWS NLBs for LoadBalancer Services"
)]
pub struct Config {
    /// Cluster name: tags every AWS resource (`berth.dev/cluster`) and selects subnets by
    /// `kubernetes.io/cluster/<name>`.
    #[arg(long, env = "BERTH_CLUSTER_NAME", default_value = "kubernetes")]
    pub cluster_name: String,
    /// Only these LoadBalancerClass names (repeatable; default: every class).
    #[arg(long = "class", env = "BERTH_CLASSES", value_delimiter = ',')]
    pub classes: Vec<String>,
    /// AWS region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// AWS endpoint (LocalStack, VPC endpoints); default: the SDK's.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint: Option<String>,
    /// VPC of target groups when neither the class nor the subnets say.
    #[arg(long, env = "BERTH_VPC_ID")]
    pub vpc_id: Option<String>,
    /// AWS calls per second (token bucket) and burst.
    #[arg(long, default_value_t = 20.0)]
    pub aws_qps: f64,
    #[arg(long, default_value_t = 40)]
    pub aws_burst: u32,
    /// Also wait for each API's own bucket, sized as AWS's published per-API limits, so
    /// calls are spaced instead of throttled (`--aws-api-limits=false`: the process-wide
    /// bucket only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub aws_api_limits: bool,
    /// NodePort range of the apiserver (`--service-node-port-range`).
    #[arg(long, default_value = "30000-32767")]
    pub node_port_range: String,
    /// Re-check every owned Service this often even without changes.
    #[arg(long, value_parser = humantime, default_value = "5m")]
    pub resync: Duration,
    /// Orphan sweep interval.
    #[arg(long, value_parser = humantime, default_value = "5m")]
    pub gc_interval: Duration,
    /// Services reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
    /// Admin HTTP address (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        long = "admin-bind",
        alias = "admin-addr",
        env = "BERTH_ADMIN_BIND",
        default_value = "0.0.0.0:8080"
    )]
    pub admin_addr: String,
    /// Elect a leader on a Lease (run 2 replicas); without it this replica always leads.
    #[arg(long)]
    pub leader_elect: bool,
    /// Leader election: Lease namespace and name, this replica's identity.
    #[arg(long, env = "POD_NAMESPACE", default_value = "berth-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "berth-controller")]
    pub lease_name: String,
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, value_parser = humantime, default_value = "15s")]
    pub lease_duration: Duration,
    /// ServiceAccount (in the Lease namespace) that owns the leader Lease, so the Lease is
    /// garbage-collected with it; default: no owner.
    #[arg(long, env = "BERTH_LEASE_OWNER_SERVICE_ACCOUNT")]
    pub lease_owner_service_account: Option<String>,
    /// Namespace of the node agents' L2 announcement Leases, read to write who announces
    /// each pool Service (`berth.dev/Announced`); default: the leader Lease's namespace.
    #[arg(long, env = "BERTH_L2_LEASE_NAMESPACE")]
    pub l2_lease_namespace: Option<String>,
    /// Log as JSON.
    #[arg(long, env = "BERTH_LOG_JSON")]
    pub log_json: bool,
    /// This cluster's identity, tagged on every AWS resource (`berth.dev/cluster-id`):
    /// only resources carrying it are adopted or deleted. Default: the UID of the
    /// `kube-system` Namespace.
    #[arg(long, env = "BERTH_CLUSTER_ID")]
    pub cluster_id: Option<String>,
}

/// `250ms`, `10s`, `5m`, `1h`.
pub fn humantime(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("`{s}` needs a unit (ms, s, m, h)"))?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}`")),
    }
}

impl Config {
    pub fn handles_class(&self, name: &str) -> bool {
        self.classes.is_empty() || self.classes.iter().any(|c| c == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_parse() {
        assert_eq!(humantime("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(humantime("5m"), Ok(Duration::from_secs(300)));
        assert!(humantime("5").is_err());
        assert!(humantime("5d").is_err());
    }

    #[test]
    fn flags_parse_with_defaults() {
        let c = Config::try_parse_from(["berth-controller", "--class", "a,b", "--resync", "10s"])
            .expect("flags");
        assert!(c.handles_class("a") && c.handles_class("b") && !c.handles_class("c"));
        assert_eq!(c.resync, Duration::from_secs(10));
        let all = Config::try_parse_from(["berth-controller"]).expect("flags");
        assert!(all.handles_class("anything"));
    }
}
