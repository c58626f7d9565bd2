//! Chart suite: the Helm chart renders for the default, an AWS and a pool configuration,
//! the real apiserver accepts every rendered object (server-side dry-run), and the values
//! schema rejects bad values with a message naming the bad key. Needs root and the running
//! local cluster (`make test`).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use berth_e2e::paths;
use berth_e2e::testing::TestEnv;

fn chart() -> PathBuf {
    paths::repo_root().join("charts").join("berth")
}

fn values(name: &str) -> String {
    paths::repo_root()
        .join("tests/testdata/chart")
        .join(name)
        .display()
        .to_string()
}

fn helm(args: &[&str]) -> Output {
    Command::new(paths::bin("helm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run helm {}: {e}", args.join(" ")))
}

fn render(namespace: &str, values_file: Option<&str>) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "berth", &chart, "--namespace", namespace];
    if let Some(v) = values_file {
        args.extend(["--values", v]);
    }
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template {values_file:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_apiserver() {
    let env = TestEnv::connect().await;
    let ns = env.namespace("chart").await;
    // The chart's CRDs first, as `helm install` does; LoadBalancerClass objects need them.
    let crds = chart().join("crds").display().to_string();
    env.kubectl(&["apply", "--server-side", "-f", &crds]);
    for file in [None, Some(values("aws.yaml")), Some(values("pool.yaml"))] {
        let manifest = render(&ns.name, file.as_deref());
        let path = std::env::temp_dir().join(format!(
            "{}chart-{:08x}.yaml",
            paths::SCRATCH_PREFIX,
            rand::random::<u32>()
        ));
        std::fs::write(&path, &manifest).expect("write rendered chart");
        let out = env
            .kubectl_output(&[
                "apply",
                "--dry-run=server",
                "-n",
                &ns.name,
                "-f",
                path.to_str().expect("utf-8 temp path"),
            ])
            .expect("run kubectl");
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "apiserver rejected the chart rendered with {file:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let applied = String::from_utf8_lossy(&out.stdout);
        for kind in ["deployment.apps/", "daemonset.apps/", "clusterrole.rbac"] {
            assert!(applied.contains(kind), "{kind} missing from: {applied}");
        }
        if file.is_some() {
            assert!(
                applied.contains("loadbalancerclass.berth.dev/chart-"),
                "class missing from: {applied}"
            );
        }
    }
}

#[test]
fn values_schema_rejects_bad_values_naming_the_key() {
    let chart = chart().display().to_string();
    for (file, expect) in [
        ("bad-two-providers.yaml", "/loadBalancerClasses/0"),
        ("bad-replicas.yaml", "/controller/replicas"),
        ("bad-unknown-key.yaml", "privileged"),
        ("bad-cidr.yaml", "/nodeproxy/serviceCIDR"),
    ] {
        let v = values(file);
        let out = helm(&["template", "berth", &chart, "--values", &v]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            stderr.contains(expect),
            "{file}: message lacks {expect}: {stderr}"
        );
    }
}

#[test]
fn helm_lint_passes_for_every_configuration() {
    let chart = chart().display().to_string();
    for file in [None, Some(values("aws.yaml")), Some(values("pool.yaml"))] {
        let mut args = vec!["lint", "--strict", &chart];
        if let Some(v) = file.as_deref() {
            args.extend(["--values", v]);
        }
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm lint {file:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
