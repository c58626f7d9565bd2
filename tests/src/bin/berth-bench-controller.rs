//! `berth-bench-controller`: the controller's figures against the running local
//! environment (LocalStack): creation→ready latency for 1 and for 200 Services created at
//! once, and AWS calls per reconcile in steady state and on a change. Merges its keys into
//! `target/bench/results.json` (read-modify-write: other benchmarks write there too).
//!
//! `--aws-limits` instead measures under AWS's request rate limits (LocalStack's
//! extension enforcing them): the same latencies, the AWS calls of each new Service by
//! API, and the lower bound those calls and the limits imply (`aws.limits.*` keys).
//! `BENCH_AWS_CLIENT=global` runs the controller without its per-API buckets (its
//! process-wide one only), for comparison (`aws.limits.global_client.*`).

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use berth_e2e::awslimits::{self, LimitsGuard, calls_by_operation, calls_since};
use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds, metric_sum};
use berth_e2e::testing::TestEnv;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ready(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "berth.dev/LoadBalancerReady" && c.status == "True")
        })
}

/// Creates `n` Services at once and returns each one's creation→ready time in ms.
async fn create_and_time(
    api: &Api<Service>,
    class: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<f64>, String> {
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut creates = Vec::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        let svc: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .map_err(|e| e.to_string())?;
        started.insert(name, Instant::now());
        let api = api.clone();
        creates.push(tokio::spawn(async move {
            api.create(&PostParams::default(), &svc).await
        }));
    }
    for c in creates {
        c.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let mut done: HashMap<String, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.len() < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {}/{n} Services ready after 600 s",
                done.len()
            ));
        }
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        for svc in list.items.iter().filter(|s| ready(s)) {
            let name = svc.metadata.name.clone().unwrap_or_default();
            if let Some(t0) = started.get(&name) {
                done.entry(name)
                    .or_insert_with(|| now.duration_since(*t0).as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut v: Vec<f64> = done.into_values().collect();
    v.sort_by(f64::total_cmp);
    Ok(v)
}

async fn counters(c: &ControllerProc) -> Result<(f64, f64, f64), String> {
    let m = c.metrics().await.map_err(|e| e.to_string())?;
    Ok((
        metric_sum(&m, "berth_reconciles_total", &[]),
        metric_sum(&m, "berth_aws_calls_total", &[]),
        metric_sum(&m, "berth_aws_calls_total", &[("mutating", "true")]),
    ))
}

async fn bench() -> Result<BTreeMap<String, serde_json::Value>, String> {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("bench-ctl").await;
    let class = ClassGuard::create(
        &env,
        &ns.name,
        serde_json::json!({"scheme": "internet-facing"}),
    );
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    // Resync every 2 minutes (the steady-state window
    // waits for them); AWS calls limited to 50/s as a real account would allow.
    opts.resync = "2m";
    opts.gc_interval = "5m";
    opts.extra_args = [
        "--aws-qps",
        "50",
        "--aws-burst",
        "100",
        "--concurrency",
        "16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let controller = ControllerProc::spawn(&env.info, &format!("bench-{}", ns.name), &opts)
        .map_err(|e| e.to_string())?;
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let mut out = BTreeMap::new();

    let one = create_and_time(&api, &class.lb_class(), "one", 1).await?;
    eprintln!("1 Service ready in {:.0} ms", one[0]);
    out.insert(
        "controller.ready_p50_ms_1".into(),
        serde_json::json!(percentile(&one, 50.0).round()),
    );
    out.insert(
        "controller.ready_p99_ms_1".into(),
        serde_json::json!(percentile(&one, 99.0).round()),
    );

    let t0 = Instant::now();
    let many = create_and_time(&api, &class.lb_class(), "many", 200).await?;
    eprintln!(
        "200 Services ready in {:.1} s: p50 {:.0} ms, p99 {:.0} ms",
        t0.elapsed().as_secs_f64(),
        percentile(&many, 50.0),
        percentile(&many, 99.0)
    );
    out.insert(
        "controller.ready_p50_ms_200".into(),
        serde_json::json!(percentile(&many, 50.0).round()),
    );
    out.insert(
        "controller.ready_p99_ms_200".into(),
        serde_json::json!(percentile(&many, 99.0).round()),
    );

    // Steady state: 201 ready Services and nothing changing; measured over the next 100
    // resyncs (all come within one resync period).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (r0, c0, m0) = counters(&controller).await?;
    let window = Instant::now();
    let (mut r1, mut c1, mut m1) = (r0, c0, m0);
    while r1 - r0 < 100.0 && window.elapsed() < Duration::from_secs(150) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        (r1, c1, m1) = counters(&controller).await?;
    }
    if r1 <= r0 {
        return Err("no resync happened in the steady-state window: nothing measured".into());
    }
    let per = (c1 - c0) / (r1 - r0);
    eprintln!(
        "steady state: {} reconciles, {} AWS calls ({per:.1}/reconcile), {} mutating",
        r1 - r0,
        c1 - c0,
        m1 - m0
    );
    out.insert(
        "controller.steady_state_reconciles".into(),
        serde_json::json!(r1 - r0),
    );
    out.insert(
        "controller.steady_state_aws_calls_per_reconcile".into(),
        serde_json::json!((per * 10.0).round() / 10.0),
    );
    out.insert(
        "controller.steady_state_mutating_calls".into(),
        serde_json::json!(m1 - m0),
    );

    // A change: a new health-check interval on one Service.
    let (r0, c0, m0) = counters(&controller).await?;
    let patch = serde_json::json!({"metadata": {"annotations": {
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "15"}}});
    api.patch("one-0", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (r1, c1, m1) = counters(&controller).await?;
    eprintln!(
        "on change: {} reconciles, {} AWS calls, {} mutating",
        r1 - r0,
        c1 - c0,
        m1 - m0
    );
    out.insert(
        "controller.change_reconciles".into(),
        serde_json::json!(r1 - r0),
    );
    out.insert(
        "controller.change_aws_calls".into(),
        serde_json::json!(c1 - c0),
    );
    out.insert(
        "controller.change_mutating_calls".into(),
        serde_json::json!(m1 - m0),
    );

    // Clean up through the controller (finalizers), then stop it.
    env.kubectl(&[
        "delete",
        "services",
        "--all",
        "-n",
        &ns.name,
        "--wait=true",
        "--timeout=300s",
    ]);
    drop(controller);
    Ok(out)
}

/// One bucket of the extension's table: the operations it covers, size, refill, shared.
struct Bucket {
    service: String,
    patterns: Vec<String>,
    burst: f64,
    per_second: f64,
    shared: bool,
}

fn buckets(view: &serde_json::Value) -> Vec<Bucket> {
    view["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Bucket {
            service: r["service"].as_str().unwrap_or_default().into(),
            patterns: r["operations"]
                .as_str()
                .unwrap_or_default()
                .split(' ')
                .map(String::from)
                .collect(),
            burst: r["burst"].as_f64().unwrap_or(1.0),
            per_second: r["perSecond"].as_f64().unwrap_or(1.0),
            shared: r["shared"].as_bool().unwrap_or(false),
        })
        .collect()
}

/// The bucket (its index and name) an operation draws from, as the extension picks it.
fn bucket_of(table: &[Bucket], operation: &str) -> Option<(usize, String)> {
    // The EC2 operations the controller calls (its `limits::EC2_OPERATIONS`).
    let ec2 = [
        "AuthorizeSecurityGroupIngress",
        "CreateSecurityGroup",
        "DeleteSecurityGroup",
        "DescribeInstances",
        "DescribeSecurityGroups",
        "DescribeSubnets",
        "DescribeVpcs",
        "RevokeSecurityGroupIngress",
    ];
    let service = if ec2.contains(&operation) {
        "ec2"
    } else {
        "elbv2"
    };
    let matches = |p: &str| match p.strip_suffix('*') {
        Some(prefix) => operation.starts_with(prefix),
        None => p == operation,
    };
    let i = table
        .iter()
        .position(|b| b.service == service && b.patterns.iter().any(|p| matches(p)))?;
    let name = if table[i].shared {
        table[i].patterns.join(" ")
    } else {
        operation.to_string()
    };
    Some((i, format!("{service}:{name}")))
}

/// The lower bound on the time `calls` (successful calls by operation, all made from full
/// buckets) need under `table`: for each bucket, max(0, calls − size) / refill; the bound
/// is the largest. Each Service's calls are sequential, but different Services' calls
/// draw from different buckets at once, so no sum of buckets bounds the whole. Answers
/// the bound and the bucket that sets it.
fn lower_bound(table: &[Bucket], calls: &BTreeMap<String, f64>) -> (f64, String) {
    let mut per_bucket: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (op, n) in calls {
        if let Some((i, name)) = bucket_of(table, op) {
            per_bucket.entry(name).or_insert((0.0, i)).0 += n;
        }
    }
    per_bucket
        .into_iter()
        .map(|(name, (n, i))| {
            let b = &table[i];
            (((n - b.burst).max(0.0)) / b.per_second, name)
        })
        .fold(
            (0.0, String::new()),
            |best, x| if x.0 > best.0 { x } else { best },
        )
}

/// Successful calls by operation between two metric readings.
fn successes(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> (BTreeMap<String, f64>, f64) {
    let mut ok = BTreeMap::new();
    let mut throttled = 0.0;
    for ((op, outcome), n) in calls_since(before, after) {
        match outcome.as_str() {
            "success" => *ok.entry(op).or_insert(0.0) += n,
            "throttled" => throttled += n,
            _ => {}
        }
    }
    (ok, throttled)
}

async fn bench_limits() -> Result<BTreeMap<String, serde_json::Value>, String> {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let per_api = std::env::var("BENCH_AWS_CLIENT").as_deref() != Ok("global");
    let prefix = if per_api {
        "aws.limits"
    } else {
        "aws.limits.global_client"
    };
    let ns = env.namespace("bench-limits").await;
    let class = ClassGuard::create(
        &env,
        &ns.name,
        serde_json::json!({"scheme": "internet-facing"}),
    );
    let limits = LimitsGuard::enable(&env.info, 1.0)
        .await
        .map_err(|e| e.to_string())?;
    let table = buckets(
        &awslimits::view(&env.info)
            .await
            .map_err(|e| e.to_string())?,
    );
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    // Resync and sweep out of the window: every call counted is the new Services'.
    opts.resync = "30m";
    opts.gc_interval = "30m";
    opts.extra_args = [
        "--aws-qps",
        "50",
        "--aws-burst",
        "100",
        "--concurrency",
        "16",
        "--aws-api-limits",
        if per_api { "true" } else { "false" },
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let controller = ControllerProc::spawn(&env.info, &format!("bench-{}", ns.name), &opts)
        .map_err(|e| e.to_string())?;
    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let read = || async {
        controller
            .metrics()
            .await
            .map(|m| calls_by_operation(&m))
            .map_err(|e| e.to_string())
    };
    let mut out = BTreeMap::new();
    let key = |k: &str| format!("{prefix}.{k}");

    // One at a time, after the subnet and VPC lookups are cached: five alone.
    create_and_time(&api, &class.lb_class(), "warm", 1).await?;
    let mut alone = Vec::new();
    for i in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        alone.extend(create_and_time(&api, &class.lb_class(), &format!("one{i}"), 1).await?);
    }
    alone.sort_by(f64::total_cmp);
    let p50_one = percentile(&alone, 50.0);
    eprintln!("1 Service alone: p50 {p50_one:.0} ms ({alone:?})");
    out.insert(key("ready_p50_ms_1"), serde_json::json!(p50_one.round()));

    // Full buckets again (the extension refills them on POST), then 200 at once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    awslimits::set(&env.info, true, 1.0)
        .await
        .map_err(|e| e.to_string())?;
    let before = read().await?;
    let t0 = Instant::now();
    let many = create_and_time(&api, &class.lb_class(), "many", 200).await?;
    let took = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (calls, throttled) = successes(&before, &read().await?);
    let (bound, by) = lower_bound(&table, &calls);
    let ratio = took / bound.max(f64::EPSILON);
    let total: f64 = calls.values().sum();
    eprintln!(
        "200 Services ready in {took:.1} s (p50 {:.0} ms, p99 {:.0} ms); lower bound {bound:.1} s ({by}); ratio {ratio:.2}; {throttled} throttled calls",
        percentile(&many, 50.0),
        percentile(&many, 99.0)
    );
    eprintln!("calls per new Service: {:.2} in all", total / 200.0);
    for (op, n) in &calls {
        eprintln!("  {op}: {:.2}", n / 200.0);
        out.insert(
            key(&format!("calls_per_service.{op}")),
            serde_json::json!((n / 200.0 * 100.0).round() / 100.0),
        );
    }
    out.insert(
        key("calls_per_service_total"),
        serde_json::json!((total / 200.0 * 100.0).round() / 100.0),
    );
    out.insert(
        key("ready_s_200"),
        serde_json::json!((took * 10.0).round() / 10.0),
    );
    out.insert(
        key("bound_s_200"),
        serde_json::json!((bound * 10.0).round() / 10.0),
    );
    out.insert(key("bound_bucket"), serde_json::json!(by));
    out.insert(
        key("ratio_200"),
        serde_json::json!((ratio * 100.0).round() / 100.0),
    );
    out.insert(key("throttled_calls_200"), serde_json::json!(throttled));
    out.insert(
        key("ready_p99_ms_200"),
        serde_json::json!(percentile(&many, 99.0).round()),
    );

    // Clean up without the limits (deletes are not measured).
    drop(limits);
    env.kubectl(&[
        "delete",
        "services",
        "--all",
        "-n",
        &ns.name,
        "--wait=true",
        "--timeout=300s",
    ]);
    drop(controller);
    Ok(out)
}

fn merge(results: BTreeMap<String, serde_json::Value>) -> std::io::Result<std::path::PathBuf> {
    let dir = berth_e2e::paths::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    let mut all: BTreeMap<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    all.extend(results);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&all).unwrap_or_default() + "\n",
    )?;
    Ok(path)
}

#[tokio::main]
async fn main() -> ExitCode {
    let run = if std::env::args().any(|a| a == "--aws-limits") {
        bench_limits().await
    } else {
        bench().await
    };
    match run {
        Ok(results) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&results).unwrap_or_default()
            );
            match merge(results) {
                Ok(p) => {
                    eprintln!("merged into {}", p.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth-bench-controller: writing results: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("berth-bench-controller: {e}");
            ExitCode::FAILURE
        }
    }
}
