//! The controller's pool provider against the real local cluster: each case runs its own
//! `berth-controller` for its own pool LoadBalancerClass, namespace and addresses (disjoint
//! blocks of 198.19.1.0/24–198.19.7.0/24), so cases run in parallel. The node agents of the
//! environment announce and serve the addresses.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_e2e::controller::{
    ClassGuard, ControllerOpts, ControllerProc, aws_view, install_crds, logs_of, metric_sum,
};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, TestNamespace, curl_in, lb_condition, lb_hostname, lb_ips};
use berth_e2e::wait::{Diagnostics, wait_true, wait_until};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};

const OWNER: &str = "berth.dev/load-balancer-class";
const PIN: &str = "berth.dev/load-balancer-ips";
const SHARE: &str = "berth.dev/allow-shared-ip";
const LONG: Duration = Duration::from_secs(60);

/// Fields drop in order: the controllers stop before the namespace and class go.
struct Case {
    controllers: Vec<ControllerProc>,
    env: TestEnv,
    ns: TestNamespace,
    class: ClassGuard,
}

impl Case {
    /// A namespace, a pool class named like it with `pool` as its pool block, and one
    /// controller replica for it.
    async fn new(prefix: &str, pool: serde_json::Value) -> Self {
        let mut case = Self::without_controller(prefix, pool).await;
        case.start(&format!("{}-0", case.ns.name), case.opts());
        case
    }

    async fn without_controller(prefix: &str, pool: serde_json::Value) -> Self {
        let env = TestEnv::connect().await;
        install_crds(&env);
        let ns = env.namespace(prefix).await;
        let class = ClassGuard::with_spec(&env, &ns.name, serde_json::json!({ "pool": pool }));
        Self {
            env,
            ns,
            class,
            controllers: Vec::new(),
        }
    }

    fn opts(&self) -> ControllerOpts {
        ControllerOpts::new(&self.class.name, &self.ns.name)
    }

    fn start(&mut self, name: &str, opts: ControllerOpts) {
        let c = ControllerProc::spawn(&self.env.info, name, &opts)
            .unwrap_or_else(|e| panic!("start controller {name}: {e}"));
        self.controllers.push(c);
    }

    fn logs(&self) -> String {
        logs_of(&self.controllers)
    }

    /// What a timed-out wait shows: the controllers' logs.
    fn dump(&self) -> Diagnostics {
        Diagnostics::new(&self.env).controllers(&self.controllers)
    }

