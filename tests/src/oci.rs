//! berth's container images as the test kubelet runs them: an image reference resolves to
//! the OCI layout `hack/images.sh` writes (`target/images/<name>/`, by tag or digest), is
//! unpacked into a bundle per container with umoci and started with crun in the pod's
//! network namespace, with the runtime spec built from the pod's security context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Container, PodSecurityContext, SecurityContext};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::paths;
use crate::proc;

/// crun's state directory for the environment's containers: `delete_all` empties it.
pub const CRUN_ROOT: &str = "/run/berth-e2e-crun";

/// Where the images are: `BERTH_IMAGES_DIR`, else `<target>/images` of this checkout.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_IMAGES_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::repo_root().join("target"))
        .join("images")
}

/// The parts of an image's config a runtime uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub user: String,
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

/// An image reference resolved in its OCI layout.
#[derive(Debug, Clone)]
pub struct Image {
    pub layout: PathBuf,
    /// The layout's tag for the manifest (umoci addresses images by tag).
    pub tag: String,
    /// The manifest digest, `sha256:…`.
    pub digest: String,
    pub config: ImageConfig,
    /// The reference without tag or digest, e.g. `ghcr.io/berth-dev/berth-nodeproxy`.
    pub repository: String,
}

impl Image {
    /// What a kubelet reports as `containerStatuses[].imageID`.
    pub fn image_id(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

/// Splits `repo[:tag][@digest]` (a registry port is not a tag).
fn split_reference(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
    match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..]), digest),
        None => (rest, None, digest),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(Error::io("read OCI file", path))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::Setup(format!("{}: not JSON: {e}", path.display())))
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| Error::Setup(format!("malformed digest {digest}")))?;
    Ok(layout.join("blobs").join(alg).join(hex))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves `image` (whose last path component names the layout) in `dir`: by digest
/// when it has one, else by tag (`latest` when none), as a registry would.
pub fn resolve(dir: &Path, image: &str) -> Result<Image> {
    let (repository, tag, digest) = split_reference(image);
    let name = repository.rsplit('/').next().unwrap_or(repository);
    let layout = dir.join(name);
    let index = read_json(&layout.join("index.json")).map_err(|e| {
        Error::Setup(format!(
            "image {image}: no OCI layout at {} (run `make images`): {e}",
            layout.display()
        ))
    })?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let tag_of = |m: &Value| {
        m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(String::from)
    };
    let found = manifests.iter().find(|m| match (digest, tag) {
        (Some(d), _) => m["digest"].as_str() == Some(d),
        (None, t) => tag_of(m).as_deref() == Some(t.unwrap_or("latest")),
    });
    let Some(m) = found else {
        let tags: Vec<String> = manifests.iter().filter_map(tag_of).collect();
        return Err(Error::Setup(format!(
            "image {image} is not in {} (tags: {}; run `make images`)",
            layout.display(),
            tags.join(", ")
        )));
    };
    let digest = m["digest"].as_str().unwrap_or_default().to_string();
    let tag = tag_of(m).ok_or_else(|| Error::Setup(format!("{digest} has no tag")))?;
    let manifest = read_json(&blob_path(&layout, &digest)?)?;
    let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
    let config = read_json(&blob_path(&layout, config_digest)?)?;
    let c = &config["config"];
    Ok(Image {
        layout,
        tag,
        digest,
        repository: repository.to_string(),
        config: ImageConfig {
            user: c["User"].as_str().unwrap_or_default().to_string(),
            env: strings(&c["Env"]),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
        },
    })
}

/// Unpacks the image's root filesystem into `rootfs` (which must not exist yet).
pub fn unpack(image: &Image, rootfs: &Path) -> Result<()> {
    let reference = format!("{}:{}", image.layout.display(), image.tag);
    let rootfs = rootfs.display().to_string();
    proc::run("umoci", &["raw", "unpack", "--image", &reference, &rootfs]).map(|_| ())
}

