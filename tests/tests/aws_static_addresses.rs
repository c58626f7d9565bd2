//! Static NLB addresses (`eip-allocations`, `private-ipv4-addresses`, `ipv6-addresses`)
//! against the real cluster and LocalStack: the subnet mapping LocalStack holds carries
//! the asked-for address, a changed address waits for the replacement to be acknowledged,
//! and values that cannot work are reported (condition and Warning Event) with nothing
//! created.

use aws_sdk_ec2::types::DomainType;
use aws_sdk_elasticloadbalancingv2::types::LoadBalancer;
use berth_e2e::awscase::{AwsCase, uid, with_cleanup};
use berth_e2e::testing::lb_hostname;

const SUBNETS: &str = "service.beta.kubernetes.io/aws-load-balancer-subnets";
const EIPS: &str = "service.beta.kubernetes.io/aws-load-balancer-eip-allocations";
const PRIVATE: &str = "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses";
const IPV6: &str = "service.beta.kubernetes.io/aws-load-balancer-ipv6-addresses";
const ACK: &str = "berth.dev/acknowledge-replacement";

fn one_port() -> serde_json::Value {
    serde_json::json!({"ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]})
}

/// The load balancer `arn` as LocalStack describes it.
async fn describe(case: &AwsCase, arn: &str) -> LoadBalancer {
    let out = case
        .elb
        .describe_load_balancers()
        .load_balancer_arns(arn)
        .send()
        .await
        .expect("DescribeLoadBalancers");
    out.load_balancers()
        .first()
        .cloned()
        .expect("the load balancer")
}

/// (subnet, allocation ID, private IPv4, IPv6) of each zone of the load balancer.
type Mapped = (String, Option<String>, Option<String>, Option<String>);

fn mapped(lb: &LoadBalancer) -> Vec<Mapped> {
    lb.availability_zones()
        .iter()
        .map(|z| {
            let a = z.load_balancer_addresses().first();
            (
                z.subnet_id().unwrap_or_default().to_string(),
                a.and_then(|a| a.allocation_id()).map(str::to_string),
                a.and_then(|a| a.private_ipv4_address()).map(str::to_string),
                a.and_then(|a| a.ipv6_address()).map(str::to_string),
            )
        })
        .collect()
}

async fn allocate(case: &AwsCase) -> String {
    let out = case
        .ec2
        .allocate_address()
        .domain(DomainType::Vpc)
        .send()
        .await
        .expect("AllocateAddress");
    out.allocation_id().expect("allocation ID").to_string()
}

async fn release(case: &AwsCase, ids: &[String]) {
    for id in ids {
        let _ = case.ec2.release_address().allocation_id(id).send().await;
    }
}

/// An internet-facing NLB with `eip-allocations` holds the Elastic IP in its subnet's
/// mapping. Another allocation cannot be set in place: the old NLB (and its DNS name) is
/// kept and the condition names the change until the Service acknowledges the token; then
/// a new NLB holds the new allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eip_mapped_nlb_shows_its_allocation_and_a_new_one_waits_for_acknowledgement() {
    let case = AwsCase::new(
        "static-eip",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let first = allocate(&case).await;
    let second = allocate(&case).await;
    let subnet = case.env.info.aws.subnet_ids[0].clone();
    with_cleanup(
        async {
            let svc = case
                .create_service(
                    "web",
                    serde_json::json!({SUBNETS: subnet, EIPS: first}),
                    one_port(),
                )
                .await;
            case.wait_ready("web").await;
            let arn = case.one_lb(&uid(&svc), 1).await;
            let lb = describe(&case, &arn).await;
            assert_eq!(
                mapped(&lb),
                vec![(subnet.clone(), Some(first.clone()), None, None)]
            );
            let dns = lb.dns_name().unwrap_or_default().to_string();

            case.annotate("web", serde_json::json!({EIPS: second}))
                .await;
            let (status, _, message) = case.wait_reason("web", "ReplacementPending").await;
            assert_eq!(status, "False");
            assert!(message.contains(&dns), "{message}");
            case.wait_warning("web", "ReplacementPending", &["subnet-mappings"])
                .await;
            // Kept as it was: same load balancer, same allocation.
            assert_eq!(
                mapped(&describe(&case, &arn).await),
                vec![(subnet.clone(), Some(first.clone()), None, None)]
            );
            let token = message
                .split(&format!("{ACK}="))
                .nth(1)
                .expect("the token in the condition")
                .trim()
                .to_string();
            case.annotate("web", serde_json::json!({ACK: token})).await;
            case.wait_condition("web", "a new DNS name", |s| {
                lb_hostname(s).is_some_and(|h| h != dns)
            })
            .await;
            case.wait_ready("web").await;
            let arn = case.one_lb(&uid(&svc), 1).await;
            assert_eq!(
                mapped(&describe(&case, &arn).await),
                vec![(subnet.clone(), Some(second.clone()), None, None)]
            );
            case.delete_service("web", &uid(&svc)).await;
        },
        release(&case, &[first.clone(), second.clone()]),
    )
    .await;
}

/// An internal NLB with `private-ipv4-addresses` holds the address in the subnet whose
/// CIDR contains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ipv4_address_is_mapped_to_its_subnet() {
    let case = AwsCase::new(
        "static-ipv4",
        serde_json::json!({"scheme": "internal", "targetType": "ip"}),
    )
    .await;
    let subnet = case.env.info.aws.subnet_ids[0].clone();
    let described = case
        .ec2
        .describe_subnets()
        .subnet_ids(&subnet)
        .send()
        .await
        .expect("DescribeSubnets");
    let cidr = described
        .subnets()
        .first()
        .and_then(|s| s.cidr_block())
        .expect("the subnet's CIDR")
        .to_string();
    let base: std::net::Ipv4Addr = cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("an IPv4 CIDR");
    let address = std::net::Ipv4Addr::from(u32::from(base) + 200).to_string();
    let svc = case
        .create_service(
            "web",
            serde_json::json!({SUBNETS: subnet, PRIVATE: address}),
            one_port(),
        )
        .await;
    case.wait_ready("web").await;
    let arn = case.one_lb(&uid(&svc), 1).await;
    assert_eq!(
        mapped(&describe(&case, &arn).await),
        vec![(subnet.clone(), None, Some(address.clone()), None)]
    );
    case.delete_service("web", &uid(&svc)).await;
}

/// A dualstack internal NLB with `ipv6-addresses` and `private-ipv4-addresses` holds both
/// in its subnet's mapping. The environment's subnets have no IPv6 CIDR, so the test makes
/// one that has (untagged: no other Service discovers it) and removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_private_ipv4_addresses_are_mapped_on_a_dualstack_nlb() {
    let case = AwsCase::new(
        "static-ipv6",
        serde_json::json!({"scheme": "internal", "targetType": "ip"}),
    )
    .await;
    // A /24 of the VPC no node uses (nodes have 198.18.<index>.0/24), picked per run.
    let third = 100 + std::process::id() % 100;
    let made = case
        .ec2
        .create_subnet()
        .vpc_id(&case.env.info.aws.vpc_id)
        .cidr_block(format!("198.18.{third}.0/24"))
        .ipv6_cidr_block(format!("2001:db8:{third}::/64"))
        .send()
        .await
        .expect("CreateSubnet");
    let subnet = made
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("subnet ID")
        .to_string();
    let (v4, v6) = (
        format!("198.18.{third}.10"),
        format!("2001:db8:{third}::10"),
    );
    with_cleanup(
        async {
            let svc = case
                .create_service(
                    "web",
                    serde_json::json!({
                        SUBNETS: subnet,
                        "service.beta.kubernetes.io/aws-load-balancer-ip-address-type": "dualstack",
                        PRIVATE: v4,
                        IPV6: v6,
                    }),
                    one_port(),
                )
                .await;
            case.wait_ready("web").await;
            let arn = case.one_lb(&uid(&svc), 1).await;
            let lb = describe(&case, &arn).await;
            assert_eq!(lb.ip_address_type().map(|t| t.as_str()), Some("dualstack"));
            assert_eq!(
                mapped(&lb),
                vec![(subnet.clone(), None, Some(v4.clone()), Some(v6.clone()))]
            );
            case.delete_service("web", &uid(&svc)).await;
        },
        async {
            let _ = case.ec2.delete_subnet().subnet_id(&subnet).send().await;
        },
    )
    .await;
}

