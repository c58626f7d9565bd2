//! berth's real local environment: a Kubernetes control plane built from Go modules,
//! LocalStack with berth's ELBv2 extension, simulated nodes and pods in network
//! namespaces, and the helpers the end-to-end suites use to reach them.

pub mod agentstate;
pub mod awscase;
pub mod awsinfra;
pub mod awslimits;
pub mod controller;
pub mod controlplane;
pub mod env;
pub mod error;
pub mod helm;
pub mod identity;
pub mod kubelet;
pub mod l2;
pub mod l2scale;
pub mod lbcompare;
pub mod localstack;
pub mod metallb;
pub mod net;
pub mod nodeagent;
pub mod oci;
pub mod paths;
pub mod pki;
pub mod podrun;
pub mod proc;
pub mod prometheus;
pub mod proxybench;
pub mod requests;
pub mod router;
pub mod service;
pub mod testing;
pub mod wait;

pub use env::{Env, EnvInfo};
pub use error::{Error, Result};

/// A client for the cluster described by `kubeconfig`.
pub async fn client_from_kubeconfig(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| Error::Setup(format!("read {}: {e}", kubeconfig.display())))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| Error::Setup(format!("load {}: {e}", kubeconfig.display())))?;
    kube::Client::try_from(config).map_err(Error::kube("build client"))
}