/// The process's argv as Kubernetes defines it: `command` replaces the entrypoint and
/// drops the image's Cmd; `args` replaces Cmd.
pub fn process_args(container: &Container, image: &ImageConfig) -> Vec<String> {
    let mut argv = match &container.command {
        Some(c) if !c.is_empty() => c.clone(),
        _ => image.entrypoint.clone(),
    };
    match &container.args {
        Some(a) if !a.is_empty() => argv.extend(a.iter().cloned()),
        _ if container.command.as_ref().is_none_or(|c| c.is_empty()) => {
            argv.extend(image.cmd.iter().cloned())
        }
        _ => {}
    }
    argv
}

/// uid and gid: the container's securityContext over the pod's over the image's `User`
/// (numeric only: the images carry no user database lookups). runAsNonRoot refuses uid 0,
/// as the kubelet does.
pub fn process_user(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
    image_user: &str,
) -> Result<(i64, i64)> {
    let (img_uid, img_gid) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let parse = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| Error::Setup(format!("image user {image_user:?} is not numeric")))
    };
    let image_uid = if img_uid.is_empty() {
        0
    } else {
        parse(img_uid)?
    };
    let uid = container
        .and_then(|c| c.run_as_user)
        .or(pod.and_then(|p| p.run_as_user))
        .unwrap_or(image_uid);
    let gid = match container
        .and_then(|c| c.run_as_group)
        .or(pod.and_then(|p| p.run_as_group))
    {
        Some(g) => g,
        None => img_gid.map(parse).transpose()?.unwrap_or(0),
    };
    let non_root = container
        .and_then(|c| c.run_as_non_root)
        .or(pod.and_then(|p| p.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err(Error::Setup(
            "container has runAsNonRoot and would run as root (uid 0)".into(),
        ));
    }
    Ok((uid, gid))
}

/// The capabilities a container runtime grants by default (containerd's and CRI-O's).
const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The default set minus `drop` (`ALL` drops every one) plus `add`, as `CAP_*` names.
pub fn capabilities(sc: Option<&SecurityContext>) -> Vec<String> {
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let norm = |c: &String| c.trim_start_matches("CAP_").to_uppercase();
    let drop: Vec<String> = caps
        .and_then(|c| c.drop.as_ref())
        .map(|d| d.iter().map(norm).collect())
        .unwrap_or_default();
    let mut out: Vec<String> = if drop.iter().any(|d| d == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    for a in caps.and_then(|c| c.add.as_ref()).into_iter().flatten() {
        let a = norm(a);
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out.iter().map(|c| format!("CAP_{c}")).collect()
}

/// What the runtime spec of one container is made from.
pub struct SpecInput<'a> {
    pub rootfs: &'a Path,
    pub readonly: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: i64,
    pub gid: i64,
    pub caps: Vec<String>,
    pub no_new_privileges: bool,
    /// The network namespace to join (`/run/netns/<name>`).
    pub netns: PathBuf,
    pub hostname: String,
    /// Mounted read-only at /var/run/secrets/kubernetes.io/serviceaccount when given.
    pub token_dir: Option<&'a Path>,
}

/// The OCI runtime spec (config.json) for crun. No cgroup settings: the environment's
/// containers live in the kubelet's cgroup, as its processes did before; rlimits are
/// inherited from the kubelet (raising them can be refused).
pub fn runtime_spec(i: &SpecInput<'_>) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    if let Some(dir) = i.token_dir {
        mounts.push(json!({"destination": "/var/run/secrets/kubernetes.io/serviceaccount",
            "type": "bind", "source": dir, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": i.uid, "gid": i.gid},
            "args": i.args,
            "env": i.env,
            "cwd": if i.cwd.is_empty() { "/" } else { i.cwd.as_str() },
            "capabilities": {"bounding": i.caps, "effective": i.caps, "permitted": i.caps},
            "noNewPrivileges": i.no_new_privileges,
        },
        "root": {"path": i.rootfs, "readonly": i.readonly},
        "hostname": i.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": i.netns},
            ],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"],
        },
    })
}

