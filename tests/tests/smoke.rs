//! Smoke suite: proves the local environment itself. Needs root and the running local
//! cluster (`make test` starts it; `make up` for a manual run).

use std::collections::BTreeSet;
use std::time::Duration;

use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{TestEnv, curl_in, udp_in, wait_for};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;

fn running_pods_with_ip(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| {
            let st = p.status.as_ref();
            st.and_then(|s| s.phase.as_deref()) == Some("Running")
                && st.and_then(|s| s.pod_ip.as_deref()).is_some()
        })
        .collect()
}

#[tokio::test]
async fn nodes_are_ready_with_provider_ids_of_real_instances() {
    let env = TestEnv::connect().await;
    let nodes = Api::<Node>::all(env.client.clone())
        .list(&ListParams::default())
        .await
        .expect("list nodes");
    assert_eq!(nodes.items.len(), env.info.nodes.len());
    let sdk = env.aws().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    for info in &env.info.nodes {
        let node = nodes
            .items
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(info.plan.name.as_str()))
            .unwrap_or_else(|| panic!("node {} missing", info.plan.name));
        let spec = node.spec.as_ref().expect("node spec");
        assert_eq!(spec.provider_id.as_deref(), Some(info.provider_id.as_str()));
        assert_eq!(spec.pod_cidr.as_deref(), Some(info.plan.pod_cidr.as_str()));
        let ip = berth_e2e::awsinfra::instance_private_ip(&ec2, &info.instance_id)
            .await
            .expect("describe instance");
        assert_eq!(ip.as_deref(), Some(info.plan.ip.to_string().as_str()));
    }
}

#[tokio::test]
async fn apiserver_reports_the_pinned_release() {
    let env = TestEnv::connect().await;
    let version = env.client.apiserver_version().await.expect("/version");
    let pinned = berth_e2e::paths::read_version("KUBE_VERSION").expect("versions.env");
    assert_eq!(version.git_version, format!("v{pinned}"));
}

/// The seed's nginx Deployment: 3 Running pods on different nodes, an EndpointSlice
/// listing them, each reachable at its pod IP from another node, and the apiserver's
/// service proxy reaching them (the seed's `kubectl proxy` URL).
#[tokio::test]
async fn seed_nginx_deployment_runs_on_the_simulated_nodes() {
    let env = TestEnv::connect().await;
    let ns = env.namespace("smoke-nginx").await;
    env.apply_example(&ns.name, "seed/nginx-deployment.yaml");
    env.apply_example(&ns.name, "seed/nginx-service.yaml");

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns.name);
    let lp = ListParams::default().labels("app=nginx");
    wait_for(
        "3 Running nginx pods with IPs",
        Duration::from_secs(60),
        || async {
            pods.list(&lp)
                .await
                .map(|l| running_pods_with_ip(&l.items).len() == 3)
                .unwrap_or(false)
        },
    )
    .await
    .expect("pods");
    let list = pods.list(&lp).await.expect("list pods").items;
    let nodes: BTreeSet<_> = list
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert_eq!(nodes.len(), 3, "pods spread over {nodes:?}");

    let ips: BTreeSet<String> = list
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), &ns.name);
    let slp = ListParams::default().labels("kubernetes.io/service-name=nginx-service");
    wait_for(
        "EndpointSlice with the 3 ready pod IPs",
        Duration::from_secs(30),
        || async {
            let Ok(l) = slices.list(&slp).await else {
                return false;
            };
            let ready: BTreeSet<String> = l
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.iter().cloned())
                .collect();
            ready == ips
        },
    )
    .await
    .expect("endpointslice");

    for pod in &list {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("pod ip");
        let own = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("node");
        let other = env
            .info
            .nodes
            .iter()
            .find(|n| n.plan.name != own)
            .expect("another node");
        let body = curl_in(
            &other.plan.netns,
            &format!("http://{ip}/"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("pod {ip} from {}: {e}", other.plan.name));
        assert!(body.contains("Welcome to nginx!"), "body: {body}");
    }

    // The apiserver's service proxy (what `kubectl proxy` exposes) reaches a pod.
    let path = format!(
        "/api/v1/namespaces/{}/services/nginx-service/proxy/",
        ns.name
    );
    let body = env.kubectl(&["get", "--raw", &path]);
    assert!(
        body.contains("Welcome to nginx!"),
        "service proxy body: {body}"
    );
}

