//! `why SERVICE`: the chain of reasons a Service is not ready, from the controller's
//! condition, its Warning Events and the class objects, each with what to change.

use berth_controller::provider::aws::replacement::{ACKNOWLEDGE, REPLACEMENT_PENDING};
use berth_controller::provider::pool::allocation::{self, reason as pool};
use berth_controller::reason;
use berth_controller::service::status::current_condition;
use berth_crds::{CLASS_PREFIX, CONDITION_ACCEPTED, LoadBalancerClass};
use k8s_openapi::api::core::v1::Service;
use kube::{Client, ResourceExt};

use crate::Error;
use crate::cluster::{self, Snapshot};

/// What `why` knows about one Service.
pub struct Facts<'a> {
    pub svc: &'a Service,
    /// The class the controller gives it.
    pub class_name: Option<String>,
    pub class: Option<&'a LoadBalancerClass>,
    pub classes: &'a [LoadBalancerClass],
    /// Services holding addresses of the Service's pool class: `namespace/name`, addresses.
    pub holders: Vec<(String, Vec<String>)>,
    /// Warning Events about the Service: reason, message.
    pub warnings: Vec<(String, String)>,
}

/// Reasons in order (the first is the nearest cause) and what to change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Explanation {
    pub ready: bool,
    pub reasons: Vec<String>,
    pub fixes: Vec<String>,
}

impl Explanation {
    fn because(&mut self, r: impl Into<String>) {
        self.reasons.push(r.into());
    }

    fn fix(&mut self, f: impl Into<String>) {
        self.fixes.push(f.into());
    }
}

/// Why no class matched the Service. Pure.
fn no_class(e: &mut Explanation, svc: &Service, classes: &[LoadBalancerClass]) {
    let names: Vec<String> = classes.iter().map(|c| c.name_any()).collect();
    let list = if names.is_empty() {
        "none exists".to_string()
    } else {
        names.join(", ")
    };
    match svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.as_deref())
    {
        Some(c) if !c.starts_with(CLASS_PREFIX) => {
            e.because(format!(
                "its loadBalancerClass {c} is not berth's (berth serves {CLASS_PREFIX}<class>)"
            ));
            e.fix(format!("create the Service with loadBalancerClass {CLASS_PREFIX}<class> (the field cannot change on an existing Service); classes: {list}"));
        }
        Some(c) => {
            e.because(format!(
                "no class matched: there is no LoadBalancerClass named {}",
                &c[CLASS_PREFIX.len()..]
            ));
            e.fix(format!(
                "create that LoadBalancerClass, or recreate the Service with one of: {list}"
            ));
        }
        None => {
            e.because("no class matched: the Service names no loadBalancerClass and no berth class has default: true");
            e.fix(format!("set spec.loadBalancerClass to {CLASS_PREFIX}<class> or mark a class default: true; classes: {list}"));
        }
    }
}

/// The class's own trouble: not accepted by the controller. Pure.
fn class_trouble(e: &mut Explanation, class: &LoadBalancerClass) {
    let refused = class
        .status
        .as_ref()
        .into_iter()
        .flat_map(|s| s.conditions.iter())
        .find(|c| c.type_ == CONDITION_ACCEPTED && c.status == "False");
    if let Some(c) = refused {
        e.because(format!(
            "class {} is not accepted ({}): {}",
            class.name_any(),
            c.reason,
            c.message
        ));
        e.fix(format!(
            "fix the LoadBalancerClass {} as its status says",
            class.name_any()
        ));
    }
}

/// The controller's condition reason in words, with what to change. Pure.
fn condition_reason(e: &mut Explanation, f: &Facts, reason_: &str, message: &str) {
    let class = f.class_name.as_deref().unwrap_or("?");
    match reason_ {
        pool::POOL_EXHAUSTED => {
            e.because(format!("the pool of class {class} is exhausted: {message}"));
            let held: Vec<String> = f
                .holders
                .iter()
                .map(|(n, ips)| format!("{n} ({})", ips.join(", ")))
                .collect();
            e.because(format!("its addresses are held by: {}", held.join("; ")));
            e.fix(format!("delete one of those Services or add addresses to the pool of LoadBalancerClass {class}"));
        }
        reason::INVALID_ANNOTATION => {
            for part in message.split("; ") {
                e.because(format!("annotation {part}"));
            }
            e.fix("correct or remove the annotation(s) named above");
        }
        reason::OVERRIDE_REFUSED => {
            e.because(format!("the class refuses an override: {message}"));
            e.fix(format!("remove the annotation, or add its group to allowedOverrides of LoadBalancerClass {class}"));
        }
        reason::AWS_ERROR => {
            e.because(format!("AWS answered an error: {message}"));
            e.fix("check the controller's AWS credentials, IAM policy and quotas; berth retries by itself");
        }
        REPLACEMENT_PENDING => {
            e.because(format!("a change waits for an acknowledgement: {message}"));
            let prefix = format!("{ACKNOWLEDGE}=");
            // The token ends the sentence; a note may follow it after `;`.
            let token = message
                .split_once(&prefix)
                .and_then(|(_, t)| t.split(|c: char| c.is_whitespace() || c == ';').next())
                .unwrap_or("<token>");
            e.fix(format!(
                "check the change with `kubectl berth plan {}`, then `kubectl annotate service {} {ACKNOWLEDGE}={token}`; or undo the change",
                f.svc.name_any(),
                f.svc.name_any()
            ));
        }
        _ => advice(e, reason_, message, class),
    }
}

