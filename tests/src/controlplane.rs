//! The real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler, built from Go modules by `hack/build-binaries.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::Client;

use crate::error::{Error, Result};
use crate::net::{CLUSTER_CIDR, HOST_IP, SERVICE_CIDR};
use crate::paths;
use crate::pki::Pki;
use crate::proc::{Supervised, free_port, wait_for};

/// NodePort range given to the apiserver (and, later, to berth's controller).
pub const NODE_PORT_RANGE: &str = "30000-32767";

pub struct ControlPlane {
    pub apiserver_url: String,
    pub kubeconfig: PathBuf,
    pub ca_cert: PathBuf,
    // Dropped (stopped) in reverse start order: scheduler first, etcd last.
    processes: Vec<Supervised>,
}

fn binary(name: &str) -> Result<PathBuf> {
    let path = paths::bin(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::Setup(format!(
            "{} is missing: run hack/build-binaries.sh (make deps)",
            path.display()
        )))
    }
}

fn cmd(binary: &Path, args: Vec<String>) -> Command {
    let mut c = Command::new(binary);
    c.args(args);
    c
}

impl ControlPlane {
    /// Starts the control plane with scratch files in `dir` and logs in `log_dir`; the
    /// admin kubeconfig is written to `kubeconfig`.
    pub async fn start(dir: &Path, log_dir: &Path, kubeconfig: &Path) -> Result<Self> {
        let host = HOST_IP.to_string();
        let pki = Pki::generate(dir, &[host.clone(), "127.0.0.1".into(), "10.96.0.1".into()])?;
        let mut processes = Vec::new();

        let etcd_port = free_port("127.0.0.1")?;
        let etcd_peer = free_port("127.0.0.1")?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_data = dir.join("etcd");
        processes.push(Supervised::spawn(
            "etcd",
            cmd(
                &binary("etcd")?,
                vec![
                    "--name=berth".into(),
                    format!("--data-dir={}", etcd_data.display()),
                    format!("--listen-client-urls={etcd_url}"),
                    format!("--advertise-client-urls={etcd_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster=berth={peer_url}"),
                    "--unsafe-no-fsync".into(),
                    "--log-level=warn".into(),
                ],
            ),
            &log_dir.join("etcd.log"),
        )?);
        let health = format!("{etcd_url}/health");
        let http = reqwest::Client::new();
        wait_for("etcd /health", Duration::from_secs(30), || async {
            matches!(http.get(&health).send().await, Ok(r) if r.status().is_success())
        })
        .await?;

        let api_port = free_port(&host)?;
        let p = |path: &Path| path.display().to_string();
        processes.push(Supervised::spawn(
            "kube-apiserver",
            cmd(
                &binary("kube-apiserver")?,
                vec![
                    format!("--etcd-servers={etcd_url}"),
                    format!("--bind-address={host}"),
                    format!("--advertise-address={host}"),
                    format!("--secure-port={api_port}"),
                    format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
                    format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
                    format!("--client-ca-file={}", p(&pki.ca_cert)),
                    "--authorization-mode=Node,RBAC".into(),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                    format!("--service-account-key-file={}", p(&pki.sa_pub)),
                    format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    format!("--service-node-port-range={NODE_PORT_RANGE}"),
                    "--allow-privileged=true".into(),
                    "--profiling=false".into(),
                    "--v=1".into(),
                ],
            ),
            &log_dir.join("kube-apiserver.log"),
        )?);
        let apiserver_url = format!("https://{host}:{api_port}");
        let config = pki.admin_kubeconfig(&apiserver_url)?;
        std::fs::write(kubeconfig, &config).map_err(Error::io("write kubeconfig", kubeconfig))?;
        let client = crate::client_from_kubeconfig(kubeconfig).await?;
        wait_for("kube-apiserver /readyz", Duration::from_secs(90), || {
            let client = client.clone();
            async move { readyz(&client).await }
        })
        .await?;

        let kc = p(kubeconfig);
        processes.push(Supervised::spawn(
            "kube-controller-manager",
            cmd(
                &binary("kube-controller-manager")?,
                vec![
                    format!("--kubeconfig={kc}"),
                    format!("--authentication-kubeconfig={kc}"),
                    format!("--authorization-kubeconfig={kc}"),
                    "--controllers=*".into(),
                    "--leader-elect=false".into(),
                    "--use-service-account-credentials=true".into(),
                    format!("--service-account-private-key-file={}", p(&pki.sa_key)),
                    format!("--root-ca-file={}", p(&pki.ca_cert)),
                    format!("--cluster-cidr={CLUSTER_CIDR}"),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", free_port("127.0.0.1")?),
                    "--v=1".into(),
                ],
            ),
            &log_dir.join("kube-controller-manager.log"),
        )?);
        processes.push(Supervised::spawn(
            "kube-scheduler",
            cmd(
                &binary("kube-scheduler")?,
                vec![
                    format!("--kubeconfig={kc}"),
                    format!("--authentication-kubeconfig={kc}"),
                    format!("--authorization-kubeconfig={kc}"),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", free_port("127.0.0.1")?),
                    "--v=1".into(),
                ],
            ),
            &log_dir.join("kube-scheduler.log"),
        )?);

        // The default ServiceAccount appears once the controller-manager runs: a sign
        // that it is up and that pods can be created.
        wait_for(
            "kube-controller-manager to create ServiceAccount default/default",
            Duration::from_secs(60),
            || {
                let client = client.clone();
                async move {
                    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
                        kube::Api::namespaced(client, "default");
                    matches!(api.get_opt("default").await, Ok(Some(_)))
                }
            },
        )
        .await?;

        Ok(Self {
            apiserver_url,
            kubeconfig: kubeconfig.to_path_buf(),
            ca_cert: pki.ca_cert.clone(),
            processes,
        })
    }

    /// Names of processes that have exited, with their status.
    pub fn dead(&mut self) -> Vec<String> {
        self.processes
            .iter_mut()
            .filter_map(|p| p.exited().map(|s| format!("{} exited: {s}", p.name)))
            .collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Supervised::pid).collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(mut p) = self.processes.pop() {
            p.stop(Duration::from_secs(5));
        }
    }
}

async fn readyz(client: &Client) -> bool {
    let req = match http::Request::get("/readyz").body(Vec::new()) {
        Ok(r) => r,
        Err(_) => return false,
    };
    matches!(client.request_text(req).await, Ok(body) if body.trim() == "ok")
}
