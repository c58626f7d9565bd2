//! The chart's pods run from the images `make images` built: every berth process of a
//! `helm install` has the unpacked image as its root filesystem (the same files, byte for
//! byte; no shell or package manager), runs with the chart's security context (uid 65532
//! and no capabilities for the controller, NET_ADMIN and NET_RAW for the agent, read-only
//! root, no privilege escalation, the ServiceAccount token mounted), joins its network
//! namespace (the node's for the host-network agent), and the pod status names the image's
//! manifest digest. A deleted pod's container is gone; an image that was not built leaves
//! the pod waiting with the reason. Needs root; runs on nodes without harness agents.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_e2e::helm::{Release, bare_node_agent_values, running_pods, write_values};
use berth_e2e::oci;
use berth_e2e::testing::{TestEnv, wait_for};
use serde_json::Value;

/// Every non-directory entry under `root` (relative path -> kind, mode and content),
/// skipping the runtime's mounts: /proc, /sys, /dev and the ServiceAccount token.
fn tree(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}"));
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            if ["proc", "sys", "dev"].iter().any(|m| rel == Path::new(m))
                || rel.starts_with("var/run/secrets")
            {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                out.insert(
                    rel,
                    (meta.mode(), target.into_os_string().into_encoded_bytes()),
                );
            } else {
                let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                out.insert(rel, (meta.mode(), data));
            }
        }
    }
    out
}

fn pod_json(env: &TestEnv, ns: &str, name: &str) -> Value {
    let text = env.kubectl(&["get", "pod", name, "-n", ns, "-o", "json"]);
    serde_json::from_str(&text).expect("pod JSON")
}

/// The `Name:\tvalue` line of /proc/<pid>/status.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

/// What the test asserts of one running berth pod; returns its container's crun id.
fn check_pod(env: &TestEnv, ns: &str, pod: &str, binary: &str) -> String {
    let p = pod_json(env, ns, pod);
    let container = &p["spec"]["containers"][0];
    let image_ref = container["image"].as_str().expect("image");
    let image = oci::resolve(&oci::images_dir(), image_ref).expect("the pod's image is built");
    let index: Value = serde_json::from_slice(
        &std::fs::read(image.layout.join("index.json")).expect("index.json"),
    )
    .expect("index JSON");
    let tag = image_ref.rsplit(':').next().unwrap_or_default();
    let digest = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter().find(|m| {
                m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag)
            })
        })
        .and_then(|m| m["digest"].as_str())
        .expect("tag in the layout");
    let image_id = p["status"]["containerStatuses"][0]["imageID"]
        .as_str()
        .unwrap_or_default();
    assert!(
        image_id.ends_with(&format!("@{digest}")),
        "{pod}: imageID {image_id:?} is not the manifest digest {digest}"
    );

    let uid = p["metadata"]["uid"].as_str().expect("uid");
    let name = container["name"].as_str().expect("container name");
    let id = oci::container_id(uid, name);
    let pid = oci::state_pid(&id).unwrap_or_else(|| panic!("{pod}: no running crun {id}"));
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert_eq!(exe, Path::new("/usr/local/bin").join(binary), "{pod}");

    // The process's root filesystem is the image, file for file.
    let fresh = tempdir(&format!("image-{binary}"));
    oci::unpack(&image, &fresh.join("rootfs")).expect("unpack the image");
    let expected = tree(&fresh.join("rootfs"));
    let actual = tree(&root);
    let _ = std::fs::remove_dir_all(&fresh);
    let differ: Vec<_> = expected
        .keys()
        .chain(actual.keys())
        .filter(|k| expected.get(*k) != actual.get(*k))
        .take(10)
        .collect();
    assert!(
        differ.is_empty(),
        "{pod}: root differs from the image at {differ:?}"
    );
    for gone in [
        "bin/sh",
        "bin/bash",
        "bin/dash",
        "usr/bin/dpkg",
        "usr/bin/apt",
        "usr/bin/perl",
    ] {
        assert!(!root.join(gone).exists(), "{pod}: {gone} is in the image");
    }
    let token = root.join("var/run/secrets/kubernetes.io/serviceaccount/token");
    assert!(
        std::fs::metadata(&token).is_ok_and(|m| m.len() > 0),
        "{pod}: no ServiceAccount token"
    );

    // The chart's security context.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    let opts = root_mount.split_whitespace().nth(5).unwrap_or_default();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "{pod}: root mounted {opts}"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{pod}");
    id_and_caps(pid, pod, binary);
    id
}

