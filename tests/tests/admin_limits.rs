//! The admin listeners under attack: 2,000 idle half-open connections (a partial request
//! head, then nothing) plus a few clients dripping their head byte by byte, against a
//! node agent's healthz port and an `externalTrafficPolicy: Local` health-check NodePort
//! at once, and against the controller's admin port. Meanwhile other clients are still
//! answered within 1 s, the process's descriptors stay within its connection cap, the
//! server closes every attacking connection within its connection timeout, and the
//! process keeps doing its job (a new Service reaches the node's kernel within 1 s; a
//! pool Service gets its address).
//!
//! Needs root and the running local cluster with its node agents.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_e2e::controller::{ClassGuard, ControllerOpts, ControllerProc, install_crds};
use berth_e2e::env::NodeInfo;
use berth_e2e::nodeagent;
use berth_e2e::testing::{TestEnv, exec_in, lb_ips, wait_for};
use berth_runtime::admin::Limits;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// Idle connections per attacked port.
const FLOOD: usize = 2000;
/// Clients sending their head one byte every [`DRIP_EVERY`].
const DRIPPERS: usize = 20;
const DRIP_EVERY: Duration = Duration::from_millis(500);
/// The start of a request head that never ends.
const PARTIAL_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: flood\r\n";
/// A legitimate client must be answered within this, flood or not.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Descriptors a process may open beyond its baseline and its connection cap during the
/// flood (the one accepted socket waiting for a slot, `nft`/`conntrack` pipes of a sync,
/// a new apiserver connection).
const FD_SLACK: usize = 16;

/// Both binaries run with the admin server's default limits.
fn limits() -> Limits {
    Limits::default()
}

/// Lets this process hold thousands of sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= (3 * FLOOD) as libc::rlim_t,
        "RLIMIT_NOFILE hard limit {} is too low for the flood",
        lim.rlim_max
    );
}

/// Opens `n` connections to `addr` from network namespace `netns` (this process's own
/// when `None`), each sending [`PARTIAL_HEAD`]. Blocking: call off the runtime.
fn connect_from(netns: Option<String>, addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    std::thread::spawn(move || {
        if let Some(ns) = &netns {
            let file = std::fs::File::open(format!("/run/netns/{ns}"))
                .unwrap_or_else(|e| panic!("netns {ns}: {e}"));
            // SAFETY: setns(2) moves only this short-lived thread; sockets it creates
            // stay in that namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
        }
        (0..n)
            .map(|i| {
                let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
                // The server may already have closed it to make room: that is allowed.
                let _ = s.write_all(PARTIAL_HEAD);
                s
            })
            .collect()
    })
    .join()
    .expect("connecting thread")
}

/// The attack on one port: idle connections and drippers, all opened at `opened`.
struct Flood {
    addr: SocketAddr,
    opened: Instant,
    idle: Vec<tokio::net::TcpStream>,
    drippers: Vec<tokio::task::JoinHandle<Option<Duration>>>,
}

async fn flood(netns: Option<&str>, addr: SocketAddr) -> Flood {
    let opened = Instant::now();
    let ns = netns.map(str::to_string);
    let sockets = tokio::task::spawn_blocking(move || connect_from(ns, addr, FLOOD + DRIPPERS))
        .await
        .expect("connect task");
    let mut tokio_sockets = sockets.into_iter().map(|s| {
        s.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpStream::from_std(s).expect("tokio socket")
    });
    let idle: Vec<_> = tokio_sockets.by_ref().take(FLOOD).collect();
    let drippers = tokio_sockets.map(|s| tokio::spawn(drip(s))).collect();
    Flood {
        addr,
        opened,
        idle,
        drippers,
    }
}

/// Sends a header byte every [`DRIP_EVERY`] until the server closes the connection;
/// how long it stayed open (None: still open after a minute).
async fn drip(mut s: tokio::net::TcpStream) -> Option<Duration> {
    use tokio::io::AsyncWriteExt;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if s.write_all(b"x").await.is_err() {
            return Some(start.elapsed());
        }
        // A closed connection shows as EOF on read before a write fails.
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(DRIP_EVERY, s.read(&mut buf)).await {
            return Some(start.elapsed());
        }
    }
    None
}

/// Waits until the server has closed every connection of `flood` (EOF or reset), at
/// most until `deadline` after they were opened; panics naming what stayed open.
async fn assert_all_closed(flood: Flood, deadline: Duration) {
    let until = tokio::time::Instant::from_std(flood.opened + deadline);
    let still_open = Arc::new(AtomicUsize::new(0));
    let mut waits = tokio::task::JoinSet::new();
    for mut s in flood.idle {
        let still_open = still_open.clone();
        waits.spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                    Err(_) => {
                        still_open.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(Ok(0) | Err(_)) => return,
                    Ok(Ok(_)) => {}
                }
            }
        });
    }
    while waits.join_next().await.is_some() {}
    let open = still_open.load(Ordering::Relaxed);
    assert_eq!(
        open, 0,
        "{open} of {FLOOD} idle connections to {} still open {deadline:?} after they were opened",
        flood.addr
    );
    for d in flood.drippers {
        let lived = d.await.expect("dripper");
        assert!(
            lived.is_some_and(|l| l <= deadline),
            "a client dripping its head to {} stayed connected {lived:?} (limit {deadline:?})",
            flood.addr
        );
    }
}