    /// The controllers' logs and the events of Service `name`.
    fn dump_of(&self, name: &str) -> Diagnostics {
        self.dump().events(&self.ns.name, name)
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.env.client.clone(), &self.ns.name)
    }

    /// Replaces the class's pool block.
    fn set_pool(&self, pool: serde_json::Value) {
        self.class
            .set_spec(&self.env, serde_json::json!({ "pool": pool }));
    }

    /// A LoadBalancer Service of the case's class selecting `app: <name>`.
    fn service(&self, name: &str) -> ServiceBuilder {
        ServiceBuilder::load_balancer(name)
            .class(&self.class.lb_class())
            .app(name)
    }

    /// A LoadBalancer Service of the case's class with TCP `ports`.
    async fn create(&self, name: &str, annotations: serde_json::Value, ports: &[i32]) -> Service {
        ports
            .iter()
            .fold(self.service(name).annotations(&annotations), |b, p| {
                b.named_port(&format!("p{p}"), "TCP", *p, None)
            })
            .create_with(&self.services())
            .await
    }

    /// The Service's state for a timed-out wait's message.
    async fn state(&self, name: &str) -> String {
        match self.services().get(name).await {
            Ok(s) => format!("status {:?}", s.status),
            Err(e) => e.to_string(),
        }
    }

    /// Waits until the Service is Ready with pool addresses; returns them.
    async fn wait_ips(&self, name: &str) -> Vec<String> {
        let api = self.services();
        let what = format!("service {name} ready with an address");
        wait_until(&what, LONG, &self.dump_of(name), async || {
            match api.get(name).await {
                Ok(s)
                    if lb_condition(&s).is_some_and(|(st, _, _)| st == "True")
                        && !lb_ips(&s).is_empty() =>
                {
                    Ok(lb_ips(&s))
                }
                _ => Err(self.state(name).await),
            }
        })
        .await
    }

    /// Waits until the Service's address list is `want`.
    async fn wait_ips_equal(&self, name: &str, want: &[&str]) {
        let api = self.services();
        let what = format!("service {name} at {want:?}");
        wait_until(&what, LONG, &self.dump_of(name), async || {
            match api.get(name).await {
                Ok(s) if lb_ips(&s) == want => Ok(()),
                _ => Err(self.state(name).await),
            }
        })
        .await
    }

    /// Waits for condition `reason` and returns (status, message).
    async fn wait_condition(&self, name: &str, reason: &str) -> (String, String) {
        let api = self.services();
        let what = format!("service {name} condition {reason}");
        wait_until(&what, LONG, &self.dump_of(name), async || {
            match api.get(name).await.ok().as_ref().and_then(lb_condition) {
                Some((st, r, msg)) if r == reason => Ok((st, msg)),
                _ => Err(self.state(name).await),
            }
        })
        .await
    }

    async fn events(&self, name: &str) -> Vec<(String, String, String)> {
        self.env.events(&self.ns.name, name).await
    }

    /// Waits for an event of `type_` and `reason` whose message contains every `needles`.
    async fn wait_event(&self, name: &str, type_: &str, reason: &str, needles: &[&str]) {
        let what = format!("{type_} event {reason} on {name}");
        wait_true(&what, LONG, &self.dump_of(name), async || {
            self.events(name)
                .await
                .iter()
                .any(|(t, r, m)| t == type_ && r == reason && needles.iter().all(|n| m.contains(n)))
        })
        .await
    }

    async fn delete(&self, name: &str) {
        self.services()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    /// Waits until the class status shows `allocated` and `available`.
    async fn wait_class_counts(&self, allocated: i64, available: i64) {
        let api: Api<berth_crds::LoadBalancerClass> = Api::all(self.env.client.clone());
        let what = format!("class status allocated {allocated}, available {available}");
        wait_until(&what, LONG, &self.dump(), async || {
            let status = api.get(&self.class.name).await.ok().and_then(|c| c.status);
            let done = status.as_ref().is_some_and(|s| {
                s.allocated == Some(allocated)
                    && s.available == Some(available)
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Accepted" && c.status == "True")
            });
            if done {
                Ok(())
            } else {
                Err(format!("class status {status:?}"))
            }
        })
        .await
    }
}

fn annotation(svc: &Service, key: &str) -> Option<String> {
    svc.metadata.annotations.as_ref()?.get(key).cloned()
}

/// A Service gets the lowest address of the pool (the /27's network address left out) as
/// one ingress entry with `ipMode: VIP` and its ports, a True condition naming address and
/// pool, a Normal event, the recorded class the node agents look at; the class reports its
/// counts in its status and in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_writes_address_vip_ports_and_condition() {
    let case = Case::new(
        "pool-alloc",
        serde_json::json!({"addresses": ["198.19.2.0/27"]}),
    )
    .await;
    case.service("web")
        .named_port("http", "TCP", 80, None)
        .named_port("dns", "UDP", 53, None)
        .create_with(&case.services())
        .await;
    assert_eq!(case.wait_ips("web").await, vec!["198.19.2.1"]);
    let svc = case.services().get("web").await.expect("get");
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.clone())
        .expect("ingress");
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
    assert!(ingress[0].hostname.is_none());
    let ports: Vec<(i32, String)> = ingress[0]
        .ports
        .as_ref()
        .expect("ports")
        .iter()
        .map(|p| (p.port, p.protocol.clone()))
        .collect();
    assert_eq!(
        ports,
        vec![(80, "TCP".to_string()), (53, "UDP".to_string())]
    );
    let (_, reason, message) = lb_condition(&svc).expect("condition");
    assert_eq!(reason, "Provisioned");
    assert!(
        message.contains("198.19.2.1") && message.contains(&case.class.name),
        "{message}"
    );
    assert_eq!(annotation(&svc, OWNER), Some(case.class.name.clone()));
    case.wait_event("web", "Normal", "Provisioned", &["198.19.2.1"])
        .await;
    case.create("second", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("second").await, vec!["198.19.2.2"]);
    case.wait_class_counts(2, 28).await;
    let metrics = case.controllers[0].metrics().await.expect("metrics");
    let class = case.class.name.as_str();
    assert_eq!(
        metric_sum(
            &metrics,
            "berth_pool_addresses_allocated",
            &[("class", class)]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "berth_pool_addresses_available",
            &[("class", class)]
        ),
        28.0
    );
}