/// The environment of the container: the image's, then the pod's (which wins).
pub fn merged_env(image: &ImageConfig, pod_env: &BTreeMap<String, String>) -> Vec<String> {
    let mut env: BTreeMap<String, String> = image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(pod_env.clone());
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// crun for the environment's containers. crun refuses hosts whose cgroup v2 hierarchy
/// has controllers next to cgroup v1 ("hybrid"), so it runs in a private mount namespace
/// without the v2 mount; cgroups are not managed (the kubelet runs no resource limits).
fn crun(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "if [ \"$(stat -fc %T /sys/fs/cgroup)\" = tmpfs ]; then \
             umount -l /sys/fs/cgroup/unified 2>/dev/null; fi; exec crun \"$@\"",
        )
        .arg("crun")
        .args(["--cgroup-manager=disabled", "--root", CRUN_ROOT])
        .args(args);
    cmd
}

/// `crun run` of the bundle in the foreground: the process to supervise.
pub fn run_command(bundle: &Path, id: &str) -> Command {
    let bundle = bundle.display().to_string();
    crun(&["run", "--bundle", &bundle, id])
}

/// Stops container `id`: SIGTERM, then what is left is killed and its state removed.
pub fn stop(id: &str, grace: std::time::Duration) {
    let _ = crun(&["kill", id, "TERM"]).output();
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && state_pid(id).is_some() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    delete(id);
}