#[tokio::test]
async fn load_balancer_service_gets_cluster_ip_and_node_ports() {
    let env = TestEnv::connect().await;
    let ns = env.namespace("smoke-lb").await;
    let created = ServiceBuilder::load_balancer("web")
        .app("web")
        .named_port("http", "TCP", 80, Some(8080))
        .named_port("dns", "UDP", 53, None)
        .create(&env, &ns.name)
        .await;
    let spec = created.spec.expect("spec");
    let ip: std::net::Ipv4Addr = spec
        .cluster_ip
        .as_deref()
        .expect("clusterIP")
        .parse()
        .expect("IPv4 clusterIP");
    assert_eq!(
        ip.octets()[..2],
        [10, 96],
        "clusterIP {ip} in the service CIDR"
    );
    let ports = spec.ports.expect("ports");
    assert_eq!(ports.len(), 2);
    for p in ports {
        let np = p.node_port.expect("nodePort allocated");
        assert!((30000..=32767).contains(&np), "nodePort {np}");
    }
}

#[tokio::test]
async fn localstack_serves_elbv2_through_the_rust_sdk() {
    let env = TestEnv::connect().await;
    let sdk = env.aws().await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&sdk);
    let name = format!("smoke-{:08x}", rand::random::<u32>());
    let created = elb
        .create_load_balancer()
        .name(&name)
        .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
        .set_subnets(Some(env.info.aws.subnet_ids.clone()))
        .send()
        .await
        .expect("CreateLoadBalancer");
    let lb = created.load_balancers().first().expect("one load balancer");
    let arn = lb.load_balancer_arn().expect("arn").to_string();
    let described = elb
        .describe_load_balancers()
        .names(&name)
        .send()
        .await
        .expect("DescribeLoadBalancers");
    let found = described.load_balancers().first().expect("described");
    assert_eq!(found.load_balancer_arn(), Some(arn.as_str()));
    assert_eq!(found.vpc_id(), Some(env.info.aws.vpc_id.as_str()));
    assert!(found.dns_name().is_some_and(|d| d.starts_with(&name)));
    elb.delete_load_balancer()
        .load_balancer_arn(&arn)
        .send()
        .await
        .expect("DeleteLoadBalancer");
}

/// A pod's UDP port echoes from another node, and its TCP port answers with the pod name.
#[tokio::test]
async fn pod_udp_echo_and_http_name_are_reachable_across_nodes() {
    let env = TestEnv::connect().await;
    let ns = env.namespace("smoke-udp").await;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "echo"},
        "spec": {"nodeName": env.info.nodes[0].plan.name,
                 "containers": [{"name": "echo", "image": "berth/echo",
                                 "ports": [{"containerPort": 8080},
                                           {"containerPort": 5353, "protocol": "UDP"}]}]}
    }))
    .expect("pod object");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns.name);
    pods.create(&Default::default(), &pod)
        .await
        .expect("create pod");
    wait_for("pod echo Running", Duration::from_secs(30), || async {
        pods.get("echo")
            .await
            .is_ok_and(|p| !running_pods_with_ip(std::slice::from_ref(&p)).is_empty())
    })
    .await
    .expect("pod running");
    let ip = pods
        .get("echo")
        .await
        .expect("get pod")
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod ip");
    let other = &env.info.nodes[1].plan.netns;
    let body = curl_in(other, &format!("http://{ip}:8080/"), Duration::from_secs(5))
        .expect("http from another node");
    assert_eq!(body.trim(), "echo");
    let reply = udp_in(other, &format!("{ip}:5353"), "ping", Duration::from_secs(3))
        .expect("udp echo from another node");
    assert_eq!(reply, "echo ping");
}