/// Static addresses where AWS takes none, each on a Service of its own (an Event series
/// keeps its first message, so one Service per case shows each Warning): an Elastic IP on
/// an internal NLB and IPv6 addresses without dualstack, both named at once; an address
/// outside the subnet's CIDR; more addresses than subnets. Each time the condition says
/// `InvalidAnnotation` with a Warning Event, and LocalStack holds nothing for the Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_addresses_that_cannot_work_are_reported_and_nothing_is_created() {
    let case = AwsCase::new(
        "static-bad",
        serde_json::json!({"scheme": "internal", "targetType": "ip"}),
    )
    .await;
    let subnet = case.env.info.aws.subnet_ids[0].clone();
    let cases = [
        (
            "both",
            serde_json::json!({
                SUBNETS: subnet, EIPS: "eipalloc-0123456789abcdef0", IPV6: "2001:db8::10"
            }),
            vec![EIPS, IPV6],
        ),
        (
            "outside",
            serde_json::json!({SUBNETS: subnet, PRIVATE: "192.0.2.10"}),
            vec![PRIVATE, subnet.as_str()],
        ),
        (
            "count",
            serde_json::json!({SUBNETS: subnet, PRIVATE: "10.0.0.1, 10.0.0.2"}),
            vec![PRIVATE, "2 given for 1 subnets"],
        ),
    ];
    let mut svcs = Vec::new();
    for (name, annotations, _) in &cases {
        svcs.push(
            case.create_service(name, annotations.clone(), one_port())
                .await,
        );
    }
    for ((name, _, named), svc) in cases.iter().zip(&svcs) {
        let (status, _, message) = case.wait_reason(name, "InvalidAnnotation").await;
        assert_eq!(status, "False");
        for part in named {
            assert!(message.contains(part), "{part} not named: {message}");
        }
        case.wait_warning(name, "InvalidAnnotation", named).await;
        case.assert_nothing_for(&uid(svc)).await;
    }
    for ((name, _, _), svc) in cases.iter().zip(&svcs) {
        case.delete_service(name, &uid(svc)).await;
    }
}
