//! The chart's monitoring against a real Prometheus (Debian's `prometheus`): it scrapes
//! this case's controller and every node agent, loads the chart's PrometheusRule as its
//! rule file (with short `for:` values), and answers every query of the chart's Grafana
//! dashboard. A pool of two addresses filled by three Services makes the pool-exhaustion
//! and the not-ready alerts fire; deleting the Services resolves both.

use std::collections::BTreeSet;
use std::time::Duration;

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::nodeagent::METRICS_PORT;
use berth_e2e::prometheus::{self, Prometheus, ScrapeJob};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, lb_condition};
use berth_e2e::wait::{Diagnostics, wait_until};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::DeleteParams;

const LONG: Duration = Duration::from_secs(60);
/// Two addresses, disjoint from every other suite's pools.
const POOL: &str = "198.19.77.1-198.19.77.2";
const CONTROLLER_JOB: &str = "berth-controller";
const AGENT_JOB: &str = "berth-nodeproxy";

/// Fields drop in order: Prometheus and the controller stop before the namespace and the
/// classes go.
struct Case {
    prometheus: Prometheus,
    controller: ControllerProc,
    env: TestEnv,
    ns: TestNamespace,
    pool: ClassGuard,
    _aws: ClassGuard,
}

impl Case {
    /// A pool class and an AWS class (so the AWS panels have the controller's inventory
    /// calls to show), one controller for both, and Prometheus scraping it and the agents.
    async fn new() -> Self {
        let env = TestEnv::connect().await;
        assert!(
            env.info.node_agents && !env.info.nodes.is_empty(),
            "the monitoring suite needs the harness's node agents"
        );
        install_crds(&env);
        let ns = env.namespace("monitoring").await;
        let pool = ClassGuard::with_spec(
            &env,
            &ns.name,
            serde_json::json!({"pool": {"addresses": [POOL]}}),
        );
        let aws = ClassGuard::create(
            &env,
            &format!("{}-aws", ns.name),
            serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
        );
        let mut opts = ControllerOpts::new(&pool.name, &ns.name);
        opts.classes.push(aws.name.clone());
        let controller = ControllerProc::spawn(&env.info, &format!("{}-0", ns.name), &opts)
            .unwrap_or_else(|e| panic!("start controller: {e}"));
        let prometheus = start_prometheus(&env, &controller).await;
        Self {
            prometheus,
            controller,
            env,
            ns,
            pool,
            _aws: aws,
        }
    }