/// Services in the restart case.
const SERVICES: usize = 100;

/// SERVICES Services get addresses; the controller is killed and a new one started: it
/// reconciles every Service and changes none (same addresses, same resourceVersions, so
/// not one write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_address_without_a_write() {
    let mut case = Case::without_controller(
        "pool-restart",
        serde_json::json!({"addresses": ["198.19.1.0/24"]}),
    )
    .await;
    let mut opts = case.opts();
    // Only the initial pass reconciles: every reconcile counted after the restart is one
    // Service's first look.
    opts.resync = "10m";
    opts.extra_args = vec!["--concurrency".into(), "16".into()];
    case.start(&format!("{}-0", case.ns.name), opts.clone());
    for i in 0..SERVICES {
        case.create(&format!("s{i:03}"), serde_json::json!({}), &[80])
            .await;
    }
    let api = case.services();
    wait_true(
        &format!("{SERVICES} Services with addresses"),
        LONG * 2,
        &case.dump(),
        async || {
            api.list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.iter().filter(|s| !lb_ips(s).is_empty()).count() == SERVICES)
        },
    )
    .await;
    let snapshot = |items: Vec<Service>| -> BTreeMap<String, (Vec<String>, String)> {
        items
            .into_iter()
            .map(|s| {
                let ips = lb_ips(&s);
                (
                    s.metadata.name.clone().unwrap_or_default(),
                    (ips, s.metadata.resource_version.clone().unwrap_or_default()),
                )
            })
            .collect()
    };
    // The first controller may still be finishing a write it started (a CI run saw one
    // Service's resourceVersion move after every address was out): the snapshot is taken
    // once nothing has changed for 3 s, so only the restart's writes can differ.
    let mut before = snapshot(api.list(&ListParams::default()).await.expect("list").items);
    let mut still_since = std::time::Instant::now();
    let quiet_by = std::time::Instant::now() + LONG;
    while still_since.elapsed() < Duration::from_secs(3) {
        assert!(
            std::time::Instant::now() < quiet_by,
            "Services kept changing"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshot(api.list(&ListParams::default()).await.expect("list").items);
        if now != before {
            before = now;
            still_since = std::time::Instant::now();
        }
    }
    let distinct: std::collections::BTreeSet<&Vec<String>> =
        before.values().map(|(ips, _)| ips).collect();
    assert_eq!(distinct.len(), SERVICES, "no address given twice");
    case.controllers[0].kill();
    case.start(&format!("{}-1", case.ns.name), opts);
    let fresh = &case.controllers[1];
    wait_true(
        "the new controller reconciled every Service",
        LONG,
        &case.dump(),
        async || {
            fresh.metrics().await.is_ok_and(|m| {
                metric_sum(&m, "berth_reconciles_total", &[("outcome", "success")])
                    >= SERVICES as f64
            })
        },
    )
    .await;
    let after = snapshot(api.list(&ListParams::default()).await.expect("list").items);
    assert_eq!(before, after, "addresses or resourceVersions changed");
    case.wait_class_counts(SERVICES as i64, 254 - SERVICES as i64)
        .await;
}