fn fd_count(pid: i32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Samples a process's open descriptors every 50 ms until stopped; the largest count.
struct FdSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl FdSampler {
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut max = 0;
            while !flag.load(Ordering::Relaxed) {
                let n = fd_count(pid).unwrap_or_else(|| panic!("process {pid} is gone"));
                max = max.max(n);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        });
        Self { stop, task }
    }

    async fn max(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("fd sampler")
    }
}

/// HTTP status of a GET from `netns` (this namespace when `None`), and how long it took.
fn timed_status(netns: Option<&str>, url: &str) -> (String, Duration) {
    let argv = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "3",
        "--noproxy",
        "*",
        url,
    ];
    let start = Instant::now();
    let out = match netns {
        Some(ns) => exec_in(ns, &argv).expect("curl"),
        None => Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .expect("curl"),
    };
    let took = start.elapsed();
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        took,
    )
}

fn assert_answers(netns: Option<&str>, url: &str, status: &str) {
    let (got, took) = timed_status(netns, url);
    assert_eq!(got, status, "GET {url} during the flood");
    assert!(
        took < ANSWER_WITHIN,
        "GET {url} during the flood took {took:?}"
    );
}

/// The deadline by which every attacking connection must be gone: the server's
/// connection timeout, plus the time to open them and to notice.
fn close_deadline() -> Duration {
    limits().connection_timeout + Duration::from_secs(5)
}

fn assert_fds_bounded(what: &str, baseline: usize, max: usize) {
    let bound = baseline + limits().max_connections + FD_SLACK;
    assert!(
        max <= bound,
        "{what} held {max} descriptors during the flood (baseline {baseline}, cap {}, bound {bound})",
        limits().max_connections
    );
}

/// One echo pod pinned to `node`; its IP once running.
async fn echo_pod(env: &TestEnv, ns: &str, node: &NodeInfo) -> String {
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "echo"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}},
                 "template": {"metadata": {"labels": {"app": "echo"}},
                              "spec": {"nodeName": node.plan.name,
                                       "containers": [{"name": "echo", "image": "berth/echo",
                                                       "ports": [{"containerPort": 8080}]}]}}}
    }))
    .expect("deployment object");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .expect("create deployment");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let running_ip = || async {
        pods.list(&ListParams::default().labels("app=echo"))
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|p| p.status)
            .find(|s| s.phase.as_deref() == Some("Running"))
            .and_then(|s| s.pod_ip)
    };
    wait_for("echo pod running", Duration::from_secs(60), || async {
        running_ip().await.is_some()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    running_ip().await.expect("pod IP")
}

async fn create<K>(api: &Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
}

/// A `externalTrafficPolicy: Local` LoadBalancer Service for the echo pod; its
/// health-check NodePort.
async fn etp_local_service(env: &TestEnv, ns: &str) -> u16 {
    let svc: Service = create(
        &Api::namespaced(env.client.clone(), ns),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "local"},
               "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                        "selector": {"app": "echo"},
                        "ports": [{"port": 80, "targetPort": 8080}]}}),
    )
    .await;
    let port = svc
        .spec
        .and_then(|s| s.health_check_node_port)
        .expect("healthCheckNodePort");
    u16::try_from(port).expect("port")
}

/// A selector-less Service for `pod_ip` (its EndpointSlice written first); the time from
/// the Service's creation until its ClusterIP answers from `node`'s namespace.
async fn time_new_service(env: &TestEnv, ns: &str, node: &NodeInfo, pod_ip: &str) -> Duration {
    let _: EndpointSlice = create(
        &Api::namespaced(env.client.clone(), ns),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "late-1", "labels": {"kubernetes.io/service-name": "late"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
               "endpoints": [{"addresses": [pod_ip]}]}),
    )
    .await;
    let svc: Service = create(
        &Api::namespaced(env.client.clone(), ns),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late"},
               "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    )
    .await;
    let created = Instant::now();
    let ip = svc.spec.and_then(|s| s.cluster_ip).expect("clusterIP");
    let url = format!("http://{ip}/");
    let argv = ["curl", "-sf", "--max-time", "0.2", "--noproxy", "*", &url];
    while created.elapsed() < Duration::from_secs(10) {
        if exec_in(&node.plan.netns, &argv).is_ok_and(|o| o.status.success()) {
            return created.elapsed();
        }
    }
    panic!("{url} never answered from {}", node.plan.name);
}