    fn dump(&self) -> Diagnostics {
        Diagnostics::new(&self.env)
            .controllers(std::slice::from_ref(&self.controller))
            .log("prometheus", &self.prometheus.log)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    async fn create(&self, name: &str) {
        ServiceBuilder::load_balancer(name)
            .class(&self.pool.lb_class())
            .app(name)
            .tcp(80, 8080)
            .create_with(&self.services())
            .await;
    }

    async fn wait_ready(&self, name: &str) {
        let api = self.services();
        wait_until(
            &format!("service {name} ready"),
            LONG,
            &self.dump(),
            async || match api.get(name).await {
                Ok(s) if lb_condition(&s).is_some_and(|(st, _, _)| st == "True") => Ok(()),
                Ok(s) => Err(format!("{:?}", lb_condition(&s))),
                Err(e) => Err(e.to_string()),
            },
        )
        .await;
    }

    /// Waits until the firing alerts named `alert` carry exactly `want` as `label`
    /// (empty: none fires).
    async fn wait_firing(&self, alert: &str, label: &str, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let what = format!("{alert} firing for {label} {want:?}");
        wait_until(&what, LONG, &self.dump(), async || {
            let firing = self
                .prometheus
                .firing(alert)
                .await
                .map_err(|e| e.to_string())?;
            let have: BTreeSet<String> = firing
                .iter()
                .filter_map(|a| a.labels.get(label).cloned())
                .collect();
            if have == want && firing.len() == want.len() {
                Ok(())
            } else {
                Err(format!("firing: {firing:?}"))
            }
        })
        .await;
    }
}

/// The chart's rules with `for:` and thresholds short enough for a test.
fn test_rules() -> String {
    let manifest = prometheus::render_chart(&[
        "monitoring.rules.for.poolNearlyExhausted=1s",
        "monitoring.rules.for.serviceNotReady=1s",
        "monitoring.rules.serviceNotReadySeconds=3",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    prometheus::rule_file(&manifest).unwrap_or_else(|e| panic!("{e}"))
}

async fn start_prometheus(env: &TestEnv, controller: &ControllerProc) -> Prometheus {
    let jobs = [
        ScrapeJob {
            job: CONTROLLER_JOB.into(),
            targets: vec![controller.admin.clone()],
        },
        ScrapeJob {
            job: AGENT_JOB.into(),
            targets: env
                .info
                .nodes
                .iter()
                .map(|n| format!("{}:{METRICS_PORT}", n.plan.ip))
                .collect(),
        },
    ];
    Prometheus::start(&env.info, &jobs, &test_rules(), "1s")
        .await
        .unwrap_or_else(|e| panic!("start prometheus: {e}"))
}

/// `up == 1` for the controller and every node agent.
async fn wait_all_up(case: &Case) {
    let mut want: BTreeSet<(String, String)> = case
        .env
        .info
        .nodes
        .iter()
        .map(|n| {
            (
                AGENT_JOB.to_string(),
                format!("{}:{METRICS_PORT}", n.plan.ip),
            )
        })
        .collect();
    want.insert((CONTROLLER_JOB.into(), case.controller.admin.clone()));
    wait_until("every target up", LONG, &case.dump(), async || {
        let up = case
            .prometheus
            .query("up == 1")
            .await
            .map_err(|e| e.to_string())?;
        let have: BTreeSet<(String, String)> = up
            .iter()
            .map(|s| (s.metric["job"].clone(), s.metric["instance"].clone()))
            .collect();
        if have == want {
            Ok(())
        } else {
            Err(format!("up: {have:?}, want {want:?}"))
        }
    })
    .await;
}

/// Every query of the chart's dashboard returns at least one series (a timeout lists all
/// the queries still empty).
async fn wait_every_panel_has_data(case: &Case) {
    let manifest = prometheus::render_chart(&[]).unwrap_or_else(|e| panic!("{e}"));
    let dashboard = prometheus::dashboard(&manifest).unwrap_or_else(|e| panic!("{e}"));
    let queries = prometheus::dashboard_queries(&dashboard);
    assert!(!queries.is_empty(), "the dashboard has no queries");
    wait_until(
        "every panel's query to return series",
        LONG,
        &case.dump(),
        async || {
            let mut empty = Vec::new();
            for (title, expr) in &queries {
                let expr = prometheus::runnable(expr);
                match case.prometheus.query(&expr).await {
                    Ok(series) if !series.is_empty() => {}
                    Ok(_) => empty.push(format!("{title:?}: {expr}: no series")),
                    Err(e) => empty.push(format!("{title:?}: {e}")),
                }
            }
            if empty.is_empty() {
                Ok(())
            } else {
                Err(empty.join("\n"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_exhaustion_and_not_ready_alerts_fire_and_resolve_in_prometheus() {
    let case = Case::new().await;
    wait_all_up(&case).await;
    let class = case.pool.name.clone();

    for name in ["a", "b"] {
        case.create(name).await;
        case.wait_ready(name).await;
    }
    // The pool is full: the third Service waits for an address.
    case.create("c").await;
    case.wait_firing("BerthPoolNearlyExhausted", "class", &[&class])
        .await;
    case.wait_firing("BerthServiceNotReady", "service_name", &["c"])
        .await;
    wait_every_panel_has_data(&case).await;

    for name in ["a", "b", "c"] {
        case.services()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete service {name}: {e}"));
    }
    case.wait_firing("BerthPoolNearlyExhausted", "class", &[])
        .await;
    case.wait_firing("BerthServiceNotReady", "service_name", &[])
        .await;
}
