//! Health-check NodePorts of `externalTrafficPolicy: Local` Services: load balancers
//! probe them to learn which nodes have local endpoints (200 with the count, 503 none).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::http::{self, Response};
use crate::proxy::model::ServiceId;

pub type Checks = BTreeMap<u16, (ServiceId, usize)>;

/// The answer for one health-check port.
pub fn response(entry: Option<&(ServiceId, usize)>) -> Response {
    match entry {
        None => (404, "text/plain", "no such service\n".into()),
        Some((id, n)) => {
            let body = serde_json::json!({
                "service": {"namespace": id.namespace, "name": id.name},
                "localEndpoints": n,
                "serviceProxyHealthy": true,
            })
            .to_string();
            (if *n > 0 { 200 } else { 503 }, "application/json", body)
        }
    }
}

/// One listener per health-check port, answering from the latest counts.
pub struct HealthChecks {
    bind: IpAddr,
    counts: Arc<Mutex<Checks>>,
    listeners: Mutex<BTreeMap<u16, JoinHandle<()>>>,
}

impl HealthChecks {
    pub fn new(bind: IpAddr) -> Self {
        Self {
            bind,
            counts: Arc::default(),
            listeners: Mutex::default(),
        }
    }

    /// Opens listeners for new ports, closes those no Service needs, updates counts.
    pub async fn update(&self, desired: Checks) {
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
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, "cannot serve health check: {e}");
                    continue;
                }
            };
            let counts = self.counts.clone();
            let task = tokio::spawn(http::serve(listener, move |_path| {
                let entry = counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&port)
                    .cloned();
                async move { response(entry.as_ref()) }
            }));
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
        let (s, _, body) = response(Some(&(id.clone(), 2)));
        assert_eq!(s, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "we\"b");
        assert_eq!(response(Some(&(id, 0))).0, 503);
        assert_eq!(response(None).0, 404);
    }
}
