//! Running `berth-controller` against the local environment, and looking at what it made
//! in LocalStack.
//!
//! Each test case starts its own controller process(es) restricted to its own
//! LoadBalancerClass (`--class`), so cases run in parallel without touching each other's
//! Services. All controllers share the cluster name of the environment (subnet discovery
//! and the `berth.dev/cluster` tag); the orphan sweep only deletes resources whose Service
//! no longer exists, which is safe across them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use serde::Deserialize;

use crate::env::EnvInfo;
use crate::error::{Error, Result};
use crate::net::HOST_IP;
use crate::paths;
use crate::proc::{Supervised, free_port};
use crate::testing::TestEnv;

/// The recent log of every replica, one section each (for failure messages).
pub fn logs_of(controllers: &[ControllerProc]) -> String {
    controllers
        .iter()
        .map(|c| format!("--- controller {} ---\n{}", c.name, c.log_tail()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One controller replica.
pub struct ControllerProc {
    pub name: String,
    pub admin: String,
    pub log: PathBuf,
    process: Option<Supervised>,
}

/// How to start a replica.
#[derive(Clone, Debug)]
pub struct ControllerOpts {
    pub classes: Vec<String>,
    /// Lease namespace and name (replicas sharing them elect one leader).
    pub lease_namespace: String,
    pub lease_name: String,
    pub resync: &'static str,
    pub gc_interval: &'static str,
    pub lease_duration: &'static str,
    /// More flags (`--aws-qps`, `--concurrency`, ...).
    pub extra_args: Vec<String>,
    /// Give the replica LocalStack's endpoint and test credentials; without, it has no AWS
    /// configuration at all (a bare-metal install).
    pub aws: bool,
}

impl ControllerOpts {
    pub fn new(class: &str, lease_namespace: &str) -> Self {
        Self {
            classes: vec![class.to_string()],
            lease_namespace: lease_namespace.to_string(),
            lease_name: format!("berth-controller-{class}"),
            resync: "10s",
            gc_interval: "5s",
            lease_duration: "4s",
            extra_args: Vec::new(),
            aws: true,
        }
    }
}

impl ControllerProc {
    pub fn spawn(info: &EnvInfo, name: &str, opts: &ControllerOpts) -> Result<Self> {
        let port = free_port("127.0.0.1")?;
        let admin = format!("127.0.0.1:{port}");
        let log = info.log_dir.join(format!("controller-{name}.log"));
        let mut cmd = Command::new(paths::sibling_bin("berth-controller"));
        cmd.args(["--cluster-name", &info.cluster_name])
            .args(["--admin-bind", &admin])
            .arg("--leader-elect")
            .args(["--lease-namespace", &opts.lease_namespace])
            .args(["--lease-name", &opts.lease_name])
            .args(["--identity", name])
            .args(["--lease-duration", opts.lease_duration])
            .args(["--resync", opts.resync])
            .args(["--gc-interval", opts.gc_interval])
            .args(["--node-port-range", &info.node_port_range])
            .args(["--class", &opts.classes.join(",")])
            .args(&opts.extra_args)
            .env("KUBECONFIG", &info.kubeconfig)
            .env_remove("AWS_PROFILE")
            .env(
                "RUST_LOG",
                "info,berth_controller=debug,kube=warn,aws_config=warn,aws_smithy_runtime=warn",
            );
        if opts.aws {
            cmd.args(["--region", &info.region])
                .args(["--aws-endpoint", &info.localstack_endpoint])
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_REGION", &info.region);
        } else {
            for var in [
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "AWS_REGION",
                "AWS_DEFAULT_REGION",
                "AWS_ENDPOINT_URL",
                "AWS_CONFIG_FILE",
                "AWS_SHARED_CREDENTIALS_FILE",
            ] {
                cmd.env_remove(var);
            }
        }
        let process = Supervised::spawn(&format!("controller-{name}"), cmd, &log)?;
        Ok(Self {
            name: name.to_string(),
            admin,
            log,
            process: Some(process),
        })
    }

    /// SIGKILL: no lease release, no cleanup (a crash).
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            // SAFETY: kill(2) of our own child's process group.
            unsafe { libc::kill(-(p.pid() as i32), libc::SIGKILL) };
            drop(p);
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the replica's process group.
    pub fn signal(&self, signal: i32) {
        if let Some(p) = self.process.as_ref() {
            // SAFETY: kill(2) of our own child's process group.
            unsafe { libc::kill(-(p.pid() as i32), signal) };
        }
    }

    pub fn exited(&mut self) -> Option<String> {
        self.process.as_mut().and_then(Supervised::exited)
    }

    /// The admin server's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.admin);
        let resp = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| Error::Setup(format!("GET {url}: {e}")))?;
        resp.text()
            .await
            .map_err(|e| Error::Setup(format!("GET {url}: {e}")))
    }

    pub async fn is_leader(&self) -> bool {
        self.metrics()
            .await
            .is_ok_and(|m| m.lines().any(|l| l == "berth_leader 1"))
    }

    /// The last lines of the replica's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Sum of a counter's samples whose labels contain every `filters` pair.
pub fn metric_sum(text: &str, name: &str, filters: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            filters
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Installs berth's CRDs (idempotent) and waits until they are served.
pub fn install_crds(env: &TestEnv) {
    let dir = paths::repo_root().join("charts/berth/crds");
    env.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &dir.display().to_string(),
    ]);
    env.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/loadbalancerclasses.berth.dev",
    ]);
}

