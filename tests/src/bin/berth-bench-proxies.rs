//! `berth-bench-proxies`: berth-nodeproxy against kube-proxy (nftables mode, the pinned
//! release and the newest one) on the running local environment, through its real
//! apiserver, one proxy at a time on the first node, each from an empty ruleset.
//!
//! Runs inside the client namespace (`hack/bench-proxies.sh` starts it with
//! `ip netns exec`), so every probe is client traffic routed to the node under test.
//! Twenty pod servers on that node (`pa-0..9`, `pb-0..9`) back every Service; each
//! answers with its name, so a probe tells which endpoint it reached. Figures go to
//! `target/bench/results.json` (`compare.<proxy>.*`, `compare.berth_over_<proxy>.*`) and
//! a plot to `target/bench/proxies.svg`, the table to `target/bench/proxies.md`.
//!
//! `BENCH_PROXIES_SCALES` (default `1000,5000`; add `10000` for the 10k run),
//! `BENCH_PROXIES_CHANGES` (default 50), `BENCH_PROXIES_ONLY` (comma list of proxy keys).
//! `--replot` redraws the plot and table from results.json without running anything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use berth_e2e::net::{CLIENT_NETNS, CLUSTER_CIDR, NodePlan, SERVICE_CIDR};
use berth_e2e::nodeagent::{ADMIN_PORT, L2_LEASE_NAMESPACE, L2_LEASE_SECONDS, METRICS_PORT};
use berth_e2e::proc::{Supervised, run, run_quiet, wait_for};
use berth_e2e::proxybench::{self, BERTH, Panel, RunFigures};
use berth_e2e::testing::TestEnv;
use berth_e2e::{Error, Result, paths};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Namespace of the pod servers behind every Service.
const PODS_NS: &str = "bench-proxies-pods";
const POD_PORT: i32 = 8080;
const ENDPOINTS: usize = 10;
/// Services probed to decide that every Service answers.
const SAMPLE: usize = 100;
/// Services written at once.
const WRITERS: usize = 32;
/// Pause between programming-latency changes: past kube-proxy's default 1 s
/// minSyncPeriod, so each change meets an idle proxy as a lone change would.
const CHANGE_GAP: Duration = Duration::from_millis(1200);
/// Least time between two probes of one Service while waiting for it to change.
const PROBE_PACE: Duration = Duration::from_millis(1);

/// One contender: how to start it and what it is called in the results.
struct Proxy {
    key: String,
    bin: PathBuf,
    kube_proxy: bool,
}

fn proxies() -> Result<Vec<Proxy>> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target"));
    let mut all = vec![Proxy {
        key: BERTH.into(),
        bin: target.join("release/berth-nodeproxy"),
        kube_proxy: false,
    }];
    for var in ["KUBE_VERSION", "KUBE_PROXY_NEWEST_VERSION"] {
        let v = paths::read_version(var)
            .ok_or_else(|| Error::Setup(format!("{var} missing from hack/versions.env")))?;
        all.push(Proxy {
            key: format!("kube-proxy-{v}"),
            bin: paths::cache_dir().join(format!("bin/kube-proxy-v{v}/kube-proxy")),
            kube_proxy: true,
        });
    }
    if let Ok(only) = std::env::var("BENCH_PROXIES_ONLY") {
        let keep: Vec<&str> = only.split(',').map(str::trim).collect();
        all.retain(|p| keep.contains(&p.key.as_str()));
    }
    for p in &all {
        if !p.bin.exists() {
            return Err(Error::Setup(format!(
                "{} not built ({}): run hack/bench-proxies.sh",
                p.key,
                p.bin.display()
            )));
        }
    }
    Ok(all)
}

fn kube_proxy_config(dir: &Path, plan: &NodePlan, kubeconfig: &Path) -> Result<PathBuf> {
    // conntrack.maxPerCore 0 and the zero timeouts leave the conntrack sysctls alone:
    // outside the initial namespace some are read-only.
    let text = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         mode: nftables\n\
         hostnameOverride: {name}\n\
         clusterCIDR: {CLUSTER_CIDR}\n\
         clientConnection:\n  kubeconfig: {kc}\n\
         conntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: 0s\n\
         metricsBindAddress: {ip}:{METRICS_PORT}\n\
         healthzBindAddress: {ip}:{ADMIN_PORT}\n",
        name = plan.name,
        kc = kubeconfig.display(),
        ip = plan.ip,
    );
    let path = dir.join(format!("kube-proxy-{}.yaml", plan.name));
    std::fs::write(&path, text).map_err(Error::io("write kube-proxy config", &path))?;
    Ok(path)
}

