//! `make bench` for the node agent: full sync (model build from Kubernetes objects,
//! render, `nft -f` apply) at 1k and 10k Services × 10 endpoints, single-Service
//! incremental changes at 10k over the agent's netlink path (p50 and p99; one endpoint
//! replaced, one Service added) and through `nft -f` for comparison, peak memory, and first-connection latency through the rules at 100 vs 10k
//! Services. Runs in a private network namespace of its own (unshare), which the kernel
//! removes when the process exits. Needs root.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use berth_nodeproxy::proxy::convert;
use berth_nodeproxy::proxy::index::{Index, Kind, NodeConfig};
use berth_nodeproxy::proxy::nlnft::NftSocket;
use berth_nodeproxy::proxy::ruleset;
use berth_nodeproxy::proxy::sync::{Changes, Programmed};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const ENDPOINTS: usize = 10;
const NODE: &str = "bench-node";

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Endpoint addresses are local (a `local` route covers 10.255.0.0/16), so every
/// Service reaches the one listener of the benchmark.
fn endpoint(i: usize, j: usize) -> Ipv4Addr {
    let n = i * ENDPOINTS + j;
    Ipv4Addr::new(10, 255, (n / 250 % 250) as u8, (n % 250 + 1) as u8)
}

fn objects(count: usize, generation: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(count);
    let mut slices = Vec::with_capacity(count);
    for i in 0..count {
        let (s, e) = object(i, generation);
        services.push(s);
        slices.push(e);
    }
    (services, slices)
}

