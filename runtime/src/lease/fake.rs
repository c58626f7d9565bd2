//! An in-memory apiserver for Leases, for unit tests of Lease users: it stores the Leases
//! of one namespace with resourceVersions and answers with the conflict rules of the real
//! one (409 on a create of an existing name or a replace at another resourceVersion).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    leases: BTreeMap<String, Lease>,
    version: u64,
    requests: usize,
}

/// Cheap to clone; every clone is the same server.
#[derive(Clone, Default)]
pub struct FakeApiserver {
    namespace: String,
    state: Arc<Mutex<State>>,
    /// True while requests get no answer; they are answered once it turns false.
    stalled: Arc<tokio::sync::watch::Sender<bool>>,
}

fn status(code: u16, reason: &str) -> (u16, Value) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": reason, "code": code});
    (code, body)
}

impl FakeApiserver {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            state: Arc::default(),
            stalled: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client whose requests this server answers.
    pub fn client(&self) -> Client {
        let server = self.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let server = server.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let mut stalled = server.stalled.subscribe();
                // A dropped sender cannot happen while `server` lives.
                let _ = stalled.wait_for(|s| !*s).await;
                let (code, json) = server.handle(&parts.method, parts.uri.path(), &body);
                let res = http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(json.to_string())))
                    .unwrap_or_default();
                Ok::<_, Infallible>(res)
            }
        });
        Client::new(svc, self.namespace.clone())
    }

    /// From now on, requests get no answer (`true`), or are answered again, the held
    /// ones too (`false`).
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// How many requests were answered so far.
    pub fn requests(&self) -> usize {
        self.state().requests
    }

    pub fn get(&self, name: &str) -> Option<Lease> {
        self.state().leases.get(name).cloned()
    }

    /// Stores `lease` as another writer would; returns it as stored.
    pub fn put(&self, lease: Lease) -> Lease {
        let mut state = self.state();
        Self::store(&mut state, &self.namespace, lease)
    }

    fn handle(&self, method: &http::Method, path: &str, body: &[u8]) -> (u16, Value) {
        let mut state = self.state();
        state.requests += 1;
        let prefix = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
            self.namespace
        );
        let Some(rest) = path.strip_prefix(&prefix) else {
            return status(404, "NotFound");
        };
        let name = rest.trim_start_matches('/');
        let sent: Option<Lease> = serde_json::from_slice(body).ok();
        match (method.as_str(), sent) {
            ("GET", _) => match state.leases.get(name) {
                Some(l) => (200, json!(l)),
                None => status(404, "NotFound"),
            },
            ("POST", Some(l)) if state.leases.contains_key(&l.name_any()) => {
                status(409, "AlreadyExists")
            }
            ("PUT", Some(l)) => match state.leases.get(name) {
                None => status(404, "NotFound"),
                Some(cur) if cur.metadata.resource_version != l.metadata.resource_version => {
                    status(409, "Conflict")
                }
                Some(_) => (200, json!(Self::store(&mut state, &self.namespace, l))),
            },
            ("POST", Some(l)) => (201, json!(Self::store(&mut state, &self.namespace, l))),
            ("DELETE", _) => Self::delete(&mut state, name, body),
            _ => status(405, "MethodNotAllowed"),
        }
    }

    /// A delete, with the resourceVersion precondition of its DeleteOptions if any.
    fn delete(state: &mut State, name: &str, body: &[u8]) -> (u16, Value) {
        let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let wanted = options["preconditions"]["resourceVersion"].as_str();
        match state.leases.get(name) {
            None => status(404, "NotFound"),
            Some(cur)
                if wanted
                    .is_some_and(|rv| cur.metadata.resource_version.as_deref() != Some(rv)) =>
            {
                status(409, "Conflict")
            }
            Some(_) => {
                let gone = state.leases.remove(name);
                (200, json!(gone))
            }
        }
    }

    fn store(state: &mut State, namespace: &str, mut lease: Lease) -> Lease {
        state.version += 1;
        lease.metadata.resource_version = Some(state.version.to_string());
        lease.metadata.namespace = Some(namespace.into());
        state.leases.insert(lease.name_any(), lease.clone());
        lease
    }
}