/// Two replicas: the leader is killed, the other takes over, keeps every address and
/// gives a new Service a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_other_replica_keeps_addresses() {
    let mut case = Case::without_controller(
        "pool-leader",
        serde_json::json!({"addresses": ["198.19.2.32/28"]}),
    )
    .await;
    for i in 0..2 {
        case.start(&format!("{}-{i}", case.ns.name), case.opts());
    }
    let mut held = BTreeMap::new();
    for name in ["a", "b", "c"] {
        case.create(name, serde_json::json!({}), &[80]).await;
        held.insert(name, case.wait_ips(name).await);
    }
    let mut leaders = Vec::new();
    for (i, c) in case.controllers.iter().enumerate() {
        if c.is_leader().await {
            leaders.push(i);
        }
    }
    assert_eq!(leaders.len(), 1, "exactly one leader\n{}", case.logs());
    case.controllers[leaders[0]].kill();
    case.create("d", serde_json::json!({}), &[80]).await;
    let d = case.wait_ips("d").await;
    assert!(case.controllers[1 - leaders[0]].is_leader().await);
    for (name, ips) in &held {
        assert_ne!(ips, &d, "d got {name}'s address");
        assert_eq!(&lb_ips(&case.services().get(name).await.expect("get")), ips);
    }
}

/// A pool of two addresses: the third Service gets PoolExhausted and a Warning event; when
/// one of the others is deleted it gets the freed address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_then_recovery_when_an_address_frees_up() {
    let case = Case::new(
        "pool-exhaust",
        serde_json::json!({"addresses": ["198.19.2.48/30"]}),
    )
    .await;
    case.create("a", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("a").await, vec!["198.19.2.49"]);
    case.create("b", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("b").await, vec!["198.19.2.50"]);
    case.create("c", serde_json::json!({}), &[80]).await;
    let (status, message) = case.wait_condition("c", "PoolExhausted").await;
    assert_eq!(status, "False");
    assert!(message.contains(&case.class.name), "{message}");
    case.wait_event("c", "Warning", "PoolExhausted", &[]).await;
    case.wait_class_counts(2, 0).await;
    assert!(lb_ips(&case.services().get("c").await.expect("get")).is_empty());
    case.delete("a").await;
    case.wait_ips_equal("c", &["198.19.2.49"]).await;
    case.wait_event("c", "Normal", "Provisioned", &["198.19.2.49"])
        .await;
}

/// Same sharing key and namespace, disjoint ports: one address. The same key with a port
/// already taken: PortConflict and no address. No key: an address of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_needs_the_key_and_disjoint_ports() {
    let case = Case::new(
        "pool-share",
        serde_json::json!({"addresses": ["198.19.2.64/28"]}),
    )
    .await;
    let key = serde_json::json!({ SHARE: "web" });
    case.create("http", key.clone(), &[80]).await;
    let first = case.wait_ips("http").await;
    case.create("https", key.clone(), &[443]).await;
    assert_eq!(case.wait_ips("https").await, first);
    case.create("clash", key.clone(), &[80, 8080]).await;
    let (status, message) = case.wait_condition("clash", "PortConflict").await;
    assert_eq!(status, "False");
    assert!(
        message.contains("80/TCP") && message.contains("http"),
        "{message}"
    );
    case.wait_event("clash", "Warning", "PortConflict", &["80/TCP"])
        .await;
    case.create("alone", serde_json::json!({}), &[8443]).await;
    let alone = case.wait_ips("alone").await;
    assert_ne!(alone, first);
    assert!(lb_ips(&case.services().get("clash").await.expect("get")).is_empty());
    case.wait_class_counts(2, 12).await;
}

