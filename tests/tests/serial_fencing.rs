//! Leader fencing against the real cluster and LocalStack: a leader frozen (SIGSTOP) in
//! the middle of provisioning for longer than its Lease, while the other replica takes
//! over and the Service changes, makes no Kubernetes or AWS write once resumed (its writes
//! are refused and counted) and steps down. Runs alone: it freezes a process for seconds.

use std::cell::Cell;
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elb;
use berth_e2e::controller::{
    ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of, metric_sum,
};
use berth_e2e::testing::{TestEnv, lb_condition, lb_hostname, wait_for};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

const LONG: Duration = Duration::from_secs(90);

/// What a replica wrote and was refused, from its metrics.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Writes {
    aws_mutating: u64,
    kube: u64,
    fenced: u64,
}

impl Writes {
    fn from_metrics(text: &str) -> Self {
        let sum = |name: &str, filters: &[(&str, &str)]| metric_sum(text, name, filters) as u64;
        Self {
            aws_mutating: sum("berth_aws_calls_total", &[("mutating", "true")]),
            kube: sum("berth_kube_writes_total", &[]),
            fenced: sum("berth_fenced_writes_total", &[]),
        }
    }

    /// The counters the replica logs as its last line when it steps down (plain
    /// `key=value` or JSON `"key":value` fields).
    fn from_exit_log(log: &str) -> Option<Self> {
        let log = strip_ansi(log);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("lost leadership; exiting"))?;
        let field = |key: &str| -> Option<u64> {
            let rest = &line[line.find(key)? + key.len()..];
            let digits: String = rest
                .trim_start_matches(['"', '=', ':', ' '])
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        Some(Self {
            aws_mutating: field("aws_mutating")?,
            kube: field("kube_writes")?,
            fenced: field("fenced_writes")?,
        })
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn service(name: &str, class: &str, ports: &[i32]) -> Service {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| serde_json::json!({"name": format!("p{p}"), "protocol": "TCP", "port": p}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "ports": ports},
    }))
    .expect("service object")
}

async fn wait_ready(api: &Api<Service>, name: &str, logs: impl Fn() -> String) {
    let res = wait_for(&format!("service {name} ready"), LONG, || async {
        api.get(name).await.is_ok_and(|s| {
            lb_condition(&s).is_some_and(|(st, _, _)| st == "True") && lb_hostname(&s).is_some()
        })
    })
    .await;
    if let Err(e) = res {
        let status = api.get(name).await.ok().and_then(|s| s.status);
        panic!("{e}; status: {status:?}\n{}", logs());
    }
}

/// The listener ports of the Service's load balancer in LocalStack.
async fn listener_ports(client: &elb::Client, uid: &str) -> Vec<i32> {
    let Ok(view) = aws_view(client, uid).await else {
        return Vec::new();
    };
    let Some((lb, ..)) = view.load_balancers.first() else {
        return Vec::new();
    };
    let Ok(out) = client
        .describe_listeners()
        .load_balancer_arn(lb)
        .send()
        .await
    else {
        return Vec::new();
    };
    let mut ports: Vec<i32> = out.listeners().iter().filter_map(|l| l.port()).collect();
    ports.sort();
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_resumes_fenced_and_steps_down() {
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("fence").await;
    let class = ClassGuard::create(
        &env,
        &ns.name,
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    );
    let elb = elb::Client::new(&env.aws().await);
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    (opts.lease_duration, opts.resync, opts.gc_interval) = ("3s", "10m", "10m");
    // The first leader calls AWS slowly, so it is still mid-way through provisioning when
    // it is frozen: its next calls wait for the rate limiter.
    let mut slow = opts.clone();
    slow.extra_args = ["--aws-qps", "0.5", "--aws-burst", "1"]
        .map(String::from)
        .to_vec();
    let mut a = ControllerProc::spawn(&env.info, &format!("{}-a", ns.name), &slow).expect("a");
    wait_for("a leads", LONG, || a.is_leader())
        .await
        .expect("a leads");
    let b = ControllerProc::spawn(&env.info, &format!("{}-b", ns.name), &opts).expect("b");
    wait_for("b follows", LONG, || async {
        b.metrics()
            .await
            .is_ok_and(|m| m.lines().any(|l| l == "berth_leader 0"))
    })
    .await
    .expect("b follows");

    let api: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let pp = PostParams::default();
    let first = api
        .create(&pp, &service("first", &class.lb_class(), &[80]))
        .await
        .expect("first");
    let uid = first.metadata.uid.clone().expect("uid");
    // Freeze a right after its first mutating AWS call (the load balancer): target groups,
    // listeners and the status are still to come.
    let before = Cell::new(None);
    let frozen = wait_for("a's first mutating AWS call", LONG, || async {
        let Ok(text) = a.metrics().await else {
            return false;
        };
        let w = Writes::from_metrics(&text);
        before.set(Some(w));
        w.aws_mutating >= 1
    })
    .await;
    a.signal(libc::SIGSTOP);
    frozen.unwrap_or_else(|e| panic!("{e}\n{}", logs_of(std::slice::from_ref(&a))));
    let before = before.get().expect("a's metrics");
    assert_eq!(
        before.fenced, 0,
        "nothing refused while leading: {before:?}"
    );

    // Meanwhile the Service gains a port (a's frozen reconcile still wants one listener),
    // and a second Service is created; b takes over and serves both.
    let port = serde_json::json!({"spec": {"ports": [
        {"name": "p80", "protocol": "TCP", "port": 80},
        {"name": "p8080", "protocol": "TCP", "port": 8080},
    ]}});
    api.patch("first", &PatchParams::default(), &Patch::Merge(port))
        .await
        .expect("patch");
    api.create(&pp, &service("second", &class.lb_class(), &[81]))
        .await
        .expect("second");
    wait_for("b leads", LONG, || b.is_leader())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", b.log_tail()));
    wait_ready(&api, "second", || b.log_tail()).await;
    wait_for("first's listeners on 80 and 8080", LONG, || async {
        listener_ports(&elb, &uid).await == [80, 8080]
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log_tail()));
    wait_ready(&api, "first", || b.log_tail()).await;

    a.signal(libc::SIGCONT);
    wait_for("a steps down and exits", LONG, || {
        let gone = a.exited().is_some();
        async move { gone }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail()));
    let log = std::fs::read_to_string(&a.log).expect("a's log");
    let after = Writes::from_exit_log(&log)
        .unwrap_or_else(|| panic!("no exit summary in a's log\n{}", a.log_tail()));
    assert_eq!(
        after.aws_mutating,
        before.aws_mutating,
        "a called AWS after resuming\n{}",
        a.log_tail()
    );
    assert_eq!(
        after.kube,
        before.kube,
        "a wrote to Kubernetes after resuming\n{}",
        a.log_tail()
    );
    assert!(
        after.fenced > before.fenced,
        "a's writes were not refused: {after:?}\n{}",
        a.log_tail()
    );
    assert!(b.is_leader().await, "b still leads");
    assert_eq!(
        listener_ports(&elb, &uid).await,
        [80, 8080],
        "a undid b's listener"
    );

    for name in ["first", "second"] {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_for("Services deleted", LONG, || async {
        api.list(&Default::default())
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log_tail()));
}
