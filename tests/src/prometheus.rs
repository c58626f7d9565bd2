//! A real Prometheus (Debian's `prometheus` package) for the monitoring suites: started
//! on loopback for one test with short scrape and evaluation intervals, loaded with the
//! chart's own alert rules (the PrometheusRule's `spec`, rendered by `helm template`, is a
//! Prometheus rule file as it stands), and stopped with its data removed on drop, also
//! when the test panics.
//!
//! The pure parts (rule file, dashboard queries, metric names) are unit-tested below
//! against the chart and the metric names the binaries register.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::env::EnvInfo;
use crate::error::{Error, Result};
use crate::helm;
use crate::paths;
use crate::proc::{Supervised, free_port, wait_for};

/// Debian's Prometheus binary (`hack/install-deps.sh` installs it).
pub const BINARY: &str = "/usr/bin/prometheus";

/// Grafana's interval variables, replaced by this window to run a panel's query directly.
pub const RATE_WINDOW: &str = "1m";

/// One scrape job: its name and the `host:port` targets serving `/metrics`.
#[derive(Clone, Debug)]
pub struct ScrapeJob {
    pub job: String,
    pub targets: Vec<String>,
}

/// One series of an instant query's answer.
#[derive(Clone, Debug, Deserialize)]
pub struct Sample {
    pub metric: BTreeMap<String, String>,
    /// `[unix time, "value"]`.
    pub value: (f64, String),
}

/// One pending or firing alert.
#[derive(Clone, Debug, Deserialize)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub state: String,
}

