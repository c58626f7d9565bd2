//! Every Kubernetes write the controller makes while leading, each checked against the
//! leader [`Fence`] immediately before it is sent: a replica that lost (or can no longer
//! be sure of) its Lease makes none. Refusals are counted (`berth_fenced_writes_total`)
//! and logged; writes made are counted by kind (`berth_kube_writes_total`).

use std::fmt::Debug;
use std::sync::Arc;

use berth_runtime::{Fence, Fenced};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, Recorder};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use crate::metrics::Metrics;

/// What a write was for: the label of the write counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    ServiceStatus,
    ServiceMetadata,
    NodePorts,
    Event,
    ClassStatus,
    PodCondition,
}

impl Write {
    pub fn as_str(self) -> &'static str {
        match self {
            Write::ServiceStatus => "service_status",
            Write::ServiceMetadata => "service_metadata",
            Write::NodePorts => "node_ports",
            Write::Event => "event",
            Write::ClassStatus => "class_status",
            Write::PodCondition => "pod_condition",
        }
    }
}

impl std::fmt::Display for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}: {1}")]
    Kube(Write, #[source] kube::Error),
    #[error("{0} refused: {1}")]
    Fenced(Write, #[source] Fenced),
}

/// The leader's hand for Kubernetes writes. Cheap to share.
pub struct Writer {
    client: Client,
    recorder: Recorder,
    fence: Fence,
    metrics: Arc<Metrics>,
}

impl Writer {
    pub fn new(client: Client, recorder: Recorder, fence: Fence, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            recorder,
            fence,
            metrics,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Asks the fence for one write, right before it is sent.
    pub fn allow(&self, what: Write) -> Result<(), WriteError> {
        match self.fence.check() {
            Ok(()) => {
                self.metrics.kube_write(what.as_str());
                Ok(())
            }
            Err(e) => {
                self.metrics.fenced_write("kubernetes");
                tracing::warn!(write = what.as_str(), "write refused: not leading");
                Err(WriteError::Fenced(what, e))
            }
        }
    }

    /// Server-side apply of a status subresource under berth's field manager.
    pub async fn apply_status<K>(
        &self,
        api: &Api<K>,
        name: &str,
        body: serde_json::Value,
        what: Write,
    ) -> Result<K, WriteError>
    where
        K: Clone + DeserializeOwned + Debug,
    {
        self.allow(what)?;
        api.patch_status(
            name,
            &PatchParams::apply(berth_crds::CONTROLLER_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|e| WriteError::Kube(what, e))
    }

    /// A JSON merge patch of the object.
    pub async fn merge<K>(
        &self,
        api: &Api<K>,
        name: &str,
        body: serde_json::Value,
        what: Write,
    ) -> Result<K, WriteError>
    where
        K: Clone + DeserializeOwned + Debug,
    {
        self.allow(what)?;
        api.patch(name, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map_err(|e| WriteError::Kube(what, e))
    }

    /// A strategic merge patch of a status subresource: a Pod condition is merged by its
    /// type, next to the kubelet's own (a server-side apply would take over the list).
    pub async fn strategic_status<K>(
        &self,
        api: &Api<K>,
        name: &str,
        body: serde_json::Value,
        what: Write,
    ) -> Result<K, WriteError>
    where
        K: Clone + DeserializeOwned + Debug,
    {
        self.allow(what)?;
        api.patch_status(name, &PatchParams::default(), &Patch::Strategic(body))
            .await
            .map_err(|e| WriteError::Kube(what, e))
    }

    /// Publishes an Event; a failure (or a refusal) is logged, never fatal.
    pub async fn publish(&self, ev: &Event, reference: &ObjectReference) {
        if self.allow(Write::Event).is_err() {
            return;
        }
        if let Err(e) = self
            .recorder
            .publish(&berth_runtime::events::distinct(ev), reference)
            .await
        {
            tracing::warn!(error = %e, "publishing event failed");
        }
    }
}
