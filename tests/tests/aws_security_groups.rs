//! Security groups of berth's NLBs against LocalStack, whose extension enforces an NLB's
//! security groups on the emulated data path: the managed frontend group admits exactly
//! the Service's source ranges (real connections from the client namespace are let in or
//! refused), is updated in place, and goes with the Service together with the backend
//! rules berth put on the nodes' groups; the `security-groups` and `disable-nlb-sg`
//! annotations.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

use aws_sdk_ec2 as ec2;
use berth_e2e::awscase::AwsCase;
use berth_e2e::controller::{AwsView, aws_view, listener_address};
use berth_e2e::service::ServiceBuilder;
use berth_e2e::testing::{curl_in, lb_condition, wait_for};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};

const LONG: Duration = Duration::from_secs(90);
const SECURITY_GROUPS: &str = "service.beta.kubernetes.io/aws-load-balancer-security-groups";
const DISABLE_NLB_SG: &str = "service.beta.kubernetes.io/aws-load-balancer-disable-nlb-sg";

/// A rule as (protocol, from port, to port, source, description).
type RuleView = (String, i32, i32, String, String);

/// The shared AWS case ([`AwsCase`]) with this suite's own steps.
struct Case(AwsCase);

impl std::ops::Deref for Case {
    type Target = AwsCase;
    fn deref(&self) -> &AwsCase {
        &self.0
    }
}

impl Case {
    async fn new(prefix: &str, aws: serde_json::Value) -> Self {
        Self(AwsCase::new(prefix, aws).await)
    }

    async fn create_service(
        &self,
        name: &str,
        annotations: serde_json::Value,
        ranges: &[&str],
    ) -> Service {
        let mut b = ServiceBuilder::load_balancer(name)
            .class(&self.class.lb_class())
            .app("web")
            .tcp(80, 80)
            .annotations(&annotations);
        if !ranges.is_empty() {
            b = b.source_ranges(ranges);
        }
        b.create_with(&self.services()).await
    }