/// A LoadBalancerClass for one test case, deleted on drop.
pub struct ClassGuard {
    pub name: String,
    kubeconfig: String,
}

impl ClassGuard {
    /// `aws` is the class's `aws` block.
    pub fn create(env: &TestEnv, name: &str, aws: serde_json::Value) -> Self {
        Self::with_spec(env, name, serde_json::json!({"aws": aws}))
    }

    /// A class with the whole `spec` given (e.g. a `pool` block).
    pub fn with_spec(env: &TestEnv, name: &str, spec: serde_json::Value) -> Self {
        let guard = Self {
            name: name.to_string(),
            kubeconfig: env.info.kubeconfig.display().to_string(),
        };
        guard.set_spec(env, spec);
        guard
    }

    /// Replaces the class's spec.
    pub fn set_spec(&self, env: &TestEnv, spec: serde_json::Value) {
        let name = &self.name;
        let obj = serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": name},
            "spec": spec
        });
        let path = std::env::temp_dir().join(format!("berth-e2e-class-{name}.json"));
        std::fs::write(&path, obj.to_string())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        env.kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
    }

    pub fn lb_class(&self) -> String {
        format!("berth.dev/{}", self.name)
    }
}

impl Drop for ClassGuard {
    fn drop(&mut self) {
        let _ = Command::new(paths::bin("kubectl"))
            .args([
                "--kubeconfig",
                &self.kubeconfig,
                "delete",
                "loadbalancerclass",
                &self.name,
            ])
            .arg("--wait=false")
            .output();
    }
}

/// A listener as the LocalStack extension serves it (`GET /_berth/elbv2/listeners`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServedListener {
    pub load_balancer_arn: String,
    #[serde(default)]
    pub dns_name: String,
    pub listener_arn: String,
    pub port: i32,
    pub protocol: String,
    pub address: String,
}

pub async fn served_listeners(info: &EnvInfo) -> Result<Vec<ServedListener>> {
    let url = format!("{}/_berth/elbv2/listeners", info.localstack_endpoint);
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| Error::Setup(format!("GET {url}: {e}")))?;
    resp.json()
        .await
        .map_err(|e| Error::Setup(format!("GET {url}: {e}")))
}

/// The address (`host:port`) serving listener `port` of load balancer `lb_arn`.
pub async fn listener_address(info: &EnvInfo, lb_arn: &str, port: i32) -> Option<String> {
    served_listeners(info)
        .await
        .ok()?
        .into_iter()
        .find(|l| l.load_balancer_arn == lb_arn && l.port == port)
        .map(|l| l.address)
}

/// What LocalStack holds for one Service, found by its UID tag.
#[derive(Clone, Debug, Default)]
pub struct AwsView {
    /// (arn, name, dns name, scheme)
    pub load_balancers: Vec<(String, String, String, String)>,
    /// arn → name
    pub target_groups: BTreeMap<String, String>,
}