/// Service `svc-i` and its EndpointSlice.
fn object(i: usize, generation: usize) -> (Service, EndpointSlice) {
    let name = format!("svc-{i}");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "bench", "name": name},
        "spec": {"clusterIP": vip(i).to_string(), "clusterIPs": [vip(i).to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap_or_default();
    let eps: Vec<_> = (0..ENDPOINTS)
        .map(|j| {
            serde_json::json!({"addresses": [endpoint(i + generation, j).to_string()],
                               "conditions": {"ready": true}, "nodeName": format!("node-{}", j % 3)})
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "bench", "name": format!("{name}-abc"),
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .unwrap_or_else(|_| EndpointSlice {
        address_type: "IPv4".into(),
        ..Default::default()
    });
    (svc, slice)
}

/// Watch events → index → the rules of every Service.
fn build(services: &[Service], slices: &[EndpointSlice]) -> Index {
    let mut idx = Index::new(NodeConfig {
        name: NODE.into(),
        addresses: vec![
            "198.18.1.10"
                .parse()
                .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ],
        cluster_cidrs: Vec::new(),
        service_cidrs: Vec::new(),
    });
    let mut w = Vec::new();
    for s in services {
        if let Some(m) = convert::service(s, &mut w) {
            idx.apply_service(m.id.clone(), Some(m));
        }
    }
    for s in slices {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let name = s.metadata.name.clone().unwrap_or_default();
        idx.apply_slice(&ns, &name, convert::slice(s, &mut w));
    }
    for k in [Kind::Services, Kind::Slices, Kind::Node, Kind::Nodes] {
        idx.end_relist(k);
    }
    // Claims are resolved (and the model's Services filled) when work is taken.
    idx.take_work(true);
    idx
}

fn nft(tx: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(tx.as_bytes())
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(500)
            .collect())
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{} failed", args.join(" ")))
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

struct FullSync {
    build_ms: f64,
    render_ms: f64,
    apply_ms: f64,
    total_ms: f64,
    elements: usize,
    programmed: Programmed,
}

fn full_sync(count: usize) -> Result<FullSync, String> {
    let (services, slices) = objects(count, 0);
    let t0 = Instant::now();
    let idx = build(&services, &slices);
    // The agent converts watch events as they arrive; it never holds every object.
    drop((services, slices));
    let rules = ruleset::all_rules(&idx.model);
    let t1 = Instant::now();
    let (plan, programmed) = Programmed::full(&idx.model.node, rules, None);
    let t2 = Instant::now();
    nft(&plan.transaction)?;
    let t3 = Instant::now();
    Ok(FullSync {
        build_ms: ms(t1 - t0),
        render_ms: ms(t2 - t1),
        apply_ms: ms(t3 - t2),
        total_ms: ms(t3 - t0),
        elements: programmed.element_count(),
        programmed,
    })
}

/// Which single-Service change to time.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// Service `i` of the table gets one endpoint replaced by a new address.
    ReplaceEndpoint,
    /// A Service beyond the table's count, with its endpoints, is added.
    AddService,
}

/// How the transaction goes to the kernel: the agent's kept-open netlink socket, or an
/// `nft -f` process (the path incremental syncs took before).
enum Path<'a> {
    Netlink(&'a mut NftSocket),
    Nft,
}

/// Timings of one change: total, agent side (model, rules, plan, record), kernel.
struct Timed {
    total: Vec<Duration>,
    agent: Vec<Duration>,
    kernel: Vec<Duration>,
}

fn percentile(v: &[Duration], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    let at = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(at).map(|d| ms(*d)).unwrap_or(f64::NAN)
}

/// The watch objects of change `r` of kind `change` on a table of `count` Services.
fn changed_objects(
    change: Change,
    count: usize,
    r: usize,
) -> Result<(Service, EndpointSlice), String> {
    let i = match change {
        Change::ReplaceEndpoint => (r * 7919) % count,
        Change::AddService => count + r,
    };
    let (svc, mut slice) = object(i, 0);
    if change == Change::ReplaceEndpoint
        && let Some(first) = slice.endpoints.as_mut().and_then(|e| e.first_mut())
    {
        first.addresses = vec![Ipv4Addr::new(10, 255, 251, (r % 250 + 1) as u8).to_string()];
    }
    Ok((svc, slice))
}

/// `runs` single-Service changes applied one after the other, each timed from the watch
/// objects to the kernel's commit.
fn incremental(
    p: &mut Programmed,
    count: usize,
    runs: usize,
    change: Change,
    mut path: Path,
) -> Result<Timed, String> {
    let node = p.node().clone();
    let mut t = Timed {
        total: Vec::new(),
        agent: Vec::new(),
        kernel: Vec::new(),
    };
    for r in 0..runs {
        let (svc, slice) = changed_objects(change, count, r)?;
        let start = Instant::now();
        let mut w = Vec::new();
        let model_svc = convert::service(&svc, &mut w).ok_or("service not proxied")?;
        let model_slice = convert::slice(&slice, &mut w).ok_or("slice not used")?;
        let rules = ruleset::service_rules(&model_svc, [model_slice].iter(), &node);
        let changes: Changes = BTreeMap::from([(model_svc.id.clone(), Some(rules))]);
        let plan = p.plan_incremental(&changes);
        let planned = Instant::now();
        match &mut path {
            Path::Netlink(sock) => {
                let elements = plan.elements.as_ref().ok_or("not an element change")?;
                sock.commit(elements).map_err(|e| e.to_string())?;
            }
            Path::Nft => nft(&plan.transaction)?,
        }
        let applied = Instant::now();
        p.commit(changes);
        t.total.push(start.elapsed());
        t.agent.push(planned - start + applied.elapsed());
        t.kernel.push(applied - planned);
    }
    Ok(t)
}

/// Times single-Service changes at `count` Services, over netlink and (for comparison,
/// fewer runs) nft -f, and records them.
fn incremental_figures(
    p: &mut Programmed,
    count: usize,
    r: &mut BTreeMap<String, f64>,
) -> Result<(), String> {
    let mut sock = NftSocket::open().map_err(|e| format!("netlink socket: {e}"))?;
    // Warm-up: the first batches fault in the kernel's set backends' memory.
    incremental(
        p,
        count,
        20,
        Change::ReplaceEndpoint,
        Path::Netlink(&mut sock),
    )?;
    let rep = incremental(
        p,
        count,
        1000,
        Change::ReplaceEndpoint,
        Path::Netlink(&mut sock),
    )?;
    let (p50, p99) = (percentile(&rep.total, 0.5), percentile(&rep.total, 0.99));
    let (agent, kernel) = (percentile(&rep.agent, 0.5), percentile(&rep.kernel, 0.5));
    let kernel99 = percentile(&rep.kernel, 0.99);
    println!(
        "10k Services: one endpoint replaced over netlink: p50 {p50:.3} ms, p99 {p99:.3} ms \
         (agent p50 {agent:.3} ms, kernel batch p50 {kernel:.3} ms, p99 {kernel99:.3} ms; 1000 changes)"
    );
    r.insert("nodeproxy.incremental_10k_ms".into(), p50);
    r.insert("nodeproxy.incremental_10k_p50_ms".into(), p50);
    r.insert("nodeproxy.incremental_10k_p99_ms".into(), p99);
    r.insert("nodeproxy.incremental_10k_agent_ms".into(), agent);
    r.insert("nodeproxy.incremental_10k_kernel_ms".into(), kernel);
    let add = incremental(p, count, 300, Change::AddService, Path::Netlink(&mut sock))?;
    let (a50, a99) = (percentile(&add.total, 0.5), percentile(&add.total, 0.99));
    let akernel = percentile(&add.kernel, 0.5);
    println!(
        "10k Services: one Service added over netlink: p50 {a50:.3} ms, p99 {a99:.3} ms \
         (kernel batch p50 {akernel:.3} ms; 300 Services)"
    );
    r.insert("nodeproxy.service_added_10k_p50_ms".into(), a50);
    r.insert("nodeproxy.service_added_10k_p99_ms".into(), a99);
    r.insert("nodeproxy.service_added_10k_kernel_ms".into(), akernel);
    let old = incremental(p, count, 21, Change::ReplaceEndpoint, Path::Nft)?;
    let (o50, o99) = (percentile(&old.total, 0.5), percentile(&old.total, 0.99));
    println!(
        "10k Services: one endpoint replaced through nft -f (the previous path): p50 {o50:.2} ms, \
         p99 {o99:.2} ms (21 changes)"
    );
    r.insert("nodeproxy.incremental_10k_nft_ms".into(), o50);
    Ok(())
}

/// Median time of `n` first connections (new conntrack entry, NAT lookup through the
/// table) to random Services among the first `count`.
fn connect_latency(count: usize, n: usize) -> Result<f64, String> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = (seed % count as u64) as usize;
        let addr = SocketAddr::from((vip(i), 80));
        let start = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        times.push(start.elapsed());
        drop(s);
    }
    times.sort();
    Ok(times[times.len() / 2].as_secs_f64() * 1e3)
}

