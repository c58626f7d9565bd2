//! `plan`: what the controller would create, modify or delete in AWS for a Service,
//! computed by the AWS provider's own code ([`AwsProvider::plan`]: the desired model, the
//! replacement gate and the apply with every write recorded) against what exists. Nothing
//! is written.

use std::path::PathBuf;
use std::sync::Arc;

use berth_controller::metrics::Metrics;
use berth_controller::provider::aws::dryrun::{Action, Step};
use berth_controller::provider::aws::replacement::ACKNOWLEDGE;
use berth_controller::provider::aws::{AwsProvider, Plan};
use berth_controller::provider::{Next, Outcome, Report};
use berth_controller::stores::Stores;
use berth_runtime::Fence;
use k8s_openapi::api::core::v1::Service;
use kube::{Client, ResourceExt};

use crate::cluster::{self, Snapshot};
use crate::{AwsOpts, Error};

/// UID of a Service that does not exist yet: its resource names are provisional.
const NEW_UID: &str = "new-service";

/// What the plan amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    NoChanges,
    /// The load balancer (and its DNS name) stays.
    ModifyOnly,
    /// A first load balancer.
    Create,
    /// The load balancer is replaced: a new DNS name.
    Replace,
}

/// What the plan amounts to. Pure.
pub fn verdict(plan: &Plan) -> Verdict {
    let deletes_lb = plan
        .steps
        .iter()
        .any(|s| s.action == Action::Delete && s.resource.starts_with("load balancer"));
    let creates_lb = plan
        .steps
        .iter()
        .any(|s| s.action == Action::Create && s.resource.starts_with("load balancer"));
    if plan.replacement.is_some() || deletes_lb {
        Verdict::Replace
    } else if creates_lb {
        Verdict::Create
    } else if plan.steps.is_empty() {
        Verdict::NoChanges
    } else {
        Verdict::ModifyOnly
    }
}

fn step_line(s: &Step) -> String {
    let mark = match s.action {
        Action::Create => '+',
        Action::Modify => '~',
        Action::Delete => '-',
    };
    format!(
        "  {mark} {} {}: {}\n",
        s.action.as_str(),
        s.resource,
        s.detail
    )
}

/// The loud part: which load balancer goes, why, and what the controller waits for. Pure.
fn replacement_banner(plan: &Plan) -> String {
    let Some(r) = &plan.replacement else {
        return "!!! THE LOAD BALANCER IS REPLACED: it gets a new DNS name\n".into();
    };
    let what: Vec<String> = r
        .changes
        .iter()
        .map(|c| format!("{} {} -> {}", c.property, c.from, c.to))
        .collect();
    let gate = if plan.acknowledged {
        "acknowledged on the Service: the controller applies it".to_string()
    } else {
        format!(
            "the controller waits for the annotation {ACKNOWLEDGE}={}",
            r.token
        )
    };
    format!(
        "!!! REPLACES THE LOAD BALANCER {}: its DNS name {} goes away, the new one gets another\n!!! because {}\n!!! {gate}\n",
        r.name,
        r.dns_name,
        what.join(", ")
    )
}

/// The plan as text. Pure.
pub fn render(name: &str, plan: &Plan) -> String {
    let v = verdict(plan);
    let mut out = format!(
        "Plan for Service {name}: load balancer {} ({})\n",
        plan.desired.name,
        plan.desired.scheme.as_str()
    );
    if v == Verdict::Replace {
        out.push_str(&replacement_banner(plan));
    }
    for s in &plan.steps {
        out.push_str(&step_line(s));
    }
    let summary = match v {
        Verdict::NoChanges => "no changes".to_string(),
        Verdict::ModifyOnly => format!(
            "modify-only: {} change(s); the load balancer and its DNS name stay",
            plan.steps.len()
        ),
        Verdict::Create => "creates a new load balancer".into(),
        Verdict::Replace => "REPLACEMENT: the Service's DNS name changes".into(),
    };
    out.push_str(&format!("Summary: {summary}\nNothing was written.\n"));
    out
}

/// What the controller would report instead of applying anything. Pure.
pub fn render_refusal(name: &str, outcome: &Outcome) -> String {
    let why = match (&outcome.report, outcome.next) {
        (Report::Set { readiness, .. }, _) => {
            format!("{}: {}", readiness.reason, readiness.message)
        }
        (_, Next::NodePorts) => "the Service needs nodePorts first".into(),
        _ => outcome
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "nothing to do".into()),
    };
    format!(
        "Plan for Service {name}: the controller would change nothing in AWS\n  because {why}\nNothing was written.\n"
    )
}

/// The Service to plan: the file's, merged onto the live one of its name when there is
/// one (its UID and allocated nodePorts), else the live one. Pure.
pub fn merge(file: Option<Service>, live: Option<&Service>) -> Option<Service> {
    let Some(mut svc) = file else {
        return live.cloned();
    };
    svc.metadata.uid = live
        .and_then(|l| l.metadata.uid.clone())
        .or_else(|| Some(NEW_UID.into()));
    let live_ports = live
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    if let Some(ports) = svc.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        for p in ports.iter_mut().filter(|p| p.node_port.is_none()) {
            let same = live_ports.iter().find(|l| {
                l.port == p.port
                    && l.protocol.as_deref().unwrap_or("TCP")
                        == p.protocol.as_deref().unwrap_or("TCP")
            });
            // A new port's nodePort is allocated when it is created: 0 stands for it.
            p.node_port = Some(same.and_then(|l| l.node_port).unwrap_or(0));
        }
    }
    svc.status = live.and_then(|l| l.status.clone());
    Some(svc)
}

