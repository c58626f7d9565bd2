//! The AWS Load Balancer Controller annotations beyond the basic ones, against the real
//! cluster and LocalStack: each changes what LocalStack holds (listener certificates and
//! ALPN, TLS target groups, listener attributes, per-port target group attributes and
//! proxy protocol, a health-check port given by name, TCP_UDP listeners), and invalid
//! values are all reported at once with nothing created.

use std::collections::BTreeMap;

use aws_sdk_elasticloadbalancingv2::types::TargetGroup;
use berth_e2e::awscase::{AwsCase, uid, with_cleanup};

const P: &str = "service.beta.kubernetes.io/aws-load-balancer-";

fn key(suffix: &str) -> String {
    format!("{P}{suffix}")
}

/// An IAM server certificate for `name` (self-signed, made here): its ARN.
async fn certificate(iam: &aws_sdk_iam::Client, dir: &std::path::Path, name: &str) -> String {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    berth_e2e::proc::run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}.berth.test"),
            "-keyout",
            key.to_str().expect("path"),
            "-out",
            cert.to_str().expect("path"),
        ],
    )
    .expect("openssl req");
    let uploaded = iam
        .upload_server_certificate()
        .server_certificate_name(name)
        .certificate_body(std::fs::read_to_string(&cert).expect("cert"))
        .private_key(std::fs::read_to_string(&key).expect("key"))
        .send()
        .await
        .expect("UploadServerCertificate");
    uploaded
        .server_certificate_metadata()
        .map(|m| m.arn().to_string())
        .expect("certificate ARN")
}

/// The target groups of the load balancer `lb`, by port.
async fn target_groups(case: &AwsCase, lb: &str) -> BTreeMap<i32, TargetGroup> {
    let out = case
        .elb
        .describe_target_groups()
        .load_balancer_arn(lb)
        .send()
        .await
        .expect("DescribeTargetGroups");
    out.target_groups()
        .iter()
        .map(|t| (t.port().unwrap_or_default(), t.clone()))
        .collect()
}

async fn tg_attributes(case: &AwsCase, tg: &TargetGroup) -> BTreeMap<String, String> {
    let out = case
        .elb
        .describe_target_group_attributes()
        .target_group_arn(tg.target_group_arn().unwrap_or_default())
        .send()
        .await
        .expect("DescribeTargetGroupAttributes");
    out.attributes()
        .iter()
        .filter_map(|a| Some((a.key()?.to_string(), a.value()?.to_string())))
        .collect()
}

/// (ARN, port, protocol, ALPN) of each listener of `lb`.
async fn listeners(case: &AwsCase, lb: &str) -> Vec<(String, i32, String, Vec<String>)> {
    let out = case
        .elb
        .describe_listeners()
        .load_balancer_arn(lb)
        .send()
        .await
        .expect("DescribeListeners");
    let mut v: Vec<_> = out
        .listeners()
        .iter()
        .map(|l| {
            (
                l.listener_arn().unwrap_or_default().to_string(),
                l.port().unwrap_or_default(),
                l.protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                l.alpn_policy().to_vec(),
            )
        })
        .collect();
    v.sort_by_key(|l| l.1);
    v
}

async fn listener_attributes(case: &AwsCase, listener: &str) -> BTreeMap<String, String> {
    let out = case
        .elb
        .describe_listener_attributes()
        .listener_arn(listener)
        .send()
        .await
        .expect("DescribeListenerAttributes");
    out.attributes()
        .iter()
        .filter_map(|a| Some((a.key()?.to_string(), a.value()?.to_string())))
        .collect()
}

/// (certificate, is default) of the listener.
async fn listener_certificates(case: &AwsCase, listener: &str) -> Vec<(String, bool)> {
    let out = case
        .elb
        .describe_listener_certificates()
        .listener_arn(listener)
        .send()
        .await
        .expect("DescribeListenerCertificates");
    let mut v: Vec<_> = out
        .certificates()
        .iter()
        .map(|c| {
            (
                c.certificate_arn().unwrap_or_default().to_string(),
                c.is_default().unwrap_or(false),
            )
        })
        .collect();
    v.sort();
    v
}