fn status_kib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn run() -> Result<BTreeMap<String, f64>, String> {
    // SAFETY: unshare(2) before any thread exists; the namespace dies with the process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (the benchmark needs root)",
            std::io::Error::last_os_error()
        ));
    }
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&["ip", "route", "add", "local", "10.255.0.0/16", "dev", "lo"])?;
    sh(&["ip", "route", "add", "local", "10.96.0.0/16", "dev", "lo"])?;
    sh(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"])?;
    let listener = TcpListener::bind("0.0.0.0:8080").map_err(|e| format!("listen: {e}"))?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut r = BTreeMap::new();
    let samples = 3000;

    let small = full_sync(100)?;
    println!("100 Services: full sync {:.1} ms", small.total_ms);
    drop(small);

    let k1 = full_sync(1_000)?;
    println!(
        "1k Services x {ENDPOINTS}: full sync {:.1} ms (build {:.1}, render {:.1}, nft {:.1}); {} elements",
        k1.total_ms, k1.build_ms, k1.render_ms, k1.apply_ms, k1.elements
    );
    r.insert("nodeproxy.full_sync_1k_ms".into(), k1.total_ms);
    drop(k1);

    let mut k10 = full_sync(10_000)?;
    println!(
        "10k Services x {ENDPOINTS}: full sync {:.1} ms (build {:.1}, render {:.1}, nft {:.1}); {} elements",
        k10.total_ms, k10.build_ms, k10.render_ms, k10.apply_ms, k10.elements
    );
    r.insert("nodeproxy.full_sync_10k_ms".into(), k10.total_ms);
    r.insert("nodeproxy.full_sync_10k_build_ms".into(), k10.build_ms);
    r.insert("nodeproxy.full_sync_10k_render_ms".into(), k10.render_ms);
    r.insert("nodeproxy.full_sync_10k_nft_ms".into(), k10.apply_ms);
    r.insert("nodeproxy.elements_10k".into(), k10.elements as f64);
    incremental_figures(&mut k10.programmed, 10_000, &mut r)?;
    let rss = status_kib("VmHWM:") / 1024.0;
    println!(
        "peak RSS of the agent side (model, rules, programmed record, transaction text) at 10k: {rss:.1} MiB"
    );
    r.insert(
        "nodeproxy.peak_rss_10k_mib".into(),
        (rss * 10.0).round() / 10.0,
    );
    drop(k10);

    // Alternate the two table sizes so machine noise hits both alike.
    let (mut l100, mut l10k) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        full_sync(100)?;
        connect_latency(100, 500)?;
        l100.push(connect_latency(100, samples)?);
        full_sync(10_000)?;
        connect_latency(10_000, 500)?;
        l10k.push(connect_latency(10_000, samples)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lat_100, lat_10k) = (median(l100), median(l10k));
    let ratio = lat_10k / lat_100;
    println!(
        "first connection (median of 3 rounds x {samples}): {lat_100:.4} ms at 100 Services, \
         {lat_10k:.4} ms at 10k (ratio {ratio:.3})"
    );
    let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    r.insert(
        "nodeproxy.first_connection_100_ms".into(),
        round(lat_100, 4),
    );
    r.insert(
        "nodeproxy.first_connection_10k_ms".into(),
        round(lat_10k, 4),
    );
    r.insert(
        "nodeproxy.latency_ratio_10k_over_100".into(),
        round(ratio, 3),
    );
    Ok(r)
}

fn main() -> ExitCode {
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("bench")
                .join("results.json")
        });
    match run() {
        Ok(results) => {
            // Merge with figures other benchmarks wrote to the same file.
            let mut all: BTreeMap<String, serde_json::Value> = std::fs::read_to_string(&out)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            for (k, v) in results {
                all.insert(k, serde_json::json!(v));
            }
            if let Some(dir) = out.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match serde_json::to_string_pretty(&all).map(|t| std::fs::write(&out, t + "\n")) {
                Ok(Ok(())) => {
                    println!("wrote {}", out.display());
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => {
                    eprintln!("bench: write {}: {e}", out.display());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