/// `crun delete --force`: kills the container if it still runs and forgets it.
pub fn delete(id: &str) {
    match crun(&["delete", "--force", id]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::debug!(
            id,
            "crun delete: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => tracing::warn!(id, "crun delete: {e}"),
    }
}

/// Waits until container `id` runs; an error with the end of its log when crun gave up
/// (e.g. the binary cannot start in the image).
pub async fn wait_running(id: &str, log: &Path, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let found = {
            let id = id.to_string();
            tokio::task::spawn_blocking(move || state_pid(&id))
                .await
                .ok()
                .flatten()
        };
        if found.is_some() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(Error::Setup(format!(
                "container {id} is not running after {}s: {}",
                timeout.as_secs(),
                tail.join(" | ")
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Ids and pids of the containers crun knows in `CRUN_ROOT`.
pub fn list() -> Vec<(String, Option<u32>)> {
    let Ok(out) = crun(&["list", "--format", "json"]).output() else {
        return Vec::new();
    };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let id = c["id"].as_str()?.to_string();
            let pid = c["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
            let running = c["status"].as_str() == Some("running");
            Some((id, pid.filter(|_| running)))
        })
        .collect()
}

/// The host pid of container `id`'s first process while it runs.
pub fn state_pid(id: &str) -> Option<u32> {
    list()
        .into_iter()
        .find(|(i, _)| i == id)
        .and_then(|(_, p)| p)
}

/// Deletes every container of the environment (teardown and the sweep before a start).
pub fn delete_all() {
    if !Path::new(CRUN_ROOT).exists() {
        return;
    }
    for (id, _) in list() {
        delete(&id);
    }
}

/// The crun id of a pod's container (crun allows letters, digits, `-`, `_` and `.`).
pub fn container_id(pod_uid: &str, container: &str) -> String {
    format!("{pod_uid}-{container}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Capabilities;

    #[test]
    fn references_split_into_repository_tag_and_digest() {
        assert_eq!(
            split_reference("ghcr.io/b/berth-nodeproxy:0.1.0"),
            ("ghcr.io/b/berth-nodeproxy", Some("0.1.0"), None)
        );
        assert_eq!(
            split_reference("localhost:5000/berth-controller"),
            ("localhost:5000/berth-controller", None, None)
        );
        assert_eq!(
            split_reference("r/berth-controller:1@sha256:ab"),
            ("r/berth-controller", Some("1"), Some("sha256:ab"))
        );
    }

    fn container(command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        Container {
            command: command.map(v),
            args: args.map(v),
            ..Container::default()
        }
    }

    #[test]
    fn argv_follows_kubernetes_entrypoint_rules() {
        let image = ImageConfig {
            entrypoint: vec!["/e".into()],
            cmd: vec!["c".into()],
            ..ImageConfig::default()
        };
        assert_eq!(process_args(&container(None, None), &image), ["/e", "c"]);
        assert_eq!(
            process_args(&container(None, Some(&["a"])), &image),
            ["/e", "a"]
        );
        assert_eq!(
            process_args(&container(Some(&["/x"]), None), &image),
            ["/x"]
        );
        assert_eq!(
            process_args(&container(Some(&["/x"]), Some(&["a"])), &image),
            ["/x", "a"]
        );
    }

    #[test]
    fn user_comes_from_container_pod_then_image_and_non_root_is_enforced() {
        let pod = PodSecurityContext {
            run_as_user: Some(65532),
            run_as_non_root: Some(true),
            ..PodSecurityContext::default()
        };
        assert_eq!(process_user(Some(&pod), None, "0:0").ok(), Some((65532, 0)));
        let c = SecurityContext {
            run_as_user: Some(7),
            run_as_group: Some(8),
            ..SecurityContext::default()
        };
        assert_eq!(process_user(Some(&pod), Some(&c), "").ok(), Some((7, 8)));
        assert_eq!(
            process_user(None, None, "65532:65532").ok(),
            Some((65532, 65532))
        );
        let root = SecurityContext {
            run_as_non_root: Some(true),
            ..SecurityContext::default()
        };
        assert!(process_user(None, Some(&root), "0").is_err());
        assert!(process_user(None, None, "nobody").is_err());
    }

    #[test]
    fn capabilities_drop_all_then_add() {
        let sc = |drop: &[&str], add: &[&str]| SecurityContext {
            capabilities: Some(Capabilities {
                drop: Some(drop.iter().map(|s| s.to_string()).collect()),
                add: Some(add.iter().map(|s| s.to_string()).collect()),
            }),
            ..SecurityContext::default()
        };
        assert_eq!(
            capabilities(Some(&sc(&["ALL"], &["NET_ADMIN", "CAP_NET_RAW"]))),
            ["CAP_NET_ADMIN", "CAP_NET_RAW"]
        );
        assert!(capabilities(Some(&sc(&["ALL"], &[]))).is_empty());
        let default = capabilities(None);
        assert!(default.contains(&"CAP_CHOWN".to_string()));
        assert!(!default.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!capabilities(Some(&sc(&["chown"], &[]))).contains(&"CAP_CHOWN".to_string()));
    }

    #[test]
    fn spec_joins_the_netns_and_mounts_the_token_read_only() {
        let token = PathBuf::from("/tmp/tok");
        let spec = runtime_spec(&SpecInput {
            rootfs: Path::new("/b/rootfs"),
            readonly: true,
            args: vec!["/usr/local/bin/berth-nodeproxy".into()],
            env: vec!["A=1".into()],
            cwd: String::new(),
            uid: 0,
            gid: 0,
            caps: vec!["CAP_NET_ADMIN".into()],
            no_new_privileges: true,
            netns: PathBuf::from("/run/netns/berth-node-1"),
            hostname: "node-1".into(),
            token_dir: Some(&token),
        });
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["process"]["cwd"], "/");
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert_eq!(
            spec["process"]["capabilities"]["effective"][0],
            "CAP_NET_ADMIN"
        );
        let net = spec["linux"]["namespaces"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["type"] == "network"))
            .cloned();
        assert_eq!(
            net.map(|n| n["path"].clone()),
            Some(json!("/run/netns/berth-node-1"))
        );
        let token_mount = spec["mounts"]
            .as_array()
            .and_then(|m| {
                m.iter()
                    .find(|m| m["destination"] == "/var/run/secrets/kubernetes.io/serviceaccount")
            })
            .cloned()
            .unwrap_or_default();
        assert_eq!(token_mount["source"], "/tmp/tok");
        assert!(
            token_mount["options"]
                .as_array()
                .is_some_and(|o| o.contains(&json!("ro")))
        );
    }

    #[test]
    fn pod_env_wins_over_the_image_env() {
        let image = ImageConfig {
            env: vec!["PATH=/bin".into(), "A=image".into()],
            ..ImageConfig::default()
        };
        let pod = BTreeMap::from([("A".to_string(), "pod".to_string())]);
        assert_eq!(merged_env(&image, &pod), ["A=pod", "PATH=/bin"]);
    }
}