/// `ssl-cert` with two certificates: the first is the TLS listener's default, the second
/// is in its certificate list; `alpn-policy` is on the listener; `backend-protocol: ssl`
/// makes the target group TLS. Dropping the second certificate removes it from the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_alpn_and_backend_tls_reach_the_listener_and_target_group() {
    let case = AwsCase::new(
        "ann-tls",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let iam = aws_sdk_iam::Client::new(&case.env.aws().await);
    let dir = std::env::temp_dir().join(format!("berth-e2e-{}-tls", case.ns.name));
    std::fs::create_dir_all(&dir).expect("tls dir");
    let names = [format!("{}-a", case.ns.name), format!("{}-b", case.ns.name)];
    let a = certificate(&iam, &dir, &names[0]).await;
    let b = certificate(&iam, &dir, &names[1]).await;
    with_cleanup(
        async {
            let svc = case
                .create_service(
                    "web",
                    serde_json::json!({
                        key("ssl-cert"): format!("{a}, {b}"),
                        key("alpn-policy"): "HTTP2Preferred",
                        key("backend-protocol"): "ssl",
                    }),
                    serde_json::json!({"ports": [
                        {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8443}
                    ]}),
                )
                .await;
            case.wait_ready("web").await;
            let lb = case.one_lb(&uid(&svc), 1).await;
            let ls = listeners(&case, &lb).await;
            assert_eq!(ls.len(), 1, "{ls:?}");
            let (arn, port, protocol, alpn) = ls[0].clone();
            assert_eq!((port, protocol.as_str()), (443, "TLS"));
            assert_eq!(alpn, vec!["HTTP2Preferred".to_string()]);
            let mut want = vec![(a.clone(), true), (b.clone(), false)];
            want.sort();
            assert_eq!(listener_certificates(&case, &arn).await, want);
            let tgs = target_groups(&case, &lb).await;
            let tg = tgs.get(&8443).expect("the target group");
            assert_eq!(tg.protocol().map(|p| p.as_str()), Some("TLS"));

            case.annotate("web", serde_json::json!({key("ssl-cert"): a}))
                .await;
            let last = std::cell::RefCell::new(Vec::new());
            let res = berth_e2e::testing::wait_for(
                "the second certificate removed",
                berth_e2e::awscase::LONG,
                || async {
                    let now = listener_certificates(&case, &arn).await;
                    let ok = now == vec![(a.clone(), true)];
                    *last.borrow_mut() = now;
                    ok
                },
            )
            .await;
            if let Err(e) = res {
                panic!("{e}: {:?}\n{}", last.borrow(), case.logs());
            }
            case.delete_service("web", &uid(&svc)).await;
        },
        async {
            for n in &names {
                let _ = iam
                    .delete_server_certificate()
                    .server_certificate_name(n)
                    .send()
                    .await;
            }
            let _ = std::fs::remove_dir_all(&dir);
        },
    )
    .await;
}

/// `listener-attributes.TCP-80` sets the listener's idle timeout; the global
/// `target-group-attributes` applies to both target groups and `.443` overrides it for
/// port 443's; `proxy-protocol-per-target-group: "443"` turns proxy protocol v2 on for
/// that target group only; `healthcheck-port: http` checks the `http` port's targetPort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_port_attributes_proxy_protocol_and_a_named_health_check_port() {
    let case = AwsCase::new(
        "ann-ports",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let delay = "deregistration_delay.timeout_seconds";
    let svc = case
        .create_service(
            "web",
            serde_json::json!({
                key("listener-attributes.TCP-80"): "tcp.idle_timeout.seconds=400",
                key("target-group-attributes"): format!("{delay}=30"),
                key("target-group-attributes.443"): format!("{delay}=5"),
                key("proxy-protocol-per-target-group"): "443",
                key("healthcheck-port"): "http",
            }),
            serde_json::json!({"ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8443}
            ]}),
        )
        .await;
    let message = case.wait_ready("web").await;
    assert!(!message.contains("ignored"), "{message}");
    let lb = case.one_lb(&uid(&svc), 2).await;
    let ls = listeners(&case, &lb).await;
    let idle = "tcp.idle_timeout.seconds";
    let on_80 = listener_attributes(&case, &ls[0].0).await;
    assert_eq!(
        on_80.get(idle).map(String::as_str),
        Some("400"),
        "{on_80:?}"
    );
    let on_443 = listener_attributes(&case, &ls[1].0).await;
    assert_ne!(
        on_443.get(idle).map(String::as_str),
        Some("400"),
        "{on_443:?}"
    );

    let tgs = target_groups(&case, &lb).await;
    let (http, https) = (&tgs[&8080], &tgs[&8443]);
    let (h, s) = (
        tg_attributes(&case, http).await,
        tg_attributes(&case, https).await,
    );
    let pp = "proxy_protocol_v2.enabled";
    assert_eq!(h.get(delay).map(String::as_str), Some("30"), "{h:?}");
    assert_eq!(s.get(delay).map(String::as_str), Some("5"), "{s:?}");
    assert_eq!(h.get(pp).map(String::as_str), Some("false"), "{h:?}");
    assert_eq!(s.get(pp).map(String::as_str), Some("true"), "{s:?}");
    for tg in [http, https] {
        assert_eq!(tg.health_check_port(), Some("8080"), "{tg:?}");
    }
    case.delete_service("web", &uid(&svc)).await;
}