fn id_and_caps(pid: u32, pod: &str, binary: &str) {
    let uid = status_field(pid, "Uid");
    let caps = u64::from_str_radix(&status_field(pid, "CapEff"), 16).expect("CapEff hex");
    if binary == "berth-controller" {
        assert!(uid.starts_with("65532\t"), "{pod}: uid {uid}");
        assert_eq!(caps, 0, "{pod}: capabilities {caps:#x}");
    } else {
        const NET_ADMIN: u64 = 1 << 12;
        const NET_RAW: u64 = 1 << 13;
        assert!(uid.starts_with("0\t"), "{pod}: uid {uid}");
        assert_eq!(caps, NET_ADMIN | NET_RAW, "{pod}: capabilities {caps:#x}");
    }
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-e2e-{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn chart_pods_run_from_the_built_images_with_the_charts_security_context() {
    let env = TestEnv::connect().await;
    let agents = bare_node_agent_values(&env);
    let system = env.namespace("images-system").await;
    let values = write_values(&format!(
        "clusterName: {}\ncontroller:\n  replicas: 1\n  podDisruptionBudget: {{enabled: false}}\n{agents}",
        env.info.cluster_name
    ));
    let id = format!("{:08x}", rand::random::<u32>());
    let release = Release::new(&env, &format!("berth-{id}"), &system.name);
    release.install(std::slice::from_ref(&values));

    let controllers = running_pods(
        &env,
        &system.name,
        "app.kubernetes.io/name=berth-controller",
    );
    assert_eq!(controllers.len(), 1, "{controllers:?}");
    let controller_id = check_pod(&env, &system.name, &controllers[0], "berth-controller");
    let agents = running_pods(&env, &system.name, "app.kubernetes.io/name=berth-nodeproxy");
    assert_eq!(agents.len(), env.info.nodes.len(), "{agents:?}");
    let mut agent_ids = Vec::new();
    for pod in &agents {
        agent_ids.push(check_pod(&env, &system.name, pod, "berth-nodeproxy"));
        // The host-network agent shares its node's network namespace.
        let p = pod_json(&env, &system.name, pod);
        let node = p["spec"]["nodeName"].as_str().expect("nodeName");
        let netns = &env
            .info
            .nodes
            .iter()
            .find(|n| n.plan.name == node)
            .expect("a node of the env")
            .plan
            .netns;
        let pid = oci::state_pid(agent_ids.last().expect("pushed")).expect("running");
        assert_eq!(
            inode(&format!("/proc/{pid}/ns/net")),
            inode(&format!("/run/netns/{netns}")),
            "{pod} is not in {netns}"
        );
    }

    // A deleted pod's container is stopped and forgotten by crun.
    env.kubectl(&[
        "delete",
        "pod",
        &controllers[0],
        "-n",
        &system.name,
        "--wait=true",
    ]);
    wait_for(
        "the deleted pod's container gone",
        Duration::from_secs(30),
        || {
            let gone = oci::list().iter().all(|(i, _)| *i != controller_id);
            async move { gone }
        },
    )
    .await
    .expect("crun container of the deleted pod removed");

    release.uninstall();
    wait_for(
        "the agents' containers gone",
        Duration::from_secs(60),
        || {
            let left = oci::list();
            let gone = agent_ids.iter().all(|a| left.iter().all(|(i, _)| i != a));
            async move { gone }
        },
    )
    .await
    .expect("crun containers of the uninstalled release removed");
}

#[tokio::test]
async fn a_berth_image_that_was_not_built_leaves_the_pod_waiting_with_the_reason() {
    let env = TestEnv::connect().await;
    let ns = env.namespace("images-missing").await;
    let manifest = write_values(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: missing, namespace: {}}}\n\
         spec:\n  automountServiceAccountToken: false\n  containers:\n  \
         - {{name: c, image: ghcr.io/berth-dev/berth-controller:0.0.0-not-built}}\n",
        ns.name
    ));
    env.kubectl(&["apply", "-f", &manifest]);
    let mut message = String::new();
    wait_for("the pod's waiting reason", Duration::from_secs(30), || {
        message = env
            .kubectl_output(&[
                "get",
                "pod",
                "missing",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.status.containerStatuses[0].state.waiting.message}",
            ])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let done = message.contains("0.0.0-not-built");
        async move { done }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: last message {message:?}"));
    assert!(message.contains("make images"), "{message}");
    let _ = std::fs::remove_file(&manifest);
}