fn read_manifest(path: &PathBuf) -> Result<Service, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File(path.clone(), e))?;
    serde_yaml::from_str(&text).map_err(|e| Error::Manifest(path.clone(), e))
}

pub async fn run(
    client: &Client,
    opts: &AwsOpts,
    namespace: &str,
    service: Option<&str>,
    file: Option<PathBuf>,
) -> Result<String, Error> {
    let file = file.as_ref().map(read_manifest).transpose()?;
    let namespace = file
        .as_ref()
        .and_then(|f| f.namespace())
        .unwrap_or_else(|| namespace.to_string());
    let name = match (service, &file) {
        (Some(n), _) => n.to_string(),
        (None, Some(f)) => f.name_any(),
        (None, None) => return Err(Error::Usage("plan needs SERVICE or -f FILE".into())),
    };
    let snap = Snapshot::load(client).await?;
    let live = snap.service(&namespace, &name).ok();
    let mut svc =
        merge(file, live).ok_or_else(|| Error::NotFound(format!("{namespace}/{name}")))?;
    svc.metadata.namespace = Some(namespace.clone());
    let class_name = snap.class_of(&svc).ok_or_else(|| {
        Error::Usage(format!(
            "no berth class matches Service {namespace}/{name}: see `kubectl berth why {name}`"
        ))
    })?;
    let class = snap
        .class(&class_name)
        .filter(|c| cluster::provider_of(c) == "aws")
        .ok_or_else(|| {
            Error::Usage(format!(
                "class {class_name} is not an AWS class: plan covers AWS load balancers"
            ))
        })?;
    let config = opts.controller_config()?;
    let aws = crate::status::aws_client(opts).await?;
    let stores = Stores::snapshot(
        snap.classes.clone(),
        snap.services.clone(),
        snap.nodes.clone(),
        snap.slices.clone(),
        snap.namespaces.clone(),
    );
    let metrics = Arc::new(Metrics::default());
    let provider = AwsProvider::new(
        aws,
        Fence::unfenced(),
        stores,
        config,
        client.clone(),
        metrics,
    );
    let full = format!("{namespace}/{name}");
    Ok(match provider.plan(&svc, class).await {
        Ok(plan) => render(&full, &plan),
        Err(outcome) => render_refusal(&full, &outcome),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use berth_controller::provider::aws::model::{DesiredLoadBalancer, IpAddressType, Scheme};
    use berth_controller::provider::aws::replacement::{Change, Replacement};
    use berth_controller::provider::aws::security_groups::{Frontend, Security};

    use super::*;

    fn plan(steps: Vec<Step>, replacement: Option<Replacement>) -> Plan {
        Plan {
            desired: DesiredLoadBalancer {
                name: "k8s-shop-web".into(),
                scheme: Scheme::InternetFacing,
                ip_address_type: IpAddressType::Ipv4,
                subnets: Vec::new(),
                mappings: Vec::new(),
                security_groups: Vec::new(),
                security: Security {
                    frontend: Frontend::Disabled,
                    backend: None,
                    nodes: Default::default(),
                    node_groups: Default::default(),
                },
                tags: BTreeMap::new(),
                attributes: BTreeMap::new(),
                listeners: Vec::new(),
                target_groups: Vec::new(),
            },
            replacement,
            acknowledged: false,
            steps,
        }
    }

    fn step(action: Action, resource: &str) -> Step {
        Step {
            action,
            resource: resource.into(),
            detail: "x".into(),
        }
    }

    #[test]
    fn a_health_check_change_is_modify_only() {
        let p = plan(vec![step(Action::Modify, "target group tg")], None);
        assert_eq!(verdict(&p), Verdict::ModifyOnly);
        let text = render("shop/web", &p);
        assert!(text.contains("modify-only"), "{text}");
        assert!(!text.contains("!!!"), "{text}");
        assert_eq!(verdict(&plan(Vec::new(), None)), Verdict::NoChanges);
    }

    #[test]
    fn a_replacement_is_loud_and_names_the_token() {
        let r = Replacement {
            name: "k8s-shop-web".into(),
            dns_name: "old.elb".into(),
            changes: vec![Change {
                property: "scheme",
                from: "internal".into(),
                to: "internet-facing".into(),
            }],
            token: "scheme=internet-facing@abc".into(),
        };
        let steps = vec![
            step(Action::Delete, "load balancer k8s-shop-web"),
            step(Action::Create, "load balancer k8s-shop-web"),
        ];
        let p = plan(steps, Some(r));
        assert_eq!(verdict(&p), Verdict::Replace);
        let text = render("shop/web", &p);
        assert!(
            text.contains("!!! REPLACES THE LOAD BALANCER k8s-shop-web"),
            "{text}"
        );
        assert!(text.contains("old.elb goes away"), "{text}");
        assert!(
            text.contains(&format!("{ACKNOWLEDGE}=scheme=internet-facing@abc")),
            "{text}"
        );
        assert!(text.contains("- delete load balancer"), "{text}");
    }

    #[test]
    fn a_manifest_takes_the_live_uid_and_node_ports() {
        let live: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "nodePort": 30080}]}
        }))
        .expect("live");
        let file: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "annotations": {"a": "b"}},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}, {"port": 81}]}
        }))
        .expect("file");
        let m = merge(Some(file.clone()), Some(&live)).expect("merged");
        assert_eq!(m.metadata.uid.as_deref(), Some("u1"));
        let ports: Vec<Option<i32>> = m
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .iter()
            .map(|p| p.node_port)
            .collect();
        assert_eq!(ports, vec![Some(30080), Some(0)]);
        let new = merge(Some(file), None).expect("new");
        assert_eq!(new.metadata.uid.as_deref(), Some(NEW_UID));
    }
}