/// One port for TCP and UDP: with `enable-tcp-udp-listener: "false"` that cannot be one
/// listener, so it is reported and nothing is made; with `"true"` it is one TCP_UDP
/// listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_tcp_udp_listener_decides_a_shared_port() {
    let case = AwsCase::new(
        "ann-tcpudp",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let flag = key("enable-tcp-udp-listener");
    let svc = case
        .create_service(
            "dns",
            serde_json::json!({&flag: "false"}),
            serde_json::json!({"ports": [
                {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 5353},
                {"name": "dns-udp", "protocol": "UDP", "port": 53, "targetPort": 5353}
            ]}),
        )
        .await;
    let (status, _, message) = case.wait_reason("dns", "InvalidAnnotation").await;
    assert_eq!(status, "False");
    assert!(message.contains(&flag), "{message}");
    case.wait_warning("dns", "InvalidAnnotation", &[&flag])
        .await;
    case.assert_nothing_for(&uid(&svc)).await;

    case.annotate("dns", serde_json::json!({&flag: "true"}))
        .await;
    let message = case.wait_ready("dns").await;
    assert!(!message.contains("ignored"), "{message}");
    let lb = case.one_lb(&uid(&svc), 1).await;
    let ls = listeners(&case, &lb).await;
    let shape: Vec<(i32, String)> = ls.into_iter().map(|l| (l.1, l.2)).collect();
    assert_eq!(shape, vec![(53, "TCP_UDP".to_string())]);
    case.delete_service("dns", &uid(&svc)).await;
}

/// Every invalid value among the new annotations is named in one condition message, with a
/// Warning Event, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_values_are_all_reported_at_once() {
    let case = AwsCase::new(
        "ann-bad",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let bad = [
        (key("alpn-policy"), "HTTP3"),
        (key("backend-protocol"), "tls"),
        (
            key("listener-attributes.SCTP-80"),
            "tcp.idle_timeout.seconds=400",
        ),
        (
            key("target-group-attributes.http"),
            "stickiness.enabled=true",
        ),
        (key("proxy-protocol-per-target-group"), "eighty"),
        (key("enable-tcp-udp-listener"), "yes"),
    ];
    let annotations: serde_json::Map<String, serde_json::Value> = bad
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
        .collect();
    let svc = case
        .create_service(
            "web",
            serde_json::Value::Object(annotations),
            serde_json::json!({"ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
            ]}),
        )
        .await;
    let (status, _, message) = case.wait_reason("web", "InvalidAnnotation").await;
    assert_eq!(status, "False");
    for (k, _) in &bad {
        assert!(message.contains(k.as_str()), "{k} not named: {message}");
    }
    let keys: Vec<&str> = bad.iter().map(|(k, _)| k.as_str()).collect();
    case.wait_warning("web", "InvalidAnnotation", &keys).await;
    case.assert_nothing_for(&uid(&svc)).await;
    case.delete_service("web", &uid(&svc)).await;
}
