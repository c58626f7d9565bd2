//! What the test kubelet runs for a pod. Containers whose image is one of berth's own
//! (`…/berth-controller:…`, `…/berth-nodeproxy:…`) run berth's built binaries with the
//! container's command/args and environment and the pod's ServiceAccount token mounted
//! where in-cluster clients look for it; every other container is played by one
//! `berth-podserver` serving its ports.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::error::{Error, Result};
use crate::paths;

/// berth's binaries that a pod image may name.
pub const BERTH_BINARIES: &[&str] = &["berth-controller", "berth-nodeproxy"];

/// The berth binary an image stands for: its last path component without tag or digest.
pub fn berth_binary(image: &str) -> Option<&'static str> {
    let last = image.rsplit('/').next().unwrap_or(image);
    let name = last.split(['@', ':']).next().unwrap_or(last);
    BERTH_BINARIES.iter().copied().find(|b| *b == name)
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

/// The command line of a berth container: the binary named by the image (or by the
/// first `command` element), then the rest of `command`, then `args`.
pub fn berth_argv(container: &Container) -> Option<(&'static str, Vec<String>)> {
    let binary = berth_binary(container.image.as_deref()?)?;
    let mut rest: Vec<String> = container.command.clone().unwrap_or_default();
    if let Some(first) = rest.first() {
        let base = first.rsplit('/').next().unwrap_or(first);
        if let Some(b) = BERTH_BINARIES.iter().find(|b| **b == base) {
            let b: &'static str = b;
            rest.remove(0);
            rest.extend(container.args.clone().unwrap_or_default());
            return Some((b, rest));
        }
    }
    rest.extend(container.args.clone().unwrap_or_default());
    Some((binary, rest))
}

/// Runs a berth binary in `netns` with `env` and, when `token_dir` is given, the
/// ServiceAccount files mounted at /var/run/secrets/kubernetes.io/serviceaccount inside
/// the process's own mount namespace (`ip netns exec` gives it one; nothing on the host
/// is mounted over).
pub fn berth_command(
    netns: &str,
    binary: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    token_dir: Option<&Path>,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]);
    let exe = paths::sibling_bin(binary);
    match token_dir {
        Some(dir) => {
            let script = "mount -t tmpfs -o size=1m,mode=0755 berth-run /run && \
                mkdir -p /run/secrets/kubernetes.io/serviceaccount && \
                cp \"$1\"/token \"$1\"/ca.crt \"$1\"/namespace /run/secrets/kubernetes.io/serviceaccount/ && \
                shift && exec \"$@\"";
            cmd.args(["sh", "-c", script, "sh"]).arg(dir).arg(exe);
        }
        None => {
            cmd.arg(exe);
        }
    }
    cmd.args(args).env_clear().envs(env);
    cmd.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, command: Option<&[&str]>, args: &[&str]) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            args: Some(args.iter().map(|s| s.to_string()).collect()),
            ..Container::default()
        }
    }

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
    fn argv_takes_command_and_args_like_a_container_runtime() {
        let c = container("r/berth-controller:1", None, &["--leader-elect"]);
        assert_eq!(
            berth_argv(&c),
            Some(("berth-controller", vec!["--leader-elect".into()]))
        );
        let c = container(
            "r/berth-nodeproxy:1",
            Some(&["/usr/local/bin/berth-nodeproxy", "--v"]),
            &["--node-name=a"],
        );
        assert_eq!(
            berth_argv(&c),
            Some((
                "berth-nodeproxy",
                vec!["--v".into(), "--node-name=a".into()]
            ))
        );
        assert_eq!(berth_argv(&container("nginx", None, &[])), None);
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