pub async fn tags_of(
    client: &elb::Client,
    arns: &[String],
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for chunk in arns.chunks(20) {
        // Resources may vanish between listing and tagging: ask one by one then.
        let res = client
            .describe_tags()
            .set_resource_arns(Some(chunk.to_vec()))
            .send()
            .await;
        let descs = match res {
            Ok(r) => r.tag_descriptions().to_vec(),
            Err(_) => {
                let mut v = Vec::new();
                for arn in chunk {
                    if let Ok(r) = client.describe_tags().resource_arns(arn).send().await {
                        v.extend(r.tag_descriptions().iter().cloned());
                    }
                }
                v
            }
        };
        for d in descs {
            let tags = d
                .tags()
                .iter()
                .filter_map(|t| {
                    Some((
                        t.key()?.to_string(),
                        t.value().unwrap_or_default().to_string(),
                    ))
                })
                .collect();
            if let Some(arn) = d.resource_arn() {
                out.insert(arn.to_string(), tags);
            }
        }
    }
    out
}

/// Every load balancer and target group tagged with `berth.dev/service-uid = uid`.
pub async fn aws_view(client: &elb::Client, uid: &str) -> Result<AwsView> {
    let lbs = client
        .describe_load_balancers()
        .send()
        .await
        .map_err(Error::aws("DescribeLoadBalancers"))?;
    let tgs = client
        .describe_target_groups()
        .send()
        .await
        .map_err(Error::aws("DescribeTargetGroups"))?;
    let mut arns: Vec<String> = lbs
        .load_balancers()
        .iter()
        .filter_map(|l| l.load_balancer_arn().map(str::to_string))
        .collect();
    arns.extend(
        tgs.target_groups()
            .iter()
            .filter_map(|t| t.target_group_arn().map(str::to_string)),
    );
    let tags = tags_of(client, &arns).await;
    let is_ours = |arn: &str| {
        tags.get(arn)
            .and_then(|t| t.get("berth.dev/service-uid"))
            .is_some_and(|u| u == uid)
    };
    let mut view = AwsView::default();
    for l in lbs.load_balancers() {
        let arn = l.load_balancer_arn().unwrap_or_default();
        if is_ours(arn) {
            view.load_balancers.push((
                arn.to_string(),
                l.load_balancer_name().unwrap_or_default().to_string(),
                l.dns_name().unwrap_or_default().to_string(),
                l.scheme()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            ));
        }
    }
    for t in tgs.target_groups() {
        let arn = t.target_group_arn().unwrap_or_default();
        if is_ours(arn) {
            view.target_groups.insert(
                arn.to_string(),
                t.target_group_name().unwrap_or_default().to_string(),
            );
        }
    }
    Ok(view)
}

/// Registered targets of a target group as (id, port, state).
pub async fn targets(
    client: &elb::Client,
    tg_arn: &str,
) -> Result<BTreeSet<(String, i32, String)>> {
    let out = client
        .describe_target_health()
        .target_group_arn(tg_arn)
        .send()
        .await
        .map_err(Error::aws("DescribeTargetHealth"))?;
    Ok(out
        .target_health_descriptions()
        .iter()
        .filter_map(|d| {
            let t = d.target()?;
            Some((
                t.id()?.to_string(),
                t.port().unwrap_or_default(),
                d.target_health()
                    .and_then(|h| h.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            ))
        })
        .collect())
}

/// The host address LocalStack's listeners are served on.
pub fn listener_host() -> String {
    HOST_IP.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_filter_by_labels() {
        let text = "# TYPE berth_aws_calls_total counter\n\
            berth_aws_calls_total{operation=\"DescribeTags\",outcome=\"success\",mutating=\"false\"} 4\n\
            berth_aws_calls_total{operation=\"CreateListener\",outcome=\"success\",mutating=\"true\"} 2\n\
            berth_aws_calls_total{operation=\"CreateListener\",outcome=\"error\",mutating=\"true\"} 1\n\
            berth_leader 1\n";
        assert_eq!(metric_sum(text, "berth_aws_calls_total", &[]), 7.0);
        assert_eq!(
            metric_sum(text, "berth_aws_calls_total", &[("mutating", "true")]),
            3.0
        );
        assert_eq!(
            metric_sum(text, "berth_aws_calls_total", &[("outcome", "error")]),
            1.0
        );
        assert_eq!(metric_sum(text, "berth_reconciles_total", &[]), 0.0);
    }
}
