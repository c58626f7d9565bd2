//! Warning Events for refused and losing claims (see [`crate::proxy::claims`]), without
//! spam: every agent reaches the same verdicts from the same objects, so one agent per
//! Service reports them, and only when a refusal starts (again after an hour while it
//! lasts, as Events expire). The reporting node is chosen by rendezvous hashing of the
//! Service's namespace/name over the Ready Nodes: every agent computes the same choice
//! without talking to the others, the load spreads over the nodes, and a node leaving
//! moves only its own Services. A node whose agent is not running makes its Services'
//! refusals go unreported until it leaves the Ready set; the metric
//! `berth_nodeproxy_refused_claims` on every node still counts them.
//!
//! (Publishing from every agent with kube's event series would still make one Event
//! object per node and reason: N nodes × conflicts.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use sha2::{Digest, Sha256};

use crate::proxy::claims::Refusal;
use crate::proxy::index::Findings;
use crate::proxy::model::ServiceId;

/// A refusal that still holds is reported again after this long (Events live an hour).
pub const REPEAT_AFTER: Duration = Duration::from_secs(50 * 60);

/// The node whose agent reports `id`'s Events: the highest hash of (node, Service).
pub fn reporter_for<'a>(id: &ServiceId, nodes: &'a [String]) -> Option<&'a str> {
    nodes
        .iter()
        .max_by_key(|node| {
            let mut h = Sha256::new();
            h.update(node.as_bytes());
            h.update([0]);
            h.update(id.namespace.as_bytes());
            h.update([0]);
            h.update(id.name.as_bytes());
            h.finalize()
        })
        .map(String::as_str)
}

/// One Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub service: ServiceId,
    pub uid: String,
    pub refusal: Refusal,
}

impl Report {
    pub fn event(&self) -> Event {
        Event {
            type_: EventType::Warning,
            reason: self.refusal.reason.as_str().into(),
            note: Some(self.refusal.message.clone()),
            action: "Program".into(),
            secondary: None,
        }
    }

    pub fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(self.service.namespace.clone()),
            name: Some(self.service.name.clone()),
            uid: (!self.uid.is_empty()).then(|| self.uid.clone()),
            ..Default::default()
        }
    }
}

/// What this agent reported, so a refusal that holds is not reported on every sync.
#[derive(Debug)]
pub struct Reporter {
    node: String,
    reported: BTreeMap<(ServiceId, Refusal), Instant>,
}

impl Reporter {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            reported: BTreeMap::new(),
        }
    }

    /// The Events to publish now for the current `findings`; `nodes` are the candidate
    /// reporters (this node alone reports when none is known).
    pub fn update(
        &mut self,
        findings: &BTreeMap<ServiceId, Findings>,
        nodes: &[String],
        now: Instant,
    ) -> Vec<Report> {
        let own = [self.node.clone()];
        let nodes = if nodes.is_empty() { &own[..] } else { nodes };
        let mut current: BTreeSet<(ServiceId, Refusal)> = BTreeSet::new();
        let mut out = Vec::new();
        for (id, f) in findings {
            if reporter_for(id, nodes) != Some(self.node.as_str()) {
                continue;
            }
            for refusal in &f.refusals {
                let key = (id.clone(), refusal.clone());
                let due = self
                    .reported
                    .get(&key)
                    .is_none_or(|at| now.duration_since(*at) >= REPEAT_AFTER);
                if due {
                    self.reported.insert(key.clone(), now);
                    out.push(Report {
                        service: id.clone(),
                        uid: f.uid.clone(),
                        refusal: refusal.clone(),
                    });
                }
                current.insert(key);
            }
        }
        // Forgotten once it ends: the same refusal starting again is a new Event.
        self.reported.retain(|k, _| current.contains(k));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::claims::Reason;

    fn findings(names: &[&str], message: &str) -> BTreeMap<ServiceId, Findings> {
        names
            .iter()
            .map(|n| {
                (
                    ServiceId::new("ns", n),
                    Findings {
                        uid: format!("uid-{n}"),
                        refusals: BTreeSet::from([Refusal {
                            reason: Reason::FrontendConflict,
                            message: message.into(),
                        }]),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn exactly_one_node_reports_each_service() {
        let nodes: Vec<String> = (0..7).map(|i| format!("node-{i}")).collect();
        let names: Vec<String> = (0..200).map(|i| format!("svc-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let f = findings(&refs, "lost");
        let now = Instant::now();
        let mut per_node = Vec::new();
        let mut total = 0;
        for n in &nodes {
            let got = Reporter::new(n).update(&f, &nodes, now).len();
            per_node.push(got);
            total += got;
        }
        assert_eq!(total, 200, "each Service by exactly one node");
        assert!(per_node.iter().all(|n| *n > 0), "spread: {per_node:?}");
    }

    #[test]
    fn a_lasting_refusal_is_reported_once_per_hour_and_again_when_it_returns() {
        let nodes = vec!["n1".to_string()];
        let mut r = Reporter::new("n1");
        let t0 = Instant::now();
        let f = findings(&["a"], "lost 80");
        let first = r.update(&f, &nodes, t0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].event().reason, "FrontendConflict");
        assert_eq!(first[0].reference().uid.as_deref(), Some("uid-a"));
        assert!(
            r.update(&f, &nodes, t0 + Duration::from_secs(30))
                .is_empty()
        );
        assert_eq!(r.update(&f, &nodes, t0 + REPEAT_AFTER).len(), 1);
        assert!(
            r.update(&BTreeMap::new(), &nodes, t0 + REPEAT_AFTER)
                .is_empty()
        );
        assert_eq!(r.update(&f, &nodes, t0 + REPEAT_AFTER).len(), 1);
        let changed = findings(&["a"], "lost 443");
        assert_eq!(r.update(&changed, &nodes, t0 + REPEAT_AFTER).len(), 1);
    }

    #[test]
    fn without_known_nodes_the_agent_reports_itself() {
        let mut r = Reporter::new("n1");
        assert_eq!(
            r.update(&findings(&["a"], "x"), &[], Instant::now()).len(),
            1
        );
        let other = vec!["n2".to_string()];
        let mut r = Reporter::new("n1");
        assert!(
            r.update(&findings(&["a"], "x"), &other, Instant::now())
                .is_empty()
        );
    }
}
