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
