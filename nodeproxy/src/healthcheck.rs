//! Health-check NodePorts of `externalTrafficPolicy: Local` Services: load balancers
//! probe them to learn which nodes have local endpoints (200 with the count, 503 none).
//! One listener per port, served by the agent's shared admin server (its limits and
//! connection cap cover these listeners too).
//!
//! Also [`AgentHealth`]: why the agent's own `/healthz` fails besides a stale sync.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_runtime::admin::{self, Reply, Server};
use tokio::task::JoinHandle;

use crate::proxy::model::ServiceId;

pub type Checks = BTreeMap<u16, (ServiceId, usize)>;

/// The answer for one health-check port (any path, as kube-proxy answers).
pub fn response(entry: Option<&(ServiceId, usize)>) -> Reply {
    match entry {
        None => Reply::text(404, "no such service\n"),
        Some((id, n)) => Reply::json(
            if *n > 0 { 200 } else { 503 },
            &serde_json::json!({
                "service": {"namespace": id.namespace, "name": id.name},
                "localEndpoints": n,
                "serviceProxyHealthy": true,
            }),
        ),
    }
}

/// One listener per health-check port, answering from the latest counts.
pub struct HealthChecks {
    bind: IpAddr,
    server: Server,
    counts: Arc<Mutex<Checks>>,
    listeners: Mutex<BTreeMap<u16, JoinHandle<()>>>,
}

impl HealthChecks {
    pub fn new(bind: IpAddr, server: Server) -> Self {
        Self {
            bind,
            server,
            counts: Arc::default(),
            listeners: Mutex::default(),
        }
    }

    /// Opens listeners for new ports, closes those no Service needs (with their
    /// connections), updates counts.
    pub fn update(&self, desired: Checks) {
        let ports: Vec<u16> = desired.keys().copied().collect();
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = desired;
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.retain(|port, task| {
            let keep = ports.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for port in ports {
            if listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = match admin::bind_now(addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, "cannot serve health check: {e}");
                    continue;
                }
            };
            let counts = self.counts.clone();
            let handler = move |_path: &str| {
                let counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                response(counts.get(&port))
            };
            let task = tokio::spawn(self.server.clone().serve(listener, handler));
            tracing::info!(%addr, "serving health check");
            listeners.insert(port, task);
        }
    }
}

/// Consecutive failed syncs after which `/healthz` fails: one failure is retried at once
/// (1 s later), a second one is an outage.
pub const FAILURES_UNHEALTHY: u32 = 2;

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// An outage of failing transactions.
#[derive(Clone, Debug)]
struct Failing {
    since: Instant,
    attempts: u32,
    error: String,
}

#[derive(Debug, Default)]
struct HealthState {
    draining: Option<String>,
    failing: Option<Failing>,
}

/// What makes `/healthz` fail besides a stale sync: the node draining (KEP-3836: load
/// balancers move traffic away first), and transactions failing repeatedly.
#[derive(Debug, Default)]
pub struct AgentHealth {
    state: Mutex<HealthState>,
}

/// Why the Node is going away, if it is: a deletionTimestamp or the autoscaler's taint.
pub fn draining(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some("node is being deleted".into());
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_TAINT));
    tainted.then(|| format!("node has the {AUTOSCALER_TAINT} taint"))
}

/// Why this node's pool addresses should move to other nodes first: it is going away
/// ([`draining`]) or cordoned (a drain usually follows).
pub fn leaving(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    draining(node).or_else(|| cordoned.then(|| "node is cordoned".to_string()))
}