/// A node agent: its healthz port and a health-check NodePort flooded at once.
#[tokio::test]
async fn node_agent_ports_survive_idle_half_open_connections() {
    raise_nofile();
    let env = TestEnv::connect().await;
    // Not the node the nodeproxy suite restarts agents on.
    let node = env.info.nodes[0].clone();
    nodeagent::wait_healthy(&node.plan, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ns = env.namespace("adm-agent").await;
    let pod_ip = echo_pod(&env, &ns.name, &node).await;
    let hc_port = etp_local_service(&env, &ns.name).await;
    let client = env.info.client_netns.clone();
    let node_ip = IpAddr::V4(node.plan.ip);
    let hc_url = format!("http://{node_ip}:{hc_port}/healthz");
    let healthz_url = format!("http://{node_ip}:{}/healthz", nodeagent::ADMIN_PORT);
    wait_for("health check 200", Duration::from_secs(30), || async {
        timed_status(Some(&client), &hc_url).0 == "200"
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let pid = nodeagent::agent_pid(&node.plan.name).expect("agent pid");
    let baseline = fd_count(pid).expect("agent descriptors");
    let sampler = FdSampler::start(pid);
    let (healthz_flood, hc_flood) = tokio::join!(
        flood(
            Some(&client),
            SocketAddr::new(node_ip, nodeagent::ADMIN_PORT)
        ),
        flood(Some(&client), SocketAddr::new(node_ip, hc_port)),
    );

    assert_answers(Some(&client), &healthz_url, "200");
    assert_answers(Some(&client), &hc_url, "200");
    let took = time_new_service(&env, &ns.name, &node, &pod_ip).await;
    assert!(
        took < ANSWER_WITHIN,
        "a new Service took {took:?} to answer during the flood"
    );

    assert_all_closed(healthz_flood, close_deadline()).await;
    assert_all_closed(hc_flood, close_deadline()).await;
    let max = sampler.max().await;
    assert_fds_bounded("the node agent", baseline, max);
    assert_eq!(
        nodeagent::agent_pid(&node.plan.name),
        Some(pid),
        "the agent was restarted during the flood"
    );
    assert_answers(Some(&client), &healthz_url, "200");
}

/// The pid of the controller serving `admin`.
fn controller_pid(admin: &str) -> i32 {
    let found = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.first()
                    .is_some_and(|a| a.ends_with(b"berth-controller"))
                    && args.contains(&admin.as_bytes())
            })
        });
    found.unwrap_or_else(|| panic!("no berth-controller serving {admin}"))
}

/// The controller's admin port flooded while it leads and provisions a pool Service.
#[tokio::test]
async fn controller_admin_port_survives_idle_half_open_connections() {
    raise_nofile();
    let env = TestEnv::connect().await;
    install_crds(&env);
    let ns = env.namespace("adm-ctl").await;
    let class = ClassGuard::with_spec(
        &env,
        &ns.name,
        json!({"pool": {"addresses": ["198.19.66.0/30"]}}),
    );
    let mut opts = ControllerOpts::new(&class.name, &ns.name);
    opts.aws = false;
    let controller = ControllerProc::spawn(&env.info, &format!("{}-0", ns.name), &opts)
        .unwrap_or_else(|e| panic!("start controller: {e}"));
    let base = format!("http://{}", controller.admin);
    wait_for(
        "controller ready and leading",
        Duration::from_secs(60),
        || async {
            timed_status(None, &format!("{base}/readyz")).0 == "200" && controller.is_leader().await
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.log_tail()));

    let pid = controller_pid(&controller.admin);
    let baseline = fd_count(pid).expect("controller descriptors");
    let sampler = FdSampler::start(pid);
    let addr: SocketAddr = controller.admin.parse().expect("admin address");
    let attack = flood(None, addr).await;

    assert_answers(None, &format!("{base}/healthz"), "200");
    assert_answers(None, &format!("{base}/readyz"), "200");
    assert_answers(None, &format!("{base}/metrics"), "200");
    let services: Api<Service> = Api::namespaced(env.client.clone(), &ns.name);
    let _: Service = create(
        &services,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "pooled"},
               "spec": {"type": "LoadBalancer", "loadBalancerClass": class.lb_class(),
                        "selector": {"app": "pooled"}, "ports": [{"port": 80}]}}),
    )
    .await;
    wait_for(
        "pool address during the flood",
        Duration::from_secs(10),
        || async {
            services
                .get("pooled")
                .await
                .is_ok_and(|s| !lb_ips(&s).is_empty())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.log_tail()));

    assert_all_closed(attack, close_deadline()).await;
    let max = sampler.max().await;
    assert_fds_bounded("the controller", baseline, max);
    assert!(controller.is_leader().await, "{}", controller.log_tail());

    // The controller releases the address and its finalizer before it is stopped.
    services
        .delete("pooled", &DeleteParams::default())
        .await
        .expect("delete service");
    wait_for("pooled Service gone", Duration::from_secs(30), || async {
        services.get_opt("pooled").await.is_ok_and(|s| s.is_none())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", controller.log_tail()));
}
