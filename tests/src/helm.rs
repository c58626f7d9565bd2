//! Helm from the suites: the repository's chart, releases uninstalled on drop, values
//! files in the scratch area.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::paths;
use crate::testing::TestEnv;

/// The repository's chart.
pub fn chart() -> PathBuf {
    paths::repo_root().join("charts").join("berth")
}

/// A values file under `tests/testdata/chart/`.
pub fn testdata_values(name: &str) -> String {
    paths::repo_root()
        .join("tests/testdata/chart")
        .join(name)
        .display()
        .to_string()
}

/// Runs the cached helm binary; panics only when it cannot be started.
pub fn helm(args: &[&str]) -> Output {
    Command::new(paths::bin("helm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run helm {}: {e}", args.join(" ")))
}

/// A Helm release of the chart; uninstalled on drop so a failing case leaves nothing.
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub kubeconfig: String,
}

impl Release {
    pub fn new(env: &TestEnv, name: &str, namespace: &str) -> Self {
        Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            kubeconfig: env.info.kubeconfig.display().to_string(),
        }
    }

    /// The chart's `berth.fullname` for this release.
    pub fn fullname(&self) -> String {
        if self.name.contains("berth") {
            self.name.clone()
        } else {
            format!("{}-berth", self.name)
        }
    }

    /// The namespace the chart creates for the node agents' Leases (default values).
    pub fn l2_namespace(&self) -> String {
        format!("{}-l2", self.fullname())
    }

    /// `helm install <release> <chart> --wait`; panics with helm's stderr on failure.
    pub fn install(&self, values: &[String]) {
        expect_success(&self.helm("install", values), "helm install");
    }

    /// `helm upgrade <release> <chart> --wait`; panics with helm's stderr on failure.
    pub fn upgrade(&self, values: &[String]) {
        expect_success(&self.helm("upgrade", values), "helm upgrade");
    }

    /// `helm uninstall --wait`; panics with helm's stderr on failure.
    pub fn uninstall(&self) {
        expect_success(&self.uninstall_output(), "helm uninstall");
    }

    fn helm(&self, verb: &str, values: &[String]) -> Output {
        let chart = chart().display().to_string();
        let mut args = vec![verb, &self.name, &chart, "-n", &self.namespace];
        args.extend([
            "--kubeconfig",
            &self.kubeconfig,
            "--wait",
            "--timeout",
            "90s",
        ]);
        for v in values {
            args.extend(["--values", v]);
        }
        helm(&args)
    }

    fn uninstall_output(&self) -> Output {
        helm(&[
            "uninstall",
            &self.name,
            "-n",
            &self.namespace,
            "--kubeconfig",
            &self.kubeconfig,
            "--wait",
        ])
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = self.uninstall_output();
    }
}

/// Panics with the command's stderr unless it succeeded.
pub fn expect_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A values file with `text` in the scratch area (swept with the environment); the
/// caller removes it.
pub fn write_values(text: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "{}values-{:08x}.yaml",
        paths::SCRATCH_PREFIX,
        rand::random::<u32>()
    ));
    std::fs::write(&path, text).expect("write values");
    path.display().to_string()
}

/// Names of the Running pods matching `selector` in `namespace`.
pub fn running_pods(env: &TestEnv, namespace: &str, selector: &str) -> Vec<String> {
    env.kubectl(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        selector,
        "--field-selector",
        "status.phase=Running",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

/// Values that point the chart's node agents at the environment's apiserver and networks,
/// for the `bare_*` suites, whose nodes run no harness agent. Panics (a failing case, not a
/// skip) when the environment runs harness agents: the two would fight over nftables.
pub fn bare_node_agent_values(env: &TestEnv) -> String {
    assert!(
        !env.info.node_agents,
        "this suite needs nodes without harness agents: hack/e2e.sh runs it in its second \
         phase (BERTH_E2E_NODEPROXY=0)"
    );
    let api = env.info.apiserver_url.trim_start_matches("https://");
    let (host, port) = api.rsplit_once(':').expect("apiserver host:port");
    format!(
        "nodeproxy:\n  apiServer: {{host: \"{host}\", port: {port}}}\n  \
         clusterCIDR: {}\n  serviceCIDR: {}\n",
        crate::net::CLUSTER_CIDR,
        env.info.service_cidr
    )
}

/// A token of ServiceAccount `name` in `namespace` (TokenRequest API, 10 minutes).
pub fn service_account_token(env: &TestEnv, namespace: &str, name: &str) -> String {
    env.kubectl(&["create", "token", name, "-n", namespace, "--duration=10m"])
        .trim()
        .to_string()
}

/// A kubeconfig in the scratch area that authenticates with `token` only (no client
/// certificate), so the apiserver applies that identity's RBAC; the caller removes it.
pub fn token_kubeconfig(env: &TestEnv, token: &str) -> String {
    let ca = env.kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let text = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "token",
        "clusters": [{"name": "env", "cluster": {
            "server": env.info.apiserver_url, "certificate-authority-data": ca.trim()}}],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": "token", "context": {"cluster": "env", "user": "token"}}],
    });
    write_values(&text.to_string())
}

/// Runs kubectl with the kubeconfig `kubeconfig`; panics only when it cannot be started.
pub fn kubectl_with(kubeconfig: &str, args: &[&str]) -> Output {
    Command::new(paths::bin("kubectl"))
        .args(["--kubeconfig", kubeconfig])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run kubectl {}: {e}", args.join(" ")))
}

/// Every object of every listable kind (namespaced in all namespaces, and cluster-scoped)
/// that belongs to `release`: in its namespace (but what the namespace itself brings: the
/// `default` ServiceAccount, `kube-root-ca.crt`), in its Lease namespace, named after it
/// or labelled as its instance. Events are left out: records of what happened, not
/// objects that do anything, and they expire. As `kind/namespace/name`.
pub fn objects_left(env: &TestEnv, release: &Release) -> Vec<String> {
    let kinds = env.kubectl(&["api-resources", "--verbs=list", "-o", "name"]);
    let kinds: Vec<&str> = kinds
        .lines()
        .filter(|k| !matches!(*k, "events" | "events.events.k8s.io"))
        .collect();
    let listed = env.kubectl(&["get", &kinds.join(","), "-A", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&listed).expect("kubectl get -o json");
    let l2 = release.l2_namespace();
    let mut left = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let meta = &item["metadata"];
        let (kind, name) = (
            item["kind"].as_str().unwrap_or(""),
            meta["name"].as_str().unwrap_or(""),
        );
        let ns = meta["namespace"].as_str().unwrap_or("");
        let brought = matches!(
            (kind, name),
            ("ServiceAccount", "default") | ("ConfigMap", "kube-root-ca.crt")
        );
        let ours = (ns == release.namespace && !brought)
            || ns == l2
            || name.contains(&release.name)
            || meta["labels"]["app.kubernetes.io/instance"].as_str() == Some(release.name.as_str());
        if ours {
            left.push(format!("{kind}/{ns}/{name}"));
        }
    }
    left
}