impl AgentHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Node is (`Some(why)`) or is no longer (`None`) going away.
    pub fn set_draining(&self, why: Option<String>) {
        let mut st = self.state();
        if st.draining != why {
            match &why {
                Some(w) => tracing::info!("healthz fails from now on: {w}"),
                None => tracing::info!("node no longer draining; healthz follows syncs again"),
            }
            st.draining = why;
        }
    }

    /// A transaction failed; returns the consecutive failures so far. The first failure
    /// of an outage is logged with nft's error, the rest only at debug.
    pub fn sync_failed(&self, error: &str) -> u32 {
        let mut st = self.state();
        let f = st.failing.get_or_insert_with(|| Failing {
            since: Instant::now(),
            attempts: 0,
            error: error.to_string(),
        });
        f.attempts += 1;
        if f.attempts == 1 {
            tracing::warn!("sync failed, retrying with backoff: {error}");
        } else {
            tracing::debug!(attempts = f.attempts, "sync failed again: {error}");
        }
        f.attempts
    }

    /// A transaction succeeded: ends an outage (logged once).
    pub fn sync_succeeded(&self) {
        if let Some(f) = self.state().failing.take() {
            tracing::info!(
                attempts = f.attempts,
                after_s = f.since.elapsed().as_secs_f64(),
                first_error = %f.error,
                "sync recovered"
            );
        }
    }

    /// Why `/healthz` fails now (empty: it does not, for these reasons). Draining counts
    /// only with `draining` (not for `/livez`: a draining agent must not be restarted).
    pub fn problems(&self, draining: bool) -> Vec<String> {
        let st = self.state();
        let mut out: Vec<String> = st.draining.iter().filter(|_| draining).cloned().collect();
        if let Some(f) = st
            .failing
            .as_ref()
            .filter(|f| f.attempts >= FAILURES_UNHEALTHY)
        {
            out.push(format!(
                "{} consecutive syncs failed in {:.0?}: {}",
                f.attempts,
                Duration::from_secs(f.since.elapsed().as_secs()),
                f.error
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;

    #[test]
    fn repeated_failures_fail_health_until_a_success() {
        let h = AgentHealth::default();
        assert!(h.problems(true).is_empty());
        assert_eq!(h.sync_failed("nft: Operation not permitted"), 1);
        assert!(h.problems(true).is_empty(), "one failure is retried first");
        assert_eq!(h.sync_failed("nft: Operation not permitted"), 2);
        let p = h.problems(true);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("Operation not permitted"), "{p:?}");
        h.sync_succeeded();
        assert!(h.problems(true).is_empty());
        assert_eq!(h.sync_failed("x"), 1, "a new outage starts over");
    }

    #[test]
    fn deletion_or_the_autoscaler_taint_drains() {
        let node = |v: serde_json::Value| -> Node { serde_json::from_value(v).expect("node") };
        assert_eq!(
            draining(&node(serde_json::json!({"metadata": {"name": "n"}}))),
            None
        );
        let other = node(serde_json::json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}));
        assert_eq!(draining(&other), None);
        let tainted = node(serde_json::json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": AUTOSCALER_TAINT, "value": "1700000000", "effect": "NoSchedule"}]}}));
        assert!(draining(&tainted).is_some());
        let deleted = node(serde_json::json!({"metadata": {"name": "n",
            "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["x"]}}));
        assert!(draining(&deleted).is_some());
        assert_eq!(leaving(&tainted), draining(&tainted));
        let cordoned =
            node(serde_json::json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}}));
        assert_eq!(draining(&cordoned), None, "cordoned alone is not draining");
        assert_eq!(leaving(&cordoned).as_deref(), Some("node is cordoned"));
        assert_eq!(leaving(&other), None);
        let h = AgentHealth::default();
        h.set_draining(draining(&tainted));
        assert_eq!(h.problems(true).len(), 1);
        assert!(h.problems(false).is_empty(), "liveness ignores draining");
        h.set_draining(None);
        assert!(h.problems(true).is_empty());
    }

    #[test]
    fn ok_with_local_endpoints_unavailable_without() {
        let id = ServiceId::new("ns", "we\"b");
        let r = response(Some(&(id.clone(), 2)));
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "we\"b");
        assert_eq!(response(Some(&(id, 0))).status, 503);
        assert_eq!(response(None).status, 404);
    }

    #[tokio::test]
    async fn one_listener_per_port_follows_the_desired_ports() {
        let health = HealthChecks::new(IpAddr::from([127, 0, 0, 1]), Server::default());
        // A free port: bind, note it, release.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        health.update(BTreeMap::from([(port, (ServiceId::new("ns", "web"), 1))]));
        let probe = || std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(probe().is_ok(), "health-check port not listening");
        health.update(BTreeMap::new());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(probe().is_err(), "health-check port still listening");
    }
}
