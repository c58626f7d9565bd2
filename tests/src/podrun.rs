//! What the test kubelet runs for a pod. Containers whose image is one of berth's own
//! (`…/berth-controller:…`, `…/berth-nodeproxy:…`) run from that image as `make images`
//! built it: unpacked into a bundle and started with crun in the pod's network namespace
//! (see `oci`), with the container's command/args, environment and security context and
//! the pod's ServiceAccount token mounted where in-cluster clients look for it; every
//! other container is played by one `berth-podserver` serving its ports.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::error::{Error, Result};
use crate::oci;

/// berth's binaries that a pod image may name.
pub const BERTH_BINARIES: &[&str] = &["berth-controller", "berth-nodeproxy"];

/// The berth binary an image stands for: its last path component without tag or digest.
pub fn berth_binary(image: &str) -> Option<&'static str> {
    let last = image.rsplit('/').next().unwrap_or(image);
    let name = last.split(['@', ':']).next().unwrap_or(last);
    BERTH_BINARIES.iter().copied().find(|b| *b == name)
}

/// Whether the container runs one of berth's images (else a podserver plays it).
pub fn is_berth_container(container: &Container) -> bool {
    container.image.as_deref().and_then(berth_binary).is_some()
}

/// Facts about the pod's placement that downward-API env vars refer to.
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

impl PodFacts<'_> {
    fn field(&self, path: &str) -> Option<String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        Some(match path {
            "metadata.name" => meta.name.clone()?,
            "metadata.namespace" => meta.namespace.clone()?,
            "metadata.uid" => meta.uid.clone()?,
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => spec?.service_account_name.clone()?,
            "status.podIP" => self.pod_ip.clone(),
            "status.hostIP" => self.host_ip.clone(),
            p if p.starts_with("metadata.labels['") => {
                let key = p
                    .trim_start_matches("metadata.labels['")
                    .trim_end_matches("']");
                meta.labels.as_ref()?.get(key)?.clone()
            }
            p if p.starts_with("metadata.annotations['") => {
                let key = p
                    .trim_start_matches("metadata.annotations['")
                    .trim_end_matches("']");
                meta.annotations.as_ref()?.get(key)?.clone()
            }
            _ => return None,
        })
    }
}

/// The environment of a container as a kubelet builds it: the `kubernetes` Service
/// variables first, then the container's own `env` (which wins).
pub async fn container_env(
    client: &Client,
    facts: &PodFacts<'_>,
    container: &Container,
) -> Result<BTreeMap<String, String>> {
    let ns = facts.pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = BTreeMap::from([
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "10.96.0.1".to_string(),
        ),
        ("KUBERNETES_SERVICE_PORT".to_string(), "443".to_string()),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
            "443".to_string(),
        ),
    ]);
    for var in container.env.iter().flatten() {
        if let Some(value) = resolve_env(client, &ns, facts, var).await? {
            env.insert(var.name.clone(), value);
        }
    }
    Ok(env)
}

async fn resolve_env(
    client: &Client,
    ns: &str,
    facts: &PodFacts<'_>,
    var: &EnvVar,
) -> Result<Option<String>> {
    if let Some(v) = &var.value {
        return Ok(Some(v.clone()));
    }
    let Some(from) = &var.value_from else {
        return Ok(Some(String::new()));
    };
    if let Some(f) = &from.field_ref {
        return Ok(facts.field(&f.field_path));
    }
    if let Some(s) = &from.secret_key_ref {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let secret = api
            .get_opt(&s.name)
            .await
            .map_err(Error::kube(format!("secret {ns}/{}", s.name)))?;
        let value = secret.and_then(|sec| sec.data).and_then(|d| {
            d.get(&s.key)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        });
        return match (value, s.optional.unwrap_or(false)) {
            (Some(v), _) => Ok(Some(v)),
            (None, true) => Ok(None),
            (None, false) => Err(Error::Setup(format!(
                "env {}: secret {ns}/{} has no key {}",
                var.name, s.name, s.key
            ))),
        };
    }
    if let Some(c) = &from.config_map_key_ref {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let cm = api
            .get_opt(&c.name)
            .await
            .map_err(Error::kube(format!("configmap {ns}/{}", c.name)))?;
        let value = cm
            .and_then(|cm| cm.data)
            .and_then(|d| d.get(&c.key).cloned());
        return match (value, c.optional.unwrap_or(false)) {
            (Some(v), _) => Ok(Some(v)),
            (None, true) => Ok(None),
            (None, false) => Err(Error::Setup(format!(
                "env {}: configmap {ns}/{} has no key {}",
                var.name, c.name, c.key
            ))),
        };
    }
    Ok(None)
}