/// Pins through spec.loadBalancerIP and through the annotation; a pin outside the pool or
/// on an address another Service holds gives AddressUnavailable with a Warning event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_through_the_spec_and_the_annotation() {
    let case = Case::new(
        "pool-pin",
        serde_json::json!({"addresses": ["198.19.2.80/28"]}),
    )
    .await;
    case.service("spec-pin")
        .set("loadBalancerIP", "198.19.2.90")
        .port(80)
        .create_with(&case.services())
        .await;
    case.wait_ips_equal("spec-pin", &["198.19.2.90"]).await;
    case.create("ann-pin", serde_json::json!({ PIN: "198.19.2.91" }), &[80])
        .await;
    case.wait_ips_equal("ann-pin", &["198.19.2.91"]).await;
    case.create("auto", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("auto").await, vec!["198.19.2.81"]);

    case.create("outside", serde_json::json!({ PIN: "198.19.3.200" }), &[80])
        .await;
    let (status, message) = case.wait_condition("outside", "AddressUnavailable").await;
    assert_eq!(status, "False");
    assert!(
        message.contains("198.19.3.200") && message.contains("not in pool"),
        "{message}"
    );
    case.wait_event(
        "outside",
        "Warning",
        "AddressUnavailable",
        &["198.19.3.200"],
    )
    .await;
    case.create("taken", serde_json::json!({ PIN: "198.19.2.90" }), &[443])
        .await;
    let (_, message) = case.wait_condition("taken", "AddressUnavailable").await;
    assert!(message.contains("spec-pin"), "{message}");
    assert!(lb_ips(&case.services().get("taken").await.expect("get")).is_empty());
    // Re-pinned to a free address inside the pool, it gets it.
    case.services()
        .patch(
            "outside",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": { PIN: "198.19.2.92" }}})),
        )
        .await
        .expect("re-pin");
    case.wait_ips_equal("outside", &["198.19.2.92"]).await;
}

/// Addresses removed from the pool: the Services holding them move to addresses still in
/// it, each with a Normal event naming old and new address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_the_pool_moves_services_with_events() {
    let case = Case::new(
        "pool-shrink",
        serde_json::json!({"addresses": ["198.19.2.96/28"]}),
    )
    .await;
    case.create("a", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("a").await, vec!["198.19.2.97"]);
    case.create("b", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("b").await, vec!["198.19.2.98"]);
    case.set_pool(serde_json::json!({"addresses": ["198.19.2.98-198.19.2.100"]}));
    case.wait_ips_equal("a", &["198.19.2.99"]).await;
    case.wait_event(
        "a",
        "Normal",
        "AddressMoved",
        &["198.19.2.97", "198.19.2.99", "no longer in pool"],
    )
    .await;
    // b's address is still in the pool: it stays.
    assert_eq!(
        lb_ips(&case.services().get("b").await.expect("get")),
        vec!["198.19.2.98"]
    );
    assert!(
        !case
            .events("b")
            .await
            .iter()
            .any(|(_, r, _)| r == "AddressMoved")
    );
}

/// `autoAssign: false`: a Service without a pin gets AutoAssignDisabled, a pinned one its
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_assign_off_serves_only_pinned_services() {
    let case = Case::new(
        "pool-noauto",
        serde_json::json!({"addresses": ["198.19.2.112/28"], "autoAssign": false}),
    )
    .await;
    case.create("plain", serde_json::json!({}), &[80]).await;
    case.create("pinned", serde_json::json!({ PIN: "198.19.2.120" }), &[80])
        .await;
    case.wait_ips_equal("pinned", &["198.19.2.120"]).await;
    let (status, message) = case.wait_condition("plain", "AutoAssignDisabled").await;
    assert_eq!(status, "False");
    assert!(message.contains(PIN), "{message}");
    assert!(lb_ips(&case.services().get("plain").await.expect("get")).is_empty());
}