/// The remaining reasons: one sentence each. Pure.
fn advice(e: &mut Explanation, reason_: &str, message: &str, class: &str) {
    e.because(format!("{reason_}: {message}"));
    let fix = match reason_ {
        reason::PROVISIONING => "nothing: the load balancer is being provisioned".to_string(),
        reason::INVALID_SPEC => "correct the Service spec as the message says".into(),
        reason::NO_SUBNETS => "tag subnets kubernetes.io/role/elb (or internal-elb) or name them with the subnets annotation".into(),
        reason::VPC_UNKNOWN => format!("set vpcID on LoadBalancerClass {class} or the controller's --vpc-id"),
        reason::NAME_CONFLICT => "choose another name annotation; the existing resource is not this Service's".into(),
        reason::DELETION_PROTECTED => "turn deletion protection off as the message says".into(),
        reason::CLASS_NOT_FOUND => format!("create LoadBalancerClass {class}"),
        pool::PORT_CONFLICT | pool::ADDRESS_UNAVAILABLE | pool::TRAFFIC_POLICY_CONFLICT => {
            "pin another address, or share it only between Services with the same allow-shared-ip key and distinct ports".into()
        }
        pool::NOT_SELECTED => format!("label the namespace or Service as LoadBalancerClass {class}'s selectors ask"),
        pool::AUTO_ASSIGN_DISABLED => "pin an address with the load-balancer-ips annotation".into(),
        pool::NODE_ADDRESS_IN_POOL => format!("remove the node's address from the pool of {class}"),
        _ => "see the message above".into(),
    };
    e.fix(fix);
}

/// The chain of reasons for the Service. Pure.
pub fn explain_facts(f: &Facts) -> Explanation {
    let mut e = Explanation::default();
    let svc = f.svc;
    if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) != Some("LoadBalancer") {
        e.because("it is not a LoadBalancer Service: berth serves only those");
        e.fix("set spec.type: LoadBalancer");
        return e;
    }
    let Some(class_name) = f.class_name.as_deref() else {
        no_class(&mut e, svc, f.classes);
        return e;
    };
    let Some(class) = f.class else {
        e.because(format!(
            "no class matched: there is no LoadBalancerClass named {class_name}"
        ));
        e.fix(format!("create LoadBalancerClass {class_name}"));
        return e;
    };
    class_trouble(&mut e, class);
    match current_condition(svc) {
        Some(c) if c.status == "True" => {
            e.ready = true;
            e.because(format!("it is ready: {}", c.message));
        }
        Some(c) => condition_reason(&mut e, f, &c.reason, &c.message),
        None => {
            e.because(format!(
                "the controller has not reported on it (class {class_name})"
            ));
            e.fix(format!("check that a berth controller runs and handles class {class_name} (its --class flag)"));
        }
    }
    if !e.ready {
        for (reason_, message) in &f.warnings {
            e.because(format!("Warning Event {reason_}: {message}"));
        }
    }
    e
}

/// The explanation as text. Pure.
pub fn render(name: &str, e: &Explanation) -> String {
    let mut out = if e.ready {
        format!("Service {name} is ready.\n")
    } else {
        format!("Service {name} is not ready:\n")
    };
    for (i, r) in e.reasons.iter().enumerate() {
        let lead = if i == 0 { "because" } else { "and" };
        out.push_str(&format!("  {lead} {r}\n"));
    }
    if !e.fixes.is_empty() {
        out.push_str("What to change:\n");
        for f in &e.fixes {
            out.push_str(&format!("  - {f}\n"));
        }
    }
    out
}

/// Services holding addresses of `class`: name and addresses. Pure.
pub fn holders_of(
    services: &[Service],
    class: &str,
    except: &Service,
) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = allocation::holders(services.iter(), |c| c == class)
        .into_iter()
        .filter(|h| Some(&h.uid) != except.metadata.uid.as_ref())
        .map(|h| {
            let ips = h.ips.iter().map(ToString::to_string).collect();
            (h.name, ips)
        })
        .collect();
    out.sort();
    out
}

