//! `kubectl berth`: asks berth about LoadBalancer Services. `status` says what serves a
//! Service (class, address, condition, the announcing node or the NLB's listeners and
//! target health), `why` explains a Service that is not ready in plain words, and `plan`
//! shows what the controller would change in AWS, computed by the controller's own code
//! with every write recorded instead of made.

pub mod cluster;
pub mod plan;
pub mod status;
pub mod why;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A failure of the plugin itself (a Service that is not ready is an answer, not one).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("Service {0} not found")]
    NotFound(String),
    #[error("reading {0}: {1}")]
    File(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a Service manifest: {1}")]
    Manifest(PathBuf, #[source] serde_yaml::Error),
    #[error("AWS: {0}")]
    Aws(String),
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "kubectl berth",
    about = "Status, reasons and plans of berth's load balancers"
)]
pub struct Cli {
    /// Namespace of the Service (default: the kubeconfig's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub aws: AwsOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach AWS: the same settings (and environment variables) as the controller's.
#[derive(Debug, Clone, Args)]
pub struct AwsOpts {
    #[arg(
        long,
        global = true,
        env = "BERTH_CLUSTER_NAME",
        default_value = "kubernetes"
    )]
    pub cluster_name: String,
    /// The controller's --cluster-id (default: the kube-system Namespace's UID).
    #[arg(long, global = true, env = "BERTH_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// AWS region.
    #[arg(long, global = true, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// AWS endpoint (LocalStack).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint: Option<String>,
    /// The controller's --vpc-id.
    #[arg(long, global = true, env = "BERTH_VPC_ID")]
    pub vpc_id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One Service in detail, or a table of every berth Service.
    Status { service: Option<String> },
    /// Why a Service is not ready, and what to change.
    Why { service: String },
    /// What the controller would create, modify or delete in AWS; writes nothing.
    Plan {
        /// The live Service (changed by `-f` when both are given).
        service: Option<String>,
        /// A Service manifest.
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
    },
}

impl AwsOpts {
    /// The controller's configuration with these settings (everything else default).
    pub fn controller_config(&self) -> Result<berth_controller::Config, Error> {
        let mut args = vec![
            "berth-controller".to_string(),
            "--cluster-name".into(),
            self.cluster_name.clone(),
            "--region".into(),
            self.region.clone(),
        ];
        let optional = [
            ("--cluster-id", &self.cluster_id),
            ("--aws-endpoint", &self.aws_endpoint),
            ("--vpc-id", &self.vpc_id),
        ];
        for (flag, value) in optional {
            if let Some(v) = value {
                args.extend([flag.to_string(), v.clone()]);
            }
        }
        berth_controller::Config::try_parse_from(args).map_err(|e| Error::Usage(e.to_string()))
    }
}

/// Runs one command; answers what to print.
pub async fn run(cli: Cli) -> Result<String, Error> {
    let client = kube::Client::try_default().await?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match cli.command {
        Command::Status { service: None } => status::table(&client, cli.namespace.as_deref()).await,
        Command::Status {
            service: Some(name),
        } => status::detail(&client, &cli.aws, &namespace, &name).await,
        Command::Why { service } => why::explain(&client, &namespace, &service).await,
        Command::Plan { service, file } => {
            plan::run(&client, &cli.aws, &namespace, service.as_deref(), file).await
        }
    }
}