/// serviceSelector and namespaceSelector: a Service outside either gets NotSelected; a
/// namespace label added later brings the matching Service its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_restrict_services_and_namespaces() {
    let case = Case::new(
        "pool-select",
        serde_json::json!({
            "addresses": ["198.19.2.128/28"],
            "serviceSelector": {"matchLabels": {"tier": "edge"}},
            "namespaceSelector": {"matchExpressions": [
                {"key": "berth.dev/pool-e2e", "operator": "In", "values": ["yes"]}
            ]}
        }),
    )
    .await;
    for (name, tier) in [("edge", "edge"), ("core", "core")] {
        ServiceBuilder::load_balancer(name)
            .class(&case.class.lb_class())
            .label("tier", tier)
            .port(80)
            .create_with(&case.services())
            .await;
    }
    let (_, message) = case.wait_condition("edge", "NotSelected").await;
    assert!(message.contains("namespaceSelector"), "{message}");
    case.wait_event("edge", "Warning", "NotSelected", &[]).await;
    Api::<Namespace>::all(case.env.client.clone())
        .patch(
            &case.ns.name,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"berth.dev/pool-e2e": "yes"}}}),
            ),
        )
        .await
        .expect("label namespace");
    assert_eq!(case.wait_ips("edge").await, vec!["198.19.2.129"]);
    let (_, message) = case.wait_condition("core", "NotSelected").await;
    assert!(message.contains("serviceSelector"), "{message}");
    assert!(lb_ips(&case.services().get("core").await.expect("get")).is_empty());
}

/// A Service moved from the pool class to an AWS class (type round trip, as
/// loadBalancerClass cannot change in place) releases its address at once, so a waiting
/// Service gets it, and gets an NLB hostname; moved back, its NLB is deleted and it gets
/// a pool address again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_between_pool_and_aws_classes_releases_what_the_old_class_held() {
    let mut case = Case::without_controller(
        "pool-move",
        serde_json::json!({"addresses": ["198.19.2.145"]}),
    )
    .await;
    let aws_class = ClassGuard::create(
        &case.env,
        &format!("{}-aws", case.ns.name),
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    );
    let mut opts = case.opts();
    opts.classes.push(aws_class.name.clone());
    case.start(&format!("{}-0", case.ns.name), opts);
    let sdk = case.env.aws().await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);

    case.create("mover", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("mover").await, vec!["198.19.2.145"]);
    case.create("waiter", serde_json::json!({}), &[80]).await;
    case.wait_condition("waiter", "PoolExhausted").await;

    let retype = |class: Option<String>| {
        let spec = match class {
            Some(c) => serde_json::json!({"type": "LoadBalancer", "loadBalancerClass": c}),
            None => serde_json::json!({"type": "ClusterIP", "loadBalancerClass": null}),
        };
        serde_json::json!({ "spec": spec })
    };
    for patch in [retype(None), retype(Some(aws_class.lb_class()))] {
        case.services()
            .patch("mover", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("retype mover");
    }
    case.wait_ips_equal("waiter", &["198.19.2.145"]).await;
    let api = case.services();
    let dump = case.dump_of("mover");
    wait_until(
        "mover ready with an NLB hostname",
        LONG,
        &dump,
        async || {
            let s = api.get("mover").await.map_err(|e| e.to_string())?;
            let ready = lb_hostname(&s).is_some()
                && lb_ips(&s).is_empty()
                && lb_condition(&s).is_some_and(|(st, _, _)| st == "True")
                && annotation(&s, OWNER) == Some(aws_class.name.clone());
            if ready {
                Ok(())
            } else {
                Err(format!("{:?}", (s.metadata.annotations, s.status)))
            }
        },
    )
    .await;
    let mover = api.get("mover").await.expect("get");
    let uid = mover.metadata.uid.clone().expect("uid");
    let view = aws_view(&elb, &uid).await.expect("aws view");
    assert_eq!(view.load_balancers.len(), 1, "{view:?}");

    // Back to the pool class: the NLB goes, the freed address comes.
    case.delete("waiter").await;
    for patch in [retype(None), retype(Some(case.class.lb_class()))] {
        case.services()
            .patch("mover", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("retype mover");
    }
    case.wait_ips_equal("mover", &["198.19.2.145"]).await;
    wait_true("the mover's NLB deleted", LONG, &dump, async || {
        aws_view(&elb, &uid)
            .await
            .is_ok_and(|v| v.load_balancers.is_empty() && v.target_groups.is_empty())
    })
    .await;
    assert!(lb_hostname(&api.get("mover").await.expect("get")).is_none());
}

/// A malformed pin annotation: InvalidAnnotation with a Warning event naming it; the other
/// Service of the class gets its address; fixed, the Service gets the pinned address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_annotation_gives_condition_and_event_and_spares_others() {
    let case = Case::new(
        "pool-bad",
        serde_json::json!({"addresses": ["198.19.2.160/28"]}),
    )
    .await;
    case.create(
        "bad",
        serde_json::json!({ PIN: "198.19.2.170,not-an-ip" }),
        &[80],
    )
    .await;
    case.create("good", serde_json::json!({}), &[80]).await;
    let (status, message) = case.wait_condition("bad", "InvalidAnnotation").await;
    assert_eq!(status, "False");
    assert!(message.contains("not-an-ip"), "{message}");
    case.wait_event("bad", "Warning", "InvalidAnnotation", &["not-an-ip"])
        .await;
    assert_eq!(case.wait_ips("good").await, vec!["198.19.2.161"]);
    assert!(lb_ips(&case.services().get("bad").await.expect("get")).is_empty());
    case.services()
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": { PIN: "198.19.2.170" }}}),
            ),
        )
        .await
        .expect("fix");
    case.wait_ips_equal("bad", &["198.19.2.170"]).await;
}