/// Writes the pod's ServiceAccount token (a real TokenRequest bound to the pod), the
/// cluster CA and the namespace into `dir`, as the projected volume a kubelet mounts.
pub async fn write_service_account(
    client: &Client,
    pod: &Pod,
    ca_cert: &Path,
    dir: &Path,
) -> Result<()> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let token = api
        .create_token_request(&sa, &PostParams::default(), &req)
        .await
        .map_err(Error::kube(format!("token for serviceaccount {ns}/{sa}")))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| Error::Setup(format!("no token issued for {ns}/{sa}")))?;
    std::fs::create_dir_all(dir).map_err(Error::io("create token dir", dir))?;
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).map_err(Error::io("write token file", p))
    };
    write("token", token.as_bytes())?;
    write("namespace", ns.as_bytes())?;
    let ca = std::fs::read(ca_cert).map_err(Error::io("read cluster CA", ca_cert))?;
    write("ca.crt", &ca)
}

/// A berth container ready to start: its crun id, the image it runs and the command
/// (`crun run`) to supervise.
pub struct BerthContainer {
    pub id: String,
    pub image_id: String,
    pub command: Command,
}

/// Where a pod's container runs and what it mounts.
pub struct Placement<'a> {
    /// The pod's directory: one bundle per container is made in it.
    pub pod_dir: &'a Path,
    /// The network namespace to join: the pod's, or the node's for hostNetwork.
    pub netns: &'a str,
    pub hostname: &'a str,
    pub token_dir: Option<&'a Path>,
}

/// Resolves the container's image in the OCI layouts `make images` writes, unpacks it
/// into a bundle of its own and writes the runtime spec from the pod: argv from the
/// image's entrypoint and the container's command/args, env, user and runAsNonRoot,
/// capabilities, allowPrivilegeEscalation, readOnlyRootFilesystem and the
/// ServiceAccount token.
pub async fn prepare_berth_container(
    client: &Client,
    facts: &PodFacts<'_>,
    container: &Container,
    at: &Placement<'_>,
) -> Result<BerthContainer> {
    let reference = container.image.as_deref().unwrap_or_default();
    let image = oci::resolve(&oci::images_dir(), reference)?;
    let uid = facts.pod.metadata.uid.as_deref().unwrap_or_default();
    let id = oci::container_id(uid, &container.name);
    let bundle = at.pod_dir.join(&container.name);
    let rootfs = bundle.join("rootfs");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle).map_err(Error::io("create bundle", &bundle))?;
    oci::unpack(&image, &rootfs)?;
    let pod_sc = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let (uid, gid) = oci::process_user(pod_sc, sc, &image.config.user)?;
    let env = container_env(client, facts, container).await?;
    let spec = oci::runtime_spec(&oci::SpecInput {
        rootfs: &rootfs,
        readonly: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        args: oci::process_args(container, &image.config),
        env: oci::merged_env(&image.config, &env),
        cwd: image.config.working_dir.clone(),
        uid,
        gid,
        caps: oci::capabilities(sc),
        no_new_privileges: !sc
            .and_then(|s| s.allow_privilege_escalation)
            .unwrap_or(true),
        netns: Path::new("/run/netns").join(at.netns),
        hostname: at.hostname.to_string(),
        token_dir: at.token_dir,
    });
    let config = bundle.join("config.json");
    let text = serde_json::to_vec_pretty(&spec)
        .map_err(|e| Error::Setup(format!("runtime spec of {id}: {e}")))?;
    std::fs::write(&config, text).map_err(Error::io("write runtime spec", &config))?;
    Ok(BerthContainer {
        command: oci::run_command(&bundle, &id),
        id,
        image_id: image.image_id(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_name_berth_binaries_by_their_last_component() {
        assert_eq!(
            berth_binary("ghcr.io/x/berth-controller:v1"),
            Some("berth-controller")
        );
        assert_eq!(
            berth_binary("berth-nodeproxy@sha256:abc"),
            Some("berth-nodeproxy")
        );
        assert_eq!(berth_binary("berth-nodeproxy"), Some("berth-nodeproxy"));
        assert_eq!(berth_binary("nginx:latest"), None);
        assert_eq!(berth_binary("evil/berth-controller-x:1"), None);
    }

    #[test]
    fn downward_api_fields_resolve_from_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "a"}},
            "spec": {"containers": [], "serviceAccountName": "sa"}
        }))
        .expect("pod fixture");
        let facts = PodFacts {
            pod: &pod,
            pod_ip: "10.244.1.2".into(),
            host_ip: "198.18.1.10".into(),
            node_name: "node".into(),
        };
        assert_eq!(facts.field("metadata.name").as_deref(), Some("p"));
        assert_eq!(facts.field("spec.nodeName").as_deref(), Some("node"));
        assert_eq!(facts.field("status.podIP").as_deref(), Some("10.244.1.2"));
        assert_eq!(
            facts.field("spec.serviceAccountName").as_deref(),
            Some("sa")
        );
        assert_eq!(facts.field("metadata.labels['app']").as_deref(), Some("a"));
        assert_eq!(facts.field("status.bogus"), None);
    }
}
