//! One factory for the Services the suites create, instead of hand-written JSON in each:
//! `ServiceBuilder::load_balancer("web").class(&lb).selector("app", "web").tcp(80, 8080)`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Map, Value, json};

use crate::testing::TestEnv;

/// A Service under construction; every field the suites use, anything else via [`Self::set`].
#[derive(Clone, Debug)]
pub struct ServiceBuilder {
    name: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    selector: BTreeMap<String, String>,
    ports: Vec<Value>,
    spec: Map<String, Value>,
}

impl ServiceBuilder {
    /// A ClusterIP Service (the API's default type).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            selector: BTreeMap::new(),
            ports: Vec::new(),
            spec: Map::new(),
        }
    }

    /// A `type: LoadBalancer` Service.
    pub fn load_balancer(name: &str) -> Self {
        Self::new(name).type_("LoadBalancer")
    }

    /// `spec.type`.
    pub fn type_(self, type_: &str) -> Self {
        self.set("type", type_)
    }

    /// `spec.loadBalancerClass`, e.g. `berth.dev/<class>`.
    pub fn class(self, load_balancer_class: &str) -> Self {
        self.set("loadBalancerClass", load_balancer_class)
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Every string field of a JSON object as an annotation (for tables of cases).
    pub fn annotations(mut self, annotations: &Value) -> Self {
        if let Some(map) = annotations.as_object() {
            for (k, v) in map {
                if let Some(v) = v.as_str() {
                    self.annotations.insert(k.clone(), v.into());
                }
            }
        }
        self
    }

    /// The class berth recorded as provisioning the Service (what the node agents read).
    pub fn owner_class(self, class: &str) -> Self {
        self.annotation(berth_crds::ANNOTATION_OWNER_CLASS, class)
    }

    /// A `spec.selector` entry.
    pub fn selector(mut self, key: &str, value: &str) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }

    /// `spec.selector: {app: <app>}`.
    pub fn app(self, app: &str) -> Self {
        self.selector("app", app)
    }

    /// A TCP port without name or targetPort.
    pub fn port(self, port: i32) -> Self {
        self.raw_port(json!({ "port": port }))
    }

    /// A TCP port forwarded to `target_port`.
    pub fn tcp(self, port: i32, target_port: i32) -> Self {
        self.raw_port(json!({ "port": port, "targetPort": target_port }))
    }

    /// A UDP port forwarded to `target_port`.
    pub fn udp(self, port: i32, target_port: i32) -> Self {
        self.raw_port(json!({ "port": port, "targetPort": target_port, "protocol": "UDP" }))
    }

    /// A named port of `protocol` (`TCP`, `UDP`, `SCTP`); `target_port` when given.
    pub fn named_port(
        self,
        name: &str,
        protocol: &str,
        port: i32,
        target_port: Option<i32>,
    ) -> Self {
        let mut p = json!({ "name": name, "protocol": protocol, "port": port });
        if let Some(t) = target_port {
            p["targetPort"] = t.into();
        }
        self.raw_port(p)
    }

    /// A port written out in full (`nodePort`, a named `targetPort`, ...).
    pub fn raw_port(mut self, port: Value) -> Self {
        self.ports.push(port);
        self
    }

    /// `externalTrafficPolicy: Local` when `local`, else `Cluster`.
    pub fn external_local(self, local: bool) -> Self {
        self.set(
            "externalTrafficPolicy",
            if local { "Local" } else { "Cluster" },
        )
    }

    /// `spec.loadBalancerSourceRanges`.
    pub fn source_ranges(self, ranges: &[&str]) -> Self {
        self.set("loadBalancerSourceRanges", ranges)
    }

    /// Any other `spec` field, e.g. `set("sessionAffinity", "ClientIP")`.
    pub fn set(mut self, field: &str, value: impl Into<Value>) -> Self {
        self.spec.insert(field.into(), value.into());
        self
    }

    /// Every field of a JSON object into `spec` (for specs written as tables).
    pub fn merge_spec(mut self, spec: &Value) -> Self {
        if let Some(map) = spec.as_object() {
            for (k, v) in map {
                self.spec.insert(k.clone(), v.clone());
            }
        }
        self
    }

    /// The object as JSON.
    pub fn json(&self) -> Value {
        let mut metadata = json!({ "name": self.name });
        if !self.labels.is_empty() {
            metadata["labels"] = json!(self.labels);
        }
        if !self.annotations.is_empty() {
            metadata["annotations"] = json!(self.annotations);
        }
        let mut spec = Value::Object(self.spec.clone());
        if !self.selector.is_empty() {
            spec["selector"] = json!(self.selector);
        }
        if !self.ports.is_empty() {
            spec["ports"] = Value::Array(self.ports.clone());
        }
        json!({ "apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec })
    }

    pub fn build(&self) -> Service {
        serde_json::from_value(self.json()).unwrap_or_else(|e| panic!("service {}: {e}", self.name))
    }

    /// Creates the Service in `namespace`; panics with the API server's answer on failure.
    pub async fn create(&self, env: &TestEnv, namespace: &str) -> Service {
        self.create_with(&Api::namespaced(env.client.clone(), namespace))
            .await
    }

    /// Creates the Service through `api`.
    pub async fn create_with(&self, api: &Api<Service>) -> Service {
        api.create(&PostParams::default(), &self.build())
            .await
            .unwrap_or_else(|e| panic!("create service {}: {e}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_field_and_leaves_out_unset_ones() {
        let v = ServiceBuilder::load_balancer("web")
            .class("berth.dev/lab")
            .annotation("a", "1")
            .label("tier", "edge")
            .app("web")
            .named_port("http", "TCP", 80, Some(8080))
            .udp(53, 5353)
            .external_local(true)
            .source_ranges(&["198.18.0.0/24"])
            .set("sessionAffinity", "ClientIP")
            .json();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "labels": {"tier": "edge"}, "annotations": {"a": "1"}},
                "spec": {"type": "LoadBalancer", "loadBalancerClass": "berth.dev/lab",
                    "selector": {"app": "web"},
                    "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                              {"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                    "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["198.18.0.0/24"],
                    "sessionAffinity": "ClientIP"}})
        );
        let plain = ServiceBuilder::new("c").port(80).json();
        assert_eq!(
            plain,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"},
                "spec": {"ports": [{"port": 80}]}})
        );
        assert_eq!(
            ServiceBuilder::new("x").build().metadata.name.as_deref(),
            Some("x")
        );
    }
}