    /// A pod labelled app=web answering HTTP on port 80 with its name.
    async fn web_pod(&self) {
        let obj = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": self.ns.name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "web", "ports": [{"containerPort": 80}]}]}
                }
            }
        });
        let path = std::env::temp_dir().join(format!("berth-e2e-{}-web.json", self.ns.name));
        std::fs::write(&path, obj.to_string()).expect("write manifest");
        self.env
            .kubectl(&["apply", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.ns.name);
        let lp = ListParams::default().labels("app=web");
        wait_for("a running web pod", LONG, || async {
            pods.list(&lp).await.is_ok_and(|l| {
                l.items.iter().any(|p| {
                    p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
            })
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The Service's one NLB, once it has its listener.
    async fn one_lb(&self, uid: &str) -> String {
        let last = RefCell::new(AwsView::default());
        let res = wait_for("one NLB with a listener", LONG, || async {
            let Ok(v) = aws_view(&self.elb, uid).await else {
                return false;
            };
            let ok = match v.load_balancers.as_slice() {
                [lb] => self
                    .elb
                    .describe_listeners()
                    .load_balancer_arn(&lb.0)
                    .send()
                    .await
                    .is_ok_and(|o| o.listeners().len() == 1),
                _ => false,
            };
            *last.borrow_mut() = v;
            ok
        })
        .await;
        if let Err(e) = res {
            panic!("{e}: {:?}\n{}", last.borrow(), self.logs());
        }
        last.into_inner().load_balancers[0].0.clone()
    }

    async fn lb_groups(&self, arn: &str) -> Vec<String> {
        let out = self
            .elb
            .describe_load_balancers()
            .load_balancer_arns(arn)
            .send()
            .await
            .expect("DescribeLoadBalancers");
        out.load_balancers()
            .first()
            .map(|l| l.security_groups().to_vec())
            .unwrap_or_default()
    }

    /// The group's inbound rules, or `None` when it does not exist.
    async fn rules(&self, group: &str) -> Option<BTreeSet<RuleView>> {
        let out = self
            .ec2
            .describe_security_groups()
            .group_ids(group)
            .send()
            .await
            .ok()?;
        let g = out.security_groups().first()?;
        let mut rules = BTreeSet::new();
        for p in g.ip_permissions() {
            let proto = p.ip_protocol().unwrap_or_default().to_string();
            let (from, to) = (p.from_port().unwrap_or(-1), p.to_port().unwrap_or(-1));
            let mut add = |source: &str, d: Option<&str>| {
                rules.insert((
                    proto.clone(),
                    from,
                    to,
                    source.to_string(),
                    d.unwrap_or_default().to_string(),
                ));
            };
            for r in p.ip_ranges() {
                add(r.cidr_ip().unwrap_or_default(), r.description());
            }
            for r in p.user_id_group_pairs() {
                add(r.group_id().unwrap_or_default(), r.description());
            }
        }
        Some(rules)
    }

    /// Sources of the group's rules (protocol, port, source), descriptions left out.
    async fn sources(&self, group: &str) -> Option<BTreeSet<(String, i32, String)>> {
        let rules = self.rules(group).await?;
        Some(
            rules
                .into_iter()
                .map(|(p, from, _, s, _)| (p, from, s))
                .collect(),
        )
    }

    /// Waits until `check` holds for the group's rules, panicking with them otherwise.
    async fn wait_rules(
        &self,
        what: &str,
        group: &str,
        check: impl Fn(&Option<BTreeSet<RuleView>>) -> bool,
    ) {
        let last = RefCell::new(None);
        let res = wait_for(what, LONG, || async {
            let r = self.rules(group).await;
            let ok = check(&r);
            *last.borrow_mut() = r;
            ok
        })
        .await;
        if let Err(e) = res {
            panic!(
                "{e}: rules of {group}: {:?}\n{}",
                last.borrow(),
                self.logs()
            );
        }
    }

    /// One GET from the client namespace through the NLB's listener on port 80.
    async fn get(&self, lb: &str) -> Result<String, String> {
        let addr = listener_address(&self.env.info, lb, 80)
            .await
            .ok_or("listener not served")?;
        curl_in(
            &self.env.info.client_netns,
            &format!("http://{addr}/"),
            Duration::from_secs(3),
        )
        .map_err(|e| e.to_string())
    }

    async fn delete_service(&self, name: &str) {
        let _ = self.services().delete(name, &DeleteParams::default()).await;
        wait_for(&format!("service {name} gone"), LONG, || async {
            self.services()
                .get_opt(name)
                .await
                .is_ok_and(|s| s.is_none())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// The managed groups tagged with the Service's UID.
    async fn managed_groups(&self, uid: &str) -> Vec<String> {
        let filter = ec2::types::Filter::builder()
            .name("tag:berth.dev/service-uid")
            .values(uid)
            .build();
        let out = self
            .ec2
            .describe_security_groups()
            .filters(filter)
            .send()
            .await
            .expect("DescribeSecurityGroups");
        out.security_groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect()
    }

    async fn wait_condition_with(&self, name: &str, text: &str) -> (String, String, String) {
        let api = self.services();
        let res = wait_for(
            &format!("service {name} condition saying {text}"),
            LONG,
            || async {
                api.get(name)
                    .await
                    .is_ok_and(|s| lb_condition(&s).is_some_and(|(_, _, m)| m.contains(text)))
            },
        )
        .await;
        let got = api.get(name).await.ok().and_then(|s| lb_condition(&s));
        if let Err(e) = res {
            panic!("{e}: {got:?}\n{}", self.logs());
        }
        got.expect("condition")
    }
}

fn uid(svc: &Service) -> String {
    svc.metadata.uid.clone().expect("uid")
}

/// The client's address is in the source ranges: it connects through the NLB. Ranges
/// that leave it out are set: the same NLB's same managed group now holds only them, and
/// the client's connection is refused. Backend rules on the nodes' cluster-tagged group
/// (not on their other group) let the managed group in; both go with the Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ranges_admit_then_refuse_the_client_through_the_same_nlb() {
    let case = Case::new(
        "sg-ranges",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    case.web_pod().await;
    let client = format!("{}/32", case.env.info.client_ip);
    let svc = case
        .create_service("web", serde_json::json!({}), &[&client])
        .await;
    let lb = case.one_lb(&uid(&svc)).await;
    let groups = case.lb_groups(&lb).await;
    let [managed] = groups.as_slice() else {
        panic!(
            "the NLB has {groups:?}, not one managed group\n{}",
            case.logs()
        );
    };
    assert_eq!(case.managed_groups(&uid(&svc)).await, vec![managed.clone()]);
    let want = BTreeSet::from([("tcp".to_string(), 80, client.clone())]);
    assert_eq!(case.sources(managed).await, Some(want));
    let ok = RefCell::new(String::new());
    wait_for("a response through the NLB", LONG, || async {
        let r = case.get(&lb).await;
        *ok.borrow_mut() = format!("{r:?}");
        r.is_ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", ok.borrow(), case.logs()));

    // Backend rules: on the nodes' cluster-tagged group, from the managed group, with
    // berth's description; the nodes' other group is left alone.
    let aws = &case.env.info.aws;
    case.wait_rules(
        "a backend rule from the managed group",
        &aws.node_security_group,
        |r| {
            r.as_ref().is_some_and(|r| {
                r.iter().any(|(p, from, _, s, d)| {
                    p == "tcp" && *from == 80 && s == managed && d.starts_with("berth:")
                })
            })
        },
    )
    .await;
    let extra = case
        .rules(&aws.extra_security_group)
        .await
        .unwrap_or_default();
    assert!(
        !extra.iter().any(|(_, _, _, s, _)| s == managed),
        "{extra:?}"
    );

    let patch = serde_json::json!({"spec": {"loadBalancerSourceRanges": ["192.0.2.0/24"]}});
    case.services()
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch the source ranges");
    let only_other = BTreeSet::from([("tcp".to_string(), 80, "192.0.2.0/24".to_string())]);
    case.wait_rules(
        "the managed group admitting only 192.0.2.0/24",
        managed,
        |r| {
            r.as_ref().is_some_and(|r| {
                r.iter()
                    .map(|(p, f, _, s, _)| (p.clone(), *f, s.clone()))
                    .collect::<BTreeSet<_>>()
                    == only_other
            })
        },
    )
    .await;
    assert_eq!(case.one_lb(&uid(&svc)).await, lb, "the NLB was kept");
    assert_eq!(case.lb_groups(&lb).await, groups, "the group was kept");
    for attempt in 0..3 {
        let r = case.get(&lb).await;
        assert!(
            r.is_err(),
            "attempt {attempt}: the client got through: {r:?}"
        );
    }

    case.delete_service("web").await;
    let view = aws_view(&case.elb, &uid(&svc)).await.expect("view");
    assert!(view.load_balancers.is_empty(), "{view:?}");
    assert_eq!(
        case.rules(managed).await,
        None,
        "the managed group outlived the Service"
    );
    let node = case
        .rules(&aws.node_security_group)
        .await
        .unwrap_or_default();
    assert!(!node.iter().any(|(_, _, _, s, _)| s == managed), "{node:?}");
}

/// Instance targets: the backend rules cover each NodePort from the managed group and go
/// with the Service; the internal NLB's managed group admits the VPC by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_targets_get_node_port_rules_on_the_nodes_group() {
    let case = Case::new("sg-inst", serde_json::json!({"scheme": "internal"})).await;
    let svc = case.create_service("web", serde_json::json!({}), &[]).await;
    let lb = case.one_lb(&uid(&svc)).await;
    let groups = case.lb_groups(&lb).await;
    let [managed] = groups.as_slice() else {
        panic!("the NLB has {groups:?}\n{}", case.logs());
    };
    let want = BTreeSet::from([("tcp".to_string(), 80, "198.18.0.0/16".to_string())]);
    assert_eq!(
        case.sources(managed).await,
        Some(want),
        "the VPC's CIDR by default"
    );
    let svc = case.services().get("web").await.expect("get");
    let np = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p[0].node_port)
        .expect("nodePort");
    let node_group = case.env.info.aws.node_security_group.clone();
    case.wait_rules("a NodePort rule from the managed group", &node_group, |r| {
        r.as_ref().is_some_and(|r| {
            r.iter().any(|(p, from, to, s, d)| {
                p == "tcp" && *from == np && *to == np && s == managed && d.contains(&uid(&svc))
            })
        })
    })
    .await;
    case.delete_service("web").await;
    assert_eq!(case.rules(managed).await, None);
    let node = case.rules(&node_group).await.unwrap_or_default();
    assert!(!node.iter().any(|(_, _, _, s, _)| s == managed), "{node:?}");
}

/// `security-groups` puts the user's group on the NLB and no managed one; with
/// `disable-nlb-sg` the NLB has none, and source ranges it cannot enforce are said in the
/// condition and a Warning Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_groups_are_used_and_an_nlb_without_groups_warns_about_source_ranges() {
    let case = Case::new(
        "sg-given",
        serde_json::json!({"scheme": "internet-facing", "targetType": "ip"}),
    )
    .await;
    let created = case
        .ec2
        .create_security_group()
        .group_name(format!("{}-user", case.ns.name))
        .description("a user's group")
        .vpc_id(&case.env.info.aws.vpc_id)
        .send()
        .await
        .expect("CreateSecurityGroup");
    let user = created.group_id().expect("group id").to_string();
    let svc = case
        .create_service("given", serde_json::json!({SECURITY_GROUPS: user}), &[])
        .await;
    let lb = case.one_lb(&uid(&svc)).await;
    assert_eq!(case.lb_groups(&lb).await, vec![user.clone()]);
    assert!(case.managed_groups(&uid(&svc)).await.is_empty());

    let open = case
        .create_service(
            "open",
            serde_json::json!({DISABLE_NLB_SG: "true"}),
            &["192.0.2.0/24"],
        )
        .await;
    let open_lb = case.one_lb(&uid(&open)).await;
    assert!(case.lb_groups(&open_lb).await.is_empty());
    assert!(case.managed_groups(&uid(&open)).await.is_empty());
    case.wait_condition_with("open", "NOT enforced").await;
    let events = case.env.events(&case.ns.name, "open").await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "SourceRangesNotEnforced"),
        "{events:?}"
    );

    case.delete_service("given").await;
    case.delete_service("open").await;
    assert!(
        case.rules(&user).await.is_some(),
        "the user's group is not berth's to delete"
    );
    let _ = case
        .ec2
        .delete_security_group()
        .group_id(&user)
        .send()
        .await;
}