fn command(proxy: &Proxy, plan: &NodePlan, kubeconfig: &Path, dir: &Path) -> Result<Command> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &plan.netns]).arg(&proxy.bin);
    if proxy.kube_proxy {
        cmd.arg("--config")
            .arg(kube_proxy_config(dir, plan, kubeconfig)?)
            .arg("--v=1");
    } else {
        // The harness's flags (tests/src/nodeagent.rs), release build.
        cmd.args(["--node-name", &plan.name])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--service-cidr",
                SERVICE_CIDR,
            ])
            .args(["--healthz-bind", &format!("0.0.0.0:{ADMIN_PORT}")])
            .args(["--metrics-bind", &format!("0.0.0.0:{METRICS_PORT}")])
            .args(["--l2-lease-duration", &format!("{L2_LEASE_SECONDS}s")])
            .args(["--lease-namespace", L2_LEASE_NAMESPACE])
            .args(["--external-ip-cidrs", "0.0.0.0/0,::/0"])
            .env("RUST_LOG", "info,kube=warn");
    }
    Ok(cmd)
}

/// One HTTP request on a fresh connection; the whole answer, or None on any failure.
async fn fetch(ip: Ipv4Addr, port: u16, path: &str, timeout: Duration) -> Option<String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// The pod server that answered a probe of a Service, by its `X-Berth-Pod` header.
async fn probe(ip: Ipv4Addr, timeout: Duration) -> Option<String> {
    let answer = fetch(ip, 80, "/", timeout).await?;
    if !answer.starts_with("HTTP/1.1 200") {
        return None;
    }
    answer
        .lines()
        .find_map(|l| l.strip_prefix("X-Berth-Pod: "))
        .map(|p| p.trim().to_string())
}

async fn healthy(plan: &NodePlan) -> bool {
    fetch(plan.ip, ADMIN_PORT, "/healthz", Duration::from_secs(1))
        .await
        .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
}

fn json_to<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Setup(format!("bench object: {e}")))
}