/// A controller with no AWS configuration at all (no endpoint, region or credentials)
/// serves a pool class and never calls AWS or complains about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_only_controller_runs_without_aws_configuration() {
    let mut case = Case::without_controller(
        "pool-bare",
        serde_json::json!({"addresses": ["198.19.2.176/28"]}),
    )
    .await;
    let mut opts = case.opts();
    opts.aws = false;
    opts.gc_interval = "1s";
    case.start(&format!("{}-0", case.ns.name), opts);
    case.create("web", serde_json::json!({}), &[80]).await;
    assert_eq!(case.wait_ips("web").await, vec!["198.19.2.177"]);
    case.delete("web").await;
    let api = case.services();
    wait_true("web deleted", LONG, &case.dump_of("web"), async || {
        api.get_opt("web").await.is_ok_and(|s| s.is_none())
    })
    .await;
    // Several sweep intervals have passed by now; the sweep stays off without AWS classes.
    let metrics = case.controllers[0].metrics().await.expect("metrics");
    assert_eq!(metric_sum(&metrics, "berth_aws_calls_total", &[]), 0.0);
    let log = std::fs::read_to_string(&case.controllers[0].log).expect("log");
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");
}

/// The whole path: the controller allocates an address for the seed's nginx, a node agent
/// announces it and the client outside the cluster gets the nginx page from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allocated_address_serves_the_client() {
    let case = Case::new(
        "pool-traffic",
        serde_json::json!({"addresses": ["198.19.3.0/29"]}),
    )
    .await;
    case.env
        .apply_example(&case.ns.name, "seed/nginx-deployment.yaml");
    case.service("nginx")
        .named_port("http", "TCP", 80, Some(80))
        .create_with(&case.services())
        .await;
    assert_eq!(case.wait_ips("nginx").await, vec!["198.19.3.1"]);
    let url = "http://198.19.3.1/";
    let dump = case.dump_of("nginx").node_agents(&case.env.info);
    wait_until(
        "nginx at the pool address from the client",
        LONG,
        &dump,
        async || match curl_in(&case.env.info.client_netns, url, Duration::from_secs(2)) {
            Ok(body) if body.contains("Welcome to nginx!") => Ok(()),
            other => Err(format!("last: {other:?}")),
        },
    )
    .await;
}
