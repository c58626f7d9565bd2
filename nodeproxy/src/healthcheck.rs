//! Health-check NodePorts of `externalTrafficPolicy: Local` Services: load balancers
//! probe them to learn which nodes have local endpoints (200 with the count, 503 none).
//! One listener per port, served by the agent's shared admin server (its limits and
//! connection cap cover these listeners too).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