#[derive(Deserialize)]
struct Reply<T> {
    status: String,
    data: Option<T>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Vector {
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Alerts {
    alerts: Vec<Alert>,
}

/// The Prometheus configuration: every job scraped every `interval`, rules evaluated as
/// often. Pure.
pub fn config(jobs: &[ScrapeJob], rule_file: &Path, interval: &str) -> serde_json::Value {
    let scrape_configs: Vec<_> = jobs
        .iter()
        .map(|j| {
            serde_json::json!({
                "job_name": j.job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": j.targets}],
            })
        })
        .collect();
    serde_json::json!({
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [rule_file.display().to_string()],
        "scrape_configs": scrape_configs,
    })
}

/// The rule file in a `helm template` output: the PrometheusRule's `spec`. Pure.
pub fn rule_file(manifest: &str) -> Result<String> {
    let spec = helm_documents(manifest)?
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .map(|d| d["spec"].clone())
        .ok_or_else(|| Error::Setup("no PrometheusRule in the rendered chart".into()))?;
    serde_yaml::to_string(&spec).map_err(|e| Error::Setup(format!("rule file: {e}")))
}

/// The dashboard JSON in a `helm template` output (the ConfigMap labelled for Grafana's
/// sidecar). Pure.
pub fn dashboard(manifest: &str) -> Result<serde_json::Value> {
    let cm = helm_documents(manifest)?
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .ok_or_else(|| Error::Setup("no dashboard ConfigMap in the rendered chart".into()))?;
    let text = cm["data"]["berth.json"]
        .as_str()
        .ok_or_else(|| Error::Setup("the dashboard ConfigMap has no berth.json".into()))?;
    serde_json::from_str(text).map_err(|e| Error::Setup(format!("dashboard JSON: {e}")))
}

/// Every (panel title, query) of a dashboard, rows skipped. Pure.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let empty = Vec::new();
    dashboard["panels"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .filter_map(|t| t["expr"].as_str())
                .map(move |e| (title.clone(), e.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A panel's query as Prometheus runs it: Grafana's interval variables replaced. Pure.
pub fn runnable(query: &str) -> String {
    ["$__rate_interval", "$__interval", "$__range"]
        .iter()
        .fold(query.to_string(), |q, var| q.replace(var, RATE_WINDOW))
}

/// The `berth_*` metric names an expression reads. Pure.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("berth_") {
        // Only at the start of an identifier (not inside a label value like "xberth_").
        let starts = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '"'));
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if starts {
            names.insert(tail[..len].to_string());
        }
        rest = &tail[len..];
    }
    names
}

/// The series names a metrics source file exposes: each `"berth_*"` name it registers,
/// with the suffixes prometheus-client adds to counters and histograms. Pure.
pub fn exposed_names(source: &str) -> BTreeSet<String> {
    source
        .match_indices("\"berth_")
        .filter_map(|(at, _)| {
            let literal = &source[at + 1..];
            let name = &literal[..literal.find('"')?];
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then_some(name)
        })
        .flat_map(|name| {
            ["", "_total", "_bucket", "_sum", "_count"].map(|suffix| format!("{name}{suffix}"))
        })
        .collect()
}

fn helm_documents(manifest: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(manifest) {
        let value = serde_json::Value::deserialize(doc)
            .map_err(|e| Error::Setup(format!("rendered chart: {e}")))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// `helm template` of the chart's monitoring templates with both enabled and `sets`
/// (`key=value`) on top.
pub fn render_chart(sets: &[&str]) -> Result<String> {
    let chart = helm::chart().display().to_string();
    let mut args = vec![
        "template",
        "monitoring",
        chart.as_str(),
        "--show-only",
        "templates/monitoring-rules.yaml",
        "--show-only",
        "templates/monitoring-dashboard.yaml",
        "--set",
        "monitoring.rules.enabled=true",
        "--set",
        "monitoring.dashboard.enabled=true",
    ];
    for s in sets {
        args.extend(["--set", *s]);
    }
    let out = helm::helm(&args);
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("helm {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running Prometheus; stopped and its data directory removed on drop.
pub struct Prometheus {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub log: PathBuf,
    dir: PathBuf,
    process: Option<Supervised>,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port with `jobs` scraped and `rules` loaded
    /// every `interval`; returns once it is ready.
    pub async fn start(
        info: &EnvInfo,
        jobs: &[ScrapeJob],
        rules: &str,
        interval: &str,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "{}prometheus-{:08x}",
            paths::SCRATCH_PREFIX,
            rand::random::<u32>()
        ));
        let mut prometheus = Self {
            url: String::new(),
            log: info.log_dir.join("prometheus.log"),
            dir,
            process: None,
        };
        // From here on the guard removes the directory, whatever fails next.
        std::fs::create_dir_all(prometheus.dir.join("data"))
            .map_err(Error::io("create", &prometheus.dir))?;
        let rule_path = prometheus.dir.join("rules.yml");
        std::fs::write(&rule_path, rules).map_err(Error::io("write", &rule_path))?;
        let config_path = prometheus.dir.join("prometheus.yml");
        let text = config(jobs, &rule_path, interval).to_string();
        std::fs::write(&config_path, text).map_err(Error::io("write", &config_path))?;
        let listen = format!("127.0.0.1:{}", free_port("127.0.0.1")?);
        let mut cmd = Command::new(BINARY);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prometheus.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--storage.tsdb.retention.time=1h");
        prometheus.process = Some(Supervised::spawn("prometheus", cmd, &prometheus.log)?);
        prometheus.url = format!("http://{listen}");
        let ready = format!("{}/-/ready", prometheus.url);
        wait_for("prometheus ready", Duration::from_secs(30), || async {
            reqwest::get(&ready)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await?;
        Ok(prometheus)
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T> {
        let base = format!("{}{path}", self.url);
        let failed = |e: String| Error::Setup(format!("GET {base} {query:?}: {e}"));
        let url =
            reqwest::Url::parse_with_params(&base, query).map_err(|e| failed(e.to_string()))?;
        let reply: Reply<T> = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?
            .json()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if reply.status == "success"
            && let Some(data) = reply.data
        {
            return Ok(data);
        }
        Err(failed(reply.error.unwrap_or(reply.status)))
    }

    /// An instant query's series (an error if Prometheus refuses the query).
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        Ok(self
            .get::<Vector>("/api/v1/query", &[("query", expr)])
            .await?
            .result)
    }

    /// The pending and firing alerts.
    pub async fn alerts(&self) -> Result<Vec<Alert>> {
        Ok(self.get::<Alerts>("/api/v1/alerts", &[]).await?.alerts)
    }

    /// Firing alerts named `name`.
    pub async fn firing(&self, name: &str) -> Result<Vec<Alert>> {
        Ok(self
            .alerts()
            .await?
            .into_iter()
            .filter(|a| {
                a.state == "firing" && a.labels.get("alertname").map(String::as_str) == Some(name)
            })
            .collect())
    }

    /// The last lines of Prometheus's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered() -> String {
        render_chart(&[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The names the controller and the node agent expose, from their sources.
    fn exposed() -> BTreeSet<String> {
        ["controller/src/metrics.rs", "nodeproxy/src/metrics.rs"]
            .iter()
            .flat_map(|f| {
                let path = paths::repo_root().join(f);
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                exposed_names(&text)
            })
            .collect()
    }

    fn alert_exprs(rules: &str) -> Vec<(String, String)> {
        let spec: serde_json::Value = serde_yaml::from_str(rules).expect("rule file is YAML");
        spec["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").clone())
            .map(|r| {
                let name = r["alert"].as_str().expect("alert name").to_string();
                (name, r["expr"].as_str().expect("expr").to_string())
            })
            .collect()
    }

    #[test]
    fn metric_names_are_read_from_expressions() {
        let names = metric_names(
            r#"sum(rate(berth_aws_calls_total{outcome="berth_x"}[5m])) / berth_leader and xberth_no"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["berth_aws_calls_total", "berth_leader"]
        );
        let exposed = exposed_names(r#"r.register("berth_leader", "1 while \"x\"", g)"#);
        assert!(exposed.contains("berth_leader") && exposed.contains("berth_leader_total"));
        assert!(!exposed.iter().any(|n| n.contains(' ')));
    }

    #[test]
    fn every_alert_and_panel_reads_only_exposed_metrics() {
        let manifest = rendered();
        let exposed = exposed();
        let rules = rule_file(&manifest).unwrap_or_else(|e| panic!("{e}"));
        let alerts = alert_exprs(&rules);
        assert!(alerts.len() >= 8, "{alerts:?}");
        let queries = dashboard_queries(&dashboard(&manifest).unwrap_or_else(|e| panic!("{e}")));
        assert!(queries.len() >= 20, "{queries:?}");
        for (what, expr) in alerts.iter().chain(&queries) {
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{what}: {expr} reads no berth metric");
            for name in names {
                assert!(
                    exposed.contains(&name),
                    "{what}: {name} is exposed by neither binary"
                );
            }
        }
    }

    #[test]
    fn the_issue_s_alerts_are_all_there() {
        let rules = rule_file(&rendered()).unwrap_or_else(|e| panic!("{e}"));
        let names: BTreeSet<_> = alert_exprs(&rules).into_iter().map(|(n, _)| n).collect();
        for want in [
            "BerthControllerSyncFailing",
            "BerthNodeProxySyncFailing",
            "BerthNodeProxyRulesStale",
            "BerthNodeProxyDrift",
            "BerthL2LeaseChurn",
            "BerthControllerLeaderChurn",
            "BerthAWSErrors",
            "BerthAWSThrottling",
            "BerthPoolNearlyExhausted",
            "BerthServiceNotReady",
        ] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn monitoring_is_off_by_default_and_values_reach_the_rules() {
        let chart = helm::chart().display().to_string();
        let out = helm::helm(&["template", "t", chart.as_str()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("PrometheusRule") && !text.contains("grafana_dashboard"));
        let manifest = render_chart(&[
            "monitoring.rules.for.poolNearlyExhausted=7s",
            "monitoring.rules.driftRepairs=7",
            "monitoring.rules.alertLabels.team=net",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let rules = rule_file(&manifest).unwrap_or_else(|e| panic!("{e}"));
        let spec: serde_json::Value = serde_yaml::from_str(&rules).expect("YAML");
        let rule = |name: &str| {
            spec["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .flat_map(|g| g["rules"].as_array().expect("rules"))
                .find(|r| r["alert"] == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .clone()
        };
        let pool = rule("BerthPoolNearlyExhausted");
        assert_eq!(pool["for"], "7s");
        assert_eq!(pool["labels"]["team"], "net");
        let drift = rule("BerthNodeProxyDrift");
        assert!(
            drift["expr"].as_str().is_some_and(|e| e.ends_with("> 7")),
            "{drift}"
        );
        let bad = render_chart(&["monitoring.rules.for.staleRules=soon"]);
        assert!(
            bad.is_err(),
            "the schema must refuse a duration that is none"
        );
    }

    #[test]
    fn prometheus_accepts_the_rule_file() {
        let rules = rule_file(&rendered()).unwrap_or_else(|e| panic!("{e}"));
        let path = std::env::temp_dir().join(format!(
            "{}rules-{:08x}.yml",
            paths::SCRATCH_PREFIX,
            rand::random::<u32>()
        ));
        std::fs::write(&path, rules).expect("write rule file");
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("run promtool (hack/install-deps.sh installs it): {e}"));
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `promtool test rules` on the chart's rules (annotations left out: the expected
    /// alerts compare labels) with synthetic series: a replica leading, one that led once.
    const ALERT_CASES: &str = r#"
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'berth_leader{instance="now:8080"}'
        values: '1x30'
      - series: 'berth_leader{instance="before:8080"}'
        values: '0x30'
      - series: 'berth_pool_addresses_allocated{instance="now:8080",class="lab"}'
        values: '5 10x29'
      - series: 'berth_pool_addresses_available{instance="now:8080",class="lab"}'
        values: '5 0x29'
      - series: 'berth_pool_addresses_allocated{instance="before:8080",class="old"}'
        values: '10x30'
      - series: 'berth_pool_addresses_available{instance="before:8080",class="old"}'
        values: '0x30'
      - series: 'berth_service_not_ready_since_timestamp_seconds{instance="now:8080",service_namespace="n",service_name="s",class="lab"}'
        values: '0x30'
    alert_rule_test:
      - eval_time: 3m
        alertname: BerthPoolNearlyExhausted
        exp_alerts: []
      - eval_time: 7m
        alertname: BerthPoolNearlyExhausted
        exp_alerts:
          - exp_labels: {severity: warning, instance: "now:8080", class: lab}
      - eval_time: 10m
        alertname: BerthServiceNotReady
        exp_alerts: []
      - eval_time: 20m
        alertname: BerthServiceNotReady
        exp_alerts:
          - exp_labels: {severity: warning, instance: "now:8080", service_namespace: n, service_name: s, class: lab}
"#;

    #[test]
    fn pool_and_not_ready_alerts_follow_the_leader_in_promtool() {
        let rules = rule_file(&rendered()).unwrap_or_else(|e| panic!("{e}"));
        let mut spec: serde_json::Value = serde_yaml::from_str(&rules).expect("YAML");
        for group in spec["groups"].as_array_mut().expect("groups") {
            for rule in group["rules"].as_array_mut().expect("rules") {
                rule.as_object_mut().expect("rule").remove("annotations");
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "{}promtool-{:08x}",
            paths::SCRATCH_PREFIX,
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let rules_text = serde_yaml::to_string(&spec).expect("rules");
        std::fs::write(dir.join("rules.yml"), rules_text).expect("write rules");
        let cases = format!("rule_files: [rules.yml]\n{ALERT_CASES}");
        std::fs::write(dir.join("cases.yml"), cases).expect("write cases");
        let out = Command::new("promtool")
            .args(["test", "rules", "cases.yml"])
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("run promtool (hack/install-deps.sh installs it): {e}"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn panels_run_without_grafana() {
        assert_eq!(
            runnable("rate(x[$__rate_interval]) + rate(y[$__interval])"),
            "rate(x[1m]) + rate(y[1m])"
        );
        let d = serde_json::json!({"panels": [
            {"type": "row", "title": "r"},
            {"title": "p", "targets": [{"expr": "a"}, {"expr": "b"}]},
        ]});
        assert_eq!(
            dashboard_queries(&d),
            [
                ("p".to_string(), "a".to_string()),
                ("p".to_string(), "b".to_string())
            ]
        );
    }

    #[test]
    fn config_scrapes_every_job_and_loads_the_rules() {
        let jobs = [ScrapeJob {
            job: "agents".into(),
            targets: vec!["10.0.0.1:10249".into(), "10.0.0.2:10249".into()],
        }];
        let c = config(&jobs, Path::new("/r.yml"), "1s");
        assert_eq!(c["global"]["evaluation_interval"], "1s");
        assert_eq!(c["rule_files"][0], "/r.yml");
        assert_eq!(
            c["scrape_configs"][0]["static_configs"][0]["targets"][1],
            "10.0.0.2:10249"
        );
    }
}