pub async fn explain(client: &Client, namespace: &str, name: &str) -> Result<String, Error> {
    let snap = Snapshot::load(client).await?;
    let svc = snap.service(namespace, name)?;
    let class_name = snap.class_of(svc);
    let class = class_name.as_deref().and_then(|c| snap.class(c));
    let holders = class_name
        .as_deref()
        .map(|c| holders_of(&snap.services, c, svc))
        .unwrap_or_default();
    let warnings = cluster::events(client, namespace, name)
        .await?
        .into_iter()
        .filter(|ev| ev.type_.as_deref() == Some("Warning"))
        .map(|ev| {
            (
                ev.reason.unwrap_or_default(),
                ev.message.unwrap_or_default(),
            )
        })
        .collect();
    let facts = Facts {
        svc,
        class_name,
        class,
        classes: &snap.classes,
        holders,
        warnings,
    };
    Ok(render(
        &format!("{namespace}/{name}"),
        &explain_facts(&facts),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(class: Option<&str>, condition: Option<(&str, &str, &str)>) -> Service {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-web"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
        });
        if let Some(c) = class {
            v["spec"]["loadBalancerClass"] = c.into();
        }
        if let Some((status, reason_, message)) = condition {
            v["status"] = serde_json::json!({"conditions": [{
                "type": berth_crds::CONDITION_LB_READY, "status": status, "reason": reason_,
                "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]});
        }
        serde_json::from_value(v).expect("service")
    }

    fn class(name: &str) -> LoadBalancerClass {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1", "kind": "LoadBalancerClass",
            "metadata": {"name": name}, "spec": {"pool": {"addresses": ["198.19.0.1/32"]}}
        }))
        .expect("class")
    }

    fn facts<'a>(s: &'a Service, classes: &'a [LoadBalancerClass]) -> Facts<'a> {
        let class_name = cluster::class_of(s, classes);
        Facts {
            svc: s,
            class: class_name
                .as_deref()
                .and_then(|n| classes.iter().find(|c| c.name_any() == n)),
            class_name,
            classes,
            holders: Vec::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn an_exhausted_pool_names_its_holders_and_the_fix() {
        let classes = [class("lab")];
        let s = svc(
            Some("berth.dev/lab"),
            Some((
                "False",
                pool::POOL_EXHAUSTED,
                "no free IPv4 address in pool lab (1 addresses, all in use)",
            )),
        );
        let mut f = facts(&s, &classes);
        f.holders = vec![("shop/first".into(), vec!["198.19.0.1".into()])];
        let e = explain_facts(&f);
        assert!(!e.ready);
        assert!(
            e.reasons[0].contains("pool of class lab is exhausted"),
            "{e:?}"
        );
        assert!(e.reasons[1].contains("shop/first (198.19.0.1)"), "{e:?}");
        let text = render("shop/web", &e);
        assert!(text.contains("What to change:"), "{text}");
        assert!(text.contains("delete one of those Services"), "{text}");
    }

    #[test]
    fn each_invalid_annotation_is_its_own_reason() {
        let classes = [class("lab")];
        let msg = "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval: not a number; service.beta.kubernetes.io/aws-load-balancer-scheme: unknown scheme";
        let s = svc(
            Some("berth.dev/lab"),
            Some(("False", reason::INVALID_ANNOTATION, msg)),
        );
        let e = explain_facts(&facts(&s, &classes));
        assert_eq!(e.reasons.len(), 2, "{e:?}");
        assert!(
            e.reasons[1]
                .starts_with("annotation service.beta.kubernetes.io/aws-load-balancer-scheme")
        );
    }

    #[test]
    fn a_pending_replacement_says_how_to_acknowledge_it() {
        let classes = [class("lab")];
        let msg = format!(
            "changing scheme from internal to internet-facing replaces load balancer x (...): kept unchanged until the Service is annotated {ACKNOWLEDGE}=scheme=internet-facing@abc"
        );
        let s = svc(
            Some("berth.dev/lab"),
            Some(("False", REPLACEMENT_PENDING, &msg)),
        );
        let e = explain_facts(&facts(&s, &classes));
        let want =
            format!("kubectl annotate service web {ACKNOWLEDGE}=scheme=internet-facing@abc`");
        assert!(e.fixes[0].contains(&want), "{e:?}");
    }

    #[test]
    fn no_class_matched_lists_the_classes() {
        let classes = [class("lab")];
        let s = svc(None, None);
        let e = explain_facts(&facts(&s, &classes));
        assert!(e.reasons[0].contains("no class matched"), "{e:?}");
        assert!(e.fixes[0].contains("lab"), "{e:?}");
        let s = svc(Some("berth.dev/gone"), None);
        let e = explain_facts(&facts(&s, &classes));
        assert!(
            e.reasons[0].contains("no LoadBalancerClass named gone"),
            "{e:?}"
        );
    }

    #[test]
    fn a_ready_service_says_so_and_no_fix() {
        let classes = [class("lab")];
        let s = svc(
            Some("berth.dev/lab"),
            Some((
                "True",
                reason::PROVISIONED,
                "address 198.19.0.1 from pool lab",
            )),
        );
        let mut f = facts(&s, &classes);
        f.warnings = vec![("Old".into(), "gone".into())];
        let e = explain_facts(&f);
        assert!(e.ready && e.fixes.is_empty(), "{e:?}");
        assert!(render("shop/web", &e).starts_with("Service shop/web is ready."));
    }
}