async fn create_namespace(env: &TestEnv, name: &str) -> Result<()> {
    let ns: Namespace = json_to(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(env.client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .map_err(Error::kube("create namespace"))?;
    Ok(())
}

async fn delete_namespace(env: &TestEnv, name: &str) -> Result<()> {
    let api = Api::<Namespace>::all(env.client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    wait_for(
        &format!("namespace {name} deleted"),
        Duration::from_secs(900),
        || async { matches!(api.get_opt(name).await, Ok(None)) },
    )
    .await
}

/// The pod servers on `plan`'s node: ten for the initial endpoints (`pa-*`), ten that
/// programming-latency changes switch to (`pb-*`). Returns their IPs in that order.
async fn start_pods(env: &TestEnv, plan: &NodePlan) -> Result<(Vec<String>, Vec<String>)> {
    if Api::<Namespace>::all(env.client.clone())
        .get_opt(PODS_NS)
        .await
        .map_err(Error::kube("get namespace"))?
        .is_none()
    {
        create_namespace(env, PODS_NS).await?;
    }
    let api: Api<Pod> = Api::namespaced(env.client.clone(), PODS_NS);
    let names: Vec<String> = ["pa", "pb"]
        .iter()
        .flat_map(|g| (0..ENDPOINTS).map(move |i| format!("{g}-{i}")))
        .collect();
    for name in &names {
        let pod: Pod = json_to(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": plan.name, "automountServiceAccountToken": false,
                     "containers": [{"name": "server", "image": "berth/podserver",
                                     "ports": [{"containerPort": POD_PORT}]}]}
        }))?;
        wait_for(
            &format!("pod {name} created"),
            Duration::from_secs(60),
            || {
                let (api, pod) = (api.clone(), pod.clone());
                async move {
                    match api.create(&PostParams::default(), &pod).await {
                        Ok(_) => true,
                        Err(kube::Error::Api(s)) => s.code == 409,
                        Err(_) => false,
                    }
                }
            },
        )
        .await?;
    }
    let mut ips = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ips.len() < names.len() {
        if Instant::now() > deadline {
            return Err(Error::Setup(format!(
                "pod servers without an IP after 120 s: {} of {}",
                names.len() - ips.len(),
                names.len()
            )));
        }
        for name in &names {
            let ip = api.get(name).await.ok().and_then(|p| p.status?.pod_ip);
            if let Some(ip) = ip {
                ips.insert(name.clone(), ip);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let group = |g: &str| -> Vec<String> {
        (0..ENDPOINTS)
            .filter_map(|i| ips.get(&format!("{g}-{i}")).cloned())
            .collect()
    };
    Ok((group("pa"), group("pb")))
}

fn slice_endpoints(ips: &[String], node: &str) -> Value {
    ips.iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": node}))
        .collect()
}

/// Writes Service `name` and its EndpointSlice; returns the allocated ClusterIP.
async fn write_service(env: &TestEnv, ns: &str, name: &str, endpoints: &Value) -> Result<Ipv4Addr> {
    let svc: Service = json_to(json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": POD_PORT}]}
    }))?;
    let svc = Api::<Service>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .map_err(Error::kube("create Service"))?;
    let slice: EndpointSlice = json_to(json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/service-name": name,
            "endpointslice.kubernetes.io/managed-by": "bench.berth.dev"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": POD_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?;
    Api::<EndpointSlice>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await
        .map_err(Error::kube("create EndpointSlice"))?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| Error::Setup(format!("Service {ns}/{name} has no IPv4 ClusterIP")))
}

async fn write_services(
    env: &TestEnv,
    ns: &str,
    count: usize,
    endpoints: &Value,
) -> Result<Vec<Ipv4Addr>> {
    let mut done: Vec<(usize, Ipv4Addr)> = futures::stream::iter(0..count)
        .map(|i| async move {
            write_service(env, ns, &format!("s-{i}"), endpoints)
                .await
                .map(|ip| (i, ip))
        })
        .buffer_unordered(WRITERS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    done.sort();
    Ok(done.into_iter().map(|(_, ip)| ip).collect())
}

/// `k` indices spread evenly over `0..n`, the last one included.
fn spread(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n).max(1);
    (0..k).map(|j| (j + 1) * n / k - 1).collect()
}

/// Probes the sampled ClusterIPs until each answered once, a round every `pace` (an
/// unprogrammed ClusterIP fails at once: unpaced rounds would take the CPU the proxy
/// needs); the time since `t0` when the last one answered, or None past `patience`.
async fn wait_all_answer(
    ips: &[Ipv4Addr],
    t0: Instant,
    patience: Duration,
    pace: Duration,
) -> Option<f64> {
    let mut pending: Vec<Ipv4Addr> = ips.to_vec();
    while !pending.is_empty() {
        if t0.elapsed() > patience {
            eprintln!("  {} sampled Services never answered", pending.len());
            return None;
        }
        let round = tokio::time::sleep(pace);
        let answers = futures::future::join_all(
            pending
                .iter()
                .map(|ip| probe(*ip, Duration::from_millis(100))),
        )
        .await;
        pending = pending
            .into_iter()
            .zip(answers)
            .filter(|(_, a)| a.is_none())
            .map(|(ip, _)| ip)
            .collect();
        if !pending.is_empty() {
            round.await;
        }
    }
    Some(t0.elapsed().as_secs_f64())
}

/// Probes `ip` on fresh connections, one per millisecond at most (so the prober leaves
/// the CPU to the proxy), until a `pb-*` pod server answers.
async fn until_new_endpoint(ip: Ipv4Addr, t0: Instant, patience: Duration) -> Option<f64> {
    while t0.elapsed() < patience {
        let pace = tokio::time::sleep(PROBE_PACE);
        if probe(ip, Duration::from_millis(50))
            .await
            .is_some_and(|p| p.starts_with("pb-"))
        {
            return Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        pace.await;
    }
    None
}

/// Network programming latency: each change switches one Service's EndpointSlice to the
/// ten `pb-*` endpoints; measured from the write until a probe reaches one of them.
async fn programming(
    env: &TestEnv,
    ns: &str,
    ips: &[Ipv4Addr],
    changes: usize,
    new_endpoints: &Value,
) -> Result<(Vec<f64>, usize)> {
    let api = Api::<EndpointSlice>::namespaced(env.client.clone(), ns);
    let patch = json!({"endpoints": new_endpoints});
    let (mut latencies, mut misses) = (Vec::new(), 0);
    for i in spread(ips.len(), changes) {
        tokio::time::sleep(CHANGE_GAP).await;
        let t0 = Instant::now();
        api.patch(
            &format!("s-{i}"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::kube("patch EndpointSlice"))?;
        match until_new_endpoint(ips[i], t0, Duration::from_secs(30)).await {
            Some(ms) => latencies.push(ms),
            None => misses += 1,
        }
    }
    Ok((latencies, misses))
}

/// Fresh connections through the rules to sampled Services, timed end to end.
async fn first_connections(ips: &[Ipv4Addr], count: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for j in 0..count {
        let t = Instant::now();
        if probe(ips[j % ips.len()], Duration::from_secs(1))
            .await
            .is_some()
        {
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    out
}

/// CPU seconds (user + system) and peak RSS in MiB of `pid`, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th of them.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (ticks / hz, hwm_kib / 1024.0)
}

fn flush_ruleset(plan: &NodePlan) -> Result<()> {
    run(
        "ip",
        &["netns", "exec", &plan.netns, "nft", "flush", "ruleset"],
    )
    .map(|_| ())
}

struct Bench<'a> {
    env: &'a TestEnv,
    plan: NodePlan,
    old_endpoints: Value,
    new_endpoints: Value,
    changes: usize,
    dir: PathBuf,
}

impl Bench<'_> {
    /// One proxy at one scale, from an empty ruleset and no bench Services.
    async fn run(&self, proxy: &Proxy, services: usize) -> Result<RunFigures> {
        let label = proxybench::scale_label(services);
        let ns = format!("bp-{}-{label}", proxy.key.replace('.', "-"));
        eprintln!("== {} at {services} Services", proxy.key);
        flush_ruleset(&self.plan)?;
        create_namespace(self.env, &ns).await?;
        let log = self
            .env
            .info
            .log_dir
            .join(format!("bench-{}-{label}.log", proxy.key));
        let cmd = command(proxy, &self.plan, &self.env.info.kubeconfig, &self.dir)?;
        let mut child = Supervised::spawn(&proxy.key, cmd, &log)?;
        let pid = child.pid();
        let plan = self.plan.clone();
        wait_for(
            &format!("{} healthy", proxy.key),
            Duration::from_secs(120),
            || healthy(&plan),
        )
        .await?;
        let figures = self.measure(&ns, services, pid).await;
        child.stop(Duration::from_secs(10));
        flush_ruleset(&self.plan)?;
        delete_namespace(self.env, &ns).await?;
        let f = figures?;
        eprintln!(
            "  writes {:.1} s, every Service answers {:?} s, programming p50 {:?} ms p99 {:?} ms \
             ({} missed), new Service {:?} ms, CPU {:.2} s, peak RSS {:.1} MiB",
            f.writes_s,
            f.sync_all_s,
            proxybench::percentile(&f.programming_ms, 50.0),
            proxybench::percentile(&f.programming_ms, 99.0),
            f.programming_misses,
            f.new_service_ms,
            f.cpu_total_s,
            f.peak_rss_mib,
        );
        Ok(f)
    }

    async fn measure(&self, ns: &str, services: usize, pid: u32) -> Result<RunFigures> {
        let t0 = Instant::now();
        let ips = write_services(self.env, ns, services, &self.old_endpoints).await?;
        let writes_s = t0.elapsed().as_secs_f64();
        let sample: Vec<Ipv4Addr> = spread(ips.len(), SAMPLE).iter().map(|i| ips[*i]).collect();
        let sync_all_s = wait_all_answer(
            &sample,
            t0,
            Duration::from_secs(900),
            Duration::from_millis(20),
        )
        .await;
        let (cpu_sync_s, _) = usage(pid);
        let first_connection_ms = first_connections(&sample, 200).await;
        let (programming_ms, programming_misses) =
            programming(self.env, ns, &ips, self.changes, &self.new_endpoints).await?;
        tokio::time::sleep(CHANGE_GAP).await;
        let t = Instant::now();
        let ip = write_service(self.env, ns, "s-new", &self.old_endpoints).await?;
        let new_service_ms = wait_all_answer(&[ip], t, Duration::from_secs(60), PROBE_PACE)
            .await
            .map(|s| s * 1000.0);
        let (cpu_total_s, peak_rss_mib) = usage(pid);
        Ok(RunFigures {
            sync_all_s,
            writes_s,
            programming_ms,
            programming_misses,
            new_service_ms,
            cpu_sync_s,
            cpu_total_s,
            peak_rss_mib,
            first_connection_ms,
        })
    }
}

/// Routes for the bench's lifetime: the client sends Service traffic to the node under
/// test, and that node refuses what no rule catches (instead of forwarding it on to the
/// host), so an unprogrammed ClusterIP fails fast.
struct Routes {
    node_netns: String,
}

impl Routes {
    fn add(plan: &NodePlan) -> Result<Self> {
        let via = plan.ip.to_string();
        run(
            "ip",
            &[
                "-n",
                CLIENT_NETNS,
                "route",
                "replace",
                SERVICE_CIDR,
                "via",
                &via,
            ],
        )?;
        let routes = Self {
            node_netns: plan.netns.clone(),
        };
        run(
            "ip",
            &[
                "-n",
                &plan.netns,
                "route",
                "replace",
                "unreachable",
                SERVICE_CIDR,
            ],
        )?;
        Ok(routes)
    }
}

impl Drop for Routes {
    fn drop(&mut self) {
        run_quiet("ip", &["-n", CLIENT_NETNS, "route", "del", SERVICE_CIDR]);
        run_quiet(
            "ip",
            &[
                "-n",
                &self.node_netns,
                "route",
                "del",
                "unreachable",
                SERVICE_CIDR,
            ],
        );
    }
}

fn env_list(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

async fn bench(env: &TestEnv) -> Result<BTreeMap<String, Value>> {
    if env.info.node_agents {
        return Err(Error::Setup(
            "the environment runs harness node agents; start it with BERTH_E2E_NODEPROXY=0".into(),
        ));
    }
    let plan = env
        .info
        .nodes
        .first()
        .map(|n| n.plan.clone())
        .ok_or_else(|| Error::Setup("the environment has no nodes".into()))?;
    let proxies = proxies()?;
    let scales = env_list("BENCH_PROXIES_SCALES", &[1000, 5000]);
    let changes = env_list("BENCH_PROXIES_CHANGES", &[50])[0];
    let dir = paths::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let _routes = Routes::add(&plan)?;
    let (a, b) = start_pods(env, &plan).await?;
    let bench = Bench {
        env,
        old_endpoints: slice_endpoints(&a, &plan.name),
        new_endpoints: slice_endpoints(&b, &plan.name),
        plan,
        changes,
        dir: dir.clone(),
    };
    let mut results = BTreeMap::new();
    for n in &scales {
        for p in &proxies {
            let f = bench.run(p, *n).await?;
            results.extend(proxybench::figure_keys(&p.key, *n, &f));
        }
    }
    let keys: Vec<String> = proxies.iter().map(|p| p.key.clone()).collect();
    report(&dir, &mut results, &keys, &scales)?;
    Ok(results)
}

/// Adds the derived keys (sync after the writes, ratios), writes the plot and the table.
fn report(
    dir: &Path,
    results: &mut BTreeMap<String, Value>,
    proxies: &[String],
    scales: &[usize],
) -> Result<()> {
    let tails = proxybench::tail_keys(results);
    results.extend(tails);
    let ratios = proxybench::ratio_keys(results);
    results.extend(ratios);
    write_plot(dir, results, proxies, scales)?;
    let table = proxybench::markdown_table(results, proxies, scales);
    let path = dir.join("proxies.md");
    std::fs::write(&path, &table).map_err(Error::io("write table", &path))?;
    eprintln!("{table}");
    Ok(())
}

/// `--replot`: the plot, table and derived keys again from results.json, no run.
fn replot() -> Result<BTreeMap<String, Value>> {
    let dir = paths::repo_root().join("target/bench");
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).map_err(Error::io("read", &path))?;
    let mut results: BTreeMap<String, Value> = serde_json::from_str(&text)
        .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
    results.retain(|k, _| k.starts_with("compare."));
    let keys: Vec<String> = proxies()?.into_iter().map(|p| p.key).collect();
    let scales = env_list("BENCH_PROXIES_SCALES", &[1000, 5000]);
    report(&dir, &mut results, &keys, &scales)?;
    Ok(results)
}

fn write_plot(
    dir: &Path,
    results: &BTreeMap<String, Value>,
    proxies: &[String],
    scales: &[usize],
) -> Result<()> {
    let panels = [
        Panel {
            title: "Network programming latency, p50".into(),
            y_label: "EndpointSlice write → new endpoint answers (ms)".into(),
            series: proxybench::series(results, "programming_p50_{s}_ms", proxies, scales),
        },
        Panel {
            title: "Sync: first write → every Service answers".into(),
            y_label: "seconds".into(),
            series: proxybench::series(results, "sync_all_{s}_s", proxies, scales),
        },
        Panel {
            title: "Sync: last write → every Service answers".into(),
            y_label: "seconds".into(),
            series: proxybench::series(results, "sync_after_writes_{s}_s", proxies, scales),
        },
    ];
    let path = dir.join("proxies.svg");
    std::fs::write(&path, proxybench::svg(&panels)).map_err(Error::io("write plot", &path))?;
    eprintln!("plot: {}", path.display());
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = if std::env::args().any(|a| a == "--replot") {
        replot()
    } else {
        bench(&TestEnv::connect().await).await
    };
    let results = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-proxies: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&results).unwrap_or_default()
    );
    let path = paths::repo_root().join("target/bench/results.json");
    match proxybench::merge_file(&path, &results) {
        Ok(()) => {
            eprintln!("merged into {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("writing results: {e}");
            ExitCode::FAILURE
        }
    }
}
